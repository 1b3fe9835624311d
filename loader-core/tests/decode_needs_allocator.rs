//! Without `shardlock::ScratchAlloc` as the global allocator, the decoders' buffers
//! would be unlocked: the loader refuses `decode`, unless unlocked memory is allowed.
#![allow(clippy::unwrap_used)]

mod common;

use common::Fixture;
use shardlock::{Field, ImageDecode, Schema};

#[test]
fn decode_is_refused_without_the_allocator_unless_unlocked_memory_is_allowed() {
    assert!(!shardlock::scratch_alloc_installed());
    let fx = Fixture::new();
    let schema = Schema::new(vec![Field::bytes("image")]).unwrap();
    let dir = fx.pack("imgs", "imgs", schema, &[vec![b"x".to_vec()]], 1 << 16);
    let err = fx.loader(&dir, "imgs").decode("image", ImageDecode::eval(8)).build().err().unwrap();
    assert!(err.to_string().contains("#[global_allocator] static ALLOC: shardlock::ScratchAlloc"), "{err}");
    fx.loader(&dir, "imgs").decode("image", ImageDecode::eval(8)).allow_unlocked_memory(true).build().unwrap();
}
