//! Cryptographic primitives, each documented against its specification.
//!
//! - [`aead`]: AES-256-GCM behind one small trait, with the aws-lc-rs backend (default)
//!   and the pure-Rust RustCrypto backend (feature `rustcrypto`).
//! - [`chunked`]: C2SP chunked-encryption, Cobblestone-256 (the shard payload).
//! - [`kwp`]: AES key wrap with padding (RFC 5649), for wrapping DEKs under a KEK.
//! - [`sign`]: Ed25519 signatures (manifests).

pub mod aead;
pub mod chunked;
pub mod kwp;
pub mod sign;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Incremental SHA-256.
pub struct Sha256(aws_lc_rs::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Self(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }
}

impl Sha256 {
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    /// Finishes the digest.
    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

/// Fills `out` from the system CSPRNG.
pub fn random_bytes(out: &mut [u8]) -> crate::Result<()> {
    aws_lc_rs::rand::fill(out).map_err(|_| crate::Error::Crypto("system random generator failed"))
}

/// Compares two byte strings in constant time (for the length of the shorter).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}
