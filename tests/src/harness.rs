//! Launchers and a small HTTP client for the end-to-end tests, the demo and the benchmark:
//! real Envoy (from the project's `.venv`) on loopback ports it binds itself (port 0), fed a
//! rendered config.

use crate::envoy::{envoy_binary, render, Render, Upstream};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use unbusy_envoy_config::admin;

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

/// A directory of its own for each Envoy this process starts (config, log, admin address).
fn run_dir() -> Result<PathBuf, String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir()
        .join("unbusy-e2e")
        .join(format!("envoy-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// A blocking `GET` on Envoy's admin interface: the status and the body.
fn admin_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(admin::get_request(path).as_bytes()).ok()?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).ok()?;
    admin::read_answer(&answer)
}

/// The address Envoy's listener named `name` bound (from the admin `/listeners`), once bound.
fn listener_address(admin: SocketAddr, name: &str) -> Option<SocketAddr> {
    let (status, body) = admin_get(admin, "/listeners?format=json")?;
    if status != 200 {
        return None;
    }
    admin::listener_address(&serde_json::from_str(&body).ok()?, name)
}

impl Envoy {
    /// Starts Envoy and waits until it is ready (or returns its log as the error). Its listener
    /// and admin interface bind port 0: the kernel picks free ports, and Envoy reports them.
    pub fn start(spec: &EnvoySpec<'_>) -> Result<Self, String> {
        let yaml = render(&Render {
            listen: ("127.0.0.1", 0),
            admin: ("127.0.0.1", 0),
            upstreams: spec.upstreams,
            filter: spec.filter,
            wasm: spec.wasm,
            native: spec.native,
            store: None,
        });
        Self::start_yaml(&yaml, spec.concurrency)
    }

    /// Starts Envoy with this YAML, whose listener is named `unbusy` (as [`render`] names it)
    /// and whose ports may be 0. Ready means: the admin interface answers at the address Envoy
    /// wrote (`--admin-address-path`), the server is live (`/ready`), and the listener is bound
    /// (its address from `/listeners`) and accepts connections.
    pub fn start_yaml(yaml: &str, concurrency: u32) -> Result<Self, String> {
        Self::start_yaml_env(yaml, concurrency, &[])
    }

    /// [`Envoy::start_yaml`] with these variables added to Envoy's environment (keys the
    /// filter reads through `host_env_keys`), and nowhere else.
    pub fn start_yaml_env(
        yaml: &str,
        concurrency: u32,
        env: &[(&str, &str)],
    ) -> Result<Self, String> {
        let dir = run_dir()?;
        let config = dir.join("envoy.yaml");
        let log = dir.join("envoy.log");
        let admin_path = dir.join("admin-address");
        std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--log-level", "warn", "--component-log-level", "wasm:info"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--use-dynamic-base-id")
            .arg("--base-id-path")
            .arg(dir.join("base-id"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start {}: {e} (run `make setup`)",
                    envoy_binary().display()
                )
            })?;
        let unbound = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut envoy = Self {
            child,
            listen: unbound,
            admin: unbound,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!("Envoy exited ({status}):\n{}", envoy.log_text()));
            }
            if envoy.admin == unbound {
                if let Some(a) = std::fs::read_to_string(&admin_path)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                {
                    envoy.admin = a;
                }
            }
            if envoy.admin != unbound && envoy.listen == unbound {
                let live = admin_get(envoy.admin, "/ready").is_some_and(|(s, _)| s == 200);
                if live {
                    if let Some(l) = listener_address(envoy.admin, "unbusy") {
                        envoy.listen = l;
                    }
                }
            }
            if envoy.listen != unbound && std::net::TcpStream::connect(envoy.listen).is_ok() {
                return Ok(envoy);
            }
            std::thread::sleep(Duration::from_millis(20));
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

impl Envoy {
    /// The text of a `GET` on Envoy's admin interface (`/stats?filter=...`, `/stats/prometheus`).
    pub async fn admin_text(&self, path: &str) -> Result<String, String> {
        request(self.admin, "GET", path, &[], "")
            .await
            .map(|r| r.text())
    }
}

/// Writes `bytes` (a request no HTTP client would send) on a fresh connection and returns the
/// status of the answer (0 when none came within 10 s).
pub async fn raw_status(addr: SocketAddr, bytes: &[u8]) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(bytes).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    Ok(text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
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
    request_observed(stream, started, method, path, headers, body, || ())
        .await
        .map(|(r, ())| r)
}

/// One HTTP/1.1 request on `stream` (a connection already open; `started` is when the reply's
/// times count from); `at_headers` runs the moment the response headers arrive, before the
/// body is read, and what it returns comes with the reply.
pub async fn request_observed<T>(
    stream: TcpStream,
    started: Instant,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
    at_headers: impl FnOnce() -> T,
) -> Result<(Reply, T), String> {
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
    let seen = at_headers();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| e.to_string());
    Ok((
        Reply {
            status,
            headers,
            body,
            headers_after,
            total: started.elapsed(),
        },
        seen,
    ))
}

/// The headers [`chat`] sends.
pub const CHAT_HEADERS: [(&str, &str); 2] = [
    ("content-type", "application/json"),
    ("authorization", "Bearer caller-key"),
];

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
    let mut headers = CHAT_HEADERS.to_vec();
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

/// The `q` quantile (0 to 1) of `values` by the nearest-rank rule (sorts them); 0 when empty.
pub fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return 0.0;
    }
    let i = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1;
    values.get(i).copied().unwrap_or(0.0)
}

/// A binary's `main`: runs `job` on a multi-threaded runtime; its error is printed after
/// `name` and the exit status is a failure.
pub fn run_main<F>(name: &str, job: F) -> std::process::ExitCode
where
    F: std::future::Future<Output = Result<(), String>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(job) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
