//! # shardlock
//!
//! An encrypted streaming data loader for GPU training. Data owners pack datasets into
//! encrypted shards (C2SP chunked encryption, Cobblestone-256, one DEK per shard,
//! wrapped by a KEK); readers check a signed manifest and authenticate every 16 KiB
//! chunk before any plaintext is released.
//!
//! What a user imports is re-exported here; the modules are private, so the layout
//! can change without breaking callers (`docs/ARCHITECTURE.md` maps the layers):
//! - streaming: [`Loader`] and its [`LoaderBuilder`], [`Batch`] and its views,
//!   [`LoaderState`] for resume, the [`BatchStream`] trait shared with the device stage;
//! - writing: [`DatasetWriter`], [`PackOptions`], [`pack_paths`];
//! - keys: the [`KeyProvider`] trait, [`Keyring`], [`IssuerKey`], [`TrustAnchor`],
//!   [`open_provider`], and (feature `pkcs11`) the `pkcs11` provider module;
//! - access: [`Token`], [`TokenSpec`], [`Authorizer`], [`Access`] (the only path from a
//!   token to a shard's DEK), the audit log ([`AuditLog`], [`verify_log`]);
//! - datasets: [`Dataset`] and [`ShardReader`], [`inspect`], [`verify`], [`rotate`],
//!   [`upload_dir`], [`Location`] and [`RemoteOptions`] for `s3://` (feature `s3`);
//! - errors: [`Error`] (one code per failure: [`Error::code`]) and its sub-kinds.
//!
//! Features: `pkcs11` (HSM key custody), `transit` (OpenBao/Vault Transit custody),
//! `aws-kms` (AWS KMS custody),
//! `key-service` (the client of `shardlock keyd`), `keyd` (the key service), `s3` (object
//! storage), `cuda` (device stage), `zstd` (compressed fields), `image` (JPEG/PNG/WebP decode and transforms on the workers), `rustcrypto` (pure-Rust AES backend), `cli` (the
//! `shardlock` binary; turns on all but `rustcrypto`). The default build has none of them.
//!
//! The normative format description is `docs/FORMAT.md`.

#![deny(unsafe_code)]
#![warn(missing_docs)]

// The layers, bottom up: each module uses only modules above it in this list (checked
// by tests/layers.rs). docs/ARCHITECTURE.md says what each one keeps.
// The failure vocabulary.
mod error;
// Helpers: files that must not be seen half-written, durations and the clock.
mod fs;
mod time;
// Randomness as a pure function of (seed, epoch, sample).
mod rng;
// PEM certificate and key files, for the key service and its client.
#[cfg(any(feature = "keyd", feature = "key-service"))]
mod tls;
// Primitives: memory (mapped and locked; the unsafe lives here) ...
mod memory;
// ... and crypto (no I/O), whose plaintext scratch is memory's locked pages.
mod crypto;
// Per-value zstd compression, its contexts in memory it wipes.
mod codec;
// Documents re-read when they change (the deny list, the key service's trust anchors).
mod watch;
// Wire formats: parsers and encoders, no keys.
mod format;
// Image decode and transforms, the decoders' buffers in memory's locked arena.
mod decode;
// Key custody: secret types, Grant, providers.
mod keys;
// Access policy: tokens, the authorizer, the deny list.
mod auth;
// The hash-chained audit log.
mod audit;
// Object storage and the ciphertext cache.
mod remote;
// A verified dataset and its shards.
mod dataset;
// The only gate from a token to a DEK.
mod access;
// Writing datasets.
mod pack;
// Whole-dataset operations: verify, rotate, upload.
mod ops;
// The key service (feature `keyd`): the access gate behind HTTPS, for other processes.
#[cfg(feature = "keyd")]
mod keyd;
// The streaming loader.
mod pipeline;
// The CUDA device stage.
pub mod device;
// Throughput measurement over any batch stream.
mod bench;
// The fuzz targets' harnesses (reached through `fuzz_hooks`).
mod fuzz;

// The unit tests run on the allocator the decoders need (and so test it everywhere).
#[cfg(test)]
#[global_allocator]
static TEST_ALLOC: memory::ScratchAlloc = memory::ScratchAlloc;

pub use access::Access;
pub use audit::{verify_log, AuditEvent, AuditLog, AuditSummary};
pub use auth::{
    inspect_unverified, Attenuation, Authorizer, AuthorizerConfig, Clock, DenyList, ShardSet, Token, TokenSpec,
};
pub use bench::{aes_gcm_ceiling, run as run_bench, BenchReport, EpochReport, Source as BenchSource};
pub use crypto::aead::Backend;
pub use dataset::{inspect, inspect_at, Dataset, Inspection, OpenShard, ShardReader};
pub use decode::{Geometry, ImageDecode, ImageLayout, OnDecodeError};
pub use error::{DenyReason, Error, IntegrityKind, Operation, ProviderFailure, RemoteFailure, Result, ShardRef};
pub use format::manifest::Metadata;
pub use format::{Compression, DType, Field, FieldKind, Manifest, Schema, ShardEntry};
pub use fs::{read_secret_file, write_new_file};
#[cfg(feature = "keyd")]
pub use keyd::{KeyService, KeydConfig, LogFormat, Source as KeydSource};
#[cfg(feature = "aws-kms")]
pub use keys::kms;
#[cfg(feature = "pkcs11")]
pub use keys::pkcs11;
#[cfg(feature = "key-service")]
pub use keys::service;
#[cfg(feature = "transit")]
pub use keys::transit;
pub use keys::{
    is_pkcs11_uri, is_service_url, open_provider, open_provider_path, open_providers, Dek, Grant, IssuerKey, Kek,
    KeyProvider, Keyring, ProviderSet, ReleaseContext, Rewrap, TrustAnchor, WrapContext,
};
pub use memory::{scratch_alloc_installed, MemoryPolicy, ScratchAlloc};
pub use ops::{rotate, upload_dir, verify, verify_at, ShardReport, VerifyOptions, VerifyReport};
pub use pack::{
    apply_compression, assemble, assemble_at, default_pack_threads, pack_paths, write_leases, DatasetWriter,
    ImageFolder, InputFormat, InputSource, NpyArray, PackOptions, Part, PartShards, ShardLease, WebDataset,
    DEFAULT_SHARD_SIZE, IMAGE_EXTENSIONS, LEASES_FILE, LEASES_FORMAT, PART_FORMAT,
};
pub use pipeline::{
    Batch, BatchLayout, BatchStream, Consumed, Element, FieldSlot, Loader, LoaderBuilder, LoaderState, Mix, MixBatch,
    MixState, Next, Remainder, Shuffle, TensorView, TokenPosition, TokenStream, TokenWindows, WorkerPosition,
    DEFAULT_MEMORY_BUDGET,
};
pub use remote::{Location, RangeReads, RemoteOptions};
pub use time::{max_time, parse_lifetime, parse_time, parse_ttl, time_after};

/// Not a stable API: the crypto primitives and format internals, for the Wycheproof
/// vector tests, the tamper tests, the benches and the fuzz targets. Raw-mode
/// Cobblestone lives here, never in the public surface (the C2SP spec says it SHOULD
/// NOT be exposed).
#[doc(hidden)]
pub mod primitives {
    pub use crate::crypto::{aead, chunked, kwp, sign};
    pub use crate::format::{index, SignedManifest};
    pub use crate::memory::{map_file, process_cpu_seconds, rss_anon};
}

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

    /// The whole read path (manifest, header, index, payload through `Dataset` and
    /// `Access`) over a valid dataset that the input edits and the harness re-signs.
    pub fn read_path(data: &[u8]) {
        crate::fuzz::read_path(data)
    }

    /// Token parsing, attenuation and authorization; an allowed request must be within
    /// everything the issuer and every attenuation granted.
    pub fn token(data: &[u8]) {
        crate::auth::fuzz_token(data)
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
