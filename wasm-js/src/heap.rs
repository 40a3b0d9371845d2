//! The allocator of the wasm build: power-of-two size classes over `memory.grow`.
//!
//! Why not the standard library's dlmalloc: it is about 7 KB of the package's wasm, and the
//! package has a size goal (60 KB gzipped). The engine's allocations are small and short-lived
//! (a request's strings, an action's numbers), so segregated free lists are enough: a freed block
//! waits on its class's list for the next allocation of that class, and memory is never returned
//! to the host (a wasm memory cannot shrink anyway).
//!
//! Every block is a power of two in size and aligned to its own size (up to a 64 KiB page), so any
//! alignment up to the size is met. The bump pointer moves to the alignment of the next block by
//! handing the gap to the smaller classes' lists, so nothing is lost to padding.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr;

/// 16 bytes (a free block holds the next pointer) up to 2 GiB.
const MIN_CLASS: u32 = 4;
const CLASSES: usize = 28;
const PAGE: usize = 65536;

struct State {
    free: [*mut u8; CLASSES],
    bump: usize,
    end: usize,
}

pub struct Heap(UnsafeCell<State>);

// The wasm build is single-threaded: one instance, no shared memory.
unsafe impl Sync for Heap {}

impl Heap {
    pub const fn new() -> Self {
        Heap(UnsafeCell::new(State {
            free: [ptr::null_mut(); CLASSES],
            bump: 0,
            end: 0,
        }))
    }
}

/// The class of a layout: log2 of the block size.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS);
    let class = size.checked_next_power_of_two()?.trailing_zeros();
    let index = (class - MIN_CLASS) as usize;
    (index < CLASSES).then_some(index)
}

extern "C" {
    /// Where the linker put the end of static data and the stack: the heap starts here.
    static __heap_base: u8;
}

impl State {
    unsafe fn push(&mut self, index: usize, block: *mut u8) {
        if let Some(head) = self.free.get_mut(index) {
            block.cast::<*mut u8>().write(*head);
            *head = block;
        }
    }

    /// A fresh block of `1 << (index + MIN_CLASS)` bytes from the bump region.
    unsafe fn carve(&mut self, index: usize) -> *mut u8 {
        if self.end == 0 {
            self.bump = (ptr::addr_of!(__heap_base) as usize + 15) & !15;
            self.end = core::arch::wasm32::memory_size(0) * PAGE;
        }
        let size = 1usize << (index as u32 + MIN_CLASS);
        let align = size.min(PAGE);
        let start = (self.bump + align - 1) & !(align - 1);
        let Some(stop) = start.checked_add(size) else {
            return ptr::null_mut();
        };
        if stop > self.end {
            let pages = (stop - self.end).div_ceil(PAGE);
            if core::arch::wasm32::memory_grow(0, pages) == usize::MAX {
                return ptr::null_mut();
            }
            self.end += pages * PAGE;
        }
        // Hand the gap up to the block's alignment to the smaller classes: each piece is the
        // lowest set bit of the bump pointer, so it is aligned to its own size and ends at or
        // before `start`.
        while self.bump < start {
            let piece = self.bump & self.bump.wrapping_neg();
            self.push(
                (piece.trailing_zeros() - MIN_CLASS) as usize,
                self.bump as *mut u8,
            );
            self.bump += piece;
        }
        self.bump = stop;
        start as *mut u8
    }
}

unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let state = &mut *self.0.get();
        let Some(index) = class_of(layout) else {
            return ptr::null_mut();
        };
        match state.free.get_mut(index) {
            Some(head) if !head.is_null() => {
                let block = *head;
                *head = block.cast::<*mut u8>().read();
                block
            }
            _ => state.carve(index),
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if let Some(index) = class_of(layout) {
            (*self.0.get()).push(index, block);
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        if class_of(layout) == class_of(new_layout) {
            return block;
        }
        let moved = self.alloc(new_layout);
        if !moved.is_null() {
            ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
            self.dealloc(block, layout);
        }
        moved
    }
}
