//! Locked scratch for code that allocates through Rust's global allocator while it
//! holds plaintext: the image decoders, whose row buffers and coefficient planes are
//! `Vec`s of their own.
//!
//! [`ScratchAlloc`] is a global allocator that forwards to the system allocator,
//! except on a thread inside [`Arena::run`]: there every allocation is carved from the
//! arena's page-locked, never-dumped mapping (bump allocation), or, when the arena is
//! full, from a mapping of its own that is wiped and unmapped when it is freed. When
//! the run ends the arena's used bytes are zeroed. So a decoder's buffers are locked
//! while they live and hold nothing once it is done, without any change to the decoder.
//!
//! A binary opts in with
//! `#[global_allocator] static ALLOC: shardlock::ScratchAlloc = shardlock::ScratchAlloc;`
//! (the `shardlock` CLI and the Python module do). [`installed`] says whether it did;
//! the loader refuses to decode images without it unless unlocked memory was allowed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, Ordering};

use super::pool::{page_size, LockedBuf, MemoryPolicy};
use crate::error::Result;

/// The global allocator that gives [`Arena::run`] its locked scratch; everything else
/// goes to [`System`]. Install it in a binary that decodes images (module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct ScratchAlloc;

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Records that an allocation came through [`ScratchAlloc`] (a load first, so threads do
/// not contend on a store per allocation).
#[inline]
fn mark_installed() {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

/// Whether [`ScratchAlloc`] is this process's global allocator.
pub fn installed() -> bool {
    // Any allocation through it sets the flag; make one to be sure.
    drop(std::hint::black_box(Box::new(0u8)));
    INSTALLED.load(Ordering::Relaxed)
}

thread_local! {
    // The arena this thread allocates from, while inside `Arena::run`. A `Cell` of a
    // raw pointer has no destructor, so reading it never allocates or registers one.
    static ACTIVE: Cell<*const Arena> = const { Cell::new(null()) };
}

/// Most spill mappings (allocations that did not fit the arena) alive at once.
const SPILLS: usize = 64;

/// One thread's locked scratch: a bump region and the spill mappings of one run.
pub(crate) struct Arena {
    buf: LockedBuf,
    base: usize,
    top: Cell<usize>,
    high: Cell<usize>,
    spills: [Cell<(usize, usize)>; SPILLS],
    /// A spill could not be locked, or there was no room to record one.
    unlocked: Cell<bool>,
    policy: MemoryPolicy,
}

// SAFETY: an Arena is used by one thread at a time: `run` takes `&mut self`, and the
// thread-local pointer to it is cleared before `run` returns.
#[allow(unsafe_code)]
unsafe impl Send for Arena {}

impl Arena {
    /// An arena of `bytes` (rounded up to pages), locked per `policy`.
    pub(crate) fn new(bytes: usize, policy: MemoryPolicy) -> Result<Self> {
        let mut buf = LockedBuf::new(bytes, policy)?;
        let base = buf.as_mut_ptr() as usize;
        Ok(Self {
            buf,
            base,
            top: Cell::new(0),
            high: Cell::new(0),
            spills: [const { Cell::new((0, 0)) }; SPILLS],
            unlocked: Cell::new(false),
            policy,
        })
    }

    /// Capacity of the bump region.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Runs `f` with this thread's allocations served from the arena, then zeroes
    /// what they used. Returns `None` when a spill could not be locked and the policy
    /// requires locked memory (the run's data is wiped all the same).
    ///
    /// # Safety
    /// Nothing allocated inside `f` may outlive it: `f` must drop everything it
    /// allocates before it returns (`R` is `Copy` and must not point into the arena),
    /// and must not unwind (catch panics inside it).
    #[allow(unsafe_code)]
    pub(crate) unsafe fn run<R: Copy>(&mut self, f: impl FnOnce() -> R) -> Option<R> {
        struct Restore(*const Arena);
        impl Drop for Restore {
            fn drop(&mut self) {
                ACTIVE.with(|a| a.set(self.0));
            }
        }
        let r = {
            let _restore = Restore(ACTIVE.with(|a| a.replace(self as *const Arena)));
            f()
        };
        let dirty = self.high.replace(0);
        self.top.set(0);
        // Leaked spills (nothing should leak; a leak must not keep plaintext).
        for s in &self.spills {
            let (p, len) = s.replace((0, 0));
            if p != 0 {
                unmap_wiped(p, len);
            }
        }
        self.buf.zero(0, dirty.min(self.buf.capacity()));
        let unlocked = self.unlocked.replace(false);
        (!unlocked || self.policy == MemoryPolicy::AllowUnlocked).then_some(r)
    }

    fn owns(&self, p: usize) -> bool {
        p >= self.base && p < self.base + self.buf.capacity()
    }

    fn alloc(&self, l: Layout) -> *mut u8 {
        let start = (self.base + self.top.get()).next_multiple_of(l.align());
        let end = start.saturating_add(l.size());
        if end <= self.base + self.buf.capacity() {
            self.top.set(end - self.base);
            self.high.set(self.high.get().max(end - self.base));
            return start as *mut u8;
        }
        self.spill(l)
    }

    /// A mapping of its own for an allocation the arena cannot hold.
    fn spill(&self, l: Layout) -> *mut u8 {
        let Some(slot) = self.spills.iter().find(|s| s.get().0 == 0) else {
            return null_mut();
        };
        let page = page_size();
        if l.align() > page {
            return null_mut();
        }
        let len = l.size().max(1).div_ceil(page) * page;
        #[allow(unsafe_code)]
        // SAFETY: a private anonymous mapping with no address hint; checked below.
        let raw = unsafe {
            libc::mmap(
                null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return null_mut();
        }
        #[allow(unsafe_code)]
        // SAFETY: [raw, raw+len) is the mapping just made, owned by this spill slot.
        unsafe {
            libc::madvise(raw, len, libc::MADV_DONTDUMP);
            libc::madvise(raw, len, libc::MADV_WIPEONFORK);
            if libc::mlock(raw, len) != 0 {
                self.unlocked.set(true);
            }
        }
        slot.set((raw as usize, len));
        raw.cast()
    }

    /// Frees `p` if it is this arena's (bump memory is reclaimed when the run ends;
    /// a spill is wiped and unmapped now). False if `p` is not the arena's.
    fn dealloc(&self, p: usize) -> bool {
        if self.owns(p) {
            return true;
        }
        match self.spills.iter().find(|s| s.get().0 == p) {
            Some(s) => {
                let (p, len) = s.replace((0, 0));
                unmap_wiped(p, len);
                true
            }
            None => false,
        }
    }

    /// Whether `p` was allocated from this arena (bump region or spill).
    fn made(&self, p: usize) -> bool {
        self.owns(p) || self.spills.iter().any(|s| s.get().0 == p)
    }
}

fn unmap_wiped(p: usize, len: usize) {
    #[allow(unsafe_code)]
    // SAFETY: (p, len) is a live spill mapping, removed from its slot by the caller, so
    // nothing else frees it; zeroing then unmapping it is the end of its life.
    unsafe {
        libc::explicit_bzero(p as *mut libc::c_void, len);
        libc::munmap(p as *mut libc::c_void, len);
    }
}

/// The arena that new allocations on this thread come from: none outside a run, and
/// none while the thread is panicking, so that whatever the panic machinery keeps (a
/// hook's lazily built backtrace cache) is the system's, not memory the run wipes.
fn serving() -> Option<&'static Arena> {
    if std::thread::panicking() {
        return None;
    }
    active()
}

/// The arena of this thread's current run, which frees and reallocations of its
/// pointers must go back to (panicking or not).
fn active() -> Option<&'static Arena> {
    let p = ACTIVE.try_with(Cell::get).unwrap_or(null());
    #[allow(unsafe_code)]
    // SAFETY: a non-null ACTIVE points at the Arena whose `run` (holding `&mut` to it)
    // is on this thread's stack; it is reset before `run` returns.
    unsafe {
        p.as_ref()
    }
}

// SAFETY: every pointer handed out is either from `System` with the caller's layout,
// or from the active arena, aligned to the layout and not overlapping any live
// allocation (bump pointer, or a fresh mapping). Frees are routed back to whichever
// made the pointer: arena range and spill slots are checked before `System`.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for ScratchAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        mark_installed();
        match serving() {
            Some(a) => a.alloc(l),
            // SAFETY: forwarded with the caller's layout.
            None => unsafe { System.alloc(l) },
        }
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        mark_installed();
        match serving() {
            Some(a) => {
                let p = a.alloc(l);
                if !p.is_null() {
                    // SAFETY: p is a fresh allocation of l.size() bytes.
                    unsafe { std::ptr::write_bytes(p, 0, l.size()) };
                }
                p
            }
            // SAFETY: forwarded with the caller's layout.
            None => unsafe { System.alloc_zeroed(l) },
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if let Some(a) = active() {
            if a.dealloc(p as usize) {
                return;
            }
        }
        // SAFETY: not the arena's, so it came from System with this layout.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let a = active();
        let ours = a.is_some_and(|a| a.made(p as usize));
        let Some(to) = serving() else {
            if !ours {
                // SAFETY: not the arena's, so p came from System with layout l.
                return unsafe { System.realloc(p, l, new_size) };
            }
            // Panicking: an arena allocation grows into System memory.
            let Ok(nl) = Layout::from_size_align(new_size, l.align()) else { return null_mut() };
            // SAFETY: a valid layout, forwarded.
            let n = unsafe { System.alloc(nl) };
            if !n.is_null() {
                // SAFETY: both regions are live and distinct; the copy is the smaller size.
                unsafe { std::ptr::copy_nonoverlapping(p, n, l.size().min(new_size)) };
                if let Some(a) = a {
                    a.dealloc(p as usize);
                }
            }
            return n;
        };
        let Ok(nl) = Layout::from_size_align(new_size, l.align()) else { return null_mut() };
        let n = to.alloc(nl);
        if n.is_null() {
            return n;
        }
        // SAFETY: both regions are live and distinct; the copy is the smaller size.
        unsafe { std::ptr::copy_nonoverlapping(p, n, l.size().min(new_size)) };
        if ours {
            to.dealloc(p as usize);
        } else {
            // A System allocation made before the run, grown inside it: wipe the old
            // bytes (they may be plaintext now) before System takes it back.
            // SAFETY: p is live with l.size() bytes, from System with layout l.
            unsafe {
                libc::explicit_bzero(p.cast(), l.size());
                System.dealloc(p, l);
            }
        }
        n
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Whether `p` lies in the arena this thread is running in.
    fn a_owns_ptr(p: usize) -> bool {
        active().is_some_and(|a| a.owns(p))
    }

    #[test]
    fn allocations_inside_a_run_live_in_the_locked_arena_and_are_wiped_after_it() {
        // lib.rs installs ScratchAlloc for the unit tests.
        assert!(installed());
        let mut a = Arena::new(1 << 16, MemoryPolicy::AllowUnlocked).unwrap();
        let (base, cap) = (a.base, a.capacity());
        let mut before = vec![0x11u8; 64];
        #[allow(unsafe_code)]
        // SAFETY: everything allocated inside is dropped inside; `before` grows inside
        // (a System allocation moved into the arena) and is read back before the run ends.
        let (small, grown, spill) = unsafe {
            a.run(|| {
                let mut v = vec![0xABu8; 1000];
                v.extend_from_slice(&[0xCD; 3000]);
                let big = vec![0xEFu8; 1 << 17];
                let r = (v.as_ptr() as usize, 0usize, big.as_ptr() as usize);
                assert!(v[..1000].iter().all(|&b| b == 0xAB) && v[1000..].iter().all(|&b| b == 0xCD));
                assert!(big.iter().all(|&b| b == 0xEF));
                before.extend_from_slice(&[0x22; 4096]);
                let grown = before.as_ptr() as usize;
                assert!(before[..64].iter().all(|&b| b == 0x11));
                drop(std::mem::take(&mut before));
                (r.0, grown, r.2)
            })
        }
        .unwrap();
        for p in [small, grown] {
            assert!(p >= base && p < base + cap, "{p:#x} is not in the arena [{base:#x}, +{cap})");
        }
        assert!(spill < base || spill >= base + cap, "a 128 KiB allocation cannot fit a 64 KiB arena");
        assert!(a.buf.as_slice().iter().all(|&b| b == 0), "the arena is wiped when the run ends");
        assert!(a.spills.iter().all(|s| s.get().0 == 0), "the spill was unmapped when freed");
        // A panic caught inside a run: what the panic machinery allocates is the
        // system's (it may keep some, such as a backtrace cache), the run still wipes.
        #[allow(unsafe_code)]
        // SAFETY: the payload and everything else is dropped inside; the panic is caught.
        let caught = unsafe {
            a.run(|| {
                let v = vec![0x5Au8; 100];
                let r = std::panic::catch_unwind(|| -> usize {
                    let inner = std::hint::black_box(Box::new([1u8; 10]));
                    if inner.len() == 10 {
                        panic!("decoder bug");
                    }
                    inner.len()
                });
                let was_arena = a_owns_ptr(v.as_ptr() as usize);
                drop(v);
                (r.is_err(), was_arena)
            })
        }
        .unwrap();
        assert_eq!(caught, (true, true));
        assert!(a.buf.as_slice().iter().all(|&b| b == 0));
        let outside = Box::new([1u8; 10]);
        assert!(!a.made(outside.as_ptr() as usize), "outside a run allocations are the system's");
    }
}
