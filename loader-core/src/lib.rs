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
//! - [`auth`]: Biscuit tokens, the authorizer, revocation, and [`auth::Access`], the
//!   only path from a token to a shard's DEK;
//! - [`audit`]: the hash-chained audit log;
//! - [`dataset`]: opening, reading, verifying and rotating datasets;
//! - [`pipeline`]: the streaming [`Loader`];
//! - [`device`]: the CUDA device stage (feature `cuda`) and [`device::kernels`], NVRTC
//!   decode kernels with their CPU references;
//! - [`memory`]: mapped and locked memory (with `device/`, the only places with
//!   `unsafe`);
//! - [`remote`]: datasets in S3-compatible object storage (feature `s3`), read through a
//!   local cache that holds ciphertext only.
//!
//! The normative format description is `docs/FORMAT.md`.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod auth;
pub mod crypto;
pub mod dataset;
pub mod device;
pub mod error;
pub mod format;
pub mod keys;
pub mod memory;
pub mod pack;
pub mod pipeline;
pub mod remote;

pub use auth::{Access, Authorizer, AuthorizerConfig, DenyReason, Operation, Token};
pub use crypto::aead::Backend;
pub use dataset::{Dataset, ShardReader};
pub use error::{Error, IntegrityKind, ProviderFailure, RemoteFailure, Result, ShardRef};
pub use format::{DType, Field, Manifest, Schema};
pub use keys::{IssuerKey, KeyProvider, Keyring, TrustAnchor};
pub use pack::{DatasetWriter, PackOptions};
pub use pipeline::{Batch, BatchStream, Loader, LoaderBuilder, LoaderState, Remainder, Shuffle};

/// Entry points for `cargo fuzz` targets (loader-core/fuzz). Not a stable API.
#[doc(hidden)]
pub mod fuzz_hooks {
    use std::path::Path;

    use crate::format::{DType, Field, RecordIndex, Schema, ShardHeader, SignedManifest};

    /// Shard header parsing; a parsed header must re-encode to the same bytes.
    pub fn shard_header(data: &[u8]) {
        if let Ok((h, len)) = ShardHeader::decode(data, Path::new("fuzz")) {
            assert_eq!(h.encode(), &data[..len], "header encoding is not canonical");
        }
    }

    /// Manifest parsing and consistency checks.
    pub fn manifest(data: &[u8]) {
        if let Ok(m) = SignedManifest::parse(data, Path::new("fuzz")) {
            let _ = m.check_consistency(Path::new("fuzz"));
            let _ = SignedManifest::signed_message(&m.body);
        }
    }

    /// Record index parsing against a two-field schema; every range of a parsed index
    /// must lie inside the plaintext.
    pub fn record_index(data: &[u8]) {
        let Some((&extra, index)) = data.split_first() else { return };
        let Ok(schema) = Schema::new(vec![Field::bytes("b"), Field::tensor("t", DType::U16, &[2])]) else { return };
        let plaintext_len = index.len() as u64 + u64::from(extra) * 8;
        if let Ok(ix) = RecordIndex::parse(index, &schema, plaintext_len, Path::new("fuzz")) {
            for r in 0..ix.len() {
                let (a, b) = ix.record_range(r);
                assert!(a <= b && b <= plaintext_len);
                assert_eq!(ix.field_range(r, 1).1 - ix.field_range(r, 1).0, 4);
            }
        }
    }

    /// Cobblestone decryption of arbitrary bytes, random access and streaming: must
    /// never panic, and nothing decrypts under a key the input was not made with.
    pub fn payload(data: &[u8]) {
        use crate::crypto::chunked::{ChunkBuf, Payload, StreamDecryptor};
        let key = [0u8; 32];
        if let Ok(p) = Payload::open(crate::Backend::default(), &key, b"fuzz", data, 0) {
            let mut buf = ChunkBuf::new();
            for k in 0..p.chunk_count() {
                assert!(p.decrypt_chunk(k, &mut buf[..]).is_err());
            }
        }
        if let Ok(mut s) = StreamDecryptor::new(crate::Backend::default(), &key, b"fuzz", data) {
            let mut buf = ChunkBuf::new();
            assert!(s.next_chunk(&mut buf).is_err());
        }
    }
}
