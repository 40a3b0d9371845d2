//! The counters `GET /stats` returns.

use super::AnswerShape;
use serde::Serialize;

/// How many requests the emulator kept.
const RECENT: usize = 64;

/// A request as the emulator received it, for tests that check rewrites (model mapping,
/// credentials, `max_tokens` caps). The keys here are test keys.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RecentRequest {
    /// The `model` field.
    pub model: String,
    /// Whether it asked for a stream.
    pub stream: bool,
    /// The `max_tokens` field.
    pub max_tokens: Option<u64>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// When it arrived: milliseconds since the emulator started (never reset).
    pub at_ms: f64,
    /// The `accept-encoding` header (several joined with `, `).
    pub accept_encoding: Option<String>,
    /// The names of the `x-unbusy-*` headers it carried, lowercase, in arrival order: the
    /// caller's own headers for unbusy (`x-unbusy-deadline-ms`) must not reach a provider.
    pub unbusy_headers: Vec<String>,
}

/// Any request as the emulator received it (its own `/stats` and `/control` excepted), for
/// tests that check what reached the provider at all, and with which credentials.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SeenRequest {
    /// The method.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
}

/// Counters since start-up (or the last `POST /stats/reset`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stats {
    /// Well-formed chat/completions requests received.
    pub attempts: u64,
    /// Answered normally (`normal`, or `sse_no_done` to a non-streaming request).
    pub ok: u64,
    /// Answered with the `truncated_json` shape (streams: ended without `[DONE]`).
    pub truncated_json: u64,
    /// Answered with the `html_200` shape.
    pub html_200: u64,
    /// Streams answered with the `sse_no_done` shape.
    pub sse_no_done: u64,
    /// Answered with the `overload_200` shape.
    pub overload_200: u64,
    /// Answered with the `retry_after_zero` shape.
    pub retry_after_zero: u64,
    /// Answered with the `retry_after_past` shape.
    pub retry_after_past: u64,
    /// Answers sent gzip-encoded (the request's `accept-encoding` allowed it).
    pub gzip_answers: u64,
    /// 503 with an overload body.
    pub busy_503: u64,
    /// 500.
    pub error_500: u64,
    /// 429 with Retry-After.
    pub rate_limit_429: u64,
    /// 429 without Retry-After (a rate-limit fault with `retry_after_s` 0).
    pub rate_limit_429_bare: u64,
    /// 429 because the concurrency quota was full.
    pub capacity_429: u64,
    /// 200 then keep-alive only, then closed.
    pub stalls: u64,
    /// Connections reset before any byte.
    pub resets: u64,
    /// Malformed requests answered 400 (or 413).
    pub malformed_400: u64,
    /// Answers in progress now.
    pub in_flight: u32,
    /// The most answers in progress at once.
    pub max_in_flight: u32,
    /// The latest requests, oldest first.
    pub recent: Vec<RecentRequest>,
    /// The latest requests of any kind, oldest first.
    pub seen: Vec<SeenRequest>,
}

impl Stats {
    /// Counts an answer to a request that drew no fault, in the shape it got.
    pub fn count(&mut self, shape: AnswerShape, stream: bool) {
        let counter = match shape {
            AnswerShape::Normal | AnswerShape::SseAlways => &mut self.ok,
            AnswerShape::SseNoDone if !stream => &mut self.ok,
            AnswerShape::SseNoDone => &mut self.sse_no_done,
            AnswerShape::TruncatedJson => &mut self.truncated_json,
            AnswerShape::Html200 => &mut self.html_200,
            AnswerShape::Overload200 => &mut self.overload_200,
            AnswerShape::RetryAfterZero => &mut self.retry_after_zero,
            AnswerShape::RetryAfterPast => &mut self.retry_after_past,
        };
        *counter += 1;
    }

    /// Keeps `r` among the recent requests.
    pub fn remember(&mut self, r: RecentRequest) {
        if self.recent.len() >= RECENT {
            self.recent.remove(0);
        }
        self.recent.push(r);
    }

    /// Keeps `r` among the requests seen.
    pub fn saw(&mut self, r: SeenRequest) {
        if self.seen.len() >= RECENT {
            self.seen.remove(0);
        }
        self.seen.push(r);
    }
}
