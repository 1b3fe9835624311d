//! The denial matrix of the zero-trust issue: every bad token is denied with a typed
//! reason naming the failing rule, audited, and no DEK is unwrapped.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::Fixture;
use shardlock::{verify_log, AuditLog};
use shardlock::{
    Access, Attenuation, Authorizer, AuthorizerConfig, DenyList, Grant, Operation, ShardSet, Token, TokenSpec,
};
use shardlock::{Dek, KeyProvider};
use shardlock::{DenyReason, Error};

/// Counts unwraps, so a test can prove none happened for a denied shard.
struct Counting {
    inner: Arc<shardlock::Keyring>,
    unwraps: AtomicUsize,
}

impl KeyProvider for Counting {
    fn describe(&self) -> String {
        "counting".into()
    }
    fn active_kek_id(&self) -> &str {
        self.inner.active_kek_id()
    }
    fn wrap_dek(&self, dek: &Dek) -> shardlock::Result<(String, Vec<u8>)> {
        self.inner.wrap_dek(dek)
    }
    fn unwrap_dek(&self, grant: Grant) -> shardlock::Result<Dek> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.inner.unwrap_dek(grant)
    }
}

struct Setup {
    fx: Fixture,
    ds: shardlock::Dataset,
    keys: Arc<Counting>,
    log: std::path::PathBuf,
}

fn setup() -> Setup {
    let fx = Fixture::new();
    let (dir, _) = fx.standard("ds", "ds1", 12); // 3 shards
    let ds = fx.open(&dir).unwrap();
    let keys = Arc::new(Counting { inner: fx.keyring.clone(), unwraps: AtomicUsize::new(0) });
    let log = fx.path("audit.jsonl");
    Setup { fx, ds, keys, log }
}

fn spec(dataset: &str, shards: ShardSet, ops: Vec<Operation>, expires_in: i64) -> TokenSpec {
    let now = SystemTime::now();
    let expires = if expires_in >= 0 {
        now + Duration::from_secs(expires_in as u64)
    } else {
        now - Duration::from_secs((-expires_in) as u64)
    };
    TokenSpec {
        dataset: dataset.into(),
        principal: "alice".into(),
        shards,
        ops,
        expires,
        not_before: None,
        min_generation: None,
    }
}

impl Setup {
    fn access(&self, token: Option<Token>, cfg: AuthorizerConfig) -> Access {
        let a = Authorizer::new(&self.fx.trust, token, cfg).unwrap();
        Access::new(a, self.keys.clone()).with_audit(Arc::new(AuditLog::open(&self.log).unwrap()))
    }

    fn token(&self, s: &TokenSpec) -> Token {
        Token::issue(&self.fx.issuer, s).unwrap()
    }

    /// Opening `shard` for `op` is denied with `reason`; nothing is unwrapped and the
    /// denial is in the audit log with the rule.
    fn denied(&self, access: &Access, shard: u32, op: Operation, reason: DenyReason) -> String {
        let before = self.keys.unwraps.load(Ordering::SeqCst);
        let msg = match op {
            Operation::Read => {
                let e = access.open_shard(&self.ds, shard).err().expect("access should be denied");
                match &e {
                    Error::AccessDenied { reason: r, shard: s, dataset, rule, .. } => {
                        assert_eq!(*r, reason, "{e}");
                        assert_eq!(*s, Some(shard));
                        assert_eq!(dataset.as_deref(), Some("ds1"));
                        assert!(!rule.is_empty());
                    }
                    other => panic!("expected AccessDenied({reason:?}), got {other}"),
                }
                e.to_string()
            }
            Operation::Verify => {
                // Verify reports per shard; only `shard` is checked here.
                let r =
                    shardlock::verify(self.ds.dir(), &self.fx.trust, access, &Default::default(), &mut |_| {}).unwrap();
                let rep = &r.shards[shard as usize];
                assert_eq!(rep.failure.as_deref(), Some(reason.name()), "{rep:?}");
                let msg = rep.error.clone().unwrap_or_default();
                let log = std::fs::read_to_string(&self.log).unwrap();
                assert!(
                    log.contains(&format!(
                        "\"shard\":{shard},\"operation\":\"verify\",\"decision\":\"deny\",\"reason\":\"{}\"",
                        reason.name()
                    )),
                    "{log}"
                );
                return msg;
            }
        };
        assert_eq!(self.keys.unwraps.load(Ordering::SeqCst), before, "a DEK was unwrapped for a denied shard");
        let log = std::fs::read_to_string(&self.log).unwrap();
        let last = log.lines().last().unwrap();
        assert!(
            last.contains("\"decision\":\"deny\"") && last.contains(&format!("\"reason\":\"{}\"", reason.name())),
            "{last}"
        );
        msg
    }
}

#[test]
fn a_valid_token_opens_every_shard_and_is_audited() {
    let s = setup();
    let access =
        s.access(Some(s.token(&spec("ds1", ShardSet::All, vec![Operation::Read], 3600))), AuthorizerConfig::default());
    for i in 0..3 {
        let mut r = access.open_shard(&s.ds, i).unwrap();
        assert_eq!(r.read_record(0).unwrap().len(), 2);
    }
    assert_eq!(s.keys.unwraps.load(Ordering::SeqCst), 3);
    let summary = verify_log(&s.log).unwrap();
    assert_eq!(summary.records, 6); // authorize + key_release per shard
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(log.contains("\"principal\":\"alice\"") && log.contains("\"event\":\"key_release\""));
}

#[test]
fn missing_token_is_denied() {
    let s = setup();
    s.denied(&s.access(None, AuthorizerConfig::default()), 0, Operation::Read, DenyReason::MissingToken);
}

#[test]
fn wrong_dataset_shard_and_operation_are_denied() {
    let s = setup();
    let other =
        s.access(Some(s.token(&spec("ds2", ShardSet::All, vec![Operation::Read], 3600))), AuthorizerConfig::default());
    s.denied(&other, 0, Operation::Read, DenyReason::WrongDataset);
    let narrow = s.access(
        Some(s.token(&spec("ds1", ShardSet::parse("0,2").unwrap(), vec![Operation::Read], 3600))),
        AuthorizerConfig::default(),
    );
    assert!(narrow.open_shard(&s.ds, 0).is_ok());
    let msg = s.denied(&narrow, 1, Operation::Read, DenyReason::ShardOutOfScope);
    assert!(msg.contains("allowed_shards"), "the message names the rule: {msg}");
    s.denied(&narrow, 0, Operation::Verify, DenyReason::OperationNotGranted);
}

#[test]
fn expired_and_not_yet_valid_tokens_are_denied_with_explicit_skew() {
    let s = setup();
    let expired = s.token(&spec("ds1", ShardSet::All, vec![Operation::Read], -10));
    // 10 s past expiry: allowed under the default 30 s skew, denied with none.
    assert!(s.access(Some(expired.clone()), AuthorizerConfig::default()).open_shard(&s.ds, 0).is_ok());
    let strict = AuthorizerConfig { skew: Duration::ZERO, ..Default::default() };
    s.denied(&s.access(Some(expired), strict.clone()), 0, Operation::Read, DenyReason::TokenExpired);
    let mut future = spec("ds1", ShardSet::All, vec![Operation::Read], 7200);
    future.not_before = Some(SystemTime::now() + Duration::from_secs(3600));
    s.denied(&s.access(Some(s.token(&future)), strict), 0, Operation::Read, DenyReason::NotYetValid);
}

#[test]
fn expiry_mid_epoch_stops_at_the_next_shard_open() {
    let s = setup();
    let start = SystemTime::now();
    let now = Arc::new(Mutex::new(start));
    let clock_now = now.clone();
    let cfg = AuthorizerConfig {
        skew: Duration::ZERO,
        clock: Arc::new(move || *clock_now.lock().unwrap()),
        ..Default::default()
    };
    let mut sp = spec("ds1", ShardSet::All, vec![Operation::Read], 0);
    sp.expires = start + Duration::from_secs(60);
    sp.not_before = Some(start - Duration::from_secs(1));
    let access = s.access(Some(s.token(&sp)), cfg);
    let mut r0 = access.open_shard(&s.ds, 0).unwrap();
    *now.lock().unwrap() = start + Duration::from_secs(61);
    // A shard already open keeps serving authenticated records; the next open is denied.
    assert!(r0.read_record(3).is_ok());
    s.denied(&access, 1, Operation::Read, DenyReason::TokenExpired);
}

#[test]
fn revocation_takes_effect_at_the_next_shard_open_of_a_running_job() {
    let s = setup();
    let deny = s.fx.path("deny.txt");
    std::fs::write(&deny, "# revoked tokens\n").unwrap();
    let token = s.token(&spec("ds1", ShardSet::All, vec![Operation::Read], 3600));
    let child =
        token.attenuate(&Attenuation { shards: Some(ShardSet::parse("0-1").unwrap()), ..Default::default() }).unwrap();
    let cfg = AuthorizerConfig { deny_list: Some(deny.clone()), ..Default::default() };
    let access = s.access(Some(child.clone()), cfg.clone());
    assert!(access.open_shard(&s.ds, 0).is_ok());
    // Revoking the parent revokes the attenuated child too (shared first block id).
    DenyList::append(&deny, &token.revocation_id(), "test").unwrap();
    let msg = s.denied(&access, 1, Operation::Read, DenyReason::Revoked);
    assert!(msg.contains(&token.revocation_id()));
    // Revoking a child leaves its parent usable.
    std::fs::write(&deny, format!("{}\n", child.revocation_id())).unwrap();
    assert!(s.access(Some(token), cfg.clone()).open_shard(&s.ds, 2).is_ok());
    s.denied(&s.access(Some(child), cfg), 0, Operation::Read, DenyReason::Revoked);
}

#[test]
fn attenuation_narrows_and_never_widens() {
    let s = setup();
    let token = s.token(&spec("ds1", ShardSet::parse("0-1").unwrap(), vec![Operation::Read], 3600));
    let narrow = token
        .attenuate(&Attenuation {
            shards: Some(ShardSet::parse("1").unwrap()),
            ops: Some(vec![Operation::Read]),
            ..Default::default()
        })
        .unwrap();
    let a = s.access(Some(narrow), AuthorizerConfig::default());
    assert!(a.open_shard(&s.ds, 1).is_ok());
    s.denied(&a, 0, Operation::Read, DenyReason::ShardOutOfScope);
    // An attenuated expiry is enforced without skew.
    let soon = token
        .attenuate(&Attenuation { expires: Some(SystemTime::now() - Duration::from_secs(1)), ..Default::default() })
        .unwrap();
    s.denied(&s.access(Some(soon), AuthorizerConfig::default()), 0, Operation::Read, DenyReason::TokenExpired);
    // Attempted widening: a block that asserts more shards, another dataset and the
    // verify operation. Facts of non-authority blocks are not trusted: still denied.
    let b64 = token.to_base64().unwrap();
    let root =
        biscuit_auth::PublicKey::from_bytes(s.fx.trust.public_bytes(), biscuit_auth::builder::Algorithm::Ed25519)
            .unwrap();
    let parsed = biscuit_auth::Biscuit::from_base64(b64.as_str(), root).unwrap();
    let widen = biscuit_auth::builder::BlockBuilder::new()
        .code(r#"allowed_shards(0, 100); allowed_op("verify"); allowed_dataset("ds2");"#)
        .unwrap();
    let widened = Token::from_base64(&parsed.append(widen).unwrap().to_base64().unwrap(), &s.fx.trust).unwrap();
    let a = s.access(Some(widened), AuthorizerConfig::default());
    assert!(a.open_shard(&s.ds, 0).is_ok());
    s.denied(&a, 2, Operation::Read, DenyReason::ShardOutOfScope);
    s.denied(&a, 0, Operation::Verify, DenyReason::OperationNotGranted);
}

fn token_file(s: &Setup, name: &str, content: &[u8]) -> std::path::PathBuf {
    let p = s.fx.path(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn from_file(s: &Setup, p: &Path) -> Access {
    let a = Authorizer::from_file(&s.fx.trust, Some(p), AuthorizerConfig::default()).unwrap();
    Access::new(a, s.keys.clone()).with_audit(Arc::new(AuditLog::open(&s.log).unwrap()))
}

#[test]
fn forged_foreign_truncated_garbage_and_block_removed_tokens_are_invalid() {
    let s = setup();
    let token = s.token(&spec("ds1", ShardSet::All, vec![Operation::Read], 3600));
    let b64 = token.to_base64().unwrap().to_string();
    let raw = biscuit_auth::Biscuit::from_base64(&b64, |_| {
        biscuit_auth::PublicKey::from_bytes(s.fx.trust.public_bytes(), biscuit_auth::builder::Algorithm::Ed25519)
    })
    .unwrap()
    .to_vec()
    .unwrap();
    // Forged: one byte of the signed content flipped.
    let mut forged = raw.clone();
    let mid = forged.len() / 3;
    forged[mid] ^= 0x01;
    let enc = |b: &[u8]| {
        let t = biscuit_auth::UnverifiedBiscuit::from(b);
        t.map(|u| u.to_base64().unwrap()).unwrap_or_else(|_| "AAAA".into())
    };
    let p = token_file(&s, "forged", enc(&forged).as_bytes());
    s.denied(&from_file(&s, &p), 0, Operation::Read, DenyReason::InvalidToken);
    // Another issuer's token for the same dataset.
    let stranger = shardlock::IssuerKey::generate().unwrap();
    let foreign = Token::issue(&stranger, &spec("ds1", ShardSet::All, vec![Operation::Read], 3600)).unwrap();
    let p = token_file(&s, "foreign", foreign.to_base64().unwrap().as_bytes());
    let msg = s.denied(&from_file(&s, &p), 0, Operation::Read, DenyReason::InvalidToken);
    assert!(msg.contains(&s.fx.trust.key_id()), "names the trust anchor: {msg}");
    // Truncated and garbage files.
    let p = token_file(&s, "trunc", &b64.as_bytes()[..b64.len() / 2]);
    s.denied(&from_file(&s, &p), 0, Operation::Read, DenyReason::InvalidToken);
    let p = token_file(&s, "garbage", b"not a token at all\n");
    s.denied(&from_file(&s, &p), 0, Operation::Read, DenyReason::InvalidToken);
    // An attenuated token with its attenuation block removed.
    use prost::Message;
    let child =
        token.attenuate(&Attenuation { shards: Some(ShardSet::parse("0").unwrap()), ..Default::default() }).unwrap();
    let child_raw = base64_decode_url(&child.to_base64().unwrap());
    let mut pb = biscuit_auth::format::schema::Biscuit::decode(child_raw.as_slice()).unwrap();
    assert_eq!(pb.blocks.len(), 1);
    pb.blocks.clear();
    let stripped = base64_encode_url(&pb.encode_to_vec());
    let p = token_file(&s, "stripped", stripped.as_bytes());
    s.denied(&from_file(&s, &p), 1, Operation::Read, DenyReason::InvalidToken);
    assert_eq!(s.keys.unwraps.load(Ordering::SeqCst), 0);
}

#[test]
fn a_token_from_another_anchor_or_for_verify_only_gets_no_plaintext() {
    let s = setup();
    // A token the attacker issued and verified under their own key, used against a
    // dataset verified with the real anchor.
    let mallory = shardlock::IssuerKey::generate().unwrap();
    let own = Token::issue(&mallory, &spec("ds1", ShardSet::All, vec![Operation::Read], 3600)).unwrap();
    let a = Authorizer::new(&mallory.trust_anchor(), Some(own), AuthorizerConfig::default()).unwrap();
    let access = Access::new(a, s.keys.clone());
    let e = access.open_shard(&s.ds, 0).err().unwrap();
    assert!(matches!(e, Error::AccessDenied { reason: DenyReason::InvalidToken, .. }), "{e}");
    // The same token handed to an authorizer for the real anchor is invalid too.
    let own = Token::issue(&mallory, &spec("ds1", ShardSet::All, vec![Operation::Read], 3600)).unwrap();
    s.denied(&s.access(Some(own), AuthorizerConfig::default()), 0, Operation::Read, DenyReason::InvalidToken);
    // A verify-only token authenticates every shard but cannot open one for reading.
    let verify_only = s
        .access(Some(s.token(&spec("ds1", ShardSet::All, vec![Operation::Verify], 3600))), AuthorizerConfig::default());
    assert!(shardlock::verify(s.ds.dir(), &s.fx.trust, &verify_only, &Default::default(), &mut |_| {}).unwrap().ok);
    s.denied(&verify_only, 0, Operation::Read, DenyReason::OperationNotGranted);
    assert_eq!(s.keys.unwraps.load(Ordering::SeqCst), 3, "only verify's three unwraps");
}

#[test]
fn deny_lists_fail_closed() {
    let s = setup();
    let p = s.fx.path("deny.txt");
    std::fs::write(&p, "not-an-id\n").unwrap();
    let cfg = |p: &Path| AuthorizerConfig { deny_list: Some(p.to_owned()), ..Default::default() };
    assert!(Authorizer::new(&s.fx.trust, None, cfg(&p)).err().unwrap().to_string().contains("line 1"));
    std::fs::write(&p, "").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(Authorizer::new(&s.fx.trust, None, cfg(&p)).err().unwrap().to_string().contains("writable"));
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    let token = s.token(&spec("ds1", ShardSet::All, vec![Operation::Read], 3600));
    let access = s.access(Some(token.clone()), cfg(&p));
    DenyList::append(&p, &token.revocation_id(), "x").unwrap();
    s.denied(&access, 0, Operation::Read, DenyReason::Revoked);
    // Rewriting the file without the id does not un-revoke it in a running process.
    std::fs::write(&p, "# emptied\n").unwrap();
    s.denied(&access, 1, Operation::Read, DenyReason::Revoked);
    assert!(matches!(
        Authorizer::new(&s.fx.trust, None, AuthorizerConfig { skew: Duration::from_secs(3600), ..Default::default() }),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn an_audit_log_without_a_final_newline_is_not_appended_to() {
    let s = setup();
    let token = s.token(&spec("ds1", ShardSet::All, vec![Operation::Read], 3600));
    let access = s.access(Some(token), AuthorizerConfig::default());
    access.open_shard(&s.ds, 0).unwrap();
    let mut log = std::fs::read(&s.log).unwrap();
    log.pop();
    std::fs::write(&s.log, &log).unwrap();
    assert!(matches!(access.open_shard(&s.ds, 1).err().unwrap(), Error::Audit { .. }));
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64_decode_url(s: &str) -> Vec<u8> {
    let vals: Vec<u8> =
        s.trim().trim_end_matches('=').bytes().map(|c| B64.iter().position(|&b| b == c).unwrap() as u8).collect();
    let mut out = Vec::new();
    for c in vals.chunks(4) {
        let n = c.iter().enumerate().fold(0u32, |acc, (i, &v)| acc | (u32::from(v) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..c.len()]);
    }
    out
}

fn base64_encode_url(b: &[u8]) -> String {
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = c.iter().enumerate().fold(0u32, |acc, (i, &v)| acc | (u32::from(v) << (16 - 8 * i)));
        for i in 0..=c.len() {
            s.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    while !s.len().is_multiple_of(4) {
        s.push('=');
    }
    s
}

#[test]
fn audit_log_holds_no_secrets_and_catches_edits() {
    let s = setup();
    let token = s.token(&spec("ds1", ShardSet::All, vec![Operation::Read, Operation::Verify], 3600));
    let b64 = token.to_base64().unwrap().to_string();
    let access = s.access(Some(token), AuthorizerConfig::default());
    let mut samples = Vec::new();
    for i in 0..3 {
        let mut r = access.open_shard(&s.ds, i).unwrap();
        for rec in 0..r.len() {
            samples.push(r.read_record(rec).unwrap()[0].to_vec());
        }
    }
    let report = shardlock::verify(s.ds.dir(), &s.fx.trust, &access, &Default::default(), &mut |_| {}).unwrap();
    assert!(report.ok);
    s.denied(&s.access(None, AuthorizerConfig::default()), 0, Operation::Read, DenyReason::MissingToken);

    // The DEKs, recovered independently from the keyring file and the manifest.
    let ring: serde_json::Value = serde_json::from_slice(&std::fs::read(s.fx.path("keyring.json")).unwrap()).unwrap();
    let kek = hex::decode(ring["keys"][0]["key"].as_str().unwrap()).unwrap();
    let log = std::fs::read(&s.log).unwrap();
    let text = String::from_utf8_lossy(&log).to_string();
    for e in &s.ds.manifest().shards {
        use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_256};
        let mut dek = [0u8; 40];
        let n = AesKek::new(&AES_256, &kek)
            .unwrap()
            .unwrap_with_padding(&hex::decode(&e.wrapped_dek).unwrap(), &mut dek)
            .unwrap()
            .len();
        assert_eq!(n, 32);
        assert!(!text.contains(&hex::encode(&dek[..32])), "DEK hex in the audit log");
        assert!(!log.windows(32).any(|w| w == &dek[..32]), "raw DEK in the audit log");
    }
    assert!(!text.contains(&hex::encode(&kek)));
    assert!(!text.contains(&b64[..40]), "token in the audit log");
    for sample in samples {
        assert!(!log.windows(64).any(|w| w == &sample[..64]), "plaintext in the audit log");
    }

    // The chain verifies; an edit, a deletion and a swap are each caught at the right line.
    let n = verify_log(&s.log).unwrap().records;
    assert!(n >= 10);
    let lines: Vec<&str> = text.lines().collect();
    let write = |ls: &[String]| std::fs::write(&s.log, ls.join("\n") + "\n").unwrap();
    let mut edited: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    edited[4] = edited[4].replace("\"allow\"", "\"deny\"");
    write(&edited);
    let e = verify_log(&s.log).unwrap_err();
    assert!(matches!(e, Error::Audit { line: Some(5), .. }), "{e}");
    let mut deleted: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    deleted.remove(3);
    write(&deleted);
    assert!(matches!(verify_log(&s.log).unwrap_err(), Error::Audit { line: Some(4), .. }));
    let mut swapped: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    swapped.swap(6, 7);
    write(&swapped);
    assert!(matches!(verify_log(&s.log).unwrap_err(), Error::Audit { line: Some(7), .. }));
    // Tail truncation leaves a valid shorter chain: only the head hash reveals it.
    let full_head = {
        std::fs::write(&s.log, &log).unwrap();
        verify_log(&s.log).unwrap().head
    };
    let cut: Vec<String> = lines[..lines.len() - 2].iter().map(|l| l.to_string()).collect();
    write(&cut);
    let short = verify_log(&s.log).unwrap();
    assert_eq!(short.records, n - 2);
    assert_ne!(short.head, full_head);
}

#[test]
fn an_unwritable_audit_log_fails_closed() {
    let s = setup();
    let log = AuditLog::open(&s.log).unwrap();
    std::fs::write(&s.log, b"this is not a record\n").unwrap();
    let a = Authorizer::new(
        &s.fx.trust,
        Some(s.token(&spec("ds1", ShardSet::All, vec![Operation::Read], 3600))),
        AuthorizerConfig::default(),
    )
    .unwrap();
    let access = Access::new(a, s.keys.clone()).with_audit(Arc::new(log));
    let e = access.open_shard(&s.ds, 0).err().unwrap();
    assert!(matches!(e, Error::Audit { .. }), "{e}");
    assert_eq!(s.keys.unwraps.load(Ordering::SeqCst), 0);
}

/// Security review finding 2 (token side): a token can require a minimum manifest
/// generation, written by the issuer or added by attenuation, so it no longer covers
/// an older pack of the same dataset id. Nothing is unwrapped for a stale dataset.
#[test]
fn a_token_can_require_a_minimum_generation() {
    let s = setup();
    assert_eq!(s.ds.manifest().generation, 1);
    let mut sp = spec("ds1", ShardSet::All, vec![Operation::Read], 3600);
    sp.min_generation = Some(2);
    let issued = s.token(&sp);
    let msg = s.denied(
        &s.access(Some(issued.clone()), AuthorizerConfig::default()),
        0,
        Operation::Read,
        DenyReason::StaleGeneration,
    );
    assert!(msg.contains("generation"), "{msg}");
    sp.min_generation = Some(1);
    assert!(s.access(Some(s.token(&sp)), AuthorizerConfig::default()).open_shard(&s.ds, 0).is_ok());

    // Attenuation adds the same check to a token that had none.
    let parent = s.token(&spec("ds1", ShardSet::All, vec![Operation::Read], 3600));
    let child = parent.attenuate(&Attenuation { min_generation: Some(2), ..Default::default() }).unwrap();
    assert!(child.blocks()[1].contains("generation($g), $g >= 2"), "{:?}", child.blocks());
    s.denied(
        &s.access(Some(child.clone()), AuthorizerConfig::default()),
        1,
        Operation::Read,
        DenyReason::StaleGeneration,
    );
    assert!(s.access(Some(parent), AuthorizerConfig::default()).open_shard(&s.ds, 1).is_ok());

    // The authorizer compares against the generation it is given (the verified
    // manifest's): the same tokens pass once the dataset is at generation 2.
    let a = Authorizer::new(&s.fx.trust, Some(child), AuthorizerConfig::default()).unwrap();
    assert!(a.authorize("ds1", 0, Operation::Read, 2).is_ok());
    let a = Authorizer::new(&s.fx.trust, Some(issued), AuthorizerConfig::default()).unwrap();
    assert!(a.authorize("ds1", 0, Operation::Read, 3).is_ok());
    match a.authorize("ds1", 0, Operation::Read, 1) {
        Err(Error::AccessDenied { reason: DenyReason::StaleGeneration, .. }) => {}
        other => panic!("expected StaleGeneration, got {other:?}"),
    }
    // Nothing to narrow is an argument error, not a token equal to its parent.
    assert!(matches!(s.token(&sp).attenuate(&Attenuation::default()), Err(Error::InvalidArgument(_))));
}
