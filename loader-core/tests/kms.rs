//! AWS KMS custody against moto_server's KMS (the same server the s3:// tests use):
//! pack, stream, rotate between the keyring and KMS without touching payloads, the
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
