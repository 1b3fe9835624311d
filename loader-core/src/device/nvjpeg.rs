//! nvJPEG, loaded at run time like the driver (`dlopen`, no CUDA toolkit to build), for
//! `decode_on = "device"`: the JPEG of each sample is decoded from the locked host batch
//! buffer straight into device memory.
//!
//! nvJPEG's own buffers come from the allocators here, so its plaintext is held as the
//! rest of the pipeline holds it: host staging is a [`LockedBuf`] (mlocked, excluded
//! from core dumps, wiped when freed) registered with the driver, and device scratch is
//! zeroed before it is freed.
//!
//! Only the simple single-image API is used (`nvjpegCreateEx`, `nvjpegJpegStateCreate`,
//! `nvjpegGetImageInfo`, `nvjpegDecode`): it exists in every nvJPEG since CUDA 10.

use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys;

use crate::error::{Error, Result};
use crate::memory::{LockedBuf, MemoryPolicy};

/// `NVJPEG_OUTPUT_RGBI`: interleaved RGB in `channel[0]`.
const OUTPUT_RGBI: c_int = 5;
/// `NVJPEG_BACKEND_DEFAULT`.
const BACKEND_DEFAULT: c_int = 0;

/// `nvjpegImage_t`.
#[repr(C)]
struct Image {
    channel: [*mut u8; 4],
    pitch: [usize; 4],
}

/// `nvjpegDevAllocator_t`.
#[repr(C)]
struct DevAllocator {
    malloc: extern "C" fn(*mut *mut c_void, usize) -> c_int,
    free: extern "C" fn(*mut c_void) -> c_int,
}

/// `nvjpegPinnedAllocator_t`.
#[repr(C)]
struct PinnedAllocator {
    malloc: extern "C" fn(*mut *mut c_void, usize, c_uint) -> c_int,
    free: extern "C" fn(*mut c_void) -> c_int,
}

type CreateEx =
    unsafe extern "C" fn(c_int, *const DevAllocator, *const PinnedAllocator, c_uint, *mut *mut c_void) -> c_int;
type Destroy = unsafe extern "C" fn(*mut c_void) -> c_int;
type StateCreate = unsafe extern "C" fn(*mut c_void, *mut *mut c_void) -> c_int;
type ImageInfo =
    unsafe extern "C" fn(*mut c_void, *const u8, usize, *mut c_int, *mut c_int, *mut c_int, *mut c_int) -> c_int;
type Decode =
    unsafe extern "C" fn(*mut c_void, *mut c_void, *const u8, usize, c_int, *mut Image, sys::CUstream) -> c_int;

/// The entry points, resolved once per process.
struct Library {
    _lib: libloading::Library,
    create_ex: CreateEx,
    destroy: Destroy,
    state_create: StateCreate,
    state_destroy: Destroy,
    image_info: ImageInfo,
    decode: Decode,
    path: String,
}

/// Where nvJPEG is looked for: `explicit` (the `nvjpeg` device option), then
/// `SHARDLOCK_NVJPEG`, then the sonames the CUDA 12 and 13 toolkits and pip's
/// `nvidia-nvjpeg-cu12` / `-cu13` wheels install (the Python module passes the wheel's
/// path when the wheel is installed).
pub(crate) fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_owned()];
    }
    if let Some(p) = std::env::var_os("SHARDLOCK_NVJPEG").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    ["libnvjpeg.so.12", "libnvjpeg.so.13", "libnvjpeg.so"].iter().map(PathBuf::from).collect()
}

fn unavailable(device: &str, detail: String) -> Error {
    Error::DeviceUnavailable { device: device.to_owned(), detail }
}

impl Library {
    fn load(explicit: Option<&Path>, device: &str) -> Result<Library> {
        let tried = candidates(explicit);
        let mut why = Vec::new();
        for path in &tried {
            #[allow(unsafe_code)]
            // SAFETY: loading a shared library runs its initializers; nvJPEG's only set up
            // its own state. The path is the user's choice or a standard soname.
            let lib = match unsafe { libloading::Library::new(path) } {
                Ok(l) => l,
                Err(e) => {
                    why.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            return Self::resolve(lib, path, device);
        }
        Err(unavailable(
            device,
            format!(
                "nvJPEG could not be loaded for decode_on=\"device\" ({}): pip install nvidia-nvjpeg-cu12 (or -cu13), \
                 add the CUDA toolkit's lib64 to LD_LIBRARY_PATH, or set SHARDLOCK_NVJPEG to the library's path; \
                 decode_on=\"workers\" decodes on the CPU and needs neither",
                why.join("; ")
            ),
        ))
    }

    fn resolve(lib: libloading::Library, path: &Path, device: &str) -> Result<Library> {
        macro_rules! sym {
            ($name:literal, $t:ty) => {{
                #[allow(unsafe_code)]
                // SAFETY: the symbol is nvJPEG's C entry point of that name, whose C
                // signature (nvjpeg.h) the type alias spells; the pointer is used only
                // while `_lib` keeps the library loaded (it is a field of `Library`).
                let s = unsafe { lib.get::<$t>(concat!($name, "\0").as_bytes()) };
                let s = s.map_err(|e| {
                    let what = format!("{} has no {} ({e})", path.display(), $name);
                    unavailable(device, format!("{what}: it is not nvJPEG, or one older than CUDA 10"))
                })?;
                *s
            }};
        }
        let create_ex = sym!("nvjpegCreateEx", CreateEx);
        let destroy = sym!("nvjpegDestroy", Destroy);
        let state_create = sym!("nvjpegJpegStateCreate", StateCreate);
        let state_destroy = sym!("nvjpegJpegStateDestroy", Destroy);
        let image_info = sym!("nvjpegGetImageInfo", ImageInfo);
        let decode = sym!("nvjpegDecode", Decode);
        Ok(Library {
            _lib: lib,
            create_ex,
            destroy,
            state_create,
            state_destroy,
            image_info,
            decode,
            path: path.display().to_string(),
        })
    }
}

/// The process's nvJPEG: loaded on first use; the first library that loads serves the
/// process (a failure is retried on the next call). Asking for another explicit path
/// afterwards is an error, not silently the first library.
fn library(explicit: Option<&Path>, device: &str) -> Result<&'static Library> {
    static LIB: OnceLock<Library> = OnceLock::new();
    let l = match LIB.get() {
        Some(l) => l,
        None => {
            let l = Library::load(explicit, device)?;
            LIB.get_or_init(|| l)
        }
    };
    if let Some(p) = explicit.filter(|p| p.display().to_string() != l.path) {
        return Err(unavailable(
            device,
            format!(
                "this process loaded nvJPEG from {} already and cannot load {} too: use one nvJPEG per process",
                l.path,
                p.display()
            ),
        ));
    }
    Ok(l)
}

/// Checks that nvJPEG loads from `explicit` (or the default places) and has every entry
/// point shardlock calls; no CUDA call is made.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn check_library(explicit: Option<&Path>, device: &str) -> Result<String> {
    Library::load(explicit, device).map(|l| l.path)
}

/// What an nvJPEG status means; `None` for success.
fn status(code: c_int) -> Option<&'static str> {
    Some(match code {
        0 => return None,
        1 => "NVJPEG_STATUS_NOT_INITIALIZED",
        2 => "NVJPEG_STATUS_INVALID_PARAMETER",
        3 => "NVJPEG_STATUS_BAD_JPEG",
        4 => "NVJPEG_STATUS_JPEG_NOT_SUPPORTED",
        5 => "NVJPEG_STATUS_ALLOCATOR_FAILURE",
        6 => "NVJPEG_STATUS_EXECUTION_FAILED",
        7 => "NVJPEG_STATUS_ARCH_MISMATCH",
        8 => "NVJPEG_STATUS_INTERNAL_ERROR",
        9 => "NVJPEG_STATUS_IMPLEMENTATION_NOT_SUPPORTED",
        10 => "NVJPEG_STATUS_INCOMPLETE_BITSTREAM",
        _ => "an unknown nvJPEG status",
    })
}

/// How one image's decode ended.
pub(crate) enum Outcome {
    Done,
    /// nvJPEG refused this image (corrupt, truncated, or a coding it lacks): decode it
    /// on the host, whose decoder accepts or refuses it as the workers would.
    Refused,
}

/// Live decoders whose loader requires locked memory: while there is one, nvJPEG's host
/// staging (shared by every decoder of the process) must be locked.
static REQUIRE_LOCKED: AtomicUsize = AtomicUsize::new(0);

/// Live allocations made for nvJPEG: device pointer -> bytes, host pointer -> buffer.
fn device_allocations() -> &'static Mutex<HashMap<usize, usize>> {
    static M: OnceLock<Mutex<HashMap<usize, usize>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

fn host_allocations() -> &'static Mutex<HashMap<usize, LockedBuf>> {
    static M: OnceLock<Mutex<HashMap<usize, LockedBuf>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

/// `cudaErrorMemoryAllocation`: what nvJPEG expects from a failed allocator.
const ALLOC_FAILED: c_int = 2;

/// Runs an allocator callback with panics caught (none may cross into nvJPEG); a
/// payload whose drop panics is caught again and forgotten.
fn guarded(fail: c_int, f: impl FnOnce() -> c_int) -> c_int {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
                std::mem::forget(again);
            }
            fail
        }
    }
}

extern "C" fn dev_malloc(out: *mut *mut c_void, size: usize) -> c_int {
    guarded(ALLOC_FAILED, || {
        if out.is_null() {
            return ALLOC_FAILED;
        }
        let mut ptr: sys::CUdeviceptr = 0;
        #[allow(unsafe_code)]
        // SAFETY: `ptr` is written by the driver; nvJPEG calls this with its context current.
        let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, size.max(1)) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return ALLOC_FAILED;
        }
        device_allocations().lock().unwrap_or_else(|p| p.into_inner()).insert(ptr as usize, size.max(1));
        #[allow(unsafe_code)]
        // SAFETY: `out` is nvJPEG's non-null out-parameter (checked above).
        unsafe {
            *out = ptr as *mut c_void
        };
        0
    })
}

extern "C" fn dev_free(ptr: *mut c_void) -> c_int {
    guarded(1, || {
        if ptr.is_null() {
            return 0;
        }
        let size = device_allocations().lock().unwrap_or_else(|p| p.into_inner()).remove(&(ptr as usize));
        let Some(size) = size else { return 1 };
        let ok = sys::CUresult::CUDA_SUCCESS;
        #[allow(unsafe_code)]
        // SAFETY: `ptr` came from `dev_malloc` (it was in the table) with `size` bytes.
        // The work that may still use it finishes before it is zeroed (its plaintext) and
        // freed; if that cannot be confirmed it is leaked, never freed unzeroed.
        unsafe {
            let zeroed = sys::cuCtxSynchronize() == ok
                && sys::cuMemsetD8_v2(ptr as sys::CUdeviceptr, 0, size) == ok
                && sys::cuCtxSynchronize() == ok;
            if zeroed {
                let _ = sys::cuMemFree_v2(ptr as sys::CUdeviceptr);
            }
        }
        0
    })
}

extern "C" fn pinned_malloc(out: *mut *mut c_void, size: usize, _flags: c_uint) -> c_int {
    guarded(ALLOC_FAILED, || {
        if out.is_null() {
            return ALLOC_FAILED;
        }
        let policy = if REQUIRE_LOCKED.load(Ordering::SeqCst) > 0 {
            MemoryPolicy::RequireLocked
        } else {
            MemoryPolicy::AllowUnlocked
        };
        let Ok(mut buf) = LockedBuf::new(size.max(1), policy) else { return ALLOC_FAILED };
        let ptr = buf.as_mut_ptr();
        #[allow(unsafe_code)]
        // SAFETY: [ptr, ptr + capacity) is the live mapping of `buf`, which the table
        // below keeps until `pinned_free` unregisters it; registration pins the pages and
        // does not change them.
        let r = unsafe { sys::cuMemHostRegister_v2(ptr.cast(), buf.capacity(), sys::CU_MEMHOSTREGISTER_PORTABLE) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return ALLOC_FAILED;
        }
        host_allocations().lock().unwrap_or_else(|p| p.into_inner()).insert(ptr as usize, buf);
        #[allow(unsafe_code)]
        // SAFETY: `out` is nvJPEG's non-null out-parameter (checked above).
        unsafe {
            *out = ptr.cast()
        };
        0
    })
}

extern "C" fn pinned_free(ptr: *mut c_void) -> c_int {
    guarded(1, || {
        if ptr.is_null() {
            return 0;
        }
        let buf = host_allocations().lock().unwrap_or_else(|p| p.into_inner()).remove(&(ptr as usize));
        let Some(buf) = buf else { return 1 };
        let ok = sys::CUresult::CUDA_SUCCESS;
        #[allow(unsafe_code)]
        // SAFETY: `ptr` was registered by `pinned_malloc`; every copy from it finishes
        // (context synchronized) before it is unregistered.
        let idle = unsafe { sys::cuCtxSynchronize() == ok && sys::cuMemHostUnregister(ptr) == ok };
        if idle {
            // Wiped, unlocked and unmapped.
            drop(buf);
        } else {
            // A DMA may still read it: leak it (still locked) rather than unmap it.
            std::mem::forget(buf);
        }
        0
    })
}

/// The allocators nvJPEG is created with (static: nvJPEG may keep the pointers).
static DEV_ALLOCATOR: DevAllocator = DevAllocator { malloc: dev_malloc, free: dev_free };
static PINNED_ALLOCATOR: PinnedAllocator = PinnedAllocator { malloc: pinned_malloc, free: pinned_free };

/// One nvJPEG handle and decode state, used from one thread at a time (the device
/// stage's), with its CUDA context current.
pub(crate) struct Decoder {
    lib: &'static Library,
    handle: *mut c_void,
    state: *mut c_void,
    device: String,
    /// Counted in [`REQUIRE_LOCKED`].
    locked: bool,
}

// SAFETY: the handle and state are used only through `&mut self` (one thread at a
// time); nvJPEG allows a handle to move between threads.
#[allow(unsafe_code)]
unsafe impl Send for Decoder {}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("nvjpeg::Decoder").field("library", &self.lib.path).field("device", &self.device).finish()
    }
}

impl Decoder {
    /// Loads nvJPEG and creates a handle whose allocations are locked and wiped. The
    /// device's context must be current on the calling thread.
    pub(crate) fn new(explicit: Option<&Path>, device: &str, policy: MemoryPolicy) -> Result<Self> {
        let lib = library(explicit, device)?;
        let locked = policy == MemoryPolicy::RequireLocked;
        let fail = |op: &'static str, code: c_int| Error::Device {
            device: device.to_owned(),
            op,
            detail: format!("{} ({})", status(code).unwrap_or("success"), lib.path),
        };
        if locked {
            REQUIRE_LOCKED.fetch_add(1, Ordering::SeqCst);
        }
        let release = || {
            if locked {
                REQUIRE_LOCKED.fetch_sub(1, Ordering::SeqCst);
            }
        };
        let mut handle: *mut c_void = std::ptr::null_mut();
        #[allow(unsafe_code)]
        // SAFETY: the allocator structs match nvjpeg.h and live for the process
        // (statics); nvJPEG only reads them; `handle` is written on success.
        let r = unsafe { (lib.create_ex)(BACKEND_DEFAULT, &DEV_ALLOCATOR, &PINNED_ALLOCATOR, 0, &mut handle) };
        if r != 0 {
            release();
            return Err(fail("nvjpegCreateEx", r));
        }
        let mut state: *mut c_void = std::ptr::null_mut();
        #[allow(unsafe_code)]
        // SAFETY: `handle` was created above; `state` is written on success.
        let r = unsafe { (lib.state_create)(handle, &mut state) };
        if r != 0 {
            #[allow(unsafe_code)]
            // SAFETY: `handle` was created above and is not used again.
            unsafe {
                (lib.destroy)(handle)
            };
            release();
            return Err(fail("nvjpegJpegStateCreate", r));
        }
        Ok(Self { lib, handle, state, device: device.to_owned(), locked })
    }

    /// `(width, height)` of the JPEG as nvJPEG reads its headers, or why not.
    pub(crate) fn dimensions(&mut self, data: &[u8]) -> std::result::Result<(usize, usize), c_int> {
        let (mut n, mut sub) = (0 as c_int, 0 as c_int);
        let (mut w, mut h) = ([0 as c_int; 4], [0 as c_int; 4]);
        #[allow(unsafe_code)]
        // SAFETY: `data` is a live slice of `data.len()` bytes; the out-parameters are
        // the 1 + 1 + 4 + 4 ints nvjpegGetImageInfo writes (NVJPEG_MAX_COMPONENT = 4).
        let r = unsafe {
            (self.lib.image_info)(
                self.handle,
                data.as_ptr(),
                data.len(),
                &mut n,
                &mut sub,
                w.as_mut_ptr(),
                h.as_mut_ptr(),
            )
        };
        if r != 0 || w[0] <= 0 || h[0] <= 0 {
            return Err(r);
        }
        Ok((w[0] as usize, h[0] as usize))
    }

    /// Decodes `data` to interleaved RGB at device address `dst` (`width * 3` bytes per
    /// row, `height` rows, which the caller sized from [`Decoder::dimensions`]), on
    /// `stream`.
    ///
    /// # Safety
    /// `dst` must be a device allocation of this context with at least `width * 3 *
    /// height` bytes for the `(width, height)` that [`Decoder::dimensions`] gave for
    /// these same bytes, not read or written by other work until `stream` reaches this point.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn decode(
        &mut self,
        data: &[u8],
        dst: u64,
        width: usize,
        stream: sys::CUstream,
    ) -> Result<Outcome> {
        let mut img = Image {
            channel: [dst as *mut u8, std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut()],
            pitch: [width * 3, 0, 0, 0],
        };
        // SAFETY: the handle and state are live; `data` is a live slice; `img` points at
        // device memory the caller sized for this image (this function's contract).
        let r = unsafe {
            (self.lib.decode)(self.handle, self.state, data.as_ptr(), data.len(), OUTPUT_RGBI, &mut img, stream)
        };
        Ok(match r {
            0 => Outcome::Done,
            // The device or nvJPEG itself failed: not the image's doing.
            1 | 5 | 6 | 7 => {
                return Err(Error::Device {
                    device: self.device.clone(),
                    op: "nvjpegDecode",
                    detail: status(r).unwrap_or("").to_owned(),
                })
            }
            // Anything about this image (bad or truncated data, a coding nvJPEG lacks,
            // an invalid parameter or internal error it provoked): the workers' decoder
            // gives the verdict, so both routes accept and refuse the same images.
            _ => Outcome::Refused,
        })
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        #[allow(unsafe_code)]
        // SAFETY: the state and handle were created in `new` and are not used again;
        // nvJPEG frees its buffers through the allocators above (wiped, zeroed).
        unsafe {
            (self.lib.state_destroy)(self.state);
            (self.lib.destroy)(self.handle);
        }
        if self.locked {
            REQUIRE_LOCKED.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_device_unavailable_naming_it_and_what_to_install() {
        let e = check_library(Some(Path::new("/nonexistent/libnvjpeg.so.12")), "cuda:0").unwrap_err();
        assert!(matches!(e, Error::DeviceUnavailable { .. }), "{e}");
        let s = e.to_string();
        for want in ["/nonexistent/libnvjpeg.so.12", "nvidia-nvjpeg-cu12", "SHARDLOCK_NVJPEG", "decode_on=\"workers\""]
        {
            assert!(s.contains(want), "{want} missing from: {s}");
        }
    }

    #[test]
    fn a_library_that_is_not_nvjpeg_is_refused_naming_the_missing_entry_point() {
        // libc is loaded in every process and has none of nvJPEG's symbols.
        let e = check_library(Some(Path::new("libc.so.6")), "cuda:1").unwrap_err();
        assert!(matches!(e, Error::DeviceUnavailable { .. }), "{e}");
        let s = e.to_string();
        assert!(s.contains("nvjpegCreateEx") && s.contains("libc.so.6") && s.contains("cuda:1"), "{s}");
    }

    #[test]
    fn statuses_name_nvjpeg_codes() {
        assert_eq!(status(0), None);
        assert_eq!(status(3), Some("NVJPEG_STATUS_BAD_JPEG"));
        assert_eq!(status(10), Some("NVJPEG_STATUS_INCOMPLETE_BITSTREAM"));
        assert_eq!(status(77), Some("an unknown nvJPEG status"));
    }

    #[test]
    fn explicit_and_environment_paths_come_first() {
        assert_eq!(candidates(Some(Path::new("/x/libnvjpeg.so.12"))), vec![PathBuf::from("/x/libnvjpeg.so.12")]);
        if std::env::var_os("SHARDLOCK_NVJPEG").is_none() {
            assert_eq!(candidates(None)[0], PathBuf::from("libnvjpeg.so.12"));
        }
    }
}
