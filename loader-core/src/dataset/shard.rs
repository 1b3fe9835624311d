//! Random access to the records of one shard.

use std::path::Path;
use std::sync::Arc;

use zeroize::{Zeroize, Zeroizing};

use super::Dataset;
use crate::crypto::aead::Backend;
use crate::crypto::chunked::{ChunkBuf, Message, Payload, CHUNK_LEN, ENC_CHUNK_LEN, HEADER_LEN};
use crate::error::{Error, IntegrityKind, Result, ShardRef};
use crate::format::index::{self, RecordIndex, PROLOGUE_LEN};
use crate::format::ShardHeader;
use crate::keys::Dek;
use crate::memory::{map_opened, Mapped, MemoryPolicy};
use crate::remote::{RangeRequest, RangeSource, ShardSource};

/// An opened shard shared by pipeline workers: its ciphertext (memory-mapped, or read
/// by ranges from object storage), the payload key, and the authenticated record
/// index. Reads take `&self` and a caller-owned scratch chunk; after an integrity
/// failure every later read fails too.
pub struct OpenShard {
    body: Body,
    index: RecordIndex,
    at: ShardRef,
    failed: std::sync::OnceLock<(IntegrityKind, Option<u64>)>,
}

enum Body {
    Mapped(Payload<Mapped>),
    /// The shard's object, fetched a range of chunks at a time.
    Ranged {
        msg: Message,
        src: Arc<dyn RangeSource>,
        shard: u32,
        /// Object offset of the ciphertext (the header length).
        base: u64,
        /// The object's ETag when the shard was opened: every later range is an
        /// `If-Match` request for it. `None` if the server sends none (then only
        /// chunk authentication notices a replaced object).
        etag: Option<String>,
    },
}

/// Chunks `[first, end)` of one shard's ciphertext, fetched by one ranged read.
pub(super) struct SealedRun {
    /// First chunk.
    pub(super) first: u64,
    /// One past the last chunk.
    pub(super) end: u64,
    /// Their ciphertext and tags, back to back.
    pub(super) bytes: Vec<u8>,
}

impl OpenShard {
    /// Opens shard `shard` with its DEK. The final chunk and the record-index chunks
    /// (which also hold record bytes) are decrypted into one scratch chunk of locked,
    /// never-dumped memory: under `policy` [`MemoryPolicy::RequireLocked`] a scratch
    /// that cannot be locked is an `Error::MemoryLock`.
    pub(crate) fn open(ds: &Dataset, shard: u32, dek: &Dek, backend: Backend, policy: MemoryPolicy) -> Result<Self> {
        let (file, path) = match ds.open_shard_data(shard)? {
            ShardSource::File(f, p) => (f, p),
            ShardSource::Ranged(src) => return Self::open_ranged(ds, shard, dek, backend, src, policy),
        };
        let entry = ds.shard_entry(shard)?;
        let at = ds.shard_ref(shard);
        let fail = |kind| Error::Integrity { shard: at.clone(), chunk: None, kind };
        let map = map_opened(&file, &path)?;
        if map.len() as u64 != entry.file_bytes {
            return Err(fail(IntegrityKind::SizeMismatch));
        }
        let (header, header_len) = ShardHeader::decode(&map, &path).map_err(|_| fail(IntegrityKind::HeaderMismatch))?;
        let expected = expected_header(ds, shard)?;
        if header != expected {
            return Err(fail(IntegrityKind::HeaderMismatch));
        }
        let context = map[..header_len].to_vec();
        let payload = Payload::open(backend, dek.expose(), &context, map, header_len).map_err(|e| e.at_shard(&at))?;
        if payload.plaintext_len() != header.plaintext_len {
            return Err(fail(IntegrityKind::Truncated));
        }
        let mut scratch = ChunkBuf::with_policy(policy)?;
        payload.authenticate_length_with(&mut scratch).map_err(|e| e.at_shard(&at))?;
        let index = read_index(payload.plaintext_len(), &ds.manifest().schema, header.record_count, &path, |b| {
            payload.read_at(0, b, &mut scratch)
        })
        .map_err(|e| e.at_shard(&at))?;
        Ok(Self { body: Body::Mapped(payload), index, at, failed: std::sync::OnceLock::new() })
    }

    /// Opens a shard read by ranges: one read covers the header, salt, commitment and
    /// the chunks of the record index, a second one the final chunk. The same checks
    /// as for a file follow (header equal to the one the signed manifest implies, key
    /// commitment, authenticated length, record index); the object's size is the
    /// signed `file_bytes`, which every ranged response is checked against.
    fn open_ranged(
        ds: &Dataset,
        shard: u32,
        dek: &Dek,
        backend: Backend,
        src: Arc<dyn RangeSource>,
        policy: MemoryPolicy,
    ) -> Result<Self> {
        let entry = ds.shard_entry(shard)?;
        let at = ds.shard_ref(shard);
        let fail = |kind| Error::Integrity { shard: at.clone(), chunk: None, kind };
        let header = expected_header(ds, shard)?.encode();
        let h = header.len() as u64;
        let schema = &ds.manifest().schema;
        let index_len =
            index::index_len(entry.records, schema.fields.len()).ok_or_else(|| fail(IntegrityKind::IndexCorrupt))?;
        let ct_len = entry.file_bytes.checked_sub(h).ok_or_else(|| fail(IntegrityKind::Truncated))?;
        let (head_chunks, last) = sealed_layout(ct_len, index_len);
        // Chunks [0, head_chunks) carry the record index; `last` is the final chunk.
        let body_at = h + HEADER_LEN as u64;
        let head = 0..(body_at + head_chunks * ENC_CHUNK_LEN as u64).min(entry.file_bytes);
        let tail = (body_at + last * ENC_CHUNK_LEN as u64).min(entry.file_bytes)..entry.file_bytes;
        let mut reqs = vec![RangeRequest { shard, range: head.clone(), if_match: None }];
        if tail.start >= head.end && !tail.is_empty() {
            reqs.push(RangeRequest { shard, range: tail, if_match: None });
        }
        let mut got = src.get_ranges(&reqs)?.into_iter();
        let (head_bytes, etag) = got.next().unwrap_or_default();
        let (tail_bytes, tail_etag) = got.next().unwrap_or_default();
        if reqs.len() == 2 && tail_etag != etag {
            // Replaced between the two reads: neither is known to match the other.
            return Err(Error::Remote {
                url: at.file.as_ref().map(|f| f.display().to_string()).unwrap_or_default(),
                shard: Some(shard),
                kind: crate::error::RemoteFailure::Modified,
                detail: "the object was replaced while the shard was being opened (its ETag changed)".into(),
            });
        }
        if head_bytes.get(..header.len()) != Some(&header[..]) {
            return Err(fail(IntegrityKind::HeaderMismatch));
        }
        let prefix = head_bytes.get(header.len()..).unwrap_or_default();
        let msg = Message::open(backend, dek.expose(), &header, prefix, ct_len).map_err(|e| e.at_shard(&at))?;
        let runs = [
            SealedRun {
                first: 0,
                end: head_chunks.min(msg.chunk_count()),
                bytes: head_bytes.get(body_at as usize..).unwrap_or_default().to_vec(),
            },
            SealedRun { first: last, end: last + 1, bytes: tail_bytes },
        ];
        let chunk = |k: u64, out: &mut [u8]| -> Result<usize> {
            match runs.iter().find_map(|r| run_chunk(&msg, r, k)) {
                Some(sealed) => msg.open_chunk(k, sealed, out),
                None => Err(Error::integrity(IntegrityKind::Truncated, Some(k))),
            }
        };
        // The order of docs/FORMAT.md section 11: length, then the final chunk.
        if msg.plaintext_len() != entry.plaintext_bytes {
            return Err(fail(IntegrityKind::Truncated));
        }
        let mut scratch = ChunkBuf::with_policy(policy)?;
        chunk(msg.chunk_count() - 1, &mut scratch[..]).map_err(|e| e.at_shard(&at))?;
        let path = at.file.clone().unwrap_or_default();
        let index =
            read_index(msg.plaintext_len(), schema, entry.records, &path, |b| msg.read_with(0, b, &mut scratch, chunk))
                .map_err(|e| e.at_shard(&at))?;
        let body = Body::Ranged { msg, src, shard, base: h, etag };
        Ok(Self { body, index, at, failed: std::sync::OnceLock::new() })
    }

    /// Number of records.
    pub fn len(&self) -> u64 {
        self.index.len()
    }

    /// True if the shard holds no records.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The authenticated record index.
    pub fn index(&self) -> &RecordIndex {
        &self.index
    }

    /// Where this shard is, for errors.
    pub fn shard_ref(&self) -> &ShardRef {
        &self.at
    }

    fn check_failed(&self) -> Result<()> {
        match self.failed.get() {
            Some(&(kind, chunk)) => Err(Error::Integrity { shard: self.at.clone(), chunk, kind }),
            None => Ok(()),
        }
    }

    fn note_failure(&self, e: Error) -> Error {
        if let Error::Integrity { kind, chunk, .. } = &e {
            let _ = self.failed.set((*kind, *chunk));
        }
        e.at_shard(&self.at)
    }

    pub(super) fn message(&self) -> &Message {
        match &self.body {
            Body::Mapped(p) => p.message(),
            Body::Ranged { msg, .. } => msg,
        }
    }

    /// Decrypts plaintext bytes at `offset` into `out` (chunks authenticated first).
    /// A shard read by ranges fetches the chunks that cover them first.
    pub fn read_at(&self, offset: u64, out: &mut [u8], scratch: &mut ChunkBuf) -> Result<()> {
        self.check_failed()?;
        let r = match &self.body {
            Body::Mapped(p) => p.read_at(offset, out, scratch),
            Body::Ranged { msg, .. } => {
                let len = msg.plaintext_len();
                let end = offset.checked_add(out.len() as u64).filter(|&e| e <= len).ok_or_else(|| {
                    Error::InvalidArgument(format!("range {offset}+{} beyond plaintext of {len} bytes", out.len()))
                })?;
                let first = offset / CHUNK_LEN as u64;
                // A read to the end also authenticates the (possibly empty) final chunk.
                let stop = if end == len { msg.chunk_count() } else { end.div_ceil(CHUNK_LEN as u64) };
                let runs = if first < stop { self.fetch(&[(first, stop)]) } else { Ok(Vec::new()) };
                match runs {
                    Ok(runs) => msg.read_with(offset, out, scratch, |k, o| match runs.first() {
                        Some(run) => self.open_fetched(run, k, o),
                        None => Err(Error::Internal(format!("{}: chunk {k} was not fetched", self.at))),
                    }),
                    Err(e) => {
                        out.zeroize();
                        Err(e)
                    }
                }
            }
        };
        r.map_err(|e| self.note_failure(e))
    }

    /// Decrypts chunk `k` into `out` (at least one chunk long); returns its length.
    pub fn decrypt_chunk(&self, k: u64, out: &mut [u8]) -> Result<usize> {
        self.check_failed()?;
        let r = match &self.body {
            Body::Mapped(p) => p.decrypt_chunk(k, out),
            Body::Ranged { msg, .. } if k >= msg.chunk_count() => {
                Err(Error::InvalidArgument(format!("chunk {k} out of range (payload has {})", msg.chunk_count())))
            }
            Body::Ranged { .. } => match self.fetch(&[(k, k + 1)])?.pop() {
                Some(run) => self.open_fetched(&run, k, out),
                None => Err(Error::Internal(format!("{}: no ranged read of chunk {k}", self.at))),
            },
        };
        r.map_err(|e| self.note_failure(e))
    }

    /// True when chunks come from ranged reads (a remote shard that is not cached):
    /// the loader fetches the chunks each batch needs in one burst.
    pub fn is_ranged(&self) -> bool {
        matches!(self.body, Body::Ranged { .. })
    }

    /// The source and the request that fetch chunks `[first, end)` of a ranged shard.
    pub(super) fn fetch_request(&self, first: u64, end: u64) -> Result<(&Arc<dyn RangeSource>, RangeRequest)> {
        let Body::Ranged { msg, src, shard, base, etag } = &self.body else {
            return Err(Error::Internal(format!("{}: a ranged read of a mapped shard", self.at)));
        };
        if first >= end || end > msg.chunk_count() {
            return Err(Error::InvalidArgument(format!("{}: chunks {first}..{end} of {}", self.at, msg.chunk_count())));
        }
        let a = base + msg.chunk_range(first).start;
        let z = base + msg.chunk_range(end - 1).end;
        Ok((src, RangeRequest { shard: *shard, range: a..z, if_match: etag.clone() }))
    }

    /// Fetches chunk runs `[first, end)` of a ranged shard (one ranged read each).
    fn fetch(&self, runs: &[(u64, u64)]) -> Result<Vec<SealedRun>> {
        let mut reqs = Vec::with_capacity(runs.len());
        let mut src = None;
        for &(a, z) in runs {
            let (s, r) = self.fetch_request(a, z)?;
            src = Some(s);
            reqs.push(r);
        }
        let Some(src) = src else { return Ok(Vec::new()) };
        let got = src.get_ranges(&reqs).map_err(|e| e.at_shard(&self.at))?;
        Ok(runs.iter().zip(got).map(|(&(first, end), (bytes, _))| SealedRun { first, end, bytes }).collect())
    }

    /// Decrypts chunk `k` of a ranged shard from a fetched run that covers it.
    pub(super) fn open_fetched(&self, run: &SealedRun, k: u64, out: &mut [u8]) -> Result<usize> {
        self.check_failed()?;
        let msg = self.message();
        if k >= msg.chunk_count() {
            return Err(Error::InvalidArgument(format!("chunk {k} out of range (payload has {})", msg.chunk_count())));
        }
        let sealed =
            run_chunk(msg, run, k).ok_or_else(|| Error::Internal(format!("{}: chunk {k} was not fetched", self.at)))?;
        msg.open_chunk(k, sealed, out).map_err(|e| self.note_failure(e))
    }

    /// Number of payload chunks.
    pub fn chunk_count(&self) -> u64 {
        self.message().chunk_count()
    }

    /// Plaintext length of chunk `k`.
    pub fn chunk_plaintext_len(&self, k: u64) -> usize {
        self.message().chunk_plaintext_len(k)
    }
}

/// For a ciphertext of `ct_len` bytes whose plaintext starts with a record index of
/// `index_len` bytes: the number of leading chunks that hold the index, and the index
/// of the final chunk. (An impossible length is caught by [`Message::open`].)
fn sealed_layout(ct_len: u64, index_len: u64) -> (u64, u64) {
    let body = ct_len.saturating_sub(HEADER_LEN as u64);
    let last = body / ENC_CHUNK_LEN as u64;
    (index_len.div_ceil(CHUNK_LEN as u64).min(last + 1), last)
}

/// The sealed bytes of chunk `k` within `run`, if it holds them.
pub(super) fn run_chunk<'a>(msg: &Message, run: &'a SealedRun, k: u64) -> Option<&'a [u8]> {
    if k < run.first || k >= run.end {
        return None;
    }
    let r = msg.chunk_range(k);
    let a = (r.start - msg.chunk_range(run.first).start) as usize;
    run.bytes.get(a..a + (r.end - r.start) as usize)
}

/// Random access to the records of one shard: an [`OpenShard`] plus its own scratch
/// chunk (locked, never dumped, as the shard's).
pub struct ShardReader {
    shard: std::sync::Arc<OpenShard>,
    scratch: ChunkBuf,
    /// How each field is stored (for [`ShardReader::read_record`] to decompress).
    compress: Vec<Option<crate::format::Compression>>,
    /// Field names and fixed lengths, for decompression checks and errors.
    fields: Vec<crate::format::Field>,
    policy: MemoryPolicy,
}

impl ShardReader {
    pub(super) fn open(ds: &Dataset, shard: u32, dek: &Dek, backend: Backend, policy: MemoryPolicy) -> Result<Self> {
        let scratch = ChunkBuf::with_policy(policy)?;
        let fields = ds.manifest().schema.fields.clone();
        Ok(Self {
            shard: std::sync::Arc::new(OpenShard::open(ds, shard, dek, backend, policy)?),
            scratch,
            compress: fields.iter().map(|f| f.compress).collect(),
            fields,
            policy,
        })
    }

    /// Whether this reader's scratch chunk is locked in RAM.
    pub fn scratch_is_locked(&self) -> bool {
        self.scratch.is_locked()
    }

    /// The shared shard.
    pub fn shared(&self) -> &std::sync::Arc<OpenShard> {
        &self.shard
    }

    /// Number of records.
    pub fn len(&self) -> u64 {
        self.shard.len()
    }

    /// True if the shard holds no records.
    pub fn is_empty(&self) -> bool {
        self.shard.is_empty()
    }

    /// The authenticated record index.
    pub fn index(&self) -> &RecordIndex {
        self.shard.index()
    }

    /// Where this shard is, for errors.
    pub fn shard_ref(&self) -> &ShardRef {
        self.shard.shard_ref()
    }

    /// Byte length of the stored field `field` of record `record` (0 when out of range).
    pub fn field_len(&self, record: u64, field: usize) -> u64 {
        let ix = self.shard.index();
        if record >= ix.len() || field >= ix.fields() {
            return 0;
        }
        let (a, b) = ix.field_range(record, field);
        b - a
    }

    /// Decrypts the stored bytes of field `field` of record `record` into `out` (whose
    /// length must be [`ShardReader::field_len`]): the value itself, or for a compressed
    /// field its zstd frame ([`ShardReader::read_record`] decompresses). After an integrity failure the shard keeps failing.
    pub fn read_field(&mut self, record: u64, field: usize, out: &mut [u8]) -> Result<()> {
        let ix = self.shard.index();
        if record >= ix.len() || field >= ix.fields() {
            return Err(Error::InvalidArgument(format!(
                "{}: record {record} field {field} out of range ({} records x {} fields)",
                self.shard.shard_ref(),
                ix.len(),
                ix.fields()
            )));
        }
        let (a, b) = ix.field_range(record, field);
        if out.len() as u64 != b - a {
            return Err(Error::InvalidArgument(format!("output of {} bytes for a field of {}", out.len(), b - a)));
        }
        self.shard.read_at(a, out, &mut self.scratch)
    }

    /// Decrypts plaintext bytes at `offset` into `out` (chunks authenticated first).
    pub fn read_at(&mut self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.shard.read_at(offset, out, &mut self.scratch)
    }

    /// Decrypts every field of record `record`, compressed fields decompressed.
    pub fn read_record(&mut self, record: u64) -> Result<Vec<Zeroizing<Vec<u8>>>> {
        let mut unzstd = None;
        (0..self.shard.index().fields())
            .map(|f| {
                let mut v = Zeroizing::new(vec![0u8; self.field_len(record, f) as usize]);
                self.read_field(record, f, &mut v)?;
                if self.compress.get(f).copied().flatten().is_none() {
                    return Ok(v);
                }
                let field = &self.fields[f];
                let bad = |detail: String| Error::Decompress {
                    shard: self.shard.shard_ref().clone(),
                    record,
                    field: field.name.clone(),
                    detail,
                };
                let declared = crate::codec::Decompressor::content_size(&v).map_err(bad)?;
                let fits = field.fixed_len().is_none_or(|want| want == declared)
                    && field.var_unit().is_none_or(|u| declared.is_multiple_of(u as u64));
                if !fits {
                    return Err(bad(format!(
                        "the frame declares {declared} bytes, which the schema's field cannot hold"
                    )));
                }
                let len = usize::try_from(declared).map_err(|_| bad(format!("the frame declares {declared} bytes")))?;
                if unzstd.is_none() {
                    unzstd = Some(crate::codec::Decompressor::new(self.policy)?);
                }
                let mut out = Zeroizing::new(Vec::new());
                out.try_reserve_exact(len)
                    .map_err(|_| bad(format!("cannot allocate the {len} bytes the frame declares")))?;
                out.resize(len, 0);
                if let Some(d) = unzstd.as_mut() {
                    d.decompress(&v, &mut out).map_err(bad)?;
                }
                Ok(out)
            })
            .collect()
    }
}

/// The header the signed manifest says shard `shard` must carry.
pub(crate) fn expected_header(ds: &Dataset, shard: u32) -> Result<ShardHeader> {
    let m = ds.manifest();
    let e = ds.shard_entry(shard)?;
    let at = ds.shard_ref(shard);
    let bad = || Error::Integrity { shard: at.clone(), chunk: None, kind: IntegrityKind::HeaderMismatch };
    let mut shard_id = [0u8; 16];
    hex::decode_to_slice(&e.id, &mut shard_id).map_err(|_| bad())?;
    let mut schema_digest = [0u8; 32];
    hex::decode_to_slice(&m.schema_digest, &mut schema_digest).map_err(|_| bad())?;
    Ok(ShardHeader {
        dataset_id: m.dataset_id.clone(),
        shard_index: shard,
        shard_id,
        schema_digest,
        record_count: e.records,
        plaintext_len: e.plaintext_bytes,
    })
}

/// Decrypts (through `read`, which fills its argument with plaintext from offset 0)
/// and validates the record index of a payload of `plaintext_len` bytes; an
/// inconsistent authenticated index is an integrity failure (only a buggy or malicious
/// packer holding the DEK can cause it).
pub(crate) fn read_index(
    plaintext_len: u64,
    schema: &crate::format::Schema,
    records: u64,
    path: &Path,
    read: impl FnOnce(&mut [u8]) -> Result<()>,
) -> Result<RecordIndex> {
    let corrupt = || Error::integrity(IntegrityKind::IndexCorrupt, None);
    let len = index::index_len(records, schema.fields.len()).ok_or_else(corrupt)?;
    if len > plaintext_len {
        return Err(corrupt());
    }
    let mut bytes = Zeroizing::new(vec![0u8; len as usize]);
    read(&mut bytes)?;
    let (n, _) = RecordIndex::parse_prologue(&bytes[..PROLOGUE_LEN], path)?;
    if n != records {
        return Err(corrupt());
    }
    RecordIndex::parse(&bytes, schema, plaintext_len, path).map_err(|_| corrupt())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use crate::crypto::aead::OPENED_INTO;
    use crate::memory::assert_locked;
    use crate::{
        Access, Authorizer, AuthorizerConfig, Dataset, DatasetWriter, Field, IssuerKey, Keyring, Operation,
        PackOptions, Schema, ShardSet, Token, TokenSpec,
    };

    /// Security review finding 5: opening a shard decrypts its final chunk and its
    /// index chunk (which also holds record bytes) only into locked, never-dumped
    /// scratch, and so do a reader's partial reads; no chunk lands in heap memory.
    #[test]
    fn shard_open_decrypts_only_into_locked_never_dumped_scratch() {
        let t = tempfile::tempdir().unwrap();
        let ring = Arc::new(Keyring::create(&t.path().join("keyring.json")).unwrap());
        let issuer = IssuerKey::generate().unwrap();
        let trust = issuer.trust_anchor();
        let dir = t.path().join("ds");
        let schema = Schema::new(vec![Field::bytes("b")]).unwrap();
        let mut w = DatasetWriter::create(&dir, schema, PackOptions::new("scratch"), &*ring, &issuer).unwrap();
        // Three chunks: the index and the first records, a middle one, the final one.
        for i in 0..40u8 {
            w.write_sample(&[&[i; 1000]]).unwrap();
        }
        w.finish().unwrap();
        let spec = TokenSpec {
            dataset: "scratch".into(),
            principal: "tester".into(),
            shards: ShardSet::All,
            ops: vec![Operation::Read],
            expires: SystemTime::now() + Duration::from_secs(3600),
            not_before: None,
            min_generation: None,
        };
        let token = Token::issue(&issuer, &spec).unwrap();
        let ds = Dataset::open(&dir, &trust).unwrap();
        let access = Access::new(Authorizer::new(&trust, Some(token), AuthorizerConfig::default()).unwrap(), ring);
        let check = |what: &str, locked: bool| {
            let outs = OPENED_INTO.with(|v| v.borrow_mut().replace(Vec::new())).unwrap();
            assert!(!outs.is_empty(), "{what}: nothing was decrypted");
            for m in outs {
                let m = m.unwrap();
                assert!(m.dont_dump(), "{what} decrypted a chunk into memory that a core dump includes: {m:?}");
                assert_locked(&m, locked);
            }
        };
        OPENED_INTO.with(|v| *v.borrow_mut() = Some(Vec::new()));
        let mut r = access.open_shard(&ds, 0).unwrap();
        assert_eq!(r.shared().chunk_count(), 3);
        check("shard open", r.scratch_is_locked());
        let mut out = [0u8; 1000];
        r.read_field(17, 0, &mut out).unwrap();
        assert_eq!(out, [17u8; 1000]);
        check("ShardReader::read_field", r.scratch_is_locked());
        OPENED_INTO.with(|v| *v.borrow_mut() = None);
    }
}
