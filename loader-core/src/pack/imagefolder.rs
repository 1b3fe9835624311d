//! Image folders as pack input, in torchvision's `ImageFolder` layout
//! (`root/<class>/<file>`, sub-directories of a class included): fields `image` (the
//! encoded file, untouched) and `label` (i64, the class's index in sorted order). Classes,
//! files and their order are torchvision's (`datasets/folder.py`): classes are the
//! directories of the root, sorted; a class's images are the files below it whose name
//! ends (in any case) in one of [`IMAGE_EXTENSIONS`], walked as
//! `sorted(os.walk(class_dir, followlinks=True))` with file names sorted in each
//! directory. Hidden names are not skipped (torchvision does not skip them). Names are
//! compared as bytes (the order of Python's `str` for UTF-8 names).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::DatasetWriter;
use crate::error::{Error, Result};
use crate::format::{DType, Field, Schema};

/// File extensions taken as images (matched case-insensitively), torchvision's
/// `IMG_EXTENSIONS`.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp"];

/// An image folder: its class names and every image with its label, in order.
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    files: Vec<(PathBuf, i64)>,
}

impl ImageFolder {
    /// Lists the classes and their images. A class directory without an image file is
    /// an error, as in torchvision; so is a class name that is not UTF-8 (class names
    /// are signed into the manifest as text) and a directory cycle through links.
    pub fn open(root: &Path) -> Result<Self> {
        let bad = |path: &Path, detail: String| Error::Input { path: path.to_owned(), detail };
        let mut names: Vec<OsString> = Vec::new();
        for e in std::fs::read_dir(root).map_err(Error::io("list", root))? {
            let e = e.map_err(Error::io("list", root))?;
            // `os.scandir(root)` entries with `is_dir()`: links to directories count.
            if e.path().is_dir() {
                names.push(e.file_name());
            }
        }
        names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
        if names.is_empty() {
            return Err(bad(root, "no class directories (an image folder is root/<class>/<image file>)".into()));
        }
        let mut classes = Vec::with_capacity(names.len());
        let mut files = Vec::new();
        for (label, name) in names.iter().enumerate() {
            let dir = root.join(name);
            let class = name.to_str().map(str::to_owned).ok_or_else(|| {
                bad(&dir, "the class directory's name is not UTF-8 (class names are signed as text): rename it".into())
            })?;
            let mut dirs = Vec::new();
            walk(&dir, &mut dirs, &mut Vec::new())?;
            dirs.sort_by(|a, b| a.0.as_os_str().as_encoded_bytes().cmp(b.0.as_os_str().as_encoded_bytes()));
            let before = files.len();
            for (d, mut names) in dirs {
                names.sort_by(|a, b| a.as_encoded_bytes().cmp(b.as_encoded_bytes()));
                files.extend(names.into_iter().map(|n| (d.join(n), label as i64)));
            }
            if files.len() == before {
                return Err(bad(
                    &dir,
                    format!("class directory {class:?} holds no image file ({})", IMAGE_EXTENSIONS.join(", ")),
                ));
            }
            classes.push(class);
        }
        Ok(Self { root: root.to_owned(), classes, files })
    }

    /// The class names in label order (signed into the manifest as `metadata["classes"]`).
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Fields `image` (bytes) and `label` (i64).
    pub fn schema() -> Result<Schema> {
        Schema::new(vec![Field::bytes("image"), Field::tensor("label", DType::I64, &[])])
    }

    /// Number of images.
    pub fn len(&self) -> u64 {
        self.files.len() as u64
    }

    /// True if there are no images (never, after `open`).
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Writes every image and its label into `w`, calling `progress(samples_done)` now and then.
    pub fn write_into(&self, w: &mut DatasetWriter<'_>, progress: &mut dyn FnMut(u64)) -> Result<()> {
        for (i, (f, label)) in self.files.iter().enumerate() {
            let data = Zeroizing::new(std::fs::read(f).map_err(Error::io("read", f))?);
            w.write_sample(&[&data, &label.to_le_bytes()])?;
            if i % 64 == 63 {
                progress(i as u64 + 1);
            }
        }
        progress(self.len());
        Ok(())
    }

    /// The folder's root.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The image file names of `dir` and of every directory below it, links to
/// directories followed (`os.walk(followlinks=True)`), as (directory, names). A link
/// back to a directory being walked (a cycle, which `os.walk` would follow forever) is
/// an error; `ancestors` holds the resolved directories above `dir`.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<OsString>)>, ancestors: &mut Vec<PathBuf>) -> Result<()> {
    let real = std::fs::canonicalize(dir).map_err(Error::io("resolve", dir))?;
    if ancestors.contains(&real) {
        return Err(Error::Input {
            path: dir.to_owned(),
            detail: "a directory link loops back to a directory above it: remove the link".into(),
        });
    }
    ancestors.push(real);
    let mut names = Vec::new();
    let mut subdirs = Vec::new();
    for e in std::fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let e = e.map_err(Error::io("list", dir))?;
        let path = e.path();
        // os.walk: whatever `is_dir()` (following links) is a directory, the rest files.
        if path.is_dir() {
            subdirs.push(path);
        } else if is_image_name(&e.file_name()) {
            names.push(e.file_name());
        }
    }
    out.push((dir.to_owned(), names));
    for d in subdirs {
        walk(&d, out, ancestors)?;
    }
    ancestors.pop();
    Ok(())
}

/// torchvision's `has_file_allowed_extension`: the lower-cased name ends in `.EXT`.
fn is_image_name(name: &std::ffi::OsStr) -> bool {
    let lower = name.as_encoded_bytes().to_ascii_lowercase();
    IMAGE_EXTENSIONS.iter().any(|ext| {
        lower.len() > ext.len() && lower.ends_with(ext.as_bytes()) && lower[lower.len() - ext.len() - 1] == b'.'
    })
}

/// Every non-hidden entry of `dir` is a directory, and there is one at least: the layout
/// of an image folder (a folder of files is the `files` input).
pub(super) fn looks_like_image_folder(dir: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else { return false };
    let mut any = false;
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if !e.path().is_dir() {
            return false;
        }
        any = true;
    }
    any
}
