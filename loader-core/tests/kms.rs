//! AWS KMS custody against moto_server's KMS (the same server the s3:// tests use):
//! pack (GenerateDataKey), stream, rotate between the keyring and KMS without touching
//! payloads and between KMS keys with ReEncrypt, the
//! EncryptionContext binding a wrapped DEK to its shard, the key service in front of
//! KMS, and no credential in any error.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/pki.rs"]
mod pki;
#[path = "common/s3.rs"]
mod s3;

use std::collections::HashMap;

use common::Fixture;
use shardlock::{open_provider, Error};

/// The test credentials in this process's environment (every test sets the same ones).
fn credentials() {
    std::env::set_var("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY);
    std::env::remove_var("AWS_SESSION_TOKEN");
}

/// Creates a symmetric KMS key in moto and returns its id.
fn create_key(server: &s3::S3Server) -> String {
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/", server.endpoint))
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", "TrentService.CreateKey")
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDCANARY7Q2W/20260101/us-east-1/kms/aws4_request, SignedHeaders=host, Signature=0",
        )
        .body(r#"{"Description":"shardlock test KEK","KeyUsage":"ENCRYPT_DECRYPT"}"#)
        .send()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.text().unwrap()).unwrap();
    v["KeyMetadata"]["KeyId"].as_str().unwrap_or_else(|| panic!("CreateKey: {v}")).to_owned()
}

fn uri(server: &s3::S3Server, key: &str) -> String {
    format!("aws-kms:{key}?region=us-east-1&endpoint={}", server.endpoint)
}

#[test]
fn pack_stream_and_rotate_through_kms_with_the_context_bound_to_each_shard() {
    let Some(server) = s3::S3Server::start("pack_stream_and_rotate_through_kms") else { return };
    credentials();
    let key = create_key(&server);
    let kms = open_provider(&uri(&server, &key)).unwrap();
    assert_eq!(kms.active_kek_id(), format!("aws-kms:{key}"));
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*kms, "ds", "kms-test", 40);
    let want: HashMap<u64, Vec<u8>> = samples.iter().enumerate().map(|(i, s)| (i as u64, s[1].clone())).collect();
    assert!(fx.open(&dir).unwrap().manifest().shards.iter().all(|s| s.kek_id == format!("aws-kms:{key}")));
    assert_eq!(fx.epoch_field(&dir, "kms-test", kms.clone(), "tag").unwrap(), want);

    // KMS -> keyring -> a second KMS key: payloads untouched, every epoch exact.
    let before: Vec<Vec<u8>> = (0..10).map(|i| std::fs::read(dir.join(format!("shard-{i:05}.slk"))).unwrap()).collect();
    shardlock::rotate(&dir, &*kms, &*fx.keyring, &fx.issuer).unwrap();
    assert_eq!(fx.epoch_field(&dir, "kms-test", fx.keyring.clone(), "tag").unwrap(), want);
    let key2 = create_key(&server);
    let kms2 = open_provider(&uri(&server, &key2)).unwrap();
    shardlock::rotate(&dir, &*fx.keyring, &*kms2, &fx.issuer).unwrap();
    assert_eq!(fx.epoch_field(&dir, "kms-test", kms2.clone(), "tag").unwrap(), want);
    let after: Vec<Vec<u8>> = (0..10).map(|i| std::fs::read(dir.join(format!("shard-{i:05}.slk"))).unwrap()).collect();
    assert_eq!(before, after, "rotation touched a payload");

    // A wrapped DEK copied into another shard's entry (re-signed by the issuer) does
    // not decrypt: the EncryptionContext names the shard.
    fx.resign(&dir, |m| m.shards[3].wrapped_dek = m.shards[4].wrapped_dek.clone());
    let ds = fx.open(&dir).unwrap();
    match fx.access_with("kms-test", kms2.clone()).open_shard(&ds, 3) {
        Err(Error::KeyUnavailable { detail, .. }) => {
            assert!(detail.contains("shard 3"), "{detail}");
            assert!(!detail.contains(s3::SECRET_KEY) && !detail.contains(s3::ACCESS_KEY), "{detail}");
        }
        other => panic!("expected KeyUnavailable, got {:?}", other.map(|_| "a reader")),
    }
}

/// `pack` asks KMS for each DEK (`GenerateDataKey`), and `rotate` between two KMS keys
/// is `ReEncrypt` (the DEK never leaves KMS); rotating out to a keyring decrypts. The
/// calls are counted by a proxy in front of moto.
#[test]
fn kms_makes_each_dek_and_re_encrypts_between_keys_without_the_dek_leaving_kms() {
    let Some(server) = s3::S3Server::start("kms_makes_each_dek_and_re_encrypts") else { return };
    credentials();
    let proxy = s3::Proxy::start(server.port);
    let via =
        |key: &str| open_provider(&format!("aws-kms:{key}?region=us-east-1&endpoint={}", proxy.endpoint)).unwrap();
    let (key, key2) = (create_key(&server), create_key(&server));
    let (kms, kms2) = (via(&key), via(&key2));
    let fx = Fixture::new();
    let (dir, samples) = fx.standard_with(&*kms, "ds", "kms-calls", 40);
    let shards = fx.open(&dir).unwrap().manifest().shards.len();
    assert!(shards > 1);
    let calls = |name: &str| proxy.count(&format!("TrentService.{name}\r\n"));
    assert_eq!(calls("GenerateDataKey"), shards, "pack asks KMS for each shard's DEK");
    assert_eq!(calls("Encrypt"), 0, "no DEK drawn here and sent to KMS to wrap");
    let want: HashMap<u64, Vec<u8>> = samples.iter().enumerate().map(|(i, s)| (i as u64, s[1].clone())).collect();
    assert_eq!(fx.epoch_field(&dir, "kms-calls", kms.clone(), "tag").unwrap(), want);

    proxy.clear();
    shardlock::rotate(&dir, &*kms, &*kms2, &fx.issuer).unwrap();
    assert_eq!(calls("ReEncrypt"), shards, "KMS to KMS is one ReEncrypt per DEK");
    assert_eq!((calls("Decrypt"), calls("Encrypt")), (0, 0), "the rotating process never held a DEK");
    let m = fx.open(&dir).unwrap().manifest().clone();
    assert!(m.shards.iter().all(|s| s.kek_id == format!("aws-kms:{key2}")));
    assert_eq!(fx.epoch_field(&dir, "kms-calls", kms2.clone(), "tag").unwrap(), want);

    // Out of KMS there is nothing to re-encrypt with: Decrypt, then the keyring wraps.
    proxy.clear();
    shardlock::rotate(&dir, &*kms2, &*fx.keyring, &fx.issuer).unwrap();
    assert_eq!((calls("ReEncrypt"), calls("Decrypt")), (0, shards));
    assert_eq!(fx.epoch_field(&dir, "kms-calls", fx.keyring.clone(), "tag").unwrap(), want);
}

#[test]
fn the_key_service_serves_from_kms_and_errors_name_no_credential() {
    let Some(server) = s3::S3Server::start("the_key_service_serves_from_kms") else { return };
    credentials();
    let key = create_key(&server);
    let kms = open_provider(&uri(&server, &key)).unwrap();
    let fx = Fixture::new();
    let (dir, _) = fx.standard_with(&*kms, "ds", "kms-test", 40);
    let pki = pki::Pki::new(fx.dir.path());
    let (svc, client) = pki::serve(&pki, kms.clone(), fx.trust, |_| {});
    // The workload holds no AWS credential and no KEK: only the service's URL and CA.
    assert_eq!(fx.epoch_field(&dir, "kms-test", client, "tag").unwrap().len(), 40);
    svc.shutdown().unwrap();
    // An unknown key: a typed error naming the key, never the credentials.
    let ghost = open_provider(&uri(&server, "00000000-0000-0000-0000-000000000000")).unwrap();
    let e = fx.access_with("kms-test", ghost.clone()).open_shard(&fx.open(&dir).unwrap(), 0).err().unwrap();
    assert!(matches!(e, Error::KeyUnavailable { .. }), "{e}");
    let text = e.to_string();
    assert!(!text.contains(s3::SECRET_KEY) && !text.contains(s3::ACCESS_KEY), "{text}");
}
