//! # shardlock
//!
//! An encrypted streaming data loader for GPU training. Data owners pack datasets into
//! encrypted shards (C2SP chunked encryption, Cobblestone-256, one DEK per shard,
//! wrapped by a KEK); readers check a signed manifest and authenticate every 16 KiB
//! chunk before any plaintext is released.
//!
//! Layout of the crate (one concern per module):
//! - [`format`]: wire types and parsers, no keys;
//! - [`crypto`]: AEAD backends, Cobblestone-256, AES-KWP, Ed25519;
//! - [`keys`]: secret types, keyring file, the [`keys::KeyProvider`] trait;
//! - [`pack`]: writing datasets;
//! - [`dataset`]: opening, reading, verifying and rotating datasets;
//! - [`memory`]: mapped and locked memory (the only place with `unsafe`).
//!
//! The normative format description is `docs/FORMAT.md`.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod crypto;
pub mod dataset;
pub mod error;
pub mod format;
pub mod keys;
pub mod memory;
pub mod pack;

pub use crypto::aead::Backend;
pub use dataset::{Dataset, ShardReader};
pub use error::{Error, IntegrityKind, Result, ShardRef};
pub use format::{DType, Field, Manifest, Schema};
pub use keys::{IssuerKey, KeyProvider, Keyring, TrustAnchor};
pub use pack::{DatasetWriter, PackOptions};
