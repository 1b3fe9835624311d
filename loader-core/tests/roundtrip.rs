//! Property tests: pack -> read round trips at the edges of the chunking and sharding.
#![allow(clippy::unwrap_used)]

mod common;

use common::Fixture;
use proptest::prelude::*;
use shardlock::primitives::chunked::CHUNK_LEN;
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
