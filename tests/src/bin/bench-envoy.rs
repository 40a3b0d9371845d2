//! `bench-envoy`: what the filter costs on one Envoy worker, and the failover path.
//!
//! Throughput: four cases on one Envoy worker each (`--concurrency 1`), in front of a provider
//! stand-in that is not the bottleneck (a second Envoy answering every request itself with
//! `direct_response`, behind a `buffer` filter so it reads each request whole; its own rate,
//! loaded directly, is printed beside the others): bare Envoy; the floor, a trivial proxy-wasm
//! filter that reads both bodies once (`bench/floor-filter`, what any filter judging LLM answers
//! must do at least); unbusy passing distinct, non-cacheable prompts through; unbusy answering
//! the same cacheable prompt from its cache. Every Envoy runs for the whole benchmark and the
//! cases are interleaved, round after round, so noise shows as the spread between rounds.
//! Only 2xx answers count; anything else is an error.
//!
//! Failover: the primary answers 503 to everything: native failover (the router's retry,
//! steered by the upstream instance) against dispatched failover (`dispatch_http_call`), for
//! throughput and, on slow streams, time to the first byte. Prints tables (nothing asserted).
//!
//! `bench-envoy [--seconds S] [--connections N] [--rounds R]`

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use unbusy_tests::emulator::{start, Behaviour};
use unbusy_tests::envoy::{filter_config, filter_wasm, render, repo_root, Render, Upstream};
use unbusy_tests::harness::{chat_body, Envoy, EnvoySpec};
use unbusy_tests::scenario::{Latency, Provider};
use unbusy_tests::sim::report::percentile;

struct Run {
    name: &'static str,
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Time to the response headers, median.
    ttfb_p50_ms: f64,
    errors: u64,
}

/// Latencies of one load run: total and time to headers, sorted; and the error count.
struct Load {
    total: Vec<f64>,
    headers: Vec<f64>,
    errors: u64,
}

impl Load {
    fn run(&self, name: &'static str, seconds: f64) -> Run {
        Run {
            name,
            requests: self.total.len() as u64,
            rps: self.total.len() as f64 / seconds,
            p50_ms: percentile(&self.total, 0.5),
            p99_ms: percentile(&self.total, 0.99),
            ttfb_p50_ms: percentile(&self.headers, 0.5),
            errors: self.errors,
        }
    }
}

/// The request bodies of a load: `Same` sends one body every time; `Distinct` a distinct,
/// non-cacheable prompt for each request (so no cache answers it).
#[derive(Clone)]
enum Bodies {
    Same(Arc<String>),
    Distinct,
}

impl Bodies {
    fn body(&self, connection: usize, n: u64) -> String {
        match self {
            Bodies::Same(b) => b.to_string(),
            Bodies::Distinct => chat_body(&format!("benchmark {connection} {n}"), false, false),
        }
    }
}

async fn load(
    addr: std::net::SocketAddr,
    bodies: Bodies,
    seconds: f64,
    connections: usize,
) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let stop = stop.clone();
        let bodies = bodies.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut first = Vec::new();
            let mut errors = 0u64;
            let Ok(stream) = TcpStream::connect(addr).await else {
                return (lat, first, 1);
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut send, conn)) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
            else {
                return (lat, first, 1);
            };
            tokio::spawn(conn);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let req = hyper::Request::post("/v1/chat/completions")
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .header("authorization", "Bearer bench")
                    .body(Full::new(Bytes::from(bodies.body(c, n))));
                let Ok(req) = req else { break };
                let t = Instant::now();
                match send.send_request(req).await {
                    Ok(resp) => {
                        let headers_ms = t.elapsed().as_secs_f64() * 1000.0;
                        let ok = resp.status().is_success();
                        let done = resp.into_body().collect().await.is_ok();
                        if ok && done {
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
                            first.push(headers_ms);
                        } else {
                            errors += 1;
                        }
                    }
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (lat, first, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Vec::new();
    let mut headers = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, f, e)) = t.await {
            total.extend(l);
            headers.extend(f);
            errors += e;
        }
    }
    total.sort_by(f64::total_cmp);
    headers.sort_by(f64::total_cmp);
    Load {
        total,
        headers,
        errors,
    }
}

/// One case: a second of warm-up (which also fills the cache for the hit case), then the load.
async fn measure(
    addr: std::net::SocketAddr,
    bodies: &Bodies,
    seconds: f64,
    connections: usize,
    name: &'static str,
) -> Run {
    let _ = load(addr, bodies.clone(), 1.0, connections).await;
    load(addr, bodies.clone(), seconds, connections)
        .await
        .run(name, seconds)
}

fn behaviour(name: &str, first_token_ms: f64, total_ms: f64, busy: bool) -> Behaviour {
    Behaviour {
        provider: Provider {
            name: name.into(),
            latency_ms: Latency {
                first_token: [first_token_ms, first_token_ms],
                total: [total_ms, total_ms],
            },
            faults: if busy {
                vec![unbusy_tests::scenario::FaultWindow {
                    from_s: 0.0,
                    to_s: 1e9,
                    busy_503: 1.0,
                    ..Default::default()
                }]
            } else {
                Vec::new()
            },
            ..Provider::default()
        },
        keepalive_every: Duration::from_secs(1),
        ..Behaviour::default()
    }
}

/// The failover path: a primary that answers 503 to everything, a healthy backup; native
/// failover against dispatched, non-streaming on a fast backup, then streaming on a slow one.
async fn bench_failover(seconds: f64, connections: usize) -> Result<Vec<Run>, String> {
    // Every request must fail over (no breaker, no throttling, budget for every retry), so
    // the path measured is the failover itself, not the engine learning to avoid the primary.
    let policy = serde_json::json!({
        "breaker": {"min_success_rate": 0.0, "consecutive_failures": 0},
        "throttle": {"enabled": false},
        "budget": {"ratio": 10.0},
    });
    let mut runs = Vec::new();
    for (backup_first, backup_total, stream, label) in [
        (
            0.2,
            0.5,
            false,
            [
                "native failover, non-streaming",
                "dispatched failover, non-streaming",
            ],
        ),
        (
            20.0,
            300.0,
            true,
            [
                "native failover, slow stream",
                "dispatched failover, slow stream",
            ],
        ),
    ] {
        let (_primary, pa) = start(behaviour("primary", 0.2, 0.5, true), 1, "127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let (_backup, ba) = start(
            behaviour("backup", backup_first, backup_total, false),
            2,
            "127.0.0.1:0",
        )
        .await
        .map_err(|e| e.to_string())?;
        let upstreams = [
            Upstream::parse(&format!("primary=http://{pa}"))?,
            Upstream::parse(&format!("backup=http://{ba}"))?,
        ];
        let native = filter_config(&policy, &upstreams, &|_| false)?;
        let mut dispatched = native.clone();
        if let Some(ps) = dispatched
            .get_mut("providers")
            .and_then(serde_json::Value::as_array_mut)
        {
            for p in ps {
                if let Some(o) = p.as_object_mut() {
                    o.remove("failover_cluster");
                }
            }
        }
        let body = chat_body("failover", stream, false);
        for (name, filter) in label.into_iter().zip([&native, &dispatched]) {
            let envoy = Envoy::start(&EnvoySpec {
                upstreams: &upstreams,
                filter: Some(filter),
                native: None,
                concurrency: 1,
                wasm: &filter_wasm(),
            })?;
            let body = Bodies::Same(Arc::new(body.clone()));
            runs.push(measure(envoy.listen, &body, seconds, connections, name).await);
        }
    }
    Ok(runs)
}

/// What the stand-in answers: a complete, valid chat completion (so unbusy judges it an answer
/// and may cache it).
const STAND_IN_ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"deepseek-chat","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#;

/// The provider stand-in: an Envoy answering every request itself (`direct_response`), after
/// its `buffer` filter read the whole request.
fn stand_in_yaml() -> String {
    let answer = serde_json::to_string(STAND_IN_ANSWER).unwrap_or_default();
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: unbusy
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: stand_in
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: {answer} }} }}
                response_headers_to_add:
                - header: {{ key: content-type, value: application/json }}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
          http_filters:
          - name: envoy.filters.http.buffer
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
              max_request_bytes: 1048576
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    )
}

/// The floor filter built by the Makefile's `bench-envoy` target, or `UNBUSY_FLOOR_WASM`.
fn floor_wasm() -> PathBuf {
    std::env::var_os("UNBUSY_FLOOR_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            repo_root().join("target/wasm32-wasip1/wasm-filter/unbusy_bench_floor.wasm")
        })
}

/// Bare Envoy's configuration with the floor filter before the router.
fn floor_yaml(upstreams: &[Upstream], wasm: &Path) -> Result<String, String> {
    let bare = render(&Render {
        listen: ("127.0.0.1", 0),
        admin: ("127.0.0.1", 0),
        upstreams,
        filter: None,
        wasm,
        native: None,
        store: None,
    });
    let router = "          - name: envoy.filters.http.router\n";
    if !bare.contains(router) {
        return Err("bench-envoy: no router in the rendered configuration".into());
    }
    let floor = format!(
        r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: floor
                root_id: floor
                allow_on_headers_stop_iteration: true
                vm_config:
                  vm_id: floor
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {wasm} }} }}
"#,
        wasm = serde_json::to_string(&floor_wasm().display().to_string()).unwrap_or_default()
    );
    Ok(bare.replacen(router, &format!("{floor}{router}"), 1))
}

/// The throughput cases' names, in the order they run in each round.
const BARE: &str = "bare Envoy";
const FLOOR: &str = "floor: trivial filter reading both bodies";
const PASS: &str = "unbusy, pass-through (distinct prompts)";
const HIT: &str = "unbusy, cache hits (same prompt)";
const STAND_IN: &str = "stand-in alone (no proxy)";

/// Every throughput case, `rounds` times, interleaved: each round runs every case once, on
/// Envoys started once for the whole benchmark.
async fn bench(seconds: f64, connections: usize, rounds: usize) -> Result<Vec<Vec<Run>>, String> {
    eprintln!("bench-envoy: starting the stand-in and three Envoys");
    let stand_in = Envoy::start_yaml(&stand_in_yaml(), 1)?;
    let upstreams = [Upstream::parse(&format!(
        "fast=http://{}",
        stand_in.listen
    ))?];
    let wasm = filter_wasm();
    let filter = filter_config(&serde_json::Value::Null, &upstreams, &|_| false)?;
    let envoy = |filter| {
        Envoy::start(&EnvoySpec {
            upstreams: &upstreams,
            filter,
            native: None,
            concurrency: 1,
            wasm: &wasm,
        })
    };
    let bare = envoy(None)?;
    let floor = Envoy::start_yaml(&floor_yaml(&upstreams, &wasm)?, 1)?;
    let unbusy = envoy(Some(&filter))?;
    let distinct = Bodies::Distinct;
    let same = Bodies::Same(Arc::new(chat_body("benchmark", false, true)));
    let cases = [
        (STAND_IN, stand_in.listen, &distinct),
        (BARE, bare.listen, &distinct),
        (FLOOR, floor.listen, &distinct),
        (PASS, unbusy.listen, &distinct),
        (HIT, unbusy.listen, &same),
    ];
    let mut all = Vec::new();
    for _ in 0..rounds {
        let mut round = Vec::new();
        for (name, addr, bodies) in cases {
            eprintln!("bench-envoy: {name}");
            round.push(measure(addr, bodies, seconds, connections, name).await);
        }
        all.push(round);
    }
    Ok(all)
}

/// The median of some values (the middle one, or the lower of the two middle ones).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
}

/// Prints every round, then the medians over the rounds with the ratios.
fn print_throughput(rounds: &[Vec<Run>], seconds: f64, connections: usize) {
    println!("one Envoy worker per proxy, {connections} keep-alive connections, {seconds} s per case, {} interleaved rounds, non-streaming chat/completions; only 2xx answers count", rounds.len());
    println!("| round | case | requests | req/s | p50 ms | p99 ms | errors |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for (i, round) in rounds.iter().enumerate() {
        for r in round {
            println!(
                "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {} |",
                i + 1,
                r.name,
                r.requests,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.errors
            );
        }
    }
    let names: Vec<&'static str> = rounds
        .first()
        .map(|r| r.iter().map(|r| r.name).collect())
        .unwrap_or_default();
    let of = |name: &str, f: fn(&Run) -> f64| {
        median(
            rounds
                .iter()
                .flatten()
                .filter(|r| r.name == name)
                .map(f)
                .collect(),
        )
    };
    let range = |name: &str| {
        let v: Vec<f64> = rounds
            .iter()
            .flatten()
            .filter(|r| r.name == name)
            .map(|r| r.rps)
            .collect();
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    };
    let bare = of(BARE, |r| r.rps).max(1e-9);
    let floor = of(FLOOR, |r| r.rps).max(1e-9);
    let (floor50, floor99) = (of(FLOOR, |r| r.p50_ms), of(FLOOR, |r| r.p99_ms));
    println!();
    println!("medians over the rounds (req/s: median, lowest-highest)");
    println!("| case | req/s | range | vs bare | vs floor | p50 ms | p99 ms | p50 vs floor | p99 vs floor | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for name in names {
        let (lo, hi) = range(name);
        let errors: u64 = rounds
            .iter()
            .flatten()
            .filter(|r| r.name == name)
            .map(|r| r.errors)
            .sum();
        let rps = of(name, |r| r.rps);
        let (p50, p99) = (of(name, |r| r.p50_ms), of(name, |r| r.p99_ms));
        println!(
            "| {name} | {rps:.0} | {lo:.0}-{hi:.0} | {:.2}x | {:.2}x | {p50:.3} | {p99:.3} | {:+.3} | {:+.3} | {errors} |",
            rps / bare,
            rps / floor,
            p50 - floor50,
            p99 - floor99,
        );
    }
    let pass = of(PASS, |r| r.rps).max(1e-9);
    println!();
    println!(
        "stand-in alone / unbusy pass-through: {:.1}x; cache hits / pass-through: {:.1}x",
        of(STAND_IN, |r| r.rps) / pass,
        of(HIT, |r| r.rps) / pass
    );
}

fn main() -> ExitCode {
    let mut seconds = 8.0;
    let mut connections = 16;
    let mut rounds = 3;
    let mut failover = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--no-failover" {
            failover = false;
            continue;
        }
        match (a.as_str(), args.next().and_then(|v| v.parse::<f64>().ok())) {
            ("--seconds", Some(v)) => seconds = v,
            ("--connections", Some(v)) => connections = v as usize,
            ("--rounds", Some(v)) => rounds = (v as usize).max(1),
            _ => {
                eprintln!("usage: bench-envoy [--seconds S] [--connections N] [--rounds R] [--no-failover]");
                return ExitCode::from(2);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-envoy: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench(seconds, connections, rounds)) {
        Ok(r) => print_throughput(&r, seconds, connections),
        Err(e) => {
            eprintln!("bench-envoy: {e}");
            return ExitCode::FAILURE;
        }
    }
    if !failover {
        return ExitCode::SUCCESS;
    }
    let failover_connections = 4;
    let failover = match rt.block_on(bench_failover(seconds, failover_connections)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-envoy: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!();
    println!("failover: the primary answers 503 to everything, the backup answers (fast: 0.5 ms; slow stream: first token 20 ms, 300 ms in all); one worker, {failover_connections} connections, {seconds} s per case");
    println!("| case | requests | req/s | p50 ms | p99 ms | headers p50 ms | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &failover {
        println!(
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} |",
            r.name, r.requests, r.rps, r.p50_ms, r.p99_ms, r.ttfb_p50_ms, r.errors
        );
    }
    ExitCode::SUCCESS
}
