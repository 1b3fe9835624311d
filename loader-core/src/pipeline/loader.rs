//! The [`Loader`]: one iteration is one epoch, with resume state and a fork guard.
//! The epochs themselves run in [`super::epoch`].

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::batch::Batch;
use super::builder::{LoaderBuilder, Session};
use super::epoch::{EpochRun, Poll};
use super::plan::{self, Consumed};
use super::stream::Next;
use crate::dataset::Dataset;
use crate::error::{Error, Result};

/// Serializable resume state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Epoch in progress.
    pub epoch: u64,
    /// Seed (must match on restore).
    pub seed: u64,
    /// Consumption so far in this epoch, one entry per save/restore segment.
    pub consumed: Vec<Consumed>,
    /// For a DataLoader worker ([`LoaderBuilder::dataloader_worker`] with more than
    /// one worker): where this worker stands after `consumed`. Such a state restores
    /// only into the same worker of the same count; a state without it (a rank's own,
    /// see `consumed`) restores with any worker count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerPosition>,
    /// For a [`super::TokenStream`]: where it stands in its windows (then `consumed`
    /// and `worker` are empty, and its document loader's position is in here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Box<super::tokens::TokenPosition>>,
}

/// Where one DataLoader worker stands in its rank's epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPosition {
    /// The worker's number.
    pub id: u32,
    /// Workers on the rank.
    pub count: u32,
    /// Batches of its own share this worker had yielded.
    pub batches: u64,
}

/// Streams batches of an encrypted dataset: an iterator of `Result<Batch>`. One
/// iteration is one epoch; the next iteration is the next epoch (or the one given to
/// [`Loader::set_epoch`]).
pub struct Loader {
    session: Arc<Session>,
    rank: u32,
    world: u32,
    /// DataLoader worker (number, count) on the rank.
    worker: (u32, u32),
    /// Batches of this worker's own share consumed before a restore, in this epoch.
    skip: u64,
    epoch: u64,
    history: Vec<Consumed>,
    run: Option<EpochRun>,
    /// Process that built the loader: its worker threads do not exist after a fork.
    pid: u32,
}

impl Drop for Loader {
    fn drop(&mut self) {
        if !self.abandon_if_forked() {
            // Stop the workers first, then wipe the idle batch buffers: no earlier
            // batch's plaintext outlives the loader in them (buffers still held by
            // batches are wiped when the last of those is dropped with the pool).
            self.run = None;
            self.session.pool.wipe_idle();
            return;
        }
        // The dataset of an s3:// loader owns a tokio runtime whose threads stayed in
        // the parent, and locks they may have held at the fork: never drop it in the
        // child.
        std::mem::forget(self.session.clone());
    }
}

impl Loader {
    pub(super) fn new(session: Arc<Session>, rank: u32, world: u32, worker: (u32, u32)) -> Self {
        Self {
            session,
            rank,
            world,
            worker,
            skip: 0,
            epoch: 0,
            history: Vec::new(),
            run: None,
            pid: std::process::id(),
        }
    }

    /// After the last batch of an epoch: the next iteration starts the next one.
    fn end_epoch(&mut self) {
        self.run = None;
        self.history.clear();
        self.skip = 0;
        self.epoch += 1;
    }

    /// The samples this loader reads in `epoch` after the rank's `history` and `skip`
    /// batches of its own share.
    fn samples_after(&self, epoch: u64, history: &[Consumed], skip: u64) -> Result<Vec<plan::SampleRef>> {
        let mine = plan::rank_samples(&self.session.spec, epoch, self.rank, self.world, history)?;
        let s = &self.session;
        Ok(plan::worker_samples(mine, s.batch_size, s.drop_last, self.worker, skip))
    }

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
                self.end_epoch();
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
        &self.session.ds
    }

    /// Names of the fields each batch holds.
    pub fn field_names(&self) -> Vec<&str> {
        self.session.selected.iter().map(|&i| self.session.ds.manifest().schema.fields[i].name.as_str()).collect()
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
            self.skip = 0;
        }
        self.epoch = epoch;
    }

    /// Samples this rank (a DataLoader worker: its share) reads per epoch (after a
    /// restore: in the rest of this epoch).
    pub fn samples(&self) -> Result<usize> {
        Ok(self.samples_after(self.epoch(), &self.history, self.skip)?.len())
    }

    /// Samples in this rank's share of the current epoch before it is cut into batches
    /// (all DataLoader workers of the rank together; after a restore: what is left).
    pub fn rank_samples(&self) -> Result<usize> {
        Ok(plan::rank_samples(&self.session.spec, self.epoch(), self.rank, self.world, &self.history)?.len())
    }

    /// Batches this rank (a DataLoader worker: its share) yields in the current epoch.
    pub fn len(&self) -> Result<usize> {
        Ok(plan::batch_count(self.samples()?, self.session.batch_size, self.session.drop_last))
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
        let (id, count) = self.worker;
        let mut worker = None;
        if count > 1 {
            // A worker's batches are not a prefix of the rank's: say where it stands.
            let batches = self.skip + self.run.as_ref().map_or(0, |r| r.consumed_batches as u64);
            worker = Some(WorkerPosition { id, count, batches });
        } else if let Some(r) = &self.run {
            if r.consumed_samples > 0 {
                consumed.push(Consumed { world: self.world, per_rank: r.consumed_samples });
            }
        }
        LoaderState { epoch: self.epoch(), seed: self.session.spec.seed, consumed, worker, tokens: None }
    }

    /// Like [`Loader::state`], but as if the last `unconsumed` samples this loader
    /// yielded in the current epoch had not been yielded: for a stage that reads ahead
    /// of its own consumer (the device stage), so a resume re-reads what the consumer
    /// never saw.
    pub fn state_excluding(&self, unconsumed: u64) -> LoaderState {
        let mut s = self.state();
        if let Some(w) = s.worker.as_mut() {
            let b = self.session.batch_size.max(1) as u64;
            w.batches = w.batches.saturating_sub(unconsumed.div_ceil(b)).max(self.skip.min(w.batches));
            return s;
        }
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
        if s.tokens.is_some() {
            return Err(Error::InvalidArgument(
                "this state is a token stream's (token windows): restore it into a token stream over this loader"
                    .into(),
            ));
        }
        if s.seed != self.session.spec.seed {
            return Err(Error::InvalidArgument(format!(
                "state was saved with seed {}, this loader has seed {}",
                s.seed, self.session.spec.seed
            )));
        }
        plan::remaining(plan::global_order(&self.session.spec, s.epoch), &s.consumed, &self.session.spec)?;
        let mut skip = 0;
        if let Some(p) = s.worker.filter(|p| p.batches > 0) {
            let (id, count) = self.worker;
            if (p.id, p.count) != (id, count) {
                return Err(Error::InvalidArgument(format!(
                    "resume state is DataLoader worker {} of {}'s, this loader is worker {id} of {count}: resume with \
                     the same num_workers, or save the rank's state (shardlock.torch.DataLoader.state_dict()), which \
                     restores with any worker count",
                    p.id, p.count
                )));
            }
            skip = p.batches;
        }
        let own = self.samples_after(s.epoch, &s.consumed, 0)?.len();
        let own = plan::batch_count(own, self.session.batch_size, self.session.drop_last);
        if skip > own as u64 {
            return Err(Error::InvalidArgument(format!(
                "resume state says DataLoader worker {} had yielded {skip} batches, but its share of the epoch has {own}",
                self.worker.0
            )));
        }
        self.run = None;
        self.epoch = s.epoch;
        self.history = s.consumed.clone();
        self.skip = skip;
        Ok(())
    }

    /// What every epoch shares (for the stages built on a loader in this module).
    pub(super) fn session(&self) -> &Session {
        &self.session
    }

    /// Samples left out of their batch so far because their image did not decode
    /// (`on_decode_error = skip`; each is also an audit record, `decode_skipped`).
    pub fn decode_skips(&self) -> u64 {
        self.session.decode_skips.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The shard and record of global sample id `sample` (as in
    /// [`super::BatchLayout::sample_ids`]), for errors about one sample.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn locate(&self, sample: u64) -> (crate::error::ShardRef, u64) {
        let p = &self.session.prefix;
        let i = p.partition_point(|&start| start <= sample).saturating_sub(1);
        (self.session.ds.shard_ref(i as u32), sample - p.get(i).copied().unwrap_or(0))
    }

    /// Samples per batch.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn batch_size(&self) -> usize {
        self.session.batch_size
    }

    /// The seed of the plan and of the image transforms.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn seed(&self) -> u64 {
        self.session.spec.seed
    }

    /// The memory policy the loader was built with.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn memory_policy(&self) -> crate::memory::MemoryPolicy {
        self.session.policy
    }

    /// Whether the decrypt workers decode field `name`, and what they do with a
    /// sample whose image does not decode.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn worker_decode(&self, name: &str) -> (bool, crate::decode::OnDecodeError) {
        let s = &self.session;
        let schema = &s.ds.manifest().schema;
        let on = s.selected.iter().zip(&s.decode).any(|(&f, d)| d.is_some() && schema.fields[f].name == name);
        (on, s.on_decode_error)
    }

    /// Batch buffers allocated so far (stays flat in steady state).
    pub fn buffers_allocated(&self) -> usize {
        self.session.pool.allocated()
    }

    fn start(&mut self) -> Result<EpochRun> {
        let samples = self.samples_after(self.epoch, &self.history, self.skip)?;
        EpochRun::start(self.session.clone(), self.epoch, samples)
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.abandon_if_forked() {
            return Some(Err(self.forked_error()));
        }
        if self.run.is_none() {
            // After the end of an epoch (`None`), the next call starts the next one.
            match self.start() {
                Ok(r) => self.run = Some(r),
                Err(e) => return Some(Err(e)),
            }
        }
        let run = self.run.as_mut()?;
        match run.next() {
            Some(b) => Some(b),
            None => {
                self.end_epoch();
                None
            }
        }
    }
}
