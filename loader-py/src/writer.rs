//! Packing (mirrors `shardlock::pack`).

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use shardlock::IssuerKey;
use shardlock::{DType, Field, Schema};
use shardlock::{DatasetWriter, PackOptions};

use crate::errors::IntoPy;

/// The native writer behind `shardlock.Writer`.
#[pyclass(name = "NativeWriter", module = "shardlock._native")]
pub struct NativeWriter {
    inner: Option<DatasetWriter<'static>>,
}

fn parse_schema(fields: Vec<(String, String, Vec<u64>)>) -> shardlock::Result<Schema> {
    let fs = fields
        .into_iter()
        .map(|(name, dtype, shape)| {
            if dtype == "bytes" {
                Ok(Field::bytes(name))
            } else if let Some(inner) = dtype.strip_prefix("list<").and_then(|d| d.strip_suffix('>')) {
                DType::from_name(inner).map(|d| Field::list(name.clone(), d)).ok_or_else(|| {
                    shardlock::Error::InvalidArgument(format!("field {name:?}: unknown dtype {inner:?} in {dtype:?}"))
                })
            } else {
                DType::from_name(&dtype).map(|d| Field::tensor(name.clone(), d, &shape)).ok_or_else(|| {
                    shardlock::Error::InvalidArgument(format!("field {name:?}: unknown dtype {dtype:?}"))
                })
            }
        })
        .collect::<shardlock::Result<Vec<_>>>()?;
    Schema::new(fs)
}

#[pymethods]
impl NativeWriter {
    /// `fields`: (name, dtype name, "bytes" or "list<dtype>", shape) in record order;
    /// `compress`: `FIELD=zstd[:LEVEL]` specs, as `shardlock pack --compress`.
    #[new]
    #[pyo3(signature = (out_dir, keyring, issuer_key, dataset_id, fields, shard_size, force=false, generation=None,
        metadata_json=None, part=None, compress=Vec::new(), storage_options=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        out_dir: String,
        keyring: PathBuf,
        issuer_key: PathBuf,
        dataset_id: String,
        fields: Vec<(String, String, Vec<u64>)>,
        shard_size: u64,
        force: bool,
        generation: Option<u64>,
        metadata_json: Option<String>,
        part: Option<Bound<'_, PyAny>>,
        compress: Vec<String>,
        storage_options: Option<Vec<(String, String)>>,
    ) -> PyResult<Self> {
        let remote = remote_options(storage_options)?;
        // A part: a (first, count) range, or a callable handing out each shard's index.
        let part: Option<shardlock::PartShards<'static>> = match part {
            None => None,
            Some(p) if p.is_callable() => Some(shardlock::PartShards::Leased(Box::new(PyLease(p.unbind())))),
            Some(p) => {
                let (first_shard, max_shards): (u32, Option<u32>) = p.extract()?;
                Some(shardlock::Part { first_shard, max_shards }.into())
            }
        };
        let metadata: shardlock::Metadata = match metadata_json {
            Some(j) => serde_json::from_str(&j)
                .map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("metadata must be a JSON object: {e}")))?,
            None => Default::default(),
        };
        py.detach(|| {
            let keys = shardlock::open_provider_path(&keyring)?;
            let mut opts = PackOptions::new(dataset_id);
            opts.shard_size = shard_size;
            opts.force = force;
            opts.generation = generation;
            opts.metadata = metadata;
            let mut schema = parse_schema(fields)?;
            shardlock::apply_compression(&mut schema, &mut opts, &compress)?;
            match part {
                // A part: `issuer_key` is the issuer's public key (the trust anchor).
                Some(part) => {
                    let trust = shardlock::TrustAnchor::load(&issuer_key)?;
                    DatasetWriter::create_part_at_owned(&out_dir, schema, opts, keys, &trust, part, &remote)
                }
                None if out_dir.contains("://") => Err(shardlock::Error::InvalidArgument(format!(
                    "{out_dir}: only a part (part=) is packed straight to object storage; pack the dataset into a \
                     directory, then upload it (`shardlock upload`)"
                ))),
                None => DatasetWriter::create_owned(
                    std::path::Path::new(&out_dir),
                    schema,
                    opts,
                    keys,
                    Arc::new(IssuerKey::load(&issuer_key)?),
                ),
            }
        })
        .py()
        .map(|w| Self { inner: Some(w) })
    }

    /// Appends one sample: one `bytes` per field, in schema order.
    fn write_sample(&mut self, values: Vec<Bound<'_, PyBytes>>) -> PyResult<()> {
        let w = self.inner.as_mut().ok_or_else(closed)?;
        let refs: Vec<&[u8]> = values.iter().map(|b| b.as_bytes()).collect();
        w.write_sample(&refs).py()
    }

    /// Appends `n` samples given as one contiguous `bytes` per field (C order, first
    /// axis = samples). A field with an entry in `offsets` is variable-length: its
    /// entry is `n + 1` little-endian u64 offsets into its bytes (Arrow's layout), from
    /// 0 to their length; every other field has a fixed width of `len / n`.
    #[pyo3(signature = (columns, n, offsets=None))]
    fn write_columns(
        &mut self,
        py: Python<'_>,
        columns: Vec<Bound<'_, PyBytes>>,
        n: usize,
        offsets: Option<Vec<Option<Bound<'_, PyBytes>>>>,
    ) -> PyResult<()> {
        let w = self.inner.as_mut().ok_or_else(closed)?;
        let cols: Vec<&[u8]> = columns.iter().map(|b| b.as_bytes()).collect();
        if n == 0 {
            return Ok(());
        }
        let bad = |m: String| pyo3::exceptions::PyValueError::new_err(m);
        let offsets = offsets.unwrap_or_default();
        if !offsets.is_empty() && offsets.len() != cols.len() {
            return Err(bad(format!("{} offsets entries for {} columns", offsets.len(), cols.len())));
        }
        // Per column: the start of every sample's value and the end of the last one.
        let mut bounds: Vec<Vec<usize>> = Vec::with_capacity(cols.len());
        for (i, c) in cols.iter().enumerate() {
            match offsets.get(i).and_then(|o| o.as_ref()) {
                Some(o) => {
                    let raw = o.as_bytes();
                    if raw.len() != 8 * (n + 1) {
                        return Err(bad(format!("column {i}: {} offset bytes for {n} samples", raw.len())));
                    }
                    let v: Vec<usize> = raw
                        .chunks_exact(8)
                        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
                        .collect();
                    if v[0] != 0 || v[n] != c.len() || v.windows(2).any(|p| p[0] > p[1]) {
                        return Err(bad(format!("column {i}: offsets must rise from 0 to the column's length")));
                    }
                    bounds.push(v);
                }
                None => {
                    if c.len() % n != 0 {
                        return Err(bad(format!("column {i}: its length is not a multiple of the sample count")));
                    }
                    let wd = c.len() / n;
                    bounds.push((0..=n).map(|k| k * wd).collect());
                }
            }
        }
        py.detach(|| {
            let mut row = Vec::with_capacity(cols.len());
            for k in 0..n {
                row.clear();
                row.extend(cols.iter().zip(&bounds).map(|(c, b)| &c[b[k]..b[k + 1]]));
                w.write_sample(&row)?;
            }
            Ok(())
        })
        .py()
    }

    /// Appends every sample of `source`; returns (samples, plaintext bytes) written.
    fn write_source(&mut self, py: Python<'_>, source: &NativeSource) -> PyResult<(u64, u64)> {
        let w = self.inner.as_mut().ok_or_else(closed)?;
        let (s0, b0) = (w.samples(), w.bytes_in());
        py.detach(|| source.inner.write_into(w, &mut |_| ())).py()?;
        Ok((w.samples() - s0, w.bytes_in() - b0))
    }

    /// Seals the last shard and writes the signed manifest (or part file); returns
    /// (records, shards).
    fn finish(&mut self, py: Python<'_>) -> PyResult<(u64, usize)> {
        let w = self.inner.take().ok_or_else(closed)?;
        py.detach(|| w.finish()).py().map(|m| (m.records, m.shards.len()))
    }

    /// Abandons the dataset: no manifest is written, so it never reads as complete.
    fn abort(&mut self) {
        self.inner = None;
    }
}

/// A Python callable that returns the index of the next shard (`Writer(part=callable)`).
struct PyLease(Py<PyAny>);

impl shardlock::ShardLease for PyLease {
    fn next_shard(&mut self) -> shardlock::Result<u32> {
        Python::attach(|py| self.0.call0(py)?.extract::<u32>(py)).map_err(|e| {
            shardlock::Error::InvalidArgument(format!(
                "the part's shard lease (the callable given as part=) did not return a shard index: {e}"
            ))
        })
    }
}

/// A pack input read by the Rust packer (`shardlock pack`'s): WebDataset tars or an
/// image folder (also `.npy` files and a directory of files).
#[pyclass(name = "NativeSource", module = "shardlock._native")]
pub struct NativeSource {
    inner: shardlock::InputSource,
}

#[pymethods]
impl NativeSource {
    /// `format`: "auto", "npy", "files", "wds" or "imagefolder"; `parse`: WebDataset
    /// extensions holding integer text, stored as i64.
    #[new]
    #[pyo3(signature = (paths, format="auto", parse=Vec::new()))]
    fn new(py: Python<'_>, paths: Vec<PathBuf>, format: &str, parse: Vec<String>) -> PyResult<Self> {
        use shardlock::InputFormat;
        let format = match format {
            "auto" => InputFormat::Auto,
            "npy" => InputFormat::Npy,
            "files" => InputFormat::Files,
            "wds" => InputFormat::WebDataset,
            "imagefolder" => InputFormat::ImageFolder,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "format {other:?}: give auto, npy, files, wds or imagefolder"
                )))
            }
        };
        py.detach(|| shardlock::InputSource::open(&paths, format, &parse)).py().map(|inner| Self { inner })
    }

    /// The fields the source gives: (name, dtype name or "bytes", shape).
    fn fields(&self) -> PyResult<Vec<(String, String, Vec<u64>)>> {
        let schema = self.inner.schema().py()?;
        Ok(schema
            .fields
            .iter()
            .map(|f| match &f.kind {
                shardlock::FieldKind::Bytes => (f.name.clone(), "bytes".to_owned(), Vec::new()),
                shardlock::FieldKind::List { dtype } => (f.name.clone(), format!("list<{}>", dtype.name()), Vec::new()),
                shardlock::FieldKind::Tensor { dtype, shape } => {
                    (f.name.clone(), dtype.name().to_owned(), shape.clone())
                }
            })
            .collect())
    }

    /// The metadata the source brings (an image folder's `classes`), as JSON.
    fn metadata_json(&self) -> String {
        serde_json::to_string(&self.inner.metadata()).unwrap_or_else(|_| "{}".into())
    }

    /// The sample count where it is known before reading (not for tars).
    fn samples(&self) -> Option<u64> {
        self.inner.samples()
    }
}

fn closed() -> PyErr {
    pyo3::exceptions::PyValueError::new_err("this Writer is already closed")
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(assemble, m)?)?;
    m.add_function(wrap_pyfunction!(write_leases, m)?)?;
    m.add("IMAGE_EXTENSIONS", shardlock::IMAGE_EXTENSIONS.to_vec())?;
    m.add_class::<NativeSource>()?;
    m.add_class::<NativeWriter>()
}

/// `storage_options` as the core's remote options.
fn remote_options(storage_options: Option<Vec<(String, String)>>) -> PyResult<shardlock::RemoteOptions> {
    let mut remote = shardlock::RemoteOptions::default();
    for (k, v) in storage_options.unwrap_or_default() {
        remote.set(&k, &v).py()?;
    }
    Ok(remote)
}

/// Verifies the parts of a partitioned pack in `dir` and signs its manifest; returns
/// (records, shards).
#[pyfunction]
#[pyo3(signature = (dir, issuer_key, keyring, generation=None, storage_options=None))]
pub(crate) fn assemble(
    py: Python<'_>,
    dir: String,
    issuer_key: PathBuf,
    keyring: Vec<String>,
    generation: Option<u64>,
    storage_options: Option<Vec<(String, String)>>,
) -> PyResult<(u64, usize)> {
    let remote = remote_options(storage_options)?;
    py.detach(|| {
        let issuer = IssuerKey::load(&issuer_key)?;
        let keys = shardlock::open_providers(&keyring)?;
        let m = shardlock::assemble_at(&dir, &issuer, &*keys, generation, &remote)?;
        Ok((m.records, m.shards.len()))
    })
    .py()
}

/// Records how many shard indices the coordinator of leased parts handed out, or that
/// the write failed (`shardlock::write_leases`), so that `assemble` refuses a failed or
/// incomplete partitioned write.
#[pyfunction]
#[pyo3(signature = (dir, issued, failed=None))]
pub(crate) fn write_leases(dir: PathBuf, issued: u64, failed: Option<String>) -> PyResult<()> {
    shardlock::write_leases(&dir, issued, failed.as_deref()).py()
}
