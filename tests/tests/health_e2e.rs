//! Active health checks end to end, on real Envoy with the filter built by `make filter`, in
//! front of two busy-provider emulators: a primary that dies while no request is in flight is
//! skipped by the next request (answered by the backup on its first attempt, nothing sent to
//! the primary), and taken back once its probes succeed again.
//!
//! The primary is reached through a small TCP forwarder the test can kill: while it is down,
//! every connection Envoy opens to the primary is accepted, its request line is recorded, and
//! it is closed without an answer (as a crashed server behind a port still open), so the test
//! counts exactly what was sent to the primary during its outage, probes included.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use unbusy_tests::emulator::{self, Emulator};
use unbusy_tests::envoy::{filter_config, filter_wasm, render, Render, Upstream};
use unbusy_tests::harness::{chat, chat_body, Envoy, Reply};
use unbusy_tests::world::{healthy, test_config};

/// A forwarder to an emulator that can be made to die (and come back) with Envoy's pooled
/// connections to it.
struct Forwarder {
    down: Arc<Mutex<bool>>,
    /// The request lines received while down.
    while_down: Arc<Mutex<Vec<String>>>,
    /// The connections being forwarded (aborted when it goes down).
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Forwarder {
    async fn start(to: SocketAddr) -> (Self, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(Mutex::new(false));
        let while_down = Arc::new(Mutex::new(Vec::new()));
        let pipes: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let (d, w, p) = (down.clone(), while_down.clone(), pipes.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if *d.lock().unwrap() {
                    let w = w.clone();
                    tokio::spawn(async move {
                        // Record what was sent, then close without a byte of answer.
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(2).any(|x| x == b"\r\n") {
                            match tokio::time::timeout(
                                Duration::from_secs(2),
                                inbound.read(&mut buf),
                            )
                            .await
                            {
                                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                                _ => break,
                            }
                        }
                        let text = String::from_utf8_lossy(&head);
                        if let Some(line) = text.lines().next().filter(|l| !l.is_empty()) {
                            w.lock().unwrap().push(line.to_string());
                        }
                    });
                    continue;
                }
                let pipe = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                p.lock().unwrap().push(pipe);
            }
        });
        (
            Self {
                down,
                while_down,
                pipes,
                accept,
            },
            addr,
        )
    }

    /// The primary dies: every connection to it is cut, new ones get no answer.
    fn kill(&self) {
        *self.down.lock().unwrap() = true;
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    /// It is back.
    fn revive(&self) {
        *self.down.lock().unwrap() = false;
    }

    fn received_while_down(&self) -> Vec<String> {
        self.while_down.lock().unwrap().clone()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.accept.abort();
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

/// Waits for `done` (checked every 20 ms) up to a generous deadline; `false` if it never held.
async fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

fn note(r: &Reply) -> String {
    r.header("x-unbusy").unwrap_or("").to_string()
}

const KEY: &str = "sk-e2e-primary-key";

struct Setup {
    envoy: Envoy,
    primary: Arc<Emulator>,
    backup: Arc<Emulator>,
    forwarder: Forwarder,
}

async fn setup(health_check: Value) -> Setup {
    let (primary, primary_addr) = emulator::start(
        healthy("primary", [20.0, 40.0], [60.0, 100.0]),
        7,
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let (backup, backup_addr) = emulator::start(
        healthy("backup", [20.0, 40.0], [60.0, 100.0]),
        8,
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let (forwarder, forwarded) = Forwarder::start(primary_addr).await;
    let upstreams = [
        Upstream::parse(&format!("primary=http://{forwarded}")).unwrap(),
        Upstream::parse(&format!("backup=http://{backup_addr}")).unwrap(),
    ];
    let config = test_config(&json!({ "health_check": health_check }));
    // The primary's key from Envoy's environment, as `unbusy up` renders it.
    let filter = filter_config(&config, &upstreams, &|v| v == "UNBUSY_KEY_PRIMARY").unwrap();
    let wasm = filter_wasm();
    assert!(
        wasm.exists(),
        "{} missing: run `make filter`",
        wasm.display()
    );
    let yaml = render(&Render {
        listen: ("127.0.0.1", 0),
        admin: ("127.0.0.1", 0),
        upstreams: &upstreams,
        filter: Some(&filter),
        wasm: &wasm,
        native: None,
        store: None,
    });
    let envoy = Envoy::start_yaml_env(&yaml, 2, &[("UNBUSY_KEY_PRIMARY", KEY)]).unwrap();
    Setup {
        envoy,
        primary,
        backup,
        forwarder,
    }
}

/// Sends requests (at most one at a time) until one is answered with `provider` on its first
/// attempt, within a generous deadline; the last answer's note otherwise.
async fn first_answer_from(envoy: &Envoy, provider: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::new();
    while Instant::now() < deadline {
        let r = chat(envoy.listen, &chat_body("hi", false, false), &[])
            .await
            .map_err(|e| e.to_string())?;
        last = note(&r);
        if r.status == 200 && last.starts_with(&format!("provider={provider}; attempts=1;")) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "no first-attempt answer from {provider}; last: {last:?}"
    ))
}

/// A short interval; a timeout generous enough that a healthy backup on a loaded machine is not
/// taken for down (probes then come every second: the longer of the two).
const CHECKS: &str = r#"{"enabled": true, "interval_ms": 200, "timeout_ms": 1000,
    "unhealthy_threshold": 2, "healthy_threshold": 2}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_killed_while_idle_is_skipped_by_the_next_request_and_taken_back() {
    let s = setup(serde_json::from_str(CHECKS).unwrap()).await;

    // Probes reach the primary with its key (the filter's and Envoy's own), and requests go
    // to it while it is up.
    let probed = wait_for(Duration::from_secs(10), || {
        s.primary
            .stats()
            .seen
            .iter()
            .filter(|r| r.method == "GET" && r.path == "/models")
            .count()
            >= 2
    })
    .await;
    assert!(probed, "no probes: {:?}", s.primary.stats().seen);
    let seen = s.primary.stats().seen;
    assert!(
        seen.iter()
            .filter(|r| r.method == "GET")
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {KEY}"))),
        "a probe without the provider's key: {seen:?}"
    );
    first_answer_from(&s.envoy, "primary").await.unwrap();

    // The primary dies with no traffic; wait until the filter's probes have marked it down
    // (its log line), well past interval × threshold.
    s.forwarder.kill();
    let killed = Instant::now();
    let primary_chats = s.primary.stats().attempts;
    let backup_chats = s.backup.stats().attempts;
    let marked = wait_for(Duration::from_secs(15), || {
        s.envoy
            .log_text()
            .contains("health checks mark provider \"primary\" down")
    })
    .await;
    assert!(marked, "never marked down:\n{}", s.envoy.log_text());
    // (A figure, not a limit: a loaded machine takes longer.)
    eprintln!(
        "health_e2e: marked down {:?} after the kill (a probe a second, threshold 2)",
        killed.elapsed()
    );
    assert!(
        !s.forwarder.received_while_down().is_empty(),
        "the dead primary was never probed"
    );

    // The next requests are answered by the backup on their first attempt: nothing was sent
    // to the primary but probes.
    let clusters = s.envoy.admin_text("/clusters").await.unwrap_or_default();
    for _ in 0..4 {
        let r = chat(s.envoy.listen, &chat_body("hi", false, false), &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            note(&r).starts_with("provider=backup; attempts=1;"),
            "{}; clusters:\n{}\nsent to the primary while down: {:?}\n{}",
            note(&r),
            clusters
                .lines()
                .filter(|l| l.contains("health_flags") || l.contains("priority"))
                .collect::<Vec<_>>()
                .join("\n"),
            s.forwarder.received_while_down(),
            s.envoy.log_text()
        );
    }
    let sent_down = s.forwarder.received_while_down();
    assert!(
        sent_down.iter().all(|l| l.starts_with("GET /models ")),
        "requests other than probes reached the dead primary: {sent_down:?}"
    );
    // The verdict is on the gauge too.
    let gauge = s
        .envoy
        .admin_text("/stats?filter=unbusy_provider_down")
        .await
        .unwrap();
    assert!(
        gauge.contains("unbusy_provider_down.provider.primary: 1"),
        "{gauge}"
    );
    assert_eq!(s.primary.stats().attempts, primary_chats);
    assert_eq!(s.backup.stats().attempts, backup_chats + 4);

    // It comes back: after the healthy threshold, requests go to it again.
    s.forwarder.revive();
    let revived = Instant::now();
    let up = wait_for(Duration::from_secs(15), || {
        s.envoy
            .log_text()
            .contains("health checks mark provider \"primary\" up")
    })
    .await;
    assert!(up, "never marked up:\n{}", s.envoy.log_text());
    eprintln!(
        "health_e2e: marked up {:?} after the revival",
        revived.elapsed()
    );
    first_answer_from(&s.envoy, "primary").await.unwrap();
    assert!(s.primary.stats().attempts > primary_chats);
}
