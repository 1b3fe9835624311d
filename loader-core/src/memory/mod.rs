//! Memory that holds ciphertext or plaintext. The crate's `unsafe` is confined here
//! (and, later, to `device/`), each block with the reason it holds.
//!
//! - [`map_file`]: read-only maps of shard files (ciphertext);
//! - [`LockedBuf`] / [`BatchPool`]: page-locked, never-dumped, zeroize-on-release
//!   buffers that hold plaintext batches.

mod pool;

pub use pool::{BatchPool, LockedBuf, MemoryPolicy};

use std::path::Path;

use crate::error::{Error, Result};

/// A read-only memory map of a file.
pub type Mapped = memmap2::Mmap;

/// Maps `path` read-only. An empty file maps to an empty slice.
///
/// Everything read through the map is treated as attacker-controlled: it is parsed
/// defensively and authenticated before any plaintext derived from it is released.
pub fn map_file(path: &Path) -> Result<Mapped> {
    let file = std::fs::File::open(path).map_err(Error::io("open", path))?;
    #[allow(unsafe_code)]
    // SAFETY: the map is read-only and its bytes are only ever read as untrusted `u8`
    // data (no references to typed values are formed from it). Another process
    // truncating the file while it is mapped makes later reads fault (SIGBUS) instead
    // of returning data; docs/THREAT-MODEL.md lists this as a denial of service only.
    let map = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(Error::io("mmap", path))?;
    Ok(map)
}
