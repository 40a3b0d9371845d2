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
use std::process::{Child, Command, Stdio};
use std::time::Duration;

#[allow(unused_imports)] // each test target uses some of them
pub use unbusy_tests::redis::{private_dir, redis_time_s, RedisServer as Redis};

/// Checks that `redis-server` can be started, failing the test with how to get it otherwise.
/// Always true.
pub fn redis_present(test: &str) -> bool {
    unbusy_tests::redis::require_redis(test);
    true
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
