//! [`BatchStream`]: what every stream of batches shares, whether its batches are in
//! host memory ([`Loader`]) or on a GPU ([`crate::device::DeviceLoader`]).

use std::ops::Deref;
use std::time::Duration;

use super::batch::{Batch, BatchLayout};
use super::loader::{Loader, LoaderState};
use crate::error::Result;

/// Outcome of [`BatchStream::next_within`] (and [`Loader::next_within`]).
#[derive(Debug)]
pub enum Next<B> {
    /// A batch, or the error that stopped the epoch.
    Batch(Result<B>),
    /// The epoch is over.
    End,
    /// Nothing arrived within the timeout; call again.
    Pending,
}

/// A stream of batches with the [`Loader`]'s epoch, resume and ordering semantics:
/// an iterator of `Result<Self::Batch>`, one iteration per epoch.
///
/// Implemented by the [`Loader`] (host batches) and by the device stage
/// ([`crate::device::DeviceLoader`], batches in GPU memory), so consumers (the Python
/// binding, [`crate::run_bench`]) are written once for both.
pub trait BatchStream: Iterator<Item = Result<<Self as BatchStream>::Batch>> {
    /// What the stream yields: length, sample ids and fields through
    /// [`BatchLayout`], plus where the bytes are.
    type Batch: Deref<Target = BatchLayout>;

    /// The host loader the batches come from (dataset, field names).
    fn loader(&self) -> &Loader;

    /// The epoch the next iteration reads.
    fn epoch(&self) -> u64;

    /// Sets the epoch of the next iteration (stops one in progress, and drops
    /// batches read ahead).
    fn set_epoch(&mut self, epoch: u64);

    /// Batches this rank yields in the current epoch.
    fn len(&self) -> Result<usize>;

    /// True when an epoch yields no batch.
    fn is_empty(&self) -> Result<bool>;

    /// Resume state: batches read ahead but not yet yielded count as not read.
    fn state(&self) -> LoaderState;

    /// Restores a state from [`BatchStream::state`] of any stream over the same
    /// dataset and seed.
    fn load_state(&mut self, s: &LoaderState) -> Result<()>;

    /// Like [`Iterator::next`], but waits at most `timeout` for the next batch, so a
    /// caller can service signals (Ctrl-C in Python) while the pipeline works.
    fn next_within(&mut self, timeout: Duration) -> Next<Self::Batch>;

    /// Batch buffers allocated so far, host and device (stays flat in steady state).
    fn buffers_allocated(&self) -> usize;

    /// Blocks until `batch`'s bytes are readable where they live: a host batch is at
    /// once; a device batch once its copy to the device completed.
    fn wait_ready(&self, batch: &Self::Batch) -> Result<()>;
}

impl BatchStream for Loader {
    type Batch = Batch;

    fn loader(&self) -> &Loader {
        self
    }

    fn epoch(&self) -> u64 {
        Loader::epoch(self)
    }

    fn set_epoch(&mut self, epoch: u64) {
        Loader::set_epoch(self, epoch);
    }

    fn len(&self) -> Result<usize> {
        Loader::len(self)
    }

    fn is_empty(&self) -> Result<bool> {
        Loader::is_empty(self)
    }

    fn state(&self) -> LoaderState {
        Loader::state(self)
    }

    fn load_state(&mut self, s: &LoaderState) -> Result<()> {
        Loader::load_state(self, s)
    }

    fn next_within(&mut self, timeout: Duration) -> Next<Batch> {
        Loader::next_within(self, timeout)
    }

    fn buffers_allocated(&self) -> usize {
        Loader::buffers_allocated(self)
    }

    fn wait_ready(&self, _batch: &Batch) -> Result<()> {
        Ok(())
    }
}
