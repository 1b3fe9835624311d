//! A PKCS#11 module that fails mid-run (here: finalised under the provider's feet, as a
//! crashed HSM client library would leave it) yields a typed `KeyUnavailable` naming the
//! provider, never a hang or a panic. A test binary of its own: finalising the module
//! affects the whole process.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/hsm.rs"]
mod hsm;

use std::sync::Arc;
use std::time::Duration;

use common::Fixture;
use shardlock::pkcs11::{self, Pkcs11Provider, Pkcs11Uri};
use shardlock::Error;

#[test]
fn a_module_that_fails_mid_run_is_key_unavailable() {
    let _hsm = hsm::setup(&["modfail"]);
    let uri = hsm::uri("modfail", "kek");
    pkcs11::generate_kek(&Pkcs11Uri::parse(&uri).unwrap()).unwrap();
    let provider = Arc::new(Pkcs11Provider::open_uri(&uri).unwrap());
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*provider, "ds", "modfail", 16);
    assert_eq!(fx.read_all_with(&dir, provider.clone()).unwrap(), samples);
    let mut loader = fx
        .loader_with(&dir, "modfail", provider.clone())
        .batch_size(4)
        .workers(2)
        .memory_budget(1 << 20)
        .build()
        .unwrap();
    assert_eq!(loader.by_ref().map(|b| b.unwrap().len()).sum::<usize>(), 16);

    // C_Finalize through a second handle on the same module: every later call of the
    // provider's context fails with CKR_CRYPTOKI_NOT_INITIALIZED.
    let raw = cryptoki::context::Pkcs11::new(hsm::MODULE).unwrap();
    raw.finalize().unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = loader.next().map(|r| r.map(|_| ()));
        let _ = tx.send(r);
    });
    match rx.recv_timeout(Duration::from_secs(60)).expect("the loader hung after the module failed") {
        Some(Err(Error::KeyUnavailable { detail, .. })) => {
            assert!(detail.contains("pkcs11 token \"modfail\" object \"kek\""), "names the provider: {detail}");
            // Either the pooled session's unwrap fails or, with no idle session left, the
            // new session's C_OpenSession does: both name the provider and the return code.
            assert!(detail.contains("unavailable") && detail.contains("CryptokiNotInitialized"), "{detail}");
        }
        other => panic!("expected KeyUnavailable, got {other:?}"),
    }
    // Every later use fails the same way, at once.
    match fx.read_all_with(&dir, provider) {
        Err(Error::KeyUnavailable { detail, .. }) => assert!(detail.contains("pkcs11 token \"modfail\""), "{detail}"),
        other => panic!("expected KeyUnavailable, got {:?}", other.map(|_| ())),
    }
}
