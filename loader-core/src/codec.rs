//! Per-value compression (FORMAT.md section 5.1): each value of a compressed field is
//! one zstd frame (RFC 8878) that declares its content size.
//!
//! Both contexts live in memory this module owns and wipes: a compressor's in a zeroized
//! heap workspace (pack side, where the shard buffers are heap memory too), a
//! decompressor's in a locked buffer ([`LockedBuf`]), so the literals and sequences zstd
//! keeps while it decodes never sit in unlocked pages or outlive the context. zstd's
//! static contexts never allocate: what does not fit the workspace is an error.
//!
//! Without the `zstd` feature, both constructors return an error that says so.

use crate::error::{Error, Result};
use crate::memory::MemoryPolicy;

/// Compression levels `--compress FIELD=zstd:LEVEL` takes (zstd's 1..=19; the higher
/// "ultra" levels need workspaces of hundreds of MiB per thread).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

/// zstd's default level.
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;

/// The largest value length a frame may declare (as a schema's largest fixed value).
#[cfg_attr(not(feature = "zstd"), allow(dead_code))]
pub const MAX_DECLARED: u64 = 1 << 40;

/// The magic number that starts every zstd frame (little-endian on disk).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Why a stored value is not an acceptable frame, in words for an error message (never
/// any of the value's bytes).
pub type FrameError = String;

/// Compresses values, one frame each, at one level.
pub struct Compressor {
    #[cfg_attr(not(feature = "zstd"), allow(dead_code))]
    level: i32,
    #[cfg(feature = "zstd")]
    ctx: imp::StaticCCtx,
}

impl Compressor {
    /// A compressor at `level` (one of [`ZSTD_LEVELS`]).
    pub fn new(level: i32) -> Result<Self> {
        if !ZSTD_LEVELS.contains(&level) {
            return Err(Error::InvalidArgument(format!(
                "zstd level {level} is out of range ({}..={})",
                ZSTD_LEVELS.start(),
                ZSTD_LEVELS.end()
            )));
        }
        #[cfg(feature = "zstd")]
        {
            Ok(Self { level, ctx: imp::StaticCCtx::new(level)? })
        }
        #[cfg(not(feature = "zstd"))]
        {
            let _ = level;
            Err(not_built())
        }
    }

    /// Appends the frame of `value` to `out` and returns the frame's length. `out`
    /// grows without leaving plaintext in a freed allocation.
    pub fn compress_into(&mut self, value: &[u8], out: &mut zeroize::Zeroizing<Vec<u8>>) -> Result<usize> {
        #[cfg(feature = "zstd")]
        {
            let bound = imp::compress_bound(value.len());
            crate::memory::reserve_zeroizing(out, bound);
            let start = out.len();
            out.resize(start + bound, 0);
            let n = self.ctx.compress(value, &mut out[start..], self.level);
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    out.truncate(start);
                    return Err(Error::Internal(format!("zstd compression failed: {e}")));
                }
            };
            // The tail past the frame held zeros only (resize), nothing to wipe.
            out.truncate(start + n);
            Ok(n)
        }
        #[cfg(not(feature = "zstd"))]
        {
            let _ = (value, out);
            Err(not_built())
        }
    }
}

/// Decompresses frames into caller-sized buffers.
pub struct Decompressor {
    #[cfg(feature = "zstd")]
    ctx: imp::StaticDCtx,
}

impl Decompressor {
    /// A decompressor whose context lives in locked memory (subject to `policy`).
    pub fn new(policy: MemoryPolicy) -> Result<Self> {
        #[cfg(feature = "zstd")]
        {
            Ok(Self { ctx: imp::StaticDCtx::new(policy)? })
        }
        #[cfg(not(feature = "zstd"))]
        {
            let _ = policy;
            Err(not_built())
        }
    }

    /// The content size `frame` declares: it must be exactly one zstd frame (no
    /// skippable frame, nothing after it) with its content size field present.
    pub fn content_size(frame: &[u8]) -> std::result::Result<u64, FrameError> {
        if frame.len() < 4 || frame[..4] != ZSTD_MAGIC {
            return Err("the stored value is not a zstd frame (wrong magic number)".into());
        }
        #[cfg(feature = "zstd")]
        {
            let n = imp::content_size(frame)?;
            if n > MAX_DECLARED {
                return Err(format!("the zstd frame declares {n} bytes, more than the 2^40 a value may have"));
            }
            Ok(n)
        }
        #[cfg(not(feature = "zstd"))]
        {
            Err("this build has no zstd support (turn on the `zstd` feature)".into())
        }
    }

    /// Decompresses `frame` into all of `out`: an error unless the frame holds exactly
    /// `out.len()` bytes (a frame that would write more stops at `out`'s end). On an
    /// error `out` may hold part of the value; the caller discards it.
    pub fn decompress(&mut self, frame: &[u8], out: &mut [u8]) -> std::result::Result<(), FrameError> {
        #[cfg(feature = "zstd")]
        {
            let n = self.ctx.decompress(frame, out)?;
            if n != out.len() {
                return Err(format!("the frame holds {n} bytes, not the {} it declares", out.len()));
            }
            Ok(())
        }
        #[cfg(not(feature = "zstd"))]
        {
            let _ = (frame, out);
            Err("this build has no zstd support (turn on the `zstd` feature)".into())
        }
    }
}

#[cfg(not(feature = "zstd"))]
fn not_built() -> Error {
    Error::InvalidArgument(
        "this build of shardlock has no zstd support: compressed fields need the `zstd` feature".into(),
    )
}

#[cfg(feature = "zstd")]
#[allow(unsafe_code)]
mod imp {
    //! The zstd calls. Every context is created in a workspace owned next to it and
    //! used only through `&mut self`.

    use std::ffi::{c_void, CStr};
    use std::ptr::NonNull;

    use zeroize::Zeroizing;
    use zstd_sys as z;

    use super::FrameError;
    use crate::error::{Error, Result};
    use crate::memory::{LockedBuf, MemoryPolicy};

    fn error_name(code: usize) -> String {
        // SAFETY: ZSTD_getErrorName returns a pointer to a static NUL-terminated string
        // for any input.
        let name = unsafe { CStr::from_ptr(z::ZSTD_getErrorName(code)) };
        name.to_string_lossy().into_owned()
    }

    fn is_error(code: usize) -> bool {
        // SAFETY: a pure function of its argument.
        unsafe { z::ZSTD_isError(code) != 0 }
    }

    pub(super) fn compress_bound(len: usize) -> usize {
        // SAFETY: a pure function of its argument.
        unsafe { z::ZSTD_compressBound(len) }
    }

    pub(super) fn content_size(frame: &[u8]) -> std::result::Result<u64, FrameError> {
        // SAFETY: both functions read at most `frame.len()` bytes from `frame`, which
        // the slice keeps valid for the call.
        let (size, whole) = unsafe {
            (
                z::ZSTD_getFrameContentSize(frame.as_ptr().cast(), frame.len()),
                z::ZSTD_findFrameCompressedSize(frame.as_ptr().cast(), frame.len()),
            )
        };
        // ZSTD_CONTENTSIZE_UNKNOWN and ZSTD_CONTENTSIZE_ERROR.
        if size == u64::MAX {
            return Err("the zstd frame does not declare its content size".into());
        }
        if size == u64::MAX - 1 {
            return Err("the zstd frame header is malformed".into());
        }
        if is_error(whole) {
            return Err(format!("the zstd frame is malformed: {}", error_name(whole)));
        }
        if whole != frame.len() {
            return Err(format!("{} bytes follow the zstd frame", frame.len() - whole));
        }
        Ok(size)
    }

    /// A compression context inside a zeroized workspace.
    pub(super) struct StaticCCtx {
        ctx: NonNull<z::ZSTD_CCtx>,
        // Declared after `ctx`: the workspace the context lives in, wiped on drop. u64
        // elements give the 8-byte alignment zstd requires.
        _work: Zeroizing<Vec<u64>>,
    }

    // SAFETY: the context is owned exclusively by this value (it lives in `_work`) and
    // zstd contexts may move between threads; it is only used through `&mut self`.
    unsafe impl Send for StaticCCtx {}

    impl StaticCCtx {
        pub(super) fn new(level: i32) -> Result<Self> {
            // SAFETY: a pure function of its argument.
            let bytes = unsafe { z::ZSTD_estimateCCtxSize(level) };
            let mut work = Zeroizing::new(vec![0u64; bytes.div_ceil(8)]);
            // SAFETY: the workspace is 8-byte aligned, `bytes` long, and outlives the
            // context (both are owned by the value returned; the heap allocation does
            // not move when the Vec does).
            let ctx = unsafe { z::ZSTD_initStaticCCtx(work.as_mut_ptr().cast::<c_void>(), work.len() * 8) };
            let ctx = NonNull::new(ctx)
                .ok_or_else(|| Error::Internal(format!("cannot set up a zstd level-{level} compressor")))?;
            Ok(Self { ctx, _work: work })
        }

        pub(super) fn compress(
            &mut self,
            src: &[u8],
            dst: &mut [u8],
            level: i32,
        ) -> std::result::Result<usize, String> {
            // SAFETY: `ctx` is a live context owned by `self`; zstd reads `src.len()`
            // bytes from `src` and writes at most `dst.len()` bytes into `dst`.
            let n = unsafe {
                z::ZSTD_compressCCtx(
                    self.ctx.as_ptr(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    src.as_ptr().cast(),
                    src.len(),
                    level,
                )
            };
            if is_error(n) {
                return Err(error_name(n));
            }
            Ok(n)
        }
    }

    /// A decompression context inside a locked buffer.
    pub(super) struct StaticDCtx {
        ctx: NonNull<z::ZSTD_DCtx>,
        // Declared after `ctx`: the locked workspace, wiped and unmapped on drop.
        _work: LockedBuf,
    }

    // SAFETY: as for StaticCCtx.
    unsafe impl Send for StaticDCtx {}

    impl StaticDCtx {
        pub(super) fn new(policy: MemoryPolicy) -> Result<Self> {
            // SAFETY: a pure function.
            let bytes = unsafe { z::ZSTD_estimateDCtxSize() };
            let mut work = LockedBuf::new(bytes, policy)?;
            let cap = work.capacity();
            // SAFETY: the mapping is page-aligned, `cap >= bytes` long, and lives as long
            // as the context (both owned by the value returned; a mapping never moves).
            let ctx = unsafe { z::ZSTD_initStaticDCtx(work.as_mut_ptr().cast::<c_void>(), cap) };
            let ctx = NonNull::new(ctx).ok_or_else(|| Error::Internal("cannot set up a zstd decompressor".into()))?;
            Ok(Self { ctx, _work: work })
        }

        pub(super) fn decompress(&mut self, src: &[u8], dst: &mut [u8]) -> std::result::Result<usize, FrameError> {
            // SAFETY: `ctx` is a live context owned by `self`; zstd reads `src.len()`
            // bytes and writes at most `dst.len()` bytes.
            let n = unsafe {
                z::ZSTD_decompressDCtx(
                    self.ctx.as_ptr(),
                    dst.as_mut_ptr().cast(),
                    dst.len(),
                    src.as_ptr().cast(),
                    src.len(),
                )
            };
            if is_error(n) {
                return Err(format!("the zstd frame does not decompress: {}", error_name(n)));
            }
            Ok(n)
        }
    }
}

#[cfg(all(test, feature = "zstd"))]
#[allow(clippy::unwrap_used)]
mod tests {
    use zeroize::Zeroizing;

    use super::*;

    #[test]
    fn a_value_round_trips_and_its_frame_declares_its_size() {
        let mut c = Compressor::new(3).unwrap();
        let value: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = Zeroizing::new(b"prefix".to_vec());
        let n = c.compress_into(&value, &mut out).unwrap();
        assert_eq!(out.len(), 6 + n);
        assert!(n < value.len() / 10, "{n}");
        let frame = &out[6..];
        assert_eq!(Decompressor::content_size(frame).unwrap(), value.len() as u64);
        let mut d = Decompressor::new(MemoryPolicy::AllowUnlocked).unwrap();
        let mut back = vec![0u8; value.len()];
        d.decompress(frame, &mut back).unwrap();
        assert_eq!(back, value);
        // An empty value is a frame too.
        let mut e = Zeroizing::new(Vec::new());
        c.compress_into(b"", &mut e).unwrap();
        assert_eq!(Decompressor::content_size(&e).unwrap(), 0);
        d.decompress(&e, &mut []).unwrap();
    }

    #[test]
    fn frames_that_lie_about_their_size_or_are_not_frames_are_refused() {
        let mut c = Compressor::new(1).unwrap();
        let value = vec![7u8; 50_000];
        let mut f = Zeroizing::new(Vec::new());
        c.compress_into(&value, &mut f).unwrap();
        let mut d = Decompressor::new(MemoryPolicy::AllowUnlocked).unwrap();
        // A buffer smaller than the content: the frame would write past it.
        let mut small = vec![0u8; 49_999];
        assert!(d.decompress(&f, &mut small).is_err());
        // Larger: the frame holds fewer bytes than the buffer wants.
        let mut big = vec![0u8; 50_001];
        assert!(d.decompress(&f, &mut big).is_err());
        // Trailing bytes, a truncated frame, no magic.
        let mut trailing = f.to_vec();
        trailing.push(0);
        assert!(Decompressor::content_size(&trailing).unwrap_err().contains("follow"));
        assert!(Decompressor::content_size(&f[..f.len() - 1]).is_err());
        assert!(Decompressor::content_size(b"not a frame").unwrap_err().contains("magic"));
        assert!(Compressor::new(0).is_err() && Compressor::new(20).is_err());
    }
}
