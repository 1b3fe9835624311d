//! Whole-shard downloads into the cache: one process per shard at a time, to a
//! temporary name, checked against the signed manifest's size and SHA-256, and only
//! then renamed to the name that says "complete".

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::GetOptions;

use super::cache::is_disk_full;
use super::prefetch::{cache_error, evict_released, Fetcher, Object};
use super::store::Failure;
use crate::crypto::Sha256;
use crate::error::{Error, RemoteFailure, Result};

/// Downloads shard `i` into the cache: one process per shard at a time (file lock),
/// to a temporary name, checked against the manifest's size and SHA-256, then renamed.
/// Transient failures are retried with backoff until the per-object timeout.
pub(super) async fn download(inner: &Fetcher, i: u32) -> Result<()> {
    let o = &inner.objects[i as usize];
    let b = &inner.bucket;
    let start = Instant::now();
    let final_path = inner.cache.complete(&o.sha256);
    let partial = inner.cache.partial(&o.sha256);
    let lock_path = inner.cache.lock(&o.sha256);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(|e| cache_error(inner, "create", &lock_path, e, i))?;
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {
                if start.elapsed() > b.timeout {
                    return Err(Error::Remote {
                        url: o.url.clone(),
                        shard: Some(i),
                        kind: RemoteFailure::Unavailable,
                        detail: format!(
                            "another process held the download lock {} for {:?}",
                            lock_path.display(),
                            b.timeout
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(cache_error(inner, "lock", &lock_path, e, i)),
        }
    }
    // Another process (a rank, an earlier run) may have left it under the final name:
    // used only if its SHA-256 is the signed one. Hashing blocks, so not on the runtime.
    if inner.cache.has_complete(&o.sha256, o.size) {
        let (cache, sha, size) = (inner.cache.clone(), o.sha256.clone(), o.size);
        if tokio::task::spawn_blocking(move || cache.verify_complete(&sha, size)).await.unwrap_or(false) {
            return Ok(());
        }
    }
    // A replaced object may be mid-upload: look again a few times. A full disk is
    // worth another try once shards the plan is done with were evicted.
    let mismatches = AtomicU32::new(0);
    let got = b
        .with_retries(&o.url, Some(i), || async {
            match get_once(inner, o, &partial).await {
                Err(Failure::Permanent(RemoteFailure::Modified, detail))
                    if mismatches.fetch_add(1, Ordering::Relaxed) < 2 =>
                {
                    Err(Failure::Transient(detail))
                }
                Err(Failure::Permanent(RemoteFailure::CacheFull, detail)) if evict_released(inner) => {
                    Err(Failure::Transient(detail))
                }
                r => r,
            }
        })
        .await;
    match got {
        Ok(()) => std::fs::rename(&partial, &final_path).map_err(|e| cache_error(inner, "rename", &partial, e, i)),
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(e)
        }
    }
}

/// Sends one GET of `o` and checks that the object has the size the signed manifest
/// gives; the body is left to the caller.
pub(super) async fn start_get(
    inner: &Fetcher,
    o: &Object,
    opts: GetOptions,
) -> std::result::Result<object_store::GetResult, Failure> {
    let b = &inner.bucket;
    let got = tokio::time::timeout(b.stall, b.store.get_opts(&b.key(&o.name), opts))
        .await
        .map_err(|_| Failure::Transient(format!("no response within {:?}", b.stall)))?
        .map_err(|e| b.classify(e))?;
    if got.meta.size != o.size {
        return Err(Failure::Permanent(
            RemoteFailure::Modified,
            format!("object has {} bytes, the signed manifest says {}", got.meta.size, o.size),
        ));
    }
    Ok(got)
}

/// One GET of the whole object into `partial`, hashing as it goes.
async fn get_once(inner: &Fetcher, o: &Object, partial: &std::path::Path) -> std::result::Result<(), Failure> {
    let b = &inner.bucket;
    let got = start_get(inner, o, GetOptions::default()).await?;
    let io = |op: &str, e: std::io::Error| {
        if is_disk_full(&e) {
            Failure::Permanent(RemoteFailure::CacheFull, format!("{op} {}: {e}", partial.display()))
        } else {
            Failure::Permanent(RemoteFailure::Config, format!("cache {op} {}: {e}", partial.display()))
        }
    };
    // Created afresh, never through a name planted in the directory: a symbolic link at
    // `partial` is removed, not followed (the download lock is held: no one else
    // writes this name).
    let _ = std::fs::remove_file(partial);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(partial)
        .map_err(|e| io("create", e))?;
    let mut h = Sha256::default();
    let mut n = 0u64;
    let mut s = got.into_stream();
    loop {
        match tokio::time::timeout(b.stall, s.next()).await {
            Err(_) => return Err(Failure::Transient(format!("no data for {:?} after {n} bytes", b.stall))),
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(match b.classify(e) {
                    Failure::Transient(d) => Failure::Transient(format!("after {n} bytes: {d}")),
                    p => p,
                })
            }
            Ok(Some(Ok(bytes))) => {
                inner.received.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                n += bytes.len() as u64;
                if n > o.size {
                    return Err(Failure::Permanent(
                        RemoteFailure::Modified,
                        "object longer than the signed manifest says".into(),
                    ));
                }
                h.update(&bytes);
                f.write_all(&bytes).map_err(|e| io("write", e))?;
            }
        }
    }
    if n != o.size {
        return Err(Failure::Transient(format!("body ended after {n} of {} bytes", o.size)));
    }
    if hex::encode(h.finish()) != o.sha256 {
        return Err(Failure::Permanent(
            RemoteFailure::Modified,
            "SHA-256 of the object differs from the signed manifest".into(),
        ));
    }
    // Durable before it gets the name that says "complete".
    f.sync_data().map_err(|e| io("sync", e))?;
    Ok(())
}
