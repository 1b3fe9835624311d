//! `shardlock upload`: a packed dataset directory to `s3://bucket/prefix`.

use shardlock::Error;

use crate::cli::UploadArgs;

pub(crate) fn upload_cmd(a: UploadArgs) -> Result<(), Error> {
    let trust = shardlock::TrustAnchor::load(&a.trust)?;
    let n = shardlock::upload_dir(&a.dir, &a.dest, &trust, &a.store.options()?)?;
    if a.json {
        crate::output::print_json(&serde_json::json!({"dir": a.dir, "dest": a.dest, "bytes": n}));
    } else {
        println!("uploaded {} ({}, ciphertext as packed) to {}", a.dir.display(), crate::output::bytes(n), a.dest);
    }
    Ok(())
}
