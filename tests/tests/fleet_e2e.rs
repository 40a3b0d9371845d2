//! A fleet of two proxies sharing an L2 cache: real `redis-server`, the `unbusy-store` binary,
//! two Envoy processes with the filter (each its own shared data, as two proxies of a fleet),
//! one emulated provider. An answer fetched through Envoy A is served by Envoy B from the store
//! (`cache=hit-l2`), for the same tenant only, and the provider sees one call for it; with the
//! store killed, both Envoys still answer, from the provider.
//!
//! Needs `make filter`, Envoy (`make setup`) and `redis-server` on the `PATH` (or
//! `UNBUSY_REDIS_SERVER`); builds `unbusy-store` itself (`cargo build -p unbusy-store`) unless
//! `UNBUSY_STORE_BIN` names one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::json;
use std::time::{Duration, Instant};
use unbusy_tests::emulator::start;
use unbusy_tests::envoy::{
    filter_config, filter_wasm, render, store_upstream, use_store, Render, Upstream,
};
use unbusy_tests::fleet::{store, store_on};
use unbusy_tests::harness::{chat, chat_body, Envoy};
use unbusy_tests::redis::RedisServer;
use unbusy_tests::world::{healthy, test_config};

fn note(r: &unbusy_tests::harness::Reply) -> String {
    r.header("x-unbusy").unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_fetched_through_one_envoy_is_an_l2_hit_on_another_and_a_dead_store_is_skipped() {
    let dir = std::env::temp_dir().join(format!("ubl2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let redis = RedisServer::start("fleet");
    let socket = redis.socket();
    let (store_proc, store_addr) = store(&socket);
    let mut store_proc = Some(store_proc);

    let (emu, addr) = start(
        healthy("primary", [5.0, 10.0], [10.0, 20.0]),
        7,
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let upstreams = [Upstream::parse(&format!("primary=http://{addr}")).unwrap()];
    let mut filter = filter_config(&test_config(&json!({})), &upstreams, &|_| false).unwrap();
    use_store(&mut filter);
    // The default lookup timeout (20 ms) is for a store beside the proxy on an idle host; on a
    // loaded test machine a first lookup can take longer and fail open. This test is about
    // sharing, so it allows the lookup 1 s (failing open is tested natively and below).
    filter["store"]["timeout_ms"] = json!(1000);
    let store_up = store_upstream(&format!("http://{store_addr}")).unwrap();
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
        store: Some(&store_up),
    });
    let a = Envoy::start_yaml(&yaml, 1).unwrap();
    let b = Envoy::start_yaml(&yaml, 1).unwrap();

    let body = chat_body("fleet cache", false, true);
    let first = chat(a.listen, &body, &[]).await.unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(note(&first).contains("cache=miss"), "{}", note(&first));
    assert_eq!(emu.stats().attempts, 1);
    // The write-back leaves on A's next tick (20 ms): wait until Redis holds a key.
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.keys() == 0 {
        assert!(
            Instant::now() < deadline,
            "A's answer never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let started = Instant::now();
    let hit = chat(b.listen, &body, &[]).await.unwrap();
    let l2_latency = started.elapsed();
    assert_eq!(hit.status, 200);
    assert!(
        note(&hit).contains("cache=hit-l2"),
        "{} (Envoy B's log: {})",
        note(&hit),
        b.log_text()
    );
    assert_eq!(hit.text(), first.text());
    assert_eq!(
        hit.header("content-type"),
        first.header("content-type"),
        "served as it came"
    );
    assert_eq!(
        emu.stats().attempts,
        1,
        "one provider call for both proxies"
    );
    let started = Instant::now();
    let again = chat(b.listen, &body, &[]).await.unwrap();
    let l1_latency = started.elapsed();
    assert!(note(&again).contains("cache=hit;"), "{}", note(&again));
    // A second answer through A, then B: an L2 hit on B's warm connection to the store.
    let body2 = chat_body("fleet cache 2", false, true);
    assert_eq!(chat(a.listen, &body2, &[]).await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let hit2 = chat(b.listen, &body2, &[]).await.unwrap();
    let warm = started.elapsed();
    assert!(note(&hit2).contains("cache=hit-l2"), "{}", note(&hit2));
    assert_eq!(emu.stats().attempts, 2);
    eprintln!(
        "B: L2 hit {l2_latency:?} (first, new connection), {warm:?} (warm), L1 hit {l1_latency:?}"
    );

    // Another tenant: not served the first tenant's answer.
    let other = chat(
        b.listen,
        &body,
        &[("authorization", "Bearer another-tenant")],
    )
    .await
    .unwrap();
    assert_eq!(other.status, 200);
    assert!(note(&other).contains("cache=miss"), "{}", note(&other));
    assert_eq!(emu.stats().attempts, 3);

    // The store killed: both proxies answer from the provider, without waiting on it.
    drop(store_proc.take());
    for (i, envoy) in [&a, &b, &a, &b].into_iter().enumerate() {
        let body = chat_body(&format!("after the store {i}"), false, true);
        let started = Instant::now();
        let r = chat(envoy.listen, &body, &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(note(&r).contains("cache=miss"), "{}", note(&r));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
    assert_eq!(emu.stats().attempts, 7);
    let log = a.log_text();
    assert_eq!(
        log.matches("the store is unavailable").count(),
        1,
        "one line per outage: {log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether the proxies share answers: new cacheable requests, each sent through `a` and, once
/// Redis holds one more entry (or after 2 s), through `b`, until `b` answers one from the
/// store (`cache=hit-l2`); at most 15 s. Every answer on the way must be a 200. Returns the
/// number of tries.
async fn until_shared(a: &Envoy, b: &Envoy, redis: &RedisServer, tag: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    for tries in 1.. {
        let body = chat_body(&format!("{tag} {tries}"), false, true);
        let before = redis.try_command("DBSIZE");
        let first = chat(a.listen, &body, &[]).await.unwrap();
        assert_eq!(first.status, 200, "{}", first.text());
        let written = Instant::now() + Duration::from_secs(2);
        while redis.try_command("DBSIZE") == before && Instant::now() < written {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = chat(b.listen, &body, &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        if note(&r).contains("cache=hit-l2") {
            return tries;
        }
        assert!(
            Instant::now() < deadline,
            "not shared: last {} (B's log: {})",
            note(&r),
            b.log_text()
        );
    }
    unreachable!()
}

/// Redis killed under load, then the store killed: no request fails and none waits on them
/// (each is answered within the lookup timeout plus the provider's time); each brought back,
/// the proxies share answers again within a few ticks, by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_or_the_store_killed_under_load_fails_nothing_and_sharing_resumes_when_back() {
    let mut redis = RedisServer::start("fleet-outage");
    let socket = redis.socket();
    let (store_proc, store_addr) = store(&socket);
    let mut store_proc = Some(store_proc);
    let (emu, addr) = start(
        healthy("primary", [5.0, 10.0], [10.0, 20.0]),
        7,
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let upstreams = [Upstream::parse(&format!("primary=http://{addr}")).unwrap()];
    let mut filter = filter_config(&test_config(&json!({})), &upstreams, &|_| false).unwrap();
    use_store(&mut filter);
    // Generous for a loaded test machine, and still far below what a hung dependency would
    // cost: the bound below is this plus the provider's time.
    let lookup = Duration::from_millis(500);
    filter["store"]["timeout_ms"] = json!(500);
    let store_up = store_upstream(&format!("http://{store_addr}")).unwrap();
    let yaml = render(&Render {
        listen: ("127.0.0.1", 0),
        admin: ("127.0.0.1", 0),
        upstreams: &upstreams,
        filter: Some(&filter),
        wasm: &filter_wasm(),
        native: None,
        store: Some(&store_up),
    });
    let a = Envoy::start_yaml(&yaml, 2).unwrap();
    let b = Envoy::start_yaml(&yaml, 2).unwrap();
    // Shared before the outage.
    until_shared(&a, &b, &redis, "before the outage").await;

    // Load through both proxies: distinct cacheable requests, each checked and timed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for (i, listen) in [a.listen, b.listen, a.listen, b.listen]
        .into_iter()
        .enumerate()
    {
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let body = chat_body(&format!("load {i} {n}"), false, true);
                let started = Instant::now();
                let r = chat(listen, &body, &[]).await.unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                slowest = slowest.max(started.elapsed());
                n += 1;
            }
            (n, slowest)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(store_proc.take());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for task in load {
        let (n, slowest) = task.await.unwrap();
        answered += n;
        // The provider answers in tens of milliseconds; a request that waited on a dead
        // dependency past its lookup timeout would show here.
        assert!(
            slowest < lookup + Duration::from_millis(1000),
            "a request took {slowest:?}"
        );
    }
    assert!(answered > 20, "too little load: {answered}");

    // The store back on the same address (Redis is back already): sharing resumes.
    let (_store_again, again) = store_on(&store_addr.to_string(), &socket);
    assert_eq!(again, store_addr);
    let tries = until_shared(&a, &b, &redis, "after the outage").await;
    eprintln!("{answered} answers under the outage; shared again after {tries} tries");
    let calls = emu.stats().attempts;
    assert!(
        calls >= u64::from(answered),
        "{calls} calls for {answered} answers"
    );
    for envoy in [&a, &b] {
        let log = envoy.log_text();
        assert!(
            log.matches("the store is unavailable").count() <= 4,
            "about one line per outage and worker: {log}"
        );
    }
}
