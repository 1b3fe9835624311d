//! `shardlock upload`: a packed dataset directory to `s3://bucket/prefix`.

use shardlock::Error;

use crate::cli::UploadArgs;

pub(crate) fn upload_cmd(a: UploadArgs) -> Result<(), Error> {
    let trust = shardlock::TrustAnchor::load(&a.trust)?;
    let n = shardlock::upload_dir(&a.dir, &a.dest, &trust, &a.remote.options()?)?;
    println!("uploaded {} ({:.1} MB, ciphertext as packed) to {}", a.dir.display(), n as f64 / 1e6, a.dest);
    Ok(())
}
