//! Biscuit access tokens rooted in the data owner's issuer key.
//!
//! Authority block (written by the issuer):
//! ```text
//! allowed_dataset("ds");  principal("alice");
//! allowed_op("read");  allowed_op("verify");
//! allowed_shards(0, 3);  allowed_shards(7, 7);      // inclusive ranges
//! expires(2026-11-26T10:00:00Z);  not_before(2026-11-26T08:00:00Z);
//! ```
//! Attenuation blocks add *checks* only (facts of later blocks are not trusted by the
//! authorizer, so a block cannot widen anything):
//! ```text
//! check if shard($s), $s >= 0, $s <= 1 or shard($s), $s >= 5, $s <= 5;
//! check if operation($op), ["read"].contains($op);
//! check if time($t), $t < 2026-11-26T09:00:00Z;
//! check if generation($g), $g >= 4;
//! ```
//! The generation check (security review finding 2) may also stand in the authority
//! block when the issuer sets [`TokenSpec::min_generation`]: the authorizer asserts
//! `generation(G)` from the verified manifest, so a token can refuse an older pack of
//! the same dataset id (one from before poisoned or personal data was removed).

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use biscuit_auth::builder::{self as bb, BlockBuilder};
use biscuit_auth::{Biscuit, KeyPair, PrivateKey, PublicKey, UnverifiedBiscuit};
use zeroize::Zeroizing;

use super::{DenyReason, Operation};
use crate::error::{Error, Result};
use crate::keys::{IssuerKey, TrustAnchor};

/// A set of shard indexes: inclusive ranges, or all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardSet {
    /// Every shard.
    All,
    /// Inclusive ranges.
    Ranges(Vec<(u32, u32)>),
}

impl ShardSet {
    /// Parses "all" or a list like "0-3,7,10-12".
    pub fn parse(spec: &str) -> Result<Self> {
        let spec = spec.trim();
        if spec.eq_ignore_ascii_case("all") || spec == "*" {
            return Ok(Self::All);
        }
        let bad = || Error::InvalidArgument(format!("shard set {spec:?}: use \"all\" or a list like 0-3,7,10-12"));
        let mut ranges = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?),
                None => {
                    let v: u32 = part.parse().map_err(|_| bad())?;
                    (v, v)
                }
            };
            if a > b {
                return Err(bad());
            }
            ranges.push((a, b));
        }
        if ranges.is_empty() {
            return Err(bad());
        }
        Ok(Self::Ranges(ranges))
    }

    /// True if `shard` is in the set.
    pub fn contains(&self, shard: u32) -> bool {
        match self {
            Self::All => true,
            Self::Ranges(r) => r.iter().any(|&(a, b)| a <= shard && shard <= b),
        }
    }

    fn ranges(&self) -> Vec<(u32, u32)> {
        match self {
            Self::All => vec![(0, u32::MAX)],
            Self::Ranges(r) => r.clone(),
        }
    }
}

/// What the issuer grants.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    /// Dataset id.
    pub dataset: String,
    /// Who the token is for (recorded in the audit log).
    pub principal: String,
    /// Shards covered.
    pub shards: ShardSet,
    /// Operations granted.
    pub ops: Vec<Operation>,
    /// Validity end.
    pub expires: SystemTime,
    /// Validity start; `None` means the time of issue.
    pub not_before: Option<SystemTime>,
    /// Refuse datasets whose manifest generation is below this (`None`: any).
    pub min_generation: Option<u64>,
}

/// How [`Token::attenuate`] narrows a token; each `Some` adds one check.
#[derive(Clone, Debug, Default)]
pub struct Attenuation {
    /// Keep only these shards.
    pub shards: Option<ShardSet>,
    /// Keep only these operations.
    pub ops: Option<Vec<Operation>>,
    /// Expire at this time (or earlier, if the token already does).
    pub expires: Option<SystemTime>,
    /// Refuse datasets whose manifest generation is below this.
    pub min_generation: Option<u64>,
}

impl Attenuation {
    /// True if nothing would be narrowed.
    pub fn is_empty(&self) -> bool {
        self.shards.is_none() && self.ops.is_none() && self.expires.is_none() && self.min_generation.is_none()
    }
}

/// The check both the issuer and an attenuation write for a minimum generation;
/// [`crate::Authorizer`] classifies a failure of it as `DenyReason::StaleGeneration`.
pub(super) const GENERATION_CHECK: &str = "check if generation($g), $g >= ";

fn generation_check(min: u64) -> Result<String> {
    // Biscuit integers are i64; a manifest generation never comes near that.
    let min = i64::try_from(min)
        .map_err(|_| Error::InvalidArgument(format!("minimum generation {min} is larger than {}", i64::MAX)))?;
    Ok(format!("{GENERATION_CHECK}{min}"))
}

/// A verified token: its signature chain checked against the trust anchor.
#[derive(Clone)]
pub struct Token {
    pub(super) biscuit: Biscuit,
    /// The issuer key the signature chain was verified against (or issued with).
    pub(super) anchor: TrustAnchor,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(blocks: {}, id: {})", self.biscuit.block_count(), self.revocation_id())
    }
}

pub(super) fn biscuit_public(trust: &TrustAnchor) -> Result<PublicKey> {
    PublicKey::from_bytes(trust.public_bytes(), bb::Algorithm::Ed25519).map_err(|_| Error::Crypto("Ed25519 public key"))
}

fn invalid(detail: impl Into<String>) -> Error {
    Error::AccessDenied {
        dataset: None,
        shard: None,
        operation: None,
        reason: DenyReason::InvalidToken,
        rule: detail.into(),
    }
}

fn lang(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("token: {e}"))
}

impl Token {
    /// Issues a token with the issuer's key.
    pub fn issue(issuer: &IssuerKey, spec: &TokenSpec) -> Result<Self> {
        crate::format::header::validate_dataset_id(&spec.dataset).map_err(Error::InvalidArgument)?;
        if spec.principal.is_empty() || spec.ops.is_empty() {
            return Err(Error::InvalidArgument("a token needs a principal and at least one operation".into()));
        }
        let private =
            PrivateKey::from_bytes(issuer.seed(), bb::Algorithm::Ed25519).map_err(|_| Error::Crypto("Ed25519 seed"))?;
        let root = KeyPair::from(&private);
        let mut b = Biscuit::builder()
            .fact(bb::fact("allowed_dataset", &[bb::string(&spec.dataset)]))
            .and_then(|b| b.fact(bb::fact("principal", &[bb::string(&spec.principal)])))
            .and_then(|b| b.fact(bb::fact("expires", &[bb::date(&spec.expires)])))
            .map_err(lang)?;
        for op in &spec.ops {
            b = b.fact(bb::fact("allowed_op", &[bb::string(op.name())])).map_err(lang)?;
        }
        for (lo, hi) in spec.shards.ranges() {
            b = b.fact(bb::fact("allowed_shards", &[bb::int(lo.into()), bb::int(hi.into())])).map_err(lang)?;
        }
        let nbf = spec.not_before.unwrap_or_else(SystemTime::now);
        b = b.fact(bb::fact("not_before", &[bb::date(&nbf)])).map_err(lang)?;
        if let Some(min) = spec.min_generation {
            b = b.check(generation_check(min)?.as_str()).map_err(lang)?;
        }
        let biscuit = b.build(&root).map_err(lang)?;
        Ok(Self { biscuit, anchor: issuer.trust_anchor() })
    }

    /// Parses and verifies a base64 token against the trust anchor. Garbage, a
    /// truncated token, a removed block, a forged signature or another issuer's key
    /// all give `AccessDenied { reason: InvalidToken }`.
    pub fn from_base64(text: &str, trust: &TrustAnchor) -> Result<Self> {
        if text.len() > 64 * 1024 {
            return Err(invalid("token larger than 64 KiB"));
        }
        let root = biscuit_public(trust)?;
        let biscuit = Biscuit::from_base64(text.trim(), root)
            .map_err(|e| invalid(format!("token does not verify under trust anchor {} ({e})", trust.key_id())))?;
        Ok(Self { biscuit, anchor: *trust })
    }

    /// Loads a token file.
    pub fn load(path: &Path, trust: &TrustAnchor) -> Result<Self> {
        let text = read_token_file(path)?;
        Self::from_base64(std::str::from_utf8(&text).unwrap_or_default(), trust)
    }

    /// The base64 encoding (a bearer secret: never log it).
    pub fn to_base64(&self) -> Result<Zeroizing<String>> {
        self.biscuit.to_base64().map(Zeroizing::new).map_err(|_| Error::Internal("token serialisation failed".into()))
    }

    /// Writes the token to `path` with mode 0600 (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut text = self.to_base64()?;
        text.push('\n');
        crate::fs::write_atomic(path, text.as_bytes(), 0o600)
    }

    /// A narrower token: only some shards, only some operations, expiring sooner
    /// and/or refusing older generations of the dataset ([`Attenuation`]). Needs no
    /// key. Each field adds a check; none can widen the token.
    pub fn attenuate(&self, narrow: &Attenuation) -> Result<Self> {
        if narrow.is_empty() {
            return Err(Error::InvalidArgument(
                "nothing to narrow: give shards, operations, an expiry and/or a minimum generation".into(),
            ));
        }
        let mut block = BlockBuilder::new();
        if let Some(ShardSet::Ranges(r)) = &narrow.shards {
            let body: Vec<String> = r.iter().map(|(a, b)| format!("shard($s), $s >= {a}, $s <= {b}")).collect();
            block = block.check(format!("check if {}", body.join(" or ")).as_str()).map_err(lang)?;
        }
        if let Some(ops) = &narrow.ops {
            let list: Vec<String> = ops.iter().map(|o| format!("\"{}\"", o.name())).collect();
            block = block
                .check(format!("check if operation($op), [{}].contains($op)", list.join(", ")).as_str())
                .map_err(lang)?;
        }
        if let Some(exp) = narrow.expires {
            let mut params = HashMap::new();
            params.insert("exp".to_owned(), bb::date(&exp));
            block = block.code_with_params("check if time($t), $t < {exp};", params, HashMap::new()).map_err(lang)?;
        }
        if let Some(min) = narrow.min_generation {
            block = block.check(generation_check(min)?.as_str()).map_err(lang)?;
        }
        let biscuit = self.biscuit.append(block).map_err(lang)?;
        Ok(Self { biscuit, anchor: self.anchor })
    }

    /// Revocation id of the last block: revoking it revokes this token and every
    /// token attenuated from it (the root's id revokes all of them).
    pub fn revocation_id(&self) -> String {
        self.biscuit.revocation_identifiers().last().map(hex::encode).unwrap_or_default()
    }

    /// All revocation ids, authority block first.
    pub fn revocation_ids(&self) -> Vec<String> {
        self.biscuit.revocation_identifiers().iter().map(hex::encode).collect()
    }

    /// The Datalog source of every block (no secrets), for `token inspect`.
    pub fn blocks(&self) -> Vec<String> {
        describe_blocks(self.biscuit.block_count(), |i| self.biscuit.print_block_source(i).ok())
    }
}

fn describe_blocks(n: usize, src: impl Fn(usize) -> Option<String>) -> Vec<String> {
    (0..n).map(|i| src(i).unwrap_or_else(|| "<unreadable block>".into())).collect()
}

/// Reads a token file without verifying it (for `token inspect` without a trust
/// anchor): block sources and revocation ids.
pub fn inspect_unverified(path: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let text = read_token_file(path)?;
    let u = UnverifiedBiscuit::from_base64(std::str::from_utf8(&text).unwrap_or_default().trim())
        .map_err(|e| invalid(format!("{}: not a token ({e})", path.display())))?;
    let blocks = describe_blocks(u.block_count(), |i| u.print_block_source(i).ok());
    let ids = u.revocation_identifiers().iter().map(hex::encode).collect();
    Ok((blocks, ids))
}

fn read_token_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let text = Zeroizing::new(std::fs::read(path).map_err(Error::io("read token", path))?);
    if text.len() > 64 * 1024 {
        return Err(invalid(format!("{}: token file larger than 64 KiB", path.display())));
    }
    Ok(text)
}
