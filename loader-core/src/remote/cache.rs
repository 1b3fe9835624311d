//! The local cache directory of remote shards: what its names mean, how it is created,
//! and which I/O errors mean it is full.
//!
//! Cache layout (one flat directory, shared by every process and dataset that uses it):
//!
//! | name | what |
//! | --- | --- |
//! | `<sha256>.slk` | a complete shard file whose size and SHA-256 matched a signed manifest |
//! | `<sha256>.partial` | a download in progress (only the holder of the lock writes it) |
//! | `<sha256>.lock` | `flock`ed by the process downloading that shard |
//!
//! Files are named by their SHA-256 from the signed manifest, so a name can only ever
//! hold those exact bytes: a replaced object fails the digest and never gets the
//! name, and two datasets or ranks that share a shard share its file. Everything in
//! the directory is ciphertext exactly as stored in the bucket.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The cache directory and the names of one shard's files in it.
#[derive(Clone)]
pub(super) struct CacheDir {
    dir: PathBuf,
}

impl CacheDir {
    /// Opens (creating it if needed, mode 0700) the cache directory `dir`. An existing
    /// directory must belong to this user and be closed to group and others: anyone who
    /// can write in it could plant files under the names this cache trusts.
    pub(super) fn open(dir: PathBuf) -> Result<Self> {
        create_cache_dir(&dir)?;
        // Resolved once: a symbolic link on the way that is re-pointed later does not
        // move this cache to a directory that was never checked.
        let dir = std::fs::canonicalize(&dir).map_err(Error::io("resolve", &dir))?;
        check_private(&dir)?;
        Ok(Self { dir })
    }

    /// True if the file under the final name is a regular file (not a link) of `size`
    /// bytes whose SHA-256 is `sha256`. A file that is a link, not a regular file, or
    /// holds other bytes is removed (the name is this cache's, and what it holds is not
    /// what the name says); one that merely cannot be read now is left alone.
    pub(super) fn verify_complete(&self, sha256: &str, size: u64) -> bool {
        let path = self.complete(sha256);
        let f = match crate::fs::open_regular(&path, false, "cache file") {
            Ok(f) => f,
            Err(Error::Input { .. }) => {
                let _ = std::fs::remove_file(&path);
                return false;
            }
            Err(_) => return false,
        };
        let mut h = crate::crypto::Sha256::default();
        let mut r = std::io::BufReader::with_capacity(1 << 20, f);
        let mut n = 0u64;
        let matches = loop {
            match std::io::BufRead::fill_buf(&mut r) {
                Ok([]) => break n == size && hex::encode(h.finish()) == sha256,
                Ok(b) => {
                    let len = b.len();
                    h.update(b);
                    n += len as u64;
                    std::io::BufRead::consume(&mut r, len);
                }
                Err(_) => return false,
            }
        };
        if !matches {
            let _ = std::fs::remove_file(&path);
        }
        matches
    }

    /// The directory.
    pub(super) fn path(&self) -> &Path {
        &self.dir
    }

    /// The final name of the shard file with this SHA-256: complete and verified.
    pub(super) fn complete(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.slk"))
    }

    /// The name a download of it is written to until it is verified.
    pub(super) fn partial(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.partial"))
    }

    /// The lock file of its download.
    pub(super) fn lock(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.lock"))
    }

    /// True if a complete file of `size` bytes is under the final name.
    pub(super) fn has_complete(&self, sha256: &str, size: u64) -> bool {
        std::fs::metadata(self.complete(sha256)).is_ok_and(|m| m.len() == size)
    }
}

/// Creates the cache directory (mode 0700: it holds only ciphertext, but other users
/// have no business filling or pruning it).
fn create_cache_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(Error::io("create", dir))
}

/// Refuses a cache directory another user owns or may write to.
fn check_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(dir).map_err(Error::io("stat", dir))?;
    let mode = meta.permissions().mode() & 0o777;
    let me = crate::fs::effective_uid();
    if meta.uid() != me || mode & 0o077 != 0 {
        return Err(Error::Input {
            path: dir.to_owned(),
            detail: format!(
                "the s3 cache directory is owned by uid {} with mode {mode:03o}; it must be yours (uid {me}) and \
                 closed to group and others, since whoever can write in it can plant shard files: run \
                 `chmod 700 {}` as its owner, or choose another cache_dir",
                meta.uid(),
                dir.display()
            ),
        });
    }
    Ok(())
}

/// True for the errors of a full disk or an exhausted quota.
pub(super) fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded)
        || e.raw_os_error() == Some(libc::ENOSPC)
        || e.raw_os_error() == Some(libc::EDQUOT)
}
