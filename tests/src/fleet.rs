//! What the fleet's end-to-end tests start beside the Envoys, besides Redis ([`crate::redis`]):
//! the real `unbusy-store` binary on a port it binds itself (port 0) or on a given address (a
//! store restarted where the proxies expect it), killed when its handle is dropped. The binary
//! is `UNBUSY_STORE_BIN`, or built here (`cargo build -p unbusy-store`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::envoy::repo_root;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `unbusy-store` binary: `UNBUSY_STORE_BIN`, or built here.
pub fn store_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("UNBUSY_STORE_BIN") {
        return bin.into();
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "-q", "-p", "unbusy-store"])
        .current_dir(repo_root())
        .status()
        .unwrap()
        .success();
    assert!(ok, "cargo build -p unbusy-store failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    target.join("debug/unbusy-store")
}

/// The store on port 0 against the Redis at `socket`; returns it and the address it printed.
pub fn store(socket: &Path) -> (Proc, SocketAddr) {
    store_on("127.0.0.1:0", socket)
}

/// The store on `listen` against the Redis at `socket`.
pub fn store_on(listen: &str, socket: &Path) -> (Proc, SocketAddr) {
    store_with(
        listen,
        "--redis",
        &format!("redis+unix://{}", socket.display()),
    )
}

/// The store on `listen` against `redis` given with `flag` (`--redis URL`, or
/// `--redis-cluster URL,URL...` for a Redis Cluster).
pub fn store_with(listen: &str, flag: &str, redis: &str) -> (Proc, SocketAddr) {
    let mut child = Command::new(store_bin())
        .args(["--listen", listen, flag, redis])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    (Proc(child), addr)
}
