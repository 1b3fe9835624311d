//! Shards of a remote dataset, fetched ahead of the epoch plan into the local cache
//! (see [`super::cache`] for its layout): the schedule (first use first, bounded
//! concurrency and byte budget, eviction of shards the plan is done with), and the
//! opening of a shard as a verified cache file or, where the plan reads it by ranges,
//! as its object.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::cache::{is_disk_full, CacheDir};
use super::store::{runtime, Bucket};
use super::{Location, RangeReads, RemoteOptions, ShardSource};
use crate::error::{Error, RemoteFailure, Result};
use crate::format::manifest::{self, Manifest};

/// The bytes of `manifest.json` at `loc`, and the client that fetched them.
pub(crate) fn fetch_manifest(
    loc: &Location,
    opts: &RemoteOptions,
) -> Result<(Vec<u8>, Bucket, tokio::runtime::Runtime)> {
    let bucket = Bucket::new(loc, opts)?;
    let rt = runtime()?;
    let bytes = rt.block_on(bucket.get_small(manifest::FILE_NAME, manifest::MAX_LEN))?;
    Ok((bytes, bucket, rt))
}

#[derive(Clone)]
enum Slot {
    /// Not in the cache as far as this process knows.
    Absent,
    /// A download is running.
    Fetching,
    /// Complete and verified under its final name.
    Ready,
    /// The download failed for good (until the next epoch plan).
    Failed(Error),
}

pub(super) struct Object {
    pub(super) name: String,
    pub(super) url: String,
    pub(super) size: u64,
    pub(super) sha256: String,
}

/// What the prefetcher knows and plans, under one lock.
#[derive(Default)]
struct FetchState {
    slots: Vec<Slot>,
    /// Shards to prefetch, in first-use order of the current epoch plan.
    queue: VecDeque<u32>,
    in_flight: usize,
    in_flight_bytes: u64,
    /// Bytes of `Ready` shards this process counts against the budget.
    held_bytes: u64,
    /// Ready shards the plan is done with, oldest first: eviction candidates.
    released: VecDeque<u32>,
    /// The owner is being dropped: start nothing new (a task spawned on a runtime
    /// that is shutting down is dropped at once, and its completion takes this lock).
    closed: bool,
    /// Bumped when the reader stops (loader dropped): waiters give up at once.
    interrupts: u64,
    /// Shards the current epoch plan reads with ranged GETs instead of the cache.
    ranged: Vec<bool>,
    /// The interrupt generation when the current plan started: ranged reads give up
    /// once it moves on (the reader stopped), even if that happened before they began.
    plan_irq: u64,
}

/// The shard objects of one remote dataset, the cache they go to, and the prefetch
/// schedule; shared by the dataset, the download tasks and the ranged reads.
pub(super) struct Fetcher {
    pub(super) bucket: Bucket,
    pub(super) handle: tokio::runtime::Handle,
    pub(super) cache: CacheDir,
    pub(super) objects: Vec<Object>,
    budget: u64,
    pub(super) concurrency: usize,
    range_reads: RangeReads,
    state: Mutex<FetchState>,
    cv: Condvar,
    /// Bumped with `interrupts`: wakes ranged reads in flight so they give up.
    pub(super) irq: tokio::sync::watch::Sender<u64>,
    /// Object bytes received (downloads and ranged reads, retries included).
    pub(super) received: std::sync::atomic::AtomicU64,
}

/// The shards of one remote dataset and the cache they are fetched into.
pub(crate) struct RemoteShards {
    inner: Arc<Fetcher>,
    _rt: tokio::runtime::Runtime,
}

impl Drop for RemoteShards {
    fn drop(&mut self) {
        self.inner.lock().closed = true;
        // Ranged reads still running (a reader that outlived its dataset) give up.
        self.inner.irq.send_modify(|v| *v += 1);
        // The runtime is dropped next: running downloads are cancelled, their
        // partial files stay under temporary names and are overwritten next time.
    }
}

impl RemoteShards {
    /// Sets up fetching for the shards of a verified `manifest`.
    pub(crate) fn new(
        manifest: &Manifest,
        bucket: Bucket,
        rt: tokio::runtime::Runtime,
        opts: &RemoteOptions,
    ) -> Result<Self> {
        let cache = CacheDir::open(opts.resolved_cache_dir()?)?;
        let mut objects = Vec::with_capacity(manifest.shards.len());
        for e in &manifest.shards {
            // The digest becomes a file name: accept exactly 64 lowercase hex digits.
            if e.sha256.len() != 64 || !e.sha256.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(Error::Format {
                    what: "manifest",
                    path: PathBuf::from(bucket.url(manifest::FILE_NAME)),
                    detail: format!("shard {}: sha256 is not 64 lowercase hex digits", e.index),
                });
            }
            objects.push(Object {
                name: e.file.clone(),
                url: bucket.url(&e.file),
                size: e.file_bytes,
                sha256: e.sha256.clone(),
            });
        }
        let budget = opts.cache_bytes.unwrap_or(u64::MAX);
        if let Some(big) = objects.iter().map(|o| o.size).max() {
            if budget < big {
                return Err(Error::InvalidArgument(format!(
                    "cache_bytes {budget} is smaller than the largest shard ({big} bytes); raise it"
                )));
            }
        }
        let state = FetchState {
            slots: vec![Slot::Absent; objects.len()],
            ranged: vec![false; objects.len()],
            ..Default::default()
        };
        let inner = Arc::new(Fetcher {
            bucket,
            handle: rt.handle().clone(),
            cache,
            objects,
            budget,
            concurrency: opts.concurrency.max(1),
            range_reads: opts.range_reads,
            state: Mutex::new(state),
            cv: Condvar::new(),
            irq: tokio::sync::watch::Sender::new(0),
            received: std::sync::atomic::AtomicU64::new(0),
        });
        Ok(Self { inner, _rt: rt })
    }

    /// The cache directory.
    pub(crate) fn cache_dir(&self) -> &std::path::Path {
        self.inner.cache.path()
    }

    /// The URL of shard `i`'s object.
    pub(crate) fn url(&self, i: u32) -> Option<&str> {
        self.inner.objects.get(i as usize).map(|o| o.url.as_str())
    }

    /// A new epoch plan: prefetch `order` (first use first); shards the plan does not
    /// name become eviction candidates. With `random_access` (global shuffle) and
    /// [`RangeReads::Auto`], shards not already cached are read with ranged GETs when
    /// the plan's shards do not fit in the cache budget.
    pub(crate) fn plan(&self, order: &[u32], random_access: bool) {
        self.plan_with(order, random_access, true);
    }

    /// [`RemoteShards::plan`] for whole-file use (verify): no shard is read by ranges.
    pub(crate) fn plan_whole_files(&self, order: &[u32]) {
        self.plan_with(order, false, false);
    }

    fn plan_with(&self, order: &[u32], random_access: bool, may_range: bool) {
        let inner = &self.inner;
        let mut st = inner.lock();
        st.plan_irq = *inner.irq.borrow();
        for s in st.slots.iter_mut() {
            if matches!(s, Slot::Failed(_)) {
                *s = Slot::Absent;
            }
        }
        let n = st.slots.len();
        let order: Vec<u32> = order.iter().copied().filter(|&i| (i as usize) < n).collect();
        let mut wanted = vec![false; n];
        for &i in &order {
            wanted[i as usize] = true;
        }
        st.released =
            (0..n as u32).filter(|&i| !wanted[i as usize] && matches!(st.slots[i as usize], Slot::Ready)).collect();
        let plan_bytes: u64 = order.iter().map(|&i| inner.objects[i as usize].size).sum();
        let ranged = may_range
            && match inner.range_reads {
                RangeReads::Never => false,
                RangeReads::Always => true,
                RangeReads::Auto => random_access && plan_bytes > inner.budget,
            };
        st.ranged = vec![false; n];
        if ranged {
            for &i in &order {
                // A complete file in the cache (this or another process) is read from
                // there; it is adopted when opened, as on the whole-shard path.
                let cached = inner.cached_file(i);
                if !matches!(st.slots[i as usize], Slot::Ready | Slot::Fetching) && !cached {
                    st.ranged[i as usize] = true;
                }
            }
        }
        st.queue = order.iter().copied().filter(|&i| !st.ranged[i as usize]).collect();
        pump(inner, &mut st);
    }

    /// Object bytes received so far.
    pub(crate) fn received_bytes(&self) -> u64 {
        self.inner.received.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Shards the current plan reads with ranged GETs.
    pub(crate) fn ranged_shards(&self) -> Vec<u32> {
        let st = self.inner.lock();
        (0..st.ranged.len() as u32).filter(|&i| st.ranged[i as usize]).collect()
    }

    /// The plan is done with shard `i` for this epoch: it may be evicted when space
    /// is needed.
    pub(crate) fn release(&self, i: u32) {
        let inner = &self.inner;
        let mut st = inner.lock();
        if matches!(st.slots.get(i as usize), Some(Slot::Ready)) && !st.released.contains(&i) {
            st.released.push_back(i);
        }
        // Shards fetched on demand may have overshot the budget: give it back.
        inner.make_room(&mut st, 0);
        pump(inner, &mut st);
    }

    /// Wakes every thread waiting in [`RemoteShards::open`] and makes it return an
    /// error, so a loader that is dropped mid-download joins its workers promptly.
    pub(crate) fn interrupt(&self) {
        self.inner.lock().interrupts += 1;
        self.inner.cv.notify_all();
        self.inner.irq.send_modify(|v| *v += 1);
    }

    /// Shard `i`: its verified cache file, or, where the plan reads it by ranges and
    /// it is not cached, its object (see [`RemoteShards::open_file`]).
    pub(crate) fn open(&self, i: u32) -> Result<ShardSource> {
        {
            let st = self.inner.lock();
            let ranged = st.ranged.get(i as usize).copied().unwrap_or(false);
            if ranged && matches!(st.slots[i as usize], Slot::Absent) && !self.inner.cached_file(i) {
                return Ok(ShardSource::Ranged(self.inner.clone()));
            }
        }
        let (f, p) = self.open_file(i)?;
        Ok(ShardSource::File(f, p))
    }

    /// Opens shard `i`'s verified cache file, downloading it now if the prefetcher has
    /// not. Waits at most about twice the per-object timeout; never returns a file
    /// that did not match the signed manifest's size and SHA-256.
    pub(crate) fn open_file(&self, i: u32) -> Result<(File, PathBuf)> {
        let inner = &self.inner;
        let o = inner.objects.get(i as usize).ok_or_else(|| Error::InvalidArgument(format!("no shard {i}")))?;
        let path = inner.cache.complete(&o.sha256);
        let deadline = Instant::now() + inner.bucket.timeout * 2 + Duration::from_secs(30);
        let mut st = inner.lock();
        let interrupts = st.interrupts;
        loop {
            match st.slots[i as usize].clone() {
                Slot::Ready => {
                    drop(st);
                    match crate::fs::open_regular(&path, false, "cache file") {
                        Ok(f) => return Ok((f, path)),
                        // Evicted meanwhile (by this or another process): fetch again.
                        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                            st = inner.lock();
                            if matches!(st.slots[i as usize], Slot::Ready) {
                                st.slots[i as usize] = Slot::Absent;
                                st.held_bytes = st.held_bytes.saturating_sub(o.size);
                                st.released.retain(|&r| r != i);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                Slot::Absent => {
                    // A file another rank or run left under the final name is
                    // hashed by the download task, off this lock, before it is used.
                    start(inner, &mut st, i);
                }
                Slot::Fetching => {
                    if st.interrupts != interrupts {
                        return Err(Error::Remote {
                            url: o.url.clone(),
                            shard: Some(i),
                            kind: RemoteFailure::Unavailable,
                            detail: "the reader stopped while waiting for the download".into(),
                        });
                    }
                    if Instant::now() > deadline {
                        return Err(Error::Remote {
                            url: o.url.clone(),
                            shard: Some(i),
                            kind: RemoteFailure::Unavailable,
                            detail: "the download did not finish in time".into(),
                        });
                    }
                    st = inner.cv.wait_timeout(st, Duration::from_millis(200)).unwrap_or_else(|p| p.into_inner()).0;
                }
                Slot::Failed(e) => return Err(e),
            }
        }
    }
}

impl Fetcher {
    /// The interrupt generation of the current plan, or `None` once the dataset is
    /// closed: a ranged read gives up when the generation moves on.
    pub(super) fn open_plan(&self) -> Option<u64> {
        let st = self.lock();
        (!st.closed).then_some(st.plan_irq)
    }

    fn lock(&self) -> MutexGuard<'_, FetchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True if a file of shard `i`'s size is under its final name (a stat; its content
    /// is hashed only when it is opened, by [`super::download::download`]).
    fn cached_file(&self, i: u32) -> bool {
        let o = &self.objects[i as usize];
        self.cache.has_complete(&o.sha256, o.size)
    }

    /// Evicts released shards until `need` more bytes fit in the budget.
    fn make_room(&self, st: &mut FetchState, need: u64) -> bool {
        while st.held_bytes.saturating_add(st.in_flight_bytes).saturating_add(need) > self.budget {
            let Some(v) = st.released.pop_front() else { return false };
            if matches!(st.slots[v as usize], Slot::Ready) {
                let o = &self.objects[v as usize];
                // Readers that have the file mapped keep their pages; the name goes.
                let _ = std::fs::remove_file(self.cache.complete(&o.sha256));
                st.slots[v as usize] = Slot::Absent;
                st.held_bytes = st.held_bytes.saturating_sub(o.size);
            }
        }
        true
    }
}

/// Starts prefetches from the queue while concurrency and the byte budget allow.
fn pump(inner: &Arc<Fetcher>, st: &mut FetchState) {
    while !st.closed && st.in_flight < inner.concurrency {
        let Some(&i) = st.queue.front() else { return };
        if !matches!(st.slots[i as usize], Slot::Absent) {
            st.queue.pop_front();
            continue;
        }
        if !inner.make_room(st, inner.objects[i as usize].size) {
            return;
        }
        st.queue.pop_front();
        start(inner, st, i);
    }
}

/// Marks shard `i` as fetching and downloads it on the runtime.
fn start(inner: &Arc<Fetcher>, st: &mut FetchState, i: u32) {
    if st.closed {
        return;
    }
    let size = inner.objects[i as usize].size;
    st.slots[i as usize] = Slot::Fetching;
    st.in_flight += 1;
    st.in_flight_bytes += size;
    let guard = Done { inner: inner.clone(), i, result: None };
    inner.handle.spawn(async move {
        let mut guard = guard;
        guard.result = Some(super::download::download(&guard.inner, guard.i).await);
    });
}

/// Publishes a download's outcome when its task ends, however it ends (a panic or a
/// runtime shutdown counts as a failure), so no waiter can hang on it.
struct Done {
    inner: Arc<Fetcher>,
    i: u32,
    result: Option<Result<()>>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let o = &self.inner.objects[self.i as usize];
        let mut st = self.inner.lock();
        st.in_flight -= 1;
        st.in_flight_bytes = st.in_flight_bytes.saturating_sub(o.size);
        st.slots[self.i as usize] = match self.result.take() {
            Some(Ok(())) => {
                st.held_bytes += o.size;
                Slot::Ready
            }
            Some(Err(e)) => Slot::Failed(e),
            None => Slot::Failed(Error::Remote {
                url: o.url.clone(),
                shard: Some(self.i),
                kind: RemoteFailure::Unavailable,
                detail: "the download stopped before it finished (the dataset was closed)".into(),
            }),
        };
        pump(&self.inner, &mut st);
        drop(st);
        self.inner.cv.notify_all();
    }
}

/// On a full disk: evicts every shard the plan is done with; true if any went.
pub(super) fn evict_released(inner: &Fetcher) -> bool {
    let mut st = inner.lock();
    let before = st.held_bytes;
    inner.make_room(&mut st, u64::MAX);
    st.held_bytes < before
}

pub(super) fn cache_error(
    inner: &Fetcher,
    op: &'static str,
    path: &std::path::Path,
    e: std::io::Error,
    i: u32,
) -> Error {
    if is_disk_full(&e) {
        return Error::Remote {
            url: inner.objects[i as usize].url.clone(),
            shard: Some(i),
            kind: RemoteFailure::CacheFull,
            detail: format!("{op} {}: {e}", path.display()),
        };
    }
    Error::io_at(op, path, e)
}
