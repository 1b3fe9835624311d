//! The deny list: a text file of revocation ids (hex, one per line, `#` comments),
//! re-read whenever its size, mtime or inode changes, so a revocation takes effect
//! at the next shard open of a running job. Ids are only ever added while a process
//! runs; a malformed line or a group/world-writable file fails closed.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

type Stamp = (i64, i64, u64, u64, i64, i64);

/// A deny list file.
pub struct DenyList {
    path: PathBuf,
    state: Mutex<(Option<Stamp>, HashSet<String>)>,
}

impl DenyList {
    /// Opens and reads `path`. A configured list that does not exist is an error:
    /// a reader must not silently run without the revocations it was told to honour.
    pub fn open(path: &Path) -> Result<Self> {
        let list = Self { path: path.to_owned(), state: Mutex::new((None, HashSet::new())) };
        list.refresh()?;
        Ok(list)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn refresh(&self) -> Result<()> {
        let bad = |detail: String| Error::Format { what: "deny list", path: self.path.clone(), detail };
        let meta = std::fs::metadata(&self.path).map_err(Error::io("read deny list", &self.path))?;
        if meta.mode() & 0o022 != 0 {
            return Err(bad(format!(
                "writable by group or others (mode {:o}); anyone could un-revoke a token: chmod 644",
                meta.mode() & 0o777
            )));
        }
        if meta.len() > 16 << 20 {
            return Err(bad("larger than 16 MiB".into()));
        }
        let stamp = (meta.mtime(), meta.mtime_nsec(), meta.len(), meta.ino(), meta.ctime(), meta.ctime_nsec());
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0 == Some(stamp) {
            return Ok(());
        }
        let text = std::fs::read_to_string(&self.path).map_err(Error::io("read deny list", &self.path))?;
        for (n, line) in text.lines().enumerate() {
            let id = line.split('#').next().unwrap_or("").trim();
            if id.is_empty() {
                continue;
            }
            if id.len() != 128 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("line {}: not a revocation id (128 hex digits)", n + 1)));
            }
            // Monotonic: an id once seen stays revoked for the life of the process,
            // even if the file is rewritten in place and read half-written.
            st.1.insert(id.to_ascii_lowercase());
        }
        st.0 = Some(stamp);
        Ok(())
    }

    /// The first of `ids` on the list, after re-reading the file if it changed.
    pub fn find_any(&self, ids: &[String]) -> Result<Option<String>> {
        self.refresh()?;
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(ids.iter().find(|id| st.1.contains(id.as_str())).cloned())
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
