//! The dataset manifest: every shard with its sizes, digest and wrapped DEK, signed
//! by the data owner's Ed25519 issuer key.
//!
//! On disk (`manifest.json`):
//! ```json
//! {"format": "shardlock-manifest/1", "body": { ... }, "signature": "<hex>"}
//! ```
//! The signature covers `"shardlock-manifest/1\n"` followed by the exact bytes of
//! `body` as they appear in the file, so verification never depends on re-encoding.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::schema::Schema;
use crate::error::{Error, Result};

/// Value of the `format` member.
pub const FORMAT: &str = "shardlock-manifest/1";
/// Domain separation prefix of the signed message.
pub const SIGNING_PREFIX: &[u8] = b"shardlock-manifest/1\n";
/// Manifest file name inside a dataset directory.
pub const FILE_NAME: &str = "manifest.json";

/// Largest manifest a reader accepts (local or from a bucket): about a million shards.
pub const MAX_LEN: u64 = 256 << 20;
/// Hex digits of `wrapped_dek`: AES-KWP (RFC 5649) of a 32-byte DEK is 40 bytes,
/// whether the keyring or a PKCS#11 token (`CKM_AES_KEY_WRAP_PAD`) wraps it.
pub const WRAPPED_DEK_HEX_LEN: usize = 80;
/// KEK ids of custody that wraps outside AES-KWP (`transit:<mount>/<key>`,
/// `aws-kms:<key>`): their
/// `wrapped_dek` is the hex of the custody's ciphertext text (FORMAT.md sections 7.5, 7.6).
pub const EXTERNAL_KEK_PREFIXES: [&str; 2] = ["transit:", "aws-kms:"];
/// Most hex digits of an external custody's `wrapped_dek` (512 bytes of ciphertext).
pub const EXTERNAL_WRAPPED_DEK_MAX_HEX: usize = 1024;

/// One shard as listed in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Position in the dataset (0-based, contiguous).
    pub index: u32,
    /// Random id of this packed version (hex of 16 bytes), also in the shard header.
    pub id: String,
    /// File name relative to the dataset directory.
    pub file: String,
    /// Number of records.
    pub records: u64,
    /// Plaintext bytes of the payload (index + records).
    pub plaintext_bytes: u64,
    /// Bytes of the whole shard file (header + payload).
    pub file_bytes: u64,
    /// SHA-256 of the whole shard file, hex.
    pub sha256: String,
    /// Id of the KEK that wraps the DEK.
    pub kek_id: String,
    /// The shard's DEK wrapped with AES-KWP (RFC 5649) under the KEK, hex.
    pub wrapped_dek: String,
}

/// The signed content of a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Dataset id, also in every shard header.
    pub dataset_id: String,
    /// Increases with every re-signing (rotation); lets readers refuse rollbacks.
    pub generation: u64,
    /// Unix time of signing.
    pub created_unix: u64,
    /// Hex key id of the issuer key that signed (first 8 bytes of SHA-256 of the public key).
    pub issuer_key_id: String,
    /// Fields of every record.
    pub schema: Schema,
    /// Hex SHA-256 of the canonical schema.
    pub schema_digest: String,
    /// Total record count over all shards.
    pub records: u64,
    /// Every shard, by index.
    pub shards: Vec<ShardEntry>,
    /// Dataset metadata the issuer signs with the rest (FORMAT.md section 6): for example
    /// `classes`, the label names in label order of a dataset packed from an image folder
    /// ([`Manifest::classes`]). Left out of the JSON when empty.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: Metadata,
}

/// Signed dataset metadata: names (1 to 128 printable ASCII characters) to JSON values.
pub type Metadata = std::collections::BTreeMap<String, serde_json::Value>;

/// Checks metadata names, and that `classes`, when present, is a list of strings.
pub fn validate_metadata(m: &Metadata) -> std::result::Result<(), String> {
    for k in m.keys() {
        if k.is_empty() || k.len() > 128 || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("metadata name {k:?} must be 1 to 128 printable ASCII characters without spaces"));
        }
    }
    match m.get("classes") {
        Some(serde_json::Value::Array(a)) if a.iter().all(serde_json::Value::is_string) => Ok(()),
        Some(_) => Err("metadata \"classes\" must be a list of class names (strings) in label order".into()),
        None => Ok(()),
    }
}

impl Manifest {
    /// The class names in label order (`metadata.classes`), when the packer recorded them.
    pub fn classes(&self) -> Option<Vec<&str>> {
        match self.metadata.get("classes")? {
            serde_json::Value::Array(a) => a.iter().map(serde_json::Value::as_str).collect(),
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    format: String,
    #[serde(borrow)]
    body: &'a RawValue,
    signature: String,
}

/// A manifest as read from disk: its body bytes, signature and parsed content. The
/// content must not be trusted before its signature verifies against the trust
/// anchor (`Dataset::open` does that, then [`SignedManifest::check_consistency`]).
pub struct SignedManifest {
    /// The parsed body.
    pub manifest: Manifest,
    /// Exact body bytes covered by the signature.
    pub body: Vec<u8>,
    /// The Ed25519 signature.
    pub signature: Vec<u8>,
}

impl SignedManifest {
    /// Parses a manifest file's bytes. `path` only names the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |detail: String| Error::Format { what: "manifest", path: path.to_owned(), detail };
        let env: Envelope<'_> = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if env.format != FORMAT {
            return Err(bad(format!("format {:?}, this build reads {FORMAT:?}", env.format)));
        }
        let body = env.body.get().as_bytes().to_vec();
        let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| bad(format!("body: {e}")))?;
        let signature = hex::decode(&env.signature).map_err(|_| bad("signature is not hex".into()))?;
        Ok(Self { manifest, body, signature })
    }

    /// The message that the signature covers.
    pub fn signed_message(body: &[u8]) -> Vec<u8> {
        [SIGNING_PREFIX, body].concat()
    }

    /// Serialises a manifest body and its signature into the file encoding.
    pub fn encode(body: &[u8], signature: &[u8]) -> Result<Vec<u8>> {
        let raw =
            std::str::from_utf8(body).map_err(|_| Error::Internal("manifest body to sign is not UTF-8".into()))?;
        let raw = RawValue::from_string(raw.to_owned())
            .map_err(|e| Error::Internal(format!("manifest body to sign is not JSON: {e}")))?;
        let env = Envelope { format: FORMAT.into(), body: &raw, signature: hex::encode(signature) };
        let mut out = serde_json::to_vec(&env).map_err(|e| Error::Internal(format!("manifest encoding: {e}")))?;
        out.push(b'\n');
        Ok(out)
    }

    /// Checks the parsed content for internal consistency (after the signature).
    pub fn check_consistency(&self, path: &Path) -> Result<()> {
        let bad = |detail: String| Error::Format { what: "manifest", path: path.to_owned(), detail };
        let m = &self.manifest;
        super::header::validate_dataset_id(&m.dataset_id).map_err(bad)?;
        m.schema.validate().map_err(|e| bad(format!("schema: {e}")))?;
        if hex::encode(m.schema.digest()) != m.schema_digest {
            return Err(bad("schema digest does not match the schema".into()));
        }
        validate_metadata(&m.metadata).map_err(bad)?;
        let mut total = 0u64;
        let mut names = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        let lower_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        for (i, s) in m.shards.iter().enumerate() {
            let external = EXTERNAL_KEK_PREFIXES.iter().any(|p| s.kek_id.starts_with(p));
            let wrapped_len = if external { s.wrapped_dek.len() } else { WRAPPED_DEK_HEX_LEN };
            if external && (wrapped_len == 0 || wrapped_len % 2 == 1 || wrapped_len > EXTERNAL_WRAPPED_DEK_MAX_HEX) {
                return Err(bad(format!(
                    "shard {i}: wrapped_dek of {:?} must be an even number of lowercase hex digits, at most {EXTERNAL_WRAPPED_DEK_MAX_HEX}",
                    s.kek_id
                )));
            }
            for (field, value, digits) in
                [("id", &s.id, 32), ("sha256", &s.sha256, 64), ("wrapped_dek", &s.wrapped_dek, wrapped_len)]
            {
                if !lower_hex(value, digits) {
                    return Err(bad(format!(
                        "shard {i}: {field} must be {digits} lowercase hex digits (has {} characters)",
                        value.len()
                    )));
                }
            }
            if !names.insert(s.file.as_str()) || !ids.insert(s.id.as_str()) {
                return Err(bad(format!("shard {i}: file name or id listed twice")));
            }
            let header_len = super::header::encoded_len(&m.dataset_id) as u64;
            let expected = super::index::index_len(s.records, m.schema.fields.len())
                .filter(|&ix| ix <= s.plaintext_bytes)
                .and_then(|_| crate::crypto::chunked::ciphertext_len(s.plaintext_bytes)?.checked_add(header_len));
            if expected != Some(s.file_bytes) {
                return Err(bad(format!("shard {i}: file_bytes/plaintext_bytes/records are inconsistent")));
            }
            if s.index as usize != i {
                return Err(bad(format!("shard entry {i} has index {}", s.index)));
            }
            let safe_name = !s.file.is_empty()
                && !s.file.starts_with('.')
                && s.file.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !safe_name {
                return Err(bad(format!("shard {i} file name {:?} is not a plain file name", s.file)));
            }
            total = total.checked_add(s.records).ok_or_else(|| bad("record count overflows".into()))?;
        }
        if total != m.records {
            return Err(bad(format!("shards hold {total} records, manifest says {}", m.records)));
        }
        Ok(())
    }
}
