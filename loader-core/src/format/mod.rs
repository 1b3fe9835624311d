//! Wire types and their (de)serialisation. No keys and no I/O live here: parsers take
//! bytes and return typed values or a [`crate::Error::Format`]. The normative
//! description is `docs/FORMAT.md`.

pub mod header;
pub mod index;
pub mod manifest;
pub mod schema;

pub use header::ShardHeader;
pub use index::RecordIndex;
pub use manifest::{Manifest, ShardEntry, SignedManifest};
pub use schema::{Compression, DType, Field, FieldKind, Schema};
