//! The machine's ceiling for the loader: raw AES-256-GCM decryption (the crate's aws-lc-rs
//! backend) of a page-cached file through mmap, 16 KiB chunks, into a reused 4 MiB buffer
//! per thread, on 1 and 2 threads, best of 5. No pipeline, no batches
//! (`shardlock::aes_gcm_ceiling`, which `shardlock bench --ceiling` also runs).
//!
//! Run: `cargo run --release -p shardlock-benches --example ceiling`
#![allow(missing_docs, clippy::unwrap_used)]

fn main() {
    for threads in [1usize, 2] {
        let best = shardlock::aes_gcm_ceiling(threads, 512 << 20, 5).unwrap();
        println!("AES-256-GCM decrypt from page-cached mmap, {threads} thread(s): best of 5 = {best:.2} GB/s");
    }
}
