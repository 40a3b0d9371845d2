//! A real `redis-server` for the end-to-end tests (Debian's, installed by `make setup`; or
//! `UNBUSY_REDIS_SERVER`): on a unix socket in a private directory, so no TCP port is raced
//! for, without persistence, killed when dropped.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct RedisServer {
    child: Child,
    socket: PathBuf,
}

impl RedisServer {
    /// Starts one with its socket and files in `dir`, and waits until it answers `PING`.
    pub fn start(dir: &Path) -> Result<Self, String> {
        let socket = dir.join("redis.sock");
        let bin = std::env::var_os("UNBUSY_REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        let child = Command::new(&bin)
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
            .map_err(|e| {
                format!("{bin:?}: {e} (make setup installs redis-server; or UNBUSY_REDIS_SERVER)")
            })?;
        let server = Self { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if server.command("PING").is_ok_and(|r| r == "+PONG") {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!(
            "redis-server did not answer on {}",
            server.socket.display()
        ))
    }

    /// Its unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its URL for `unbusy-store` and `unbusy up --redis`.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket.display())
    }

    /// Sends one inline command and returns the first line of the reply (`+PONG`, `:3`, ...).
    pub fn command(&self, command: &str) -> Result<String, String> {
        let mut s = UnixStream::connect(&self.socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("{command}\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 256];
        while !reply.ends_with(b"\r\n") {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("redis closed the connection".into());
            }
            reply.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&reply);
        Ok(line.lines().next().unwrap_or("").to_string())
    }

    /// How many keys it holds (`DBSIZE`).
    pub fn keys(&self) -> Result<u64, String> {
        let reply = self.command("DBSIZE")?;
        reply
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("DBSIZE answered {reply:?}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
