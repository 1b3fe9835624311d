//! Packing: samples -> records -> index -> Cobblestone-256 payload per shard, DEKs
//! wrapped by the key provider, manifest signed by the issuer key.

mod inputs;
mod npy;

pub use inputs::{pack_paths, InputSource};
pub use npy::NpyArray;

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
    issuer: Held<'a, IssuerKey>,
    fixed: Vec<Option<u64>>,
    field_lens: Vec<u64>,
    data: Zeroizing<Vec<u8>>,
    shards: Vec<ShardEntry>,
    samples: u64,
    bytes_in: u64,
    generation: u64,
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
        Self::create_held(dir, schema, opts, Held::Borrowed(keys), Held::Borrowed(issuer))
    }

    fn create_held(
        dir: &Path,
        schema: Schema,
        opts: PackOptions,
        keys: Held<'a, dyn KeyProvider + 'a>,
        issuer: Held<'a, IssuerKey>,
    ) -> Result<Self> {
        validate_dataset_id(&opts.dataset_id).map_err(Error::InvalidArgument)?;
        schema.validate().map_err(|e| Error::InvalidArgument(format!("schema: {e}")))?;
        if opts.shard_size == 0 {
            return Err(Error::InvalidArgument("shard size must be > 0".into()));
        }
        std::fs::create_dir_all(dir).map_err(Error::io("create directory", dir))?;
        let manifest = dir.join(FILE_NAME);
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
        Ok(Self {
            dir: dir.to_owned(),
            opts,
            schema,
            keys,
            issuer,
            fixed,
            field_lens: Vec::new(),
            data: Zeroizing::new(Vec::new()),
            shards: Vec::new(),
            samples: 0,
            bytes_in: 0,
            generation,
        })
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
            if matches!(field.kind, FieldKind::Tensor { dtype: DType::Bool, .. }) && v.iter().any(|&b| b > 1) {
                return Err(Error::Schema {
                    sample: self.samples,
                    detail: format!("field {:?} is bool: every byte must be 0 or 1", field.name),
                });
            }
        }
        let size: u64 = values.iter().map(|v| v.len() as u64).sum();
        if !self.field_lens.is_empty() && self.data.len() as u64 + size > self.opts.shard_size {
            self.seal_shard()?;
        }
        reserve_zeroizing(&mut self.data, size as usize);
        for v in values {
            self.data.extend_from_slice(v);
            self.field_lens.push(v.len() as u64);
        }
        self.samples += 1;
        self.bytes_in += size;
        Ok(())
    }

    fn seal_shard(&mut self) -> Result<()> {
        let shard_index =
            u32::try_from(self.shards.len()).map_err(|_| Error::InvalidArgument("more than 2^32 shards".into()))?;
        let fields = self.fixed.len();
        let records = (self.field_lens.len() / fields) as u64;
        let idx = index::encode(records, fields, &self.field_lens);
        let plaintext_len = idx.len() as u64 + self.data.len() as u64;
        let mut shard_id = [0u8; 16];
        crypto::random_bytes(&mut shard_id)?;
        let header = ShardHeader {
            dataset_id: self.opts.dataset_id.clone(),
            shard_index,
            shard_id,
            schema_digest: self.schema.digest(),
            record_count: records,
            plaintext_len,
        };
        let header_bytes = header.encode();
        // The DEK and its wrap first: custody that makes data keys (KMS, Transit) draws
        // it, and a custody failure stops before any ciphertext is written.
        let (issuer, id_hex) = (self.issuer.trust_anchor().key_id(), hex::encode(shard_id));
        let ctx =
            WrapContext { dataset: &self.opts.dataset_id, shard: shard_index, shard_id: &id_hex, issuer: &issuer };
        let (dek, kek_id, wrapped) = self.keys.generate_dek_for(&ctx)?;
        let file = format!("shard-{shard_index:05}.slk");
        let final_path = self.dir.join(&file);
        let tmp = self.dir.join(format!("{file}.partial"));
        let f = File::create(&tmp).map_err(Error::io("create", &tmp))?;
        let mut out =
            HashingWriter { inner: BufWriter::with_capacity(1 << 20, f), hash: Sha256::default(), path: &tmp };
        out.write_all(&header_bytes).map_err(Error::io("write", &tmp))?;
        let mut enc = Encryptor::new(self.opts.backend, dek.expose(), &header_bytes, out)?;
        enc.write(&idx)?;
        enc.write(&self.data)?;
        let (out, ct_len) = enc.finish()?;
        let HashingWriter { inner, hash, .. } = out;
        let f = inner.into_inner().map_err(|e| Error::io_at("write", tmp.clone(), e.into_error()))?;
        f.sync_all().map_err(Error::io("sync", &tmp))?;
        std::fs::rename(&tmp, &final_path).map_err(Error::io("rename", &final_path))?;
        self.shards.push(ShardEntry {
            index: shard_index,
            id: hex::encode(shard_id),
            file,
            records,
            plaintext_bytes: plaintext_len,
            file_bytes: header_bytes.len() as u64 + ct_len,
            sha256: hex::encode(hash.finish()),
            kek_id,
            wrapped_dek: hex::encode(wrapped),
        });
        self.field_lens.clear();
        // Keep the allocation for the next shard but wipe its contents.
        zeroize::Zeroize::zeroize(&mut *self.data);
        self.data.clear();
        Ok(())
    }

    /// Seals the last shard and writes the signed manifest (atomically, last).
    pub fn finish(mut self) -> Result<Manifest> {
        if !self.field_lens.is_empty() {
            self.seal_shard()?;
        }
        let records = self.shards.iter().map(|s| s.records).sum();
        let m = Manifest {
            dataset_id: self.opts.dataset_id.clone(),
            generation: self.generation,
            created_unix: crate::time::unix_now(),
            issuer_key_id: self.issuer.trust_anchor().key_id(),
            schema_digest: hex::encode(self.schema.digest()),
            schema: self.schema.clone(),
            records,
            shards: std::mem::take(&mut self.shards),
        };
        crate::dataset::write_signed_manifest(&self.dir, &m, &self.issuer)?;
        Ok(m)
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
        Self::create_held(dir, schema, opts, Held::Shared(keys), Held::Shared(issuer))
    }
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

/// Grows `buf` for `additional` more bytes without leaving plaintext in a freed
/// allocation: a larger buffer is allocated, filled, and the old one zeroized on drop.
fn reserve_zeroizing(buf: &mut Zeroizing<Vec<u8>>, additional: usize) {
    let need = buf.len().saturating_add(additional);
    if need <= buf.capacity() {
        return;
    }
    let mut bigger = Zeroizing::new(Vec::with_capacity(need.max(buf.capacity().saturating_mul(2)).max(1 << 16)));
    bigger.extend_from_slice(buf);
    std::mem::swap(buf, &mut bigger);
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
}
