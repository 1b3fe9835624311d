//! [`Mix`]: weighted mixing of datasets, one batch at a time.
//!
//! Each stream is a [`Loader`] of its own (its own dataset, token, key custody and
//! trust anchor, each authorized on its own; its own shuffle, seed and rank split).
//! Step `t` of the mix takes the next batch of stream `choose(seed, t, weights)`, a pure
//! function of the seed and the step, so every rank draws the same stream at the same
//! step and a resumed mix continues the same sequence. A stream that reaches the end
//! of its epoch starts its next epoch (its own count), so the mix never runs dry; stop
//! it after the steps you want. Each batch holds samples of one stream (litdata's
//! `batching_method="per_stream"`).

use serde::{Deserialize, Serialize};

use super::batch::Batch;
use super::loader::{Loader, LoaderState};
use crate::error::{Error, Result};
use crate::rng::splitmix64;

/// A batch of a [`Mix`], with the stream it came from.
pub struct MixBatch {
    /// The stream's position in [`Mix::new`]'s list.
    pub stream: usize,
    /// The stream's epoch the batch belongs to.
    pub epoch: u64,
    /// The batch.
    pub batch: Batch,
}

/// Serializable resume state of a [`Mix`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MixState {
    /// The mix seed (must match on restore).
    pub seed: u64,
    /// The weights, as given (must match on restore).
    pub weights: Vec<f64>,
    /// Batches the mix has yielded.
    pub step: u64,
    /// Each stream's loader state.
    pub streams: Vec<LoaderState>,
}

/// Interleaves several loaders by weight, deterministically (module docs).
pub struct Mix {
    loaders: Vec<Loader>,
    weights: Vec<f64>,
    cumulative: Vec<f64>,
    seed: u64,
    step: u64,
    failed: bool,
}

impl Mix {
    /// Mixes `streams`, each a loader and its weight (any positive finite numbers; they
    /// are normalized). The loaders should agree on the fields they deliver (select
    /// common ones with [`super::LoaderBuilder::fields`]).
    pub fn new(streams: Vec<(Loader, f64)>, seed: u64) -> Result<Self> {
        let weights: Vec<f64> = streams.iter().map(|(_, w)| *w).collect();
        let cumulative = cumulative(&weights)?;
        Ok(Self {
            loaders: streams.into_iter().map(|(l, _)| l).collect(),
            weights,
            cumulative,
            seed,
            step: 0,
            failed: false,
        })
    }

    /// The stream step `step` of a mix with `seed` and these normalized cumulative
    /// weights reads: splitmix64 of (seed, step) as a uniform number in [0, 1),
    /// located among the cumulative weights.
    pub fn choose(seed: u64, step: u64, weights: &[f64]) -> Result<usize> {
        let cum = cumulative(weights)?;
        Ok(pick(&cum, seed, step))
    }

    /// Batches yielded so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The epoch each stream reads now.
    pub fn epochs(&self) -> Vec<u64> {
        self.loaders.iter().map(Loader::epoch).collect()
    }

    /// The streams' loaders.
    pub fn loaders(&self) -> &[Loader] {
        &self.loaders
    }

    /// The next batch: step [`Mix::step`]'s stream's next batch, starting that stream's
    /// next epoch when its current one has ended. A stream with no batch in a whole
    /// epoch is an error naming it. After an error the mix yields only errors (state
    /// from before it still restores).
    pub fn next_batch(&mut self) -> Result<MixBatch> {
        if self.failed {
            return Err(Error::InvalidArgument(
                "this mix stopped at an earlier error: restore a saved state into a new Mix".into(),
            ));
        }
        let s = pick(&self.cumulative, self.seed, self.step);
        let r = self.next_of(s);
        match r {
            Ok(b) => {
                self.step += 1;
                Ok(b)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn next_of(&mut self, s: usize) -> Result<MixBatch> {
        let loader = &mut self.loaders[s];
        // An epoch end: the next call starts the stream's next epoch.
        for _ in 0..2 {
            let epoch = loader.epoch();
            if let Some(b) = loader.next() {
                return b.map(|batch| MixBatch { stream: s, epoch, batch });
            }
        }
        Err(Error::InvalidArgument(format!(
            "mix stream {s} ({}) yields no batch in a whole epoch: too few samples for its batch size on this rank",
            loader.dataset().manifest().dataset_id
        )))
    }

    /// Resume state: restore it into a mix of the same streams (same weights and seed)
    /// to continue without duplicates or gaps in any stream.
    pub fn state(&self) -> MixState {
        MixState {
            seed: self.seed,
            weights: self.weights.clone(),
            step: self.step,
            streams: self.loaders.iter().map(Loader::state).collect(),
        }
    }

    /// Restores a state from [`Mix::state`].
    pub fn load_state(&mut self, s: &MixState) -> Result<()> {
        if s.seed != self.seed || s.weights != self.weights || s.streams.len() != self.loaders.len() {
            return Err(Error::InvalidArgument(format!(
                "mix state is for seed {} and weights {:?}; this mix has seed {} and weights {:?}",
                s.seed, s.weights, self.seed, self.weights
            )));
        }
        for (i, (l, st)) in self.loaders.iter_mut().zip(&s.streams).enumerate() {
            l.load_state(st).map_err(|e| match e {
                Error::InvalidArgument(d) => Error::InvalidArgument(format!("mix stream {i}: {d}")),
                e => e,
            })?;
        }
        self.step = s.step;
        self.failed = false;
        Ok(())
    }
}

impl Iterator for Mix {
    type Item = Result<MixBatch>;

    /// Never `None`: the mix starts each stream's next epoch as needed.
    fn next(&mut self) -> Option<Self::Item> {
        Some(self.next_batch())
    }
}

fn cumulative(weights: &[f64]) -> Result<Vec<f64>> {
    if weights.is_empty() {
        return Err(Error::InvalidArgument("a mix needs at least one stream".into()));
    }
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w > 0.0)) {
        return Err(Error::InvalidArgument(format!(
            "mix stream {i} has weight {w}: weights must be positive and finite"
        )));
    }
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    Ok(weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect())
}

fn pick(cumulative: &[f64], seed: u64, step: u64) -> usize {
    let u = (splitmix64(splitmix64(seed) ^ step) >> 11) as f64 / (1u64 << 53) as f64;
    cumulative.iter().position(|&c| u < c).unwrap_or(cumulative.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unwrap_used)]
    fn choices_follow_the_weights_and_bad_weights_are_refused() {
        let w = [0.7, 0.2, 0.1];
        let n = 20_000;
        let mut counts = [0usize; 3];
        for t in 0..n {
            counts[Mix::choose(5, t, &w).unwrap()] += 1;
        }
        for (c, p) in counts.iter().zip(w) {
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!((*c as f64 - n as f64 * p).abs() < 5.0 * sd, "{counts:?}");
        }
        // A pure function of (seed, step); another seed, another sequence.
        let a: Vec<usize> = (0..64).map(|t| Mix::choose(5, t, &w).unwrap()).collect();
        assert_eq!(a, (0..64).map(|t| Mix::choose(5, t, &w).unwrap()).collect::<Vec<_>>());
        assert_ne!(a, (0..64).map(|t| Mix::choose(6, t, &w).unwrap()).collect::<Vec<_>>());
        for bad in [vec![], vec![1.0, 0.0], vec![1.0, -1.0], vec![f64::NAN], vec![f64::INFINITY]] {
            assert!(Mix::choose(0, 0, &bad).is_err(), "{bad:?}");
        }
    }
}
