//! Device buffer lists and host buffer registration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};

use super::probe::{clear_stale, device_error};
use crate::error::{Error, Result};

/// Free device buffers, shared by the stage and the batches it handed out (a batch
/// puts its buffer back when it is dropped).
pub(super) type FreeList = Arc<Mutex<Vec<DevBuf>>>;

/// Puts `buf` on the free list.
pub(super) fn put_back(free: &FreeList, buf: DevBuf) {
    free.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
}

/// A device buffer. Its plaintext is zeroed (on its stream) before it is freed.
pub(super) struct DevBuf {
    /// `None` only while being dropped.
    pub(super) slice: Option<CudaSlice<u8>>,
    pub(super) addr: u64,
    /// Events recorded on consumer streams when the last user let go; the copy stream
    /// waits on them before writing the buffer again.
    pub(super) after: Vec<CudaEvent>,
}

impl DevBuf {
    fn len(&self) -> usize {
        self.slice.as_ref().map_or(0, |s| s.len())
    }

    pub(super) fn slice(&self) -> Result<&CudaSlice<u8>> {
        self.slice.as_ref().ok_or_else(|| Error::Internal("device buffer without memory".into()))
    }
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

/// The stage's device buffers: the free list and the count of allocations.
#[derive(Default)]
pub(super) struct DeviceBuffers {
    free: FreeList,
    allocated: usize,
}

impl DeviceBuffers {
    /// The free list, for the batches handed out.
    pub(super) fn free_list(&self) -> &FreeList {
        &self.free
    }

    /// Device buffers allocated so far.
    pub(super) fn allocated(&self) -> usize {
        self.allocated
    }

    /// Puts `buf` back on the free list.
    pub(super) fn put(&self, buf: DevBuf) {
        put_back(&self.free, buf);
    }

    /// A free buffer of at least `len` bytes, or a new zeroed one (64 KiB granules)
    /// allocated on `stream`.
    pub(super) fn take(&mut self, stream: &Arc<CudaStream>, device: &str, len: usize) -> Result<DevBuf> {
        {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = free.iter().position(|b| b.len() >= len) {
                return Ok(free.swap_remove(i));
            }
        }
        let cap = len.max(1).div_ceil(64 << 10) * (64 << 10);
        let slice = stream.alloc_zeros::<u8>(cap).map_err(device_error(device, "cuMemAlloc"))?;
        let (addr, guard) = slice.device_ptr(stream);
        drop(guard);
        self.allocated += 1;
        Ok(DevBuf { slice: Some(slice), addr, after: Vec::new() })
    }
}

/// Host batch buffers registered with the driver (`cuMemHostRegister`, so a copy from
/// one is a DMA from the pool itself, no staging copy): address -> length.
#[derive(Default)]
pub(super) struct HostRegistrations {
    registered: HashMap<usize, usize>,
}

impl HostRegistrations {
    /// Buffers registered.
    pub(super) fn len(&self) -> usize {
        self.registered.len()
    }

    /// Registers `buf` with `ctx`'s driver, once (again only if its length changed).
    ///
    /// # Safety
    /// `buf` must be a buffer of the loader's batch pool: a page-aligned mapping that
    /// stays mapped until [`HostRegistrations::unregister_all`] has run.
    #[allow(unsafe_code)]
    pub(super) unsafe fn register(&mut self, ctx: &CudaContext, device: &str, buf: &[u8]) -> Result<()> {
        let (addr, len) = (buf.as_ptr() as usize, buf.len());
        if self.registered.get(&addr) == Some(&len) {
            return Ok(());
        }
        ctx.bind_to_thread().map_err(device_error(device, "cuCtxSetCurrent"))?;
        // SAFETY: [addr, addr+len) is a live, page-aligned mapping owned by the loader's
        // batch pool (this function's contract), which never frees a buffer while the
        // loader lives; `DeviceLoader`'s `Drop` unregisters every address before the
        // loader (and its pool) is dropped.
        // Registration only pins the pages; it does not change their contents.
        let r = unsafe { sys::cuMemHostRegister_v2(addr as *mut std::ffi::c_void, len, 0) }.result();
        r.map_err(|e| Error::Device {
            device: device.to_owned(),
            op: "cuMemHostRegister",
            detail: format!(
                "{e}; this platform may not support page-locked host memory (confidential computing): use pinned=false"
            ),
        })?;
        self.registered.insert(addr, len);
        Ok(())
    }

    /// Unregisters every buffer (errors ignored: this runs on drop).
    ///
    /// # Safety
    /// Every registered buffer must still be mapped, and no copy from one may be pending.
    #[allow(unsafe_code)]
    pub(super) unsafe fn unregister_all(&mut self, ctx: &CudaContext) {
        let _ = ctx.bind_to_thread();
        for (addr, _) in self.registered.drain() {
            // SAFETY: `addr` was registered by `register` and is still mapped (the
            // loader, which owns the pool, is dropped after the body of
            // `DeviceLoader::drop`, which calls this); no copy from it is pending (the
            // copy stream was synchronized above, in `DeviceLoader::drop`).
            let _ = unsafe { sys::cuMemHostUnregister(addr as *mut std::ffi::c_void) };
        }
    }
}
