//! Weighted mixing of datasets (`shardlock::Mix`): proportions, determinism, exact
//! resume, per-stream epochs, ranks split within each stream, and each stream
//! authorized on its own.
#![allow(clippy::unwrap_used)]

mod common;

use common::Fixture;
use shardlock::{Loader, Mix, MixState, Shuffle};

/// Two datasets of different sizes, ids told apart by their `tag` prefix.
fn two(fx: &Fixture) -> (std::path::PathBuf, std::path::PathBuf) {
    let (a, _) = fx.standard("a", "mix/a", 96);
    let (b, _) = fx.standard("b", "mix/b", 20);
    (a, b)
}

fn loader(fx: &Fixture, dir: &std::path::Path, id: &str, rank: u32, world: u32) -> Loader {
    fx.loader(dir, id).batch_size(4).shuffle(Shuffle::Window).seed(3).rank(rank, world).build().unwrap()
}

fn mix(fx: &Fixture, a: &std::path::Path, b: &std::path::Path, rank: u32, world: u32) -> Mix {
    Mix::new(vec![(loader(fx, a, "mix/a", rank, world), 0.75), (loader(fx, b, "mix/b", rank, world), 0.25)], 11)
        .unwrap()
}

/// (stream, stream epoch, sample ids) of each of `n` batches.
fn take(m: &mut Mix, n: usize) -> Vec<(usize, u64, Vec<u64>)> {
    (0..n)
        .map(|_| {
            let b = m.next_batch().unwrap();
            (b.stream, b.epoch, b.batch.sample_ids().to_vec())
        })
        .collect()
}

#[test]
fn streams_follow_their_weights_and_each_epoch_of_each_stream_is_whole() {
    let fx = Fixture::new();
    let (a, b) = two(&fx);
    let mut m = mix(&fx, &a, &b, 0, 1);
    let got = take(&mut m, 400);
    let from_b = got.iter().filter(|g| g.0 == 1).count();
    // 400 draws at p = 0.25: sd 8.7.
    assert!((from_b as f64 - 100.0).abs() < 5.0 * 8.7, "{from_b} of 400 from b");
    // Per-stream epochs: b (5 batches an epoch) went round many times, each epoch once.
    for stream in [0usize, 1] {
        let per_epoch = if stream == 0 { 24 } else { 5 };
        let mut by_epoch = std::collections::BTreeMap::<u64, Vec<u64>>::new();
        for (s, e, ids) in &got {
            if *s == stream {
                by_epoch.entry(*e).or_default().extend(ids);
            }
        }
        let complete: Vec<_> = by_epoch.iter().filter(|(_, ids)| ids.len() == per_epoch * 4).collect();
        assert!(!complete.is_empty(), "stream {stream}: no complete epoch");
        for (e, ids) in complete {
            let mut ids = ids.clone();
            ids.sort_unstable();
            assert_eq!(ids, (0..(per_epoch * 4) as u64).collect::<Vec<_>>(), "stream {stream} epoch {e}");
        }
    }
    assert_eq!(m.step(), 400);
    assert!(m.epochs()[1] > 10, "{:?}", m.epochs());
}

#[test]
fn the_same_seed_gives_the_same_mix_and_a_saved_state_resumes_it_exactly() {
    let fx = Fixture::new();
    let (a, b) = two(&fx);
    let whole = take(&mut mix(&fx, &a, &b, 0, 1), 90);
    assert_eq!(whole, take(&mut mix(&fx, &a, &b, 0, 1), 90));
    let mut first = mix(&fx, &a, &b, 0, 1);
    let mut got = take(&mut first, 37);
    let state: MixState = serde_json::from_str(&serde_json::to_string(&first.state()).unwrap()).unwrap();
    drop(first);
    let mut resumed = mix(&fx, &a, &b, 0, 1);
    resumed.load_state(&state).unwrap();
    got.extend(take(&mut resumed, 53));
    assert_eq!(got, whole);
    // Another seed or other weights refuse the state.
    let mut other =
        Mix::new(vec![(loader(&fx, &a, "mix/a", 0, 1), 0.5), (loader(&fx, &b, "mix/b", 0, 1), 0.5)], 11).unwrap();
    assert!(other.load_state(&state).unwrap_err().to_string().contains("weights"));
}

#[test]
fn ranks_draw_the_same_streams_and_split_each_stream() {
    let fx = Fixture::new();
    let (a, b) = two(&fx);
    let r0 = take(&mut mix(&fx, &a, &b, 0, 2), 40);
    let r1 = take(&mut mix(&fx, &a, &b, 1, 2), 40);
    for (x, y) in r0.iter().zip(&r1) {
        assert_eq!((x.0, x.1), (y.0, y.1), "ranks must draw the same stream at each step");
        assert!(x.2.iter().all(|id| !y.2.contains(id)), "ranks overlap: {x:?} {y:?}");
    }
}

#[test]
fn each_stream_is_authorized_on_its_own() {
    let fx = Fixture::new();
    let (a, b) = two(&fx);
    // b's loader holds a's token: b's shards are denied, a's are read.
    let wrong = fx.loader(&b, "mix/a").batch_size(4).build();
    let err = match wrong {
        Err(e) => e,
        Ok(l) => {
            let mut m = Mix::new(vec![(loader(&fx, &a, "mix/a", 0, 1), 1.0), (l, 1.0)], 0).unwrap();
            (0..50).find_map(|_| m.next_batch().err()).expect("b's batches must be denied")
        }
    };
    assert!(matches!(err, shardlock::Error::AccessDenied { .. }), "{err}");
    assert!(Mix::new(vec![], 0).is_err());
    assert!(Mix::new(vec![(loader(&fx, &a, "mix/a", 0, 1), 0.0)], 0).is_err());
}
