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
//! `decode.rs` (`decode_on = "device"`: nvJPEG and the resample kernels), `nvjpeg.rs`
//! (nvJPEG loaded at run time, its allocators locked and wiped),
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
    /// Image fields decoded on the device (`decode_on = "device"`, docs/DECODE.md):
    /// the loader delivers them encoded (a bytes field it does not decode itself), and
    /// the stage decodes JPEGs with nvJPEG, the rest on its own thread, then crops,
    /// resizes, flips and normalizes them in a kernel into a tensor field.
    pub decode: Vec<(String, crate::decode::ImageDecode)>,
    /// Where nvJPEG is (`libnvjpeg.so.12`); default: `SHARDLOCK_NVJPEG`, then the
    /// library path.
    pub nvjpeg: Option<std::path::PathBuf>,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self { ordinal: 0, pinned: true, depth: 3, decode: Vec::new(), nvjpeg: None }
    }
}

// The build selects the backend here, and only here: the CUDA stage, or the
// placeholder with the same public API whose constructors return DeviceUnavailable.
#[cfg(feature = "cuda")]
mod batch;
#[cfg(feature = "cuda")]
mod buffers;
#[cfg(feature = "cuda")]
mod decode;
#[cfg(feature = "cuda")]
mod h2d;
#[cfg(feature = "cuda")]
mod nvjpeg;
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

/// The stream a DLPack consumer names in `__dlpack__(stream=S)` on a CUDA tensor, once
/// checked (security review finding 9: any integer used to reach the driver as a
/// stream pointer, undefined behaviour from pure Python).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DlpackStream {
    /// `-1`: the consumer orders its own work; no wait is enqueued.
    Unsynchronized,
    /// `None` or `1`: the legacy default stream.
    Legacy,
    /// `2`: the calling thread's per-thread default stream.
    PerThread,
    /// A `CUstream` handle that is the consumer's current stream of the device.
    Handle(usize),
}

impl DlpackStream {
    /// Checks `stream` as DLPack defines it for CUDA: `None`, `-1`, `1`, `2`, or a
    /// stream handle that is one of `current` — the current streams of the tensor's
    /// device as the consumer libraries that are loaded report them (PyTorch's
    /// `torch.cuda.current_stream(d).cuda_stream`, CuPy's current stream). `0` is
    /// ambiguous in DLPack and refused, as are other negative values and any handle
    /// that is not a current stream: such an integer would reach the driver as a
    /// pointer it dereferences.
    pub fn parse(stream: Option<i64>, device: &str, current: &[usize]) -> Result<Self> {
        let bad = |why: String| {
            Error::InvalidArgument(format!("__dlpack__(stream={}) on {device}: {why}", stream.unwrap_or(1)))
        };
        match stream {
            None | Some(1) => Ok(Self::Legacy),
            Some(2) => Ok(Self::PerThread),
            Some(-1) => Ok(Self::Unsynchronized),
            Some(0) => {
                Err(bad("stream 0 is ambiguous in DLPack; pass 1 (legacy default) or 2 (per-thread default)".into()))
            }
            Some(s) if s < 0 => Err(bad("DLPack streams are -1, 1, 2 or a stream handle".into())),
            Some(s) => {
                let h = s as usize;
                if current.contains(&h) {
                    Ok(Self::Handle(h))
                } else {
                    Err(bad(format!(
                        "{h:#x} is not the current stream of {device} in PyTorch or CuPy (current: {}); a DLPack \
                         consumer passes its current stream (torch.from_dlpack does), or -1 to order the work itself",
                        if current.is_empty() {
                            "none known: neither torch nor cupy is imported".to_owned()
                        } else {
                            current.iter().map(|c| format!("{c:#x}")).collect::<Vec<_>>().join(", ")
                        }
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dlpack_streams_are_the_defined_values_or_a_current_stream() {
        let cur = [0x5555_0000usize];
        assert_eq!(DlpackStream::parse(None, "cuda:0", &[]).ok(), Some(DlpackStream::Legacy));
        assert_eq!(DlpackStream::parse(Some(1), "cuda:0", &[]).ok(), Some(DlpackStream::Legacy));
        assert_eq!(DlpackStream::parse(Some(2), "cuda:0", &[]).ok(), Some(DlpackStream::PerThread));
        assert_eq!(DlpackStream::parse(Some(-1), "cuda:0", &[]).ok(), Some(DlpackStream::Unsynchronized));
        assert_eq!(
            DlpackStream::parse(Some(0x5555_0000), "cuda:0", &cur).ok(),
            Some(DlpackStream::Handle(0x5555_0000))
        );
        // Finding 9: an arbitrary integer is not a stream pointer.
        for (s, want) in
            [(0, "ambiguous"), (-2, "-1, 1, 2"), (0x4141_4141, "not the current stream"), (i64::MAX, "not the current")]
        {
            let e = DlpackStream::parse(Some(s), "cuda:0", &cur).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(want) && e.contains("cuda:0"), "{s}: {e}");
        }
        let e = DlpackStream::parse(Some(0x1000), "cuda:1", &[]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("neither torch nor cupy"), "{e}");
    }

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
