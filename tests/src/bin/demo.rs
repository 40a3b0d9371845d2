//! `make demo`: what unbusy changes, in 30 seconds, with no API key and no internet.
//!
//! Two emulated providers: a busy primary (503s, 429s, keep-alive stalls, a short outage) and
//! a healthy, slower backup. The same mixed load (half streaming) goes straight to the primary,
//! as an app without unbusy would send it, and through Envoy with the unbusy filter. Then a
//! table side by side.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use unbusy_tests::emulator::{start, Behaviour};
use unbusy_tests::envoy::{filter_config, filter_wasm, Upstream};
use unbusy_tests::harness::{chat, chat_body, Envoy, EnvoySpec};
use unbusy_tests::scenario::{FaultWindow, Latency, Provider};

const SECONDS: f64 = 30.0;
const RPS: f64 = 4.0;

#[derive(Default)]
struct Tally {
    requests: u64,
    succeeded: u64,
    latencies_ms: Vec<f64>,
    attempts: u64,
    failovers: u64,
    cache_hits: u64,
    statuses: std::collections::BTreeMap<String, u64>,
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v.get(i).copied().unwrap_or(0.0)
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo() -> Result<(), String> {
    let primary = Behaviour {
        provider: Provider {
            name: "deepseek".into(),
            latency_ms: Latency {
                first_token: [300.0, 1500.0],
                total: [900.0, 3500.0],
            },
            faults: vec![
                FaultWindow {
                    from_s: 0.0,
                    to_s: 1e9,
                    busy_503: 0.25,
                    rate_limit_429: 0.1,
                    retry_after_s: 2.0,
                    stall: 0.1,
                    stall_s: 25.0,
                    ..FaultWindow::default()
                },
                FaultWindow {
                    from_s: 12.0,
                    to_s: 18.0,
                    outage: true,
                    ..FaultWindow::default()
                },
            ],
            ..Provider::default()
        },
        keepalive_every: Duration::from_millis(500),
        ..Behaviour::default()
    };
    let backup = Behaviour {
        provider: Provider {
            name: "backup".into(),
            latency_ms: Latency {
                first_token: [600.0, 2500.0],
                total: [1500.0, 5000.0],
            },
            ..Provider::default()
        },
        keepalive_every: Duration::from_millis(500),
        ..Behaviour::default()
    };
    let (p_emu, p_addr) = start(primary, 1, "127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let (b_emu, b_addr) = start(backup, 2, "127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let upstreams = [
        Upstream::parse(&format!("deepseek=http://{p_addr}"))?,
        Upstream::parse(&format!("backup=http://{b_addr}"))?,
    ];
    let config = serde_json::json!({"deadlines": {"first_token_ms": 4000, "response_ms": 8000, "total_ms": 30000}});
    let filter = filter_config(&config, &upstreams, &|_| false)?;
    let wasm = filter_wasm();
    let envoy = Envoy::start(&EnvoySpec {
        upstreams: &upstreams,
        filter: Some(&filter),
        native: None,
        concurrency: 2,
        wasm: &wasm,
    })?;
    println!("unbusy demo: a busy primary (25% 503, 10% 429, 10% keep-alive stalls, down from 12 s to 18 s)");
    println!("and a healthy, slower backup. {SECONDS:.0} s of {RPS} requests/s on each path, half streaming,");
    println!(
        "callers give up after 30 s. Envoy (with the unbusy filter) on http://{}\n",
        envoy.listen
    );

    let direct = Arc::new(Mutex::new(Tally::default()));
    let via = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut rng = unbusy_core::Rng::with_seed(42);
    let mut t = 0.0;
    let mut n = 0u64;
    loop {
        t += -(1.0 - rng.f64()).ln() / RPS;
        if t >= SECONDS {
            break;
        }
        n += 1;
        let stream = rng.bool();
        let at = started + Duration::from_secs_f64(t);
        for (target, tally, through) in [
            (p_addr, direct.clone(), false),
            (envoy.listen, via.clone(), true),
        ] {
            let body = chat_body(&format!("question {n}"), stream, false);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let begun = Instant::now();
                let result =
                    tokio::time::timeout(Duration::from_secs(30), chat(target, &body, &[])).await;
                let elapsed = begun.elapsed().as_secs_f64() * 1000.0;
                let mut tl = tally
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                tl.requests += 1;
                let (ok, label, attempts) = match result {
                    Err(_) => (false, "caller gave up (30 s)".to_string(), 1),
                    Ok(Err(e)) => (
                        false,
                        format!(
                            "connection error: {}",
                            e.chars().take(40).collect::<String>()
                        ),
                        1,
                    ),
                    Ok(Ok(r)) => {
                        let text = r.text();
                        let real = r.status == 200
                            && if stream {
                                text.contains("\"content\"") && text.contains("data: [DONE]")
                            } else {
                                r.json()
                                    .pointer("/choices/0/message/content")
                                    .is_some_and(serde_json::Value::is_string)
                            };
                        let note = r.header("x-unbusy").unwrap_or("").to_string();
                        let attempts = note
                            .split("attempts=")
                            .nth(1)
                            .and_then(|s| s.split(';').next())
                            .and_then(|s| s.trim().parse::<u64>().ok())
                            .unwrap_or(1);
                        if through && note.contains("provider=backup") {
                            tl.failovers += 1;
                        }
                        if note.contains("cache=hit") || note.contains("cache=stale") {
                            tl.cache_hits += 1;
                        }
                        let label = if real {
                            "200 with an answer".to_string()
                        } else if r.status == 200 {
                            "200 but only keep-alive, then closed".to_string()
                        } else {
                            format!(
                                "{} {}",
                                r.status,
                                r.json()
                                    .pointer("/error/message")
                                    .and_then(serde_json::Value::as_str)
                                    .unwrap_or("")
                                    .chars()
                                    .take(48)
                                    .collect::<String>()
                            )
                        };
                        (real, label, if through { attempts } else { 1 })
                    }
                };
                tl.attempts += attempts;
                *tl.statuses.entry(label).or_insert(0) += 1;
                if ok {
                    tl.succeeded += 1;
                    tl.latencies_ms.push(elapsed);
                }
            }));
        }
    }
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            println!("  ... {:.0} s", started.elapsed().as_secs_f64());
        }
    });
    for t in tasks {
        let _ = t.await;
    }
    ticker.abort();
    let mut rows = Vec::new();
    for (name, tally) in [
        ("straight to the primary", &direct),
        ("through unbusy (Envoy)", &via),
    ] {
        let mut t = tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rate = if t.requests > 0 {
            t.succeeded as f64 / t.requests as f64
        } else {
            0.0
        };
        let p50 = percentile(&mut t.latencies_ms, 0.5);
        let p99 = percentile(&mut t.latencies_ms, 0.99);
        let apr = if t.requests > 0 {
            t.attempts as f64 / t.requests as f64
        } else {
            0.0
        };
        rows.push(format!(
            "| {name:<24} | {:>8} | {:>9} | {:>7.1}% | {:>7.0} | {:>7.0} | {:>8.2} |",
            t.requests,
            t.succeeded,
            rate * 100.0,
            p50,
            p99,
            apr
        ));
        println!("\n{name}:");
        for (label, count) in &t.statuses {
            println!("  {count:>4}  {label}");
        }
        if t.failovers + t.cache_hits > 0 {
            println!(
                "  of the answers, {} came from the backup after the primary was busy",
                t.failovers
            );
        }
    }
    println!("\n| path                     | requests | succeeded | success | p50 ms  | p99 ms  | att/req  |");
    println!("|--------------------------|----------|-----------|---------|---------|---------|----------|");
    for r in rows {
        println!("{r}");
    }
    let (p, b) = (p_emu.stats(), b_emu.stats());
    println!(
        "\nthe primary saw {} attempts ({} busy 503, {} 429, {} stalls); the backup {}.",
        p.attempts, p.busy_503, p.rate_limit_429, p.stalls, b.attempts
    );
    println!(
        "Metrics: curl http://{}/stats/prometheus | grep ^unbusy_  (while it runs)",
        envoy.admin
    );
    Ok(())
}
