//! Ed25519 signatures (RFC 8032) for manifests.

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::error::{Error, Result};

/// Public key length.
pub const PUBLIC_LEN: usize = 32;
/// Signature length.
pub const SIGNATURE_LEN: usize = 64;

/// Signs `msg` with the Ed25519 key whose 32-byte seed is `seed`.
pub fn sign(seed: &[u8; 32], msg: &[u8]) -> Result<[u8; SIGNATURE_LEN]> {
    let kp = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| Error::Crypto("invalid Ed25519 seed"))?;
    let mut out = [0u8; SIGNATURE_LEN];
    out.copy_from_slice(kp.sign(msg).as_ref());
    Ok(out)
}

/// The public key of the seed.
pub fn public_key(seed: &[u8; 32]) -> Result<[u8; PUBLIC_LEN]> {
    let kp = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| Error::Crypto("invalid Ed25519 seed"))?;
    let mut out = [0u8; PUBLIC_LEN];
    out.copy_from_slice(kp.public_key().as_ref());
    Ok(out)
}

/// Verifies an Ed25519 signature; `false` for any malformed key or signature.
pub fn verify(public: &[u8], msg: &[u8], signature: &[u8]) -> bool {
    public.len() == PUBLIC_LEN
        && signature.len() == SIGNATURE_LEN
        && UnparsedPublicKey::new(&ED25519, public).verify(msg, signature).is_ok()
}
