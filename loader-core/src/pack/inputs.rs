//! Inputs of `shardlock pack`: `.npy` files (one per field) or one directory of files
//! (one sample per file, field `data`).

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::npy::NpyArray;
use super::{DatasetWriter, PackOptions};
use crate::error::{Error, Result};
use crate::format::{Field, Manifest, Schema};
use crate::keys::{IssuerKey, KeyProvider};

/// Parsed pack inputs.
pub enum InputSource {
    /// Field name (file stem) and array, in the order given.
    Npy(Vec<(String, NpyArray)>),
    /// The files of a directory, sorted by name.
    Dir(PathBuf, Vec<PathBuf>),
}

impl InputSource {
    /// Classifies and checks the inputs: either only `.npy` files with equal first-axis
    /// lengths, or exactly one directory holding at least one file.
    pub fn from_paths(paths: &[PathBuf]) -> Result<Self> {
        let first =
            paths.first().ok_or_else(|| Error::Input { path: PathBuf::from("."), detail: "no input given".into() })?;
        if first.is_dir() {
            if paths.len() != 1 {
                return Err(Error::Input {
                    path: first.clone(),
                    detail: "give one directory, or only .npy files".into(),
                });
            }
            let mut files: Vec<PathBuf> = std::fs::read_dir(first)
                .map_err(Error::io("list", first))?
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .map(|e| e.path())
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::Input {
                    path: first.clone(),
                    detail: "empty input: the directory holds no files".into(),
                });
            }
            return Ok(Self::Dir(first.clone(), files));
        }
        let mut arrays: Vec<(String, NpyArray)> = Vec::new();
        for p in paths {
            if p.extension().and_then(|e| e.to_str()) != Some("npy") {
                return Err(Error::Input { path: p.clone(), detail: "not a .npy file or a directory".into() });
            }
            let name = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            if arrays.iter().any(|(n, _)| *n == name) {
                return Err(Error::Input { path: p.clone(), detail: format!("two inputs named field {name:?}") });
            }
            let a = NpyArray::open(p)?;
            if let Some((n0, a0)) = arrays.first() {
                if a0.len() != a.len() {
                    return Err(Error::Input {
                        path: p.clone(),
                        detail: format!(
                            "{} samples, but {} ({n0:?}) has {}: every field needs the same first-axis length",
                            a.len(),
                            a0.path().display(),
                            a0.len()
                        ),
                    });
                }
            }
            arrays.push((name, a));
        }
        if arrays[0].1.is_empty() {
            return Err(Error::Input { path: first.clone(), detail: "empty input: 0 samples".into() });
        }
        Ok(Self::Npy(arrays))
    }

    /// The schema these inputs produce.
    pub fn schema(&self) -> Result<Schema> {
        match self {
            Self::Npy(a) => {
                Schema::new(a.iter().map(|(n, arr)| Field::tensor(n.clone(), arr.dtype, &arr.shape[1..])).collect())
            }
            Self::Dir(..) => Schema::new(vec![Field::bytes("data")]),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        match self {
            Self::Npy(a) => a[0].1.len(),
            Self::Dir(_, f) => f.len() as u64,
        }
    }

    /// True if there are no samples (never, after `from_paths`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes every sample into `w`, calling `progress(samples_done)` now and then.
    pub fn write_into(&self, w: &mut DatasetWriter<'_>, progress: &mut dyn FnMut(u64)) -> Result<()> {
        match self {
            Self::Npy(arrays) => {
                let mut row: Vec<&[u8]> = Vec::with_capacity(arrays.len());
                for i in 0..self.len() {
                    row.clear();
                    row.extend(arrays.iter().map(|(_, a)| a.row(i)));
                    w.write_sample(&row)?;
                    if i % 1024 == 1023 {
                        progress(i + 1);
                    }
                }
            }
            Self::Dir(_, files) => {
                for (i, f) in files.iter().enumerate() {
                    let data = Zeroizing::new(std::fs::read(f).map_err(Error::io("read", f))?);
                    w.write_sample(&[&data])?;
                    if i % 64 == 63 {
                        progress(i as u64 + 1);
                    }
                }
            }
        }
        progress(self.len());
        Ok(())
    }
}

/// Packs `inputs` into `out`: the library form of `shardlock pack`.
pub fn pack_paths(
    out: &Path,
    inputs: &[PathBuf],
    opts: PackOptions,
    keys: &dyn KeyProvider,
    issuer: &IssuerKey,
    progress: &mut dyn FnMut(u64),
) -> Result<Manifest> {
    let src = InputSource::from_paths(inputs)?;
    let mut w = DatasetWriter::create(out, src.schema()?, opts, keys, issuer)?;
    src.write_into(&mut w, progress)?;
    w.finish()
}
