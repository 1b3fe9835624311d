//! AES key wrap with padding (KWP), RFC 5649 / NIST SP 800-38F, used to wrap each
//! shard's 32-byte DEK under a 256-bit KEK.
//!
//! 128- and 256-bit KEKs use aws-lc-rs. aws-lc-rs has no AES-192 key wrap, so a
//! 192-bit KEK is supported only with the `rustcrypto` feature (RustCrypto `aes-kw`);
//! without it, it is rejected as an invalid argument.

use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_128, AES_256};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};

/// A key-encryption key of one of the supported sizes.
enum Kek {
    AwsLc(AesKek),
    /// Boxed: the expanded AES-192 key schedule is far larger than `AesKek`.
    #[cfg(feature = "rustcrypto")]
    Aes192(Box<aes_kw::KekAes192>),
}

impl Kek {
    fn new(key: &[u8]) -> Result<Self> {
        let cipher = match key.len() {
            16 => &AES_128,
            32 => &AES_256,
            #[cfg(feature = "rustcrypto")]
            24 => {
                return aes_kw::KekAes192::try_from(key)
                    .map(|k| Kek::Aes192(Box::new(k)))
                    .map_err(|_| Error::Crypto("KWP key setup failed"))
            }
            n => return Err(Error::InvalidArgument(format!("KWP key-encryption key of {n} bytes (expected {SIZES})"))),
        };
        AesKek::new(cipher, key).map(Kek::AwsLc).map_err(|_| Error::Crypto("KWP key setup failed"))
    }

    /// RFC 5649 wrap into `out` (exactly [`out_len`] bytes); `false` on any failure.
    fn wrap(self, key: &[u8], out: &mut [u8]) -> bool {
        let n = out.len();
        match self {
            Kek::AwsLc(k) => k.wrap_with_padding(key, out).is_ok_and(|w| w.len() == n),
            #[cfg(feature = "rustcrypto")]
            Kek::Aes192(k) => k.wrap_with_padding(key, out).is_ok(),
        }
    }

    /// RFC 5649 unwrap of `wrapped` (at least 16 bytes, a multiple of 8) into `out`
    /// (`wrapped.len() - 8` bytes): the unpadded length, or `None` if it does not unwrap.
    fn unwrap(self, wrapped: &[u8], out: &mut [u8]) -> Option<usize> {
        match self {
            Kek::AwsLc(k) => k.unwrap_with_padding(wrapped, out).ok().map(|pt| pt.len()),
            #[cfg(feature = "rustcrypto")]
            Kek::Aes192(k) => k.unwrap_with_padding(wrapped, out).ok().map(<[u8]>::len),
        }
    }
}

/// Wrapped length of a `key`: padded to 8 bytes, plus the 8-byte alternative IV.
fn out_len(key: &[u8]) -> usize {
    key.len().div_ceil(8) * 8 + 8
}

#[cfg(feature = "rustcrypto")]
const SIZES: &str = "16, 24 or 32";
#[cfg(not(feature = "rustcrypto"))]
const SIZES: &str = "16 or 32; 24 needs the `rustcrypto` feature";

/// Wraps `key` (1..=2^31 bytes) under `kek` (RFC 5649, section 4.1).
pub fn wrap(kek_bytes: &[u8], key: &[u8]) -> Result<Vec<u8>> {
    let k = Kek::new(kek_bytes)?;
    if key.is_empty() {
        return Err(Error::InvalidArgument("cannot wrap an empty key".into()));
    }
    let mut out = vec![0u8; out_len(key)];
    if !k.wrap(key, &mut out) {
        return Err(Error::Crypto("KWP wrap failed"));
    }
    Ok(out)
}

/// Unwraps `wrapped` under `kek` (RFC 5649, section 4.2) and checks its integrity
/// (the alternative IV and the padding). `None` when it does not unwrap.
pub fn unwrap(kek_bytes: &[u8], wrapped: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let mut out = Zeroizing::new(vec![0u8; wrapped.len().saturating_sub(8)]);
    Ok(unwrap_into(kek_bytes, wrapped, &mut out)?.map(|n| {
        out.truncate(n);
        out
    }))
}

/// As [`unwrap`], into `out` (exactly `wrapped.len() - 8` bytes, e.g. a locked key
/// slot, so that the key never passes through the heap): the unpadded length, or
/// `None` when it does not unwrap (then `out` is zeroized).
pub fn unwrap_into(kek_bytes: &[u8], wrapped: &[u8], out: &mut [u8]) -> Result<Option<usize>> {
    let k = Kek::new(kek_bytes)?;
    // Also keeps `aes-kw` away from its 8-byte input, on which it underflows.
    if wrapped.len() < 16 || !wrapped.len().is_multiple_of(8) || out.len() != wrapped.len() - 8 {
        return Ok(None);
    }
    let n = k.unwrap(wrapped, out);
    if n.is_none() {
        out.zeroize();
    }
    Ok(n)
}
