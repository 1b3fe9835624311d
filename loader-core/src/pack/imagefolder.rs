//! Image folders as pack input, in torchvision's `ImageFolder` layout
//! (`root/<class>/<file>`, sub-directories of a class included): fields `image` (the
//! encoded file, untouched) and `label` (i64, the class's index in sorted order). Classes
//! and files are numbered and ordered exactly as torchvision does (`sorted(os.walk(...))`,
//! file names sorted within a directory), so labels agree with a torchvision reader.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::DatasetWriter;
use crate::error::{Error, Result};
use crate::format::{DType, Field, Schema};

/// File extensions taken as images (lower-cased), as torchvision's `IMG_EXTENSIONS`.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "ppm", "bmp", "pgm", "tif", "tiff", "webp", "gif"];

/// An image folder: its class names and every image with its label, in order.
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    files: Vec<(PathBuf, i64)>,
}

impl ImageFolder {
    /// Lists the classes (the non-hidden sub-directories of `root`, sorted) and their
    /// images. A class directory without an image file is an error, as in torchvision.
    pub fn open(root: &Path) -> Result<Self> {
        let bad = |path: &Path, detail: String| Error::Input { path: path.to_owned(), detail };
        let mut classes: Vec<String> = Vec::new();
        for e in std::fs::read_dir(root).map_err(Error::io("list", root))? {
            let e = e.map_err(Error::io("list", root))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') && e.path().is_dir() {
                classes.push(name);
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(bad(root, "no class directories (an image folder is root/<class>/<image file>)".into()));
        }
        let mut files = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut dirs = Vec::new();
            walk(&dir, &mut dirs)?;
            // torchvision: `for root, _, fnames in sorted(os.walk(dir))`, then `sorted(fnames)`.
            dirs.sort_by(|a, b| a.0.as_os_str().as_encoded_bytes().cmp(b.0.as_os_str().as_encoded_bytes()));
            let before = files.len();
            for (d, mut names) in dirs {
                names.sort();
                files.extend(names.into_iter().map(|n| (d.join(n), label as i64)));
            }
            if files.len() == before {
                return Err(bad(
                    &dir,
                    format!("class directory {class:?} holds no image file ({})", IMAGE_EXTENSIONS.join(", ")),
                ));
            }
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

/// The image file names of `dir` and of every directory below it (symbolic links to
/// directories are not followed, as `os.walk`), as (directory, names).
fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<String>)>) -> Result<()> {
    let mut names = Vec::new();
    let mut subdirs = Vec::new();
    for e in std::fs::read_dir(dir).map_err(Error::io("list", dir))? {
        let e = e.map_err(Error::io("list", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ty = e.file_type().map_err(Error::io("stat", &e.path()))?;
        if ty.is_dir() {
            subdirs.push(e.path());
        } else if !name.starts_with('.') && is_image_name(&name) && e.path().is_file() {
            names.push(name);
        }
    }
    out.push((dir.to_owned(), names));
    for d in subdirs {
        walk(&d, out)?;
    }
    Ok(())
}

fn is_image_name(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(_, ext)| IMAGE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()))
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
