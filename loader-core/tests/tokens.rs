//! Token windows (`shardlock::TokenStream`): documents of a list field concatenated with
//! an EOS id and cut into `seq_len + 1` windows that cover each token once per epoch,
//! shuffled deterministically, resumed exactly mid-document and mid-block.
#![allow(clippy::unwrap_used)]

mod common;

use common::Fixture;
use shardlock::{BatchStream, DType, Field, LoaderState, Schema, Shuffle, TokenStream, TokenWindows};

const SEQ: usize = 15; // windows of 16 tokens
const EOS: i64 = 0;

/// 150 documents of u32 ids >= 1 (so EOS = 0 tells boundaries), lengths 0..=120, one
/// of 9,000 tokens spanning several chunks.
fn docs(fx: &Fixture) -> (std::path::PathBuf, Vec<Vec<u32>>) {
    let docs: Vec<Vec<u32>> = (0..150u32)
        .map(|d| {
            let n = if d == 7 { 9_000 } else { (d * 37 % 121) as usize };
            (0..n as u32).map(|k| 1 + (d * 1000 + k) % 50_000).collect()
        })
        .collect();
    let schema = Schema::new(vec![Field::list("tokens", DType::U32)]).unwrap();
    let samples: Vec<Vec<Vec<u8>>> =
        docs.iter().map(|d| vec![d.iter().flat_map(|t| t.to_le_bytes()).collect()]).collect();
    (fx.pack("docs", "tok", schema, &samples, 8_000), docs)
}

fn stream(fx: &Fixture, dir: &std::path::Path, shuffle: Shuffle, opts: TokenWindows) -> TokenStream {
    let docs = fx.loader(dir, "tok").batch_size(8).drop_last(false).shuffle(shuffle).seed(5).build().unwrap();
    TokenStream::new(docs, opts).unwrap()
}

fn opts(shuffle_windows: usize) -> TokenWindows {
    let mut o = TokenWindows::new("tokens", SEQ);
    o.eos = Some(EOS);
    o.positions = true;
    o.shuffle_windows = shuffle_windows;
    o.batch_size = 5;
    o
}

/// (windows, positions) of `n` batches (all of the epoch when `n` is None).
fn take(s: &mut TokenStream, n: Option<usize>) -> Vec<(Vec<i64>, Vec<i64>)> {
    let mut out = Vec::new();
    while n.is_none_or(|n| out.len() < n * 5) {
        let Some(b) = s.next() else { break };
        let b = b.unwrap();
        let ids = b.tensor::<i64>("tokens").unwrap();
        assert_eq!(ids.shape, [b.len(), SEQ + 1]);
        let pos = b.tensor::<i64>("position_ids").unwrap();
        for w in 0..b.len() {
            let r = w * (SEQ + 1)..(w + 1) * (SEQ + 1);
            out.push((ids.data[r.clone()].to_vec(), pos.data[r].to_vec()));
        }
    }
    out
}

/// The epoch's token stream in the documents' order, with positions.
fn stream_of(order: &[usize], docs: &[Vec<u32>]) -> (Vec<i64>, Vec<i64>) {
    let (mut ids, mut pos) = (Vec::new(), Vec::new());
    for &d in order {
        for (k, &t) in docs[d].iter().enumerate() {
            ids.push(i64::from(t));
            pos.push(k as i64);
        }
        ids.push(EOS);
        pos.push(docs[d].len() as i64);
    }
    (ids, pos)
}

/// The documents' order for an epoch, as the same loader settings deal them.
fn doc_order(fx: &Fixture, dir: &std::path::Path, shuffle: Shuffle, epoch: u64) -> Vec<usize> {
    let mut l = fx.loader(dir, "tok").batch_size(8).drop_last(false).shuffle(shuffle).seed(5).build().unwrap();
    l.set_epoch(epoch);
    l.flat_map(|b| b.unwrap().sample_ids().to_vec()).map(|i| i as usize).collect()
}

#[test]
fn unshuffled_windows_are_the_documents_cut_in_order_with_positions() {
    let fx = Fixture::new();
    let (dir, docs) = docs(&fx);
    let mut s = stream(&fx, &dir, Shuffle::None, opts(1));
    let got = take(&mut s, None);
    let (ids, pos) = stream_of(&(0..docs.len()).collect::<Vec<_>>(), &docs);
    let whole = ids.len() / (SEQ + 1);
    // drop_last: whole batches of 5 windows only.
    assert_eq!(got.len(), whole / 5 * 5);
    for (w, (gi, gp)) in got.iter().enumerate() {
        let r = w * (SEQ + 1)..(w + 1) * (SEQ + 1);
        assert_eq!((&gi[..], &gp[..]), (&ids[r.clone()], &pos[r]), "window {w}");
    }
    // The next pass is the next epoch.
    assert_eq!(s.epoch(), 1);
    assert_eq!(take(&mut s, None).len(), got.len());
}

#[test]
fn shuffled_windows_cover_every_token_once_and_padding_keeps_the_tail() {
    let fx = Fixture::new();
    let (dir, docs) = docs(&fx);
    let mut o = opts(7);
    o.pad = Some(-1);
    o.drop_last = false;
    let mut s = stream(&fx, &dir, Shuffle::Window, o);
    let got = take(&mut s, None);
    let (ids, _) = stream_of(&doc_order(&fx, &dir, Shuffle::Window, 0), &docs);
    let mut want: Vec<Vec<i64>> = ids.chunks(SEQ + 1).map(|c| c.to_vec()).collect();
    if let Some(last) = want.last_mut() {
        last.resize(SEQ + 1, -1);
    }
    let mut have: Vec<Vec<i64>> = got.iter().map(|(i, _)| i.clone()).collect();
    assert_ne!(have, want, "windows should be shuffled");
    have.sort();
    want.sort();
    assert_eq!(have, want, "each window of the epoch exactly once");
    // Every document token is in exactly one window.
    let tokens: usize = got.iter().map(|(i, _)| i.iter().filter(|&&t| t > 0).count()).sum();
    assert_eq!(tokens, docs.iter().map(Vec::len).sum::<usize>());
    // Same seed, same windows in the same order.
    let mut o = opts(7);
    o.pad = Some(-1);
    o.drop_last = false;
    assert_eq!(take(&mut stream(&fx, &dir, Shuffle::Window, o), None), got);
}

#[test]
fn a_saved_state_resumes_mid_document_and_mid_block_exactly() {
    let fx = Fixture::new();
    let (dir, _) = docs(&fx);
    let whole: Vec<_> = {
        let mut s = stream(&fx, &dir, Shuffle::Global, opts(6));
        let mut w = take(&mut s, None);
        w.extend(take(&mut s, None)); // and epoch 1
        w
    };
    let per_epoch = whole.len() / 2;
    for at in [0usize, 1, 3, 7, per_epoch / 5, per_epoch / 5 + 1] {
        let mut s = stream(&fx, &dir, Shuffle::Global, opts(6));
        let mut got = take(&mut s, Some(at));
        let state: LoaderState = serde_json::from_str(&serde_json::to_string(&s.state()).unwrap()).unwrap();
        assert!(state.tokens.is_some());
        drop(s);
        let mut r = stream(&fx, &dir, Shuffle::Global, opts(6));
        r.load_state(&state).unwrap();
        got.extend(take(&mut r, None));
        if r.epoch() == 1 {
            got.extend(take(&mut r, None));
        }
        assert_eq!(got.len(), whole.len(), "resumed after {at} batches");
        assert!(got == whole, "resumed after {at} batches: other windows");
    }
    // A document loader's state is not a token stream's, and the other way round.
    let mut s = stream(&fx, &dir, Shuffle::Global, opts(6));
    let plain = fx.loader(&dir, "tok").batch_size(8).seed(5).build().unwrap().state();
    assert!(s.load_state(&plain).is_err());
    let mut l = fx.loader(&dir, "tok").batch_size(8).drop_last(false).seed(5).build().unwrap();
    take(&mut s, Some(1));
    assert!(l.load_state(&s.state()).unwrap_err().to_string().contains("token stream"));
}

#[test]
fn narrow_output_and_bad_options() {
    let fx = Fixture::new();
    let (dir, docs) = docs(&fx);
    let mut o = opts(1);
    o.widen = false;
    o.positions = false;
    let mut s = stream(&fx, &dir, Shuffle::None, o);
    let b = s.next().unwrap().unwrap();
    let ids = b.tensor::<u32>("tokens").unwrap();
    assert_eq!(ids.data[..docs[0].len().min(16)], docs[0][..docs[0].len().min(16)]);
    assert!(b.tensor::<i64>("position_ids").is_err());
    let dropping = fx.loader(&dir, "tok").batch_size(8).build().unwrap();
    assert!(TokenStream::new(dropping, opts(1)).err().unwrap().to_string().contains("drop_last(false)"));
    let l = || fx.loader(&dir, "tok").batch_size(8).drop_last(false).build().unwrap();
    for (edit, want) in [
        (Box::new(|o: &mut TokenWindows| o.field = "nope".into()) as Box<dyn Fn(&mut TokenWindows)>, "no field"),
        (Box::new(|o: &mut TokenWindows| o.seq_len = 0), "seq_len"),
        (
            Box::new(|o: &mut TokenWindows| {
                o.widen = false;
                o.eos = Some(-5)
            }),
            "does not fit",
        ),
    ] {
        let mut o = opts(1);
        edit(&mut o);
        let e = TokenStream::new(l(), o).err().unwrap().to_string();
        assert!(e.contains(want), "{e}");
    }
}
