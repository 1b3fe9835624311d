//! [`Pkcs11Provider`]: the [`KeyProvider`] that wraps and unwraps DEKs with a KEK kept in the token.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use zeroize::{Zeroize, Zeroizing};

use super::rv::{ck_name, is_fatal, is_handle_invalid, rv};
use super::session::{pool, require_mechanisms, Lease, SessionPool};
use super::uri::Pkcs11Uri;
use crate::error::{Error, ProviderFailure, Result};
use crate::keys::Grant;
use crate::keys::{Dek, KeyProvider};

/// Destroys a session object holding a DEK as soon as it is dropped, on every path; if
/// the token refuses, the session is closed instead of reused (which destroys it).
struct Destroy<'l, 'a>(&'l Lease<'a>, ObjectHandle);

impl Drop for Destroy<'_, '_> {
    fn drop(&mut self) {
        if self.0.session().destroy_object(self.1).is_err() {
            self.0.discard();
        }
    }
}

/// Template of a DEK as a short-lived session object (readable, so it can be copied out).
fn dek_template(value: Option<Vec<u8>>) -> Vec<Attribute> {
    let mut t = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(false),
        Attribute::Private(true),
        Attribute::Sensitive(false),
        Attribute::Extractable(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ];
    if let Some(v) = value {
        t.push(Attribute::Value(v));
    }
    t
}

fn zeroize_template(t: &mut [Attribute]) {
    for a in t {
        if let Attribute::Value(v) = a {
            v.zeroize();
        }
    }
}

/// Counters of one provider (wraps, unwraps, time in unwrap) and of its token's logins.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pkcs11Stats {
    /// DEKs wrapped.
    pub wraps: u64,
    /// DEKs unwrapped successfully.
    pub unwraps: u64,
    /// Total wall time of successful unwraps (HSM call, copy out, object destroyed), ns.
    pub unwrap_nanos: u64,
    /// C_Login calls this process made on the token.
    pub login_attempts: u64,
}

/// A KEK in a PKCS#11 token. See the module documentation.
pub struct Pkcs11Provider {
    uri: Pkcs11Uri,
    name: String,
    pool: Arc<SessionPool>,
    kek: Mutex<ObjectHandle>,
    kek_id: String,
    can_wrap: bool,
    wraps: AtomicU64,
    unwraps: AtomicU64,
    unwrap_nanos: AtomicU64,
}

impl fmt::Debug for Pkcs11Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pkcs11Provider({}, KEK {})", self.name, self.kek_id)
    }
}

/// The KEK id shardlock records in manifests for a key with CKA_ID `id`.
pub fn kek_id_for(id: &[u8]) -> String {
    format!("kek-{}", hex::encode(id))
}

pub(super) fn find_kek(s: &Session, uri: &Pkcs11Uri) -> std::result::Result<Vec<ObjectHandle>, CkError> {
    let mut t = vec![Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(uri.object.as_bytes().to_vec())];
    if let Some(id) = &uri.id {
        t.push(Attribute::Id(id.clone()));
    }
    s.find_objects(&t)
}

impl Pkcs11Provider {
    /// Opens the KEK named by `uri`: loads the module, finds the token, logs in (once per
    /// process and token) and checks the key. Refuses an extractable or non-sensitive
    /// KEK unless the URI says `x-allow-extractable=yes`.
    pub fn open(uri: &Pkcs11Uri) -> Result<Self> {
        let name = uri.describe();
        let pool = pool(uri, &name)?;
        require_mechanisms(&pool, &name, &[MechanismType::AES_KEY_WRAP_PAD])?;
        let lease = pool.checkout(&uri.pin, &name)?;
        // Check the PIN even when the token is already logged in (by another provider).
        pool.login(lease.session(), &uri.pin, &name)?;
        let s = lease.session();
        let fail = |kind, detail: String| Error::KeyProvider { provider: name.clone(), kind, detail };
        let handles = find_kek(s, uri).map_err(|e| pool.unavailable(&name, "C_FindObjects", &e))?;
        let h = match handles.as_slice() {
            [h] => *h,
            [] => {
                return Err(fail(
                    ProviderFailure::KekNotFound,
                    format!(
                        "token {:?} has no secret key labelled {:?}{}; create it with `shardlock keygen kek --pkcs11 \
                         '{uri}'`, or fix object= (and id=) in the URI",
                        pool.label,
                        uri.object,
                        uri.id.as_ref().map(|i| format!(" with id {}", hex::encode(i))).unwrap_or_default()
                    ),
                ))
            }
            many => {
                return Err(fail(
                    ProviderFailure::KekAmbiguous,
                    format!(
                        "{} secret keys on token {:?} are labelled {:?}; add id=%xx%xx... to the URI to pick one",
                        many.len(),
                        pool.label,
                        uri.object
                    ),
                ))
            }
        };
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::KeyType,
                    AttributeType::ValueLen,
                    AttributeType::Extractable,
                    AttributeType::Sensitive,
                    AttributeType::Unwrap,
                    AttributeType::Wrap,
                    AttributeType::Id,
                ],
            )
            .map_err(|e| pool.unavailable(&name, "C_GetAttributeValue", &e))?;
        let (mut key_type, mut len, mut extractable, mut sensitive, mut unwrap, mut wrap, mut id) =
            (None, None, None, None, None, None, Vec::new());
        for a in attrs {
            match a {
                Attribute::KeyType(k) => key_type = Some(k),
                Attribute::ValueLen(l) => len = Some(u64::from(l)),
                Attribute::Extractable(b) => extractable = Some(b),
                Attribute::Sensitive(b) => sensitive = Some(b),
                Attribute::Unwrap(b) => unwrap = Some(b),
                Attribute::Wrap(b) => wrap = Some(b),
                Attribute::Id(v) => id = v,
                _ => {}
            }
        }
        if key_type != Some(KeyType::AES) {
            return Err(fail(
                ProviderFailure::KekUnusable,
                format!("key {:?} is not an AES key; create a KEK with `shardlock keygen kek --pkcs11`", uri.object),
            ));
        }
        if !matches!(len, Some(16 | 24 | 32)) {
            return Err(fail(
                ProviderFailure::KekUnusable,
                format!(
                    "key {:?} is not a 128-, 192- or 256-bit AES key (CKA_VALUE_LEN {}); create a KEK with \
                     `shardlock keygen kek --pkcs11`",
                    uri.object,
                    len.map_or("unreadable".into(), |l| l.to_string())
                ),
            ));
        }
        if unwrap != Some(true) {
            return Err(fail(
                ProviderFailure::KekUnusable,
                format!("key {:?} does not allow unwrapping (CKA_UNWRAP is false)", uri.object),
            ));
        }
        if id.is_empty() {
            return Err(fail(
                ProviderFailure::KekUnusable,
                format!(
                    "key {:?} has no CKA_ID; shardlock names KEKs by it in manifests: set one (pkcs11-tool \
                     --id / softhsm2-util --id), or generate the KEK with `shardlock keygen kek --pkcs11`",
                    uri.object
                ),
            ));
        }
        if (extractable != Some(false) || sensitive != Some(true)) && !uri.allow_extractable {
            return Err(fail(
                ProviderFailure::KekExtractable,
                format!(
                    "key {:?} can leave the HSM (CKA_EXTRACTABLE {}, CKA_SENSITIVE {}), so it is no better than a \
                     key file; generate a non-extractable KEK with `shardlock keygen kek --pkcs11` and rotate to \
                     it, or add x-allow-extractable=yes to the URI to use this one anyway (recorded in the audit log)",
                    uri.object,
                    extractable.map_or("unreadable".into(), |b| b.to_string()),
                    sensitive.map_or("unreadable".into(), |b| b.to_string()),
                ),
            ));
        }
        drop(lease);
        Ok(Self {
            uri: uri.clone(),
            name,
            pool,
            kek: Mutex::new(h),
            kek_id: kek_id_for(&id),
            can_wrap: wrap == Some(true),
            wraps: AtomicU64::new(0),
            unwraps: AtomicU64::new(0),
            unwrap_nanos: AtomicU64::new(0),
        })
    }

    /// Parses `uri` and opens it.
    pub fn open_uri(uri: &str) -> Result<Self> {
        Self::open(&Pkcs11Uri::parse(uri)?)
    }

    /// The URI this provider was opened with.
    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    /// Counters since the provider was opened, and the C_Login calls this process has made
    /// on its token (shared with every provider on that token).
    pub fn stats(&self) -> Pkcs11Stats {
        Pkcs11Stats {
            wraps: self.wraps.load(Ordering::Relaxed),
            unwraps: self.unwraps.load(Ordering::Relaxed),
            unwrap_nanos: self.unwrap_nanos.load(Ordering::Relaxed),
            login_attempts: self.pool.login_attempts(),
        }
    }

    /// Runs `op` with a pooled session and the KEK handle. A stale KEK handle (the token
    /// was re-inserted) is looked up once more; a dead session or token becomes
    /// [`Error::KeyUnavailable`] naming this provider, never a retry loop.
    fn with_kek<T>(
        &self,
        what: &str,
        mut op: impl FnMut(&Lease<'_>, ObjectHandle) -> std::result::Result<T, CkError>,
    ) -> Result<T> {
        let unavailable = |detail: String| Error::KeyUnavailable { key_id: self.kek_id.clone(), detail };
        for attempt in 0..2 {
            let lease = self.pool.checkout(&self.uri.pin, &self.name).map_err(|e| unavailable(e.to_string()))?;
            let kek = *self.kek.lock().unwrap_or_else(|p| p.into_inner());
            let err = match op(&lease, kek) {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if attempt == 0 && is_handle_invalid(&err) {
                match find_kek(lease.session(), &self.uri) {
                    Ok(hs) if hs.len() == 1 => {
                        *self.kek.lock().unwrap_or_else(|p| p.into_inner()) = hs[0];
                        continue;
                    }
                    Ok(_) => {
                        return Err(unavailable(format!(
                            "{}: {what} failed ({}): the KEK is no longer on the token (deleted, or the token was \
                             removed or re-initialised); restore the token, or use the provider the dataset was \
                             rotated to",
                            self.name,
                            ck_name(&err)
                        )))
                    }
                    Err(e) if is_fatal(&e) => lease.discard_all(),
                    Err(_) => {}
                }
            }
            if is_fatal(&err) || is_handle_invalid(&err) {
                lease.discard_all();
                return Err(unavailable(format!(
                    "{}: {what} failed ({}): the HSM is unavailable (token removed, device error or module \
                     failure); check the HSM and restart the job",
                    self.name,
                    ck_name(&err)
                )));
            }
            return Err(unavailable(format!("{}: {what} failed ({})", self.name, ck_name(&err))));
        }
        Err(unavailable(format!("{}: {what} failed: the KEK handle keeps changing", self.name)))
    }
}

impl KeyProvider for Pkcs11Provider {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn active_kek_id(&self) -> &str {
        &self.kek_id
    }

    fn wrap_dek(&self, dek: &Dek) -> Result<(String, Vec<u8>)> {
        if !self.can_wrap {
            return Err(Error::KeyUnavailable {
                key_id: self.kek_id.clone(),
                detail: format!(
                    "{}: the KEK does not allow wrapping (CKA_WRAP is false); it can only read datasets",
                    self.name
                ),
            });
        }
        let wrapped = self.with_kek("C_WrapKey", |lease, kek| {
            let s = lease.session();
            let mut t = dek_template(Some(dek.expose().to_vec()));
            let created = s.create_object(&t);
            zeroize_template(&mut t);
            let h = created?;
            let _destroy = Destroy(lease, h);
            s.wrap_key(&Mechanism::AesKeyWrapPad, kek, h)
        })?;
        self.wraps.fetch_add(1, Ordering::Relaxed);
        Ok((self.kek_id.clone(), wrapped))
    }

    fn unwrap_dek(&self, grant: Grant) -> Result<Dek> {
        if grant.kek_id() != self.kek_id {
            return Err(Error::KeyUnavailable {
                key_id: grant.kek_id().to_owned(),
                detail: format!(
                    "{} holds KEK {}, not the one dataset {:?} shard {} is wrapped under; use the key provider the \
                     dataset was packed or last rotated with",
                    self.name,
                    self.kek_id,
                    grant.dataset(),
                    grant.shard()
                ),
            });
        }
        let t0 = Instant::now();
        let raw = self.with_kek("C_UnwrapKey", |lease, kek| {
            let s = lease.session();
            let template = dek_template(None);
            let h = match s.unwrap_key(&Mechanism::AesKeyWrapPad, kek, grant.wrapped_dek(), &template) {
                Ok(h) => h,
                // A wrapped key that fails the KWP check: not a device problem.
                Err(e)
                    if matches!(
                        rv(&e),
                        Some(
                            RvError::GeneralError
                                | RvError::WrappedKeyInvalid
                                | RvError::WrappedKeyLenRange
                                | RvError::EncryptedDataInvalid
                                | RvError::EncryptedDataLenRange
                        )
                    ) =>
                {
                    return Ok(Err(ck_name(&e)))
                }
                Err(e) => return Err(e),
            };
            let destroy = Destroy(lease, h);
            // cryptoki copies the value out of its own buffer, which it frees without
            // zeroizing (docs/HSM.md section 10); every copy made here is zeroized.
            let mut attrs = s.get_attributes(h, &[AttributeType::Value])?;
            let mut out = Zeroizing::new(Vec::with_capacity(32));
            for a in &attrs {
                if let Attribute::Value(v) = a {
                    out.extend_from_slice(v);
                }
            }
            zeroize_template(&mut attrs);
            drop(destroy);
            Ok(Ok(out))
        })?;
        let fail = |why: &str| Error::KeyUnavailable {
            key_id: self.kek_id.clone(),
            detail: format!(
                "{}: the wrapped DEK of dataset {:?} shard {} {why} under this KEK (the manifest entry was altered, \
                 or it was wrapped by another key with the same id); restore the manifest, or open the dataset with \
                 the provider that wrapped it",
                self.name,
                grant.dataset(),
                grant.shard()
            ),
        };
        let raw = raw.map_err(|rv| fail(&format!("does not unwrap ({rv})")))?;
        let dek = Dek::from_slice(&raw).ok_or_else(|| fail("unwraps to a key that is not 32 bytes"))?;
        self.unwraps.fetch_add(1, Ordering::Relaxed);
        self.unwrap_nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(dek)
    }
}
