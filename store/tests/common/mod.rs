//! Real processes for the store's tests: `redis-server` on a unix socket in a private
//! directory (`--port 0`, so no TCP port is ever picked), the `unbusy-store` binary on port 0
//! (it prints the address it bound), and a small keep-alive HTTP/1.1 client.
//!
//! The tests are behind the crate's `e2e` feature (`make test` turns it on): without
//! `redis-server` they fail, saying how to get it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    dead_code
)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn redis_server() -> PathBuf {
    std::env::var_os("UNBUSY_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// Checks that `redis-server` can be started, failing the test with how to get it otherwise.
/// (These tests are behind the `e2e` feature, which `make test` turns on after `make setup`
/// installed Redis; a bare `cargo test --workspace` leaves them out.) Always true.
pub fn redis_present(test: &str) -> bool {
    let found = Command::new(redis_server())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{test}: {} not found (make setup installs it, or apt-get install redis-server; \
         UNBUSY_REDIS_SERVER names another binary)",
        redis_server().display()
    );
    true
}

/// A private directory, short enough for a unix socket path (108 bytes).
pub fn private_dir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ubs-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A `redis-server` listening only on a unix socket.
pub struct Redis {
    child: Option<Child>,
    pub dir: PathBuf,
    extra: Vec<String>,
}

impl Redis {
    pub fn start(name: &str) -> Redis {
        Self::start_with(name, &[])
    }

    pub fn start_with(name: &str, extra: &[&str]) -> Redis {
        let mut r = Redis {
            child: None,
            dir: private_dir(name),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// Starts (again) on the same socket.
    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::File::create(self.dir.join("redis.log")).unwrap();
        let child = Command::new(redis_server())
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(&self.socket()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not answer on {}", self.socket().display());
    }

    /// SIGKILL: no goodbye to any client.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP / SIGCONT: a Redis that accepts and never answers, as a hung server or a
    /// network black hole would.
    pub fn pause(&self, stop: bool) {
        let pid = self.child.as_ref().unwrap().id() as libc::pid_t;
        let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// A Redis command through the socket (RESP inline), for tests that look at the keys.
    pub fn command(&self, line: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        let mut buf = vec![0u8; 65536];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.pause(false);
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ping(socket: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// An `unbusy-store` process.
pub struct Store {
    child: Child,
    pub addr: SocketAddr,
}

impl Store {
    /// Against one Redis URL, with extra flags.
    pub fn start(redis_flag: &str, redis: &str, extra: &[&str]) -> Store {
        let mut child = Command::new(env!("CARGO_BIN_EXE_unbusy-store"))
            .args(["--listen", "127.0.0.1:0", redis_flag, redis])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Store { child, addr }
    }

    pub fn single(redis: &Redis) -> Store {
        Self::start("--redis", &redis.url(), &[])
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A keep-alive HTTP/1.1 connection to a store.
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Client { sender }
    }

    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "store");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        self.sender.ready().await.unwrap();
        let res = self.sender.send_request(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn get(&mut self, path: &str) -> Answer {
        self.call(Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn post(&mut self, path: &str, body: &Value) -> Answer {
        self.call(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    pub async fn put_json(&mut self, path: &str, body: &Value) -> Answer {
        self.call(
            Method::PUT,
            path,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }
}

/// The p-th percentile of durations, in µs.
pub fn percentile_us(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_micros()
}

/// Redis's own clock (`TIME`), in seconds, over a connection that writes `TIME` and reads the
/// reply. The lease scripts charge by this clock, so a bound on what they may grant over a run
/// is computed from it, not from the test's: the two clocks can differ by more than one
/// emission interval over seconds on a loaded machine.
pub fn redis_time_s(mut conn: impl std::io::Read + std::io::Write) -> f64 {
    conn.write_all(b"TIME\r\n").unwrap();
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    // `*2\r\n$10\r\nSECONDS\r\n$6\r\nMICROS\r\n`: complete once it has five line ends.
    while reply.iter().filter(|&&b| b == b'\n').count() < 5 {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "redis closed the connection");
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8(reply).unwrap();
    let lines: Vec<&str> = text.split("\r\n").collect();
    let (secs, micros): (f64, f64) = (lines[2].parse().unwrap(), lines[4].parse().unwrap());
    secs + micros / 1e6
}
