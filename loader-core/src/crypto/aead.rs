//! AES-256-GCM (NIST SP 800-38D) with a 96-bit nonce, a 128-bit tag and no AAD use
//! beyond what callers pass, behind one small trait so that the backend is a run-time
//! choice and every backend runs the same test vectors.

use zeroize::Zeroize;

/// Key length of AES-256-GCM in bytes.
pub const KEY_LEN: usize = 32;
/// Nonce length in bytes.
pub const NONCE_LEN: usize = 12;
/// Tag length in bytes.
pub const TAG_LEN: usize = 16;

/// Authentication (or a backend precondition) failed. Deliberately carries no detail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AeadError;

/// One AES-256-GCM key of some backend.
pub trait AeadKey: Send + Sync {
    /// Authenticates `ciphertext` + `tag` under `nonce` and `aad`, writing the plaintext
    /// to `out` (same length as `ciphertext`). On failure `out` is zeroized, so no
    /// unauthenticated byte is left behind.
    fn open_to(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), AeadError>;

    /// Encrypts `in_out` in place and returns the tag.
    fn seal_in_place(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], in_out: &mut [u8])
        -> Result<[u8; TAG_LEN], AeadError>;
}

/// The AES-256-GCM implementation to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// aws-lc-rs (AWS-LC, assembly with AES-NI/VAES): the fast default.
    #[default]
    AwsLcRs,
    /// RustCrypto `aes-gcm` 0.10, pure Rust (feature `rustcrypto`).
    #[cfg(feature = "rustcrypto")]
    RustCrypto,
}

impl Backend {
    /// Every backend compiled into this build.
    pub const ALL: &'static [Backend] = &[
        Backend::AwsLcRs,
        #[cfg(feature = "rustcrypto")]
        Backend::RustCrypto,
    ];

    /// A short name ("aws-lc-rs", "rustcrypto").
    pub fn name(self) -> &'static str {
        match self {
            Backend::AwsLcRs => "aws-lc-rs",
            #[cfg(feature = "rustcrypto")]
            Backend::RustCrypto => "rustcrypto",
        }
    }

    /// Parses a name as printed by [`Backend::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|b| b.name() == name)
    }

    /// Builds a key. The caller keeps ownership of (and zeroizes) `key`.
    pub fn key(self, key: &[u8; KEY_LEN]) -> Box<dyn AeadKey> {
        match self {
            Backend::AwsLcRs => Box::new(AwsLcKey::new(key)),
            #[cfg(feature = "rustcrypto")]
            Backend::RustCrypto => Box::new(rustcrypto::RcKey::new(key)),
        }
    }
}

struct AwsLcKey(aws_lc_rs::aead::LessSafeKey);

impl AwsLcKey {
    fn new(key: &[u8; KEY_LEN]) -> Self {
        use aws_lc_rs::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
        // A 32-byte key is always a valid AES-256-GCM key: the only failure of
        // `UnboundKey::new` is a length mismatch, excluded by the type.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256-GCM key");
        Self(LessSafeKey::new(unbound))
    }
}

#[cfg(test)]
thread_local! {
    /// The address of the last ciphertext aws-lc opened on this thread (tests check
    /// that it is never inside a caller's buffer, see `chunked`).
    pub(crate) static LAST_OPENED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// While `Some`: the mapping aws-lc wrote the plaintext of each chunk it opened on
    /// this thread into, read when it was written (tests check that shard open decrypts
    /// only into locked memory, see `dataset::shard`).
    pub(crate) static OPENED_INTO: std::cell::RefCell<Option<Vec<Option<crate::memory::SmapsEntry>>>> =
        const { std::cell::RefCell::new(None) };
}

impl AeadKey for AwsLcKey {
    fn open_to(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), AeadError> {
        use aws_lc_rs::aead::{Aad, Nonce};
        if tag.len() != TAG_LEN || out.len() != ciphertext.len() {
            return Err(AeadError);
        }
        #[cfg(test)]
        LAST_OPENED.with(|p| p.set(ciphertext.as_ptr() as usize));
        #[cfg(test)]
        OPENED_INTO.with(|v| {
            if let Some(v) = v.borrow_mut().as_mut() {
                v.push(crate::memory::smaps_entry(out.as_ptr() as usize));
            }
        });
        let r = self.0.open_separate_gather(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), ciphertext, tag, out);
        if r.is_err() {
            // aws-lc-rs documents that `out` may hold unspecified bytes on failure.
            out.zeroize();
            return Err(AeadError);
        }
        Ok(())
    }

    fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        use aws_lc_rs::aead::{Aad, Nonce};
        let tag = self
            .0
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), in_out)
            .map_err(|_| AeadError)?;
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        Ok(t)
    }
}

#[cfg(feature = "rustcrypto")]
mod rustcrypto {
    use super::{AeadError, AeadKey, KEY_LEN, NONCE_LEN, TAG_LEN};
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    use aes_gcm::{Aes256Gcm, Nonce, Tag};
    use zeroize::Zeroize;

    pub(super) struct RcKey(Aes256Gcm);

    impl RcKey {
        pub(super) fn new(key: &[u8; KEY_LEN]) -> Self {
            Self(Aes256Gcm::new(key.into()))
        }
    }

    impl AeadKey for RcKey {
        fn open_to(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            ciphertext: &[u8],
            tag: &[u8],
            out: &mut [u8],
        ) -> Result<(), AeadError> {
            if tag.len() != TAG_LEN || out.len() != ciphertext.len() {
                return Err(AeadError);
            }
            out.copy_from_slice(ciphertext);
            let r = self.0.decrypt_in_place_detached(Nonce::from_slice(nonce), aad, out, Tag::from_slice(tag));
            if r.is_err() {
                out.zeroize();
                return Err(AeadError);
            }
            Ok(())
        }

        fn seal_in_place(
            &self,
            nonce: &[u8; NONCE_LEN],
            aad: &[u8],
            in_out: &mut [u8],
        ) -> Result<[u8; TAG_LEN], AeadError> {
            let tag = self.0.encrypt_in_place_detached(Nonce::from_slice(nonce), aad, in_out).map_err(|_| AeadError)?;
            let mut t = [0u8; TAG_LEN];
            t.copy_from_slice(&tag);
            Ok(t)
        }
    }
}
