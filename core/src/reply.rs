//! OpenAI-compatible local error replies.
//!
//! When unbusy refuses or gives up locally (a tenant over its quota, every provider busy, the
//! deadline gone, degraded to fail-fast), the caller is usually an OpenAI SDK. SDKs only back off
//! correctly on answers shaped like the provider's: an `{"error":{...}}` body, a 429 or 5xx
//! status, and the wait in headers they read: `retry-after-ms` (first) and `retry-after` (whole
//! seconds), plus `x-should-retry`, which the OpenAI SDKs obey over their own status rules.
//! This module builds that reply once for every host.

use crate::classify::OutcomeClass;
use crate::time::{to_ms_ceil, to_secs_ceil, Nanos};
use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// Why unbusy answered locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyKind {
    /// A token bucket or quota refused the request (429).
    RateLimited,
    /// Every provider is busy, open or at capacity, or the service tier fails fast (503).
    Overloaded,
    /// The request's deadline passed before an answer (504).
    DeadlineExceeded,
    /// The request was shed by degradation (low priority) (503).
    Shed,
    /// The request is malformed (400): no retry will help.
    BadRequest,
    /// The request body is larger than unbusy buffers (413): no retry will help.
    TooLarge,
    /// The endpoint is not one unbusy forwards (403, `endpoints.passthrough: refuse`): no retry
    /// will help.
    EndpointNotAllowed,
}

impl ReplyKind {
    /// The HTTP status.
    pub const fn status(self) -> u16 {
        match self {
            Self::RateLimited => 429,
            Self::Overloaded | Self::Shed => 503,
            Self::DeadlineExceeded => 504,
            Self::BadRequest => 400,
            Self::TooLarge => 413,
            Self::EndpointNotAllowed => 403,
        }
    }

    /// The OpenAI error `type`.
    pub const fn error_type(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limit_error",
            Self::Overloaded | Self::Shed | Self::DeadlineExceeded => "server_error",
            Self::BadRequest | Self::TooLarge => "invalid_request_error",
            Self::EndpointNotAllowed => "endpoint_not_allowed",
        }
    }

    /// The error `code`, stable for programs to match on.
    pub const fn code(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limit_exceeded",
            Self::Overloaded => "overloaded",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Shed => "load_shed",
            Self::BadRequest => "invalid_request",
            Self::TooLarge => "request_too_large",
            Self::EndpointNotAllowed => "endpoint_not_allowed",
        }
    }

    /// Whether a retry (after the hinted wait) can succeed.
    pub const fn retryable(self) -> bool {
        !matches!(
            self,
            Self::BadRequest | Self::TooLarge | Self::EndpointNotAllowed
        )
    }
}

/// A complete local reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    /// The HTTP status.
    pub status: u16,
    /// Headers to send (lower-case names).
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body.
    pub body: String,
}

/// The message when every attempt failed: "no provider could answer after N attempt(s); last:
/// busy" (the last attempt's class). Appended, not `format!`ted: core's formatting machinery
/// was about 5 KB of the npm package's wasm (issue 13's size goal).
pub fn gave_up_after(attempts: u32, last: OutcomeClass) -> String {
    let mut out = String::with_capacity(64);
    out.push_str("no provider could answer after ");
    crate::json::write_u64(&mut out, u64::from(attempts));
    out.push_str(" attempt(s); last: ");
    out.push_str(last.label());
    out
}

/// Builds the reply. `retry_after` is the wait to announce (retryable kinds only); the
/// `retry-after` header is rounded up to whole seconds and at least 1, so SDKs that read only it
/// never retry early.
pub fn local_reply(kind: ReplyKind, message: &str, retry_after: Option<Nanos>) -> LocalReply {
    // {"error":{"message":...,"type":...,"param":null,"code":...}}, as OpenAI sends it.
    let mut body = String::with_capacity(message.len() + 96);
    body.push_str("{\"error\":{\"message\":");
    crate::json::write_str(&mut body, message);
    body.push_str(",\"type\":");
    crate::json::write_str(&mut body, kind.error_type());
    body.push_str(",\"param\":null,\"code\":");
    crate::json::write_str(&mut body, kind.code());
    body.push_str("}}");
    let mut headers: Vec<(&'static str, String)> = Vec::with_capacity(5);
    headers.push(("content-type", "application/json".to_string()));
    headers.push((
        "x-should-retry",
        if kind.retryable() { "true" } else { "false" }.to_string(),
    ));
    if let (true, Some(wait)) = (kind.retryable(), retry_after) {
        headers.push((
            "retry-after",
            crate::text::decimal(to_secs_ceil(wait).max(1)),
        ));
        headers.push(("retry-after-ms", crate::text::decimal(to_ms_ceil(wait))));
    }
    LocalReply {
        status: kind.status(),
        headers,
        body,
    }
}

/// What the cache did for a request, as the `x-unbusy` note says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheNote {
    /// The request has no cache key (the cache is off, or the request is not cacheable).
    #[default]
    None,
    /// It has a key, and its answer came from a provider.
    Miss,
    /// It was answered from the cache, fresh.
    Hit,
    /// It was answered from the cache past its freshness (degraded, or no provider could).
    Stale,
    /// It was answered from the fleet's L2 cache (`unbusy-store`), fresh: the proxy's own
    /// cache missed (Envoy filter with a `store`).
    HitL2,
    /// It was answered from the fleet's L2 cache past its freshness.
    StaleL2,
}

impl CacheNote {
    /// Its word in the note.
    pub const fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Miss => "miss",
            Self::Hit => "hit",
            Self::Stale => "stale",
            Self::HitL2 => "hit-l2",
            Self::StaleL2 => "stale-l2",
        }
    }
}

/// The `x-unbusy` header every managed answer carries, from every host:
/// `provider=<name>; attempts=<n>; cache=<none|miss|hit|stale|hit-l2|stale-l2>; tier=<0-3>`. `provider` is the
/// provider of the last attempt (`none` when no attempt was made), `tier` the degradation tier.
///
/// ```rust
/// use unbusy_core::reply::{note, CacheNote};
/// assert_eq!(note(Some("deepseek"), 2, CacheNote::Miss, 0), "provider=deepseek; attempts=2; cache=miss; tier=0");
/// assert_eq!(note(Some("deepseek"), 0, CacheNote::Hit, 1), "provider=none; attempts=0; cache=hit; tier=1");
/// ```
pub fn note(provider: Option<&str>, attempts: u32, cache: CacheNote, tier: u8) -> String {
    let provider = provider.filter(|_| attempts > 0).unwrap_or("none");
    let mut out = String::with_capacity(provider.len() + 48);
    out.push_str("provider=");
    out.push_str(provider);
    out.push_str("; attempts=");
    crate::json::write_u64(&mut out, u64::from(attempts));
    out.push_str("; cache=");
    out.push_str(cache.label());
    out.push_str("; tier=");
    crate::json::write_u64(&mut out, u64::from(tier));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{classify, BodyProgress, OutcomeClass, Response};
    use crate::time::ms;

    #[test]
    fn giving_up_names_the_attempts_and_the_last_class() {
        assert_eq!(
            gave_up_after(3, OutcomeClass::Busy),
            "no provider could answer after 3 attempt(s); last: busy"
        );
        assert_eq!(
            gave_up_after(10, OutcomeClass::RateLimited),
            [
                "no provider could answer after 10 attempt(s); last: ",
                OutcomeClass::RateLimited.label()
            ]
            .concat()
        );
    }

    fn header<'a>(r: &'a LocalReply, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn rate_limited_reply_is_openai_shaped() {
        let r = local_reply(
            ReplyKind::RateLimited,
            "tenant \"a\" over quota",
            Some(ms(1200)),
        );
        assert_eq!(r.status, 429);
        assert_eq!(header(&r, "retry-after"), Some("2"));
        assert_eq!(header(&r, "retry-after-ms"), Some("1200"));
        assert_eq!(header(&r, "x-should-retry"), Some("true"));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["message"], "tenant \"a\" over quota");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn our_own_replies_classify_as_what_they_mean() {
        for (kind, class) in [
            (ReplyKind::RateLimited, OutcomeClass::RateLimited),
            (ReplyKind::Overloaded, OutcomeClass::Busy),
            (ReplyKind::DeadlineExceeded, OutcomeClass::ServerError),
        ] {
            let r = local_reply(kind, "x", Some(ms(10)));
            let headers: Vec<(&str, &str)> =
                r.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let c = classify(&Response {
                status: r.status,
                headers: &headers,
                body_prefix: r.body.as_bytes(),
                progress: BodyProgress::Real,
                unix_now_s: None,
            });
            assert_eq!(c.class, class, "{kind:?}");
            assert_eq!(c.retry_after, Some(ms(10)));
        }
    }

    #[test]
    fn bad_request_says_do_not_retry() {
        let r = local_reply(ReplyKind::BadRequest, "body is not JSON", Some(ms(5)));
        assert_eq!(r.status, 400);
        assert_eq!(header(&r, "x-should-retry"), Some("false"));
        assert_eq!(header(&r, "retry-after"), None);
    }

    #[test]
    fn a_refused_endpoint_is_a_403_that_says_why() {
        let r = local_reply(ReplyKind::EndpointNotAllowed, "DELETE /v1/files/x", None);
        assert_eq!(r.status, 403);
        assert_eq!(header(&r, "x-should-retry"), Some("false"));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"]["type"], "endpoint_not_allowed");
        assert_eq!(v["error"]["code"], "endpoint_not_allowed");
    }

    #[test]
    fn the_note_names_the_last_provider_only_after_an_attempt() {
        use super::{note, CacheNote};
        assert_eq!(
            note(Some("backup"), 2, CacheNote::Miss, 0),
            "provider=backup; attempts=2; cache=miss; tier=0"
        );
        assert_eq!(
            note(Some("backup"), 0, CacheNote::Stale, 3),
            "provider=none; attempts=0; cache=stale; tier=3"
        );
        assert_eq!(
            note(None, 1, CacheNote::None, 1),
            "provider=none; attempts=1; cache=none; tier=1"
        );
        assert_eq!(CacheNote::Hit.label(), "hit");
        assert_eq!(CacheNote::HitL2.label(), "hit-l2");
        assert_eq!(CacheNote::StaleL2.label(), "stale-l2");
    }
}
