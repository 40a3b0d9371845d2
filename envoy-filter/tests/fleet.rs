//! The fleet's concurrency quota and pauses through `unbusy-store`, as the filter uses them,
//! over fake Envoy *processes* (two proxies, each with its own shared data and two workers)
//! and a store the test plays from the calls the filters dispatch, with the store's documented
//! semantics (`docs/store.md`: the semaphore *sets* a holder's slots to what fits; a pause only
//! grows and is read as time left): two proxies together never exceed a provider's
//! `max_concurrency`; a proxy holds nothing until the store first answers, keeps a grant until
//! its lease ends without one, then falls back to its local share; slots it gives up are not
//! used while the store hands them to another proxy, and an older answer never overrides a
//! newer one; the workers of a proxy poll once per period as one holder; a run of hinted 429s
//! or an open breaker on one proxy pauses the provider on the other; a store that fails is one
//! log line, and local behaviour.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{ANSWER, T0};

use proxy_wasm::types::Action;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;
use unbusy_core::json;
use unbusy_envoy::driver::{self, Shared};
use unbusy_envoy::fake::{FakeCall, FakeHost, FakeProcess};
use unbusy_envoy::host::Level;

const CHAT: &str = r#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"hi"}]}"#;

/// The store, as the test plays it: the semaphore's holders (leases are not needed here: no
/// proxy dies) and the pauses (until, by the test's clock, in ms).
#[derive(Default)]
struct Store {
    held: HashMap<(String, String), u64>,
    pauses: HashMap<String, u64>,
    /// `false`: every call is answered 503.
    up: bool,
    publishes: Vec<String>,
}

impl Store {
    /// The answer to `call` at `now_ms`: status and body.
    fn answer(&mut self, call: &FakeCall, now_ms: u64) -> (&'static str, String) {
        if !self.up {
            return ("503", r#"{"error":{"type":"store_unavailable"}}"#.into());
        }
        let path = call.header(":path").unwrap().to_string();
        if path == "/v1/concurrency/acquire" {
            let v = json::parse(&call.body).unwrap();
            let account = v.get("account").unwrap().as_str().unwrap().to_string();
            let holder = v.get("holder").unwrap().as_str().unwrap().to_string();
            let want = v.get("want").unwrap().as_u64().unwrap();
            let limit = v.get("limit").unwrap().as_u64().unwrap();
            let others: u64 = self
                .held
                .iter()
                .filter(|((a, h), _)| *a == account && *h != holder)
                .map(|(_, n)| n)
                .sum();
            let held = want.min(limit.saturating_sub(others));
            self.held.insert((account, holder), held);
            return (
                "200",
                format!(r#"{{"held":{held},"in_use":{}}}"#, others + held),
            );
        }
        if let Some(name) = path
            .strip_prefix("/v1/provider/")
            .and_then(|p| p.strip_suffix("/pause"))
        {
            let v = json::parse(&call.body).unwrap();
            let for_ms = v.get("for_ms").unwrap().as_u64().unwrap();
            let reason = v.get("reason").unwrap().as_str().unwrap();
            self.publishes.push(format!("{name} {for_ms} {reason}"));
            let until = self.pauses.entry(name.to_string()).or_default();
            *until = (*until).max(now_ms + for_ms);
            return ("200", r#"{"paused":true}"#.into());
        }
        if let Some(names) = path.strip_prefix("/v1/pauses?providers=") {
            let mut out = String::from(r#"{"pauses":{"#);
            for (i, n) in names.split(',').enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match self.pauses.get(n).filter(|&&u| u > now_ms) {
                    Some(u) => out.push_str(&format!(
                        r#""{n}":{{"paused":true,"remaining_ms":{},"reason":"retry_after"}}"#,
                        u - now_ms
                    )),
                    None => out.push_str(&format!(r#""{n}":{{"paused":false}}"#)),
                }
            }
            out.push_str("}}");
            return ("200", out);
        }
        panic!("unexpected store call {path}");
    }
}

/// One worker of a proxy.
struct Worker {
    host: FakeHost,
    state: Shared<FakeHost>,
    /// Calls already answered.
    answered: usize,
}

impl Worker {
    fn new(process: &Rc<FakeProcess>, config: &str, seed: u64) -> Self {
        let (host, state) = common::worker(process, config, seed);
        Self {
            host,
            state,
            answered: 0,
        }
    }

    /// A caller's chat request on stream `ctx`: whether it went on to a provider at once.
    fn request(&self, ctx: u32) -> bool {
        common::chat_request(&self.host, &self.state, ctx, "Bearer k", CHAT) == Action::Continue
    }

    /// Whether stream `ctx`'s request went on to a provider (at once or later).
    fn sent(&self, ctx: u32, at_once: bool) -> bool {
        at_once || self.host.stream(ctx).request_resumed > 0
    }

    /// The cluster stream `ctx`'s request went to.
    fn cluster(&self, ctx: u32) -> String {
        self.host
            .stream(ctx)
            .request_header("x-unbusy-cluster")
            .unwrap_or("")
            .to_string()
    }

    /// The provider answers stream `ctx` with `status` and `extra` headers, and the stream ends.
    fn answer(&self, ctx: u32, status: &str, extra: &[(&str, &str)], body: &str) {
        self.host.edit(ctx, |s| {
            s.response_headers = vec![
                (":status".into(), status.into()),
                ("content-type".into(), "application/json".into()),
            ];
            s.response_headers
                .extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        });
        self.host.call_into(ctx);
        if driver::response_headers(&self.host, &self.state, ctx, ctx, false) != Action::Continue {
            self.host
                .edit(ctx, |s| s.response_body = body.as_bytes().to_vec());
            driver::response_body(&self.host, &self.state, ctx, ctx, body.len(), true);
        }
        driver::stream_done(&self.host, &self.state, ctx);
        self.host.edit(ctx, |s| s.gone = true);
    }

    /// Every store call not answered yet answered by `store` (so a call made on one tick is
    /// answered just before the next, 20 ms later, as a real round trip takes time), then the
    /// root context's tick.
    fn tick(&mut self, store: &mut Store) {
        self.answer_calls(store);
        self.host.call_into(1);
        driver::tick(&self.host, &self.state);
    }

    fn answer_calls(&mut self, store: &mut Store) {
        let calls = self.host.calls();
        let now_ms = self.host.process().now() / 1_000_000;
        for call in &calls[self.answered..] {
            assert_eq!(call.cluster, "unbusy_store");
            let (status, body) = store.answer(call, now_ms);
            self.host.set_call_answer(
                &[(":status", status), ("content-type", "application/json")],
                body.as_bytes(),
            );
            self.host.call_into(1);
            driver::call_response(&self.host, &self.state, call.token.0, body.len());
        }
        self.answered = calls.len();
    }

    /// The store calls dispatched so far, by path.
    fn paths(&self) -> Vec<String> {
        self.host
            .calls()
            .iter()
            .map(|c| c.header(":path").unwrap_or("").to_string())
            .collect()
    }
}

/// One proxy: a process of its own and its workers.
struct Proxy {
    process: Rc<FakeProcess>,
    workers: Vec<Worker>,
}

impl Proxy {
    fn new(config: &str, workers: u64, seed: u64) -> Self {
        let process = FakeProcess::new(T0);
        let workers = (0..workers)
            .map(|w| Worker::new(&process, config, seed * 10 + w))
            .collect();
        Self { process, workers }
    }

    fn advance(&self, by: Duration) {
        self.process.advance(by);
    }

    fn tick(&mut self, store: &mut Store) {
        for w in &mut self.workers {
            w.tick(store);
        }
    }
}

/// Two proxies of two workers each, 200 requests against a provider with a `max_concurrency`
/// of 4, each answered 60 ms after it is sent: never more than 4 in flight across the fleet,
/// every request answered, both proxies served. Without the store (each proxy alone with its
/// quota), the same load puts 8 in flight at once.
#[test]
fn two_proxies_together_never_exceed_a_providers_quota() {
    fn run(store_section: &str) -> (usize, [usize; 2], usize) {
        let config = format!(
            r#"{{"providers":[{{"name":"deep","cluster":"cd","max_concurrency":4}}],
                "retry":{{"max_attempts":1}}{store_section}}}"#
        );
        let mut store = Store {
            up: true,
            ..Store::default()
        };
        let mut proxies = [Proxy::new(&config, 2, 1), Proxy::new(&config, 2, 2)];
        // (proxy, worker, ctx, sent at once, step it went)
        let mut open: Vec<(usize, usize, u32, bool, Option<usize>)> = Vec::new();
        let mut opened = 0u32;
        let (mut max_in_flight, mut served, mut answered) = (0, [0usize; 2], 0);
        for step in 0..2000 {
            for p in &proxies {
                p.advance(Duration::from_millis(20));
            }
            if opened < 200 {
                for _ in 0..10 {
                    let (p, w) = ((opened % 2) as usize, ((opened / 2) % 2) as usize);
                    let ctx = 100 + opened;
                    let at_once = proxies[p].workers[w].request(ctx);
                    open.push((p, w, ctx, at_once, None));
                    opened += 1;
                }
            }
            for p in &mut proxies {
                p.tick(&mut store);
            }
            for o in &mut open {
                if o.4.is_none() && proxies[o.0].workers[o.1].sent(o.2, o.3) {
                    o.4 = Some(step);
                }
            }
            let in_flight = open.iter().filter(|o| o.4.is_some()).count();
            max_in_flight = max_in_flight.max(in_flight);
            let done: Vec<_> = open
                .iter()
                .filter(|o| o.4.is_some_and(|s| step >= s + 3))
                .copied()
                .collect();
            for (p, w, ctx, _, _) in done {
                let worker = &proxies[p].workers[w];
                worker.answer(ctx, "200", &[], ANSWER);
                assert_eq!(
                    worker.host.stream(ctx).response_headers[0].1,
                    "200",
                    "request {ctx} answered"
                );
                served[p] += 1;
                answered += 1;
            }
            open.retain(|o| o.4.is_none_or(|s| step < s + 3));
            if answered == 200 {
                break;
            }
        }
        (max_in_flight, served, answered)
    }
    let (max, served, answered) = run(r#","store":{"cluster":"unbusy_store","poll_ms":100}"#);
    assert_eq!(answered, 200, "every request answered");
    assert!(max <= 4, "{max} in flight at once across the fleet");
    assert_eq!(max, 4, "the quota is used");
    assert!(
        served[0] > 0 && served[1] > 0,
        "both proxies served: {served:?}"
    );
    let (alone, _, answered) = run("");
    assert_eq!(answered, 200);
    assert_eq!(
        alone, 8,
        "without the store each proxy uses the whole quota"
    );
}

/// Before the store first answers, a proxy sends nothing to the provider (its holding is
/// nothing); a store that fails is one warning, and once the start-up window (a poll and the
/// call's timeout) has passed, the proxy falls back to `max_concurrency / expected_proxies`. A
/// grant then stands until its lease (ten polls, at least 1 s, from when it was asked) ends
/// without an answer, then the fallback share again; the store's return is one info line.
#[test]
fn a_proxy_holds_nothing_until_the_store_answers_keeps_a_grant_for_its_lease_then_falls_back() {
    let config = r#"{"providers":[{"name":"deep","cluster":"cd","max_concurrency":4}],
        "retry":{"max_attempts":1},
        "store":{"cluster":"unbusy_store","poll_ms":100,"expected_proxies":2}}"#;
    let mut store = Store::default();
    let mut p = Proxy::new(config, 1, 3);
    let w = 0;
    let sent = |p: &Proxy, ctxs: &[(u32, bool)]| {
        ctxs.iter()
            .filter(|(c, at_once)| p.workers[w].sent(*c, *at_once))
            .count()
    };
    // Start-up, the store down: nothing goes for a poll and a timeout (350 ms).
    let mut ctxs: Vec<(u32, bool)> = (10..13).map(|c| (c, p.workers[w].request(c))).collect();
    for _ in 0..17 {
        p.advance(Duration::from_millis(20));
        p.tick(&mut store);
    }
    assert_eq!(
        sent(&p, &ctxs),
        0,
        "nothing sent before the store could answer"
    );
    p.advance(Duration::from_millis(20));
    p.tick(&mut store);
    assert_eq!(sent(&p, &ctxs), 2, "the fallback share: 4 / 2 proxies");
    let warns = |p: &Proxy| {
        p.process
            .logs()
            .iter()
            .filter(|(l, m)| *l == Level::Warn && m.contains("fleet quotas and pauses: no store"))
            .count()
    };
    assert_eq!(warns(&p), 1, "one line per outage: {:?}", p.process.logs());
    assert!(
        p.process
            .metric("unbusy_store_poll_total.result.error")
            .unwrap()
            > 1
    );
    // The store answers: the grant (3: two in flight and one waiting) lets the third go.
    store.up = true;
    for _ in 0..5 {
        p.advance(Duration::from_millis(20));
        p.tick(&mut store);
    }
    assert_eq!(sent(&p, &ctxs), 3, "{:?}", store.held);
    assert!(p
        .process
        .logs()
        .iter()
        .any(|(l, m)| *l == Level::Info && m.contains("the store answers again")));
    // Three more wait; the store goes down right after granting 4: the grant stands.
    ctxs.extend((20..23).map(|c| (c, p.workers[w].request(c))));
    for _ in 0..7 {
        p.advance(Duration::from_millis(20));
        p.tick(&mut store);
    }
    assert_eq!(sent(&p, &ctxs), 4, "{:?}", store.held);
    store.up = false;
    for (c, _) in &ctxs[..2] {
        p.workers[w].answer(*c, "200", &[], ANSWER);
    }
    for _ in 0..7 {
        p.advance(Duration::from_millis(20));
        p.tick(&mut store);
    }
    assert_eq!(
        sent(&p, &ctxs),
        6,
        "the last grant (4) still stands: 2 in flight + the 2 waiting (the share is 2)"
    );
    // Past the lease (1 s from the last renewal the store answered), the fallback share: 2.
    for _ in 0..60 {
        p.advance(Duration::from_millis(20));
        p.tick(&mut store);
    }
    for (c, _) in &ctxs[2..6] {
        p.workers[w].answer(*c, "200", &[], ANSWER);
    }
    ctxs.extend((40..44).map(|c| (c, p.workers[w].request(c))));
    p.advance(Duration::from_millis(20));
    p.tick(&mut store);
    assert_eq!(
        sent(&p, &ctxs),
        8,
        "the fallback share of 2 after the lease"
    );
    assert_eq!(warns(&p), 2, "one line for the second outage");
}

/// A run of 429s with `Retry-After: 5` through proxy A (three in a row make the engine cool
/// the provider down: the limit is the account's) is published to the store, and proxy B,
/// which never saw one, sends nothing to that provider until the pause ends: its requests go
/// to the other provider; after 5 s they go to the first again.
#[test]
fn a_run_of_hinted_429s_on_one_proxy_pauses_the_provider_on_another() {
    let config = r#"{"providers":[{"name":"first","cluster":"c1"},{"name":"second","cluster":"c2","priority":1}],
        "retry":{"max_attempts":1},
        "store":{"cluster":"unbusy_store","poll_ms":100}}"#;
    let mut store = Store {
        up: true,
        ..Store::default()
    };
    let mut a = Proxy::new(config, 1, 4);
    let mut b = Proxy::new(config, 1, 5);
    let busy = r#"{"error":{"message":"Rate limit reached","type":"rate_limit_error"}}"#;
    for ctx in 10..13 {
        assert!(a.workers[0].request(ctx));
        assert_eq!(a.workers[0].cluster(ctx), "c1");
        a.workers[0].answer(ctx, "429", &[("retry-after", "5")], busy);
    }
    a.tick(&mut store);
    assert!(a.workers[0]
        .paths()
        .contains(&"/v1/provider/first/pause".to_string()));
    a.tick(&mut store);
    assert_eq!(store.publishes.len(), 1, "{:?}", a.workers[0].paths());
    assert!(
        store.publishes[0].starts_with("first 5000 retry_after")
            || store.publishes[0].starts_with("first 4"),
        "{:?}",
        store.publishes
    );
    a.tick(&mut store);
    assert_eq!(store.publishes.len(), 1, "a verdict is published once");
    // B polls on its first tick and learns the pause.
    b.advance(Duration::from_millis(20));
    b.tick(&mut store);
    b.advance(Duration::from_millis(20));
    b.tick(&mut store);
    assert!(b.workers[0]
        .paths()
        .iter()
        .any(|p| p.starts_with("/v1/pauses?providers=first,second")));
    for (i, ctx) in (20..25).enumerate() {
        assert!(b.workers[0].request(ctx));
        assert_eq!(
            b.workers[0].cluster(ctx),
            "c2",
            "request {i} during the pause"
        );
        b.workers[0].answer(ctx, "200", &[], ANSWER);
        b.advance(Duration::from_millis(900));
        a.advance(Duration::from_millis(900));
        b.tick(&mut store);
    }
    b.advance(Duration::from_millis(600));
    b.tick(&mut store);
    assert!(b.workers[0].request(30));
    assert_eq!(b.workers[0].cluster(30), "c1", "the pause is over");
}

/// A proxy that asks the store for fewer slots stops using them as it asks: proxy A holds the
/// whole quota of 4, three of its requests end, and its next renewal asks for 1; three new
/// requests reach A before the store answers, and wait, since the store hands the three slots
/// to proxy B, whose requests were waiting. Never more than 4 in flight across the fleet.
#[test]
fn slots_given_up_are_not_used_while_the_store_hands_them_to_another_proxy() {
    let config = r#"{"providers":[{"name":"deep","cluster":"cd","max_concurrency":4}],
        "retry":{"max_attempts":1},
        "store":{"cluster":"unbusy_store","poll_ms":100}}"#;
    let mut store = Store {
        up: true,
        ..Store::default()
    };
    let mut a = Proxy::new(config, 1, 6);
    let mut b = Proxy::new(config, 1, 7);
    let step = |a: &mut Proxy, b: &mut Proxy, store: &mut Store| {
        a.advance(Duration::from_millis(20));
        b.advance(Duration::from_millis(20));
        a.tick(store);
        b.tick(store);
    };
    let on_a: Vec<(u32, bool)> = (10..14).map(|c| (c, a.workers[0].request(c))).collect();
    for _ in 0..3 {
        step(&mut a, &mut b, &mut store);
    }
    let sent = |p: &Proxy, ctxs: &[(u32, bool)]| {
        ctxs.iter()
            .filter(|(c, at_once)| p.workers[0].sent(*c, *at_once))
            .count()
    };
    assert_eq!(sent(&a, &on_a), 4, "{:?}", store.held);
    let on_b: Vec<(u32, bool)> = (20..23).map(|c| (c, b.workers[0].request(c))).collect();
    for _ in 0..7 {
        step(&mut a, &mut b, &mut store);
    }
    assert_eq!(
        sent(&b, &on_b),
        0,
        "A holds the whole quota: {:?}",
        store.held
    );
    for (c, _) in &on_a[..3] {
        a.workers[0].answer(*c, "200", &[], ANSWER);
    }
    // A's next renewal goes out (asking for its one attempt in flight), not answered yet.
    let acquires = |p: &Proxy| {
        p.workers[0]
            .paths()
            .iter()
            .filter(|p| *p == "/v1/concurrency/acquire")
            .count()
    };
    let before = acquires(&a);
    while acquires(&a) == before {
        a.advance(Duration::from_millis(20));
        a.tick(&mut store);
    }
    let more: Vec<(u32, bool)> = (30..33).map(|c| (c, a.workers[0].request(c))).collect();
    assert_eq!(
        sent(&a, &more),
        0,
        "A asked for 1 slot: the new requests wait"
    );
    let mut max = 0;
    for _ in 0..10 {
        step(&mut a, &mut b, &mut store);
        let in_flight = 1 + sent(&a, &more) + sent(&b, &on_b);
        max = max.max(in_flight);
    }
    assert_eq!(
        sent(&b, &on_b),
        3,
        "B got the slots A gave up: {:?}",
        store.held
    );
    assert!(max <= 4, "{max} in flight");
}

/// One worker of a proxy polls per `poll_ms`, not each: over a second, two workers ticking
/// every 20 ms make about ten polls of pauses and ten renewals together.
#[test]
fn the_workers_of_a_proxy_poll_once_per_period_between_them() {
    let config = r#"{"providers":[{"name":"deep","cluster":"cd","max_concurrency":4}],
        "store":{"cluster":"unbusy_store","poll_ms":100}}"#;
    let mut store = Store {
        up: true,
        ..Store::default()
    };
    let mut p = Proxy::new(config, 2, 8);
    for _ in 0..50 {
        p.advance(Duration::from_millis(20));
        p.tick(&mut store);
    }
    let count = |what: &str| {
        p.workers
            .iter()
            .flat_map(|w| w.paths())
            .filter(|path| path.starts_with(what))
            .count()
    };
    let (polls, renewals) = (count("/v1/pauses"), count("/v1/concurrency/acquire"));
    assert!((10..=11).contains(&polls), "{polls} polls in 1 s");
    assert_eq!(renewals, polls);
    let holders: std::collections::HashSet<_> = p
        .workers
        .iter()
        .flat_map(|w| w.host.calls())
        .filter(|c| c.header(":path") == Some("/v1/concurrency/acquire"))
        .map(|c| {
            let v = json::parse(&c.body).unwrap();
            v.get("holder").unwrap().as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(holders.len(), 1, "one holder for the proxy: {holders:?}");
}

/// Answers can come back out of order (a slow one past a newer poll): the answer to an older
/// renewal is not applied over the newer one's, which may have given slots up.
#[test]
fn an_answer_to_an_older_renewal_is_not_applied_over_a_newer_one() {
    let config = r#"{"providers":[{"name":"deep","cluster":"cd","max_concurrency":4}],
        "retry":{"max_attempts":1},
        "store":{"cluster":"unbusy_store","poll_ms":100}}"#;
    let p = Proxy::new(config, 1, 9);
    let w = &p.workers[0];
    let acquires = || -> Vec<FakeCall> {
        w.host
            .calls()
            .into_iter()
            .filter(|c| c.header(":path") == Some("/v1/concurrency/acquire"))
            .collect()
    };
    // Two renewals go out, 100 ms apart, neither answered yet.
    while acquires().len() < 2 {
        p.advance(Duration::from_millis(20));
        w.host.call_into(1);
        driver::tick(&w.host, &w.state);
    }
    let calls = acquires();
    let answer = |call: &FakeCall, held: u32| {
        let body = format!(r#"{{"held":{held},"in_use":{held}}}"#);
        w.host.set_call_answer(
            &[(":status", "200"), ("content-type", "application/json")],
            body.as_bytes(),
        );
        w.host.call_into(1);
        driver::call_response(&w.host, &w.state, call.token.0, body.len());
    };
    answer(&calls[1], 1);
    answer(&calls[0], 4);
    let sent = [(10, w.request(10)), (11, w.request(11))]
        .iter()
        .filter(|(c, at_once)| w.sent(*c, *at_once))
        .count();
    assert_eq!(sent, 1, "the newer grant (1) stands");
}

/// A breaker that opens on one proxy is published as `breaker_open` for the time it stays
/// open, and the other proxy sends nothing to that provider meanwhile.
#[test]
fn an_open_breaker_on_one_proxy_is_a_pause_on_another() {
    let config = r#"{"providers":[{"name":"first","cluster":"c1"},{"name":"second","cluster":"c2","priority":1}],
        "retry":{"max_attempts":1},
        "breaker":{"consecutive_failures":3,"open_ms":4000,"max_open_ms":4000},
        "store":{"cluster":"unbusy_store","poll_ms":100}}"#;
    let mut store = Store {
        up: true,
        ..Store::default()
    };
    let mut a = Proxy::new(config, 1, 10);
    let mut b = Proxy::new(config, 1, 11);
    let busy = r#"{"error":{"message":"Server overloaded","type":"server_error"}}"#;
    for ctx in 10..13 {
        assert!(a.workers[0].request(ctx));
        assert_eq!(a.workers[0].cluster(ctx), "c1");
        a.workers[0].answer(ctx, "503", &[], busy);
    }
    a.tick(&mut store);
    a.tick(&mut store);
    assert_eq!(store.publishes, ["first 4000 breaker_open"]);
    for _ in 0..2 {
        b.advance(Duration::from_millis(20));
        b.tick(&mut store);
    }
    assert!(b.workers[0].request(20));
    assert_eq!(b.workers[0].cluster(20), "c2", "paused on B too");
}

/// A proxy that holds no slot of its preferred provider sends its requests to the next one
/// instead of waiting; those requests are its demand all the same, so its next renewal asks
/// for slots and the provider is used again (the fleet demo's account got no attempt at all
/// when only waiting requests counted).
#[test]
fn requests_failed_over_for_want_of_a_slot_ask_the_store_for_slots() {
    let config = r#"{"providers":[{"name":"first","cluster":"c1","max_concurrency":2},{"name":"second","cluster":"c2","priority":1}],
        "store":{"cluster":"unbusy_store","poll_ms":100}}"#;
    let mut store = Store {
        up: true,
        ..Store::default()
    };
    let mut a = Proxy::new(config, 1, 7);
    // The first renewal asks for nothing: no demand yet.
    a.tick(&mut store);
    a.advance(Duration::from_millis(20));
    a.tick(&mut store);
    let held = |s: &Store| s.held.values().copied().sum::<u64>();
    assert_eq!(held(&store), 0);
    assert!(a.workers[0].request(10));
    assert_eq!(
        a.workers[0].cluster(10),
        "c2",
        "no slot of first: failed over"
    );
    a.workers[0].answer(10, "200", &[], ANSWER);
    // The next renewals ask for what was turned away.
    for _ in 0..8 {
        a.advance(Duration::from_millis(20));
        a.tick(&mut store);
    }
    assert!(held(&store) >= 1, "{:?}", store.held);
    assert!(a.workers[0].request(11));
    assert_eq!(a.workers[0].cluster(11), "c1", "the provider is used again");
    a.workers[0].answer(11, "200", &[], ANSWER);
    // Requests a few polls apart: the slot stays while the demand is recent (within a lease).
    for ctx in 12..15 {
        for _ in 0..10 {
            a.advance(Duration::from_millis(20));
            a.tick(&mut store);
        }
        assert!(a.workers[0].request(ctx));
        assert_eq!(
            a.workers[0].cluster(ctx),
            "c1",
            "request {ctx}, 200 ms after the last"
        );
        a.workers[0].answer(ctx, "200", &[], ANSWER);
    }
}
