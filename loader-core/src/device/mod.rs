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
//! Files, one concern each: `stage.rs` ([`DeviceLoader`]: read-ahead and the ordering
//! above), `buffers.rs` (device buffer lists, host registration), `batch.rs`
//! ([`DeviceBatch`], consumer-stream synchronization), `h2d.rs` ([`measure_h2d`]),
//! `probe.rs` (driver probe, [`open`]), `kernels/` (NVRTC decode kernels).

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

#[cfg(feature = "cuda")]
mod batch;
#[cfg(feature = "cuda")]
mod buffers;
#[cfg(feature = "cuda")]
mod h2d;
#[cfg(feature = "cuda")]
mod probe;
#[cfg(feature = "cuda")]
mod stage;
#[cfg(feature = "cuda")]
pub use batch::{DeviceBatch, DeviceTensorView};
#[cfg(feature = "cuda")]
pub use h2d::measure_h2d;
#[cfg(feature = "cuda")]
pub(crate) use probe::device_error;
#[cfg(feature = "cuda")]
pub use probe::open;
#[cfg(feature = "cuda")]
pub use stage::{DeviceLoader, DeviceOptions};

/// Without the `cuda` feature: the error every device request gets.
#[cfg(not(feature = "cuda"))]
pub fn open(ordinal: usize) -> Result<()> {
    Err(Error::DeviceUnavailable {
        device: device_name(ordinal),
        detail: "this build of shardlock has no CUDA support (build with the `cuda` feature)".into(),
    })
}

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
}
