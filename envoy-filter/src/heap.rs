//! The filter's memory allocator on wasm: power-of-two size classes over `memory.grow`, for
//! Rust's allocations and, through `malloc` and its family, for wasi-libc's.
//!
//! Why: the filter's allocator was wasi-libc's dlmalloc (about 9.5 KB of the module with
//! `free`, `dispose_chunk` and Rust's `realloc` over it), against issue 13's 300 KB goal.
//! Rust's allocations go to [`Heap`] as the `#[global_allocator]`; the C allocation functions
//! that wasi-libc and the standard library refer to (`malloc`, `free`, `calloc`, `realloc`,
//! `posix_memalign`, `aligned_alloc`: `getcwd` in the panic output, `System`) are redirected
//! here by the linker (`--wrap`, see `build.rs`), so nothing refers to dlmalloc and it is not
//! linked. (Not by defining `malloc` itself: the module would export it, and Envoy prefers an
//! exported `malloc` to `proxy_on_memory_allocate` for the buffers it hands over, which the
//! SDK frees as Rust allocations.) The heap takes its memory only through `memory.grow`,
//! never the initial memory's tail above `__heap_base` (under 64 KiB): were dlmalloc linked
//! again some day, the two would not overlap.
//!
//! How: every block is a power of two of at least 16 bytes, aligned to its size (up to a
//! 64 KiB page). A freed block goes on its class's free list and is the next one of that class
//! handed out; a new one is carved from the top of the heap, whose alignment gap is handed to
//! the smaller classes' lists, so nothing is lost to padding. Blocks are neither split nor
//! merged, and memory is never given back (a wasm memory cannot shrink, with dlmalloc
//! neither). What that costs a long-lived VM: the heap never holds more than, for each class,
//! the most blocks of that class ever live at once; a VM whose requests look alike reaches that
//! after its first requests and stays there (the soak in `tests/heap.rs` runs 100,000
//! requests through the filter on this heap: it stops growing after the first thousand).
//!
//! The heap is generic over where it gets its pages ([`Pages`]), so the native tests run the
//! filter on it too.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::null_mut;

/// A wasm page.
pub const PAGE: usize = 65536;
/// The smallest block is 16 bytes (`1 << MIN_CLASS`): it holds a free list's link, and C's
/// `malloc` alignment.
const MIN_CLASS: u32 = 4;
/// Classes up to 2 GiB.
const CLASSES: usize = 28;

/// Where a heap gets its memory.
pub trait Pages {
    /// `pages` more pages: the address of the first, or `None` when there is no more memory.
    fn grow(&self, pages: usize) -> Option<usize>;
}

/// Size-class free lists over a [`Pages`].
pub struct Heap<P> {
    pages: P,
    state: UnsafeCell<State>,
}

struct State {
    /// Each class's free list: the address of its first block (0: empty); a free block holds
    /// the next one's address.
    free: [usize; CLASSES],
    /// The heap's top: blocks are carved from here up to `end`.
    bump: usize,
    end: usize,
    /// The pages taken so far.
    pages: usize,
}

// SAFETY: the heap is only used by one thread at a time: a wasm VM is single-threaded, and the
// native tests put it behind a lock.
unsafe impl<P: Sync> Sync for Heap<P> {}

impl<P> Heap<P> {
    /// An empty heap over `pages`.
    pub const fn new(pages: P) -> Self {
        Self {
            pages,
            state: UnsafeCell::new(State {
                free: [0; CLASSES],
                bump: 0,
                end: 0,
                pages: 0,
            }),
        }
    }
}

/// The class of a layout (log2 of its block size, less `MIN_CLASS`).
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align());
    let class = size
        .checked_next_power_of_two()?
        .trailing_zeros()
        .max(MIN_CLASS);
    let index = (class - MIN_CLASS) as usize;
    (index < CLASSES).then_some(index)
}

impl<P: Pages> Heap<P> {
    /// The bytes the heap has taken from its pages so far: its size.
    pub fn reserved(&self) -> usize {
        // SAFETY: one thread at a time (see `Sync`).
        unsafe { (*self.state.get()).pages * PAGE }
    }

    /// A block of class `index` (`< CLASSES`): off its free list, else carved.
    ///
    /// # Safety
    /// One thread at a time.
    unsafe fn take(&self, index: usize) -> *mut u8 {
        // SAFETY: one thread at a time.
        let state = unsafe { &mut *self.state.get() };
        let Some(head) = state.free.get_mut(index) else {
            return null_mut();
        };
        if *head != 0 {
            let block = *head as *mut usize;
            // SAFETY: a free block holds the next one's address.
            *head = unsafe { block.read() };
            return block.cast();
        }
        let size = 1usize << (index as u32 + MIN_CLASS);
        let align = size.min(PAGE);
        loop {
            // (Checked: on wasm32 the last page ends at 4 GiB, which wraps to 0.)
            let Some(start) = state.bump.checked_add(align - 1).map(|a| a & !(align - 1)) else {
                return null_mut();
            };
            let Some(stop) = start.checked_add(size) else {
                return null_mut();
            };
            if stop <= state.end {
                // The gap up to the block's alignment goes to the smaller classes: each piece
                // is the lowest set bit of the top, so it is aligned to its own size (at least
                // 16) and ends at or before `start`.
                while state.bump < start {
                    let piece = state.bump & state.bump.wrapping_neg();
                    let class = (piece.trailing_zeros() - MIN_CLASS) as usize;
                    // SAFETY: the piece is unused memory of the heap.
                    unsafe { state.push(class, state.bump) };
                    state.bump += piece;
                }
                state.bump = stop;
                return start as *mut u8;
            }
            let pages = (stop - state.end).div_ceil(PAGE);
            let Some(region) = self.pages.grow(pages) else {
                return null_mut();
            };
            let Some(end) = pages.checked_mul(PAGE).and_then(|b| region.checked_add(b)) else {
                return null_mut();
            };
            if region != state.end {
                // Not after the heap's top (memory grown by someone else): carry on in the new
                // region; the old top's rest stays unused.
                state.bump = region;
            }
            state.end = end;
            state.pages += pages;
        }
    }

    /// A block for C's allocation functions: `size` bytes aligned to `align` (a power of two),
    /// after a 16-byte header with what [`Heap::c_free`] needs. Null when out of memory or
    /// for an alignment over a page.
    ///
    /// # Safety
    /// One thread at a time.
    pub unsafe fn c_alloc(&self, size: usize, align: usize) -> *mut u8 {
        let offset = align.max(16);
        let Some(total) = size.checked_add(offset) else {
            return null_mut();
        };
        let Ok(layout) = Layout::from_size_align(total, offset) else {
            return null_mut();
        };
        if offset > PAGE {
            return null_mut();
        }
        // SAFETY: one thread at a time.
        let block = unsafe { self.alloc(layout) };
        if block.is_null() {
            return null_mut();
        }
        // SAFETY: the block holds `offset + size` bytes and is aligned to `offset`; the header
        // is the 16 bytes before the pointer returned.
        unsafe {
            let data = block.add(offset);
            let header = data.sub(16).cast::<usize>();
            header.write(total);
            header.add(1).write(offset);
            data
        }
    }

    /// Frees a block of [`Heap::c_alloc`] (null: nothing).
    ///
    /// # Safety
    /// `data` is null or from `c_alloc`, not freed yet; one thread at a time.
    pub unsafe fn c_free(&self, data: *mut u8) {
        if let Some((block, layout)) = unsafe { Self::c_block(data) } {
            // SAFETY: the block and layout `c_alloc` allocated.
            unsafe { self.dealloc(block, layout) };
        }
    }

    /// The bytes a block of [`Heap::c_alloc`] holds (0 for null).
    ///
    /// # Safety
    /// As [`Heap::c_free`].
    pub unsafe fn c_size(data: *mut u8) -> usize {
        // SAFETY: as the caller's.
        unsafe { Self::c_block(data) }
            .map_or(0, |(block, l)| l.size() - (data as usize - block as usize))
    }

    /// A C block's allocation: its start and layout, from its header.
    unsafe fn c_block(data: *mut u8) -> Option<(*mut u8, Layout)> {
        if data.is_null() {
            return None;
        }
        // SAFETY: `c_alloc` wrote the header.
        unsafe {
            let header = data.sub(16).cast::<usize>();
            let (total, offset) = (header.read(), header.add(1).read());
            Some((
                data.sub(offset),
                Layout::from_size_align_unchecked(total, offset),
            ))
        }
    }
}

impl State {
    /// Puts the block at `block` on class `index`'s free list.
    unsafe fn push(&mut self, index: usize, block: usize) {
        if let Some(head) = self.free.get_mut(index) {
            // SAFETY: the block is free and at least 16 bytes.
            unsafe { (block as *mut usize).write(*head) };
            *head = block;
        }
    }
}

// SAFETY: blocks are at least `layout.size()` bytes, aligned to `layout.align()` (a block is
// aligned to its size up to a page; a larger alignment has no class and gets null), and a block
// is handed out again only after it was freed.
unsafe impl<P: Pages> GlobalAlloc for Heap<P> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(index) if layout.align() <= PAGE => unsafe { self.take(index) },
            _ => null_mut(),
        }
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        if let Some(index) = class_of(layout) {
            // SAFETY: one thread at a time; the block was allocated for this layout.
            unsafe { (*self.state.get()).push(index, block as usize) };
        }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return null_mut();
        };
        if class_of(layout) == class_of(new_layout) {
            return block;
        }
        // SAFETY: as `GlobalAlloc::realloc`'s caller promises.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                core::ptr::copy_nonoverlapping(block, moved, layout.size().min(new_size));
                self.dealloc(block, layout);
            }
            moved
        }
    }
}

/// Pages for the native tests: a reserved range of the process's memory, handed out from its
/// start (the range is reserved, not touched: the system backs it as it is written).
#[cfg(not(target_arch = "wasm32"))]
pub struct Arena {
    base: core::sync::atomic::AtomicUsize,
    used: core::sync::atomic::AtomicUsize,
    size: usize,
}

#[cfg(not(target_arch = "wasm32"))]
impl Arena {
    /// An arena of `size` bytes (a multiple of [`PAGE`]), reserved at its first growth.
    pub const fn new(size: usize) -> Self {
        Self {
            base: core::sync::atomic::AtomicUsize::new(0),
            used: core::sync::atomic::AtomicUsize::new(0),
            size,
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Pages for Arena {
    fn grow(&self, pages: usize) -> Option<usize> {
        use core::sync::atomic::Ordering::Relaxed;
        if self.base.load(Relaxed) == 0 {
            let layout = Layout::from_size_align(self.size, PAGE).ok()?;
            // SAFETY: a non-zero size; the range is never freed (it is the heap's).
            let base = unsafe { std::alloc::System.alloc(layout) } as usize;
            if base == 0 {
                return None;
            }
            self.base.store(base, Relaxed);
        }
        let bytes = pages.checked_mul(PAGE)?;
        let used = self.used.load(Relaxed);
        if used.checked_add(bytes)? > self.size {
            return None;
        }
        self.used.store(used + bytes, Relaxed);
        Some(self.base.load(Relaxed) + used)
    }
}

#[cfg(test)]
mod tests {
    use super::{Arena, Heap, PAGE};
    use core::alloc::{GlobalAlloc, Layout};

    fn heap() -> Heap<Arena> {
        Heap::new(Arena::new(1 << 28))
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_reused_by_class() {
        let heap = heap();
        let mut blocks = Vec::new();
        for (size, align) in [
            (1, 1),
            (16, 8),
            (17, 1),
            (100, 4),
            (4096, 4096),
            (70_000, 8),
        ] {
            let layout = Layout::from_size_align(size, align).unwrap();
            let p = unsafe { heap.alloc(layout) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align.max(16), 0, "{size}/{align}");
            unsafe { p.write_bytes(0xab, size) };
            blocks.push((p as usize, size));
        }
        // No two blocks overlap.
        blocks.sort();
        for w in blocks.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?}");
        }
        // A freed block is the next one of its class handed out (17 and 32 bytes: one class).
        let a = unsafe { heap.alloc(Layout::from_size_align(17, 1).unwrap()) };
        unsafe { heap.dealloc(a, Layout::from_size_align(17, 1).unwrap()) };
        let b = unsafe { heap.alloc(Layout::from_size_align(32, 8).unwrap()) };
        assert_eq!(a, b);
        // Growing within a class keeps the block; past it, the contents move.
        let layout = Layout::from_size_align(20, 1).unwrap();
        let p = unsafe { heap.alloc(layout) };
        unsafe { p.copy_from_nonoverlapping(b"0123456789abcdefghij".as_ptr(), 20) };
        assert_eq!(unsafe { heap.realloc(p, layout, 32) }, p);
        let q = unsafe { heap.realloc(p, layout, 33) };
        assert_ne!(q, p);
        assert_eq!(
            unsafe { core::slice::from_raw_parts(q, 20) },
            b"0123456789abcdefghij"
        );
        // More than a page's alignment has no class.
        let huge_align = Layout::from_size_align(16, 2 * PAGE).unwrap();
        assert!(unsafe { heap.alloc(huge_align) }.is_null());
    }

    #[test]
    fn c_blocks_carry_their_size_and_alignment() {
        let heap = heap();
        for (size, align) in [(0, 16), (1, 16), (100, 16), (100, 64), (5000, 4096)] {
            let p = unsafe { heap.c_alloc(size, align) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            assert_eq!(unsafe { Heap::<Arena>::c_size(p) }, size);
            unsafe { p.write_bytes(0xcd, size) };
            unsafe { heap.c_free(p) };
            // Freed: the same allocation gets the same block back.
            assert_eq!(unsafe { heap.c_alloc(size, align) }, p);
        }
        unsafe { heap.c_free(core::ptr::null_mut()) };
        assert!(unsafe { heap.c_alloc(usize::MAX - 8, 16) }.is_null());
        assert!(unsafe { heap.c_alloc(1, 2 * PAGE) }.is_null());
    }

    #[test]
    fn memory_is_taken_only_as_needed_and_an_exhausted_arena_gives_null() {
        let heap = Heap::new(Arena::new(4 * PAGE));
        assert_eq!(heap.reserved(), 0);
        let small = Layout::from_size_align(100, 8).unwrap();
        let p = unsafe { heap.alloc(small) };
        assert_eq!(heap.reserved(), PAGE);
        unsafe { heap.dealloc(p, small) };
        for _ in 0..1000 {
            let q = unsafe { heap.alloc(small) };
            assert_eq!(q, p);
            unsafe { heap.dealloc(q, small) };
        }
        assert_eq!(heap.reserved(), PAGE);
        let big = Layout::from_size_align(4 * PAGE, 8).unwrap();
        assert!(unsafe { heap.alloc(big) }.is_null());
    }
}

/// The filter's heap on wasm: pages from `memory.grow`; and C's allocation functions over it,
/// as the `--wrap` targets of `build.rs` (see the module's documentation).
#[cfg(target_arch = "wasm32")]
mod wasm {
    use super::{Heap, Pages, PAGE};
    use core::arch::wasm32::memory_grow;

    /// The module's memory.
    pub struct Memory;

    impl Pages for Memory {
        fn grow(&self, pages: usize) -> Option<usize> {
            let old = memory_grow(0, pages);
            (old != usize::MAX).then(|| old * PAGE)
        }
    }

    #[global_allocator]
    static HEAP: Heap<Memory> = Heap::new(Memory);

    /// WASI's `EINVAL` and `ENOMEM`.
    const EINVAL: i32 = 28;
    const ENOMEM: i32 = 48;

    #[no_mangle]
    unsafe extern "C" fn __wrap_malloc(size: usize) -> *mut u8 {
        unsafe { HEAP.c_alloc(size, 16) }
    }

    #[no_mangle]
    unsafe extern "C" fn __wrap_free(data: *mut u8) {
        unsafe { HEAP.c_free(data) }
    }

    #[no_mangle]
    unsafe extern "C" fn __wrap_calloc(count: usize, size: usize) -> *mut u8 {
        let Some(bytes) = count.checked_mul(size) else {
            return core::ptr::null_mut();
        };
        // SAFETY: a fresh block of `bytes` bytes (free blocks are not zeroed).
        unsafe {
            let data = HEAP.c_alloc(bytes, 16);
            if !data.is_null() {
                data.write_bytes(0, bytes);
            }
            data
        }
    }

    #[no_mangle]
    unsafe extern "C" fn __wrap_realloc(data: *mut u8, size: usize) -> *mut u8 {
        // SAFETY: `data` is null or a live block of this heap (C's contract).
        unsafe {
            let moved = HEAP.c_alloc(size, 16);
            if !moved.is_null() && !data.is_null() {
                let old = Heap::<Memory>::c_size(data);
                moved.copy_from_nonoverlapping(data, old.min(size));
                HEAP.c_free(data);
            }
            moved
        }
    }

    #[no_mangle]
    unsafe extern "C" fn __wrap_aligned_alloc(align: usize, size: usize) -> *mut u8 {
        if !align.is_power_of_two() {
            return core::ptr::null_mut();
        }
        unsafe { HEAP.c_alloc(size, align) }
    }

    #[no_mangle]
    unsafe extern "C" fn __wrap_posix_memalign(
        out: *mut *mut u8,
        align: usize,
        size: usize,
    ) -> i32 {
        if !align.is_power_of_two() || align < core::mem::size_of::<usize>() {
            return EINVAL;
        }
        // SAFETY: `out` is writable (C's contract).
        unsafe {
            let data = HEAP.c_alloc(size, align);
            if data.is_null() {
                return ENOMEM;
            }
            out.write(data);
        }
        0
    }
}
