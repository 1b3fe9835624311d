//! Throughput measurement shared by `shardlock bench` and the Python binding.

use std::time::Instant;

use serde::Serialize;

use crate::error::Result;
use crate::memory::{process_cpu_seconds, rss_anon};
use crate::pipeline::BatchStream;

/// Numbers of one epoch.
#[derive(Clone, Debug, Serialize)]
pub struct EpochReport {
    /// Epoch number.
    pub epoch: u64,
    /// Batches yielded.
    pub batches: u64,
    /// Samples yielded.
    pub samples: u64,
    /// Plaintext bytes of the selected fields delivered into batches.
    pub bytes: u64,
    /// Wall time in seconds, first request to last batch.
    pub seconds: f64,
    /// Plaintext GB/s (10^9 bytes per second).
    pub gb_per_s: f64,
    /// Samples per second.
    pub samples_per_s: f64,
    /// Time to the first batch, milliseconds.
    pub first_batch_ms: f64,
    /// Median wait for a batch, milliseconds.
    pub p50_batch_ms: f64,
    /// 99th percentile wait for a batch, milliseconds.
    pub p99_batch_ms: f64,
    /// CPU seconds / wall seconds (2.0 = two cores busy).
    pub cpu_utilisation: f64,
    /// Bytes received from object storage during the epoch (whole-shard downloads and
    /// ranged reads, retries included); 0 for a local dataset.
    pub remote_bytes: u64,
}

/// Numbers of a whole run.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Per epoch.
    pub epochs: Vec<EpochReport>,
    /// Peak RssAnon seen between batches, bytes.
    pub peak_rss_anon: u64,
    /// RssAnon before the first epoch, bytes.
    pub baseline_rss_anon: u64,
    /// Batch buffers allocated over the run.
    pub buffers_allocated: usize,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// What [`run`] streams: any [`BatchStream`] (the [`crate::Loader`], or the device
/// stage), as a trait object, so the stream can be chosen at run time
/// (`Box<dyn Source>`) although the two have different batch types. Implemented for
/// every [`BatchStream`]; there is nothing to implement by hand.
pub trait Source {
    /// The epoch the next batch belongs to.
    fn epoch(&self) -> u64;
    /// The next batch as `(samples, bytes of the selected fields)`, once it is
    /// delivered ([`BatchStream::wait_ready`]: in host memory; on the device, after
    /// its copy completed); `None` at the end of the epoch.
    fn next_delivered(&mut self) -> Option<Result<(u64, u64)>>;
    /// Batch buffers allocated so far.
    fn buffers_allocated(&self) -> usize;
    /// Bytes received from object storage so far ([`crate::Dataset::remote_bytes`]).
    fn remote_bytes(&self) -> u64;
}

impl<S: BatchStream> Source for S {
    fn epoch(&self) -> u64 {
        BatchStream::epoch(self)
    }

    fn next_delivered(&mut self) -> Option<Result<(u64, u64)>> {
        let b = match self.next()? {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = self.wait_ready(&b) {
            return Some(Err(e));
        }
        Some(Ok((b.len() as u64, b.fields().iter().map(|f| f.len as u64).sum())))
    }

    fn buffers_allocated(&self) -> usize {
        BatchStream::buffers_allocated(self)
    }

    fn remote_bytes(&self) -> u64 {
        self.loader().dataset().remote_bytes()
    }
}

/// Streams `epochs` epochs, touching nothing but the batch metadata, and reports.
/// `progress(epoch, batches_done)` is called after every batch.
pub fn run(loader: &mut dyn Source, epochs: u64, progress: &mut dyn FnMut(u64, u64)) -> Result<BenchReport> {
    let baseline = rss_anon().unwrap_or(0);
    let mut peak = baseline;
    let mut reports = Vec::new();
    for _ in 0..epochs {
        let epoch = loader.epoch();
        let (t0, c0, r0) = (Instant::now(), process_cpu_seconds(), loader.remote_bytes());
        let mut last = t0;
        let mut waits = Vec::new();
        let (mut batches, mut samples, mut bytes) = (0u64, 0u64, 0u64);
        while let Some(b) = loader.next_delivered() {
            let (n, size) = b?;
            let now = Instant::now();
            waits.push((now - last).as_secs_f64() * 1e3);
            last = now;
            batches += 1;
            samples += n;
            bytes += size;
            if batches % 8 == 0 {
                peak = peak.max(rss_anon().unwrap_or(0));
            }
            progress(epoch, batches);
        }
        let secs = t0.elapsed().as_secs_f64().max(1e-9);
        let cpu = process_cpu_seconds() - c0;
        let first = waits.first().copied().unwrap_or(0.0);
        waits.sort_by(|a, b| a.total_cmp(b));
        peak = peak.max(rss_anon().unwrap_or(0));
        reports.push(EpochReport {
            epoch,
            batches,
            samples,
            bytes,
            seconds: secs,
            gb_per_s: bytes as f64 / secs / 1e9,
            samples_per_s: samples as f64 / secs,
            first_batch_ms: first,
            p50_batch_ms: percentile(&waits, 0.5),
            p99_batch_ms: percentile(&waits, 0.99),
            cpu_utilisation: cpu / secs,
            remote_bytes: loader.remote_bytes().saturating_sub(r0),
        });
    }
    Ok(BenchReport {
        epochs: reports,
        peak_rss_anon: peak,
        baseline_rss_anon: baseline,
        buffers_allocated: loader.buffers_allocated(),
    })
}

/// The machine's ceiling for the loader: AES-256-GCM decryption alone (the crate's
/// aws-lc-rs backend) of `bytes` of 16 KiB chunks from a page-cached file through
/// mmap, into a reused 4 MiB buffer per thread, on `threads` threads, best of `rounds`.
/// No pipeline, no batches: what the loader's decryption would reach if nothing else
/// cost anything. GB/s (10^9 bytes of plaintext per second).
pub fn aes_gcm_ceiling(threads: usize, bytes: usize, rounds: usize) -> Result<f64> {
    use crate::crypto::aead::Backend;
    use crate::crypto::chunked::{CHUNK_LEN, ENC_CHUNK_LEN};
    let nonce = |i: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_be_bytes());
        n
    };
    let key = Backend::AwsLcRs.key(&[1u8; 32]);
    let chunks = (bytes / CHUNK_LEN).max(1);
    let mut ct = vec![7u8; chunks * ENC_CHUNK_LEN];
    for (i, c) in ct.chunks_mut(ENC_CHUNK_LEN).enumerate() {
        let tag = key
            .seal_in_place(&nonce(i as u64), &[], &mut c[..CHUNK_LEN])
            .map_err(|_| crate::error::Error::Internal("AES-256-GCM seal failed".into()))?;
        c[CHUNK_LEN..].copy_from_slice(&tag);
    }
    let dir = std::env::temp_dir().join(format!("shardlock-ceiling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(crate::error::Error::io("create", &dir))?;
    let path = dir.join("ct.bin");
    let written = std::fs::write(&path, &ct).map_err(crate::error::Error::io("write", &path));
    drop(ct);
    let result = written.and_then(|()| {
        let map = crate::memory::map_file(&path)?;
        let map = &map[..];
        let threads = threads.max(1);
        let mut best = 0f64;
        for _ in 0..rounds.max(1) {
            let t = Instant::now();
            let failed = std::sync::atomic::AtomicBool::new(false);
            std::thread::scope(|s| {
                for th in 0..threads {
                    let (key, failed) = (&key, &failed);
                    s.spawn(move || {
                        let mut out = vec![0u8; 4 << 20];
                        for (i, c) in map.chunks(ENC_CHUNK_LEN).enumerate().filter(|(i, _)| i % threads == th) {
                            let pos = (i * CHUNK_LEN) % out.len();
                            let r = key.open_to(
                                &nonce(i as u64),
                                &[],
                                &c[..CHUNK_LEN],
                                &c[CHUNK_LEN..],
                                &mut out[pos..pos + CHUNK_LEN],
                            );
                            if r.is_err() {
                                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            if failed.into_inner() {
                return Err(crate::error::Error::Internal("the ceiling's own chunks did not authenticate".into()));
            }
            best = best.max((chunks * CHUNK_LEN) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        Ok(best)
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}
