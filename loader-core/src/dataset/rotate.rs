//! `rotate`: rewrap every DEK under a new KEK and re-sign the manifest. Payloads are
//! untouched; the new manifest replaces the old one atomically.

use std::path::Path;

use super::{manifest_path, Dataset};
use crate::error::{Error, Result};
use crate::format::manifest::{Manifest, SignedManifest};
use crate::keys::{IssuerKey, KeyProvider};

/// Rewraps every DEK of the dataset in `dir` from `old` to `new` and writes a manifest
/// of the next generation signed by `issuer`. Returns the new manifest.
pub fn rotate(dir: &Path, old: &dyn KeyProvider, new: &dyn KeyProvider, issuer: &IssuerKey) -> Result<Manifest> {
    let trust = issuer.trust_anchor();
    let ds = Dataset::open(dir, &trust)?;
    let mut m = ds.manifest().clone();
    for e in &mut m.shards {
        let grant = crate::auth::Grant::owner(issuer, &ds, e.index)?;
        let dek = old.unwrap_dek(grant)?;
        let (kek_id, rewrapped) = new.wrap_dek(&dek)?;
        e.kek_id = kek_id;
        e.wrapped_dek = hex::encode(rewrapped);
    }
    m.generation += 1;
    m.created_unix = crate::pack::unix_now();
    write_signed(dir, &m, issuer)?;
    Ok(m)
}

/// Signs `m` with `issuer` and replaces `dir/manifest.json` atomically.
pub(crate) fn write_signed(dir: &Path, m: &Manifest, issuer: &IssuerKey) -> Result<()> {
    let mut body = serde_json::to_vec_pretty(m).map_err(|_| Error::Crypto("manifest encoding"))?;
    body.shrink_to_fit();
    let sig = issuer.sign(&SignedManifest::signed_message(&body))?;
    let bytes = SignedManifest::encode(&body, &sig)?;
    crate::keys::write_atomic(&manifest_path(dir), &bytes, 0o644)
}
