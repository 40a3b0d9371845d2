//! `unbusy diagnose` end to end: the binary cargo builds, against the busy-provider emulator in
//! each of its faults, a raw server answering 401, an unresolvable name, a refused port, a
//! listener that never answers, and a TLS server with a self-signed certificate. Each case
//! checks the verdict, its exit code and the measurement that justifies it; every case checks
//! that the key given never appears in what the command printed.
//!
//! Nothing here needs Envoy or the network: everything listens on loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::Value;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use unbusy_tests::emulator::{start, AnswerShape, Behaviour};
use unbusy_tests::scenario::{FaultWindow, Latency, Provider};

/// A key no other test uses: finding it in the output means diagnose printed it.
fn key() -> String {
    format!(
        "sk-diagnose-secret-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs `unbusy diagnose ARGS` with `UNBUSY_KEY_EMU` set to `key` (off the runtime's threads).
async fn diagnose(args: &[&str], key: &str) -> Run {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let key = key.to_string();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_unbusy"))
            .arg("diagnose")
            .args(&args)
            .env("UNBUSY_KEY_EMU", &key)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .output()
            .unwrap();
        let run = Run {
            code: out.status.code().unwrap(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        };
        assert!(
            !run.stdout.contains(&key) && !run.stderr.contains(&key),
            "the key was printed:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        run
    })
    .await
    .unwrap()
}

/// Runs diagnose on one provider twice (text, then `--json`) and returns the JSON report of the
/// provider, after checking that both runs agree on the exit code and the text names the verdict.
async fn verdict_of(url: &str, extra: &[&str], key: &str) -> (i32, Value, String) {
    let spec = format!("emu={url}");
    let mut args = vec!["--provider", spec.as_str()];
    args.extend_from_slice(extra);
    let text = diagnose(&args, key).await;
    args.push("--json");
    let json = diagnose(&args, key).await;
    assert_eq!(text.code, json.code, "{}\n{}", text.stdout, json.stdout);
    let doc: Value = serde_json::from_str(&json.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", json.stdout, json.stderr));
    assert_eq!(doc["exit_code"], json.code);
    let report = doc["providers"][0].clone();
    assert!(
        text.stdout.contains(report["headline"].as_str().unwrap()),
        "{}",
        text.stdout
    );
    (json.code, report, text.stdout)
}

fn emulator(faults: Vec<FaultWindow>, answer: AnswerShape) -> Behaviour {
    Behaviour {
        provider: Provider {
            name: "emu".into(),
            latency_ms: Latency {
                first_token: [20.0, 40.0],
                total: [60.0, 100.0],
            },
            faults,
            ..Provider::default()
        },
        keepalive_every: Duration::from_millis(50),
        answer,
        ..Behaviour::default()
    }
}

fn always(f: FaultWindow) -> Vec<FaultWindow> {
    vec![FaultWindow {
        from_s: 0.0,
        to_s: 1e9,
        ..f
    }]
}

async fn emulated(faults: Vec<FaultWindow>, answer: AnswerShape) -> String {
    let (_, addr) = start(emulator(faults, answer), 7, "127.0.0.1:0")
        .await
        .unwrap();
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_provider_is_healthy_and_gets_the_key() {
    let key = key();
    let (emu, addr) = start(emulator(vec![], AnswerShape::Normal), 1, "127.0.0.1:0")
        .await
        .unwrap();
    let (code, r, text) = verdict_of(&format!("http://{addr}"), &[], &key).await;
    assert_eq!(code, 0, "{text}");
    assert_eq!(r["verdict"], "healthy");
    assert_eq!(r["status"], 200);
    assert_eq!(r["class"], "success");
    let first = r["first_token_ms"].as_f64().unwrap();
    assert!(first >= r["headers"]["at_ms"].as_f64().unwrap());
    assert!(r["dns"]["addresses"][0] == "127.0.0.1");
    assert!(r["connect"]["timing"]["at_ms"].as_f64().is_some());
    assert_eq!(r["keepalive"]["chunks"], 0);
    assert!(text.contains("first token"), "{text}");
    // The request was the tiny streaming one, with the key from UNBUSY_KEY_EMU.
    let recent = emu.stats().recent;
    let last = recent.last().unwrap();
    assert!(last.stream);
    assert_eq!(last.max_tokens, Some(1));
    assert_eq!(
        last.authorization.as_deref(),
        Some(&*format!("Bearer {key}"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_with_its_hint() {
    let url = emulated(
        always(FaultWindow {
            rate_limit_429: 1.0,
            retry_after_s: 7.0,
            ..FaultWindow::default()
        }),
        AnswerShape::Normal,
    )
    .await;
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 7, "{text}");
    assert_eq!(r["verdict"], "rate_limited");
    assert_eq!(r["status"], 429);
    assert_eq!(r["retry_after_s"], 7.0);
    // The error body is not a token.
    assert!(r["first_token_ms"].is_null(), "{r}");
    assert!(text.contains("wait 7.0 s"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_overloaded() {
    let url = emulated(
        always(FaultWindow {
            busy_503: 1.0,
            ..FaultWindow::default()
        }),
        AnswerShape::Normal,
    )
    .await;
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 8, "{text}");
    assert_eq!(r["verdict"], "overloaded");
    assert_eq!(r["status"], 503);
    assert_eq!(r["class"], "busy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_body_in_a_200_is_overloaded() {
    let url = emulated(vec![], AnswerShape::Overload200).await;
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 8, "{text}");
    assert_eq!(r["verdict"], "overloaded");
    assert_eq!(r["status"], 200);
    assert_eq!(r["class"], "busy");
    assert!(r["body_excerpt"].as_str().unwrap().contains("服务器繁忙"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_queueing_is_overloaded_and_counted() {
    // The stall ends (the provider closes) before the token timeout.
    let url = emulated(
        always(FaultWindow {
            stall: 1.0,
            stall_s: 1.0,
            ..FaultWindow::default()
        }),
        AnswerShape::Normal,
    )
    .await;
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 8, "{text}");
    assert_eq!(r["verdict"], "overloaded");
    assert_eq!(r["status"], 200);
    assert_eq!(r["class"], "stall");
    assert!(r["first_token_ms"].is_null());
    assert!(r["keepalive"]["chunks"].as_u64().unwrap() >= 5, "{r}");
    assert!(
        r["keepalive"]["last_ms"].as_f64().unwrap() > r["keepalive"]["first_ms"].as_f64().unwrap()
    );
    assert!(text.contains("keep-alive"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stall_is_cut_by_the_token_timeout() {
    let url = emulated(
        always(FaultWindow {
            stall: 1.0,
            stall_s: 600.0,
            ..FaultWindow::default()
        }),
        AnswerShape::Normal,
    )
    .await;
    let spec = format!("emu={url}");
    let run = diagnose(
        &["--provider", &spec, "--token-timeout", "1s", "--json"],
        &key(),
    )
    .await;
    assert_eq!(run.code, 8, "{}", run.stdout);
    assert!(run.took < Duration::from_secs(10), "{:?}", run.took);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["providers"][0]["class"], "stall");
}

/// Reads one request (head and `content-length` body), answers `response`, and closes.
async fn answer_once<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, response: &str) {
    let mut buf = vec![0u8; 16384];
    let mut got = Vec::new();
    loop {
        let Ok(n) = s.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                break;
            }
        }
    }
    let _ = s.write_all(response.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// A raw HTTP/1.1 server that answers every request with `response` (then closes).
async fn raw_server(response: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(answer_once(s, response));
        }
    });
    format!("http://{addr}")
}

/// DeepSeek's answer to a bad key, as a whole HTTP/1.1 response.
fn unauthorized() -> &'static str {
    let body = r#"{"error":{"message":"Authentication Fails, Your api key is invalid","type":"authentication_error"}}"#;
    let response = format!(
        "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    Box::leak(response.into_boxed_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_is_a_key_problem() {
    let url = raw_server(unauthorized()).await;
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 6, "{text}");
    assert_eq!(r["verdict"], "key");
    assert_eq!(r["status"], 401);
    assert!(text.contains("UNBUSY_KEY_EMU was refused"), "{text}");
}

/// A whole HTTP/1.1 response with a JSON (or given) body.
fn response(status: &str, content_type: &str, body: &str) -> &'static str {
    let r = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    Box::leak(r.into_boxed_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_balance_is_a_key_problem() {
    let url = raw_server(response(
        "402 Payment Required",
        "application/json",
        r#"{"error":{"message":"Insufficient Balance","type":"unknown_error"}}"#,
    ))
    .await;
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 6, "{text}");
    assert_eq!(r["status"], 402);
    assert!(text.contains("no balance"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_407_or_an_html_page_is_a_proxy() {
    let url = raw_server(response(
        "407 Proxy Authentication Required",
        "text/plain",
        "proxy auth required",
    ))
    .await;
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 5, "{text}");
    assert_eq!(r["verdict"], "proxy");
    // A gateway's page passed on as a 200 (the emulator's html_200 shape).
    let url = emulated(vec![], AnswerShape::Html200).await;
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 5, "{text}");
    assert_eq!(r["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_is_a_provider_error() {
    let url = emulated(
        always(FaultWindow {
            error_500: 1.0,
            ..FaultWindow::default()
        }),
        AnswerShape::Normal,
    )
    .await;
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 9, "{text}");
    assert_eq!(r["verdict"], "provider_error");
    assert_eq!(r["status"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_name_is_a_network_problem() {
    let (code, r, text) = verdict_of(
        "http://nonexistent.invalid",
        &["--dns-timeout", "3s"],
        &key(),
    )
    .await;
    assert_eq!(code, 3, "{text}");
    assert_eq!(r["verdict"], "network");
    assert!(r["connect"].is_null());
    assert!(text.contains("local network or DNS problem"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_port_is_a_network_problem() {
    // A port that was just free: bound, then closed (nothing listens on it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, r, text) = verdict_of(&format!("http://127.0.0.1:{port}"), &[], &key()).await;
    assert_eq!(code, 3, "{text}");
    assert_eq!(r["verdict"], "network");
    assert!(!r["dns"].is_null());
    assert!(r["connect"].is_null());
    assert!(r["detail"].as_str().unwrap().contains("refused"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_never_answers_gets_a_verdict_in_time() {
    // Connections complete in the kernel's backlog; nothing ever reads or answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let spec = format!("emu={url}");
    let run = diagnose(
        &["--provider", &spec, "--headers-timeout", "1s", "--json"],
        &key(),
    )
    .await;
    assert_eq!(run.code, 8, "{}", run.stdout);
    assert!(run.took < Duration::from_secs(10), "{:?}", run.took);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(!doc["providers"][0]["connect"].is_null());
    assert!(doc["providers"][0]["status"].is_null());
    drop(listener);
}

/// A streamed answer with one token, as a whole HTTP/1.1 response.
const STREAMED_OK: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
connection: close\r\n\r\n\
data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"OK\"}}]}\n\n\
data: [DONE]\n\n";

/// A TLS server on 127.0.0.1 with a fresh self-signed certificate (for `localhost` and
/// 127.0.0.1), offering ALPN `http/1.1` and answering every request with one streamed token.
/// Returns its port, the certificate as PEM, and a count of the connections it accepted.
async fn tls_server() -> (u16, String, Arc<AtomicU32>) {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let rcgen::CertifiedKey { cert, key_pair } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der())),
    )
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU32::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(s).await {
                    answer_once(tls, STREAMED_OK).await;
                }
            });
        }
    });
    (port, cert.pem(), accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_certificate_is_a_tls_problem() {
    let (port, _, accepted) = tls_server().await;
    let url = format!("https://127.0.0.1:{port}");
    let (code, r, text) = verdict_of(&url, &[], &key()).await;
    assert_eq!(code, 4, "{text}");
    assert_eq!(r["verdict"], "tls");
    assert!(!r["connect"].is_null());
    assert!(r["status"].is_null());
    assert!(accepted.load(Ordering::SeqCst) >= 2);
    assert!(r["detail"].as_str().unwrap().contains("certificate"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_server_trusted_with_cacert_is_healthy_and_its_certificate_shown() {
    let (port, pem, _) = tls_server().await;
    let dir = std::env::temp_dir().join(format!("unbusy-diagnose-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let (code, r, text) = verdict_of(&url, &["--cacert", ca.to_str().unwrap()], &key()).await;
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(code, 0, "{text}");
    assert_eq!(r["verdict"], "healthy");
    assert_eq!(r["tls"]["version"], "TLSv1.3");
    assert_eq!(r["tls"]["alpn"], "http/1.1");
    // rcgen's default validity: 1975-01-01 to 4096-01-01.
    assert_eq!(
        r["tls"]["certificate"]["not_before"],
        "1975-01-01 00:00:00 UTC"
    );
    assert_eq!(
        r["tls"]["certificate"]["not_after"],
        "4096-01-01 00:00:00 UTC"
    );
    assert!(r["tls"]["certificate"]["days_left"].as_i64().unwrap() > 700_000);
    assert!(r["first_token_ms"].as_f64().unwrap() >= r["tls"]["timing"]["at_ms"].as_f64().unwrap());
    assert!(text.contains("TLSv1.3, ALPN http/1.1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_providers_the_first_unhealthy_one_decides() {
    let healthy = emulated(vec![], AnswerShape::Normal).await;
    let busy = emulated(
        always(FaultWindow {
            busy_503: 1.0,
            ..FaultWindow::default()
        }),
        AnswerShape::Normal,
    )
    .await;
    let limited = emulated(
        always(FaultWindow {
            rate_limit_429: 1.0,
            retry_after_s: 1.0,
            ..FaultWindow::default()
        }),
        AnswerShape::Normal,
    )
    .await;
    let a = format!("emu={healthy}");
    let b = format!("busy={busy}");
    let c = format!("limited={limited}");
    let run = diagnose(
        &[
            "--provider",
            &a,
            "--provider",
            &c,
            "--provider",
            &b,
            "--json",
        ],
        &key(),
    )
    .await;
    // 7 (rate limited, the second), not 8 (overloaded: the last, and the highest).
    assert_eq!(run.code, 7, "{}", run.stdout);
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["providers"][0]["verdict"], "healthy");
    assert_eq!(doc["providers"][1]["verdict"], "rate_limited");
    assert_eq!(doc["providers"][2]["verdict"], "overloaded");
    // The other providers' keys come from their own variables, which are not set.
    assert_eq!(doc["providers"][0]["key_given"], true);
    assert_eq!(doc["providers"][1]["key_given"], false);
}
