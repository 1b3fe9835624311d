//! One epoch in flight: decrypt worker threads fill batches in any order, under flow
//! control (at most `depth` batches ahead of the consumer), and the consumer receives
//! them in plan order. Shards are opened once per epoch and released after their last
//! batch.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;

use super::batch::Batch;
use super::builder::Session;
use super::gather::{fill, ChunkScratch};
use super::plan::{SampleRef, Shuffle};
use crate::dataset::OpenShard;
use crate::error::{Error, Result};

pub(super) enum Poll {
    Ready(Option<Result<Batch>>),
    Pending,
}

struct Flow {
    next: usize,
    consumed: usize,
    stop: bool,
}

type ShardCell = Arc<OnceLock<Result<Arc<OpenShard>>>>;

/// Shards opened in this epoch, shared by the workers: each is authorized and
/// unwrapped once per epoch, and dropped after the last batch that needs it.
#[derive(Default)]
pub(super) struct EpochShards {
    map: Mutex<HashMap<u32, ShardCell>>,
}

impl EpochShards {
    pub(super) fn get(&self, session: &Session, shard: u32) -> Result<Arc<OpenShard>> {
        let cell = {
            let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(shard).or_default().clone()
        };
        cell.get_or_init(|| session.access.open_shared(&session.ds, shard)).clone()
    }

    /// Forgets a shard and tells the dataset it is no longer needed (a remote cache
    /// may evict it); returns its mapping so the caller can retire it off-thread.
    fn evict(&self, session: &Session, shard: u32) -> Option<Box<dyn Send>> {
        let gone = self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&shard);
        session.ds.release_shard(shard);
        gone.map(|g| Box::new(g) as Box<dyn Send>)
    }
}

pub(super) struct EpochRun {
    session: Arc<Session>,
    flow: Arc<(Mutex<Flow>, Condvar)>,
    rx: crossbeam_channel::Receiver<(usize, Result<Batch>)>,
    reorder: BTreeMap<usize, Result<Batch>>,
    pub(super) epoch: u64,
    pub(super) n_batches: usize,
    pub(super) consumed_batches: usize,
    pub(super) consumed_samples: u64,
    shards: Arc<EpochShards>,
    last_use: HashMap<u32, Vec<u32>>,
    failed: Option<Error>,
    workers: Vec<JoinHandle<()>>,
}

/// What the decrypt workers of one epoch read: the session, this rank's samples in
/// plan order, and the epoch's open shards.
pub(super) struct EpochWork {
    /// Process that runs the workers.
    pub(super) pid: u32,
    pub(super) session: Arc<Session>,
    pub(super) samples: Arc<Vec<SampleRef>>,
    pub(super) shards: Arc<EpochShards>,
    pub(super) epoch: u64,
}

impl EpochRun {
    pub(super) fn start(session: Arc<Session>, epoch: u64, samples: Vec<SampleRef>) -> Result<Self> {
        let b = session.batch_size;
        let total = samples.len();
        let n_batches = if session.drop_last { total / b } else { total.div_ceil(b) };
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
        session.ds.plan_shards(&order, session.spec.shuffle == Shuffle::Global);
        // A key service releases DEKs for the next shards of this plan in one request.
        session.access.plan(&session.ds, &order);
        let flow = Arc::new((Mutex::new(Flow { next: 0, consumed: 0, stop: false }), Condvar::new()));
        let (tx, rx) = crossbeam_channel::bounded(session.depth + session.workers);
        let shards = Arc::new(EpochShards::default());
        let work = Arc::new(EpochWork {
            pid: std::process::id(),
            session: session.clone(),
            samples: Arc::new(samples),
            shards: shards.clone(),
            epoch,
        });
        let mut workers = Vec::with_capacity(session.workers);
        for i in 0..session.workers.min(n_batches.max(1)) {
            let (work, flow, tx) = (work.clone(), flow.clone(), tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("shardlock-decrypt-{i}"))
                .spawn(move || worker(&work, &flow, &tx, n_batches))
                .map_err(Error::os("start a decrypt worker thread"))?;
            workers.push(h);
        }
        Ok(Self {
            epoch,
            session,
            flow,
            rx,
            reorder: BTreeMap::new(),
            n_batches,
            consumed_batches: 0,
            consumed_samples: 0,
            shards,
            last_use,
            failed: None,
            workers,
        })
    }

    pub(super) fn next(&mut self) -> Option<Result<Batch>> {
        match self.poll(None) {
            Poll::Ready(r) => r,
            Poll::Pending => None,
        }
    }

    /// The next batch in plan order, waiting at most `timeout` (forever if `None`).
    pub(super) fn poll(&mut self, timeout: Option<std::time::Duration>) -> Poll {
        if let Some(e) = &self.failed {
            return Poll::Ready(Some(Err(e.clone())));
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
                if let Some(gone) = self.shards.evict(&self.session, s) {
                    self.session.pool.retire(gone);
                }
            }
        }
        match r {
            Ok(b) => {
                self.consumed_samples += b.len() as u64;
                Poll::Ready(Some(Ok(b)))
            }
            Err(e) => {
                self.failed = Some(e.clone());
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
            self.session.ds.interrupt_fetches();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(
    work: &EpochWork,
    flow: &(Mutex<Flow>, Condvar),
    tx: &crossbeam_channel::Sender<(usize, Result<Batch>)>,
    n: usize,
) {
    let session = &work.session;
    let mut scratch = match ChunkScratch::new(session.policy) {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send((take_batch(flow, session.depth, n).unwrap_or(0), Err(e)));
            return;
        }
    };
    while let Some(k) = take_batch(flow, session.depth, n) {
        let r = catch_unwind(AssertUnwindSafe(|| fill(work, k, &mut scratch))).unwrap_or_else(|p| {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            Err(Error::Internal(format!("worker panicked on batch {k}: {}", msg.unwrap_or_default())))
        });
        if tx.send((k, r)).is_err() {
            return;
        }
    }
}

fn take_batch(flow: &(Mutex<Flow>, Condvar), depth: usize, n: usize) -> Option<usize> {
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
