//! The store against a Redis Cluster of three primaries on loopback (`redis-server
//! --cluster-enabled yes` three times, joined by `redis-cli --cluster create`): cache entries
//! spread over the nodes, lease calls whose scopes live on different nodes, the semaphore and
//! pauses, and the lease accuracy across stores. Cluster nodes need TCP ports (and their bus
//! port, +10000): each node's pair is checked free just before it starts, and a node that
//! still loses the race is started again on another pair.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use bytes::Bytes;
use common::{redis_present, Client, Store};
use hyper::{Method, StatusCode};
use serde_json::json;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use unbusy_tests::redis::RedisCluster;

fn cli_present() -> bool {
    Command::new(unbusy_tests::redis::redis_cli())
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_works_on_a_three_primary_cluster() {
    if !redis_present("the_store_works_on_a_three_primary_cluster") {
        return;
    }
    assert!(
        cli_present(),
        "redis-server without redis-cli (make setup installs both)"
    );
    let cluster = RedisCluster::start();
    let urls = cluster.urls();
    let stores: Vec<Store> = (0..2)
        .map(|_| Store::start("--redis-cluster", &urls, &[]))
        .collect();
    let mut c = Client::connect(stores[0].addr).await;
    let mut d = Client::connect(stores[1].addr).await;

    // Cache: sixty entries land on every node, each read back through the other store, and
    // tenants stay apart.
    for i in 0..60 {
        let body = format!("{{\"answer\":{i}}}");
        let a = c
            .call(
                Method::PUT,
                &format!("/v1/cache/tenant{}/key{i}", i % 3),
                &[
                    ("x-unbusy-ttl-ms", "60000"),
                    ("content-type", "application/json"),
                ],
                Bytes::from(body),
            )
            .await;
        assert_eq!(a.status, StatusCode::NO_CONTENT, "{:?}", a.body);
    }
    for i in 0..60 {
        let a = d.get(&format!("/v1/cache/tenant{}/key{i}", i % 3)).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, Bytes::from(format!("{{\"answer\":{i}}}")));
        let other = d
            .get(&format!("/v1/cache/tenant{}/key{i}", (i + 1) % 3))
            .await;
        assert_eq!(other.status, StatusCode::NOT_FOUND);
    }
    let spread = cluster.keys_per_node();
    assert!(
        spread.iter().all(|n| *n > 0),
        "entries on every node: {spread:?}"
    );

    // One lease call, scopes on different slots (one script each, one per node).
    let scopes: Vec<_> = (0..12)
        .map(|i| {
            json!({"scope": format!("tenant:t{i}"), "buckets": [
            {"name": "requests", "per_minute": 60, "burst": 5, "want": 3},
            {"name": "tokens", "per_minute": 6000, "burst": 500, "want": 400}]})
        })
        .collect();
    let a = c.post("/v1/quota/lease", &json!({"leases": scopes})).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    let v = a.json();
    for l in v["leases"].as_array().unwrap() {
        assert_eq!(l["buckets"][0]["granted"], 3);
        assert_eq!(l["buckets"][1]["granted"], 400);
    }
    let v = d
        .post("/v1/quota/lease", &json!({"leases": scopes}))
        .await
        .json();
    for l in v["leases"].as_array().unwrap() {
        assert_eq!(
            l["buckets"][0]["granted"], 2,
            "the other store sees the same buckets"
        );
        // 100 tokens a second refill: a few more may have come since.
        let t = l["buckets"][1]["granted"].as_u64().unwrap();
        assert!((100..=110).contains(&t), "{t}");
    }

    // Semaphore and pause through the cluster.
    let acq = |h: &str, want: u64| json!({"account": "deepseek", "holder": h, "want": want, "limit": 3, "lease_ms": 5000});
    assert_eq!(
        c.post("/v1/concurrency/acquire", &acq("a", 2)).await.json()["held"],
        2
    );
    assert_eq!(
        d.post("/v1/concurrency/acquire", &acq("b", 2)).await.json()["held"],
        1
    );
    c.put_json(
        "/v1/provider/deepseek/pause",
        &json!({"for_ms": 5000, "reason": "breaker_open"}),
    )
    .await;
    let v = d
        .get("/v1/pauses?providers=deepseek,backup,third,fourth")
        .await
        .json();
    assert_eq!(v["pauses"]["deepseek"]["reason"], "breaker_open");
    assert_eq!(v["pauses"]["backup"]["paused"], false);

    // Lease accuracy across the two stores on the cluster, 4 s. The bound is computed from
    // Redis's clock (the one the scripts charge by; the nodes share this machine's).
    let time_port = cluster.ports()[0];
    let redis_clock =
        || common::redis_time_s(std::net::TcpStream::connect(("127.0.0.1", time_port)).unwrap());
    let granted = Arc::new(AtomicU64::new(0));
    let redis_started = redis_clock();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let addr = stores[i % 2].addr;
        let granted = granted.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let body = json!({"leases": [{"scope": "global", "buckets": [
                {"name": "requests", "per_minute": 6000, "burst": 50, "want": 5}]}]});
            while started.elapsed() < Duration::from_secs(4) {
                let v = c.post("/v1/quota/lease", &body).await.json();
                let b = &v["leases"][0]["buckets"][0];
                granted.fetch_add(b["granted"].as_u64().unwrap(), Ordering::Relaxed);
                let wait = b["retry_after_ms"].as_u64().unwrap();
                tokio::time::sleep(Duration::from_millis(wait.clamp(1, 50))).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = redis_clock() - redis_started;
    let got = granted.load(Ordering::Relaxed);
    let max = 100.0 * elapsed + 50.0;
    eprintln!("cluster GCRA leases, 4 clients on 2 stores, {elapsed:.2} s: {got} of at most {max:.0} ({:.1}%)", 100.0 * got as f64 / max);
    assert!(got as f64 <= max, "{got} > {max}");
    assert!(got as f64 >= 0.95 * max, "{got} < 95% of {max}");
}
