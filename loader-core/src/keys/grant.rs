//! [`Grant`]: the proof of a passing authorization that a [`super::KeyProvider`]
//! requires to unwrap a DEK.
//!
//! The only way to obtain a [`super::Dek`] for an existing shard is
//! [`super::KeyProvider::unwrap_dek`], which takes a `Grant` by value. A `Grant` is made
//! only inside this crate, by [`crate::access::Access`] after a passing authorization
//! (or by `rotate` from the data owner's issuer key), and names exactly one shard's
//! wrapped DEK from the verified manifest: the type system, not a convention, keeps DEKs
//! behind authorization.

use crate::error::{Error, Operation, Result};
use crate::format::ShardEntry;

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
    shard_id: String,
    issuer: String,
}

impl Grant {
    /// Built by [`crate::access::Access`] after a passing authorization (or by
    /// `rotate` for the holder of the issuer key), from the verified manifest.
    pub(crate) fn for_entry(dataset: &str, issuer: &str, entry: &ShardEntry, op: Option<Operation>) -> Result<Self> {
        let wrapped = hex::decode(&entry.wrapped_dek).map_err(|_| Error::KeyUnavailable {
            key_id: entry.kek_id.clone(),
            detail: format!("dataset {dataset:?} shard {}: wrapped DEK in the manifest is not hex", entry.index),
        })?;
        Ok(Self {
            dataset: dataset.to_owned(),
            shard: entry.index,
            op,
            kek_id: entry.kek_id.clone(),
            wrapped,
            shard_id: entry.id.clone(),
            issuer: issuer.to_owned(),
        })
    }

    /// What the wrap of this DEK was bound to (custody that binds wraps checks it).
    pub fn context(&self) -> super::WrapContext<'_> {
        super::WrapContext { dataset: &self.dataset, shard: self.shard, shard_id: &self.shard_id, issuer: &self.issuer }
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
