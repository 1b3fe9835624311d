//! Property tests: pack -> read round trips at the edges of the chunking and sharding.
#![allow(clippy::unwrap_used)]

mod common;

use common::Fixture;
use proptest::prelude::*;
use shardlock::primitives::chunked::CHUNK_LEN;
use shardlock::primitives::SignedManifest;
use shardlock::{verify, VerifyOptions};
use shardlock::{DType, Field, Schema};

/// Sizes that sit on and around chunk boundaries, plus small ones.
fn edge_len() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        Just(CHUNK_LEN - 1),
        Just(CHUNK_LEN),
        Just(CHUNK_LEN + 1),
        Just(2 * CHUNK_LEN + 7),
        0usize..300,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn bytes_and_tensor_fields_roundtrip(
        lens in proptest::collection::vec(edge_len(), 0..12),
        shard_size in prop_oneof![Just(1u64), Just(CHUNK_LEN as u64), Just(1u64 << 20)],
        seed in any::<u8>(),
    ) {
        let fx = Fixture::new();
        let schema = Schema::new(vec![Field::bytes("blob"), Field::tensor("label", DType::I32, &[2])]).unwrap();
        let samples: Vec<Vec<Vec<u8>>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let blob = (0..n).map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed ^ i as u8)).collect();
                let label = [i as i32, -(i as i32)].iter().flat_map(|v| v.to_le_bytes()).collect();
                vec![blob, label]
            })
            .collect();
        let ds = fx.pack("ds", "prop", schema, &samples, shard_size);
        let back = fx.read_all(&ds).unwrap();
        prop_assert_eq!(&back, &samples);
        let d = fx.open(&ds).unwrap();
        prop_assert_eq!(d.manifest().records, samples.len() as u64);
        // A shard always holds at least one record; 1-byte shards mean one record each.
        if shard_size == 1 {
            prop_assert_eq!(d.manifest().shards.len(), samples.len());
        }
        // Random access to one field of one record decrypts just what covers it.
        if let Some(last) = samples.len().checked_sub(1) {
            let shard = d.manifest().shards.len() as u32 - 1;
            let mut r = fx.open_shard(&d, shard).unwrap();
            let rec = r.len() - 1;
            let mut out = vec![0u8; r.field_len(rec, 0) as usize];
            r.read_field(rec, 0, &mut out).unwrap();
            prop_assert_eq!(&out, &samples[last][0]);
        }
    }
}

#[test]
fn zero_records_make_an_empty_dataset() {
    let fx = Fixture::new();
    let schema = Schema::new(vec![Field::bytes("b")]).unwrap();
    let ds = fx.pack("empty", "e", schema, &[], 1 << 20);
    let d = fx.open(&ds).unwrap();
    assert_eq!(d.manifest().records, 0);
    assert!(d.manifest().shards.is_empty());
    assert!(fx.read_all(&ds).unwrap().is_empty());
    // FORMAT.md section 12: a dataset of no shards verifies and loads as empty.
    let r = verify(&ds, &fx.trust, &fx.access("e"), &VerifyOptions::default(), &mut |_| {}).unwrap();
    assert!(r.ok && r.shards.is_empty());
    let loader = fx.loader(&ds, "e").drop_last(false).build().unwrap();
    assert_eq!(loader.len().unwrap(), 0);
    assert_eq!(loader.count(), 0);
}

/// FORMAT.md section 9.1: a reader accepts the members of every manifest object in any
/// order; the signature covers the body bytes as written, whatever their order.
#[test]
fn manifest_members_are_accepted_in_any_order() {
    use serde_json::Value;
    fn reversed(v: &Value) -> String {
        match v {
            Value::Object(m) => {
                let members: Vec<String> =
                    m.iter().rev().map(|(k, v)| format!("{}:{}", Value::String(k.clone()), reversed(v))).collect();
                format!("{{{}}}", members.join(","))
            }
            Value::Array(a) => format!("[{}]", a.iter().map(reversed).collect::<Vec<_>>().join(",")),
            v => v.to_string(),
        }
    }
    let fx = Fixture::new();
    let (ds, samples) = fx.standard("ds", "order", 9);
    let path = ds.join("manifest.json");
    let env: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let body = reversed(&env["body"]);
    // Reversed, or sorted then reversed (without serde_json's preserve_order): either
    // way not the order the writer emits.
    assert!(body.find("\"shards\"") < body.find("\"dataset_id\""), "{body}");
    assert!(body.find("\"wrapped_dek\"") < body.find("\"index\""), "{body}");
    assert!(body.find("\"shape\"") < body.find("\"name\""), "{body}");
    let sig = fx.issuer.sign(&SignedManifest::signed_message(body.as_bytes())).unwrap();
    let text =
        format!("{{\"signature\":\"{}\",\"body\":{body},\"format\":\"shardlock-manifest/1\"}}", hex::encode(sig));
    std::fs::write(&path, text).unwrap();
    assert_eq!(fx.read_all(&ds).unwrap(), samples);
    assert!(verify(&ds, &fx.trust, &fx.access("order"), &VerifyOptions::default(), &mut |_| {}).unwrap().ok);
}

#[test]
fn many_shards_keep_order_and_every_dtype_size() {
    let fx = Fixture::new();
    let dtypes = [
        DType::U8,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F16,
        DType::Bf16,
        DType::F32,
        DType::F64,
    ];
    let fields: Vec<Field> = dtypes.iter().map(|d| Field::tensor(d.name(), *d, &[3])).collect();
    let schema = Schema::new(fields).unwrap();
    let samples: Vec<Vec<Vec<u8>>> = (0..200u32)
        .map(|i| dtypes.iter().map(|d| (0..3 * d.size()).map(|j| (i as usize * 13 + j) as u8).collect()).collect())
        .collect();
    let ds = fx.pack("many", "m", schema, &samples, 1000);
    let d = fx.open(&ds).unwrap();
    assert!(d.manifest().shards.len() > 20);
    assert_eq!(fx.read_all(&ds).unwrap(), samples);
}

/// A `list` field (token ids) reads back value for value, including empty lists and a
/// value spanning chunks, with offsets counted in elements; the writer refuses a value
/// that is not whole elements.
#[test]
fn list_fields_read_back_with_element_offsets() {
    let fx = Fixture::new();
    let schema = Schema::new(vec![Field::list("tok", DType::U32), Field::tensor("y", DType::I64, &[])]).unwrap();
    let lens = [0usize, 1, 7, 5000, 0, 3, 12_000, 2];
    let samples: Vec<Vec<Vec<u8>>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let tok: Vec<u8> = (0..n as u32).flat_map(|t| (t * 31 + i as u32).to_le_bytes()).collect();
            vec![tok, (i as i64).to_le_bytes().to_vec()]
        })
        .collect();
    let ds = fx.pack("tok", "t", schema.clone(), &samples, 40_000);
    assert_eq!(fx.read_all(&ds).unwrap(), samples);
    let loader = fx.loader(&ds, "t").batch_size(4).shuffle(shardlock::Shuffle::None).build().unwrap();
    let mut seen = 0;
    for batch in loader {
        let batch = batch.unwrap();
        let slot = batch.fields().iter().find(|s| &*s.name == "tok").unwrap().clone();
        let at = slot.offsets_at.unwrap();
        let raw = batch.buffer_bytes();
        let off = |j: usize| u64::from_le_bytes(raw[at + 8 * j..at + 8 * j + 8].try_into().unwrap()) as usize;
        for i in 0..batch.len() {
            assert_eq!(batch.bytes("tok", i).unwrap(), &samples[seen + i][0][..]);
            assert_eq!(off(i + 1) - off(i), lens[seen + i], "offsets count elements");
        }
        seen += batch.len();
    }
    assert_eq!(seen, lens.len());

    let mut opts = shardlock::PackOptions::new("bad");
    opts.force = true;
    let mut w = shardlock::DatasetWriter::create(&fx.path("bad"), schema, opts, &*fx.keyring, &fx.issuer).unwrap();
    let e = w.write_sample(&[&[1, 2, 3], &0i64.to_le_bytes()]).unwrap_err().to_string();
    assert!(e.contains("not a whole number of elements"), "{e}");
}
