//! Page-locked batch buffers.
//!
//! Plaintext lives only in buffers that are `mlock`ed (never swapped), marked
//! `MADV_DONTDUMP` (never in a core dump), and zeroized whenever they return to the
//! pool and when they are freed. If the memory-lock limit stops locking, allocation
//! fails closed with an error naming the limit, unless the caller explicitly accepted
//! unlocked memory ([`MemoryPolicy::AllowUnlocked`]), which the loader audits.

use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// What to do when memory cannot be locked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryPolicy {
    /// Fail with [`Error::MemoryLock`] (the default).
    #[default]
    RequireLocked,
    /// Continue with unlocked (but still never-dumped, zeroized) memory.
    AllowUnlocked,
}

pub(super) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    #[allow(unsafe_code)]
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// An anonymous, page-aligned mapping that is locked (when possible), excluded from
/// core dumps, and zeroized on drop.
pub struct LockedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    locked: bool,
    /// Bytes from the start that may hold data (everything past it is zero).
    dirty: usize,
}

// SAFETY: LockedBuf owns its mapping exclusively (like a Box<[u8]>); the raw pointer
// is never shared outside borrows tied to &self / &mut self.
#[allow(unsafe_code)]
unsafe impl Send for LockedBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is Sync for u8.
#[allow(unsafe_code)]
unsafe impl Sync for LockedBuf {}

impl LockedBuf {
    /// Maps `len` bytes (rounded up to whole pages), zero-filled.
    pub fn new(len: usize, policy: MemoryPolicy) -> Result<Self> {
        let page = page_size();
        let cap = len.max(1).div_ceil(page) * page;
        #[allow(unsafe_code)]
        // SAFETY: a private anonymous mapping with no address hint has no
        // preconditions; the result is checked against MAP_FAILED before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::os("map locked memory")(std::io::Error::last_os_error()));
        }
        let ptr =
            NonNull::new(raw.cast::<u8>()).ok_or_else(|| Error::Internal("mmap returned a null mapping".into()))?;
        let mut buf = Self { ptr, cap, locked: false, dirty: 0 };
        #[allow(unsafe_code)]
        // SAFETY: [ptr, ptr+cap) is the mapping just created and owned by `buf`.
        unsafe {
            // Best effort: a kernel without MADV_DONTDUMP still gets a locked buffer.
            libc::madvise(raw, cap, libc::MADV_DONTDUMP);
            // A forked child gets zero pages here, not a copy of the plaintext (and the
            // parent's pages, which the GPU may DMA from, are never made copy-on-write).
            // Best effort: kernels before 4.14 lack it.
            libc::madvise(raw, cap, libc::MADV_WIPEONFORK);
            if libc::mlock(raw, cap) == 0 {
                buf.locked = true;
            }
        }
        if !buf.locked && policy == MemoryPolicy::RequireLocked {
            let err = std::io::Error::last_os_error();
            let (soft, _) = memlock_limit();
            return Err(Error::MemoryLock { bytes: cap as u64, limit: soft, detail: err.to_string() });
        }
        Ok(buf)
    }

    /// The buffer in `slot`, at least `len` bytes: a missing or smaller one is replaced
    /// (the old one wiped) by one of at least twice the old capacity.
    pub fn ensure(slot: &mut Option<LockedBuf>, len: usize, policy: MemoryPolicy) -> Result<&mut LockedBuf> {
        if slot.as_ref().is_none_or(|b| b.capacity() < len) {
            let cap = len.max(slot.as_ref().map_or(0, |b| b.capacity().saturating_mul(2)));
            *slot = None;
            *slot = Some(LockedBuf::new(cap, policy)?);
        }
        slot.as_mut().ok_or_else(|| Error::Internal("no buffer".into()))
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Whether the pages are locked in RAM.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid, initialised (zero-filled by the kernel, then
        // written only through &mut self) and lives as long as `self`.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr.as_ptr(), self.cap)
        }
    }

    /// Zeroes the bytes that may hold data, at memset speed (`explicit_bzero`, which
    /// the compiler may not elide), and marks the buffer clean.
    pub fn wipe(&mut self) {
        let n = self.dirty.min(self.cap);
        if n > 0 {
            #[allow(unsafe_code)]
            // SAFETY: [ptr, ptr+n) lies inside the mapping owned by `self`, which
            // `&mut self` borrows exclusively.
            unsafe {
                libc::explicit_bzero(self.ptr.as_ptr().cast(), n);
            }
        }
        self.dirty = 0;
    }

    /// Zeroes every byte that may hold data except those in `written` (ranges of the
    /// buffer, any order, may overlap), so that the buffer holds exactly what was
    /// written there and zeros: what a batch filling a reused buffer calls once it has
    /// written all of its data.
    pub fn keep_only(&mut self, written: &mut [(usize, usize)]) {
        written.sort_unstable();
        let end = self.dirty.min(self.cap);
        let mut cursor = 0usize;
        let mut high = 0usize;
        for &(a, z) in written.iter() {
            let (a, z) = (a.min(self.cap), z.min(self.cap));
            if a > cursor && cursor < end {
                self.zero(cursor, a.min(end));
            }
            cursor = cursor.max(z);
            high = high.max(z);
        }
        if cursor < end {
            self.zero(cursor, end);
        }
        self.dirty = high;
    }

    pub(super) fn zero(&mut self, a: usize, z: usize) {
        if z > a {
            #[allow(unsafe_code)]
            // SAFETY: a < z <= cap: [ptr+a, ptr+z) lies inside the mapping owned by
            // `self`, which `&mut self` borrows exclusively.
            unsafe {
                libc::explicit_bzero(self.ptr.as_ptr().add(a).cast(), z - a);
            }
        }
    }

    /// The first `len` bytes, mutably; they are wiped when the buffer is returned.
    pub fn prefix_mut(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.cap);
        self.dirty = self.dirty.max(len);
        &mut self.as_mut_slice()[..len]
    }

    /// The start of the mapping, for an owner that hands out parts of it itself (the
    /// key arena); all of it is wiped on drop.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.dirty = self.cap;
        self.ptr.as_ptr()
    }

    /// The whole buffer, mutably (all of it is wiped on return).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.dirty = self.cap;
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.cap)
        }
    }
}

impl Drop for LockedBuf {
    fn drop(&mut self) {
        self.wipe();
        #[allow(unsafe_code)]
        // SAFETY: unmapping exactly the mapping created in `new`, once; no borrow of
        // it can outlive `self`.
        unsafe {
            if self.locked {
                libc::munlock(self.ptr.as_ptr().cast(), self.cap);
            }
            libc::munmap(self.ptr.as_ptr().cast(), self.cap);
        }
    }
}

/// The soft and hard RLIMIT_MEMLOCK in bytes (`u64::MAX` for unlimited).
pub fn memlock_limit() -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass; no other preconditions.
    #[allow(unsafe_code)]
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } == 0;
    if !ok {
        return (0, 0);
    }
    let conv = |v: libc::rlim_t| if v == libc::RLIM_INFINITY { u64::MAX } else { v };
    (conv(r.rlim_cur), conv(r.rlim_max))
}

/// A pool of reusable locked buffers. In steady state no allocation happens per batch.
///
/// A returned buffer goes back on the free list as it is, not wiped: the next batch
/// that takes it overwrites its own data and zeroes every other byte that may hold the
/// old one ([`LockedBuf::keep_only`]) before it is yielded, so a batch's buffer holds
/// that batch and zeros. Until then the old plaintext stays where it was: in the
/// pool's locked, never-dumped, wipe-on-fork pages. [`BatchPool::wipe_idle`] (the
/// loader's drop) wipes the free list, and a buffer freed with the pool is wiped by
/// [`LockedBuf`]'s drop. (Wiping every returned buffer cost 14% of the loader's time
/// on 8 KiB samples; a full overwrite makes it redundant.)
#[derive(Clone)]
pub struct BatchPool {
    inner: Arc<PoolInner>,
}

/// Work for the janitor thread.
enum Chore {
    /// Something whose drop is slow (a shard mapping: munmap and TLB shootdowns).
    Drop(Box<dyn Send>),
}

struct PoolInner {
    free: Mutex<Vec<LockedBuf>>,
    policy: MemoryPolicy,
    allocated: std::sync::atomic::AtomicUsize,
    chores: crossbeam_channel::Sender<Chore>,
    /// The janitor's end of `chores`.
    dirty: crossbeam_channel::Receiver<Chore>,
    /// Process that created the pool (its janitor does not exist after a fork).
    pid: u32,
    janitor: std::sync::Once,
    /// The janitor thread runs; when it could not start or has died, chores are done
    /// on the caller's thread.
    janitor_alive: Arc<std::sync::atomic::AtomicBool>,
}

impl BatchPool {
    /// An empty pool.
    pub fn new(policy: MemoryPolicy) -> Self {
        let (chores, dirty) = crossbeam_channel::unbounded();
        Self {
            inner: Arc::new(PoolInner {
                free: Mutex::new(Vec::new()),
                policy,
                allocated: Default::default(),
                chores,
                dirty,
                pid: std::process::id(),
                janitor: std::sync::Once::new(),
                janitor_alive: Arc::default(),
            }),
        }
    }

    fn start_janitor(&self) {
        self.inner.janitor.call_once(|| {
            let weak = Arc::downgrade(&self.inner);
            let rx = self.inner.dirty.clone();
            let alive = self.inner.janitor_alive.clone();
            alive.store(true, Ordering::Release);
            /// Marks the janitor gone however its thread ends (panic included).
            struct Gone(Arc<std::sync::atomic::AtomicBool>);
            impl Drop for Gone {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let gone = Gone(alive.clone());
            let spawned = std::thread::Builder::new().name("shardlock-wipe".into()).spawn(move || {
                let _gone = gone;
                // Ends when the pool (which holds the sender) is gone.
                while let Ok(chore) = rx.recv() {
                    let Some(pool) = weak.upgrade() else { break };
                    Self::done(&pool, chore);
                }
            });
            if spawned.is_err() {
                alive.store(false, Ordering::Release);
            }
        });
    }

    /// Performs a chore: drop a retired object.
    fn done(_pool: &PoolInner, chore: Chore) {
        match chore {
            Chore::Drop(obj) => drop(obj),
        }
    }

    fn send(&self, chore: Chore) {
        if std::process::id() != self.inner.pid {
            // A forked child has no janitor: do it here.
            return Self::done(&self.inner, chore);
        }
        self.start_janitor();
        if !self.inner.janitor_alive.load(Ordering::Acquire) {
            return Self::done(&self.inner, chore);
        }
        if let Err(crossbeam_channel::SendError(chore)) = self.inner.chores.send(chore) {
            Self::done(&self.inner, chore);
        }
    }

    /// A buffer of at least `len` bytes: a free one if one is large enough (it may
    /// hold an earlier batch: the caller keeps only what it writes, with
    /// [`LockedBuf::keep_only`]), else a new, zeroed one.
    pub fn take(&self, len: usize) -> Result<LockedBuf> {
        {
            let mut free = self.inner.free.lock().unwrap_or_else(|p| p.into_inner());
            // The smallest that fits, so a large buffer stays for a large batch.
            let best = free.iter().enumerate().filter(|(_, b)| b.capacity() >= len).min_by_key(|(_, b)| b.capacity());
            if let Some((i, _)) = best {
                return Ok(free.swap_remove(i));
            }
        }
        let b = LockedBuf::new(len, self.inner.policy)?;
        self.inner.allocated.fetch_add(1, Ordering::Relaxed);
        Ok(b)
    }

    /// Returns a buffer to the free list, unwiped: whoever takes it next keeps only
    /// what it writes ([`LockedBuf::keep_only`]).
    pub fn give(&self, buf: LockedBuf) {
        self.inner.free.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    }

    /// Wipes the buffers on the free list now (the loader's end: no stale plaintext
    /// outlives it in idle buffers).
    pub fn wipe_idle(&self) {
        let mut free = self.inner.free.lock().unwrap_or_else(|p| p.into_inner());
        for b in free.iter_mut() {
            b.wipe();
        }
    }

    /// Drops `obj` on the janitor thread (for drops that are slow, such as unmapping a
    /// shard, which should not stall the consumer).
    pub fn retire(&self, obj: Box<dyn Send>) {
        self.send(Chore::Drop(obj));
    }

    /// Buffers allocated so far (a steady-state pool stops growing).
    pub fn allocated(&self) -> usize {
        self.inner.allocated.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_buffer_keeps_only_what_its_new_batch_wrote() {
        let pool = BatchPool::new(MemoryPolicy::AllowUnlocked);
        let mut b = pool.take(10_000).unwrap();
        assert!(b.capacity() >= 10_000);
        b.prefix_mut(9_000).fill(0xaa);
        let ptr = b.as_slice().as_ptr();
        pool.give(b);
        let mut b = pool.take(100).unwrap();
        assert_eq!(b.as_slice().as_ptr(), ptr, "the freed buffer is reused");
        assert_eq!(pool.allocated(), 1);
        // A smaller batch writes two ranges with a gap: everything else is zeroed.
        b.prefix_mut(300)[..100].fill(1);
        b.prefix_mut(300)[200..300].fill(2);
        b.keep_only(&mut [(200, 300), (0, 100)]);
        let s = b.as_slice();
        assert!(s[..100].iter().all(|&x| x == 1) && s[200..300].iter().all(|&x| x == 2));
        assert!(s[100..200].iter().chain(&s[300..]).all(|&x| x == 0), "old bytes survived outside the new batch");
        pool.give(b);
        // The loader's end wipes idle buffers.
        pool.wipe_idle();
        let b = pool.take(10).unwrap();
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn a_forked_child_sees_zeros_not_the_plaintext() {
        let mut b = LockedBuf::new(8192, MemoryPolicy::AllowUnlocked).unwrap();
        b.as_mut_slice()[..6].copy_from_slice(b"secret");
        #[allow(unsafe_code)]
        // SAFETY: the child only reads memory and calls _exit (async-signal-safe); the
        // parent waits for it.
        let status = unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let zero = b.as_slice().iter().all(|&x| x == 0);
                libc::_exit(if zero { 0 } else { 1 });
            }
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            st
        };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 0, "the child saw the parent's plaintext");
        assert_eq!(&b.as_slice()[..6], b"secret", "the parent keeps its data");
    }

    #[test]
    fn locking_beyond_the_limit_fails_closed_or_succeeds_with_privilege() {
        // 64 MiB is above the usual 8 MiB soft limit: without CAP_IPC_LOCK this must
        // be a MemoryLock error naming the limit, never a silently unlocked buffer.
        match LockedBuf::new(64 << 20, MemoryPolicy::RequireLocked) {
            Ok(b) => assert!(b.is_locked()),
            Err(e) => {
                assert!(matches!(e, Error::MemoryLock { .. }));
                assert!(e.to_string().contains("RLIMIT_MEMLOCK"));
            }
        }
        let b = LockedBuf::new(64 << 20, MemoryPolicy::AllowUnlocked).unwrap();
        assert_eq!(b.capacity(), 64 << 20);
    }
}
