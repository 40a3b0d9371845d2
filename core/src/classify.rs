//! What an attempt's outcome means.
//!
//! Busy LLM providers say "busy" in many ways: 503 "Server Overloaded", 429 "Rate Limit Reached",
//! a 500 whose body says "Server overloaded", Anthropic-style 529 `overloaded_error`, DeepSeek's
//! "服务器繁忙,请稍后再试", or a 200 that streams nothing but blank lines and `: keep-alive`
//! comments. Everything downstream (retry, failover, breaker, concurrency limit, degradation)
//! needs one answer to "what happened?", so it is computed here once, from the status, the
//! headers that matter and the first bytes of the body.
//!
//! Anchors: the OpenAI SDKs' retry rules (408, 409, 429 and 5xx are retried; `retry-after-ms`
//! before `retry-after`), Envoy's `retriable-status-codes` and `rate_limited_retry_back_off`
//! (reset headers), and DeepSeek's documented error codes (400, 401, 402 insufficient balance,
//! 422, 429, 500, 503).
//!
//! Caller errors are never retried on the same provider: retrying a malformed request multiplies
//! load and never helps. Authentication and billing errors are the exception for *failover*: a
//! proxy that holds one credential per provider can reach another provider with another account.

use crate::time::{Nanos, MILLISECOND, SECOND};

/// How much of a response body classification looks at. Overload markers sit in the first
/// few hundred bytes of every provider's error body; reading more only costs time.
pub const BODY_SNIFF_BYTES: usize = 4096;

/// A fault below HTTP: the attempt produced no usable status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportFault {
    /// The connection was reset or closed before a complete response.
    Reset,
    /// The connection could not be established (refused, DNS, TLS).
    Refused,
    /// No response (or no complete response) before the attempt's deadline.
    Timeout,
    /// Bytes flowed, but only keep-alive bytes: no real progress before the deadline, or the
    /// provider closed after sending nothing real.
    Stall,
}

/// Why a caller error is the caller's (or its account's) fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallerErrorKind {
    /// 400, 405, 413, 415 and other malformed-request answers.
    BadRequest,
    /// 401 or 403: the credential was refused.
    Auth,
    /// 402 insufficient balance, or a 429 that says the quota is used up.
    Billing,
    /// 404: unknown model or path.
    NotFound,
    /// 422: the request is well formed but its parameters are invalid.
    Unprocessable,
}

/// The one answer to "what happened to this attempt?".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeClass {
    /// A usable answer.
    Success,
    /// The provider is overloaded (503, 529, overload bodies on any error status).
    Busy,
    /// The provider or account is rate limited (429, but not "quota exhausted").
    RateLimited,
    /// The provider failed (500, 502, 504, other 5xx, 408, 409).
    ServerError,
    /// Below HTTP: reset, refused, timeout, keep-alive stall.
    Transport(TransportFault),
    /// The request or the account is at fault; retrying the same thing will not help.
    CallerError(CallerErrorKind),
}

impl OutcomeClass {
    /// Whether trying again (later or elsewhere) can help.
    pub const fn is_retryable(self) -> bool {
        !matches!(self, Self::Success | Self::CallerError(_))
    }

    /// Whether another provider (holding its own credentials) can help even though this one
    /// will keep failing: retryable outcomes, plus auth and billing errors.
    pub const fn fails_over(self) -> bool {
        self.is_retryable()
            || matches!(
                self,
                Self::CallerError(CallerErrorKind::Auth | CallerErrorKind::Billing)
            )
    }

    /// Whether the provider said it has no room (the signal that shrinks a concurrency limit and
    /// feeds adaptive throttling): busy, rate limited, or stalling on keep-alive.
    pub const fn is_overload(self) -> bool {
        matches!(
            self,
            Self::Busy | Self::RateLimited | Self::Transport(TransportFault::Stall)
        )
    }

    /// What a circuit breaker should make of this outcome. Rate limits are paced by the
    /// concurrency limit and the server's hint rather than by opening the breaker; caller errors
    /// say nothing about the provider's health, except a refused credential, which makes every
    /// later attempt with it fail too.
    pub const fn breaker_signal(self) -> BreakerSignal {
        match self {
            Self::Success => BreakerSignal::Success,
            Self::Busy | Self::ServerError | Self::Transport(_) => BreakerSignal::Failure,
            Self::CallerError(CallerErrorKind::Auth | CallerErrorKind::Billing) => {
                BreakerSignal::Failure
            }
            Self::RateLimited | Self::CallerError(_) => BreakerSignal::Ignore,
        }
    }

    /// A short stable name for metrics labels and logs.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Busy => "busy",
            Self::RateLimited => "rate_limited",
            Self::ServerError => "server_error",
            Self::Transport(TransportFault::Reset) => "reset",
            Self::Transport(TransportFault::Refused) => "refused",
            Self::Transport(TransportFault::Timeout) => "timeout",
            Self::Transport(TransportFault::Stall) => "stall",
            Self::CallerError(_) => "caller_error",
        }
    }
}

/// How an outcome counts for a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerSignal {
    /// Counts as a success.
    Success,
    /// Counts as a failure.
    Failure,
    /// Not counted.
    Ignore,
}

/// What the body's bytes showed, as far as the host (or [`crate::progress`]) saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyProgress {
    /// Real content arrived (or the host did not track it).
    #[default]
    Real,
    /// The complete body held only keep-alive bytes (blank lines, SSE comments) or nothing.
    KeepAliveOnly,
}

/// An HTTP response as classification sees it.
#[derive(Debug, Clone, Copy)]
pub struct Response<'a> {
    /// The HTTP status.
    pub status: u16,
    /// Response headers; names are matched case-insensitively.
    pub headers: &'a [(&'a str, &'a str)],
    /// The first bytes of the body (at most [`BODY_SNIFF_BYTES`] are read); empty if unknown.
    pub body_prefix: &'a [u8],
    /// Whether the body showed real progress; see [`BodyProgress`].
    pub progress: BodyProgress,
    /// The current wall-clock time as Unix seconds, needed only to turn an HTTP-date
    /// `Retry-After` into a delay. `None`: HTTP-date hints are ignored.
    pub unix_now_s: Option<u64>,
}

/// The verdict on one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// What happened.
    pub class: OutcomeClass,
    /// How long the provider asked us to wait, if it said (already converted to a delay).
    pub retry_after: Option<Nanos>,
}

/// Classifies a transport fault (no HTTP status).
pub const fn classify_fault(fault: TransportFault) -> Classification {
    Classification {
        class: OutcomeClass::Transport(fault),
        retry_after: None,
    }
}

/// Classifies an HTTP response.
///
/// ```rust
/// use unbusy_core::classify::{classify, BodyProgress, OutcomeClass, Response};
/// use unbusy_core::time::secs;
///
/// let response = |status, headers, body: &'static str, progress| Response {
///     status,
///     headers,
///     body_prefix: body.as_bytes(),
///     progress,
///     unix_now_s: None,
/// };
/// // A 429 with `Retry-After: 2`: rate limited, and the server said how long to wait.
/// let c = classify(&response(429, &[("Retry-After", "2")], "", BodyProgress::Real));
/// assert_eq!(c.class, OutcomeClass::RateLimited);
/// assert_eq!(c.retry_after, Some(secs(2)));
/// // DeepSeek's "server busy" body on a 500 is busy, not a plain server error.
/// let body = r#"{"error":{"message":"服务器繁忙,请稍后再试"}}"#;
/// let c = classify(&response(500, &[], body, BodyProgress::Real));
/// assert_eq!(c.class, OutcomeClass::Busy);
/// // A 200 that sent nothing but keep-alive comments is a stall, not an answer.
/// let c = classify(&response(200, &[], ": keep-alive\n\n", BodyProgress::KeepAliveOnly));
/// assert!(c.class.is_retryable());
/// ```
pub fn classify(response: &Response<'_>) -> Classification {
    let body = response
        .body_prefix
        .get(..BODY_SNIFF_BYTES)
        .unwrap_or(response.body_prefix);
    // The body is read only where it can change the verdict: a successful answer's content is
    // not searched unless it is an error object, and a 503 is busy whatever it says.
    let marker = || body_marker(body);
    let class = match response.status {
        200..=299 => match response.progress {
            BodyProgress::KeepAliveOnly => OutcomeClass::Transport(TransportFault::Stall),
            // A 200 whose body is an error object saying "overloaded" is busy in disguise.
            BodyProgress::Real
                if looks_like_error_object(body) && marker() == Some(BodyMarker::Overloaded) =>
            {
                OutcomeClass::Busy
            }
            BodyProgress::Real => OutcomeClass::Success,
        },
        429 => match marker() {
            Some(BodyMarker::QuotaExhausted) => OutcomeClass::CallerError(CallerErrorKind::Billing),
            Some(BodyMarker::Overloaded) => OutcomeClass::Busy,
            _ => OutcomeClass::RateLimited,
        },
        503 | 529 => OutcomeClass::Busy,
        408 => OutcomeClass::Transport(TransportFault::Timeout),
        // OpenAI retries 409 (lock timeouts); it is the server's contention, not the caller's.
        409 => OutcomeClass::ServerError,
        400..=499 => match marker() {
            Some(BodyMarker::Overloaded) => OutcomeClass::Busy,
            _ => OutcomeClass::CallerError(match response.status {
                401 | 403 => CallerErrorKind::Auth,
                402 => CallerErrorKind::Billing,
                404 => CallerErrorKind::NotFound,
                422 => CallerErrorKind::Unprocessable,
                _ => CallerErrorKind::BadRequest,
            }),
        },
        500..=599 => match marker() {
            Some(BodyMarker::Overloaded) => OutcomeClass::Busy,
            _ => OutcomeClass::ServerError,
        },
        // 1xx and 3xx never reach us as final answers from an LLM API; treat them as a broken
        // provider rather than a success.
        _ => OutcomeClass::ServerError,
    };
    Classification {
        class,
        retry_after: retry_hint(response.headers, response.unix_now_s),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyMarker {
    Overloaded,
    QuotaExhausted,
}

/// Phrases that mean "overloaded, try later" in the bodies of DeepSeek, OpenAI, Anthropic-style
/// and gateway errors. Matched case-insensitively (ASCII) or byte-exactly (CJK).
const OVERLOAD_PHRASES: &[&[u8]] = &[
    b"server overloaded",
    b"overloaded_error",
    b"server is overloaded",
    b"engine is currently overloaded",
    b"server is busy",
    b"server busy",
    b"currently overloaded",
    b"over capacity",
    b"at capacity",
    "服务器繁忙".as_bytes(),
    "系统繁忙".as_bytes(),
];

/// Phrases that mean the account's quota or balance is gone: waiting will not help.
const QUOTA_PHRASES: &[&[u8]] = &[
    b"insufficient_quota",
    b"exceeded your current quota",
    b"insufficient balance",
    b"insufficient_balance",
];

fn body_marker(body: &[u8]) -> Option<BodyMarker> {
    if contains_any(body, QUOTA_PHRASES, &QUOTA_FIRST_BYTES) {
        Some(BodyMarker::QuotaExhausted)
    } else if contains_any(body, OVERLOAD_PHRASES, &OVERLOAD_FIRST_BYTES) {
        Some(BodyMarker::Overloaded)
    } else {
        None
    }
}

const QUOTA_FIRST_BYTES: [bool; 256] = first_bytes(QUOTA_PHRASES);
const OVERLOAD_FIRST_BYTES: [bool; 256] = first_bytes(OVERLOAD_PHRASES);
const ERROR_KEY: &[&[u8]] = &[b"\"error\""];
const ERROR_KEY_FIRST_BYTES: [bool; 256] = first_bytes(ERROR_KEY);

/// Which bytes start a needle, in either ASCII case. Only ever evaluated at compile time (for
/// the consts above), where an out-of-range index is a build error, not a runtime panic; and
/// every index is in range anyway (`i < len`, a `u8` below 256).
#[allow(clippy::indexing_slicing)]
const fn first_bytes(needles: &[&[u8]]) -> [bool; 256] {
    let mut table = [false; 256];
    let mut i = 0;
    while i < needles.len() {
        if let Some(&b) = needles[i].first() {
            table[b.to_ascii_lowercase() as usize] = true;
            table[b.to_ascii_uppercase() as usize] = true;
        }
        i += 1;
    }
    table
}

/// Whether any needle occurs in `haystack` (ASCII case-insensitively; other bytes exactly).
/// One pass; a needle is compared only where the byte can start one.
fn contains_any(haystack: &[u8], needles: &[&[u8]], first: &[bool; 256]) -> bool {
    haystack.iter().enumerate().any(|(i, b)| {
        first.get(usize::from(*b)).copied().unwrap_or(false)
            && needles.iter().any(|n| {
                haystack
                    .get(i..i + n.len())
                    .is_some_and(|w| w.eq_ignore_ascii_case(n))
            })
    })
}

/// Whether the body is an error object (`{"error":...}` or `{"type":"error","error":...}`),
/// possibly as an SSE `data:` line. Only the start is read: a successful answer that merely
/// mentions an error further on is not one.
fn looks_like_error_object(body: &[u8]) -> bool {
    let trimmed = trim_ascii_start(body);
    let trimmed = trimmed
        .strip_prefix(b"data:")
        .map_or(trimmed, trim_ascii_start);
    let head = trimmed.get(..32).unwrap_or(trimmed);
    trimmed.starts_with(b"{") && contains_any(head, ERROR_KEY, &ERROR_KEY_FIRST_BYTES)
}

fn trim_ascii_start(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    b.get(start..).unwrap_or_default()
}

/// A header's value, its name matched case-insensitively, trimmed.
pub(crate) fn header<'a>(headers: &'a [(&'a str, &'a str)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// The longest hint believed: anything longer is a misconfigured or hostile server. Callers cap
/// far lower (see [`crate::backoff`]); this only keeps arithmetic sane.
const MAX_HINT: Nanos = 24 * 3600 * SECOND;

/// The server's "wait this long" hint, in the order the OpenAI SDKs read them: `retry-after-ms`,
/// then `retry-after` (delta-seconds, possibly fractional, or an HTTP-date in any of its three
/// forms), then the rate-limit reset headers (`x-ratelimit-reset-requests` / `-tokens`, each
/// considered only when its `x-ratelimit-remaining-*` partner is absent or zero; the longer wins).
///
/// A hint of zero (`Retry-After: 0`, an HTTP-date now or in the past, a reset of `0s`) says
/// nothing about when to come back: it is no hint, the next source is read, and the backoff
/// decides. Taken as "retry at once", it made 8 attempts in 0.12 s.
pub fn retry_hint(headers: &[(&str, &str)], unix_now_s: Option<u64>) -> Option<Nanos> {
    let some = |d: Nanos| (d > 0).then_some(d.min(MAX_HINT));
    if let Some(ms) = header(headers, "retry-after-ms")
        .and_then(parse_decimal_scaled_ms)
        .and_then(some)
    {
        return Some(ms);
    }
    if let Some(value) = header(headers, "retry-after") {
        if let Some(d) = parse_decimal_seconds(value).and_then(some) {
            return Some(d);
        }
        if let (Some(at), Some(now)) = (parse_http_date(value), unix_now_s) {
            if let Some(d) = some(at.saturating_sub(now).saturating_mul(SECOND)) {
                return Some(d);
            }
        }
    }
    let mut longest: Option<Nanos> = None;
    for (reset, remaining) in [
        (
            "x-ratelimit-reset-requests",
            "x-ratelimit-remaining-requests",
        ),
        ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"),
    ] {
        let exhausted = header(headers, remaining).is_none_or(|r| r.parse::<u64>() == Ok(0));
        if !exhausted {
            continue;
        }
        if let Some(d) = header(headers, reset).and_then(parse_go_duration) {
            longest = Some(longest.map_or(d, |l| l.max(d)));
        }
    }
    longest.and_then(some)
}

/// Parses a non-negative decimal like `1`, `1.5`, `0.25` into nanoseconds, given the unit's size
/// in nanoseconds. Rejects signs, exponents, empty strings and overflow.
fn parse_decimal(value: &str, unit: Nanos) -> Option<Nanos> {
    let (int, frac) = match value.split_once('.') {
        Some((i, f)) => (i, f),
        None => (value, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut total = whole.checked_mul(unit)?;
    let mut scale = unit;
    for digit in frac.bytes().take(9) {
        scale /= 10;
        total = total.checked_add(u64::from(digit - b'0') * scale)?;
    }
    Some(total)
}

fn parse_decimal_seconds(value: &str) -> Option<Nanos> {
    parse_decimal(value, SECOND)
}

fn parse_decimal_scaled_ms(value: &str) -> Option<Nanos> {
    parse_decimal(value, MILLISECOND)
}

/// Parses the Go-style durations OpenAI-compatible APIs put in `x-ratelimit-reset-*`:
/// `1s`, `6m0s`, `250ms`, `1h2m3.5s`, `20ns`, `5us`, `5µs`.
pub fn parse_go_duration(value: &str) -> Option<Nanos> {
    let mut rest = value.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(0);
    }
    let mut total: Nanos = 0;
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .position(|b| !(b.is_ascii_digit() || b == b'.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at_checked(number_len)?;
        let unit_len = tail
            .bytes()
            .position(|b| b.is_ascii_digit() || b == b'.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at_checked(unit_len)?;
        let unit_ns = match unit {
            "h" => 3600 * SECOND,
            "m" => 60 * SECOND,
            "s" => SECOND,
            "ms" => MILLISECOND,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        total = total.checked_add(parse_decimal(number, unit_ns)?)?;
        rest = tail;
    }
    Some(total)
}

/// Parses an HTTP-date (RFC 9110 §5.6.7) in any of its three forms into Unix seconds:
/// IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`, RFC 850 `Sunday, 06-Nov-94 08:49:37 GMT` and
/// asctime `Sun Nov  6 08:49:37 1994`.
pub fn parse_http_date(value: &str) -> Option<u64> {
    let value = value.trim();
    let (weekday_and_rest, is_comma_form) = match value.split_once(',') {
        Some((_, rest)) => (rest.trim(), true),
        None => (value, false),
    };
    let (day, month, year, time) = if is_comma_form {
        let mut parts = weekday_and_rest.split_ascii_whitespace();
        let first = parts.next()?;
        if first.contains('-') {
            // RFC 850: 06-Nov-94 08:49:37 GMT
            let mut dmy = first.split('-');
            let day = dmy.next()?;
            let month = dmy.next()?;
            let year2: u64 = parse_digits(dmy.next()?, 2)?;
            // RFC 9110: a two-digit year more than 50 years in the future is in the past; for
            // retry hints "00-69 is 20xx" is the same answer for the next four decades.
            let year = if year2 < 70 {
                2000 + year2
            } else {
                1900 + year2
            };
            let time = parts.next()?;
            if parts.next()? != "GMT" || parts.next().is_some() {
                return None;
            }
            (day, month, year, time)
        } else {
            // IMF-fixdate: 06 Nov 1994 08:49:37 GMT
            let month = parts.next()?;
            let year = parse_digits(parts.next()?, 4)?;
            let time = parts.next()?;
            if parts.next()? != "GMT" || parts.next().is_some() {
                return None;
            }
            (first, month, year, time)
        }
    } else {
        // asctime: Sun Nov  6 08:49:37 1994
        let mut parts = value.split_ascii_whitespace();
        let _weekday = parts.next()?;
        let month = parts.next()?;
        let day = parts.next()?;
        let time = parts.next()?;
        let year = parse_digits(parts.next()?, 4)?;
        if parts.next().is_some() {
            return None;
        }
        (day, month, year, time)
    };
    let day: u64 = if (1..=2).contains(&day.len()) && day.bytes().all(|b| b.is_ascii_digit()) {
        day.parse().ok()?
    } else {
        return None;
    };
    let month = month_number(month)?;
    let mut hms = time.split(':');
    let hour: u64 = parse_digits(hms.next()?, 2)?;
    let minute: u64 = parse_digits(hms.next()?, 2)?;
    let second: u64 = parse_digits(hms.next()?, 2)?;
    if hms.next().is_some() || hour > 23 || minute > 59 || second > 60 || !(1..=31).contains(&day) {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

fn parse_digits(s: &str, len: usize) -> Option<u64> {
    if s.len() == len && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn month_number(name: &str) -> Option<u64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS.iter().position(|m| *m == name).map(|i| i as u64 + 1)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm), for years
/// from 1970 on.
fn days_from_civil(year: u64, month: u64, day: u64) -> Option<u64> {
    if year < 1970 {
        return None;
    }
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ms;

    fn resp<'a>(status: u16, headers: &'a [(&'a str, &'a str)], body: &'a [u8]) -> Response<'a> {
        Response {
            status,
            headers,
            body_prefix: body,
            progress: BodyProgress::Real,
            unix_now_s: Some(784_111_777),
        }
    }

    fn class(status: u16, body: &str) -> OutcomeClass {
        classify(&resp(status, &[], body.as_bytes())).class
    }

    #[test]
    fn only_busy_rate_limited_and_stalls_are_overload() {
        use OutcomeClass as C;
        let all = [
            (C::Success, "success", false),
            (C::Busy, "busy", true),
            (C::RateLimited, "rate_limited", true),
            (C::ServerError, "server_error", false),
            (C::Transport(TransportFault::Reset), "reset", false),
            (C::Transport(TransportFault::Refused), "refused", false),
            (C::Transport(TransportFault::Timeout), "timeout", false),
            (C::Transport(TransportFault::Stall), "stall", true),
            (
                C::CallerError(CallerErrorKind::BadRequest),
                "caller_error",
                false,
            ),
        ];
        for (c, label, overload) in all {
            assert_eq!(c.label(), label);
            assert_eq!(c.is_overload(), overload, "{c:?}");
        }
    }

    #[test]
    fn a_409_is_the_servers_contention_and_a_busy_429_is_busy() {
        assert_eq!(class(409, "{}"), OutcomeClass::ServerError);
        assert_eq!(
            class(429, r#"{"error":{"message":"Server is overloaded"}}"#),
            OutcomeClass::Busy
        );
    }

    #[test]
    fn an_answer_that_mentions_being_busy_is_still_an_answer() {
        let answer = r#"{"choices":[{"message":{"content":"服务器繁忙 means server busy"}}]}"#;
        assert_eq!(class(200, answer), OutcomeClass::Success);
    }

    #[test]
    fn statuses() {
        assert_eq!(class(200, "{}"), OutcomeClass::Success);
        assert_eq!(class(503, ""), OutcomeClass::Busy);
        assert_eq!(class(529, ""), OutcomeClass::Busy);
        assert_eq!(class(429, ""), OutcomeClass::RateLimited);
        assert_eq!(class(500, ""), OutcomeClass::ServerError);
        assert_eq!(class(502, ""), OutcomeClass::ServerError);
        assert_eq!(class(504, ""), OutcomeClass::ServerError);
        assert_eq!(
            class(408, ""),
            OutcomeClass::Transport(TransportFault::Timeout)
        );
        for (status, kind) in [
            (400, CallerErrorKind::BadRequest),
            (401, CallerErrorKind::Auth),
            (402, CallerErrorKind::Billing),
            (403, CallerErrorKind::Auth),
            (404, CallerErrorKind::NotFound),
            (422, CallerErrorKind::Unprocessable),
        ] {
            let c = class(status, r#"{"error":{"message":"nope"}}"#);
            assert_eq!(c, OutcomeClass::CallerError(kind), "status {status}");
            assert!(!c.is_retryable());
        }
    }

    #[test]
    fn overload_bodies() {
        assert_eq!(
            class(
                500,
                r#"{"error":{"message":"Server overloaded, please retry shortly."}}"#
            ),
            OutcomeClass::Busy
        );
        assert_eq!(
            class(500, r#"{"error":{"message":"服务器繁忙,请稍后再试"}}"#),
            OutcomeClass::Busy
        );
        assert_eq!(
            class(
                400,
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            ),
            OutcomeClass::Busy
        );
        assert_eq!(
            class(
                200,
                r#"{"error":{"message":"Server overloaded","code":"busy"}}"#
            ),
            OutcomeClass::Busy
        );
        // A 200 that merely talks about capacity in its answer is a success.
        assert_eq!(
            class(
                200,
                r#"{"choices":[{"message":{"content":"server capacity planning"}}]}"#
            ),
            OutcomeClass::Success
        );
    }

    #[test]
    fn quota_exhausted_is_billing_not_rate_limit() {
        let c = class(
            429,
            r#"{"error":{"message":"You exceeded your current quota","code":"insufficient_quota"}}"#,
        );
        assert_eq!(c, OutcomeClass::CallerError(CallerErrorKind::Billing));
        assert!(!c.is_retryable());
        assert!(c.fails_over());
    }

    #[test]
    fn keep_alive_only_200_is_a_stall() {
        let r = Response {
            progress: BodyProgress::KeepAliveOnly,
            ..resp(200, &[], b"\n\n: keep-alive\n\n")
        };
        assert_eq!(
            classify(&r).class,
            OutcomeClass::Transport(TransportFault::Stall)
        );
        assert!(classify(&r).class.is_overload());
    }

    #[test]
    fn hints_in_sdk_order() {
        let h = [("Retry-After", "7"), ("retry-after-ms", "1500")];
        assert_eq!(retry_hint(&h, None), Some(ms(1500)));
        assert_eq!(retry_hint(&[("retry-after", "2")], None), Some(ms(2000)));
        assert_eq!(retry_hint(&[("retry-after", "0.25")], None), Some(ms(250)));
        assert_eq!(retry_hint(&[("retry-after", "-1")], None), None);
        assert_eq!(retry_hint(&[("retry-after", "soon")], None), None);
        assert_eq!(retry_hint(&[("retry-after", "")], None), None);
        // Zero is no hint, and the next source is read.
        assert_eq!(retry_hint(&[("retry-after", "0")], None), None);
        let h = [("retry-after-ms", "0"), ("retry-after", "3")];
        assert_eq!(retry_hint(&h, None), Some(ms(3000)));
        let h = [("x-ratelimit-reset-requests", "0s")];
        assert_eq!(retry_hint(&h, None), None);
    }

    #[test]
    fn http_date_edges() {
        // RFC 850's two-digit years: 70-99 are 19xx, 00-69 are 20xx.
        assert_eq!(parse_http_date("Thursday, 01-Jan-70 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tuesday, 01-Jan-69 00:00:00 GMT"),
            Some(3_124_224_000) // 2069-01-01
        );
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 UTC"), None);
        assert_eq!(parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT x"), None);
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT x"), None);
        // A leap second is a time; anything past it, or a fourth field, is not.
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 23:59:60 GMT"),
            Some(784_166_400)
        );
        for bad in [
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:60:00 GMT",
            "Sun, 06 Nov 1994 08:49:61 GMT",
            "Sun, 06 Nov 1994 08:49:37:00 GMT",
            "Sun, 00 Nov 1994 08:49:37 GMT",
            // Signs parse as numbers in Rust: they are not digits here.
            "Sun, +6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 +8:49:37 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn http_date_forms() {
        let expected = 784_111_777; // 1994-11-06 08:49:37 UTC
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(expected)
        );
        assert_eq!(
            parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(expected)
        );
        assert_eq!(parse_http_date("Sun Nov  6 08:49:37 1994"), Some(expected));
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 PST"), None);
        assert_eq!(parse_http_date("Sun, 32 Nov 1994 08:49:37 GMT"), None);
        assert_eq!(parse_http_date("yesterday"), None);
        let h = [("retry-after", "Sun, 06 Nov 1994 08:50:07 GMT")];
        assert_eq!(retry_hint(&h, Some(expected)), Some(ms(30_000)));
        // Without a wall clock an HTTP-date cannot become a delay.
        assert_eq!(retry_hint(&h, None), None);
        // A date in the past says nothing about when to come back: no hint.
        assert_eq!(retry_hint(&h, Some(expected + 100)), None);
    }

    #[test]
    fn ratelimit_reset_headers() {
        assert_eq!(parse_go_duration("1s"), Some(ms(1000)));
        assert_eq!(parse_go_duration("1500us"), Some(ms(1) + ms(1) / 2));
        assert_eq!(parse_go_duration("2µs"), Some(2_000));
        assert_eq!(parse_go_duration("3μs"), Some(3_000));
        assert_eq!(parse_go_duration("10ns"), Some(10));
        assert_eq!(parse_go_duration("6m0s"), Some(ms(360_000)));
        assert_eq!(parse_go_duration("250ms"), Some(ms(250)));
        assert_eq!(parse_go_duration("1h2m3.5s"), Some(ms(3_723_500)));
        assert_eq!(parse_go_duration("1.5s"), Some(ms(1500)));
        assert_eq!(parse_go_duration("7x"), None);
        assert_eq!(parse_go_duration("s"), None);
        assert_eq!(parse_go_duration(""), None);
        let h = [
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("x-ratelimit-remaining-tokens", "5000"),
        ];
        // Tokens are not exhausted, so only the requests reset counts.
        assert_eq!(retry_hint(&h, None), Some(ms(1000)));
        let h = [
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "250ms"),
        ];
        assert_eq!(retry_hint(&h, None), Some(ms(1000)));
    }

    #[test]
    fn breaker_signals() {
        assert_eq!(OutcomeClass::Busy.breaker_signal(), BreakerSignal::Failure);
        assert_eq!(
            OutcomeClass::RateLimited.breaker_signal(),
            BreakerSignal::Ignore
        );
        assert_eq!(
            OutcomeClass::CallerError(CallerErrorKind::BadRequest).breaker_signal(),
            BreakerSignal::Ignore
        );
        assert_eq!(
            OutcomeClass::CallerError(CallerErrorKind::Auth).breaker_signal(),
            BreakerSignal::Failure
        );
    }
}
