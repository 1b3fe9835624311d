//! `rotate`: rewrap every DEK under a new KEK and re-sign the manifest. Payloads are
//! untouched; the new manifest replaces the old one atomically.

use std::path::Path;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::format::Manifest;
use crate::keys::{Grant, IssuerKey, KeyProvider};

/// Rewraps every DEK of the dataset in `dir` from `old` to `new` and writes a manifest
/// of the next generation signed by `issuer`. Returns the new manifest.
pub fn rotate(dir: &Path, old: &dyn KeyProvider, new: &dyn KeyProvider, issuer: &IssuerKey) -> Result<Manifest> {
    let trust = issuer.trust_anchor();
    let ds = Dataset::open(dir, &trust)?;
    let mut m = ds.manifest().clone();
    let (dataset, issuer_id) = (m.dataset_id.clone(), m.issuer_key_id.clone());
    for e in &mut m.shards {
        let grant = owner_grant(issuer, &ds, e.index)?;
        let dek = old.unwrap_dek(grant)?;
        let (kek_id, rewrapped) = new.wrap_dek_for(
            &dek,
            &crate::keys::WrapContext { dataset: &dataset, shard: e.index, shard_id: &e.id, issuer: &issuer_id },
        )?;
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
