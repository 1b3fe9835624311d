//! Zero-trust access: every shard open authorizes a signed token for
//! (dataset, shard, operation, now) *before* the shard's DEK is unwrapped, and every
//! decision is recorded in the audit log.
//!
//! The only way to obtain a [`crate::keys::Dek`] for an existing shard is
//! [`crate::keys::KeyProvider::unwrap_dek`], which takes a [`Grant`] by value; a
//! `Grant` is made only by [`Access`] after a passing authorization (or from the data
//! owner's issuer key, for rotation) and names exactly one shard's wrapped DEK. The type system, not a convention, keeps DEKs
//! behind authorization.

mod access;
mod authorizer;
mod revocation;
mod token;

pub use access::Access;
pub use authorizer::{Authorizer, AuthorizerConfig, Clock};
pub use revocation::DenyList;
pub use token::{inspect_unverified, max_time, parse_time, parse_ttl, time_after, ShardSet, Token, TokenSpec};

use std::fmt;

use crate::error::{Error, Result};

/// What a reader wants to do with a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Stream records (training).
    Read,
    /// Authenticate every chunk without releasing plaintext (`shardlock verify`).
    Verify,
}

impl Operation {
    /// The name used in tokens and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Verify => "verify",
        }
    }

    /// Parses "read" / "verify".
    pub fn from_name(s: &str) -> Result<Self> {
        match s.trim() {
            "read" => Ok(Operation::Read),
            "verify" => Ok(Operation::Verify),
            o => Err(Error::InvalidArgument(format!("unknown operation {o:?} (read, verify)"))),
        }
    }

    /// Parses a comma-separated list ("read,verify").
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        let mut v: Vec<Self> =
            s.split(',').filter(|p| !p.trim().is_empty()).map(Self::from_name).collect::<Result<_>>()?;
        v.dedup();
        if v.is_empty() {
            return Err(Error::InvalidArgument("no operation given".into()));
        }
        Ok(v)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why access was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DenyReason {
    /// No token was given.
    MissingToken,
    /// The token does not parse or its signature chain does not verify under the
    /// trusted issuer key (forged, from another issuer, truncated, a block removed).
    InvalidToken,
    /// The token is for another dataset.
    WrongDataset,
    /// The shard is outside the token's shard set (or an attenuation narrowed it out).
    ShardOutOfScope,
    /// The operation is not granted.
    OperationNotGranted,
    /// The token (or an attenuation of it) has expired.
    TokenExpired,
    /// The token is not valid yet.
    NotYetValid,
    /// One of the token's revocation ids is on the deny list.
    Revoked,
    /// Another check of an attenuation block failed.
    AttenuationCheck,
}

impl DenyReason {
    /// Stable snake_case name, used in the audit log and in Python.
    pub fn name(self) -> &'static str {
        match self {
            DenyReason::MissingToken => "missing_token",
            DenyReason::InvalidToken => "invalid_token",
            DenyReason::WrongDataset => "wrong_dataset",
            DenyReason::ShardOutOfScope => "shard_out_of_scope",
            DenyReason::OperationNotGranted => "operation_not_granted",
            DenyReason::TokenExpired => "token_expired",
            DenyReason::NotYetValid => "not_yet_valid",
            DenyReason::Revoked => "revoked",
            DenyReason::AttenuationCheck => "attenuation_check",
        }
    }

    /// What the user can do about it.
    pub fn hint(self) -> &'static str {
        match self {
            DenyReason::MissingToken => "pass a token (--token FILE / token=...) issued by the data owner",
            DenyReason::InvalidToken => "the token is corrupt, truncated, or not signed by the issuer key given as the trust anchor; ask the data owner for a new one",
            DenyReason::WrongDataset => "this token is for another dataset; ask for a token for this one",
            DenyReason::ShardOutOfScope => "this token does not cover this shard; ask for a token with a wider shard set",
            DenyReason::OperationNotGranted => "this token does not grant this operation; ask for one that does (--ops)",
            DenyReason::TokenExpired => "the token has expired; ask the data owner for a fresh one",
            DenyReason::NotYetValid => "the token is not valid yet; check the clock, or wait until its not-before time",
            DenyReason::Revoked => "the token was revoked; ask the data owner for a new one",
            DenyReason::AttenuationCheck => "a check added when the token was attenuated does not hold",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Proof that an authorization for one (dataset, shard, operation) passed, bound to
/// that shard's wrapped DEK from the verified manifest. It cannot be constructed
/// outside this crate, cannot be cloned, and is consumed by
/// [`crate::keys::KeyProvider::unwrap_dek`], which can only unwrap the key it names.
#[derive(Debug)]
pub struct Grant {
    dataset: String,
    shard: u32,
    op: Option<Operation>,
    kek_id: String,
    wrapped: Vec<u8>,
}

impl Grant {
    /// Built by [`Access`] after a passing authorization, from the verified manifest.
    pub(crate) fn for_entry(dataset: &str, entry: &crate::format::ShardEntry, op: Option<Operation>) -> Result<Self> {
        let wrapped = hex::decode(&entry.wrapped_dek).map_err(|_| Error::KeyUnavailable {
            key_id: entry.kek_id.clone(),
            detail: format!("dataset {dataset:?} shard {}: wrapped DEK in the manifest is not hex", entry.index),
        })?;
        Ok(Self { dataset: dataset.to_owned(), shard: entry.index, op, kek_id: entry.kek_id.clone(), wrapped })
    }

    /// A grant for the data owner rotating keys: proven by holding the issuer key
    /// whose public key verified the manifest.
    pub(crate) fn owner(issuer: &crate::keys::IssuerKey, ds: &crate::dataset::Dataset, shard: u32) -> Result<Self> {
        if issuer.trust_anchor() != *ds.trust_anchor() {
            return Err(Error::InvalidArgument(format!(
                "issuer key {} did not sign this manifest (signed by {})",
                issuer.trust_anchor().key_id(),
                ds.manifest().issuer_key_id
            )));
        }
        Self::for_entry(&ds.manifest().dataset_id, ds.shard_entry(shard)?, None)
    }

    /// Dataset the grant covers.
    pub fn dataset(&self) -> &str {
        &self.dataset
    }

    /// Shard the grant covers.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// Operation granted (`None` for the owner's rotation grant).
    pub fn operation(&self) -> Option<Operation> {
        self.op
    }

    /// Id of the KEK the granted DEK is wrapped under.
    pub fn kek_id(&self) -> &str {
        &self.kek_id
    }

    /// The granted wrapped DEK.
    pub fn wrapped_dek(&self) -> &[u8] {
        &self.wrapped
    }
}
