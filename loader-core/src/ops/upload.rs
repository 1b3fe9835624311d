//! `upload`: copy a packed dataset directory to object storage, only as the signed
//! manifest describes it.

use std::path::Path;

use crate::crypto::Sha256;
use crate::dataset::{read_manifest_bytes, Dataset};
use crate::error::{Error, IntegrityKind, Result};
use crate::format::manifest;
use crate::keys::TrustAnchor;
use crate::remote::{RemoteOptions, Uploader};

/// Uploads the packed dataset in `dir` to `dest` (`s3://bucket/prefix`; needs the `s3`
/// feature) and returns the bytes uploaded. Nothing is decrypted: the objects are the
/// ciphertext files as they are.
///
/// Only a dataset whose manifest verifies against `trust` goes up, and only the files
/// that manifest names, under the read path's file-name rules: each shard must be a
/// regular file (a symbolic link, FIFO or device is refused) whose size and SHA-256
/// match the manifest before its bytes are sent, so a tampered manifest cannot send
/// another file (a keyring, say) and a modified shard is caught here rather than by
/// every reader. Shards go first and the manifest (the very bytes that were verified)
/// last, so a reader never sees a manifest whose shards are not there yet.
pub fn upload_dir(dir: &Path, dest: &str, trust: &TrustAnchor, opts: &RemoteOptions) -> Result<u64> {
    let (path, manifest_bytes) = read_manifest_bytes(dir)?;
    let ds = Dataset::from_manifest_bytes(dir, path, &manifest_bytes, trust)?;
    let up = Uploader::new(dest, opts)?;
    let mut total = 0u64;
    for e in &ds.manifest().shards {
        let bytes = read_listed_shard(&ds, e.index)?;
        total += bytes.len() as u64;
        up.put(&e.file, bytes)?;
    }
    total += manifest_bytes.len() as u64;
    up.put(manifest::FILE_NAME, manifest_bytes)?;
    Ok(total)
}

/// The bytes of shard `index` of `ds`, checked against its manifest entry.
fn read_listed_shard(ds: &Dataset, index: u32) -> Result<Vec<u8>> {
    let e = ds.shard_entry(index)?;
    let path = ds.dir().join(&e.file);
    let fail = |kind| Error::Integrity { shard: ds.shard_ref(index), chunk: None, kind };
    let f = crate::fs::open_regular(&path, false, "shard").map_err(|err| match err {
        Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => fail(IntegrityKind::MissingShard),
        err => err,
    })?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, e.file_bytes + 1), &mut bytes)
        .map_err(Error::io("read", &path))?;
    if bytes.len() as u64 != e.file_bytes {
        return Err(fail(IntegrityKind::SizeMismatch));
    }
    let mut h = Sha256::default();
    h.update(&bytes);
    if hex::encode(h.finish()) != e.sha256 {
        return Err(fail(IntegrityKind::DigestMismatch));
    }
    Ok(bytes)
}
