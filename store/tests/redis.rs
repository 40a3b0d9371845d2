//! The store against a real `redis-server` (see `common/mod.rs` for how it is started, and
//! what they need).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use bytes::Bytes;
use common::{percentile_us, redis_present, Client, Redis, Store};
use hyper::{Method, StatusCode};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn put(
    c: &mut Client,
    path: &str,
    ttl: u64,
    stale: u64,
    ct: &str,
    ce: Option<&str>,
    body: &[u8],
) -> StatusCode {
    let ttl = ttl.to_string();
    let stale = stale.to_string();
    let mut headers = vec![
        ("x-unbusy-ttl-ms", ttl.as_str()),
        ("x-unbusy-stale-ttl-ms", stale.as_str()),
        ("content-type", ct),
    ];
    if let Some(ce) = ce {
        headers.push(("content-encoding", ce));
    }
    c.call(Method::PUT, path, &headers, Bytes::copy_from_slice(body))
        .await
        .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_round_trip_is_tenant_scoped() {
    if !redis_present("cache_round_trip_is_tenant_scoped") {
        return;
    }
    let redis = Redis::start("cache");
    let store = Store::single(&redis);
    let mut c = Client::connect(store.addr).await;

    // Every byte value survives, with its content type and encoding.
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let s = put(
        &mut c,
        "/v1/cache/tenant-a/0123abcd",
        60_000,
        60_000,
        "text/event-stream",
        Some("gzip"),
        &binary,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let a = c.get("/v1/cache/tenant-a/0123abcd").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body.as_ref(), binary.as_slice());
    assert_eq!(a.header("content-type"), Some("text/event-stream"));
    assert_eq!(a.header("content-encoding"), Some("gzip"));
    assert_eq!(a.header("x-unbusy-freshness"), Some("fresh"));
    assert_eq!(a.header("x-unbusy-ttl-ms"), Some("60000"));

    // The same key under another tenant is another entry.
    assert_eq!(
        c.get("/v1/cache/tenant-b/0123abcd").await.status,
        StatusCode::NOT_FOUND
    );
    let s = put(
        &mut c,
        "/v1/cache/tenant-b/0123abcd",
        60_000,
        0,
        "application/json",
        None,
        b"{\"b\":1}",
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let b = c.get("/v1/cache/tenant-b/0123abcd").await;
    assert_eq!(b.body.as_ref(), b"{\"b\":1}");
    assert_eq!(b.header("content-encoding"), None);
    assert_eq!(
        c.get("/v1/cache/tenant-a/0123abcd").await.body.as_ref(),
        binary.as_slice()
    );

    // The documented key layout, with the default prefix.
    let keys = redis.command("KEYS *");
    assert!(keys.contains("unbusy:cache:tenant-a:0123abcd"), "{keys}");
    assert!(keys.contains("unbusy:cache:tenant-b:0123abcd"), "{keys}");

    // Deleting one tenant's entry leaves the other's.
    let d = c
        .call(
            Method::DELETE,
            "/v1/cache/tenant-a/0123abcd",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    assert_eq!(
        c.get("/v1/cache/tenant-a/0123abcd").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get("/v1/cache/tenant-b/0123abcd").await.status,
        StatusCode::OK
    );

    // Bad input: a 400 that names what is wrong, never a hang or a crash.
    let no_ttl = c
        .call(Method::PUT, "/v1/cache/t/k", &[], Bytes::from_static(b"x"))
        .await;
    assert_eq!(no_ttl.status, StatusCode::BAD_REQUEST);
    assert!(no_ttl.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("x-unbusy-ttl-ms"));
    for path in [
        "/v1/cache/a:b/k",
        "/v1/cache/t/k%20x",
        "/v1/cache/t/",
        "/v1/cache/t/k/extra",
    ] {
        let a = c.get(path).await;
        assert!(
            a.status == StatusCode::BAD_REQUEST || a.status == StatusCode::NOT_FOUND,
            "{path}: {}",
            a.status
        );
    }
    let s = put(
        &mut c,
        "/v1/cache/t/k",
        0,
        0,
        "application/json",
        None,
        b"x",
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // Too large: refused from its Content-Length, before a byte of the body is read (raw
    // TCP, since the store answers and closes while a client would still be sending).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(store.addr).await.unwrap();
        s.write_all(
            b"PUT /v1/cache/t/big HTTP/1.1\r\nhost: s\r\nx-unbusy-ttl-ms: 1000\r\ncontent-length: 4194305\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    }

    // Round-trip latency on loopback, one keep-alive connection (printed, not asserted: the
    // machine is shared).
    let body = vec![b'a'; 2048];
    put(
        &mut c,
        "/v1/cache/tenant-a/lat",
        60_000,
        0,
        "application/json",
        None,
        &body,
    )
    .await;
    let mut gets = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        let a = c.get("/v1/cache/tenant-a/lat").await;
        gets.push(t.elapsed());
        assert_eq!(a.status, StatusCode::OK);
    }
    gets.sort();
    eprintln!(
        "store cache GET (2 KiB hit) round trip over 1000: p50 {} µs, p99 {} µs",
        percentile_us(&gets, 0.5),
        percentile_us(&gets, 0.99)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_entries_turn_stale_then_vanish() {
    if !redis_present("cache_entries_turn_stale_then_vanish") {
        return;
    }
    let redis = Redis::start("ttl");
    let store = Store::single(&redis);
    let mut c = Client::connect(store.addr).await;
    let s = put(
        &mut c,
        "/v1/cache/t/k",
        300,
        500,
        "application/json",
        None,
        b"{}",
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let a = c.get("/v1/cache/t/k").await;
    assert_eq!(a.header("x-unbusy-freshness"), Some("fresh"));
    assert!(a.header("x-unbusy-age-ms").unwrap().parse::<u64>().unwrap() < 300);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let a = c.get("/v1/cache/t/k").await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "stale entries are still served to the caller's judgement"
    );
    assert_eq!(a.header("x-unbusy-freshness"), Some("stale"));
    let age: u64 = a.header("x-unbusy-age-ms").unwrap().parse().unwrap();
    assert!((300..800).contains(&age), "age {age}");
    assert_eq!(a.header("x-unbusy-stale-ttl-ms"), Some("500"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        c.get("/v1/cache/t/k").await.status,
        StatusCode::NOT_FOUND,
        "gone after ttl + stale ttl"
    );
    // Redis itself dropped it: nothing is left to evict.
    assert!(!redis.command("KEYS *").contains("cache:t:k"));

    // A new answer replaces an old one whole (no field of the old one survives).
    put(
        &mut c,
        "/v1/cache/t/k2",
        60_000,
        0,
        "text/event-stream",
        Some("br"),
        b"old",
    )
    .await;
    put(
        &mut c,
        "/v1/cache/t/k2",
        60_000,
        0,
        "application/json",
        None,
        b"new",
    )
    .await;
    let a = c.get("/v1/cache/t/k2").await;
    assert_eq!(a.body.as_ref(), b"new");
    assert_eq!(a.header("content-encoding"), None);
    assert_eq!(a.header("content-type"), Some("application/json"));
}

/// A proxy's view of a lease call: what it asks for, what it got.
fn lease_body(want_requests: u64, want_tokens: u64) -> serde_json::Value {
    json!({"leases": [{"scope": "global", "buckets": [
        {"name": "requests", "per_minute": 6000, "burst": 50, "want": want_requests},
        {"name": "tokens", "per_minute": 600000, "burst": 5000, "want": want_tokens},
    ]}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcra_leases_hold_the_global_limit_across_proxies() {
    if !redis_present("gcra_leases_hold_the_global_limit_across_proxies") {
        return;
    }
    let redis = Redis::start("gcra");
    // Three stores, as three proxies' sidecars would be; two clients each.
    let stores: Vec<Store> = (0..3).map(|_| Store::single(&redis)).collect();
    let requests = Arc::new(AtomicU64::new(0));
    let tokens = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(AtomicU64::new(0));
    let run = Duration::from_secs(10);
    let redis_clock =
        || common::redis_time_s(std::os::unix::net::UnixStream::connect(redis.socket()).unwrap());
    let redis_started = redis_clock();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..6 {
        let addr = stores[i % 3].addr;
        let (requests, tokens, calls) = (requests.clone(), tokens.clone(), calls.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            // Demand far above the limit: each proxy leases a batch and spends it at once
            // (the worst case for the limit: no lease is ever left unspent).
            while started.elapsed() < run {
                let a = c.post("/v1/quota/lease", &lease_body(5, 400)).await;
                assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
                calls.fetch_add(1, Ordering::Relaxed);
                let v = a.json();
                let b = &v["leases"][0]["buckets"];
                let (r, t) = (
                    b[0]["granted"].as_u64().unwrap(),
                    b[1]["granted"].as_u64().unwrap(),
                );
                requests.fetch_add(r, Ordering::Relaxed);
                tokens.fetch_add(t, Ordering::Relaxed);
                let wait = b[0]["retry_after_ms"]
                    .as_u64()
                    .unwrap()
                    .max(b[1]["retry_after_ms"].as_u64().unwrap());
                tokio::time::sleep(Duration::from_millis(wait.clamp(1, 50))).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // What the limit allows over the run: rate x time + one burst, the time by Redis's clock
    // (the one the scripts charge by), read before the first lease and after the last.
    let elapsed = redis_clock() - redis_started;
    let (r, t) = (
        requests.load(Ordering::Relaxed),
        tokens.load(Ordering::Relaxed),
    );
    let r_max = 100.0 * elapsed + 50.0;
    let t_max = 10_000.0 * elapsed + 5000.0;
    eprintln!(
        "GCRA leases, 6 clients on 3 stores, {elapsed:.2} s, {} lease calls: requests {r} of at most {r_max:.0} ({:.1}%), tokens {t} of at most {t_max:.0} ({:.1}%)",
        calls.load(Ordering::Relaxed),
        100.0 * r as f64 / r_max,
        100.0 * t as f64 / t_max
    );
    assert!(
        r as f64 <= r_max,
        "requests over the global limit: {r} > {r_max}"
    );
    assert!(
        t as f64 <= t_max,
        "tokens over the global limit: {t} > {t_max}"
    );
    assert!(
        r as f64 >= 0.95 * r_max,
        "requests under 95% of the limit: {r} of {r_max}"
    );
    assert!(
        t as f64 >= 0.95 * t_max,
        "tokens under 95% of the limit: {t} of {t_max}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_partial_refused_with_a_wait_and_returnable() {
    if !redis_present("leases_are_partial_refused_with_a_wait_and_returnable") {
        return;
    }
    let redis = Redis::start("lease");
    let store = Store::single(&redis);
    let mut c = Client::connect(store.addr).await;
    let bucket = |want: u64| {
        json!({"leases": [{"scope": "tenant:t1", "buckets": [
            {"name": "requests", "per_minute": 60, "burst": 10, "want": want}]}]})
    };
    let a = c.post("/v1/quota/lease", &bucket(6)).await.json();
    assert_eq!(a["lease_ms"], 1000);
    assert_eq!(a["leases"][0]["buckets"][0]["granted"], 6);
    let a = c.post("/v1/quota/lease", &bucket(6)).await.json();
    assert_eq!(
        a["leases"][0]["buckets"][0]["granted"], 4,
        "only what is left of the burst"
    );
    let wait = a["leases"][0]["buckets"][0]["retry_after_ms"]
        .as_u64()
        .unwrap();
    assert!((900..=1000).contains(&wait), "one unit a second: {wait}");
    let a = c.post("/v1/quota/lease", &bucket(1)).await.json();
    assert_eq!(a["leases"][0]["buckets"][0]["granted"], 0);
    // A proxy gives back what it leased and did not spend; another may take it.
    let back = json!({"leases": [{"scope": "tenant:t1", "buckets": [
        {"name": "requests", "per_minute": 60, "burst": 10, "units": 3}]}]});
    let a = c.post("/v1/quota/return", &back).await.json();
    assert_eq!(a["leases"][0]["buckets"][0]["returned"], 3);
    let a = c.post("/v1/quota/lease", &bucket(5)).await.json();
    assert_eq!(a["leases"][0]["buckets"][0]["granted"], 3);
    // Another scope is another bucket.
    let other = json!({"leases": [{"scope": "tenant:t2", "buckets": [
        {"name": "requests", "per_minute": 60, "burst": 10, "want": 10}]}]});
    assert_eq!(
        c.post("/v1/quota/lease", &other).await.json()["leases"][0]["buckets"][0]["granted"],
        10
    );
    let keys = redis.command("KEYS *");
    assert!(keys.contains("unbusy:quota:{tenant:t1}:requests"), "{keys}");

    // Bad input names the field.
    for (body, field) in [
        (json!({}), "leases"),
        (
            json!({"leases": [{"scope": "g", "buckets": [{"name": "r", "per_minute": 0, "want": 1}]}]}),
            "per_minute",
        ),
        (
            json!({"leases": [{"scope": "g", "buckets": [{"name": "r", "per_minute": 1}]}]}),
            "want",
        ),
        (
            json!({"leases": [{"scope": "g{x}", "buckets": [{"name": "r", "per_minute": 1, "want": 1}]}]}),
            "scope",
        ),
        (
            json!({"leases": [{"scope": "g", "buckets": [{"name": "r", "per_minute": 1, "want": 1}, {"name": "r", "per_minute": 1, "want": 1}]}]}),
            "twice",
        ),
        (
            json!({"leases": [{"scope": "g", "buckets": [{"name": "r", "per_minute": 1.5, "want": 1}]}]}),
            "per_minute",
        ),
    ] {
        let a = c.post("/v1/quota/lease", &body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        let m = a.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(m.contains(field), "{body}: {m}");
    }
    let a = c
        .call(
            Method::POST,
            "/v1/quota/lease",
            &[],
            Bytes::from_static(b"\xff{"),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = c.get("/v1/quota/lease").await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    // Lease round trip on loopback.
    let mut times = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let a = c.post("/v1/quota/lease", &bucket(0)).await;
        times.push(t.elapsed());
        assert_eq!(a.status, StatusCode::OK);
    }
    times.sort();
    eprintln!(
        "store quota lease round trip over 500: p50 {} µs, p99 {} µs",
        percentile_us(&times, 0.5),
        percentile_us(&times, 0.99)
    );
}

fn acquire(holder: &str, want: u64, limit: u64, lease_ms: u64) -> serde_json::Value {
    json!({"account": "deepseek", "holder": holder, "want": want, "limit": limit, "lease_ms": lease_ms})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semaphore_never_exceeds_its_limit() {
    if !redis_present("semaphore_never_exceeds_its_limit") {
        return;
    }
    let redis = Redis::start("sem");
    let stores: Vec<Store> = (0..2).map(|_| Store::single(&redis)).collect();
    let in_flight = Arc::new(AtomicU64::new(0));
    let most = Arc::new(AtomicU64::new(0));
    let held_total = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = stores[i % 2].addr;
        let (in_flight, most, held_total) = (in_flight.clone(), most.clone(), held_total.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(3) {
                n += 1;
                let holder = format!("proxy{i}:attempt{n}");
                let a = c
                    .post("/v1/concurrency/acquire", &acquire(&holder, 1, 3, 5000))
                    .await
                    .json();
                if a["held"] == 1 {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    held_total.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5 + (n % 4) * 5)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    let r = c
                        .post(
                            "/v1/concurrency/release",
                            &json!({"account": "deepseek", "holder": holder}),
                        )
                        .await;
                    assert_eq!(r.status, StatusCode::OK);
                } else {
                    assert_eq!(a["held"], 0);
                    assert!(a["in_use"].as_u64().unwrap() <= 3, "{a}");
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (most, held) = (
        most.load(Ordering::SeqCst),
        held_total.load(Ordering::Relaxed),
    );
    eprintln!("semaphore: 8 acquirers on 2 stores, limit 3, 3 s: {held} slots taken, at most {most} at once");
    assert!(most <= 3, "{most} holders at once on a limit of 3");
    assert_eq!(
        most, 3,
        "the limit was reached (the test pressed hard enough)"
    );
    assert!(held > 100, "{held}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_slots_come_back_after_its_lease() {
    if !redis_present("a_dead_holders_slots_come_back_after_its_lease") {
        return;
    }
    let redis = Redis::start("dead");
    let store = Store::single(&redis);
    let mut c = Client::connect(store.addr).await;
    // A proxy takes two slots for itself (a block lease) and dies without releasing.
    let a = c
        .post(
            "/v1/concurrency/acquire",
            &acquire("dying-proxy", 2, 3, 400),
        )
        .await
        .json();
    assert_eq!(a["held"], 2);
    // Asking again is setting, not adding: a retried call takes nothing more.
    let a = c
        .post(
            "/v1/concurrency/acquire",
            &acquire("dying-proxy", 2, 3, 400),
        )
        .await
        .json();
    assert_eq!(
        (a["held"].as_u64(), a["in_use"].as_u64()),
        (Some(2), Some(2))
    );
    let a = c
        .post(
            "/v1/concurrency/acquire",
            &acquire("live-proxy", 3, 3, 10_000),
        )
        .await
        .json();
    assert_eq!(a["held"], 1, "{a}");
    let wait = a["retry_after_ms"].as_u64().unwrap();
    assert!(
        (1..=400).contains(&wait),
        "the dead holder's lease ends within 400 ms: {wait}"
    );
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    let a = c
        .post(
            "/v1/concurrency/acquire",
            &acquire("live-proxy", 3, 3, 10_000),
        )
        .await
        .json();
    assert_eq!(a["held"], 3, "the dead proxy's slots came back: {a}");
    assert_eq!(a["in_use"], 3);
    // Giving back some: want less.
    let a = c
        .post(
            "/v1/concurrency/acquire",
            &acquire("live-proxy", 1, 3, 10_000),
        )
        .await
        .json();
    assert_eq!(
        (a["held"].as_u64(), a["in_use"].as_u64()),
        (Some(1), Some(1))
    );
    let a = c
        .post(
            "/v1/concurrency/release",
            &json!({"account": "deepseek", "holder": "live-proxy"}),
        )
        .await
        .json();
    assert_eq!(a["in_use"], 0);
    let keys = redis.command("KEYS *");
    assert!(
        !keys.contains("sem:"),
        "an idle semaphore leaves no key: {keys}"
    );
    let a = c
        .post(
            "/v1/concurrency/acquire",
            &json!({"account": "deepseek", "holder": "h"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("limit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_published_by_one_proxy_is_seen_by_another_until_it_ends() {
    if !redis_present("a_pause_published_by_one_proxy_is_seen_by_another_until_it_ends") {
        return;
    }
    let redis = Redis::start("pause");
    let (one, two) = (Store::single(&redis), Store::single(&redis));
    let mut a = Client::connect(one.addr).await;
    let mut b = Client::connect(two.addr).await;
    let v = b.get("/v1/provider/deepseek/pause").await.json();
    assert_eq!(v, json!({"paused": false}));
    let v = a
        .put_json(
            "/v1/provider/deepseek/pause",
            &json!({"for_ms": 700, "reason": "retry_after"}),
        )
        .await
        .json();
    assert_eq!(v["remaining_ms"], 700);
    let v = b.get("/v1/provider/deepseek/pause").await.json();
    assert_eq!(v["paused"], true);
    assert_eq!(v["reason"], "retry_after");
    let left = v["remaining_ms"].as_u64().unwrap();
    assert!((500..=700).contains(&left), "{left}");
    // A shorter pause never cuts a longer one short.
    let v = b
        .put_json(
            "/v1/provider/deepseek/pause",
            &json!({"for_ms": 100, "reason": "breaker_open"}),
        )
        .await
        .json();
    assert_eq!(v["reason"], "retry_after");
    assert!(v["remaining_ms"].as_u64().unwrap() > 100);
    // One poll for every provider.
    let v = b.get("/v1/pauses?providers=deepseek,backup").await.json();
    assert_eq!(v["pauses"]["deepseek"]["paused"], true);
    assert_eq!(v["pauses"]["backup"]["paused"], false);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        b.get("/v1/provider/deepseek/pause").await.json()["paused"],
        false,
        "over when it ends"
    );
    // A breaker that closes clears the pause.
    a.put_json(
        "/v1/provider/backup/pause",
        &json!({"for_ms": 60_000, "reason": "breaker_open"}),
    )
    .await;
    assert_eq!(
        b.get("/v1/provider/backup/pause").await.json()["paused"],
        true
    );
    let d = a
        .call(
            Method::DELETE,
            "/v1/provider/backup/pause",
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    assert_eq!(
        b.get("/v1/provider/backup/pause").await.json()["paused"],
        false
    );
    assert_eq!(b.get("/v1/pauses").await.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        b.get("/v1/pauses?providers=a,,b").await.status,
        StatusCode::BAD_REQUEST
    );
    let bad = a
        .put_json("/v1/provider/x/pause", &json!({"for_ms": -1}))
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_a_fast_503_and_the_store_recovers() {
    if !redis_present("redis_down_is_a_fast_503_and_the_store_recovers") {
        return;
    }
    let mut redis = Redis::start("down");
    let mut store = Store::single(&redis);
    let mut c = Client::connect(store.addr).await;
    assert_eq!(c.get("/v1/health").await.status, StatusCode::OK);

    // Hung (SIGSTOP): the store's operation timeout (250 ms) answers, never the caller's.
    redis.pause(true);
    let mut slowest = Duration::ZERO;
    for _ in 0..4 {
        let t = Instant::now();
        let a = tokio::time::timeout(Duration::from_secs(3), c.get("/v1/cache/t/k"))
            .await
            .expect("the store hung with Redis");
        slowest = slowest.max(t.elapsed());
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    eprintln!("redis hung: slowest 503 {} ms", slowest.as_millis());
    assert!(
        slowest < Duration::from_millis(600),
        "slowest 503 took {slowest:?}"
    );
    redis.pause(false);
    let t = Instant::now();
    while c.get("/v1/health").await.status != StatusCode::OK {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no recovery after SIGCONT"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Dead (SIGKILL): refused at once.
    put(
        &mut c,
        "/v1/cache/t/k",
        60_000,
        0,
        "application/json",
        None,
        b"{}",
    )
    .await;
    redis.kill();
    let mut slowest = Duration::ZERO;
    for path in [
        "/v1/cache/t/k",
        "/v1/health",
        "/v1/cache/t/k",
        "/v1/provider/p/pause",
    ] {
        for _ in 0..5 {
            let t = Instant::now();
            let a = c.get(path).await;
            slowest = slowest.max(t.elapsed());
            assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{path}");
            assert_eq!(a.json()["error"]["type"], "store_unavailable");
        }
    }
    let t = Instant::now();
    let a = c.post("/v1/quota/lease", &lease_body(1, 1)).await;
    slowest = slowest.max(t.elapsed());
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    eprintln!("redis down: slowest 503 {} ms", slowest.as_millis());
    // The store's operation timeout is 250 ms; with Redis gone it answers well within it.
    assert!(
        slowest < Duration::from_millis(500),
        "slowest 503 took {slowest:?}"
    );
    assert!(store.alive());

    redis.restart();
    let t = Instant::now();
    loop {
        if c.get("/v1/health").await.status == StatusCode::OK {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the store did not recover within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "redis back: the store answered again after {} ms",
        t.elapsed().as_millis()
    );
    // A fresh Redis (nothing persisted): a miss, then a working cache.
    assert_eq!(c.get("/v1/cache/t/k").await.status, StatusCode::NOT_FOUND);
    put(
        &mut c,
        "/v1/cache/t/k",
        60_000,
        0,
        "application/json",
        None,
        b"{}",
    )
    .await;
    assert_eq!(c.get("/v1/cache/t/k").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_started_before_redis_answers_503_until_redis_is_up() {
    if !redis_present("a_store_started_before_redis_answers_503_until_redis_is_up") {
        return;
    }
    let dir = common::private_dir("late");
    let socket = dir.join("redis.sock");
    let store = Store::start(
        "--redis",
        &format!("redis+unix://{}", socket.display()),
        &[],
    );
    let mut c = Client::connect(store.addr).await;
    let t = Instant::now();
    assert_eq!(
        c.get("/v1/cache/t/k").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(t.elapsed() < Duration::from_millis(500));
    let _ = std::fs::remove_dir_all(&dir);
    let redis = Redis::start("late");
    let store = Store::single(&redis);
    let mut c = Client::connect(store.addr).await;
    assert_eq!(c.get("/v1/cache/t/k").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_keeps_two_fleets_apart() {
    if !redis_present("a_prefix_keeps_two_fleets_apart") {
        return;
    }
    let redis = Redis::start("prefix");
    let blue = Store::start("--redis", &redis.url(), &["--prefix", "blue:"]);
    let green = Store::single(&redis);
    let mut b = Client::connect(blue.addr).await;
    let mut g = Client::connect(green.addr).await;
    put(
        &mut b,
        "/v1/cache/t/k",
        60_000,
        0,
        "application/json",
        None,
        b"blue",
    )
    .await;
    assert_eq!(g.get("/v1/cache/t/k").await.status, StatusCode::NOT_FOUND);
    assert_eq!(b.get("/v1/cache/t/k").await.body.as_ref(), b"blue");
    assert!(redis.command("KEYS *").contains("blue:cache:t:k"));
}
