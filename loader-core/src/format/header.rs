//! The shard header: a fixed, canonical binary encoding that is also the Cobblestone
//! *context* of the shard payload, so any edit to it fails the key commitment.
//!
//! ```text
//! offset size field
//!      0    8 magic "SHLKSHRD"
//!      8    2 format version (u16 LE) = 1
//!     10    2 header length in bytes (u16 LE), including magic
//!     12    1 payload scheme (1 = Cobblestone-256)
//!     13    1 reserved, 0
//!     14    4 shard index (u32 LE)
//!     18   16 shard id (random per packed shard version)
//!     34   32 schema digest (SHA-256 of the canonical schema)
//!     66    8 record count (u64 LE)
//!     74    8 plaintext length (u64 LE)
//!     82    2 dataset id length n (u16 LE), 1..=255
//!     84    n dataset id (UTF-8)
//! ```

use crate::error::{Error, Result};
use std::path::Path;

/// Magic bytes at the start of every shard file.
pub const MAGIC: &[u8; 8] = b"SHLKSHRD";
/// The only format version this build reads and writes.
pub const FORMAT_VERSION: u16 = 1;
/// Payload scheme id of Cobblestone-256.
pub const SCHEME_COBBLESTONE_256: u8 = 1;
const FIXED_LEN: usize = 84;

/// The authenticated header of one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    /// Dataset the shard belongs to.
    pub dataset_id: String,
    /// Position of the shard in the dataset.
    pub shard_index: u32,
    /// Random id of this packed version of the shard.
    pub shard_id: [u8; 16],
    /// SHA-256 of the canonical schema.
    pub schema_digest: [u8; 32],
    /// Number of records.
    pub record_count: u64,
    /// Plaintext length of the payload (index + records).
    pub plaintext_len: u64,
}

/// Checks a dataset id: 1..=255 bytes of `[A-Za-z0-9_.:/-]`.
pub fn validate_dataset_id(id: &str) -> std::result::Result<(), String> {
    if id.is_empty() || id.len() > 255 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.:/-".contains(&b)) {
        return Err(format!("dataset id {id:?} must be 1-255 characters of [A-Za-z0-9_.:/-]"));
    }
    Ok(())
}

/// Encoded header length for a dataset id.
pub fn encoded_len(dataset_id: &str) -> usize {
    FIXED_LEN + dataset_id.len()
}

impl ShardHeader {
    /// Canonical encoding; this exact byte string is the Cobblestone context.
    pub fn encode(&self) -> Vec<u8> {
        let id = self.dataset_id.as_bytes();
        let len = FIXED_LEN + id.len();
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(len as u16).to_le_bytes());
        out.push(SCHEME_COBBLESTONE_256);
        out.push(0);
        out.extend_from_slice(&self.shard_index.to_le_bytes());
        out.extend_from_slice(&self.shard_id);
        out.extend_from_slice(&self.schema_digest);
        out.extend_from_slice(&self.record_count.to_le_bytes());
        out.extend_from_slice(&self.plaintext_len.to_le_bytes());
        out.extend_from_slice(&(id.len() as u16).to_le_bytes());
        out.extend_from_slice(id);
        out
    }

    /// Parses the header at the start of `bytes` (a shard file); returns it and its
    /// length. `path` only names the file in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<(Self, usize)> {
        let bad = |detail: String| Error::Format { what: "shard header", path: path.to_owned(), detail };
        if bytes.len() < FIXED_LEN {
            return Err(bad(format!("file has {} bytes, shorter than a shard header", bytes.len())));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a shardlock shard (bad magic)".into()));
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u16_at(8);
        if version != FORMAT_VERSION {
            return Err(bad(format!("format version {version}; this build reads version {FORMAT_VERSION}")));
        }
        let len = u16_at(10) as usize;
        if bytes[12] != SCHEME_COBBLESTONE_256 || bytes[13] != 0 {
            return Err(bad(format!("unknown payload scheme {}/{}", bytes[12], bytes[13])));
        }
        let id_len = u16_at(82) as usize;
        if len != FIXED_LEN + id_len || !(1..=255).contains(&id_len) || bytes.len() < len {
            return Err(bad(format!("inconsistent header length {len} / dataset id length {id_len}")));
        }
        let dataset_id =
            std::str::from_utf8(&bytes[FIXED_LEN..len]).map_err(|_| bad("dataset id is not UTF-8".into()))?.to_owned();
        validate_dataset_id(&dataset_id).map_err(bad)?;
        let mut shard_id = [0u8; 16];
        shard_id.copy_from_slice(&bytes[18..34]);
        let mut schema_digest = [0u8; 32];
        schema_digest.copy_from_slice(&bytes[34..66]);
        let h = ShardHeader {
            dataset_id,
            shard_index: u32_at(14),
            shard_id,
            schema_digest,
            record_count: u64_at(66),
            plaintext_len: u64_at(74),
        };
        Ok((h, len))
    }
}
