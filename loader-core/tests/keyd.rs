//! The key service (`shardlock keyd`) against real TLS on loopback, with a CA made here:
//! a workload that holds no KEK streams exact epochs; the whole denial matrix, sent by a
//! raw HTTPS client that skips the loader's own checks, is denied by the service,
//! audited there, with no DEK in any answer; mTLS binds the token to the certificate;
//! faults (service stopped mid-epoch and restarted, wrong CA, plain http, an expired
//! certificate, a tampered or foreign manifest) are clear typed errors.
#![allow(clippy::unwrap_used)]

#[path = "common/cli.rs"]
mod cli;
mod common;
#[path = "common/files_server.rs"]
mod files_server;
#[path = "common/pki.rs"]
mod pki;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::Fixture;
use files_server::FilesServer;
use pki::Pki;
use shardlock::service::{KeyServiceProvider, ServiceOptions, ServiceTls};
use shardlock::{Attenuation, DenyReason, Error, IssuerKey, KeyService, KeydConfig, KeydSource, Loader, LogFormat};
use shardlock::{Operation, Shuffle};
use shardlock::{ShardSet, Token, TokenSpec};

const DATASET: &str = "keyd-test";

struct Setup {
    fx: Fixture,
    pki: Pki,
    dir: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let fx = Fixture::new();
        let pki = Pki::new(fx.dir.path());
        // 40 records, 4 per shard: 10 shards.
        let (dir, _) = fx.standard("ds", DATASET, 40);
        Self { fx, pki, dir }
    }

    fn config(&self, listen: SocketAddr) -> KeydConfig {
        let (cert, key) = self.pki.server();
        let mut cfg = KeydConfig::new(listen, self.fx.keyring.clone(), vec![self.fx.trust], cert, key);
        cfg.audit_log = Some(self.fx.path("keyd-audit.jsonl"));
        cfg.log = Box::new(TestOutput);
        cfg
    }

    fn start(&self) -> KeyService {
        KeyService::start(self.config("127.0.0.1:0".parse().unwrap())).unwrap()
    }

    /// A client that has the CA and nothing else: no keyring, no PIN.
    fn provider(&self, svc: &KeyService, timeout: Duration) -> Arc<KeyServiceProvider> {
        let mut opts = ServiceOptions { timeout, ..ServiceOptions::default() };
        opts.tls.ca_cert = Some(self.pki.ca());
        Arc::new(KeyServiceProvider::open(&format!("https://{}", svc.local_addr()), opts).unwrap())
    }

    /// The issuer's `.pub` file (written once), for the CLI's `--trust`.
    fn trust_file(&self) -> PathBuf {
        let key = self.fx.path("issuer-raw.key");
        if !key.exists() {
            self.fx.issuer.save(&key).unwrap();
        }
        self.fx.path("issuer-raw.key.pub")
    }

    fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.fx.path("keyd-audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn spec(&self) -> TokenSpec {
        TokenSpec {
            dataset: DATASET.into(),
            principal: "tester".into(),
            shards: ShardSet::All,
            ops: vec![Operation::Read],
            expires: SystemTime::now() + Duration::from_secs(3600),
            not_before: None,
            min_generation: None,
        }
    }

    fn token(&self, spec: &TokenSpec) -> String {
        Token::issue(&self.fx.issuer, spec).unwrap().to_base64().unwrap().to_string()
    }
}

/// The service's log into the test harness's captured output (shown when a test fails).
struct TestOutput;

impl std::io::Write for TestOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        eprint!("{}", String::from_utf8_lossy(b));
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The service's log kept in memory, for a test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// Every line, parsed as JSON.
    fn json(&self) -> Vec<serde_json::Value> {
        self.text().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"))).collect()
    }

    /// The JSON lines of `event`.
    fn events(&self, event: &str) -> Vec<serde_json::Value> {
        self.json().into_iter().filter(|l| l["event"] == event).collect()
    }
}

/// Waits up to 10 s for `f` to hold.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: not within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ids(l: &mut Loader, batches: Option<usize>) -> shardlock::Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut n = 0;
    for b in l.by_ref() {
        out.extend_from_slice(b?.sample_ids());
        n += 1;
        if Some(n) == batches {
            break;
        }
    }
    Ok(out)
}

#[test]
fn a_workload_without_any_kek_streams_exact_epochs_through_the_service() {
    let s = Setup::new();
    let svc = s.start();
    let provider = s.provider(&svc, Duration::from_secs(20));
    let build = |keys: Arc<dyn shardlock::KeyProvider>| {
        s.fx.loader_with(&s.dir, DATASET, keys)
            .batch_size(3)
            .shuffle(Shuffle::Window)
            .seed(5)
            .drop_last(false)
            .workers(2)
    };
    let mut remote = build(provider.clone()).build().unwrap();
    let mut local = build(s.fx.keyring.clone()).build().unwrap();
    for epoch in 0..2 {
        let got = ids(&mut remote, None).unwrap();
        assert_eq!(got, ids(&mut local, None).unwrap(), "epoch {epoch} differs from the local keyring's");
        assert_eq!(got.iter().collect::<HashSet<_>>().len(), 40, "epoch {epoch} is not every sample once");
    }
    // The service decided every shard of both epochs, in its own log, hash-chained.
    let log = s.audit();
    let releases = log.iter().filter(|e| e["event"] == "key_release" && e["decision"] == "allow").count();
    assert_eq!(releases, 20, "10 shards x 2 epochs, each released once per epoch");
    assert!(log.iter().all(|e| e["event"] != "key_release" || e["principal"] == "tester"));
    assert!(log
        .iter()
        .any(|e| e["event"] == "authorize" && e["client"].as_str().unwrap().starts_with("addr:127.0.0.1")));
    shardlock::verify_log(&s.fx.path("keyd-audit.jsonl")).unwrap();
    // Releases are batched: far fewer requests than shard opens.
    let metrics =
        raw(&s, &svc, None).get(format!("https://{}/metrics", svc.local_addr())).send().unwrap().text().unwrap();
    let requests: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("shardlock_keyd_requests_total{route=\"release\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(requests <= 6, "expected batched releases, saw {requests} requests:\n{metrics}");
    assert!(metrics.contains("shardlock_keyd_releases_total 20"), "{metrics}");
    svc.shutdown().unwrap();
}

/// A raw HTTPS client with the CA (and optionally a client certificate).
fn raw(s: &Setup, _svc: &KeyService, client: Option<(PathBuf, PathBuf)>) -> reqwest::blocking::Client {
    s.pki.raw_client(client)
}

fn register(c: &reqwest::blocking::Client, svc: &KeyService, manifest: &[u8]) -> (u16, serde_json::Value) {
    let r = c.post(format!("https://{}/v1/manifests", svc.local_addr())).body(manifest.to_vec()).send().unwrap();
    (r.status().as_u16(), serde_json::from_str(&r.text().unwrap()).unwrap())
}

/// Registers the test dataset's manifest with `svc` through `c` and returns its digest,
/// the name release requests give it (checked to be the SHA-256 of the bytes posted).
fn registered(s: &Setup, c: &reqwest::blocking::Client, svc: &KeyService) -> String {
    let manifest = std::fs::read(s.dir.join("manifest.json")).unwrap();
    let (status, reg) = register(c, svc, &manifest);
    assert_eq!(status, 200, "{reg}");
    assert_eq!(reg["dataset"], DATASET, "{reg}");
    let digest = reg["digest"].as_str().unwrap().to_owned();
    assert_eq!(digest, hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &manifest)));
    digest
}

fn release(
    c: &reqwest::blocking::Client,
    svc: &KeyService,
    digest: &str,
    token: Option<&str>,
    shards: &[u32],
) -> (u16, String) {
    let mut req = c
        .post(format!("https://{}/v1/release", svc.local_addr()))
        .body(serde_json::json!({"manifest": digest, "shards": shards}).to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

/// `token` (base64) with a block of Datalog `code` appended by its holder, as an
/// attacker would write one with the Biscuit library (no issuer key needed).
fn widen(s: &Setup, token: &str, code: &str) -> String {
    let root =
        biscuit_auth::PublicKey::from_bytes(s.fx.trust.public_bytes(), biscuit_auth::builder::Algorithm::Ed25519)
            .unwrap();
    let parsed = biscuit_auth::Biscuit::from_base64(token, root).unwrap();
    let block = biscuit_auth::builder::BlockBuilder::new().code(code).unwrap();
    parsed.append(block).unwrap().to_base64().unwrap()
}

/// (shard, Some(dek base64) | None, denial reason) of a release answer.
fn entries(body: &str) -> Vec<(u32, Option<String>, Option<String>)> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["deks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["shard"].as_u64().unwrap() as u32,
                e["dek"].as_str().map(str::to_owned),
                e["denied"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

#[test]
fn the_service_denies_the_whole_matrix_to_a_raw_client_and_audits_it() {
    let s = Setup::new();
    let deny_list = s.fx.path("deny.txt");
    std::fs::write(&deny_list, "").unwrap();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.deny_list = Some(deny_list.clone().into());
    let svc = KeyService::start(cfg).unwrap();
    let c = raw(&s, &svc, None);
    let manifest = std::fs::read(s.dir.join("manifest.json")).unwrap();
    let digest = registered(&s, &c, &svc);

    // A good token gets keys, which open the shards.
    let good = s.token(&s.spec());
    let (st, body) = release(&c, &svc, &digest, Some(&good), &[0, 1, 9]);
    assert_eq!(st, 200, "{body}");
    let e = entries(&body);
    assert!(e.iter().all(|(_, dek, denied)| dek.is_some() && denied.is_none()), "{body}");

    let other_issuer = IssuerKey::generate().unwrap();
    let now = SystemTime::now();
    let revoked = Token::issue(&s.fx.issuer, &s.spec()).unwrap();
    shardlock::DenyList::append(&deny_list, &revoked.revocation_id(), "test").unwrap();
    let narrowed = Token::issue(&s.fx.issuer, &s.spec())
        .unwrap()
        .attenuate(&Attenuation { shards: Some(ShardSet::parse("0-1").unwrap()), ..Attenuation::default() })
        .unwrap();
    // Blocks a holder appends asserting wider grants than the issuer's: more shards,
    // the dataset again, a later expiry. Only the authority block's facts count.
    let widening =
        r#"allowed_shards(0, 1000); allowed_dataset("keyd-test"); allowed_op("read"); expires(2100-01-01T00:00:00Z);"#;
    let narrow_issued = s.token(&TokenSpec { shards: ShardSet::parse("0-3").unwrap(), ..s.spec() });
    let expired = s.token(&TokenSpec { expires: now - Duration::from_secs(3600), ..s.spec() });
    let cases: Vec<(&str, Option<String>, Vec<u32>, DenyReason)> = vec![
        ("missing", None, vec![0, 1, 2, 3], DenyReason::MissingToken),
        ("garbage", Some("not-a-token".into()), vec![0, 5], DenyReason::InvalidToken),
        (
            "forged",
            Some(Token::issue(&other_issuer, &s.spec()).unwrap().to_base64().unwrap().to_string()),
            vec![0],
            DenyReason::InvalidToken,
        ),
        (
            "foreign dataset",
            Some(s.token(&TokenSpec { dataset: "other".into(), ..s.spec() })),
            vec![0],
            DenyReason::WrongDataset,
        ),
        ("expired", Some(expired.clone()), vec![0], DenyReason::TokenExpired),
        (
            "not yet valid",
            Some(s.token(&TokenSpec { not_before: Some(now + Duration::from_secs(3600)), ..s.spec() })),
            vec![0],
            DenyReason::NotYetValid,
        ),
        ("revoked", Some(revoked.to_base64().unwrap().to_string()), vec![0], DenyReason::Revoked),
        (
            "out of scope",
            Some(s.token(&TokenSpec { shards: ShardSet::parse("0-3").unwrap(), ..s.spec() })),
            vec![4, 9],
            DenyReason::ShardOutOfScope,
        ),
        ("attenuated to 0-1", Some(narrowed.to_base64().unwrap().to_string()), vec![2, 8], DenyReason::ShardOutOfScope),
        (
            "issued for 0-3, widened by a block",
            Some(widen(&s, &narrow_issued, widening)),
            vec![4, 9],
            DenyReason::ShardOutOfScope,
        ),
        (
            "attenuated to 0-1, widened by a block",
            Some(widen(&s, &narrowed.to_base64().unwrap(), widening)),
            vec![2, 8],
            DenyReason::ShardOutOfScope,
        ),
        ("expired, widened by a block", Some(widen(&s, &expired, widening)), vec![0, 3], DenyReason::TokenExpired),
        (
            "another dataset's, widened by a block",
            Some(widen(&s, &s.token(&TokenSpec { dataset: "other".into(), ..s.spec() }), widening)),
            vec![0],
            DenyReason::WrongDataset,
        ),
        (
            "verify only",
            Some(s.token(&TokenSpec { ops: vec![Operation::Verify], ..s.spec() })),
            vec![0],
            DenyReason::OperationNotGranted,
        ),
    ];
    for (name, token, shards, reason) in &cases {
        let before = s.audit().len();
        let (st, body) = release(&c, &svc, &digest, token.as_deref(), shards);
        assert_eq!(st, 200, "{name}: {body}");
        assert!(!body.contains("\"dek\""), "{name}: a DEK was released: {body}");
        let e = entries(&body);
        assert_eq!(e.iter().map(|x| x.0).collect::<Vec<_>>(), *shards, "{name}");
        for (shard, _, denied) in &e {
            assert_eq!(denied.as_deref(), Some(reason.name()), "{name}: shard {shard}: {body}");
        }
        // Audited on the service with the reason: once per shard, or once per request
        // when the token itself is missing or does not verify (so a flood of bad
        // requests cannot make the log grow by thousands of records each).
        let new = &s.audit()[before..];
        let denials: Vec<_> = new.iter().filter(|e| e["event"] == "authorize" && e["decision"] == "deny").collect();
        let per_request = matches!(reason, DenyReason::MissingToken | DenyReason::InvalidToken);
        assert_eq!(denials.len(), if per_request { 1 } else { shards.len() }, "{name}: {new:?}");
        assert!(denials.iter().all(|e| e["reason"] == reason.name()), "{name}: {new:?}");
        assert!(!new.iter().any(|e| e["event"] == "key_release"), "{name}: a key was unwrapped");
    }
    // The narrowed token still gets what it covers.
    let (_, body) = release(&c, &svc, &digest, Some(&narrowed.to_base64().unwrap()), &[1]);
    assert!(entries(&body)[0].1.is_some(), "{body}");
    // A widened token still verifies: it gets what its issuer granted, and only that.
    let (_, body) = release(&c, &svc, &digest, Some(&widen(&s, &narrow_issued, widening)), &[3]);
    assert!(entries(&body)[0].1.is_some(), "{body}");

    // Requests the service refuses as a whole.
    let (st, body) = release(&c, &svc, &"0".repeat(64), Some(&good), &[0]);
    assert_eq!((st, body.contains("unknown_manifest")), (404, true), "{body}");
    let (st, body) = release(&c, &svc, &digest, Some(&good), &[10]);
    assert_eq!(st, 400, "{body}");
    let (st, body) = release(&c, &svc, &digest, Some(&good), &[]);
    assert_eq!(st, 400, "{body}");
    // The service answers 413 as soon as the body passes its bound and closes; a client
    // still writing may see that answer or a broken pipe. The service's count decides.
    match c.post(format!("https://{}/v1/release", svc.local_addr())).body(vec![b'['; 2 << 20]).send() {
        Ok(r) => assert_eq!(r.status().as_u16(), 413),
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    let metrics = c.get(format!("https://{}/metrics", svc.local_addr())).send().unwrap().text().unwrap();
    assert!(metrics.contains("shardlock_keyd_requests_total{route=\"release\",status=\"413\"} 1"), "{metrics}");
    // A tampered manifest and another issuer's manifest are refused.
    let mut tampered = manifest.clone();
    let at = tampered.windows(7).position(|w| w == b"records").unwrap();
    tampered[at + 10] ^= 1;
    let (st, body) = register(&c, &svc, &tampered);
    assert_eq!(st, 422, "{body}");
    let foreign_fx = Fixture::new();
    let (foreign, _) = foreign_fx.standard("foreign", DATASET, 8);
    let (st, body) = register(&c, &svc, &std::fs::read(foreign.join("manifest.json")).unwrap());
    assert_eq!(st, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("signature"), "{body}");
    let log = std::fs::read_to_string(s.fx.path("keyd-audit.jsonl")).unwrap();
    assert!(!log.contains(&good), "a token reached the audit log");
    for (_, dek, _) in &e {
        assert!(!log.contains(dek.as_deref().unwrap()), "a DEK reached the audit log");
    }
    shardlock::verify_log(&s.fx.path("keyd-audit.jsonl")).unwrap();
    svc.shutdown().unwrap();
}

#[test]
fn under_mtls_the_certificate_must_be_the_tokens_principal() {
    let s = Setup::new();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.client_ca = Some(s.pki.ca());
    let svc = KeyService::start(cfg).unwrap();
    let tester = s.pki.issue("tester", "tester", &[], false);
    let mallory = s.pki.issue("mallory", "mallory", &[], false);
    let manifest = std::fs::read(s.dir.join("manifest.json")).unwrap();
    let token = s.token(&s.spec());

    let c = raw(&s, &svc, Some(tester.clone()));
    let digest = registered(&s, &c, &svc);
    let (_, body) = release(&c, &svc, &digest, Some(&token), &[0]);
    assert!(entries(&body)[0].1.is_some(), "{body}");

    // Mallory holds tester's token: denied, audited with her certificate.
    let c = raw(&s, &svc, Some(mallory));
    let (st, body) = release(&c, &svc, &digest, Some(&token), &[0, 1]);
    assert_eq!(st, 200);
    assert!(!body.contains("\"dek\""), "{body}");
    assert!(entries(&body).iter().all(|e| e.2.as_deref() == Some("principal_mismatch")), "{body}");
    let log = s.audit();
    assert!(log.iter().any(|e| e["reason"] == "principal_mismatch" && e["client"] == "cert:mallory"), "{log:?}");
    // No certificate at all: the handshake fails.
    let c = raw(&s, &svc, None);
    assert!(c.post(format!("https://{}/v1/manifests", svc.local_addr())).body(manifest.clone()).send().is_err());

    // The loader with tester's certificate streams; without one it gets a clear error.
    let url = format!("https://{}", svc.local_addr());
    let tls = ServiceTls { ca_cert: Some(s.pki.ca()), client_cert: Some(tester.0), client_key: Some(tester.1) };
    let p = KeyServiceProvider::open(&url, ServiceOptions { tls, ..ServiceOptions::default() }).unwrap();
    let mut l = s.fx.loader_with(&s.dir, DATASET, Arc::new(p)).batch_size(4).build().unwrap();
    assert_eq!(ids(&mut l, None).unwrap().len(), 40);
    let p = KeyServiceProvider::open(
        &url,
        ServiceOptions {
            tls: ServiceTls { ca_cert: Some(s.pki.ca()), ..ServiceTls::default() },
            timeout: Duration::from_secs(5),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let mut l = s.fx.loader_with(&s.dir, DATASET, Arc::new(p)).batch_size(4).build().unwrap();
    match ids(&mut l, None) {
        Err(Error::KeyUnavailable { detail, .. }) => {
            assert!(detail.contains("client certificate") && detail.contains(&url), "{detail}")
        }
        other => panic!("expected KeyUnavailable, got {other:?}"),
    }
    svc.shutdown().unwrap();
}

#[test]
fn a_stopped_service_is_a_typed_error_and_after_a_restart_the_loader_resumes() {
    let s = Setup::new();
    let svc = s.start();
    let addr = svc.local_addr();
    let provider = s.provider(&svc, Duration::from_secs(3));
    let build = || {
        s.fx.loader_with(&s.dir, DATASET, provider.clone())
            .batch_size(2)
            .shuffle(Shuffle::Global)
            .seed(3)
            .workers(1)
            .window(1, None)
    };
    let mut l = build().build().unwrap();
    let mut seen = ids(&mut l, Some(3)).unwrap();
    let state = l.state();
    drop(l);
    svc.shutdown().unwrap();
    // Down: the next epoch fails within the timeout, naming the service.
    let mut l = build().build().unwrap();
    l.load_state(&state).unwrap();
    let t = Instant::now();
    match ids(&mut l, None) {
        Err(Error::KeyUnavailable { detail, .. }) => {
            assert!(detail.contains(&format!("https://{addr}")) && detail.contains("running"), "{detail}")
        }
        other => panic!("expected KeyUnavailable, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(30), "took {:?}", t.elapsed());
    drop(l);
    // Restarted on the same address (a fresh replica: it has no manifest cached).
    let svc = KeyService::start(s.config(addr)).unwrap();
    let mut l = build().build().unwrap();
    l.load_state(&state).unwrap();
    seen.extend(ids(&mut l, None).unwrap());
    assert_eq!(seen.len(), 40);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 40, "the resumed epoch is not exactly one epoch");
    svc.shutdown().unwrap();
}

#[test]
fn tls_misconfigurations_are_clear_errors() {
    let s = Setup::new();
    let svc = s.start();
    let url = format!("https://{}", svc.local_addr());
    // Plain http is refused before anything is sent.
    let e = KeyServiceProvider::open(&format!("http://{}", svc.local_addr()), ServiceOptions::default()).unwrap_err();
    assert!(e.to_string().contains("plain http is refused"), "{e}");
    // A CA that did not sign the service's certificate.
    let wrong_dir = s.fx.path("wrong");
    std::fs::create_dir(&wrong_dir).unwrap();
    let wrong = Pki::new(&wrong_dir);
    let p = KeyServiceProvider::open(
        &url,
        ServiceOptions {
            tls: ServiceTls { ca_cert: Some(wrong.ca()), ..ServiceTls::default() },
            timeout: Duration::from_secs(5),
            ..ServiceOptions::default()
        },
    )
    .unwrap();
    let mut l = s.fx.loader_with(&s.dir, DATASET, Arc::new(p)).build().unwrap();
    let t = Instant::now();
    match ids(&mut l, None) {
        Err(Error::KeyUnavailable { detail, .. }) => {
            assert!(detail.contains("TLS") && detail.contains("CA"), "{detail}")
        }
        other => panic!("expected KeyUnavailable, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(4), "a certificate failure is not retried until the timeout");
    // A missing CA file names the file.
    let e = KeyServiceProvider::open(
        &url,
        ServiceOptions {
            tls: ServiceTls { ca_cert: Some(s.fx.path("nope.pem")), ..ServiceTls::default() },
            ..ServiceOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    svc.shutdown().unwrap();
    // An expired server certificate: the client refuses the handshake.
    let (cert, key) = s.pki.issue("old", "keyd", &["127.0.0.1"], true);
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.tls_cert = cert;
    cfg.tls_key = key;
    let svc = KeyService::start(cfg).unwrap();
    let p = s.provider(&svc, Duration::from_secs(5));
    let mut l = s.fx.loader_with(&s.dir, DATASET, p).build().unwrap();
    match ids(&mut l, None) {
        Err(Error::KeyUnavailable { detail, .. }) => assert!(detail.contains("TLS"), "{detail}"),
        other => panic!("expected KeyUnavailable, got {other:?}"),
    }
    svc.shutdown().unwrap();
    // A key file others can read is refused at start, naming it.
    let (cert, key) = s.pki.issue("loose", "keyd", &["127.0.0.1"], false);
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.tls_cert = cert;
    cfg.tls_key = key;
    let e = KeyService::start(cfg).unwrap_err();
    assert!(e.to_string().contains("loose.key"), "{e}");
}

#[test]
fn the_cli_benchmarks_through_the_service_with_only_its_url_and_ca() {
    let s = Setup::new();
    let svc = s.start();
    let token = s.fx.path("job.token");
    Token::issue(&s.fx.issuer, &s.spec()).unwrap().save(&token).unwrap();
    let trust = s.trust_file();
    let url = format!("https://{}", svc.local_addr());
    let (ca, dir) = (s.pki.ca(), s.dir.clone());
    let args = [
        "bench",
        dir.to_str().unwrap(),
        "--keyring",
        &url,
        "--ca-cert",
        ca.to_str().unwrap(),
        "--token",
        token.to_str().unwrap(),
        "--trust",
        trust.to_str().unwrap(),
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--json",
    ];
    let out: serde_json::Value = serde_json::from_str(&cli::ok(s.fx.dir.path(), &args)).unwrap();
    assert_eq!(out["epochs"][0]["samples"], 40, "{out}");
    let released = s.audit().iter().filter(|e| e["event"] == "key_release" && e["decision"] == "allow").count();
    assert_eq!(released, 20);
    // Without the CA the system bundle does not know the test CA: a clear error, exit 1.
    let o = cli::run(s.fx.dir.path(), &[&args[..4], &args[6..]].concat());
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TLS") && err.contains("--ca-cert"), "{err}");
    svc.shutdown().unwrap();
}

#[test]
fn requests_without_a_valid_token_are_rate_limited_per_address() {
    let s = Setup::new();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.rate_limit = Some(5.0); // bursts of 10 requests per address
    let svc = KeyService::start(cfg).unwrap();
    let c = raw(&s, &svc, None);
    let digest = registered(&s, &c, &svc);
    let mut statuses = Vec::new();
    for i in 0..12 {
        let token = if i % 2 == 0 { Some("not-a-token") } else { None };
        statuses.push(release(&c, &svc, &digest, token, &[0]).0);
    }
    assert!(statuses[..10].iter().all(|&st| st != 429), "{statuses:?}");
    let (st, body) = release(&c, &svc, &digest, Some("still-not-a-token"), &[0]);
    assert_eq!(st, 429, "{body}");
    assert!(body.contains("without a valid token from 127.0.0.1"), "{body}");
    // A valid token is not held back by the bad ones from the same address.
    let (st, body) = release(&c, &svc, &digest, Some(&s.token(&s.spec())), &[0]);
    assert_eq!(st, 200, "{body}");
    svc.shutdown().unwrap();
}

#[test]
fn each_principal_is_held_to_its_rate_limit() {
    let s = Setup::new();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.rate_limit = Some(5.0); // bursts of 10 shards
    let svc = KeyService::start(cfg).unwrap();
    let c = raw(&s, &svc, None);
    let digest = registered(&s, &c, &svc);
    let tester = s.token(&s.spec());
    let other = s.token(&TokenSpec { principal: "other".into(), ..s.spec() });
    let all: Vec<u32> = (0..10).collect();
    let (st, body) = release(&c, &svc, &digest, Some(&tester), &all);
    assert_eq!(st, 200, "{body}");
    let (st, body) = release(&c, &svc, &digest, Some(&tester), &[0, 1, 2]);
    assert_eq!(st, 429, "{body}");
    assert!(body.contains("rate_limited") && body.contains("tester"), "{body}");
    // Another principal has its own bucket.
    let (st, body) = release(&c, &svc, &digest, Some(&other), &[0, 1, 2]);
    assert_eq!(st, 200, "{body}");
    // The bucket refills: 3 shards at 5/s take 0.6 s.
    std::thread::sleep(Duration::from_millis(800));
    let (st, body) = release(&c, &svc, &digest, Some(&tester), &[0, 1, 2]);
    assert_eq!(st, 200, "{body}");
    svc.shutdown().unwrap();
}

#[test]
fn the_cli_service_takes_a_toml_config_and_stops_on_sigterm() {
    use std::io::BufRead as _;
    let s = Setup::new();
    let (cert, key) = s.pki.server();
    let trust = s.trust_file();
    let deny = s.fx.path("deny.txt");
    std::fs::write(&deny, "").unwrap();
    let config = s.fx.path("keyd.toml");
    let q = |p: &Path| format!("{:?}", p.to_str().unwrap());
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nkeyring = {}\ntrust = [{}]\ntls_cert = {}\ntls_key = {}\naudit_log = {}\nrate_limit = 1000\n\
             deny_list = {}\nsource_ca = {}\npoll_interval = \"5s\"\nlog_format = \"json\"\njson = true\n",
            q(&s.fx.path("keyring.json")),
            q(&trust),
            q(&cert),
            q(&key),
            q(&s.fx.path("keyd-audit.jsonl")),
            q(&deny),
            q(&s.pki.ca()),
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shardlock"))
        .args(["keyd", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = serde_json::from_str::<serde_json::Value>(&line).unwrap_or_else(|_| panic!("{line:?}"))["listening"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut opts = ServiceOptions::default();
    opts.tls.ca_cert = Some(s.pki.ca());
    let p = Arc::new(KeyServiceProvider::open(&url, opts).unwrap());
    let mut l = s.fx.loader_with(&s.dir, DATASET, p).batch_size(4).build().unwrap();
    assert_eq!(ids(&mut l, None).unwrap().len(), 40);
    // Stop it as an init system would.
    let st = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let t = Instant::now();
    let status = child.wait().unwrap();
    assert!(status.success(), "keyd exited with {status:?}");
    assert!(t.elapsed() < Duration::from_secs(15));
    // Its log on stderr: JSON lines (log_format in the file), start to shutdown.
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"))).collect();
    assert_eq!(lines.first().map(|l| &l["event"]), Some(&"start".into()), "{log}");
    assert_eq!(lines.last().map(|l| &l["event"]), Some(&"shutdown".into()), "{log}");
    assert_eq!(lines[0]["poll_interval_s"], 5.0, "{log}");
    assert_eq!(lines[0]["deny_list"], deny.to_str().unwrap(), "{log}");
    assert!(lines.iter().any(|l| l["event"] == "request" && l["shards_released"].as_u64() > Some(0)), "{log}");
    // An unknown option in the file is an error naming the file.
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nlisten_adress = 1\n").unwrap();
    let o = cli::run(s.fx.dir.path(), &["keyd", "--config", config.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("keyd.toml") && err.contains("listen_adress"), "{err}");
}

/// The issuer's seed, read back from its key file, to build tokens `Token::issue` refuses.
fn issuer_seed(s: &Setup) -> [u8; 32] {
    s.trust_file();
    let path = s.fx.path("issuer-raw.key");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    hex::decode(v["secret"].as_str().unwrap()).unwrap().try_into().unwrap()
}

#[test]
fn under_mtls_a_token_without_a_principal_matches_no_certificate() {
    let s = Setup::new();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.client_ca = Some(s.pki.ca());
    let svc = KeyService::start(cfg).unwrap();
    // A token the issuer signed with every grant but no principal fact.
    let root = biscuit_auth::KeyPair::from(
        &biscuit_auth::PrivateKey::from_bytes(&issuer_seed(&s), biscuit_auth::builder::Algorithm::Ed25519).unwrap(),
    );
    let exp = SystemTime::now() + Duration::from_secs(3600);
    let mut params = std::collections::HashMap::new();
    params.insert("exp".to_owned(), biscuit_auth::builder::date(&exp));
    params.insert("nbf".to_owned(), biscuit_auth::builder::date(&(SystemTime::now() - Duration::from_secs(60))));
    let anonymous = biscuit_auth::Biscuit::builder()
        .code_with_params(
            format!(
                "allowed_dataset(\"{DATASET}\"); allowed_op(\"read\"); allowed_shards(0, 100); expires({{exp}}); not_before({{nbf}});"
            ),
            params,
            std::collections::HashMap::new(),
        )
        .unwrap()
        .build(&root)
        .unwrap()
        .to_base64()
        .unwrap();
    let tester = s.pki.issue("tester", "tester", &[], false);
    let c = raw(&s, &svc, Some(tester));
    let digest = registered(&s, &c, &svc);
    let (st, body) = release(&c, &svc, &digest, Some(&anonymous), &[0, 1]);
    assert_eq!(st, 200, "{body}");
    assert!(!body.contains("\"dek\""), "a token with no principal got keys under mTLS: {body}");
    assert!(entries(&body).iter().all(|e| e.2.as_deref() == Some("principal_mismatch")), "{body}");
    // Without mTLS the same token is authorized as usual (the principal is not a grant).
    let plain = s.start();
    let c = raw(&s, &plain, None);
    let digest = registered(&s, &c, &plain);
    let (_, body) = release(&c, &plain, &digest, Some(&anonymous), &[0]);
    assert!(entries(&body)[0].1.is_some(), "{body}");
    plain.shutdown().unwrap();
    svc.shutdown().unwrap();
}

#[test]
fn re_encodings_of_one_signed_manifest_share_one_cache_entry() {
    let s = Setup::new();
    let svc = s.start();
    let c = raw(&s, &svc, None);
    let manifest = std::fs::read(s.dir.join("manifest.json")).unwrap();
    let (_, first) = register(&c, &svc, &manifest);
    // The same signed manifest with other whitespace: another digest, the same entry.
    let mut spaced = b"  ".to_vec();
    spaced.extend_from_slice(&manifest);
    spaced.extend_from_slice(b"\n\n");
    let mut digests = HashSet::new();
    digests.insert(first["digest"].as_str().unwrap().to_owned());
    for k in 0..20 {
        let mut m = vec![b' '; k];
        m.extend_from_slice(&spaced);
        let (st, reg) = register(&c, &svc, &m);
        assert_eq!(st, 200, "{reg}");
        digests.insert(reg["digest"].as_str().unwrap().to_owned());
    }
    assert_eq!(digests.len(), 21);
    let metrics = c.get(format!("https://{}/metrics", svc.local_addr())).send().unwrap().text().unwrap();
    assert!(metrics.contains("shardlock_keyd_manifests 1\n"), "{metrics}");
    // Each posted digest names it.
    let token = s.token(&s.spec());
    for d in &digests {
        let (st, body) = release(&c, &svc, d, Some(&token), &[3]);
        assert_eq!(st, 200, "{body}");
    }
    svc.shutdown().unwrap();
}

#[test]
fn a_key_released_for_one_token_is_never_used_for_another() {
    let s = Setup::new();
    let deny_list = s.fx.path("deny.txt");
    std::fs::write(&deny_list, "").unwrap();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.deny_list = Some(deny_list.clone().into());
    let svc = KeyService::start(cfg).unwrap();
    let provider = s.provider(&svc, Duration::from_secs(10));
    let wide = Token::issue(&s.fx.issuer, &s.spec()).unwrap();
    // Another token for the same shards, revoked at the service only (the workload
    // has no deny list, so its local check passes).
    let revoked = Token::issue(&s.fx.issuer, &TokenSpec { principal: "other".into(), ..s.spec() }).unwrap();
    shardlock::DenyList::append(&deny_list, &revoked.revocation_id(), "test").unwrap();
    // The wide token's loader reads one batch (shard 0): the provider now holds the
    // keys of the next shards of its plan, released for the wide token.
    let mut a = s.fx.loader_with(&s.dir, DATASET, provider.clone()).batch_size(4).shuffle(Shuffle::None).workers(1);
    a = a.token_value(wide);
    let mut a = a.build().unwrap();
    assert_eq!(ids(&mut a, Some(1)).unwrap().len(), 4);
    // The revoked token asks for shard 1 through the same provider: the held key is the
    // wide token's, so the service is asked, and it says revoked.
    let ds = shardlock::Dataset::open(&s.dir, &s.fx.trust).unwrap();
    let auth = shardlock::Authorizer::new(&s.fx.trust, Some(revoked), Default::default()).unwrap();
    let access = shardlock::Access::new(auth, provider.clone());
    match access.open_shard(&ds, 1) {
        Err(Error::AccessDenied { reason: DenyReason::Revoked, shard: Some(1), .. }) => {}
        other => panic!("expected the service's revocation, got {:?}", other.map(|_| "a reader")),
    }
    // The wide loader still gets its held keys.
    assert_eq!(ids(&mut a, None).unwrap().len(), 36);
    svc.shutdown().unwrap();
}

#[test]
fn idle_and_crowding_connections_are_dropped_not_served_forever() {
    use std::io::Read as _;
    let s = Setup::new();
    let svc = s.start();
    let c = raw(&s, &svc, None);
    let metrics = |c: &reqwest::blocking::Client| {
        let m = c.get(format!("https://{}/metrics", svc.local_addr())).send().unwrap().text().unwrap();
        m.lines()
            .find_map(|l| l.strip_prefix("shardlock_keyd_dropped_connections_total "))
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    // 256 connections from one address that never start TLS: the next is refused at
    // once, while they hold their places ...
    let idle: Vec<std::net::TcpStream> =
        (0..256).map(|_| std::net::TcpStream::connect(svc.local_addr()).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let fresh = raw(&s, &svc, None);
    assert!(fresh.get(format!("https://{}/healthz", svc.local_addr())).send().is_err());
    // ... and each is dropped when its handshake has not come within 10 s.
    let mut one = idle.into_iter().next().unwrap();
    one.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let n = one.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server sent bytes to a client that never spoke");
    assert!(t.elapsed() < Duration::from_secs(12), "an idle connection was held {:?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    // Once they are gone the address is served again, and the drops were counted.
    let fresh = raw(&s, &svc, None);
    assert!(fresh.get(format!("https://{}/healthz", svc.local_addr())).send().unwrap().status().is_success());
    assert!(metrics(&c) >= 257, "dropped connections: {}", metrics(&c));
    svc.shutdown().unwrap();
}

/// A dataset of another issuer (a fixture of its own), its DEKs wrapped under the
/// service's keyring: servable once that issuer is trusted.
fn other_issuers_dataset(s: &Setup) -> (Fixture, PathBuf) {
    let fx = Fixture::new();
    let (dir, _) = fx.standard_with(&*s.fx.keyring, "other-ds", "other-ds", 8);
    (fx, dir)
}

/// The text of `fx`'s issuer public key file (`.pub`).
fn pub_text(fx: &Fixture) -> String {
    let key = fx.path("issuer-for-pub.key");
    if !key.exists() {
        fx.issuer.save(&key).unwrap();
    }
    std::fs::read_to_string(fx.path("issuer-for-pub.key.pub")).unwrap()
}

/// Replaces `path` with `text` at once (written aside, renamed over it), with `mode`.
fn replace(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

#[test]
fn trust_anchors_are_re_read_when_their_file_changes() {
    let s = Setup::new();
    let (b_fx, b_dir) = other_issuers_dataset(&s);
    let (a_pub, b_pub) = (pub_text(&s.fx), pub_text(&b_fx));
    let trust = s.fx.path("trust.json");
    replace(&trust, &a_pub, 0o644);
    let log = Captured::default();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.trust = Vec::new();
    cfg.trust_sources = vec![trust.clone().into()];
    cfg.log_format = LogFormat::Json;
    cfg.log = Box::new(log.clone());
    let svc = KeyService::start(cfg).unwrap();
    let c = raw(&s, &svc, None);
    let a_manifest = std::fs::read(s.dir.join("manifest.json")).unwrap();
    let b_manifest = std::fs::read(b_dir.join("manifest.json")).unwrap();
    let a_digest = registered(&s, &c, &svc);
    let a_token = s.token(&s.spec());
    let b_token = Token::issue(&b_fx.issuer, &TokenSpec { dataset: "other-ds".into(), ..s.spec() })
        .unwrap()
        .to_base64()
        .unwrap()
        .to_string();
    let (_, body) = release(&c, &svc, &a_digest, Some(&a_token), &[0]);
    assert!(entries(&body)[0].1.is_some(), "{body}");
    let (st, body) = register(&c, &svc, &b_manifest);
    assert_eq!(st, 422, "issuer B is not trusted yet: {body}");

    // The file now names B only (a bundle: a JSON array of .pub contents).
    replace(&trust, &format!("[{b_pub}]"), 0o644);
    let (st, reg) = register(&c, &svc, &b_manifest);
    assert_eq!(st, 200, "an added anchor is honoured at the next registration: {reg}");
    let b_digest = reg["digest"].as_str().unwrap().to_owned();
    let (_, body) = release(&c, &svc, &b_digest, Some(&b_token), &[0, 1]);
    assert!(entries(&body).iter().all(|e| e.1.is_some()), "{body}");
    // A's manifest, registered before, is no longer served: refused, audited as a deny.
    let before = s.audit().len();
    let (st, body) = release(&c, &svc, &a_digest, Some(&a_token), &[0, 1]);
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("untrusted_manifest") && !body.contains("\"dek\""), "{body}");
    let new = s.audit()[before..].to_vec();
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(
        (&new[0]["event"], &new[0]["decision"], &new[0]["reason"], &new[0]["dataset"]),
        (&"authorize".into(), &"deny".into(), &"untrusted_manifest".into(), &DATASET.into()),
        "{new:?}"
    );
    assert!(new[0]["rule"].as_str().unwrap().contains(&s.fx.trust.key_id()), "{new:?}");
    let (st, body) = register(&c, &svc, &a_manifest);
    assert_eq!(st, 422, "{body}");
    // The loader through this service gets a clear error, not keys.
    let p = s.provider(&svc, Duration::from_secs(5));
    let mut l = s.fx.loader_with(&s.dir, DATASET, p).build().unwrap();
    match ids(&mut l, None) {
        Err(Error::KeyUnavailable { detail, .. }) => assert!(detail.contains("manifest_signature"), "{detail}"),
        other => panic!("expected KeyUnavailable, got {other:?}"),
    }
    let reloads = log.events("reload");
    assert!(
        reloads
            .iter()
            .any(|l| l["what"] == "trust anchors" && l["entries"] == 1 && l["source"] == trust.to_str().unwrap()),
        "{reloads:?}"
    );

    // A file that turns invalid keeps the last good anchors (B), and says so in the log.
    std::fs::write(&trust, "{not json").unwrap();
    assert_eq!(register(&c, &svc, &b_manifest).0, 200);
    assert_eq!(release(&c, &svc, &a_digest, Some(&a_token), &[0]).0, 403);
    // So does one that others could write, however good its content.
    replace(&trust, &format!("[{a_pub}, {b_pub}]"), 0o666);
    assert_eq!(release(&c, &svc, &a_digest, Some(&a_token), &[0]).0, 403);
    let failed = log.events("reload_failed");
    assert!(
        failed.iter().any(|l| l["what"] == "trust anchors" && l["kept_entries"] == 1 && l["error"] == "format"),
        "{failed:?}"
    );
    assert!(
        failed.iter().any(|l| l["message"].as_str().unwrap().contains("writable by group or others")),
        "{failed:?}"
    );
    // Fixed, it is read again: A is back, and its cached manifest is served again.
    std::fs::set_permissions(&trust, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (st, body) = release(&c, &svc, &a_digest, Some(&a_token), &[2]);
    assert_eq!(st, 200, "{body}");
    assert!(entries(&body)[0].1.is_some(), "{body}");
    assert!(log.events("reload").iter().any(|l| l["what"] == "trust anchors" && l["entries"] == 2));
    shardlock::verify_log(&s.fx.path("keyd-audit.jsonl")).unwrap();
    svc.shutdown().unwrap();

    // At start a bad or missing trust file is an error naming it (fail closed).
    for (name, text) in [("bad.json", Some("[{}]")), ("missing.json", None)] {
        let path = s.fx.path(name);
        if let Some(t) = text {
            replace(&path, t, 0o644);
        }
        let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
        cfg.trust = Vec::new();
        cfg.trust_sources = vec![path.into()];
        let e = KeyService::start(cfg).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
    }
}

#[test]
fn deny_list_and_trust_anchors_can_be_https_urls_polled_with_validators() {
    let s = Setup::new();
    let (cert, key) = s.pki.server();
    let files = FilesServer::start(&cert, &key);
    files.put("/deny.txt", b"# nothing revoked yet\n");
    files.put("/trust.json", pub_text(&s.fx).as_bytes());
    // Credentials and a query that must reach the server but never the log.
    let secret = |path: &str| files.url(path).replacen("https://", "https://ops:hunter2@", 1) + "?sig=SECRETQUERY";
    let log = Captured::default();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.trust = Vec::new();
    cfg.trust_sources = vec![KeydSource::Url(secret("/trust.json"))];
    cfg.deny_list = Some(KeydSource::Url(secret("/deny.txt")));
    cfg.source_ca = Some(s.pki.ca());
    cfg.poll_interval = Duration::from_millis(200);
    cfg.log_format = LogFormat::Json;
    cfg.log = Box::new(log.clone());
    let svc = KeyService::start(cfg).unwrap();
    let c = raw(&s, &svc, None);
    let digest = registered(&s, &c, &svc);
    let token = Token::issue(&s.fx.issuer, &s.spec()).unwrap();
    let bearer = token.to_base64().unwrap().to_string();
    let (_, body) = release(&c, &svc, &digest, Some(&bearer), &[0]);
    assert!(entries(&body)[0].1.is_some(), "{body}");
    // Polls are conditional: an unchanged document is answered 304.
    eventually("a 304 to If-None-Match", || files.seen().iter().any(|r| r.status == 304 && r.if_none_match.is_some()));
    for r in files.seen() {
        assert!(r.target.ends_with("?sig=SECRETQUERY"), "{r:?}");
        assert_eq!(r.authorization.as_deref(), Some("Basic b3BzOmh1bnRlcjI="), "{r:?}");
    }
    // A revocation published at the URL bites within a poll or two.
    files.put("/deny.txt", format!("{} # test\n", token.revocation_id()).as_bytes());
    let denied = || entries(&release(&c, &svc, &digest, Some(&bearer), &[0]).1)[0].2.clone();
    eventually("the revocation", || denied().as_deref() == Some("revoked"));
    // The server failing keeps the last good copies (the revocation stays), logged.
    files.force(Some(503));
    eventually("a logged fetch failure", || {
        let f = log.events("reload_failed");
        ["deny list", "trust anchors"].iter().all(|w| f.iter().any(|l| l["what"] == *w && l["kept_entries"] == 1))
    });
    assert_eq!(denied().as_deref(), Some("revoked"));
    assert_eq!(register(&c, &svc, &std::fs::read(s.dir.join("manifest.json")).unwrap()).0, 200);
    files.force(None);
    svc.shutdown().unwrap();
    let reloads = log.events("reload");
    assert!(
        reloads.iter().any(|l| l["what"] == "deny list" && l["entries"] == 1 && l["source"] == files.url("/deny.txt")),
        "{reloads:?}"
    );
    let text = log.text();
    for leak in ["hunter2", "SECRETQUERY", "ops:"] {
        assert!(!text.contains(leak), "{leak:?} reached the log:\n{text}");
    }

    // At start a first fetch that fails stops the service, naming the URL (without its
    // secrets) and what to check.
    let start = |edit: &dyn Fn(&mut KeydConfig)| {
        let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
        cfg.source_ca = Some(s.pki.ca());
        edit(&mut cfg);
        KeyService::start(cfg).unwrap_err().to_string()
    };
    let e = start(&|c| c.deny_list = Some(KeydSource::Url(secret("/missing.txt"))));
    assert!(e.contains(&files.url("/missing.txt")) && e.contains("404") && e.contains("--source-ca"), "{e}");
    assert!(!e.contains("hunter2") && !e.contains("SECRETQUERY"), "{e}");
    // A trust document over 1 MiB, and plain http off loopback, are refused.
    files.put("/big.json", &vec![b' '; (1 << 20) + 1]);
    let e = start(&|c| c.trust_sources = vec![KeydSource::Url(files.url("/big.json"))]);
    assert!(e.contains("larger than 1 MiB"), "{e}");
    let e = start(&|c| c.deny_list = Some(KeydSource::Url("http://192.0.2.1/deny.txt".into())));
    assert!(e.contains("plain http"), "{e}");
}

#[test]
fn the_json_log_has_a_line_per_request_and_no_secret() {
    let s = Setup::new();
    let log = Captured::default();
    let mut cfg = s.config("127.0.0.1:0".parse().unwrap());
    cfg.client_ca = Some(s.pki.ca());
    cfg.log_format = LogFormat::Json;
    cfg.log = Box::new(log.clone());
    let svc = KeyService::start(cfg).unwrap();
    let c = raw(&s, &svc, Some(s.pki.issue("tester", "tester", &[], false)));
    let digest = registered(&s, &c, &svc);
    let token = Token::issue(&s.fx.issuer, &s.spec()).unwrap();
    let bearer = token.to_base64().unwrap().to_string();
    let (_, body) = release(&c, &svc, &digest, Some(&bearer), &[0, 1, 5]);
    let deks: Vec<String> = entries(&body).into_iter().filter_map(|e| e.1).collect();
    assert_eq!(deks.len(), 3, "{body}");
    let narrow = s.token(&TokenSpec { shards: ShardSet::parse("0").unwrap(), ..s.spec() });
    let (_, body) = release(&c, &svc, &digest, Some(&narrow), &[0, 1]);
    let deks: Vec<String> = deks.into_iter().chain(entries(&body).into_iter().filter_map(|e| e.1)).collect();
    assert_eq!(release(&c, &svc, &"0".repeat(64), Some(&bearer), &[0]).0, 404);
    let other = c.get(format!("https://{}/v1/nope?token={bearer}", svc.local_addr())).send().unwrap();
    assert_eq!(other.status().as_u16(), 404);
    assert!(c.get(format!("https://{}/metrics", svc.local_addr())).send().unwrap().status().is_success());
    svc.shutdown().unwrap();

    let lines = log.json();
    assert_eq!(lines.first().map(|l| &l["event"]), Some(&"start".into()), "{lines:?}");
    assert_eq!(lines.last().map(|l| &l["event"]), Some(&"shutdown".into()), "{lines:?}");
    for l in &lines {
        humantime::parse_rfc3339(l["time"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(l["level"] == "info" || l["level"] == "warn", "{l}");
    }
    let start = &lines[0];
    assert_eq!(start["trust_anchors"], serde_json::json!([s.fx.trust.key_id()]), "{start}");
    assert_eq!(start["mtls"], true, "{start}");
    let requests = log.events("request");
    assert_eq!(requests.len(), 6, "{requests:?}");
    for r in &requests {
        assert!(r["method"].is_string() && r["path"].is_string() && r["status"].is_u64(), "{r}");
        assert!(r["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{r}");
        assert!(r["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
        assert_eq!(r["identity"], "tester", "{r}");
    }
    let (reg, wide, narrowed, unknown, nope, metrics) =
        (&requests[0], &requests[1], &requests[2], &requests[3], &requests[4], &requests[5]);
    assert_eq!((&reg["method"], &reg["path"], &reg["status"]), (&"POST".into(), &"/v1/manifests".into(), &200.into()));
    assert_eq!(wide["path"], "/v1/release");
    assert_eq!(wide["principal"], "tester");
    assert_eq!(wide["token_id"], token.revocation_id());
    assert_eq!(
        (&wide["shards_asked"], &wide["shards_released"], &wide["shards_denied"]),
        (&3.into(), &3.into(), &0.into())
    );
    assert!(wide.get("error").is_none() && wide.get("deny_reasons").is_none(), "{wide}");
    assert_eq!((&narrowed["shards_released"], &narrowed["shards_denied"]), (&1.into(), &1.into()), "{narrowed}");
    assert_eq!(narrowed["deny_reasons"], "shard_out_of_scope");
    assert_eq!((&unknown["status"], &unknown["error"]), (&404.into(), &"unknown_manifest".into()), "{unknown}");
    assert_eq!((&nope["path"], &nope["error"]), (&"(other)".into(), &"not_found".into()), "{nope}");
    assert_eq!((&metrics["method"], &metrics["path"]), (&"GET".into(), &"/metrics".into()));

    // Nothing secret anywhere: no token, DEK, KEK, wrapped DEK or manifest signature,
    // no Authorization header.
    let text = log.text();
    let mut secrets = vec![bearer.clone(), narrow.clone(), "Bearer".into(), "authorization".into()];
    secrets.extend(deks);
    let path = s.dir.join("manifest.json");
    let signed = shardlock::primitives::SignedManifest::parse(&std::fs::read(&path).unwrap(), &path).unwrap();
    secrets.extend(signed.manifest.shards.iter().map(|e| e.wrapped_dek.clone()));
    secrets.push(hex::encode(&signed.signature));
    let keyring: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.fx.path("keyring.json")).unwrap()).unwrap();
    secrets.extend(keyring["keys"].as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap().to_owned()));
    assert!(secrets.len() > 10);
    for secret in &secrets {
        assert!(!text.to_ascii_lowercase().contains(&secret.to_ascii_lowercase()), "{secret:?} is in the log:\n{text}");
    }
}
