//! The filter's active health checks over a fake Envoy process of two workers
//! (`unbusy_envoy::fake`), driven through the same driver Envoy's callbacks go through: the
//! root context's tick probes each provider once per interval across both workers, a probe
//! failure marks the provider down for both, the next request on either worker goes straight
//! to the other provider, and probes that succeed again take it back.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::T0;

use proxy_wasm::types::Action;
use std::rc::Rc;
use std::time::Duration;
use unbusy_core::health::ProbeState;
use unbusy_envoy::driver::{self, Shared};
use unbusy_envoy::fake::{FakeCall, FakeHost, FakeProcess};
use unbusy_envoy::host::Level;

const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

const CONFIG: &str = r#"{"providers":[
    {"name":"primary","cluster":"ca","api_key":"sk-primary-secret","priority":0},
    {"name":"backup","cluster":"cb","base_url":"https://api.backup.example/v1","priority":1}],
  "health_check":{"enabled":true,"interval_ms":200,"timeout_ms":100,
    "unhealthy_threshold":2,"healthy_threshold":2}}"#;

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

    fn tick(&self) {
        driver::tick(&self.host, &self.state);
    }

    /// The calls dispatched since the last look.
    fn new_calls(&mut self) -> Vec<FakeCall> {
        let calls = self.host.calls();
        let fresh = calls[self.answered..].to_vec();
        self.answered = calls.len();
        fresh
    }

    /// Answers a call with `status` (`None`: Envoy's callback after a timeout or a reset,
    /// without headers).
    fn answer(&self, call: &FakeCall, status: Option<&str>) {
        match status {
            Some(s) => self.host.set_call_answer(&[(":status", s)], b"{}"),
            None => self.host.set_call_answer(&[], b""),
        }
        driver::call_response(&self.host, &self.state, call.token.0, 2);
    }

    /// A caller's chat request on stream `ctx`; the cluster its first attempt went to.
    fn request(&self, ctx: u32) -> Option<String> {
        let action = common::chat_request(&self.host, &self.state, ctx, "Bearer caller", CHAT);
        assert_eq!(
            action,
            Action::Continue,
            "the first attempt rides the stream"
        );
        self.host
            .stream(ctx)
            .request_header("x-unbusy-cluster")
            .map(str::to_string)
    }

    fn end(&self, ctx: u32) {
        driver::stream_done(&self.host, &self.state, ctx);
        self.host.edit(ctx, |s| s.gone = true);
    }
}

fn header<'a>(call: &'a FakeCall, name: &str) -> Option<&'a str> {
    call.headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// One round of probes: the first worker to tick claims every due probe, the other sends none;
/// each is answered as `answer` says for its cluster.
fn probe_round(
    first: &mut Worker,
    second: &mut Worker,
    answer: impl Fn(&str) -> Option<&'static str>,
) {
    first.tick();
    second.tick();
    assert!(second.new_calls().is_empty(), "the other worker probed too");
    let calls = first.new_calls();
    let mut clusters: Vec<&str> = calls.iter().map(|c| c.cluster.as_str()).collect();
    clusters.sort_unstable();
    assert_eq!(
        clusters,
        ["ca", "cb"],
        "one probe per provider per interval"
    );
    for call in &calls {
        first.answer(call, answer(&call.cluster));
    }
}

#[test]
fn a_provider_down_while_idle_is_skipped_by_both_workers_and_taken_back_when_up() {
    let process = FakeProcess::new(T0);
    let mut a = Worker::new(&process, CONFIG, 1);
    let mut b = Worker::new(&process, CONFIG, 2);

    // The first tick probes at once, with each provider's key and its base URL's path.
    a.tick();
    let calls = a.new_calls();
    assert_eq!(calls.len(), 2);
    let to = |cluster: &str| calls.iter().find(|c| c.cluster == cluster).unwrap();
    assert_eq!(header(to("ca"), ":method"), Some("GET"));
    assert_eq!(header(to("ca"), ":path"), Some("/v1/models"));
    assert_eq!(
        header(to("ca"), "authorization"),
        Some("Bearer sk-primary-secret")
    );
    assert_eq!(header(to("cb"), ":path"), Some("/v1/models"));
    assert_eq!(header(to("cb"), ":authority"), Some("api.backup.example"));
    assert_eq!(header(to("cb"), "authorization"), None);
    assert_eq!(to("ca").timeout, Duration::from_millis(100));
    // Nothing more until the interval has passed, on either worker.
    b.tick();
    a.tick();
    assert!(a.new_calls().is_empty() && b.new_calls().is_empty());
    a.answer(to("ca"), Some("200"));
    a.answer(to("cb"), Some("401")); // reachable, no key: up

    // Both up: requests go to the primary.
    assert_eq!(b.request(10).as_deref(), Some("ca"));
    b.end(10);

    // The primary dies while idle: a 503, then a timeout (the unhealthy threshold is 2).
    process.advance(Duration::from_millis(200));
    probe_round(&mut b, &mut a, |c| {
        (c == "cb").then_some("200").or(Some("503"))
    });
    assert_eq!(
        a.request(11).as_deref(),
        Some("ca"),
        "one failed probe is not down"
    );
    a.end(11);
    process.advance(Duration::from_millis(200));
    probe_round(&mut a, &mut b, |c| (c == "cb").then_some("200"));

    // Either worker's next request goes straight to the backup.
    b.tick();
    assert_eq!(
        process.metric("unbusy_provider_down.provider.primary"),
        Some(1)
    );
    assert_eq!(
        process.metric("unbusy_provider_down.provider.backup"),
        Some(0)
    );
    assert_eq!(a.request(12).as_deref(), Some("cb"));
    assert_eq!(b.request(13).as_deref(), Some("cb"));
    a.end(12);
    b.end(13);
    let logs = process.logs();
    assert!(
        logs.iter().any(|(level, line)| *level == Level::Info
            && line.contains("\"primary\" down (last probe: no answer)")),
        "{logs:?}"
    );
    assert!(logs
        .iter()
        .all(|(_, line)| !line.contains("sk-primary-secret")));

    // It comes back: one good probe is not enough (healthy threshold 2), two are.
    process.advance(Duration::from_millis(200));
    probe_round(&mut b, &mut a, |_| Some("200"));
    assert_eq!(a.request(14).as_deref(), Some("cb"));
    a.end(14);
    process.advance(Duration::from_millis(200));
    probe_round(&mut a, &mut b, |_| Some("200"));
    assert_eq!(b.request(15).as_deref(), Some("ca"));
    assert_eq!(
        process.metric("unbusy_provider_down.provider.primary"),
        Some(0)
    );
    assert_eq!(a.request(16).as_deref(), Some("ca"));
}

#[test]
fn a_probe_the_host_refuses_to_send_says_down() {
    let process = FakeProcess::new(T0);
    let a = Worker::new(&process, CONFIG, 1);
    a.host.refuse_dispatches(true);
    for _ in 0..2 {
        a.tick();
        process.advance(Duration::from_millis(200));
    }
    // Both providers are down now: requests are tried anyway, the preferred first.
    assert_eq!(a.request(1).as_deref(), Some("ca"));
    let logs = process.logs();
    assert!(
        logs.iter().any(|(_, l)| l.contains("\"backup\" down")),
        "{logs:?}"
    );
}

#[test]
fn without_health_checks_nothing_is_probed() {
    let process = FakeProcess::new(T0);
    let config = r#"{"providers":[{"name":"a","cluster":"ca"}]}"#;
    let mut a = Worker::new(&process, config, 1);
    for _ in 0..3 {
        a.tick();
        process.advance(Duration::from_secs(10));
    }
    assert!(a.new_calls().is_empty());
    assert_eq!(process.shared_value("unbusy:health:0"), None);
    assert_eq!(process.metric("unbusy_provider_down.provider.a"), None);
}

/// Two workers find the same probe due at once: the one whose compare-and-swap loses sends
/// nothing (the other worker's claim slips in between its read and its write).
#[test]
fn a_probe_claimed_by_another_worker_in_between_is_not_sent_twice() {
    let process = FakeProcess::new(T0);
    let mut a = Worker::new(&process, CONFIG, 1);
    process.before_next_set(|p| {
        let held = p.shared_value("unbusy:health:0").unwrap();
        let mut state = ProbeState::from_bytes(&held).unwrap();
        state.next_at = p.now() + 200_000_000;
        p.write("unbusy:health:0", &state.to_bytes());
    });
    a.tick();
    let clusters: Vec<String> = a.new_calls().into_iter().map(|c| c.cluster).collect();
    assert_eq!(
        clusters,
        ["cb"],
        "the primary's probe was the other worker's"
    );
}

/// A probe's result written back while another worker's result lands first is counted again
/// on the fresh value: both results count (two failures in a row mark the provider down).
#[test]
fn a_result_whose_write_loses_the_race_is_counted_on_the_other_workers_value() {
    let process = FakeProcess::new(T0);
    let mut a = Worker::new(&process, CONFIG, 1);
    a.tick();
    let calls = a.new_calls();
    let to_primary = calls.iter().find(|c| c.cluster == "ca").unwrap();
    // The other worker's failed probe of the primary is written between this one's read and
    // write.
    process.before_next_set(|p| {
        let held = p.shared_value("unbusy:health:0").unwrap();
        let mut state = ProbeState::from_bytes(&held).unwrap();
        state.downs += 1;
        p.write("unbusy:health:0", &state.to_bytes());
    });
    a.answer(to_primary, Some("503"));
    let held = process.shared_value("unbusy:health:0").unwrap();
    let state = ProbeState::from_bytes(&held).unwrap();
    assert_eq!((state.downs, state.down), (2, true));
    assert_eq!(a.request(1).as_deref(), Some("cb"));
}
