//! What the fleet's end-to-end tests (`fleet_e2e.rs`, `fleet_limits_e2e.rs`) start beside the
//! Envoys: a real `redis-server` on a private unix socket (no TCP port to race for) and the
//! real `unbusy-store` binary on port 0, each killed when its handle is dropped.
//!
//! They need `redis-server` on the `PATH` (or `UNBUSY_REDIS_SERVER`; `make setup` installs it)
//! and build `unbusy-store` themselves (`cargo build -p unbusy-store`) unless `UNBUSY_STORE_BIN`
//! names one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::envoy::repo_root;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
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

/// How many keys Redis holds (`DBSIZE` over its socket).
pub fn redis_keys(socket: &std::path::Path) -> u64 {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(b"DBSIZE\r\n").unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 64];
    while !reply.ends_with(b"\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "redis closed the connection");
        reply.extend_from_slice(&buf[..n]);
    }
    // `:N\r\n`
    String::from_utf8_lossy(&reply[1..reply.len() - 2])
        .parse()
        .unwrap()
}

/// `redis-server` on a unix socket in a private directory (no TCP port).
pub fn redis(dir: &std::path::Path) -> (Proc, PathBuf) {
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
pub fn store(socket: &std::path::Path) -> (Proc, SocketAddr) {
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
