//! A packed dataset: its signed manifest and its shards, in a local directory or (feature
//! `s3`) in object storage behind a ciphertext-only local cache.

mod fetched;
mod shard;

pub(crate) use fetched::FetchedChunks;
pub(crate) use shard::{expected_header, read_index};
pub use shard::{OpenShard, ShardReader};

use std::path::{Path, PathBuf};

use crate::crypto::aead::Backend;
use crate::error::{Error, Result, ShardRef};
use crate::format::manifest::{self, Manifest, ShardEntry, SignedManifest};
use crate::keys::{Dek, IssuerKey, TrustAnchor};
use crate::memory::MemoryPolicy;
use crate::remote::{Location, RemoteOptions, ShardSource};

/// A dataset whose manifest signature has been verified against a trust anchor.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    /// The verified `manifest.json` bytes, exactly as signed (a key service verifies them
    /// itself; their SHA-256 names the manifest on the wire).
    manifest_bytes: std::sync::Arc<[u8]>,
    /// SHA-256 of `manifest_bytes`, computed once.
    manifest_digest: [u8; 32],
    trust: TrustAnchor,
    source: Source,
}

/// Where shard files come from.
enum Source {
    /// `dir/<file>`.
    Local,
    /// Object storage, through the cache.
    #[cfg(feature = "s3")]
    Remote(crate::remote::RemoteShards),
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

pub(crate) fn manifest_path(dir: &Path) -> PathBuf {
    dir.join(manifest::FILE_NAME)
}

/// The bytes of `dir/manifest.json`: a regular file of at most
/// [`manifest::MAX_LEN`] bytes.
pub(crate) fn read_manifest_bytes(dir: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let path = manifest_path(dir);
    let bytes = crate::fs::read_bounded(&path, manifest::MAX_LEN, "manifest").map_err(|e| match e {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => Error::Input {
            path: dir.to_owned(),
            detail: "no manifest.json: not a shardlock dataset, or packing did not complete".into(),
        },
        e => e,
    })?;
    Ok((path, bytes))
}

fn read_manifest(dir: &Path) -> Result<(PathBuf, SignedManifest)> {
    let (path, bytes) = read_manifest_bytes(dir)?;
    let signed = SignedManifest::parse(&bytes, &path)?;
    Ok((path, signed))
}

/// Reads a manifest without keys: content, and signature status if `trust` is given.
pub fn inspect(dir: &Path, trust: Option<&TrustAnchor>) -> Result<Inspection> {
    let (path, signed) = read_manifest(dir)?;
    inspection(path, signed, trust)
}

/// [`inspect`] for any location: a directory, `file://` or `s3://bucket/prefix` (only
/// the manifest is fetched).
pub fn inspect_at(location: &str, trust: Option<&TrustAnchor>, opts: &RemoteOptions) -> Result<Inspection> {
    match Location::parse(location)? {
        Location::Local(dir) => inspect(&dir, trust),
        #[cfg(feature = "s3")]
        loc => {
            let (bytes, _, _) = crate::remote::fetch_manifest(&loc, opts)?;
            let path = manifest_path(Path::new(&loc.to_string()));
            let signed = SignedManifest::parse(&bytes, &path)?;
            inspection(path, signed, trust)
        }
        #[cfg(not(feature = "s3"))]
        loc => {
            let _ = opts;
            Err(crate::remote::unsupported(&loc))
        }
    }
}

fn inspection(path: PathBuf, signed: SignedManifest, trust: Option<&TrustAnchor>) -> Result<Inspection> {
    let signature_valid = trust.map(|t| t.verify(&SignedManifest::signed_message(&signed.body), &signed.signature));
    let consistency_error = signed.check_consistency(&path).err().map(|e| e.to_string());
    Ok(Inspection { manifest: signed.manifest, signature_valid, consistency_error })
}

impl Dataset {
    /// Opens `dir`, verifying the manifest signature with `trust` and checking the
    /// manifest's internal consistency. Nothing else is trusted before this passes.
    pub fn open(dir: &Path, trust: &TrustAnchor) -> Result<Self> {
        let (path, bytes) = read_manifest_bytes(dir)?;
        Self::from_manifest_bytes(dir, path, &bytes, trust)
    }

    /// A local dataset in `dir` from manifest `bytes` already read (from `path`), so
    /// that what is verified is exactly what the caller goes on to use (upload).
    pub(crate) fn from_manifest_bytes(dir: &Path, path: PathBuf, bytes: &[u8], trust: &TrustAnchor) -> Result<Self> {
        let signed = SignedManifest::parse(bytes, &path)?;
        let manifest = verified(path, signed, trust)?;
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
            manifest_bytes: bytes.into(),
            manifest_digest: crate::crypto::sha256(bytes),
            trust: *trust,
            source: Source::Local,
        })
    }

    /// Opens a dataset at `location`: a directory, a `file://` URL, or (feature `s3`)
    /// `s3://bucket/prefix`. For object storage the manifest is fetched and verified
    /// exactly like a local one; shards are fetched later, as the epoch plan needs
    /// them, into the cache that `opts` selects.
    pub fn open_at(location: &str, trust: &TrustAnchor, opts: &RemoteOptions) -> Result<Self> {
        Self::open_location(&Location::parse(location)?, trust, opts)
    }

    /// [`Dataset::open_at`] for a parsed location.
    pub fn open_location(location: &Location, trust: &TrustAnchor, opts: &RemoteOptions) -> Result<Self> {
        match location {
            Location::Local(dir) => Self::open(dir, trust),
            #[cfg(feature = "s3")]
            loc => {
                let (bytes, bucket, rt) = crate::remote::fetch_manifest(loc, opts)?;
                let dir = PathBuf::from(loc.to_string());
                let path = manifest_path(&dir);
                let signed = SignedManifest::parse(&bytes, &path)?;
                let manifest = verified(path, signed, trust)?;
                let remote = crate::remote::RemoteShards::new(&manifest, bucket, rt, opts)?;
                Ok(Self {
                    dir,
                    manifest,
                    manifest_digest: crate::crypto::sha256(&bytes),
                    manifest_bytes: bytes.into(),
                    trust: *trust,
                    source: Source::Remote(remote),
                })
            }
            #[cfg(not(feature = "s3"))]
            loc => {
                let _ = opts;
                Err(crate::remote::unsupported(loc))
            }
        }
    }

    /// True when the shards come from object storage.
    pub fn is_remote(&self) -> bool {
        !matches!(self.source, Source::Local)
    }

    /// The local cache directory of a remote dataset.
    pub fn cache_dir(&self) -> Option<&Path> {
        match &self.source {
            Source::Local => None,
            #[cfg(feature = "s3")]
            Source::Remote(r) => Some(r.cache_dir()),
        }
    }

    /// Opens the ciphertext of shard `index`: a file in the directory, a file in the
    /// cache of a remote dataset after a download verified against the manifest, or
    /// (a remote shard the epoch plan reads by ranges) its object.
    pub(crate) fn open_shard_data(&self, index: u32) -> Result<ShardSource> {
        let entry = self.shard_entry(index)?;
        match &self.source {
            Source::Local => {
                let path = self.dir.join(&entry.file);
                // A FIFO or device in a shard's place is refused, never waited on.
                match crate::fs::open_regular(&path, true, "shard") {
                    Ok(f) => Ok(ShardSource::File(f, path)),
                    Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                        Err(Error::Integrity {
                            shard: self.shard_ref(index),
                            chunk: None,
                            kind: crate::error::IntegrityKind::MissingShard,
                        })
                    }
                    Err(e) => Err(e),
                }
            }
            #[cfg(feature = "s3")]
            Source::Remote(r) => r.open(index),
        }
    }

    /// Opens the (ciphertext) file of shard `index`, downloading a remote shard into
    /// the cache even where the epoch plan would read it by ranges.
    pub(crate) fn open_shard_file(&self, index: u32) -> Result<(std::fs::File, PathBuf)> {
        match &self.source {
            #[cfg(feature = "s3")]
            Source::Remote(r) => r.open_file(index),
            _ => match self.open_shard_data(index)? {
                ShardSource::File(f, p) => Ok((f, p)),
                ShardSource::Ranged(_) => Err(Error::Internal("a local shard read by ranges".into())),
            },
        }
    }

    /// Tells a remote dataset which shards the coming epoch reads, first use first,
    /// so it can fetch ahead; `random_access` says that batches draw samples from
    /// all over the dataset (`global` shuffle), where ranged reads can be cheaper
    /// than whole shards ([`crate::RangeReads`]). No effect on a local dataset.
    /// (The loader calls this for every epoch; a test hook, not an API.)
    #[doc(hidden)]
    pub fn plan_shards(&self, order: &[u32], random_access: bool) {
        #[cfg(feature = "s3")]
        if let Source::Remote(r) = &self.source {
            r.plan(order, random_access);
        }
        let _ = (order, random_access);
    }

    /// Bytes received from object storage so far: shard downloads and ranged reads,
    /// retries included (0 for a local dataset; the manifest is not counted).
    pub fn remote_bytes(&self) -> u64 {
        match &self.source {
            #[cfg(feature = "s3")]
            Source::Remote(r) => r.received_bytes(),
            _ => 0,
        }
    }

    /// [`Dataset::plan_shards`] for reading whole files (verify): a remote dataset
    /// prefetches them into the cache and reads none by ranges.
    pub(crate) fn plan_whole_files(&self, order: &[u32]) {
        #[cfg(feature = "s3")]
        if let Source::Remote(r) = &self.source {
            r.plan_whole_files(order);
        }
        let _ = order;
    }

    /// Shards the current epoch plan of a remote dataset reads with ranged GETs
    /// (empty for a local dataset). A test hook, not an API.
    #[doc(hidden)]
    pub fn ranged_shards(&self) -> Vec<u32> {
        match &self.source {
            #[cfg(feature = "s3")]
            Source::Remote(r) => r.ranged_shards(),
            _ => Vec::new(),
        }
    }

    /// Makes threads waiting for a remote shard's download give up now (the reader is
    /// stopping). No effect on a local dataset.
    pub(crate) fn interrupt_fetches(&self) {
        #[cfg(feature = "s3")]
        if let Source::Remote(r) = &self.source {
            r.interrupt();
        }
    }

    /// Tells a remote dataset the epoch is done with shard `index` (its cache file may
    /// be evicted when the byte budget needs room). No effect on a local dataset.
    pub(crate) fn release_shard(&self, index: u32) {
        #[cfg(feature = "s3")]
        if let Source::Remote(r) = &self.source {
            r.release(index);
        }
        let _ = index;
    }
}

/// Checks the signature and consistency of a parsed manifest; only then is it used.
fn verified(path: PathBuf, signed: SignedManifest, trust: &TrustAnchor) -> Result<Manifest> {
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
    Ok(signed.manifest)
}

impl Dataset {
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

    /// The verified `manifest.json` bytes, exactly as signed.
    pub fn manifest_bytes(&self) -> &std::sync::Arc<[u8]> {
        &self.manifest_bytes
    }

    /// SHA-256 of [`Dataset::manifest_bytes`]: the manifest's name at a key service.
    pub fn manifest_digest(&self) -> &[u8; 32] {
        &self.manifest_digest
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The dataset directory (for a remote dataset, its `s3://` URL as a path; used in
    /// messages only).
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
            file: match &self.source {
                #[cfg(feature = "s3")]
                Source::Remote(r) => r.url(index).map(PathBuf::from),
                Source::Local => self.manifest.shards.get(index as usize).map(|e| self.dir.join(&e.file)),
            },
        }
    }

    /// Opens shard `index` with its (already unwrapped) DEK: checks size, header,
    /// commitment, the authenticated length and the record index.
    /// Its scratch memory must lock ([`MemoryPolicy::RequireLocked`]).
    pub fn open_shard(&self, index: u32, dek: &Dek, backend: Backend) -> Result<ShardReader> {
        self.open_shard_with(index, dek, backend, MemoryPolicy::RequireLocked)
    }

    /// As [`Dataset::open_shard`], with what to do when scratch memory cannot be locked.
    pub(crate) fn open_shard_with(
        &self,
        index: u32,
        dek: &Dek,
        backend: Backend,
        policy: MemoryPolicy,
    ) -> Result<ShardReader> {
        ShardReader::open(self, index, dek, backend, policy)
    }
}

/// Signs `m` with `issuer` and replaces `dir/manifest.json` atomically.
pub(crate) fn write_signed_manifest(dir: &Path, m: &Manifest, issuer: &IssuerKey) -> Result<()> {
    let mut body = serde_json::to_vec_pretty(m).map_err(|e| Error::Internal(format!("manifest encoding: {e}")))?;
    body.shrink_to_fit();
    let sig = issuer.sign(&SignedManifest::signed_message(&body))?;
    let bytes = SignedManifest::encode(&body, &sig)?;
    crate::fs::write_atomic(&manifest_path(dir), &bytes, 0o644)
}
