//! Key material in locked memory: a process-wide arena of 32-byte slots.
//!
//! DEKs, KEKs and the issuer's signing seed each live in one [`KeySlot`]: 32 bytes of a
//! page that is `mlock`ed (when the memory-lock limit allows) and `MADV_DONTDUMP`
//! (always), so key bytes are never swapped or written to a core dump. A slot is
//! zeroed (`explicit_bzero`) when its owner drops it, before it can be handed out
//! again. The arena grows a page at a time (128 slots of 4 KiB) and never shrinks: it
//! holds at most the peak number of keys alive at once, a page or two in practice.
//!
//! Locking is best effort here, unlike [`super::LockedBuf`] under
//! [`super::MemoryPolicy::RequireLocked`]: keys are made in places that cannot fail
//! today (a key parsed from a file, unwrapped by a provider), and one page hardly
//! moves the limit. The pages are not `MADV_WIPEONFORK`: a forked child keeps working
//! keys (unlike batch buffers, a key is needed again after a fork). The arena's lock is
//! held only to push or pop a slot, or to map a page; a child forked while another
//! thread held it would block when it makes or drops a key (fork-then-exec is
//! unaffected).

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::Mutex;

use super::pool::page_size;
use super::{LockedBuf, MemoryPolicy};

/// Bytes in a slot.
pub const SLOT_LEN: usize = 32;

/// Pages of slots and the slots not in use (addresses, all zero).
pub(crate) struct Arena {
    inner: Mutex<ArenaInner>,
}

struct ArenaInner {
    /// Never dropped while a slot into them lives: the process-wide arena is a static,
    /// a test's arena is leaked.
    pages: Vec<LockedBuf>,
    /// Free slots: (address, whether its page is locked). Every byte of a free slot is
    /// zero.
    free: Vec<(usize, bool)>,
}

static ARENA: Arena = Arena::new();

impl Arena {
    pub(crate) const fn new() -> Self {
        Self { inner: Mutex::new(ArenaInner { pages: Vec::new(), free: Vec::new() }) }
    }

    fn take(&'static self) -> KeySlot {
        let mut a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if a.free.is_empty() {
            // Failing to map one page is an allocation failure, handled as the heap
            // allocation this replaces would handle it.
            let page = page_size();
            let mut buf = LockedBuf::new(page, MemoryPolicy::AllowUnlocked)
                .unwrap_or_else(|_| std::alloc::handle_alloc_error(Layout::new::<[u8; SLOT_LEN]>()));
            let base = buf.as_mut_ptr() as usize;
            let locked = buf.is_locked();
            // Reversed, so that slots are handed out from the start of the page.
            a.free.extend((0..buf.capacity() / SLOT_LEN).rev().map(|i| (base + i * SLOT_LEN, locked)));
            a.pages.push(buf);
        }
        let (addr, locked) = a.free.pop().unwrap_or_else(|| unreachable!("a page was just added"));
        // `addr` is inside a mapping, so never null.
        let ptr = NonNull::new(addr as *mut [u8; SLOT_LEN]).unwrap_or_else(|| unreachable!("mapped address"));
        KeySlot { ptr, locked, arena: self }
    }

    fn give(&self, slot: &mut KeySlot) {
        #[allow(unsafe_code)]
        // SAFETY: the slot's 32 bytes lie in a live page of this arena and `&mut`
        // gives exclusive access to them.
        unsafe {
            libc::explicit_bzero(slot.ptr.as_ptr().cast(), SLOT_LEN);
        }
        let mut a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        a.free.push((slot.ptr.as_ptr() as usize, slot.locked));
    }

    /// The bytes of the free slot at `addr`, if it is free (tests: a freed slot is zero).
    #[cfg(test)]
    fn free_slot_bytes(&self, addr: usize) -> Option<[u8; SLOT_LEN]> {
        let a = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        a.free.iter().any(|&(f, _)| f == addr).then(|| {
            #[allow(unsafe_code)]
            // SAFETY: a free slot lies in a live page of this arena, and no KeySlot
            // refers to it while it is on the free list (held under the lock).
            unsafe {
                *(addr as *const [u8; SLOT_LEN])
            }
        })
    }
}

/// 32 bytes of key material in the locked arena, zero when made, zeroed when dropped.
/// Reads and writes go through `Deref` / `DerefMut` to `[u8; 32]`.
pub struct KeySlot {
    ptr: NonNull<[u8; SLOT_LEN]>,
    locked: bool,
    arena: &'static Arena,
}

// SAFETY: a KeySlot owns its 32 bytes exclusively (like a Box<[u8; 32]>); the pointer
// is only dereferenced through borrows of the KeySlot.
#[allow(unsafe_code)]
unsafe impl Send for KeySlot {}
// SAFETY: shared access only hands out `&[u8; 32]`.
#[allow(unsafe_code)]
unsafe impl Sync for KeySlot {}

impl KeySlot {
    /// A zeroed slot from the process-wide arena.
    pub fn new() -> Self {
        ARENA.take()
    }

    /// A zeroed slot from `arena` (tests use their own arena).
    #[cfg(test)]
    pub(crate) fn new_in(arena: &'static Arena) -> Self {
        arena.take()
    }

    /// Whether the slot's page is locked in RAM (it is never dumped either way).
    #[cfg(test)]
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Default for KeySlot {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for KeySlot {
    type Target = [u8; SLOT_LEN];
    fn deref(&self) -> &Self::Target {
        // SAFETY: the slot lies in a page of the arena that outlives it, is initialised
        // (zero-filled, then written only through &mut self) and is used by no one else.
        #[allow(unsafe_code)]
        unsafe {
            self.ptr.as_ref()
        }
    }
}

impl std::ops::DerefMut for KeySlot {
    fn deref_mut(&mut self) -> &mut Self::Target {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        #[allow(unsafe_code)]
        unsafe {
            self.ptr.as_mut()
        }
    }
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let arena = self.arena;
        arena.give(self);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Security review finding 5: key bytes live in locked, never-dumped pages.
    #[test]
    fn key_slots_are_locked_and_never_dumped() {
        let slot = KeySlot::new();
        let m = super::super::smaps_entry(slot.as_ptr() as usize).unwrap();
        assert!(m.dont_dump(), "key slot page is not MADV_DONTDUMP: {m:?}");
        super::super::assert_locked(&m, slot.is_locked());
    }

    #[test]
    fn a_freed_slot_is_zeroed_before_reuse() {
        let arena: &'static Arena = Box::leak(Box::new(Arena::new()));
        let mut a = KeySlot::new_in(arena);
        let mut b = KeySlot::new_in(arena);
        a.copy_from_slice(&[0xA5; SLOT_LEN]);
        b.copy_from_slice(&[0x5A; SLOT_LEN]);
        let addr = a.as_ptr() as usize;
        drop(a);
        assert_eq!(arena.free_slot_bytes(addr), Some([0u8; SLOT_LEN]), "a dropped slot is zeroed");
        let c = KeySlot::new_in(arena);
        assert_eq!(c.as_ptr() as usize, addr, "the freed slot is reused");
        assert_eq!(*c, [0u8; SLOT_LEN]);
        assert_eq!(*b, [0x5A; SLOT_LEN], "a neighbour keeps its bytes");
    }

    #[test]
    fn the_arena_grows_past_one_page() {
        let arena: &'static Arena = Box::leak(Box::new(Arena::new()));
        let per_page = page_size() / SLOT_LEN;
        let slots: Vec<KeySlot> = (0..per_page + 1).map(|_| KeySlot::new_in(arena)).collect();
        let mut addrs: Vec<usize> = slots.iter().map(|s| s.as_ptr() as usize).collect();
        addrs.sort_unstable();
        addrs.dedup();
        assert_eq!(addrs.len(), per_page + 1, "every slot is distinct");
        assert_eq!(arena.inner.lock().unwrap().pages.len(), 2);
    }
}
