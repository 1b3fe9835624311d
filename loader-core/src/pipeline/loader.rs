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
}

/// Streams batches of an encrypted dataset: an iterator of `Result<Batch>`. One
/// iteration is one epoch; the next iteration is the next epoch (or the one given to
/// [`Loader::set_epoch`]).
pub struct Loader {
    session: Arc<Session>,
    rank: u32,
    world: u32,
    epoch: u64,
    history: Vec<Consumed>,
    run: Option<EpochRun>,
    /// Process that built the loader: its worker threads do not exist after a fork.
    pid: u32,
}

impl Drop for Loader {
    fn drop(&mut self) {
        if self.abandon_if_forked() {
            // The dataset of an s3:// loader owns a tokio runtime whose threads stayed
            // in the parent, and locks they may have held at the fork: never drop it
            // in the child.
            std::mem::forget(self.session.clone());
        }
    }
}

impl Loader {
    pub(super) fn new(session: Arc<Session>, rank: u32, world: u32) -> Self {
        Self { session, rank, world, epoch: 0, history: Vec::new(), run: None, pid: std::process::id() }
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
                self.run = None;
                self.history.clear();
                self.epoch += 1;
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
        }
        self.epoch = epoch;
    }

    /// Samples this rank reads per epoch (after a restore: in the rest of this epoch).
    pub fn samples(&self) -> Result<usize> {
        Ok(plan::rank_samples(&self.session.spec, self.epoch(), self.rank, self.world, &self.history)?.len())
    }

    /// Batches this rank yields in the current epoch.
    pub fn len(&self) -> Result<usize> {
        let n = self.samples()?;
        let b = self.session.batch_size;
        Ok(if self.session.drop_last { n / b } else { n.div_ceil(b) })
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
        LoaderState { epoch: self.epoch(), seed: self.session.spec.seed, consumed }
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
        if s.seed != self.session.spec.seed {
            return Err(Error::InvalidArgument(format!(
                "state was saved with seed {}, this loader has seed {}",
                s.seed, self.session.spec.seed
            )));
        }
        plan::remaining(plan::global_order(&self.session.spec, s.epoch), &s.consumed, &self.session.spec)?;
        self.run = None;
        self.epoch = s.epoch;
        self.history = s.consumed.clone();
        Ok(())
    }

    /// Batch buffers allocated so far (stays flat in steady state).
    pub fn buffers_allocated(&self) -> usize {
        self.session.pool.allocated()
    }

    fn start(&mut self) -> Result<EpochRun> {
        let samples = plan::rank_samples(&self.session.spec, self.epoch, self.rank, self.world, &self.history)?;
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
                self.run = None;
                self.history.clear();
                self.epoch += 1;
                None
            }
        }
    }
}
