//! Shards of a remote dataset, fetched ahead of the epoch plan into the local cache.
//!
//! Cache layout (one flat directory, shared by every process and dataset that uses it):
//!
//! | name | what |
//! | --- | --- |
//! | `<sha256>.slk` | a complete shard file whose size and SHA-256 matched a signed manifest |
//! | `<sha256>.partial` | a download in progress (only the holder of the lock writes it) |
//! | `<sha256>.lock` | `flock`ed by the process downloading that shard |
//!
//! Files are named by their SHA-256 from the signed manifest, so a name can only ever
//! hold those exact bytes: a replaced object fails the digest and never gets the
//! name, and two datasets or ranks that share a shard share its file. Everything in
//! the directory is ciphertext exactly as stored in the bucket.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange};

use super::store::{backoff, runtime, Bucket, Failure};
use super::{Location, RangeReads, RangeRequest, RangeSource, RemoteOptions, ShardSource};
use crate::crypto::Sha256;
use crate::error::{Error, RemoteFailure, Result};
use crate::format::manifest::{self, Manifest};

/// Largest manifest accepted from a bucket.
const MANIFEST_LIMIT: u64 = 256 << 20;

/// The bytes of `manifest.json` at `loc`, and the client that fetched them.
pub(crate) fn fetch_manifest(
    loc: &Location,
    opts: &RemoteOptions,
) -> Result<(Vec<u8>, Bucket, tokio::runtime::Runtime)> {
    let bucket = Bucket::new(loc, opts)?;
    let rt = runtime()?;
    let bytes = rt.block_on(bucket.get_small(manifest::FILE_NAME, MANIFEST_LIMIT))?;
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

struct Object {
    name: String,
    url: String,
    size: u64,
    sha256: String,
}

#[derive(Default)]
struct State {
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

struct Inner {
    bucket: Bucket,
    handle: tokio::runtime::Handle,
    dir: PathBuf,
    objects: Vec<Object>,
    budget: u64,
    concurrency: usize,
    range_reads: RangeReads,
    state: Mutex<State>,
    cv: Condvar,
    /// Bumped with `interrupts`: wakes ranged reads in flight so they give up.
    irq: tokio::sync::watch::Sender<u64>,
    /// Object bytes received (downloads and ranged reads, retries included).
    received: std::sync::atomic::AtomicU64,
}

/// The shards of one remote dataset and the cache they are fetched into.
pub(crate) struct RemoteShards {
    inner: Arc<Inner>,
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
        let dir = opts.resolved_cache_dir();
        create_cache_dir(&dir)?;
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
        let state = State {
            slots: vec![Slot::Absent; objects.len()],
            ranged: vec![false; objects.len()],
            ..Default::default()
        };
        let inner = Arc::new(Inner {
            bucket,
            handle: rt.handle().clone(),
            dir,
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
        &self.inner.dir
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
            let mut st = self.inner.lock();
            let ranged = st.ranged.get(i as usize).copied().unwrap_or(false);
            if ranged && matches!(st.slots[i as usize], Slot::Absent) && !self.inner.adopt_cached(&mut st, i) {
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
        let path = inner.final_path(o);
        let deadline = Instant::now() + inner.bucket.timeout * 2 + Duration::from_secs(30);
        let mut st = inner.lock();
        let interrupts = st.interrupts;
        loop {
            match st.slots[i as usize].clone() {
                Slot::Ready => {
                    drop(st);
                    match File::open(&path) {
                        Ok(f) => return Ok((f, path)),
                        // Evicted meanwhile (by this or another process): fetch again.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            st = inner.lock();
                            if matches!(st.slots[i as usize], Slot::Ready) {
                                st.slots[i as usize] = Slot::Absent;
                                st.held_bytes = st.held_bytes.saturating_sub(o.size);
                                st.released.retain(|&r| r != i);
                            }
                        }
                        Err(e) => return Err(Error::io_at("open", path, e)),
                    }
                }
                Slot::Absent => {
                    if !inner.adopt_cached(&mut st, i) {
                        start(inner, &mut st, i);
                    }
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

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn final_path(&self, o: &Object) -> PathBuf {
        self.dir.join(format!("{}.slk", o.sha256))
    }

    /// True if a complete file for shard `i` is under its final name.
    fn cached_file(&self, i: u32) -> bool {
        let o = &self.objects[i as usize];
        std::fs::metadata(self.final_path(o)).is_ok_and(|m| m.len() == o.size)
    }

    /// A complete file already under the final name (another rank, an earlier run)
    /// becomes `Ready` without a download.
    fn adopt_cached(&self, st: &mut State, i: u32) -> bool {
        if !self.cached_file(i) {
            return false;
        }
        st.slots[i as usize] = Slot::Ready;
        st.held_bytes += self.objects[i as usize].size;
        true
    }

    /// Evicts released shards until `need` more bytes fit in the budget.
    fn make_room(&self, st: &mut State, need: u64) -> bool {
        while st.held_bytes.saturating_add(st.in_flight_bytes).saturating_add(need) > self.budget {
            let Some(v) = st.released.pop_front() else { return false };
            if matches!(st.slots[v as usize], Slot::Ready) {
                let o = &self.objects[v as usize];
                // Readers that have the file mapped keep their pages; the name goes.
                let _ = std::fs::remove_file(self.final_path(o));
                st.slots[v as usize] = Slot::Absent;
                st.held_bytes = st.held_bytes.saturating_sub(o.size);
            }
        }
        true
    }
}

/// Starts prefetches from the queue while concurrency and the byte budget allow.
fn pump(inner: &Arc<Inner>, st: &mut State) {
    while !st.closed && st.in_flight < inner.concurrency {
        let Some(&i) = st.queue.front() else { return };
        if !matches!(st.slots[i as usize], Slot::Absent) || inner.adopt_cached(st, i) {
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
fn start(inner: &Arc<Inner>, st: &mut State, i: u32) {
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
        guard.result = Some(download(&guard.inner, guard.i).await);
    });
}

/// Publishes a download's outcome when its task ends, however it ends (a panic or a
/// runtime shutdown counts as a failure), so no waiter can hang on it.
struct Done {
    inner: Arc<Inner>,
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

/// Downloads shard `i` into the cache: one process per shard at a time (file lock),
/// to a temporary name, checked against the manifest's size and SHA-256, then renamed.
/// Transient failures are retried with backoff until the per-object timeout.
async fn download(inner: &Inner, i: u32) -> Result<()> {
    let o = &inner.objects[i as usize];
    let b = &inner.bucket;
    let start = Instant::now();
    let final_path = inner.final_path(o);
    let partial = inner.dir.join(format!("{}.partial", o.sha256));
    let lock_path = inner.dir.join(format!("{}.lock", o.sha256));
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| cache_error(inner, "create", &lock_path, e, i))?;
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                if start.elapsed() > b.timeout {
                    return Err(Error::Remote {
                        url: o.url.clone(),
                        shard: Some(i),
                        kind: RemoteFailure::Unavailable,
                        detail: format!(
                            "another process held the download lock {} for {:?}",
                            lock_path.display(),
                            b.timeout
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(cache_error(inner, "lock", &lock_path, e, i)),
        }
    }
    // Another process may have finished it while we waited for the lock.
    if std::fs::metadata(&final_path).is_ok_and(|m| m.len() == o.size) {
        return Ok(());
    }
    let mut attempt = 0u32;
    let mut mismatches = 0u32;
    loop {
        attempt += 1;
        let last = match get_once(inner, o, &partial).await {
            Ok(()) => {
                std::fs::rename(&partial, &final_path).map_err(|e| cache_error(inner, "rename", &partial, e, i))?;
                return Ok(());
            }
            Err(Failure::Permanent(kind, detail)) => {
                let _ = std::fs::remove_file(&partial);
                if kind == RemoteFailure::Modified {
                    // A replaced object may be mid-upload: look again a few times.
                    mismatches += 1;
                    if mismatches >= 3 {
                        return Err(Error::Remote { url: o.url.clone(), shard: Some(i), kind, detail });
                    }
                    detail
                } else if kind == RemoteFailure::CacheFull && evict_released(inner) {
                    detail
                } else {
                    return Err(Error::Remote { url: o.url.clone(), shard: Some(i), kind, detail });
                }
            }
            Err(Failure::Transient(detail)) => detail,
        };
        let wait = backoff(attempt);
        if start.elapsed() + wait > b.timeout {
            let _ = std::fs::remove_file(&partial);
            return Err(b.gave_up(&o.url, Some(i), attempt, start, &last));
        }
        tokio::time::sleep(wait).await;
    }
}

/// On a full disk: evicts every shard the plan is done with; true if any went.
fn evict_released(inner: &Inner) -> bool {
    let mut st = inner.lock();
    let before = st.held_bytes;
    inner.make_room(&mut st, u64::MAX);
    st.held_bytes < before
}

fn cache_error(inner: &Inner, op: &'static str, path: &std::path::Path, e: std::io::Error, i: u32) -> Error {
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

fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
        || e.raw_os_error() == Some(libc::ENOSPC)
        || e.raw_os_error() == Some(libc::EDQUOT)
}

/// Sends one GET of `o` and checks that the object has the size the signed manifest
/// gives; the body is left to the caller.
async fn start_get(
    inner: &Inner,
    o: &Object,
    opts: GetOptions,
) -> std::result::Result<object_store::GetResult, Failure> {
    let b = &inner.bucket;
    let got = tokio::time::timeout(b.stall, b.store.get_opts(&b.key(&o.name), opts))
        .await
        .map_err(|_| Failure::Transient(format!("no response within {:?}", b.stall)))?
        .map_err(|e| b.classify(e))?;
    if got.meta.size != o.size {
        return Err(Failure::Permanent(
            RemoteFailure::Modified,
            format!("object has {} bytes, the signed manifest says {}", got.meta.size, o.size),
        ));
    }
    Ok(got)
}

/// One GET of the whole object into `partial`, hashing as it goes.
async fn get_once(inner: &Inner, o: &Object, partial: &std::path::Path) -> std::result::Result<(), Failure> {
    let b = &inner.bucket;
    let got = start_get(inner, o, GetOptions::default()).await?;
    let io = |op: &str, e: std::io::Error| {
        if is_disk_full(&e) {
            Failure::Permanent(RemoteFailure::CacheFull, format!("{op} {}: {e}", partial.display()))
        } else {
            Failure::Permanent(RemoteFailure::Config, format!("cache {op} {}: {e}", partial.display()))
        }
    };
    let mut f = File::create(partial).map_err(|e| io("create", e))?;
    let mut h = Sha256::default();
    let mut n = 0u64;
    let mut s = got.into_stream();
    loop {
        match tokio::time::timeout(b.stall, s.next()).await {
            Err(_) => return Err(Failure::Transient(format!("no data for {:?} after {n} bytes", b.stall))),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(match b.classify(e) {
                    Failure::Transient(d) => Failure::Transient(format!("after {n} bytes: {d}")),
                    p => p,
                })
            }
            Ok(Some(Ok(bytes))) => {
                inner.received.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                n += bytes.len() as u64;
                if n > o.size {
                    return Err(Failure::Permanent(
                        RemoteFailure::Modified,
                        "object longer than the signed manifest says".into(),
                    ));
                }
                h.update(&bytes);
                f.write_all(&bytes).map_err(|e| io("write", e))?;
            }
        }
    }
    if n != o.size {
        return Err(Failure::Transient(format!("body ended after {n} of {} bytes", o.size)));
    }
    if hex::encode(h.finish()) != o.sha256 {
        return Err(Failure::Permanent(
            RemoteFailure::Modified,
            "SHA-256 of the object differs from the signed manifest".into(),
        ));
    }
    // Durable before it gets the name that says "complete".
    f.sync_data().map_err(|e| io("sync", e))?;
    Ok(())
}

/// Creates the cache directory (mode 0700: it holds only ciphertext, but other users
/// have no business filling or pruning it).
fn create_cache_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(Error::io("create", dir))
}

impl RangeSource for Inner {
    fn get_ranges(&self, reqs: &[RangeRequest]) -> Result<Vec<(Vec<u8>, Option<String>)>> {
        let first = reqs.first().map(|r| r.shard);
        let url = first.and_then(|i| self.objects.get(i as usize)).map(|o| o.url.clone()).unwrap_or_default();
        let stopped = |detail: &str| Error::Remote {
            url: url.clone(),
            shard: first,
            kind: RemoteFailure::Unavailable,
            detail: detail.into(),
        };
        let base = {
            let st = self.lock();
            if st.closed {
                return Err(stopped("the dataset was closed"));
            }
            st.plan_irq
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::InvalidArgument(
                "ranged reads of an s3:// shard block: call them outside an async runtime (e.g. spawn_blocking)".into(),
            ));
        }
        let mut irq = self.irq.subscribe();
        // The reader stopped (now, or before this call began).
        let stop = async move {
            let _ = irq.wait_for(|g| *g != base).await;
        };
        let all = futures::stream::iter(reqs.iter().cloned())
            .map(|r| get_range(self, r))
            .buffered(self.concurrency * 8)
            .try_collect::<Vec<_>>();
        self.handle.block_on(async move {
            match futures::future::select(Box::pin(all), Box::pin(stop)).await {
                futures::future::Either::Left((r, _)) => r,
                futures::future::Either::Right(_) => Err(stopped("the reader stopped while waiting for ranged reads")),
            }
        })
    }
}

/// One ranged GET (retried with backoff) of a shard object, within the per-object
/// timeout overall: a server that trickles bytes cannot stretch it.
async fn get_range(inner: &Inner, req: RangeRequest) -> Result<(Vec<u8>, Option<String>)> {
    let b = &inner.bucket;
    match tokio::time::timeout(b.timeout, get_range_retried(inner, &req)).await {
        Ok(r) => r,
        Err(_) => {
            let url = inner.objects.get(req.shard as usize).map(|o| o.url.clone()).unwrap_or_default();
            Err(Error::Remote {
                url,
                shard: Some(req.shard),
                kind: RemoteFailure::Unavailable,
                detail: format!("bytes {:?} did not arrive within the timeout ({:?})", req.range, b.timeout),
            })
        }
    }
}

async fn get_range_retried(inner: &Inner, req: &RangeRequest) -> Result<(Vec<u8>, Option<String>)> {
    let i = req.shard;
    let range = req.range.clone();
    let o = inner.objects.get(i as usize).ok_or_else(|| Error::InvalidArgument(format!("no shard {i}")))?;
    let b = &inner.bucket;
    if range.start >= range.end || range.end > o.size {
        return Err(Error::InvalidArgument(format!("bytes {range:?} of {} ({} bytes)", o.url, o.size)));
    }
    let start = Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let last = match range_once(inner, o, range.clone(), req.if_match.clone()).await {
            Ok(got) => return Ok(got),
            Err(Failure::Permanent(kind, detail)) => {
                return Err(Error::Remote { url: o.url.clone(), shard: Some(i), kind, detail })
            }
            Err(Failure::Transient(detail)) => detail,
        };
        let wait = backoff(attempt);
        if start.elapsed() + wait > b.timeout {
            return Err(b.gave_up(&o.url, Some(i), attempt, start, &last));
        }
        tokio::time::sleep(wait).await;
    }
}

/// One attempt of [`get_range`]: the bytes and the object's ETag.
async fn range_once(
    inner: &Inner,
    o: &Object,
    range: std::ops::Range<u64>,
    if_match: Option<String>,
) -> std::result::Result<(Vec<u8>, Option<String>), Failure> {
    let b = &inner.bucket;
    let opts = GetOptions { range: Some(GetRange::Bounded(range.clone())), if_match, ..Default::default() };
    let got = start_get(inner, o, opts).await?;
    if got.range != range {
        return Err(Failure::Transient(format!("asked for bytes {range:?}, got {:?}", got.range)));
    }
    let tag = got.meta.e_tag.clone();
    let want = (range.end - range.start) as usize;
    let mut out = Vec::with_capacity(want);
    let mut s = got.into_stream();
    loop {
        match tokio::time::timeout(b.stall, s.next()).await {
            Err(_) => return Err(Failure::Transient(format!("no data for {:?} after {} bytes", b.stall, out.len()))),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(b.classify(e)),
            Ok(Some(Ok(bytes))) => {
                inner.received.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if out.len() + bytes.len() > want {
                    return Err(Failure::Transient(format!("more than the {want} bytes asked for")));
                }
                out.extend_from_slice(&bytes);
            }
        }
    }
    if out.len() != want {
        return Err(Failure::Transient(format!("body ended after {} of {want} bytes", out.len())));
    }
    Ok((out, tag))
}
