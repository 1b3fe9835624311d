//! [`TokenStream`]: a `list<dtype>` field of documents delivered as fixed-length
//! token windows for language-model training.
//!
//! The documents of each epoch come from a [`Loader`] over the list field (its
//! shuffle, seed and rank split: documents are dealt to ranks, and each rank cuts its
//! own). Their tokens are concatenated, each document followed by the EOS id when one
//! is given, and cut into windows of `seq_len + 1` tokens (inputs `w[..seq_len]`,
//! targets `w[1..]`), which do not overlap: each token of the epoch is in one window.
//! Windows are shuffled in blocks of `shuffle_windows` consecutive windows by a
//! permutation that is a pure function of (seed, epoch, block), so a resumed stream
//! yields the same windows in the same order, even mid-document. The epoch's last
//! `< seq_len + 1` tokens are dropped, or padded into one more window with the pad id.
//!
//! Tokens live in locked memory ([`LockedBuf`]) from the decrypted document batch to
//! the window batch, which is a [`Batch`] like any other: field `<field>` is
//! `[windows, seq_len + 1]` (i64, or the field's own dtype with `widen = false`), and
//! with `positions`, `position_ids` is `[windows, seq_len + 1]` i64, each token's
//! offset in its document (restarting at 0 at every document start).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::batch::{Batch, BatchLayout, FieldSlot};
use super::loader::{Loader, LoaderState};
use super::stream::{BatchStream, Next};
use crate::error::{Error, Result};
use crate::format::{DType, FieldKind};
use crate::memory::LockedBuf;

/// How a [`TokenStream`] cuts documents into windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenWindows {
    /// The `list<dtype>` field holding each document's token ids (u16, u32, i32, i64).
    pub field: String,
    /// Tokens a model input holds; each window is `seq_len + 1` tokens.
    pub seq_len: usize,
    /// The id appended after every document, if any.
    pub eos: Option<i64>,
    /// Also deliver `position_ids` (each token's offset in its document).
    pub positions: bool,
    /// Windows shuffled together, in blocks of this many consecutive windows (1: the
    /// windows of the documents' order, unshuffled).
    pub shuffle_windows: usize,
    /// Pad the epoch's last partial window with this id instead of dropping it.
    pub pad: Option<i64>,
    /// Deliver i64 ids (the embedding layers' index type) rather than the field's dtype.
    pub widen: bool,
    /// Windows per batch.
    pub batch_size: usize,
    /// Drop the epoch's last batch when it has fewer than `batch_size` windows.
    pub drop_last: bool,
}

impl TokenWindows {
    /// Windows of `seq_len + 1` tokens of `field`, 8 per batch, no EOS, shuffled in
    /// blocks of 1,024 windows, widened to i64, the last partial window and batch dropped.
    pub fn new(field: impl Into<String>, seq_len: usize) -> Self {
        Self {
            field: field.into(),
            seq_len,
            eos: None,
            positions: false,
            shuffle_windows: 1024,
            pad: None,
            widen: true,
            batch_size: 8,
            drop_last: true,
        }
    }
}

/// Where a [`TokenStream`] stands in its epoch (part of its [`LoaderState`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenPosition {
    /// The document loader's consumption before the document batch holding the first
    /// token of the current block.
    pub docs: Vec<super::plan::Consumed>,
    /// For a DataLoader worker: the document loader's position there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docs_worker: Option<super::loader::WorkerPosition>,
    /// Tokens of that document batch before the block's first token.
    pub skip_tokens: u64,
    /// The block's number in the epoch.
    pub block: u64,
    /// Windows of the block already yielded.
    pub block_windows: u64,
    /// Windows yielded in the epoch.
    pub windows: u64,
    /// Batches yielded in the epoch.
    pub batches: u64,
}

/// Tokens (and their positions) not yet yielded, in locked memory.
struct Pending {
    ids: LockedBuf,
    pos: Option<LockedBuf>,
    start: usize,
    len: usize,
}

impl Pending {
    fn new(cap: usize, positions: bool, policy: crate::memory::MemoryPolicy) -> Result<Self> {
        let pos = if positions { Some(LockedBuf::new(cap * 8, policy)?) } else { None };
        Ok(Self { ids: LockedBuf::new(cap * 8, policy)?, pos, start: 0, len: 0 })
    }

    fn cap(&self) -> usize {
        self.ids.capacity() / 8
    }

    /// Room for `more` tokens at the end: moves the pending ones to the front, or
    /// moves them into larger buffers (the old ones are wiped on drop).
    fn reserve(&mut self, more: usize, policy: crate::memory::MemoryPolicy) -> Result<()> {
        if self.start + self.len + more <= self.cap() {
            return Ok(());
        }
        let need = self.len + more;
        let (a, n) = (self.start * 8, self.len * 8);
        if need <= self.cap() {
            self.ids.as_mut_slice().copy_within(a..a + n, 0);
            if let Some(p) = self.pos.as_mut() {
                p.as_mut_slice().copy_within(a..a + n, 0);
            }
        } else {
            let cap = need.max(self.cap() * 2);
            let mut ids = LockedBuf::new(cap * 8, policy)?;
            ids.as_mut_slice()[..n].copy_from_slice(&self.ids.as_slice()[a..a + n]);
            self.ids = ids;
            if let Some(p) = self.pos.as_mut() {
                let mut q = LockedBuf::new(cap * 8, policy)?;
                q.as_mut_slice()[..n].copy_from_slice(&p.as_slice()[a..a + n]);
                *p = q;
            }
        }
        self.start = 0;
        Ok(())
    }

    fn push(&mut self, id: i64, pos: i64) {
        let at = (self.start + self.len) * 8;
        self.ids.as_mut_slice()[at..at + 8].copy_from_slice(&id.to_le_bytes());
        if let Some(p) = self.pos.as_mut() {
            p.as_mut_slice()[at..at + 8].copy_from_slice(&pos.to_le_bytes());
        }
        self.len += 1;
    }

    /// Appends `values` (little-endian `dtype` elements) widened to i64, their
    /// positions counting up from `first_pos`. Room must be reserved.
    fn extend(&mut self, dtype: DType, values: &[u8], first_pos: i64) {
        let at = (self.start + self.len) * 8;
        let n = values.len() / dtype.size();
        let out = &mut self.ids.as_mut_slice()[at..at + n * 8];
        match dtype {
            DType::U16 => widen::<2>(out, values, |e| i64::from(u16::from_le_bytes(*e))),
            DType::U32 => widen::<4>(out, values, |e| i64::from(u32::from_le_bytes(*e))),
            DType::I32 => widen::<4>(out, values, |e| i64::from(i32::from_le_bytes(*e))),
            _ => out.copy_from_slice(&values[..n * 8]),
        }
        if let Some(p) = self.pos.as_mut() {
            for (k, d) in p.as_mut_slice()[at..at + n * 8].chunks_exact_mut(8).enumerate() {
                d.copy_from_slice(&(first_pos + k as i64).to_le_bytes());
            }
        }
        self.len += n;
    }

    fn ids(&self, from: usize, n: usize) -> &[u8] {
        &self.ids.as_slice()[(self.start + from) * 8..(self.start + from + n) * 8]
    }

    fn pos(&self, from: usize, n: usize) -> Option<&[u8]> {
        self.pos.as_ref().map(|p| &p.as_slice()[(self.start + from) * 8..(self.start + from + n) * 8])
    }

    fn drop_front(&mut self, n: usize) {
        self.start += n;
        self.len -= n;
    }
}

/// The block of windows being yielded: its first `windows` windows of pending tokens,
/// in the order `order`.
struct Block {
    index: u64,
    order: Vec<usize>,
    next: usize,
    /// The document batch state before the batch holding the block's first token, and
    /// how many of that batch's tokens precede it.
    anchor: (LoaderState, u64),
}

/// A list field's documents as fixed-length token windows (module docs).
pub struct TokenStream {
    docs: Loader,
    opts: TokenWindows,
    dtype: DType,
    pending: Pending,
    /// Stream position of pending's first token (tokens since the epoch's, or the
    /// restored anchor's, start).
    first_token: u64,
    /// Tokens appended so far, in the same coordinates.
    stream_tokens: u64,
    /// Document batch states, each with the stream position of its first token.
    anchors: VecDeque<(LoaderState, u64)>,
    /// Offset of the token being appended within its document.
    doc_pos: i64,
    block: Option<Block>,
    next_block: u64,
    /// After a restore: tokens to discard as they arrive, and windows of the first
    /// block already yielded.
    discard: u64,
    skip_in_block: u64,
    windows: u64,
    batches: u64,
    docs_done: bool,
    failed: bool,
    seed: u64,
    /// A restored position, reported by `state` until the first block forms.
    restored: Option<TokenPosition>,
    /// The epoch being cut (the document loader moves to the next one as soon as it
    /// has read the last document, before the last windows are out).
    epoch: u64,
}

impl TokenStream {
    /// Windows of `opts.field` of the documents `docs` yields. `docs` must read that
    /// field (others are ignored) and be built with `drop_last(false)`, so that no
    /// document is left out; its batch size is how many documents it decrypts at a time.
    pub fn new(docs: Loader, opts: TokenWindows) -> Result<Self> {
        let schema = &docs.dataset().manifest().schema;
        let field = schema.fields.iter().find(|f| f.name == opts.field).ok_or_else(|| {
            Error::InvalidArgument(format!("token windows: no field {:?} in the dataset", opts.field))
        })?;
        let dtype = match field.kind {
            FieldKind::List { dtype: d @ (DType::U16 | DType::U32 | DType::I32 | DType::I64) } => d,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "token windows need a list<u16|u32|i32|i64> field; {:?} is not one",
                    opts.field
                )))
            }
        };
        if !docs.field_names().contains(&opts.field.as_str()) {
            return Err(Error::InvalidArgument(format!("token windows: the loader does not read {:?}", opts.field)));
        }
        if opts.seq_len == 0 || opts.batch_size == 0 || opts.shuffle_windows == 0 {
            return Err(Error::InvalidArgument(
                "token windows: seq_len, batch_size and shuffle_windows must be >= 1".into(),
            ));
        }
        if opts.positions && opts.field == "position_ids" {
            return Err(Error::InvalidArgument("token windows: the field may not be named position_ids".into()));
        }
        let out = if opts.widen { DType::I64 } else { dtype };
        for (what, id) in [("eos", opts.eos), ("pad", opts.pad)] {
            if let Some(id) = id {
                if !fits(out, id) {
                    return Err(Error::InvalidArgument(format!(
                        "token windows: {what} id {id} does not fit the output dtype {}",
                        out.name()
                    )));
                }
            }
        }
        let window = opts.seq_len + 1;
        let cap = window.saturating_mul(opts.shuffle_windows).saturating_mul(2).clamp(1 << 12, 1 << 26);
        if docs.session().drop_last {
            return Err(Error::InvalidArgument(
                "token windows: build the document loader with drop_last(false), or the documents of its last \
                 partial batch are left out of every epoch"
                    .into(),
            ));
        }
        let policy = docs.session().policy;
        let seed = docs.session().spec.seed;
        let epoch = docs.epoch();
        Ok(Self {
            pending: Pending::new(cap, opts.positions, policy)?,
            docs,
            opts,
            dtype,
            first_token: 0,
            stream_tokens: 0,
            anchors: VecDeque::new(),
            doc_pos: 0,
            block: None,
            next_block: 0,
            discard: 0,
            skip_in_block: 0,
            windows: 0,
            batches: 0,
            docs_done: false,
            failed: false,
            seed,
            restored: None,
            epoch,
        })
    }

    fn window(&self) -> usize {
        self.opts.seq_len + 1
    }

    fn reset_epoch(&mut self) {
        self.pending.start = 0;
        self.pending.len = 0;
        self.first_token = 0;
        self.stream_tokens = 0;
        self.anchors.clear();
        self.doc_pos = 0;
        self.block = None;
        self.next_block = 0;
        self.discard = 0;
        self.skip_in_block = 0;
        self.windows = 0;
        self.batches = 0;
        self.docs_done = false;
        self.restored = None;
        self.epoch = self.docs.epoch();
    }

    /// Appends one document batch's tokens.
    fn append(&mut self, batch: &Batch) -> Result<()> {
        let values = batch.field_bytes(&self.opts.field)?;
        let slot = batch.slot(&self.opts.field)?;
        let at = slot.offsets_at.ok_or_else(|| Error::Internal("a list field without offsets".into()))?;
        let all = batch.buffer_bytes();
        let unit = self.dtype.size();
        let n = batch.len();
        let total = values.len() / unit + if self.opts.eos.is_some() { n } else { 0 };
        self.pending.reserve(total, self.docs.session().policy)?;
        for j in 0..n {
            let off = |k: usize| -> usize {
                let mut b = [0u8; 8];
                b.copy_from_slice(&all[at + 8 * k..at + 8 * k + 8]);
                u64::from_le_bytes(b) as usize
            };
            let (a, z) = (off(j), off(j + 1));
            self.doc_pos = 0;
            // After a restore, the first tokens are the ones already yielded.
            let skip = (self.discard as usize).min(z - a);
            if skip > 0 {
                self.discard -= skip as u64;
                self.first_token += skip as u64;
                self.stream_tokens += skip as u64;
                self.doc_pos += skip as i64;
            }
            let (a, m) = (a + skip, z - a - skip);
            self.pending.extend(self.dtype, &values[a * unit..(a + m) * unit], self.doc_pos);
            self.doc_pos += m as i64;
            self.stream_tokens += m as u64;
            if let Some(eos) = self.opts.eos {
                self.push(eos);
            }
        }
        Ok(())
    }

    fn push(&mut self, id: i64) {
        let pos = self.doc_pos;
        self.doc_pos += 1;
        self.stream_tokens += 1;
        if self.discard > 0 {
            self.discard -= 1;
            self.first_token += 1;
            return;
        }
        self.pending.push(id, pos);
    }

    /// Reads document batches until the next block can be formed (or the documents
    /// of the epoch are done). `Pending` when the loader had nothing within `timeout`.
    fn fill_block(&mut self, timeout: Option<Duration>) -> Option<Result<()>> {
        let want = self.window() * self.opts.shuffle_windows;
        while !self.docs_done && self.pending.len < want {
            let before = (self.docs.state(), self.stream_tokens);
            let next = match timeout {
                Some(t) => match self.docs.next_within(t) {
                    Next::Batch(b) => Some(b),
                    Next::End => None,
                    Next::Pending => return None,
                },
                None => self.docs.next(),
            };
            match next {
                Some(Ok(b)) => {
                    self.anchors.push_back(before);
                    if let Err(e) = self.append(&b) {
                        return Some(Err(e));
                    }
                }
                Some(Err(e)) => return Some(Err(e)),
                None => self.docs_done = true,
            }
        }
        Some(Ok(()))
    }

    /// Forms the next block from pending tokens: `None` at the end of the epoch.
    fn start_block(&mut self) -> Option<Block> {
        let window = self.window();
        let mut k = (self.pending.len / window).min(self.opts.shuffle_windows);
        if k == 0 && self.docs_done && self.pending.len > 0 && self.opts.pad.is_some() {
            // The epoch's last partial window, padded.
            let pad = self.opts.pad.unwrap_or(0);
            let missing = window - self.pending.len;
            // Room was reserved for whole blocks; make sure of it.
            if self.pending.reserve(missing, self.docs.session().policy).is_ok() {
                for _ in 0..missing {
                    self.pending.push(pad, 0);
                }
                k = 1;
            }
        }
        if k == 0 {
            return None;
        }
        let start = self.first_token;
        // The anchor: the last document batch that starts at or before the block.
        while self.anchors.len() > 1 && self.anchors[1].1 <= start {
            self.anchors.pop_front();
        }
        let (state, at) = self.anchors.front().cloned().unwrap_or_else(|| (self.docs.state(), start));
        let index = self.next_block;
        self.next_block += 1;
        let mut order: Vec<usize> = (0..k).collect();
        let mut r = crate::rng::splitmix64(self.seed ^ 0x746f_6b65_6e73 ^ self.epoch.rotate_left(32) ^ index);
        for i in (1..k).rev() {
            r = crate::rng::splitmix64(r);
            order.swap(i, (r % (i as u64 + 1)) as usize);
        }
        let skip = std::mem::take(&mut self.skip_in_block) as usize;
        Some(Block { index, order, next: skip.min(k), anchor: (state, start - at) })
    }

    /// Releases the current block's tokens once all its windows are out.
    fn finish_block(&mut self) {
        if let Some(b) = self.block.take() {
            let n = (b.order.len() * self.window()).min(self.pending.len);
            self.pending.drop_front(n);
            self.first_token += n as u64;
        }
    }

    /// The next window to copy, as an offset into pending: forms blocks as needed.
    /// `Ok(None)` at the end of the epoch; `Err(None)` when the document loader had
    /// nothing within `timeout` (only asked while no window of the batch is copied).
    fn next_window(&mut self, timeout: Option<Duration>) -> std::result::Result<Option<usize>, Option<Error>> {
        let window = self.window();
        loop {
            if let Some(block) = &mut self.block {
                if block.next < block.order.len() {
                    let w = block.order[block.next] * window;
                    block.next += 1;
                    return Ok(Some(w));
                }
                self.finish_block();
            }
            match self.fill_block(timeout) {
                None => return Err(None),
                Some(Err(e)) => return Err(Some(e)),
                Some(Ok(())) => {}
            }
            match self.start_block() {
                Some(block) => self.block = Some(block),
                None => return Ok(None),
            }
        }
    }

    /// The next batch of windows, or `End` at the end of the epoch.
    fn next_batch(&mut self, timeout: Option<Duration>) -> Next<Batch> {
        if self.failed {
            return Next::Batch(Err(Error::InvalidArgument(
                "this token stream stopped at an earlier error: restore a saved state".into(),
            )));
        }
        let (b, window) = (self.opts.batch_size, self.window());
        let out = if self.opts.widen { DType::I64 } else { self.dtype };
        let ids_cap = b * window * out.size();
        let pos_at = ids_cap.div_ceil(64) * 64;
        let total = if self.opts.positions { pos_at + b * window * 8 } else { ids_cap };
        let mut buf: Option<LockedBuf> = None;
        let mut n = 0usize;
        while n < b {
            // Wait with the timeout only while nothing of this batch is taken, so a
            // `Pending` leaves the stream where it was.
            let w = match self.next_window(if n == 0 { timeout } else { None }) {
                Ok(Some(w)) => w,
                Ok(None) => break,
                Err(None) => return Next::Pending,
                Err(Some(e)) => {
                    self.failed = true;
                    return Next::Batch(Err(e));
                }
            };
            if buf.is_none() {
                match self.docs.session().pool.take(total.max(1)) {
                    Ok(x) => buf = Some(x),
                    Err(e) => {
                        self.failed = true;
                        return Next::Batch(Err(e));
                    }
                }
            }
            let Some(dst) = buf.as_mut().map(|x| x.prefix_mut(total.max(1))) else { continue };
            let src = self.pending.ids(w, window);
            let d = &mut dst[n * window * out.size()..(n + 1) * window * out.size()];
            match out {
                DType::U16 => narrow(d, src, |id| (id as u16).to_le_bytes()),
                DType::U32 => narrow(d, src, |id| (id as u32).to_le_bytes()),
                DType::I32 => narrow(d, src, |id| (id as i32).to_le_bytes()),
                _ => d.copy_from_slice(src),
            }
            if let Some(p) = self.pending.pos(w, window) {
                let at = pos_at + n * window * 8;
                dst[at..at + window * 8].copy_from_slice(p);
            }
            n += 1;
        }
        let session = self.docs.session();
        let keep = n == b || (n > 0 && !self.opts.drop_last);
        let mut buf = match buf {
            Some(x) if keep => x,
            other => {
                // The end of the epoch (a short last batch with drop_last goes back to
                // the pool, to be overwritten): the next call starts the next epoch.
                if let Some(x) = other {
                    session.pool.give(x);
                }
                self.reset_epoch();
                return Next::End;
            }
        };
        // A reused buffer: keep this batch's windows (and positions), zero the rest.
        let ids_len = n * window * out.size();
        let mut written = vec![(0, ids_len)];
        if self.opts.positions {
            written.push((pos_at, pos_at + n * window * 8));
        }
        buf.keep_only(&mut written);
        let mut slots = vec![FieldSlot {
            name: Arc::from(self.opts.field.as_str()),
            schema_pos: 0,
            kind: FieldKind::Tensor { dtype: out, shape: vec![window as u64] },
            offset: 0,
            len: n * window * out.size(),
            offsets_at: None,
        }];
        if self.opts.positions {
            slots.push(FieldSlot {
                name: Arc::from("position_ids"),
                schema_pos: 0,
                kind: FieldKind::Tensor { dtype: DType::I64, shape: vec![window as u64] },
                offset: pos_at,
                len: n * window * 8,
                offsets_at: None,
            });
        }
        let samples = (self.windows..self.windows + n as u64).collect();
        Next::Batch(Ok(Batch {
            buf: Some(buf),
            pool: session.pool.clone(),
            layout: BatchLayout { slots: Arc::from(slots), samples, index: self.batches, epoch: self.epoch },
            pid: std::process::id(),
        }))
    }

    fn counted(&mut self, r: Next<Batch>) -> Next<Batch> {
        if let Next::Batch(Ok(b)) = &r {
            self.windows += b.len() as u64;
            self.batches += 1;
        }
        r
    }
}

/// `out[k] = f(element k of src)` as i64 LE, elements of `src` `N` bytes each.
fn widen<const N: usize>(out: &mut [u8], src: &[u8], f: impl Fn(&[u8; N]) -> i64) {
    for (d, e) in out.chunks_exact_mut(8).zip(src.chunks_exact(N)) {
        let mut b = [0u8; N];
        b.copy_from_slice(e);
        d.copy_from_slice(&f(&b).to_le_bytes());
    }
}

/// Narrows i64 LE ids in `src` into `out` as `N`-byte elements (`f` picks the bytes).
fn narrow<const N: usize>(out: &mut [u8], src: &[u8], f: impl Fn(i64) -> [u8; N]) {
    for (d, e) in out.chunks_exact_mut(N).zip(src.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        d.copy_from_slice(&f(i64::from_le_bytes(b)));
    }
}

fn fits(d: DType, id: i64) -> bool {
    match d {
        DType::U16 => u16::try_from(id).is_ok(),
        DType::U32 => u32::try_from(id).is_ok(),
        DType::I32 => i32::try_from(id).is_ok(),
        _ => true,
    }
}

impl Iterator for TokenStream {
    type Item = Result<Batch>;

    /// One epoch of windows, then `None`; the next call starts the next epoch.
    fn next(&mut self) -> Option<Result<Batch>> {
        let r = self.next_batch(None);
        match self.counted(r) {
            Next::Batch(b) => Some(b),
            Next::End | Next::Pending => None,
        }
    }
}

impl BatchStream for TokenStream {
    type Batch = Batch;

    fn loader(&self) -> &Loader {
        &self.docs
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn set_epoch(&mut self, epoch: u64) {
        self.docs.set_epoch(epoch);
        self.reset_epoch();
        self.failed = false;
    }

    fn len(&self) -> Result<usize> {
        Err(Error::InvalidArgument(
            "a token stream's number of batches is known only once its epoch's documents are read".into(),
        ))
    }

    fn is_empty(&self) -> Result<bool> {
        Ok(false)
    }

    fn state(&self) -> LoaderState {
        let mut s = self.docs.state();
        let position = match (&self.block, &self.restored) {
            (Some(b), _) => TokenPosition {
                docs: b.anchor.0.consumed.clone(),
                docs_worker: b.anchor.0.worker,
                skip_tokens: b.anchor.1,
                block: b.index,
                block_windows: b.next as u64,
                windows: self.windows,
                batches: self.batches,
            },
            (None, Some(r)) => r.clone(),
            // No block yet this epoch: its start.
            (None, None) => TokenPosition {
                docs: Vec::new(),
                docs_worker: None,
                skip_tokens: 0,
                block: 0,
                block_windows: 0,
                windows: 0,
                batches: 0,
            },
        };
        s.epoch = self.epoch;
        s.consumed = Vec::new();
        s.worker = None;
        s.tokens = Some(Box::new(position));
        s
    }

    fn load_state(&mut self, s: &LoaderState) -> Result<()> {
        let Some(t) = &s.tokens else {
            return Err(Error::InvalidArgument(
                "this state is a document loader's, not a token stream's: restore it into a Loader".into(),
            ));
        };
        let docs =
            LoaderState { epoch: s.epoch, seed: s.seed, consumed: t.docs.clone(), worker: t.docs_worker, tokens: None };
        self.docs.load_state(&docs)?;
        self.reset_epoch();
        self.epoch = s.epoch;
        self.failed = false;
        self.discard = t.skip_tokens;
        self.next_block = t.block;
        self.skip_in_block = t.block_windows;
        self.windows = t.windows;
        self.batches = t.batches;
        self.restored = Some((**t).clone());
        Ok(())
    }

    fn next_within(&mut self, timeout: Duration) -> Next<Batch> {
        let r = self.next_batch(Some(timeout));
        self.counted(r)
    }

    fn buffers_allocated(&self) -> usize {
        self.docs.buffers_allocated()
    }

    fn wait_ready(&self, _batch: &Batch) -> Result<()> {
        Ok(())
    }
}
