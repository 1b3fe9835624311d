//! Gathering one batch: the samples of a batch, field by field, decrypted from their
//! shards' authenticated chunks into one locked buffer from the pool.

use std::sync::Arc;

use super::batch::{Batch, BatchLayout, FieldSlot};
use super::epoch::EpochWork;
use super::plan::SampleRef;
use crate::codec::Decompressor;
use crate::crypto::chunked::CHUNK_LEN;
use crate::dataset::{FetchedChunks, OpenShard};
use crate::decode::{DecodeFail, ImageDecode, ImageWorker, OnDecodeError, SampleKey};
use crate::error::{Error, Result};
use crate::format::{Field, FieldKind};
use crate::memory::{LockedBuf, MemoryPolicy};

/// A worker's scratch, all in locked memory: the last chunk it decrypted (shard, chunk)
/// so that neighbouring samples in one chunk decrypt it once, and for compressed
/// fields the batch's stored frames and a zstd context, for decoded image fields the
/// encoded value and the decoder's state (each made on first use).
pub(super) struct ChunkScratch {
    chunk: Chunk,
    frames: Option<LockedBuf>,
    unzstd: Option<Decompressor>,
    encoded: Option<LockedBuf>,
    images: Option<ImageWorker>,
    policy: MemoryPolicy,
}

struct Chunk {
    key: Option<(u32, u64)>,
    buf: LockedBuf,
}

impl ChunkScratch {
    pub(super) fn new(policy: MemoryPolicy) -> Result<Self> {
        Ok(Self {
            chunk: Chunk { key: None, buf: LockedBuf::new(CHUNK_LEN, policy)? },
            frames: None,
            unzstd: None,
            encoded: None,
            images: None,
            policy,
        })
    }

    /// The frames buffer, at least `len` bytes (a smaller one is wiped and replaced).
    fn frames(&mut self, len: usize) -> Result<&mut LockedBuf> {
        LockedBuf::ensure(&mut self.frames, len, self.policy)
    }
}

/// Where the stored frame of one (compressed field, sample) lies in the worker's
/// frames buffer, and the value length it declares.
#[derive(Clone, Copy)]
struct Frame {
    at: usize,
    stored: usize,
    len: usize,
}

fn align64(x: usize) -> usize {
    x.div_ceil(64) * 64
}

/// Gathers batch `k` of the epoch into a buffer from the pool.
pub(super) fn fill(work: &EpochWork, k: usize, cc: &mut ChunkScratch) -> Result<Batch> {
    let b = work.session.batch_size;
    let planned = &work.samples[k * b..((k + 1) * b).min(work.samples.len())];
    // The batch's samples less those skipped so far (copied only once one is skipped).
    let mut kept: Option<Vec<SampleRef>> = None;
    loop {
        let refs = kept.as_deref().unwrap_or(planned);
        match gather(work, k, refs, cc)? {
            Gathered::Batch(batch) => return Ok(batch),
            // Samples whose image did not decode (`on_decode_error = skip`): gather the
            // batch again without them; they are audited and counted.
            Gathered::Skip(skipped) => {
                for (_, err) in &skipped {
                    record_skip(work, err)?;
                }
                let rest: Vec<SampleRef> = refs
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| !skipped.iter().any(|(s, _)| s == j))
                    .map(|(_, r)| *r)
                    .collect();
                if rest.is_empty() {
                    let last = skipped.into_iter().next_back().map(|(_, e)| e);
                    return Err(last.unwrap_or_else(|| Error::Internal("an empty batch".into())));
                }
                kept = Some(rest);
            }
        }
    }
}

fn record_skip(work: &EpochWork, err: &Error) -> Result<()> {
    let session = &work.session;
    let Error::Decode { shard, .. } = err else { return Ok(()) };
    session.decode_skips.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    session.access.record(&crate::audit::AuditEvent {
        event: "decode_skipped",
        principal: session.access.authorizer().principal().to_owned(),
        token_id: session.access.authorizer().token_id().to_owned(),
        dataset: shard.dataset.clone(),
        shard: shard.index,
        detail: Some(err.to_string()),
        ..Default::default()
    })
}

enum Gathered {
    Batch(Batch),
    /// (position in the batch, the decode error) of each sample to leave out.
    Skip(Vec<(usize, Error)>),
}

fn gather(work: &EpochWork, k: usize, refs: &[SampleRef], cc: &mut ChunkScratch) -> Result<Gathered> {
    let session = &work.session;
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
    let fetched = fetch_ranged(&open, refs, &shard_of, &session.selected)?;
    // Compressed fields first: their stored frames into the worker's locked scratch,
    // whose headers say how long each value is (and so where it goes in the batch).
    let frames = stored_frames(&session.selected, schema, &open, refs, &shard_of, &fetched, cc)?;
    let mut slots = Vec::with_capacity(session.selected.len());
    let mut off = 0usize;
    for (si, &pf) in session.selected.iter().enumerate() {
        let f = &schema.fields[pf];
        let name: Arc<str> = Arc::from(f.name.as_str());
        if let Some(spec) = &session.decode[si] {
            off = align64(off);
            let len = spec.out_len() * n;
            let kind = FieldKind::Tensor { dtype: spec.dtype, shape: spec.shape() };
            slots.push(FieldSlot { name, schema_pos: pf, kind, offset: off, len, offsets_at: None });
            off += len;
            continue;
        }
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
                let len: u64 = match &frames[si] {
                    Some(fr) => fr.iter().map(|f| f.len as u64).sum(),
                    None => refs
                        .iter()
                        .zip(&shard_of)
                        .map(|(r, &p)| {
                            let (a, z) = open[p].1.index().field_range(u64::from(r.record()), pf);
                            z - a
                        })
                        .sum(),
                };
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
    // Decrypt in storage order (shard, record) so neighbouring samples share the
    // worker's cached chunk, while each sample lands in its shuffled slot.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_unstable_by_key(|&j| refs[j].0);
    let mut skipped = Vec::new();
    for (si, slot) in slots.iter().enumerate() {
        if let Some(spec) = &session.decode[si] {
            let ctx = DecodeCtx { work, spec, refs, shard_of: &shard_of, open: &open, fetched: &fetched };
            decode_field(&ctx, slot, &batch.layout.samples, &order, out, cc, &mut skipped)?;
            continue;
        }
        // Destination of each sample: fixed stride, or prefix sums of byte lengths.
        let mut dest = Vec::with_capacity(n + 1);
        let mut w = slot.offset;
        // Offsets count elements for a list field (whole elements: the index checks it).
        let unit = match slot.kind {
            FieldKind::List { dtype } => dtype.size() as u64,
            _ => 1,
        };
        for (j, (r, &p)) in refs.iter().zip(&shard_of).enumerate() {
            dest.push(w);
            w += match &frames[si] {
                Some(fr) => fr[j].len,
                None => {
                    let (a, z) = open[p].1.index().field_range(u64::from(r.record()), slot.schema_pos);
                    (z - a) as usize
                }
            };
        }
        dest.push(w);
        if let Some(at) = slot.offsets_at {
            for (j, d) in dest.iter().enumerate() {
                out[at + 8 * j..at + 8 * j + 8].copy_from_slice(&((d - slot.offset) as u64 / unit).to_le_bytes());
            }
        }
        if let Some(fr) = &frames[si] {
            decompress_field(slot, &schema.fields[slot.schema_pos], fr, &dest, refs, &shard_of, &open, out, cc)?;
            continue;
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
                copy_plain(&open[rp], &fetched, rp, ra, rz, &mut out[rd..rd + (rz - ra) as usize], &mut cc.chunk)?;
            }
            run = Some((p, a, z, dest[j]));
        }
        if let Some((rp, ra, rz, rd)) = run {
            copy_plain(&open[rp], &fetched, rp, ra, rz, &mut out[rd..rd + (rz - ra) as usize], &mut cc.chunk)?;
        }
    }
    if !skipped.is_empty() {
        return Ok(Gathered::Skip(skipped));
    }
    // The buffer may be a reused one: keep this batch's bytes, zero the rest (the
    // alignment gaps, and whatever an earlier, larger batch left past the end).
    let mut written: Vec<(usize, usize)> = Vec::with_capacity(2 * slots.len());
    for s in slots.iter() {
        written.push((s.offset, s.offset + s.len));
        if let Some(at) = s.offsets_at {
            written.push((at, at + 8 * (n + 1)));
        }
    }
    if let Some(b) = batch.buf.as_mut() {
        b.keep_only(&mut written);
    }
    Ok(Gathered::Batch(batch))
}

/// What decoding one image field of a batch reads from.
struct DecodeCtx<'a> {
    work: &'a EpochWork,
    spec: &'a ImageDecode,
    refs: &'a [SampleRef],
    shard_of: &'a [usize],
    open: &'a [(u32, Arc<OpenShard>)],
    fetched: &'a FetchedChunks,
}

/// Decodes an image field: each sample's encoded value is decrypted into the worker's
/// locked scratch, then decoded and transformed into its slot of the batch. A sample
/// that does not decode fails the batch, or (skip) is added to `skipped`.
#[allow(clippy::too_many_arguments)]
fn decode_field(
    ctx: &DecodeCtx<'_>,
    slot: &FieldSlot,
    ids: &[u64],
    order: &[usize],
    out: &mut [u8],
    cc: &mut ChunkScratch,
    skipped: &mut Vec<(usize, Error)>,
) -> Result<()> {
    let len = ctx.spec.out_len();
    let ChunkScratch { chunk, encoded, images, policy, .. } = cc;
    let images = images.get_or_insert_with(|| ImageWorker::new(*policy));
    for &j in order {
        let p = ctx.shard_of[j];
        let (a, z) = ctx.open[p].1.index().field_range(u64::from(ctx.refs[j].record()), slot.schema_pos);
        let stored = (z - a) as usize;
        let enc = LockedBuf::ensure(encoded, stored.max(1), *policy)?;
        let value = &mut enc.prefix_mut(stored)[..stored];
        copy_plain(&ctx.open[p], ctx.fetched, p, a, z, value, chunk)?;
        let key = SampleKey { seed: ctx.work.session.spec.seed, epoch: ctx.work.epoch, sample: ids[j] };
        let dst = &mut out[slot.offset + j * len..slot.offset + (j + 1) * len];
        match images.decode(value, ctx.spec, key, dst) {
            Ok(()) => {}
            Err(DecodeFail::Memory(e)) => return Err(e),
            Err(DecodeFail::Msg(detail)) => {
                let err = Error::Decode {
                    shard: ctx.open[p].1.shard_ref().clone(),
                    record: u64::from(ctx.refs[j].record()),
                    field: slot.name.to_string(),
                    detail,
                };
                match ctx.work.session.on_decode_error {
                    OnDecodeError::Raise => return Err(err),
                    OnDecodeError::Skip => skipped.push((j, err)),
                }
            }
        }
    }
    Ok(())
}

/// For shards read by ranges (remote, `global` shuffle, not cached): the plaintext
/// ranges this batch needs from each, fetched in one burst (mapped shards need none).
fn fetch_ranged(
    open: &[(u32, Arc<OpenShard>)],
    refs: &[SampleRef],
    shard_of: &[usize],
    fields: &[usize],
) -> Result<FetchedChunks> {
    if !open.iter().any(|(_, s)| s.is_ranged()) {
        return Ok(FetchedChunks::default());
    }
    let mut wanted: Vec<Vec<(u64, u64)>> = vec![Vec::new(); open.len()];
    for (r, &p) in refs.iter().zip(shard_of) {
        for &pf in fields {
            wanted[p].push(open[p].1.index().field_range(u64::from(r.record()), pf));
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
    cc: &mut Chunk,
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

/// For each selected field (by selection position) that is compressed: its samples'
/// stored frames, decrypted in storage order into the worker's frames buffer, with
/// the value length each declares, checked against the schema. `None` for the others.
fn stored_frames(
    selected: &[usize],
    schema: &crate::format::Schema,
    open: &[(u32, Arc<OpenShard>)],
    refs: &[SampleRef],
    shard_of: &[usize],
    fetched: &FetchedChunks,
    cc: &mut ChunkScratch,
) -> Result<Vec<Option<Vec<Frame>>>> {
    let range = |j: usize, pf: usize| open[shard_of[j]].1.index().field_range(u64::from(refs[j].record()), pf);
    let mut total = 0usize;
    for &pf in selected {
        if schema.fields[pf].compress.is_some() {
            total += (0..refs.len()).map(|j| range(j, pf)).map(|(a, z)| (z - a) as usize).sum::<usize>();
        }
    }
    let mut out = vec![None; selected.len()];
    if !selected.iter().any(|&pf| schema.fields[pf].compress.is_some()) {
        return Ok(out);
    }
    cc.frames(total.max(1))?;
    let mut order: Vec<usize> = (0..refs.len()).collect();
    order.sort_unstable_by_key(|&j| refs[j].0);
    let mut at = 0usize;
    for (si, &pf) in selected.iter().enumerate() {
        let field = &schema.fields[pf];
        if field.compress.is_none() {
            continue;
        }
        let mut fr = vec![Frame { at: 0, stored: 0, len: 0 }; refs.len()];
        for &j in &order {
            let p = shard_of[j];
            let (a, z) = range(j, pf);
            let stored = (z - a) as usize;
            let ChunkScratch { chunk, frames, .. } = &mut *cc;
            let buf = frames.as_mut().ok_or_else(|| Error::Internal("no frames buffer".into()))?;
            let dst = &mut buf.prefix_mut(total)[at..at + stored];
            copy_plain(&open[p], fetched, p, a, z, dst, chunk)?;
            let declared = Decompressor::content_size(dst)
                .and_then(|n| check_declared(field, n))
                .map_err(|detail| decompress_error(&open[p].1, refs[j].record(), field, detail))?;
            fr[j] = Frame { at, stored, len: declared };
            at += stored;
        }
        out[si] = Some(fr);
    }
    Ok(out)
}

/// The value length a frame declares, if the schema allows it for `field`.
fn check_declared(field: &Field, declared: u64) -> std::result::Result<usize, String> {
    let ok = match (&field.kind, field.fixed_len()) {
        (_, Some(want)) => declared == want,
        (FieldKind::List { dtype }, None) => declared.is_multiple_of(dtype.size() as u64),
        _ => true,
    };
    if !ok {
        return Err(match field.fixed_len() {
            Some(want) => format!("the frame declares {declared} bytes; the schema's value is {want}"),
            None => format!("the frame declares {declared} bytes, not whole elements of the list's dtype"),
        });
    }
    usize::try_from(declared)
        .map_err(|_| format!("the frame declares {declared} bytes, more than this machine can address"))
}

fn decompress_error(shard: &OpenShard, record: u32, field: &Field, detail: String) -> Error {
    Error::Decompress { shard: shard.shard_ref().clone(), record: u64::from(record), field: field.name.clone(), detail }
}

/// Decompresses a compressed field's frames from the worker's scratch into the batch.
#[allow(clippy::too_many_arguments)]
fn decompress_field(
    slot: &FieldSlot,
    field: &Field,
    frames: &[Frame],
    dest: &[usize],
    refs: &[SampleRef],
    shard_of: &[usize],
    open: &[(u32, Arc<OpenShard>)],
    out: &mut [u8],
    cc: &mut ChunkScratch,
) -> Result<()> {
    if cc.unzstd.is_none() {
        cc.unzstd = Some(Decompressor::new(cc.policy)?);
    }
    let ChunkScratch { frames: buf, unzstd, .. } = cc;
    let (Some(buf), Some(unzstd)) = (buf.as_ref(), unzstd.as_mut()) else {
        return Err(Error::Internal(format!("field {:?}: no frames to decompress", slot.name)));
    };
    for (j, f) in frames.iter().enumerate() {
        let frame = &buf.as_slice()[f.at..f.at + f.stored];
        unzstd
            .decompress(frame, &mut out[dest[j]..dest[j + 1]])
            .map_err(|detail| decompress_error(&open[shard_of[j]].1, refs[j].record(), field, detail))?;
    }
    Ok(())
}
