//! The [`Loader`]: plan -> authorize + open shards -> decrypt on worker threads into
//! locked batch buffers -> deliver batches in plan order.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::batch::{Batch, BatchLayout, FieldSlot};
use super::plan::{self, Consumed, PlanSpec, Remainder, SampleRef, Shuffle};
use super::stream::Next;
use crate::audit::{AuditEvent, AuditLog};
use crate::auth::{Access, Authorizer, AuthorizerConfig, Token};
use crate::crypto::aead::Backend;
use crate::crypto::chunked::CHUNK_LEN;
use crate::dataset::{Dataset, OpenShard, SealedRun};
use crate::error::{Error, Result};
use crate::format::{FieldKind, Schema};
use crate::keys::{KeyProvider, TrustAnchor};
use crate::memory::{BatchPool, LockedBuf, MemoryPolicy};
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
}

impl LoaderBuilder {
    fn new(path: &Path) -> Self {
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
        }
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
    /// [`crate::keys::pkcs11`]): anything [`crate::keys::open_provider`] accepts.
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

    /// Accept unlocked memory when the memlock limit is too low (audited).
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
        if self.world == 0 || self.rank >= self.world {
            return Err(Error::InvalidArgument(format!("rank {} is not in 0..world_size {}", self.rank, self.world)));
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
        let mut access = Access::new(authorizer, keys).with_backend(self.backend);
        if let Some(p) = &self.audit_log {
            access = access.with_audit(Arc::new(AuditLog::open(p)?));
        }
        let schema = ds.manifest().schema.clone();
        let selected = select_fields(&schema, self.fields.as_deref())?;
        let m = ds.manifest();
        let records: Vec<u64> = m.shards.iter().map(|s| s.records).collect();
        let avg_sample: u64 = {
            let plain: u64 = m.shards.iter().map(|s| s.plaintext_bytes).sum();
            plain.checked_div(m.records.max(1)).unwrap_or(0).max(1)
        };
        let run = self.run.unwrap_or_else(|| ((256 << 10) / avg_sample).clamp(1, 4096) as usize);
        let est_batch = estimate_batch_bytes(&schema, &selected, avg_sample, self.batch_size);
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
        let shared = Arc::new(Shared {
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
        });
        Ok(Loader {
            shared,
            rank: self.rank,
            world: self.world,
            epoch: 0,
            history: Vec::new(),
            run: None,
            ended: false,
            pid: std::process::id(),
        })
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

fn estimate_batch_bytes(schema: &Schema, selected: &[usize], avg_sample: u64, batch: usize) -> u64 {
    let per: u64 = selected.iter().map(|&i| schema.fields[i].fixed_len().unwrap_or(avg_sample) + 16).sum();
    per * batch as u64 + 4096
}

struct Shared {
    ds: Dataset,
    access: Access,
    pool: BatchPool,
    selected: Vec<usize>,
    prefix: Vec<u64>,
    spec: PlanSpec,
    batch_size: usize,
    drop_last: bool,
    workers: usize,
    depth: usize,
    policy: MemoryPolicy,
}

/// Serializable resume state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epoch in progress.
    pub epoch: u64,
    /// Seed (must match on restore).
    pub seed: u64,
    /// Consumption so far in this epoch, one entry per save/restore segment.
    pub consumed: Vec<Consumed>,
}

/// Streams batches of an encrypted dataset: an iterator of `Result<Batch>`. One
/// iteration is one epoch; the next iteration is the next epoch (or the one given to
/// [`Loader::set_epoch`]).
pub struct Loader {
    shared: Arc<Shared>,
    rank: u32,
    world: u32,
    epoch: u64,
    history: Vec<Consumed>,
    run: Option<EpochRun>,
    ended: bool,
    /// Process that built the loader: its worker threads do not exist after a fork.
    pid: u32,
}

impl Drop for Loader {
    fn drop(&mut self) {
        if self.abandon_if_forked() {
            // The dataset of an s3:// loader owns a tokio runtime whose threads stayed
            // in the parent, and locks they may have held at the fork: never drop it
            // in the child.
            std::mem::forget(self.shared.clone());
        }
    }
}

impl Loader {
    /// In a forked child the run's threads are gone and its locks may be held
    /// forever: leak the run instead of joining or touching it.
    fn abandon_if_forked(&mut self) -> bool {
        if std::process::id() == self.pid {
            return false;
        }
        if let Some(r) = self.run.take() {
            std::mem::forget(r);
        }
        true
    }

    fn forked_error(&self) -> Error {
        Error::InvalidArgument(
            "this Loader was created in another process (before a fork); create the Loader inside the worker process \
             (shardlock.torch.IterableDataset does this for DataLoader workers)"
                .into(),
        )
    }

    /// Like [`Iterator::next`], but waits at most `timeout` for the next batch, so a
    /// caller can service signals (Ctrl-C in Python) while the pipeline works.
    pub fn next_within(&mut self, timeout: std::time::Duration) -> Next<Batch> {
        if self.abandon_if_forked() {
            return Next::Batch(Err(self.forked_error()));
        }
        if self.run.is_none() {
            self.ended = false;
            match self.start() {
                Ok(r) => self.run = Some(r),
                Err(e) => return Next::Batch(Err(e)),
            }
        }
        let Some(run) = self.run.as_mut() else { return Next::End };
        match run.poll(Some(timeout)) {
            Poll::Pending => Next::Pending,
            Poll::Ready(Some(b)) => Next::Batch(b),
            Poll::Ready(None) => {
                self.run = None;
                self.history.clear();
                self.epoch += 1;
                self.ended = true;
                Next::End
            }
        }
    }

    /// Starts building a loader for the dataset at `path`.
    pub fn builder(path: impl AsRef<Path>) -> LoaderBuilder {
        LoaderBuilder::new(path.as_ref())
    }

    /// The dataset (verified manifest).
    pub fn dataset(&self) -> &Dataset {
        &self.shared.ds
    }

    /// Names of the fields each batch holds.
    pub fn field_names(&self) -> Vec<&str> {
        self.shared.selected.iter().map(|&i| self.shared.ds.manifest().schema.fields[i].name.as_str()).collect()
    }

    /// The epoch the next iteration reads.
    pub fn epoch(&self) -> u64 {
        self.run.as_ref().map(|r| r.epoch).unwrap_or(self.epoch)
    }

    /// Sets the epoch of the next iteration (stops one in progress).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.abandon_if_forked();
        if self.run.is_some() || self.epoch != epoch {
            self.run = None;
            self.history.clear();
        }
        self.epoch = epoch;
        self.ended = false;
    }

    /// Samples this rank reads per epoch (after a restore: in the rest of this epoch).
    pub fn samples(&self) -> Result<usize> {
        Ok(plan::rank_samples(&self.shared.spec, self.epoch(), self.rank, self.world, &self.history)?.len())
    }

    /// Batches this rank yields in the current epoch.
    pub fn len(&self) -> Result<usize> {
        let n = self.samples()?;
        let b = self.shared.batch_size;
        Ok(if self.shared.drop_last { n / b } else { n.div_ceil(b) })
    }

    /// True when an epoch yields no batch.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Resume state: restore it (in a new process, with any worker count and, with
    /// DDP-style lockstep ranks, any world size) to continue this epoch without
    /// duplicates or gaps.
    pub fn state(&self) -> LoaderState {
        let mut consumed = self.history.clone();
        if let Some(r) = &self.run {
            if r.consumed_samples > 0 {
                consumed.push(Consumed { world: self.world, per_rank: r.consumed_samples });
            }
        }
        LoaderState { epoch: self.epoch(), seed: self.shared.spec.seed, consumed }
    }

    /// Like [`Loader::state`], but as if the last `unconsumed` samples this loader
    /// yielded in the current epoch had not been yielded: for a stage that reads ahead
    /// of its own consumer (the device stage), so a resume re-reads what the consumer
    /// never saw.
    pub fn state_excluding(&self, unconsumed: u64) -> LoaderState {
        let mut s = self.state();
        if unconsumed > 0 && self.run.is_some() {
            if let Some(last) = s.consumed.last_mut() {
                last.per_rank = last.per_rank.saturating_sub(unconsumed);
                if last.per_rank == 0 {
                    s.consumed.pop();
                }
            }
        }
        s
    }

    /// Batches of the epoch in progress not yet yielded; `None` before its first batch
    /// was asked for (and after its end).
    pub fn batches_left(&self) -> Option<usize> {
        self.run.as_ref().map(|r| r.n_batches.saturating_sub(r.consumed_batches))
    }

    /// Restores a state from [`Loader::state`].
    pub fn load_state(&mut self, s: &LoaderState) -> Result<()> {
        if s.seed != self.shared.spec.seed {
            return Err(Error::InvalidArgument(format!(
                "state was saved with seed {}, this loader has seed {}",
                s.seed, self.shared.spec.seed
            )));
        }
        plan::remaining(plan::global_order(&self.shared.spec, s.epoch), &s.consumed, &self.shared.spec)?;
        self.run = None;
        self.epoch = s.epoch;
        self.history = s.consumed.clone();
        self.ended = false;
        Ok(())
    }

    /// Batch buffers allocated so far (stays flat in steady state).
    pub fn buffers_allocated(&self) -> usize {
        self.shared.pool.allocated()
    }

    fn start(&mut self) -> Result<EpochRun> {
        let samples = plan::rank_samples(&self.shared.spec, self.epoch, self.rank, self.world, &self.history)?;
        EpochRun::start(self.shared.clone(), self.epoch, samples)
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.abandon_if_forked() {
            return Some(Err(self.forked_error()));
        }
        if self.run.is_none() {
            if self.ended {
                // The previous call ended an epoch; this one starts the next.
                self.ended = false;
            }
            match self.start() {
                Ok(r) => self.run = Some(r),
                Err(e) => return Some(Err(e)),
            }
        }
        let run = self.run.as_mut()?;
        match run.next() {
            Some(b) => Some(b),
            None => {
                self.run = None;
                self.history.clear();
                self.epoch += 1;
                self.ended = true;
                None
            }
        }
    }
}

enum Poll {
    Ready(Option<Result<Batch>>),
    Pending,
}

struct Flow {
    next: usize,
    consumed: usize,
    stop: bool,
}

type ShardCell = Arc<OnceLock<std::result::Result<Arc<OpenShard>, Arc<Error>>>>;

/// Shards opened in this epoch, shared by the workers: each is authorized and
/// unwrapped once per epoch, and dropped after the last batch that needs it.
#[derive(Default)]
struct ShardCache {
    map: Mutex<HashMap<u32, ShardCell>>,
}

impl ShardCache {
    fn get(&self, shared: &Shared, shard: u32) -> Result<Arc<OpenShard>> {
        let cell = {
            let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(shard).or_default().clone()
        };
        match cell.get_or_init(|| shared.access.open_shared(&shared.ds, shard).map_err(Arc::new)) {
            Ok(s) => Ok(s.clone()),
            Err(e) => Err(e.duplicate()),
        }
    }

    /// Forgets a shard and tells the dataset it is no longer needed (a remote cache
    /// may evict it); returns its mapping so the caller can retire it off-thread.
    fn evict(&self, shared: &Shared, shard: u32) -> Option<Box<dyn Send>> {
        let gone = self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&shard);
        shared.ds.release_shard(shard);
        gone.map(|g| Box::new(g) as Box<dyn Send>)
    }
}

struct EpochRun {
    epoch: u64,
    shared: Arc<Shared>,
    flow: Arc<(Mutex<Flow>, Condvar)>,
    rx: crossbeam_channel::Receiver<(usize, Result<Batch>)>,
    reorder: BTreeMap<usize, Result<Batch>>,
    n_batches: usize,
    batch_size: usize,
    total_samples: usize,
    consumed_batches: usize,
    consumed_samples: u64,
    cache: Arc<ShardCache>,
    last_use: HashMap<u32, Vec<u32>>,
    failed: Option<Error>,
    workers: Vec<JoinHandle<()>>,
}

struct Job {
    /// Process that runs the workers.
    pid: u32,
    shared: Arc<Shared>,
    samples: Arc<Vec<SampleRef>>,
    cache: Arc<ShardCache>,
    epoch: u64,
}

impl EpochRun {
    fn start(shared: Arc<Shared>, epoch: u64, samples: Vec<SampleRef>) -> Result<Self> {
        let b = shared.batch_size;
        let total = samples.len();
        let n_batches = if shared.drop_last { total / b } else { total.div_ceil(b) };
        let mut last_use: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut last: HashMap<u32, usize> = HashMap::new();
        for (i, s) in samples.iter().enumerate().take(n_batches * b) {
            last.insert(s.shard(), i / b);
        }
        for (s, k) in last {
            last_use.entry(k as u32).or_default().push(s);
        }
        // A remote dataset fetches shards in the order this rank first needs them.
        let mut seen = std::collections::HashSet::new();
        let order: Vec<u32> =
            samples.iter().take(n_batches * b).map(|s| s.shard()).filter(|&s| seen.insert(s)).collect();
        shared.ds.plan_shards(&order, shared.spec.shuffle == Shuffle::Global);
        let flow = Arc::new((Mutex::new(Flow { next: 0, consumed: 0, stop: false }), Condvar::new()));
        let (tx, rx) = crossbeam_channel::bounded(shared.depth + shared.workers);
        let cache = Arc::new(ShardCache::default());
        let job = Arc::new(Job {
            pid: std::process::id(),
            shared: shared.clone(),
            samples: Arc::new(samples),
            cache: cache.clone(),
            epoch,
        });
        let mut workers = Vec::with_capacity(shared.workers);
        for i in 0..shared.workers.min(n_batches.max(1)) {
            let (job, flow, tx) = (job.clone(), flow.clone(), tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("shardlock-decrypt-{i}"))
                .spawn(move || worker(&job, &flow, &tx, n_batches))
                .map_err(|e| Error::Internal(format!("cannot start a decrypt worker: {e}")))?;
            workers.push(h);
        }
        Ok(Self {
            epoch,
            shared,
            flow,
            rx,
            reorder: BTreeMap::new(),
            n_batches,
            batch_size: b,
            total_samples: total,
            consumed_batches: 0,
            consumed_samples: 0,
            cache,
            last_use,
            failed: None,
            workers,
        })
    }

    fn next(&mut self) -> Option<Result<Batch>> {
        match self.poll(None) {
            Poll::Ready(r) => r,
            Poll::Pending => None,
        }
    }

    /// The next batch in plan order, waiting at most `timeout` (forever if `None`).
    fn poll(&mut self, timeout: Option<std::time::Duration>) -> Poll {
        if let Some(e) = &self.failed {
            return Poll::Ready(Some(Err(e.duplicate())));
        }
        if self.consumed_batches >= self.n_batches {
            return Poll::Ready(None);
        }
        let k = self.consumed_batches;
        let r = loop {
            if let Some(r) = self.reorder.remove(&k) {
                break r;
            }
            let got = match timeout {
                None => self.rx.recv().map_err(|_| true),
                Some(t) => self.rx.recv_timeout(t).map_err(|e| e.is_disconnected()),
            };
            match got {
                Ok((i, r)) => {
                    self.reorder.insert(i, r);
                }
                Err(false) => return Poll::Pending,
                Err(true) => break Err(Error::Internal("decrypt workers exited early".into())),
            }
        };
        self.consumed_batches += 1;
        {
            let (m, cv) = &*self.flow;
            m.lock().unwrap_or_else(|p| p.into_inner()).consumed = self.consumed_batches;
            cv.notify_all();
        }
        if let Some(shards) = self.last_use.remove(&(k as u32)) {
            for s in shards {
                // Unmapping a shard (page tables, TLB shootdowns) happens on the pool's
                // janitor thread, not here on the consumer's.
                if let Some(gone) = self.cache.evict(&self.shared, s) {
                    self.shared.pool.retire(gone);
                }
            }
        }
        match r {
            Ok(b) => {
                self.consumed_samples += b.len() as u64;
                Poll::Ready(Some(Ok(b)))
            }
            Err(e) => {
                self.failed = Some(e.duplicate());
                self.stop();
                Poll::Ready(Some(Err(e)))
            }
        }
    }

    fn stop(&mut self) {
        let (m, cv) = &*self.flow;
        m.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cv.notify_all();
    }
}

impl Drop for EpochRun {
    fn drop(&mut self) {
        self.stop();
        // Unblock workers waiting to send, then wait for them: no thread outlives the
        // run, and every batch buffer in flight goes back to the pool zeroized.
        let rx = std::mem::replace(&mut self.rx, crossbeam_channel::never());
        drop(rx);
        self.reorder.clear();
        if self.consumed_batches < self.n_batches {
            // Workers may be waiting for a shard download: wake them.
            self.shared.ds.interrupt_fetches();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
        let _ = (self.total_samples, self.batch_size);
    }
}

fn worker(job: &Job, flow: &(Mutex<Flow>, Condvar), tx: &crossbeam_channel::Sender<(usize, Result<Batch>)>, n: usize) {
    let shared = &job.shared;
    let mut cache = match LockedBuf::new(CHUNK_LEN, shared.policy) {
        Ok(b) => ChunkCache { key: None, buf: b },
        Err(e) => {
            let _ = tx.send((take_job(flow, shared.depth, n).unwrap_or(0), Err(e)));
            return;
        }
    };
    while let Some(k) = take_job(flow, shared.depth, n) {
        let r = catch_unwind(AssertUnwindSafe(|| fill(job, k, &mut cache))).unwrap_or_else(|p| {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            Err(Error::Internal(format!("worker panicked on batch {k}: {}", msg.unwrap_or_default())))
        });
        if tx.send((k, r)).is_err() {
            return;
        }
    }
}

fn take_job(flow: &(Mutex<Flow>, Condvar), depth: usize, n: usize) -> Option<usize> {
    let (m, cv) = flow;
    let mut f = m.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if f.stop || f.next >= n {
            return None;
        }
        if f.next < f.consumed + depth {
            let k = f.next;
            f.next += 1;
            return Some(k);
        }
        f = cv.wait(f).unwrap_or_else(|p| p.into_inner());
    }
}

/// The last decrypted chunk of a worker, in locked memory.
struct ChunkCache {
    key: Option<(u32, u64)>,
    buf: LockedBuf,
}

fn align64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

fn fill(job: &Job, k: usize, cc: &mut ChunkCache) -> Result<Batch> {
    let shared = &job.shared;
    let b = shared.batch_size;
    let refs = &job.samples[k * b..((k + 1) * b).min(job.samples.len())];
    let n = refs.len();
    let mut open: Vec<(u32, Arc<OpenShard>)> = Vec::new();
    let mut shard_of = Vec::with_capacity(n);
    for r in refs {
        let pos = match open.iter().position(|(s, _)| *s == r.shard()) {
            Some(p) => p,
            None => {
                open.push((r.shard(), job.cache.get(shared, r.shard())?));
                open.len() - 1
            }
        };
        shard_of.push(pos);
    }
    let schema = &shared.ds.manifest().schema;
    let mut slots = Vec::with_capacity(shared.selected.len());
    let mut off = 0usize;
    for &pf in &shared.selected {
        let f = &schema.fields[pf];
        let name: Arc<str> = Arc::from(f.name.as_str());
        match f.fixed_len() {
            Some(l) => {
                off = align64(off);
                let len = l as usize * n;
                slots.push(FieldSlot {
                    name,
                    schema_pos: pf,
                    kind: f.kind.clone(),
                    offset: off,
                    len,
                    offsets_at: None,
                });
                off += len;
            }
            None => {
                off = align64(off);
                let at = off;
                off += 8 * (n + 1);
                off = align64(off);
                let len: u64 = refs
                    .iter()
                    .zip(&shard_of)
                    .map(|(r, &p)| {
                        let (a, z) = open[p].1.index().field_range(u64::from(r.record()), pf);
                        z - a
                    })
                    .sum();
                slots.push(FieldSlot {
                    name,
                    schema_pos: pf,
                    kind: FieldKind::Bytes,
                    offset: off,
                    len: len as usize,
                    offsets_at: Some(at),
                });
                off += len as usize;
            }
        }
    }
    let ids: Vec<u64> = refs.iter().map(|r| shared.prefix[r.shard() as usize] + u64::from(r.record())).collect();
    let total = off.max(1);
    let buf = shared.pool.take(total)?;
    let mut batch = Batch {
        buf: Some(buf),
        pool: shared.pool.clone(),
        layout: BatchLayout { slots: Arc::from(slots), samples: ids, index: k as u64, epoch: job.epoch },
        pid: job.pid,
    };
    let slots = batch.layout.slots.clone();
    let Some(out) = batch.buf.as_mut().map(|b| b.prefix_mut(total)) else {
        return Err(Error::Internal("batch without a buffer".into()));
    };
    let fetched = fetch_ranged(&open, refs, &shard_of, &slots)?;
    // Decrypt in storage order (shard, record) so neighbouring samples share the
    // worker's cached chunk, while each sample lands in its shuffled slot.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by_key(|&j| refs[j].0);
    for slot in slots.iter() {
        // Destination of each sample: fixed stride, or prefix sums of byte lengths.
        let mut dest = Vec::with_capacity(n + 1);
        let mut w = slot.offset;
        for (r, &p) in refs.iter().zip(&shard_of) {
            dest.push(w);
            let (a, z) = open[p].1.index().field_range(u64::from(r.record()), slot.schema_pos);
            w += (z - a) as usize;
        }
        dest.push(w);
        if let Some(at) = slot.offsets_at {
            for (j, d) in dest.iter().enumerate() {
                out[at + 8 * j..at + 8 * j + 8].copy_from_slice(&((d - slot.offset) as u64).to_le_bytes());
            }
        }
        // Coalesce samples that are contiguous both in the shard and in the batch
        // (sequential reads of one field): whole chunks then decrypt straight into
        // the batch instead of through the chunk cache.
        let mut run: Option<(usize, u64, u64, usize)> = None; // (open idx, a, z, dest start)
        for &j in &order {
            let p = shard_of[j];
            let (a, z) = open[p].1.index().field_range(u64::from(refs[j].record()), slot.schema_pos);
            if let Some((rp, ra, rz, rd)) = run {
                if rp == p && rz == a && rd + (rz - ra) as usize == dest[j] {
                    run = Some((rp, ra, z, rd));
                    continue;
                }
                let (sid, shard) = (&open[rp].0, &open[rp].1);
                let runs = fetched.get(rp).map_or(&[][..], |r| &r[..]);
                copy_plain(shard, *sid, runs, ra, rz, &mut out[rd..rd + (rz - ra) as usize], cc)?;
            }
            run = Some((p, a, z, dest[j]));
        }
        if let Some((rp, ra, rz, rd)) = run {
            let (sid, shard) = (&open[rp].0, &open[rp].1);
            let runs = fetched.get(rp).map_or(&[][..], |r| &r[..]);
            copy_plain(shard, *sid, runs, ra, rz, &mut out[rd..rd + (rz - ra) as usize], cc)?;
        }
    }
    Ok(batch)
}

/// For shards read by ranges (remote, `global` shuffle, not cached): fetches every
/// chunk this batch needs from them in one burst of concurrent ranged reads, adjacent
/// chunks coalesced into one read. Per open shard, its fetched runs sorted by first
/// chunk (empty for mapped shards; an empty result when no shard is ranged).
fn fetch_ranged(
    open: &[(u32, Arc<OpenShard>)],
    refs: &[SampleRef],
    shard_of: &[usize],
    slots: &[FieldSlot],
) -> Result<Vec<Vec<SealedRun>>> {
    if !open.iter().any(|(_, s)| s.is_ranged()) {
        return Ok(Vec::new());
    }
    let c = CHUNK_LEN as u64;
    let mut wanted: Vec<Vec<(u64, u64)>> = vec![Vec::new(); open.len()];
    for (r, &p) in refs.iter().zip(shard_of) {
        let s = &open[p].1;
        if !s.is_ranged() {
            continue;
        }
        for slot in slots {
            let (a, z) = s.index().field_range(u64::from(r.record()), slot.schema_pos);
            if z > a {
                wanted[p].push((a / c, (z - 1) / c + 1));
            }
        }
    }
    let mut reqs = Vec::new();
    let mut owners = Vec::new();
    let mut src = None;
    for (p, runs) in wanted.iter_mut().enumerate() {
        runs.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for &(a, z) in runs.iter() {
            match merged.last_mut() {
                Some(m) if a <= m.1 => m.1 = m.1.max(z),
                _ => merged.push((a, z)),
            }
        }
        for (a, z) in merged {
            let (s, req) = open[p].1.fetch_request(a, z)?;
            src.get_or_insert_with(|| s.clone());
            reqs.push(req);
            owners.push((p, a, z));
        }
    }
    let mut out: Vec<Vec<SealedRun>> = (0..open.len()).map(|_| Vec::new()).collect();
    // Every shard of one dataset shares its source, so one burst serves them all. A
    // failure is a typed `Error::Remote` naming the shard object.
    let Some(src) = src else { return Ok(out) };
    let got = src.get_ranges(&reqs)?;
    for ((p, first, end), (bytes, _)) in owners.into_iter().zip(got) {
        out[p].push(SealedRun { first, end, bytes });
    }
    Ok(out)
}

/// Copies authenticated plaintext `[a, z)` of `shard` into `dest`: whole chunks are
/// decrypted straight into the batch, partial ones through the worker's chunk cache.
/// A shard read by ranges decrypts from `runs`, the chunks [`fetch_ranged`] fetched.
fn copy_plain(
    shard: &OpenShard,
    sid: u32,
    runs: &[SealedRun],
    a: u64,
    z: u64,
    dest: &mut [u8],
    cc: &mut ChunkCache,
) -> Result<()> {
    let decrypt = |k: u64, out: &mut [u8]| -> Result<usize> {
        if !shard.is_ranged() {
            return shard.decrypt_chunk(k, out);
        }
        let i = runs.partition_point(|r| r.end <= k);
        match runs.get(i) {
            Some(run) if run.first <= k => shard.open_fetched(run, k, out),
            _ => shard.decrypt_chunk(k, out),
        }
    };
    let mut pos = a;
    let mut w = 0usize;
    while pos < z {
        let k = pos / CHUNK_LEN as u64;
        let within = (pos % CHUNK_LEN as u64) as usize;
        let n = shard.chunk_plaintext_len(k);
        let take = ((z - pos) as usize).min(n - within);
        let cached = cc.key == Some((sid, k));
        if within == 0 && take == n && !cached {
            decrypt(k, &mut dest[w..w + n])?;
        } else {
            if !cached {
                cc.key = None;
                decrypt(k, &mut cc.buf.as_mut_slice()[..CHUNK_LEN])?;
                cc.key = Some((sid, k));
            }
            dest[w..w + take].copy_from_slice(&cc.buf.as_slice()[within..within + take]);
        }
        w += take;
        pos += take as u64;
    }
    Ok(())
}
