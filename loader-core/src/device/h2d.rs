//! The H2D copy benchmark: the ceiling the device stage is measured against.

use std::time::Instant;

use cudarc::driver::{sys, CudaSlice};

use super::device_name;
use super::probe::{device_error, open};
use crate::error::Result;
use crate::memory::{LockedBuf, MemoryPolicy};

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
