//! The plugin's memory allocator: free lists of small blocks in front of the system allocator
//! (wasi-libc's dlmalloc).
//!
//! A rule's allocations are mostly small and short-lived: the message's topic and payload,
//! handed over by the gateway, the `Vec` of outputs and their payloads, freed when the call
//! returns. dlmalloc serves each of them with bin searches, splitting and coalescing; here a
//! freed block of up to 4 KiB goes on the free list of its size class (powers of two from 16
//! bytes) and the next allocation of that class takes it back in a few instructions. The lists
//! keep at most [`CACHE_BYTES`] per class; beyond that, and for larger blocks, the system
//! allocator is used as before. A rule that keeps large state pays nothing extra for it.
//!
//! `wasm32-wasip2` has no threads, so the lists need no lock.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// Size classes: 16, 32, …, 4096 bytes.
const CLASSES: usize = 9;
/// The smallest class's size, log2.
const MIN_SHIFT: u32 = 4;
/// At most this many bytes of free blocks are kept per class (2.25 MiB in all).
pub const CACHE_BYTES: usize = 256 * 1024;

/// Free lists per size class; see the module documentation.
pub struct Pools {
    state: UnsafeCell<State>,
}

struct State {
    /// Head of each class's free list; a free block's first word points to the next.
    heads: [*mut u8; CLASSES],
    /// Blocks on each list.
    cached: [usize; CLASSES],
}

// SAFETY: only used on targets without threads (the global allocator is installed for
// `wasm32` only); natively, the tests use a `Pools` from one thread.
unsafe impl Sync for Pools {}

impl Pools {
    pub const fn new() -> Self {
        Self {
            state: UnsafeCell::new(State {
                heads: [ptr::null_mut(); CLASSES],
                cached: [0; CLASSES],
            }),
        }
    }
}

impl Default for Pools {
    fn default() -> Self {
        Self::new()
    }
}

/// The size class of `layout`, or `None` for blocks the system allocator serves directly.
#[inline]
fn class(layout: Layout) -> Option<usize> {
    if layout.align() > 1 << MIN_SHIFT {
        return None;
    }
    let size = layout.size().max(1 << MIN_SHIFT);
    let class = (usize::BITS - (size - 1).leading_zeros() - MIN_SHIFT) as usize;
    (class < CLASSES).then_some(class)
}

/// The layout a class's blocks are allocated with from the system allocator.
#[inline]
fn block(class: usize) -> Layout {
    // SAFETY: a power of two between 16 and 4096, aligned to 16.
    unsafe { Layout::from_size_align_unchecked(1 << (class as u32 + MIN_SHIFT), 1 << MIN_SHIFT) }
}

unsafe impl GlobalAlloc for Pools {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(class) = class(layout) else {
            // SAFETY: the caller's contract, passed on.
            return unsafe { System.alloc(layout) };
        };
        // SAFETY: no threads (see `Sync`); a list holds blocks of this class only, each
        // with the next block's address in its first word.
        unsafe {
            let state = &mut *self.state.get();
            let head = state.heads[class];
            if head.is_null() {
                return System.alloc(block(class));
            }
            state.heads[class] = head.cast::<*mut u8>().read();
            state.cached[class] -= 1;
            head
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some(class) = class(layout) else {
            // SAFETY: allocated by `System` with this layout (see `alloc`).
            return unsafe { System.dealloc(ptr, layout) };
        };
        // SAFETY: as in `alloc`; `ptr` is a block of `class`, at least 16 bytes, aligned.
        unsafe {
            let state = &mut *self.state.get();
            if state.cached[class] >= CACHE_BYTES >> (class as u32 + MIN_SHIFT) {
                return System.dealloc(ptr, block(class));
            }
            ptr.cast::<*mut u8>().write(state.heads[class]);
            state.heads[class] = ptr;
            state.cached[class] += 1;
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract: `new_size` with `layout.align()` is a valid layout.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (class(layout), class(new)) {
            // The block already has room.
            (Some(old), Some(new)) if old == new => ptr,
            // SAFETY: both from `System` with these layouts.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            _ => unsafe {
                let moved = self.alloc(new);
                if !moved.is_null() {
                    ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                moved
            },
        }
    }
}

#[cfg(target_family = "wasm")]
#[global_allocator]
static POOLS: Pools = Pools::new();

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn sizes_map_to_power_of_two_classes() {
        assert_eq!(class(layout(0, 1)), Some(0));
        assert_eq!(class(layout(1, 1)), Some(0));
        assert_eq!(class(layout(16, 8)), Some(0));
        assert_eq!(class(layout(17, 1)), Some(1));
        assert_eq!(class(layout(100, 1)), Some(3));
        assert_eq!(class(layout(4096, 4)), Some(8));
        assert_eq!(class(layout(4097, 1)), None);
        assert_eq!(class(layout(8, 32)), None);
    }

    #[test]
    fn a_freed_block_is_reused_by_its_class_only() {
        let pools = Pools::new();
        unsafe {
            let a = pools.alloc(layout(100, 1));
            a.write_bytes(0xAA, 100);
            pools.dealloc(a, layout(100, 1));
            // Another class does not get it.
            let b = pools.alloc(layout(20, 4));
            assert_ne!(a, b);
            // The same class does, whatever the exact size.
            let c = pools.alloc(layout(65, 8));
            assert_eq!(a, c);
            assert_eq!(c as usize % 16, 0);
            pools.dealloc(b, layout(20, 4));
            pools.dealloc(c, layout(65, 8));
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_and_the_block_while_the_class_fits() {
        let pools = Pools::new();
        unsafe {
            let a = pools.alloc(layout(40, 1));
            for i in 0..40 {
                a.add(i).write(i as u8);
            }
            // 40 → 60: still class 64.
            let b = pools.realloc(a, layout(40, 1), 60);
            assert_eq!(a, b);
            // 60 → 5000: to the system allocator, bytes kept.
            let c = pools.realloc(b, layout(60, 1), 5000);
            for i in 0..40 {
                assert_eq!(c.add(i).read(), i as u8);
            }
            // And back down into a class.
            let d = pools.realloc(c, layout(5000, 1), 30);
            for i in 0..30 {
                assert_eq!(d.add(i).read(), i as u8);
            }
            pools.dealloc(d, layout(30, 1));
        }
    }

    #[test]
    fn free_lists_are_bounded() {
        let pools = Pools::new();
        let l = layout(4096, 1);
        let max = CACHE_BYTES / 4096;
        let blocks: Vec<_> = (0..max + 10).map(|_| unsafe { pools.alloc(l) }).collect();
        for &b in &blocks {
            unsafe { pools.dealloc(b, l) };
        }
        let state = unsafe { &*pools.state.get() };
        assert_eq!(state.cached[8], max, "the rest went back to the system allocator");
        // Drain what is cached, so the test leaks nothing.
        for _ in 0..max {
            let b = unsafe { pools.alloc(l) };
            unsafe { System.dealloc(b, block(8)) };
        }
    }
}
