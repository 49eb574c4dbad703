//! A global allocator that keeps a hostile length prefix from taking the broker down.
//!
//! The `kafka-protocol` crate (0.18) sizes a decoded array with `Vec::with_capacity(count)` where
//! `count` comes off the wire before any element is read. A 20-byte request claiming two billion
//! elements then asks for hundreds of GiB; the system allocator refuses, and Rust aborts the process.
//! Upstream fixes are proposed but unreleased. Until they land, allocations of at least
//! [`RESERVE_ONLY_BYTES`] are served by `mmap(MAP_NORESERVE)`: address space only, no memory is
//! committed until written. The decode then fails on the missing elements, the vector is dropped
//! (`munmap`), and nothing was used. Legitimate allocations of that size do not exist in the broker:
//! requests are bounded by `socket.request.max.bytes` and buffers grow as bytes arrive.

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations this large only reserve address space.
pub const RESERVE_ONLY_BYTES: usize = 1 << 30;

pub struct GuardedAlloc;

fn reserve_only(layout: &Layout) -> bool {
    layout.size() >= RESERVE_ONLY_BYTES && layout.align() <= 4096
}

// SAFETY: every method forwards to `System` or to mmap/munmap with the same size that the
// allocation was made with (GlobalAlloc guarantees the layout on dealloc matches alloc), and
// mmap'd memory is page aligned, which covers every alignment accepted by `reserve_only`.
unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if reserve_only(&layout) {
            // SAFETY: an anonymous private mapping with no address hint has no preconditions.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    layout.size(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return std::ptr::null_mut();
            }
            return p.cast();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if reserve_only(&layout) {
            // SAFETY: `ptr` came from the mmap above with this same size.
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
            return;
        }
        // SAFETY: `ptr` came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if reserve_only(&layout) {
            // SAFETY: anonymous mappings are zero-filled.
            return unsafe { self.alloc(layout) };
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees a valid layout with `new_size`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !reserve_only(&layout) && !reserve_only(&new_layout) {
            // SAFETY: both sides are System allocations.
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // SAFETY: allocate, copy the smaller size, free the old block: the default strategy.
        unsafe {
            let new = self.alloc(new_layout);
            if !new.is_null() {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            new
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_reservation_commits_nothing_and_frees() {
        let a = GuardedAlloc;
        let layout = Layout::from_size_align(200 << 30, 8).unwrap();
        // SAFETY: layout is non-zero; the block is freed with the same layout.
        unsafe {
            let p = a.alloc(layout);
            assert!(
                !p.is_null(),
                "a 200 GiB reservation must succeed without committing"
            );
            *p = 1;
            a.dealloc(p, layout);
        }
    }
}
