//! The device stage: [`DeviceLoader`], read-ahead and ordering (feature `cuda`). See
//! the module docs in `device/mod.rs` for the ordering invariants.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use super::batch::DeviceBatch;
use super::buffers::{DevBuf, DeviceBuffers, HostRegistrations};
use super::decode::{device_layout, host_ranges, DeviceDecode};
use super::probe::{clear_stale, device_error, open};
use super::{device_name, DeviceOptions};
use crate::error::{Error, Result};
use crate::pipeline::{Batch, BatchLayout, BatchStream, Loader, LoaderState, Next};

/// A copy issued but not yet handed out.
struct InFlight {
    host: Batch,
    dev: DevBuf,
    /// The device batch's slots (the host's, unless fields are decoded on the device).
    layout: BatchLayout,
    done: Arc<CudaEvent>,
}

/// A [`Loader`] whose batches are delivered in GPU memory: a [`BatchStream`] (an
/// iterator of `Result<DeviceBatch>`) with the loader's epoch, resume and ordering
/// semantics.
pub struct DeviceLoader {
    ctx: Arc<CudaContext>,
    device: String,
    copy: Arc<CudaStream>,
    consumer: Option<Arc<CudaStream>>,
    pinned: bool,
    depth: usize,
    /// Host buffers registered with the driver.
    registered: HostRegistrations,
    inflight: VecDeque<InFlight>,
    /// Handed out; the host buffer goes back to the pool once its copy completed.
    draining: VecDeque<(Batch, Arc<CudaEvent>)>,
    buffers: DeviceBuffers,
    pending_err: Option<Error>,
    /// Image fields decoded on the device (dropped before the loader and its pool). In a
    /// mutex only so that the stage stays `Sync`; it is reached through `&mut self`.
    decoder: Option<std::sync::Mutex<DeviceDecode>>,
    loader: Loader,
}

impl std::fmt::Debug for DeviceLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLoader")
            .field("device", &self.device)
            .field("pinned", &self.pinned)
            .field("depth", &self.depth)
            .finish()
    }
}

impl DeviceLoader {
    /// Puts a device stage behind `loader`. Fails with [`Error::DeviceUnavailable`]
    /// when the device (or, for `opts.decode`, nvJPEG or NVRTC) cannot be used, and
    /// with [`Error::InvalidArgument`] when `opts.decode` does not fit the loader
    /// (checked first, without a device).
    pub fn new(loader: Loader, opts: DeviceOptions) -> Result<Self> {
        super::decode::check(&loader, &opts.decode)?;
        let ctx = open(opts.ordinal)?;
        let device = device_name(opts.ordinal);
        let decoder = match opts.decode.is_empty() {
            true => None,
            false => Some(std::sync::Mutex::new(DeviceDecode::new(
                &ctx,
                &loader,
                opts.decode,
                opts.nvjpeg.as_deref(),
                opts.pinned,
            )?)),
        };
        let copy = ctx.new_stream().map_err(device_error(&device, "cuStreamCreate"))?;
        let consumer = Some(ctx.default_stream());
        Ok(Self {
            ctx,
            device,
            copy,
            consumer,
            pinned: opts.pinned,
            depth: opts.depth.max(2),
            registered: HostRegistrations::default(),
            inflight: VecDeque::new(),
            draining: VecDeque::new(),
            buffers: DeviceBuffers::default(),
            pending_err: None,
            decoder,
            loader,
        })
    }

    /// The CUDA context (the device's primary context).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream the copies run on.
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy
    }

    /// The stream batches are made ready on: it waits for each batch's copy before
    /// the batch is handed out, and the batch's buffer is reused only after the work
    /// queued on it when the batch is dropped. Default: the context's default stream.
    pub fn consumer_stream(&self) -> Option<&Arc<CudaStream>> {
        self.consumer.as_ref()
    }

    /// Sets the consumer stream; `None` leaves synchronization to the consumer
    /// ([`DeviceBatch::record_use`] / [`DeviceBatch::use_on_raw_stream`], as the
    /// DLPack export does).
    pub fn set_consumer_stream(&mut self, stream: Option<Arc<CudaStream>>) {
        self.consumer = stream;
    }

    /// Device buffers allocated so far (stays flat in steady state).
    pub fn device_buffers_allocated(&self) -> usize {
        self.buffers.allocated()
    }

    /// Host batch buffers registered with the driver (at most the pool's size).
    pub fn host_buffers_registered(&self) -> usize {
        self.registered.len()
    }

    /// Waits for every queued copy; false if that could not be confirmed.
    fn sync_copies(&self) -> bool {
        clear_stale(&self.ctx);
        self.copy.synchronize().is_ok()
    }

    fn discard_read_ahead(&mut self) {
        let synced = self.sync_copies();
        for f in self.inflight.drain(..) {
            self.buffers.put(f.dev);
            if !synced {
                // A DMA may still read it: never wipe or refill it (leaked, still locked).
                std::mem::forget(f.host);
            }
        }
        if synced {
            self.draining.clear();
        } else {
            for (host, _) in self.draining.drain(..) {
                std::mem::forget(host);
            }
        }
        self.pending_err = None;
    }

    /// Host buffers whose copies finished go back to the pool.
    fn release_copied(&mut self) {
        while let Some((_, done)) = self.draining.front() {
            if !done.is_complete() {
                break;
            }
            self.draining.pop_front();
        }
    }

    /// Starts the copy of `host` to a device buffer on the copy stream.
    fn issue(&mut self, host: Batch) -> Result<()> {
        let used = host.used_len();
        if self.pinned {
            #[allow(unsafe_code)]
            // SAFETY: `host` is a batch of `self.loader`'s pool, which never frees a
            // buffer while the loader lives; `Drop` unregisters every buffer before the
            // loader (and its pool) is dropped.
            unsafe { self.registered.register(&self.ctx, &self.device, host.buffer_bytes()) }?;
        }
        clear_stale(&self.ctx);
        let (layout, total, ranges) = match &mut self.decoder {
            Some(d) => {
                let fields = d.get_mut().unwrap_or_else(|p| p.into_inner()).fields();
                let (layout, total) = device_layout(host.layout(), used, fields);
                (layout, total, host_ranges(host.layout(), used, fields))
            }
            None => (host.layout().clone(), used, vec![(0, used)]),
        };
        let mut dev = self.buffers.take(&self.copy, &self.device, total)?;
        let err = |op| device_error(&self.device, op);
        // Consumers' events stay with the buffer until every wait is queued.
        for e in &dev.after {
            self.copy.wait(e).map_err(err("cuStreamWaitEvent"))?;
        }
        dev.after.clear();
        let Some(slice) = dev.slice.as_mut() else {
            return Err(Error::Internal("device buffer without memory".into()));
        };
        for (a, z) in ranges.into_iter().filter(|(a, z)| z > a) {
            let mut dst = slice.slice_mut(a..z);
            self.copy.memcpy_htod(&host.buffer_bytes()[a..z], &mut dst).map_err(err("H2D copy"))?;
        }
        if let Some(d) = &mut self.decoder {
            let d = d.get_mut().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = d.run(&self.copy, &host, &layout, dev.addr, &self.loader) {
                // Queued work may still read the host buffer: it waits for it (or is leaked).
                self.buffers.put(dev);
                if !self.sync_copies() {
                    std::mem::forget(host);
                }
                return Err(e);
            }
        }
        let done = self.ctx.new_event(None).and_then(|e| e.record(&self.copy).map(|_| e));
        match done {
            Ok(done) => {
                self.inflight.push_back(InFlight { host, dev, layout, done: Arc::new(done) });
                Ok(())
            }
            Err(e) => {
                // The copy may be queued: the host buffer waits for it (or is leaked).
                if !self.sync_copies() {
                    std::mem::forget(host);
                }
                Err(err("cuEventRecord")(e))
            }
        }
    }

    fn hand_out(&mut self, f: InFlight) -> Result<DeviceBatch> {
        if let Some(s) = &self.consumer {
            if let Err(e) = s.wait(&f.done) {
                self.buffers.put(f.dev);
                self.draining.push_back((f.host, f.done));
                return Err(device_error(&self.device, "cuStreamWaitEvent")(e));
            }
        }
        let b = DeviceBatch::new(
            f.dev,
            self.buffers.free_list().clone(),
            self.ctx.clone(),
            self.device.clone(),
            f.done.clone(),
            self.consumer.as_ref(),
            f.layout,
        );
        self.draining.push_back((f.host, f.done));
        Ok(b)
    }

    /// Copies ahead, without waiting, up to `depth` batches (never past the epoch's
    /// last batch, so the loader's epoch and resume state stay the consumer's).
    fn top_up(&mut self) {
        while self.pending_err.is_none()
            && self.inflight.len() < self.depth
            && self.loader.batches_left().unwrap_or(0) > 0
        {
            match self.loader.next_within(Duration::ZERO) {
                Next::Batch(Ok(b)) => {
                    if let Err(e) = self.issue(b) {
                        self.pending_err = Some(e);
                    }
                }
                Next::Batch(Err(e)) => self.pending_err = Some(e),
                Next::Pending | Next::End => break,
            }
        }
    }
}

impl BatchStream for DeviceLoader {
    type Batch = DeviceBatch;

    fn loader(&self) -> &Loader {
        &self.loader
    }

    fn epoch(&self) -> u64 {
        self.loader.epoch()
    }

    /// Drops copies read ahead.
    fn set_epoch(&mut self, epoch: u64) {
        self.discard_read_ahead();
        self.loader.set_epoch(epoch);
    }

    fn len(&self) -> Result<usize> {
        self.loader.len()
    }

    fn is_empty(&self) -> Result<bool> {
        self.loader.is_empty()
    }

    /// Batches copied ahead but not yet handed out count as not read.
    fn state(&self) -> LoaderState {
        let ahead: u64 = self.inflight.iter().map(|f| f.host.len() as u64).sum();
        self.loader.state_excluding(ahead)
    }

    fn load_state(&mut self, s: &LoaderState) -> Result<()> {
        self.discard_read_ahead();
        self.loader.load_state(s)
    }

    fn next_within(&mut self, timeout: Duration) -> Next<DeviceBatch> {
        self.release_copied();
        if self.inflight.is_empty() {
            if let Some(e) = self.pending_err.take() {
                return Next::Batch(Err(e));
            }
            match self.loader.next_within(timeout) {
                Next::Pending => return Next::Pending,
                Next::End => return Next::End,
                Next::Batch(Err(e)) => return Next::Batch(Err(e)),
                Next::Batch(Ok(b)) => {
                    if let Err(e) = self.issue(b) {
                        return Next::Batch(Err(e));
                    }
                }
            }
        }
        self.top_up();
        match self.inflight.pop_front() {
            Some(f) => Next::Batch(self.hand_out(f)),
            None => Next::Batch(Err(Error::Internal("device stage lost a batch".into()))),
        }
    }

    /// Host and device buffers.
    fn buffers_allocated(&self) -> usize {
        self.loader.buffers_allocated() + self.buffers.allocated()
    }

    /// Waits for the batch's copy to complete.
    fn wait_ready(&self, batch: &DeviceBatch) -> Result<()> {
        batch.synchronize()
    }
}

impl Iterator for DeviceLoader {
    type Item = Result<DeviceBatch>;

    fn next(&mut self) -> Option<Result<DeviceBatch>> {
        loop {
            match self.next_within(Duration::from_secs(3600)) {
                Next::Pending => continue,
                Next::End => return None,
                Next::Batch(b) => return Some(b),
            }
        }
    }
}

impl Drop for DeviceLoader {
    fn drop(&mut self) {
        // Every copy finishes before a host buffer is released or unregistered
        // (`discard_read_ahead` leaks the ones it cannot prove idle).
        self.discard_read_ahead();
        #[allow(unsafe_code)]
        // SAFETY: every registered buffer belongs to `self.loader`'s pool, which is
        // dropped after this body, so it is still mapped; no copy from one is pending
        // (the copy stream was synchronized above).
        unsafe {
            self.registered.unregister_all(&self.ctx)
        };
    }
}
