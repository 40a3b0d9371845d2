//! The busy-provider emulator over real sockets: every fault it offers, as a client sees it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use unbusy_core::progress::{Feed, Framing, ProgressDetector};
use unbusy_tests::emulator::{accepts_gzip, start, AnswerShape, Behaviour, HTML_502, OVERLOAD_200};
use unbusy_tests::harness::{request, Reply};
use unbusy_tests::scenario::{FaultWindow, Latency, Provider};

/// One request through the harness client, with the test key and a JSON content type.
async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<Reply, String> {
    let headers = [
        ("content-type", "application/json"),
        ("authorization", "Bearer test-key"),
    ];
    request(addr, method, path, &headers, body.to_string()).await
}

fn fast(faults: Vec<FaultWindow>) -> Behaviour {
    Behaviour {
        provider: Provider {
            name: "emu".into(),
            latency_ms: Latency {
                first_token: [20.0, 40.0],
                total: [60.0, 100.0],
            },
            faults,
            ..Provider::default()
        },
        keepalive_every: Duration::from_millis(50),
        ..Behaviour::default()
    }
}

fn always(f: FaultWindow) -> Vec<FaultWindow> {
    vec![FaultWindow {
        from_s: 0.0,
        to_s: 1e9,
        ..f
    }]
}

const CHAT: &str =
    r#"{"model":"deepseek-chat","max_tokens":77,"messages":[{"role":"user","content":"hello"}]}"#;
const CHAT_STREAM: &str = r#"{"model":"deepseek-chat","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hello"}]}"#;

fn json_of(r: &Reply) -> Value {
    serde_json::from_slice(r.body.as_ref().unwrap()).unwrap()
}

#[tokio::test]
async fn answers_like_an_openai_compatible_provider() {
    let (emu, addr) = start(fast(vec![]), 1, "127.0.0.1:0").await.unwrap();
    let r = call(addr, "POST", "/v1/chat/completions", CHAT)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["x-busy-provider"], "emu");
    let v = json_of(&r);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "deepseek-chat");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("hello"));
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);

    let r = call(addr, "POST", "/v1/chat/completions", CHAT_STREAM)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = String::from_utf8(r.body.unwrap().to_vec()).unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let usage = events[events.len() - 2];
    assert!(usage.contains("\"usage\""), "{usage}");
    let content: String = events[..events.len() - 2]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e.strip_prefix("data: ").unwrap()).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert!(content.contains("hello"), "{content}");

    let r = call(addr, "GET", "/v1/models", "").await.unwrap();
    assert_eq!(json_of(&r)["object"], "list");

    let stats = emu.stats();
    assert_eq!((stats.attempts, stats.ok), (2, 2));
    assert_eq!(stats.recent[0].max_tokens, Some(77));
    assert_eq!(
        stats.recent[0].authorization.as_deref(),
        Some("Bearer test-key")
    );
}

#[tokio::test]
async fn malformed_requests_get_openai_shaped_400s() {
    let (emu, addr) = start(fast(vec![]), 1, "127.0.0.1:0").await.unwrap();
    for body in [
        "{not json",
        "[1,2]",
        r#"{"model":"m"}"#,
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
        r#"{"model":"m","messages":[]}"#,
        r#"{"model":"m","stream":"yes","messages":[{"role":"user","content":"x"}]}"#,
    ] {
        let r = call(addr, "POST", "/v1/chat/completions", body)
            .await
            .unwrap();
        assert_eq!(r.status, 400, "{body}");
        let v = json_of(&r);
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        assert!(v["error"]["message"].as_str().unwrap().len() > 5);
    }
    let huge = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(5 << 20)
    );
    let r = call(addr, "POST", "/v1/chat/completions", &huge)
        .await
        .unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(emu.stats().malformed_400, 7);
    assert_eq!(emu.stats().attempts, 0);
}

#[tokio::test]
async fn error_faults_carry_the_bodies_and_hints_real_providers_send() {
    let cases = [
        (
            FaultWindow {
                busy_503: 1.0,
                ..Default::default()
            },
            503,
            None,
            "overloaded",
        ),
        (
            FaultWindow {
                error_500: 1.0,
                ..Default::default()
            },
            500,
            None,
            "server had an error",
        ),
        (
            FaultWindow {
                rate_limit_429: 1.0,
                retry_after_s: 3.0,
                ..Default::default()
            },
            429,
            Some("3"),
            "Rate limit",
        ),
        (
            FaultWindow {
                rate_limit_429: 1.0,
                retry_after_s: 0.0,
                ..Default::default()
            },
            429,
            None,
            "Rate limit",
        ),
        (
            FaultWindow {
                outage: true,
                ..Default::default()
            },
            503,
            None,
            "overloaded",
        ),
    ];
    for (fault, status, retry_after, phrase) in cases {
        let (emu, addr) = start(fast(always(fault)), 1, "127.0.0.1:0").await.unwrap();
        let r = call(addr, "POST", "/v1/chat/completions", CHAT)
            .await
            .unwrap();
        assert_eq!(r.status, status);
        assert_eq!(
            r.headers.get("retry-after").map(|v| v.to_str().unwrap()),
            retry_after
        );
        let v = json_of(&r);
        assert!(
            v["error"]["message"].as_str().unwrap().contains(phrase),
            "{v}"
        );
        let s = emu.stats();
        assert_eq!(
            s.busy_503 + s.error_500 + s.rate_limit_429 + s.rate_limit_429_bare,
            1
        );
        // The answer is classified as unbusy will classify it.
        let class = unbusy_core::classify::classify(&unbusy_core::classify::Response {
            status,
            headers: &[],
            body_prefix: r.body.as_ref().unwrap(),
            progress: Default::default(),
            unix_now_s: None,
        });
        assert!(class.class.is_retryable(), "{status} {class:?}");
    }
}

#[tokio::test]
async fn a_stall_sends_only_keepalive_then_breaks_the_connection() {
    for (body, framing) in [(CHAT_STREAM, Framing::Sse), (CHAT, Framing::Json)] {
        let fault = FaultWindow {
            stall: 1.0,
            stall_s: 0.5,
            ..Default::default()
        };
        let (emu, addr) = start(fast(always(fault)), 1, "127.0.0.1:0").await.unwrap();
        let started = Instant::now();
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::post("/v1/chat/completions")
            .header("host", "e")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut detector = ProgressDetector::new(framing, 0);
        let mut body = resp.into_body();
        let mut chunks = 0;
        let end = loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        chunks += 1;
                        assert_eq!(detector.feed(0, &data), Feed::KeepAlive, "{data:?}");
                    }
                }
                Some(Err(e)) => break Err(e.to_string()),
                None => break Ok(()),
            }
        };
        assert!(end.is_err(), "the body must end broken, not complete");
        assert!(chunks >= 5, "keep-alive every 50 ms for 0.5 s: {chunks}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
        assert_eq!(emu.stats().stalls, 1);
    }
}

#[tokio::test]
async fn a_reset_gets_no_response_at_all() {
    let fault = FaultWindow {
        reset: 1.0,
        ..Default::default()
    };
    let (emu, addr) = start(fast(always(fault)), 1, "127.0.0.1:0").await.unwrap();
    let r = call(addr, "POST", "/v1/chat/completions", CHAT).await;
    assert!(r.is_err(), "expected a broken connection");
    assert_eq!(emu.stats().resets, 1);
}

#[tokio::test]
async fn a_concurrency_quota_answers_429_above_it() {
    let mut b = fast(vec![]);
    b.provider.capacity = 3;
    b.provider.latency_ms = Latency {
        first_token: [300.0, 300.0],
        total: [400.0, 400.0],
    };
    let (emu, addr) = start(b, 1, "127.0.0.1:0").await.unwrap();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(async move { call(addr, "POST", "/v1/chat/completions", CHAT).await })
        })
        .collect();
    let mut statuses = Vec::new();
    let mut hinted = 0;
    for c in calls {
        let r = c.await.unwrap().unwrap();
        statuses.push(r.status);
        hinted += usize::from(r.headers.contains_key("retry-after"));
    }
    statuses.sort();
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    assert_eq!(hinted, 0, "a quota 429 carries no Retry-After");
    let s = emu.stats();
    assert_eq!((s.capacity_429, s.max_in_flight, s.in_flight), (2, 3, 0));
}

#[tokio::test]
async fn behaviour_can_be_replaced_at_run_time() {
    let (_emu, addr) = start(fast(vec![]), 1, "127.0.0.1:0").await.unwrap();
    let control = json!({"faults": [{"from_s": 0, "to_s": 1e9, "busy_503": 1.0}]}).to_string();
    let r = call(addr, "PUT", "/control", &control).await.unwrap();
    assert_eq!(r.status, 200);
    let r = call(addr, "POST", "/v1/chat/completions", CHAT)
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    let r = call(addr, "PUT", "/control", "{\"faults\": 3}")
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let r = call(addr, "POST", "/stats/reset", "").await.unwrap();
    assert_eq!(r.status, 200);
    let r = call(addr, "GET", "/stats", "").await.unwrap();
    assert_eq!(json_of(&r)["attempts"], 0);
}

#[test]
fn the_binary_reads_a_scenario_provider_and_refuses_bad_flags() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let exe = env!("CARGO_BIN_EXE_busy-provider");
    let scenario = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scenarios/shared/failover.json"
    );
    let mut child = Command::new(exe)
        .args(["--scenario", scenario, "--provider", "backup"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        line.starts_with("busy-provider backup listening on http://127.0.0.1:"),
        "{line}"
    );

    for bad in [
        vec!["--busy-503", "2"],
        vec!["--scenario", scenario, "--provider", "nope"],
        vec!["--scenario", scenario],
        vec!["--frobnicate"],
        vec!["--total-ms", "9,3"],
        vec!["--answer", "nope"],
    ] {
        let out = Command::new(exe).args(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("busy-provider: "), "{bad:?}: {err}");
    }
}

/// One request with extra headers (after the test key and JSON content type).
async fn call_with(addr: SocketAddr, body: &str, extra: &[(&str, &str)]) -> Reply {
    let mut headers = vec![
        ("content-type", "application/json"),
        ("authorization", "Bearer test-key"),
    ];
    headers.extend_from_slice(extra);
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.to_string(),
    )
    .await
    .unwrap()
}

fn shaped(shape: AnswerShape) -> Behaviour {
    Behaviour {
        answer: shape,
        ..fast(vec![])
    }
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn sse_events(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect()
}

#[tokio::test]
async fn answer_shapes_send_the_bad_answers_real_providers_send() {
    // truncated_json: a cut-off completion with a correct content-length; a stream without [DONE].
    let (emu, addr) = start(shaped(AnswerShape::TruncatedJson), 1, "127.0.0.1:0")
        .await
        .unwrap();
    let r = call_with(addr, CHAT, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    let body = r.body.as_ref().unwrap();
    assert_eq!(r.headers["content-length"], body.len().to_string().as_str());
    assert!(r.text().starts_with("{\"choices\":[{"), "{}", r.text());
    assert!(
        serde_json::from_slice::<Value>(body).is_err(),
        "not cut: {}",
        r.text()
    );
    let r = call_with(addr, CHAT_STREAM, &[]).await;
    let text = r.text();
    assert!(text.contains("\"finish_reason\":\"stop\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert_eq!(emu.stats().truncated_json, 2);

    // html_200: a gateway's page as a success, stream or not.
    let (emu, addr) = start(shaped(AnswerShape::Html200), 1, "127.0.0.1:0")
        .await
        .unwrap();
    for body in [CHAT, CHAT_STREAM] {
        let r = call_with(addr, body, &[]).await;
        assert_eq!((r.status, r.text().as_str()), (200, HTML_502));
        assert_eq!(r.headers["content-type"], "text/html");
    }
    assert_eq!((emu.stats().html_200, emu.stats().ok), (2, 0));

    // sse_no_done: every chunk, a clean end, no [DONE]; a non-stream answer is normal.
    let (emu, addr) = start(shaped(AnswerShape::SseNoDone), 1, "127.0.0.1:0")
        .await
        .unwrap();
    let r = call_with(addr, CHAT_STREAM, &[]).await;
    assert!(r.body.is_ok(), "the stream must end cleanly: {:?}", r.body);
    let text = r.text();
    let events = sse_events(&text);
    assert!(events.last().unwrap().contains("\"usage\""), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let r = call_with(addr, CHAT, &[]).await;
    assert_eq!(json_of(&r)["object"], "chat.completion");
    assert_eq!((emu.stats().sse_no_done, emu.stats().ok), (1, 1));

    // overload_200: DeepSeek's busy error as a 200 JSON body, stream or not.
    let (emu, addr) = start(shaped(AnswerShape::Overload200), 1, "127.0.0.1:0")
        .await
        .unwrap();
    for body in [CHAT, CHAT_STREAM] {
        let r = call_with(addr, body, &[]).await;
        assert_eq!((r.status, r.text().as_str()), (200, OVERLOAD_200));
        assert_eq!(r.headers["content-type"], "application/json");
    }
    assert_eq!(emu.stats().overload_200, 2);

    // retry_after_zero / retry_after_past: 429s whose hints mean "now".
    let (emu, addr) = start(shaped(AnswerShape::RetryAfterZero), 1, "127.0.0.1:0")
        .await
        .unwrap();
    let r = call_with(addr, CHAT, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "0");
    assert_eq!(r.headers["retry-after-ms"], "0");
    assert_eq!(json_of(&r)["error"]["type"], "rate_limit_error");
    assert_eq!(emu.stats().retry_after_zero, 1);
    let (emu, addr) = start(shaped(AnswerShape::RetryAfterPast), 1, "127.0.0.1:0")
        .await
        .unwrap();
    let r = call_with(addr, CHAT, &[]).await;
    assert_eq!(r.status, 429);
    let date = r.headers["retry-after"].to_str().unwrap().to_string();
    assert!(date.ends_with(" GMT") && date.len() == 29, "{date}");
    assert!(!r.headers.contains_key("retry-after-ms"));
    // One hour in the past, as unbusy's classifier reads it.
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let parsed = unbusy_core::classify::parse_http_date(&date);
    assert!(
        parsed.is_some_and(|t| t + 3590 <= now_s && t + 3610 >= now_s),
        "{date}: {parsed:?}"
    );
    assert_eq!(emu.stats().retry_after_past, 1);
}

#[tokio::test]
async fn the_answer_shape_is_set_with_put_control() {
    let (emu, addr) = start(fast(vec![]), 1, "127.0.0.1:0").await.unwrap();
    let control =
        json!({"latency_ms": {"first_token": [5, 5], "total": [10, 10]}, "answer": "html_200"});
    let r = call(addr, "PUT", "/control", &control.to_string())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(call_with(addr, CHAT, &[]).await.text(), HTML_502);
    // A control body replaces the whole behaviour: without "answer", normal again.
    let r = call(addr, "PUT", "/control", "{}").await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        json_of(&call_with(addr, CHAT, &[]).await)["object"],
        "chat.completion"
    );
    let r = call(addr, "PUT", "/control", r#"{"answer": "nope"}"#)
        .await
        .unwrap();
    assert_eq!(r.status, 400);
    let s = emu.stats();
    assert_eq!((s.html_200, s.ok), (1, 1));
}

#[test]
fn accept_encoding_allows_gzip_only_with_a_positive_q() {
    for (value, gzip) in [
        (None, false),
        (Some(""), false),
        (Some("identity"), false),
        (Some("gzip"), true),
        (Some("gzip, deflate"), true),
        (Some("gzip, deflate, br, zstd"), true),
        (Some("br;q=1.0, GZIP;q=0.5"), true),
        (Some("gzip;q=0"), false),
        (Some("gzip;q=0.000"), false),
        (Some("*"), true),
        (Some("*;q=0"), false),
        (Some("gzip;q=0, *"), false),
        (Some("deflate, *;q=0.1"), true),
        (Some("x-gzip"), true),
    ] {
        assert_eq!(accepts_gzip(value), gzip, "{value:?}");
    }
}

#[tokio::test]
async fn gzip_is_used_when_the_caller_accepts_it_and_only_then() {
    let (emu, addr) = start(fast(vec![]), 1, "127.0.0.1:0").await.unwrap();
    // JSON, as the official Python SDK asks for it.
    let r = call_with(addr, CHAT, &[("accept-encoding", "gzip, deflate")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-encoding"], "gzip");
    let raw = r.body.as_ref().unwrap();
    assert_eq!(r.headers["content-length"], raw.len().to_string().as_str());
    let v: Value = serde_json::from_slice(&gunzip(raw)).unwrap();
    assert_eq!(v["object"], "chat.completion");
    // Identity when not asked, or refused with q=0.
    for extra in [&[][..], &[("accept-encoding", "gzip;q=0, identity")][..]] {
        let r = call_with(addr, CHAT, extra).await;
        assert!(!r.headers.contains_key("content-encoding"), "{extra:?}");
        assert_eq!(json_of(&r)["object"], "chat.completion");
    }
    // Errors and shapes too.
    let control = json!({"faults": [{"from_s": 0, "to_s": 1e9, "busy_503": 1.0}]});
    call(addr, "PUT", "/control", &control.to_string())
        .await
        .unwrap();
    let r = call_with(addr, CHAT, &[("accept-encoding", "gzip")]).await;
    assert_eq!(
        (r.status, r.header("content-encoding")),
        (503, Some("gzip"))
    );
    let v: Value = serde_json::from_slice(&gunzip(r.body.as_ref().unwrap())).unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("overloaded"));
    let control =
        json!({"latency_ms": {"first_token": [5, 5], "total": [10, 10]}, "answer": "overload_200"});
    call(addr, "PUT", "/control", &control.to_string())
        .await
        .unwrap();
    let r = call_with(addr, CHAT, &[("accept-encoding", "gzip")]).await;
    assert_eq!(
        (r.status, r.header("content-encoding")),
        (200, Some("gzip"))
    );
    assert_eq!(gunzip(r.body.as_ref().unwrap()), OVERLOAD_200.as_bytes());
    let s = emu.stats();
    assert_eq!(s.gzip_answers, 3);
    let seen: Vec<Option<&str>> = s
        .recent
        .iter()
        .map(|r| r.accept_encoding.as_deref())
        .collect();
    assert_eq!(
        seen,
        [
            Some("gzip, deflate"),
            None,
            Some("gzip;q=0, identity"),
            Some("gzip"),
            Some("gzip")
        ]
    );
    assert!(
        s.recent.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "{:?}",
        s.recent
    );
}

#[tokio::test]
async fn a_gzip_stream_still_streams_event_by_event() {
    use std::io::Write;
    let mut b = fast(vec![]);
    b.provider.latency_ms = Latency {
        first_token: [50.0, 50.0],
        total: [600.0, 600.0],
    };
    let (emu, addr) = start(b, 1, "127.0.0.1:0").await.unwrap();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/v1/chat/completions")
        .header("host", "e")
        .header("accept-encoding", "gzip, deflate, br")
        .body(Full::new(Bytes::from(CHAT_STREAM)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-encoding"], "gzip");
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    let mut body = resp.into_body();
    let mut first_event_while_producing = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        decoder.write_all(&data).unwrap();
        decoder.flush().unwrap();
        if first_event_while_producing.is_none() && decoder.get_ref().ends_with(b"\n\n") {
            // The first event decoded from what arrived so far, while the answer is still
            // being produced: the compression did not hold it back.
            first_event_while_producing = Some(emu.stats().in_flight == 1);
        }
    }
    let text = String::from_utf8(decoder.finish().unwrap()).unwrap();
    assert_eq!(first_event_while_producing, Some(true));
    let events = sse_events(&text);
    assert!(events[0].starts_with("data: {"), "{text}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert_eq!(emu.stats().gzip_answers, 1);
}

#[tokio::test]
async fn always_gzip_ignores_what_the_caller_accepts() {
    let b = Behaviour {
        always_gzip: true,
        ..fast(vec![])
    };
    let (emu, addr) = start(b, 1, "127.0.0.1:0").await.unwrap();
    for (body, extra) in [
        (CHAT, &[][..]),
        (CHAT_STREAM, &[("accept-encoding", "identity")][..]),
    ] {
        let r = call_with(addr, body, extra).await;
        assert_eq!(r.headers["content-encoding"], "gzip", "{extra:?}");
        let text = String::from_utf8(gunzip(r.body.as_ref().unwrap())).unwrap();
        assert!(text.contains("[emu]"), "{text}");
    }
    assert_eq!(emu.stats().gzip_answers, 2);
    // GET /stats stays readable.
    let r = call(addr, "GET", "/stats", "").await.unwrap();
    assert!(!r.headers.contains_key("content-encoding"));
}
