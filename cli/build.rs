//! Builds the Envoy filter's `.wasm` into the `unbusy` binary, so an installed `unbusy` needs
//! nothing from the checkout it was built in.
//!
//! The `.wasm` is `UNBUSY_FILTER_WASM` if set, else the one `make filter` leaves in this
//! workspace (`target/wasm32-wasip1/wasm-filter/unbusy_envoy.wasm`). Without it a release
//! build (`cargo install --path cli`) fails and says to run `make filter` first; a debug build
//! (the workspace's `cargo build`, `cargo clippy`, `cargo test`) warns and makes an `unbusy`
//! that runs only with `--filter PATH`. Either way the build script runs again once the file
//! appears or changes (by its modification time: a filter put back with an older one, as
//! `mv` or `cp -p` can, is not noticed until it is touched; `make filter` always writes anew).

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(unbusy_embedded_filter)");
    println!("cargo::rerun-if-env-changed=UNBUSY_FILTER_WASM");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let given = std::env::var_os("UNBUSY_FILTER_WASM").filter(|v| !v.is_empty());
    let wasm = given
        .clone()
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/wasm32-wasip1/wasm-filter/unbusy_envoy.wasm"));
    // A missing file counts as changed: the script runs again until the filter is built.
    println!("cargo::rerun-if-changed={}", wasm.display());
    let fail = |message: String| -> ! {
        eprintln!("error: {message}");
        std::process::exit(1);
    };
    match std::fs::read(&wasm) {
        Ok(bytes) if bytes.starts_with(b"\0asm") => {
            let wasm = wasm.canonicalize().unwrap_or(wasm);
            println!("cargo::rustc-cfg=unbusy_embedded_filter");
            println!("cargo::rustc-env=UNBUSY_EMBEDDED_FILTER={}", wasm.display());
        }
        Ok(_) => fail(format!("{} is not a wasm module", wasm.display())),
        Err(e) => {
            let message = format!(
                "the Envoy filter is not built ({}: {e}): run `make filter` first (or set \
                 UNBUSY_FILTER_WASM to the filter's .wasm), then build unbusy again",
                wasm.display()
            );
            let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
            if release || given.is_some() {
                fail(message);
            }
            println!(
                "cargo::warning={message}; this debug build of unbusy runs only with --filter PATH"
            );
        }
    }
}
