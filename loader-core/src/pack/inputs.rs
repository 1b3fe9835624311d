//! Inputs of `shardlock pack`: `.npy` files (one per field), one directory of files
//! (one sample per file, field `data`), WebDataset tars, or an image folder.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::imagefolder::{looks_like_image_folder, ImageFolder};
use super::npy::NpyArray;
use super::wds::{is_tar_name, WebDataset};
use super::{DatasetWriter, PackOptions};
use crate::error::{Error, Result};
use crate::format::{Field, Manifest, Schema};
use crate::keys::{IssuerKey, KeyProvider};

/// What kind of input `pack` reads (`shardlock pack --format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InputFormat {
    /// Told from the inputs: `.npy` files; a `.tar` file or a directory of them
    /// (WebDataset); a directory holding only directories (an image folder); any other
    /// directory (files).
    #[default]
    Auto,
    /// `.npy` files, one per field.
    Npy,
    /// One directory of files, one sample per file (field `data`).
    Files,
    /// WebDataset tars: a `.tar` file or a directory of them.
    WebDataset,
    /// An image folder, `root/<class>/<file>`: fields `image` and `label`.
    ImageFolder,
}

impl InputFormat {
    /// The format of `paths`, as [`InputFormat::Auto`] tells it. A directory holding
    /// `.tar` files among other files is refused (give `--format`), so that no file is
    /// silently left out.
    pub fn detect(paths: &[PathBuf]) -> Result<Self> {
        Ok(match paths {
            [p] if p.is_dir() => {
                let (mut tars, mut others) = (0usize, 0usize);
                for e in std::fs::read_dir(p).map_err(Error::io("list", p))?.flatten() {
                    let path = e.path();
                    if !path.is_file() || e.file_name().to_string_lossy().starts_with('.') {
                        continue;
                    }
                    if is_tar_name(&path) {
                        tars += 1;
                    } else {
                        others += 1;
                    }
                }
                match (tars, others) {
                    (0, _) if looks_like_image_folder(p) => Self::ImageFolder,
                    (0, _) => Self::Files,
                    (_, 0) => Self::WebDataset,
                    _ => {
                        return Err(Error::Input {
                            path: p.clone(),
                            detail: format!(
                                "holds {tars} .tar file(s) and {others} other file(s): pack the tars only with \
                                 --format wds, or every file as a sample with --format files (from Python, move the \
                                 other files out of the directory)"
                            ),
                        })
                    }
                }
            }
            [p] if is_tar_name(p) => Self::WebDataset,
            _ => Self::Npy,
        })
    }
}

/// Parsed pack inputs.
pub enum InputSource {
    /// Field name (file stem) and array, in the order given.
    Npy(Vec<(String, NpyArray)>),
    /// The files of a directory, sorted by name.
    Dir(PathBuf, Vec<PathBuf>),
    /// WebDataset tars, read in name order, one sample at a time.
    WebDataset(WebDataset),
    /// An image folder.
    ImageFolder(ImageFolder),
}

impl InputSource {
    /// Classifies and checks the inputs: either only `.npy` files with equal first-axis
    /// lengths, or exactly one directory holding at least one file.
    pub fn from_paths(paths: &[PathBuf]) -> Result<Self> {
        Self::open(paths, InputFormat::Auto, &[])
    }

    /// Opens the inputs as `format`; `parse` names the WebDataset extensions that hold
    /// integer text, stored as i64 (`--parse cls=i64`).
    pub fn open(paths: &[PathBuf], format: InputFormat, parse: &[String]) -> Result<Self> {
        let first =
            paths.first().ok_or_else(|| Error::Input { path: PathBuf::from("."), detail: "no input given".into() })?;
        let format = if format == InputFormat::Auto { InputFormat::detect(paths)? } else { format };
        if !parse.is_empty() && format != InputFormat::WebDataset {
            return Err(Error::InvalidArgument("--parse is for WebDataset tars (--format wds)".into()));
        }
        let one = || -> Result<&PathBuf> {
            match paths {
                [p] => Ok(p),
                _ => Err(Error::Input {
                    path: first.clone(),
                    detail: format!("{format:?} input is one path; give only one"),
                }),
            }
        };
        match format {
            InputFormat::WebDataset => return Ok(Self::WebDataset(WebDataset::open(one()?, parse)?)),
            InputFormat::ImageFolder => return Ok(Self::ImageFolder(ImageFolder::open(one()?)?)),
            InputFormat::Files if !first.is_dir() => {
                return Err(Error::Input { path: first.clone(), detail: "not a directory (--format files)".into() })
            }
            InputFormat::Npy if first.is_dir() => {
                return Err(Error::Input {
                    path: first.clone(),
                    detail: "a directory, not a .npy file (--format npy)".into(),
                })
            }
            _ => {}
        }
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
            Self::WebDataset(w) => w.schema(),
            Self::ImageFolder(_) => ImageFolder::schema(),
        }
    }

    /// Dataset metadata the input brings: an image folder's class names (`classes`).
    pub fn metadata(&self) -> crate::format::manifest::Metadata {
        let mut m = crate::format::manifest::Metadata::new();
        if let Self::ImageFolder(f) = self {
            m.insert("classes".into(), serde_json::json!(f.classes()));
        }
        m
    }

    /// Number of samples, where it is known before reading (not for tars).
    pub fn samples(&self) -> Option<u64> {
        match self {
            Self::Npy(a) => Some(a[0].1.len()),
            Self::Dir(_, f) => Some(f.len() as u64),
            Self::WebDataset(_) => None,
            Self::ImageFolder(f) => Some(f.len()),
        }
    }

    /// Writes every sample into `w`, calling `progress(samples_done)` now and then.
    pub fn write_into(&self, w: &mut DatasetWriter<'_>, progress: &mut dyn FnMut(u64)) -> Result<()> {
        match self {
            Self::WebDataset(t) => {
                t.write_into(w, progress)?;
            }
            Self::ImageFolder(f) => f.write_into(w, progress)?,
            Self::Npy(arrays) => {
                let mut row: Vec<&[u8]> = Vec::with_capacity(arrays.len());
                for i in 0..arrays[0].1.len() {
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
        if let Some(n) = self.samples() {
            progress(n);
        }
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
    let mut opts = opts;
    opts.metadata.extend(src.metadata());
    let mut w = DatasetWriter::create(out, src.schema()?, opts, keys, issuer)?;
    src.write_into(&mut w, progress)?;
    w.finish()
}
