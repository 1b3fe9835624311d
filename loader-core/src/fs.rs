//! Files that must not be seen half-written or by other users, or that a hostile
//! directory may have replaced: secret files read with a permission check, new files
//! created exclusively, atomic replacement, and data files opened only if they are
//! regular files (never blocking on a FIFO) and read within a size limit.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Reads a secret file, refusing it if group or others can read or write it.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    // Check and read through one handle, so the file cannot be swapped in between.
    let mut f = std::fs::File::open(path).map_err(Error::io("open", path))?;
    let meta = f.metadata().map_err(Error::io("stat", path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::InsecurePermissions { path: path.to_owned(), mode });
    }
    if !meta.is_file() || meta.len() > 1 << 20 {
        return Err(Error::Format {
            what: "secret file",
            path: path.to_owned(),
            detail: "not a regular file of at most 1 MiB".into(),
        });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(meta.len() as usize + 1));
    std::io::Read::read_to_end(&mut f, &mut buf).map_err(Error::io("read", path))?;
    Ok(buf)
}

/// Opens `path` for reading only if it is a regular file: opened non-blocking (a FIFO
/// or device put in its place cannot hang the reader), checked through the handle.
/// With `follow_links` false a symbolic link is refused too (`O_NOFOLLOW`). `what`
/// names the file in errors ("shard", "manifest").
pub(crate) fn open_regular(path: &Path, follow_links: bool, what: &'static str) -> Result<std::fs::File> {
    let mut flags = libc::O_NONBLOCK;
    if !follow_links {
        flags |= libc::O_NOFOLLOW;
    }
    let f = std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            Error::Input {
                path: path.to_owned(),
                detail: format!("the {what} is a symbolic link; refusing to follow it"),
            }
        } else {
            Error::io_at("open", path, e)
        }
    })?;
    let meta = f.metadata().map_err(Error::io("stat", path))?;
    if !meta.is_file() {
        return Err(Error::Input { path: path.to_owned(), detail: format!("the {what} is not a regular file") });
    }
    // Reads block again from here on (a network or FUSE filesystem may honour the flag).
    clear_nonblocking(&f).map_err(Error::io("fcntl", path))?;
    Ok(f)
}

/// Reads a regular file (see [`open_regular`]) of at most `limit` bytes; a larger one
/// is an [`Error::Input`] and is not read.
pub(crate) fn read_bounded(path: &Path, limit: u64, what: &'static str) -> Result<Vec<u8>> {
    let f = open_regular(path, true, what)?;
    let len = f.metadata().map_err(Error::io("stat", path))?.len();
    let too_big = || Error::Input { path: path.to_owned(), detail: format!("the {what} is larger than {limit} bytes") };
    if len > limit {
        return Err(too_big());
    }
    let mut buf = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(f, limit + 1), &mut buf).map_err(Error::io("read", path))?;
    if buf.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(buf)
}

fn clear_nonblocking(f: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    #[allow(unsafe_code)]
    // SAFETY: `fd` is an open descriptor owned by `f` for the whole call; F_GETFL and
    // F_SETFL read and set its status flags and touch no memory of ours.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The effective user id of this process (the s3 cache checks its directory's owner).
#[cfg(feature = "s3")]
pub(crate) fn effective_uid() -> u32 {
    #[allow(unsafe_code)]
    // SAFETY: geteuid(2) takes no arguments, touches no memory of ours and cannot fail.
    unsafe {
        libc::geteuid()
    }
}

/// Creates `path` with `mode`, failing if it exists, writes `data` and syncs.
pub fn write_new_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::InvalidArgument(format!("{} already exists; refusing to overwrite a key file", path.display()))
        } else {
            Error::io_at("create", path, e)
        }
    })?;
    f.write_all(data).and_then(|_| f.sync_all()).map_err(Error::io("write", path))
}

/// Writes `data` to `path` atomically: a temporary file in the same directory,
/// synced, then renamed over `path`.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    write_new_file(&tmp, data, mode)?;
    std::fs::rename(&tmp, path).map_err(Error::io("rename", path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A private (0700) directory under the system's temporary directory, removed with
/// everything in it on drop: the staging of parts sent to, and assembled from, object
/// storage (ciphertext only).
pub(crate) struct TempDir(pub(crate) std::path::PathBuf);

impl TempDir {
    pub(crate) fn new(what: &str) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("shardlock-{what}-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(Error::io("create directory", &dir))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
