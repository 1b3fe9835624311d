//! The PKCS#11 key provider against a fresh SoftHSM2 token per test: KEK generated in the
//! HSM, pack -> token -> stream through it, byte compatibility with the keyring's AES-KWP,
//! rotation between providers, worker threads, a token removed mid-run, the CLI, and
//! every bad input the provider names.
//!
//! Needs SoftHSM2 (`apt-get install softhsm2`; `make test` installs it): without it the
//! tests fail saying so, they do not skip.
#![allow(clippy::unwrap_used)]

#[path = "common/cli.rs"]
mod cli_run;
mod common;
#[path = "common/hsm.rs"]
mod hsm;
#[path = "common/pki.rs"]
mod pki;

use cli_run::{ok as cli_ok, run as cli};

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use common::Fixture;
use shardlock::pkcs11::{self, Pkcs11Provider, Pkcs11Uri};
use shardlock::{open_provider, KeyProvider, Keyring};
use shardlock::{DenyReason, Error, Loader, ProviderFailure, Shuffle};
use shardlock::{Operation, ShardSet, Token, TokenSpec};

const TOKENS: &[&str] = &[
    "e2e", "once", "rotate", "compat", "pin", "errors", "extract", "samekid", "threads", "remove", "cli", "bench",
    "keyd",
];

/// The SoftHSM2 of this test process, set up by the first test that needs it.
fn env() -> &'static hsm::Hsm {
    static ENV: OnceLock<hsm::Hsm> = OnceLock::new();
    ENV.get_or_init(|| hsm::setup(TOKENS))
}

fn open(uri: &str) -> Arc<Pkcs11Provider> {
    Arc::new(Pkcs11Provider::open_uri(uri).unwrap_or_else(|e| panic!("open {uri}: {e}")))
}

fn keygen(uri: &str) -> String {
    pkcs11::generate_kek(&Pkcs11Uri::parse(uri).unwrap()).unwrap_or_else(|e| panic!("keygen {uri}: {e}"))
}

fn provider_failure(e: &Error) -> Option<ProviderFailure> {
    match e {
        Error::KeyProvider { kind, .. } => Some(*kind),
        _ => None,
    }
}

/// Every file of the dataset but the manifest: the encrypted payloads.
fn payloads(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "manifest.json")
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

fn wrapped(fx: &Fixture, dir: &Path) -> Vec<(String, String)> {
    fx.open(dir).unwrap().manifest().shards.iter().map(|s| (s.kek_id.clone(), s.wrapped_dek.clone())).collect()
}

/// Streams one epoch and returns every sample (x, tag) by global id.
fn stream(loader: &mut Loader) -> shardlock::Result<HashMap<u64, Vec<Vec<u8>>>> {
    let mut out = HashMap::new();
    for b in loader.by_ref() {
        let b = b?;
        let x = b.tensor::<u8>("x")?;
        for (j, &id) in b.sample_ids().iter().enumerate() {
            out.insert(id, vec![x.data[700 * j..700 * (j + 1)].to_vec(), b.bytes("tag", j)?.to_vec()]);
        }
    }
    Ok(out)
}

#[test]
fn pack_token_stream_through_the_hsm() {
    env();
    let uri = hsm::uri("e2e", "kek");
    let kek_id = keygen(&uri);
    assert!(kek_id.starts_with("kek-") && kek_id.len() == 20, "{kek_id}");
    // keygen never replaces a key.
    let err = pkcs11::generate_kek(&Pkcs11Uri::parse(&uri).unwrap()).unwrap_err();
    assert_eq!(provider_failure(&err), Some(ProviderFailure::AlreadyExists), "{err}");

    let hsm = open(&uri);
    assert_eq!(hsm.active_kek_id(), kek_id);
    assert!(hsm.describe().contains("pkcs11 token \"e2e\" object \"kek\""), "{}", hsm.describe());
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*hsm, "ds", "hsm-e2e", 40);
    let m = fx.open(&dir).unwrap().manifest().clone();
    assert_eq!(m.shards.len(), 10);
    assert!(m.shards.iter().all(|s| s.kek_id == kek_id && s.wrapped_dek.len() == 80));
    assert_eq!(hsm.stats().wraps, 10);

    // The loader opens the provider from the URI itself (as `--keyring URI` and Python do).
    let audit = fx.path("audit.jsonl");
    let mut loader = Loader::builder(&dir)
        .keyring(&uri)
        .token_value(fx.token("hsm-e2e"))
        .trust_anchor(fx.trust)
        .batch_size(4)
        .shuffle(Shuffle::Global)
        .workers(2)
        .memory_budget(1 << 20)
        .audit_log(&audit)
        .build()
        .unwrap();
    let got = stream(&mut loader).unwrap();
    assert_eq!(got.len(), 40);
    for (id, s) in samples.iter().enumerate() {
        assert_eq!(&got[&(id as u64)], s, "sample {id}");
    }
    let log = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(log.matches("\"key_release\"").count(), 10, "one key release per shard");
    assert!(log.contains("pkcs11 token"), "the audit log names the HSM provider");
    assert!(!log.contains(hsm::PIN));
}

#[test]
fn unwrap_only_after_authorization_and_once_per_shard_per_epoch() {
    env();
    let uri = hsm::uri("once", "kek");
    keygen(&uri);
    let hsm = open(&uri);
    let fx = Fixture::new();
    let (dir, _) = fx.standard_with(&*hsm, "ds", "once", 24);
    let shards = fx.open(&dir).unwrap().manifest().shards.len() as u64;
    assert_eq!(shards, 6);

    // The same structural gate as the keyring: a denied shard unwraps nothing.
    let ds = fx.open(&dir).unwrap();
    let spec = TokenSpec {
        dataset: "once".into(),
        principal: "narrow".into(),
        shards: ShardSet::parse("0").unwrap(),
        ops: vec![Operation::Read],
        expires: SystemTime::now() + Duration::from_secs(600),
        not_before: None,
        min_generation: None,
    };
    let narrow = shardlock::Authorizer::new(
        &fx.trust,
        Some(Token::issue(&fx.issuer, &spec).unwrap()),
        shardlock::AuthorizerConfig::default(),
    )
    .unwrap();
    let access = shardlock::Access::new(narrow, hsm.clone());
    assert!(access.open_shard(&ds, 0).is_ok());
    assert_eq!(hsm.stats().unwraps, 1);
    match access.open_shard(&ds, 1) {
        Err(Error::AccessDenied { reason: DenyReason::ShardOutOfScope, .. }) => {}
        other => panic!("expected AccessDenied, got {:?}", other.map(|_| ())),
    }
    assert_eq!(hsm.stats().unwraps, 1, "no unwrap without a passing authorization");

    // Batches of 1 record: many batches (and chunks) per shard, one unwrap per shard and epoch.
    let mut loader =
        fx.loader_with(&dir, "once", hsm.clone()).batch_size(1).workers(2).memory_budget(1 << 20).build().unwrap();
    let before = hsm.stats().unwraps;
    assert_eq!(stream(&mut loader).unwrap().len(), 24);
    assert_eq!(hsm.stats().unwraps - before, shards);
    assert_eq!(stream(&mut loader).unwrap().len(), 24);
    assert_eq!(hsm.stats().unwraps - before, 2 * shards, "re-authorized and unwrapped once per shard per epoch");
}

#[test]
fn rotate_file_to_hsm_to_new_hsm_key_and_back_leaves_payloads_untouched() {
    env();
    let fx = Fixture::new();
    let (dir, samples) = fx.standard("ds", "rotate", 24);
    let before = payloads(&dir);
    assert_eq!(before.len(), 6);

    // keyring file -> HSM
    let a_uri = hsm::uri("rotate", "kek-a");
    keygen(&a_uri);
    let a = open(&a_uri);
    let m = shardlock::rotate(&dir, &*fx.keyring, &*a, &fx.issuer).unwrap();
    assert_eq!(m.generation, 2);
    assert!(m.shards.iter().all(|s| s.kek_id == a.active_kek_id()));
    assert_eq!(payloads(&dir), before, "rotation must not touch a payload byte");
    match fx.read_all(&dir) {
        Err(Error::KeyUnavailable { key_id, .. }) => assert_eq!(key_id, a.active_kek_id()),
        other => panic!("the old keyring must no longer open the dataset: {:?}", other.map(|_| ())),
    }
    assert_eq!(fx.read_all_with(&dir, a.clone()).unwrap(), samples);

    // HSM -> a new key in the HSM
    let b_uri = hsm::uri("rotate", "kek-b");
    keygen(&b_uri);
    let b = open(&b_uri);
    assert_ne!(a.active_kek_id(), b.active_kek_id());
    shardlock::rotate(&dir, &*a, &*b, &fx.issuer).unwrap();
    assert_eq!(payloads(&dir), before);
    match fx.read_all_with(&dir, a.clone()) {
        Err(Error::KeyUnavailable { detail, .. }) => {
            assert!(detail.contains("pkcs11 token \"rotate\" object \"kek-a\""), "{detail}");
            assert!(detail.contains("use the key provider the dataset was packed or last rotated with"), "{detail}");
        }
        other => panic!("the old HSM KEK must no longer open the dataset: {:?}", other.map(|_| ())),
    }
    assert_eq!(fx.read_all_with(&dir, b.clone()).unwrap(), samples);

    // HSM -> a new keyring file (leaving the HSM is a rewrap too).
    let back: Arc<dyn KeyProvider> = Arc::new(Keyring::create(&fx.path("back.json")).unwrap());
    let m = shardlock::rotate(&dir, &*b, &*back, &fx.issuer).unwrap();
    assert_eq!(m.generation, 4);
    assert_eq!(payloads(&dir), before);
    assert!(matches!(fx.read_all_with(&dir, b), Err(Error::KeyUnavailable { .. })));
    assert_eq!(fx.read_all_with(&dir, back).unwrap(), samples);
}

#[test]
fn wrapped_deks_are_byte_identical_to_the_keyring_aes_kwp() {
    env();
    // A keyring's KEK, imported into the token with the same id (test set-up only).
    let fx = Fixture::new();
    let path = fx.path("compat.json");
    let ring = Keyring::create(&path).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let id = hex::decode(json["keys"][0]["id"].as_str().unwrap().strip_prefix("kek-").unwrap()).unwrap();
    let value = hex::decode(json["keys"][0]["key"].as_str().unwrap()).unwrap();
    raw_key("compat", "imported", RawKey::Import { id, value });
    let hsm = open(&hsm::uri("compat", "imported"));
    assert_eq!(hsm.active_kek_id(), shardlock::KeyProvider::active_kek_id(&ring));

    // Wrapped by the keyring (aws-lc-rs KWP), unwrapped inside the HSM, no rewrap.
    let (dir, samples) = fx.standard_with(&ring, "ds", "compat", 16);
    assert_eq!(fx.read_all_with(&dir, hsm.clone()).unwrap(), samples);

    // Rewrapping the same DEKs under the same KEK in the HSM gives the same bytes:
    // AES-KWP is deterministic, so this is byte equality of the two implementations.
    let by_keyring = wrapped(&fx, &dir);
    shardlock::rotate(&dir, &ring, &*hsm, &fx.issuer).unwrap();
    assert_eq!(hsm.stats().wraps, 4);
    assert_eq!(wrapped(&fx, &dir), by_keyring);

    // Wrapped inside the HSM, unwrapped by the keyring; and back to the same bytes.
    let (dir2, samples2) = fx.standard_with(&*hsm, "ds2", "compat2", 16);
    let by_hsm = wrapped(&fx, &dir2);
    let ring: Arc<dyn KeyProvider> = Arc::new(ring);
    assert_eq!(fx.read_all_with(&dir2, ring.clone()).unwrap(), samples2);
    shardlock::rotate(&dir2, &*hsm, &*ring, &fx.issuer).unwrap();
    assert_eq!(wrapped(&fx, &dir2), by_hsm);
}

#[test]
fn a_wrong_pin_is_tried_once_and_never_leaks() {
    env();
    let good = hsm::uri("pin", "kek");
    let bad = format!("pkcs11:token=pin;object=kek?module-path={}&pin-source=env:{}", hsm::MODULE, hsm::BAD_PIN_ENV);
    let bad_uri = Pkcs11Uri::parse(&bad).unwrap();
    for i in 0..3 {
        let e = Pkcs11Provider::open_uri(&bad).unwrap_err();
        assert_eq!(provider_failure(&e), Some(ProviderFailure::PinIncorrect), "{e}");
        let msg = e.to_string();
        assert!(!msg.contains("000000") && !msg.contains(hsm::PIN), "PIN in an error: {msg}");
        assert!(msg.contains(hsm::BAD_PIN_ENV), "the error names the PIN source: {msg}");
        if i > 0 {
            assert!(msg.contains("not tried again"), "{msg}");
        }
    }
    let e = pkcs11::generate_kek(&bad_uri).unwrap_err();
    assert_eq!(provider_failure(&e), Some(ProviderFailure::PinIncorrect), "{e}");
    assert_eq!(pkcs11::login_attempts(&bad_uri), 1, "a rejected PIN must not be sent to the token again");

    // The right PIN logs in (one more C_Login), then every provider on the token shares it.
    keygen(&good);
    let p = open(&good);
    assert_eq!(pkcs11::login_attempts(&bad_uri), 2);
    assert_eq!(p.stats().login_attempts, 2);
    // Once logged in, another PIN is refused without a C_Login.
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), "111111\n").unwrap();
    let other =
        format!("pkcs11:token=pin;object=kek?module-path={}&pin-source=file:{}", hsm::MODULE, f.path().display());
    let e = Pkcs11Provider::open_uri(&other).unwrap_err();
    assert_eq!(provider_failure(&e), Some(ProviderFailure::PinIncorrect), "{e}");
    assert!(e.to_string().contains("differs"), "{e}");
    assert!(matches!(
        Pkcs11Provider::open_uri(&bad),
        Err(Error::KeyProvider { kind: ProviderFailure::PinIncorrect, .. })
    ));
    assert_eq!(pkcs11::login_attempts(&bad_uri), 2);
}

#[test]
fn pin_sources_env_file_and_refusals() {
    env();
    keygen(&hsm::uri("errors", "kek"));
    let base = format!("pkcs11:token=errors;object=kek?module-path={}", hsm::MODULE);
    // A PIN file of mode 0600 with a trailing newline.
    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("pin");
    shardlock::write_new_file(&pin, format!("{}\n", hsm::PIN).as_bytes(), 0o600).unwrap();
    open(&format!("{base}&pin-source=file:{}", pin.display()));
    // ... but not one that others can read.
    let loose = dir.path().join("loose");
    shardlock::write_new_file(&loose, hsm::PIN.as_bytes(), 0o644).unwrap();
    let e = Pkcs11Provider::open_uri(&format!("{base}&pin-source={}", loose.display())).unwrap_err();
    assert!(matches!(e, Error::InsecurePermissions { .. }), "{e}");
    // An unset variable.
    let e = Pkcs11Provider::open_uri(&format!("{base}&pin-source=env:SHARDLOCK_TEST_NO_SUCH_VAR")).unwrap_err();
    assert_eq!(provider_failure(&e), Some(ProviderFailure::PinSource), "{e}");
    assert!(e.to_string().contains("SHARDLOCK_TEST_NO_SUCH_VAR is not set"), "{e}");
    // A PIN in the URI itself.
    let e = open_provider(&format!("{base}&pin-value={}", hsm::PIN)).err().unwrap();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("pin-value is refused") && !e.to_string().contains(hsm::PIN), "{e}");
}

#[test]
fn missing_module_wrong_token_and_absent_kek_are_named() {
    env();
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), b"not a shared library").unwrap();
    let cases: Vec<(String, ProviderFailure, &str)> = vec![
        (
            format!(
                "pkcs11:token=errors;object=kek?module-path=/nonexistent/libnope.so&pin-source=env:{}",
                hsm::PIN_ENV
            ),
            ProviderFailure::ModuleLoad,
            "apt-get install softhsm2",
        ),
        (
            format!(
                "pkcs11:token=errors;object=kek?module-path={}&pin-source=env:{}",
                junk.path().display(),
                hsm::PIN_ENV
            ),
            ProviderFailure::ModuleLoad,
            "not a loadable PKCS#11 module",
        ),
        (
            format!("pkcs11:token=errors;object=kek?module-name=no-such-module&pin-source=env:{}", hsm::PIN_ENV),
            ProviderFailure::ModuleLoad,
            "module-path=",
        ),
        (hsm::uri("nosuch", "kek"), ProviderFailure::TokenNotFound, "\"errors\""),
        (hsm::uri("errors", "absent"), ProviderFailure::KekNotFound, "shardlock keygen kek --pkcs11"),
    ];
    for (uri, kind, hint) in cases {
        let e = open_provider(&uri).err().unwrap_or_else(|| panic!("{uri} opened"));
        assert_eq!(provider_failure(&e), Some(kind), "{uri}: {e}");
        assert!(e.to_string().contains(hint), "{uri}: {e}");
        assert!(!e.to_string().contains(hsm::PIN), "{e}");
    }
    // module-name finds SoftHSM2 in its Debian directory.
    let by_name = format!("pkcs11:token=errors;object=absent?module-name=softhsm2&pin-source=env:{}", hsm::PIN_ENV);
    assert_eq!(provider_failure(&open_provider(&by_name).err().unwrap()), Some(ProviderFailure::KekNotFound));
}

enum RawKey {
    /// A new AES-256 key with these flags.
    Generate { extractable: bool, sensitive: bool },
    /// An existing AES key value, imported non-extractable and sensitive. (Not with
    /// `softhsm2-util --import --aes`: SoftHSM2 2.6.1 cuts the key at its first 0x00 or
    /// 0x0a byte.)
    Import { id: Vec<u8>, value: Vec<u8> },
}

/// Creates keys the way another tool might, through cryptoki directly (test only).
fn raw_key(token: &str, label: &str, how: RawKey) {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::{Attribute, KeyType, ObjectClass};
    use cryptoki::session::UserType;
    static CTX: OnceLock<Pkcs11> = OnceLock::new();
    let ctx = CTX.get_or_init(|| {
        let c = Pkcs11::new(hsm::MODULE).unwrap();
        // Shares the module with the provider's context in this process.
        let _ = c.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK));
        c
    });
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| ctx.get_token_info(*s).map(|i| i.label() == token).unwrap_or(false))
        .unwrap();
    let s = ctx.open_rw_session(slot).unwrap();
    let _ = s.login(UserType::User, Some(&hsm::PIN.into()));
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ];
    match how {
        RawKey::Generate { extractable, sensitive } => {
            t.extend([
                Attribute::ValueLen(32u64.into()),
                Attribute::Sensitive(sensitive),
                Attribute::Extractable(extractable),
                Attribute::Id(label.as_bytes().to_vec()),
            ]);
            s.generate_key(&Mechanism::AesKeyGen, &t).unwrap();
        }
        RawKey::Import { id, value } => {
            t.extend([
                Attribute::Value(value),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Id(id),
            ]);
            s.create_object(&t).unwrap();
        }
    }
}

#[test]
fn an_extractable_kek_is_refused_unless_explicitly_allowed() {
    env();
    raw_key("extract", "leaky", RawKey::Generate { extractable: true, sensitive: true });
    raw_key("extract", "readable", RawKey::Generate { extractable: false, sensitive: false });
    for label in ["leaky", "readable"] {
        let e = open_provider(&hsm::uri("extract", label)).err().unwrap();
        assert_eq!(provider_failure(&e), Some(ProviderFailure::KekExtractable), "{e}");
        assert!(e.to_string().contains("x-allow-extractable=yes"), "{e}");
    }
    // Not a usable AES key (as `softhsm2-util --import --aes` makes of a key with a 0x00 byte).
    raw_key("extract", "short", RawKey::Import { id: b"short".to_vec(), value: vec![1, 2, 3] });
    let e = open_provider(&hsm::uri("extract", "short")).err().unwrap();
    assert_eq!(provider_failure(&e), Some(ProviderFailure::KekUnusable), "{e}");
    assert!(e.to_string().contains("CKA_VALUE_LEN 3"), "{e}");
    let allowed = open(&format!("{}&x-allow-extractable=yes", hsm::uri("extract", "leaky")));
    assert!(allowed.describe().contains("extractable KEK allowed"));
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*allowed, "ds", "extract", 8);
    assert_eq!(fx.read_all_with(&dir, allowed).unwrap(), samples);
}

#[test]
fn a_wrapped_dek_that_does_not_unwrap_is_key_unavailable() {
    env();
    // Two KEKs with one CKA_ID, hence one KEK id: the wrong one fails the KWP check in the HSM.
    keygen(&hsm::uri("samekid", "one").replace("object=one", "object=one;id=%5A%5A%5A%5A"));
    keygen(&hsm::uri("samekid", "two").replace("object=two", "object=two;id=%5A%5A%5A%5A"));
    let one = open(&hsm::uri("samekid", "one"));
    let two = open(&hsm::uri("samekid", "two"));
    assert_eq!(one.active_kek_id(), "kek-5a5a5a5a");
    assert_eq!(two.active_kek_id(), one.active_kek_id());
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*one, "ds", "samekid", 8);
    match fx.read_all_with(&dir, two.clone()) {
        Err(Error::KeyUnavailable { key_id, detail }) => {
            assert_eq!(key_id, "kek-5a5a5a5a");
            assert!(detail.contains("pkcs11 token \"samekid\" object \"two\""), "{detail}");
            assert!(detail.contains("shard 0 does not unwrap"), "{detail}");
            assert!(detail.contains("open the dataset with the provider that wrapped it"), "{detail}");
        }
        other => panic!("expected KeyUnavailable, got {:?}", other.map(|_| ())),
    }
    assert_eq!(two.stats().unwraps, 0);
    // The provider keeps working after a failed unwrap.
    assert_eq!(fx.read_all_with(&dir, one).unwrap(), samples);
}

#[test]
fn one_session_pool_serves_many_threads() {
    env();
    let uri = hsm::uri("threads", "kek");
    keygen(&uri);
    let hsm = open(&uri);
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*hsm, "ds", "threads", 64);
    let ds = fx.open(&dir).unwrap();
    let access = fx.access_with("threads", hsm.clone());
    // More threads than cores, each with its own pooled session. (Not many more: every
    // open also runs the token's Datalog authorization, whose 50 ms wall-clock limit a
    // heavily oversubscribed 2-core machine can exceed.)
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..2 {
                    for i in 0..16u32 {
                        let mut r = access.open_shard(&ds, i).unwrap();
                        for rec in 0..r.len() {
                            let got: Vec<Vec<u8>> =
                                r.read_record(rec).unwrap().into_iter().map(|v| v.to_vec()).collect();
                            assert_eq!(got, samples[4 * i as usize + rec as usize]);
                        }
                    }
                }
            });
        }
    });
    assert_eq!(hsm.stats().unwraps, 4 * 2 * 16);
    // A second provider on the token shares the process's login and pool.
    let mut loader = Loader::builder(&dir)
        .keyring(&uri)
        .token_value(fx.token("threads"))
        .trust_anchor(fx.trust)
        .batch_size(3)
        .workers(4)
        .memory_budget(1 << 20)
        .build()
        .unwrap();
    assert_eq!(stream(&mut loader).unwrap().len(), 63);
    assert_eq!(hsm.stats().login_attempts, 1);
}

#[test]
fn a_token_removed_mid_run_is_key_unavailable_not_a_hang() {
    let hsm_env = env();
    let uri = hsm::uri("remove", "kek");
    keygen(&uri);
    let hsm = open(&uri);
    let fx = Fixture::new();
    let (dir, _) = fx.standard_with(&*hsm, "ds", "remove", 24);
    let mut loader =
        fx.loader_with(&dir, "remove", hsm.clone()).batch_size(4).workers(2).memory_budget(1 << 20).build().unwrap();
    assert_eq!(stream(&mut loader).unwrap().len(), 24);
    // Pull the token: its whole state, keys included, disappears from SoftHSM.
    std::fs::remove_dir_all(&hsm_env.token_dirs["remove"]).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let first = loader.next().map(|r| r.map(|_| ()));
        let second = loader.next().map(|r| r.map(|_| ()));
        let _ = tx.send((first, second));
    });
    let (first, second) = rx.recv_timeout(Duration::from_secs(60)).expect("the loader hung after the HSM went away");
    match first {
        Some(Err(Error::KeyUnavailable { detail, .. })) => {
            assert!(detail.contains("pkcs11 token \"remove\""), "names the provider: {detail}");
            assert!(detail.contains("no longer on the token") || detail.contains("HSM is unavailable"), "{detail}");
        }
        other => panic!("expected KeyUnavailable, got {other:?}"),
    }
    assert!(matches!(second, Some(Err(_))), "the epoch keeps failing: {second:?}");
    let ds = fx.open(&dir).unwrap();
    assert!(matches!(fx.access_with("remove", hsm).open_shard(&ds, 0), Err(Error::KeyUnavailable { .. })));
}

#[test]
fn cli_keygen_pack_verify_bench_rotate_with_a_pkcs11_uri() {
    env();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let uri = hsm::uri("cli", "kek");
    common::write_npy(&d.join("x.npy"), "<f4", &[300, 8], &(0..300 * 8 * 4).map(|i| i as u8).collect::<Vec<_>>());
    let out = cli_ok(d, &["keygen", "kek", "--pkcs11", &uri]);
    assert!(out.contains("non-extractable AES-256 KEK kek-"), "{out}");
    assert!(!cli(d, &["keygen", "kek", "--pkcs11", &uri]).status.success(), "keygen must not replace a key");
    cli_ok(d, &["keygen", "issuer", "--out", "iss"]);
    cli_ok(
        d,
        &[
            "pack",
            "--keyring",
            &uri,
            "--issuer-key",
            "iss",
            "--dataset-id",
            "cli",
            "--out",
            "ds",
            "--shard-size",
            "4k",
            "x.npy",
        ],
    );
    cli_ok(
        d,
        &[
            "token",
            "issue",
            "--issuer-key",
            "iss",
            "--dataset",
            "cli",
            "--principal",
            "p",
            "--ops",
            "read,verify",
            "--out",
            "tok",
        ],
    );
    let reader = ["--token", "tok", "--trust", "iss.pub"];
    let v: serde_json::Value = serde_json::from_str(&cli_ok(
        d,
        &[&["verify", "ds", "--json", "--keyring", &uri][..], &reader[..], &["--audit-log", "audit"][..]].concat(),
    ))
    .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    let b: serde_json::Value = serde_json::from_str(&cli_ok(
        d,
        &[
            &["bench", "ds", "--json", "--keyring", &uri, "--epochs", "1", "--batch-size", "16"][..],
            &reader[..],
            &["--allow-unlocked-memory"][..],
        ]
        .concat(),
    ))
    .unwrap();
    assert_eq!(b["epochs"][0]["batches"], 300 / 16, "{b}");
    // HSM -> keyring file.
    cli_ok(d, &["keygen", "kek", "--out", "kr.json"]);
    cli_ok(d, &["rotate", "ds", "--keyring", &uri, "--new-keyring", "kr.json", "--issuer-key", "iss"]);
    let o = cli(d, &[&["verify", "ds", "--keyring", &uri][..], &reader[..]].concat());
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("FAIL key unavailable") && out.contains("pkcs11 token \"cli\""), "{out}");
    cli_ok(d, &[&["verify", "ds", "--keyring", "kr.json"][..], &reader[..]].concat());
    // The PIN never goes on a command line.
    let o = cli(d, &["verify", "ds", "--keyring", &format!("{uri}&pin-value={}", hsm::PIN), "--trust", "iss.pub"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("pin-value is refused"), "{err}");
    // A wrong PIN from the environment: one typed error, exit 1.
    let o = Command::new(env!("CARGO_BIN_EXE_shardlock"))
        .current_dir(d)
        .env(hsm::PIN_ENV, "999999")
        .args([&["verify", "ds", "--keyring", &uri][..], &reader[..]].concat())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("PIN incorrect") && !err.contains("999999"), "{err}");
}

/// Time to first batch of a fresh loader over `dir` and the unwrap time (summed over
/// workers) spent before it: medians over 10 runs of (ms, unwraps, % of TTFB).
fn first_batch(fx: &Fixture, dir: &Path, hsm: &Arc<Pkcs11Provider>, batch: usize) -> (f64, f64, f64) {
    let (mut ms, mut n, mut share) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..10 {
        let before = hsm.stats();
        let t = Instant::now();
        let mut loader = fx
            .loader_with(dir, "bench", hsm.clone())
            .batch_size(batch)
            .workers(2)
            .memory_budget(16 << 20)
            .build()
            .unwrap();
        loader.next().unwrap().unwrap();
        let total = t.elapsed().as_secs_f64();
        let after = hsm.stats();
        ms.push(total * 1e3);
        n.push((after.unwraps - before.unwraps) as f64);
        share.push((after.unwrap_nanos - before.unwrap_nanos) as f64 / 1e9 / total * 100.0);
    }
    (median(&mut ms), median(&mut n), median(&mut share))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Median unwrap latency per shard through SoftHSM and its share of time-to-first-batch.
/// `cargo test -p shardlock --test pkcs11 -- --ignored --nocapture unwrap_latency`
#[test]
#[ignore = "benchmark: run explicitly"]
fn unwrap_latency_through_softhsm() {
    env();
    let uri = hsm::uri("bench", "kek");
    keygen(&uri);
    let hsm = open(&uri);
    let fx = Fixture::new();
    let (dir, _) = fx.standard_with(&*hsm, "ds", "bench", 256);
    let (kdir, _) = fx.standard("kds", "bench", 256);
    let ds = fx.open(&dir).unwrap();
    let kds = fx.open(&kdir).unwrap();
    let n = ds.manifest().shards.len() as u32;
    let access = fx.access_with("bench", hsm.clone());
    let kaccess = fx.access("bench");
    let (mut unwrap_us, mut open_hsm_us, mut open_kr_us) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..6 {
        for i in 0..n {
            let before = hsm.stats().unwrap_nanos;
            let t = Instant::now();
            access.open_shard(&ds, i).unwrap();
            let total = t.elapsed().as_secs_f64() * 1e6;
            let t = Instant::now();
            kaccess.open_shard(&kds, i).unwrap();
            let kr = t.elapsed().as_secs_f64() * 1e6;
            if round > 0 {
                unwrap_us.push((hsm.stats().unwrap_nanos - before) as f64 / 1e3);
                open_hsm_us.push(total);
                open_kr_us.push(kr);
            }
        }
    }
    println!(
        "SoftHSM2 unwrap per shard: median {:.1} us over {} unwraps (C_UnwrapKey + read + C_DestroyObject); \
         open_shard (authorize + unwrap + open) median {:.1} us via the HSM, {:.1} us via the keyring file",
        median(&mut unwrap_us),
        unwrap_us.len(),
        median(&mut open_hsm_us),
        median(&mut open_kr_us)
    );
    // Worst case: tiny shards (4 records of 705 B), so a batch of 32 touches many shards.
    let (ms, k, share) = first_batch(&fx, &dir, &hsm, 32);
    println!("  tiny shards ({n} x 2.8 KB), batch 32: time to first batch {ms:.2} ms, {k} unwraps, unwrap share {share:.1} %");
    // Shards of 2 MiB (512 records of 4 KiB), batch 256, window shuffle.
    let schema = shardlock::Schema::new(vec![shardlock::Field::tensor("x", shardlock::DType::U8, &[4096])]).unwrap();
    let samples: Vec<Vec<Vec<u8>>> = (0..8192).map(|i: usize| vec![vec![(i % 251) as u8; 4096]]).collect();
    let big = fx.pack_with(&*hsm, "big", "bench", schema, &samples, 512 * 4096);
    let shards = fx.open(&big).unwrap().manifest().shards.len();
    let (ms, k, share) = first_batch(&fx, &big, &hsm, 256);
    println!(
        "  2 MiB shards ({shards}), batch 256: time to first batch {ms:.2} ms, {k} unwraps, unwrap share {share:.1} %"
    );
    println!("  (unwrap share: unwrap time summed over the 2 workers before the first batch / time to first batch)");
}

/// The HSM behind the key service: the service holds the PIN; the workload has only the
/// service's URL and CA, and streams the exact dataset.
#[test]
fn the_hsm_behind_the_key_service_serves_a_workload_without_the_pin() {
    env();
    let uri = hsm::uri("keyd", "kek");
    let kek_id = keygen(&uri);
    let hsm = open(&uri);
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*hsm, "ds", "hsm-keyd", 40);
    let pki = pki::Pki::new(fx.dir.path());
    let audit = fx.path("keyd-audit.jsonl");
    let (svc, client) = pki::serve(&pki, hsm.clone(), fx.trust, |cfg| cfg.audit_log = Some(audit.clone()));
    let unwraps = hsm.stats().unwraps;
    let mut loader =
        fx.loader_with(&dir, "hsm-keyd", client).batch_size(4).shuffle(Shuffle::Global).workers(2).build().unwrap();
    let got = stream(&mut loader).unwrap();
    assert_eq!(got.len(), 40);
    for (id, s) in samples.iter().enumerate() {
        assert_eq!(&got[&(id as u64)], s, "sample {id}");
    }
    assert_eq!(hsm.stats().unwraps - unwraps, 10, "the HSM unwrapped each shard's DEK once, for the service");
    let log = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(log.matches("\"key_release\"").count(), 10);
    assert!(log.contains(&kek_id) && log.contains("pkcs11 token"), "{log}");
    assert!(!log.contains(hsm::PIN));
    svc.shutdown().unwrap();
}
