//! Chunks of shards read by ranges (remote, `global` shuffle, not cached), fetched for
//! one batch in one burst of concurrent ranged reads. Nothing here is decrypted until
//! [`FetchedChunks::decrypt`] authenticates a chunk.

use super::shard::{run_chunk, SealedRun};
use super::OpenShard;
use crate::crypto::chunked::CHUNK_LEN;
use crate::error::Result;

/// Per shard of a batch (by position), the runs of sealed chunks fetched for it, sorted
/// by first chunk; empty for mapped shards.
#[derive(Default)]
pub(crate) struct FetchedChunks {
    runs: Vec<Vec<SealedRun>>,
}

impl FetchedChunks {
    /// Fetches every chunk covering the plaintext ranges `wanted[p]` of `shards[p]`,
    /// for the shards read by ranges, adjacent chunks coalesced into one read. Every
    /// shard of one dataset shares its source, so one burst serves them all; a failure
    /// is a typed [`crate::Error::Remote`] naming the shard object.
    pub(crate) fn fetch(shards: &[&OpenShard], wanted: &[Vec<(u64, u64)>]) -> Result<Self> {
        let c = CHUNK_LEN as u64;
        let mut reqs = Vec::new();
        let mut owners = Vec::new();
        let mut src = None;
        for (p, (shard, ranges)) in shards.iter().zip(wanted).enumerate() {
            if !shard.is_ranged() {
                continue;
            }
            let mut chunks: Vec<(u64, u64)> =
                ranges.iter().filter(|(a, z)| z > a).map(|&(a, z)| (a / c, (z - 1) / c + 1)).collect();
            chunks.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::with_capacity(chunks.len());
            for (a, z) in chunks {
                match merged.last_mut() {
                    Some(m) if a <= m.1 => m.1 = m.1.max(z),
                    _ => merged.push((a, z)),
                }
            }
            for (a, z) in merged {
                let (s, req) = shard.fetch_request(a, z)?;
                src.get_or_insert_with(|| s.clone());
                reqs.push(req);
                owners.push((p, a, z));
            }
        }
        let mut runs: Vec<Vec<SealedRun>> = (0..shards.len()).map(|_| Vec::new()).collect();
        let Some(src) = src else { return Ok(Self { runs }) };
        let got = src.get_ranges(&reqs)?;
        for ((p, first, end), (bytes, _)) in owners.into_iter().zip(got) {
            runs[p].push(SealedRun { first, end, bytes });
        }
        Ok(Self { runs })
    }

    /// Decrypts chunk `k` of `shard` (position `p` of [`FetchedChunks::fetch`]'s
    /// shards) into `out`: from the fetched run that holds it, else straight from the
    /// shard (a mapped shard, or a chunk this batch did not plan for).
    pub(crate) fn decrypt(&self, p: usize, shard: &OpenShard, k: u64, out: &mut [u8]) -> Result<usize> {
        if shard.is_ranged() {
            if let Some(runs) = self.runs.get(p) {
                let i = runs.partition_point(|r| r.end <= k);
                if let Some(run) = runs.get(i).filter(|r| r.first <= k) {
                    debug_assert!(run_chunk(shard.message(), run, k).is_some());
                    return shard.open_fetched(run, k, out);
                }
            }
        }
        shard.decrypt_chunk(k, out)
    }
}
