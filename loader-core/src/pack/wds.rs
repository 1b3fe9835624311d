//! WebDataset tars as pack input: members grouped into samples by key (the member's
//! path up to the first dot of its file name: `a/000123.jpg` and `a/000123.cls` are
//! sample `a/000123`), one bytes field per extension, named by the extension;
//! extensions named in `parse` hold integer text stored as an i64 scalar.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::DatasetWriter;
use crate::error::{Error, Result};
use crate::format::{DType, Field, Schema};

/// The tars of a WebDataset source, and the fields its first sample gives.
pub struct WebDataset {
    tars: Vec<PathBuf>,
    /// Extensions in field order (sorted).
    names: Vec<String>,
    /// Extensions stored as i64 from integer text.
    parse: Vec<String>,
}

/// One sample's members: extension -> value.
type Sample = BTreeMap<String, Zeroizing<Vec<u8>>>;

impl WebDataset {
    /// `path` is a `.tar` file or a directory of them (read in name order); `parse`
    /// names the extensions holding integer text. Reads the first sample for the schema.
    pub fn open(path: &Path, parse: &[String]) -> Result<Self> {
        let tars = tar_files(path)?;
        let mut names = None;
        for_each_sample(&tars[..1], &mut |_, _, s| {
            names = Some(s.keys().cloned().collect::<Vec<_>>());
            Ok(false)
        })?;
        let names =
            names.ok_or_else(|| Error::Input { path: path.to_owned(), detail: "the tars hold no samples".into() })?;
        if let Some(p) = parse.iter().find(|p| !names.contains(p)) {
            return Err(Error::Input {
                path: tars[0].clone(),
                detail: format!("--parse names {p:?}, which the first sample does not have (it has {names:?})"),
            });
        }
        Ok(Self { tars, names, parse: parse.to_vec() })
    }

    /// One field per extension: bytes, or i64 for the parsed ones.
    pub fn schema(&self) -> Result<Schema> {
        Schema::new(
            self.names
                .iter()
                .map(|n| {
                    if self.parse.contains(n) {
                        Field::tensor(n.clone(), DType::I64, &[])
                    } else {
                        Field::bytes(n.clone())
                    }
                })
                .collect(),
        )
    }

    /// Writes every sample into `w`, calling `progress(samples_done)` now and then;
    /// returns the sample count.
    pub fn write_into(&self, w: &mut DatasetWriter<'_>, progress: &mut dyn FnMut(u64)) -> Result<u64> {
        let mut n = 0u64;
        let mut ints: Zeroizing<Vec<[u8; 8]>> = Zeroizing::new(vec![[0; 8]; self.names.len()]);
        for_each_sample(&self.tars, &mut |tar, key, s| {
            let where_ = || format!("sample {key:?}");
            if !s.keys().eq(self.names.iter()) {
                return Err(Error::Input {
                    path: tar.to_owned(),
                    detail: format!(
                        "{}: has extensions {:?}, the first sample has {:?}",
                        where_(),
                        s.keys().collect::<Vec<_>>(),
                        self.names
                    ),
                });
            }
            for (i, name) in self.names.iter().enumerate() {
                if self.parse.contains(name) {
                    ints[i] = parse_int(&s[name])
                        .ok_or_else(|| Error::Input {
                            path: tar.to_owned(),
                            // The value is plaintext: never put it in an error.
                            detail: format!(
                                "{}: .{name} ({} bytes) is not integer text (--parse {name}=i64); fix the label or \
                                 leave it out of --parse",
                                where_(),
                                s[name].len()
                            ),
                        })?
                        .to_le_bytes();
                }
            }
            let row: Vec<&[u8]> = self
                .names
                .iter()
                .enumerate()
                .map(|(i, name)| if self.parse.contains(name) { &ints[i][..] } else { &s[name][..] })
                .collect();
            w.write_sample(&row)?;
            n += 1;
            if n.is_multiple_of(256) {
                progress(n);
            }
            Ok(true)
        })?;
        progress(n);
        Ok(n)
    }
}

/// Integer text, surrounded by ASCII white space at most.
fn parse_int(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.trim_matches(|c: char| c.is_ascii_whitespace()).parse().ok()
}

/// `path` itself, or the `.tar` files of the directory `path`, sorted.
fn tar_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut tars: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(Error::io("list", path))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_tar_name(p))
        .collect();
    tars.sort();
    if tars.is_empty() {
        return Err(Error::Input { path: path.to_owned(), detail: "no .tar files".into() });
    }
    Ok(tars)
}

/// A `.tar` file name that is not hidden.
pub(super) fn is_tar_name(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".tar") && !n.starts_with('.'))
}

/// Longest member read (one sample's value of one field).
const MAX_MEMBER_BYTES: u64 = 4 << 30;

/// Calls `f(tar, key, sample)` for every sample of `tars` in order, until it returns
/// `false`. Directories, hidden members and names without an extension are skipped;
/// links, devices and other special members, names that are not UTF-8, and two members
/// of one sample with the same extension are errors naming the tar (and sample). No
/// error quotes the tar's bytes: a corrupt tar's "header" may be sample data.
fn for_each_sample(tars: &[PathBuf], f: &mut dyn FnMut(&Path, &str, &Sample) -> Result<bool>) -> Result<()> {
    for tar in tars {
        let bad = |detail: String| Error::Input { path: tar.clone(), detail };
        // The tar crate's own errors can quote header fields (sample bytes, when the
        // tar is corrupt): only where it failed goes into ours.
        let unreadable = |after: usize| {
            bad(format!(
                "not a readable tar file: a corrupt or truncated member header after {after} member(s) (check the file,                  e.g. with `tar tf`)"
            ))
        };
        let file = std::fs::File::open(tar).map_err(Error::io("open", tar))?;
        let tar_len = file.metadata().map_err(Error::io("stat", tar))?.len();
        // Unbuffered: member data goes straight into the sample's zeroize-on-drop
        // buffers, and no read-ahead buffer holds plaintext that is never wiped.
        let mut archive = tar::Archive::new(file);
        let entries = archive.entries().map_err(|_| unreadable(0))?;
        let mut key: Option<String> = None;
        let mut sample = Sample::new();
        for (count, entry) in entries.enumerate() {
            let mut entry = entry.map_err(|_| unreadable(count))?;
            let ty = entry.header().entry_type();
            if ty.is_dir() {
                continue;
            }
            let name = entry.path().map_err(|_| bad(format!("member {count}: its name is not a path")))?.into_owned();
            let Some(name) = name.to_str().map(str::to_owned) else {
                return Err(bad(format!("member {count}: its name is not UTF-8 (WebDataset keys are text)")));
            };
            if !(ty.is_file() || ty.is_contiguous()) {
                return Err(bad(format!(
                    "member {name:?} is a {ty:?} entry: WebDataset members are regular files (re-create the tar \
                     without links or special files)"
                )));
            }
            let name = Path::new(&name);
            let Some(base) = name.file_name().and_then(|b| b.to_str()) else { continue };
            let Some((stem, ext)) = base.split_once('.').filter(|_| !base.starts_with('.')) else { continue };
            let dir = name.parent().and_then(|d| d.to_str()).unwrap_or_default();
            let k = if dir.is_empty() { stem.to_owned() } else { format!("{dir}/{stem}") };
            let ext = ext.to_owned();
            if key.as_deref() != Some(k.as_str()) {
                if let Some(prev) = key.take() {
                    if !f(tar, &prev, &sample)? {
                        return Ok(());
                    }
                }
                key = Some(k.clone());
                sample.clear();
            }
            if sample.contains_key(&ext) {
                return Err(bad(format!("sample {k:?}: two members with extension {ext:?}")));
            }
            // A header may claim more than the tar holds: never more than its remaining bytes.
            let size = entry.size();
            if size > tar_len.saturating_sub(entry.raw_file_position()) || size > MAX_MEMBER_BYTES {
                return Err(bad(format!(
                    "sample {k:?}: member {ext:?} claims {size} bytes, more than the tar holds after it (or over \
                     {MAX_MEMBER_BYTES}): a truncated or corrupt tar"
                )));
            }
            let mut value = Zeroizing::new(Vec::new());
            value
                .try_reserve_exact(size as usize)
                .map_err(|_| bad(format!("sample {k:?}: no memory for member {ext:?} of {size} bytes")))?;
            (&mut entry)
                .take(size)
                .read_to_end(&mut value)
                .map_err(|e| bad(format!("sample {k:?}: member {ext:?} unreadable ({})", e.kind())))?;
            sample.insert(ext, value);
        }
        if let Some(prev) = key {
            if !f(tar, &prev, &sample)? {
                return Ok(());
            }
        }
    }
    Ok(())
}
