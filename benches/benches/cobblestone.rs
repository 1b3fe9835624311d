//! Single-thread Cobblestone-256 decryption of a page-cached shard payload versus the
//! raw AES-256-GCM calls on a buffer of the same layout (16 KiB chunks + tags), per
//! AEAD backend, both writing plaintext into a reused 4 MiB buffer as a loader does.
//! The ratio of the two medians is the cost of the chunked layer (commitment check,
//! nonce derivation, bounds checks). Also: one raw AES-256-GCM seal and open of a
//! 16 KiB chunk (the unit of the format), per backend. Run: `make bench`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::Write;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardlock::primitives::chunked::{ChunkBuf, Encryptor, Payload, CHUNK_LEN, ENC_CHUNK_LEN, HEADER_LEN};
use shardlock::Backend;

const PLAINTEXT: usize = 64 << 20;
/// Plaintext goes into a reused buffer of this size, as into a pool of batch buffers.
const OUT: usize = 4 << 20;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let key = [0x42u8; 32];
    let context = b"bench shard header";
    let plaintext: Vec<u8> = (0..PLAINTEXT).map(|i| (i * 7 % 251) as u8).collect();

    let mut g = c.benchmark_group("decrypt_64MiB_single_thread");
    g.throughput(Throughput::Bytes(PLAINTEXT as u64));
    g.sample_size(20);
    for &backend in Backend::ALL {
        // The shard payload, written to a file and read back through mmap (page cache).
        let path = dir.path().join(format!("payload-{}", backend.name()));
        let mut enc = Encryptor::new(backend, &key, context, std::fs::File::create(&path).unwrap()).unwrap();
        enc.write(&plaintext).unwrap();
        enc.finish().unwrap().0.flush().unwrap();
        let map = shardlock::primitives::map_file(&path).unwrap();

        // Raw AEAD baseline on the same layout: chunk i sealed with nonce i.
        let raw_key = backend.key(&key);
        let mut raw = vec![0u8; map.len() - HEADER_LEN];
        for (i, chunk) in raw.chunks_mut(ENC_CHUNK_LEN).enumerate() {
            let n = chunk.len() - 16;
            let src = &plaintext[(i * CHUNK_LEN).min(PLAINTEXT)..(i * CHUNK_LEN + n).min(PLAINTEXT)];
            chunk[..n].copy_from_slice(src);
            let tag = raw_key.seal_in_place(&nonce(i as u64), &[], &mut chunk[..n]).unwrap();
            chunk[n..].copy_from_slice(&tag);
        }
        // Served from the page cache through mmap, like the shard.
        let raw_path = dir.path().join(format!("raw-{}", backend.name()));
        std::fs::write(&raw_path, &raw).unwrap();
        drop(raw);
        let raw = shardlock::primitives::map_file(&raw_path).unwrap();

        let mut out = vec![0u8; OUT];
        g.bench_function(BenchmarkId::new("cobblestone", backend.name()), |b| {
            b.iter(|| {
                let p = Payload::open(backend, &key, context, &map[..], 0).unwrap();
                let mut total = 0;
                for k in 0..p.chunk_count() {
                    let pos = (k as usize * CHUNK_LEN) % OUT;
                    total += p.decrypt_chunk(k, &mut out[pos..]).unwrap();
                }
                assert_eq!(total, PLAINTEXT);
            })
        });
        g.bench_function(BenchmarkId::new("raw_aead", backend.name()), |b| {
            b.iter(|| {
                for (i, chunk) in raw.chunks(ENC_CHUNK_LEN).enumerate() {
                    let n = chunk.len() - 16;
                    let pos = (i * CHUNK_LEN) % OUT;
                    raw_key.open_to(&nonce(i as u64), &[], &chunk[..n], &chunk[n..], &mut out[pos..pos + n]).unwrap();
                }
            })
        });
        let p = Payload::open(backend, &key, context, &map[..], 0).unwrap();
        let mut scratch = ChunkBuf::new();
        g.bench_function(BenchmarkId::new("cobblestone_read_at_4MiB", backend.name()), |b| {
            b.iter(|| {
                for off in (0..PLAINTEXT).step_by(OUT) {
                    p.read_at(off as u64, &mut out, &mut scratch).unwrap();
                }
            })
        });
    }
    g.finish();
}

/// One 16 KiB chunk sealed and opened by each backend, no I/O: the AEAD's own speed at
/// the format's chunk size, the number every other bench is bounded by.
fn aead_16k(c: &mut Criterion) {
    let key = [0x42u8; 32];
    let mut g = c.benchmark_group("aead_16KiB");
    g.throughput(Throughput::Bytes(CHUNK_LEN as u64));
    for &backend in Backend::ALL {
        let k = backend.key(&key);
        let mut buf: Vec<u8> = (0..CHUNK_LEN).map(|i| (i % 251) as u8).collect();
        g.bench_function(BenchmarkId::new("seal", backend.name()), |b| {
            b.iter(|| k.seal_in_place(&nonce(7), &[], &mut buf).unwrap())
        });
        let tag = k.seal_in_place(&nonce(7), &[], &mut buf).unwrap();
        let mut out = vec![0u8; CHUNK_LEN];
        g.bench_function(BenchmarkId::new("open", backend.name()), |b| {
            b.iter(|| k.open_to(&nonce(7), &[], &buf, &tag, &mut out).unwrap())
        });
    }
    g.finish();
}

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

criterion_group!(benches, aead_16k, bench);
criterion_main!(benches);
