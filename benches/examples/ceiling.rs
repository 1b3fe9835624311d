//! The machine's ceiling for the loader: raw AES-256-GCM decryption (the crate's aws-lc-rs
//! backend) of a page-cached file through mmap, 16 KiB chunks, into a reused 4 MiB buffer
//! per thread, on 1 and 2 threads, best of 5. No pipeline, no batches.
//!
//! Run: `cargo run --release -p shardlock-benches --example ceiling`
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Instant;

use shardlock::primitives::chunked::{CHUNK_LEN, ENC_CHUNK_LEN};
use shardlock::Backend;

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

fn main() {
    let key = Backend::AwsLcRs.key(&[1u8; 32]);
    let total: usize = 512 << 20;
    let mut ct = vec![7u8; total / CHUNK_LEN * ENC_CHUNK_LEN];
    for (i, c) in ct.chunks_mut(ENC_CHUNK_LEN).enumerate() {
        let tag = key.seal_in_place(&nonce(i as u64), &[], &mut c[..CHUNK_LEN]).unwrap();
        c[CHUNK_LEN..].copy_from_slice(&tag);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ct.bin");
    std::fs::write(&path, &ct).unwrap();
    drop(ct);
    let map = shardlock::primitives::map_file(&path).unwrap();
    let map = &map[..];
    for threads in [1usize, 2] {
        let mut best = 0f64;
        for _ in 0..5 {
            let t = Instant::now();
            std::thread::scope(|s| {
                for th in 0..threads {
                    let key = &key;
                    s.spawn(move || {
                        let mut out = vec![0u8; 4 << 20];
                        for (i, c) in map.chunks(ENC_CHUNK_LEN).enumerate().filter(|(i, _)| i % threads == th) {
                            let pos = (i * CHUNK_LEN) % out.len();
                            key.open_to(
                                &nonce(i as u64),
                                &[],
                                &c[..CHUNK_LEN],
                                &c[CHUNK_LEN..],
                                &mut out[pos..pos + CHUNK_LEN],
                            )
                            .unwrap();
                        }
                    });
                }
            });
            best = best.max(total as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        println!("AES-256-GCM decrypt from page-cached mmap, {threads} thread(s): best of 5 = {best:.2} GB/s");
    }
}
