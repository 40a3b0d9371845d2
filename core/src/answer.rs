//! Whether a complete answer is one, before it is delivered as a success, cached or counted.
//!
//! A status says little: providers and the gateways in front of them answer `200` with a
//! truncated body that ends cleanly, an HTML error page, an error object, or an SSE stream that
//! stops without `data: [DONE]`. Passed on as successes, these fail the caller's SDK, and
//! cached, they fail every later caller for the cache's whole lifetime. So every host hands the
//! complete answer (a non-streaming answer is held whole anyway; a stream is judged when it
//! ends) to [`judge`], one rule for all of them:
//!
//! - **only what can be read is judged**: an answer with a `content-encoding` other than
//!   `identity` cannot be read as text (hosts ask providers for `identity`; see
//!   [`MANAGED_ACCEPT_ENCODING`]); it is [`Verdict::Unreadable`]: passed on as one plain attempt
//!   would pass it, never cached, never judged as text;
//! - **SSE** (`text/event-stream`) is complete when its last `data:` event is `[DONE]`;
//! - **JSON** (`application/json`, or no content type) is an answer when it parses, with the
//!   core's strict reader, as an object with `choices` (chat completions, completions) or
//!   `data` (embeddings, models); an error object is the provider's error, not an answer;
//! - **anything else** (an HTML page, plain text) is not an answer.
//!
//! A [`Verdict::Invalid`] answer counts as a server error: retried or failed over like any
//! other, so the caller never sees it as a success and the cache never holds it.

use crate::classify::{
    classify, classify_fault, header, BodyProgress, Classification, OutcomeClass, Response,
    TransportFault,
};
use crate::json::{self, Value};
use crate::progress::{Feed, Framing, ProgressDetector};

/// The `accept-encoding` hosts send providers for managed requests: an answer unbusy must
/// judge, cache and watch for keep-alive bytes has to be readable. Toward the caller, the
/// answer is then identity too (which every client accepts, whatever it asked for).
pub const MANAGED_ACCEPT_ENCODING: &str = "identity";

/// What a complete answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A complete, valid answer: deliver it, and it may be cached.
    Valid,
    /// The provider's own error object (its status and body say what it is): classify it.
    ErrorObject,
    /// Encoded in a way unbusy does not read: deliver as is, never cache.
    Unreadable,
    /// Not an answer: a server error, retried or failed over. The reason says why.
    Invalid(InvalidReason),
}

/// Why an answer is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// The body is not complete JSON (truncated, or not JSON at all).
    NotJson,
    /// JSON, but not an answer object (no `choices` or `data`).
    NotAnAnswer,
    /// An SSE stream that ended before `data: [DONE]`.
    StreamIncomplete,
    /// A content type that is neither JSON nor SSE (an HTML error page, say).
    WrongContentType,
}

/// Whether a `content-encoding` value leaves the body readable as is (absent or `identity`).
pub fn is_readable_encoding(content_encoding: Option<&str>) -> bool {
    content_encoding.is_none_or(|e| {
        let e = e.trim();
        e.is_empty() || e.eq_ignore_ascii_case("identity")
    })
}

/// What kind of body a content type announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sse,
    Json,
    Other,
}

fn kind_of(content_type: Option<&str>) -> Kind {
    let Some(ct) = content_type else {
        return Kind::Json;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    if Framing::from_content_type(essence) == Framing::Sse {
        return Kind::Sse;
    }
    let is_json = essence.is_empty()
        || essence.eq_ignore_ascii_case("application/json")
        || essence
            .get(essence.len().saturating_sub(5)..)
            .is_some_and(|tail| tail.eq_ignore_ascii_case("+json"));
    if is_json {
        Kind::Json
    } else {
        Kind::Other
    }
}

/// Judges a complete 2xx answer: its `content-type`, its `content-encoding` and its whole body.
///
/// ```rust
/// use unbusy_core::answer::{judge, InvalidReason, Verdict};
///
/// let ok = br#"{"id":"x","object":"chat.completion","choices":[]}"#;
/// assert_eq!(judge(Some("application/json"), None, ok), Verdict::Valid);
/// // Cut off, though it "ended cleanly":
/// let cut = br#"{"id":"x","object":"chat.completion","choi"#;
/// assert_eq!(judge(Some("application/json"), None, cut), Verdict::Invalid(InvalidReason::NotJson));
/// // A gateway's HTML page with a 200:
/// let html = b"<html><body>502 Bad Gateway</body></html>";
/// assert_eq!(judge(Some("text/html"), None, html), Verdict::Invalid(InvalidReason::WrongContentType));
/// // A stream is complete only with its `[DONE]`:
/// let sse = b"data: {\"choices\":[]}\n\n";
/// assert_eq!(judge(Some("text/event-stream"), None, sse), Verdict::Invalid(InvalidReason::StreamIncomplete));
/// // Compressed bytes are never judged as text:
/// assert_eq!(judge(Some("application/json"), Some("gzip"), b"\x1f\x8b"), Verdict::Unreadable);
/// ```
pub fn judge(content_type: Option<&str>, content_encoding: Option<&str>, body: &[u8]) -> Verdict {
    if !is_readable_encoding(content_encoding) {
        return Verdict::Unreadable;
    }
    match kind_of(content_type) {
        Kind::Sse => judge_stream(body),
        Kind::Json => judge_json(body),
        Kind::Other => Verdict::Invalid(InvalidReason::WrongContentType),
    }
}

fn judge_json(body: &[u8]) -> Verdict {
    let Ok(value) = json::parse_shallow(body) else {
        return Verdict::Invalid(InvalidReason::NotJson);
    };
    if !matches!(value, Value::Object(_)) {
        return Verdict::Invalid(InvalidReason::NotAnAnswer);
    }
    if value
        .get("error")
        .is_some_and(|e| !matches!(e, Value::Null))
    {
        return Verdict::ErrorObject;
    }
    let answer = [value.get("choices"), value.get("data")]
        .into_iter()
        .flatten()
        .any(|v| matches!(v, Value::Array(_)));
    if answer {
        Verdict::Valid
    } else {
        Verdict::Invalid(InvalidReason::NotAnAnswer)
    }
}

/// A stream is complete when its last `data:` event is `[DONE]` (events after it, such as a
/// trailing comment, do not matter; another `data:` event after it does). A first event that is
/// an error object is the provider's error.
fn judge_stream(body: &[u8]) -> Verdict {
    let mut last_data: Option<&[u8]> = None;
    let mut first = true;
    for line in body.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(payload) = line.strip_prefix(b"data:") else {
            continue;
        };
        let payload = payload.trim_ascii();
        if payload.is_empty() {
            continue;
        }
        if first {
            first = false;
            if let Ok(v) = json::parse_shallow(payload) {
                if v.get("error").is_some_and(|e| !matches!(e, Value::Null)) {
                    return Verdict::ErrorObject;
                }
            }
        }
        last_data = Some(payload);
    }
    if last_data == Some(b"[DONE]".as_slice()) {
        Verdict::Valid
    } else {
        Verdict::Invalid(InvalidReason::StreamIncomplete)
    }
}

/// What a complete answer means for the engine and for the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assessment {
    /// The attempt's outcome, for [`crate::engine::Engine::on_outcome`].
    pub classification: Classification,
    /// Whether the answer showed real progress (a 2xx with more than keep-alive bytes).
    pub progressed: bool,
    /// The judge's verdict on a 2xx answer (`None` for other statuses).
    pub verdict: Option<Verdict>,
    /// Whether the answer may be stored in a cache: a complete, valid, readable success.
    pub cacheable: bool,
}

/// The one verdict on a complete answer (status, headers, whole body), for every host: a 2xx
/// holding only keep-alive bytes is a stall in disguise; a 2xx the [`judge`] finds invalid is a
/// server error (retried or failed over, never delivered as a success or cached); a 2xx error
/// object is classified from its body (busy if it says so, else a server error); anything else
/// is [`classify`]'s verdict. `unix_now_s` turns an HTTP-date hint into a delay.
///
/// ```rust
/// use unbusy_core::answer::assess;
/// use unbusy_core::classify::OutcomeClass;
///
/// let html = assess(200, &[("content-type", "text/html")], b"<html>oops</html>", None);
/// assert_eq!(html.classification.class, OutcomeClass::ServerError);
/// assert!(!html.cacheable);
/// let busy = assess(200, &[], "{\"error\":{\"message\":\"服务器繁忙\"}}".as_bytes(), None);
/// assert_eq!(busy.classification.class, OutcomeClass::Busy);
/// let ok = assess(200, &[], br#"{"choices":[]}"#, None);
/// assert_eq!(ok.classification.class, OutcomeClass::Success);
/// assert!(ok.cacheable);
/// ```
pub fn assess(
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    unix_now_s: Option<u64>,
) -> Assessment {
    let content_type = header(headers, "content-type");
    let content_encoding = header(headers, "content-encoding");
    let classified = |progress| {
        classify(&Response {
            status,
            headers,
            body_prefix: body,
            progress,
            unix_now_s,
        })
    };
    if !(200..=299).contains(&status) {
        return Assessment {
            classification: classified(BodyProgress::Real),
            progressed: false,
            verdict: None,
            cacheable: false,
        };
    }
    let readable = is_readable_encoding(content_encoding);
    if readable {
        let framing = Framing::from_content_type(content_type.unwrap_or(""));
        let mut detector = ProgressDetector::new(framing, 0);
        if detector.feed(0, body) == Feed::KeepAlive {
            return Assessment {
                classification: classify_fault(TransportFault::Stall),
                progressed: false,
                verdict: None,
                cacheable: false,
            };
        }
    }
    let verdict = judge(content_type, content_encoding, body);
    let server_error = Classification {
        class: OutcomeClass::ServerError,
        retry_after: None,
    };
    let classification = match verdict {
        Verdict::Valid | Verdict::Unreadable => classified(BodyProgress::Real),
        Verdict::ErrorObject => match classified(BodyProgress::Real) {
            c if c.class == OutcomeClass::Success => Classification {
                retry_after: c.retry_after,
                ..server_error
            },
            c => c,
        },
        Verdict::Invalid(_) => server_error,
    };
    Assessment {
        classification,
        progressed: true,
        verdict: Some(verdict),
        cacheable: verdict == Verdict::Valid && classification.class == OutcomeClass::Success,
    }
}

/// Tracks whether the SSE bytes seen so far end with the `data: [DONE]` event (a host that streams an
/// answer on to the caller tracks this to know, when the body ends or the caller stops reading,
/// whether the stream was complete). Constant memory: a few bytes of the current line.
#[derive(Debug, Clone, Default)]
pub struct DoneTracker {
    /// The current line, up to a few bytes (enough to recognise `data: [DONE]`).
    line: [u8; 24],
    len: usize,
    /// The line overflowed the buffer: it is not `data: [DONE]`.
    long: bool,
    /// The last non-empty `data:` line was `[DONE]`.
    done: bool,
}

impl DoneTracker {
    /// A tracker at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        for &b in chunk {
            if b == b'\n' {
                self.end_line();
            } else if let Some(slot) = self.line.get_mut(self.len) {
                *slot = b;
                self.len += 1;
            } else {
                self.long = true;
            }
        }
    }

    fn end_line(&mut self) {
        let line = self.line.get(..self.len).unwrap_or(&[]);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(payload) = line.strip_prefix(b"data:") {
            let payload = payload.trim_ascii();
            if self.long || !payload.is_empty() {
                self.done = !self.long && payload == b"[DONE]";
            }
        }
        self.len = 0;
        self.long = false;
    }

    /// Whether the stream so far is complete: its last `data:` event was `[DONE]` (the line
    /// that carried it ended).
    pub fn complete(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_2xx_error_object_that_is_not_busy_is_a_server_error_keeping_its_hint() {
        let body = br#"{"error":{"message":"internal failure","type":"server_error"}}"#;
        let plain = assess(200, &[], body, None);
        assert_eq!(plain.classification.class, OutcomeClass::ServerError);
        assert!(!plain.cacheable);
        let hinted = assess(200, &[("retry-after", "7")], body, None);
        assert_eq!(hinted.classification.class, OutcomeClass::ServerError);
        assert_eq!(hinted.classification.retry_after, Some(7_000_000_000));
    }

    #[test]
    fn a_long_comment_after_done_leaves_the_stream_complete() {
        let mut t = DoneTracker::new();
        t.feed(b"data: {\"x\":1}\n\ndata: [DONE]\n\n");
        assert!(t.complete());
        t.feed(b": a keep-alive comment far longer than the tracker's line buffer\n\n");
        assert!(t.complete(), "a comment is not a data event");
        t.feed(b"data: {\"a long data line after done, longer than the buffer\":1}\n");
        assert!(
            !t.complete(),
            "a data event after [DONE] reopens the stream"
        );
    }

    const CHAT: &[u8] = br#"{"id":"c","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hi"}}],"usage":{"total_tokens":3}}"#;

    #[test]
    fn a_complete_chat_completion_is_valid_and_every_cut_of_it_is_not() {
        assert_eq!(judge(Some("application/json"), None, CHAT), Verdict::Valid);
        for cut in 0..CHAT.len() {
            let v = judge(
                Some("application/json"),
                None,
                CHAT.get(..cut).unwrap_or(&[]),
            );
            assert!(matches!(v, Verdict::Invalid(_)), "cut at {cut}: {v:?}");
        }
    }

    #[test]
    fn content_types_decide_the_framing() {
        assert_eq!(judge(None, None, CHAT), Verdict::Valid);
        assert_eq!(
            judge(Some("application/json; charset=utf-8"), None, CHAT),
            Verdict::Valid
        );
        assert_eq!(
            judge(Some("application/vnd.api+json"), None, CHAT),
            Verdict::Valid
        );
        assert_eq!(
            judge(Some("text/html; charset=utf-8"), None, CHAT),
            Verdict::Invalid(InvalidReason::WrongContentType)
        );
        assert_eq!(
            judge(Some("text/plain"), None, b"upstream connect error"),
            Verdict::Invalid(InvalidReason::WrongContentType)
        );
    }

    #[test]
    fn embeddings_and_models_are_answers_and_other_objects_are_not() {
        let emb = br#"{"object":"list","data":[{"embedding":[0.1]}]}"#;
        assert_eq!(judge(None, None, emb), Verdict::Valid);
        assert_eq!(
            judge(None, None, br#"{"status":"ok"}"#),
            Verdict::Invalid(InvalidReason::NotAnAnswer)
        );
        assert_eq!(
            judge(None, None, b"[1,2]"),
            Verdict::Invalid(InvalidReason::NotAnAnswer)
        );
        assert_eq!(
            judge(None, None, br#"{"choices":"x"}"#),
            Verdict::Invalid(InvalidReason::NotAnAnswer)
        );
        assert_eq!(
            judge(None, None, b""),
            Verdict::Invalid(InvalidReason::NotJson)
        );
    }

    #[test]
    fn an_error_object_is_the_providers_error() {
        let busy = "{\"error\":{\"message\":\"服务器繁忙\"}}";
        assert_eq!(judge(None, None, busy.as_bytes()), Verdict::ErrorObject);
        // `"error": null` beside an answer is an answer.
        assert_eq!(
            judge(None, None, br#"{"error":null,"choices":[]}"#),
            Verdict::Valid
        );
        let sse = b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        assert_eq!(
            judge(Some("text/event-stream"), None, sse),
            Verdict::ErrorObject
        );
    }

    #[test]
    fn a_stream_is_complete_only_when_its_last_data_event_is_done() {
        let sse = Some("text/event-stream");
        let good = b": keep-alive\n\ndata: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        assert_eq!(judge(sse, None, good), Verdict::Valid);
        let crlf = b"data: {\"choices\":[]}\r\n\r\ndata:[DONE]\r\n\r\n";
        assert_eq!(judge(sse, None, crlf), Verdict::Valid);
        let trailing_comment = b"data: {}\n\ndata: [DONE]\n\n: bye\n\n";
        assert_eq!(judge(sse, None, trailing_comment), Verdict::Valid);
        let after = b"data: [DONE]\n\ndata: {\"choices\":[]}\n\n";
        assert_eq!(
            judge(sse, None, after),
            Verdict::Invalid(InvalidReason::StreamIncomplete)
        );
        let keepalive_only = b": keep-alive\n\n\n\n";
        assert_eq!(
            judge(sse, None, keepalive_only),
            Verdict::Invalid(InvalidReason::StreamIncomplete)
        );
    }

    #[test]
    fn encoded_answers_are_never_read_as_text() {
        for enc in ["gzip", "br", "deflate", "zstd", "gzip, identity"] {
            assert_eq!(judge(None, Some(enc), CHAT), Verdict::Unreadable, "{enc}");
        }
        for enc in ["identity", "IDENTITY", " ", ""] {
            assert_eq!(judge(None, Some(enc), CHAT), Verdict::Valid, "{enc:?}");
        }
    }

    #[test]
    fn the_done_tracker_agrees_with_the_judge_however_the_stream_is_split() {
        let streams: [&[u8]; 5] = [
            b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n",
            b"data: {\"choices\":[]}\r\n\r\ndata:  [DONE]\r\n\r\n",
            b"data: {\"choices\":[]}\n\n",
            b"data: [DONE]\n\ndata: {\"choices\":[\"a long event that overflows the line\"]}\n\n",
            b"data: [DONE]\n\n: keep-alive\n\n",
        ];
        for s in streams {
            let whole = judge(Some("text/event-stream"), None, s) == Verdict::Valid;
            for split in 0..=s.len() {
                let (a, b) = s.split_at(split);
                let mut t = DoneTracker::new();
                t.feed(a);
                t.feed(b);
                assert_eq!(t.complete(), whole, "{:?} split at {split}", s);
            }
            let mut t = DoneTracker::new();
            for b in s.chunks(1) {
                t.feed(b);
            }
            assert_eq!(t.complete(), whole);
        }
        let mut t = DoneTracker::new();
        t.feed(b"data: [DONE]"); // the line has not ended yet
        assert!(!t.complete());
        t.feed(b"\n");
        assert!(t.complete());
    }
}
