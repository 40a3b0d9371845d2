//! `make demo`, second part: a fleet of two proxies in front of one provider account, with and
//! without the fleet store (Redis).
//!
//! One emulated DeepSeek account that takes at most `QUOTA` requests in flight (more get a 429,
//! as an account's concurrency limit answers) and answers a Retry-After storm for a while, plus
//! a healthy, slower backup. Two Envoys with the unbusy filter, each configured with the
//! account's quota (`max_concurrency`), behind one address (a round-robin TCP balancer, as a
//! load balancer in front of a fleet would be). The same load twice: each proxy on its own,
//! then both sharing Redis through `unbusy-store` (run in this process). Alone, each proxy
//! spends the whole quota, so together they exceed it; a pause one of them learns the other
//! never hears of; an answer one of them cached is a miss on the other. With Redis, neither.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use unbusy_tests::emulator::{start, Behaviour};
use unbusy_tests::envoy::Upstream;
use unbusy_tests::envoy::{filter_config, filter_wasm, render, store_upstream, use_store, Render};
use unbusy_tests::harness::{chat, chat_body, percentile, run_main, Envoy};
use unbusy_tests::redis::RedisServer;
use unbusy_tests::scenario::{FaultWindow, Latency, Provider};

/// The account's concurrency quota.
const QUOTA: u32 = 4;
const SECONDS: f64 = 24.0;
const RPS: f64 = 8.0;
/// Distinct deterministic questions: repeats land on either proxy.
const QUESTIONS: u64 = 100;

#[derive(Default)]
struct Tally {
    requests: u64,
    succeeded: u64,
    latencies_ms: Vec<f64>,
    cache_hits: u64,
    fleet_hits: u64,
    /// Latencies of answers served from the other proxy's cache (the store), and of answers
    /// a provider gave.
    fleet_hit_ms: Vec<f64>,
    provider_ms: Vec<f64>,
}

fn main() -> ExitCode {
    run_main("demo-fleet", demo())
}

fn account() -> Behaviour {
    Behaviour {
        provider: Provider {
            name: "deepseek".into(),
            capacity: QUOTA,
            latency_ms: Latency {
                first_token: [300.0, 900.0],
                total: [700.0, 2000.0],
            },
            faults: vec![FaultWindow {
                from_s: 8.0,
                to_s: 14.0,
                rate_limit_429: 0.9,
                retry_after_s: 3.0,
                ..FaultWindow::default()
            }],
            ..Provider::default()
        },
        keepalive_every: Duration::from_millis(500),
        ..Behaviour::default()
    }
}

fn backup() -> Behaviour {
    Behaviour {
        provider: Provider {
            name: "backup".into(),
            latency_ms: Latency {
                first_token: [600.0, 1500.0],
                total: [1200.0, 3000.0],
            },
            ..Provider::default()
        },
        keepalive_every: Duration::from_millis(500),
        ..Behaviour::default()
    }
}

/// One address in front of several: each connection goes to the next backend in turn.
async fn balancer(backends: Vec<SocketAddr>) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let i = next.fetch_add(1, Ordering::Relaxed) % backends.len().max(1);
            let Some(&backend) = backends.get(i) else {
                continue;
            };
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(addr)
}

/// What one run measured.
struct Run {
    tally: Tally,
    over_quota: u64,
    storm_429s: u64,
    primary_attempts: u64,
    backup_attempts: u64,
}

/// Two Envoys behind one address, with the store at `store` (or each on its own), under the
/// same load.
async fn run(store: Option<SocketAddr>) -> Result<Run, String> {
    let (p_emu, p_addr) = start(account(), 1, "127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let (b_emu, b_addr) = start(backup(), 2, "127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let upstreams = [
        Upstream::parse(&format!("deepseek=http://{p_addr}"))?,
        Upstream::parse(&format!("backup=http://{b_addr}"))?,
    ];
    let config = serde_json::json!({
        "deadlines": {"first_token_ms": 4000, "response_ms": 8000, "total_ms": 30000},
    });
    let mut filter = filter_config(&config, &upstreams, &|_| false)?;
    if let Some(p) = filter
        .get_mut("providers")
        .and_then(|p| p.as_array_mut())
        .and_then(|p| p.first_mut())
        .and_then(|p| p.as_object_mut())
    {
        p.insert("max_concurrency".into(), serde_json::json!(QUOTA));
    }
    let store_up = match store {
        Some(addr) => {
            use_store(&mut filter);
            // A store beside each proxy answers in well under a millisecond on an idle host;
            // the demo shares a 2-core machine with two Envoys and the load.
            if let Some(store) = filter.get_mut("store").and_then(|s| s.as_object_mut()) {
                store.insert("timeout_ms".into(), serde_json::json!(200));
            }
            Some(store_upstream(&format!("http://{addr}"))?)
        }
        None => None,
    };
    let yaml = render(&Render {
        listen: ("127.0.0.1", 0),
        admin: ("127.0.0.1", 0),
        upstreams: &upstreams,
        filter: Some(&filter),
        wasm: &filter_wasm(),
        native: None,
        store: store_up.as_ref(),
    });
    let a = Envoy::start_yaml(&yaml, 2)?;
    let b = Envoy::start_yaml(&yaml, 2)?;
    let front = balancer(vec![a.listen, b.listen]).await?;

    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut rng = unbusy_core::Rng::with_seed(7);
    let mut t = 0.0;
    loop {
        t += -(1.0 - rng.f64()).ln() / RPS;
        if t >= SECONDS {
            break;
        }
        let question = rng.u64(..QUESTIONS);
        let at = started + Duration::from_secs_f64(t);
        let tally = tally.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let body = chat_body(&format!("fleet question {question}"), false, true);
            let begun = Instant::now();
            let result =
                tokio::time::timeout(Duration::from_secs(30), chat(front, &body, &[])).await;
            let elapsed = begun.elapsed().as_secs_f64() * 1000.0;
            let mut tl = tally
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tl.requests += 1;
            if let Ok(Ok(r)) = result {
                let answered = r.status == 200
                    && r.json()
                        .pointer("/choices/0/message/content")
                        .is_some_and(serde_json::Value::is_string);
                let note = r.header("x-unbusy").unwrap_or("");
                if note.contains("cache=hit") || note.contains("cache=stale") {
                    tl.cache_hits += 1;
                }
                let from_fleet = note.contains("cache=hit-l2") || note.contains("cache=stale-l2");
                if from_fleet {
                    tl.fleet_hits += 1;
                }
                if answered && from_fleet {
                    tl.fleet_hit_ms.push(elapsed);
                } else if answered && note.contains("cache=miss") {
                    tl.provider_ms.push(elapsed);
                }
                if answered {
                    tl.succeeded += 1;
                    tl.latencies_ms.push(elapsed);
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let tally = std::mem::take(
        &mut *tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let (p, bs) = (p_emu.stats(), b_emu.stats());
    Ok(Run {
        tally,
        over_quota: p.capacity_429,
        storm_429s: p.rate_limit_429,
        primary_attempts: p.attempts,
        backup_attempts: bs.attempts,
    })
}

async fn demo() -> Result<(), String> {
    println!(
        "unbusy fleet demo: two proxies behind one address, one DeepSeek account that takes {QUOTA} requests"
    );
    println!(
        "in flight (the 5th gets a 429), a Retry-After storm from 8 s to 14 s, a healthy backup; {SECONDS:.0} s of {RPS}"
    );
    println!("requests/s, {QUESTIONS} distinct questions asked again and again. Each proxy is told the quota.\n");
    println!("  ... two proxies on their own");
    let alone = run(None).await?;
    let redis = RedisServer::start("demo-fleet");
    let settings = unbusy_store::config::Settings::parse(
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--redis".into(),
            redis.url(),
        ],
        &|_| None,
    )?;
    let bound = unbusy_store::server::Bound::bind(settings).await?;
    let store_addr = bound.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound.serve(async {
        let _ = stopped.await;
    }));
    println!("  ... the same two proxies sharing Redis through unbusy-store");
    let shared = run(Some(store_addr)).await?;
    let _ = stop.send(());
    let _ = server.await;

    println!("\n| fleet                 | success | p50 ms | p99 ms | over quota | into the storm | cache hits | from the other proxy |");
    println!("|-----------------------|---------|--------|--------|------------|----------------|------------|----------------------|");
    let mut notes = Vec::new();
    for (name, mut r) in [
        ("two proxies, no Redis", alone),
        ("two proxies + Redis", shared),
    ] {
        let t = &mut r.tally;
        let rate = if t.requests > 0 {
            t.succeeded as f64 / t.requests as f64
        } else {
            0.0
        };
        let p50 = percentile(&mut t.latencies_ms, 0.5);
        let p99 = percentile(&mut t.latencies_ms, 0.99);
        println!(
            "| {name:<21} | {:>6.1}% | {p50:>6.0} | {p99:>6.0} | {:>10} | {:>14} | {:>10} | {:>20} |",
            rate * 100.0,
            r.over_quota,
            r.storm_429s,
            t.cache_hits,
            t.fleet_hits,
        );
        notes.push(format!(
            "{name}: {} requests; the account saw {} attempts, the backup {}.",
            t.requests, r.primary_attempts, r.backup_attempts
        ));
        if !t.fleet_hit_ms.is_empty() {
            let hit50 = percentile(&mut t.fleet_hit_ms, 0.5);
            let hit99 = percentile(&mut t.fleet_hit_ms, 0.99);
            let provider50 = percentile(&mut t.provider_ms, 0.5);
            notes.push(format!(
                "  answers from the other proxy's cache (through the store): p50 {hit50:.1} ms, \
                 p99 {hit99:.1} ms, against p50 {provider50:.0} ms for a provider's answer \
                 ({:.0}x faster at the median)",
                provider50 / hit50.max(0.001)
            ));
        }
    }
    println!();
    for n in notes {
        println!("{n}");
    }
    println!("\n\"over quota\": 429s the account answered because more than {QUOTA} requests were in flight");
    println!("(the emulator's own count). \"into the storm\": 429s with Retry-After it answered.");
    Ok(())
}
