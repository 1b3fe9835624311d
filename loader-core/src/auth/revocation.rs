//! The deny list: a text file of revocation ids (hex, one per line, `#` comments),
//! re-read whenever its size, mtime, ctime or inode changes (`crate::watch`, the same
//! mechanism as the key service's trust anchors), so a revocation takes effect at the
//! next shard open of a running job. Ids are only ever added while a process runs; a
//! malformed line or a group/world-writable file fails closed.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::watch::{Document, OnError, Watched};

/// The revocation ids of a deny list.
pub(crate) struct Ids(HashSet<String>);

impl Document for Ids {
    const WHAT: &'static str = "deny list";
    const READ: &'static str = "read deny list";
    const MAX_LEN: u64 = 16 << 20;
    const WRITABLE_RISK: &'static str = "anyone could un-revoke a token";

    fn parse(bytes: &[u8], origin: &Path) -> Result<Self> {
        let bad = |detail: String| Error::Format { what: Self::WHAT, path: origin.to_owned(), detail };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))?;
        let mut ids = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let id = line.split('#').next().unwrap_or("").trim();
            if id.is_empty() {
                continue;
            }
            if id.len() != 128 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("line {}: not a revocation id (128 hex digits)", n + 1)));
            }
            ids.insert(id.to_ascii_lowercase());
        }
        Ok(Self(ids))
    }

    /// Monotonic: an id once seen stays revoked for the life of the process, even if
    /// the list is rewritten in place and read half-written.
    fn merge(old: &Self, mut new: Self) -> Self {
        new.0.extend(old.0.iter().cloned());
        new
    }

    fn entries(&self) -> usize {
        self.0.len()
    }
}

/// A deny list file (or, in a key service, a URL).
pub struct DenyList {
    ids: Watched<Ids>,
}

impl DenyList {
    /// Opens and reads `path`. A configured list that does not exist is an error:
    /// a reader must not silently run without the revocations it was told to honour.
    /// Later, a list that cannot be read or parsed fails every check until it can.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self { ids: Watched::file(path, OnError::FailClosed, None)? })
    }

    /// A key service's list: a file (failing closed, as [`DenyList::open`]'s) or a URL
    /// (a failed fetch keeps the last good copy), with changes reported.
    #[cfg(feature = "keyd")]
    pub(crate) fn open_source(
        source: &crate::watch::Source,
        ca: Option<&Path>,
        report: Option<crate::watch::Reporter>,
    ) -> Result<Self> {
        Ok(Self { ids: Watched::open(source, OnError::FailClosed, ca, report)? })
    }

    /// The file (for a list fetched from a URL, the URL without user info or query).
    pub fn path(&self) -> &Path {
        self.ids.name()
    }

    /// Revocation ids on the list now (after re-reading the file if it changed).
    #[cfg(feature = "keyd")]
    pub(crate) fn entries(&self) -> Result<usize> {
        Ok(self.ids.current()?.entries())
    }

    /// Checks a URL list's server for a new copy now (a file is checked at each use).
    #[cfg(feature = "keyd")]
    pub(crate) fn poll(&self) {
        self.ids.poll();
    }

    /// The first of `ids` on the list, after re-reading the file if it changed.
    pub fn find_any(&self, ids: &[String]) -> Result<Option<String>> {
        let list = self.ids.current()?;
        Ok(ids.iter().find(|id| list.0.contains(id.as_str())).cloned())
    }

    /// Appends `id` (with a comment) to the deny list at `path`, creating it.
    pub fn append(path: &Path, id: &str, comment: &str) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(path)
            .map_err(Error::io("open deny list", path))?;
        let comment: String = comment.chars().filter(|c| !c.is_control()).collect();
        // One write under an exclusive lock, so concurrent revokes never interleave.
        let line = format!("{id} # {comment}\n");
        f.lock().map_err(Error::io("lock deny list", path))?;
        let r = f.write_all(line.as_bytes()).and_then(|_| f.sync_all()).map_err(Error::io("write deny list", path));
        let _ = f.unlock();
        r
    }
}
