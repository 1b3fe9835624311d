//! The device stage: batches copied from the page-locked pool to a CUDA GPU.
//!
//! With the `cuda` feature, [`DeviceLoader`] wraps a [`crate::Loader`]: each batch's
//! locked host buffer is registered with the driver once (`cuMemHostRegister`, so the
//! copy is a DMA from the pool itself, no staging copy), copied with an async H2D on a
//! dedicated stream, and handed out as a [`DeviceBatch`] whose fields are `CudaView`s
//! at the same offsets as in the host batch. Up to `depth` copies are in flight while
//! the decrypt workers fill the next batches and the consumer computes, so decryption,
//! copy and compute overlap.
//!
//! Ordering, with CUDA events and no host blocking on the hot path:
//! - the consumer's stream waits on the batch's copy event before it may read it;
//! - a host buffer returns to the pool (zeroized) only after its copy event completed;
//! - a device buffer is reused only after an event recorded on every consumer stream
//!   at release has completed (the copy stream waits on it);
//! - device buffers are zeroed on the copy stream before they are freed.
//!
//! `pinned: false` copies from pageable memory instead (for confidential-computing
//! GPUs, where page-locked host memory cannot be registered).
//!
//! Without a driver ([`open`] probes `libcuda` before any driver call) every entry
//! point returns [`Error::DeviceUnavailable`]; nothing panics.
//!
//! Without the `cuda` feature the same public API exists (`placeholder.rs`, candle's
//! "dummy backend" habit): [`DeviceLoader`], [`DeviceOptions`], [`DeviceBatch`],
//! [`DeviceContext`], [`DeviceStream`], [`open`], [`measure_h2d`] and
//! [`kernels::Kernels`]; every constructor returns [`Error::DeviceUnavailable`] naming
//! `cuda:N` and saying to build with the `cuda` feature, and the other types cannot
//! exist. Callers (the CLI, the Python binding) need no `cfg` of their own. Only the
//! methods whose signatures need cudarc types (views of device memory, events, kernel
//! launches) are CUDA-only. [`DeviceLoader`] is a [`crate::BatchStream`], like the
//! [`crate::Loader`].
//!
//! Files, one concern each: `stage.rs` ([`DeviceLoader`]: read-ahead and the ordering
//! above), `buffers.rs` (device buffer lists, host registration), `batch.rs`
//! ([`DeviceBatch`], consumer-stream synchronization), `h2d.rs` ([`measure_h2d`]),
//! `probe.rs` (driver probe, [`open`]), `placeholder.rs` (the build without `cuda`),
//! `kernels/` (NVRTC decode kernels and their CPU references).

use crate::error::{Error, Result};

pub mod kernels;

/// `cuda:N` for ordinal `N`.
pub fn device_name(ordinal: usize) -> String {
    format!("cuda:{ordinal}")
}

/// Parses `"cuda"` / `"cuda:N"` into the ordinal `N` (0 for `"cuda"`).
pub fn parse_device(spec: &str) -> Result<usize> {
    let bad = || {
        Error::InvalidArgument(format!(
            "device {spec:?}: expected \"cpu\", \"cuda\" or \"cuda:N\" (N = device ordinal)"
        ))
    };
    match spec.strip_prefix("cuda") {
        Some("") => Ok(0),
        Some(rest) => rest.strip_prefix(':').and_then(|n| n.parse().ok()).ok_or_else(bad),
        None => Err(bad()),
    }
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

// The build selects the backend here, and only here: the CUDA stage, or the
// placeholder with the same public API whose constructors return DeviceUnavailable.
#[cfg(feature = "cuda")]
mod batch;
#[cfg(feature = "cuda")]
mod buffers;
#[cfg(feature = "cuda")]
mod h2d;
#[cfg(not(feature = "cuda"))]
mod placeholder;
#[cfg(feature = "cuda")]
mod probe;
#[cfg(feature = "cuda")]
mod stage;

#[cfg(not(feature = "cuda"))]
pub use placeholder::{measure_h2d, open, DeviceBatch, DeviceContext, DeviceLoader, DeviceStream};
#[cfg(feature = "cuda")]
pub use {
    batch::{DeviceBatch, DeviceTensorView},
    cudarc::driver::{CudaContext as DeviceContext, CudaStream as DeviceStream},
    h2d::measure_h2d,
    probe::open,
    stage::DeviceLoader,
};

#[cfg(feature = "cuda")]
pub(crate) use probe::device_error;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_or_name_the_expected_form() {
        assert_eq!(parse_device("cuda").ok(), Some(0));
        assert_eq!(parse_device("cuda:3").ok(), Some(3));
        for bad in ["cpu", "cuda:", "cuda:x", "gpu:0", "cuda0"] {
            let e = parse_device(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn constructors_without_the_device_are_device_unavailable_naming_it() {
        // No process sees 4097 devices: with or without a driver, and in the build
        // without `cuda` (whose error says how to get one).
        let errors =
            [open(4096).err(), measure_h2d(4096, 4096, 1, true).err(), kernels::Kernels::for_ordinal(4096).err()];
        for e in errors {
            let Some(e) = e else { panic!("cuda:4096 opened") };
            assert!(matches!(e, Error::DeviceUnavailable { .. }), "{e}");
            assert!(e.to_string().contains("cuda:4096"), "{e}");
            if cfg!(not(feature = "cuda")) {
                assert!(e.to_string().contains("build with the `cuda` feature"), "{e}");
            }
        }
    }
}
