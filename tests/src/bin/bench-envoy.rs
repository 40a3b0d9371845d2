//! `bench-envoy`: throughput and added latency of the filter on one Envoy worker, side by side
//! with the same Envoy without it and with Envoy's native `local_ratelimit` + route
//! `retry_policy`, in front of a fast provider stand-in; then the failover path, with the
//! primary answering 503 to everything: native failover (the router's retry, steered by the
//! upstream instance) against dispatched failover (`dispatch_http_call`), for throughput and,
//! on slow streams, time to the first byte. Prints tables (nothing asserted).
//!
//! `bench-envoy [--seconds S] [--connections N]`

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use unbusy_tests::emulator::{start, Behaviour};
use unbusy_tests::envoy::{filter_config, filter_wasm, Upstream};
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

async fn load(addr: std::net::SocketAddr, body: String, seconds: f64, connections: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let stop = stop.clone();
        let body = body.clone();
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
            while !stop.load(Ordering::Relaxed) {
                let req = hyper::Request::post("/v1/chat/completions")
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .header("authorization", "Bearer bench")
                    .body(Full::new(Bytes::from(body.clone())));
                let Ok(req) = req else { break };
                let t = Instant::now();
                match send.send_request(req).await {
                    Ok(resp) => {
                        let headers_ms = t.elapsed().as_secs_f64() * 1000.0;
                        let ok = resp.status() == 200;
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
    envoy: &Envoy,
    body: &str,
    seconds: f64,
    connections: usize,
    name: &'static str,
) -> Run {
    let _ = load(envoy.listen, body.to_string(), 1.0, connections).await;
    load(envoy.listen, body.to_string(), seconds, connections)
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
            runs.push(measure(&envoy, &body, seconds, connections, name).await);
        }
    }
    Ok(runs)
}

async fn bench(seconds: f64, connections: usize) -> Result<Vec<Run>, String> {
    let (_emu, addr) = start(behaviour("fast", 0.2, 0.5, false), 1, "127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let upstreams = [Upstream::parse(&format!("fast=http://{addr}"))?];
    let wasm = filter_wasm();
    let filter = filter_config(&serde_json::Value::Null, &upstreams, &|_| false)?;
    // Two providers (the second never used): the upstream instance runs on every attempt.
    let (_spare, spare_addr) = start(behaviour("spare", 0.2, 0.5, false), 3, "127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let two = [
        upstreams[0].clone(),
        Upstream::parse(&format!("spare=http://{spare_addr}"))?,
    ];
    let filter_two = filter_config(&serde_json::Value::Null, &two, &|_| false)?;
    let miss = chat_body("benchmark", false, false);
    let hit = chat_body("benchmark", false, true);
    let mut runs = Vec::new();
    type Case<'a> = (
        &'static str,
        &'a [Upstream],
        Option<&'a serde_json::Value>,
        Option<u32>,
        &'a String,
    );
    let cases: [Case; 5] = [
        ("bare Envoy", &upstreams, None, None, &miss),
        (
            "Envoy + native local_ratelimit + retry_policy",
            &upstreams,
            None,
            Some(1_000_000),
            &miss,
        ),
        (
            "Envoy + unbusy, cache miss (pass-through)",
            &upstreams,
            Some(&filter),
            None,
            &miss,
        ),
        (
            "Envoy + unbusy + upstream instance (2 providers), pass-through",
            &two,
            Some(&filter_two),
            None,
            &miss,
        ),
        (
            "Envoy + unbusy, cache hit",
            &upstreams,
            Some(&filter),
            None,
            &hit,
        ),
    ];
    for (name, ups, filter, native, body) in cases {
        let envoy = Envoy::start(&EnvoySpec {
            upstreams: ups,
            filter,
            native,
            concurrency: 1,
            wasm: &wasm,
        })?;
        runs.push(measure(&envoy, body, seconds, connections, name).await);
        drop(envoy);
    }
    Ok(runs)
}

fn main() -> ExitCode {
    let mut seconds = 10.0;
    let mut connections = 16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse::<f64>().ok())) {
            ("--seconds", Some(v)) => seconds = v,
            ("--connections", Some(v)) => connections = v as usize,
            _ => {
                eprintln!("usage: bench-envoy [--seconds S] [--connections N]");
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
    let runs = match rt.block_on(bench(seconds, connections)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-envoy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let failover_connections = 4;
    let failover = match rt.block_on(bench_failover(seconds, failover_connections)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench-envoy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = runs.first().map_or(1.0, |r| r.rps.max(1e-9));
    let (b50, b99) = runs.first().map_or((0.0, 0.0), |r| (r.p50_ms, r.p99_ms));
    println!("one Envoy worker, {connections} keep-alive connections, {seconds} s per case, non-streaming chat/completions");
    println!(
        "| case | requests | req/s | vs bare | p50 ms | p99 ms | added p50 | added p99 | errors |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        println!(
            "| {} | {} | {:.0} | {:.2}x | {:.3} | {:.3} | {:+.3} | {:+.3} | {} |",
            r.name,
            r.requests,
            r.rps,
            r.rps / base,
            r.p50_ms,
            r.p99_ms,
            r.p50_ms - b50,
            r.p99_ms - b99,
            r.errors
        );
    }
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
