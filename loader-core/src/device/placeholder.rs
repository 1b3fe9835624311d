//! The device API without the `cuda` feature (the "dummy backend"): the same public
//! types and functions as the CUDA build, so callers need no `cfg` of their own.
//!
//! Every constructor ([`open`], [`DeviceLoader::new`], [`measure_h2d`],
//! [`Kernels::for_ordinal`]) returns [`Error::DeviceUnavailable`] naming the device
//! (`cuda:N`) and saying to build with the `cuda` feature. The other types cannot be
//! constructed: each holds an uninhabited field, so their methods are `match self.void
//! {}` and can never run.
//!
//! Methods whose signatures need cudarc types (views of device memory, events, kernel
//! launches) exist only in the CUDA build.
// The signatures match the CUDA build; the bodies cannot run.
#![allow(unused_variables)]

use std::sync::Arc;
use std::time::Duration;

use super::{device_name, DeviceOptions};
use crate::error::{Error, Result};
use crate::pipeline::{BatchLayout, BatchStream, Loader, LoaderState, Next};

/// No value: the placeholder types hold one, so none of them can exist.
enum Void {}

fn unavailable(ordinal: usize) -> Error {
    Error::DeviceUnavailable {
        device: device_name(ordinal),
        detail: "this build of shardlock has no CUDA support (build with the `cuda` feature)".into(),
    }
}

/// A CUDA context (the CUDA build's `cudarc::driver::CudaContext`). None can exist
/// without the `cuda` feature.
pub struct DeviceContext {
    void: Void,
}

/// A CUDA stream (the CUDA build's `cudarc::driver::CudaStream`). None can exist
/// without the `cuda` feature.
pub struct DeviceStream {
    void: Void,
}

/// Opens CUDA device `ordinal`. Without the `cuda` feature: always
/// [`Error::DeviceUnavailable`].
pub fn open(ordinal: usize) -> Result<Arc<DeviceContext>> {
    Err(unavailable(ordinal))
}

/// Host-to-device copy bandwidth in GB/s. Without the `cuda` feature: always
/// [`Error::DeviceUnavailable`].
pub fn measure_h2d(ordinal: usize, bytes: usize, iters: usize, pinned: bool) -> Result<f64> {
    let ctx = open(ordinal)?;
    match ctx.void {}
}

/// A [`Loader`] whose batches are delivered in GPU memory. Without the `cuda`
/// feature [`DeviceLoader::new`] fails, so none exists.
pub struct DeviceLoader {
    void: Void,
}

impl DeviceLoader {
    /// Puts a device stage behind `loader`. Without the `cuda` feature: always
    /// [`Error::DeviceUnavailable`] (the loader is dropped).
    pub fn new(loader: Loader, opts: DeviceOptions) -> Result<Self> {
        let ctx = open(opts.ordinal)?;
        match ctx.void {}
    }

    /// The CUDA context (the device's primary context).
    pub fn context(&self) -> &Arc<DeviceContext> {
        match self.void {}
    }

    /// The stream the copies run on.
    pub fn copy_stream(&self) -> &Arc<DeviceStream> {
        match self.void {}
    }

    /// The stream batches are made ready on.
    pub fn consumer_stream(&self) -> Option<&Arc<DeviceStream>> {
        match self.void {}
    }

    /// Sets the consumer stream; `None` leaves synchronization to the consumer.
    pub fn set_consumer_stream(&mut self, stream: Option<Arc<DeviceStream>>) {
        match self.void {}
    }

    /// Device buffers allocated so far.
    pub fn device_buffers_allocated(&self) -> usize {
        match self.void {}
    }

    /// Host batch buffers registered with the driver.
    pub fn host_buffers_registered(&self) -> usize {
        match self.void {}
    }
}

impl BatchStream for DeviceLoader {
    type Batch = DeviceBatch;

    fn loader(&self) -> &Loader {
        match self.void {}
    }

    fn epoch(&self) -> u64 {
        match self.void {}
    }

    fn set_epoch(&mut self, epoch: u64) {
        match self.void {}
    }

    fn len(&self) -> Result<usize> {
        match self.void {}
    }

    fn is_empty(&self) -> Result<bool> {
        match self.void {}
    }

    fn state(&self) -> LoaderState {
        match self.void {}
    }

    fn load_state(&mut self, s: &LoaderState) -> Result<()> {
        match self.void {}
    }

    fn next_within(&mut self, timeout: Duration) -> Next<DeviceBatch> {
        match self.void {}
    }

    fn buffers_allocated(&self) -> usize {
        match self.void {}
    }

    fn wait_ready(&self, batch: &DeviceBatch) -> Result<()> {
        match self.void {}
    }
}

impl Iterator for DeviceLoader {
    type Item = Result<DeviceBatch>;

    fn next(&mut self) -> Option<Result<DeviceBatch>> {
        match self.void {}
    }
}

/// A batch in GPU memory. None exists without the `cuda` feature.
pub struct DeviceBatch {
    void: Void,
}

impl std::ops::Deref for DeviceBatch {
    type Target = BatchLayout;

    /// Length, sample ids, fields and position, as for a host [`crate::Batch`].
    fn deref(&self) -> &BatchLayout {
        match self.void {}
    }
}

impl DeviceBatch {
    /// The device, `cuda:N`.
    pub fn device(&self) -> &str {
        match self.void {}
    }

    /// Blocks until the batch's bytes are on the device.
    pub fn synchronize(&self) -> Result<()> {
        match self.void {}
    }

    /// Device address and byte length of a field's values (for DLPack export).
    pub fn field_address(&self, name: &str) -> Result<(u64, usize)> {
        match self.void {}
    }

    /// Device address of a bytes field's offsets (`samples + 1` u64).
    pub fn offsets_address(&self, name: &str) -> Result<u64> {
        match self.void {}
    }

    /// Makes `stream` wait for the copy and keeps the buffer from reuse until the work
    /// queued on `stream` before the batch is dropped completes.
    pub fn record_use(&self, stream: &Arc<DeviceStream>) -> Result<()> {
        match self.void {}
    }

    /// [`DeviceBatch::record_use`] for a raw `CUstream` handle from another library.
    ///
    /// # Safety
    /// As in the CUDA build: `stream` must be a valid stream handle of this device's
    /// primary context (or a special handle 0, 1 or 2) and must not be destroyed before
    /// the batch is dropped. (No batch exists without the `cuda` feature.)
    #[allow(unsafe_code)]
    pub unsafe fn use_on_raw_stream(&self, stream: usize) -> Result<()> {
        match self.void {}
    }

    /// Notes a consumer that orders its own work (DLPack `stream=-1`).
    pub fn use_unsynchronized(&self) {
        match self.void {}
    }
}

/// The decode kernels, compiled for one device. Without the `cuda` feature none
/// exists; the CPU references ([`super::kernels::cpu`]) are always built.
pub struct Kernels {
    void: Void,
}

impl Kernels {
    /// The kernels for `ctx`'s device.
    pub fn for_device(ctx: &Arc<DeviceContext>) -> Result<Arc<Kernels>> {
        match ctx.void {}
    }

    /// The kernels for device `ordinal`. Without the `cuda` feature: always
    /// [`Error::DeviceUnavailable`].
    pub fn for_ordinal(ordinal: usize) -> Result<Arc<Kernels>> {
        Self::for_device(&open(ordinal)?)
    }
}

impl std::fmt::Debug for DeviceContext {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.void {}
    }
}

impl std::fmt::Debug for DeviceStream {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.void {}
    }
}

impl std::fmt::Debug for DeviceLoader {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.void {}
    }
}

impl std::fmt::Debug for DeviceBatch {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.void {}
    }
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.void {}
    }
}
