//! Response bytes as the hosts read them: status, headers (retry hints in every form), the
//! body's first bytes (classification), and the stream (progress detection across any chunk
//! split). Nothing may panic, progress must not depend on how the bytes were split, a 2xx
//! holding a real answer is a success (never busy), one holding only keep-alive bytes a stall,
//! and a caller error (4xx other than 408, 409, 429) is never retried unless its body says
//! the provider is overloaded. The answer judge (`answer::assess`) never calls anything but a
//! complete, readable answer cacheable, agrees with the stream tracker however the stream is
//! split, and never calls an encoded body valid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unbusy_core::answer::{assess, judge as judge_answer, DoneTracker, Verdict};
use unbusy_core::classify::{
    classify, retry_hint, BodyProgress, OutcomeClass, Response, TransportFault,
};
use unbusy_core::progress::{Framing, ProgressDetector};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let status = u16::from_le_bytes([data[0], data[1]]) % 700;
    let split = usize::from(data[2]);
    let rest = &data[3..];
    // Headers: the first line of the input, as "name: value" pairs separated by ';'.
    let text = String::from_utf8_lossy(rest);
    let first_line = text.lines().next().unwrap_or("");
    let headers: Vec<(&str, &str)> = first_line
        .split(';')
        .filter_map(|h| h.split_once(':'))
        .map(|(n, v)| (n.trim(), v.trim()))
        .collect();
    let _ = retry_hint(&headers, Some(1_800_000_000));
    let _ = retry_hint(&headers, None);
    let judge = |status: u16, body: &[u8], progress: BodyProgress| {
        classify(&Response {
            status,
            headers: &headers,
            body_prefix: body,
            progress,
            unix_now_s: Some(1_800_000_000),
        })
    };
    for progress in [BodyProgress::Real, BodyProgress::KeepAliveOnly] {
        let c = judge(status, rest, progress);
        match status {
            // Caller errors are final: never retried. (408 and 409 are the server's, 429 a rate
            // limit.) The one documented exception: an overload body on any error status is
            // busy, and then the same body says so on a 500 too.
            400..=499 if !matches!(status, 408 | 409 | 429) => {
                if c.class.is_retryable() {
                    assert_eq!(c.class, OutcomeClass::Busy, "{status} retryable: {c:?}");
                    assert_eq!(
                        judge(500, rest, progress).class,
                        OutcomeClass::Busy,
                        "{status} busy for a body that is not an overload body"
                    );
                } else {
                    assert!(
                        matches!(c.class, OutcomeClass::CallerError(_)),
                        "{status}: {c:?}"
                    );
                }
            }
            // Any 2xx with real progress: a success, or busy in disguise, and only if its body
            // is an object (an error object saying "overloaded").
            200..=299 if progress == BodyProgress::Real => {
                let start = rest.trim_ascii_start();
                let start = start
                    .strip_prefix(b"data:")
                    .unwrap_or(start)
                    .trim_ascii_start();
                match c.class {
                    OutcomeClass::Success => {}
                    OutcomeClass::Busy => assert!(start.starts_with(b"{"), "{status} busy: {c:?}"),
                    other => panic!("{status} with real progress: {other:?}"),
                }
            }
            200..=299 => {
                assert_eq!(
                    c.class,
                    OutcomeClass::Transport(TransportFault::Stall),
                    "{status} with only keep-alive bytes"
                );
            }
            _ => {}
        }
    }
    // A 2xx carrying a real answer (a chat completion, or a stream of chunks) is a success,
    // whatever its content says: a model may well write "server overloaded" or `"error"`.
    let content = serde_json::Value::String(text.chars().take(200).collect()).to_string();
    let whole = format!(
        r#"{{"id":"chatcmpl-1","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":{content}}}}}]}}"#
    );
    let chunk = format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{content}}}}}]}}\n\ndata: [DONE]\n\n"
    );
    let ok_status = 200 + status % 100;
    for body in [whole.as_bytes(), chunk.as_bytes()] {
        let c = judge(ok_status, body, BodyProgress::Real);
        assert_eq!(
            c.class,
            OutcomeClass::Success,
            "{ok_status} {c:?} for {}",
            String::from_utf8_lossy(body)
        );
    }
    for framing in [Framing::Sse, Framing::Json] {
        let mut whole = ProgressDetector::new(framing, 0);
        whole.feed(1, rest);
        let mut parts = ProgressDetector::new(framing, 0);
        let at = split.min(rest.len());
        parts.feed(1, &rest[..at]);
        parts.feed(1, &rest[at..]);
        assert_eq!(
            whole.time_to_first_progress().is_some(),
            parts.time_to_first_progress().is_some(),
            "progress must not depend on chunking"
        );
    }
    // The answer judge, on the raw bytes as a body under each content type and encoding.
    for content_type in [
        Some("application/json"),
        Some("text/event-stream"),
        Some("text/html"),
        None,
    ] {
        for encoding in [None, Some("gzip")] {
            let v = judge_answer(content_type, encoding, rest);
            if encoding.is_some() {
                assert_eq!(v, Verdict::Unreadable);
            }
            let mut h: Vec<(&str, &str)> = Vec::new();
            if let Some(ct) = content_type {
                h.push(("content-type", ct));
            }
            if let Some(e) = encoding {
                h.push(("content-encoding", e));
            }
            let a = assess(200, &h, rest, Some(1_800_000_000));
            if a.cacheable {
                assert_eq!(v, Verdict::Valid, "cacheable but {v:?}");
                assert_eq!(a.classification.class, OutcomeClass::Success);
            }
            if content_type == Some("text/event-stream") && encoding.is_none() {
                let mut whole = DoneTracker::new();
                whole.feed(rest);
                whole.feed(b"\n");
                let mut parts = DoneTracker::new();
                let at = split.min(rest.len());
                parts.feed(&rest[..at]);
                parts.feed(&rest[at..]);
                parts.feed(b"\n");
                assert_eq!(
                    whole.complete(),
                    parts.complete(),
                    "[DONE] must not depend on chunking"
                );
            }
        }
        let a = assess(status, &[], rest, None);
        if !(200..=299).contains(&status) {
            assert!(!a.cacheable, "{status} cacheable");
        }
    }
});
