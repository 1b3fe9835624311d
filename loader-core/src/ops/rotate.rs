//! `rotate`: rewrap every DEK under a new KEK and re-sign the manifest. Payloads are
//! untouched; the new manifest replaces the old one atomically. Custody that can move a
//! DEK itself ([`KeyProvider::rewrap_for`]: KMS `ReEncrypt`, Transit `rewrap`) does, so
//! the DEK is never in the clear in the rotating process; otherwise it is unwrapped
//! here and wrapped for the new custody.

use std::path::Path;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::format::Manifest;
use crate::keys::{Grant, IssuerKey, KeyProvider, Rewrap, WrapContext};

/// Rewraps every DEK of the dataset in `dir` from `old` to `new` and writes a manifest
/// of the next generation signed by `issuer`. Returns the new manifest.
pub fn rotate(dir: &Path, old: &dyn KeyProvider, new: &dyn KeyProvider, issuer: &IssuerKey) -> Result<Manifest> {
    let trust = issuer.trust_anchor();
    let ds = Dataset::open(dir, &trust)?;
    let mut m = ds.manifest().clone();
    let (dataset, issuer_id) = (m.dataset_id.clone(), m.issuer_key_id.clone());
    for e in &mut m.shards {
        let grant = owner_grant(issuer, &ds, e.index)?;
        // Inside custody when it can (KMS ReEncrypt, Transit rewrap): no DEK in the clear here.
        let (kek_id, rewrapped) = match old.rewrap_for(grant, new)? {
            Rewrap::Done(kek_id, wrapped) => (kek_id, wrapped),
            Rewrap::Unsupported(grant) => {
                let dek = old.unwrap_dek(grant)?;
                let ctx = WrapContext { dataset: &dataset, shard: e.index, shard_id: &e.id, issuer: &issuer_id };
                new.wrap_dek_for(&dek, &ctx)?
            }
        };
        e.kek_id = kek_id;
        e.wrapped_dek = hex::encode(rewrapped);
    }
    m.generation += 1;
    m.created_unix = crate::time::unix_now();
    crate::dataset::write_signed_manifest(dir, &m, issuer)?;
    Ok(m)
}

/// A grant for the data owner rotating keys: proven by holding the issuer key whose
/// public key verified the manifest.
fn owner_grant(issuer: &IssuerKey, ds: &Dataset, shard: u32) -> Result<Grant> {
    if issuer.trust_anchor() != *ds.trust_anchor() {
        return Err(Error::InvalidArgument(format!(
            "issuer key {} did not sign this manifest (signed by {})",
            issuer.trust_anchor().key_id(),
            ds.manifest().issuer_key_id
        )));
    }
    Grant::for_entry(&ds.manifest().dataset_id, &ds.manifest().issuer_key_id, ds.shard_entry(shard)?, None)
}
