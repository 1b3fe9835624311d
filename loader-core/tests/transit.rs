//! OpenBao/Vault Transit custody against a real OpenBao dev server: pack, stream,
//! rotate between the keyring and Transit (and across Transit key versions) without
//! touching payloads, the per-shard context binding, least privilege, the key service
//! in front of Transit, and a server that is down.
#![allow(clippy::unwrap_used)]

#[path = "common/bao.rs"]
mod bao;
mod common;
#[path = "common/pki.rs"]
mod pki;
#[path = "common/s3.rs"]
mod s3;

use std::collections::HashMap;
use std::path::Path;

use common::Fixture;
use shardlock::{open_provider, Error, KeyProvider as _};

/// The token variable the providers of this test process read (set once: every test
/// uses the same root token of its own server).
fn token_env(bao: &bao::Bao, var: &str) {
    std::env::set_var(var, &bao.root_token);
}

fn payloads(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "manifest.json")
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn pack_stream_and_rotate_through_transit_without_touching_payloads() {
    let Some(bao) = bao::Bao::start("pack_stream_and_rotate_through_transit") else { return };
    token_env(&bao, "SHARDLOCK_TEST_BAO_TOKEN_A");
    bao.create_key("shardlock");
    let uri = bao.uri("shardlock", "SHARDLOCK_TEST_BAO_TOKEN_A");
    let transit = open_provider(&uri).unwrap();
    assert_eq!(transit.active_kek_id(), "transit:transit/shardlock");
    assert!(!transit.describe().contains(&bao.root_token));

    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*transit, "ds", "transit-test", 40);
    let m = fx.open(&dir).unwrap().manifest().clone();
    for s in &m.shards {
        assert_eq!(s.kek_id, "transit:transit/shardlock");
        let ct = String::from_utf8(hex::decode(&s.wrapped_dek).unwrap()).unwrap();
        assert!(ct.starts_with("vault:v1:"), "{ct}");
    }
    let want: HashMap<u64, Vec<u8>> = samples.iter().enumerate().map(|(i, s)| (i as u64, s[1].clone())).collect();
    assert_eq!(fx.epoch_field(&dir, "transit-test", transit.clone(), "tag").unwrap(), want);
    // The loader opens the provider from the URI itself, as --keyring and Python do.
    let l = shardlock::Loader::builder(&dir)
        .keyring(&uri)
        .token_value(fx.token("transit-test"))
        .trust_anchor(fx.trust)
        .batch_size(8)
        .build()
        .unwrap();
    assert_eq!(l.map(|b| b.unwrap().len()).sum::<usize>(), 40);

    let before = payloads(&dir);
    // Transit key rotation, then rewrap: every DEK moves to version 2.
    bao.rotate_key("shardlock");
    shardlock::rotate(&dir, &*transit, &*transit, &fx.issuer).unwrap();
    let m = fx.open(&dir).unwrap().manifest().clone();
    assert!(m
        .shards
        .iter()
        .all(|s| String::from_utf8(hex::decode(&s.wrapped_dek).unwrap()).unwrap().starts_with("vault:v2:")));
    assert_eq!(fx.epoch_field(&dir, "transit-test", transit.clone(), "tag").unwrap(), want);
    // Transit -> keyring -> Transit: the payloads never change.
    shardlock::rotate(&dir, &*transit, &*fx.keyring, &fx.issuer).unwrap();
    assert!(fx.open(&dir).unwrap().manifest().shards.iter().all(|s| s.wrapped_dek.len() == 80));
    assert_eq!(fx.epoch_field(&dir, "transit-test", fx.keyring.clone(), "tag").unwrap(), want);
    shardlock::rotate(&dir, &*fx.keyring, &*transit, &fx.issuer).unwrap();
    assert_eq!(fx.epoch_field(&dir, "transit-test", transit.clone(), "tag").unwrap(), want);
    assert_eq!(payloads(&dir), before, "rotation touched a payload");
}

/// `pack` draws each DEK in Transit (`datakey/plaintext`), and `rotate` on the same key
/// after a Transit key rotation is `rewrap` (the DEK never leaves Transit); rotating out
/// to a keyring decrypts. The calls are counted by a proxy in front of the server.
#[test]
fn pack_draws_deks_in_transit_and_rotation_rewraps_them_there() {
    let Some(bao) = bao::Bao::start("pack_draws_deks_in_transit") else { return };
    token_env(&bao, "SHARDLOCK_TEST_BAO_TOKEN_E");
    bao.create_key("calls");
    let port: u16 = bao.addr.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = s3::Proxy::start(port);
    let uri = format!("transit:{}/transit/calls?token-source=env:SHARDLOCK_TEST_BAO_TOKEN_E", proxy.endpoint);
    let transit = open_provider(&uri).unwrap();
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*transit, "ds", "transit-calls", 40);
    let shards = fx.open(&dir).unwrap().manifest().shards.len();
    assert!(shards > 1);
    let calls = |op: &str| proxy.count(&format!("POST /v1/transit/{op}/calls "));
    assert_eq!(calls("datakey/plaintext"), shards, "pack asks Transit for each shard's DEK");
    assert_eq!(calls("encrypt"), 0, "no DEK drawn here and sent to Transit to wrap");
    let want: HashMap<u64, Vec<u8>> = samples.iter().enumerate().map(|(i, s)| (i as u64, s[1].clone())).collect();
    assert_eq!(fx.epoch_field(&dir, "transit-calls", transit.clone(), "tag").unwrap(), want);

    bao.rotate_key("calls");
    proxy.clear();
    shardlock::rotate(&dir, &*transit, &*transit, &fx.issuer).unwrap();
    assert_eq!(calls("rewrap"), shards, "one rewrap per DEK");
    assert_eq!((calls("decrypt"), calls("encrypt")), (0, 0), "the rotating process never held a DEK");
    let m = fx.open(&dir).unwrap().manifest().clone();
    assert!(m
        .shards
        .iter()
        .all(|s| String::from_utf8(hex::decode(&s.wrapped_dek).unwrap()).unwrap().starts_with("vault:v2:")));
    assert_eq!(fx.epoch_field(&dir, "transit-calls", transit.clone(), "tag").unwrap(), want);

    proxy.clear();
    shardlock::rotate(&dir, &*transit, &*fx.keyring, &fx.issuer).unwrap();
    assert_eq!((calls("rewrap"), calls("decrypt")), (0, shards));
    assert_eq!(fx.epoch_field(&dir, "transit-calls", fx.keyring.clone(), "tag").unwrap(), want);
}

#[test]
fn a_wrapped_dek_moved_to_another_shard_does_not_unwrap() {
    let Some(bao) = bao::Bao::start("a_wrapped_dek_moved_to_another_shard") else { return };
    token_env(&bao, "SHARDLOCK_TEST_BAO_TOKEN_B");
    bao.create_key("ctx");
    let transit = open_provider(&bao.uri("ctx", "SHARDLOCK_TEST_BAO_TOKEN_B")).unwrap();
    let fx = Fixture::new();
    let (dir, _) = fx.standard_with(&*transit, "ds", "transit-test", 40);
    // Someone holding the issuer key swaps the wrapped DEKs of shards 1 and 2.
    fx.resign(&dir, |m| {
        let (a, b) = (m.shards[1].wrapped_dek.clone(), m.shards[2].wrapped_dek.clone());
        m.shards[1].wrapped_dek = b;
        m.shards[2].wrapped_dek = a;
    });
    let ds = fx.open(&dir).unwrap();
    let access = fx.access_with("transit-test", transit.clone());
    assert!(access.open_shard(&ds, 0).is_ok());
    match access.open_shard(&ds, 1) {
        Err(Error::KeyUnavailable { key_id, detail }) => {
            assert_eq!(key_id, "transit:transit/ctx");
            assert!(detail.contains("shard 1") && !detail.contains(&bao.root_token), "{detail}");
        }
        other => panic!("expected KeyUnavailable, got {:?}", other.map(|_| "a reader")),
    }
}

#[test]
fn least_privilege_a_decrypt_only_token_reads_but_cannot_pack() {
    let Some(bao) = bao::Bao::start("least_privilege_a_decrypt_only_token") else { return };
    token_env(&bao, "SHARDLOCK_TEST_BAO_TOKEN_C");
    bao.create_key("lp");
    let owner = open_provider(&bao.uri("lp", "SHARDLOCK_TEST_BAO_TOKEN_C")).unwrap();
    let fx = Fixture::new();
    let (dir, _) = fx.standard_with(&*owner, "ds", "transit-test", 16);
    let reader_token = bao.token_with_policy("reader", r#"path "transit/decrypt/lp" { capabilities = ["update"] }"#);
    std::env::set_var("SHARDLOCK_TEST_BAO_READER", &reader_token);
    let reader = open_provider(&bao.uri("lp", "SHARDLOCK_TEST_BAO_READER")).unwrap();
    assert_eq!(fx.epoch_field(&dir, "transit-test", reader.clone(), "tag").unwrap().len(), 16);
    // Packing needs `datakey`, which the reader's policy does not grant.
    let schema = shardlock::Schema::new(vec![shardlock::Field::bytes("tag")]).unwrap();
    let mut w = shardlock::DatasetWriter::create(
        &fx.path("ds2"),
        schema,
        shardlock::PackOptions::new("transit-test"),
        &*reader,
        &fx.issuer,
    )
    .unwrap();
    w.write_sample(&[b"x".as_slice()]).unwrap();
    let e = w.finish().unwrap_err();
    assert!(e.to_string().contains("403") && e.to_string().contains("permission denied"), "{e}");
    assert!(!e.to_string().contains(&reader_token));
    // A key that is not derived would ignore the per-shard context: refused before a wrap.
    let (st, body) = bao.call("POST", "/v1/transit/keys/plain", Some("{}"));
    assert!(st == 200 || st == 204, "{st} {body}");
    let plain = open_provider(&bao.uri("plain", "SHARDLOCK_TEST_BAO_TOKEN_C")).unwrap();
    let schema = shardlock::Schema::new(vec![shardlock::Field::bytes("tag")]).unwrap();
    let mut w = shardlock::DatasetWriter::create(
        &fx.path("ds3"),
        schema,
        shardlock::PackOptions::new("transit-test"),
        &*plain,
        &fx.issuer,
    )
    .unwrap();
    w.write_sample(&[b"x".as_slice()]).unwrap();
    let e = w.finish().unwrap_err();
    assert!(e.to_string().contains("not derived"), "{e}");
    // A missing token is refused when the provider opens, naming what to set.
    let e = open_provider(&bao.uri("lp", "SHARDLOCK_TEST_BAO_UNSET")).err().unwrap();
    assert!(e.to_string().contains("SHARDLOCK_TEST_BAO_UNSET is not set"), "{e}");
}

#[test]
fn the_key_service_serves_from_transit_and_a_stopped_server_is_a_typed_error() {
    let Some(mut bao) = bao::Bao::start("the_key_service_serves_from_transit") else { return };
    token_env(&bao, "SHARDLOCK_TEST_BAO_TOKEN_D");
    bao.create_key("svc");
    let transit = open_provider(&bao.uri("svc", "SHARDLOCK_TEST_BAO_TOKEN_D")).unwrap();
    let fx = Fixture::new();
    let (dir, _) = fx.standard_with(&*transit, "ds", "transit-test", 40);
    let pki = pki::Pki::new(fx.dir.path());
    let (svc, client) = pki::serve(&pki, transit.clone(), fx.trust, |_| {});
    // The workload holds no Vault token and no KEK: only the service's URL and CA.
    assert_eq!(fx.epoch_field(&dir, "transit-test", client, "tag").unwrap().len(), 40);
    svc.shutdown().unwrap();
    // Transit down: a typed error naming the server, not a hang or a panic.
    bao.stop();
    let ds = fx.open(&dir).unwrap();
    match fx.access_with("transit-test", transit).open_shard(&ds, 0) {
        Err(Error::KeyUnavailable { detail, .. }) => assert!(detail.contains("unreachable"), "{detail}"),
        other => panic!("expected KeyUnavailable, got {:?}", other.map(|_| "a reader")),
    }
}

/// A manifest whose shards are wrapped under two custodies (half keyring, half Transit):
/// one custody alone cannot read it; a `ProviderSet` of both reads every epoch exactly,
/// locally and behind the key service, and `rotate` moves it all to one keyring.
#[test]
fn a_manifest_under_two_custodies_reads_with_a_provider_set_and_rotates_to_one() {
    let Some(bao) = bao::Bao::start("a_manifest_under_two_custodies") else { return };
    token_env(&bao, "SHARDLOCK_TEST_BAO_TOKEN_F");
    bao.create_key("mix");
    let transit = open_provider(&bao.uri("mix", "SHARDLOCK_TEST_BAO_TOKEN_F")).unwrap();
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*fx.keyring, "ds", "mixed", 40);
    let want: HashMap<u64, Vec<u8>> = samples.iter().enumerate().map(|(i, s)| (i as u64, s[1].clone())).collect();
    // A copy moved to Transit; its entries for shards 5.. go into the original manifest.
    let moved = fx.path("moved");
    std::fs::create_dir(&moved).unwrap();
    for (name, bytes) in payloads(&dir) {
        std::fs::write(moved.join(name), bytes).unwrap();
    }
    std::fs::copy(dir.join("manifest.json"), moved.join("manifest.json")).unwrap();
    shardlock::rotate(&moved, &*fx.keyring, &*transit, &fx.issuer).unwrap();
    let t = fx.open(&moved).unwrap().manifest().clone();
    fx.resign(&dir, |m| {
        for e in m.shards.iter_mut().skip(5) {
            e.kek_id.clone_from(&t.shards[e.index as usize].kek_id);
            e.wrapped_dek.clone_from(&t.shards[e.index as usize].wrapped_dek);
        }
    });
    let kinds: Vec<bool> =
        fx.open(&dir).unwrap().manifest().shards.iter().map(|s| s.kek_id.starts_with("transit:")).collect();
    assert!(kinds[..5].iter().all(|t| !t) && kinds[5..].iter().all(|t| *t), "{kinds:?}");

    match fx.epoch_field(&dir, "mixed", fx.keyring.clone(), "tag") {
        Err(Error::KeyUnavailable { key_id, .. }) => assert_eq!(key_id, "transit:transit/mix"),
        other => panic!("a keyring alone read Transit-wrapped shards: {other:?}"),
    }
    let both = shardlock::ProviderSet::combine(vec![
        fx.keyring.clone() as std::sync::Arc<dyn shardlock::KeyProvider>,
        transit.clone(),
    ])
    .unwrap();
    assert_eq!(fx.epoch_field(&dir, "mixed", both.clone(), "tag").unwrap(), want);
    // The loader opens the same set from a list of specs, as a repeated --keyring does.
    let specs = [fx.path("keyring.json").display().to_string(), bao.uri("mix", "SHARDLOCK_TEST_BAO_TOKEN_F")];
    assert_eq!(fx.epoch_field(&dir, "mixed", shardlock::open_providers(&specs).unwrap(), "tag").unwrap(), want);

    // The key service holding both custodies serves the whole manifest.
    let pki = pki::Pki::new(fx.dir.path());
    let (svc, client) = pki::serve(&pki, both.clone(), fx.trust, |_| {});
    assert_eq!(fx.epoch_field(&dir, "mixed", client, "tag").unwrap(), want);
    svc.shutdown().unwrap();

    // rotate moves every shard, from either custody, to one new keyring.
    let new = std::sync::Arc::new(shardlock::Keyring::create(&fx.path("new.json")).unwrap());
    shardlock::rotate(&dir, &*both, &*new, &fx.issuer).unwrap();
    assert!(fx.open(&dir).unwrap().manifest().shards.iter().all(|s| s.kek_id == new.active_kek_id()));
    assert_eq!(fx.epoch_field(&dir, "mixed", new, "tag").unwrap(), want);
}
