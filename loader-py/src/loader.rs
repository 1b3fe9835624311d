//! The streaming loader (mirrors `shardlock::pipeline`). Batches come back as NumPy
//! arrays that borrow the locked batch buffer: no copy, and the buffer is returned to
//! the pool (zeroized) only when the last array or tensor built on it is gone.

use std::path::PathBuf;
use std::time::Duration;

use numpy::ndarray::{ArrayView, IxDyn};
use numpy::{Element, PyArray};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use shardlock::device::{DeviceBatch, DeviceLoader, DeviceOptions};
use shardlock::RemoteOptions;
use shardlock::{Batch, BatchStream, Next};
use shardlock::{DType, FieldKind};
use shardlock::{Loader, LoaderState, Remainder, Shuffle};

use crate::device::DeviceTensor;
use crate::errors::{to_py, IntoPy};

/// Owns one batch; every array of the batch keeps it alive as its NumPy base.
#[pyclass(frozen, name = "BatchOwner", module = "shardlock._native")]
pub struct BatchOwner {
    batch: Batch,
}

/// The native loader behind `shardlock.Loader`.
#[pyclass(name = "NativeLoader", module = "shardlock._native")]
pub struct NativeLoader {
    inner: Inner,
}

/// Host batches, or the device stage in front of the loader.
/// (Without the core's `cuda` feature, `Device` cannot be built: [`DeviceLoader::new`]
/// fails with `DeviceUnavailable`.)
#[allow(clippy::large_enum_variant)] // one per loader; the variants are of similar size with `cuda` on
enum Inner {
    Host(Loader),
    Device(DeviceLoader),
    /// Token windows cut from a list field's documents (on the host).
    Tokens(shardlock::TokenStream),
}

/// `$body` with `$s` bound to the stream in `$inner` (a `&Inner` or `&mut Inner`),
/// host or device: both are [`BatchStream`]s, so the code is written once.
macro_rules! with_stream {
    ($inner:expr, $s:ident => $body:expr) => {
        match $inner {
            Inner::Host($s) => $body,
            Inner::Device($s) => $body,
            Inner::Tokens($s) => $body,
        }
    };
}

/// A batch as the Python tuple `(fields, sample_ids)`.
trait ToPy {
    fn to_py(self, py: Python<'_>) -> PyResult<Bound<'_, PyTuple>>;
}

impl ToPy for Batch {
    fn to_py(self, py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
        batch_to_py(py, self)
    }
}

impl ToPy for DeviceBatch {
    fn to_py(self, py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
        device_batch_to_py(py, self)
    }
}

/// `(field, seq_len, eos, positions, shuffle_windows, pad, widen, documents per read)`
/// of `shardlock.TokenWindows`.
type TokenWindowsArgs = (String, usize, Option<i64>, bool, usize, Option<i64>, bool, usize);

/// `(field, (height, width), train, resize, scale, ratio, flip, (mean, std), layout,
/// dtype, max_pixels)` of one `shardlock.Image` in `decode=`.
type DecodeArgs =
    (String, (u32, u32), bool, u32, (f64, f64), (f64, f64), f64, Option<([f32; 3], [f32; 3])>, String, String, u64);

/// The core's decode spec of one `shardlock.Image`.
fn image_spec(a: &DecodeArgs) -> shardlock::Result<(String, shardlock::ImageDecode)> {
    let (field, size, train, resize, scale, ratio, flip, normalize, layout, dtype, max_pixels) = a;
    let geometry = if *train {
        shardlock::Geometry::Train { scale: *scale, ratio: *ratio, flip: *flip }
    } else {
        shardlock::Geometry::Eval { resize: *resize }
    };
    let layout = match layout.as_str() {
        "CHW" => shardlock::ImageLayout::Chw,
        "HWC" => shardlock::ImageLayout::Hwc,
        other => {
            return Err(shardlock::Error::InvalidArgument(format!("layout {other:?}: use \"CHW\" or \"HWC\"")));
        }
    };
    let dtype = DType::from_name(dtype).ok_or_else(|| {
        shardlock::Error::InvalidArgument(format!("dtype {dtype:?}: use uint8, float16, bfloat16 or float32"))
    })?;
    let spec =
        shardlock::ImageDecode { size: *size, geometry, normalize: *normalize, layout, dtype, max_pixels: *max_pixels };
    Ok((field.clone(), spec))
}

/// The next batch of `stream`, or `None` at the end of the epoch. Waits with the GIL
/// released, waking every 100 ms to let Ctrl-C through.
fn next_from<'py, S>(py: Python<'py>, stream: &mut S) -> PyResult<Option<Bound<'py, PyTuple>>>
where
    S: BatchStream + Send,
    S::Batch: ToPy + Send,
{
    let wait = Duration::from_millis(100);
    loop {
        match py.detach(|| stream.next_within(wait)) {
            Next::Pending => py.check_signals()?,
            Next::End => return Ok(None),
            Next::Batch(Ok(b)) => return b.to_py(py).map(Some),
            Next::Batch(Err(e)) => return Err(to_py(e)),
        }
    }
}

/// Puts the device stage in front of `loader` for `device` ("cuda:N"), or keeps it.
fn with_device(
    loader: Loader,
    device: Option<&str>,
    pinned: bool,
    decode: Vec<(String, shardlock::ImageDecode)>,
    nvjpeg: Option<PathBuf>,
) -> shardlock::Result<Inner> {
    let Some(spec) = device.filter(|d| *d != "cpu") else { return Ok(Inner::Host(loader)) };
    let ordinal = shardlock::device::parse_device(spec)?;
    let mut d = DeviceLoader::new(loader, DeviceOptions { ordinal, pinned, decode, nvjpeg, ..Default::default() })?;
    // Consumers synchronize through DLPack (`__dlpack__(stream=...)`).
    d.set_consumer_stream(None);
    Ok(Inner::Device(d))
}

/// A device batch as `({name: (dtype, DeviceTensor) | ("bytes", values, offsets)}, ids)`.
fn device_batch_to_py<'py>(py: Python<'py>, batch: DeviceBatch) -> PyResult<Bound<'py, PyTuple>> {
    let batch = std::sync::Arc::new(batch);
    let out = PyDict::new(py);
    let n = batch.len();
    for slot in batch.fields() {
        let (addr, len) = batch.field_address(&slot.name).py()?;
        match &slot.kind {
            FieldKind::Tensor { dtype, shape } => {
                let mut full = vec![n];
                full.extend(shape.iter().map(|&d| d as usize));
                let t = Bound::new(py, DeviceTensor::new(&batch, addr, full, *dtype))?;
                out.set_item(&*slot.name, (dtype.name(), t))?;
            }
            FieldKind::Bytes | FieldKind::List { .. } => {
                let (tag, dtype) = match &slot.kind {
                    FieldKind::List { dtype } => (format!("list<{}>", dtype.name()), *dtype),
                    _ => ("bytes".to_owned(), DType::U8),
                };
                let values = Bound::new(py, DeviceTensor::new(&batch, addr, vec![len / dtype.size()], dtype))?;
                let at = batch.offsets_address(&slot.name).py()?;
                let offsets = Bound::new(py, DeviceTensor::new(&batch, at, vec![n + 1], DType::I64))?;
                out.set_item(&*slot.name, (tag, values, offsets))?;
            }
        }
    }
    let ids = numpy::PyArray1::from_slice(py, batch.sample_ids());
    PyTuple::new(py, [out.into_any(), ids.into_any()])
}

fn array<'py, T: Element + bytemuck::Pod>(
    owner: &Bound<'py, BatchOwner>,
    bytes: &[u8],
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    let data: &[T] = bytemuck::try_cast_slice(bytes)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("batch view: {e}")))?;
    let view = ArrayView::from_shape(IxDyn(shape), data)
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(format!("batch view: {e}")))?;
    #[allow(unsafe_code)]
    // SAFETY: `data` points into the page-locked buffer owned by the `Batch` inside
    // `owner`. That buffer is an mmap with a stable address, the `BatchOwner` is frozen
    // (no &mut access, so the batch is never mutated or moved out), and NumPy keeps
    // `owner` alive as the array's base for as long as the array (or any tensor built
    // on it) exists. The buffer is zeroized and reused only after `owner` is dropped.
    let arr = unsafe { PyArray::<T, IxDyn>::borrow_from_array(&view, owner.clone().into_any()) };
    Ok(arr.into_any())
}

fn batch_to_py<'py>(py: Python<'py>, batch: Batch) -> PyResult<Bound<'py, PyTuple>> {
    let owner = Bound::new(py, BatchOwner { batch })?;
    let out = PyDict::new(py);
    let b = &owner.get().batch;
    let n = b.len();
    for slot in b.fields() {
        let raw = b.field_bytes(&slot.name).py()?;
        match &slot.kind {
            FieldKind::Tensor { dtype, shape } => {
                let mut full = vec![n];
                full.extend(shape.iter().map(|&d| d as usize));
                let arr = typed_array(&owner, *dtype, raw, &full)?;
                out.set_item(&*slot.name, (dtype.name(), arr))?;
            }
            FieldKind::List { dtype } => {
                let at = slot.offsets_at.unwrap_or(0);
                let all = b.buffer_bytes();
                let values = typed_array(&owner, *dtype, raw, &[raw.len() / dtype.size()])?;
                let offsets = array::<i64>(&owner, &all[at..at + 8 * (n + 1)], &[n + 1])?;
                out.set_item(&*slot.name, (format!("list<{}>", dtype.name()), values, offsets))?;
            }
            FieldKind::Bytes => {
                let at = slot.offsets_at.unwrap_or(0);
                let all = b.buffer_bytes();
                let values = array::<u8>(&owner, raw, &[raw.len()])?;
                let offsets = array::<i64>(&owner, &all[at..at + 8 * (n + 1)], &[n + 1])?;
                out.set_item(&*slot.name, ("bytes", values, offsets))?;
            }
        }
    }
    let ids = numpy::PyArray1::from_slice(py, b.sample_ids());
    PyTuple::new(py, [out.into_any(), ids.into_any()])
}

/// A zero-copy NumPy view of `bytes` as `dtype` elements of `shape`.
fn typed_array<'py>(
    owner: &Bound<'py, BatchOwner>,
    dtype: DType,
    raw: &[u8],
    full: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    match dtype {
        // bool: its bytes (0 or 1); Python views them as bool.
        DType::U8 | DType::Bool => array::<u8>(owner, raw, full),
        DType::I8 => array::<i8>(owner, raw, full),
        DType::I16 => array::<i16>(owner, raw, full),
        DType::U16 | DType::Bf16 => array::<u16>(owner, raw, full),
        DType::I32 => array::<i32>(owner, raw, full),
        DType::U32 => array::<u32>(owner, raw, full),
        DType::I64 => array::<i64>(owner, raw, full),
        DType::U64 => array::<u64>(owner, raw, full),
        DType::F16 => array::<half::f16>(owner, raw, full),
        DType::F32 => array::<f32>(owner, raw, full),
        DType::F64 => array::<f64>(owner, raw, full),
    }
}

/// The key providers `keyring` names, as one ([`shardlock::ProviderSet`] for several).
fn open_keys(
    keyring: &[PathBuf],
    tls: &shardlock::service::ServiceTls,
) -> shardlock::Result<std::sync::Arc<dyn shardlock::KeyProvider>> {
    let has_tls = tls.ca_cert.is_some() || tls.client_cert.is_some() || tls.client_key.is_some();
    if has_tls && !keyring.iter().any(|k| shardlock::is_service_url(&k.to_string_lossy())) {
        return Err(shardlock::Error::InvalidArgument(
            "ca_cert/client_cert/client_key are for a key service (keyring=\"https://...\")".into(),
        ));
    }
    shardlock::ProviderSet::combine(keyring.iter().map(|k| open_key(k, tls)).collect::<shardlock::Result<_>>()?)
}

/// The key provider `keyring` names; a key service's URL gets the TLS files given
/// (each falling back to its environment variable).
fn open_key(
    keyring: &std::path::Path,
    tls: &shardlock::service::ServiceTls,
) -> shardlock::Result<std::sync::Arc<dyn shardlock::KeyProvider>> {
    let spec = keyring.to_string_lossy();
    if !shardlock::is_service_url(&spec) {
        return shardlock::open_provider_path(keyring);
    }
    let mut opts = shardlock::service::ServiceOptions::from_env()?;
    if tls.ca_cert.is_some() {
        opts.tls.ca_cert.clone_from(&tls.ca_cert);
    }
    if tls.client_cert.is_some() || tls.client_key.is_some() {
        opts.tls.client_cert.clone_from(&tls.client_cert);
        opts.tls.client_key.clone_from(&tls.client_key);
    }
    Ok(std::sync::Arc::new(shardlock::service::KeyServiceProvider::open(&spec, opts)?))
}

#[pymethods]
impl NativeLoader {
    #[new]
    #[pyo3(signature = (path, *, keyring, token, trust, batch_size, shuffle, seed, rank, world_size, drop_last,
        fields=None, workers=None, deny_list=None, audit_log=None, memory_budget=None, allow_unlocked_memory=false,
        pad=false, window_shards=None, device=None, pinned=true, storage_options=None, min_generation=None,
        ca_cert=None, client_cert=None, client_key=None, worker_id=0, num_workers=1, clock_skew=None,
        token_windows=None, decode=None, on_decode_error="raise", decode_on="workers", nvjpeg=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        keyring: Vec<PathBuf>,
        token: Option<PathBuf>,
        trust: PathBuf,
        batch_size: usize,
        shuffle: &str,
        seed: u64,
        rank: u32,
        world_size: u32,
        drop_last: bool,
        fields: Option<Vec<String>>,
        workers: Option<usize>,
        deny_list: Option<PathBuf>,
        audit_log: Option<PathBuf>,
        memory_budget: Option<u64>,
        allow_unlocked_memory: bool,
        pad: bool,
        window_shards: Option<usize>,
        device: Option<String>,
        pinned: bool,
        storage_options: Option<Vec<(String, String)>>,
        min_generation: Option<u64>,
        ca_cert: Option<PathBuf>,
        client_cert: Option<PathBuf>,
        client_key: Option<PathBuf>,
        worker_id: u32,
        num_workers: u32,
        clock_skew: Option<String>,
        token_windows: Option<TokenWindowsArgs>,
        decode: Option<Vec<DecodeArgs>>,
        on_decode_error: &str,
        decode_on: &str,
        nvjpeg: Option<PathBuf>,
    ) -> PyResult<Self> {
        let on_device = match decode_on {
            "workers" => false,
            "device" => true,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "decode_on={other:?}: use \"workers\" (the decrypt workers, CPU) or \"device\" (nvJPEG and a \
                     kernel on device=\"cuda:N\")"
                )))
            }
        };
        if on_device && device.as_deref().is_none_or(|d| d == "cpu") {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "decode_on=\"device\" decodes on the GPU: give device=\"cuda:N\" too, or decode on the workers",
            ));
        }
        let on_decode_error = match on_decode_error {
            "raise" => shardlock::OnDecodeError::Raise,
            "skip" => shardlock::OnDecodeError::Skip,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "on_decode_error={other:?}: use \"raise\" or \"skip\""
                )))
            }
        };
        if token_windows.is_some() && device.as_deref().is_some_and(|d| d != "cpu") {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "token windows are cut on the host: leave device= out and move each batch with .to(device)",
            ));
        }
        let shuffle = Shuffle::parse(shuffle).py()?;
        let tls = shardlock::service::ServiceTls { ca_cert, client_cert, client_key };
        let mut remote = RemoteOptions::default();
        for (k, v) in storage_options.unwrap_or_default() {
            remote.set(&k, &v).py()?;
        }
        py.detach(|| {
            // With token windows, the loader reads documents: `docs` at a time, none left out.
            let (docs_batch, docs_drop) = match &token_windows {
                Some(t) => (t.7, false),
                None => (batch_size, drop_last),
            };
            let mut b = Loader::builder(&path)
                .key_provider(open_keys(&keyring, &tls)?)
                .trust(&trust)
                .batch_size(docs_batch)
                .shuffle(shuffle)
                .seed(seed)
                .rank(rank, world_size)
                .dataloader_worker(worker_id, num_workers)
                .drop_last(docs_drop)
                .remainder(if pad { Remainder::Pad } else { Remainder::Drop })
                .allow_unlocked_memory(allow_unlocked_memory)
                .remote_options(remote);
            if let Some(t) = &token {
                b = b.token(t);
            }
            if let Some(g) = min_generation {
                b = b.min_generation(g);
            }
            if let Some(s) = &clock_skew {
                b = b.clock_skew(shardlock::parse_ttl(s)?);
            }
            match (&token_windows, fields) {
                (Some(t), _) => b = b.fields(vec![t.0.clone()]),
                (None, Some(f)) => b = b.fields(f),
                (None, None) => {}
            }
            if let Some(w) = workers {
                b = b.workers(w);
            }
            if let Some(d) = &deny_list {
                b = b.deny_list(d);
            }
            if let Some(a) = &audit_log {
                b = b.audit_log(a);
            }
            if let Some(m) = memory_budget {
                b = b.memory_budget(m);
            }
            if let Some(w) = window_shards {
                b = b.window(w, None);
            }
            let mut on_gpu = Vec::new();
            for d in decode.iter().flatten() {
                let (field, spec) = image_spec(d)?;
                if on_device {
                    on_gpu.push((field, spec));
                } else {
                    b = b.decode(field, spec);
                }
            }
            let loader = b.on_decode_error(on_decode_error).build()?;
            match token_windows {
                Some((field, seq_len, eos, positions, shuffle_windows, pad, widen, _)) => {
                    let opts = shardlock::TokenWindows {
                        field,
                        seq_len,
                        eos,
                        positions,
                        shuffle_windows,
                        pad,
                        widen,
                        batch_size,
                        drop_last,
                    };
                    Ok(Inner::Tokens(shardlock::TokenStream::new(loader, opts)?))
                }
                None => with_device(loader, device.as_deref(), pinned, on_gpu, nvjpeg),
            }
        })
        .py()
        .map(|inner| Self { inner })
    }

    /// The next batch as `(fields, sample_ids)`, or `None` at the end of the epoch.
    /// Waits with the GIL released, waking every 100 ms to let Ctrl-C through.
    fn next_batch<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        with_stream!(&mut self.inner, s => next_from(py, s))
    }

    /// Batches per epoch for this rank.
    fn __len__(&self) -> PyResult<usize> {
        with_stream!(&self.inner, s => s.len()).py()
    }

    /// `(samples in this rank's share of the current epoch, records in the dataset)`.
    fn sample_counts(&self) -> PyResult<(usize, u64)> {
        let loader = with_stream!(&self.inner, s => s.loader());
        Ok((loader.rank_samples().py()?, loader.dataset().manifest().records))
    }

    /// Samples left out so far because their image did not decode.
    fn decode_skips(&self) -> u64 {
        with_stream!(&self.inner, s => s.loader().decode_skips())
    }

    /// The epoch the next iteration reads.
    #[getter]
    fn epoch(&self) -> u64 {
        with_stream!(&self.inner, s => s.epoch())
    }

    /// Sets the epoch of the next iteration.
    fn set_epoch(&mut self, epoch: u64) {
        with_stream!(&mut self.inner, s => s.set_epoch(epoch))
    }

    /// The dataset's signed metadata, as a JSON object.
    fn metadata_json(&self) -> String {
        let m = with_stream!(&self.inner, s => serde_json::to_string(&s.loader().dataset().manifest().metadata));
        m.unwrap_or_else(|_| "{}".into())
    }

    /// Names of the fields each batch holds.
    fn field_names(&self) -> Vec<String> {
        with_stream!(&self.inner, s => s.loader().field_names().into_iter().map(str::to_owned).collect())
    }

    /// Resume state as JSON.
    fn state_json(&self) -> PyResult<String> {
        let state = with_stream!(&self.inner, s => s.state());
        serde_json::to_string(&state).map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))
    }

    /// Restores a state from `state_json`.
    fn load_state_json(&mut self, state: &str) -> PyResult<()> {
        let state: LoaderState = serde_json::from_str(state)
            .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("loader state: {e}")))?;
        with_stream!(&mut self.inner, s => s.load_state(&state).py())
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeLoader>()?;
    m.add_class::<DeviceTensor>()?;
    m.add_class::<BatchOwner>()
}
