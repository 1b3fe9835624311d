//! Shared fixtures for integration tests: keys, small datasets, a `.npy` writer.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shardlock::Backend;
use shardlock::{Access, Authorizer, AuthorizerConfig, Operation, ShardSet, Token, TokenSpec};
use shardlock::{DType, Field, Schema};
use shardlock::{Dataset, Loader, LoaderBuilder};
use shardlock::{DatasetWriter, PackOptions};
use shardlock::{IssuerKey, KeyProvider, Keyring, TrustAnchor};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub keyring: Arc<Keyring>,
    pub issuer: IssuerKey,
    pub trust: TrustAnchor,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Arc::new(Keyring::create(&dir.path().join("keyring.json")).unwrap());
        let issuer = IssuerKey::generate().unwrap();
        let trust = issuer.trust_anchor();
        Self { dir, keyring, issuer, trust }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Packs `samples` (one Vec per field) with `schema` into `name`.
    pub fn pack(
        &self,
        name: &str,
        dataset_id: &str,
        schema: Schema,
        samples: &[Vec<Vec<u8>>],
        shard_size: u64,
    ) -> PathBuf {
        self.pack_with(&*self.keyring, name, dataset_id, schema, samples, shard_size)
    }

    /// [`Fixture::pack`] with DEKs wrapped by `keys`.
    pub fn pack_with(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        dataset_id: &str,
        schema: Schema,
        samples: &[Vec<Vec<u8>>],
        shard_size: u64,
    ) -> PathBuf {
        let out = self.path(name);
        let mut opts = PackOptions::new(dataset_id);
        opts.shard_size = shard_size;
        opts.force = true;
        let mut w = DatasetWriter::create(&out, schema, opts, keys, &self.issuer).unwrap();
        for s in samples {
            let refs: Vec<&[u8]> = s.iter().map(|v| v.as_slice()).collect();
            w.write_sample(&refs).unwrap();
        }
        w.finish().unwrap();
        out
    }

    /// A dataset of `n` records: a fixed `u8[700]` field `x` and a bytes field `tag`,
    /// 4 records per shard, so shards have equal sizes and span several chunks.
    pub fn standard(&self, name: &str, dataset_id: &str, n: usize) -> (PathBuf, Vec<Vec<Vec<u8>>>) {
        self.standard_with(&*self.keyring, name, dataset_id, n)
    }

    /// [`Fixture::standard`] with DEKs wrapped by `keys`.
    pub fn standard_with(
        &self,
        keys: &dyn KeyProvider,
        name: &str,
        dataset_id: &str,
        n: usize,
    ) -> (PathBuf, Vec<Vec<Vec<u8>>>) {
        let schema = Schema::new(vec![Field::tensor("x", DType::U8, &[700]), Field::bytes("tag")]).unwrap();
        let samples: Vec<Vec<Vec<u8>>> = (0..n)
            .map(|i| vec![(0..700).map(|j| ((i * 7 + j) % 251) as u8).collect(), format!("s{i:04}").into_bytes()])
            .collect();
        // 4 records of 705 bytes = 2820 bytes per shard; large shards of several chunks below.
        let out = self.pack_with(keys, name, dataset_id, schema, &samples, 4 * 705);
        (out, samples)
    }

    pub fn open(&self, dir: &Path) -> shardlock::Result<Dataset> {
        Dataset::open(dir, &self.trust)
    }

    /// A token for every shard of `dataset`, read and verify, valid for an hour.
    pub fn token(&self, dataset: &str) -> Token {
        let spec = TokenSpec {
            dataset: dataset.into(),
            principal: "tester".into(),
            shards: ShardSet::All,
            ops: vec![Operation::Read, Operation::Verify],
            expires: SystemTime::now() + Duration::from_secs(3600),
            not_before: None,
            min_generation: None,
        };
        Token::issue(&self.issuer, &spec).unwrap()
    }

    /// A loader over `dir` with `keys` and a full token for `dataset`, trusting the
    /// fixture's issuer; everything else at its default.
    pub fn loader_with(&self, dir: &Path, dataset: &str, keys: Arc<dyn KeyProvider>) -> LoaderBuilder {
        Loader::builder(dir).key_provider(keys).token_value(self.token(dataset)).trust_anchor(self.trust)
    }

    /// [`Fixture::loader_with`] the fixture's keyring.
    pub fn loader(&self, dir: &Path, dataset: &str) -> LoaderBuilder {
        self.loader_with(dir, dataset, self.keyring.clone())
    }

    /// A gate over `keys` with a full token for `dataset`.
    pub fn access_with(&self, dataset: &str, keys: Arc<dyn KeyProvider>) -> Access {
        let auth = Authorizer::new(&self.trust, Some(self.token(dataset)), AuthorizerConfig::default()).unwrap();
        Access::new(auth, keys).with_backend(Backend::default())
    }

    /// A gate over the fixture's keyring with a full token for `dataset`.
    pub fn access(&self, dataset: &str) -> Access {
        self.access_with(dataset, self.keyring.clone())
    }

    /// Opens shard `i` through the access gate.
    pub fn open_shard(&self, ds: &Dataset, i: u32) -> shardlock::Result<shardlock::ShardReader> {
        self.access(&ds.manifest().dataset_id).open_shard(ds, i)
    }

    /// Rewrites `ds`'s manifest with `edit` applied to its body and signs it with the
    /// fixture's issuer key, as a buggy or malicious writer holding that key would.
    pub fn resign(&self, ds: &Path, edit: impl FnOnce(&mut shardlock::Manifest)) {
        use shardlock::primitives::SignedManifest;
        let path = ds.join("manifest.json");
        let mut m = SignedManifest::parse(&std::fs::read(&path).unwrap(), &path).unwrap().manifest;
        edit(&mut m);
        let body = serde_json::to_vec_pretty(&m).unwrap();
        let sig = self.issuer.sign(&SignedManifest::signed_message(&body)).unwrap();
        std::fs::write(&path, SignedManifest::encode(&body, &sig).unwrap()).unwrap();
    }

    /// One epoch of `dir` through `keys` (batches of 4, global shuffle, 2 workers):
    /// sample id -> the bytes of its `field`.
    pub fn epoch_field(
        &self,
        dir: &Path,
        dataset: &str,
        keys: Arc<dyn KeyProvider>,
        field: &str,
    ) -> shardlock::Result<std::collections::HashMap<u64, Vec<u8>>> {
        let mut out = std::collections::HashMap::new();
        let l = self
            .loader_with(dir, dataset, keys)
            .batch_size(4)
            .shuffle(shardlock::Shuffle::Global)
            .workers(2)
            .build()?;
        for b in l {
            let b = b?;
            for (j, &id) in b.sample_ids().iter().enumerate() {
                out.insert(id, b.bytes(field, j)?.to_vec());
            }
        }
        Ok(out)
    }

    /// Reads every record of every shard.
    pub fn read_all(&self, dir: &Path) -> shardlock::Result<Vec<Vec<Vec<u8>>>> {
        self.read_all_with(dir, self.keyring.clone())
    }

    /// [`Fixture::read_all`] with DEKs unwrapped by `keys`.
    pub fn read_all_with(&self, dir: &Path, keys: Arc<dyn KeyProvider>) -> shardlock::Result<Vec<Vec<Vec<u8>>>> {
        let ds = self.open(dir)?;
        let access = self.access_with(&ds.manifest().dataset_id, keys);
        let mut out = Vec::new();
        for i in 0..ds.manifest().shards.len() as u32 {
            let mut r = access.open_shard(&ds, i)?;
            for rec in 0..r.len() {
                out.push(r.read_record(rec)?.into_iter().map(|v| v.to_vec()).collect());
            }
        }
        Ok(out)
    }
}

/// Writes a little-endian C-order `.npy` (version 1.0).
pub fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let shape_s = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Flips one bit of a file at `offset`.
pub fn flip(path: &Path, offset: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[offset] ^= 0x01;
    std::fs::write(path, b).unwrap();
}

/// A PNG (8-bit, colour type 2 RGB or 0 gray) of `pixels`, rows top to bottom.
pub fn png(w: u32, h: u32, channels: usize, pixels: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut raw = Vec::new();
    for row in pixels.chunks(w as usize * channels) {
        raw.push(0u8); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).unwrap();
    let idat = z.finish().unwrap();
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, if channels == 3 { 2 } else { 0 }, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &idat);
    chunk(b"IEND", &[]);
    out
}
