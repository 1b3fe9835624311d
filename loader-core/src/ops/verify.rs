//! `verify`: authenticate every chunk of every shard without releasing plaintext.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use crate::access::Access;
use crate::crypto::aead::Backend;
use crate::crypto::chunked::{ChunkBuf, Payload, CHUNK_LEN};
use crate::crypto::Sha256;
use crate::dataset::{expected_header, read_index, Dataset};
use crate::error::Operation;
use crate::error::{Error, IntegrityKind, Result};
use crate::format::ShardHeader;
use crate::keys::TrustAnchor;
use crate::memory::map_opened;

/// Options of [`verify`].
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// AEAD backend.
    pub backend: Backend,
    /// Refuse manifests older than this generation.
    pub min_generation: Option<u64>,
}

/// Outcome for one shard.
#[derive(Clone, Debug, Serialize)]
pub struct ShardReport {
    /// Shard index (`None` for a file not in the manifest).
    pub index: Option<u32>,
    /// File name.
    pub file: String,
    /// True if every check passed.
    pub ok: bool,
    /// The failure's [`Error::code`] (`chunk_auth`, `shard_out_of_scope`, `key_unavailable`,
    /// `remote_modified`, ...), the same name the audit log and Python use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Failing chunk, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunk: Option<u64>,
    /// Full error message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Outcome of [`verify`].
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// Dataset id.
    pub dataset: String,
    /// Manifest generation.
    pub generation: u64,
    /// Signature verified (always true in a report: a bad signature is an error).
    pub signature_ok: bool,
    /// Total records.
    pub records: u64,
    /// Bytes of shard files that passed every check.
    pub bytes: u64,
    /// One entry per manifest shard, then one per unexpected shard file.
    pub shards: Vec<ShardReport>,
    /// True if everything passed.
    pub ok: bool,
}

/// Verifies the manifest signature, then for each shard: presence, size, header,
/// authorization of `verify` for the shard, DEK unwrap, commitment, every chunk, the
/// record index and the SHA-256 of the file. Every shard is checked even after a
/// failure; the report lists them all. `progress` is called with the number of bytes
/// finished as work proceeds. Decisions and failures go to `access`'s audit log.
pub fn verify(
    dir: &Path,
    trust: &TrustAnchor,
    access: &Access,
    opts: &VerifyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport> {
    let ds = Dataset::open(dir, trust)?;
    verify_dataset(&ds, Some(dir), access, opts, progress)
}

/// [`verify`] for any location: a directory, `file://` or `s3://bucket/prefix`. A
/// remote dataset's shards are downloaded into the cache (verified against the
/// manifest's size and SHA-256 on the way) and then checked like local files; files in
/// the bucket that the manifest does not list are not looked for.
pub fn verify_at(
    location: &str,
    trust: &TrustAnchor,
    access: &Access,
    opts: &VerifyOptions,
    remote: &crate::remote::RemoteOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport> {
    let loc = crate::remote::Location::parse(location)?;
    let ds = Dataset::open_location(&loc, trust, remote)?;
    let order: Vec<u32> = (0..ds.manifest().shards.len() as u32).collect();
    ds.plan_whole_files(&order);
    let dir = match &loc {
        crate::remote::Location::Local(d) => Some(d.as_path()),
        _ => None,
    };
    verify_dataset(&ds, dir, access, opts, progress)
}

fn verify_dataset(
    ds: &Dataset,
    dir: Option<&Path>,
    access: &Access,
    opts: &VerifyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport> {
    if let Some(min) = opts.min_generation {
        ds.require_generation(min)?;
    }
    let m = ds.manifest();
    let mut shards = Vec::with_capacity(m.shards.len());
    let mut bytes = 0;
    for e in &m.shards {
        let r = verify_shard(ds, e.index, access, opts.backend, progress);
        if let Err(err) = &r {
            access.record_failure(ds, e.index, Operation::Verify, err)?;
        }
        ds.release_shard(e.index);
        if r.is_ok() {
            bytes += e.file_bytes;
        }
        shards.push(match r {
            Ok(()) => ShardReport {
                index: Some(e.index),
                file: e.file.clone(),
                ok: true,
                failure: None,
                chunk: None,
                error: None,
            },
            Err(err) => report_error(Some(e.index), &e.file, &err),
        });
    }
    let listed: BTreeSet<&str> = m.shards.iter().map(|e| e.file.as_str()).collect();
    let mut extra: Vec<String> = Vec::new();
    if let Some(dir) = dir {
        let entries = std::fs::read_dir(dir).map_err(Error::io("list", dir))?;
        extra = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // Dot-files are not ours (FORMAT.md section 1): `._shard-00000.slk` is
            // the AppleDouble file a macOS copy leaves beside `shard-00000.slk`.
            .filter(|n| !n.starts_with('.') && n.ends_with(".slk") && !listed.contains(n.as_str()))
            .collect();
    }
    extra.sort();
    for name in extra {
        let Some(dir) = dir else { break };
        let err = Error::Integrity {
            shard: crate::error::ShardRef {
                dataset: Some(m.dataset_id.clone()),
                index: None,
                file: Some(dir.join(&name)),
            },
            chunk: None,
            kind: IntegrityKind::ExtraShard,
        };
        shards.push(report_error(None, &name, &err));
    }
    let ok = shards.iter().all(|s| s.ok);
    Ok(VerifyReport {
        dataset: m.dataset_id.clone(),
        generation: m.generation,
        signature_ok: true,
        records: m.records,
        bytes,
        shards,
        ok,
    })
}

fn report_error(index: Option<u32>, file: &str, err: &Error) -> ShardReport {
    let chunk = match err {
        Error::Integrity { chunk, .. } => *chunk,
        _ => None,
    };
    ShardReport {
        index,
        file: file.to_owned(),
        ok: false,
        failure: Some(err.code().to_owned()),
        chunk,
        error: Some(err.to_string()),
    }
}

fn verify_shard(
    ds: &Dataset,
    index: u32,
    access: &Access,
    backend: Backend,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let e = ds.shard_entry(index)?;
    let at = ds.shard_ref(index);
    let fail = |kind| Error::Integrity { shard: at.clone(), chunk: None, kind };
    let (file, path) = ds.open_shard_file(index)?;
    let map = map_opened(&file, &path)?;
    if map.len() as u64 != e.file_bytes {
        return Err(fail(IntegrityKind::SizeMismatch));
    }
    let (header, header_len) = ShardHeader::decode(&map, &path).map_err(|_| fail(IntegrityKind::HeaderMismatch))?;
    if header != expected_header(ds, index)? {
        return Err(fail(IntegrityKind::HeaderMismatch));
    }
    let dek = access.release_dek(ds, index, Operation::Verify)?;
    let context = map[..header_len].to_vec();
    let payload = Payload::open(backend, dek.expose(), &context, map, header_len).map_err(|err| err.at_shard(&at))?;
    if payload.plaintext_len() != header.plaintext_len {
        return Err(fail(IntegrityKind::Truncated));
    }
    let mut scratch = ChunkBuf::new();
    let mut done = 0u64;
    for k in 0..payload.chunk_count() {
        payload.decrypt_chunk(k, &mut scratch[..]).map_err(|err| err.at_shard(&at))?;
        done += CHUNK_LEN as u64;
        if done >= 1 << 24 {
            progress(done);
            done = 0;
        }
    }
    progress(done + header_len as u64);
    read_index(payload.plaintext_len(), &ds.manifest().schema, header.record_count, &path, |b| {
        payload.read_at(0, b, &mut scratch)
    })
    .map_err(|err| err.at_shard(&at))?;
    // Authentication above names the failing chunk; the digest additionally pins the
    // exact file bytes the manifest was signed over.
    let mut h = Sha256::default();
    for c in payload.buffer().chunks(1 << 22) {
        h.update(c);
    }
    if hex::encode(h.finish()) != e.sha256 {
        return Err(fail(IntegrityKind::DigestMismatch));
    }
    Ok(())
}
