//! Answer integrity end to end on real Envoy with the filter (built by `make filter`, or
//! `UNBUSY_WASM`), in front of busy-provider emulators sending the bad answers real providers
//! send: cut-off JSON, HTML error pages and overload errors as `200`, streams without
//! `data: [DONE]`, gzip the caller did or did not ask for, `Retry-After` hints that mean "now".
//!
//! The recorded-answer cases are `tests/answers/cases.json` (its README says what a case
//! means); the npm package's tests read the same file, so both hosts are held to one verdict.
//! Every case runs in a world of its own and all failures are reported together.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde::Deserialize;
use serde_json::{json, Value};
use std::net::SocketAddr;
use unbusy_tests::emulator::{accepts_gzip, AnswerShape, Behaviour};
use unbusy_tests::harness::{chat_body, request, Reply};
use unbusy_tests::scenario::Latency;
use unbusy_tests::world::{self, healthy, World};

/// One recorded-answer case (`tests/answers/cases.json`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    answer: AnswerShape,
    stream: bool,
    accept_encoding: Option<String>,
    expect: String,
    cached: bool,
    #[serde(default = "complete_by_default")]
    complete: bool,
}

fn complete_by_default() -> bool {
    true
}

fn cases() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/answers/cases.json");
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn case(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name:?} in cases.json"))
}

fn behaviour(name: &str, answer: AnswerShape) -> Behaviour {
    Behaviour {
        answer,
        ..healthy(name, [30.0, 60.0], [120.0, 200.0])
    }
}

/// The deadlines of `envoy_e2e.rs` (short, so a missed first token costs 1.5 s), with `extra`
/// merged over them.
fn test_config(extra: Value) -> Value {
    world::test_config(&extra)
}

async fn world(behaviours: Vec<Behaviour>, config: Value) -> World {
    World::start(behaviours, &config, 1).await.unwrap()
}

/// A chat/completions request with a JSON content type and `headers`.
async fn post(addr: SocketAddr, body: &str, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    request(addr, "POST", "/v1/chat/completions", &all, body.to_string())
        .await
        .unwrap()
}

fn x_unbusy(r: &Reply) -> String {
    r.header("x-unbusy").unwrap_or("").to_string()
}

fn is_hit(r: &Reply) -> bool {
    x_unbusy(r).contains("cache=hit")
}

fn short(text: &str) -> String {
    let t: String = text.chars().take(240).collect();
    if t.len() < text.len() {
        format!("{t}...")
    } else {
        t
    }
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip does not decode: {e}"))?;
    Ok(out)
}

/// The body as the caller's HTTP library would hand it over: decoded if it says gzip, an error
/// if it carries an encoding the caller did not accept (or the body was cut).
fn decoded(r: &Reply, accepted: Option<&str>) -> Result<String, String> {
    let raw = r
        .body
        .as_ref()
        .map_err(|e| format!("the body broke: {e}"))?;
    let bytes = match r.header("content-encoding").map(str::to_ascii_lowercase) {
        None => raw.to_vec(),
        Some(e) if e == "identity" => raw.to_vec(),
        Some(e) if e == "gzip" && accepts_gzip(accepted) => gunzip(raw)?,
        Some(e) => {
            return Err(format!(
                "content-encoding {e:?}, but the caller's accept-encoding was {accepted:?}"
            ))
        }
    };
    String::from_utf8(bytes).map_err(|_| "the body is not UTF-8".into())
}

/// The SSE events of `text` (comments and blank lines dropped).
fn sse_events(text: &str) -> Vec<String> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .map(str::to_string)
        .collect()
}

/// What the answer says: the message, or the streamed deltas joined; the text itself when it
/// is neither.
fn content(text: &str, stream: bool) -> String {
    if stream {
        let deltas: String = sse_events(text)
            .iter()
            .filter_map(|e| e.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        if !deltas.is_empty() {
            return deltas;
        }
    }
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| {
            v["choices"][0]["message"]["content"]
                .as_str()
                .map(String::from)
        })
        .unwrap_or_else(|| text.to_string())
}

/// A valid answer: 200 and a chat completion object with `choices`, or SSE whose every event
/// is JSON and whose last event is `data: [DONE]`.
fn validity(status: u16, text: &str, stream: bool) -> Result<(), String> {
    if status != 200 {
        return Err(format!("status {status}: {}", short(text)));
    }
    if !stream {
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON ({e}): {}", short(text)))?;
        return if v["choices"].is_array() {
            Ok(())
        } else {
            Err(format!("JSON without choices: {}", short(text)))
        };
    }
    let events = sse_events(text);
    if events.last().map(String::as_str) != Some("data: [DONE]") {
        return Err(format!(
            "the stream does not end with data: [DONE]: {}",
            short(text)
        ));
    }
    for e in &events[..events.len() - 1] {
        let data = e
            .strip_prefix("data:")
            .ok_or_else(|| format!("not an SSE data event: {}", short(e)))?;
        serde_json::from_str::<Value>(data.trim())
            .map_err(|err| format!("an event is not JSON ({err}): {}", short(e)))?;
    }
    Ok(())
}

/// Runs one case in a world of its own; the problems found (empty: the case holds) and a line
/// saying what happened.
async fn run_case(c: &Case) -> (Vec<String>, String) {
    let w = world(
        vec![
            behaviour("primary", c.answer),
            behaviour("backup", AnswerShape::Normal),
        ],
        test_config(json!({})),
    )
    .await;
    let mut problems = Vec::new();
    let body = chat_body(&format!("integrity case {}", c.name), c.stream, true);
    let mut headers = vec![("authorization", "Bearer caller-key")];
    if let Some(ae) = &c.accept_encoding {
        headers.push(("accept-encoding", ae.as_str()));
    }
    let first = post(w.envoy.listen, &body, &headers).await;
    let tag = format!("[{}]", c.expect);
    let mut first_content = None;
    match decoded(&first, c.accept_encoding.as_deref()) {
        Err(e) => problems.push(format!("first answer: {e}")),
        Ok(text) => {
            let said = content(&text, c.stream);
            if !said.contains(&tag) {
                problems.push(format!(
                    "first answer: expected {tag}'s answer, got (status {}): {}",
                    first.status,
                    short(&said)
                ));
            }
            if c.complete {
                if let Err(e) = validity(first.status, &text, c.stream) {
                    problems.push(format!("first answer invalid: {e}"));
                }
            }
            first_content = Some(said);
        }
    }
    let second = post(
        w.envoy.listen,
        &body,
        &[("authorization", "Bearer caller-key")],
    )
    .await;
    if c.cached {
        if !is_hit(&second) {
            problems.push(format!(
                "second request: not a cache hit (x-unbusy: {:?})",
                x_unbusy(&second)
            ));
        }
        match decoded(&second, None) {
            Err(e) => problems.push(format!("second answer: {e}")),
            Ok(text) => {
                if let Err(e) = validity(second.status, &text, c.stream) {
                    problems.push(format!("second answer invalid: {e}"));
                }
                let said = content(&text, c.stream);
                if first_content.as_deref().is_some_and(|f| f != said) {
                    problems.push(format!(
                        "second answer's content differs from the first's: {}",
                        short(&said)
                    ));
                }
            }
        }
    } else if is_hit(&second) {
        problems.push(format!(
            "second request: a cache hit of an answer that must not be cached (x-unbusy: {:?})",
            x_unbusy(&second)
        ));
    }
    let seen = format!(
        "first: {} {} x-unbusy {:?} content-encoding {:?}; second: {} x-unbusy {:?} \
         content-encoding {:?}; attempts primary {} backup {}; the primary saw accept-encoding \
         {:?} and sent {} gzip answers",
        first.status,
        first.header("content-type").unwrap_or("-"),
        x_unbusy(&first),
        first.header("content-encoding"),
        second.status,
        x_unbusy(&second),
        second.header("content-encoding"),
        w.providers[0].stats().attempts,
        w.providers[1].stats().attempts,
        w.providers[0]
            .stats()
            .recent
            .first()
            .and_then(|q| q.accept_encoding.clone()),
        w.providers[0].stats().gzip_answers,
    );
    (problems, seen)
}

/// Runs `cases`, prints each verdict, and fails with every problem at once.
async fn run_cases(cases: &[Case]) {
    let mut failed = Vec::new();
    for c in cases {
        let (problems, seen) = run_case(c).await;
        let verdict = if problems.is_empty() { "ok" } else { "FAIL" };
        println!("case {}: {verdict} ({seen})", c.name);
        for p in &problems {
            println!("  - {p}");
        }
        if !problems.is_empty() {
            failed.push(format!("{}:\n    {}", c.name, problems.join("\n    ")));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n  {}",
        failed.len(),
        cases.len(),
        failed.join("\n  ")
    );
}

#[test]
fn cases_json_holds_the_required_cases() {
    let all = cases();
    let mut names: Vec<&str> = all.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len(), "case names must be unique");
    for c in &all {
        assert!(
            c.expect == "primary" || c.expect == "backup",
            "{}: expect {:?}",
            c.name,
            c.expect
        );
        assert!(
            c.complete || !c.cached,
            "{}: an incomplete answer is never cached",
            c.name
        );
    }
    let has = |answer: AnswerShape, stream: bool, gzip: bool| {
        all.iter().any(|c| {
            c.answer == answer && c.stream == stream && c.accept_encoding.is_some() == gzip
        })
    };
    for (answer, stream, gzip) in [
        (AnswerShape::Normal, false, false),
        (AnswerShape::Normal, false, true),
        (AnswerShape::Normal, true, true),
        (AnswerShape::TruncatedJson, false, false),
        (AnswerShape::Html200, false, false),
        (AnswerShape::Html200, true, false),
        (AnswerShape::Overload200, false, false),
        (AnswerShape::Overload200, false, true),
        (AnswerShape::SseNoDone, true, false),
        (AnswerShape::SseNoDone, true, true),
    ] {
        assert!(
            has(answer, stream, gzip),
            "{answer:?} stream {stream} gzip {gzip}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recorded_answer_case_gets_its_verdict() {
    run_cases(&cases()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_gzip_answer_is_served_as_identity_to_a_caller_without_gzip() {
    run_cases(&[case("gzip_json"), case("gzip_sse")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_healthy_gzip_stream_is_delivered_in_one_attempt() {
    // First token at 200 ms, the whole answer over 4 s: far longer than the 1.5 s first-token
    // deadline, every event well within the 5 s stall deadline.
    let mut slow = behaviour("primary", AnswerShape::Normal);
    slow.provider.latency_ms = Latency {
        first_token: [200.0, 200.0],
        total: [4000.0, 4000.0],
    };
    let w = world(
        vec![slow, behaviour("backup", AnswerShape::Normal)],
        test_config(json!({})),
    )
    .await;
    let accepted = "gzip, deflate";
    let r = post(
        w.envoy.listen,
        &chat_body("a long gzip stream", true, false),
        &[
            ("authorization", "Bearer caller-key"),
            ("accept-encoding", accepted),
        ],
    )
    .await;
    let mut problems = Vec::new();
    let note = x_unbusy(&r);
    if !(note.contains("provider=primary") && note.contains("attempts=1")) {
        problems.push(format!("x-unbusy {note:?}, not the primary in one attempt"));
    }
    match decoded(&r, Some(accepted)) {
        Err(e) => problems.push(e),
        Ok(text) => {
            if let Err(e) = validity(r.status, &text, true) {
                problems.push(e);
            }
            if !content(&text, true).contains("[primary]") {
                problems.push(format!("not the primary's answer: {}", short(&text)));
            }
        }
    }
    let (p, b) = (
        w.providers[0].stats().attempts,
        w.providers[1].stats().attempts,
    );
    if (p, b) != (1, 0) {
        problems.push(format!(
            "attempts: primary {p}, backup {b}; expected 1 and 0"
        ));
    }
    assert!(
        problems.is_empty(),
        "status {} after {:?} (headers after {:?}), content-encoding {:?}:\n  {}",
        r.status,
        r.total,
        r.headers_after,
        r.header("content-encoding"),
        problems.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_hint_of_now_never_shortens_the_backoff() {
    // One provider, so every retry goes back to it: the gaps between its attempts are the
    // engine's waits (the 429s come 5 ms after arrival). No jitter, so each wait is exactly
    // base * 2^n without a hint, and a hint may only lengthen it.
    let base_ms = 100.0;
    let config = test_config(json!({
        "retry": {"max_attempts": 4, "base_ms": base_ms as u64, "cap_ms": 800, "jitter": "none"},
    }));
    let mut failed = Vec::new();
    for shape in [AnswerShape::RetryAfterZero, AnswerShape::RetryAfterPast] {
        let mut lone = behaviour("primary", shape);
        lone.provider.latency_ms = Latency {
            first_token: [5.0, 5.0],
            total: [10.0, 10.0],
        };
        let w = world(vec![lone], config.clone()).await;
        let r = post(
            w.envoy.listen,
            &chat_body(&format!("hint {}", shape.name()), false, false),
            &[("authorization", "Bearer caller-key")],
        )
        .await;
        let stats = w.providers[0].stats();
        let arrivals: Vec<f64> = stats.recent.iter().map(|q| q.at_ms).collect();
        let gaps: Vec<f64> = arrivals.windows(2).map(|p| p[1] - p[0]).collect();
        let shown: Vec<String> = gaps.iter().map(|g| format!("{g:.1} ms")).collect();
        println!(
            "{}: caller got {} (x-unbusy {:?}) after {} attempts, gaps {shown:?}",
            shape.name(),
            r.status,
            x_unbusy(&r),
            arrivals.len()
        );
        if arrivals.len() < 2 {
            failed.push(format!(
                "{}: never retried ({} attempt, caller got {})",
                shape.name(),
                arrivals.len(),
                r.status
            ));
        }
        let short_gaps: Vec<&String> = gaps
            .iter()
            .zip(&shown)
            .filter(|(g, _)| **g < base_ms)
            .map(|(_, s)| s)
            .collect();
        if !short_gaps.is_empty() {
            failed.push(format!(
                "{}: gaps between attempts shorter than retry.base_ms ({base_ms} ms): {short_gaps:?} of {shown:?}",
                shape.name()
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

/// Request headers.
type Headers = Vec<(&'static str, &'static str)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_header_never_reaches_another_callers_cache_entry() {
    let w = world(
        vec![behaviour("primary", AnswerShape::Normal)],
        test_config(json!({"tenancy": {"header": "x-tenant"}})),
    )
    .await;
    let mut problems = Vec::new();
    // (what is stored, by whom; then the callers who must not get it)
    let groups: [(&str, Headers, Vec<Headers>); 2] = [
        (
            "the key victim",
            vec![("authorization", "Bearer victim")],
            vec![
                vec![
                    ("x-tenant", "Bearer victim"),
                    ("authorization", "Bearer attacker"),
                ],
                vec![("x-tenant", "Bearer victim")],
            ],
        ),
        (
            "no key, no header",
            vec![],
            vec![
                vec![("x-tenant", "anonymous")],
                vec![
                    ("x-tenant", "anonymous"),
                    ("authorization", "Bearer attacker"),
                ],
            ],
        ),
    ];
    for (owner, owner_headers, others) in &groups {
        let body = chat_body(&format!("tenancy: {owner}"), false, true);
        let stored = post(w.envoy.listen, &body, owner_headers).await;
        assert_eq!(stored.status, 200, "{owner}: {}", stored.text());
        // The entry exists: its owner hits it (else the test would prove nothing).
        let again = post(w.envoy.listen, &body, owner_headers).await;
        assert!(
            is_hit(&again),
            "{owner}: its own repeat is not a hit ({:?}); the test proves nothing",
            x_unbusy(&again)
        );
        for h in others {
            let r = post(w.envoy.listen, &body, h).await;
            if is_hit(&r) {
                problems.push(format!(
                    "a caller with {h:?} got the cached answer of {owner} (x-unbusy {:?})",
                    x_unbusy(&r)
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_gzips_unasked_never_hands_the_caller_gzip() {
    // A provider (or a CDN in front of it) that gzips whatever `accept-encoding` says. The
    // caller asked for nothing: whoever answers, it gets valid identity, and a repeat from
    // the cache is valid identity too.
    let gzipping = Behaviour {
        always_gzip: true,
        ..behaviour("primary", AnswerShape::Normal)
    };
    let w = world(
        vec![gzipping, behaviour("backup", AnswerShape::Normal)],
        test_config(json!({})),
    )
    .await;
    let mut problems = Vec::new();
    for stream in [false, true] {
        let body = chat_body(&format!("gzip unasked {stream}"), stream, true);
        let headers = [("authorization", "Bearer caller-key")];
        for attempt in ["first", "repeat"] {
            let r = post(w.envoy.listen, &body, &headers).await;
            let verdict = decoded(&r, None).and_then(|text| validity(r.status, &text, stream));
            if let Err(e) = verdict {
                problems.push(format!(
                    "stream {stream}, {attempt} (x-unbusy {:?}): {e}",
                    x_unbusy(&r)
                ));
            }
        }
    }
    println!(
        "the primary sent {} gzip answers; attempts primary {} backup {}",
        w.providers[0].stats().gzip_answers,
        w.providers[0].stats().attempts,
        w.providers[1].stats().attempts
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_answer_to_a_request_that_did_not_stream_is_replayed_as_sse() {
    // A provider (or gateway) that streams whatever the request said: the cache keeps the
    // content type the answer came with, never the one the request's `stream` implied.
    let w = world(
        vec![behaviour("primary", AnswerShape::SseAlways)],
        test_config(json!({})),
    )
    .await;
    let body = chat_body("always streams", false, true);
    let first = post(w.envoy.listen, &body, &[]).await;
    let second = post(w.envoy.listen, &body, &[]).await;
    for (which, r) in [("first", &first), ("repeat", &second)] {
        assert_eq!(r.status, 200, "{which}: {}", short(&r.text()));
        assert!(
            r.header("content-type")
                .is_some_and(|ct| ct.starts_with("text/event-stream")),
            "{which}: content-type {:?}",
            r.header("content-type")
        );
        validity(r.status, &r.text(), true).unwrap_or_else(|e| panic!("{which}: {e}"));
    }
    assert!(is_hit(&second), "x-unbusy {:?}", x_unbusy(&second));
    assert_eq!(content(&first.text(), true), content(&second.text(), true));
    assert_eq!(w.providers[0].stats().attempts, 1);
}
