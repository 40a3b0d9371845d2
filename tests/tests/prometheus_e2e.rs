//! examples/prometheus for real: `promtool` checks and unit-tests the rules, then a real
//! `prometheus` (Debian's, installed by `make setup`) scrapes a live Envoy with the filter
//! (`make filter`) in front of a busy emulated provider, and what it recorded is checked
//! against what the clients and the emulator counted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use unbusy_tests::harness::{chat, chat_body, request};
use unbusy_tests::ops::{
    adapter_rules, all_values, dashboard_queries, expand, hpa_metrics, read_yaml,
};
use unbusy_tests::scenario::FaultWindow;
use unbusy_tests::world::{healthy, test_config, World};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/prometheus")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(examples())
        .output()
        .expect("promtool (run `make setup`)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_the_config_and_rules_and_their_unit_tests_pass() {
    promtool(&["check", "config", "prometheus.yml"]);
    let rules = promtool(&["check", "rules", "rules/unbusy.rules.yml"]);
    assert!(rules.contains("SUCCESS: 19 rules found"), "{rules}");
    let tests = promtool(&["test", "rules", "rules/unbusy.rules.test.yml"]);
    assert!(tests.contains("SUCCESS"), "{tests}");
}

/// A `prometheus` of its own: a private data directory, port 0 (the kernel picks a free port,
/// and Prometheus logs the one it bound: `msg="Listening on" address=127.0.0.1:PORT`).
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Prometheus {
    fn start(config: &str) -> Self {
        let dir = std::env::temp_dir()
            .join("unbusy-e2e")
            .join(format!("prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus (run `make setup`)");
        let mut p = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            let bound = p.log().lines().find_map(|l| {
                l.contains("msg=\"Listening on\"")
                    .then(|| l.split("address=").nth(1)?.trim().parse().ok())
                    .flatten()
            });
            if let Some(addr) = bound {
                p.addr = addr;
                return p;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("prometheus did not listen within 20 s:\n{}", p.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Waits until Prometheus says it is ready (its storage open: queries answer 503 before).
    async fn ready(self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let r = request(self.addr, "GET", "/-/ready", &[], "").await;
            if r.is_ok_and(|r| r.status == 200) {
                return self;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("prometheus not ready within 20 s:\n{}", self.log());
    }

    async fn get(&self, path: &str) -> Value {
        let r = request(self.addr, "GET", path, &[], "").await.unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.json()
    }

    /// A range query from `start` to `end` (Unix seconds) at a step of 1 s: the number of
    /// series with at least one sample, or Prometheus' error (a query that does not parse,
    /// say).
    async fn range_series(&self, expr: &str, start: f64, end: f64) -> Result<usize, String> {
        let path = format!(
            "/api/v1/query_range?query={}&start={start}&end={end}&step=1",
            encode(expr)
        );
        let r = request(self.addr, "GET", &path, &[], "").await?;
        let v = r.json();
        if r.status != 200 || v["status"] != "success" {
            return Err(format!("{} {}: {}", r.status, v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
    }

    /// An instant query (at `time`, Unix seconds, or now): each series' labels and value.
    async fn query_at(&self, expr: &str, time: Option<f64>) -> Vec<(Value, f64)> {
        let mut path = format!("/api/v1/query?query={}", encode(expr));
        if let Some(t) = time {
            path.push_str(&format!("&time={t}"));
        }
        let v = self.get(&path).await;
        assert_eq!(v["status"], "success", "{expr}: {v}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let value = s["value"][1].as_str().unwrap().parse().unwrap();
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// The value of a query that must give one series.
    async fn one(&self, expr: &str) -> Option<f64> {
        let r = self.query_at(expr, None).await;
        assert!(r.len() <= 1, "{expr}: {r:?}");
        r.first().map(|(_, v)| *v)
    }

    /// Polls `expr` until `ok` holds for its value (up to 15 s); the last value otherwise.
    async fn until(&self, expr: &str, ok: impl Fn(f64) -> bool) -> Result<f64, Option<f64>> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.one(expr).await;
            if let Some(v) = last.filter(|v| ok(*v)) {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The labels the test's scrape gives its target, as a Kubernetes pod scrape job would
/// (examples/istio scales pods on the per-pod request rate).
const NAMESPACE: &str = "llm-apps";
const POD: &str = "llm-client-0";

/// examples/prometheus/prometheus.yml pointed at this Envoy's admin address and these rules,
/// scraping and evaluating every second, the target labelled with a namespace and a pod.
fn config_for(admin: SocketAddr) -> String {
    let text = std::fs::read_to_string(examples().join("prometheus.yml")).unwrap();
    let rules = examples().join("rules/unbusy.rules.yml");
    let mut out = text.clone();
    for (from, to) in [
        (
            "[\"127.0.0.1:9901\"]",
            format!("[\"{admin}\"]\n        labels: {{ namespace: {NAMESPACE}, pod: {POD} }}"),
        ),
        ("scrape_interval: 15s", "scrape_interval: 1s".into()),
        ("evaluation_interval: 15s", "evaluation_interval: 1s".into()),
        ("- rules/unbusy.rules.yml", format!("- {}", rules.display())),
    ] {
        assert!(out.contains(from), "prometheus.yml has no {from}");
        out = out.replace(from, &to);
    }
    out
}

/// Envoy's smallest histogram bucket bound at or above `ms` (its default buckets).
fn bucket_above(ms: f64) -> f64 {
    [
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0,
    ]
    .into_iter()
    .find(|b| *b >= ms)
    .unwrap_or(f64::INFINITY)
}

#[derive(Debug, Default)]
struct Seen {
    requests: u64,
    answered: u64,
    attempts: u64,
    cache_hits: u64,
    cache_lookups: u64,
    max_ms: f64,
}

impl Seen {
    fn note(&mut self, r: &unbusy_tests::harness::Reply) {
        self.requests += 1;
        self.answered += u64::from(r.status == 200);
        self.max_ms = self.max_ms.max(r.total.as_secs_f64() * 1000.0);
        let note = r.header("x-unbusy").unwrap_or("");
        let field = |name: &str| {
            note.split("; ")
                .find_map(|p| p.strip_prefix(name))
                .unwrap_or("")
                .to_string()
        };
        self.attempts += field("attempts=").parse::<u64>().unwrap_or(0);
        match field("cache=").as_str() {
            "hit" => {
                self.cache_hits += 1;
                self.cache_lookups += 1;
            }
            "miss" | "stale" => self.cache_lookups += 1,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_envoy_and_records_what_the_emulator_counted() {
    // One provider answering half its attempts 503 (busy); two attempts per request, so about a
    // quarter of the requests fail. Envoy flushes histograms every second, not every five.
    let mut primary = healthy("primary", [20.0, 40.0], [60.0, 120.0]);
    primary.provider.faults = vec![FaultWindow {
        from_s: 0.0,
        to_s: 1e9,
        busy_503: 0.5,
        ..FaultWindow::default()
    }];
    // A concurrency quota far above the load: it never binds, and the saturation series exist.
    let config = test_config(&json!({
        "retry": {"max_attempts": 2, "base_ms": 10, "cap_ms": 20},
        "providers": [{"name": "primary", "max_concurrency": 64}],
    }));
    let w = World::start_edited(
        vec![primary],
        &config,
        1,
        |_| {},
        |y| {
            assert!(y.contains("\nstats_config:\n"));
            y.replacen(
                "\nstats_config:\n",
                "\nstats_flush_interval: 1s\nstats_config:\n",
                1,
            )
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let from = unix_now();
    let p = Prometheus::start(&config_for(w.envoy.admin)).ready().await;

    // Scraped once with every counter at zero, before any load: `increase` and the ratios then
    // start from a sample of 0 (no extrapolation before the first sample).
    assert_eq!(
        p.until("count(unbusy_requests_total)", |n| n == 9.0).await,
        Ok(9.0),
        "Prometheus never scraped Envoy:\n{}",
        p.log()
    );
    assert_eq!(p.one("sum(unbusy_requests_total)").await, Some(0.0));

    // The load: 40 requests four at a time (half of them streamed), then one cacheable
    // question asked four times in a row.
    let mut seen = Seen::default();
    for round in 0..10 {
        let calls: Vec<_> = (0..4)
            .map(|i| {
                let addr = w.envoy.listen;
                tokio::spawn(async move {
                    let body = chat_body(&format!("q{round}-{i}"), i % 2 == 0, false);
                    chat(addr, &body, &[]).await.unwrap()
                })
            })
            .collect();
        for c in calls {
            seen.note(&c.await.unwrap());
        }
    }
    for _ in 0..4 {
        seen.note(
            &chat(w.envoy.listen, &chat_body("same", false, true), &[])
                .await
                .unwrap(),
        );
    }
    let emu = w.providers[0].stats();
    eprintln!(
        "{seen:?}; emulator: {} attempts, {} ok",
        emu.attempts, emu.ok
    );
    let (n, failed) = (seen.requests as f64, (seen.requests - seen.answered) as f64);
    assert!(failed / n > 0.05, "the load needs errors over 5%: {seen:?}");
    assert_eq!(
        seen.attempts, emu.attempts,
        "the answers' attempts are the emulator's"
    );

    // The raw counters' last values, through Prometheus, equal the counts.
    let r = p.until("sum(unbusy_requests_total)", |v| v == n).await;
    assert_eq!(r, Ok(n), "requests");
    let attempts = "sum(unbusy_attempts_total{provider=\"primary\"})";
    assert_eq!(p.one(attempts).await, Some(emu.attempts as f64), "attempts");
    let ok = "sum(unbusy_attempts_total{provider=\"primary\",result=\"success\"})";
    assert_eq!(p.one(ok).await, Some(emu.ok as f64), "successful attempts");
    let errors =
        "sum(unbusy_requests_total{outcome=~\"failed|deadline_exceeded|rate_limited|shed\"})";
    assert_eq!(p.one(errors).await, Some(failed), "failed requests");
    let hits = "sum(unbusy_cache_total{result=\"hit\"})";
    assert_eq!(
        p.one(hits).await,
        Some(seen.cache_hits as f64),
        "cache hits"
    );

    // increase() over a window that holds the whole load, at the last scrape's timestamp: no
    // extrapolation at either end, so it is the count exactly.
    let last = p
        .one("timestamp(unbusy_requests_total{outcome=\"success\"})")
        .await
        .unwrap();
    let inc = p
        .query_at("sum(increase(unbusy_requests_total[5m]))", Some(last))
        .await;
    assert_eq!(inc.len(), 1);
    assert!((inc[0].1 - n).abs() < 1e-9, "increase {} != {n}", inc[0].1);

    // The recorded series, once the rules have run on the last scrape. Both sides of each
    // ratio come from the same scrapes, so Prometheus' extrapolation cancels out: exact.
    let close = |want: f64| move |v: f64| (v - want).abs() < 1e-9;
    let error_ratio = failed / n;
    let r = p
        .until("unbusy:requests_error:ratio_rate1m", close(error_ratio))
        .await;
    assert!(r.is_ok(), "error ratio {r:?}, counted {error_ratio}");
    let busy_ratio = (emu.attempts - emu.ok) as f64 / emu.attempts as f64;
    let busy = "provider:unbusy:attempts_busy:ratio_rate1m{provider=\"primary\"}";
    let r = p.until(busy, close(busy_ratio)).await;
    assert!(r.is_ok(), "busy ratio {r:?}, counted {busy_ratio}");
    let hit_ratio = seen.cache_hits as f64 / seen.cache_lookups as f64;
    assert!(seen.cache_hits > 0, "{seen:?}");
    let r = p
        .until("unbusy:cache_hit:ratio_rate1m", close(hit_ratio))
        .await;
    assert!(r.is_ok(), "cache hit ratio {r:?}, counted {hit_ratio}");
    // The request rate is extrapolated to the rule's evaluation time (at most 1.1 scrape
    // intervals past the last sample, over at least the load's duration plus a scrape).
    let least = n / 60.0;
    let rate = p
        .until("unbusy:requests:rate1m", |v| v >= least - 1e-9)
        .await;
    let first = "min_over_time(timestamp(unbusy_requests_total{outcome=\"success\"})[5m:1s])";
    let sampled = last - p.one(first).await.unwrap();
    let most = least * (sampled + 1.1) / sampled;
    assert!(
        rate.is_ok_and(|r| r <= most + 1e-9),
        "rate {rate:?} not in [{least}, {most}]"
    );

    // The HPA's metric (examples/istio) as prometheus-adapter asks for it for this pod: the
    // pod's request rate, here the whole rate (one pod), at the same evaluation.
    let hpa = hpa_metrics(&read_yaml("istio/unbusy.yaml").unwrap());
    let adapter = read_yaml("istio/prometheus-adapter.yaml")
        .unwrap()
        .remove(0);
    let rule = adapter_rules(&adapter)
        .unwrap()
        .into_iter()
        .find(|r| r.served_as == hpa[0].name)
        .unwrap();
    let query = rule.render(&format!("namespace=\"{NAMESPACE}\",pod=~\"{POD}\""), "pod");
    let at = p.one("timestamp(unbusy:requests:rate1m)").await;
    let whole = p.query_at("unbusy:requests:rate1m", at).await;
    let per_pod = p.query_at(&query, at).await;
    assert_eq!(per_pod.len(), 1, "{query}: {per_pod:?}");
    assert_eq!(per_pod[0].0, json!({"pod": POD}), "{query}");
    let (pod_rate, all_rate) = (per_pod[0].1, whole[0].1);
    assert!(
        pod_rate > 0.0 && (pod_rate - all_rate).abs() <= 1e-9 * all_rate,
        "{query}: {pod_rate}, the whole rate {all_rate}"
    );

    // Latency: the histogram's quantiles lie within what the clients measured.
    let p50 = p
        .until("unbusy:request_duration_ms:p50_rate1m", |v| v > 0.0)
        .await
        .unwrap();
    let p99 = p
        .one("unbusy:request_duration_ms:p99_rate1m")
        .await
        .unwrap();
    let bound = bucket_above(seen.max_ms);
    assert!(
        p50 <= p99 && p99 <= bound,
        "p50 {p50}, p99 {p99}, client max {} ms",
        seen.max_ms
    );
    let ttft = "provider:unbusy:first_token_ms:p50_rate1m{provider=\"primary\"}";
    let ttft = p.until(ttft, |v| v > 0.0).await;
    assert!(ttft.is_ok_and(|t| t <= bound), "first token p50 {ttft:?}");
    // Saturation: nothing in flight once the load is over (the gauge comes down when Envoy
    // has closed the upstream stream, which can be a scrape after the request was counted).
    let in_flight = "provider:unbusy:in_flight:sum{provider=\"primary\"}";
    assert_eq!(p.until(in_flight, |v| v == 0.0).await, Ok(0.0));
    let quota = "provider:unbusy:concurrency_quota:max{provider=\"primary\"}";
    assert_eq!(p.until(quota, |v| v == 64.0).await, Ok(64.0));
    let saturation = "provider:unbusy:saturation:ratio{provider=\"primary\"}";
    assert_eq!(p.until(saturation, |v| v == 0.0).await, Ok(0.0));

    // Every rule evaluated without error, and the error-rate alert is pending (its `for` is
    // five minutes).
    let rules = p.get("/api/v1/rules").await;
    let all: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(all.len(), 19);
    for r in &all {
        assert_eq!(r["health"], "ok", "{r}");
    }
    let r = p
        .until(
            "count(ALERTS{alertname=\"UnbusyErrorRateHigh\",alertstate=\"pending\"})",
            |v| v == 1.0,
        )
        .await;
    assert_eq!(r, Ok(1.0), "{}", p.get("/api/v1/alerts").await);

    // The Grafana dashboard (examples/grafana): every query parses and returns data over the
    // run ...
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(examples().join("../grafana/unbusy.json")).unwrap(),
    )
    .unwrap();
    let end = unix_now();
    let problems = dashboard_problems(&p, &dashboard, from, end).await;
    assert!(problems.is_empty(), "{problems:#?}");
    // ... and a typo, a series that does not exist or a variable Grafana does not know would
    // have been caught.
    for (expr, why) in [
        (
            "sum(rate(unbusy_requests_total[$__rate_interval])",
            "bad_data",
        ),
        ("unbusy:requests:rate5m", "no data"),
        (
            "sum(rate(unbusy_request_total[$__rate_interval]))",
            "no data",
        ),
        (
            "unbusy:requests:rate1m{instance=~\"$instance\"}",
            "unknown variable $instance",
        ),
    ] {
        let mut broken = dashboard.clone();
        let panel = broken["panels"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|p| p["title"] == "1. Request rate")
            .unwrap();
        panel["targets"][0]["expr"] = json!(expr);
        let problems = dashboard_problems(&p, &broken, from, end).await;
        assert!(
            problems.len() == 1
                && problems[0].starts_with("1. Request rate: ")
                && problems[0].contains(why),
            "{expr}: {problems:#?}"
        );
    }
    eprintln!("done in {:?}", started.elapsed());
}

/// Now, in Unix seconds.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What is wrong with the dashboard's queries against `p` over `[start, end]`: one line per
/// query that has a variable Grafana would not expand, does not parse or returns no series.
/// Grafana's own variables take the values it would give them here: `$__rate_interval` four
/// scrape intervals (its floor; 1 s scrapes), `$__interval` the 1 s step, `$__range` the run;
/// the dashboard's variables their "All" value.
async fn dashboard_problems(p: &Prometheus, d: &Value, start: f64, end: f64) -> Vec<String> {
    let mut values = all_values(d).unwrap();
    values.insert("__rate_interval".into(), "4s".into());
    values.insert("__interval".into(), "1s".into());
    values.insert("__range".into(), format!("{}s", (end - start).ceil()));
    let mut problems = Vec::new();
    for q in dashboard_queries(d).unwrap() {
        let expr = match expand(&q.expr, &values) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{}: {e}", q.place));
                continue;
            }
        };
        match p.range_series(&expr, start, end).await {
            Ok(0) => problems.push(format!("{}: {expr}: no data", q.place)),
            Ok(_) => {}
            Err(e) => problems.push(format!("{}: {expr}: {e}", q.place)),
        }
    }
    problems
}
