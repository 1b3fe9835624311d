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
    /// `fields`: (name, dtype name or "bytes", shape) in record order.
    #[new]
    #[pyo3(signature = (out_dir, keyring, issuer_key, dataset_id, fields, shard_size, force=false, generation=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        out_dir: PathBuf,
        keyring: PathBuf,
        issuer_key: PathBuf,
        dataset_id: String,
        fields: Vec<(String, String, Vec<u64>)>,
        shard_size: u64,
        force: bool,
        generation: Option<u64>,
    ) -> PyResult<Self> {
        py.detach(|| {
            let keys = shardlock::open_provider_path(&keyring)?;
            let issuer = Arc::new(IssuerKey::load(&issuer_key)?);
            let mut opts = PackOptions::new(dataset_id);
            opts.shard_size = shard_size;
            opts.force = force;
            opts.generation = generation;
            DatasetWriter::create_owned(&out_dir, parse_schema(fields)?, opts, keys, issuer)
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

    /// Appends `n` samples of fixed-size fields given as one contiguous `bytes` per
    /// field (C order, first axis = samples).
    fn write_columns(&mut self, py: Python<'_>, columns: Vec<Bound<'_, PyBytes>>, n: usize) -> PyResult<()> {
        let w = self.inner.as_mut().ok_or_else(closed)?;
        let cols: Vec<&[u8]> = columns.iter().map(|b| b.as_bytes()).collect();
        if n == 0 {
            return Ok(());
        }
        if cols.iter().any(|c| c.len() % n != 0) {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "column lengths are not multiples of the sample count",
            ));
        }
        let width: Vec<usize> = cols.iter().map(|c| c.len() / n).collect();
        py.detach(|| {
            let mut row = Vec::with_capacity(cols.len());
            for i in 0..n {
                row.clear();
                row.extend(cols.iter().zip(&width).map(|(c, &wd)| &c[i * wd..(i + 1) * wd]));
                w.write_sample(&row)?;
            }
            Ok(())
        })
        .py()
    }

    /// Seals the last shard and writes the signed manifest; returns the record count.
    fn finish(&mut self, py: Python<'_>) -> PyResult<u64> {
        let w = self.inner.take().ok_or_else(closed)?;
        py.detach(|| w.finish()).py().map(|m| m.records)
    }

    /// Abandons the dataset: no manifest is written, so it never reads as complete.
    fn abort(&mut self) {
        self.inner = None;
    }
}

fn closed() -> PyErr {
    pyo3::exceptions::PyValueError::new_err("this Writer is already closed")
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeWriter>()
}
