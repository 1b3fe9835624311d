//! The failure vocabulary of the crate: [`Error`], its sub-kinds ([`IntegrityKind`],
//! [`ProviderFailure`], [`RemoteFailure`], [`DenyReason`]), [`Operation`] and
//! [`ShardRef`], with their stable names. One concern, longer than most files: every
//! failure is defined here, so no module needs another one's types to say what went
//! wrong, and this module depends on none.
//!
//! Every variant says what happened and where (file, dataset, shard, chunk, rule) and,
//! where there is one, what to do. Decryption failures are deliberately opaque about
//! *why* a tag did not verify (no oracle), but they always name *where*.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which shard an error concerns. Filled in as the error travels up from the
/// primitive that detected it to the code that knows the dataset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardRef {
    /// Dataset id from the manifest, when known.
    pub dataset: Option<String>,
    /// Shard index within the dataset, when known.
    pub index: Option<u32>,
    /// Shard file, when known.
    pub file: Option<PathBuf>,
}

impl fmt::Display for ShardRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(d) = &self.dataset {
            parts.push(format!("dataset {d:?}"));
        }
        if let Some(i) = self.index {
            parts.push(format!("shard {i}"));
        }
        if let Some(p) = &self.file {
            parts.push(format!("file {}", p.display()));
        }
        if parts.is_empty() {
            f.write_str("payload")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// What kind of integrity failure was detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IntegrityKind {
    /// The shard header differs from what the signed manifest says (edited header,
    /// shard moved to another dataset or position, or substituted by another shard).
    HeaderMismatch,
    /// The key commitment did not match: wrong key, wrong context (header) or a
    /// modified salt/commitment. Detected before any chunk is decrypted.
    Commitment,
    /// The ciphertext length is not a valid Cobblestone length, or a chunk is missing.
    Truncated,
    /// Bytes follow the final chunk.
    TrailingData,
    /// A chunk failed authentication (modified, reordered, moved from elsewhere).
    ChunkAuth,
    /// The file size differs from the manifest.
    SizeMismatch,
    /// The SHA-256 of the shard file differs from the manifest.
    DigestMismatch,
    /// A shard listed in the manifest is missing.
    MissingShard,
    /// A shard file in the directory is not listed in the manifest.
    ExtraShard,
    /// The authenticated record index is inconsistent with the manifest or schema.
    IndexCorrupt,
}

impl IntegrityKind {
    /// Stable snake_case name for logs and bindings.
    pub fn name(self) -> &'static str {
        match self {
            Self::HeaderMismatch => "header_mismatch",
            Self::Commitment => "commitment",
            Self::Truncated => "truncated",
            Self::TrailingData => "trailing_data",
            Self::ChunkAuth => "chunk_auth",
            Self::SizeMismatch => "size_mismatch",
            Self::DigestMismatch => "digest_mismatch",
            Self::MissingShard => "missing_shard",
            Self::ExtraShard => "extra_shard",
            Self::IndexCorrupt => "index_corrupt",
        }
    }
}

impl fmt::Display for IntegrityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HeaderMismatch => "shard header does not match the signed manifest",
            Self::Commitment => "key commitment check failed (wrong key, or header/salt/commitment modified)",
            Self::Truncated => "ciphertext truncated or of invalid length",
            Self::TrailingData => "unexpected data after the final chunk",
            Self::ChunkAuth => "chunk failed authentication (modified, reordered or moved)",
            Self::SizeMismatch => "file size differs from the signed manifest",
            Self::DigestMismatch => "SHA-256 of the shard differs from the signed manifest",
            Self::MissingShard => "shard listed in the manifest is missing",
            Self::ExtraShard => "shard file is not listed in the signed manifest",
            Self::IndexCorrupt => "authenticated record index is inconsistent",
        })
    }
}

/// Which part of a key provider (a PKCS#11 HSM) could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProviderFailure {
    /// The PKCS#11 module (shared library) could not be loaded or initialised.
    ModuleLoad,
    /// No token with the label (serial, ...) given in the URI.
    TokenNotFound,
    /// No PIN could be read from the URI's `pin-source` (or none was given).
    PinSource,
    /// The token rejected the PIN. It is never retried in the same process.
    PinIncorrect,
    /// The token's user PIN is locked.
    PinLocked,
    /// No key with the URI's `object` label (and `id`) is on the token.
    KekNotFound,
    /// More than one key matches the URI.
    KekAmbiguous,
    /// The KEK can leave the HSM (extractable or not sensitive) and was not explicitly allowed.
    KekExtractable,
    /// The key exists but cannot serve as a KEK (not AES, no unwrap permission, no CKA_ID).
    KekUnusable,
    /// The token lacks a mechanism shardlock needs (AES key wrap with padding).
    Unsupported,
    /// `keygen` found a key with that label already on the token.
    AlreadyExists,
    /// The module or token failed (removed, device error, not initialised).
    Unavailable,
}

impl ProviderFailure {
    /// Stable snake_case name, for logs and bindings.
    pub fn name(self) -> &'static str {
        match self {
            Self::ModuleLoad => "module_load",
            Self::TokenNotFound => "token_not_found",
            Self::PinSource => "pin_source",
            Self::PinIncorrect => "pin_incorrect",
            Self::PinLocked => "pin_locked",
            Self::KekNotFound => "kek_not_found",
            Self::KekAmbiguous => "kek_ambiguous",
            Self::KekExtractable => "kek_extractable",
            Self::KekUnusable => "kek_unusable",
            Self::Unsupported => "unsupported",
            Self::AlreadyExists => "already_exists",
            Self::Unavailable => "unavailable",
        }
    }
}

impl ProviderFailure {
    /// [`ProviderFailure::name`] prefixed `provider_`, as [`Error::code`] gives it.
    pub fn code(self) -> &'static str {
        match self {
            Self::ModuleLoad => "provider_module_load",
            Self::TokenNotFound => "provider_token_not_found",
            Self::PinSource => "provider_pin_source",
            Self::PinIncorrect => "provider_pin_incorrect",
            Self::PinLocked => "provider_pin_locked",
            Self::KekNotFound => "provider_kek_not_found",
            Self::KekAmbiguous => "provider_kek_ambiguous",
            Self::KekExtractable => "provider_kek_extractable",
            Self::KekUnusable => "provider_kek_unusable",
            Self::Unsupported => "provider_unsupported",
            Self::AlreadyExists => "provider_already_exists",
            Self::Unavailable => "provider_unavailable",
        }
    }
}

impl fmt::Display for ProviderFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ModuleLoad => "cannot load the PKCS#11 module",
            Self::TokenNotFound => "token not found",
            Self::PinSource => "no PIN",
            Self::PinIncorrect => "PIN incorrect",
            Self::PinLocked => "PIN locked",
            Self::KekNotFound => "KEK not found",
            Self::KekAmbiguous => "KEK ambiguous",
            Self::KekExtractable => "KEK is extractable",
            Self::KekUnusable => "key cannot be used as a KEK",
            Self::Unsupported => "mechanism not supported",
            Self::AlreadyExists => "key already exists",
            Self::Unavailable => "HSM unavailable",
        })
    }
}

/// What went wrong reading a dataset from object storage (`s3://`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteFailure {
    /// The store did not answer usefully within the retry budget: server down,
    /// connections reset, 5xx responses, or no progress for longer than the stall timeout.
    Unavailable,
    /// The object does not exist (deleted or moved after the manifest was signed).
    NotFound,
    /// The store refused the credentials or the request (401/403).
    Denied,
    /// The object's size or SHA-256 differs from the signed manifest (replaced,
    /// truncated or tampered with); it was never used.
    Modified,
    /// The local cache directory ran out of space.
    CacheFull,
    /// The location or an option is invalid, or the store could not be configured.
    Config,
}

impl RemoteFailure {
    /// Stable snake_case name, for logs and bindings.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::NotFound => "not_found",
            Self::Denied => "denied",
            Self::Modified => "modified",
            Self::CacheFull => "cache_full",
            Self::Config => "config",
        }
    }

    /// What to do about it.
    pub fn hint(self) -> &'static str {
        match self {
            Self::Unavailable => "check that the endpoint is up and reachable, or raise the timeout (s3 option `timeout`)",
            Self::NotFound => {
                "the object is missing from the bucket: the dataset was deleted or moved after its manifest was signed; re-upload the dataset directory"
            }
            Self::Denied => {
                "check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) and the bucket policy"
            }
            Self::Modified => {
                "the object differs from the signed manifest (replaced, truncated or tampered with): re-upload the shard file that manifest.json lists"
            }
            Self::CacheFull => "free space in the cache directory, point `cache_dir` elsewhere, or lower `cache_bytes`",
            Self::Config => "fix the dataset location or the s3 options",
        }
    }
}

impl RemoteFailure {
    /// [`RemoteFailure::name`] prefixed `remote_`, as [`Error::code`] gives it.
    pub fn code(self) -> &'static str {
        match self {
            Self::Unavailable => "remote_unavailable",
            Self::NotFound => "remote_not_found",
            Self::Denied => "remote_denied",
            Self::Modified => "remote_modified",
            Self::CacheFull => "remote_cache_full",
            Self::Config => "remote_config",
        }
    }
}

impl fmt::Display for RemoteFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unavailable => "object store unavailable",
            Self::NotFound => "object not found",
            Self::Denied => "access denied by the object store",
            Self::Modified => "object differs from the signed manifest",
            Self::CacheFull => "cache directory full",
            Self::Config => "invalid object store configuration",
        })
    }
}

/// What a reader wants to do with a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Stream records (training).
    Read,
    /// Authenticate every chunk without releasing plaintext (`shardlock verify`).
    Verify,
}

impl Operation {
    /// The name used in tokens and the audit log.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Verify => "verify",
        }
    }

    /// Parses "read" / "verify".
    pub fn from_name(s: &str) -> Result<Self> {
        match s.trim() {
            "read" => Ok(Operation::Read),
            "verify" => Ok(Operation::Verify),
            o => Err(Error::InvalidArgument(format!("unknown operation {o:?} (read, verify)"))),
        }
    }

    /// Parses a comma-separated list ("read,verify").
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        let mut v: Vec<Self> =
            s.split(',').filter(|p| !p.trim().is_empty()).map(Self::from_name).collect::<Result<_>>()?;
        v.dedup();
        if v.is_empty() {
            return Err(Error::InvalidArgument("no operation given".into()));
        }
        Ok(v)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why access was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DenyReason {
    /// No token was given.
    MissingToken,
    /// The token does not parse or its signature chain does not verify under the
    /// trusted issuer key (forged, from another issuer, truncated, a block removed).
    InvalidToken,
    /// The token is for another dataset.
    WrongDataset,
    /// The shard is outside the token's shard set (or an attenuation narrowed it out).
    ShardOutOfScope,
    /// The operation is not granted.
    OperationNotGranted,
    /// The token (or an attenuation of it) has expired.
    TokenExpired,
    /// The token is not valid yet.
    NotYetValid,
    /// One of the token's revocation ids is on the deny list.
    Revoked,
    /// The token requires a newer generation of the dataset than the manifest has
    /// (an older pack or a rolled-back copy).
    StaleGeneration,
    /// Another check of an attenuation block failed.
    AttenuationCheck,
    /// A key service requires mTLS and the client certificate's identity is not the
    /// token's principal (a token presented by someone else).
    PrincipalMismatch,
}

impl DenyReason {
    /// Stable snake_case name, used in the audit log and in Python.
    pub fn name(self) -> &'static str {
        match self {
            DenyReason::MissingToken => "missing_token",
            DenyReason::InvalidToken => "invalid_token",
            DenyReason::WrongDataset => "wrong_dataset",
            DenyReason::ShardOutOfScope => "shard_out_of_scope",
            DenyReason::OperationNotGranted => "operation_not_granted",
            DenyReason::TokenExpired => "token_expired",
            DenyReason::NotYetValid => "not_yet_valid",
            DenyReason::Revoked => "revoked",
            DenyReason::StaleGeneration => "stale_generation",
            DenyReason::AttenuationCheck => "attenuation_check",
            DenyReason::PrincipalMismatch => "principal_mismatch",
        }
    }

    /// Every reason, in declaration order.
    pub const ALL: [DenyReason; 11] = [
        DenyReason::MissingToken,
        DenyReason::InvalidToken,
        DenyReason::WrongDataset,
        DenyReason::ShardOutOfScope,
        DenyReason::OperationNotGranted,
        DenyReason::TokenExpired,
        DenyReason::NotYetValid,
        DenyReason::Revoked,
        DenyReason::StaleGeneration,
        DenyReason::AttenuationCheck,
        DenyReason::PrincipalMismatch,
    ];

    /// The reason with this [`DenyReason::name`] (as a key service's answer names it).
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| Error::InvalidArgument(format!("{name:?} is not a denial reason")))
    }

    /// What the user can do about it.
    pub fn hint(self) -> &'static str {
        match self {
            DenyReason::MissingToken => "pass a token (--token FILE / token=...) issued by the data owner",
            DenyReason::InvalidToken => "the token is corrupt, truncated, or not signed by the issuer key given as the trust anchor; ask the data owner for a new one",
            DenyReason::WrongDataset => "this token is for another dataset; ask for a token for this one",
            DenyReason::ShardOutOfScope => "this token does not cover this shard; ask for a token with a wider shard set",
            DenyReason::OperationNotGranted => "this token does not grant this operation; ask for one that does (--ops)",
            DenyReason::TokenExpired => "the token has expired; ask the data owner for a fresh one",
            DenyReason::NotYetValid => "the token is not valid yet; check the clock, or wait until its not-before time",
            DenyReason::Revoked => "the token was revoked; ask the data owner for a new one",
            DenyReason::StaleGeneration => "the dataset's generation is older than this token accepts (an old pack or a rolled-back copy); read the current dataset",
            DenyReason::AttenuationCheck => "a check added when the token was attenuated does not hold",
            DenyReason::PrincipalMismatch => "the key service requires the client certificate of the token's principal; present that certificate (client_cert=/--client-cert), or a token issued to your certificate's identity",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Everything that can go wrong in shardlock.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("read", "write", "create", ...).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error (shared, so the error can be cloned).
        #[source]
        source: Arc<std::io::Error>,
    },

    /// The operating system refused a resource that is not a file: a thread, a
    /// runtime, a memory mapping.
    #[error("cannot {op}: {source}")]
    Os {
        /// What was being done ("start a decrypt worker", ...).
        op: &'static str,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A file that is not what it claims to be: a malformed header, manifest, keyring,
    /// key file or index. Nothing was decrypted from it.
    #[error("malformed {what} in {path}: {detail}")]
    Format {
        /// Which structure ("shard header", "manifest", "keyring", ...).
        what: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// What exactly is wrong.
        detail: String,
    },

    /// Authentication of shard data failed. No plaintext from the failing chunk (or
    /// any later one) is released, and the shard keeps failing if read again.
    #[error("integrity failure in {shard}{}: {kind}", chunk.map(|c| format!(", chunk {c}")).unwrap_or_default())]
    Integrity {
        /// Where.
        shard: ShardRef,
        /// Which chunk, when the failure is tied to one.
        chunk: Option<u64>,
        /// What kind of failure.
        kind: IntegrityKind,
    },

    /// An authenticated value of a compressed field (FORMAT.md section 5.1) is not a
    /// zstd frame the schema allows, or does not decompress to exactly the length its
    /// frame declares (a decompression bomb stops at the declared length). Nothing of
    /// the batch it was for is released.
    #[error("integrity failure in {shard}, record {record}, field {field:?}: {detail}")]
    Decompress {
        /// Where.
        shard: ShardRef,
        /// The record within the shard.
        record: u64,
        /// The field.
        field: String,
        /// What is wrong (never the value's bytes).
        detail: String,
    },

    /// An authenticated value of a field the loader decodes as an image (the `decode`
    /// option) is not a JPEG, PNG or WebP it can decode: wrong signature, corrupt or
    /// truncated data, or declared dimensions over the limit (a decompression bomb).
    /// With `on_decode_error = skip` the sample is left out instead, audited.
    #[error("cannot decode the image in {shard}, record {record}, field {field:?}: {detail}")]
    Decode {
        /// Where.
        shard: ShardRef,
        /// The record within the shard.
        record: u64,
        /// The field.
        field: String,
        /// What is wrong (never the value's bytes or pixels).
        detail: String,
    },

    /// The manifest signature does not verify under the trusted issuer key.
    #[error(
        "manifest {path}: {detail}; the dataset was not signed by the trusted issuer key or was modified after signing"
    )]
    ManifestSignature {
        /// The manifest file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },

    /// The manifest is older than the generation the reader requires: a rolled-back
    /// dataset (its signature is valid, it is just not the newest).
    #[error("manifest {path} has generation {generation}, older than the required {min}: the dataset was rolled back to an earlier signed version")]
    Rollback {
        /// The manifest file.
        path: PathBuf,
        /// Its generation.
        generation: u64,
        /// The minimum the reader asked for.
        min: u64,
    },

    /// Authorization denied access to a shard. No DEK was unwrapped.
    #[error("access denied ({reason}){}{}{}: {rule}; {}", dataset.as_ref().map(|d| format!(" to dataset {d:?}")).unwrap_or_default(), shard.map(|s| format!(" shard {s}")).unwrap_or_default(), operation.map(|o| format!(" for {o}")).unwrap_or_default(), reason.hint())]
    AccessDenied {
        /// Dataset requested.
        dataset: Option<String>,
        /// Shard requested.
        shard: Option<u32>,
        /// Operation requested.
        operation: Option<Operation>,
        /// Why.
        reason: DenyReason,
        /// The rule (Datalog check, deny-list entry, signature) that failed.
        rule: String,
    },

    /// The audit log could not be written, or does not verify.
    #[error("audit log {path}{}: {detail}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Audit {
        /// The log file.
        path: PathBuf,
        /// First bad line (1-based), when verifying.
        line: Option<u64>,
        /// What is wrong.
        detail: String,
    },

    /// A key could not be found or used (missing KEK id, wrapped DEK that does not
    /// unwrap under the KEK, unusable key provider).
    #[error("key unavailable ({key_id}): {detail}")]
    KeyUnavailable {
        /// The key id concerned.
        key_id: String,
        /// What failed and what to do.
        detail: String,
    },

    /// A key provider (a PKCS#11 HSM) could not be opened or set up: which part failed
    /// and what to do. (Failures while unwrapping a shard's DEK, including an HSM that
    /// disappears mid-run, are [`Error::KeyUnavailable`] naming the provider.)
    #[error("{provider}: {kind}: {detail}")]
    KeyProvider {
        /// The provider, as [`crate::keys::KeyProvider::describe`] names it (never a PIN).
        provider: String,
        /// What failed.
        kind: ProviderFailure,
        /// Details and what to do.
        detail: String,
    },

    /// A secret file whose permissions let other users read it.
    #[error(
        "{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}` and consider the key exposed"
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },

    /// Bad input to `pack`: a `.npy` of the wrong shape, an unsupported dtype, empty input...
    #[error("input {path}: {detail}")]
    Input {
        /// The input file or directory.
        path: PathBuf,
        /// What is wrong and what to do.
        detail: String,
    },

    /// A sample does not fit the dataset schema.
    #[error("sample {sample}: {detail}")]
    Schema {
        /// Index of the offending sample in write order.
        sample: u64,
        /// What is wrong.
        detail: String,
    },

    /// The output already holds a dataset.
    #[error("{path} already holds a dataset (manifest.json); pass --force (or `force`) to replace it")]
    AlreadyExists {
        /// The output directory.
        path: PathBuf,
    },

    /// Batch memory could not be locked in RAM.
    #[error("cannot lock {bytes} bytes of batch memory in RAM (RLIMIT_MEMLOCK soft limit {}; {detail}): raise it (`ulimit -l unlimited`, systemd LimitMEMLOCK=infinity, docker --ulimit memlock=-1), lower the memory budget, or explicitly allow unlocked memory (recorded in the audit log)", if *limit == u64::MAX { "unlimited".to_string() } else { format!("{limit} bytes") })]
    MemoryLock {
        /// Bytes requested.
        bytes: u64,
        /// The soft limit in bytes.
        limit: u64,
        /// The OS error.
        detail: String,
    },

    /// No usable GPU for the device stage: the CUDA driver library is missing, the
    /// device does not exist, or the driver failed to start. Nothing was read.
    #[error("device {device} is unavailable: {detail}")]
    DeviceUnavailable {
        /// The device asked for (`cuda:0`).
        device: String,
        /// Why, and what to do.
        detail: String,
    },

    /// A CUDA driver or NVRTC call failed while the device stage ran.
    #[error("CUDA {op} failed on {device}: {detail}")]
    Device {
        /// The device (`cuda:0`).
        device: String,
        /// The operation ("cuMemHostRegister", "H2D copy", "NVRTC compile", ...).
        op: &'static str,
        /// The driver's message and what to do.
        detail: String,
    },

    /// A dataset in object storage could not be read. Names the object (and shard) and
    /// what to do; never carries credentials. A shard that failed this way was never
    /// used: nothing partial reaches the cache's final names or the decryptor.
    #[error("{url}{}: {kind}: {detail}; {}", shard.map(|s| format!(" (shard {s})")).unwrap_or_default(), kind.hint())]
    Remote {
        /// The object (or dataset) URL, `s3://bucket/key`.
        url: String,
        /// The shard concerned, when there is one.
        shard: Option<u32>,
        /// What failed.
        kind: RemoteFailure,
        /// Details: attempts, elapsed time, the last error (credentials removed).
        detail: String,
    },

    /// A broken invariant inside shardlock (a worker thread panicked, a state that
    /// cannot happen): a bug, never the caller's input. The operation stopped; please
    /// report it.
    #[error("internal error (a bug in shardlock; please report it): {0}")]
    Internal(String),

    /// A caller error: an argument out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A cryptographic library failed where it cannot fail for valid input (key
    /// setup, the system random generator): should not happen.
    #[error("cryptographic library error: {0}")]
    Crypto(&'static str),
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { op, path, source: Arc::new(source) }
    }

    /// An I/O error on `path` (for call sites that already hold the `io::Error`).
    pub(crate) fn io_at(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.into(), source: Arc::new(source) }
    }

    /// An OS resource failure that is not about a file.
    pub(crate) fn os(op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Error::Os { op, source: Arc::new(source) }
    }

    /// The one stable snake_case name of this failure, used alike by the audit log,
    /// `verify`'s report, the CLI's `--json` output and the Python bindings: the
    /// integrity kind (`chunk_auth`, ...), the deny reason (`shard_out_of_scope`, ...),
    /// `remote_<kind>` and `provider_<kind>` for object-store and key-provider
    /// failures, else the variant's name.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Os { .. } => "os",
            Error::Format { .. } => "format",
            Error::Integrity { kind, .. } => kind.name(),
            Error::Decompress { .. } => "decompress",
            Error::Decode { .. } => "decode",
            Error::ManifestSignature { .. } => "manifest_signature",
            Error::Rollback { .. } => "rollback",
            Error::AccessDenied { reason, .. } => reason.name(),
            Error::Audit { .. } => "audit",
            Error::KeyUnavailable { .. } => "key_unavailable",
            Error::KeyProvider { kind, .. } => kind.code(),
            Error::InsecurePermissions { .. } => "insecure_permissions",
            Error::Input { .. } => "input",
            Error::Schema { .. } => "schema",
            Error::AlreadyExists { .. } => "already_exists",
            Error::MemoryLock { .. } => "memory_lock",
            Error::DeviceUnavailable { .. } => "device_unavailable",
            Error::Device { .. } => "device",
            Error::Remote { kind, .. } => kind.code(),
            Error::Internal(_) => "internal",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Crypto(_) => "crypto",
        }
    }

    pub(crate) fn integrity(kind: IntegrityKind, chunk: Option<u64>) -> Self {
        Error::Integrity { shard: ShardRef::default(), chunk, kind }
    }

    /// Attaches shard coordinates to an integrity error that lacks them.
    pub(crate) fn at_shard(mut self, at: &ShardRef) -> Self {
        if let Error::Integrity { shard, .. } = &mut self {
            if shard.dataset.is_none() {
                shard.dataset.clone_from(&at.dataset);
            }
            if shard.index.is_none() {
                shard.index = at.index;
            }
            if shard.file.is_none() {
                shard.file.clone_from(&at.file);
            }
        }
        self
    }

    /// The integrity kind, when this is an integrity error.
    pub fn integrity_kind(&self) -> Option<IntegrityKind> {
        match self {
            Error::Integrity { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}
