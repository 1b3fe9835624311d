//! AES key wrap with padding (KWP), RFC 5649 / NIST SP 800-38F, used to wrap each
//! shard's 32-byte DEK under a 256-bit KEK.

use aws_lc_rs::key_wrap::{AesKek, KeyWrapPadded, AES_128, AES_256};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

fn kek(key: &[u8]) -> Result<AesKek> {
    let cipher = match key.len() {
        16 => &AES_128,
        32 => &AES_256,
        n => return Err(Error::InvalidArgument(format!("KWP key-encryption key of {n} bytes (expected 16 or 32)"))),
    };
    AesKek::new(cipher, key).map_err(|_| Error::Crypto("KWP key setup failed"))
}

/// Wraps `key` (1..=2^31 bytes) under `kek` (RFC 5649, section 4.1).
pub fn wrap(kek_bytes: &[u8], key: &[u8]) -> Result<Vec<u8>> {
    if key.is_empty() {
        return Err(Error::InvalidArgument("cannot wrap an empty key".into()));
    }
    let mut out = vec![0u8; key.len().div_ceil(8) * 8 + 8];
    let n = kek(kek_bytes)?.wrap_with_padding(key, &mut out).map_err(|_| Error::Crypto("KWP wrap failed"))?.len();
    out.truncate(n);
    Ok(out)
}

/// Unwraps `wrapped` under `kek` (RFC 5649, section 4.2) and checks its integrity
/// (the alternative IV and the padding). `None` when it does not unwrap.
pub fn unwrap(kek_bytes: &[u8], wrapped: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>> {
    let k = kek(kek_bytes)?;
    if wrapped.len() < 16 || wrapped.len() % 8 != 0 {
        return Ok(None);
    }
    let mut out = Zeroizing::new(vec![0u8; wrapped.len()]);
    match k.unwrap_with_padding(wrapped, &mut out) {
        Ok(pt) => {
            let n = pt.len();
            out.truncate(n);
            Ok(Some(out))
        }
        Err(_) => Ok(None),
    }
}
