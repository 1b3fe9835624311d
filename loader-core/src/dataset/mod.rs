//! A packed dataset on disk: its signed manifest and its shards.

mod rotate;
mod shard;
mod verify;

pub use rotate::rotate;
pub(crate) use rotate::write_signed as write_signed_manifest;
pub use shard::{OpenShard, ShardReader};
pub use verify::{verify, ShardReport, VerifyOptions, VerifyReport};

use std::path::{Path, PathBuf};

use crate::crypto::aead::Backend;
use crate::error::{Error, Result, ShardRef};
use crate::format::manifest::{self, Manifest, ShardEntry, SignedManifest};
use crate::keys::{Dek, TrustAnchor};

/// A dataset whose manifest signature has been verified against a trust anchor.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    trust: TrustAnchor,
}

/// What `inspect` can say about a manifest without any key.
pub struct Inspection {
    /// The parsed (unverified unless `signature_valid`) manifest.
    pub manifest: Manifest,
    /// `Some(true/false)` when a trust anchor was given.
    pub signature_valid: Option<bool>,
    /// Problems with the manifest's internal consistency.
    pub consistency_error: Option<String>,
}

fn manifest_path(dir: &Path) -> PathBuf {
    dir.join(manifest::FILE_NAME)
}

fn read_manifest(dir: &Path) -> Result<(PathBuf, SignedManifest)> {
    let path = manifest_path(dir);
    let bytes = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Input {
                path: dir.to_owned(),
                detail: "no manifest.json: not a shardlock dataset, or packing did not complete".into(),
            }
        } else {
            Error::Io { op: "read", path: path.clone(), source: e }
        }
    })?;
    let signed = SignedManifest::parse(&bytes, &path)?;
    Ok((path, signed))
}

/// Reads a manifest without keys: content, and signature status if `trust` is given.
pub fn inspect(dir: &Path, trust: Option<&TrustAnchor>) -> Result<Inspection> {
    let (path, signed) = read_manifest(dir)?;
    let signature_valid = trust.map(|t| t.verify(&SignedManifest::signed_message(&signed.body), &signed.signature));
    let consistency_error = signed.check_consistency(&path).err().map(|e| e.to_string());
    Ok(Inspection { manifest: signed.manifest, signature_valid, consistency_error })
}

impl Dataset {
    /// Opens `dir`, verifying the manifest signature with `trust` and checking the
    /// manifest's internal consistency. Nothing else is trusted before this passes.
    pub fn open(dir: &Path, trust: &TrustAnchor) -> Result<Self> {
        let (path, signed) = read_manifest(dir)?;
        if !trust.verify(&SignedManifest::signed_message(&signed.body), &signed.signature) {
            let detail = if signed.manifest.issuer_key_id != trust.key_id() {
                format!(
                    "signature does not verify: manifest names issuer key {}, trust anchor is {}",
                    signed.manifest.issuer_key_id,
                    trust.key_id()
                )
            } else {
                "signature does not verify".into()
            };
            return Err(Error::ManifestSignature { path, detail });
        }
        signed.check_consistency(&path)?;
        Ok(Self { dir: dir.to_owned(), manifest: signed.manifest, trust: *trust })
    }

    /// Refuses a manifest older than `min` (rollback protection for readers that
    /// remember the last generation they saw).
    pub fn require_generation(&self, min: u64) -> Result<()> {
        if self.manifest.generation < min {
            return Err(Error::Rollback { path: manifest_path(&self.dir), generation: self.manifest.generation, min });
        }
        Ok(())
    }

    /// The trust anchor that verified the manifest.
    pub fn trust_anchor(&self) -> &TrustAnchor {
        &self.trust
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest entry of shard `index`.
    pub fn shard_entry(&self, index: u32) -> Result<&ShardEntry> {
        self.manifest.shards.get(index as usize).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "dataset {:?} has {} shards, no shard {index}",
                self.manifest.dataset_id,
                self.manifest.shards.len()
            ))
        })
    }

    /// Where errors about shard `index` point.
    pub fn shard_ref(&self, index: u32) -> ShardRef {
        ShardRef {
            dataset: Some(self.manifest.dataset_id.clone()),
            index: Some(index),
            file: self.manifest.shards.get(index as usize).map(|e| self.dir.join(&e.file)),
        }
    }

    /// Opens shard `index` with its (already unwrapped) DEK: checks size, header,
    /// commitment, the authenticated length and the record index.
    pub fn open_shard(&self, index: u32, dek: &Dek, backend: Backend) -> Result<ShardReader> {
        ShardReader::open(self, index, dek, backend)
    }
}
