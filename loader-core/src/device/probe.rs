//! Driver probe and device opening, and the helpers every driver call uses.

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use super::device_name;
use crate::error::{Error, Result};

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

/// Maps a failed driver call `op` on `device` to [`Error::Device`].
pub(crate) fn device_error<'a, E: std::fmt::Display>(device: &'a str, op: &'static str) -> impl Fn(E) -> Error + 'a {
    move |e| Error::Device { device: device.to_owned(), op, detail: e.to_string() }
}

/// Clears an error another thread left in the context (cudarc hands a stored error to
/// the next call on any thread, which would then skip its work).
pub(super) fn clear_stale(ctx: &CudaContext) {
    let _ = ctx.check_err();
}
