//! Envoy's configuration (rendered by `unbusy-envoy-config`, re-exported here) and where the
//! harness finds Envoy and the filter in this checkout.

pub use unbusy_envoy_config::*;

use std::path::{Path, PathBuf};

/// The repository's root (where `.venv/` and `target/` are).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Envoy from the project's `.venv` (installed by `make setup`), or `UNBUSY_ENVOY`.
pub fn envoy_binary() -> PathBuf {
    std::env::var_os("UNBUSY_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/envoy"))
}

/// The filter built by `make filter`, or `UNBUSY_WASM`.
pub fn filter_wasm() -> PathBuf {
    std::env::var_os("UNBUSY_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/wasm32-wasip1/wasm-filter/unbusy_envoy.wasm"))
}
