//! The token fuzz target's harness (`cargo fuzz run token`): token parsing and
//! authorization, structure-aware so that the fuzzer gets past the signature check.
//!
//! The input's first byte picks a mode:
//! - raw: the rest is token text, parsed and verified under a fixed trust anchor (every
//!   garbage input must be denied, never panic);
//! - structured: the input drives a [`TokenSpec`], an optional [`Attenuation`], an
//!   optional block of arbitrary Datalog text (what an attacker holding the token can
//!   append) and one request. The token is issued with the fixed issuer key, encoded,
//!   parsed back and authorized at a fixed clock, and an allowed request must satisfy
//!   everything the issuer and the attenuation asked for: appended blocks only narrow.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use biscuit_auth::builder::BlockBuilder;

use super::{Attenuation, Authorizer, AuthorizerConfig, Operation, ShardSet, Token, TokenSpec};
use crate::keys::{IssuerKey, TrustAnchor};

struct Keys {
    issuer: IssuerKey,
    trust: TrustAnchor,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        // Structured inputs replay with any key; raw inputs never verify under it.
        let issuer = IssuerKey::generate().expect("issuer key");
        let trust = issuer.trust_anchor();
        Keys { issuer, trust }
    })
}

/// Reads fuzz input a field at a time; past the end everything is zero.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn rest(&mut self) -> &[u8] {
        std::mem::take(&mut self.0)
    }
}

const DATASETS: [&str; 3] = ["ds", "ds2", "a.b:c/d-e_f"];
const T0: u64 = 1_800_000_000;
const SKEW: Duration = Duration::from_secs(30);

fn at(offset: i64) -> SystemTime {
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
    if offset >= 0 {
        base + Duration::from_secs(offset as u64)
    } else {
        base - Duration::from_secs(offset.unsigned_abs())
    }
}

fn shard_set(c: &mut Cursor<'_>) -> ShardSet {
    let n = c.u8() % 4;
    if n == 0 {
        return ShardSet::All;
    }
    let ranges = (0..n)
        .map(|_| {
            let a = u32::from(c.u8() % 16);
            (a, a + u32::from(c.u8() % 8))
        })
        .collect();
    ShardSet::Ranges(ranges)
}

fn ops(c: &mut Cursor<'_>) -> Vec<Operation> {
    match c.u8() % 3 {
        0 => vec![Operation::Read],
        1 => vec![Operation::Verify],
        _ => vec![Operation::Read, Operation::Verify],
    }
}

/// The harness; see the module documentation.
pub(crate) fn token(data: &[u8]) {
    let k = keys();
    let mut c = Cursor(data);
    if c.u8() % 4 == 0 {
        let text = String::from_utf8_lossy(c.rest());
        if let Ok(t) = Token::from_base64(&text, &k.trust) {
            // Only tokens signed by the fixed issuer verify; authorize one request.
            let cfg = AuthorizerConfig { clock: Arc::new(|| at(0)), ..Default::default() };
            if let Ok(a) = Authorizer::new(&k.trust, Some(t), cfg) {
                let _ = a.authorize("ds", 0, Operation::Read, 1);
            }
        }
        return;
    }
    let spec = TokenSpec {
        dataset: DATASETS[usize::from(c.u8()) % DATASETS.len()].into(),
        principal: "fuzz".into(),
        shards: shard_set(&mut c),
        ops: ops(&mut c),
        expires: at(i64::from(c.u8() as i8) * 20),
        not_before: Some(at(i64::from(c.u8() as i8) * 20)),
        min_generation: (c.u8() % 2 == 1).then(|| u64::from(c.u8() % 8)),
    };
    let Ok(mut token) = Token::issue(&k.issuer, &spec) else { return };
    let flags = c.u8();
    let narrow = Attenuation {
        shards: (flags & 1 != 0).then(|| shard_set(&mut c)),
        ops: (flags & 2 != 0).then(|| ops(&mut c)),
        expires: (flags & 4 != 0).then(|| at(i64::from(c.u8() as i8) * 20)),
        min_generation: (flags & 8 != 0).then(|| u64::from(c.u8() % 8)),
    };
    if !narrow.is_empty() {
        match token.attenuate(&narrow) {
            Ok(t) => token = t,
            Err(_) => return,
        }
    }
    let dataset = DATASETS[usize::from(c.u8()) % DATASETS.len()];
    let shard = u32::from(c.u8() % 32);
    let op = if c.u8() % 2 == 0 { Operation::Read } else { Operation::Verify };
    let generation = u64::from(c.u8() % 10);
    let now = at(i64::from(c.u8() as i8) * 20);
    // Whatever is left is Datalog an attacker appends (facts, rules, checks, policies).
    if flags & 16 != 0 {
        let code = String::from_utf8_lossy(c.rest()).into_owned();
        if let Ok(block) = BlockBuilder::new().code(code.as_str()) {
            match token.biscuit.append(block) {
                Ok(b) => token = Token { biscuit: b, anchor: token.anchor },
                Err(_) => return,
            }
        }
    }
    let Ok(text) = token.to_base64() else { return };
    let parsed = Token::from_base64(&text, &k.trust).expect("a token just issued must verify");
    let cfg = AuthorizerConfig { clock: Arc::new(move || now), skew: SKEW, ..Default::default() };
    let Ok(a) = Authorizer::new(&k.trust, Some(parsed), cfg) else { return };
    if a.authorize(dataset, shard, op, generation).is_ok() {
        assert_eq!(dataset, spec.dataset, "allowed another dataset");
        assert!(spec.shards.contains(shard), "allowed shard {shard} outside {:?}", spec.shards);
        assert!(spec.ops.contains(&op), "allowed {op:?} outside {:?}", spec.ops);
        assert!(now < spec.expires + SKEW, "allowed after expiry");
        assert!(now + SKEW >= spec.not_before.unwrap_or(now), "allowed before not_before");
        assert!(generation >= spec.min_generation.unwrap_or(0), "allowed a stale generation");
        if let Some(s) = &narrow.shards {
            assert!(s.contains(shard), "attenuation to {s:?} widened to {shard}");
        }
        if let Some(o) = &narrow.ops {
            assert!(o.contains(&op), "attenuation to {o:?} widened to {op:?}");
        }
        if let Some(e) = narrow.expires {
            // Biscuit dates have one-second resolution.
            assert!(now < e + Duration::from_secs(1), "attenuated expiry not enforced");
        }
        assert!(generation >= narrow.min_generation.unwrap_or(0), "attenuated generation not enforced");
    }
}
