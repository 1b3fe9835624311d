//! Partitioned packing: workers pack disjoint shard ranges into one directory without the
//! issuer key, `assemble` verifies the parts and signs the manifest. The result reads
//! exactly as a single-machine pack of the same samples; gaps, repeats, changed shards,
//! an overfull part and a foreign issuer are refused, naming the part and shard.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::Fixture;
use shardlock::{assemble, DType, DatasetWriter, Error, Field, PackOptions, Part, PartShards, Schema, ShardLease};

/// 4 records of 705 bytes per shard, as `Fixture::standard` packs them.
const SHARD: u64 = 4 * 705;
const PER_SHARD: usize = 4;

fn schema() -> Schema {
    Schema::new(vec![Field::tensor("x", DType::U8, &[700]), Field::bytes("tag")]).unwrap()
}

/// Packs `samples[range]` as a part: a range of shard indices or leased ones.
fn pack_part<'a>(
    fx: &'a Fixture,
    dir: &Path,
    samples: &[Vec<Vec<u8>>],
    range: std::ops::Range<usize>,
    part: impl Into<PartShards<'a>>,
) -> shardlock::Result<shardlock::Manifest> {
    let mut opts = PackOptions::new("parted");
    opts.shard_size = SHARD;
    let mut w = DatasetWriter::create_part(dir, schema(), opts, &*fx.keyring, &fx.trust, part)?;
    for s in &samples[range] {
        let refs: Vec<&[u8]> = s.iter().map(|v| v.as_slice()).collect();
        w.write_sample(&refs)?;
    }
    w.finish()
}

/// Three workers of 3 shards each (the last one open-ended, with 2 shards).
fn three_parts(fx: &Fixture, dir: &Path, samples: &[Vec<Vec<u8>>]) {
    let k = 3 * PER_SHARD;
    pack_part(fx, dir, samples, 0..k, Part { first_shard: 0, max_shards: Some(3) }).unwrap();
    pack_part(fx, dir, samples, k..2 * k, Part { first_shard: 3, max_shards: Some(3) }).unwrap();
    pack_part(fx, dir, samples, 2 * k..samples.len(), Part { first_shard: 6, max_shards: None }).unwrap();
}

#[test]
fn parts_assemble_into_the_dataset_a_single_pack_makes() {
    let fx = Fixture::new();
    let (whole, samples) = fx.standard("whole", "parted", 32);
    let dir = fx.path("parted");
    three_parts(&fx, &dir, &samples);
    // Not a dataset until assembled.
    assert!(fx.open(&dir).is_err());
    let m = assemble(&dir, &fx.issuer, &*fx.keyring, None).unwrap();
    assert_eq!((m.shards.len(), m.records, m.generation), (8, 32, 1));
    assert!(!dir.join("part-00000.json").exists(), "part files are removed once assembled");
    let a = fx.read_all(&whole).unwrap();
    assert_eq!(fx.read_all(&dir).unwrap(), a, "same records in the same order as one pack");
    assert_eq!(a.len(), samples.len());
    let w = fx.open(&whole).unwrap().manifest().clone();
    let p = fx.open(&dir).unwrap().manifest().clone();
    let shape = |m: &shardlock::Manifest| m.shards.iter().map(|s| (s.records, s.plaintext_bytes)).collect::<Vec<_>>();
    assert_eq!(shape(&w), shape(&p), "same plaintext layout");
    // Assembling twice is refused: the dataset exists.
    let e = assemble(&dir, &fx.issuer, &*fx.keyring, None).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("assembled"), "{e}");
}

#[test]
fn gaps_repeats_changed_shards_overfull_parts_and_foreign_issuers_are_refused() {
    let fx = Fixture::new();
    let (_, samples) = fx.standard("whole", "parted", 32);
    let k = 3 * PER_SHARD;
    let fail = |dir: &Path, want: &str| {
        let e = assemble(dir, &fx.issuer, &*fx.keyring, None).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert!(!dir.join("manifest.json").exists());
    };

    // A missing partition.
    let gap = fx.path("gap");
    pack_part(&fx, &gap, &samples, 0..k, Part { first_shard: 0, max_shards: Some(3) }).unwrap();
    pack_part(&fx, &gap, &samples, 2 * k..32, Part { first_shard: 6, max_shards: None }).unwrap();
    fail(&gap, "no part has shard 3");

    // The same range packed twice: refused by the second worker.
    let twice = fx.path("twice");
    pack_part(&fx, &twice, &samples, 0..k, Part { first_shard: 0, max_shards: Some(3) }).unwrap();
    let e = pack_part(&fx, &twice, &samples, 0..k, Part { first_shard: 0, max_shards: Some(3) }).unwrap_err();
    assert!(e.to_string().contains("another worker"), "{e}");
    // Overlapping ranges: a part never replaces another's shard file.
    let e = pack_part(&fx, &twice, &samples, k..32, Part { first_shard: 2, max_shards: None }).unwrap_err();
    assert!(e.to_string().contains("another part wrote shard 2"), "{e}");
    // A part file copied (a partition counted twice): refused at assemble.
    let rep = fx.path("rep");
    three_parts(&fx, &rep, &samples);
    std::fs::copy(rep.join("part-00003.json"), rep.join("part-00099.json")).unwrap();
    fail(&rep, "a repeated partition");

    // A shard file changed after its part was written.
    let changed = fx.path("changed");
    three_parts(&fx, &changed, &samples);
    common::flip(&changed.join("shard-00004.slk"), 300);
    fail(&changed, "shard 4 of");

    // A part given too little room fails while packing, before it writes into the next range.
    let small = fx.path("small");
    let e = pack_part(&fx, &small, &samples, 0..2 * k, Part { first_shard: 0, max_shards: Some(3) }).unwrap_err();
    assert!(e.to_string().contains("may write 3 shard(s)"), "{e}");
    assert!(!small.join("shard-00003.slk").exists());

    // Another issuer cannot sign parts whose wraps name this one.
    let ok = fx.path("ok");
    three_parts(&fx, &ok, &samples);
    let other = shardlock::IssuerKey::generate().unwrap();
    let e = assemble(&ok, &other, &*fx.keyring, None).unwrap_err().to_string();
    assert!(e.contains("packed for issuer"), "{e}");
    assert!(assemble(&ok, &fx.issuer, &*fx.keyring, Some(4)).unwrap().generation == 4);
}

/// Edits entry `k` of the part file `name` in `dir`.
fn edit_part(dir: &Path, name: &str, k: usize, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(name);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v["part"]["shards"][k]);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// Part files are unsigned: whoever can write the directory can write one. An entry
/// that names another dataset's wrapped DEK (under a keyring KWP binds no context) would
/// hand that dataset's key to every reader of this one; `assemble` authenticates every
/// shard under its own DEK and refuses it, and a wrapped DEK used twice.
#[test]
fn a_part_naming_a_wrapped_dek_it_did_not_encrypt_with_is_refused() {
    let fx = Fixture::new();
    let (other, _) = fx.standard("other", "other", 8);
    let foreign = fx.open(&other).unwrap().manifest().shards[0].clone();
    let (_, samples) = fx.standard("whole", "parted", 32);
    let dir = fx.path("spliced");
    three_parts(&fx, &dir, &samples);
    edit_part(&dir, "part-00003.json", 0, |e| {
        e["kek_id"] = foreign.kek_id.clone().into();
        e["wrapped_dek"] = foreign.wrapped_dek.clone().into();
    });
    let e = assemble(&dir, &fx.issuer, &*fx.keyring, None).unwrap_err().to_string();
    assert!(e.contains("shard 3 of") && e.contains("does not authenticate under its DEK"), "{e}");
    assert!(!dir.join("manifest.json").exists());

    let dir = fx.path("reused");
    three_parts(&fx, &dir, &samples);
    let w0: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("part-00000.json")).unwrap()).unwrap();
    edit_part(&dir, "part-00003.json", 0, |e| e["wrapped_dek"] = w0["part"]["shards"][0]["wrapped_dek"].clone());
    let e = assemble(&dir, &fx.issuer, &*fx.keyring, None).unwrap_err().to_string();
    assert!(e.contains("has the wrapped DEK of another shard"), "{e}");
}

/// A counter shared by the workers of one dataset (a Ray actor's role).
#[derive(Clone, Default)]
struct Counter(std::sync::Arc<std::sync::atomic::AtomicU32>);

impl ShardLease for Counter {
    fn next_shard(&mut self) -> shardlock::Result<u32> {
        Ok(self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst))
    }
}

fn leased(c: &Counter) -> PartShards<'static> {
    PartShards::Leased(Box::new(c.clone()))
}

/// Workers whose ranges are not known in advance take each shard's index from a shared
/// counter as their shards fill: their parts interleave, assemble into one dataset with
/// every record once, and a worker that took an index and failed leaves a gap that
/// assemble reports. A worker with no data writes no part file.
#[test]
fn leased_parts_interleave_and_a_failed_worker_is_a_gap() {
    let fx = Fixture::new();
    let (_, samples) = fx.standard("whole", "parted", 32);
    let dir = fx.path("leased");
    let c = Counter::default();
    let mut opts = PackOptions::new("parted");
    opts.shard_size = SHARD;
    opts.threads = 1;
    // Two workers writing at once, alternating samples: each leases as its shards fill.
    let mut a = DatasetWriter::create_part(&dir, schema(), opts.clone(), &*fx.keyring, &fx.trust, leased(&c)).unwrap();
    let mut b = DatasetWriter::create_part(&dir, schema(), opts.clone(), &*fx.keyring, &fx.trust, leased(&c)).unwrap();
    for (i, s) in samples.iter().enumerate() {
        let refs: Vec<&[u8]> = s.iter().map(|v| v.as_slice()).collect();
        if i < 8 || i % 3 == 0 {
            a.write_sample(&refs).unwrap()
        } else {
            b.write_sample(&refs).unwrap()
        }
    }
    let (ma, mb) = (a.finish().unwrap(), b.finish().unwrap());
    let idx = |m: &shardlock::Manifest| m.shards.iter().map(|s| s.index).collect::<Vec<_>>();
    let (ia, ib) = (idx(&ma), idx(&mb));
    assert!(ia.windows(2).any(|w| w[1] > w[0] + 1), "the workers' indices interleave: {ia:?} {ib:?}");
    assert!(
        dir.join(format!("part-{:05}.json", ia[0])).exists() && dir.join(format!("part-{:05}.json", ib[0])).exists()
    );
    let empty = pack_part(&fx, &dir, &samples, 0..0, leased(&c)).unwrap();
    assert!(empty.shards.is_empty());
    let issued = u64::from(c.0.load(std::sync::atomic::Ordering::SeqCst));
    // The coordinator's record: one index more than the parts hold (a worker that failed
    // holding the last index) is refused, as is a failed write; the true count assembles.
    shardlock::write_leases(&dir, issued + 1, None).unwrap();
    let e = assemble(&dir, &fx.issuer, &*fx.keyring, None).unwrap_err().to_string();
    assert!(e.contains(&format!("handed out {} shard indices and the parts hold {issued}", issued + 1)), "{e}");
    shardlock::write_leases(&dir, issued, Some("task 3 died")).unwrap();
    let e = assemble(&dir, &fx.issuer, &*fx.keyring, None).unwrap_err().to_string();
    assert!(e.contains("failed (task 3 died)"), "{e}");
    shardlock::write_leases(&dir, issued, None).unwrap();
    let m = assemble(&dir, &fx.issuer, &*fx.keyring, None).unwrap();
    assert!(!dir.join(shardlock::LEASES_FILE).exists(), "the record goes with the parts");
    assert_eq!((m.records, m.shards.len()), (32, ia.len() + ib.len()));
    let mut got = fx.read_all(&dir).unwrap();
    let mut want = samples.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "every record once");

    // A worker that took an index and failed before writing its shard: a gap.
    let dir = fx.path("failed");
    let c = Counter::default();
    pack_part(&fx, &dir, &samples, 0..12, leased(&c)).unwrap();
    c.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    pack_part(&fx, &dir, &samples, 12..32, leased(&c)).unwrap();
    let e = assemble(&dir, &fx.issuer, &*fx.keyring, None).unwrap_err().to_string();
    assert!(e.contains("no part has shard 3"), "{e}");
    // A lease that hands out an index already written is refused before the shard is replaced.
    let dir = fx.path("reused-lease");
    pack_part(&fx, &dir, &samples, 0..4, leased(&Counter::default())).unwrap();
    let e = pack_part(&fx, &dir, &samples, 4..8, leased(&Counter::default())).unwrap_err().to_string();
    assert!(e.contains("another part wrote shard 0") || e.contains("exists"), "{e}");
}
