//! Launchers and a small HTTP client for the end-to-end tests, the demo and the benchmark:
//! real Envoy (from the project's `.venv`) on free loopback ports, fed a rendered config.

use crate::envoy::{envoy_binary, render, Render, Upstream};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    /// The listener.
    pub listen: SocketAddr,
    /// The admin interface.
    pub admin: SocketAddr,
    /// Envoy's log file.
    pub log: PathBuf,
}

/// How to start Envoy.
pub struct EnvoySpec<'a> {
    /// Providers, in preference order.
    pub upstreams: &'a [Upstream],
    /// The filter's configuration; `None` for bare Envoy.
    pub filter: Option<&'a Value>,
    /// Envoy's native rate limit + retries instead (requests per second).
    pub native: Option<u32>,
    /// Worker threads.
    pub concurrency: u32,
    /// The filter's `.wasm`.
    pub wasm: &'a Path,
}

impl Envoy {
    /// Starts Envoy and waits until it is ready (or returns its log as the error).
    pub fn start(spec: &EnvoySpec<'_>) -> Result<Self, String> {
        let (port, admin_port) = (free_port(), free_port());
        let yaml = render(&Render {
            listen: ("127.0.0.1", port),
            admin: ("127.0.0.1", admin_port),
            upstreams: spec.upstreams,
            filter: spec.filter,
            wasm: spec.wasm,
            native: spec.native,
        });
        Self::start_yaml(&yaml, port, admin_port, spec.concurrency)
    }

    /// Starts Envoy with this YAML.
    pub fn start_yaml(
        yaml: &str,
        port: u16,
        admin_port: u16,
        concurrency: u32,
    ) -> Result<Self, String> {
        let dir = std::env::temp_dir().join("unbusy-e2e");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let config = dir.join(format!("envoy-{port}.yaml"));
        let log = dir.join(format!("envoy-{port}.log"));
        std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--log-level", "warn", "--component-log-level", "wasm:info"])
            .args(["--base-id", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e} (run `make setup`)",
                    envoy_binary().display()
                )
            })?;
        let mut envoy = Self {
            child,
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!("Envoy exited ({status}):\n{}", envoy.log_text()));
            }
            if std::net::TcpStream::connect(envoy.listen).is_ok()
                && std::net::TcpStream::connect(envoy.admin).is_ok()
            {
                return Ok(envoy);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("Envoy not ready after 30 s:\n{}", envoy.log_text()))
    }

    /// Envoy's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for Envoy to exit by itself (a refused config), up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response as a client saw it.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: u16,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body, or the error that cut it.
    pub body: Result<Bytes, String>,
    /// Time to the response headers.
    pub headers_after: Duration,
    /// Time to the end of the body.
    pub total: Duration,
}

impl Reply {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        self.body
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text()).unwrap_or(Value::Null)
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "unbusy.test");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req
        .body(Full::new(body.into()))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let headers_after = started.elapsed();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Ok(Reply {
        status,
        headers,
        body,
        headers_after,
        total: started.elapsed(),
    })
}

/// A chat/completions request body.
pub fn chat_body(content: &str, stream: bool, deterministic: bool) -> String {
    serde_json::json!({
        "model": "deepseek-chat",
        "stream": stream,
        "temperature": if deterministic { 0.0 } else { 0.7 },
        "messages": [{"role": "user", "content": content}],
    })
    .to_string()
}

/// POSTs a chat/completions request with a JSON content type and a test key.
pub async fn chat(addr: SocketAddr, body: &str, extra: &[(&str, &str)]) -> Result<Reply, String> {
    let mut headers = vec![
        ("content-type", "application/json"),
        ("authorization", "Bearer caller-key"),
    ];
    headers.extend_from_slice(extra);
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.to_string(),
    )
    .await
}
