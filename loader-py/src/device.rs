//! Device batches as DLPack producers: `torch.from_dlpack` turns each field into a CUDA
//! tensor over the batch's device buffer, zero-copy, on the stream the consumer names.
//! (Built with and without the `cuda` feature; without it no device batch can exist,
//! so no `DeviceTensor` is ever made.)
//!
//! DLPack stream semantics: `__dlpack__(stream=S)` makes stream `S` wait for the
//! batch's copy (an event wait, no host blocking) and records `S` as a user of the
//! buffer; when the last tensor over the batch is freed, an event is recorded on every
//! such stream and the buffer is written again only after those events complete.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use pyo3::prelude::*;
use shardlock::device::{DeviceBatch, DlpackStream};
use shardlock::DType;

use crate::errors::IntoPy;

const CAPSULE_NAME: &CStr = c"dltensor";
const KDL_CUDA: i32 = 2;

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// What a DLManagedTensor owns: the batch (kept alive) and its shape array.
struct Manager {
    _batch: Arc<DeviceBatch>,
    shape: Vec<i64>,
}

/// DLPack's type code for a shardlock dtype.
fn dl_dtype(d: DType) -> DLDataType {
    let (code, bits) = match d {
        DType::U8 => (1, 8),
        DType::I8 => (0, 8),
        DType::I16 => (0, 16),
        DType::U16 => (1, 16),
        DType::I32 => (0, 32),
        DType::U32 => (1, 32),
        DType::I64 => (0, 64),
        DType::U64 => (1, 64),
        DType::F16 => (2, 16),
        DType::Bf16 => (4, 16),
        DType::F32 => (2, 32),
        DType::F64 => (2, 64),
        DType::Bool => (6, 8),
    };
    DLDataType { code, bits, lanes: 1 }
}

#[allow(unsafe_code)]
unsafe extern "C" fn deleter(t: *mut DLManagedTensor) {
    if t.is_null() {
        return;
    }
    // SAFETY: `t` and its manager were created by `Box::into_raw` in `export` and the
    // DLPack contract calls the deleter exactly once; dropping the manager releases
    // the batch reference (the batch returns its buffer when the last one goes).
    unsafe {
        let t = Box::from_raw(t);
        drop(Box::from_raw(t.manager_ctx.cast::<Manager>()));
    }
}

#[allow(unsafe_code)]
unsafe extern "C" fn capsule_destructor(capsule: *mut pyo3::ffi::PyObject) {
    // SAFETY: called by CPython with the capsule being destroyed. A consumer that took
    // the tensor renamed the capsule ("used_dltensor") and owns the deleter call; an
    // unconsumed capsule still named "dltensor" is ours to delete.
    unsafe {
        if pyo3::ffi::PyCapsule_IsValid(capsule, CAPSULE_NAME.as_ptr()) == 1 {
            let t = pyo3::ffi::PyCapsule_GetPointer(capsule, CAPSULE_NAME.as_ptr()).cast::<DLManagedTensor>();
            deleter(t);
        }
    }
}

/// One field of a device batch (or a bytes field's values / offsets), exported
/// through DLPack. Several exports share the batch.
#[pyclass(frozen, name = "DeviceTensor", module = "shardlock._native")]
pub struct DeviceTensor {
    batch: Arc<DeviceBatch>,
    addr: u64,
    shape: Vec<i64>,
    dtype: DType,
    ordinal: i32,
}

impl DeviceTensor {
    pub(crate) fn new(batch: &Arc<DeviceBatch>, addr: u64, shape: Vec<usize>, dtype: DType) -> Self {
        let ordinal = batch.device().strip_prefix("cuda:").and_then(|n| n.parse().ok()).unwrap_or(0);
        Self { batch: batch.clone(), addr, shape: shape.into_iter().map(|d| d as i64).collect(), dtype, ordinal }
    }
}

#[pymethods]
impl DeviceTensor {
    /// `(kDLCUDA, ordinal)`.
    fn __dlpack_device__(&self) -> (i32, i32) {
        (KDL_CUDA, self.ordinal)
    }

    /// A DLPack capsule over the field, made safe to read on `stream` (a `CUstream`
    /// as an int; None or 1: the legacy default stream; 2: per-thread default; -1:
    /// no synchronization, the consumer orders itself).
    #[pyo3(signature = (*, stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<i64>,
        max_version: Option<(u32, u32)>,
        dl_device: Option<(i32, i32)>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = max_version; // answered with a legacy (unversioned) capsule, which DLPack allows
        if let Some(d) = dl_device {
            if d != (KDL_CUDA, self.ordinal) {
                return Err(pyo3::exceptions::PyBufferError::new_err(format!(
                    "this tensor lives on cuda:{}; export to device {d:?} is not supported",
                    self.ordinal
                )));
            }
        }
        if copy == Some(true) {
            return Err(pyo3::exceptions::PyBufferError::new_err("copy=True is not supported: exports are zero-copy"));
        }
        let current = consumer_streams(py, self.ordinal);
        match DlpackStream::parse(stream, self.batch.device(), &current).py()? {
            // The consumer orders its own work; the buffer is still kept from reuse
            // until the whole device is idle when the batch is released.
            DlpackStream::Unsynchronized => self.batch.use_unsynchronized(),
            DlpackStream::Legacy => {
                #[allow(unsafe_code)]
                // SAFETY: 1 is the driver's legacy default stream handle, always valid.
                unsafe { self.batch.use_on_raw_stream(1) }.py()?;
            }
            DlpackStream::PerThread => {
                #[allow(unsafe_code)]
                // SAFETY: 2 is the driver's per-thread default stream handle, always valid.
                unsafe { self.batch.use_on_raw_stream(2) }.py()?;
            }
            DlpackStream::Handle(h) => {
                #[allow(unsafe_code)]
                // SAFETY: `parse` accepted `h` only because it is the current stream of
                // this device in PyTorch or CuPy right now, so it is a live stream
                // handle; `use_on_raw_stream` also checks it belongs to the batch's
                // context. It must outlive the tensor, since an event is recorded on it
                // when the tensor is freed: PyTorch's streams are never destroyed, and
                // docs/CUDA.md states the requirement for CuPy streams.
                unsafe { self.batch.use_on_raw_stream(h) }.py()?;
            }
        }
        let mut manager = Box::new(Manager { _batch: self.batch.clone(), shape: self.shape.clone() });
        let t = Box::new(DLManagedTensor {
            dl_tensor: DLTensor {
                data: self.addr as *mut c_void,
                device: DLDevice { device_type: KDL_CUDA, device_id: self.ordinal },
                ndim: self.shape.len() as i32,
                dtype: dl_dtype(self.dtype),
                shape: manager.shape.as_mut_ptr(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(deleter),
        });
        let t = Box::into_raw(t);
        #[allow(unsafe_code)]
        // SAFETY: `t` is a fresh, valid allocation; the manager (and the shape array
        // `dl_tensor.shape` points into, whose heap storage does not move with the Box)
        // is owned through `manager_ctx` until `deleter` runs. The capsule takes `t`;
        // if it cannot be made, `t` is deleted here.
        unsafe {
            (*t).manager_ctx = Box::into_raw(manager).cast();
            let cap = pyo3::ffi::PyCapsule_New(t.cast(), CAPSULE_NAME.as_ptr(), Some(capsule_destructor));
            if cap.is_null() {
                deleter(t);
                return Err(PyErr::fetch(py));
            }
            Ok(Bound::from_owned_ptr(py, cap))
        }
    }

    /// Shape of the tensor.
    #[getter]
    fn shape(&self) -> Vec<i64> {
        self.shape.clone()
    }
}

/// The current CUDA streams of device `ordinal` in the consumer libraries already
/// imported (PyTorch, CuPy), as integer handles: the only non-special streams
/// `__dlpack__` accepts. Nothing is imported here, and a library that fails to answer
/// contributes nothing.
fn consumer_streams(py: Python<'_>, ordinal: i32) -> Vec<usize> {
    let mut out = Vec::new();
    let Ok(modules) = py.import("sys").and_then(|m| m.getattr("modules")) else { return out };
    if let Ok(torch) = modules.get_item("torch") {
        let s = torch
            .getattr("cuda")
            .and_then(|c| c.call_method1("current_stream", (ordinal,)))
            .and_then(|s| s.getattr("cuda_stream"))
            .and_then(|h| h.extract::<usize>());
        out.extend(s.ok());
    }
    if let Ok(cupy) = modules.get_item("cupy") {
        let s = (|| -> PyResult<usize> {
            let cuda = cupy.getattr("cuda")?;
            let dev = cuda.getattr("Device")?.call1((ordinal,))?;
            dev.call_method0("__enter__")?;
            let ptr = cuda.call_method0("get_current_stream").and_then(|s| s.getattr("ptr")).and_then(|p| p.extract());
            dev.call_method1("__exit__", (py.None(), py.None(), py.None()))?;
            ptr
        })();
        out.extend(s.ok());
    }
    out
}
