//! The filter's pass-through path natively, over the fake host, for a profiler:
//! `valgrind --tool=callgrind target/release/examples/hot_path [requests] [hit]` counts the
//! instructions of each function (deterministically), which is how the per-request work was
//! found and taken out (BENCHMARKS.md). With `hit`, the same cacheable prompt every time (the
//! cache-hit path) instead of distinct non-cacheable ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use unbusy_core::config::Config;
use unbusy_envoy::driver;
use unbusy_envoy::fake::{FakeHost, FakeProcess};
use unbusy_envoy::state::State;

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"deepseek-chat","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#;

fn main() {
    let mut args = std::env::args().skip(1);
    let requests: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let hit = args.next().as_deref() == Some("hit");
    let process = FakeProcess::new(1_700_000_000_000_000_000);
    let host = FakeHost::worker(&process);
    let config = Config::from_json(
        br#"{"providers":[{"name":"fast","base_url":"http://127.0.0.1:10001","cluster":"unbusy_fast","priority":0}]}"#,
    )
    .unwrap();
    let state = Rc::new(RefCell::new(State::new(host.clone(), config, 1).unwrap()));
    let headers = [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "bench"),
        (":scheme", "http"),
        ("authorization", "Bearer bench"),
        ("content-type", "application/json"),
        ("content-length", "120"),
        ("x-request-id", "0f3c2b1a-0000-4000-8000-000000000000"),
        ("x-forwarded-proto", "http"),
    ];
    let mut served = 0u32;
    for n in 1..=requests {
        let body = if hit {
            r#"{"model":"deepseek-chat","stream":false,"temperature":0.0,"messages":[{"role":"user","content":"benchmark"}]}"#.to_string()
        } else {
            format!(
                r#"{{"model":"deepseek-chat","stream":false,"temperature":0.7,"messages":[{{"role":"user","content":"benchmark 0 {n}"}}]}}"#
            )
        };
        host.open(n, &headers);
        host.call_into(n);
        driver::request_headers(&host, &state, n, false);
        host.edit(n, |s| s.request_body = body.as_bytes().to_vec());
        let action = driver::request_body(&host, &state, n, body.len(), true);
        if action == proxy_wasm::types::Action::Continue {
            host.edit(n, |s| {
                s.response_headers = vec![
                    (":status".into(), "200".into()),
                    ("content-type".into(), "application/json".into()),
                    ("content-length".into(), ANSWER.len().to_string()),
                    ("date".into(), "Thu, 03 Dec 2026 11:00:00 GMT".into()),
                    ("server".into(), "envoy".into()),
                ];
            });
            driver::response_headers(&host, &state, n, n, false);
            host.edit(n, |s| s.response_body = ANSWER.as_bytes().to_vec());
            driver::response_body(&host, &state, n, n, ANSWER.len(), true);
        } else {
            served += 1;
        }
        driver::stream_done(&host, &state, n);
        host.edit(n, |s| *s = Default::default());
        host.edit(n, |s| s.gone = true);
        process.advance(Duration::from_micros(100));
        if n % 200 == 0 {
            driver::tick(&host, &state);
        }
    }
    println!("{requests} requests, {served} answered locally");
}
