//! The `.wasm`'s allocator: small blocks freed by one request are kept, by size class, for the
//! next, in front of the system allocator (wasi-libc's dlmalloc).
//!
//! Why: a request allocates a few dozen small blocks (header blocks, keys, records, effect
//! lists, and the bodies and stored answers of small writes), and Wasmtime compiles
//! dlmalloc's `malloc` and `free` without inlining: about 400 instructions a pair, a tenth of
//! rollsafe's own work on Kong's host. Taking a block off a list and putting it back is a few
//! instructions. What is kept is bounded: at most `KEEP` blocks a class to 512 bytes and
//! `KEEP_LARGE` of 1 and 2 KiB, the rest go back to the system allocator, so memory never
//! holds more than 128 × (16 + … + 512) + 32 × (1024 + 2048) bytes (222 KiB) beyond what
//! requests use at once. (`realloc` is the trait's own, a new block and a copy: dlmalloc's,
//! linked in for it, cost more bytes than it saved.)
#![allow(unsafe_code)]
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// Classes of 16, 32, …, 2048 bytes.
const CLASSES: usize = 8;
/// Blocks kept per class, to 512 bytes.
const KEEP: usize = 128;
/// Blocks kept per class of 1 and 2 KiB (a held body, a stored answer).
const KEEP_LARGE: usize = 32;

/// How many blocks class `c` keeps.
fn keeps(c: usize) -> usize {
    if c < 6 {
        KEEP
    } else {
        KEEP_LARGE
    }
}
/// The alignment the pool serves (std's `System` gives at least this from `malloc` on wasm32);
/// a block of it holds a pointer.
const ALIGN: usize = 8;

pub struct Pool {
    /// Per class: the first free block (each holds the next one's address) and how many.
    lists: UnsafeCell<[(*mut u8, usize); CLASSES]>,
}

// SAFETY: a proxy-wasm VM runs one thread (a build with wasm threads has no `Sync` here, and
// so no global allocator: it does not compile). Native builds share no instance: tests make
// their own.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
unsafe impl Sync for Pool {}

impl Pool {
    pub const fn new() -> Pool {
        Pool {
            lists: UnsafeCell::new([(ptr::null_mut(), 0); CLASSES]),
        }
    }

    /// The class and free list a layout is served from, if it is small.
    ///
    /// # Safety
    /// No other reference to the lists is alive (one thread, and none held across calls).
    #[allow(clippy::mut_from_ref)]
    unsafe fn list(&self, layout: Layout) -> Option<(usize, &mut (*mut u8, usize))> {
        let c = class(layout.size(), layout.align())?;
        (*self.lists.get()).get_mut(c).map(|list| (c, list))
    }
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

/// The class a layout is served from, if it is small.
fn class(size: usize, align: usize) -> Option<usize> {
    if size > 16 << (CLASSES - 1) || align > ALIGN {
        return None;
    }
    let bits = usize::BITS - (size.max(16) - 1).leading_zeros();
    Some(bits as usize - 4)
}

fn class_layout(c: usize) -> Layout {
    // SAFETY: a power of two of at most 2048 bytes, aligned to 8.
    unsafe { Layout::from_size_align_unchecked(16 << c, ALIGN) }
}

unsafe impl GlobalAlloc for Pool {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((c, list)) = self.list(layout) else {
            return System.alloc(layout);
        };
        if list.0.is_null() {
            return System.alloc(class_layout(c));
        }
        let block = list.0;
        list.0 = block.cast::<*mut u8>().read();
        list.1 -= 1;
        block
    }

    /// (A host fills a block it asked `proxy_on_memory_allocate` for, and the SDK frees it with
    /// the length the host reports: never more than the block, or the host would have written
    /// past it, so a block is never filed under a larger class than its own.)
    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        let Some((c, list)) = self.list(layout) else {
            return System.dealloc(block, layout);
        };
        if list.1 >= keeps(c) {
            return System.dealloc(block, class_layout(c));
        }
        block.cast::<*mut u8>().write(list.0);
        list.0 = block;
        list.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_sizes_up_to_2048() {
        assert_eq!(class(1, 1), Some(0));
        assert_eq!(class(16, 8), Some(0));
        assert_eq!(class(17, 1), Some(1));
        assert_eq!(class(32, 4), Some(1));
        assert_eq!(class(33, 8), Some(2));
        assert_eq!(class(512, 8), Some(5));
        assert_eq!(class(513, 1), Some(6));
        assert_eq!(class(2048, 8), Some(7));
        assert_eq!(class(2049, 1), None);
        assert_eq!(class(16, 16), None);
        for size in 1..=2048 {
            let c = class(size, 1).unwrap();
            assert!(
                size <= 16 << c && (c == 0 || size > 8 << c),
                "{size} in class {c}"
            );
        }
    }

    #[test]
    fn a_freed_block_serves_the_next_of_its_class_and_lists_stay_bounded() {
        let pool = Pool::new();
        unsafe {
            let l = Layout::from_size_align(40, 8).unwrap();
            let a = pool.alloc(l);
            a.write_bytes(7, 40);
            pool.dealloc(a, l);
            // Any size of the same class gets the same block back.
            let b = pool.alloc(Layout::from_size_align(64, 1).unwrap());
            assert_eq!(a, b);
            pool.dealloc(b, Layout::from_size_align(64, 1).unwrap());
            // Many blocks freed at once: no more than KEEP stay listed.
            let blocks: Vec<_> = (0..KEEP + 50).map(|_| pool.alloc(l)).collect();
            assert!(blocks.iter().all(|p| !p.is_null()));
            for p in &blocks {
                pool.dealloc(*p, l);
            }
            assert_eq!((*pool.lists.get()).get(2).map(|l| l.1), Some(KEEP));
            // The classes of 1 and 2 KiB keep fewer.
            let large = Layout::from_size_align(1500, 1).unwrap();
            let big: Vec<_> = (0..KEEP_LARGE + 10).map(|_| pool.alloc(large)).collect();
            assert!(big.iter().all(|p| !p.is_null()));
            for p in &big {
                pool.dealloc(*p, large);
            }
            assert_eq!((*pool.lists.get()).get(7).map(|l| l.1), Some(KEEP_LARGE));
            while let Some(p) = (*pool.lists.get())
                .get(7)
                .is_some_and(|l| !l.0.is_null())
                .then(|| pool.alloc(large))
            {
                System.dealloc(p, class_layout(7));
            }
            // Everything is given back, the listed blocks too.
            while let Some(p) = (*pool.lists.get())
                .get(2)
                .is_some_and(|l| !l.0.is_null())
                .then(|| pool.alloc(l))
            {
                System.dealloc(p, class_layout(2));
            }
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_across_classes_and_to_the_system() {
        let pool = Pool::new();
        unsafe {
            let l = Layout::from_size_align(10, 1).unwrap();
            let a = pool.alloc(l);
            for i in 0..10 {
                a.add(i).write(i as u8);
            }
            let b = pool.realloc(a, l, 16);
            // A larger class, then past the pool to the system allocator, then back.
            let c = pool.realloc(b, Layout::from_size_align(16, 1).unwrap(), 300);
            let d = pool.realloc(c, Layout::from_size_align(300, 1).unwrap(), 4000);
            let e = pool.realloc(d, Layout::from_size_align(4000, 1).unwrap(), 8000);
            let f = pool.realloc(e, Layout::from_size_align(8000, 1).unwrap(), 12);
            for i in 0..10 {
                assert_eq!(f.add(i).read(), i as u8);
            }
            pool.dealloc(f, Layout::from_size_align(12, 1).unwrap());
        }
    }
}
