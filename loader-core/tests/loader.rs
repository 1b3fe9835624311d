//! The streaming Loader: one epoch exactly, deterministic order, rank split, resume,
//! field selection, early drop, errors and re-authorization mid-epoch.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::Fixture;
use shardlock::{Attenuation, AuthorizerConfig, Operation, ShardSet, Token, TokenSpec};
use shardlock::{DType, DenyReason, Error, Field, IntegrityKind, Loader, LoaderBuilder, Remainder, Schema, Shuffle};

/// 10 shards x 37 records: `x` = u16[3] holding (id, id*3, 7), `blob` = id as text.
fn dataset(fx: &Fixture) -> std::path::PathBuf {
    let schema = Schema::new(vec![Field::tensor("x", DType::U16, &[3]), Field::bytes("blob")]).unwrap();
    let samples: Vec<Vec<Vec<u8>>> = (0..370u16)
        .map(|i| {
            let x: Vec<u8> = [i, i.wrapping_mul(3), 7].iter().flat_map(|v| v.to_le_bytes()).collect();
            vec![x, format!("sample-{i}-{}", "z".repeat(i as usize % 50)).into_bytes()]
        })
        .collect();
    fx.pack("ds", "loader", schema, &samples, 1500)
}

/// First global sample id of every shard.
fn prefix(fx: &Fixture, dir: &std::path::Path) -> Vec<u64> {
    let m = fx.open(dir).unwrap().manifest().clone();
    m.shards
        .iter()
        .scan(0, |acc, s| {
            let p = *acc;
            *acc += s.records;
            Some(p)
        })
        .collect()
}

fn builder(fx: &Fixture, dir: &std::path::Path) -> LoaderBuilder {
    fx.loader(dir, "loader").batch_size(16)
}

fn ids_of(loader: Loader) -> Vec<u64> {
    let mut out = Vec::new();
    for b in loader {
        let b = b.unwrap();
        let x = b.tensor::<u16>("x").unwrap();
        assert_eq!(x.shape, vec![b.len(), 3]);
        for (j, &id) in b.sample_ids().iter().enumerate() {
            assert_eq!(x.data[3 * j], id as u16);
            assert_eq!(x.data[3 * j + 1], (id as u16).wrapping_mul(3));
            let blob = b.bytes("blob", j).unwrap();
            assert!(blob.starts_with(format!("sample-{id}-").as_bytes()));
        }
        out.extend_from_slice(b.sample_ids());
    }
    out
}

#[test]
fn every_shuffle_mode_yields_each_sample_once_with_exact_values() {
    let fx = Fixture::new();
    let dir = dataset(&fx);
    assert!(fx.open(&dir).unwrap().manifest().shards.len() >= 8);
    for mode in [Shuffle::None, Shuffle::Window, Shuffle::Global] {
        let ids = ids_of(builder(&fx, &dir).shuffle(mode).drop_last(false).build().unwrap());
        assert_eq!(ids.len(), 370, "{mode:?}");
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 370, "{mode:?}");
        if mode == Shuffle::None {
            assert_eq!(ids, (0..370).collect::<Vec<_>>());
        }
    }
}

#[test]
fn order_depends_on_seed_and_epoch_but_not_on_workers() {
    let fx = Fixture::new();
    let dir = dataset(&fx);
    let one = ids_of(builder(&fx, &dir).workers(1).seed(5).build().unwrap());
    let three = ids_of(builder(&fx, &dir).workers(3).seed(5).memory_budget(1 << 16).build().unwrap());
    assert_eq!(one, three);
    assert_ne!(one, ids_of(builder(&fx, &dir).seed(6).build().unwrap()));
    let mut l = builder(&fx, &dir).seed(5).build().unwrap();
    let e0: Vec<u64> = l.by_ref().flat_map(|b| b.unwrap().sample_ids().to_vec()).collect();
    let e1: Vec<u64> = l.by_ref().flat_map(|b| b.unwrap().sample_ids().to_vec()).collect();
    assert_eq!(e0, one);
    assert_ne!(e0, e1, "the next iteration is the next epoch");
    l.set_epoch(0);
    assert_eq!(l.flat_map(|b| b.unwrap().sample_ids().to_vec()).collect::<Vec<_>>(), one);
}

#[test]
fn ranks_are_disjoint_equal_and_cover_the_epoch() {
    let fx = Fixture::new();
    let dir = dataset(&fx);
    for rem in [Remainder::Drop, Remainder::Pad] {
        let lists: Vec<Vec<u64>> = (0..3)
            .map(|r| ids_of(builder(&fx, &dir).rank(r, 3).remainder(rem).drop_last(false).build().unwrap()))
            .collect();
        assert!(lists.iter().all(|l| l.len() == lists[0].len()));
        let all: HashSet<u64> = lists.iter().flatten().copied().collect();
        match rem {
            Remainder::Drop => assert_eq!(all.len(), lists[0].len() * 3),
            Remainder::Pad => assert_eq!(all.len(), 370),
        }
    }
}

#[test]
fn resume_in_a_new_loader_with_other_world_and_workers_is_one_epoch() {
    let fx = Fixture::new();
    let dir = dataset(&fx);
    let mut seen = Vec::new();
    // World 2: each rank reads 3 batches and saves (ranks move in lockstep).
    let mut state = None;
    for r in 0..2 {
        let mut l = builder(&fx, &dir).rank(r, 2).workers(2).seed(9).build().unwrap();
        for _ in 0..3 {
            seen.extend_from_slice(l.next().unwrap().unwrap().sample_ids());
        }
        state = Some(l.state());
    }
    let state = state.unwrap();
    let json = serde_json::to_string(&state).unwrap();
    // World 1, one worker, a fresh loader: the rest of the epoch.
    let mut l = builder(&fx, &dir).workers(1).seed(9).drop_last(false).build().unwrap();
    l.load_state(&serde_json::from_str(&json).unwrap()).unwrap();
    seen.extend(ids_of(l));
    assert_eq!(seen.len(), 370);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 370);
    // A state from another seed is refused.
    let mut other = builder(&fx, &dir).seed(1).build().unwrap();
    assert!(other.load_state(&state).is_err());
}

/// Batches of `loaders`, one from each in turn (as a PyTorch DataLoader takes them
/// from its workers), as sample-id lists.
fn round_robin(mut loaders: Vec<Loader>) -> Vec<Vec<u64>> {
    let mut out = Vec::new();
    let mut live = vec![true; loaders.len()];
    while live.iter().any(|&l| l) {
        for (i, l) in loaders.iter_mut().enumerate() {
            if live[i] {
                match l.next() {
                    Some(b) => out.push(b.unwrap().sample_ids().to_vec()),
                    None => live[i] = false,
                }
            }
        }
    }
    out
}

#[test]
fn dataloader_workers_deliver_the_rank_batches_in_order_and_drop_once_per_rank() {
    let fx = Fixture::new();
    let dir = dataset(&fx);
    for drop_last in [true, false] {
        // Rank 1 of 2: 185 samples, 11 full batches of 16 and 9 left over.
        let rank = |w: u32, n: u32| builder(&fx, &dir).rank(1, 2).seed(3).drop_last(drop_last).dataloader_worker(w, n);
        let whole: Vec<Vec<u64>> = rank(0, 1).build().unwrap().map(|b| b.unwrap().sample_ids().to_vec()).collect();
        assert_eq!(whole.len(), if drop_last { 11 } else { 12 });
        for n in [2u32, 3, 5] {
            let workers: Vec<Loader> = (0..n).map(|w| rank(w, n).build().unwrap()).collect();
            let lens: usize = workers.iter().map(|l| l.len().unwrap()).sum();
            assert_eq!(lens, whole.len(), "{n} workers, drop_last {drop_last}");
            assert_eq!(round_robin(workers), whole, "{n} workers, drop_last {drop_last}");
        }
    }
    // A worker's state restores into the same worker, and only there.
    let mut w1 = builder(&fx, &dir).seed(3).dataloader_worker(1, 3).build().unwrap();
    let first = w1.next().unwrap().unwrap().sample_ids().to_vec();
    let state = w1.state();
    assert_eq!(state.worker.map(|p| (p.id, p.count, p.batches)), Some((1, 3, 1)));
    let rest: Vec<u64> = w1.flat_map(|b| b.unwrap().sample_ids().to_vec()).collect();
    let mut again = builder(&fx, &dir).seed(3).dataloader_worker(1, 3).build().unwrap();
    again.load_state(&serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap()).unwrap();
    assert_eq!(again.flat_map(|b| b.unwrap().sample_ids().to_vec()).collect::<Vec<_>>(), rest);
    assert!(!first.is_empty());
    let mut other = builder(&fx, &dir).seed(3).dataloader_worker(0, 2).build().unwrap();
    let e = other.load_state(&state).err().unwrap();
    assert!(e.to_string().contains("worker 1 of 3"), "{e}");
    // A rank's state (after 5 batches) restores with any worker count: the rest once.
    let mut r = builder(&fx, &dir).seed(3).drop_last(false).build().unwrap();
    let mut seen: Vec<u64> = (0..5).flat_map(|_| r.next().unwrap().unwrap().sample_ids().to_vec()).collect();
    let state = r.state();
    assert_eq!(state.worker, None);
    let workers: Vec<Loader> = (0..4)
        .map(|w| {
            let mut l = builder(&fx, &dir).seed(3).drop_last(false).dataloader_worker(w, 4).build().unwrap();
            l.load_state(&state).unwrap();
            l
        })
        .collect();
    seen.extend(round_robin(workers).into_iter().flatten());
    assert_eq!(seen.len(), 370);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 370);
    assert!(builder(&fx, &dir).dataloader_worker(2, 2).build().is_err());
}

#[test]
fn field_selection_and_partial_last_batch() {
    let fx = Fixture::new();
    let dir = dataset(&fx);
    let l =
        builder(&fx, &dir).fields(["blob"]).batch_size(100).drop_last(false).shuffle(Shuffle::None).build().unwrap();
    assert_eq!(l.len().unwrap(), 4);
    let batches: Vec<_> = l.map(|b| b.unwrap()).collect();
    assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![100, 100, 100, 70]);
    assert!(batches[0].tensor::<u16>("x").is_err());
    assert_eq!(batches[3].bytes("blob", 69).unwrap(), format!("sample-369-{}", "z".repeat(369 % 50)).as_bytes());
    assert!(batches[0].tensor::<u8>("blob").is_err());
    let e = builder(&fx, &dir).fields(["nope"]).build().err().unwrap();
    assert!(e.to_string().contains("no field \"nope\""));
}

#[test]
fn a_tampered_chunk_stops_the_stream_with_a_sticky_typed_error() {
    let fx = Fixture::new();
    let dir = dataset(&fx);
    let shard = dir.join("shard-00004.slk");
    let len = std::fs::metadata(&shard).unwrap().len() as usize;
    common::flip(&shard, len - 40);
    let mut l = builder(&fx, &dir).shuffle(Shuffle::None).batch_size(1).build().unwrap();
    // Every sample of shards 0-3 arrives; the first batch touching shard 4 fails.
    for _ in 0..prefix(&fx, &dir)[4] {
        l.next().unwrap().unwrap();
    }
    let e = l.next().unwrap().unwrap_err();
    assert!(
        matches!(&e, Error::Integrity { shard, kind: IntegrityKind::ChunkAuth, .. } if shard.index == Some(4)),
        "{e}"
    );
    assert!(l.next().unwrap().is_err(), "no clean end after an integrity failure");
}

#[test]
fn expiry_mid_epoch_stops_at_the_next_shard() {
    let fx = Fixture::new();
    let dir = dataset(&fx);
    let start = SystemTime::now();
    let now = Arc::new(Mutex::new(start));
    let c = now.clone();
    let cfg =
        AuthorizerConfig { skew: Duration::ZERO, clock: Arc::new(move || *c.lock().unwrap()), ..Default::default() };
    let spec = TokenSpec {
        dataset: "loader".into(),
        principal: "p".into(),
        shards: ShardSet::All,
        ops: vec![Operation::Read],
        expires: start + Duration::from_secs(60),
        not_before: Some(start - Duration::from_secs(5)),
        min_generation: None,
    };
    let token = Token::issue(&fx.issuer, &spec).unwrap();
    let mut l = Loader::builder(&dir)
        .key_provider(fx.keyring.clone())
        .token_value(token)
        .trust_anchor(fx.trust)
        .authorizer_config(cfg)
        .shuffle(Shuffle::None)
        .batch_size(1)
        .workers(1)
        .memory_budget(1)
        .build()
        .unwrap();
    let first = l.next().unwrap().unwrap();
    assert_eq!(first.sample_ids()[0], 0);
    *now.lock().unwrap() = start + Duration::from_secs(120);
    // Batches of shards already authorized may still arrive; then the next shard open fails.
    let mut got = 1;
    let e = loop {
        match l.next().unwrap() {
            Ok(_) => got += 1,
            Err(e) => break e,
        }
    };
    // At most the shard that was open when the clock jumped, plus the batches in flight.
    assert!(got <= prefix(&fx, &dir)[2] as usize, "{got}");
    assert!(matches!(e, Error::AccessDenied { reason: DenyReason::TokenExpired, .. }), "{e}");
}

#[test]
fn a_token_for_some_shards_only_reads_those_then_is_denied() {
    let fx = Fixture::new();
    let dir = dataset(&fx);
    let t = fx
        .token("loader")
        .attenuate(&Attenuation { shards: Some(ShardSet::parse("0-1").unwrap()), ..Default::default() })
        .unwrap();
    let mut l = Loader::builder(&dir)
        .key_provider(fx.keyring.clone())
        .token_value(t)
        .trust_anchor(fx.trust)
        .shuffle(Shuffle::None)
        .batch_size(1)
        .build()
        .unwrap();
    for _ in 0..prefix(&fx, &dir)[2] {
        assert!(l.next().unwrap().is_ok());
    }
    let e = l.next().unwrap().unwrap_err();
    assert!(matches!(e, Error::AccessDenied { reason: DenyReason::ShardOutOfScope, shard: Some(2), .. }), "{e}");
}

/// Batch buffers are reused without a wipe in between: each batch's buffer must hold
/// that batch's bytes and zeros only, whatever larger batch used it before.
#[test]
fn a_reused_batch_buffer_holds_only_its_batch() {
    let fx = Fixture::new();
    // Values of very different lengths, so batches of one buffer differ in layout.
    let schema = shardlock::Schema::new(vec![shardlock::Field::bytes("v")]).unwrap();
    let samples: Vec<Vec<Vec<u8>>> =
        (0..300usize).map(|i| vec![vec![0xa0 | (i % 16) as u8; (i * 97) % 3000 + 1]]).collect();
    let dir = fx.pack("reuse", "reuse", schema, &samples, 64 << 10);
    let mut loader =
        fx.loader(&dir, "reuse").batch_size(7).shuffle(Shuffle::Global).drop_last(false).workers(1).build().unwrap();
    let mut checked = 0;
    for _epoch in 0..3 {
        for b in loader.by_ref() {
            let b = b.unwrap();
            let mut used = vec![false; b.buffer_bytes().len()];
            for s in b.fields() {
                used[s.offset..s.offset + s.len].iter_mut().for_each(|u| *u = true);
                if let Some(at) = s.offsets_at {
                    used[at..at + 8 * (b.len() + 1)].iter_mut().for_each(|u| *u = true);
                }
            }
            let stale = b.buffer_bytes().iter().zip(&used).filter(|(&x, &u)| !u && x != 0).count();
            assert_eq!(
                stale,
                0,
                "batch {} of epoch {}: {stale} bytes outside its fields are not zero",
                b.index(),
                b.epoch()
            );
            checked += 1;
        }
    }
    // Fewer buffers than batches: buffers were reused (how many depends on timing).
    assert!(
        checked > 100 && loader.buffers_allocated() < checked,
        "{checked} batches, {} buffers",
        loader.buffers_allocated()
    );
}
