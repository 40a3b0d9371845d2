//! Answer shapes: the bad answers real providers (and the gateways in front of them) send
//! with a status that looks fine or a hint that means nothing, applied to requests that would
//! otherwise get a normal `200`.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What a request that draws no fault (`Fault::None`) gets back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerShape {
    /// The normal answer: a chat completion, or SSE chunks then `data: [DONE]`.
    #[default]
    Normal,
    /// Non-stream: `200 application/json` whose body is the first half of the real completion
    /// (a correct `content-length`, the body ends cleanly). Stream: as [`Self::SseNoDone`].
    TruncatedJson,
    /// `200 text/html` with `<html><body><h1>502 Bad Gateway</h1></body></html>`, stream or not
    /// (a gateway's error page passed on as a success).
    #[serde(rename = "html_200")]
    Html200,
    /// Stream: the normal chunks, then a clean end without `data: [DONE]`. Non-stream: normal.
    SseNoDone,
    /// `200 application/json` with DeepSeek's overload error as the body
    /// (`{"error":{"message":"服务器繁忙，请稍后再试","type":"server_error"}}`), stream or not.
    #[serde(rename = "overload_200")]
    Overload200,
    /// `429` with an OpenAI rate-limit body, `Retry-After: 0` and `retry-after-ms: 0`.
    RetryAfterZero,
    /// `429` with an OpenAI rate-limit body and `Retry-After:` an HTTP-date one hour ago.
    RetryAfterPast,
    /// A valid SSE answer whatever the request's `stream` said (a provider or gateway that
    /// always streams).
    SseAlways,
}

impl AnswerShape {
    /// Every shape, `normal` first.
    pub const ALL: [Self; 8] = [
        Self::Normal,
        Self::TruncatedJson,
        Self::Html200,
        Self::SseNoDone,
        Self::Overload200,
        Self::RetryAfterZero,
        Self::RetryAfterPast,
        Self::SseAlways,
    ];

    /// The shape's name, as in `PUT /control` (`"answer"`), `--answer` and `cases.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::TruncatedJson => "truncated_json",
            Self::Html200 => "html_200",
            Self::SseNoDone => "sse_no_done",
            Self::Overload200 => "overload_200",
            Self::RetryAfterZero => "retry_after_zero",
            Self::RetryAfterPast => "retry_after_past",
            Self::SseAlways => "sse_always",
        }
    }

    /// The shape named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// The body of [`AnswerShape::Html200`].
pub const HTML_502: &str = "<html><body><h1>502 Bad Gateway</h1></body></html>";

/// The body of [`AnswerShape::Overload200`].
pub const OVERLOAD_200: &str =
    r#"{"error":{"message":"服务器繁忙，请稍后再试","type":"server_error"}}"#;

/// `t` as an HTTP-date (IMF-fixdate, RFC 9110 5.6.7): `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // 1970-01-01 was a Thursday.
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]
        .get((days % 7) as usize)
        .copied()
        .unwrap_or("Thu");
    let (year, month, day) = civil_from_days(days as i64);
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .get((month - 1) as usize)
    .copied()
    .unwrap_or("Jan");
    format!("{weekday}, {day:02} {month} {year} {h:02}:{m:02}:{s:02} GMT")
}

/// An HTTP-date one hour before now.
pub fn an_hour_ago() -> String {
    http_date(
        SystemTime::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or(UNIX_EPOCH),
    )
}

/// Year, month (1-12) and day of the month of `days` since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_are_imf_fixdates() {
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(http_date(t), "Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[test]
    fn names_round_trip() {
        for s in AnswerShape::ALL {
            assert_eq!(AnswerShape::parse(s.name()), Some(s));
            let json = serde_json::to_string(&s).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", s.name()));
        }
        assert_eq!(AnswerShape::parse("nope"), None);
    }
}
