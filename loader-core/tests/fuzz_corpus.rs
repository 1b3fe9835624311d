//! Replays the committed fuzz corpus (loader-core/fuzz/corpus/<target>/) through the
//! fuzz hooks, so every malformed input ever found or seeded stays a regression test
//! without needing cargo-fuzz. `SHARDLOCK_WRITE_CORPUS=1` regenerates the seeds from
//! the same malformed files the tamper tests build.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use shardlock::fuzz_hooks;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

fn replay(target: &str, hook: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        hook(&std::fs::read(&p).unwrap());
        n += 1;
    }
    n
}

fn write_seeds() {
    let fx = common::Fixture::new();
    let (ds, _) = fx.standard("ds", "corpus", 6);
    let shard = std::fs::read(ds.join("shard-00000.slk")).unwrap();
    let manifest = std::fs::read(ds.join("manifest.json")).unwrap();
    let hl = u16::from_le_bytes([shard[10], shard[11]]) as usize;
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    seeds.push(("shard_header", "valid".into(), shard[..hl].to_vec()));
    for cut in [0, 8, 12, 40, hl - 1] {
        seeds.push(("shard_header", format!("cut{cut}"), shard[..cut].to_vec()));
    }
    for off in [8, 10, 12, 13, 82] {
        let mut v = shard[..hl].to_vec();
        v[off] ^= 0xFF;
        seeds.push(("shard_header", format!("flip{off}"), v));
    }
    seeds.push(("manifest", "valid".into(), manifest.clone()));
    seeds.push(("manifest", "cut".into(), manifest[..manifest.len() / 2].to_vec()));
    let text = String::from_utf8(manifest.clone()).unwrap();
    seeds.push(("manifest", "edited".into(), text.replacen("\"records\": 2", "\"records\": 99", 1).into_bytes()));
    seeds.push(("manifest", "badfile".into(), text.replacen("shard-00000.slk", "../../etc/passwd", 1).into_bytes()));
    let index = {
        let mut v = vec![0u8];
        v.extend(shardlock::primitives::index::encode(2, 2, &[3, 4, 0, 4]));
        v
    };
    seeds.push(("record_index", "valid".into(), index.clone()));
    let mut dec = index.clone();
    dec[1 + 16 + 8] = 0xFF;
    seeds.push(("record_index", "decreasing".into(), dec));
    seeds.push(("record_index", "huge_count".into(), [vec![0u8], vec![0xFF; 16]].concat()));
    seeds.push(("payload", "shard_payload".into(), shard[hl..].to_vec()));
    seeds.push(("payload", "short".into(), shard[hl..hl + 60].to_vec()));
    for (target, name, bytes) in seeds {
        let d = corpus_dir(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    }
}

#[test]
fn corpus_replays_without_panics() {
    if std::env::var_os("SHARDLOCK_WRITE_CORPUS").is_some() {
        write_seeds();
    }
    assert!(replay("shard_header", fuzz_hooks::shard_header) >= 10);
    assert!(replay("manifest", fuzz_hooks::manifest) >= 4);
    assert!(replay("record_index", fuzz_hooks::record_index) >= 3);
    assert!(replay("payload", fuzz_hooks::payload) >= 2);
    // The structure-aware targets' grown corpora (docs/THREAT-MODEL.md section 4.8).
    assert!(replay("read_path", fuzz_hooks::read_path) >= 100);
    assert!(replay("token", fuzz_hooks::token) >= 100);
}
