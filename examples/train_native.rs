//! A native Rust training loop over an encrypted dataset: logistic regression on a
//! synthetic, linearly separable problem. Packs the data, issues a token, streams
//! batches through the zero-trust loader and prints a falling loss.
//!
//! Run: `cargo run --release -p shardlock-examples --example train_native`
#![allow(missing_docs)]

use std::time::{Duration, SystemTime};

use shardlock::{DType, DatasetWriter, Field, IssuerKey, Keyring, Loader, PackOptions, Schema, Shuffle};
use shardlock::{Operation, ShardSet, Token, TokenSpec};

const DIM: usize = 16;

fn main() -> shardlock::Result<()> {
    let dir =
        tempfile::tempdir().map_err(|e| shardlock::Error::Io { op: "tempdir", path: ".".into(), source: e.into() })?;
    let keyring = std::sync::Arc::new(Keyring::create(&dir.path().join("keyring.json"))?);
    let issuer = IssuerKey::generate()?;

    // A separable problem: label = 1 if w_true . x > 0.
    let w_true: Vec<f32> = (0..DIM).map(|i| if i % 2 == 0 { 1.0 } else { -0.5 }).collect();
    let schema = Schema::new(vec![Field::tensor("x", DType::F32, &[DIM as u64]), Field::tensor("y", DType::F32, &[])])?;
    let mut opts = PackOptions::new("examples/logreg");
    opts.shard_size = 1 << 20;
    let data = dir.path().join("data");
    let mut w = DatasetWriter::create(&data, schema, opts, &*keyring, &issuer)?;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    for _ in 0..20_000 {
        let x: Vec<f32> = (0..DIM).map(|_| rand()).collect();
        let y = if x.iter().zip(&w_true).map(|(a, b)| a * b).sum::<f32>() > 0.0 { 1.0f32 } else { 0.0 };
        let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_sample(&[&xb, &y.to_le_bytes()])?;
    }
    w.finish()?;

    let token = Token::issue(
        &issuer,
        &TokenSpec {
            dataset: "examples/logreg".into(),
            principal: "train_native".into(),
            shards: ShardSet::All,
            ops: vec![Operation::Read],
            expires: SystemTime::now() + Duration::from_secs(600),
            not_before: None,
            min_generation: None,
        },
    )?;
    let mut loader = Loader::builder(&data)
        .key_provider(keyring)
        .token_value(token)
        .trust_anchor(issuer.trust_anchor())
        .batch_size(256)
        .shuffle(Shuffle::Window)
        .seed(42)
        .build()?;

    let mut weights = [0f32; DIM];
    let mut bias = 0f32;
    let lr = 0.5f32;
    for epoch in 0..5 {
        let (mut loss_sum, mut n) = (0f64, 0usize);
        for batch in loader.by_ref() {
            let batch = batch?;
            let x = batch.tensor::<f32>("x")?;
            let y = batch.tensor::<f32>("y")?;
            let (mut gw, mut gb) = ([0f32; DIM], 0f32);
            for (xi, &yi) in x.data.chunks_exact(DIM).zip(y.data) {
                let z = xi.iter().zip(&weights).map(|(a, b)| a * b).sum::<f32>() + bias;
                let p = 1.0 / (1.0 + (-z).exp());
                loss_sum -= f64::from(yi * p.max(1e-7).ln() + (1.0 - yi) * (1.0 - p).max(1e-7).ln());
                for (g, a) in gw.iter_mut().zip(xi) {
                    *g += (p - yi) * a;
                }
                gb += p - yi;
            }
            let m = batch.len() as f32;
            for (wv, g) in weights.iter_mut().zip(gw) {
                *wv -= lr * g / m;
            }
            bias -= lr * gb / m;
            n += batch.len();
        }
        println!("epoch {epoch}: mean loss {:.4} over {n} samples", loss_sum / n as f64);
    }
    Ok(())
}
