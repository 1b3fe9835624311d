//! The epoch plan: which samples each rank reads, in which order.
//!
//! 1. A global order `O` of every sample for (seed, epoch, shuffle mode):
//!    - `None`: shards in order, records in order;
//!    - `Window`: shard order permuted; within each window of `window_shards` shards,
//!      *runs* of `run` consecutive records are permuted, then samples are shuffled
//!      within each batch-sized block. Reads stay mostly sequential (a chunk is
//!      decrypted about once: workers decrypt a batch in storage order), at some cost
//!      in shuffle quality (a batch holds a few runs);
//!    - `Global`: a uniform permutation of all samples (each sample decrypts the
//!      chunks that cover it; small samples pay for whole chunks).
//! 2. Samples already consumed before a resume are removed from `O`.
//! 3. The rest is dealt to `world` ranks in blocks of `block` samples (rank `r` gets
//!    blocks `r, r + world, ...`), the last partial round sample by sample, then each
//!    rank's list is cut (`Remainder::Drop`) or padded (`Remainder::Pad`) to the same
//!    length. Ranks are disjoint and together cover the epoch.
//!
//! Nothing depends on timing or the number of worker threads.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Shuffle mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shuffle {
    /// Dataset order.
    None,
    /// Shard order permuted; runs of records shuffled within windows of shards.
    Window,
    /// A uniform permutation of all samples.
    Global,
}

impl Shuffle {
    /// Parses "none", "window", "global".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Self::None),
            "window" => Ok(Self::Window),
            "global" => Ok(Self::Global),
            o => Err(Error::InvalidArgument(format!("shuffle {o:?}: use none, window or global"))),
        }
    }
}

/// How to make every rank's sample count equal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Remainder {
    /// Drop the few samples that do not divide evenly (default).
    #[default]
    Drop,
    /// Repeat samples from the start of the epoch.
    Pad,
}

/// A sample: (shard, record) packed as `shard << 32 | record`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleRef(pub u64);

impl SampleRef {
    /// Builds a reference.
    pub fn new(shard: u32, record: u32) -> Self {
        Self((u64::from(shard) << 32) | u64::from(record))
    }
    /// Shard index.
    pub fn shard(self) -> u32 {
        (self.0 >> 32) as u32
    }
    /// Record within the shard.
    pub fn record(self) -> u32 {
        self.0 as u32
    }
}

/// One segment of consumption history: `consumed` samples per rank were read with
/// `world` ranks before a save.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumed {
    /// World size at the time.
    pub world: u32,
    /// Samples each rank had consumed.
    pub per_rank: u64,
}

/// Everything that determines an epoch's order.
#[derive(Clone, Debug)]
pub struct PlanSpec {
    /// Records per shard, by shard index.
    pub records: Vec<u64>,
    /// Shuffle mode.
    pub shuffle: Shuffle,
    /// Shards per window (`Window`).
    pub window_shards: usize,
    /// Records per run (`Window`).
    pub run: usize,
    /// Seed.
    pub seed: u64,
    /// Samples per rank block.
    pub block: usize,
    /// Drop or pad.
    pub remainder: Remainder,
}

/// SplitMix64: a small, well-mixed deterministic generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, epoch: u64, salt: u64) -> Self {
        let mut r = Self(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ salt.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next();
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n) (Lemire's method, without the rejection step's bias
    /// mattering for shuffling at these sizes).
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// The global order of an epoch, before any rank split.
pub fn global_order(spec: &PlanSpec, epoch: u64) -> Vec<SampleRef> {
    let total: u64 = spec.records.iter().sum();
    let mut order = Vec::with_capacity(total as usize);
    let shard_list = |rng: Option<&mut Rng>| {
        let mut s: Vec<u32> = (0..spec.records.len() as u32).collect();
        if let Some(r) = rng {
            r.shuffle(&mut s);
        }
        s
    };
    match spec.shuffle {
        Shuffle::None => {
            for s in shard_list(None) {
                order.extend((0..spec.records[s as usize] as u32).map(|r| SampleRef::new(s, r)));
            }
        }
        Shuffle::Global => {
            for s in shard_list(None) {
                order.extend((0..spec.records[s as usize] as u32).map(|r| SampleRef::new(s, r)));
            }
            Rng::new(spec.seed, epoch, 1).shuffle(&mut order);
        }
        Shuffle::Window => {
            let mut rng = Rng::new(spec.seed, epoch, 2);
            let shards = shard_list(Some(&mut rng));
            let run = spec.run.max(1);
            for window in shards.chunks(spec.window_shards.max(1)) {
                let mut runs: Vec<Vec<SampleRef>> = Vec::new();
                for &s in window {
                    let n = spec.records[s as usize] as u32;
                    let mut start = 0u32;
                    while start < n {
                        let end = start.saturating_add(u32::try_from(run).unwrap_or(u32::MAX)).min(n);
                        runs.push((start..end).map(|r| SampleRef::new(s, r)).collect());
                        start = end;
                    }
                }
                rng.shuffle(&mut runs);
                let start = order.len();
                for r in runs {
                    order.extend(r);
                }
                // Mix samples across each batch-sized block of runs too: workers decrypt
                // a batch in storage order, so this costs no extra decryption.
                for block in order[start..].chunks_mut(spec.block.max(1)) {
                    rng.shuffle(block);
                }
            }
        }
    }
    order
}

/// Positions (indexes into `len` remaining samples) that rank `rank` of `world` reads,
/// before equalisation.
fn deal(len: usize, world: usize, rank: usize, block: usize) -> Vec<usize> {
    let block = block.max(1);
    let round = block * world;
    let full_rounds = len / round;
    let mut out = Vec::with_capacity(len / world + block);
    for k in 0..full_rounds {
        let start = k * round + rank * block;
        out.extend(start..start + block);
    }
    // The last partial round sample by sample, so counts differ by at most one.
    let tail = full_rounds * round;
    out.extend((tail + rank..len).step_by(world));
    out
}

/// Per-rank length after equalisation.
fn rank_len(len: usize, world: usize, remainder: Remainder) -> usize {
    match remainder {
        Remainder::Drop => len / world,
        Remainder::Pad => len.div_ceil(world),
    }
}

/// Largest world size (ranks x DataLoader workers) a resume state may name.
pub(crate) const MAX_WORLD: u32 = 1 << 20;

/// Most save/restore segments a resume state may hold within one epoch.
pub(crate) const MAX_HISTORY: usize = 1024;

/// Removes the samples consumed in `history` from `order` (applied in sequence).
pub fn remaining(mut order: Vec<SampleRef>, history: &[Consumed], spec: &PlanSpec) -> Result<Vec<SampleRef>> {
    if history.len() > MAX_HISTORY {
        return Err(Error::InvalidArgument(format!(
            "resume state has {} save/restore segments, more than {MAX_HISTORY}: the state is corrupt or not \
             from this loader",
            history.len()
        )));
    }
    for h in history {
        // A hostile or corrupt state must not make the loop below run ~2^32 times.
        if h.world > MAX_WORLD {
            return Err(Error::InvalidArgument(format!(
                "resume state names a world size of {}, more than the {MAX_WORLD} ranks a loader supports: \
                 the state is corrupt or not from this loader",
                h.world
            )));
        }
        let world = h.world.max(1) as usize;
        let len = rank_len(order.len(), world, spec.remainder);
        if h.per_rank as usize > len {
            return Err(Error::InvalidArgument(format!(
                "resume state says {} samples per rank were consumed, but the epoch has {len} per rank",
                h.per_rank
            )));
        }
        let mut taken = vec![false; order.len()];
        for r in 0..world {
            for &p in deal(order.len(), world, r, spec.block).iter().take(h.per_rank as usize) {
                taken[p] = true;
            }
        }
        order = order.into_iter().zip(taken).filter(|(_, t)| !t).map(|(s, _)| s).collect();
    }
    Ok(order)
}

/// The samples rank `rank` of `world` reads this epoch, in order, after `history`.
pub fn rank_samples(
    spec: &PlanSpec,
    epoch: u64,
    rank: u32,
    world: u32,
    history: &[Consumed],
) -> Result<Vec<SampleRef>> {
    if world == 0 || rank >= world {
        return Err(Error::InvalidArgument(format!("rank {rank} of world size {world}")));
    }
    let order = remaining(global_order(spec, epoch), history, spec)?;
    let (w, r) = (world as usize, rank as usize);
    let len = rank_len(order.len(), w, spec.remainder);
    let mut mine: Vec<SampleRef> = deal(order.len(), w, r, spec.block).into_iter().map(|p| order[p]).collect();
    mine.truncate(len);
    // Pad: a rank one short repeats samples from the start of the epoch.
    let mut i = 0;
    while mine.len() < len && !order.is_empty() {
        mine.push(order[i % order.len()]);
        i += 1;
    }
    Ok(mine)
}

/// Batches a rank reads in `samples` of its epoch: all full ones, and a last partial one
/// unless `drop_last`.
pub(crate) fn batch_count(samples: usize, batch: usize, drop_last: bool) -> usize {
    let b = batch.max(1);
    if drop_last {
        samples / b
    } else {
        samples.div_ceil(b)
    }
}

/// The samples DataLoader worker `worker` of `workers` reads out of its rank's list
/// `mine`: the rank's batches `worker`, `worker + workers`, ..., after the first
/// `skip` of those, each whole (the rank's last partial batch only unless
/// `drop_last`). With one worker and nothing skipped this is `mine` (cut to whole
/// batches under `drop_last`).
pub(crate) fn worker_samples(
    mine: Vec<SampleRef>,
    batch: usize,
    drop_last: bool,
    (worker, workers): (u32, u32),
    skip: u64,
) -> Vec<SampleRef> {
    let b = batch.max(1);
    let n = batch_count(mine.len(), b, drop_last);
    if workers <= 1 && skip == 0 {
        let mut mine = mine;
        mine.truncate(n * b);
        return mine;
    }
    let skip = usize::try_from(skip).unwrap_or(usize::MAX);
    let mut out = Vec::with_capacity(mine.len() / workers.max(1) as usize + b);
    for k in (worker as usize..n).step_by(workers.max(1) as usize).skip(skip) {
        out.extend_from_slice(&mine[k * b..((k + 1) * b).min(mine.len())]);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn spec(shuffle: Shuffle, block: usize) -> PlanSpec {
        PlanSpec {
            records: vec![37, 50, 1, 0, 64, 23],
            shuffle,
            window_shards: 2,
            run: 8,
            seed: 7,
            block,
            remainder: Remainder::Drop,
        }
    }

    #[test]
    fn every_mode_is_a_permutation_and_seeded() {
        for mode in [Shuffle::None, Shuffle::Window, Shuffle::Global] {
            let s = spec(mode, 4);
            let o = global_order(&s, 3);
            assert_eq!(o.len(), 175);
            assert_eq!(o.iter().collect::<HashSet<_>>().len(), 175);
            assert_eq!(o, global_order(&s, 3));
            if mode != Shuffle::None {
                assert_ne!(o, global_order(&s, 4), "{mode:?} must differ across epochs");
            }
        }
    }

    #[test]
    fn ranks_are_disjoint_equal_and_cover_the_epoch() {
        for world in 1..6u32 {
            for block in [1, 4, 16] {
                let s = spec(Shuffle::Window, block);
                let lists: Vec<Vec<SampleRef>> =
                    (0..world).map(|r| rank_samples(&s, 0, r, world, &[]).unwrap()).collect();
                let len = lists[0].len();
                assert!(lists.iter().all(|l| l.len() == len));
                let all: HashSet<_> = lists.iter().flatten().collect();
                assert_eq!(all.len(), len * world as usize, "disjoint");
                assert!(175 - all.len() < world as usize, "only the remainder is dropped");
            }
        }
    }

    #[test]
    fn dataloader_workers_share_the_rank_batches_and_drop_one_partial_batch() {
        let s = spec(Shuffle::Window, 8);
        let mine = rank_samples(&s, 1, 1, 2, &[]).unwrap(); // 87 samples: 10 full batches + 7
        for drop_last in [true, false] {
            for workers in 1..5u32 {
                let parts: Vec<Vec<SampleRef>> =
                    (0..workers).map(|w| worker_samples(mine.clone(), 8, drop_last, (w, workers), 0)).collect();
                // Taking one batch from each worker in turn gives the rank's batches in order.
                let mut round_robin = Vec::new();
                let mut batches: Vec<_> = parts.iter().map(|p| p.chunks(8)).collect();
                'outer: loop {
                    for it in batches.iter_mut() {
                        match it.next() {
                            Some(b) => round_robin.extend_from_slice(b),
                            None => break 'outer,
                        }
                    }
                }
                let want = if drop_last { &mine[..80] } else { &mine[..] };
                assert_eq!(round_robin, want, "drop_last {drop_last}, {workers} workers");
                // Skipping a worker's first batches leaves the rest of its own.
                let rest = worker_samples(mine.clone(), 8, drop_last, (0, workers), 1);
                assert_eq!(rest, parts[0][8.min(parts[0].len())..]);
            }
        }
    }

    #[test]
    fn pad_repeats_only_what_is_needed() {
        let mut s = spec(Shuffle::Global, 4);
        s.remainder = Remainder::Pad;
        let lists: Vec<Vec<SampleRef>> = (0..4).map(|r| rank_samples(&s, 1, r, 4, &[]).unwrap()).collect();
        assert!(lists.iter().all(|l| l.len() == 44));
        let all: HashSet<_> = lists.iter().flatten().collect();
        assert_eq!(all.len(), 175);
    }

    #[test]
    fn resume_with_a_new_world_size_is_exactly_one_epoch() {
        let s = spec(Shuffle::Window, 4);
        // World 3 reads 10 samples per rank, saves; world 2 reads 5 per rank, saves;
        // world 1 reads the rest.
        let mut seen = Vec::new();
        for r in 0..3 {
            seen.extend(rank_samples(&s, 2, r, 3, &[]).unwrap().into_iter().take(10));
        }
        let h1 = [Consumed { world: 3, per_rank: 10 }];
        for r in 0..2 {
            seen.extend(rank_samples(&s, 2, r, 2, &h1).unwrap().into_iter().take(5));
        }
        let h2 = [h1[0], Consumed { world: 2, per_rank: 5 }];
        seen.extend(rank_samples(&s, 2, 0, 1, &h2).unwrap());
        assert_eq!(seen.len(), 175);
        assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 175);
    }
}
