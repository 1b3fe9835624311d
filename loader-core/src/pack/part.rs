//! Partitioned packing: many workers each pack a disjoint range of shard indices into
//! the same dataset directory, with no issuer secret key, and [`assemble`] verifies
//! every part and signs the one manifest. Until `assemble` succeeds the directory does
//! not read as a dataset (there is no manifest).
//!
//! A part file `part-<first shard, 5+ digits>.json` is
//! `{"format": "shardlock-part/1", "part": <manifest body>}`: the manifest body (FORMAT.md
//! section 9.2) of the part's shards, with generation 0, unsigned. Shard files are named
//! by their index as in a whole pack, so parts in one directory never share a file.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crypto::aead::Backend;
use crate::crypto::chunked::{ChunkBuf, StreamDecryptor};
use crate::error::{Error, Result};
use crate::format::manifest::{Manifest, SignedManifest, FILE_NAME};
use crate::format::ShardHeader;
use crate::keys::{Grant, IssuerKey, KeyProvider};

/// Format tag of part files.
pub const PART_FORMAT: &str = "shardlock-part/1";

/// Longest part file read (its manifest body is bounded as a manifest's is).
const MAX_PART_BYTES: u64 = 64 << 20;

/// The file in which the coordinator of leased parts ([`ShardLease`]) records how many
/// shard indices it handed out, or that the write failed:
/// `{"format": "shardlock-leases/1", "issued": N}` or `{..., "failed": "why"}`.
/// With it, [`assemble`] refuses a failed write, and parts that do not hold exactly
/// `issued` shards (a worker that failed holding the last indices, or a retried worker
/// whose first attempt also wrote a part), which the indices alone cannot show.
pub const LEASES_FILE: &str = "leases.json";

/// Format tag of [`LEASES_FILE`].
pub const LEASES_FORMAT: &str = "shardlock-leases/1";

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Leases {
    format: String,
    issued: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failed: Option<String>,
}

/// Records in `dir` what the coordinator of leased parts knows at the end of the write:
/// `issued` indices handed out, and `failed` (why) when the write did not succeed, so
/// that [`assemble`] refuses the directory. Replaces an earlier record atomically.
pub fn write_leases(dir: &Path, issued: u64, failed: Option<&str>) -> Result<()> {
    let body =
        serde_json::to_vec_pretty(&Leases { format: LEASES_FORMAT.into(), issued, failed: failed.map(str::to_owned) })
            .map_err(|e| Error::Internal(format!("leases encoding: {e}")))?;
    let tmp = dir.join(format!(".{LEASES_FILE}.tmp"));
    std::fs::write(&tmp, body).map_err(Error::io("write", &tmp))?;
    let path = dir.join(LEASES_FILE);
    std::fs::rename(&tmp, &path).map_err(Error::io("rename", &path))
}

/// The leases record of `dir`, if there is one.
fn read_leases(dir: &Path) -> Result<Option<Leases>> {
    let path = dir.join(LEASES_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = crate::fs::read_bounded(&path, 1 << 20, "leases file")?;
    let l: Leases = serde_json::from_slice(&bytes).map_err(|e| Error::Format {
        what: "leases file",
        path: path.clone(),
        detail: format!("not a leases file: {e}"),
    })?;
    if l.format != LEASES_FORMAT {
        return Err(Error::Format {
            what: "leases file",
            path,
            detail: format!("format {:?}, expected {LEASES_FORMAT:?}", l.format),
        });
    }
    Ok(Some(l))
}

/// One worker's share of a partitioned pack: shard indices from `first_shard`, at most
/// `max_shards` of them (so that a worker that gets more data than planned fails
/// instead of writing over the next worker's shards).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// Index of the part's first shard.
    pub first_shard: u32,
    /// Most shards the part may write; `None`: no limit (the last part).
    pub max_shards: Option<u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartFile {
    format: String,
    part: Manifest,
}

/// Hands a part the index of each shard it starts, when the workers' ranges cannot be
/// fixed in advance (a Ray Data write task does not know how many shards its blocks
/// fill): a counter shared by every worker of the dataset, such as a Ray actor or a
/// database sequence. Every index it hands out must be unique across the dataset; an
/// index handed out and never written (a worker that failed) is a gap that
/// [`assemble`] reports. A gap at the end, or a retried worker's extra part, shows only
/// against the count of indices handed out: the coordinator records it (and a failed
/// write) with [`write_leases`] before anyone assembles.
pub trait ShardLease: Send + Sync {
    /// The index of the next shard this part writes.
    fn next_shard(&mut self) -> Result<u32>;
}

/// Which shard indices a part writes: a fixed range ([`Part`]) or indices taken from a
/// shared counter as shards fill ([`ShardLease`]). A leased part writes
/// `part-<its first leased shard>.json`, and none when it got no data.
pub enum PartShards<'a> {
    /// From `first_shard` on, at most `max_shards`.
    Range(Part),
    /// Each shard's index from the lease.
    Leased(Box<dyn ShardLease + 'a>),
}

impl From<Part> for PartShards<'_> {
    fn from(p: Part) -> Self {
        PartShards::Range(p)
    }
}

impl PartShards<'_> {
    /// Before writing: the dataset is not assembled yet, and (for a range) no part
    /// starts there already.
    pub(super) fn check(&self, dir: &Path, manifest: &Path) -> Result<()> {
        if manifest.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} already holds an assembled dataset (manifest.json): parts go into a directory before assemble",
                dir.display()
            )));
        }
        match self {
            PartShards::Range(p) => p.check(dir),
            PartShards::Leased(_) => Ok(()),
        }
    }

    /// The index of the next shard, given how many the part has started.
    pub(super) fn next_index(&mut self, started: usize) -> Result<u32> {
        match self {
            PartShards::Range(p) => {
                let index = u32::try_from(started)
                    .ok()
                    .and_then(|n| n.checked_add(p.first_shard))
                    .ok_or_else(|| Error::InvalidArgument("more than 2^32 shards".into()))?;
                p.check_index(index)?;
                Ok(index)
            }
            PartShards::Leased(lease) => lease.next_shard(),
        }
    }

    /// Writes the part file (never replacing one). A leased part is named by its first
    /// shard, and writes none when it got no data.
    pub(super) fn write(&self, dir: &Path, m: &Manifest) -> Result<()> {
        match (self, m.shards.first()) {
            (PartShards::Range(p), _) => p.write(dir, m),
            (PartShards::Leased(_), Some(e)) => Part { first_shard: e.index, max_shards: None }.write(dir, m),
            (PartShards::Leased(_), None) => Ok(()),
        }
    }
}

impl PartShards<'_> {
    /// The name of the part file [`PartShards::write`] writes for `m`, if any.
    pub(super) fn written_name(&self, m: &Manifest) -> Option<String> {
        match (self, m.shards.first()) {
            (PartShards::Range(p), _) => Some(p.file_name()),
            (PartShards::Leased(_), Some(e)) => Some(Part { first_shard: e.index, max_shards: None }.file_name()),
            (PartShards::Leased(_), None) => None,
        }
    }
}

impl Part {
    /// The part file's name.
    pub fn file_name(&self) -> String {
        format!("part-{:05}.json", self.first_shard)
    }

    /// No part starts here already.
    fn check(&self, dir: &Path) -> Result<()> {
        let file = dir.join(self.file_name());
        if file.exists() {
            return Err(Error::InvalidArgument(format!(
                "{} exists: another worker packed the part starting at shard {} (give each worker its own range)",
                file.display(),
                self.first_shard
            )));
        }
        Ok(())
    }

    /// `index` lies within the part's range.
    fn check_index(&self, index: u32) -> Result<()> {
        match self.max_shards {
            Some(max) if u64::from(index) >= u64::from(self.first_shard) + u64::from(max) => {
                Err(Error::InvalidArgument(format!(
                    "the part starting at shard {} may write {max} shard(s), and its input needs more: give it a \
                     larger range (or a larger shard size)",
                    self.first_shard
                )))
            }
            _ => Ok(()),
        }
    }

    /// Writes the part file (never replacing one).
    fn write(&self, dir: &Path, m: &Manifest) -> Result<()> {
        let f = PartFile { format: PART_FORMAT.into(), part: m.clone() };
        let body = serde_json::to_vec_pretty(&f).map_err(|e| Error::Internal(format!("part encoding: {e}")))?;
        crate::fs::write_new_file(&dir.join(self.file_name()), &body, 0o644)
    }
}

/// Verifies every part file in `dir` and signs the dataset's one manifest with `issuer`
/// (generation `generation`, default 1); the part files are removed afterwards.
///
/// Part files are unsigned, and whoever could write the directory could have written
/// them, so nothing in them is taken on trust: each shard's DEK is unwrapped with `keys`
/// (the data owner's custody) and every chunk of the shard file is authenticated under
/// it and its own header, as `verify` does. An entry that names another dataset's
/// wrapped DEK, or a shard file that is not what that DEK encrypted, is refused. Also
/// refused, with an error naming the part and shard: no part file; parts of different
/// datasets, schemas, metadata or issuers; a gap, an overlap or a repeated shard or
/// wrapped DEK; a shard file whose size, SHA-256 or header differs from its entry; a
/// result that is not a consistent manifest.
pub fn assemble(dir: &Path, issuer: &IssuerKey, keys: &dyn KeyProvider, generation: Option<u64>) -> Result<Manifest> {
    if dir.join(FILE_NAME).exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already holds a signed manifest: it was assembled (or packed whole) already",
            dir.display()
        )));
    }
    let leases = read_leases(dir)?;
    if let Some(why) = leases.as_ref().and_then(|l| l.failed.as_deref()) {
        return Err(Error::InvalidArgument(format!(
            "the write that packed the parts in {} failed ({why}), as its {LEASES_FILE} records: pack the dataset \
             again into a new directory",
            dir.display()
        )));
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(Error::io("list", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("part-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Input { path: dir.to_owned(), detail: "no part-*.json files to assemble".into() });
    }
    let mut parts = Vec::with_capacity(files.len());
    for p in &files {
        let bytes = crate::fs::read_bounded(p, MAX_PART_BYTES, "part file")?;
        let bad = |detail: String| Error::Format { what: "part file", path: p.clone(), detail };
        let f: PartFile = serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a part file: {e}")))?;
        if f.format != PART_FORMAT {
            return Err(bad(format!("format {:?}, expected {PART_FORMAT:?}", f.format)));
        }
        parts.push((p.clone(), f.part));
    }
    let issuer_id = issuer.trust_anchor().key_id();
    let (first_path, first) = &parts[0];
    for (p, m) in &parts {
        let differs = |what: &str| Error::Format {
            what: "part file",
            path: p.clone(),
            detail: format!("its {what} differs from {}'s", first_path.display()),
        };
        if m.dataset_id != first.dataset_id {
            return Err(differs("dataset id"));
        }
        if m.schema_digest != first.schema_digest || m.schema != first.schema {
            return Err(differs("schema"));
        }
        if m.metadata != first.metadata {
            return Err(differs("metadata"));
        }
        if m.issuer_key_id != issuer_id {
            return Err(Error::Format {
                what: "part file",
                path: p.clone(),
                detail: format!(
                    "packed for issuer {}, and this issuer key is {issuer_id}: wraps are bound to the issuer",
                    m.issuer_key_id
                ),
            });
        }
    }
    let mut entries: Vec<(PathBuf, crate::format::ShardEntry)> =
        parts.iter().flat_map(|(p, m)| m.shards.iter().map(move |e| (p.clone(), e.clone()))).collect();
    entries.sort_by_key(|(_, e)| e.index);
    for (i, (p, e)) in entries.iter().enumerate() {
        if u64::from(e.index) != i as u64 {
            let detail = match i.checked_sub(1).map(|j| &entries[j]) {
                Some((q, prev)) if prev.index == e.index => {
                    format!("shard {} is in this part and in {} (a repeated partition)", e.index, q.display())
                }
                _ => format!("no part has shard {i} (a missing or failed partition); this part starts at {}", e.index),
            };
            return Err(Error::Format { what: "part file", path: p.clone(), detail });
        }
    }
    if let Some(l) = &leases {
        if entries.len() as u64 != l.issued {
            return Err(Error::Format {
                what: "leases file",
                path: dir.join(LEASES_FILE),
                detail: format!(
                    "the lease handed out {} shard indices and the parts hold {} shards: a worker failed or was \
                     retried; pack the dataset again into a new directory",
                    l.issued,
                    entries.len()
                ),
            });
        }
    }
    let mut wrapped = std::collections::HashSet::new();
    for (p, e) in &entries {
        if !wrapped.insert(e.wrapped_dek.as_str()) {
            return Err(Error::Format {
                what: "part file",
                path: p.clone(),
                detail: format!("shard {} has the wrapped DEK of another shard: every shard has its own DEK", e.index),
            });
        }
    }
    let records = entries.iter().try_fold(0u64, |n, (_, e)| n.checked_add(e.records)).ok_or_else(|| Error::Format {
        what: "part file",
        path: dir.to_owned(),
        detail: "record count overflows".into(),
    })?;
    for (p, e) in &entries {
        check_shard(dir, p, e, first, keys)?;
    }
    let m = Manifest {
        dataset_id: first.dataset_id.clone(),
        generation: generation.unwrap_or(1).max(1),
        created_unix: crate::time::unix_now(),
        issuer_key_id: issuer_id,
        schema: first.schema.clone(),
        schema_digest: first.schema_digest.clone(),
        records,
        shards: entries.into_iter().map(|(_, e)| e).collect(),
        metadata: first.metadata.clone(),
    };
    // Every rule a reader applies to the manifest alone, before it is signed.
    SignedManifest { manifest: m.clone(), body: Vec::new(), signature: Vec::new() }
        .check_consistency(&dir.join(FILE_NAME))?;
    crate::dataset::write_signed_manifest(dir, &m, issuer)?;
    for p in &files {
        std::fs::remove_file(p).map_err(Error::io("remove", p))?;
    }
    if leases.is_some() {
        let p = dir.join(LEASES_FILE);
        std::fs::remove_file(&p).map_err(Error::io("remove", &p))?;
    }
    Ok(m)
}

/// [`assemble`] for a dataset directory or for parts written straight to object storage
/// (`s3://bucket/prefix`, [`crate::DatasetWriter::upload_part_to`]; feature `s3`).
///
/// For object storage, the part files, `leases.json` and every shard file the parts
/// list are downloaded (ciphertext; bounded by the sizes the parts declare) into a
/// private staging directory, verified there exactly as [`assemble`] verifies a local
/// directory, and the signed manifest is uploaded last, so the dataset reads as complete
/// only once everything it lists was verified. The staging directory is removed after;
/// it needs room for the whole dataset. The unsigned part files stay in the bucket
/// (readers ignore them). A location that holds a manifest already is refused.
pub fn assemble_at(
    location: &str,
    issuer: &IssuerKey,
    keys: &dyn KeyProvider,
    generation: Option<u64>,
    opts: &crate::remote::RemoteOptions,
) -> Result<Manifest> {
    use crate::remote::{Location, Uploader};
    let dir = match Location::parse(location)? {
        Location::Local(dir) => return assemble(&dir, issuer, keys, generation),
        _ => location,
    };
    let up = Uploader::new(dir, opts)?;
    if up.exists(FILE_NAME)? {
        return Err(Error::InvalidArgument(format!(
            "{dir} already holds a signed manifest: it was assembled (or uploaded) already"
        )));
    }
    let names = up.list()?;
    let parts: Vec<&String> = names.iter().filter(|n| n.starts_with("part-") && n.ends_with(".json")).collect();
    if parts.is_empty() {
        return Err(Error::Input { path: PathBuf::from(dir), detail: "no part-*.json objects to assemble".into() });
    }
    let staging = crate::fs::TempDir::new("assemble")?;
    let put = |name: &str, bytes: &[u8]| crate::fs::write_new_file(&staging.0.join(name), bytes, 0o600);
    for name in &parts {
        let bytes = up.get(name, MAX_PART_BYTES)?;
        put(name, &bytes)?;
        let f: PartFile = serde_json::from_slice(&bytes).map_err(|e| Error::Format {
            what: "part file",
            path: PathBuf::from(format!("{dir}/{name}")),
            detail: format!("not a part file: {e}"),
        })?;
        for e in &f.part.shards {
            // The names `check_shard` accepts, so nothing is written outside the staging.
            if e.file != format!("shard-{:05}.slk", e.index) {
                return Err(Error::Format {
                    what: "part file",
                    path: PathBuf::from(format!("{dir}/{name}")),
                    detail: format!("shard {}: file name {:?} is not the shard's", e.index, e.file),
                });
            }
            if !staging.0.join(&e.file).exists() {
                put(&e.file, &up.get(&e.file, e.file_bytes)?)?;
            }
        }
    }
    if names.iter().any(|n| n == LEASES_FILE) {
        put(LEASES_FILE, &up.get(LEASES_FILE, MAX_PART_BYTES)?)?;
    }
    let m = assemble(&staging.0, issuer, keys, generation)?;
    let path = staging.0.join(FILE_NAME);
    up.put(FILE_NAME, std::fs::read(&path).map_err(Error::io("read", &path))?)?;
    Ok(m)
}

/// The shard file matches its part's entry (size, SHA-256, header), and every chunk
/// authenticates under the entry's DEK, unwrapped with `keys`, and the file's header.
fn check_shard(
    dir: &Path,
    part: &Path,
    e: &crate::format::ShardEntry,
    m: &Manifest,
    keys: &dyn KeyProvider,
) -> Result<()> {
    let path = dir.join(&e.file);
    let bad = |detail: String| Error::Format {
        what: "shard file",
        path: path.clone(),
        detail: format!("shard {} of {}: {detail}", e.index, part.display()),
    };
    if e.file != format!("shard-{:05}.slk", e.index) {
        return Err(bad(format!("file name {:?} is not the shard's", e.file)));
    }
    let mut f = std::fs::File::open(&path).map_err(Error::io("open", &path))?;
    let len = f.metadata().map_err(Error::io("stat", &path))?.len();
    if len != e.file_bytes {
        return Err(bad(format!("{len} bytes, the part says {}", e.file_bytes)));
    }
    let mut hash = crate::crypto::Sha256::default();
    let mut head = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(Error::io("read", &path))?;
        if n == 0 {
            break;
        }
        if head.len() < 4096 {
            head.extend_from_slice(&buf[..n.min(4096 - head.len())]);
        }
        hash.update(&buf[..n]);
    }
    if hex::encode(hash.finish()) != e.sha256 {
        return Err(bad("its SHA-256 differs from the part's (changed or partly written)".into()));
    }
    let (h, header_len) = ShardHeader::decode(&head, &path)?;
    if h.dataset_id != m.dataset_id
        || h.shard_index != e.index
        || hex::encode(h.shard_id) != e.id
        || hex::encode(h.schema_digest) != m.schema_digest
        || h.record_count != e.records
        || h.plaintext_len != e.plaintext_bytes
    {
        return Err(bad("its header does not match the part's entry".into()));
    }
    // The data owner's own grant (as `rotate`'s): assemble runs with the issuer key.
    let dek = keys.unwrap_dek(Grant::for_entry(&m.dataset_id, &m.issuer_key_id, e, None)?)?;
    let mut f = std::fs::File::open(&path).map_err(Error::io("open", &path))?;
    let mut context = vec![0u8; header_len];
    f.read_exact(&mut context).map_err(Error::io("read", &path))?;
    let mut dec = StreamDecryptor::new(Backend::default(), dek.expose(), &context, std::io::BufReader::new(f))
        .map_err(|err| bad(format!("does not authenticate under its DEK ({err})")))?;
    let mut scratch = ChunkBuf::new();
    let mut plain = 0u64;
    while let Some(n) =
        dec.next_chunk(&mut scratch).map_err(|err| bad(format!("does not authenticate under its DEK ({err})")))?
    {
        plain += n as u64;
    }
    if plain != e.plaintext_bytes {
        return Err(bad(format!("decrypts to {plain} bytes, the part says {}", e.plaintext_bytes)));
    }
    Ok(())
}
