//! A variable of the VM's environment (the keys named by `api_key_env`), read through WASI's
//! `environ_get` directly.
//!
//! Why not `std::env::var`: on `wasm32-wasip1` it goes through wasi-libc's `getenv`, which
//! first copies the whole environment into libc's `environ` array (its own allocations and
//! parser): about 2 KB of the filter, against issue 13's 300 KB goal, for a lookup made once
//! per configuration. The lookup here is `getenv`'s: the first `NAME=value` entry whose name
//! matches; a name that is empty or holds `=` matches nothing; a value that is not UTF-8 is
//! `None`, as `std::env::var(..).ok()` gives.

/// The value of the VM's environment variable `name`, if it is set and UTF-8.
pub fn var(name: &str) -> Option<String> {
    find(&block()?, name)
}

/// `name`'s value in an environment block as WASI's `environ_get` writes it: `NAME=value`
/// entries, each ended by a NUL.
pub fn find(block: &[u8], name: &str) -> Option<String> {
    if name.is_empty() || name.contains('=') {
        return None;
    }
    let value = block
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(name.as_bytes())?.strip_prefix(b"="))?;
    String::from_utf8(value.to_vec()).ok()
}

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn environ_sizes_get(count: *mut usize, size: *mut usize) -> i32;
    fn environ_get(entries: *mut *mut u8, block: *mut u8) -> i32;
}

/// The VM's whole environment block (`None` if the host refuses it).
#[cfg(target_arch = "wasm32")]
fn block() -> Option<Vec<u8>> {
    let (mut count, mut size) = (0usize, 0usize);
    // SAFETY: both outputs outlive the call.
    if unsafe { environ_sizes_get(&mut count, &mut size) } != 0 {
        return None;
    }
    // `environ_get` writes `count` pointers into the block and `size` bytes of entries.
    let mut entries = vec![std::ptr::null_mut::<u8>(); count];
    let mut block = vec![0u8; size];
    // SAFETY: the two buffers have the sizes the host just gave for them.
    if unsafe { environ_get(entries.as_mut_ptr(), block.as_mut_ptr()) } != 0 {
        return None;
    }
    Some(block)
}

/// Off wasm (the crate's native builds) there is no VM: the process's own environment.
#[cfg(not(target_arch = "wasm32"))]
fn block() -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let mut block = Vec::new();
    for (name, value) in std::env::vars_os() {
        block.extend_from_slice(name.as_bytes());
        block.push(b'=');
        block.extend_from_slice(value.as_bytes());
        block.push(0);
    }
    Some(block)
}

#[cfg(test)]
mod tests {
    use super::find;

    #[test]
    fn finds_a_variable_as_getenv_does() {
        let block = b"A=1\0KEY_A=sk-a=b\0KEY=x\0KEY_A=second\0BAD=\xff\0EMPTY=\0";
        assert_eq!(find(block, "KEY_A").as_deref(), Some("sk-a=b"));
        assert_eq!(find(block, "KEY").as_deref(), Some("x"));
        assert_eq!(find(block, "A").as_deref(), Some("1"));
        assert_eq!(find(block, "EMPTY").as_deref(), Some(""));
        assert_eq!(find(block, "KEY_"), None);
        assert_eq!(find(block, "MISSING"), None);
        // Not UTF-8: none, as `std::env::var(..).ok()` gives.
        assert_eq!(find(block, "BAD"), None);
        // `getenv` finds nothing for an empty name or one holding `=`.
        assert_eq!(find(block, ""), None);
        assert_eq!(find(block, "KEY_A=sk-a"), None);
        assert_eq!(find(b"", "A"), None);
    }
}
