//! Two filter workers over one fake Envoy process (`unbusy_envoy::fake`), driven natively
//! through the same driver Envoy's callbacks go through. What holds across workers on real
//! Envoy only through shared data must hold here too: a rate limit charged by one worker binds
//! the other, an answer one stored the other serves, one worker's open breaker steers the
//! other, and a check-then-charge race between two workers refunds the loser. Plus the native
//! failover decisions (the router retries only on the aggregate's next provider; when it cannot,
//! the filter dispatches the attempt itself).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{ANSWER, T0};

use proxy_wasm::types::Action;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;
use unbusy_envoy::driver::{self, Attempt, Shared};
use unbusy_envoy::fake::{FakeHost, FakeProcess, FakeStream};

const CHAT: &str = r#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;

/// One worker: its host (over the shared process) and its filter state.
struct Worker {
    host: FakeHost,
    state: Shared<FakeHost>,
}

impl Worker {
    fn new(process: &Rc<FakeProcess>, config: &str, seed: u64) -> Self {
        let (host, state) = common::worker(process, config, seed);
        Self { host, state }
    }

    /// A caller's chat request on stream `ctx` (headers, then the whole body), as Envoy calls
    /// the filter. Returns the body callback's answer: `Continue` when the request went on to
    /// the router, `Pause` when it is held or answered locally.
    fn request(&self, ctx: u32, key: &str, body: &str) -> Action {
        common::chat_request(&self.host, &self.state, ctx, &format!("Bearer {key}"), body)
    }

    /// The router's answer to the attempt stream `ctx` carries, seen in context `from` (the
    /// stream itself, or an upstream attempt's context): headers, then the whole body. Returns
    /// what the last callback answered.
    fn answer(&self, ctx: u32, from: u32, status: &str, content_type: &str, body: &str) -> Action {
        self.host.edit(from, |s| {
            s.response_headers = vec![
                (":status".into(), status.into()),
                ("content-type".into(), content_type.into()),
            ];
        });
        self.host.call_into(from);
        let held = driver::response_headers(&self.host, &self.state, ctx, from, false);
        if held == Action::Continue {
            return held;
        }
        self.host
            .edit(from, |s| s.response_body = body.as_bytes().to_vec());
        driver::response_body(&self.host, &self.state, ctx, from, body.len(), true)
    }

    /// Answers every dispatched call not answered yet with `status` and `body`.
    fn answer_calls(&self, answered: &mut usize, status: &str, body: &str) {
        let calls = self.host.calls();
        for call in calls.iter().skip(*answered) {
            self.host.set_call_answer(
                &[(":status", status), ("content-type", "application/json")],
                body.as_bytes(),
            );
            driver::call_response(&self.host, &self.state, call.token.0, body.len());
        }
        *answered = calls.len();
    }

    fn stream(&self, ctx: u32) -> FakeStream {
        self.host.stream(ctx)
    }

    fn end(&self, ctx: u32) {
        driver::stream_done(&self.host, &self.state, ctx);
        self.host.edit(ctx, |s| s.gone = true);
    }
}

fn reply_status(s: &FakeStream) -> Option<u16> {
    s.reply.as_ref().map(|r| r.0)
}

fn reply_header<'a>(s: &'a FakeStream, name: &str) -> Option<&'a str> {
    s.reply
        .as_ref()?
        .1
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// A rate limit charged on one worker binds the other: two requests through worker A use up a
/// tenant's two per minute, and worker B refuses the tenant's third with 429 and `Retry-After`,
/// while another tenant still passes on B.
#[test]
fn a_rate_limit_charged_on_one_worker_binds_the_other() {
    let process = FakeProcess::new(T0);
    let config = r#"{"providers":[{"name":"a","cluster":"ca"}],
        "limits":{"per_tenant":{"requests_per_minute":2}}}"#;
    let a = Worker::new(&process, config, 1);
    let b = Worker::new(&process, config, 2);
    assert_eq!(a.request(10, "k1", CHAT), Action::Continue);
    assert_eq!(a.request(11, "k1", CHAT), Action::Continue);
    assert_eq!(b.request(10, "k1", CHAT), Action::Pause);
    let refused = b.stream(10);
    assert_eq!(reply_status(&refused), Some(429), "{refused:?}");
    assert!(reply_header(&refused, "retry-after").is_some());
    assert_eq!(reply_header(&refused, "x-unbusy"), Some("limit=rate"));
    assert_eq!(
        process.metric("unbusy_rejections_total.reason.rate_limited"),
        Some(1)
    );
    // Another tenant has its own bucket.
    assert_eq!(b.request(11, "k2", CHAT), Action::Continue);
    // Thirty seconds later one request's worth is back, for either worker.
    process.advance(Duration::from_secs(30));
    assert_eq!(b.request(12, "k1", CHAT), Action::Continue);
    assert_eq!(a.request(12, "k1", CHAT), Action::Pause);
    assert_eq!(reply_status(&a.stream(12)), Some(429));
}

/// An answer worker A received and stored is served by worker B from the shared cache, whole,
/// without B's request reaching a provider; the cache's byte gauge counts it once.
#[test]
fn an_answer_stored_by_one_worker_is_served_by_the_other() {
    let process = FakeProcess::new(T0);
    let config = r#"{"providers":[{"name":"a","cluster":"ca"}]}"#;
    let a = Worker::new(&process, config, 1);
    let b = Worker::new(&process, config, 2);
    assert_eq!(a.request(10, "k1", CHAT), Action::Continue);
    assert_eq!(
        a.stream(10).request_header("x-unbusy-cluster"),
        Some("ca"),
        "attempt 1 rides the stream to the provider's cluster"
    );
    assert_eq!(
        a.answer(10, 10, "200", "application/json", ANSWER),
        Action::Continue
    );
    let note = a
        .stream(10)
        .response_header("x-unbusy")
        .unwrap()
        .to_string();
    assert!(note.contains("cache=miss"), "{note}");
    a.end(10);

    assert_eq!(b.request(20, "k1", CHAT), Action::Pause);
    let served = b.stream(20);
    let (status, _, body) = served.reply.clone().expect("served locally");
    assert_eq!(status, 200);
    assert_eq!(body, ANSWER.as_bytes());
    assert!(reply_header(&served, "x-unbusy")
        .unwrap()
        .contains("cache=hit"));
    assert_eq!(
        reply_header(&served, "content-type"),
        Some("application/json")
    );
    assert_eq!(served.request_resumed, 0, "nothing went upstream");
    assert_eq!(process.metric("unbusy_cache_total.result.hit"), Some(1));
    assert_eq!(process.metric("unbusy_cache_total.result.miss"), Some(1));
    let ledger = process.recorded("unbusy_cache_bytes");
    assert_eq!(ledger, [ANSWER.len() as u64 + 25]);
    // Another tenant's identical request is not served from it.
    assert_eq!(b.request(21, "k2", CHAT), Action::Continue);
}

/// Worker A's breaker for the primary opens after its consecutive failures; worker B, which saw
/// none of them, sends its next request straight to the backup.
#[test]
fn a_breaker_opened_on_one_worker_steers_the_other() {
    let process = FakeProcess::new(T0);
    let config = r#"{"providers":[{"name":"a","cluster":"ca"},
            {"name":"b","cluster":"cb","priority":1}],
        "breaker":{"consecutive_failures":3,"open_ms":5000,"max_open_ms":5000},
        "budget":{"min_per_second":100},"cache":{"enabled":false}}"#;
    let a = Worker::new(&process, config, 1);
    let b = Worker::new(&process, config, 2);
    // Before: B's first choice is the primary.
    assert_eq!(b.request(5, "k1", CHAT), Action::Continue);
    assert_eq!(b.stream(5).request_header("x-unbusy-cluster"), Some("ca"));
    b.end(5);

    let mut answered = 0;
    for ctx in 10..13 {
        process.advance(Duration::from_millis(10));
        assert_eq!(a.request(ctx, "k1", CHAT), Action::Continue);
        assert_eq!(a.stream(ctx).request_header("x-unbusy-cluster"), Some("ca"));
        a.answer(
            ctx,
            ctx,
            "503",
            "application/json",
            r#"{"error":{"message":"Server overloaded"}}"#,
        );
        // The failover to the backup is dispatched; it answers.
        a.answer_calls(&mut answered, "200", ANSWER);
        assert_eq!(reply_status(&a.stream(ctx)), Some(200));
        a.end(ctx);
    }
    assert_eq!(answered, 3, "each request failed over once");
    assert!(a.host.calls().iter().all(|c| c.cluster == "cb"));
    // A publishes its breaker's verdict at its next tick (every 20 ms on Envoy).
    process.advance(Duration::from_millis(20));
    driver::tick(&a.host, &a.state);
    let until = process.shared_value("unbusy:breaker:0").unwrap();
    assert!(u64::from_le_bytes(until.try_into().unwrap()) > process.now());

    process.advance(Duration::from_millis(10));
    assert_eq!(b.request(20, "k1", CHAT), Action::Continue);
    assert_eq!(
        b.stream(20).request_header("x-unbusy-cluster"),
        Some("cb"),
        "B learned from A's breaker"
    );
}

/// A native flow: attempt 1 enters the primary's failover aggregate; its 503 is marked for the
/// router's retry (591) because the engine's next choice is the aggregate's next provider; the
/// router's second attempt is rewritten for the backup and its stream reaches the caller.
#[test]
fn the_router_retries_natively_only_on_the_aggregates_next_provider() {
    let process = FakeProcess::new(T0);
    let config = r#"{"providers":[
            {"name":"a","cluster":"ca","failover_cluster":"fa","api_key":"ka"},
            {"name":"b","cluster":"cb","priority":1,"api_key":"kb","models":{"m":"mb"}}]}"#;
    let w = Worker::new(&process, config, 1);
    w.host.set_upstream_present(true);
    w.state.borrow_mut().registry_index = Some(0);
    let stream_body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(w.request(10, "caller", stream_body), Action::Continue);
    let caller = w.stream(10);
    assert_eq!(caller.request_header("x-unbusy-cluster"), Some("fa"));
    assert_eq!(caller.request_header("x-unbusy-flow"), Some("0:10"));

    // The router's first attempt, through the upstream instance, reaches the primary.
    let state = w.state.clone();
    let lookup = |i: usize| (i == 0).then(|| state.clone());
    let mut first = Attempt::new(100);
    w.host.open(
        100,
        &[("x-unbusy-flow", "0:10"), (":path", "/v1/chat/completions")],
    );
    w.host.call_into(100);
    first.request_headers(&w.host, lookup, || Some("a".into()));
    let up = w.stream(100);
    assert_eq!(
        up.request_header("x-unbusy-flow"),
        None,
        "never sent upstream"
    );
    assert_eq!(up.request_header("authorization"), Some("Bearer ka"));

    let action = w.answer(
        10,
        100,
        "503",
        "application/json",
        r#"{"error":{"message":"busy"}}"#,
    );
    assert_eq!(action, Action::Continue, "let go to the router");
    let up = w.stream(100);
    assert_eq!(
        up.response_header(":status"),
        Some("591"),
        "marked for the router's retry"
    );
    assert_eq!(
        w.stream(10).request_header("x-unbusy-flow"),
        Some("0:10"),
        "link restored"
    );
    assert!(w.host.calls().is_empty(), "nothing dispatched");
    first.done();

    // The router's retry reaches the backup: rewritten for it, model mapped.
    let mut second = Attempt::new(101);
    w.host.open(
        101,
        &[
            ("x-unbusy-flow", "0:10"),
            (":path", "/v1/chat/completions"),
            ("authorization", "Bearer ka"),
        ],
    );
    w.host.call_into(101);
    let lookup = |i: usize| (i == 0).then(|| state.clone());
    second.request_headers(&w.host, lookup, || Some("b".into()));
    assert_eq!(
        w.stream(101).request_header("authorization"),
        Some("Bearer kb")
    );
    w.host
        .edit(101, |s| s.request_body = stream_body.as_bytes().to_vec());
    assert_eq!(
        second.request_body(&w.host, stream_body.len(), true),
        Action::Continue
    );
    assert!(String::from_utf8(w.stream(101).request_body)
        .unwrap()
        .contains("\"mb\""));
    let sse = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n";
    assert_eq!(
        w.answer(10, 101, "200", "text/event-stream", sse),
        Action::Continue
    );
    let up = w.stream(101);
    assert_eq!(up.response_header(":status"), Some("200"));
    assert!(up
        .response_header("x-unbusy")
        .unwrap()
        .contains("provider=b; attempts=2"));
}

/// When the router could not retry (its 591 comes back to the caller's stream), the attempt the
/// engine chose is dispatched by the filter itself, and its answer replies to the caller.
#[test]
fn a_native_retry_the_router_refused_is_dispatched_instead() {
    let process = FakeProcess::new(T0);
    let config = r#"{"providers":[
            {"name":"a","cluster":"ca","failover_cluster":"fa"},
            {"name":"b","cluster":"cb","priority":1}]}"#;
    let w = Worker::new(&process, config, 1);
    w.host.set_upstream_present(true);
    w.state.borrow_mut().registry_index = Some(0);
    assert_eq!(w.request(10, "caller", CHAT), Action::Continue);
    let state = w.state.clone();
    let mut first = Attempt::new(100);
    w.host.open(100, &[("x-unbusy-flow", "0:10")]);
    w.host.call_into(100);
    first.request_headers(&w.host, |_| Some(state.clone()), || Some("a".into()));
    w.answer(
        10,
        100,
        "503",
        "application/json",
        r#"{"error":{"message":"busy"}}"#,
    );
    first.done();
    // The router gave up: its 591 reaches the caller's stream, and is held from the caller.
    w.host.edit(10, |s| {
        s.response_headers = vec![(":status".into(), "591".into())];
    });
    w.host.call_into(10);
    assert_eq!(
        driver::response_headers(&w.host, &w.state, 10, 10, false),
        Action::Pause
    );
    let calls = w.host.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].cluster, "cb");
    let mut answered = 0;
    w.answer_calls(&mut answered, "200", ANSWER);
    let reply = w.stream(10).reply.unwrap();
    assert_eq!((reply.0, reply.2.as_slice()), (200, ANSWER.as_bytes()));
}

/// The rate-limit race, deterministically: worker A checks its buckets (both have room), then,
/// between A's check and A's charge, worker B takes the global bucket's last unit. A's charge of
/// its tenant bucket succeeds, its global charge is refused: A answers 429 and gives its tenant
/// bucket back, which ends exactly as if only B had been charged.
#[test]
fn the_loser_of_a_check_then_charge_race_is_refunded() {
    let config = r#"{"providers":[{"name":"a","cluster":"ca"}],
        "limits":{"per_tenant":{"requests_per_minute":10},"global":{"requests_per_minute":1}}}"#;
    let tenant_keys = |p: &FakeProcess| -> Vec<Vec<u8>> {
        (0..4096u32)
            .filter_map(|slot| p.shared_value(&format!("unbusy:limit:tenant:{slot}:r")))
            .filter(|v| v.iter().any(|&b| b != 0))
            .collect()
    };

    // Only B's request: what the tenant's bucket holds after it.
    let alone = FakeProcess::new(T0);
    let b_alone = Worker::new(&alone, config, 2);
    assert_eq!(b_alone.request(20, "k1", CHAT), Action::Continue);
    let expected = tenant_keys(&alone);
    assert_eq!(expected.len(), 1);

    // The race.
    let process = FakeProcess::new(T0);
    let a = Worker::new(&process, config, 1);
    let b = Rc::new(Worker::new(&process, config, 2));
    let raced = Rc::new(Cell::new(None));
    {
        let (b, raced) = (Rc::clone(&b), Rc::clone(&raced));
        process.before_next_set(move |_| raced.set(Some(b.request(20, "k1", CHAT))));
    }
    let writes = process.shared_writes();
    assert_eq!(a.request(10, "k1", CHAT), Action::Pause);
    assert_eq!(
        raced.get(),
        Some(Action::Continue),
        "B won and went upstream"
    );
    assert!(process.shared_writes() > writes);
    let lost = a.stream(10);
    assert_eq!(reply_status(&lost), Some(429), "{lost:?}");
    assert_eq!(
        tenant_keys(&process),
        expected,
        "A's tenant charge was given back"
    );
}

/// A native first attempt enters the failover aggregate of the provider the engine chose,
/// whatever that provider's index (here the second, preferred by its priority) and the flow
/// registry's index (here 0): the two are different numbers and must not be confused.
#[test]
fn a_native_first_attempt_enters_the_chosen_providers_aggregate() {
    let process = FakeProcess::new(T0);
    let config = r#"{"providers":[
            {"name":"a","cluster":"ca","failover_cluster":"fa","priority":1},
            {"name":"b","cluster":"cb","failover_cluster":"fb"}]}"#;
    let w = Worker::new(&process, config, 1);
    w.host.set_upstream_present(true);
    w.state.borrow_mut().registry_index = Some(0);
    assert_eq!(w.request(10, "caller", CHAT), Action::Continue);
    assert_eq!(w.stream(10).request_header("x-unbusy-cluster"), Some("fb"));
    assert_eq!(w.stream(10).request_header("x-unbusy-flow"), Some("0:10"));
}
