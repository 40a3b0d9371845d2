//! On wasm, the C allocation functions' references (wasi-libc's and the standard library's)
//! go to the filter's own heap (`src/heap.rs`) through the linker's `--wrap`: `malloc` becomes
//! `__wrap_malloc`, and so on. Why not define `malloc` itself: the filter would then export
//! it, and Envoy prefers an exported `malloc` to `proxy_on_memory_allocate` for the buffers it
//! hands over, which the SDK frees as Rust allocations. Nothing refers to dlmalloc's functions
//! any more, so the linker leaves it out (issue 13's size goal).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        for f in [
            "malloc",
            "free",
            "calloc",
            "realloc",
            "posix_memalign",
            "aligned_alloc",
        ] {
            println!("cargo:rustc-cdylib-link-arg=--wrap={f}");
        }
    }
}
