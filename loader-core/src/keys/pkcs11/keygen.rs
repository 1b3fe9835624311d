//! [`generate_kek`]: creating a non-extractable AES-256 KEK inside the token.

use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, KeyType, ObjectClass};

use super::provider::{find_kek, kek_id_for};
use super::rv::{ck_name, is_fatal, rv};
use super::session::{pool, require_mechanisms};
use super::uri::Pkcs11Uri;
use crate::crypto;
use crate::error::{Error, ProviderFailure, Result};

/// Generates a KEK inside the token named by `uri`: AES-256, non-extractable,
/// sensitive, private, usable only to wrap and unwrap, labelled `object` with a random
/// 8-byte CKA_ID (or the URI's `id`). Refuses if a key with that label exists. Returns
/// the KEK id recorded in manifests.
pub fn generate_kek(uri: &Pkcs11Uri) -> Result<String> {
    let name = uri.describe();
    let pool = pool(uri, &name)?;
    require_mechanisms(&pool, &name, &[MechanismType::AES_KEY_GEN, MechanismType::AES_KEY_WRAP_PAD])?;
    // A pooled session holds the login after keygen (closing a token's last session logs
    // it out); the read-write session for the new token object shares that login.
    let lease = pool.checkout(&uri.pin, &name)?;
    pool.login(lease.session(), &uri.pin, &name)?;
    let s = pool.ctx().open_rw_session(pool.slot).map_err(|e| pool.unavailable(&name, "C_OpenSession (rw)", &e))?;
    let existing = find_kek(&s, &Pkcs11Uri { id: None, ..uri.clone() })
        .map_err(|e| pool.unavailable(&name, "C_FindObjects", &e))?;
    if !existing.is_empty() {
        return Err(Error::KeyProvider {
            provider: name,
            kind: ProviderFailure::AlreadyExists,
            detail: format!(
                "token {:?} already has a key labelled {:?}; keygen never replaces a key: pick another object= label",
                pool.label, uri.object
            ),
        });
    }
    let id = match &uri.id {
        Some(id) if !id.is_empty() => id.clone(),
        _ => {
            let mut id = vec![0u8; 8];
            crypto::random_bytes(&mut id)?;
            id
        }
    };
    let template = [
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::ValueLen(32u64.into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Wrap(true),
        Attribute::Unwrap(true),
        Attribute::Encrypt(false),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Label(uri.object.as_bytes().to_vec()),
        Attribute::Id(id.clone()),
    ];
    s.generate_key(&Mechanism::AesKeyGen, &template).map_err(|e| match rv(&e) {
        Some(_) if !is_fatal(&e) => Error::KeyProvider {
            provider: name.clone(),
            kind: ProviderFailure::Unsupported,
            detail: format!("the token refused to generate a non-extractable AES-256 KEK ({})", ck_name(&e)),
        },
        _ => pool.unavailable(&name, "C_GenerateKey", &e),
    })?;
    Ok(kek_id_for(&id))
}
