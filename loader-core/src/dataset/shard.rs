//! Random access to the records of one shard.

use std::path::Path;

use zeroize::Zeroizing;

use super::Dataset;
use crate::crypto::aead::Backend;
use crate::crypto::chunked::{ChunkBuf, Payload};
use crate::error::{Error, IntegrityKind, Result, ShardRef};
use crate::format::index::{self, RecordIndex, PROLOGUE_LEN};
use crate::format::ShardHeader;
use crate::keys::Dek;
use crate::memory::{map_opened, Mapped};

/// An opened shard shared by pipeline workers: memory-mapped ciphertext, the payload
/// key, and the authenticated record index. Reads take `&self` and a caller-owned
/// scratch chunk; after an integrity failure every later read fails too.
pub struct OpenShard {
    payload: Payload<Mapped>,
    index: RecordIndex,
    at: ShardRef,
    failed: std::sync::OnceLock<(IntegrityKind, Option<u64>)>,
}

impl OpenShard {
    pub(crate) fn open(ds: &Dataset, shard: u32, dek: &Dek, backend: Backend) -> Result<Self> {
        let entry = ds.shard_entry(shard)?;
        let at = ds.shard_ref(shard);
        let fail = |kind| Error::Integrity { shard: at.clone(), chunk: None, kind };
        let (file, path) = ds.open_shard_file(shard)?;
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
        payload.authenticate_length().map_err(|e| e.at_shard(&at))?;
        let mut scratch = ChunkBuf::new();
        let index = read_index(&payload, &ds.manifest().schema, header.record_count, &path, &mut scratch)
            .map_err(|e| e.at_shard(&at))?;
        Ok(Self { payload, index, at, failed: std::sync::OnceLock::new() })
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

    /// Decrypts plaintext bytes at `offset` into `out` (chunks authenticated first).
    pub fn read_at(&self, offset: u64, out: &mut [u8], scratch: &mut ChunkBuf) -> Result<()> {
        self.check_failed()?;
        self.payload.read_at(offset, out, scratch).map_err(|e| self.note_failure(e))
    }

    /// Decrypts chunk `k` into `out` (at least one chunk long); returns its length.
    pub fn decrypt_chunk(&self, k: u64, out: &mut [u8]) -> Result<usize> {
        self.check_failed()?;
        self.payload.decrypt_chunk(k, out).map_err(|e| self.note_failure(e))
    }

    /// Number of payload chunks.
    pub fn chunk_count(&self) -> u64 {
        self.payload.chunk_count()
    }

    /// Plaintext length of chunk `k`.
    pub fn chunk_plaintext_len(&self, k: u64) -> usize {
        self.payload.chunk_plaintext_len(k)
    }
}

/// Random access to the records of one shard: an [`OpenShard`] plus its own scratch.
pub struct ShardReader {
    shard: std::sync::Arc<OpenShard>,
    scratch: ChunkBuf,
}

impl ShardReader {
    pub(super) fn open(ds: &Dataset, shard: u32, dek: &Dek, backend: Backend) -> Result<Self> {
        Ok(Self { shard: std::sync::Arc::new(OpenShard::open(ds, shard, dek, backend)?), scratch: ChunkBuf::new() })
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

    /// Byte length of field `field` of record `record` (0 when out of range).
    pub fn field_len(&self, record: u64, field: usize) -> u64 {
        let ix = self.shard.index();
        if record >= ix.len() || field >= ix.fields() {
            return 0;
        }
        let (a, b) = ix.field_range(record, field);
        b - a
    }

    /// Decrypts field `field` of record `record` into `out` (whose length must be
    /// [`ShardReader::field_len`]). After an integrity failure the shard keeps failing.
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

    /// Decrypts every field of record `record`.
    pub fn read_record(&mut self, record: u64) -> Result<Vec<Zeroizing<Vec<u8>>>> {
        (0..self.shard.index().fields())
            .map(|f| {
                let mut v = Zeroizing::new(vec![0u8; self.field_len(record, f) as usize]);
                self.read_field(record, f, &mut v)?;
                Ok(v)
            })
            .collect()
    }
}

/// The header the signed manifest says shard `shard` must carry.
pub(super) fn expected_header(ds: &Dataset, shard: u32) -> Result<ShardHeader> {
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

/// Decrypts and validates the record index; an inconsistent authenticated index is an
/// integrity failure (only a buggy or malicious packer holding the DEK can cause it).
pub(super) fn read_index<B: AsRef<[u8]>>(
    payload: &Payload<B>,
    schema: &crate::format::Schema,
    records: u64,
    path: &Path,
    scratch: &mut ChunkBuf,
) -> Result<RecordIndex> {
    let corrupt = || Error::integrity(IntegrityKind::IndexCorrupt, None);
    let len = index::index_len(records, schema.fields.len()).ok_or_else(corrupt)?;
    if len > payload.plaintext_len() {
        return Err(corrupt());
    }
    let mut bytes = Zeroizing::new(vec![0u8; len as usize]);
    payload.read_at(0, &mut bytes, scratch)?;
    let (n, _) = RecordIndex::parse_prologue(&bytes[..PROLOGUE_LEN], path)?;
    if n != records {
        return Err(corrupt());
    }
    RecordIndex::parse(&bytes, schema, payload.plaintext_len(), path).map_err(|_| corrupt())
}
