//! Secret types and key custody.
//!
//! - [`Kek`], [`Dek`], [`IssuerKey`]: secrets that zeroize on drop, print no bytes and
//!   cannot be cloned. Their bytes live in the locked, never-dumped key arena
//!   (`memory::KeySlot`), never in ordinary heap memory.
//! - [`Keyring`]: the embedded default custody, a 0600 JSON file of KEKs.
//! - [`KeyProvider`]: where a DEK is wrapped and unwrapped: the keyring file, or a
//!   PKCS#11 HSM ([`pkcs11`], feature `pkcs11`). [`open_provider`] opens either from one
//!   string (a file path or a `pkcs11:` URI).
//! - [`ProviderSet`] ([`open_providers`]): several providers as one, each shard's DEK
//!   unwrapped by the one that holds its KEK.

mod grant;
mod keyring;
#[cfg(feature = "aws-kms")]
pub mod kms;
#[cfg(feature = "pkcs11")]
pub mod pkcs11;
#[cfg(feature = "key-service")]
pub mod service;
mod set;
#[cfg(feature = "transit")]
pub mod transit;

pub use grant::Grant;
pub use keyring::Keyring;
pub use set::ProviderSet;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto;
use crate::error::{Error, Result};
use crate::memory::KeySlot;

/// A 32-byte data-encryption key: the Cobblestone input key of one shard.
pub struct Dek(KeySlot);

impl Dek {
    /// A fresh random DEK (for packing a new shard).
    pub(crate) fn generate() -> Result<Self> {
        let mut k = KeySlot::new();
        crypto::random_bytes(&mut k[..])?;
        Ok(Self(k))
    }

    /// A copy of `bytes`, if they are exactly 32 (a DEK a PKCS#11 module unwrapped).
    #[cfg(any(test, feature = "pkcs11", feature = "key-service"))]
    pub(crate) fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 32 {
            return None;
        }
        let mut k = KeySlot::new();
        k.copy_from_slice(bytes);
        Some(Self(k))
    }

    /// The DEK whose standard base64 is `b64` (what KMS, Transit and the key service
    /// answer), if it decodes to exactly 32 bytes. The decoded copy is zeroized.
    #[cfg(feature = "key-service")]
    pub(crate) fn from_base64(b64: &str) -> Option<Self> {
        use base64::Engine as _;
        let raw = Zeroizing::new(base64::engine::general_purpose::STANDARD.decode(b64).ok()?);
        Self::from_slice(&raw)
    }

    /// The key bytes, for the Cobblestone layer.
    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

/// A 256-bit key-encryption key with its id.
pub struct Kek {
    id: String,
    key: KeySlot,
}

impl Kek {
    /// A fresh random KEK with a random id `kek-<16 hex>`.
    pub fn generate() -> Result<Self> {
        let mut key = KeySlot::new();
        crypto::random_bytes(&mut key[..])?;
        let mut id = [0u8; 8];
        crypto::random_bytes(&mut id)?;
        Ok(Self { id: format!("kek-{}", hex::encode(id)), key })
    }

    /// The KEK's id (not secret).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Wraps a DEK with AES-KWP (RFC 5649).
    pub fn wrap(&self, dek: &Dek) -> Result<Vec<u8>> {
        crypto::kwp::wrap(&self.key[..], dek.expose())
    }

    /// Unwraps a DEK; a wrapped key that fails the KWP integrity check or is not 32
    /// bytes is a [`Error::KeyUnavailable`] naming this KEK.
    pub fn unwrap(&self, wrapped: &[u8]) -> Result<Dek> {
        let fail = || {
            Error::KeyUnavailable {
            key_id: self.id.clone(),
            detail: "the wrapped DEK does not unwrap under this KEK (wrong keyring, or the manifest's wrapped key was altered)".into(),
        }
        };
        // A 32-byte DEK wraps to 40 bytes; unwrapped straight into its slot (no heap copy).
        if wrapped.len() != 40 {
            return Err(fail());
        }
        let mut dek = KeySlot::new();
        match crypto::kwp::unwrap_into(&self.key[..], wrapped, &mut dek[..])? {
            Some(32) => Ok(Dek(dek)),
            _ => Err(fail()),
        }
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Kek({}, <redacted>)", self.id)
    }
}

/// Where DEKs are wrapped and unwrapped. The keyring file is the embedded default.
pub trait KeyProvider: Send + Sync {
    /// A human-readable name for errors and the audit log ("keyring /path", "pkcs11 ...").
    fn describe(&self) -> String;
    /// Id of the KEK new DEKs are wrapped under.
    fn active_kek_id(&self) -> &str;
    /// Whether this provider can unwrap DEKs wrapped under KEK `kek_id` (what a
    /// [`ProviderSet`] routes by). The default: `kek_id` is the active KEK's.
    fn holds(&self, kek_id: &str) -> bool {
        kek_id == self.active_kek_id()
    }
    /// Wraps a DEK under the active KEK; returns (KEK id, wrapped bytes).
    fn wrap_dek(&self, dek: &Dek) -> Result<(String, Vec<u8>)>;

    /// Wraps the DEK of the shard `ctx` names (what pack and rotate call). Custody that
    /// binds a wrap to its shard (Transit's derived-key context, KMS's EncryptionContext)
    /// uses it; the default is [`KeyProvider::wrap_dek`].
    fn wrap_dek_for(&self, dek: &Dek, ctx: &WrapContext<'_>) -> Result<(String, Vec<u8>)> {
        let _ = ctx;
        self.wrap_dek(dek)
    }

    /// A new DEK for the shard `ctx` names, with its wrap: (DEK, KEK id, wrapped bytes).
    /// What `pack` calls. Custody that makes data keys itself (KMS `GenerateDataKey`,
    /// Transit `datakey`) does so in one call, from its own randomness; the default
    /// draws a DEK here and wraps it with [`KeyProvider::wrap_dek_for`].
    fn generate_dek_for(&self, ctx: &WrapContext<'_>) -> Result<(Dek, String, Vec<u8>)> {
        let dek = Dek::generate()?;
        let (kek_id, wrapped) = self.wrap_dek_for(&dek, ctx)?;
        Ok((dek, kek_id, wrapped))
    }

    /// Moves the DEK `grant` names to `target` without the DEK leaving custody (KMS
    /// `ReEncrypt` to a key in the same region, Transit `rewrap` to the newest version of
    /// the same key), when `target` is custody this one can rewrap for. What `rotate`
    /// tries first; [`Rewrap::Unsupported`] hands the grant back, and `rotate` then
    /// unwraps here and wraps for `target`. The default supports nothing.
    fn rewrap_for(&self, grant: Grant, target: &dyn KeyProvider) -> Result<Rewrap> {
        let _ = target;
        Ok(Rewrap::Unsupported(grant))
    }

    /// This provider as [`std::any::Any`], so that [`KeyProvider::rewrap_for`] can
    /// recognise a target of its own kind. `None` (the default): not recognisable.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// Unwraps the DEK named by `grant` (its KEK id and wrapped bytes come from the
    /// verified manifest entry the grant was issued for). Only a passing authorization
    /// creates a grant, so no DEK can be unwrapped without one.
    fn unwrap_dek(&self, grant: Grant) -> Result<Dek>;

    /// Releases the DEK named by `grant` for one request in its context (the bearer
    /// token and the signed manifest). A key service authorizes that token itself and
    /// needs both; custody that holds the KEK ignores them (the default).
    fn release_dek(&self, grant: Grant, ctx: &ReleaseContext<'_>) -> Result<Dek> {
        let _ = ctx;
        self.unwrap_dek(grant)
    }

    /// The order shards of the dataset whose manifest bytes have this SHA-256 will be opened in
    /// (an epoch's plan), so that a provider can release ahead in batches. A new plan
    /// starts a new epoch. The default ignores it.
    fn plan(&self, manifest_digest: &[u8; 32], order: &[u32]) {
        let _ = (manifest_digest, order);
    }
}

/// What [`KeyProvider::rewrap_for`] did.
#[derive(Debug)]
pub enum Rewrap {
    /// Rewrapped inside custody (the DEK was never in the clear here): the target's KEK
    /// id and the new wrapped bytes.
    Done(String, Vec<u8>),
    /// This custody cannot rewrap for that target: the grant, handed back unused.
    Unsupported(Grant),
}

/// The shard a DEK belongs to, as custody that binds wraps sees it: the issuer key that
/// signs the manifest, the dataset, the shard's index and its random id.
#[derive(Clone, Copy, Debug)]
pub struct WrapContext<'a> {
    /// Dataset id.
    pub dataset: &'a str,
    /// Shard index.
    pub shard: u32,
    /// The shard's id (32 hex digits, random per packed shard).
    pub shard_id: &'a str,
    /// Key id of the issuer key that signs the manifest.
    pub issuer: &'a str,
}

impl WrapContext<'_> {
    /// The context text both Transit and KMS bind (FORMAT.md sections 7.5, 7.6).
    pub fn text(&self) -> String {
        format!(
            "shardlock-dek/2 issuer={} dataset={} shard={} id={}",
            self.issuer, self.dataset, self.shard, self.shard_id
        )
    }
}

/// What a release request carries besides its [`Grant`]: made by [`crate::Access`].
#[cfg_attr(not(feature = "key-service"), allow(dead_code))]
pub struct ReleaseContext<'a> {
    /// The bearer token (base64), if the reader has a valid one. A secret: never log it.
    pub(crate) token: Option<&'a str>,
    /// The verified `manifest.json` bytes.
    pub(crate) manifest: &'a [u8],
    /// Their SHA-256.
    pub(crate) digest: &'a [u8; 32],
}

/// True when `spec` names a PKCS#11 provider (an RFC 7512 `pkcs11:` URI) rather than a
/// keyring file.
pub fn is_pkcs11_uri(spec: &str) -> bool {
    spec.starts_with("pkcs11:")
}

/// True when `spec` names a key service (an `https://` URL, or an `http://` one, which is
/// refused when opened with a message saying why).
pub fn is_service_url(spec: &str) -> bool {
    spec.starts_with("https://") || spec.starts_with("http://")
}

/// Opens the key provider `spec` names: a `pkcs11:` URI (RFC 7512; see the `pkcs11` module, feature `pkcs11`),
/// an `aws-kms:` URI of an AWS KMS key (the `kms` module, feature `aws-kms`),
/// a `transit:` URI of an OpenBao/Vault Transit key (the `transit` module, feature
/// `transit`), a key service's `https://` URL (the `service` module, feature `key-service`, TLS files
/// from the environment as `service::ServiceOptions::from_env` says), or the path of a
/// keyring file. (A keyring file whose path starts with `pkcs11:` is
/// reached as `./pkcs11:...`.)
pub fn open_provider(spec: &str) -> Result<Arc<dyn KeyProvider>> {
    if is_service_url(spec) {
        #[cfg(feature = "key-service")]
        return Ok(Arc::new(service::KeyServiceProvider::open(spec, service::ServiceOptions::from_env()?)?));
        #[cfg(not(feature = "key-service"))]
        return Err(Error::InvalidArgument(
            "this build of shardlock has no key service client (cargo feature `key-service`)".into(),
        ));
    }
    if spec.starts_with("aws-kms:") {
        #[cfg(feature = "aws-kms")]
        return Ok(Arc::new(kms::KmsProvider::open_uri(spec)?));
        #[cfg(not(feature = "aws-kms"))]
        return Err(Error::InvalidArgument(
            "this build of shardlock has no AWS KMS support (cargo feature `aws-kms`)".into(),
        ));
    }
    if spec.starts_with("transit:") {
        #[cfg(feature = "transit")]
        return Ok(Arc::new(transit::TransitProvider::open_uri(spec)?));
        #[cfg(not(feature = "transit"))]
        return Err(Error::InvalidArgument(
            "this build of shardlock has no OpenBao/Vault Transit support (cargo feature `transit`)".into(),
        ));
    }
    if is_pkcs11_uri(spec) {
        #[cfg(feature = "pkcs11")]
        return Ok(Arc::new(pkcs11::Pkcs11Provider::open_uri(spec)?));
        #[cfg(not(feature = "pkcs11"))]
        return Err(Error::InvalidArgument(
            "this build of shardlock has no PKCS#11 support (cargo feature `pkcs11`)".into(),
        ));
    }
    Ok(Arc::new(Keyring::load(Path::new(spec))?))
}

/// The provider of each spec ([`open_provider`]) as one: a single provider as it is,
/// several as a [`ProviderSet`] asked in this order (for a manifest whose shards are
/// wrapped under different custody).
pub fn open_providers<S: AsRef<str>>(specs: &[S]) -> Result<Arc<dyn KeyProvider>> {
    ProviderSet::combine(specs.iter().map(|s| open_provider(s.as_ref())).collect::<Result<Vec<_>>>()?)
}

/// [`open_provider`] for a path-like argument (a keyring file, or a `pkcs11:` URI passed
/// where a path is expected).
pub fn open_provider_path(spec: &Path) -> Result<Arc<dyn KeyProvider>> {
    match spec.to_str() {
        Some(s) if is_pkcs11_uri(s) || is_service_url(s) || s.starts_with("transit:") || s.starts_with("aws-kms:") => {
            open_provider(s)
        }
        _ => Ok(Arc::new(Keyring::load(spec)?)),
    }
}

/// The data owner's Ed25519 signing key (signs manifests; roots tokens).
pub struct IssuerKey {
    seed: KeySlot,
    public: [u8; 32],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerFile {
    format: String,
    alg: String,
    secret: String,
}

/// File format tag of issuer secret key files.
const ISSUER_FORMAT: &str = "shardlock-issuer/1";
/// File format tag of issuer public key files.
const TRUST_FORMAT: &str = "shardlock-issuer-pub/1";

/// The key files `shardlock keygen` writes, told apart by their `format` member, so a
/// file passed where another belongs is named for what it is and the right one is
/// suggested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyFile {
    /// `issuer.key`: the issuer's Ed25519 secret key.
    IssuerSecret,
    /// `issuer.key.pub`: the issuer's public key, the trust anchor.
    IssuerPublic,
    /// `keyring.json`: KEKs.
    Keyring,
}

impl KeyFile {
    /// What `bytes` (a key file's text) is, if it is one of ours.
    pub(crate) fn of(bytes: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Head {
            format: String,
        }
        let head: Head = serde_json::from_slice(bytes).ok()?;
        match head.format.as_str() {
            ISSUER_FORMAT => Some(Self::IssuerSecret),
            TRUST_FORMAT => Some(Self::IssuerPublic),
            keyring::FORMAT => Some(Self::Keyring),
            _ => None,
        }
    }

    /// What the file at `path` is (read within 1 MiB, kept in zeroized memory).
    pub(crate) fn at(path: &Path) -> Option<Self> {
        let bytes = Zeroizing::new(crate::fs::read_bounded(path, 1 << 20, "key file").ok()?);
        Self::of(&bytes)
    }

    fn describe(self) -> &'static str {
        match self {
            Self::IssuerSecret => "the issuer's secret key",
            Self::IssuerPublic => "the issuer's public key (the trust anchor)",
            Self::Keyring => "a KEK keyring",
        }
    }

    /// The error for `path`, a file of this kind given where `what` belongs; `hint`
    /// says which file goes there.
    pub(crate) fn misplaced(self, path: &Path, what: &'static str, hint: &str) -> Error {
        Error::Format { what, path: path.to_owned(), detail: format!("this is {}; {hint}", self.describe()) }
    }
}

/// The secret key file that goes with public key file `path` (`issuer.key.pub` ->
/// `issuer.key`).
fn secret_of(path: &Path) -> String {
    let p = path.display().to_string();
    p.strip_suffix(".pub").map(str::to_owned).unwrap_or_else(|| "issuer.key".into())
}

impl IssuerKey {
    /// A fresh random issuer key.
    pub fn generate() -> Result<Self> {
        let mut seed = KeySlot::new();
        crypto::random_bytes(&mut seed[..])?;
        let public = crypto::sign::public_key(&seed)?;
        Ok(Self { seed, public })
    }

    /// Loads a secret key file written by [`IssuerKey::save`] (must be 0600).
    pub fn load(path: &Path) -> Result<Self> {
        // Before the permission check, which a public key file (0644) would fail with
        // "consider the key exposed".
        match KeyFile::at(path) {
            Some(k @ KeyFile::IssuerPublic) => {
                let hint = format!("pass {} (the secret key) here; this file is the trust anchor", secret_of(path));
                return Err(k.misplaced(path, "issuer key file", &hint));
            }
            Some(k @ KeyFile::Keyring) => {
                let hint = "pass the issuer key (from `shardlock keygen issuer`) here; the keyring goes to --keyring";
                return Err(k.misplaced(path, "issuer key file", hint));
            }
            _ => {}
        }
        let text = crate::fs::read_secret_file(path)?;
        let bad =
            |detail: &str| Error::Format { what: "issuer key file", path: path.to_owned(), detail: detail.into() };
        let mut f: IssuerFile =
            serde_json::from_slice(&text).map_err(|_| bad("not an issuer key file (JSON with format, alg, secret)"))?;
        let secret = Zeroizing::new(std::mem::take(&mut f.secret));
        if f.format != ISSUER_FORMAT || f.alg != "ed25519" {
            return Err(bad("unknown format or algorithm"));
        }
        let mut seed = KeySlot::new();
        hex::decode_to_slice(secret.as_bytes(), &mut seed[..]).map_err(|_| bad("secret is not 64 hex digits"))?;
        let public = crypto::sign::public_key(&seed)?;
        Ok(Self { seed, public })
    }

    /// Writes the secret key to `path` (0600, refusing to overwrite) and the public
    /// key to `path.pub`.
    pub fn save(&self, path: &Path) -> Result<std::path::PathBuf> {
        let secret = Zeroizing::new(hex::encode(&self.seed[..]));
        let body = Zeroizing::new(format!(
            "{{\"format\":\"{ISSUER_FORMAT}\",\"alg\":\"ed25519\",\"secret\":\"{}\"}}\n",
            secret.as_str()
        ));
        crate::fs::write_new_file(path, body.as_bytes(), 0o600)?;
        let mut pub_path = path.as_os_str().to_owned();
        pub_path.push(".pub");
        let pub_path = std::path::PathBuf::from(pub_path);
        crate::fs::write_new_file(&pub_path, &self.trust_anchor().to_file_bytes(), 0o644)?;
        Ok(pub_path)
    }

    /// The matching public trust anchor.
    pub fn trust_anchor(&self) -> TrustAnchor {
        TrustAnchor { public: self.public }
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> Result<[u8; 64]> {
        crypto::sign::sign(&self.seed, msg)
    }

    /// The raw 32-byte seed, for the token library (Biscuit roots tokens in this key).
    pub(crate) fn seed(&self) -> &[u8; 32] {
        &self.seed
    }
}

impl fmt::Debug for IssuerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IssuerKey({}, <redacted>)", self.trust_anchor().key_id())
    }
}

/// The issuer's public key: the trust anchor every reader is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrustAnchor {
    public: [u8; 32],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    format: String,
    alg: String,
    public: String,
    key_id: String,
}

impl TrustAnchor {
    /// From raw public key bytes.
    pub fn from_bytes(public: [u8; 32]) -> Self {
        Self { public }
    }

    /// The raw public key.
    pub fn public_bytes(&self) -> &[u8; 32] {
        &self.public
    }

    /// Short id: hex of the first 8 bytes of SHA-256(public key).
    pub fn key_id(&self) -> String {
        hex::encode(&crypto::sha256(&self.public)[..8])
    }

    /// Verifies an Ed25519 signature.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        crypto::sign::verify(&self.public, msg, sig)
    }

    fn to_file_bytes(self) -> Vec<u8> {
        let f = TrustFile {
            format: TRUST_FORMAT.into(),
            alg: "ed25519".into(),
            public: hex::encode(self.public),
            key_id: self.key_id(),
        };
        let mut v = serde_json::to_vec_pretty(&f).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Loads a `.pub` file written by `shardlock keygen issuer`.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(Error::io("read trust anchor", path))?);
        Self::refuse_other_key_files(&bytes, path)?;
        let f: TrustFile =
            serde_json::from_slice(&bytes).map_err(|_| Self::bad(path, "not an issuer public key file"))?;
        Self::of_file(&f, path)
    }

    /// Every trust anchor in `bytes`, the text of `path`: one issuer public key (a
    /// `.pub` file), or a JSON array of them (a bundle; `[]` holds none).
    #[cfg(feature = "keyd")]
    pub(crate) fn parse_all(bytes: &[u8], path: &Path) -> Result<Vec<Self>> {
        Self::refuse_other_key_files(bytes, path)?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            let files: Vec<TrustFile> = serde_json::from_slice(bytes)
                .map_err(|_| Self::bad(path, "not a JSON array of issuer public keys (.pub file contents)"))?;
            return files.iter().map(|f| Self::of_file(f, path)).collect();
        }
        let f: TrustFile = serde_json::from_slice(bytes)
            .map_err(|_| Self::bad(path, "not an issuer public key file, nor a JSON array of them"))?;
        Ok(vec![Self::of_file(&f, path)?])
    }

    fn bad(path: &Path, detail: &str) -> Error {
        Error::Format { what: "issuer public key file", path: path.to_owned(), detail: detail.into() }
    }

    /// A secret key or a keyring given as a trust anchor: an error saying which file goes there.
    fn refuse_other_key_files(bytes: &[u8], path: &Path) -> Result<()> {
        let what = "issuer public key file";
        match KeyFile::of(bytes) {
            Some(k @ KeyFile::IssuerSecret) => {
                let hint = format!(
                    "pass {}.pub (the public key) as the trust anchor; a reader never needs the secret key",
                    path.display()
                );
                Err(k.misplaced(path, what, &hint))
            }
            Some(k @ KeyFile::Keyring) => {
                let hint = "pass the issuer's public key (issuer.key.pub) as the trust anchor; the keyring is keyring=";
                Err(k.misplaced(path, what, hint))
            }
            _ => Ok(()),
        }
    }

    fn of_file(f: &TrustFile, path: &Path) -> Result<Self> {
        if f.format != TRUST_FORMAT || f.alg != "ed25519" {
            return Err(Self::bad(path, "unknown format or algorithm"));
        }
        let mut public = [0u8; 32];
        hex::decode_to_slice(&f.public, &mut public).map_err(|_| Self::bad(path, "public key is not 64 hex digits"))?;
        let t = Self { public };
        if t.key_id() != f.key_id {
            return Err(Self::bad(path, "key_id does not match the public key"));
        }
        Ok(t)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::memory::{assert_locked, smaps_entry};

    fn assert_in_locked_arena(what: &str, slot: &KeySlot) {
        let m = smaps_entry(slot.as_ptr() as usize).unwrap();
        assert!(m.dont_dump(), "{what} is in memory that a core dump includes: {m:?}");
        assert_locked(&m, slot.is_locked());
    }

    /// Security review finding 5: DEKs (generated and unwrapped), KEKs and the issuer
    /// seed live in locked, never-dumped pages, not on the heap.
    #[test]
    fn key_bytes_live_in_locked_never_dumped_pages() {
        let kek = Kek::generate().unwrap();
        assert_in_locked_arena("a KEK", &kek.key);
        let dek = Dek::generate().unwrap();
        assert_in_locked_arena("a generated DEK", &dek.0);
        let unwrapped = kek.unwrap(&kek.wrap(&dek).unwrap()).unwrap();
        assert_eq!(unwrapped.expose(), dek.expose());
        assert_in_locked_arena("an unwrapped DEK", &unwrapped.0);
        assert_in_locked_arena("a DEK from bytes", &Dek::from_slice(&[7u8; 32]).unwrap().0);
        assert_in_locked_arena("the issuer seed", &IssuerKey::generate().unwrap().seed);
    }

    #[test]
    fn unwrap_rejects_what_is_not_a_wrapped_32_byte_key() {
        let kek = Kek::generate().unwrap();
        let mut wrapped = kek.wrap(&Dek::generate().unwrap()).unwrap();
        assert_eq!(wrapped.len(), 40);
        let short = crypto::kwp::wrap(&kek.key[..], &[1u8; 16]).unwrap();
        assert!(matches!(kek.unwrap(&short), Err(Error::KeyUnavailable { .. })));
        let long = crypto::kwp::wrap(&kek.key[..], &[1u8; 33]).unwrap();
        assert!(matches!(kek.unwrap(&long), Err(Error::KeyUnavailable { .. })));
        // 25..=32 bytes pad to 40: only exactly 32 is a DEK.
        let padded = crypto::kwp::wrap(&kek.key[..], &[1u8; 31]).unwrap();
        assert_eq!(padded.len(), 40);
        assert!(matches!(kek.unwrap(&padded), Err(Error::KeyUnavailable { .. })));
        wrapped[3] ^= 1;
        assert!(matches!(kek.unwrap(&wrapped), Err(Error::KeyUnavailable { .. })));
    }
}
