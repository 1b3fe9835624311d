//! Reading `.npy` files (NumPy format versions 1-3, C order, little-endian).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::DType;
use crate::memory::{map_file, Mapped};

/// A memory-mapped `.npy` array.
pub struct NpyArray {
    path: PathBuf,
    map: Mapped,
    data_start: usize,
    /// Element type.
    pub dtype: DType,
    /// Full shape; `shape[0]` is the sample count.
    pub shape: Vec<u64>,
}

impl NpyArray {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let bad = |detail: String| Error::Input { path: path.to_owned(), detail };
        if map.len() < 10 || &map[..6] != b"\x93NUMPY" {
            return Err(bad("not a .npy file (bad magic)".into()));
        }
        let (hlen, hstart): (usize, usize) = match map[6] {
            1 => (u16::from_le_bytes([map[8], map[9]]) as usize, 10),
            2 | 3 if map.len() >= 12 => (u32::from_le_bytes([map[8], map[9], map[10], map[11]]) as usize, 12),
            v => return Err(bad(format!("unsupported .npy version {v}"))),
        };
        let header = map.get(hstart..hstart.saturating_add(hlen)).ok_or_else(|| bad("truncated .npy header".into()))?;
        let header = std::str::from_utf8(header).map_err(|_| bad(".npy header is not text".into()))?;
        let descr = dict_value(header, "descr").ok_or_else(|| bad("no 'descr' in .npy header".into()))?;
        let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
        let dtype = match descr {
            "|u1" | "<u1" | "u1" => DType::U8,
            "|i1" | "<i1" | "i1" => DType::I8,
            "<i2" => DType::I16,
            "<u2" => DType::U16,
            "<i4" => DType::I32,
            "<u4" => DType::U32,
            "<i8" => DType::I64,
            "<u8" => DType::U64,
            "<f2" => DType::F16,
            "<f4" => DType::F32,
            "<f8" => DType::F64,
            "|b1" | "b1" => DType::Bool,
            other => {
                return Err(bad(format!(
                    "unsupported dtype {other:?}; supported: little-endian u1 i1 i2 u2 i4 u4 i8 u8 f2 f4 f8, b1 (convert with arr.astype(...))"
                )))
            }
        };
        let fortran =
            dict_value(header, "fortran_order").ok_or_else(|| bad("no 'fortran_order' in .npy header".into()))?;
        if fortran.trim() != "False" {
            return Err(bad("Fortran-ordered array; save a C-contiguous copy (np.ascontiguousarray)".into()));
        }
        let shape_s = dict_value(header, "shape").ok_or_else(|| bad("no 'shape' in .npy header".into()))?;
        let shape: Vec<u64> = shape_s
            .trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('L').parse::<u64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("bad shape {shape_s:?}")))?;
        if shape.is_empty() {
            return Err(bad("a 0-d array has no samples; the first axis is the sample axis".into()));
        }
        let data_start = hstart + hlen;
        let need = shape
            .iter()
            .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("shape overflows".into()))?;
        if (map.len() - data_start.min(map.len())) as u64 != need {
            return Err(bad(format!(
                "data is {} bytes, shape {shape:?} of {} needs {need}",
                map.len().saturating_sub(data_start),
                dtype.name()
            )));
        }
        Ok(Self { path: path.to_owned(), map, data_start, dtype, shape })
    }

    /// Number of samples (first axis).
    pub fn len(&self) -> u64 {
        self.shape[0]
    }

    /// True if the first axis is empty.
    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }

    /// Bytes of one sample.
    pub fn row_bytes(&self) -> usize {
        self.shape[1..].iter().product::<u64>() as usize * self.dtype.size()
    }

    /// The bytes of sample `i`.
    pub fn row(&self, i: u64) -> &[u8] {
        let n = self.row_bytes();
        let start = self.data_start + i as usize * n;
        &self.map[start..start + n]
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Extracts the value text of `key` from a Python dict literal header.
fn dict_value<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let k1 = format!("'{key}'");
    let at = header.find(&k1)? + k1.len();
    let rest = header[at..].trim_start().strip_prefix(':')?;
    let rest = rest.trim_start();
    let end = if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}']).unwrap_or(rest.len()) };
    Some(&rest[..end])
}
