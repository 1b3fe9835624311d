//! Packing: samples -> records -> index -> Cobblestone-256 payload per shard, DEKs
//! wrapped by the key provider, manifest signed by the issuer key.

mod imagefolder;
mod inputs;
mod npy;
mod part;
mod wds;

pub use imagefolder::{ImageFolder, IMAGE_EXTENSIONS};
pub use inputs::{pack_paths, InputFormat, InputSource};
pub use npy::NpyArray;
pub use part::{
    assemble, assemble_at, write_leases, Part, PartShards, ShardLease, LEASES_FILE, LEASES_FORMAT, PART_FORMAT,
};
pub use wds::WebDataset;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::crypto::aead::Backend;
use crate::crypto::chunked::Encryptor;
use crate::crypto::{self, Sha256};
use crate::error::{Error, Result};
use crate::format::header::validate_dataset_id;
use crate::format::manifest::{Manifest, ShardEntry, FILE_NAME};
use crate::format::{index, DType, FieldKind, Schema, ShardHeader};
use crate::keys::{IssuerKey, KeyProvider, WrapContext};

/// Default shard plaintext size: 256 MiB.
pub const DEFAULT_SHARD_SIZE: u64 = 256 << 20;

/// Options of a [`DatasetWriter`].
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Dataset id, bound into every shard header.
    pub dataset_id: String,
    /// Target plaintext bytes per shard (a shard always holds at least one record).
    pub shard_size: u64,
    /// Replace a dataset already in the output directory.
    pub force: bool,
    /// AEAD backend.
    pub backend: Backend,
    /// Generation of the new manifest. Default: one past the generation of the
    /// manifest already in the output directory, when that one verifies under the
    /// issuer key and is for the same dataset id (a re-pack with `force`), else 1.
    /// A value not above that manifest's generation is refused: generations only go
    /// up, so a reader that requires the new one never accepts an older pack (or a
    /// rotation of it). Give it for a fresh directory to continue from a pack made
    /// elsewhere.
    pub generation: Option<u64>,
    /// Shards encrypted and written at once, each on a thread of its own (default: the
    /// cores, at most 8). The calling thread fills the next shard meanwhile; manifest
    /// entries keep shard order. Memory: up to `threads + 1` shard buffers of
    /// `shard_size` plaintext each. 1 seals each shard on the calling thread.
    pub threads: usize,
    /// Dataset metadata signed with the manifest (`classes`: label names in label order).
    pub metadata: crate::format::manifest::Metadata,
    /// zstd level of each compressed field, by name (the schema says which fields are
    /// compressed; a field not named here gets level 3). Compression runs on the
    /// sealing threads; [`PackOptions::shard_size`] counts values before compression.
    pub zstd_levels: std::collections::BTreeMap<String, i32>,
}

/// Applies compression specs as `shardlock pack --compress` takes them, `FIELD=zstd`
/// or `FIELD=zstd:LEVEL` (level 1..=19, default 3), to `schema` (the field's values are
/// stored compressed) and `opts` (the level). A field named twice, or not in the
/// schema, is an error that lists the fields.
pub fn apply_compression(schema: &mut Schema, opts: &mut PackOptions, specs: &[String]) -> Result<()> {
    for spec in specs {
        let bad = |why: String| Error::InvalidArgument(format!("--compress {spec:?}: {why}"));
        let (name, codec) = spec.split_once('=').ok_or_else(|| bad("give FIELD=zstd or FIELD=zstd:LEVEL".into()))?;
        let level = match codec.split_once(':') {
            None if codec == "zstd" => crate::codec::ZSTD_DEFAULT_LEVEL,
            Some(("zstd", l)) => l.parse().map_err(|_| bad(format!("{l:?} is not a zstd level (1-19)")))?,
            _ => return Err(bad(format!("unknown codec {codec:?} (the one there is: zstd)"))),
        };
        crate::codec::Compressor::new(level).map_err(|e| bad(e.to_string()))?;
        let names: Vec<String> = schema.fields.iter().map(|f| f.name.clone()).collect();
        let field = schema
            .fields
            .iter_mut()
            .find(|f| f.name == name)
            .ok_or_else(|| bad(format!("no field {name:?} (fields: {})", names.join(", "))))?;
        if field.compress.is_some() {
            return Err(bad(format!("field {name:?} is named twice")));
        }
        field.compress = Some(crate::format::Compression::Zstd);
        opts.zstd_levels.insert(name.to_owned(), level);
    }
    Ok(())
}

/// Default [`PackOptions::threads`]: the cores this process may use, at most 8.
pub fn default_pack_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(8)
}

impl PackOptions {
    /// Options with defaults for `dataset_id`.
    pub fn new(dataset_id: impl Into<String>) -> Self {
        Self {
            dataset_id: dataset_id.into(),
            shard_size: DEFAULT_SHARD_SIZE,
            force: false,
            backend: Backend::default(),
            generation: None,
            threads: default_pack_threads(),
            metadata: Default::default(),
            zstd_levels: Default::default(),
        }
    }
}

/// Writes a dataset: call [`DatasetWriter::write_sample`] per sample, then
/// [`DatasetWriter::finish`]. Until `finish` writes the signed manifest, the output
/// does not read as a dataset.
pub struct DatasetWriter<'a> {
    dir: PathBuf,
    opts: PackOptions,
    schema: Schema,
    keys: Held<'a, dyn KeyProvider + 'a>,
    /// The issuer key that signs the manifest; `None` for a part ([`Part`]), which
    /// `shardlock assemble` signs later.
    issuer: Option<Held<'a, IssuerKey>>,
    /// Key id of the issuer key (what custody binds each wrap to).
    issuer_id: String,
    part: Option<PartShards<'a>>,
    fixed: Vec<Option<u64>>,
    field_lens: Vec<u64>,
    data: Zeroizing<Vec<u8>>,
    shards: Vec<ShardEntry>,
    /// Shards being sealed on threads of their own, oldest first.
    sealing: std::collections::VecDeque<(u32, std::thread::JoinHandle<Result<Sealed>>)>,
    /// Wiped shard buffers back from sealing threads, for the next shards.
    spare: Vec<Zeroizing<Vec<u8>>>,
    /// Set by the first error: a writer that lost a shard writes nothing more (no
    /// manifest with a gap, no index reused while its shard is still in flight).
    failed: bool,
    samples: u64,
    bytes_in: u64,
    generation: u64,
    /// For a part written straight to object storage: each shard file is uploaded (and
    /// its local copy removed) as soon as it is sealed, the part file last.
    upload: Option<(crate::remote::Uploader, crate::fs::TempDir)>,
}

impl<'a> DatasetWriter<'a> {
    /// Prepares `dir` (created if missing). Refuses a directory that already holds a
    /// dataset unless `opts.force`, in which case the old manifest is removed first so
    /// that a half-replaced dataset never reads as complete.
    pub fn create(
        dir: &Path,
        schema: Schema,
        opts: PackOptions,
        keys: &'a dyn KeyProvider,
        issuer: &'a IssuerKey,
    ) -> Result<Self> {
        Self::create_held(dir, schema, opts, Held::Borrowed(keys), Signer::Key(Held::Borrowed(issuer)))
    }

    /// Prepares one part of a dataset packed on several machines: shards from
    /// `part.first_shard` on ([`Part`]), or at the indices a shared counter hands out
    /// ([`ShardLease`]), wrapped by `keys`; no issuer secret key is needed, only the
    /// public trust anchor of the issuer who will sign the dataset with [`assemble`].
    /// `finish` writes the part file, not a manifest.
    pub fn create_part(
        dir: &Path,
        schema: Schema,
        opts: PackOptions,
        keys: &'a dyn KeyProvider,
        issuer: &crate::keys::TrustAnchor,
        part: impl Into<PartShards<'a>>,
    ) -> Result<Self> {
        Self::create_held(dir, schema, opts, Held::Borrowed(keys), Signer::Part(*issuer, part.into()))
    }

    fn create_held(
        dir: &Path,
        schema: Schema,
        opts: PackOptions,
        keys: Held<'a, dyn KeyProvider + 'a>,
        signer: Signer<'a>,
    ) -> Result<Self> {
        validate_dataset_id(&opts.dataset_id).map_err(Error::InvalidArgument)?;
        schema.validate().map_err(|e| Error::InvalidArgument(format!("schema: {e}")))?;
        if opts.shard_size == 0 {
            return Err(Error::InvalidArgument("shard size must be > 0".into()));
        }
        crate::format::manifest::validate_metadata(&opts.metadata).map_err(Error::InvalidArgument)?;
        for (name, level) in &opts.zstd_levels {
            let compressed = schema.fields.iter().any(|f| &f.name == name && f.compress.is_some());
            if !compressed {
                return Err(Error::InvalidArgument(format!(
                    "a zstd level is given for field {name:?}, which the schema does not compress"
                )));
            }
            crate::codec::Compressor::new(*level)?;
        }
        std::fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        let manifest = dir.join(FILE_NAME);
        let (issuer, issuer_id) = match signer {
            Signer::Key(k) => {
                let id = k.trust_anchor().key_id();
                (k, id)
            }
            Signer::Part(anchor, part) => {
                part.check(dir, &manifest)?;
                let fixed = schema.fields.iter().map(|f| f.fixed_len()).collect();
                return Ok(Self::new_state(dir, schema, opts, keys, None, anchor.key_id(), Some(part), fixed, 0));
            }
        };
        let mut previous = None;
        if manifest.exists() {
            if !opts.force {
                return Err(Error::AlreadyExists { path: dir.to_owned() });
            }
            // The dataset being replaced, if it is this owner's and this dataset's.
            previous = crate::dataset::Dataset::open(dir, &issuer.trust_anchor())
                .ok()
                .filter(|ds| ds.manifest().dataset_id == opts.dataset_id)
                .map(|ds| ds.manifest().generation);
        }
        let generation = match (opts.generation, previous) {
            (Some(0), _) => return Err(Error::InvalidArgument("generation must be at least 1".into())),
            (Some(n), Some(g)) if n <= g => {
                return Err(Error::InvalidArgument(format!(
                    "generation {n} is not above {g}, the generation of dataset {:?} already in {}: generations \
                     only go up (leave it out to get {})",
                    opts.dataset_id,
                    dir.display(),
                    g + 1
                )))
            }
            (Some(n), _) => n,
            (None, Some(g)) => g.checked_add(1).ok_or_else(|| Error::InvalidArgument("generation overflow".into()))?,
            (None, None) => 1,
        };
        if manifest.exists() {
            std::fs::remove_file(&manifest).map_err(Error::io("remove", &manifest))?;
        }
        if opts.force {
            for e in std::fs::read_dir(dir).map_err(Error::io("list", dir))?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Pack never writes a dot-file shard; dot-files are not ours to delete.
                if !name.starts_with('.') && (name.ends_with(".slk") || name.ends_with(".slk.partial")) {
                    let p = e.path();
                    std::fs::remove_file(&p).map_err(Error::io("remove", &p))?;
                }
            }
        }
        let fixed = schema.fields.iter().map(|f| f.fixed_len()).collect();
        Ok(Self::new_state(dir, schema, opts, keys, Some(issuer), issuer_id, None, fixed, generation))
    }

    #[allow(clippy::too_many_arguments)]
    fn new_state(
        dir: &Path,
        schema: Schema,
        opts: PackOptions,
        keys: Held<'a, dyn KeyProvider + 'a>,
        issuer: Option<Held<'a, IssuerKey>>,
        issuer_id: String,
        part: Option<PartShards<'a>>,
        fixed: Vec<Option<u64>>,
        generation: u64,
    ) -> Self {
        Self {
            dir: dir.to_owned(),
            opts,
            schema,
            keys,
            issuer,
            issuer_id,
            part,
            fixed,
            field_lens: Vec::new(),
            data: Zeroizing::new(Vec::new()),
            shards: Vec::new(),
            sealing: std::collections::VecDeque::new(),
            spare: Vec::new(),
            failed: false,
            samples: 0,
            bytes_in: 0,
            generation,
            upload: None,
        }
    }

    /// [`DatasetWriter::create_part`] at `location`: a directory, or `s3://bucket/prefix`
    /// (feature `s3`), where the part goes straight to object storage. There each shard
    /// file (ciphertext) is uploaded as soon as it is sealed, from a private staging
    /// directory that holds only the shards being sealed, and [`DatasetWriter::finish`]
    /// uploads the part file last. `shardlock assemble s3://...` ([`assemble_at`]) then
    /// verifies the parts there and uploads the signed manifest. (A whole dataset is
    /// packed locally, then `upload`ed, so that its manifest goes up last.)
    #[allow(clippy::too_many_arguments)]
    pub fn create_part_at(
        location: &str,
        schema: Schema,
        opts: PackOptions,
        keys: &'a dyn KeyProvider,
        issuer: &crate::keys::TrustAnchor,
        part: impl Into<PartShards<'a>>,
        remote: &crate::remote::RemoteOptions,
    ) -> Result<Self> {
        Self::create_part_at_held(location, schema, opts, Held::Borrowed(keys), issuer, part.into(), remote)
    }

    fn create_part_at_held(
        location: &str,
        schema: Schema,
        opts: PackOptions,
        keys: Held<'a, dyn KeyProvider + 'a>,
        issuer: &crate::keys::TrustAnchor,
        part: PartShards<'a>,
        remote: &crate::remote::RemoteOptions,
    ) -> Result<Self> {
        let signer = Signer::Part(*issuer, part);
        let dir = match crate::remote::Location::parse(location)? {
            crate::remote::Location::Local(dir) => return Self::create_held(&dir, schema, opts, keys, signer),
            _ => location,
        };
        let up = crate::remote::Uploader::new(dir, remote)?;
        let staging = crate::fs::TempDir::new("part")?;
        let mut w = Self::create_held(&staging.0, schema, opts, keys, signer)?;
        w.upload = Some((up, staging));
        Ok(w)
    }

    /// Uploads `name` from the local directory and removes the local copy.
    fn send(&self, name: &str) -> Result<()> {
        let Some((up, _)) = &self.upload else { return Ok(()) };
        let path = self.dir.join(name);
        let bytes = std::fs::read(&path).map_err(Error::io("read", &path))?;
        up.put(name, bytes)?;
        std::fs::remove_file(&path).map_err(Error::io("remove", &path))
    }

    /// The dataset schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Samples written so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Plaintext sample bytes written so far.
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    /// Appends one sample: one value per schema field, in schema order.
    pub fn write_sample(&mut self, values: &[&[u8]]) -> Result<()> {
        self.check_usable()?;
        if values.len() != self.fixed.len() {
            return Err(Error::Schema {
                sample: self.samples,
                detail: format!("{} values for a schema of {} fields", values.len(), self.fixed.len()),
            });
        }
        for (i, (v, want)) in values.iter().zip(&self.fixed).enumerate() {
            if let Some(n) = want {
                if v.len() as u64 != *n {
                    return Err(Error::Schema {
                        sample: self.samples,
                        detail: format!(
                            "field {:?} has {} bytes, schema needs {n}",
                            self.schema.fields[i].name,
                            v.len()
                        ),
                    });
                }
            }
            let field = &self.schema.fields[i];
            if let FieldKind::List { dtype } = field.kind {
                if v.len() % dtype.size() != 0 {
                    return Err(Error::Schema {
                        sample: self.samples,
                        detail: format!(
                            "field {:?} is a list of {}: {} bytes is not a whole number of elements",
                            field.name,
                            dtype.name(),
                            v.len()
                        ),
                    });
                }
            }
            let bool_values = matches!(
                field.kind,
                FieldKind::Tensor { dtype: DType::Bool, .. } | FieldKind::List { dtype: DType::Bool }
            );
            if bool_values && v.iter().any(|&b| b > 1) {
                return Err(Error::Schema {
                    sample: self.samples,
                    detail: format!("field {:?} is bool: every byte must be 0 or 1", field.name),
                });
            }
        }
        let size: u64 = values.iter().map(|v| v.len() as u64).sum();
        if !self.field_lens.is_empty() && self.data.len() as u64 + size > self.opts.shard_size {
            self.seal_shard().inspect_err(|_| self.failed = true)?;
        }
        crate::memory::reserve_zeroizing(&mut self.data, size as usize);
        for v in values {
            self.data.extend_from_slice(v);
            self.field_lens.push(v.len() as u64);
        }
        self.samples += 1;
        self.bytes_in += size;
        Ok(())
    }

    /// Seals the shard filled so far: its DEK from custody here, then encryption, the
    /// file write and fsync on a thread of its own (or here, with one thread).
    fn seal_shard(&mut self) -> Result<()> {
        let started = self.shards.len() + self.sealing.len();
        let shard_index = match &mut self.part {
            Some(p) => p.next_index(started)?,
            None => u32::try_from(started).map_err(|_| Error::InvalidArgument("more than 2^32 shards".into()))?,
        };
        let fields = self.fixed.len();
        let records = (self.field_lens.len() / fields) as u64;
        let mut shard_id = [0u8; 16];
        crypto::random_bytes(&mut shard_id)?;
        // The plaintext length goes into the header once the sealing thread knows it
        // (after compression).
        let header = ShardHeader {
            dataset_id: self.opts.dataset_id.clone(),
            shard_index,
            shard_id,
            schema_digest: self.schema.digest(),
            record_count: records,
            plaintext_len: 0,
        };
        // The DEK and its wrap first: custody that makes data keys (KMS, Transit) draws
        // it, and a custody failure stops before any ciphertext is written.
        let id_hex = hex::encode(shard_id);
        let ctx = WrapContext {
            dataset: &self.opts.dataset_id,
            shard: shard_index,
            shard_id: &id_hex,
            issuer: &self.issuer_id,
        };
        let (dek, kek_id, wrapped) = self.keys.generate_dek_for(&ctx)?;
        let file = format!("shard-{shard_index:05}.slk");
        let entry = ShardEntry {
            index: shard_index,
            id: id_hex,
            file,
            records,
            plaintext_bytes: 0,
            file_bytes: 0,
            sha256: String::new(),
            kek_id,
            wrapped_dek: hex::encode(wrapped),
        };
        let field_lens = std::mem::take(&mut self.field_lens);
        let data = std::mem::replace(&mut self.data, self.spare.pop().unwrap_or_default());
        let compress = self
            .schema
            .fields
            .iter()
            .map(|f| {
                f.compress
                    .map(|_| self.opts.zstd_levels.get(&f.name).copied().unwrap_or(crate::codec::ZSTD_DEFAULT_LEVEL))
            })
            .collect();
        let job = SealJob {
            dir: self.dir.clone(),
            header,
            field_lens,
            compress,
            data,
            dek,
            backend: self.opts.backend,
            entry,
            no_replace: self.part.is_some(),
        };
        if self.opts.threads <= 1 {
            let sealed = job.run()?;
            return self.collected(sealed);
        }
        while self.sealing.len() >= self.opts.threads {
            self.collect_oldest()?;
        }
        let handle = std::thread::Builder::new()
            .name(format!("shardlock-seal-{shard_index}"))
            .spawn(move || job.run())
            .map_err(|e| Error::Internal(format!("cannot start a thread to seal shard {shard_index}: {e}")))?;
        self.sealing.push_back((shard_index, handle));
        Ok(())
    }

    fn check_usable(&self) -> Result<()> {
        if self.failed {
            return Err(Error::InvalidArgument(
                "this writer lost a shard to an earlier error and writes nothing more: pack again".into(),
            ));
        }
        Ok(())
    }

    /// Waits for the oldest shard being sealed.
    fn collect_oldest(&mut self) -> Result<()> {
        let Some((shard, h)) = self.sealing.pop_front() else { return Ok(()) };
        let sealed = h.join().map_err(|_| Error::Internal(format!("the thread sealing shard {shard} panicked")))??;
        self.collected(sealed)
    }

    fn collected(&mut self, sealed: Sealed) -> Result<()> {
        if let Err(e) = self.send(&sealed.entry.file) {
            self.failed = true;
            return Err(e);
        }
        self.shards.push(sealed.entry);
        if self.spare.len() < self.opts.threads {
            self.spare.push(sealed.buffer);
        }
        Ok(())
    }

    /// Seals the last shard and writes the signed manifest (atomically, last). For a
    /// part ([`DatasetWriter::create_part`]), writes the part file instead and returns
    /// its content: the part's shards and records, generation 0, unsigned.
    pub fn finish(mut self) -> Result<Manifest> {
        self.check_usable()?;
        if !self.field_lens.is_empty() {
            self.seal_shard()?;
        }
        while !self.sealing.is_empty() {
            self.collect_oldest()?;
        }
        let records = self.shards.iter().map(|s| s.records).sum();
        let m = Manifest {
            dataset_id: self.opts.dataset_id.clone(),
            generation: self.generation,
            created_unix: crate::time::unix_now(),
            issuer_key_id: self.issuer_id.clone(),
            schema_digest: hex::encode(self.schema.digest()),
            schema: self.schema.clone(),
            records,
            shards: std::mem::take(&mut self.shards),
            metadata: std::mem::take(&mut self.opts.metadata),
        };
        match (&self.issuer, &self.part) {
            (Some(issuer), _) => crate::dataset::write_signed_manifest(&self.dir, &m, issuer)?,
            (None, Some(part)) => {
                part.write(&self.dir, &m)?;
                if let Some(name) = part.written_name(&m) {
                    self.send(&name)?;
                }
            }
            (None, None) => return Err(Error::Internal("a writer with neither issuer key nor part".into())),
        }
        Ok(m)
    }
}

impl Drop for DatasetWriter<'_> {
    /// A writer dropped without `finish` (or after an error) waits for the shards still
    /// being sealed, so no thread outlives it writing into the directory.
    fn drop(&mut self) {
        for (_, h) in self.sealing.drain(..) {
            let _ = h.join();
        }
    }
}

/// One shard to seal: everything the sealing thread needs, owned.
struct SealJob {
    dir: PathBuf,
    /// The header, its plaintext length still to fill in.
    header: ShardHeader,
    /// Byte length of each value in `data`, record after record.
    field_lens: Vec<u64>,
    /// The zstd level of each compressed field, by schema position.
    compress: Vec<Option<i32>>,
    /// The values, back to back.
    data: Zeroizing<Vec<u8>>,
    dek: crate::keys::Dek,
    backend: Backend,
    /// The manifest entry, completed with the file's size and hash once written.
    entry: ShardEntry,
    /// A part never replaces a shard file (another part's, when ranges overlap).
    no_replace: bool,
}

/// The values of `data` (lengths `lens`, record after record) with those of the
/// fields `compress` names replaced by their zstd frames: the stored bytes and lengths.
fn compress_values(data: &[u8], lens: &[u64], compress: &[Option<i32>]) -> Result<(Zeroizing<Vec<u8>>, Vec<u64>)> {
    let mut compressors: Vec<(i32, crate::codec::Compressor)> = Vec::new();
    let mut out = Zeroizing::new(Vec::new());
    let mut stored = Vec::with_capacity(lens.len());
    let mut at = 0usize;
    for (j, &len) in lens.iter().enumerate() {
        let value = &data[at..at + len as usize];
        at += len as usize;
        // Tests store hand-made frames as they are (level 0, which no caller can set).
        let level = compress[j % compress.len()].filter(|&l| l != 0 || !cfg!(test));
        match level {
            None => {
                crate::memory::reserve_zeroizing(&mut out, value.len());
                out.extend_from_slice(value);
                stored.push(len);
            }
            Some(level) => {
                let c = match compressors.iter().position(|(l, _)| *l == level) {
                    Some(i) => &mut compressors[i].1,
                    None => {
                        compressors.push((level, crate::codec::Compressor::new(level)?));
                        &mut compressors.last_mut().ok_or_else(|| Error::Internal("no compressor".into()))?.1
                    }
                };
                stored.push(c.compress_into(value, &mut out)? as u64);
            }
        }
    }
    Ok((out, stored))
}

/// A sealed shard: its manifest entry, and its plaintext buffer wiped for reuse.
struct Sealed {
    entry: ShardEntry,
    buffer: Zeroizing<Vec<u8>>,
}

impl SealJob {
    /// Compresses the values of compressed fields, then encrypts the shard into
    /// `<file>.partial`, fsyncs it and renames it into place.
    fn run(self) -> Result<Sealed> {
        let Self { dir, mut header, field_lens, compress, mut data, dek, backend, mut entry, no_replace } = self;
        let fields = compress.len();
        let records = header.record_count;
        let packed = if compress.iter().any(Option::is_some) {
            Some(compress_values(&data, &field_lens, &compress).map_err(|e| match e {
                Error::Internal(d) => Error::Internal(format!("shard {}: {d}", entry.index)),
                e => e,
            })?)
        } else {
            None
        };
        let (stored, lens) = match &packed {
            Some((bytes, lens)) => (&bytes[..], &lens[..]),
            None => (&data[..], &field_lens[..]),
        };
        let idx = index::encode(records, fields, lens);
        header.plaintext_len = idx.len() as u64 + stored.len() as u64;
        entry.plaintext_bytes = header.plaintext_len;
        let header = header.encode();
        let final_path = dir.join(&entry.file);
        let tmp = dir.join(format!("{}.partial", entry.file));
        let taken = || {
            Error::InvalidArgument(format!(
                "{} exists: another part wrote shard {} (give each worker a disjoint range)",
                final_path.display(),
                entry.index
            ))
        };
        if no_replace && final_path.exists() {
            return Err(taken());
        }
        // A part shares its directory with other workers: never truncate or follow what is there.
        let f = if no_replace {
            std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    taken()
                } else {
                    Error::io_at("create", tmp.clone(), e)
                }
            })?
        } else {
            File::create(&tmp).map_err(Error::io("create", &tmp))?
        };
        let mut out =
            HashingWriter { inner: BufWriter::with_capacity(1 << 20, f), hash: Sha256::default(), path: &tmp };
        out.write_all(&header).map_err(Error::io("write", &tmp))?;
        let mut enc = Encryptor::new(backend, dek.expose(), &header, out)?;
        enc.write(&idx)?;
        enc.write(stored)?;
        drop(packed);
        let (out, ct_len) = enc.finish()?;
        drop(dek);
        let HashingWriter { inner, hash, .. } = out;
        let f = inner.into_inner().map_err(|e| Error::io_at("write", tmp.clone(), e.into_error()))?;
        f.sync_all().map_err(Error::io("sync", &tmp))?;
        if no_replace {
            // A hard link fails if the name exists: no part replaces another's shard.
            let linked = std::fs::hard_link(&tmp, &final_path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(taken()),
                r => r.map_err(Error::io("link", &final_path))?,
            }
        } else {
            std::fs::rename(&tmp, &final_path).map_err(Error::io("rename", &final_path))?;
        }
        entry.file_bytes = header.len() as u64 + ct_len;
        entry.sha256 = hex::encode(hash.finish());
        // Keep the allocation for a next shard but wipe its contents.
        zeroize::Zeroize::zeroize(&mut *data);
        data.clear();
        Ok(Sealed { entry, buffer: data })
    }
}

impl DatasetWriter<'static> {
    /// As [`DatasetWriter::create`], owning shared handles to the key provider and
    /// issuer key (for bindings that cannot borrow).
    pub fn create_owned(
        dir: &Path,
        schema: Schema,
        opts: PackOptions,
        keys: std::sync::Arc<dyn KeyProvider>,
        issuer: std::sync::Arc<IssuerKey>,
    ) -> Result<Self> {
        Self::create_held(dir, schema, opts, Held::Shared(keys), Signer::Key(Held::Shared(issuer)))
    }

    /// As [`DatasetWriter::create_part`], owning a shared handle to the key provider.
    pub fn create_part_owned(
        dir: &Path,
        schema: Schema,
        opts: PackOptions,
        keys: std::sync::Arc<dyn KeyProvider>,
        issuer: &crate::keys::TrustAnchor,
        part: impl Into<PartShards<'static>>,
    ) -> Result<Self> {
        Self::create_held(dir, schema, opts, Held::Shared(keys), Signer::Part(*issuer, part.into()))
    }

    /// [`DatasetWriter::create_part_at`] with the key provider shared (for bindings).
    pub fn create_part_at_owned(
        location: &str,
        schema: Schema,
        opts: PackOptions,
        keys: std::sync::Arc<dyn KeyProvider>,
        issuer: &crate::keys::TrustAnchor,
        part: impl Into<PartShards<'static>>,
        remote: &crate::remote::RemoteOptions,
    ) -> Result<Self> {
        Self::create_part_at_held(location, schema, opts, Held::Shared(keys), issuer, part.into(), remote)
    }
}

/// Who the writer packs for: the issuer key (a whole dataset), or a part for `assemble`.
enum Signer<'a> {
    Key(Held<'a, IssuerKey>),
    Part(crate::keys::TrustAnchor, PartShards<'a>),
}

/// A borrowed or shared handle.
enum Held<'a, T: ?Sized> {
    Borrowed(&'a T),
    Shared(std::sync::Arc<T>),
}

impl<T: ?Sized> std::ops::Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Borrowed(r) => r,
            Held::Shared(a) => a,
        }
    }
}

struct HashingWriter<'p, W> {
    inner: W,
    hash: Sha256,
    path: &'p Path,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    // Reading back goes through the layers above pack, by their public names.
    use crate::{
        verify, Access, Authorizer, AuthorizerConfig, DType, Dataset, Field, Keyring, Loader, Operation, ShardSet,
        Shuffle, Token, TokenSpec, VerifyOptions,
    };

    /// FORMAT.md section 12: pack never writes a shard without records, but readers
    /// accept one (its index is 24 bytes: the prologue and `off[0] = 0`).
    #[test]
    fn readers_accept_a_shard_without_records() {
        let t = tempfile::tempdir().unwrap();
        let ring = Arc::new(Keyring::create(&t.path().join("keyring.json")).unwrap());
        let issuer = IssuerKey::generate().unwrap();
        let trust = issuer.trust_anchor();
        let dir = t.path().join("ds");
        let schema = Schema::new(vec![Field::tensor("x", DType::U8, &[3]), Field::bytes("b")]).unwrap();
        let mut w = DatasetWriter::create(&dir, schema, PackOptions::new("zero"), &*ring, &issuer).unwrap();
        w.write_sample(&[&[1, 2, 3], b"one"]).unwrap();
        w.seal_shard().unwrap();
        w.seal_shard().unwrap(); // shard 1: no records
        w.write_sample(&[&[4, 5, 6], b"two"]).unwrap();
        let m = w.finish().unwrap();
        assert_eq!(m.shards.iter().map(|s| s.records).collect::<Vec<_>>(), [1, 0, 1]);
        assert_eq!(m.shards[1].plaintext_bytes, 16 + 8);

        let spec = TokenSpec {
            dataset: "zero".into(),
            principal: "tester".into(),
            shards: ShardSet::All,
            ops: vec![Operation::Read, Operation::Verify],
            expires: SystemTime::now() + Duration::from_secs(3600),
            not_before: None,
            min_generation: None,
        };
        let token = Token::issue(&issuer, &spec).unwrap();
        let ds = Dataset::open(&dir, &trust).unwrap();
        let access = Access::new(
            Authorizer::new(&trust, Some(token.clone()), AuthorizerConfig::default()).unwrap(),
            ring.clone(),
        );
        assert!(access.open_shard(&ds, 1).unwrap().is_empty());
        assert_eq!(access.open_shard(&ds, 2).unwrap().read_record(0).unwrap()[1].as_slice(), b"two");
        let r = verify(&dir, &trust, &access, &VerifyOptions::default(), &mut |_| {}).unwrap();
        assert!(r.ok, "{:?}", r.shards);
        // Dataset order numbers records shard by shard: the empty shard takes no id.
        let loader = Loader::builder(&dir)
            .key_provider(ring)
            .token_value(token)
            .trust_anchor(trust)
            .batch_size(2)
            .shuffle(Shuffle::None)
            .build()
            .unwrap();
        let ids: Vec<u64> = loader.flat_map(|b| b.unwrap().sample_ids().to_vec()).collect();
        assert_eq!(ids, [0, 1]);
    }

    fn token_for(issuer: &IssuerKey, dataset: &str) -> Token {
        let spec = TokenSpec {
            dataset: dataset.into(),
            principal: "tester".into(),
            shards: ShardSet::All,
            ops: vec![Operation::Read],
            expires: SystemTime::now() + Duration::from_secs(3600),
            not_before: None,
            min_generation: None,
        };
        Token::issue(issuer, &spec).unwrap()
    }

    /// Shards sealed on several threads come out as with one: every record in order,
    /// entries in shard order, each shard file named by its index.
    #[test]
    fn shards_sealed_on_several_threads_read_back_in_order() {
        let t = tempfile::tempdir().unwrap();
        let ring = Arc::new(Keyring::create(&t.path().join("keyring.json")).unwrap());
        let issuer = IssuerKey::generate().unwrap();
        let schema = Schema::new(vec![Field::bytes("b")]).unwrap();
        let samples: Vec<Vec<u8>> =
            (0..500u32).map(|i| format!("sample {i} ").repeat(1 + i as usize % 7).into_bytes()).collect();
        let mut read = Vec::new();
        for threads in [1, 4] {
            let dir = t.path().join(format!("ds{threads}"));
            let mut opts = PackOptions::new("par");
            opts.shard_size = 500;
            opts.threads = threads;
            let mut w = DatasetWriter::create(&dir, schema.clone(), opts, &*ring, &issuer).unwrap();
            for s in &samples {
                w.write_sample(&[s]).unwrap();
            }
            let m = w.finish().unwrap();
            assert!(m.shards.len() > 20, "{} shards", m.shards.len());
            for (i, e) in m.shards.iter().enumerate() {
                assert_eq!((e.index as usize, e.file.clone()), (i, format!("shard-{i:05}.slk")));
                assert_eq!(std::fs::metadata(dir.join(&e.file)).unwrap().len(), e.file_bytes);
            }
            let loader = Loader::builder(&dir)
                .key_provider(ring.clone())
                .token_value(token_for(&issuer, "par"))
                .trust_anchor(issuer.trust_anchor())
                .batch_size(7)
                .drop_last(false)
                .shuffle(Shuffle::None)
                .build()
                .unwrap();
            let got: Vec<Vec<u8>> = loader
                .flat_map(|b| {
                    let b = b.unwrap();
                    (0..b.len()).map(|i| b.bytes("b", i).unwrap().to_vec()).collect::<Vec<_>>()
                })
                .collect();
            read.push(got);
        }
        assert_eq!(read[0], samples);
        assert_eq!(read[1], samples);
    }

    /// Compressed fields of every kind read back exactly, through the loader (any
    /// shuffle, values spanning chunks, empty values) and through random access; the
    /// stored shard is smaller than the values.
    #[test]
    #[cfg(feature = "zstd")]
    fn compressed_fields_read_back_exactly() {
        let t = tempfile::tempdir().unwrap();
        let ring = Arc::new(Keyring::create(&t.path().join("keyring.json")).unwrap());
        let issuer = IssuerKey::generate().unwrap();
        let mut schema = Schema::new(vec![
            Field::tensor("x", DType::U16, &[20_000]),
            Field::bytes("b"),
            Field::list("tok", DType::U32),
            Field::tensor("label", DType::I64, &[]),
        ])
        .unwrap();
        let mut opts = PackOptions::new("zst");
        opts.shard_size = 300_000;
        apply_compression(&mut schema, &mut opts, &["x=zstd".into(), "b=zstd:9".into(), "tok=zstd:1".into()]).unwrap();
        let samples: Vec<[Vec<u8>; 4]> = (0..60u64)
            .map(|i| {
                let x: Vec<u8> = (0..20_000u64).flat_map(|k| (((k * (i + 1)) % 300) as u16).to_le_bytes()).collect();
                let b =
                    if i % 5 == 0 { Vec::new() } else { format!("caption {i} ").repeat(i as usize * 40).into_bytes() };
                let tok: Vec<u8> = (0..(i * 37) as u32).flat_map(|k| (k % 1000).to_le_bytes()).collect();
                [x, b, tok, (i as i64).to_le_bytes().to_vec()]
            })
            .collect();
        let dir = t.path().join("ds");
        let mut w = DatasetWriter::create(&dir, schema, opts, &*ring, &issuer).unwrap();
        for s in &samples {
            w.write_sample(&[&s[0], &s[1], &s[2], &s[3]]).unwrap();
        }
        let raw = w.bytes_in();
        let m = w.finish().unwrap();
        let stored: u64 = m.shards.iter().map(|e| e.file_bytes).sum();
        assert!(m.shards.len() > 3 && stored * 4 < raw, "{} shards, {stored} bytes stored for {raw}", m.shards.len());
        assert_eq!(m.schema.fields[0].compress, Some(crate::format::Compression::Zstd));
        assert_eq!(m.schema.fields[3].compress, None);
        for shuffle in [Shuffle::None, Shuffle::Global] {
            let loader = Loader::builder(&dir)
                .key_provider(ring.clone())
                .token_value(token_for(&issuer, "zst"))
                .trust_anchor(issuer.trust_anchor())
                .batch_size(7)
                .drop_last(false)
                .shuffle(shuffle)
                .build()
                .unwrap();
            let mut seen = 0;
            for b in loader {
                let b = b.unwrap();
                let x = b.tensor::<u16>("x").unwrap();
                let labels = b.tensor::<i64>("label").unwrap();
                for (j, &id) in b.sample_ids().iter().enumerate() {
                    let s = &samples[id as usize];
                    assert_eq!(labels.data[j], id as i64);
                    assert_eq!(bytemuck::cast_slice::<u16, u8>(&x.data[j * 20_000..(j + 1) * 20_000]), &s[0][..]);
                    assert_eq!(b.bytes("b", j).unwrap(), &s[1][..]);
                    assert_eq!(b.bytes("tok", j).unwrap(), &s[2][..]);
                    seen += 1;
                }
            }
            assert_eq!(seen, samples.len());
        }
        let ds = Dataset::open(&dir, &issuer.trust_anchor()).unwrap();
        let access = Access::new(
            Authorizer::new(&issuer.trust_anchor(), Some(token_for(&issuer, "zst")), AuthorizerConfig::default())
                .unwrap(),
            ring.clone(),
        );
        let mut r = access.open_shard(&ds, 1).unwrap();
        let first = m.shards[0].records as usize;
        let rec = r.read_record(0).unwrap();
        assert!(rec.iter().map(|v| v.to_vec()).eq(samples[first].iter().cloned()));
    }

    /// Stored frames that lie (a declared length above or below their content, a
    /// tensor frame of the wrong length, trailing bytes, not a frame at all) are typed
    /// errors naming shard, record and field, from the loader and random access.
    #[test]
    #[cfg(feature = "zstd")]
    fn frames_that_do_not_decompress_as_declared_are_typed_errors() {
        let t = tempfile::tempdir().unwrap();
        let ring = Arc::new(Keyring::create(&t.path().join("keyring.json")).unwrap());
        let issuer = IssuerKey::generate().unwrap();
        let frame = |v: &[u8]| {
            let mut out = Zeroizing::new(Vec::new());
            crate::codec::Compressor::new(3).unwrap().compress_into(v, &mut out).unwrap();
            out.to_vec()
        };
        let good = frame(&[5u8; 1000]);
        // A single-segment frame of 1000 bytes: magic, descriptor, then the content size
        // in 2 bytes as size - 256 (RFC 8878 3.1.1.1.4). Patch it to declare one byte
        // fewer (the content would overrun: a bomb) or one more.
        let fcs_at = 5;
        assert_eq!(u16::from_le_bytes([good[5], good[6]]), 1000 - 256, "{:x?}", &good[..8]);
        let mut fewer = good.clone();
        fewer[fcs_at] -= 1;
        let mut more = good.clone();
        more[fcs_at] += 1;
        let mut trailing = good.clone();
        trailing.push(0);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("bomb", fewer, "does not decompress"),
            ("short", more, "does not decompress"),
            ("trailing", trailing, "follow the zstd frame"),
            ("plain", b"no frame here".to_vec(), "magic"),
            ("tensor", frame(&[1u8; 999]), "schema"),
        ];
        for (name, bad, want) in cases {
            let dir = t.path().join(name);
            let mut schema = Schema::new(vec![Field::tensor("x", DType::U8, &[1000]), Field::bytes("b")]).unwrap();
            let mut opts = PackOptions::new("bad");
            apply_compression(&mut schema, &mut opts, &["x=zstd".into(), "b=zstd".into()]).unwrap();
            let mut w = DatasetWriter::create(&dir, schema, opts, &*ring, &issuer).unwrap();
            // Level 0: store the values as the frames they already are.
            w.opts.zstd_levels.insert("x".into(), 0);
            w.opts.zstd_levels.insert("b".into(), 0);
            // Hand-made frames are not the tensor's 1000 bytes long.
            w.fixed[0] = None;
            for i in 0..3 {
                let x = if name == "tensor" && i == 1 { &bad } else { &good };
                let b = if name != "tensor" && i == 1 { &bad } else { &good };
                w.write_sample(&[x, b]).unwrap();
            }
            w.finish().unwrap();
            let loader = Loader::builder(&dir)
                .key_provider(ring.clone())
                .token_value(token_for(&issuer, "bad"))
                .trust_anchor(issuer.trust_anchor())
                .batch_size(3)
                .shuffle(Shuffle::None)
                .build()
                .unwrap();
            let mut loader = loader;
            let e = loader.find_map(|b| b.err()).unwrap_or_else(|| panic!("{name}: no error"));
            let text = e.to_string();
            assert_eq!(e.code(), "decompress", "{name}: {text}");
            assert!(text.contains(want) && text.contains("record 1"), "{name}: {text}");
            let field = if name == "tensor" { "\"x\"" } else { "\"b\"" };
            assert!(text.contains(field) && text.contains("shard 0"), "{name}: {text}");
            let ds = Dataset::open(&dir, &issuer.trust_anchor()).unwrap();
            let access = Access::new(
                Authorizer::new(&issuer.trust_anchor(), Some(token_for(&issuer, "bad")), AuthorizerConfig::default())
                    .unwrap(),
                ring.clone(),
            );
            let mut r = access.open_shard(&ds, 0).unwrap();
            assert!(r.read_record(0).is_ok(), "{name}");
            assert_eq!(r.read_record(1).unwrap_err().code(), "decompress", "{name}");
        }
    }

    /// A shard that fails on its sealing thread is an error from the writer (not a
    /// panic, not a hang), and no manifest is written.
    #[test]
    fn a_shard_that_fails_on_its_sealing_thread_is_an_error_and_no_manifest_is_written() {
        let t = tempfile::tempdir().unwrap();
        let ring = Keyring::create(&t.path().join("keyring.json")).unwrap();
        let issuer = IssuerKey::generate().unwrap();
        let dir = t.path().join("ds");
        let mut opts = PackOptions::new("fail");
        opts.shard_size = 100;
        opts.threads = 2;
        let schema = Schema::new(vec![Field::bytes("b")]).unwrap();
        let mut w = DatasetWriter::create(&dir, schema, opts, &ring, &issuer).unwrap();
        // The output directory vanishes: every shard sealed from now on fails to open its file.
        std::fs::remove_dir_all(&dir).unwrap();
        let mut first = None;
        for i in 0..50u32 {
            if let Err(e) = w.write_sample(&[&[i as u8; 60]]) {
                first = Some(e);
                break;
            }
        }
        let e = first.expect("50 samples of 60 bytes in 100-byte shards seal shards that must fail");
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("shard-0000"), "{e}");
        // The writer lost a shard: it writes nothing more, and no manifest with a gap.
        std::fs::create_dir_all(&dir).unwrap();
        let again = w.write_sample(&[&[1u8; 60]]).unwrap_err().to_string();
        assert!(again.contains("lost a shard"), "{again}");
        assert!(w.finish().unwrap_err().to_string().contains("lost a shard"));
        assert!(!dir.join(FILE_NAME).exists());
    }
}
