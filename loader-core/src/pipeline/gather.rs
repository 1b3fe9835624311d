//! Gathering one batch: the samples of a batch, field by field, decrypted from their
//! shards' authenticated chunks into one locked buffer from the pool.

use std::sync::Arc;

use super::batch::{Batch, BatchLayout, FieldSlot};
use super::epoch::EpochWork;
use super::plan::SampleRef;
use crate::crypto::chunked::CHUNK_LEN;
use crate::dataset::{FetchedChunks, OpenShard};
use crate::error::{Error, Result};
use crate::format::FieldKind;
use crate::memory::{LockedBuf, MemoryPolicy};

/// A worker's scratch chunk, in locked memory, holding the last chunk it decrypted
/// (shard, chunk) so that neighbouring samples in one chunk decrypt it once.
pub(super) struct ChunkScratch {
    key: Option<(u32, u64)>,
    buf: LockedBuf,
}

impl ChunkScratch {
    pub(super) fn new(policy: MemoryPolicy) -> Result<Self> {
        Ok(Self { key: None, buf: LockedBuf::new(CHUNK_LEN, policy)? })
    }
}

fn align64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

/// Gathers batch `k` of the epoch into a buffer from the pool.
pub(super) fn fill(work: &EpochWork, k: usize, cc: &mut ChunkScratch) -> Result<Batch> {
    let session = &work.session;
    let b = session.batch_size;
    let refs = &work.samples[k * b..((k + 1) * b).min(work.samples.len())];
    let n = refs.len();
    let mut open: Vec<(u32, Arc<OpenShard>)> = Vec::new();
    let mut shard_of = Vec::with_capacity(n);
    for r in refs {
        let pos = match open.iter().position(|(s, _)| *s == r.shard()) {
            Some(p) => p,
            None => {
                open.push((r.shard(), work.shards.get(session, r.shard())?));
                open.len() - 1
            }
        };
        shard_of.push(pos);
    }
    let schema = &session.ds.manifest().schema;
    let mut slots = Vec::with_capacity(session.selected.len());
    let mut off = 0usize;
    for &pf in &session.selected {
        let f = &schema.fields[pf];
        let name: Arc<str> = Arc::from(f.name.as_str());
        match f.fixed_len() {
            Some(l) => {
                off = align64(off);
                let len = l as usize * n;
                slots.push(FieldSlot {
                    name,
                    schema_pos: pf,
                    kind: f.kind.clone(),
                    offset: off,
                    len,
                    offsets_at: None,
                });
                off += len;
            }
            None => {
                off = align64(off);
                let at = off;
                off += 8 * (n + 1);
                off = align64(off);
                let len: u64 = refs
                    .iter()
                    .zip(&shard_of)
                    .map(|(r, &p)| {
                        let (a, z) = open[p].1.index().field_range(u64::from(r.record()), pf);
                        z - a
                    })
                    .sum();
                slots.push(FieldSlot {
                    name,
                    schema_pos: pf,
                    kind: f.kind.clone(),
                    offset: off,
                    len: len as usize,
                    offsets_at: Some(at),
                });
                off += len as usize;
            }
        }
    }
    let ids: Vec<u64> = refs.iter().map(|r| session.prefix[r.shard() as usize] + u64::from(r.record())).collect();
    let total = off.max(1);
    let buf = session.pool.take(total)?;
    let mut batch = Batch {
        buf: Some(buf),
        pool: session.pool.clone(),
        layout: BatchLayout { slots: Arc::from(slots), samples: ids, index: k as u64, epoch: work.epoch },
        pid: work.pid,
    };
    let slots = batch.layout.slots.clone();
    let Some(out) = batch.buf.as_mut().map(|b| b.prefix_mut(total)) else {
        return Err(Error::Internal("batch without a buffer".into()));
    };
    let fetched = fetch_ranged(&open, refs, &shard_of, &slots)?;
    // Decrypt in storage order (shard, record) so neighbouring samples share the
    // worker's cached chunk, while each sample lands in its shuffled slot.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by_key(|&j| refs[j].0);
    for slot in slots.iter() {
        // Destination of each sample: fixed stride, or prefix sums of byte lengths.
        let mut dest = Vec::with_capacity(n + 1);
        let mut w = slot.offset;
        // Offsets count elements for a list field (whole elements: the index checks it).
        let unit = match slot.kind {
            FieldKind::List { dtype } => dtype.size() as u64,
            _ => 1,
        };
        for (r, &p) in refs.iter().zip(&shard_of) {
            dest.push(w);
            let (a, z) = open[p].1.index().field_range(u64::from(r.record()), slot.schema_pos);
            w += (z - a) as usize;
        }
        dest.push(w);
        if let Some(at) = slot.offsets_at {
            for (j, d) in dest.iter().enumerate() {
                out[at + 8 * j..at + 8 * j + 8].copy_from_slice(&((d - slot.offset) as u64 / unit).to_le_bytes());
            }
        }
        // Coalesce samples that are contiguous both in the shard and in the batch
        // (sequential reads of one field): whole chunks then decrypt straight into
        // the batch instead of through the chunk cache.
        let mut run: Option<(usize, u64, u64, usize)> = None; // (open idx, a, z, dest start)
        for &j in &order {
            let p = shard_of[j];
            let (a, z) = open[p].1.index().field_range(u64::from(refs[j].record()), slot.schema_pos);
            if let Some((rp, ra, rz, rd)) = run {
                if rp == p && rz == a && rd + (rz - ra) as usize == dest[j] {
                    run = Some((rp, ra, z, rd));
                    continue;
                }
                copy_plain(&open[rp], &fetched, rp, ra, rz, &mut out[rd..rd + (rz - ra) as usize], cc)?;
            }
            run = Some((p, a, z, dest[j]));
        }
        if let Some((rp, ra, rz, rd)) = run {
            copy_plain(&open[rp], &fetched, rp, ra, rz, &mut out[rd..rd + (rz - ra) as usize], cc)?;
        }
    }
    Ok(batch)
}

/// For shards read by ranges (remote, `global` shuffle, not cached): the plaintext
/// ranges this batch needs from each, fetched in one burst (mapped shards need none).
fn fetch_ranged(
    open: &[(u32, Arc<OpenShard>)],
    refs: &[SampleRef],
    shard_of: &[usize],
    slots: &[FieldSlot],
) -> Result<FetchedChunks> {
    if !open.iter().any(|(_, s)| s.is_ranged()) {
        return Ok(FetchedChunks::default());
    }
    let mut wanted: Vec<Vec<(u64, u64)>> = vec![Vec::new(); open.len()];
    for (r, &p) in refs.iter().zip(shard_of) {
        for slot in slots {
            wanted[p].push(open[p].1.index().field_range(u64::from(r.record()), slot.schema_pos));
        }
    }
    let shards: Vec<&OpenShard> = open.iter().map(|(_, s)| &**s).collect();
    FetchedChunks::fetch(&shards, &wanted)
}

/// Copies authenticated plaintext `[a, z)` of shard `open.1` (position `p` of the
/// batch's shards) into `dest`: whole chunks are decrypted straight into the batch,
/// partial ones through the worker's scratch chunk. Chunks of a shard read by ranges
/// come from `fetched`.
fn copy_plain(
    open: &(u32, Arc<OpenShard>),
    fetched: &FetchedChunks,
    p: usize,
    a: u64,
    z: u64,
    dest: &mut [u8],
    cc: &mut ChunkScratch,
) -> Result<()> {
    let (sid, shard) = (open.0, &*open.1);
    let decrypt = |k: u64, out: &mut [u8]| fetched.decrypt(p, shard, k, out);
    let mut pos = a;
    let mut w = 0usize;
    while pos < z {
        let k = pos / CHUNK_LEN as u64;
        let within = (pos % CHUNK_LEN as u64) as usize;
        let n = shard.chunk_plaintext_len(k);
        let take = ((z - pos) as usize).min(n - within);
        let cached = cc.key == Some((sid, k));
        if within == 0 && take == n && !cached {
            decrypt(k, &mut dest[w..w + n])?;
        } else {
            if !cached {
                cc.key = None;
                decrypt(k, &mut cc.buf.as_mut_slice()[..CHUNK_LEN])?;
                cc.key = Some((sid, k));
            }
            dest[w..w + take].copy_from_slice(&cc.buf.as_slice()[within..within + take]);
        }
        w += take;
        pos += take as u64;
    }
    Ok(())
}
