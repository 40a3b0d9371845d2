//! A fleet's shared pieces for e2e tests: a real `redis-server` on a private unix socket and
//! the `unbusy-store` binary in front of it, each killed when dropped. (The same helpers as
//! `tests/tests/fleet_e2e.rs`, here so several fleet tests share them.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::envoy::repo_root;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `redis-server` (`UNBUSY_REDIS_SERVER`, else the `PATH`'s) on a unix socket in `dir`, no TCP
/// port; returns it once it answers `PING`, and its socket.
pub fn redis(dir: &Path) -> (Proc, PathBuf) {
    let socket = dir.join("redis.sock");
    let bin = std::env::var_os("UNBUSY_REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
    let redis = Proc(
        Command::new(&bin)
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{bin:?}: {e} (make setup installs redis-server; UNBUSY_REDIS_SERVER)")
            }),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&socket) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 5];
            if s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok() && &buf == b"+PONG" {
                return (redis, socket);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("redis-server did not answer on {}", socket.display());
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

/// The store on port 0 against Redis's socket; returns it and the address it printed.
pub fn store(socket: &Path) -> (Proc, SocketAddr) {
    let mut child = Command::new(store_bin())
        .args(["--listen", "127.0.0.1:0", "--redis"])
        .arg(format!("redis+unix://{}", socket.display()))
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
