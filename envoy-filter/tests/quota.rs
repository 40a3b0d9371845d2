//! Global limits across a fleet through quota leases (`unbusy_envoy::quota`), natively: two
//! fake Envoy *processes* (two proxies: no shared data between them) of two workers each,
//! leasing from one store the test plays (a GCRA bucket per scope and bucket, as
//! `unbusy-store`'s script, on the test's clock). Under demand far above the limit, the fleet
//! admits the limit, not twice it; a lease is charged, renewed while it runs low, and what is
//! left of it when it ends is returned; with the store down each proxy falls back to
//! `limit / expected_proxies` without any request waiting; a configuration without a global
//! limit makes no store call at all.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::T0;

use proxy_wasm::types::Action;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;
use unbusy_core::config::Config;
use unbusy_core::json::{self, Value};
use unbusy_core::time::Nanos;
use unbusy_envoy::driver::{self, Shared};
use unbusy_envoy::fake::{FakeCall, FakeHost, FakeProcess};
use unbusy_envoy::host::Level;
use unbusy_envoy::quota::LEASE_REQUESTS;

/// 600 requests a minute (10 a second), burst 10, over two proxies.
const LEASED: &str = r#"{"providers":[{"name":"a","cluster":"ca"}],
    "retry":{"max_attempts":1},
    "limits":{"global":{"requests_per_minute":600,"burst_requests":10}},
    "store":{"cluster":"unbusy_store","cache":false,"expected_proxies":2}}"#;

/// The same limits, no store: each proxy applies them whole.
const LOCAL: &str = r#"{"providers":[{"name":"a","cluster":"ca"}],
    "retry":{"max_attempts":1},
    "limits":{"global":{"requests_per_minute":600,"burst_requests":10}}}"#;

/// No cache key (temperature 1): no L2 lookup, so every dispatch to the store is a quota call.
const HOT: &str = r#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"hi"}]}"#;

struct Worker {
    host: FakeHost,
    state: Shared<FakeHost>,
    /// Calls already answered or looked at.
    seen: usize,
}

impl Worker {
    fn new(process: &Rc<FakeProcess>, config: &str, seed: u64) -> Self {
        let (host, state) = common::worker(process, config, seed);
        Self {
            host,
            state,
            seen: 0,
        }
    }

    /// A caller's request: `true` if it went on to the provider, `false` if refused (429).
    /// Either way it is decided at once: nothing waits on the store.
    fn request(&self, ctx: u32) -> bool {
        self.request_as(ctx, "Bearer k")
    }

    /// A request of the tenant whose key this `authorization` carries.
    fn request_as(&self, ctx: u32, authorization: &str) -> bool {
        let action = common::chat_request(&self.host, &self.state, ctx, authorization, HOT);
        let s = self.host.stream(ctx);
        let admitted = match action {
            Action::Continue => true,
            _ => {
                let (status, _, _) = s.reply.clone().expect("held without a reply");
                assert_eq!(status, 429);
                false
            }
        };
        driver::stream_done(&self.host, &self.state, ctx);
        self.host.edit(ctx, |s| s.gone = true);
        admitted
    }

    fn tick(&self) {
        self.host.call_into(1);
        driver::tick(&self.host, &self.state);
    }

    /// The calls dispatched since the last look.
    /// The quota calls dispatched since the last look (the fleet's polls of pauses, made by
    /// any proxy with a store and tested in `fleet.rs`, left out).
    fn new_calls(&mut self) -> Vec<FakeCall> {
        let calls = self.host.calls();
        let new = calls[self.seen..]
            .iter()
            .filter(|c| {
                !c.header(":path")
                    .is_some_and(|p| p.starts_with("/v1/pauses"))
            })
            .cloned()
            .collect();
        self.seen = calls.len();
        new
    }

    /// Envoy answering for the store: no status (a timeout, a reset).
    fn answer_raw(&self, call: &FakeCall, headers: &[(&str, &str)], body: &[u8]) {
        self.host.set_call_answer(headers, body);
        self.host.call_into(1);
        driver::call_response(&self.host, &self.state, call.token.0, body.len());
    }

    fn answer(&self, call: &FakeCall, status: &str, body: &[u8]) {
        self.host.set_call_answer(
            &[(":status", status), ("content-type", "application/json")],
            body,
        );
        self.host.call_into(1);
        driver::call_response(&self.host, &self.state, call.token.0, body.len());
    }
}

/// The store the test plays: one GCRA bucket per scope and bucket name, as `unbusy-store`'s
/// script (`docs/store.md`), timed by the test's clock. `down` answers 503.
#[derive(Default)]
struct Store {
    tat: HashMap<String, u128>,
    /// Each bucket's rate, as its last lease said.
    per_minute: HashMap<String, u128>,
    /// Every scope a lease asked for.
    scopes: Vec<String>,
    down: bool,
    granted: u64,
    returned: u64,
    leases: u64,
    /// Every `want` asked.
    wants: Vec<u64>,
    /// Every call served.
    calls: u64,
}

impl Store {
    /// Answers `call` on `worker` at `now`.
    fn serve(&mut self, worker: &Worker, call: &FakeCall, now: Nanos) {
        assert_eq!(call.cluster, "unbusy_store");
        self.calls += 1;
        if self.down {
            worker.answer(call, "503", br#"{"error":{"type":"store_unavailable"}}"#);
            return;
        }
        let path = call.header(":path").unwrap().to_string();
        let body = json::parse(&call.body).unwrap();
        let Some(Value::Array(scopes)) = body.get("leases") else {
            panic!("no leases in {body:?}")
        };
        let now = u128::from(now) / 1000; // µs
        let mut out = String::from(r#"{"lease_ms":1000,"leases":["#);
        for (i, s) in scopes.iter().enumerate() {
            let scope = s.get("scope").unwrap().as_str().unwrap().to_string();
            if !self.scopes.contains(&scope) {
                self.scopes.push(scope.clone());
            }
            let Some(Value::Array(buckets)) = s.get("buckets") else {
                panic!()
            };
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!(r#"{{"scope":"{scope}","buckets":["#));
            for (j, b) in buckets.iter().enumerate() {
                let name = b.get("name").unwrap().as_str().unwrap().to_string();
                let key = format!("{scope}:{name}");
                if j > 0 {
                    out.push(',');
                }
                let tat = self.tat.get(&key).copied().unwrap_or(0).max(now);
                if path == "/v1/quota/return" {
                    let units = b.get("units").unwrap().as_u64().unwrap();
                    let t = 60_000_000 / self.per_minute[&key];
                    self.tat
                        .insert(key, tat.saturating_sub(u128::from(units) * t).max(now));
                    self.returned += units;
                    out.push_str(&format!(r#"{{"name":"{name}","returned":{units}}}"#));
                    continue;
                }
                assert_eq!(path, "/v1/quota/lease");
                let per_minute = u128::from(b.get("per_minute").unwrap().as_u64().unwrap());
                let burst = u128::from(b.get("burst").unwrap().as_u64().unwrap());
                let want = b.get("want").unwrap().as_u64().unwrap();
                self.per_minute.insert(key.clone(), per_minute);
                self.wants.push(want);
                let t = 60_000_000 / per_minute;
                let room = (now + burst * t).saturating_sub(tat) / t;
                let granted = u128::from(want).min(burst).min(room);
                let tat = tat + granted * t;
                let retry = if granted < u128::from(want) {
                    (tat + t).saturating_sub(burst * t + now) / 1000
                } else {
                    0
                };
                self.tat.insert(key, tat);
                self.granted += granted as u64;
                self.leases += 1;
                out.push_str(&format!(
                    r#"{{"name":"{name}","granted":{granted},"retry_after_ms":{retry}}}"#
                ));
            }
            out.push_str("]}");
        }
        out.push_str("]}");
        worker.answer(call, "200", out.as_bytes());
    }
}

/// Two proxies of two workers each, all on one clock.
struct Fleet {
    processes: Vec<Rc<FakeProcess>>,
    workers: Vec<Worker>,
    now: Nanos,
    next_ctx: u32,
    turn: usize,
}

impl Fleet {
    fn new(config: &str, proxies: usize) -> Self {
        let processes: Vec<_> = (0..proxies).map(|_| FakeProcess::new(T0)).collect();
        let workers = processes
            .iter()
            .flat_map(|p| [Worker::new(p, config, 1), Worker::new(p, config, 2)])
            .collect();
        Self {
            processes,
            workers,
            now: T0,
            next_ctx: 10,
            turn: 0,
        }
    }

    /// `per_worker` requests on every worker, then every worker's tick, its calls answered by
    /// `store`, then 20 ms pass. Returns the requests admitted. The workers take turns to go
    /// first (the store serves whoever asks first: a fixed order would starve the last proxy).
    fn step(&mut self, per_worker: u32, store: &mut Store) -> u64 {
        self.step_as(&["Bearer k"], per_worker, store)[0]
    }

    /// [`Fleet::step`] with `per_worker` requests of each of these tenants (by key) on every
    /// worker; the requests admitted per tenant.
    fn step_as(&mut self, keys: &[&str], per_worker: u32, store: &mut Store) -> Vec<u64> {
        let mut admitted = vec![0; keys.len()];
        self.turn += 1;
        let n = self.workers.len();
        self.workers.rotate_left(self.turn % n);
        for w in &mut self.workers {
            for _ in 0..per_worker {
                for (i, key) in keys.iter().enumerate() {
                    self.next_ctx += 1;
                    admitted[i] += u64::from(w.request_as(self.next_ctx, key));
                }
            }
        }
        for w in &mut self.workers {
            w.tick();
            for call in w.new_calls() {
                store.serve(w, &call, self.now);
            }
        }
        self.advance(Duration::from_millis(20));
        admitted
    }

    fn advance(&mut self, by: Duration) {
        for p in &self.processes {
            p.advance(by);
        }
        self.now += by.as_nanos() as u64;
    }

    fn metric(&self, name: &str) -> i64 {
        self.processes
            .iter()
            .map(|p| p.metric(name).unwrap_or(0))
            .sum()
    }

    fn logs(&self, level: Level, containing: &str) -> usize {
        self.processes
            .iter()
            .flat_map(|p| p.logs())
            .filter(|(l, m)| *l == level && m.contains(containing))
            .count()
    }
}

/// The GCRA bound over `secs` seconds at 10 a second with a burst of 10.
fn allowed(secs: u64) -> u64 {
    10 * secs + 10
}

#[test]
fn two_proxies_hold_one_global_limit_through_leases_and_twice_it_without_the_store() {
    // 10 s of 3 requests per worker per 20 ms tick: 600 a second asked, 60 times the limit.
    let mut store = Store::default();
    let mut fleet = Fleet::new(LEASED, 2);
    let admitted: u64 = (0..500).map(|_| fleet.step(3, &mut store)).sum();
    assert!(
        admitted <= allowed(10) && admitted * 100 >= allowed(10) * 95,
        "leased: {admitted} admitted, {} allowed ({} granted, {} returned)",
        allowed(10),
        store.granted,
        store.returned
    );
    assert!(
        admitted <= store.granted,
        "only leased units were spent: {admitted} of {}",
        store.granted
    );
    assert!(store.leases > 20, "renewed as the leases ran low");
    // Each lease at most burst / N (5), plus what the local share admitted before the first
    // lease (at most one share's burst), which is owed and asked for on top until paid.
    assert!(
        store.wants.iter().all(|&w| (1..=10).contains(&w)),
        "{:?}",
        store.wants
    );
    let late = &store.wants[store.wants.len() / 2..];
    assert!(
        late.iter().all(|&w| (1..=5).contains(&w)),
        "once the start is paid for, every lease at most burst / N: {late:?}"
    );
    assert!(fleet.metric("unbusy_store_lease_total.result.short") > 0);
    assert_eq!(fleet.metric("unbusy_store_lease_total.result.error"), 0);

    let mut local = Fleet::new(LOCAL, 2);
    let mut none = Store::default();
    let admitted_local: u64 = (0..500).map(|_| local.step(3, &mut none)).sum();
    assert_eq!(none.leases + none.returned, 0, "no store, no call");
    assert!(
        admitted_local >= 2 * allowed(10) * 95 / 100,
        "without the store each proxy admits the limit: {admitted_local}"
    );
    println!(
        "leased: {admitted} of {} allowed; without the store: {admitted_local}",
        allowed(10)
    );
}

#[test]
fn a_lease_is_charged_renewed_and_what_is_left_when_it_ends_is_returned() {
    let mut store = Store::default();
    let mut fleet = Fleet::new(LEASED, 2);
    // The first request has no lease yet: the local share (5 a second, burst 5) admits it, and
    // the tick leases.
    assert!(fleet.workers[0].request(1));
    assert_eq!(store.leases, 0, "the hot path makes no call");
    fleet.workers[0].tick();
    let calls = fleet.workers[0].new_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].header(":path"), Some("/v1/quota/lease"));
    assert!(calls[0].timeout <= Duration::from_millis(500));
    store.serve(&fleet.workers[0], &calls[0], fleet.now);
    let lease = |f: &Fleet| f.processes[0].shared_value(LEASE_REQUESTS).unwrap();
    let remaining = |f: &Fleet| u64::from_le_bytes(lease(f)[..8].try_into().unwrap());
    let first = remaining(&fleet);
    assert!(first >= 1, "granted");
    // The other worker of the same proxy spends it (shared data), and makes no call of its own
    // while the lease is not low.
    assert!(fleet.workers[1].request(2));
    assert_eq!(remaining(&fleet), first - 1, "charged to the lease");
    // Moderate demand for a while: 2 requests per 20 ms on proxy 0 (100 a second asked of 10
    // allowed): leases follow, each a few units.
    for _ in 0..25 {
        for w in 0..2 {
            fleet.next_ctx += 1;
            let ctx = fleet.next_ctx;
            fleet.workers[w].request(ctx);
        }
        for w in 0..2 {
            fleet.workers[w].tick();
            for call in fleet.workers[w].new_calls() {
                store.serve(&fleet.workers[w], &call, fleet.now);
            }
        }
        fleet.advance(Duration::from_millis(20));
    }
    assert!(store.leases >= 3, "renewed: {} leases", store.leases);
    // Quiet: a last grant that is not spent. Ask once, get units, spend none.
    fleet.advance(Duration::from_millis(1000));
    assert!(fleet.workers[0].request(900));
    fleet.workers[0].tick();
    for call in fleet.workers[0].new_calls() {
        store.serve(&fleet.workers[0], &call, fleet.now);
    }
    let left = remaining(&fleet);
    assert!(left >= 1, "a lease with units left");
    // Before it ends: nothing goes back.
    fleet.advance(Duration::from_millis(500));
    fleet.workers[1].tick();
    assert!(fleet.workers[1].new_calls().is_empty());
    // After: returned, once, by whichever worker ticks first.
    fleet.advance(Duration::from_millis(600));
    fleet.workers[1].tick();
    let calls = fleet.workers[1].new_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].header(":path"), Some("/v1/quota/return"));
    let body = json::parse(&calls[0].body).unwrap();
    let Some(Value::Array(scopes)) = body.get("leases") else {
        panic!()
    };
    let Some(Value::Array(buckets)) = scopes[0].get("buckets") else {
        panic!()
    };
    assert_eq!(buckets[0].get("units").unwrap().as_u64(), Some(left));
    store.serve(&fleet.workers[1], &calls[0], fleet.now);
    assert_eq!(store.returned, left);
    assert_eq!(remaining(&fleet), 0);
    fleet.workers[0].tick();
    assert!(fleet.workers[0].new_calls().is_empty(), "returned once");
    assert_eq!(
        fleet.metric("unbusy_store_returned_units_total"),
        left as i64
    );
}

#[test]
fn a_store_that_is_down_leaves_each_proxy_its_share_and_no_request_waits() {
    let mut store = Store {
        down: true,
        ..Store::default()
    };
    let mut fleet = Fleet::new(LEASED, 2);
    // `request` asserts each is decided at once (forwarded or a 429), never held.
    let admitted: u64 = (0..500).map(|_| fleet.step(3, &mut store)).sum();
    // Each proxy: 5 a second, burst 5, for 10 s: 55; the fleet 110, the limit's bound.
    assert!(
        admitted <= allowed(10) && admitted * 100 >= allowed(10) * 95,
        "store down: {admitted} admitted of {} (limit / 2 per proxy)",
        allowed(10)
    );
    assert!(fleet.metric("unbusy_store_lease_total.result.error") > 0);
    let warnings = fleet.logs(Level::Warn, "did not grant a quota lease");
    assert!(
        (2..=4).contains(&warnings),
        "one warning per outage per worker that called: {warnings}"
    );
    // Back: leases are granted again, said once per worker that had logged the outage.
    store.down = false;
    for _ in 0..50 {
        fleet.step(3, &mut store);
    }
    assert!(store.granted > 0);
    assert!(fleet.logs(Level::Info, "grants quota leases again") >= 1);
    assert_eq!(
        fleet.logs(Level::Warn, "did not grant a quota lease"),
        warnings
    );
}

#[test]
fn a_store_the_host_cannot_reach_is_the_local_share_too() {
    let mut store = Store::default();
    let mut fleet = Fleet::new(LEASED, 1);
    for w in &fleet.workers {
        w.host.refuse_dispatches(true);
    }
    let admitted: u64 = (0..500).map(|_| fleet.step(3, &mut store)).sum();
    // One proxy of an expected two: half the limit.
    assert!(
        (50..=55).contains(&admitted),
        "{admitted} admitted, 55 allowed"
    );
    assert_eq!(fleet.logs(Level::Warn, "did not grant a quota lease"), 2);
}

/// A token limit is leased as a `tokens` bucket, each request charged its estimated tokens: the
/// fleet's tokens stay within the limit, as its requests do.
#[test]
fn a_token_limit_is_leased_by_each_requests_estimated_tokens() {
    const TOKENS: &str = r#"{"providers":[{"name":"a","cluster":"ca"}],
        "retry":{"max_attempts":1},
        "limits":{"global":{"tokens_per_minute":600000,"burst_tokens":20000}},
        "store":{"cluster":"unbusy_store","cache":false,"expected_proxies":2}}"#;
    let config = Config::from_json(TOKENS.as_bytes()).unwrap();
    let headers = [
        ("authorization", "Bearer k"),
        ("content-type", "application/json"),
    ];
    let cost = unbusy_core::request::read(&headers, HOT.as_bytes(), &config)
        .unwrap()
        .estimated_tokens;
    assert!(cost > 1, "{cost}");
    let mut store = Store::default();
    let mut fleet = Fleet::new(TOKENS, 2);
    let admitted: u64 = (0..500).map(|_| fleet.step(3, &mut store)).sum();
    // 10,000 tokens a second for 10 s, plus the burst (a request costs about 1,000: its prompt
    // and the default `max_tokens`).
    let allowed = 10_000 * 10 + 20_000;
    let spent = admitted * cost;
    assert!(
        spent <= allowed && spent * 100 >= allowed * 90,
        "{admitted} requests of {cost} tokens: {spent} of {allowed} allowed"
    );
    assert!(
        spent <= store.granted,
        "{spent} of {} granted",
        store.granted
    );
    assert!(store.leases > 0);
    println!("tokens: {spent} of {allowed} allowed ({admitted} requests of {cost})");
}

/// Per-tenant limits are leased per tenant (scope `tenant:<id hex>`): two tenants over two
/// proxies each get their own limit fleet-wide, not twice it, and not each other's.
#[test]
fn each_tenants_limit_holds_across_the_fleet() {
    const TENANTS: &str = r#"{"providers":[{"name":"a","cluster":"ca"}],
        "retry":{"max_attempts":1},
        "limits":{"per_tenant":{"requests_per_minute":600,"burst_requests":10}},
        "store":{"cluster":"unbusy_store","cache":false,"expected_proxies":2}}"#;
    let keys = ["Bearer tenant-one", "Bearer tenant-two"];
    let mut store = Store::default();
    let mut fleet = Fleet::new(TENANTS, 2);
    let mut admitted = [0u64; 2];
    for _ in 0..500 {
        for (a, n) in admitted.iter_mut().zip(fleet.step_as(&keys, 2, &mut store)) {
            *a += n;
        }
    }
    for a in admitted {
        assert!(
            a <= allowed(10) && a * 100 >= allowed(10) * 95,
            "per tenant: {admitted:?} admitted, {} allowed each",
            allowed(10)
        );
    }
    let tenants: Vec<&String> = store
        .scopes
        .iter()
        .filter(|s| s.starts_with("tenant:"))
        .collect();
    assert_eq!(tenants.len(), 2, "{:?}", store.scopes);
    assert!(
        tenants.iter().all(|s| s.len() == "tenant:".len() + 16),
        "{tenants:?}"
    );
    assert!(
        !store.scopes.contains(&"global".to_string()),
        "no global limit, no global lease"
    );

    let local = TENANTS.replace(
        r#""store":{"cluster":"unbusy_store","cache":false,"expected_proxies":2}"#,
        r#""endpoints":{}"#,
    );
    let mut fleet = Fleet::new(&local, 2);
    let mut none = Store::default();
    let mut alone = [0u64; 2];
    for _ in 0..500 {
        for (a, n) in alone.iter_mut().zip(fleet.step_as(&keys, 2, &mut none)) {
            *a += n;
        }
    }
    assert!(
        alone.iter().all(|&a| a >= 2 * allowed(10) * 95 / 100),
        "{alone:?}"
    );
    println!(
        "per tenant: {admitted:?} of {} allowed each; without the store {alone:?}",
        allowed(10)
    );
}

/// The pass-through path: a configuration with a store but no global limit, and requests with
/// no cache key, dispatch nothing to the store, on the hot path or on any tick (but the fleet's
/// poll of pauses, once per `store.poll_ms` per proxy and never on a request's path: see
/// `fleet.rs`).
#[test]
fn without_a_global_limit_or_a_cache_key_nothing_calls_the_store() {
    for config in [
        r#"{"providers":[{"name":"a","cluster":"ca"}],"store":{"cluster":"unbusy_store"}}"#,
        r#"{"providers":[{"name":"a","cluster":"ca"}],"store":{"cluster":"unbusy_store","cache":false}}"#,
    ] {
        let mut store = Store::default();
        let mut fleet = Fleet::new(config, 1);
        let admitted: u64 = (0..50).map(|_| fleet.step(2, &mut store)).sum();
        assert!(admitted > 0);
        // (`step` hands every call but the pause polls to the store.)
        assert_eq!(store.calls, 0, "{config}");
    }
    // A global limit and a store, but no request yet: the ticks call nothing either.
    let mut store = Store::default();
    let mut idle = Fleet::new(LEASED, 1);
    for _ in 0..50 {
        idle.step(0, &mut store);
    }
    assert_eq!(store.calls, 0);
}

/// Whatever the store answers (garbage, partial, absurd numbers, errors, nothing), whenever,
/// with dispatches refused now and then and the clock jumping: nothing panics, and every
/// request is decided at once, forwarded or refused with a 429 (`Worker::request_as` checks
/// it).
#[test]
fn any_store_answer_at_any_time_never_panics() {
    const BOTH: &str = r#"{"providers":[{"name":"a","cluster":"ca"}],
        "retry":{"max_attempts":1},
        "limits":{"global":{"requests_per_minute":600,"burst_requests":10,"tokens_per_minute":6000000},
                  "per_tenant":{"requests_per_minute":300,"tokens_per_minute":3000000}},
        "store":{"cluster":"unbusy_store","cache":false,"expected_proxies":2}}"#;
    let answers: [&[u8]; 8] = [
        b"",
        b"{not json",
        br#"{"lease_ms":1000}"#,
        br#"{"lease_ms":0,"leases":[]}"#,
        br#"{"lease_ms":18446744073709551615,"leases":[{"scope":"global","buckets":[{"name":"requests","granted":18446744073709551615,"retry_after_ms":18446744073709551615}]}]}"#,
        br#"{"lease_ms":1000,"leases":[{"scope":"global","buckets":[{"name":"requests","granted":3,"retry_after_ms":0},{"name":"tokens","granted":-1}]}]}"#,
        br#"{"lease_ms":1000,"leases":[{"scope":"global","buckets":[{"name":"requests","granted":2,"retry_after_ms":7}]},{"scope":"nope","buckets":7}]}"#,
        br#"{"lease_ms":5,"leases":[{"scope":"global","buckets":[{"name":"tokens","granted":99999,"retry_after_ms":1}]}]}"#,
    ];
    let statuses = ["200", "200", "200", "503", "404", ""];
    for seed in 0..40u64 {
        let mut rng = unbusy_core::Rng::with_seed(seed);
        let mut fleet = Fleet::new(BOTH, 2);
        for _ in 0..300 {
            for w in &mut fleet.workers {
                w.host.refuse_dispatches(rng.u8(0..10) == 0);
                for _ in 0..rng.u32(0..3) {
                    fleet.next_ctx += 1;
                    let key = ["Bearer a", "Bearer b", "Bearer c"][rng.usize(0..3)];
                    w.request_as(fleet.next_ctx, key);
                }
                w.tick();
                for call in w.new_calls() {
                    // Answered, late or never.
                    if rng.u8(0..4) == 0 {
                        continue;
                    }
                    let status = statuses[rng.usize(0..statuses.len())];
                    let body = answers[rng.usize(0..answers.len())];
                    if status.is_empty() {
                        w.answer_raw(&call, &[], body);
                    } else {
                        w.answer(&call, status, body);
                    }
                }
            }
            let jump = match rng.u8(0..20) {
                0 => Duration::from_secs(rng.u64(1..120)),
                _ => Duration::from_millis(rng.u64(0..40)),
            };
            fleet.advance(jump);
        }
    }
}
