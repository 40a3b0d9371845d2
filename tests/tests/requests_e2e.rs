//! The per-request rules (`docs/requests.md`) on real Envoy with the filter (built by
//! `make filter`, or `UNBUSY_WASM`): the core's one reading of a request
//! (`unbusy_core::request::read`), the function the npm package calls too. The npm package's
//! `test/requests.test.mjs` sends the same requests and expects the same answers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::net::SocketAddr;
use unbusy_tests::harness::{raw_status, request, Reply};
use unbusy_tests::world::{healthy, test_config, World};

/// One fast provider behind Envoy, with `config` (the filter's JSON) over short deadlines.
async fn world(config: Value) -> World {
    let primary = healthy("primary", [30.0, 60.0], [120.0, 200.0]);
    World::start(vec![primary], &test_config(&config), 1)
        .await
        .unwrap()
}

/// A chat/completions request with a JSON content type, the caller's key and `headers`.
async fn post(addr: SocketAddr, body: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![
        ("content-type", "application/json"),
        ("authorization", "Bearer caller"),
    ];
    all.retain(|(n, _)| !headers.iter().any(|(h, _)| h == n));
    all.extend_from_slice(headers);
    request(addr, "POST", "/v1/chat/completions", &all, body.to_string())
        .await
        .unwrap()
}

fn chat(content: &str, temperature: f64) -> String {
    json!({"model": "deepseek-chat", "messages": [{"role": "user", "content": content}],
           "temperature": temperature})
    .to_string()
}

fn note(r: &Reply) -> String {
    r.header("x-unbusy").unwrap_or("").to_string()
}

/// One Chinese prompt, written as a JS client writes it (raw UTF-8: 142 bytes) and as Python's
/// json.dumps does (escaped, with spaces). Either is charged ceil(142 / 4) + max_tokens tokens:
/// 37 with max_tokens 1. (The same strings as the npm package's test.)
fn raw(max_tokens: u32) -> String {
    format!(
        r#"{{"model":"deepseek-chat","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"请用三句话介绍长城，并说明它为什么重要。"}}]}}"#
    )
}

fn escaped(max_tokens: u32) -> String {
    format!(
        r#"{{"model": "deepseek-chat", "max_tokens": {max_tokens}, "messages": [{{"role": "user", "content": "\u8bf7\u7528\u4e09\u53e5\u8bdd\u4ecb\u7ecd\u957f\u57ce\uff0c\u5e76\u8bf4\u660e\u5b83\u4e3a\u4ec0\u4e48\u91cd\u8981\u3002"}}]}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chinese_prompt_is_charged_37_tokens_raw_or_escaped_as_in_js() {
    // A bucket of exactly 37 tokens per tenant, refilled at one a second: 37 fits, 38 never does.
    let w = world(json!({"limits": {"per_tenant": {"tokens_per_minute": 60, "burst_tokens": 37}}}))
        .await;
    let cases = [
        ("raw, max_tokens 1", raw(1), 200),
        ("raw, max_tokens 2", raw(2), 413),
        ("escaped, max_tokens 1", escaped(1), 200),
        ("escaped, max_tokens 2", escaped(2), 413),
    ];
    for (i, (what, body, status)) in cases.iter().enumerate() {
        let key = format!("Bearer tenant-{i}");
        let r = post(w.envoy.listen, body, &[("authorization", &key)]).await;
        assert_eq!(r.status, *status, "{what}: {}", r.text());
    }
    // The bucket a 37-token request emptied refuses the next one with a 429.
    let again = post(
        w.envoy.listen,
        &escaped(1),
        &[("authorization", "Bearer tenant-0")],
    )
    .await;
    assert_eq!(again.status, 429, "{}", again.text());
    assert_eq!(w.providers[0].stats().attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_unbusy_cache_always_caches_a_sampled_request_never_keeps_a_deterministic_one_out() {
    let w = world(json!({})).await;
    let sampled = chat("sampled", 0.7);
    for expected in ["cache=miss", "cache=hit"] {
        let r = post(w.envoy.listen, &sampled, &[("x-unbusy-cache", "always")]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(note(&r).contains(expected), "{}", note(&r));
    }
    // Without the opt-in a sampled request is not cached; with `never`, a deterministic one is
    // not.
    let plain = post(w.envoy.listen, &chat("sampled too", 0.7), &[]).await;
    assert!(note(&plain).contains("cache=none"), "{}", note(&plain));
    let deterministic = chat("deterministic", 0.0);
    for _ in 0..2 {
        let r = post(
            w.envoy.listen,
            &deterministic,
            &[("x-unbusy-cache", "NEVER")],
        )
        .await;
        assert!(note(&r).contains("cache=none"), "{}", note(&r));
    }
    assert_eq!(w.providers[0].stats().attempts, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_request_header_value_it_does_not_define_is_a_400_naming_the_header_sent_nowhere() {
    let w = world(json!({})).await;
    let body = chat("hi", 1.0);
    for (name, value, says) in [
        (
            "x-unbusy-priority",
            "urgent",
            r#"x-unbusy-priority must be low, normal or high, not "urgent""#,
        ),
        (
            "x-unbusy-cache",
            "force",
            r#"x-unbusy-cache must be always, never or default, not "force""#,
        ),
        (
            "x-unbusy-deadline-ms",
            "1.5",
            r#"x-unbusy-deadline-ms must be a whole number of milliseconds, at least 1, not "1.5""#,
        ),
        (
            "x-unbusy-deadline-ms",
            "0",
            r#"x-unbusy-deadline-ms must be a whole number of milliseconds, at least 1, not "0""#,
        ),
    ] {
        let r = post(w.envoy.listen, &body, &[(name, value)]).await;
        assert_eq!(r.status, 400, "{name}: {value}: {}", r.text());
        assert_eq!(note(&r), "refused=bad_request");
        assert_eq!(r.header("x-should-retry"), Some("false"));
        let error = &r.json()["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["message"], says);
    }
    // A header given twice is one list, as fetch's Headers joins it in the npm package.
    let r = post(
        w.envoy.listen,
        &body,
        &[("x-unbusy-priority", "low"), ("x-unbusy-priority", "high")],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["error"]["message"],
        r#"x-unbusy-priority must be low, normal or high, not "low, high""#
    );
    // A body that is not a JSON object: the same messages the npm package gives.
    let r = post(w.envoy.listen, r#"{"model":"#, &[]).await;
    assert_eq!(r.status, 400);
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.starts_with("the request body is not valid JSON: ")
            && message.ends_with(" at byte 9"),
        "{message}"
    );
    let r = post(w.envoy.listen, "[1]", &[]).await;
    assert_eq!(
        r.json()["error"]["message"],
        "the request body must be a JSON object"
    );
    // A value with a byte that is not UTF-8 is read lossily, and is no keyword either.
    let raw = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-unbusy-priority: \xfe\r\ncontent-length: 57\r\nconnection: close\r\n\r\n{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}";
    assert_eq!(raw_status(w.envoy.listen, raw).await.unwrap(), 400);
    // Valid values, any case, and empty ones (no header) go through.
    for headers in [
        [("x-unbusy-priority", "High")],
        [("x-unbusy-cache", "")],
        [("x-unbusy-deadline-ms", "5000")],
    ] {
        let r = post(w.envoy.listen, &chat("fine", 1.0), &headers).await;
        assert_eq!(r.status, 200, "{headers:?}: {}", r.text());
    }
    assert_eq!(w.providers[0].stats().attempts, 3);
}
