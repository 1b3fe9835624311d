//! The loader end to end on a page-cached 64 MiB dataset: sequential decrypt into
//! batches, window and global gathers (8 KiB samples), and 147 KiB samples.
//! Each iteration streams one full epoch. Also packing (encrypting) the same 64 MiB:
//! fresh DEK per shard, Cobblestone-256 payload, wrapped key, signed manifest.
//! Run: `make bench`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shardlock::{DType, DatasetWriter, Field, IssuerKey, Keyring, Loader, PackOptions, Schema, Shuffle};
use shardlock::{Operation, ShardSet, Token, TokenSpec};

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    keyring: Arc<Keyring>,
    issuer: IssuerKey,
    dataset: String,
    bytes: u64,
}

fn fixture(sample: usize, total: usize, name: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let keyring = Arc::new(Keyring::create(&dir.path().join("kr.json")).unwrap());
    let issuer = IssuerKey::generate().unwrap();
    let path = dir.path().join("ds");
    let bytes = pack(&path, sample, total, name, &keyring, &issuer);
    Fixture { _dir: dir, path, keyring, issuer, dataset: name.into(), bytes }
}

/// Packs `total / sample` samples of `sample` bytes into 16 MiB shards; returns the
/// plaintext bytes written.
fn pack(path: &Path, sample: usize, total: usize, name: &str, keyring: &Keyring, issuer: &IssuerKey) -> u64 {
    let schema = Schema::new(vec![Field::tensor("x", DType::U8, &[sample as u64])]).unwrap();
    let mut opts = PackOptions::new(name);
    opts.shard_size = 16 << 20;
    opts.force = true;
    let mut w = DatasetWriter::create(path, schema, opts, keyring, issuer).unwrap();
    let row: Vec<u8> = (0..sample).map(|i| (i % 251) as u8).collect();
    for _ in 0..total / sample {
        w.write_sample(&[&row]).unwrap();
    }
    w.finish().unwrap();
    (total / sample * sample) as u64
}

fn loader(f: &Fixture, shuffle: Shuffle, batch: usize) -> Loader {
    let token = Token::issue(
        &f.issuer,
        &TokenSpec {
            dataset: f.dataset.clone(),
            principal: "bench".into(),
            shards: ShardSet::All,
            ops: vec![Operation::Read],
            expires: SystemTime::now() + Duration::from_secs(3600),
            not_before: None,
            min_generation: None,
        },
    )
    .unwrap();
    Loader::builder(&f.path)
        .key_provider(f.keyring.clone())
        .token_value(token)
        .trust_anchor(f.issuer.trust_anchor())
        .batch_size(batch)
        .shuffle(shuffle)
        .build()
        .unwrap()
}

fn bench(c: &mut Criterion) {
    let small = fixture(8192, 64 << 20, "bench8k");
    let large = fixture(3 * 224 * 224, 64 << 20, "bench147k");
    let mut g = c.benchmark_group("loader_epoch_64MiB");
    g.sample_size(20);
    for (name, f, shuffle, batch) in [
        ("decrypt_into_batch_8KiB", &small, Shuffle::None, 256),
        ("gather_window_8KiB", &small, Shuffle::Window, 256),
        ("gather_global_8KiB", &small, Shuffle::Global, 256),
        ("end_to_end_147KiB", &large, Shuffle::Window, 64),
    ] {
        g.throughput(Throughput::Bytes(f.bytes));
        let mut l = loader(f, shuffle, batch);
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| {
                let mut n = 0;
                for batch in l.by_ref() {
                    n += batch.unwrap().len();
                }
                assert!(n > 0);
            })
        });
    }
    g.finish();
}

/// Pack throughput: what a data owner waits for, per plaintext byte, into the page cache.
fn pack_bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let keyring = Keyring::create(&dir.path().join("kr.json")).unwrap();
    let issuer = IssuerKey::generate().unwrap();
    let mut g = c.benchmark_group("pack_64MiB");
    g.sample_size(10);
    for (name, sample) in [("8KiB", 8192), ("147KiB", 3 * 224 * 224)] {
        let path = dir.path().join(name);
        g.throughput(Throughput::Bytes((64usize << 20) as u64 / sample as u64 * sample as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| pack(&path, sample, 64 << 20, "benchpack", &keyring, &issuer))
        });
    }
    g.finish();
}

criterion_group!(benches, bench, pack_bench);
criterion_main!(benches);
