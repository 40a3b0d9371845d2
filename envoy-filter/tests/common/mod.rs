//! What the filter's native tests share: the fake clock's start, a provider's answer, and a
//! worker (a fake host over a fake Envoy process, and the filter's state for it).

#![allow(dead_code, clippy::unwrap_used)]

use proxy_wasm::types::Action;
use std::cell::RefCell;
use std::rc::Rc;
use unbusy_core::config::Config;
use unbusy_envoy::driver::{self, Shared};
use unbusy_envoy::fake::{FakeHost, FakeProcess};
use unbusy_envoy::state::State;

/// The fake processes' clock at start (ns).
pub const T0: u64 = 1_700_000_000_000_000_000;

/// A provider's complete, valid answer.
pub const ANSWER: &str = r#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}]}"#;

/// A worker of `process`: its host, and the filter's state configured by `config` (JSON) with
/// the randomness seeded by `seed`.
pub fn worker(process: &Rc<FakeProcess>, config: &str, seed: u64) -> (FakeHost, Shared<FakeHost>) {
    let host = FakeHost::worker(process);
    let config = Config::from_json(config.as_bytes()).unwrap();
    let state = State::new(host.clone(), config, seed).unwrap();
    (host, Rc::new(RefCell::new(state)))
}

/// A caller's chat request on stream `ctx` as Envoy calls the filter: the usual headers with
/// `authorization`, held for its body (asserted), then the whole `body`. Returns the body
/// callback's answer: `Continue` when the request went on to the router, `Pause` when it is
/// held or answered locally.
pub fn chat_request(
    host: &FakeHost,
    state: &Shared<FakeHost>,
    ctx: u32,
    authorization: &str,
    body: &str,
) -> Action {
    host.open(
        ctx,
        &[
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            (":authority", "proxy"),
            ("authorization", authorization),
            ("content-type", "application/json"),
        ],
    );
    host.call_into(ctx);
    assert_eq!(
        driver::request_headers(host, state, ctx, false),
        Action::Pause,
        "a managed request is held for its body"
    );
    host.edit(ctx, |s| s.request_body = body.as_bytes().to_vec());
    driver::request_body(host, state, ctx, body.len(), true)
}
