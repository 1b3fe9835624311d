//! `upload`: copy a packed dataset directory to object storage.

use std::path::Path;

use crate::error::Result;
use crate::format::manifest;
use crate::remote::RemoteOptions;

/// Uploads a packed dataset directory (every shard the manifest lists, then the
/// manifest last, so a reader never sees a manifest whose shards are not there yet) to
/// `dest` (`s3://bucket/prefix`; needs the `s3` feature). Returns the bytes uploaded.
/// Nothing is decrypted: the objects are the ciphertext files as they are.
pub fn upload_dir(dir: &Path, dest: &str, opts: &RemoteOptions) -> Result<u64> {
    let insp = crate::dataset::inspect(dir, None)?;
    let mut names: Vec<String> = insp.manifest.shards.iter().map(|s| s.file.clone()).collect();
    names.push(manifest::FILE_NAME.to_owned());
    crate::remote::put_files(dir, &names, dest, opts)
}
