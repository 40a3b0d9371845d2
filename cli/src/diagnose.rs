//! `unbusy diagnose`: what is between you and a provider, phase by phase, and one verdict.
//!
//! ```text
//! unbusy diagnose [--provider NAME=URL ...] [URL ...] [--key-env VAR] [--model MODEL] [--json]
//!                 [--cacert FILE] [--dns-timeout D] [--connect-timeout D] [--tls-timeout D]
//!                 [--headers-timeout D] [--token-timeout D]
//! ```
//! For each provider, like `curl -v -w` would: DNS resolution (addresses, time), TCP connect,
//! the TLS handshake (version, ALPN, the certificate's validity), the time to the response
//! headers of a tiny streaming chat request (`POST …/v1/chat/completions`, `stream: true`,
//! `max_tokens: 1`), keep-alive bytes (blank lines, `: keep-alive` comments) counted and timed
//! apart from the first real token, the status and the body as the core classifies them
//! ([`unbusy_core::answer::assess`]). Then one [`Verdict`], and the exit code says which (the
//! first provider that is not healthy decides; see [`Verdict::code`]).
//!
//! The key is read from `--key-env VAR`, else `UNBUSY_KEY_<NAME>` (as `unbusy up` reads it), and
//! is sent only in the `authorization` header: it is never printed, in any output or error.
//! Every phase has its own timeout, so an endpoint that never answers gives a verdict too.
//!
//! Certificates are checked against the Mozilla roots built in (`webpki-roots`), plus the PEM
//! certificates of `--cacert FILE` (a company proxy's own CA, a self-hosted gateway).

use crate::Failure;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use unbusy_core::answer::assess;
use unbusy_core::classify::{
    classify, parse_go_duration, BodyProgress, CallerErrorKind, OutcomeClass, Response,
    TransportFault,
};
use unbusy_core::progress::{Feed, Framing, ProgressDetector};
use unbusy_envoy_config::{key_variable, Upstream};

/// The most body kept for classification and shown (a streamed answer with `max_tokens: 1` is
/// far shorter; an error body is too).
const BODY_KEEP: usize = 16 * 1024;

/// The one thing a person should act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A real token arrived: the provider answers.
    Healthy,
    /// The name did not resolve, or no address took the connection.
    Network,
    /// The TLS handshake failed (certificate not trusted, expired, wrong name, or no handshake).
    Tls,
    /// Something other than the API answered: a proxy's 407, or an HTML page.
    Proxy,
    /// 401/403 (the key was refused or none was given), 402 or a used-up quota.
    Key,
    /// 429: the account or the provider's rate limit; the hint says when to come back.
    RateLimited,
    /// 503/529, an overload body (on any status, a 200 included), keep-alive queueing with no
    /// token, or no response headers in time.
    Overloaded,
    /// The provider answered with an error that is none of the above (a 500, a 400 or 404 for
    /// the test request, an answer that is not one).
    ProviderError,
}

impl Verdict {
    /// The exit code (0 healthy; 1 and 2 are the command's own errors and usage).
    pub(crate) const fn code(self) -> u8 {
        match self {
            Self::Healthy => 0,
            Self::Network => 3,
            Self::Tls => 4,
            Self::Proxy => 5,
            Self::Key => 6,
            Self::RateLimited => 7,
            Self::Overloaded => 8,
            Self::ProviderError => 9,
        }
    }

    /// A stable name, for `--json`.
    const fn label(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Network => "network",
            Self::Tls => "tls",
            Self::Proxy => "proxy",
            Self::Key => "key",
            Self::RateLimited => "rate_limited",
            Self::Overloaded => "overloaded",
            Self::ProviderError => "provider_error",
        }
    }

    /// What a person reads.
    const fn headline(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Network => "local network or DNS problem",
            Self::Tls => "TLS problem",
            Self::Proxy => "proxy in the way",
            Self::Key => "bad key or no balance",
            Self::RateLimited => "rate limited",
            Self::Overloaded => "provider overloaded",
            Self::ProviderError => "provider error",
        }
    }
}

/// Per-phase limits.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    dns: Duration,
    connect: Duration,
    tls: Duration,
    headers: Duration,
    token: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            dns: Duration::from_secs(5),
            connect: Duration::from_secs(5),
            tls: Duration::from_secs(10),
            headers: Duration::from_secs(30),
            token: Duration::from_secs(30),
        }
    }
}

fn parse_duration(flag: &str, v: &str) -> Result<Duration, Failure> {
    let nanos = parse_go_duration(v).or_else(|| {
        v.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| (s * 1e9) as u64)
    });
    match nanos {
        Some(n) if n > 0 => Ok(Duration::from_nanos(n)),
        _ => Err(Failure::Usage(format!(
            "{flag} {v:?}: expected a duration such as 5s, 500ms or 2.5"
        ))),
    }
}

/// One provider to diagnose.
struct Target {
    upstream: Upstream,
    /// Where the key is read from (the variable's name, never its value).
    key_env: String,
}

/// Names a provider given as a bare URL: the label before the top-level domain
/// (`api.deepseek.com` → `deepseek`), or `provider` for an address.
fn name_for(url: &str) -> String {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let host = rest.split(['/', ':']).next().unwrap_or("");
    let labels: Vec<&str> = host.split('.').collect();
    let ok = |l: &str| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return "provider".into();
    }
    let label = match labels.len() {
        0 | 1 => labels.first(),
        n => labels.get(n - 2),
    };
    match label {
        Some(l) if ok(l) => (*l).to_string(),
        _ => "provider".into(),
    }
}

/// Runs `unbusy diagnose` with the arguments after `diagnose`.
pub(crate) fn run(mut args: impl Iterator<Item = String>) -> Result<ExitCode, Failure> {
    let mut specs: Vec<String> = Vec::new();
    let mut key_env: Option<String> = None;
    let mut model = "deepseek-chat".to_string();
    let mut as_json = false;
    let mut t = Timeouts::default();
    let mut extra_roots: Vec<CertificateDer<'static>> = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| Failure::Usage(format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--provider" => specs.push(value()?),
            "--key-env" => key_env = Some(value()?),
            "--model" => model = value()?,
            "--json" => as_json = true,
            "--cacert" => {
                let path = value()?;
                let pem = std::fs::read(&path).map_err(|e| format!("--cacert {path}: {e}"))?;
                let before = extra_roots.len();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    extra_roots.push(cert.map_err(|e| format!("--cacert {path}: {e}"))?);
                }
                if extra_roots.len() == before {
                    return Err(format!("--cacert {path}: no PEM certificate in it").into());
                }
            }
            "--dns-timeout" => t.dns = parse_duration(&arg, &value()?)?,
            "--connect-timeout" => t.connect = parse_duration(&arg, &value()?)?,
            "--tls-timeout" => t.tls = parse_duration(&arg, &value()?)?,
            "--headers-timeout" => t.headers = parse_duration(&arg, &value()?)?,
            "--token-timeout" => t.token = parse_duration(&arg, &value()?)?,
            "-h" | "--help" => return Err(Failure::Usage(String::new())),
            url if url.starts_with("http://") || url.starts_with("https://") => {
                specs.push(format!("{}={url}", name_for(url)));
            }
            other => return Err(Failure::Usage(format!("unknown argument {other:?}"))),
        }
    }
    if specs.is_empty() {
        return Err(Failure::Usage(
            "unbusy diagnose: give a URL or --provider NAME=URL".into(),
        ));
    }
    let mut targets = Vec::new();
    for spec in &specs {
        let upstream = Upstream::parse(spec).map_err(Failure::Usage)?;
        let key_env = key_env
            .clone()
            .unwrap_or_else(|| key_variable(&upstream.name));
        targets.push(Target { upstream, key_env });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let mut reports = Vec::new();
    for target in &targets {
        let key = std::env::var(&target.key_env)
            .ok()
            .filter(|k| !k.is_empty());
        let report = runtime.block_on(probe(target, key.as_deref(), &model, t, &extra_roots));
        if !as_json {
            out(&report.human());
        }
        reports.push(report);
    }
    let code = reports
        .iter()
        .map(|r| r.verdict.code())
        .find(|c| *c != 0)
        .unwrap_or(0);
    if as_json {
        let doc = json!({
            "providers": reports.iter().map(Report::json).collect::<Vec<_>>(),
            "exit_code": code,
        });
        out(&format!("{doc:#}\n"));
    }
    Ok(ExitCode::from(code))
}

/// Writes to stdout; a closed stdout (`| head`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// A phase's timing: milliseconds since the probe started, when it ended, and how long it took.
#[derive(Debug, Clone, Copy, Default)]
struct Timing {
    took_ms: f64,
    at_ms: f64,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[derive(Debug, Default)]
struct TlsInfo {
    timing: Timing,
    version: String,
    alpn: Option<String>,
    not_before: Option<String>,
    not_after: Option<String>,
    days_left: Option<i64>,
}

#[derive(Debug, Default)]
struct KeepAlive {
    bytes: u64,
    chunks: u64,
    first_ms: Option<f64>,
    last_ms: Option<f64>,
}

/// Everything measured for one provider.
#[derive(Debug)]
struct Report {
    name: String,
    url: String,
    key_env: String,
    key_given: bool,
    path: String,
    dns: Option<(Timing, Vec<String>)>,
    connect: Option<(Timing, String)>,
    tls: Option<TlsInfo>,
    headers: Option<Timing>,
    status: Option<u16>,
    content_type: Option<String>,
    retry_after_s: Option<f64>,
    keepalive: KeepAlive,
    first_token_ms: Option<f64>,
    body_complete: bool,
    body_excerpt: String,
    class: Option<&'static str>,
    total_ms: f64,
    verdict: Verdict,
    detail: String,
}

impl Report {
    fn new(target: &Target, key_given: bool, path: String) -> Self {
        Self {
            name: target.upstream.name.clone(),
            url: target.upstream.url.clone(),
            key_env: target.key_env.clone(),
            key_given,
            path,
            dns: None,
            connect: None,
            tls: None,
            headers: None,
            status: None,
            content_type: None,
            retry_after_s: None,
            keepalive: KeepAlive::default(),
            first_token_ms: None,
            body_complete: false,
            body_excerpt: String::new(),
            class: None,
            total_ms: 0.0,
            verdict: Verdict::ProviderError,
            detail: String::new(),
        }
    }

    fn done(mut self, start: Instant, verdict: Verdict, detail: impl Into<String>) -> Self {
        self.total_ms = ms(start.elapsed());
        self.verdict = verdict;
        self.detail = detail.into();
        self
    }

    fn human(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "{}  {}", self.name, self.url);
        if let Some((t, addrs)) = &self.dns {
            let _ = writeln!(
                o,
                "  dns          {} ({:.1} ms)",
                addrs.join(", "),
                t.took_ms
            );
        }
        if let Some((t, addr)) = &self.connect {
            let _ = writeln!(
                o,
                "  connect      {addr} ({:.1} ms, at {:.1} ms)",
                t.took_ms, t.at_ms
            );
        }
        if let Some(tls) = &self.tls {
            let cert = match (&tls.not_after, tls.days_left) {
                (Some(after), Some(days)) => format!(
                    ", certificate valid {} to {after} ({days} days left)",
                    tls.not_before.as_deref().unwrap_or("?")
                ),
                _ => String::new(),
            };
            let _ = writeln!(
                o,
                "  tls          {}, ALPN {}{cert} ({:.1} ms, at {:.1} ms)",
                tls.version,
                tls.alpn.as_deref().unwrap_or("none"),
                tls.timing.took_ms,
                tls.timing.at_ms
            );
        }
        if self.connect.is_some() {
            let key = if self.key_given {
                format!("key from {}", self.key_env)
            } else {
                format!("no key: {} is not set", self.key_env)
            };
            let _ = writeln!(
                o,
                "  request      POST {} (stream, max_tokens 1, {key})",
                self.path
            );
        }
        if let (Some(t), Some(status)) = (self.headers, self.status) {
            let _ = writeln!(
                o,
                "  headers      {status} {} (at {:.1} ms)",
                self.content_type.as_deref().unwrap_or("(no content-type)"),
                t.at_ms
            );
        }
        if let Some(s) = self.retry_after_s {
            let _ = writeln!(o, "  retry hint   {s:.3} s");
        }
        let k = &self.keepalive;
        if let (Some(first), Some(last)) = (k.first_ms, k.last_ms) {
            let _ = writeln!(
                o,
                "  keep-alive   {} bytes in {} chunks, from {first:.1} ms to {last:.1} ms",
                k.bytes, k.chunks
            );
        }
        if let Some(t) = self.first_token_ms {
            let _ = writeln!(o, "  first token  at {t:.1} ms");
        }
        if self.status.is_some() {
            let _ = writeln!(
                o,
                "  body         {}{}{}",
                if self.body_complete {
                    "complete"
                } else {
                    "not complete"
                },
                self.class.map_or(String::new(), |c| format!(", class {c}")),
                if self.body_excerpt.is_empty() {
                    String::new()
                } else {
                    format!(": {}", self.body_excerpt)
                }
            );
        }
        let _ = writeln!(o, "  total        {:.1} ms", self.total_ms);
        let _ = writeln!(
            o,
            "  verdict      {} (exit {}): {}",
            self.verdict.headline(),
            self.verdict.code(),
            self.detail
        );
        o
    }

    fn json(&self) -> Value {
        let timing = |t: &Timing| json!({"took_ms": t.took_ms, "at_ms": t.at_ms});
        json!({
            "name": self.name,
            "url": self.url,
            "key_env": self.key_env,
            "key_given": self.key_given,
            "request_path": self.path,
            "dns": self.dns.as_ref().map(|(t, a)| json!({"timing": timing(t), "addresses": a})),
            "connect": self.connect.as_ref().map(|(t, a)| json!({"timing": timing(t), "address": a})),
            "tls": self.tls.as_ref().map(|s| json!({
                "timing": timing(&s.timing),
                "version": s.version,
                "alpn": s.alpn,
                "certificate": {"not_before": s.not_before, "not_after": s.not_after, "days_left": s.days_left},
            })),
            "headers": self.headers.as_ref().map(timing),
            "status": self.status,
            "content_type": self.content_type,
            "retry_after_s": self.retry_after_s,
            "keepalive": {
                "bytes": self.keepalive.bytes,
                "chunks": self.keepalive.chunks,
                "first_ms": self.keepalive.first_ms,
                "last_ms": self.keepalive.last_ms,
            },
            "first_token_ms": self.first_token_ms,
            "body_complete": self.body_complete,
            "body_excerpt": self.body_excerpt,
            "class": self.class,
            "total_ms": self.total_ms,
            "verdict": self.verdict.label(),
            "headline": self.verdict.headline(),
            "exit_code": self.verdict.code(),
            "detail": self.detail,
        })
    }
}

/// The chat path under the provider's base URL: `…/v1/chat/completions`, or
/// `…/chat/completions` when the base already ends with `/v1`.
fn chat_path(url: &str) -> String {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let base = rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("");
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1") {
        format!("{base}/chat/completions")
    } else {
        format!("{base}/v1/chat/completions")
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A one-line, printable excerpt of a body (control characters shown as spaces).
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body.get(..300).unwrap_or(body));
    let one: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    one.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Never lets the key through in a message: any error text that could echo it is scrubbed.
fn scrub(text: String, key: Option<&str>) -> String {
    match key {
        Some(k) if !k.is_empty() && text.contains(k) => text.replace(k, "<key>"),
        _ => text,
    }
}

async fn probe(
    target: &Target,
    key: Option<&str>,
    model: &str,
    t: Timeouts,
    roots: &[CertificateDer<'static>],
) -> Report {
    let mut report = probe_inner(target, key, model, t, roots).await;
    report.detail = scrub(std::mem::take(&mut report.detail), key);
    report.body_excerpt = scrub(std::mem::take(&mut report.body_excerpt), key);
    report
}

async fn probe_inner(
    target: &Target,
    key: Option<&str>,
    model: &str,
    t: Timeouts,
    extra_roots: &[CertificateDer<'static>],
) -> Report {
    let up = &target.upstream;
    let start = Instant::now();
    let mut r = Report::new(target, key.is_some(), chat_path(&up.url));
    let proxy_note = ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        .iter()
        .find(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
        .map(|v| format!(" ({v} is set; diagnose connects directly, without it)"))
        .unwrap_or_default();

    // DNS.
    let host = up.host.trim_matches(['[', ']']).to_string();
    let t0 = Instant::now();
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        t.dns,
        tokio::net::lookup_host((host.as_str(), up.port)),
    )
    .await
    {
        Err(_) => {
            return r.done(
                start,
                Verdict::Network,
                format!(
                    "resolving {host} took longer than {:?}: check DNS{proxy_note}",
                    t.dns
                ),
            )
        }
        Ok(Err(e)) => {
            return r.done(
                start,
                Verdict::Network,
                format!("cannot resolve {host}: {e}; check the network and DNS{proxy_note}"),
            )
        }
        Ok(Ok(a)) => a.collect(),
    };
    let dns = Timing {
        took_ms: ms(t0.elapsed()),
        at_ms: ms(start.elapsed()),
    };
    r.dns = Some((dns, addrs.iter().map(|a| a.ip().to_string()).collect()));
    if addrs.is_empty() {
        return r.done(
            start,
            Verdict::Network,
            format!("{host} resolved to no address"),
        );
    }

    // TCP connect: each address in turn, within the one connect timeout.
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + t.connect;
    let mut failures = Vec::new();
    let mut tcp = None;
    for addr in &addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                tcp = Some((s, *addr));
                break;
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => {
                failures.push(format!("{addr}: no answer within {:?}", t.connect));
                break;
            }
        }
    }
    let Some((tcp, addr)) = tcp else {
        return r.done(
            start,
            Verdict::Network,
            format!(
                "cannot connect to {host}:{} ({}): a firewall, no route, or nothing listening{proxy_note}",
                up.port,
                failures.join("; ")
            ),
        );
    };
    let _ = tcp.set_nodelay(true);
    r.connect = Some((
        Timing {
            took_ms: ms(t0.elapsed()),
            at_ms: ms(start.elapsed()),
        },
        addr.to_string(),
    ));

    // TLS.
    let io: Box<dyn Io> = if up.tls {
        let t0 = Instant::now();
        match tls_handshake(tcp, &host, t.tls, extra_roots).await {
            Ok((stream, mut info)) => {
                info.timing = Timing {
                    took_ms: ms(t0.elapsed()),
                    at_ms: ms(start.elapsed()),
                };
                let expired = info.days_left.is_some_and(|d| d < 0);
                r.tls = Some(info);
                if expired {
                    return r.done(start, Verdict::Tls, "the certificate has expired");
                }
                Box::new(stream)
            }
            Err(e) => {
                return r.done(
                    start,
                    Verdict::Tls,
                    format!("TLS handshake with {host} failed: {e}{proxy_note}"),
                )
            }
        }
    } else {
        Box::new(tcp)
    };

    // The request.
    let body = json!({
        "model": model,
        "stream": true,
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "Say OK."}],
    })
    .to_string();
    let authority = if (up.tls && up.port == 443) || (!up.tls && up.port == 80) {
        up.host.clone()
    } else {
        format!("{}:{}", up.host, up.port)
    };
    let mut builder = hyper::Request::builder()
        .method("POST")
        .uri(r.path.as_str())
        .header("host", authority)
        .header("content-type", "application/json")
        .header("accept", "text/event-stream")
        .header("accept-encoding", "identity")
        .header(
            "user-agent",
            concat!("unbusy-diagnose/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(k) = key {
        match hyper::header::HeaderValue::from_str(&format!("Bearer {k}")) {
            Ok(mut v) => {
                v.set_sensitive(true);
                builder = builder.header("authorization", v);
            }
            Err(_) => {
                return r.done(
                    start,
                    Verdict::Key,
                    format!(
                        "the key in {} cannot be sent in a header (a newline or control character in it?)",
                        target.key_env
                    ),
                )
            }
        }
    }
    let request = match builder.body(Full::new(Bytes::from(body))) {
        Ok(req) => req,
        Err(e) => {
            return r.done(
                start,
                Verdict::ProviderError,
                format!("cannot build the request: {e}"),
            )
        }
    };
    let headers_deadline = tokio::time::Instant::now() + t.headers;
    let exchange = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(conn);
        sender.send_request(request).await
    };
    let response = match tokio::time::timeout_at(headers_deadline, exchange).await {
        Err(_) => {
            return r.done(
                start,
                Verdict::Overloaded,
                format!(
                    "connected, but no response headers within {:?}: the provider accepts connections and does not answer",
                    t.headers
                ),
            )
        }
        Ok(Err(e)) => {
            return r.done(
                start,
                Verdict::Network,
                format!("the connection failed before response headers: {e}{proxy_note}"),
            )
        }
        Ok(Ok(resp)) => resp,
    };
    r.headers = Some(Timing {
        took_ms: ms(start.elapsed()) - r.connect.as_ref().map_or(0.0, |c| c.0.at_ms),
        at_ms: ms(start.elapsed()),
    });
    let status = response.status().as_u16();
    r.status = Some(status);
    let header_pairs: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    r.content_type = header_pairs
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.clone());

    // The body: keep-alive bytes apart from the first real token.
    let framing = Framing::from_content_type(r.content_type.as_deref().unwrap_or(""));
    let mut detector = ProgressDetector::new(framing, 0);
    let mut kept: Vec<u8> = Vec::new();
    let mut body = response.into_body();
    let token_deadline = tokio::time::Instant::now() + t.token;
    let mut timed_out = false;
    let mut failed: Option<String> = None;
    loop {
        match tokio::time::timeout_at(token_deadline, body.frame()).await {
            Err(_) => {
                timed_out = true;
                break;
            }
            Ok(None) => {
                r.body_complete = true;
                break;
            }
            Ok(Some(Err(e))) => {
                failed = Some(e.to_string());
                break;
            }
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                let now = start.elapsed();
                let now_ms = ms(now);
                match detector.feed(u64::try_from(now.as_nanos()).unwrap_or(u64::MAX), &data) {
                    Feed::KeepAlive => {
                        let k = &mut r.keepalive;
                        k.bytes += data.len() as u64;
                        k.chunks += 1;
                        k.first_ms.get_or_insert(now_ms);
                        k.last_ms = Some(now_ms);
                    }
                    // An error body is real bytes, not a token.
                    Feed::FirstProgress if (200..=299).contains(&status) => {
                        r.first_token_ms = Some(now_ms);
                    }
                    Feed::FirstProgress => {}
                    Feed::Progress => {}
                }
                let room = BODY_KEEP.saturating_sub(kept.len());
                kept.extend_from_slice(data.get(..room.min(data.len())).unwrap_or(&data));
                // A real token after a complete small answer: enough, unless the stream is still
                // short of its end (read on until it ends or the token timeout).
            }
        }
    }
    let unix_now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    let pairs: Vec<(&str, &str)> = header_pairs
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let progressed = r.first_token_ms.is_some();
    let classification = if r.body_complete {
        assess(status, &pairs, &kept, unix_now).classification
    } else {
        classify(&Response {
            status,
            headers: &pairs,
            body_prefix: &kept,
            progress: if progressed {
                BodyProgress::Real
            } else {
                BodyProgress::KeepAliveOnly
            },
            unix_now_s: unix_now,
        })
    };
    r.class = Some(classification.class.label());
    r.retry_after_s = classification.retry_after.map(|n| n as f64 / 1e9);
    let shown = if classification.class == OutcomeClass::Success
        || classification.class == OutcomeClass::Transport(TransportFault::Stall)
    {
        // An answer, or keep-alive bytes only: nothing worth showing.
        Vec::new()
    } else {
        kept.clone()
    };
    r.body_excerpt = excerpt(&shown);

    let is_html = r
        .content_type
        .as_deref()
        .is_some_and(|c| c.to_ascii_lowercase().contains("text/html"));
    let ka = &r.keepalive;
    let queueing = if ka.chunks > 0 {
        format!(
            "; {} keep-alive bytes in {} chunks before {}",
            ka.bytes,
            ka.chunks,
            if progressed {
                "the first token"
            } else {
                "giving up"
            }
        )
    } else {
        String::new()
    };
    let hint = r
        .retry_after_s
        .map(|s| format!("; it asks to wait {s:.1} s before retrying"))
        .unwrap_or_default();
    let (verdict, detail) = match classification.class {
        _ if status == 407 => (
            Verdict::Proxy,
            format!("407 Proxy Authentication Required: a proxy answered, not {host}{proxy_note}"),
        ),
        OutcomeClass::Success => (
            Verdict::Healthy,
            format!(
                "{status}, first token at {:.0} ms{queueing}{}",
                r.first_token_ms.unwrap_or(r.total_ms),
                if timed_out {
                    " (the stream had not ended when the token timeout came)"
                } else {
                    ""
                }
            ),
        ),
        _ if is_html => (
            Verdict::Proxy,
            format!("{status} with an HTML page instead of the API's JSON: a proxy, gateway or captive portal answered{proxy_note}"),
        ),
        OutcomeClass::CallerError(CallerErrorKind::Auth) => (
            Verdict::Key,
            if key.is_some() {
                format!("{status}: the key in {} was refused", target.key_env)
            } else {
                format!("{status}: no key was sent; set {}", target.key_env)
            },
        ),
        OutcomeClass::CallerError(CallerErrorKind::Billing) => (
            Verdict::Key,
            format!("{status}: no balance or quota left on the account of the key in {}", target.key_env),
        ),
        OutcomeClass::RateLimited => (
            Verdict::RateLimited,
            format!("{status}: rate limited{hint}"),
        ),
        OutcomeClass::Busy => (
            Verdict::Overloaded,
            format!("{status} with an overload answer{hint}"),
        ),
        OutcomeClass::Transport(TransportFault::Stall) => (
            Verdict::Overloaded,
            format!(
                "{status}, then keep-alive only and no token{}: the request is queued at the provider{queueing}",
                if timed_out {
                    format!(" within {:?}", t.token)
                } else {
                    String::new()
                }
            ),
        ),
        OutcomeClass::Transport(TransportFault::Timeout) => (
            Verdict::Overloaded,
            format!("{status}: the provider timed out"),
        ),
        OutcomeClass::Transport(_) => (
            Verdict::Network,
            format!(
                "{status}, then the connection broke{}",
                failed.map(|e| format!(": {e}")).unwrap_or_default()
            ),
        ),
        OutcomeClass::ServerError if timed_out && !progressed => (
            Verdict::Overloaded,
            format!("{status}, and nothing within {:?}", t.token),
        ),
        OutcomeClass::ServerError | OutcomeClass::CallerError(_) => (
            Verdict::ProviderError,
            format!(
                "{status}: the provider answered with an error{}",
                if (400..=499).contains(&status) {
                    " to the test request (is --model right for this provider?)"
                } else {
                    ""
                }
            ),
        ),
    };
    r.done(start, verdict, detail)
}

async fn tls_handshake(
    tcp: TcpStream,
    host: &str,
    timeout: Duration,
    extra_roots: &[CertificateDer<'static>],
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, TlsInfo), String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("a --cacert certificate is not usable as a root: {e}"))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a valid TLS server name: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Err(_) => return Err(format!("no handshake within {timeout:?}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(s)) => s,
    };
    let conn = stream.get_ref().1;
    let mut info = TlsInfo {
        version: conn.protocol_version().map_or("unknown".into(), |v| {
            format!("{v:?}").replace("TLSv1_", "TLSv1.")
        }),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        ..TlsInfo::default()
    };
    if let Some((before, after)) = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| cert_validity(c.as_ref()))
    {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        info.days_left = Some((after.1 - now).div_euclid(86_400));
        info.not_before = Some(before.0);
        info.not_after = Some(after.0);
    }
    Ok((stream, info))
}

/// One DER element: its tag, its contents and what follows it.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = rest.get(..n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest.get(n..)?)
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// A certificate's validity (`notBefore`, `notAfter`), each as text and Unix seconds, read
/// from its DER without a parser crate: Certificate → tbsCertificate → the optional version, serial,
/// signature, issuer, validity.
fn cert_validity(cert: &[u8]) -> Option<((String, i64), (String, i64))> {
    let (_, cert, _) = der(cert)?;
    let (_, tbs, _) = der(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = der(rest)?;
    if tag == 0xa0 {
        rest = r;
    }
    for _ in 0..3 {
        rest = der(rest)?.2; // serial, signature, issuer
    }
    let (_, validity, _) = der(rest)?;
    let (t1, before, r) = der(validity)?;
    let (t2, after, _) = der(r)?;
    Some((asn1_time(t1, before)?, asn1_time(t2, after)?))
}

/// A UTCTime (tag 0x17) or GeneralizedTime (0x18), `Z` form, as `YYYY-MM-DD HH:MM:SS UTC` and
/// Unix seconds.
fn asn1_time(tag: u8, v: &[u8]) -> Option<(String, i64)> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s.get(..2)?.parse().ok()?;
            (if yy < 50 { 2000 + yy } else { 1900 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (mo, d, h, mi, se) = (num(0)?, num(2)?, num(4)?, num(6)?, num(8)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if mo > 2 { mo - 3 } else { mo + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((
        format!("{year:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{se:02} UTC"),
        days * 86_400 + h * 3600 + mi * 60 + se,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn chat_paths() {
        assert_eq!(
            chat_path("https://api.deepseek.com"),
            "/v1/chat/completions"
        );
        assert_eq!(chat_path("https://x.com/v1"), "/v1/chat/completions");
        assert_eq!(chat_path("http://h:1/proxy/"), "/proxy/v1/chat/completions");
    }

    #[test]
    fn names() {
        assert_eq!(name_for("https://api.deepseek.com"), "deepseek");
        assert_eq!(name_for("http://127.0.0.1:8080"), "provider");
        assert_eq!(name_for("http://localhost:8080/v1"), "localhost");
    }

    #[test]
    fn times() {
        assert_eq!(
            asn1_time(0x17, b"250101000000Z").unwrap(),
            ("2025-01-01 00:00:00 UTC".into(), 1_735_689_600)
        );
        assert_eq!(asn1_time(0x18, b"19700101000001Z").unwrap().1, 1);
    }

    #[test]
    fn scrubbed() {
        assert_eq!(scrub("a sk-1 b".into(), Some("sk-1")), "a <key> b");
    }
}
