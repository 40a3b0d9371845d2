//! `bench-envoy`: throughput and added latency of the filter on one Envoy worker, side by side
//! with the same Envoy without it and with Envoy's native `local_ratelimit` + route
//! `retry_policy`, in front of a fast provider stand-in. Prints a table (nothing asserted).
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
    errors: u64,
}

async fn load(
    addr: std::net::SocketAddr,
    body: String,
    seconds: f64,
    connections: usize,
) -> (u64, Vec<f64>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let stop = stop.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let Ok(stream) = TcpStream::connect(addr).await else {
                return (lat, 1);
            };
            let _ = stream.set_nodelay(true);
            let Ok((mut send, conn)) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
            else {
                return (lat, 1);
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
                        let ok = resp.status() == 200;
                        let done = resp.into_body().collect().await.is_ok();
                        if ok && done {
                            lat.push(t.elapsed().as_secs_f64() * 1000.0);
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
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    all.sort_by(f64::total_cmp);
    (all.len() as u64, all, errors)
}

async fn bench(seconds: f64, connections: usize) -> Result<Vec<Run>, String> {
    let fast = Behaviour {
        provider: Provider {
            name: "fast".into(),
            latency_ms: Latency {
                first_token: [0.2, 0.2],
                total: [0.5, 0.5],
            },
            ..Provider::default()
        },
        keepalive_every: Duration::from_secs(1),
    };
    let (_emu, addr) = start(fast, 1, "127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let upstreams = [Upstream::parse(&format!("fast=http://{addr}"))?];
    let wasm = filter_wasm();
    let filter = filter_config(&serde_json::Value::Null, &upstreams, &|_| None)?;
    let miss = chat_body("benchmark", false, false);
    let hit = chat_body("benchmark", false, true);
    let mut runs = Vec::new();
    let cases: [(
        &'static str,
        Option<&serde_json::Value>,
        Option<u32>,
        &String,
    ); 4] = [
        ("bare Envoy", None, None, &miss),
        (
            "Envoy + native local_ratelimit + retry_policy",
            None,
            Some(1_000_000),
            &miss,
        ),
        (
            "Envoy + unbusy, cache miss (pass-through)",
            Some(&filter),
            None,
            &miss,
        ),
        ("Envoy + unbusy, cache hit", Some(&filter), None, &hit),
    ];
    for (name, filter, native, body) in cases {
        let envoy = Envoy::start(&EnvoySpec {
            upstreams: &upstreams,
            filter,
            native,
            concurrency: 1,
            wasm: &wasm,
        })?;
        // Warm up (and fill the cache for the hit case).
        let _ = load(envoy.listen, body.clone(), 1.0, connections).await;
        let (n, lat, errors) = load(envoy.listen, body.clone(), seconds, connections).await;
        runs.push(Run {
            name,
            requests: n,
            rps: n as f64 / seconds,
            p50_ms: percentile(&lat, 0.5),
            p99_ms: percentile(&lat, 0.99),
            errors,
        });
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
    ExitCode::SUCCESS
}
