//! Locked scratch for code that allocates through Rust's global allocator while it
//! holds plaintext: the image decoders, whose row buffers and coefficient planes are
//! `Vec`s of their own.
//!
//! [`ScratchAlloc`] is a global allocator that forwards to the system allocator,
//! except on a thread inside [`Arena::run`]: there every allocation is carved from the
//! arena's page-locked, never-dumped mapping (bump allocation), or, when that is full,
//! from overflow chunks (locked mappings, each at least twice the last). When the run
//! ends the arena's used bytes are zeroed and the chunks wiped and unmapped. So a decoder's buffers are locked
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

/// Most overflow chunks one run may map. They grow geometrically (each at least twice
/// the last), so this bounds nothing a real decoder reaches.
const CHUNKS: usize = 48;

/// One thread's locked scratch: a bump region reused across runs, and the overflow
/// chunks (bump regions too, locked mappings of their own) of one run.
pub(crate) struct Arena {
    buf: LockedBuf,
    base: usize,
    top: Cell<usize>,
    high: Cell<usize>,
    /// Overflow chunks of this run: (start, length, bump offset); length 0 = unused.
    chunks: [Cell<(usize, usize, usize)>; CHUNKS],
    /// Memory this run used could not be locked (a chunk's mlock failed, or a chunk
    /// could not be mapped and the system allocator served instead).
    unlocked: Cell<bool>,
    policy: MemoryPolicy,
}

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
            chunks: [const { Cell::new((0, 0, 0)) }; CHUNKS],
            unlocked: Cell::new(false),
            policy,
        })
    }

    /// Capacity of the bump region.
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Runs `f` with this thread's allocations served from the arena, then zeroes
    /// what they used and unmaps the overflow chunks (also if `f` unwinds). Returns
    /// `None` when memory of the run could not be locked and the policy requires
    /// locked memory (the run's data is wiped all the same), and when called inside
    /// another run or while the thread panics (nothing is run then).
    ///
    /// # Safety
    /// Nothing allocated inside `f` may outlive it: `f` must drop everything it
    /// allocates before it returns (`R` is `Copy` and must not point into the arena),
    /// and must not unwind (catch panics inside it).
    #[allow(unsafe_code)]
    pub(crate) unsafe fn run<R: Copy>(&mut self, f: impl FnOnce() -> R) -> Option<R> {
        /// Ends the run however `f` ends: the thread stops allocating from the arena,
        /// then the arena is wiped.
        struct Finish<'a>(&'a Arena);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                ACTIVE.with(|a| a.set(null()));
                self.0.finish();
            }
        }
        if std::thread::panicking() || !ACTIVE.with(Cell::get).is_null() {
            return None;
        }
        // Only `Cell` fields are written, and plain fields read, through this shared
        // reference and the pointer in ACTIVE; `&mut self` keeps runs from nesting.
        let shared: &Arena = self;
        let r = {
            let _finish = Finish(shared);
            ACTIVE.with(|a| a.set(std::ptr::from_ref(shared)));
            f()
        };
        let unlocked = self.unlocked.replace(false);
        (!unlocked || self.policy == MemoryPolicy::AllowUnlocked).then_some(r)
    }

    /// Zeroes what the run used and unmaps its chunks.
    fn finish(&self) {
        let dirty = self.high.replace(0).min(self.buf.capacity());
        self.top.set(0);
        for c in &self.chunks {
            let (p, len, _) = c.replace((0, 0, 0));
            if len != 0 {
                unmap_wiped(p, len);
            }
        }
        if dirty > 0 {
            #[allow(unsafe_code)]
            // SAFETY: [base, base + dirty) lies in the mapping `buf` owns; no allocation
            // of the run is alive any more (the run's contract), so nothing else uses it.
            unsafe {
                libc::explicit_bzero(self.base as *mut libc::c_void, dirty);
            }
        }
    }

    fn owns(&self, p: usize) -> bool {
        (p >= self.base && p < self.base + self.buf.capacity())
            || self.chunks.iter().any(|c| {
                let (s, len, _) = c.get();
                len != 0 && p >= s && p < s + len
            })
    }

    /// Bump allocation of `l` in the region `[start, start + cap)` at offset `top`: the
    /// new offset and the pointer, if it fits.
    fn bump(start: usize, cap: usize, top: usize, l: Layout) -> Option<(usize, usize)> {
        let at = start.checked_add(top)?.checked_next_multiple_of(l.align())?;
        let end = at.checked_add(l.size().max(1))?;
        (end <= start + cap).then_some((end - start, at))
    }

    fn alloc(&self, l: Layout) -> *mut u8 {
        if let Some((top, at)) = Self::bump(self.base, self.buf.capacity(), self.top.get(), l) {
            self.top.set(top);
            self.high.set(self.high.get().max(top));
            return at as *mut u8;
        }
        // The newest chunk, then a new one at least twice its size.
        let mut last = 0usize;
        for c in &self.chunks {
            let (s, len, top) = c.get();
            if len == 0 {
                let want = l.size().max(1).saturating_add(l.align());
                let len = want.max(last.saturating_mul(2)).max(self.buf.capacity().saturating_mul(2)).max(1 << 20);
                let Some((start, len)) = self.map_chunk(len) else { return self.fallback(l) };
                c.set((start, len, 0));
                let Some((top, at)) = Self::bump(start, len, 0, l) else { return self.fallback(l) };
                c.set((start, len, top));
                return at as *mut u8;
            }
            last = len;
            if let Some((top, at)) = Self::bump(s, len, top, l) {
                c.set((s, len, top));
                return at as *mut u8;
            }
        }
        self.fallback(l)
    }

    /// Grows the allocation at `p` in place when it is the last one of its region and
    /// the region has room.
    fn grow_in_place(&self, p: usize, old: usize, new: usize) -> bool {
        if p + old == self.base + self.top.get() && p + new <= self.base + self.buf.capacity() {
            self.top.set(p + new - self.base);
            self.high.set(self.high.get().max(self.top.get()));
            return true;
        }
        for c in &self.chunks {
            let (s, len, top) = c.get();
            if len != 0 && p + old == s + top && p + new <= s + len {
                c.set((s, len, p + new - s));
                return true;
            }
        }
        false
    }

    /// A locked, never-dumped mapping of at least `len` bytes for a chunk: (start, length).
    fn map_chunk(&self, len: usize) -> Option<(usize, usize)> {
        let len = len.div_ceil(page_size()).checked_mul(page_size())?;
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
            return None;
        }
        #[allow(unsafe_code)]
        // SAFETY: [raw, raw+len) is the mapping just made, owned by the chunk slot.
        unsafe {
            libc::madvise(raw, len, libc::MADV_DONTDUMP);
            libc::madvise(raw, len, libc::MADV_WIPEONFORK);
            if libc::mlock(raw, len) != 0 {
                self.unlocked.set(true);
            }
        }
        Some((raw as usize, len))
    }

    /// The system allocator, when no chunk could be had: never a null (which would
    /// abort the process); the run then fails closed as unlocked.
    fn fallback(&self, l: Layout) -> *mut u8 {
        self.unlocked.set(true);
        #[allow(unsafe_code)]
        // SAFETY: the caller's layout, forwarded; freed through System (not `owns`).
        unsafe {
            System.alloc(l)
        }
    }
}

fn unmap_wiped(p: usize, len: usize) {
    #[allow(unsafe_code)]
    // SAFETY: (p, len) is a chunk mapping removed from its slot by the caller, so
    // nothing else unmaps it, and no allocation in it is alive (the run is over).
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
/// pointers must go back to (panicking or not). The reference is used only within one
/// allocator call.
fn active() -> Option<&'static Arena> {
    let p = ACTIVE.try_with(Cell::get).unwrap_or(null());
    #[allow(unsafe_code)]
    // SAFETY: a non-null ACTIVE points at the Arena whose `run` is on this thread's
    // stack (it is reset before `run` returns or unwinds); through it only `Cell`s are
    // written.
    unsafe {
        p.as_ref()
    }
}

// SAFETY: every pointer handed out is either from `System` with the caller's layout,
// or from the active arena's bump regions, aligned to the layout and not overlapping
// any live allocation (the bump offset only grows within a run; in-place growth only
// extends the region's last allocation). Frees are routed to whichever made the
// pointer: the arena's regions are checked before `System`.
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
            if a.owns(p as usize) {
                // Reclaimed (and wiped) when the run ends.
                return;
            }
            // A System block freed during a run (made while panicking, or before the
            // run) may hold the run's plaintext: wipe it first.
            // SAFETY: p is live with l.size() bytes.
            unsafe { libc::explicit_bzero(p.cast(), l.size()) };
        }
        // SAFETY: not the arena's, so it came from System with this layout.
        unsafe { System.dealloc(p, l) }
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let Some(a) = active() else {
            // SAFETY: outside a run every live pointer is System's (runs free theirs).
            return unsafe { System.realloc(p, l, new_size) };
        };
        let Ok(nl) = Layout::from_size_align(new_size, l.align()) else { return null_mut() };
        let ours = a.owns(p as usize);
        if ours && new_size <= l.size() {
            return p;
        }
        if ours && a.grow_in_place(p as usize, l.size(), new_size) {
            return p;
        }
        // The arena's blocks stay in the arena (panicking or not); a System block made
        // before the run stays with System, its old bytes wiped.
        let n = if ours {
            a.alloc(nl)
        } else {
            // SAFETY: a valid layout, forwarded.
            unsafe { System.alloc(nl) }
        };
        if n.is_null() {
            return n;
        }
        // SAFETY: both regions are live and distinct; the copy is the smaller size.
        unsafe { std::ptr::copy_nonoverlapping(p, n, l.size().min(new_size)) };
        if !ours {
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
    fn in_arena(p: usize) -> bool {
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
        // SAFETY: everything allocated inside is dropped inside; `before` (a System
        // allocation) grows inside and must stay with System.
        let got = unsafe {
            a.run(|| {
                let mut v = vec![0xABu8; 1000];
                let first = v.as_ptr() as usize;
                v.extend_from_slice(&[0xCD; 3000]);
                let grown_in_place = v.as_ptr() as usize == first;
                let big = vec![0xEFu8; 1 << 17];
                assert!(v[..1000].iter().all(|&b| b == 0xAB) && v[1000..].iter().all(|&b| b == 0xCD));
                assert!(big.iter().all(|&b| b == 0xEF));
                // Many small allocations past the arena's size: chunks, never an abort.
                let many: Vec<Box<[u8; 100]>> = (0..5000).map(|_| Box::new([7u8; 100])).collect();
                let all_ours = many.iter().all(|b| in_arena(&**b as *const _ as usize));
                before.extend_from_slice(&[0x22; 4096]);
                let before_ours = in_arena(before.as_ptr() as usize);
                (v.as_ptr() as usize, grown_in_place, in_arena(big.as_ptr() as usize), all_ours, before_ours)
            })
        }
        .unwrap();
        let (small, grown_in_place, big_ours, all_ours, before_ours) = got;
        assert!(small >= base && small < base + cap, "{small:#x} is not in the bump region");
        assert!(grown_in_place, "the last allocation grows in place");
        assert!(big_ours && all_ours, "what does not fit the bump region goes to chunks of the arena");
        assert!(!before_ours, "a System allocation grown in a run stays with System");
        assert!(before[..64].iter().all(|&b| b == 0x11) && before[64..].iter().all(|&b| b == 0x22));
        assert!(a.buf.as_slice().iter().all(|&b| b == 0), "the bump region is wiped when the run ends");
        assert!(a.chunks.iter().all(|c| c.get().1 == 0), "the chunks are unmapped when the run ends");

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
                let was_arena = in_arena(v.as_ptr() as usize);
                drop(v);
                (r.is_err(), was_arena)
            })
        }
        .unwrap();
        assert_eq!(caught, (true, true));
        assert!(a.buf.as_slice().iter().all(|&b| b == 0));
        let outside = Box::new([1u8; 10]);
        assert!(!a.owns(&*outside as *const _ as usize), "outside a run allocations are the system's");
    }

    #[test]
    fn runs_do_not_nest() {
        let mut a = Arena::new(1 << 16, MemoryPolicy::AllowUnlocked).unwrap();
        let mut b = Arena::new(1 << 16, MemoryPolicy::AllowUnlocked).unwrap();
        #[allow(unsafe_code)]
        // SAFETY: nothing allocated inside either closure outlives it.
        let inner = unsafe { a.run(|| b.run(|| 1u8).is_none()) };
        assert_eq!(inner, Some(true));
    }
}
