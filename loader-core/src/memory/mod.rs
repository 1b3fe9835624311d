//! Memory that holds ciphertext or plaintext. The crate's `unsafe` is confined here,
//! to `codec` (the zstd calls) and to `device/` (CUDA), each block with a `// SAFETY:` line saying why it holds.
//!
//! - [`map_file`]: read-only maps of shard files (ciphertext);
//! - [`LockedBuf`] / [`BatchPool`]: page-locked, never-dumped, zeroize-on-release
//!   buffers that hold plaintext batches (and, through `crypto::chunked::ChunkBuf`,
//!   the scratch chunks of shard open and random access);
//! - [`KeySlot`]: 32 bytes of key material (DEK, KEK, issuer seed) in a process-wide
//!   arena of locked, never-dumped pages, zeroed on drop.

mod pool;
#[cfg_attr(not(feature = "image"), allow(dead_code))]
mod scratch;
mod secret;

pub use pool::{BatchPool, LockedBuf, MemoryPolicy};
pub(crate) use scratch::Arena;
pub use scratch::{installed as scratch_alloc_installed, ScratchAlloc};
pub use secret::KeySlot;

use std::path::Path;

use crate::error::{Error, Result};

/// Grows `buf` for `additional` more bytes without leaving plaintext in a freed
/// allocation: a larger buffer is allocated, filled, and the old one zeroized on drop.
pub(crate) fn reserve_zeroizing(buf: &mut zeroize::Zeroizing<Vec<u8>>, additional: usize) {
    let need = buf.len().saturating_add(additional);
    if need <= buf.capacity() {
        return;
    }
    let mut bigger =
        zeroize::Zeroizing::new(Vec::with_capacity(need.max(buf.capacity().saturating_mul(2)).max(1 << 16)));
    bigger.extend_from_slice(buf);
    std::mem::swap(buf, &mut bigger);
}

/// A read-only memory map of a file.
pub type Mapped = memmap2::Mmap;

/// Maps `path` read-only. An empty file maps to an empty slice. (Pre-faulting with
/// MAP_POPULATE was measured slower: one thread faults a whole shard while workers
/// wait.)
///
/// Everything read through the map is treated as attacker-controlled: it is parsed
/// defensively and authenticated before any plaintext derived from it is released.
pub fn map_file(path: &Path) -> Result<Mapped> {
    let file = std::fs::File::open(path).map_err(Error::io("open", path))?;
    map_opened(&file, path)
}

/// Maps an already opened file read-only (`path` names it in errors). Used for cache
/// files of remote datasets, which are opened before a concurrent eviction could
/// unlink them: the map keeps the pages of an unlinked file.
pub fn map_opened(file: &std::fs::File, path: &Path) -> Result<Mapped> {
    #[allow(unsafe_code)]
    // SAFETY: the map is read-only and its bytes are only ever read as untrusted `u8`
    // data (no references to typed values are formed from it). Another process
    // truncating the file while it is mapped makes later reads fault (SIGBUS) instead
    // of returning data; docs/THREAT-MODEL.md lists this as a denial of service only.
    // Cache files are only ever replaced by rename or unlinked, never truncated in place.
    let map = unsafe { memmap2::MmapOptions::new().map(file) }.map_err(Error::io("mmap", path))?;
    Ok(map)
}

/// CPU seconds (user + system) used by this process so far.
pub fn process_cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    #[allow(unsafe_code)]
    // SAFETY: getrusage fills the struct it is given; it is zero-initialised, so it
    // is valid to read even if the call failed.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// Resident anonymous memory of this process in bytes (`RssAnon`), if readable.
pub fn rss_anon() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The `/proc/self/smaps` entry of the mapping that contains an address (tests: is
/// this memory locked, is it excluded from core dumps).
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct SmapsEntry {
    /// The mapping's header line (printed in assertion messages).
    #[allow(dead_code)]
    pub(crate) header: String,
    /// `Locked:` in kB.
    pub(crate) locked_kb: u64,
    /// The `VmFlags:` two-letter codes.
    pub(crate) flags: Vec<String>,
}

#[cfg(test)]
impl SmapsEntry {
    /// `dd`: MADV_DONTDUMP.
    pub(crate) fn dont_dump(&self) -> bool {
        self.flags.iter().any(|f| f == "dd")
    }
}

#[cfg(test)]
pub(crate) fn smaps_entry(addr: usize) -> Option<SmapsEntry> {
    let s = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut cur: Option<SmapsEntry> = None;
    for line in s.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                if cur.is_some() {
                    break;
                }
                if (a..b).contains(&addr) {
                    cur = Some(SmapsEntry { header: line.to_owned(), locked_kb: 0, flags: Vec::new() });
                }
                continue;
            }
        }
        let Some(e) = cur.as_mut() else { continue };
        if let Some(v) = line.strip_prefix("Locked:") {
            e.locked_kb = v.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("VmFlags:") {
            e.flags = v.split_whitespace().map(str::to_owned).collect();
        }
    }
    cur
}

/// Asserts that the mapping `m` is locked. Memory that could not be locked (`locked`
/// is false) fails the test too, naming RLIMIT_MEMLOCK: a few pages fit any sane
/// limit, and a test that passed on unlocked memory would prove nothing.
#[cfg(test)]
#[track_caller]
pub(crate) fn assert_locked(m: &SmapsEntry, locked: bool) {
    let (soft, hard) = pool::memlock_limit();
    assert!(
        locked,
        "mlock failed (RLIMIT_MEMLOCK soft {soft} B, hard {hard} B): this test needs a few locked pages; \
         raise the limit (ulimit -l) to run it"
    );
    assert!(m.locked_kb > 0 && m.flags.iter().any(|f| f == "lo"), "mapping is not locked: {m:?}");
}
