//! [`LoaderBuilder`]: every setting of a [`Loader`], checked once, and the [`Session`]
//! that the loader's epochs share.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::loader::Loader;
use super::plan::{PlanSpec, Remainder, Shuffle};
use crate::access::Access;
use crate::audit::{AuditEvent, AuditLog};
use crate::auth::{Authorizer, AuthorizerConfig, Token};
use crate::crypto::aead::Backend;
use crate::dataset::Dataset;
use crate::decode::{ImageDecode, OnDecodeError};
use crate::error::{Error, Result};
use crate::format::Schema;
use crate::keys::{KeyProvider, TrustAnchor};
use crate::memory::{BatchPool, MemoryPolicy};
use crate::remote::{Location, RemoteOptions};

/// Default in-flight memory budget for batch buffers.
pub const DEFAULT_MEMORY_BUDGET: u64 = 512 << 20;

enum TokenSource {
    None,
    File(PathBuf),
    Token(Box<Token>),
}

/// Builds a [`Loader`]. Everything but the dataset path, a key provider, a token and
/// a trust anchor has a default.
pub struct LoaderBuilder {
    path: PathBuf,
    keys: Option<Arc<dyn KeyProvider>>,
    keyring_path: Option<PathBuf>,
    token: TokenSource,
    trust: Option<TrustAnchor>,
    trust_path: Option<PathBuf>,
    batch_size: usize,
    shuffle: Shuffle,
    window_shards: usize,
    run: Option<usize>,
    seed: u64,
    rank: u32,
    world: u32,
    dataloader_worker: (u32, u32),
    drop_last: bool,
    remainder: Remainder,
    fields: Option<Vec<String>>,
    workers: Option<usize>,
    memory_budget: u64,
    memory_policy: MemoryPolicy,
    backend: Backend,
    auth_cfg: AuthorizerConfig,
    audit_log: Option<PathBuf>,
    min_generation: Option<u64>,
    remote: RemoteOptions,
    decode: Vec<(String, ImageDecode)>,
    on_decode_error: OnDecodeError,
}

impl LoaderBuilder {
    pub(super) fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            keys: None,
            keyring_path: None,
            token: TokenSource::None,
            trust: None,
            trust_path: None,
            batch_size: 32,
            shuffle: Shuffle::Window,
            window_shards: 4,
            run: None,
            seed: 0,
            rank: 0,
            world: 1,
            dataloader_worker: (0, 1),
            drop_last: true,
            remainder: Remainder::Drop,
            fields: None,
            workers: None,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            memory_policy: MemoryPolicy::RequireLocked,
            backend: Backend::default(),
            auth_cfg: AuthorizerConfig::default(),
            audit_log: None,
            min_generation: None,
            remote: RemoteOptions::default(),
            decode: Vec::new(),
            on_decode_error: OnDecodeError::Raise,
        }
    }

    /// Decodes bytes field `field` (JPEG, PNG or WebP values) on the decrypt workers
    /// into a fixed-shape image tensor per `spec` (feature `image`; docs/DECODE.md).
    /// The binary must install [`crate::ScratchAlloc`] as its global allocator, so the
    /// decoders' own buffers are locked, unless unlocked memory is allowed.
    pub fn decode(mut self, field: impl Into<String>, spec: ImageDecode) -> Self {
        let field = field.into();
        self.decode.retain(|(f, _)| *f != field);
        self.decode.push((field, spec));
        self
    }

    /// What a sample whose image does not decode does: fail the batch (default) or be
    /// left out, audited and counted.
    pub fn on_decode_error(mut self, e: OnDecodeError) -> Self {
        self.on_decode_error = e;
        self
    }

    /// Settings for an `s3://bucket/prefix` path: endpoint, region, credentials (else
    /// from the AWS environment variables), cache directory and byte budget, retry
    /// timeouts. Ignored for a local dataset.
    pub fn remote_options(mut self, opts: RemoteOptions) -> Self {
        self.remote = opts;
        self
    }

    /// Cache directory for an `s3://` dataset (ciphertext only; see [`RemoteOptions`]).
    pub fn cache_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.remote.cache_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Keyring file (the embedded default key custody), or a PKCS#11 URI
    /// (`pkcs11:token=...;object=...?module-path=...&pin-source=...`, see
    /// `shardlock::pkcs11`, feature `pkcs11`), or a key service's `https://` URL (feature
    /// `key-service`; TLS files from the environment, or build a
    /// `service::KeyServiceProvider` and pass it to [`LoaderBuilder::key_provider`]):
    /// anything [`crate::open_provider`] accepts.
    pub fn keyring(mut self, path: impl AsRef<Path>) -> Self {
        self.keyring_path = Some(path.as_ref().to_owned());
        self
    }

    /// Any key provider (an HSM, a test double).
    pub fn key_provider(mut self, keys: Arc<dyn KeyProvider>) -> Self {
        self.keys = Some(keys);
        self
    }

    /// Access token file.
    pub fn token(mut self, path: impl AsRef<Path>) -> Self {
        self.token = TokenSource::File(path.as_ref().to_owned());
        self
    }

    /// An already loaded token.
    pub fn token_value(mut self, token: Token) -> Self {
        self.token = TokenSource::Token(Box::new(token));
        self
    }

    /// Issuer public key file (`.pub`): the trust anchor.
    pub fn trust(mut self, path: impl AsRef<Path>) -> Self {
        self.trust_path = Some(path.as_ref().to_owned());
        self
    }

    /// The trust anchor as a value.
    pub fn trust_anchor(mut self, trust: TrustAnchor) -> Self {
        self.trust = Some(trust);
        self
    }

    /// Samples per batch (default 32).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Shuffle mode (default `Window`).
    pub fn shuffle(mut self, s: Shuffle) -> Self {
        self.shuffle = s;
        self
    }

    /// Window shuffle: shards per window (default 4) and records per run (default:
    /// about 256 KiB of samples).
    pub fn window(mut self, shards: usize, run: Option<usize>) -> Self {
        self.window_shards = shards;
        self.run = run;
        self
    }

    /// Seed of every epoch's order (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// This process's rank and the world size (default 0 of 1).
    pub fn rank(mut self, rank: u32, world: u32) -> Self {
        self.rank = rank;
        self.world = world;
        self
    }

    /// Makes this loader DataLoader worker `id` of `count` on its rank (default 0 of
    /// 1): of the batches the rank reads each epoch it yields numbers `id`,
    /// `id + count`, `id + 2 * count`, ..., so `count` such loaders read the rank's
    /// epoch between them, a PyTorch DataLoader that takes one batch from each worker
    /// in turn delivers the rank's batches in order, and `drop_last` drops at most one
    /// partial batch per rank (not one per worker). `shardlock.torch.IterableDataset`
    /// sets it in each worker.
    pub fn dataloader_worker(mut self, id: u32, count: u32) -> Self {
        self.dataloader_worker = (id, count);
        self
    }

    /// Drop a last partial batch (default true).
    pub fn drop_last(mut self, v: bool) -> Self {
        self.drop_last = v;
        self
    }

    /// How ranks get equal sample counts (default drop).
    pub fn remainder(mut self, r: Remainder) -> Self {
        self.remainder = r;
        self
    }

    /// Read only these fields (default all).
    pub fn fields<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.fields = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Decrypt worker threads (default: available cores).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// Bytes of batch buffers in flight (default 512 MiB).
    pub fn memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = bytes;
        self
    }

    /// Accept unlocked memory when the memlock limit is too low (audited): for batch
    /// buffers, the workers' chunk caches and the scratch of shard opens.
    pub fn allow_unlocked_memory(mut self, allow: bool) -> Self {
        self.memory_policy = if allow { MemoryPolicy::AllowUnlocked } else { MemoryPolicy::RequireLocked };
        self
    }

    /// AEAD backend.
    pub fn backend(mut self, b: Backend) -> Self {
        self.backend = b;
        self
    }

    /// Authorizer settings (clock skew, deny list, clock).
    pub fn authorizer_config(mut self, cfg: AuthorizerConfig) -> Self {
        self.auth_cfg = cfg;
        self
    }

    /// Allowed clock difference between the token's issuer and this reader (default
    /// 30 s, at most the authorizer's maximum), applied to the token's expiry and
    /// not-before.
    pub fn clock_skew(mut self, skew: std::time::Duration) -> Self {
        self.auth_cfg.skew = skew;
        self
    }

    /// Deny-list file of revoked token ids.
    pub fn deny_list(mut self, path: impl AsRef<Path>) -> Self {
        self.auth_cfg.deny_list = Some(path.as_ref().to_owned());
        self
    }

    /// Audit log file.
    pub fn audit_log(mut self, path: impl AsRef<Path>) -> Self {
        self.audit_log = Some(path.as_ref().to_owned());
        self
    }

    /// Refuse manifests older than this generation.
    pub fn min_generation(mut self, g: u64) -> Self {
        self.min_generation = Some(g);
        self
    }

    /// Verifies the manifest and builds the loader. No shard is opened (and no key
    /// unwrapped) until iteration reaches it.
    pub fn build(self) -> Result<Loader> {
        if self.batch_size == 0 {
            return Err(Error::InvalidArgument("batch_size must be at least 1".into()));
        }
        if self.world > super::plan::MAX_WORLD {
            return Err(Error::InvalidArgument(format!(
                "world size {} is more than the {} ranks a loader supports",
                self.world,
                super::plan::MAX_WORLD
            )));
        }
        if self.world == 0 || self.rank >= self.world {
            return Err(Error::InvalidArgument(format!("rank {} is not in 0..world_size {}", self.rank, self.world)));
        }
        let (worker, count) = self.dataloader_worker;
        if count == 0 || worker >= count || count > super::plan::MAX_WORLD {
            return Err(Error::InvalidArgument(format!(
                "DataLoader worker {worker} of {count}: need 0 <= worker < count <= {}",
                super::plan::MAX_WORLD
            )));
        }
        let trust = match (self.trust, &self.trust_path) {
            (Some(t), _) => t,
            (None, Some(p)) => TrustAnchor::load(p)?,
            (None, None) => return Err(Error::InvalidArgument("a trust anchor is required (trust=FILE.pub)".into())),
        };
        let keys: Arc<dyn KeyProvider> = match (self.keys, &self.keyring_path) {
            (Some(k), _) => k,
            (None, Some(p)) => crate::keys::open_provider_path(p)?,
            (None, None) => return Err(Error::InvalidArgument("a keyring or key provider is required".into())),
        };
        let ds = Dataset::open_location(&Location::from_path(&self.path)?, &trust, &self.remote)?;
        if let Some(g) = self.min_generation {
            ds.require_generation(g)?;
        }
        let authorizer = match self.token {
            TokenSource::None => Authorizer::new(&trust, None, self.auth_cfg)?,
            TokenSource::Token(t) => Authorizer::new(&trust, Some(*t), self.auth_cfg)?,
            TokenSource::File(p) => Authorizer::from_file(&trust, Some(&p), self.auth_cfg)?,
        };
        let mut access =
            Access::new(authorizer, keys).with_backend(self.backend).with_memory_policy(self.memory_policy);
        if let Some(p) = &self.audit_log {
            access = access.with_audit(Arc::new(AuditLog::open(p)?));
        }
        let schema = ds.manifest().schema.clone();
        let selected = select_fields(&schema, self.fields.as_deref())?;
        if !cfg!(feature = "zstd") {
            if let Some(f) = selected.iter().map(|&i| &schema.fields[i]).find(|f| f.compress.is_some()) {
                return Err(Error::InvalidArgument(format!(
                    "field {:?} is stored compressed ({}), and this build of shardlock has no zstd support: \
                     turn on the `zstd` feature, or leave the field out with `fields`",
                    f.name,
                    f.compress.map_or("", |c| c.name())
                )));
            }
        }
        let mut decode: Vec<Option<ImageDecode>> = vec![None; selected.len()];
        for (name, spec) in &self.decode {
            let Some(si) = selected.iter().position(|&pf| schema.fields[pf].name == *name) else {
                let all: Vec<&str> = selected.iter().map(|&i| schema.fields[i].name.as_str()).collect();
                return Err(Error::InvalidArgument(format!(
                    "decode names field {name:?}, which is not among the loader's fields ({})",
                    all.join(", ")
                )));
            };
            crate::decode::check_supported(&schema.fields[selected[si]], spec, self.memory_policy)?;
            decode[si] = Some(spec.clone());
        }
        let m = ds.manifest();
        // Samples are addressed as (shard: u32, record: u32).
        if let Some(s) = m.shards.iter().find(|s| s.records > u64::from(u32::MAX)) {
            return Err(Error::Format {
                what: "manifest",
                path: ds.dir().join(crate::format::manifest::FILE_NAME),
                detail: format!(
                    "shard {} has {} records; the loader reads at most 2^32-1 per shard",
                    s.index, s.records
                ),
            });
        }
        let records: Vec<u64> = m.shards.iter().map(|s| s.records).collect();
        let avg_sample: u64 = {
            let plain: u64 = m.shards.iter().map(|s| s.plaintext_bytes).sum();
            plain.checked_div(m.records.max(1)).unwrap_or(0).max(1)
        };
        let run = self.run.unwrap_or_else(|| ((256 << 10) / avg_sample).clamp(1, 4096) as usize);
        let est_batch = estimate_batch_bytes(&schema, &selected, &decode, avg_sample, self.batch_size);
        let depth = ((self.memory_budget / est_batch.max(1)).saturating_sub(1)).clamp(1, 256) as usize;
        let workers =
            self.workers.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)).max(1);
        if self.memory_policy == MemoryPolicy::AllowUnlocked {
            access.record(&AuditEvent {
                event: "unlocked_memory_allowed",
                principal: access.authorizer().principal().to_owned(),
                token_id: access.authorizer().token_id().to_owned(),
                dataset: Some(m.dataset_id.clone()),
                detail: Some("the caller allowed batch buffers that are not locked in RAM".into()),
                ..Default::default()
            })?;
        }
        let mut prefix = Vec::with_capacity(records.len());
        let mut acc = 0u64;
        for r in &records {
            prefix.push(acc);
            acc += r;
        }
        let spec = PlanSpec {
            records,
            shuffle: self.shuffle,
            window_shards: self.window_shards,
            run,
            seed: self.seed,
            block: self.batch_size,
            remainder: self.remainder,
        };
        let session = Arc::new(Session {
            ds,
            access,
            pool: BatchPool::new(self.memory_policy),
            selected,
            prefix,
            spec,
            batch_size: self.batch_size,
            drop_last: self.drop_last,
            workers,
            depth,
            policy: self.memory_policy,
            decode,
            on_decode_error: self.on_decode_error,
            decode_skips: std::sync::atomic::AtomicU64::new(0),
        });
        Ok(Loader::new(session, self.rank, self.world, self.dataloader_worker))
    }
}

fn select_fields(schema: &Schema, names: Option<&[String]>) -> Result<Vec<usize>> {
    match names {
        None => Ok((0..schema.fields.len()).collect()),
        Some(ns) => ns
            .iter()
            .map(|n| {
                schema.position(n).ok_or_else(|| {
                    let all: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
                    Error::InvalidArgument(format!("no field {n:?} in the dataset (fields: {})", all.join(", ")))
                })
            })
            .collect(),
    }
}

fn estimate_batch_bytes(
    schema: &Schema,
    selected: &[usize],
    decode: &[Option<ImageDecode>],
    avg_sample: u64,
    batch: usize,
) -> u64 {
    let per: u64 = selected
        .iter()
        .zip(decode)
        .map(|(&i, d)| match d {
            Some(d) => d.out_len() as u64,
            None => schema.fields[i].fixed_len().unwrap_or(avg_sample) + 16,
        })
        .sum();
    per * batch as u64 + 4096
}

/// What every epoch of one loader shares: the verified dataset, the access gate, the
/// batch pool, the field selection and the plan. Built once by [`LoaderBuilder::build`].
pub(super) struct Session {
    pub(super) ds: Dataset,
    pub(super) access: Access,
    pub(super) pool: BatchPool,
    pub(super) selected: Vec<usize>,
    pub(super) prefix: Vec<u64>,
    pub(super) spec: PlanSpec,
    pub(super) batch_size: usize,
    pub(super) drop_last: bool,
    pub(super) workers: usize,
    pub(super) depth: usize,
    pub(super) policy: MemoryPolicy,
    /// For each selected field, the image decode applied to it.
    pub(super) decode: Vec<Option<ImageDecode>>,
    pub(super) on_decode_error: OnDecodeError,
    /// Samples left out because their image did not decode (`on_decode_error = skip`).
    pub(super) decode_skips: std::sync::atomic::AtomicU64,
}
