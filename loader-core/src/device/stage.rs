//! The CUDA device stage (feature `cuda`). See the module docs in `device/mod.rs`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, DevicePtr, DeviceRepr};

use super::{device_error, device_name};
use crate::error::{Error, Result};
use crate::memory::{LockedBuf, MemoryPolicy};
use crate::pipeline::{Batch, BatchLayout, Element, Loader, LoaderState, Next};

/// Opens CUDA device `ordinal` (its primary context, shared with PyTorch and other
/// runtime-API users in the process). Probes for the driver library first: on a
/// machine without one this is [`Error::DeviceUnavailable`], never a panic.
pub fn open(ordinal: usize) -> Result<Arc<CudaContext>> {
    let device = device_name(ordinal);
    let unavailable = |detail: String| Error::DeviceUnavailable { device: device.clone(), detail };
    #[allow(unsafe_code)]
    // SAFETY: only tries to dlopen libcuda under its usual names; no driver call.
    let present = unsafe { sys::is_culib_present() };
    if !present {
        return Err(unavailable(
            "the NVIDIA driver library (libcuda.so) is not installed or not on the library path; install the driver \
             or use device \"cpu\""
                .into(),
        ));
    }
    cudarc::driver::result::init()
        .map_err(|e| unavailable(format!("cuInit failed ({e}); check nvidia-smi and CUDA_VISIBLE_DEVICES")))?;
    let count = CudaContext::device_count().map_err(|e| unavailable(format!("cuDeviceGetCount failed ({e})")))?;
    if ordinal >= count.max(0) as usize {
        return Err(unavailable(format!("{count} CUDA device(s) are visible to this process")));
    }
    CudaContext::new(ordinal).map_err(|e| unavailable(format!("cannot create its context ({e})")))
}

/// Options of the device stage.
#[derive(Clone, Debug)]
pub struct DeviceOptions {
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// Register the locked host buffers with the driver for DMA (default). `false`
    /// copies from pageable memory: for NVIDIA confidential-computing deployments,
    /// where pinned host memory is not supported; slower.
    pub pinned: bool,
    /// Copies in flight ahead of the consumer (at least 2: double buffering).
    pub depth: usize,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self { ordinal: 0, pinned: true, depth: 3 }
    }
}

type FreeList = Arc<Mutex<Vec<DevBuf>>>;

/// A device buffer. Its plaintext is zeroed (on its stream) before it is freed.
struct DevBuf {
    /// `None` only while being dropped.
    slice: Option<CudaSlice<u8>>,
    addr: u64,
    /// Events recorded on consumer streams when the last user let go; the copy stream
    /// waits on them before writing the buffer again.
    after: Vec<CudaEvent>,
}

impl DevBuf {
    fn len(&self) -> usize {
        self.slice.as_ref().map_or(0, |s| s.len())
    }

    fn slice(&self) -> Result<&CudaSlice<u8>> {
        self.slice.as_ref().ok_or_else(|| Error::Internal("device buffer without memory".into()))
    }
}

/// Clears an error another thread left in the context (cudarc hands a stored error to
/// the next call on any thread, which would then skip its work).
fn clear_stale(ctx: &CudaContext) {
    let _ = ctx.check_err();
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        let Some(mut slice) = self.slice.take() else { return };
        let stream = slice.stream().clone();
        clear_stale(stream.context());
        let mut fenced = self.after.drain(..).all(|e| stream.wait(&e).is_ok());
        if !fenced {
            fenced = stream.context().synchronize().is_ok();
        }
        if fenced && stream.memset_zeros(&mut slice).is_ok() {
            drop(slice);
        } else {
            // A consumer may still read it: leak the allocation rather than free it.
            std::mem::forget(slice);
        }
    }
}

/// A copy issued but not yet handed out.
struct InFlight {
    host: Batch,
    dev: DevBuf,
    done: Arc<CudaEvent>,
}

/// Outcome of [`DeviceLoader::next_within`].
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // moved once per batch; boxing would allocate per batch
pub enum DeviceNext {
    /// A batch on the device, or the error that stopped the epoch.
    Batch(Result<DeviceBatch>),
    /// The epoch is over.
    End,
    /// Nothing arrived within the timeout; call again.
    Pending,
}

/// A [`Loader`] whose batches are delivered in GPU memory: an iterator of
/// `Result<DeviceBatch>` with the loader's epoch, resume and ordering semantics.
pub struct DeviceLoader {
    ctx: Arc<CudaContext>,
    device: String,
    copy: Arc<CudaStream>,
    consumer: Option<Arc<CudaStream>>,
    pinned: bool,
    depth: usize,
    /// Host buffers registered with the driver: address -> length.
    registered: HashMap<usize, usize>,
    inflight: VecDeque<InFlight>,
    /// Handed out; the host buffer goes back to the pool once its copy completed.
    draining: VecDeque<(Batch, Arc<CudaEvent>)>,
    free: FreeList,
    allocated: usize,
    pending_err: Option<Error>,
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
    /// when the device cannot be used.
    pub fn new(loader: Loader, opts: DeviceOptions) -> Result<Self> {
        let ctx = open(opts.ordinal)?;
        let device = device_name(opts.ordinal);
        let copy = ctx.new_stream().map_err(device_error(&device, "cuStreamCreate"))?;
        let consumer = Some(ctx.default_stream());
        Ok(Self {
            ctx,
            device,
            copy,
            consumer,
            pinned: opts.pinned,
            depth: opts.depth.max(2),
            registered: HashMap::new(),
            inflight: VecDeque::new(),
            draining: VecDeque::new(),
            free: Arc::default(),
            allocated: 0,
            pending_err: None,
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

    /// The wrapped loader (epoch, field names, dataset).
    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    /// The epoch the next iteration reads.
    pub fn epoch(&self) -> u64 {
        self.loader.epoch()
    }

    /// Sets the epoch of the next iteration (drops copies read ahead).
    pub fn set_epoch(&mut self, epoch: u64) {
        self.discard_read_ahead();
        self.loader.set_epoch(epoch);
    }

    /// Batches this rank yields in the current epoch.
    pub fn len(&self) -> Result<usize> {
        self.loader.len()
    }

    /// True when an epoch yields no batch.
    pub fn is_empty(&self) -> Result<bool> {
        self.loader.is_empty()
    }

    /// Resume state. Batches copied ahead but not yet handed out count as not read.
    pub fn state(&self) -> LoaderState {
        let ahead: u64 = self.inflight.iter().map(|f| f.host.len() as u64).sum();
        self.loader.state_excluding(ahead)
    }

    /// Restores a state from [`DeviceLoader::state`] or [`Loader::state`].
    pub fn load_state(&mut self, s: &LoaderState) -> Result<()> {
        self.discard_read_ahead();
        self.loader.load_state(s)
    }

    /// Device buffers allocated so far (stays flat in steady state).
    pub fn device_buffers_allocated(&self) -> usize {
        self.allocated
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
        let free = self.free.clone();
        for f in self.inflight.drain(..) {
            free.lock().unwrap_or_else(|p| p.into_inner()).push(f.dev);
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

    fn register(&mut self, buf: &[u8]) -> Result<()> {
        let (addr, len) = (buf.as_ptr() as usize, buf.len());
        if self.registered.get(&addr) == Some(&len) {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(device_error(&self.device, "cuCtxSetCurrent"))?;
        #[allow(unsafe_code)]
        // SAFETY: [addr, addr+len) is a live, page-aligned mapping owned by the loader's
        // batch pool, which never frees a buffer while the loader lives; `Drop`
        // unregisters every address before the loader (and its pool) is dropped.
        // Registration only pins the pages; it does not change their contents.
        let r = unsafe { sys::cuMemHostRegister_v2(addr as *mut std::ffi::c_void, len, 0) }.result();
        r.map_err(|e| Error::Device {
            device: self.device.clone(),
            op: "cuMemHostRegister",
            detail: format!(
                "{e}; this platform may not support page-locked host memory (confidential computing): use pinned=false"
            ),
        })?;
        self.registered.insert(addr, len);
        Ok(())
    }

    fn take_dev(&mut self, len: usize) -> Result<DevBuf> {
        {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = free.iter().position(|b| b.len() >= len) {
                return Ok(free.swap_remove(i));
            }
        }
        let cap = len.max(1).div_ceil(64 << 10) * (64 << 10);
        let slice = self.copy.alloc_zeros::<u8>(cap).map_err(device_error(&self.device, "cuMemAlloc"))?;
        let (addr, guard) = slice.device_ptr(&self.copy);
        drop(guard);
        self.allocated += 1;
        Ok(DevBuf { slice: Some(slice), addr, after: Vec::new() })
    }

    /// Starts the copy of `host` to a device buffer on the copy stream.
    fn issue(&mut self, host: Batch) -> Result<()> {
        let used = host.used_len();
        if self.pinned {
            self.register(host.buffer_bytes())?;
        }
        clear_stale(&self.ctx);
        let mut dev = self.take_dev(used)?;
        let err = |op| device_error(&self.device, op);
        // Consumers' events stay with the buffer until every wait is queued.
        for e in &dev.after {
            self.copy.wait(e).map_err(err("cuStreamWaitEvent"))?;
        }
        dev.after.clear();
        let Some(slice) = dev.slice.as_mut() else {
            return Err(Error::Internal("device buffer without memory".into()));
        };
        if used > 0 {
            let mut dst = slice.slice_mut(..used);
            self.copy.memcpy_htod(&host.buffer_bytes()[..used], &mut dst).map_err(err("H2D copy"))?;
        }
        let done = self.ctx.new_event(None).and_then(|e| e.record(&self.copy).map(|_| e));
        match done {
            Ok(done) => {
                self.inflight.push_back(InFlight { host, dev, done: Arc::new(done) });
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
                self.free.lock().unwrap_or_else(|p| p.into_inner()).push(f.dev);
                self.draining.push_back((f.host, f.done));
                return Err(device_error(&self.device, "cuStreamWaitEvent")(e));
            }
        }
        let b = DeviceBatch {
            buf: Some(f.dev),
            free: self.free.clone(),
            ctx: self.ctx.clone(),
            device: self.device.clone(),
            ready: f.done.clone(),
            users: Mutex::new(self.consumer.iter().map(|s| StreamRef::Owned(s.clone())).collect()),
            layout: f.host.layout().clone(),
        };
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

    /// Like [`Iterator::next`], but waits at most `timeout` for the next batch.
    pub fn next_within(&mut self, timeout: Duration) -> DeviceNext {
        self.release_copied();
        if self.inflight.is_empty() {
            if let Some(e) = self.pending_err.take() {
                return DeviceNext::Batch(Err(e));
            }
            match self.loader.next_within(timeout) {
                Next::Pending => return DeviceNext::Pending,
                Next::End => return DeviceNext::End,
                Next::Batch(Err(e)) => return DeviceNext::Batch(Err(e)),
                Next::Batch(Ok(b)) => {
                    if let Err(e) = self.issue(b) {
                        return DeviceNext::Batch(Err(e));
                    }
                }
            }
        }
        self.top_up();
        match self.inflight.pop_front() {
            Some(f) => DeviceNext::Batch(self.hand_out(f)),
            None => DeviceNext::Batch(Err(Error::Internal("device stage lost a batch".into()))),
        }
    }
}

impl Iterator for DeviceLoader {
    type Item = Result<DeviceBatch>;

    fn next(&mut self) -> Option<Result<DeviceBatch>> {
        loop {
            match self.next_within(Duration::from_secs(3600)) {
                DeviceNext::Pending => continue,
                DeviceNext::End => return None,
                DeviceNext::Batch(b) => return Some(b),
            }
        }
    }
}

impl Drop for DeviceLoader {
    fn drop(&mut self) {
        // Every copy finishes before a host buffer is released or unregistered
        // (`discard_read_ahead` leaks the ones it cannot prove idle).
        self.discard_read_ahead();
        let _ = self.ctx.bind_to_thread();
        for (addr, _) in self.registered.drain() {
            #[allow(unsafe_code)]
            // SAFETY: `addr` was registered by `register` and is still mapped (the
            // loader, which owns the pool, is dropped after this body); no copy from it
            // is pending (the copy stream was synchronized above).
            let _ = unsafe { sys::cuMemHostUnregister(addr as *mut std::ffi::c_void) };
        }
    }
}

enum StreamRef {
    Owned(Arc<CudaStream>),
    /// A stream handle from outside cudarc (PyTorch via DLPack).
    Raw(usize),
    /// A user we cannot fence with an event (DLPack `stream=-1`, or the per-thread
    /// default stream, which names another stream on the thread that drops the
    /// batch): release waits for the whole device.
    Unfenced,
}

/// A batch in GPU memory. Field views sit at the same offsets as in the host batch.
/// When dropped, its buffer returns to the stage for reuse after the work queued on
/// every stream that used it completes.
pub struct DeviceBatch {
    buf: Option<DevBuf>,
    free: FreeList,
    ctx: Arc<CudaContext>,
    device: String,
    ready: Arc<CudaEvent>,
    users: Mutex<Vec<StreamRef>>,
    layout: BatchLayout,
}

impl std::ops::Deref for DeviceBatch {
    type Target = BatchLayout;

    /// Length, sample ids, fields and position, as for a host [`Batch`].
    fn deref(&self) -> &BatchLayout {
        &self.layout
    }
}

impl std::fmt::Debug for DeviceBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBatch")
            .field("device", &self.device)
            .field("epoch", &self.layout.epoch)
            .field("index", &self.layout.index)
            .field("samples", &self.layout.samples.len())
            .finish()
    }
}

/// A typed view of one tensor field on the device.
#[derive(Debug)]
pub struct DeviceTensorView<'a, T> {
    /// The values, C order.
    pub data: CudaView<'a, T>,
    /// `[samples, ...field shape]`.
    pub shape: Vec<usize>,
}

impl DeviceBatch {
    /// The device, `cuda:N`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Event completed when the batch's bytes are on the device.
    pub fn ready_event(&self) -> &CudaEvent {
        &self.ready
    }

    fn buf(&self) -> Result<&DevBuf> {
        self.buf.as_ref().ok_or_else(|| Error::Internal("device batch without a buffer".into()))
    }

    /// The bytes of a field's values on the device (for a bytes field, the
    /// concatenated values; [`DeviceBatch::offsets`] gives their offsets).
    pub fn bytes(&self, name: &str) -> Result<CudaView<'_, u8>> {
        let s = self.slot(name)?;
        Ok(self.buf()?.slice()?.slice(s.offset..s.offset + s.len))
    }

    /// The `samples + 1` little-endian u64 offsets of a bytes field, on the device.
    pub fn offsets(&self, name: &str) -> Result<CudaView<'_, u8>> {
        let s = self.slot(name)?;
        let at = s
            .offsets_at
            .ok_or_else(|| Error::InvalidArgument(format!("field {name:?} is a tensor; use DeviceBatch::tensor")))?;
        Ok(self.buf()?.slice()?.slice(at..at + 8 * (self.len() + 1)))
    }

    /// A typed view of a tensor field.
    pub fn tensor<T: Element + DeviceRepr>(&self, name: &str) -> Result<DeviceTensorView<'_, T>> {
        let (s, shape) = self.tensor_slot::<T>(name)?;
        let bytes = self.bytes(name)?;
        let n = s.len / std::mem::size_of::<T>();
        #[allow(unsafe_code)]
        // SAFETY: the field's `len` bytes at a 64-byte aligned offset of a device
        // allocation (256-byte aligned) hold `n` values of `T` (the schema dtype
        // matches `T`, checked by `tensor_slot`), and every bit pattern is a valid `T` (Pod).
        let data = unsafe { bytes.transmute::<T>(n) }
            .ok_or_else(|| Error::Internal(format!("field {name:?}: view of {n} values")))?;
        Ok(DeviceTensorView { data, shape })
    }

    /// Device address and byte length of a field's values (for DLPack export).
    pub fn field_address(&self, name: &str) -> Result<(u64, usize)> {
        let s = self.slot(name)?;
        Ok((self.buf()?.addr + s.offset as u64, s.len))
    }

    /// Device address of a bytes field's offsets (`samples + 1` u64).
    pub fn offsets_address(&self, name: &str) -> Result<u64> {
        let s = self.slot(name)?;
        let at = s.offsets_at.ok_or_else(|| Error::InvalidArgument(format!("field {name:?} is a tensor")))?;
        Ok(self.buf()?.addr + at as u64)
    }

    /// Makes `stream` wait for the copy and keeps the buffer from reuse until the work
    /// queued on `stream` before the batch is dropped completes.
    pub fn record_use(&self, stream: &Arc<CudaStream>) -> Result<()> {
        stream.wait(&self.ready).map_err(device_error(&self.device, "cuStreamWaitEvent"))?;
        self.users.lock().unwrap_or_else(|p| p.into_inner()).push(StreamRef::Owned(stream.clone()));
        Ok(())
    }

    /// [`DeviceBatch::record_use`] for a raw `CUstream` handle from another library
    /// (PyTorch's `torch.cuda.current_stream().cuda_stream`, or 1 / 2 for the legacy /
    /// per-thread default stream, as DLPack passes them).
    ///
    /// # Safety
    /// `stream` must be a valid stream handle of this device's primary context (or a
    /// special handle 0, 1 or 2) and must not be destroyed before the batch is dropped.
    #[allow(unsafe_code)]
    pub unsafe fn use_on_raw_stream(&self, stream: usize) -> Result<()> {
        let err = |op| device_error(&self.device, op);
        self.ctx.bind_to_thread().map_err(err("cuCtxSetCurrent"))?;
        // SAFETY: the caller guarantees the handle; the event is alive (held by self).
        unsafe {
            cudarc::driver::result::stream::wait_event(
                stream as sys::CUstream,
                self.ready.cu_event(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(err("cuStreamWaitEvent"))?;
        // Handle 2 is "the calling thread's default stream": recorded from the thread
        // that drops the batch it would name another stream.
        let user = if stream == 2 { StreamRef::Unfenced } else { StreamRef::Raw(stream) };
        self.users.lock().unwrap_or_else(|p| p.into_inner()).push(user);
        Ok(())
    }

    /// Notes a consumer that orders its own work (DLPack `stream=-1`): releasing the
    /// batch then waits for the whole device before its buffer can be reused.
    pub fn use_unsynchronized(&self) {
        self.users.lock().unwrap_or_else(|p| p.into_inner()).push(StreamRef::Unfenced);
    }
}

impl Drop for DeviceBatch {
    fn drop(&mut self) {
        let Some(mut buf) = self.buf.take() else { return };
        let users = std::mem::take(&mut *self.users.lock().unwrap_or_else(|p| p.into_inner()));
        clear_stale(&self.ctx);
        let mut fenced = true;
        for u in users {
            let recorded = match &u {
                StreamRef::Unfenced => None,
                StreamRef::Owned(s) => self.ctx.new_event(None).ok().filter(|e| e.record(s).is_ok()),
                #[allow(unsafe_code)]
                // SAFETY: `use_on_raw_stream`'s caller guaranteed the handle is valid
                // until the batch is dropped, which is now.
                StreamRef::Raw(s) => self.ctx.new_event(None).ok().filter(|e| {
                    unsafe { cudarc::driver::result::event::record(e.cu_event(), *s as sys::CUstream) }.is_ok()
                }),
            };
            match recorded {
                Some(e) => buf.after.push(e),
                None => fenced = false,
            }
        }
        if !fenced && self.ctx.synchronize().is_err() {
            // Cannot prove the consumers are done (and the context is failing): leak
            // the buffer rather than reuse or free memory a kernel may still read.
            std::mem::forget(buf);
            return;
        }
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    }
}

/// Measures host-to-device copy bandwidth in GB/s (1e9 bytes/s) from one locked
/// buffer of `bytes` (registered with the driver when `pinned`), the way the stage
/// copies batches: `iters` async copies on one stream, after 3 warm-up copies.
pub fn measure_h2d(ordinal: usize, bytes: usize, iters: usize, pinned: bool) -> Result<f64> {
    let ctx = open(ordinal)?;
    let device = device_name(ordinal);
    let err = |op| device_error(&device, op);
    let mut host = LockedBuf::new(bytes, MemoryPolicy::AllowUnlocked)?;
    for (i, b) in host.prefix_mut(bytes).iter_mut().enumerate() {
        *b = i as u8;
    }
    let stream = ctx.new_stream().map_err(err("cuStreamCreate"))?;
    let mut dev = stream.alloc_zeros::<u8>(bytes).map_err(err("cuMemAlloc"))?;
    let addr = host.as_slice().as_ptr() as usize;
    if pinned {
        #[allow(unsafe_code)]
        // SAFETY: `host` is a live page-aligned mapping, unregistered below before it
        // is dropped, after the stream was synchronized.
        unsafe { sys::cuMemHostRegister_v2(addr as *mut std::ffi::c_void, host.capacity(), 0) }
            .result()
            .map_err(err("cuMemHostRegister"))?;
    }
    let run = |n: usize, dev: &mut CudaSlice<u8>| -> Result<f64> {
        let t = Instant::now();
        for _ in 0..n {
            stream.memcpy_htod(&host.as_slice()[..bytes], dev).map_err(err("H2D copy"))?;
        }
        stream.synchronize().map_err(err("cuStreamSynchronize"))?;
        Ok(t.elapsed().as_secs_f64())
    };
    let warm = run(3, &mut dev);
    let timed = warm.and_then(|_| run(iters.max(1), &mut dev));
    if pinned {
        #[allow(unsafe_code)]
        // SAFETY: registered above; no copy is pending (`run` synchronized, or failed
        // before queueing one that could still run: synchronize again to be sure).
        unsafe {
            let _ = stream.synchronize();
            let _ = sys::cuMemHostUnregister(addr as *mut std::ffi::c_void);
        }
    }
    let secs = timed?;
    Ok((bytes * iters.max(1)) as f64 / secs / 1e9)
}

impl crate::bench::Source for DeviceLoader {
    fn epoch(&self) -> u64 {
        DeviceLoader::epoch(self)
    }

    /// Waits for the batch's copy to complete: the bytes counted are on the device.
    fn next_delivered(&mut self) -> Option<Result<(u64, u64)>> {
        let b = match self.next()? {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = b.ready_event().synchronize() {
            return Some(Err(Error::Device {
                device: self.device.clone(),
                op: "cuEventSynchronize",
                detail: e.to_string(),
            }));
        }
        Some(Ok((b.len() as u64, b.fields().iter().map(|f| f.len as u64).sum())))
    }

    fn buffers_allocated(&self) -> usize {
        self.loader.buffers_allocated() + self.allocated
    }

    fn remote_bytes(&self) -> u64 {
        self.loader.dataset().remote_bytes()
    }
}
