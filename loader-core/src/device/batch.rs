//! Device batches: field views over a device buffer, and the consumer-stream
//! synchronization that decides when the buffer may be written again.

use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream, CudaView, DeviceRepr};

use super::buffers::{put_back, DevBuf, FreeList};
use super::probe::{clear_stale, device_error};
use crate::error::{Error, Result};
use crate::pipeline::{BatchLayout, Element};

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

    /// Length, sample ids, fields and position, as for a host [`crate::Batch`].
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
    /// A batch over `buf`, whose copy completes with `ready`; `consumer`, if any, is
    /// its first user (it already waits on `ready`). `buf` goes back to `free`.
    pub(super) fn new(
        buf: DevBuf,
        free: FreeList,
        ctx: Arc<CudaContext>,
        device: String,
        ready: Arc<CudaEvent>,
        consumer: Option<&Arc<CudaStream>>,
        layout: BatchLayout,
    ) -> Self {
        let users = Mutex::new(consumer.into_iter().map(|s| StreamRef::Owned(s.clone())).collect());
        Self { buf: Some(buf), free, ctx, device, ready, users, layout }
    }

    /// The device, `cuda:N`.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Event completed when the batch's bytes are on the device.
    pub fn ready_event(&self) -> &CudaEvent {
        &self.ready
    }

    /// Blocks the calling thread until the batch's bytes are on the device (its
    /// [`DeviceBatch::ready_event`] completed).
    pub fn synchronize(&self) -> Result<()> {
        self.ready.synchronize().map_err(device_error(&self.device, "cuEventSynchronize"))
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
        if stream > 2 {
            // A stream of another context (another device, a non-primary context) would
            // make the wait and the release event refer to the wrong device.
            let mut owner: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: the caller guarantees a valid stream handle; `owner` is written.
            unsafe { sys::cuStreamGetCtx(stream as sys::CUstream, &mut owner) }
                .result()
                .map_err(err("cuStreamGetCtx"))?;
            if owner != self.ctx.cu_ctx() {
                return Err(Error::InvalidArgument(format!(
                    "stream {stream:#x} belongs to another CUDA context than {}'s primary context",
                    self.device
                )));
            }
        }
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
        put_back(&self.free, buf);
    }
}
