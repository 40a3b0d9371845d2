//! Real progress versus keep-alive bytes.
//!
//! Under load DeepSeek answers `200 OK` at once and then, for minutes, sends only blank lines
//! (non-streaming) or SSE comments such as `: keep-alive` (streaming) before inference starts, or
//! before it closes the connection without an answer. Idle timeouts never fire, because bytes
//! flow. The only defence is to look at the bytes: the detector is fed every chunk as it arrives
//! and says whether real content has started, so the host can enforce a *first-token deadline*
//! and a *stall timeout* on real progress, not on bytes.
//!
//! What counts as real progress:
//! - **SSE** (`text/event-stream`): a `data:` field with at least one non-whitespace byte of
//!   payload. Comment lines (starting with `:`), blank lines and other fields (`event:`, `id:`,
//!   `retry:`) do not count.
//! - **JSON** (anything else): any byte that is not JSON whitespace (space, tab, CR, LF).
//!
//! Chunks may split anywhere (inside `data:`, between `\r` and `\n`), so the detector keeps a
//! few bytes of line state, never the body. Memory is constant.

use crate::time::Nanos;

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Server-sent events.
    Sse,
    /// A JSON document (or anything that is not SSE).
    Json,
}

impl Framing {
    /// The framing for a `content-type` value (`text/event-stream` is SSE, anything else JSON).
    pub fn from_content_type(content_type: &str) -> Self {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("text/event-stream") {
            Self::Sse
        } else {
            Self::Json
        }
    }
}

/// Where the SSE parser is inside the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the start of a line.
    Start,
    /// Matched this many bytes of `data:` at the start of the line.
    FieldName(u8),
    /// Inside a `data:` payload, no non-whitespace byte yet.
    DataPayload,
    /// Inside a line that cannot be progress (comment, other field, or progress already seen).
    Skip,
    /// Just saw `\r`: a following `\n` belongs to the same line ending.
    AfterCr,
}

/// What one chunk showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Real content arrived for the first time in this chunk.
    FirstProgress,
    /// Real content arrived (not for the first time).
    Progress,
    /// Only keep-alive bytes (or nothing).
    KeepAlive,
}

/// Tracks real progress through a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressDetector {
    framing: Framing,
    line: Line,
    started_at: Nanos,
    first_progress_at: Option<Nanos>,
    last_progress_at: Option<Nanos>,
    bytes: u64,
    keepalive_bytes: u64,
}

const DATA: &[u8] = b"data:";

impl ProgressDetector {
    /// A detector for a body whose headers arrived at `started_at`.
    pub const fn new(framing: Framing, started_at: Nanos) -> Self {
        Self {
            framing,
            line: Line::Start,
            started_at,
            first_progress_at: None,
            last_progress_at: None,
            bytes: 0,
            keepalive_bytes: 0,
        }
    }

    /// Feeds one chunk received at `now`.
    pub fn feed(&mut self, now: Nanos, chunk: &[u8]) -> Feed {
        self.bytes = self.bytes.saturating_add(chunk.len() as u64);
        let progressed = match self.framing {
            Framing::Json => chunk.iter().any(|b| !is_json_ws(*b)),
            Framing::Sse => self.scan_sse(chunk),
        };
        if progressed {
            self.last_progress_at = Some(now);
            if self.first_progress_at.is_none() {
                self.first_progress_at = Some(now);
                return Feed::FirstProgress;
            }
            Feed::Progress
        } else {
            if self.first_progress_at.is_none() {
                self.keepalive_bytes = self.keepalive_bytes.saturating_add(chunk.len() as u64);
            }
            Feed::KeepAlive
        }
    }

    fn scan_sse(&mut self, chunk: &[u8]) -> bool {
        let mut progressed = false;
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            i += 1;
            if self.line == Line::AfterCr {
                self.line = Line::Start;
                if b == b'\n' {
                    continue;
                }
            }
            if b == b'\r' {
                self.line = Line::AfterCr;
                continue;
            }
            if b == b'\n' {
                self.line = Line::Start;
                continue;
            }
            self.line = match self.line {
                Line::Start | Line::AfterCr => {
                    if b == b'd' {
                        Line::FieldName(1)
                    } else {
                        Line::Skip
                    }
                }
                Line::FieldName(n) => {
                    let matched = DATA.get(usize::from(n)) == Some(&b);
                    match (matched, usize::from(n) + 1 == DATA.len()) {
                        (true, true) => Line::DataPayload,
                        (true, false) => Line::FieldName(n + 1),
                        (false, _) => Line::Skip,
                    }
                }
                Line::DataPayload => {
                    if b == b' ' || b == b'\t' {
                        Line::DataPayload
                    } else {
                        progressed = true;
                        Line::Skip
                    }
                }
                Line::Skip => Line::Skip,
            };
            if self.line == Line::Skip {
                // Nothing in the rest of this line can matter: jump to its end.
                let rest = chunk.get(i..).unwrap_or_default();
                i += rest
                    .iter()
                    .position(|&c| c == b'\n' || c == b'\r')
                    .unwrap_or(rest.len());
            }
        }
        progressed
    }

    /// When real content first arrived.
    pub const fn first_progress_at(&self) -> Option<Nanos> {
        self.first_progress_at
    }

    /// Time from the headers to the first real content (time to first token).
    pub fn time_to_first_progress(&self) -> Option<Nanos> {
        self.first_progress_at
            .map(|t| t.saturating_sub(self.started_at))
    }

    /// Whether real content has arrived.
    pub const fn has_progressed(&self) -> bool {
        self.first_progress_at.is_some()
    }

    /// Bytes seen in total.
    pub const fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Keep-alive bytes seen before the first real content.
    pub const fn keepalive_bytes(&self) -> u64 {
        self.keepalive_bytes
    }

    /// Whether no real content arrived within `first_token_deadline` of the start.
    pub fn missed_first_token(&self, now: Nanos, first_token_deadline: Nanos) -> bool {
        self.first_progress_at.is_none()
            && now.saturating_sub(self.started_at) >= first_token_deadline
    }

    /// Whether real content stopped for `stall_timeout` (or never started within it).
    pub fn stalled(&self, now: Nanos, stall_timeout: Nanos) -> bool {
        let since = self.last_progress_at.unwrap_or(self.started_at);
        now.saturating_sub(since) >= stall_timeout
    }

    /// What the whole body showed, for [`crate::classify`].
    pub const fn body_progress(&self) -> crate::classify::BodyProgress {
        if self.first_progress_at.is_some() {
            crate::classify::BodyProgress::Real
        } else {
            crate::classify::BodyProgress::KeepAliveOnly
        }
    }
}

const fn is_json_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::secs;

    #[test]
    fn sse_keepalive_is_not_progress() {
        let mut d = ProgressDetector::new(Framing::Sse, 0);
        assert_eq!(d.feed(1, b": keep-alive\n\n"), Feed::KeepAlive);
        assert_eq!(d.feed(2, b"\n\n\r\n"), Feed::KeepAlive);
        assert_eq!(
            d.feed(3, b"event: ping\nid: 3\nretry: 100\n\n"),
            Feed::KeepAlive
        );
        assert_eq!(d.feed(4, b"data: \n\n"), Feed::KeepAlive);
        assert!(!d.has_progressed());
        assert_eq!(
            d.feed(5, b"data: {\"choices\":[]}\n\n"),
            Feed::FirstProgress
        );
        assert_eq!(d.feed(6, b"data: [DONE]\n\n"), Feed::Progress);
        assert_eq!(d.time_to_first_progress(), Some(5));
    }

    #[test]
    fn sse_split_across_chunks() {
        let mut d = ProgressDetector::new(Framing::Sse, 0);
        for (i, piece) in [
            &b": keep"[..],
            b"-alive\r",
            b"\n\r\nda",
            b"ta",
            b":",
            b" ",
            b"{",
        ]
        .iter()
        .enumerate()
        {
            let f = d.feed(i as u64, piece);
            if i < 6 {
                assert_eq!(f, Feed::KeepAlive, "piece {i}");
            } else {
                assert_eq!(f, Feed::FirstProgress);
            }
        }
    }

    #[test]
    fn comment_mentioning_data_is_not_progress() {
        let mut d = ProgressDetector::new(Framing::Sse, 0);
        assert_eq!(d.feed(1, b": data: x\n"), Feed::KeepAlive);
        assert_eq!(d.feed(1, b" data: x\n"), Feed::KeepAlive);
        assert_eq!(d.feed(1, b"dat: x\n"), Feed::KeepAlive);
    }

    #[test]
    fn json_whitespace_is_not_progress() {
        let mut d = ProgressDetector::new(Framing::Json, 0);
        assert_eq!(d.feed(1, b"\n\n  \r\n\t"), Feed::KeepAlive);
        assert_eq!(
            d.body_progress(),
            crate::classify::BodyProgress::KeepAliveOnly
        );
        assert_eq!(d.keepalive_bytes(), 7);
        assert_eq!(d.feed(2, b"\n{\"id\":1}"), Feed::FirstProgress);
    }

    #[test]
    fn deadlines() {
        let mut d = ProgressDetector::new(Framing::Sse, secs(1));
        d.feed(secs(2), b": keep-alive\n\n");
        assert!(!d.missed_first_token(secs(2), secs(5)));
        assert!(d.missed_first_token(secs(6), secs(5)));
        assert!(d.stalled(secs(6), secs(5)));
        d.feed(secs(7), b"data: x\n\n");
        assert!(!d.missed_first_token(secs(30), secs(5)));
        assert!(!d.stalled(secs(8), secs(5)));
        assert!(d.stalled(secs(12), secs(5)));
    }

    #[test]
    fn content_type() {
        assert_eq!(
            Framing::from_content_type("text/event-stream; charset=utf-8"),
            Framing::Sse
        );
        assert_eq!(
            Framing::from_content_type("application/json"),
            Framing::Json
        );
        assert_eq!(Framing::from_content_type(""), Framing::Json);
    }
}
