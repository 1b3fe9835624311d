//! Files that must not be seen half-written or by other users: secret files read
//! with a permission check, new files created exclusively, atomic replacement.

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
