//! A fleet of two proxies sharing a provider's concurrency quota and pauses through the store:
//! real `redis-server`, the `unbusy-store` binary, two Envoy processes with the filter (two
//! workers each, each process its own shared data, as two proxies of a fleet), emulated
//! providers that count what reaches them.
//!
//! - A `max_concurrency` of 4: 200 requests sent at once, half through each proxy, and the
//!   provider (by the emulator's own count) never has a fifth in flight; every request is
//!   answered. Without the store, the same load puts more than 4 in flight (each proxy uses the
//!   whole quota), so the check can fail.
//! - 429s with `Retry-After: 5` answered to proxy A: A publishes the pause, and proxy B,
//!   which never saw one, sends nothing to that provider until the pause ends (its requests go
//!   to the other provider), then sends to it again.
//!
//! Needs `make filter`, Envoy (`make setup`) and `redis-server` on the `PATH` (or
//! `UNBUSY_REDIS_SERVER`); builds `unbusy-store` itself unless `UNBUSY_STORE_BIN` names one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use unbusy_tests::emulator::start;
use unbusy_tests::envoy::{
    filter_config, filter_wasm, render, store_upstream, use_store, Render, Upstream,
};
use unbusy_tests::fleet::store;
use unbusy_tests::harness::{chat, chat_body, request, Envoy};
use unbusy_tests::redis::RedisServer;
use unbusy_tests::scenario::FaultWindow;
use unbusy_tests::world::{healthy, test_config};

/// Two Envoys (two workers each) with the filter configured as `base` over `upstreams`, with
/// the store at `store_addr` when given.
fn two_envoys(
    base: &Value,
    upstreams: &[Upstream],
    store_addr: Option<SocketAddr>,
) -> (Envoy, Envoy) {
    let mut filter = filter_config(&test_config(base), upstreams, &|_| false).unwrap();
    let store_up = store_addr.map(|a| store_upstream(&format!("http://{a}")).unwrap());
    if store_up.is_some() {
        use_store(&mut filter);
        filter["store"]["poll_ms"] = json!(100);
    }
    let wasm = filter_wasm();
    assert!(
        wasm.exists(),
        "{} missing: run `make filter`",
        wasm.display()
    );
    let yaml = render(&Render {
        listen: ("127.0.0.1", 0),
        admin: ("127.0.0.1", 0),
        upstreams,
        filter: Some(&filter),
        wasm: &wasm,
        native: None,
        store: store_up.as_ref(),
    });
    (
        Envoy::start_yaml(&yaml, 2).unwrap(),
        Envoy::start_yaml(&yaml, 2).unwrap(),
    )
}

/// 200 requests at once, half through each Envoy: how many were answered 200, and the most
/// the provider had in flight at once (its own count).
async fn burst(a: &Envoy, b: &Envoy, tag: &str) -> usize {
    let mut tasks = Vec::new();
    for i in 0..200 {
        let addr = if i % 2 == 0 { a.listen } else { b.listen };
        let body = chat_body(&format!("{tag} {i}"), false, false);
        tasks.push(tokio::spawn(async move { chat(addr, &body, &[]).await }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        if r.status == 200 {
            ok += 1;
        } else {
            eprintln!("{} {}", r.status, r.text());
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_proxies_never_put_a_fifth_request_in_flight_on_a_quota_of_four() {
    let redis = RedisServer::start("fleet-limits");
    let socket = redis.socket();
    let (store_proc, store_addr) = store(&socket);
    let base = json!({"providers": [{"name": "primary", "max_concurrency": 4}]});

    let (emu, addr) = start(
        healthy("primary", [20.0, 40.0], [40.0, 80.0]),
        11,
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let upstreams = [Upstream::parse(&format!("primary=http://{addr}")).unwrap()];
    let (a, b) = two_envoys(&base, &upstreams, Some(store_addr));
    let started = Instant::now();
    let ok = burst(&a, &b, "fleet quota").await;
    let with_store = emu.stats();
    eprintln!(
        "with the store: {ok} of 200 answered in {:?}, the provider saw {} attempts, at most {} in flight",
        started.elapsed(),
        with_store.attempts,
        with_store.max_in_flight
    );
    assert_eq!(ok, 200, "A: {}\nB: {}", a.log_text(), b.log_text());
    assert!(
        with_store.max_in_flight <= 4,
        "{} in flight at once",
        with_store.max_in_flight
    );
    assert_eq!(with_store.max_in_flight, 4, "the quota is used");
    let polls = a
        .admin_text("/stats?filter=unbusy_store_poll_total")
        .await
        .unwrap();
    assert!(polls.contains("result.ok"), "{polls}");
    let outage_lines = |e: &Envoy| {
        e.log_text()
            .matches("fleet quotas and pauses: no store")
            .count()
    };
    assert_eq!(outage_lines(&a), 0, "{}", a.log_text());

    // The store gone: both proxies go on answering (their last grant, then the local share),
    // each VM logging the outage once, not once per call.
    drop(store_proc);
    for round in 0..2 {
        let mut tasks = Vec::new();
        for i in 0..20 {
            let addr = if i % 2 == 0 { a.listen } else { b.listen };
            let body = chat_body(&format!("store gone {round} {i}"), false, false);
            tasks.push(tokio::spawn(async move { chat(addr, &body, &[]).await }));
        }
        for t in tasks {
            let r = t.await.unwrap().unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while outage_lines(&a) == 0 || outage_lines(&b) == 0 {
        assert!(
            Instant::now() < deadline,
            "no outage line: {}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // five more failed polls
    for e in [&a, &b] {
        let n = outage_lines(e);
        // (Envoy's main thread runs a root context of its own, which ticks too: three VMs.)
        assert!(
            (1..=3).contains(&n),
            "{n} outage lines for two workers and the main thread: {}",
            e.log_text()
        );
    }
    drop((a, b));

    // The same without the store: each proxy lets 4 go, so the provider sees more.
    let (emu, addr) = start(
        healthy("primary", [20.0, 40.0], [40.0, 80.0]),
        12,
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let upstreams = [Upstream::parse(&format!("primary=http://{addr}")).unwrap()];
    let (a, b) = two_envoys(&base, &upstreams, None);
    let ok = burst(&a, &b, "no store").await;
    let alone = emu.stats();
    eprintln!(
        "without the store: {ok} of 200 answered, at most {} in flight",
        alone.max_in_flight
    );
    assert_eq!(ok, 200);
    assert!(
        alone.max_in_flight > 4,
        "without the store the quota is per proxy: {}",
        alone.max_in_flight
    );
}

/// How many calls for the fleet's quotas and pauses the store answered to `envoy`'s filter
/// (`unbusy_store_poll_total{result="ok"}`, all workers).
async fn store_calls_ok(envoy: &Envoy) -> u64 {
    let text = envoy
        .admin_text("/stats?filter=unbusy_store_poll_total.result.ok")
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.rsplit_once(": ")?.1.trim().parse::<u64>().ok())
        .sum()
}

/// The pause the store holds for `provider`: its remaining ms, if paused.
async fn store_pause(store: SocketAddr, provider: &str) -> Option<u64> {
    let r = request(
        store,
        "GET",
        &format!("/v1/provider/{provider}/pause"),
        &[],
        "",
    )
    .await
    .ok()?;
    let v = r.json();
    (v["paused"] == json!(true)).then(|| v["remaining_ms"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_after_answered_to_one_proxy_pauses_the_provider_on_the_other() {
    let redis = RedisServer::start("fleet-limits");
    let socket = redis.socket();
    let (_store, store_addr) = store(&socket);
    let mut limited = healthy("primary", [10.0, 20.0], [20.0, 40.0]);
    limited.provider.faults = vec![FaultWindow {
        from_s: 0.0,
        to_s: 1e9,
        rate_limit_429: 1.0,
        retry_after_s: 5.0,
        ..FaultWindow::default()
    }];
    let (primary, primary_addr) = start(limited, 21, "127.0.0.1:0").await.unwrap();
    let (backup, backup_addr) = start(
        healthy("backup", [10.0, 20.0], [20.0, 40.0]),
        22,
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let upstreams = [
        Upstream::parse(&format!("primary=http://{primary_addr}")).unwrap(),
        Upstream::parse(&format!("backup=http://{backup_addr}")).unwrap(),
    ];
    let (a, b) = two_envoys(&json!({}), &upstreams, Some(store_addr));

    // Requests through A meet `Retry-After: 5` on the primary; three in a row on one worker
    // make that worker's engine's verdict (the account is limited), so five requests over A's
    // two workers surely make it. They are answered by the backup.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let body = chat_body(&format!("limited {i}"), false, false);
        let addr = a.listen;
        tasks.push(tokio::spawn(async move { chat(addr, &body, &[]).await }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let remaining = loop {
        if let Some(ms) = store_pause(store_addr, "primary").await {
            break ms;
        }
        assert!(
            Instant::now() < deadline,
            "A never published the pause: primary {:?}\nA: {}",
            primary.stats().rate_limit_429,
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let ends = Instant::now() + Duration::from_millis(remaining);
    eprintln!("the store holds a pause of primary for {remaining} ms");
    assert!(
        (3000..=5000).contains(&remaining),
        "the pause is the hint's: {remaining}"
    );
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The primary is healthy again: only the pause keeps B away from it.
    let healthy_primary = json!({"name": "primary", "latency_ms": {"first_token": [10.0, 20.0], "total": [20.0, 40.0]}});
    let r = request(
        primary_addr,
        "PUT",
        "/control",
        &[("content-type", "application/json")],
        healthy_primary.to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // B polls every 100 ms (its only store calls here: no quota): once two more polls were
    // answered since the store held the pause, B knows it. Then send through B until half a
    // second before the pause ends.
    let seen = store_calls_ok(&b).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while store_calls_ok(&b).await < seen + 2 {
        assert!(
            Instant::now() < deadline,
            "B does not poll: {}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let primary_before = primary.stats().attempts;
    let backup_before = backup.stats().attempts;
    let mut during = 0;
    while Instant::now() + Duration::from_millis(500) < ends {
        let body = chat_body(&format!("during the pause {during}"), false, false);
        let r = chat(b.listen, &body, &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        during += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(during >= 5, "only {during} requests during the pause");
    assert_eq!(
        primary.stats().attempts,
        primary_before,
        "B sent to the paused provider ({during} requests)\nB: {}",
        b.log_text()
    );
    assert_eq!(backup.stats().attempts, backup_before + during);

    // After the pause, B sends to the primary again.
    tokio::time::sleep(ends.saturating_duration_since(Instant::now()) + Duration::from_millis(300))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = 0;
    while primary.stats().attempts == primary_before {
        assert!(
            Instant::now() < deadline,
            "B never went back to the primary"
        );
        let body = chat_body(&format!("after the pause {after}"), false, false);
        let r = chat(b.listen, &body, &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        after += 1;
    }
    eprintln!("{during} requests through B during the pause went to the backup; the primary again after {after}");
}
