//! `shardlock._native`: thin bindings over the `shardlock` crate. Python-facing API
//! lives in the `shardlock` package (python/shardlock), which imports this module
//! in exactly one place (`shardlock/_lib.py`).
//!
//! One file per core module: `errors.rs` (error mapping), `keys.rs` (keys and
//! tokens), `writer.rs` (pack), `loader.rs` (pipeline), `device.rs` (DLPack export of device batches). The
//! same code builds with and without the `cuda` feature: without it the core's
//! device API is its placeholder, whose constructors return `DeviceUnavailable`.

#![deny(unsafe_code)]

mod device;
mod errors;
mod keys;
mod loader;
mod writer;

use pyo3::prelude::*;

/// Image decoders allocate through Rust's allocator; inside a decode this one hands
/// them locked memory that is wiped afterwards (everything else goes to the system).
#[global_allocator]
static ALLOC: shardlock::ScratchAlloc = shardlock::ScratchAlloc;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    keys::register(m)?;
    writer::register(m)?;
    loader::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
