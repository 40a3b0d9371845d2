//! The fleet's L2 cache (`unbusy-store`) as the filter uses it, over two fake Envoy *processes*
//! (no shared data between them, as two proxies of a fleet) and a store the test plays from the
//! calls the filters dispatch: an answer one proxy wrote back is a hit on the other, for the
//! same tenant only; a store that times out, errs or cannot be reached sends requests to the
//! provider (fail open); a request with no cache key never reaches the store; only a valid
//! answer is written back.

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
use unbusy_envoy::driver::{self, Shared};
use unbusy_envoy::fake::{FakeCall, FakeHost, FakeProcess, FakeStream};
use unbusy_envoy::host::Level;

const CONFIG: &str = r#"{"providers":[{"name":"a","cluster":"ca"}],
    "retry":{"max_attempts":1},
    "store":{"cluster":"unbusy_store"}}"#;
const CHAT: &str = r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
const HOT: &str = r#"{"model":"m","temperature":1,"messages":[{"role":"user","content":"hi"}]}"#;

/// One proxy: a process of its own with one worker.
struct Proxy {
    process: Rc<FakeProcess>,
    host: FakeHost,
    state: Shared<FakeHost>,
    /// Calls already looked at.
    seen: usize,
}

impl Proxy {
    fn new(config: &str) -> Self {
        let process = FakeProcess::new(T0);
        let (host, state) = common::worker(&process, config, 7);
        Self {
            process,
            host,
            state,
            seen: 0,
        }
    }

    fn request(&self, ctx: u32, key: &str, body: &str) -> Action {
        common::chat_request(&self.host, &self.state, ctx, &format!("Bearer {key}"), body)
    }

    /// The provider's answer on the stream (attempt 1 rides it).
    fn answer(&self, ctx: u32, status: &str, body: &str) -> Action {
        self.host.edit(ctx, |s| {
            s.response_headers = vec![
                (":status".into(), status.into()),
                ("content-type".into(), "application/json".into()),
            ];
        });
        self.host.call_into(ctx);
        let held = driver::response_headers(&self.host, &self.state, ctx, ctx, false);
        if held == Action::Continue {
            return held;
        }
        self.host
            .edit(ctx, |s| s.response_body = body.as_bytes().to_vec());
        driver::response_body(&self.host, &self.state, ctx, ctx, body.len(), true)
    }

    /// The cache calls dispatched since the last look (the fleet's polls of pauses, tested in
    /// `fleet.rs`, left out).
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

    /// Answers a dispatched call, in the context it was made from.
    fn call_answer(&self, ctx: u32, call: &FakeCall, headers: &[(&str, &str)], body: &[u8]) {
        self.host.set_call_answer(headers, body);
        self.host.call_into(ctx);
        driver::call_response(&self.host, &self.state, call.token.0, body.len());
    }

    fn tick(&self) {
        self.host.call_into(1);
        driver::tick(&self.host, &self.state);
    }

    fn stream(&self, ctx: u32) -> FakeStream {
        self.host.stream(ctx)
    }

    fn end(&self, ctx: u32) {
        driver::stream_done(&self.host, &self.state, ctx);
        self.host.edit(ctx, |s| s.gone = true);
    }

    fn metric(&self, name: &str) -> i64 {
        self.process.metric(name).unwrap_or(0)
    }

    fn warnings(&self) -> usize {
        self.process
            .logs()
            .iter()
            .filter(|(l, _)| *l == Level::Warn)
            .count()
    }
}

fn reply_header<'a>(s: &'a FakeStream, name: &str) -> Option<&'a str> {
    s.reply
        .as_ref()?
        .1
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A store the test plays: `PUT` stores, `GET` answers (age 5 ms) or 404, by path.
#[derive(Default)]
struct Store(HashMap<String, (Vec<u8>, String)>);

impl Store {
    fn put(&mut self, call: &FakeCall) {
        assert_eq!(call.header(":method"), Some("PUT"));
        assert_eq!(call.cluster, "unbusy_store");
        let path = call.header(":path").unwrap().to_string();
        let ct = call.header("content-type").unwrap().to_string();
        self.0.insert(path, (call.body.clone(), ct));
    }

    /// Answers `call` (a lookup) on `proxy`'s stream `ctx`.
    fn get(&self, proxy: &Proxy, ctx: u32, call: &FakeCall) {
        assert_eq!(call.header(":method"), Some("GET"));
        assert_eq!(call.cluster, "unbusy_store");
        assert_eq!(call.timeout, Duration::from_millis(20), "store.timeout_ms");
        match self.0.get(call.header(":path").unwrap()) {
            Some((body, ct)) => proxy.call_answer(
                ctx,
                call,
                &[
                    (":status", "200"),
                    ("content-type", ct),
                    ("x-unbusy-age-ms", "5"),
                    ("x-unbusy-freshness", "fresh"),
                ],
                body,
            ),
            None => proxy.call_answer(ctx, call, &[(":status", "404")], b"{}"),
        }
    }
}

/// The provider answers a request on proxy `p`'s stream `ctx` after its L2 lookup missed.
/// Returns the lookup's path.
fn miss_then_provider(p: &mut Proxy, store: &Store, ctx: u32, key: &str) -> String {
    assert_eq!(
        p.request(ctx, key, CHAT),
        Action::Pause,
        "held for the store"
    );
    let calls = p.new_calls();
    assert_eq!(calls.len(), 1, "one lookup");
    store.get(p, ctx, &calls[0]);
    let s = p.stream(ctx);
    assert_eq!(s.request_resumed, 1, "a miss goes to the provider");
    assert_eq!(s.request_header("x-unbusy-cluster"), Some("ca"));
    assert_eq!(p.answer(ctx, "200", ANSWER), Action::Continue);
    let note = p
        .stream(ctx)
        .response_header("x-unbusy")
        .unwrap()
        .to_string();
    assert!(note.contains("cache=miss"), "{note}");
    p.end(ctx);
    calls[0].header(":path").unwrap().to_string()
}

/// The tenant segment of a lookup's path.
fn tenant_of(path: &str) -> &str {
    path.split('/').nth(3).unwrap()
}

/// Proxy A's answer, written back, is a hit on proxy B (served whole, nothing upstream, noted
/// `cache=hit-l2`) and stored in B's L1 (B's next one is an L1 hit with no call to the store);
/// another tenant's identical request misses.
#[test]
fn an_answer_written_back_by_one_proxy_is_an_l2_hit_on_another_for_its_tenant_only() {
    let mut store = Store::default();
    let mut a = Proxy::new(CONFIG);
    let mut b = Proxy::new(CONFIG);
    let k1 = miss_then_provider(&mut a, &store, 10, "k1");
    assert!(a.new_calls().is_empty(), "write-backs wait for the tick");
    a.tick();
    let puts = a.new_calls();
    assert_eq!(puts.len(), 1, "one write-back");
    assert_eq!(puts[0].body, ANSWER.as_bytes());
    assert_eq!(puts[0].header("x-unbusy-ttl-ms"), Some("300000"));
    assert_eq!(puts[0].header("x-unbusy-stale-ttl-ms"), Some("3600000"));
    store.put(&puts[0]);

    assert_eq!(b.request(20, "k1", CHAT), Action::Pause);
    let calls = b.new_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].header(":path"),
        puts[0].header(":path"),
        "the same tenant and key on both proxies"
    );
    store.get(&b, 20, &calls[0]);
    let served = b.stream(20);
    let (status, _, body) = served.reply.clone().expect("served from L2");
    assert_eq!(status, 200);
    assert_eq!(body, ANSWER.as_bytes());
    assert_eq!(
        reply_header(&served, "x-unbusy"),
        Some("provider=none; attempts=0; cache=hit-l2; tier=0")
    );
    assert_eq!(
        reply_header(&served, "content-type"),
        Some("application/json")
    );
    assert_eq!(served.request_resumed, 0, "nothing went upstream");
    assert_eq!(b.metric("unbusy_l2_cache_total.result.hit"), 1);
    assert_eq!(b.metric("unbusy_cache_total.result.miss"), 1);
    b.end(20);
    b.tick();
    assert!(b.new_calls().is_empty(), "an L2 hit is not written back");

    // Now in B's L1.
    assert_eq!(b.request(21, "k1", CHAT), Action::Pause);
    assert!(b.new_calls().is_empty(), "an L1 hit makes no call");
    assert!(reply_header(&b.stream(21), "x-unbusy")
        .unwrap()
        .contains("cache=hit;"));
    b.end(21);

    // Another tenant: its own path (its key differs, and so does the tenant in it), a miss.
    let k2 = miss_then_provider(&mut b, &store, 22, "k2");
    assert_ne!(tenant_of(&k1), tenant_of(&k2), "{k1} {k2}");
    assert_eq!(tenant_of(&k1).len(), 16, "{k1}");
    assert_eq!(b.metric("unbusy_l2_cache_total.result.miss"), 1);
}

/// A store that does not answer in time (Envoy answers the call with no status), answers 503,
/// or cannot be dispatched to: the request goes to the provider and is answered. One warning
/// per outage; lookups back off for a second after a failure; one line when it answers again.
#[test]
fn a_store_that_times_out_or_errs_sends_requests_to_the_provider() {
    let store = Store::default();
    let mut p = Proxy::new(CONFIG);
    assert_eq!(p.request(10, "k1", CHAT), Action::Pause);
    let calls = p.new_calls();
    p.call_answer(10, &calls[0], &[], b""); // the timeout
    assert_eq!(p.stream(10).request_resumed, 1);
    assert_eq!(p.answer(10, "200", ANSWER), Action::Continue);
    p.end(10);
    assert_eq!(p.metric("unbusy_l2_cache_total.result.error"), 1);
    assert_eq!(p.warnings(), 1);
    // Within the back-off: straight to the provider (same key, but L1 has it: another prompt).
    let other = CHAT.replace("hi", "hello");
    assert_eq!(p.request(11, "k1", &other), Action::Continue, "no wait");
    assert!(
        p.new_calls().iter().all(|c| c.cluster != "unbusy_store"),
        "no lookup while backing off (and no write-back on the tick after)"
    );
    p.tick();
    assert!(
        p.new_calls().is_empty(),
        "write-backs dropped while backing off"
    );
    assert_eq!(p.metric("unbusy_l2_cache_total.result.error"), 2);
    p.end(11);
    // A second later: asked again; a 503 is an error too, and no second warning.
    p.process.advance(Duration::from_millis(1001));
    let third = CHAT.replace("hi", "hey");
    assert_eq!(p.request(12, "k1", &third), Action::Pause);
    let calls = p.new_calls();
    p.call_answer(12, &calls[0], &[(":status", "503")], b"{}");
    assert_eq!(p.stream(12).request_resumed, 1);
    assert_eq!(p.warnings(), 1, "one warning per outage");
    p.end(12);
    // A dispatch the host refuses: the request goes on at once.
    p.process.advance(Duration::from_millis(1001));
    p.host.refuse_dispatches(true);
    let fourth = CHAT.replace("hi", "yo");
    assert_eq!(p.request(13, "k1", &fourth), Action::Continue);
    p.host.refuse_dispatches(false);
    p.end(13);
    // Back: a miss answered normally, logged once.
    p.process.advance(Duration::from_millis(1001));
    let fifth = CHAT.replace("hi", "hallo");
    assert_eq!(p.request(14, "k1", &fifth), Action::Pause);
    let calls = p.new_calls();
    store.get(&p, 14, &calls[0]);
    assert_eq!(p.stream(14).request_resumed, 1);
    assert!(p
        .process
        .logs()
        .iter()
        .any(|(l, m)| *l == Level::Info && m.contains("store answers again")));
    assert_eq!(p.metric("unbusy_l2_cache_total.result.error"), 4);
    assert_eq!(p.metric("unbusy_l2_cache_total.result.miss"), 1);
}

/// A request with no cache key (temperature 1) goes to the provider with no call to the store,
/// before or after its answer.
#[test]
fn an_uncacheable_request_never_reaches_the_store() {
    let mut p = Proxy::new(CONFIG);
    assert_eq!(p.request(10, "k1", HOT), Action::Continue);
    assert_eq!(p.answer(10, "200", ANSWER), Action::Continue);
    p.end(10);
    p.tick();
    assert!(p.new_calls().is_empty(), "{:?}", p.host.calls());
    // And with no store configured, a cacheable one makes none either.
    let mut q = Proxy::new(r#"{"providers":[{"name":"a","cluster":"ca"}]}"#);
    assert_eq!(q.request(10, "k1", CHAT), Action::Continue);
    assert_eq!(q.answer(10, "200", ANSWER), Action::Continue);
    q.tick();
    assert!(q.new_calls().is_empty());
}

/// Only a valid answer is written back: a provider's 500 or an answer that is not a
/// completion is not.
#[test]
fn only_a_valid_answer_is_written_back() {
    let store = Store::default();
    let mut p = Proxy::new(CONFIG);
    for (ctx, status, body) in [
        (10, "500", r#"{"error":{"message":"boom"}}"#),
        (11, "200", r#"{"not":"a completion"#),
    ] {
        assert_eq!(p.request(ctx, "k1", CHAT), Action::Pause);
        let calls = p.new_calls();
        store.get(&p, ctx, &calls[0]);
        p.answer(ctx, status, body);
        p.end(ctx);
        p.tick();
        assert!(p.new_calls().is_empty(), "no write-back of {body}");
    }
    let _ = miss_then_provider(&mut p, &store, 12, "k1");
    p.tick();
    assert_eq!(p.new_calls().len(), 1, "a valid answer is written back");
}
