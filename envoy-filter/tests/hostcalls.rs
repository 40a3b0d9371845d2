//! How many hostcalls the filter makes per request on its common paths, counted natively over
//! the fake host (`FakeProcess::hostcalls`: on Envoy each is one crossing of the wasm boundary).
//! Printed with `--nocapture` (the numbers in BENCHMARKS.md) and bounded, so a change that adds
//! hostcalls to the hot path fails here rather than only in `make bench-envoy`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{ANSWER, T0};

use proxy_wasm::types::Action;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;
use unbusy_envoy::driver::{self, Shared};
use unbusy_envoy::fake::{FakeHost, FakeProcess};

const CONFIG: &str = r#"{"providers":[{"name":"a","cluster":"ca"}]}"#;

fn chat(content: &str, temperature: &str) -> String {
    format!(
        r#"{{"model":"m","temperature":{temperature},"messages":[{{"role":"user","content":"{content}"}}]}}"#
    )
}

struct Worker {
    process: Rc<FakeProcess>,
    host: FakeHost,
    state: Shared<FakeHost>,
}

impl Worker {
    fn new() -> Self {
        let process = FakeProcess::new(T0);
        let (host, state) = common::worker(&process, CONFIG, 1);
        Self {
            process,
            host,
            state,
        }
    }

    /// One request on stream `ctx` as Envoy calls the filter: headers, the whole body, then
    /// (unless the filter answered it itself) the provider's answer, and the stream's end.
    fn request(&self, ctx: u32, body: &str) {
        self.host.open(
            ctx,
            &[
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                (":authority", "proxy"),
                (":scheme", "http"),
                ("authorization", "Bearer k"),
                ("content-type", "application/json"),
                ("user-agent", "OpenAI/Python 1.0"),
                ("accept", "application/json"),
                ("x-request-id", "0f3c2b1a-0000-4000-8000-000000000000"),
                ("content-length", "100"),
            ],
        );
        self.host.call_into(ctx);
        let held = driver::request_headers(&self.host, &self.state, ctx, false);
        assert_eq!(held, Action::Pause);
        self.host
            .edit(ctx, |s| s.request_body = body.as_bytes().to_vec());
        let action = driver::request_body(&self.host, &self.state, ctx, body.len(), true);
        if action == Action::Continue {
            self.host.edit(ctx, |s| {
                s.response_headers = vec![
                    (":status".into(), "200".into()),
                    ("content-type".into(), "application/json".into()),
                    ("content-length".into(), ANSWER.len().to_string()),
                    ("date".into(), "Thu, 03 Dec 2026 11:00:00 GMT".into()),
                ];
            });
            let held = driver::response_headers(&self.host, &self.state, ctx, ctx, false);
            assert_eq!(held, Action::Pause, "a JSON answer is held until judged");
            self.host
                .edit(ctx, |s| s.response_body = ANSWER.as_bytes().to_vec());
            let last = driver::response_body(&self.host, &self.state, ctx, ctx, ANSWER.len(), true);
            assert_eq!(last, Action::Continue, "the answer is let go");
        } else {
            assert!(self.host.stream(ctx).reply.is_some(), "answered locally");
        }
        driver::stream_done(&self.host, &self.state, ctx);
        self.host.edit(ctx, |s| s.gone = true);
        self.process.advance(Duration::from_millis(1));
    }

    /// The hostcalls of one more request (after a few to warm up), with the body `body(n)`.
    fn per_request(&self, body: impl Fn(u32) -> String) -> BTreeMap<&'static str, u64> {
        for n in 1..=4 {
            self.request(n, &body(n));
        }
        self.process.clear_hostcalls();
        self.request(5, &body(5));
        self.process.hostcalls()
    }
}

fn show(name: &str, calls: &BTreeMap<&'static str, u64>) -> u64 {
    let total: u64 = calls.values().sum();
    let list: Vec<String> = calls.iter().map(|(c, n)| format!("{c} {n}")).collect();
    println!("{name}: {total} hostcalls: {}", list.join(", "));
    total
}

/// A distinct, non-cacheable prompt passed through to the provider and its answer let go.
#[test]
fn pass_through_hostcalls() {
    let w = Worker::new();
    let calls = w.per_request(|n| chat(&format!("prompt {n}"), "0.7"));
    let total = show("pass-through", &calls);
    // Reading the two bodies is two; the rest is what unbusy adds (20 before issue 13; 16
    // before issue 15 added `gen_ai_client_operation_duration_milliseconds`, one record).
    assert!(total <= 17, "{calls:?}");
}

/// The same cacheable prompt, answered from the shared cache.
#[test]
fn cache_hit_hostcalls() {
    let w = Worker::new();
    let calls = w.per_request(|_| chat("same", "0"));
    assert!(w.host.stream(5).reply.is_some(), "served from the cache");
    let total = show("cache hit", &calls);
    // (10 before issue 15's GenAI duration histogram.)
    assert!(total <= 11, "{calls:?}");
}
