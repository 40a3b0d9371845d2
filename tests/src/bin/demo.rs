//! `make demo`: what unbusy changes, in 30 seconds, with no API key and no internet.
//!
//! Two emulated providers: a busy primary (503s, 429s, keep-alive stalls, a short outage) and
//! a healthy, slower backup. The same mixed load (half streaming) goes straight to the primary,
//! as an app without unbusy would send it, and through Envoy with the unbusy filter. Then a
//! table side by side, and the run over time as a PNG (`target/demo/unbusy-demo.png`, or
//! `--png PATH`): success rate, latency, attempts per request and unbusy's degradation tier,
//! per two seconds of sending, for both paths (Grafana's panels, where Grafana is not
//! installed; `docs/demo.png` is a copy).

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use unbusy_tests::emulator::{start, Behaviour};
use unbusy_tests::envoy::{filter_config, filter_wasm, Upstream};
use unbusy_tests::harness::{chat, chat_body, percentile, run_main, Envoy, EnvoySpec};
use unbusy_tests::png_chart::{render, Chart, Panel, Rgb, Series};
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

/// One request as its caller saw it, for the chart.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// When it was sent, seconds into the run.
    sent_s: f64,
    /// Through unbusy, or straight to the primary.
    through: bool,
    /// A real answer.
    ok: bool,
    /// Until the answer or the error, ms.
    latency_ms: f64,
    /// Attempts unbusy made (1 straight to the primary).
    attempts: u64,
    /// unbusy's degradation tier as its answer reported it (`x-unbusy: ...; tier=N`).
    tier: Option<u8>,
}

/// The chart's time bins, seconds.
const BIN_S: f64 = 2.0;
const DIRECT: Rgb = [211, 47, 47];
const THROUGH: Rgb = [46, 125, 50];

/// The run over time: per bin of sending time, for each path, the share of real answers,
/// the median latency of the answered, attempts per request and (through unbusy) the highest
/// tier its answers reported.
fn timeline(samples: &[Sample]) -> Chart {
    let bins = (SECONDS / BIN_S).ceil() as usize;
    let line = |through: bool, value: &dyn Fn(&[&Sample]) -> f64| -> Series {
        let points = (0..bins)
            .map(|b| {
                let from = b as f64 * BIN_S;
                let inside: Vec<&Sample> = samples
                    .iter()
                    .filter(|s| s.through == through && s.sent_s >= from && s.sent_s < from + BIN_S)
                    .collect();
                let v = if inside.is_empty() {
                    f64::NAN
                } else {
                    value(&inside)
                };
                (from + BIN_S / 2.0, v)
            })
            .collect();
        Series {
            label: if through {
                "through unbusy".into()
            } else {
                "straight to the primary".into()
            },
            colour: if through { THROUGH } else { DIRECT },
            points,
        }
    };
    let success = |s: &[&Sample]| 100.0 * s.iter().filter(|s| s.ok).count() as f64 / s.len() as f64;
    let latency = |s: &[&Sample]| {
        let mut ms: Vec<f64> = s.iter().filter(|s| s.ok).map(|s| s.latency_ms).collect();
        if ms.is_empty() {
            f64::NAN
        } else {
            percentile(&mut ms, 0.5) / 1000.0
        }
    };
    let attempts =
        |s: &[&Sample]| s.iter().map(|s| s.attempts as f64).sum::<f64>() / s.len() as f64;
    let tier = |s: &[&Sample]| {
        s.iter()
            .filter_map(|s| s.tier)
            .max()
            .map_or(f64::NAN, f64::from)
    };
    let pair = |value: &dyn Fn(&[&Sample]) -> f64| vec![line(false, value), line(true, value)];
    let top = |series: &[Series], floor: f64| {
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(floor, f64::max)
            .ceil()
    };
    let latency = pair(&latency);
    let attempts = pair(&attempts);
    let (latency_max, attempts_max) = (top(&latency, 1.0), top(&attempts, 2.0));
    Chart {
        title: format!(
            "unbusy demo: a busy primary (down for 6 s) and a healthy backup, {RPS} requests/s on each path"
        ),
        x_label: format!("seconds, by sending time ({BIN_S:.0} s bins)"),
        x_max: SECONDS,
        x_tick: 5.0,
        width: 1400,
        height: 900,
        columns: 2,
        panels: vec![
            Panel {
                title: "success rate (%)".into(),
                y_max: 100.0,
                y_ticks: 4,
                series: pair(&success),
            },
            Panel {
                title: "latency of the answered, p50 (s)".into(),
                y_max: latency_max,
                y_ticks: latency_max.clamp(1.0, 10.0) as u32,
                series: latency,
            },
            Panel {
                title: "attempts per request".into(),
                y_max: attempts_max,
                y_ticks: attempts_max.clamp(1.0, 10.0) as u32,
                series: attempts,
            },
            Panel {
                title: "degradation tier (unbusy only; 0 normal, 3 service)".into(),
                y_max: 3.0,
                y_ticks: 3,
                series: vec![line(true, &tier)],
            },
        ],
    }
}

/// Renders the timeline to `path`.
fn write_png(samples: &[Sample], path: &std::path::Path) -> Result<(), String> {
    let bytes = render(&timeline(samples)).png()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() -> ExitCode {
    run_main("demo", demo())
}

async fn demo() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let png = match args.as_slice() {
        [] => std::path::PathBuf::from("target/demo/unbusy-demo.png"),
        [flag, path] if flag == "--png" => path.into(),
        _ => return Err("usage: demo [--png PATH]".into()),
    };
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
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
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
            let samples = samples.clone();
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
                let mut tier = None;
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
                        tier = note
                            .split("tier=")
                            .nth(1)
                            .and_then(|s| s.split(';').next())
                            .and_then(|s| s.trim().parse::<u8>().ok());
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
                samples
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Sample {
                        sent_s: t,
                        through,
                        ok,
                        latency_ms: elapsed,
                        attempts,
                        tier,
                    });
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
    let samples = samples
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    write_png(&samples, &png)?;
    println!("Over time: {}", png.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(sent_s: f64, through: bool, ok: bool, latency_ms: f64, attempts: u64) -> Sample {
        Sample {
            sent_s,
            through,
            ok,
            latency_ms,
            attempts,
            tier: through.then_some(attempts as u8 - 1),
        }
    }

    #[test]
    fn the_timeline_bins_requests_by_sending_time_per_path() {
        let samples = [
            sample(0.5, false, true, 1000.0, 1),
            sample(1.9, false, false, 10.0, 1),
            sample(0.1, true, true, 3000.0, 2),
            sample(1.0, true, true, 2000.0, 3),
            sample(1.5, true, true, 4000.0, 1),
            sample(2.0, true, false, 500.0, 1),
        ];
        let chart = timeline(&samples);
        let values = |panel: usize, line: usize| -> Vec<f64> {
            chart.panels[panel].series[line]
                .points
                .iter()
                .map(|p| p.1)
                .collect()
        };
        let x: Vec<f64> = chart.panels[0].series[0]
            .points
            .iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(x.len(), 15);
        assert_eq!((x[0], x[1], x[14]), (1.0, 3.0, 29.0));
        // Success: straight 1 of 2 in the first bin, nothing sent after; through 3 of 3, then
        // 0 of 1.
        let (direct, through) = (values(0, 0), values(0, 1));
        assert_eq!(direct[0], 50.0);
        assert!(direct[1].is_nan() && direct[14].is_nan());
        assert_eq!((through[0], through[1]), (100.0, 0.0));
        assert_eq!(chart.panels[0].series[1].colour, THROUGH);
        // Latency, answered only, in seconds: the median of 3, 2 and 4 s; none answered after.
        assert_eq!(values(1, 0)[0], 1.0);
        assert_eq!(values(1, 1)[0], 3.0);
        assert!(values(1, 1)[1].is_nan());
        assert_eq!(chart.panels[1].y_max, 3.0);
        // Attempts per request: (2 + 3 + 1) / 3 through unbusy, 1 straight.
        assert_eq!((values(2, 0)[0], values(2, 1)[0]), (1.0, 2.0));
        // The tier: the highest reported in the bin, through unbusy only.
        assert_eq!(chart.panels[3].series.len(), 1);
        assert_eq!(values(3, 0)[..2], [2.0, 0.0]);
    }
}
