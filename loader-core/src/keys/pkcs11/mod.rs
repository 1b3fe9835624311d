//! Key custody in a PKCS#11 HSM (feature `pkcs11`, crate `cryptoki`).
//!
//! The KEK is an AES key generated inside the token as non-extractable and sensitive
//! ([`generate_kek`], `shardlock keygen kek --pkcs11 URI`). DEKs are wrapped and unwrapped
//! by the token with `CKM_AES_KEY_WRAP_PAD` (AES key wrap with padding, RFC 5649): for a
//! 32-byte DEK the wrapped bytes are the same as [`super::Kek::wrap`] produces, so a
//! dataset moves between the keyring file and an HSM by rewrapping its DEKs only
//! (`shardlock rotate`).
//!
//! The provider is named by an RFC 7512 URI:
//!
//! ```text
//! pkcs11:token=shardlock;object=kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=env:HSM_PIN
//! ```
//!
//! - path attributes: `token` (label), `serial`, `manufacturer`, `model` select the
//!   token; `object` (label, required) and `id` select the KEK; `type` must be
//!   `secret-key` when given;
//! - query attributes: `module-path` (or `module-name`, searched in the usual module
//!   directories), `pin-source` (`env:VAR`, `file:/path`, `file:///path` or `/path`;
//!   the file must be mode 0600; default: the `SHARDLOCK_PKCS11_PIN` variable), and the
//!   vendor attribute `x-allow-extractable=yes` to accept a KEK that can leave the HSM.
//!   `pin-value` is refused: a PIN in a URI ends up in `ps`, shell history and logs.
//!
//! One module context and one pool of logged-in sessions per token and process are
//! shared by every provider on that token; a session is used by one thread at a time
//! (taken from the pool, returned after the call), so the pipeline's workers unwrap in
//! parallel. Nothing ever waits for a session: an empty pool opens a new one.
//!
//! A PIN the token rejected is remembered (as a salted hash) and never tried again in
//! the process, so retries do not move the token's lockout counter. Set-up failures are
//! [`Error::KeyProvider`] with a [`ProviderFailure`] kind; failures while unwrapping a
//! shard's DEK (a wrapped DEK that does not unwrap, an HSM that disappears mid-run) are
//! [`Error::KeyUnavailable`] naming the provider.
//!
//! [`Error::KeyProvider`]: crate::Error::KeyProvider
//! [`ProviderFailure`]: crate::ProviderFailure
//! [`Error::KeyUnavailable`]: crate::Error::KeyUnavailable

mod keygen;
mod provider;
mod rv;
mod session;
mod uri;

pub use keygen::generate_kek;
pub use provider::{kek_id_for, Pkcs11Provider, Pkcs11Stats};
pub use session::login_attempts;
pub use uri::{ModuleSpec, PinSource, Pkcs11Uri, DEFAULT_PIN_ENV};
