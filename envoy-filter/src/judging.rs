//! Reading and judging one attempt's answer: what the filter holds of it, how its bytes are
//! decoded and fed to the progress detector, and the core's one verdict on it.
//!
//! Kept apart from the state machine because the same answer is read in three places (the
//! caller's stream, the upstream instance's context of a native attempt, a dispatched call's
//! whole answer) and must be judged the same way in each: the judge, the keep-alive detector,
//! the cache and the caller see the same, decoded bytes (`docs/envoy-filter.md`, "What counts as
//! an answer").

use crate::host::pairs;
use crate::routing::header;
use std::borrow::Cow;
use unbusy_core::answer::{assess, is_readable_encoding, Assessment, DoneTracker};
use unbusy_core::classify::{Classification, OutcomeClass};
use unbusy_core::encoding::{DecodeError, Decoder};
use unbusy_core::genai::{Usage, UsageScan};
use unbusy_core::progress::{Feed, Framing, ProgressDetector};
use unbusy_core::time::Nanos;

/// Answers larger than this are passed on without being held or cached.
pub const MAX_HELD_RESPONSE_BYTES: usize = 8 << 20;

/// How a router answer is read once its headers arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// A 200 stream: headers held until its first real event.
    HoldingStream,
    /// A 200 JSON answer: buffered whole.
    BufferingBody,
    /// An error: buffered for classification.
    BufferingError,
}

/// The current attempt's answer, as far as it has been read.
pub struct Answer {
    /// Its status.
    pub status: u16,
    /// Its headers (without `content-encoding` and `content-length` once decoded).
    pub headers: Vec<(String, String)>,
    /// Its body, decoded: the whole of a held answer, or what a stream kept for the cache.
    pub body: Vec<u8>,
    detector: ProgressDetector,
    /// Whether the streamed answer has ended with `data: [DONE]` so far.
    done: DoneTracker,
    /// The answer's encoding cannot be read (the provider ignored `accept-encoding: identity`):
    /// any byte counts as progress, and nothing is judged as text or cached.
    pub unreadable: bool,
    /// The answer is compressed although identity was asked for: it is decoded as it arrives,
    /// and the judge, the detector, the cache and the caller get the decoded bytes.
    decoder: Option<Decoder>,
    /// Why the compressed answer could not be decoded (it then counts as a server error).
    decode_failed: Option<DecodeError>,
    /// The decoded bytes of a held compressed answer so far.
    plain: Vec<u8>,
    /// How many bytes of the held body were fed so far.
    fed: usize,
    /// The answer is a complete, valid one that may be stored (see `answer::assess`).
    pub cacheable: bool,
    /// A stream's bytes are being kept for the cache.
    pub keep_body: bool,
    /// A streamed answer's `usage` chunk, looked for as the stream passes (for
    /// `gen_ai_client_token_usage`).
    pub usage_scan: UsageScan,
    /// A held answer's `usage`, read when it is delivered.
    pub usage: Option<Usage>,
}

impl Default for Answer {
    fn default() -> Self {
        Self {
            status: 0,
            headers: Vec::new(),
            body: Vec::new(),
            detector: ProgressDetector::new(Framing::Sse, 0),
            done: DoneTracker::new(),
            unreadable: false,
            decoder: None,
            decode_failed: None,
            plain: Vec::new(),
            fed: 0,
            cacheable: false,
            keep_body: false,
            usage_scan: UsageScan::default(),
            usage: None,
        }
    }
}

impl Answer {
    /// A router answer whose headers arrived at `now`, and how it is read. A 200 with
    /// `text/event-stream` is held until its first event; another 200 and any error are
    /// buffered; a missing or bad status is a 502.
    pub fn begin(now: Nanos, headers: Vec<(String, String)>) -> (Self, Reading) {
        let status = header(&headers, ":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(502);
        let content_type = header(&headers, "content-type").unwrap_or("").to_string();
        let reading = match status {
            200 if content_type.contains("event-stream") => Reading::HoldingStream,
            200 => Reading::BufferingBody,
            _ => Reading::BufferingError,
        };
        let encoding = header(&headers, "content-encoding");
        let decoder = Decoder::for_encoding(encoding);
        let unreadable = !is_readable_encoding(encoding) && decoder.is_none();
        let mut answer = Self {
            status,
            headers,
            detector: ProgressDetector::new(Framing::from_content_type(&content_type), now),
            decoder,
            unreadable,
            ..Self::default()
        };
        if answer.decoder.is_some() {
            answer
                .headers
                .retain(|(n, _)| !matches!(n.as_str(), "content-encoding" | "content-length"));
        }
        (answer, reading)
    }

    /// A whole answer (a dispatched call's), already judged.
    pub fn whole(
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        cacheable: bool,
    ) -> Self {
        Self {
            status,
            headers,
            body,
            cacheable,
            ..Self::default()
        }
    }

    /// Whether it is being decoded (compressed although identity was asked for).
    pub fn decoded(&self) -> bool {
        self.decoder.is_some()
    }

    /// Decodes a compressed answer's new bytes (as is without a decoder). A body that cannot
    /// be decoded yields nothing more, and is remembered as a failure.
    pub fn decode<'a>(&mut self, new: &'a [u8]) -> Cow<'a, [u8]> {
        let Some(decoder) = self.decoder.as_mut() else {
            return Cow::Borrowed(new);
        };
        let mut out = Vec::new();
        if let Err(e) = decoder.feed(new, &mut out, MAX_HELD_RESPONSE_BYTES) {
            self.decode_failed.get_or_insert(e);
            out.clear();
        }
        Cow::Owned(out)
    }

    /// The bytes of a held answer (`body`: all of it buffered so far) not seen before,
    /// decoded; a decoded answer also keeps them in `plain`.
    pub fn take_held<'a>(&mut self, body: &'a [u8]) -> Cow<'a, [u8]> {
        let new = self.decode(body.get(self.fed..).unwrap_or(&[]));
        self.fed = body.len();
        if self.decoder.is_some() {
            self.plain.extend_from_slice(&new);
        }
        new
    }

    /// The decoded bytes of a held answer so far (taken).
    pub fn take_plain(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.plain)
    }

    /// The compressed answer ended: whether all of it decoded.
    pub fn decode_finish(&mut self) -> bool {
        if let Some(Err(e)) = self.decoder.as_ref().map(Decoder::finish) {
            self.decode_failed.get_or_insert(e);
        }
        self.decode_failed.is_none()
    }

    /// Feeds the answer's new bytes to the progress detector. Compressed bytes cannot be told
    /// from keep-alive ones, so for an unreadable encoding any byte is progress.
    pub fn feed_progress(&mut self, now: Nanos, new: &[u8]) -> Feed {
        if self.unreadable && !new.is_empty() {
            Feed::FirstProgress
        } else {
            self.detector.feed(now, new)
        }
    }

    /// Feeds a stream's bytes to the `[DONE]` tracker.
    pub fn feed_done(&mut self, new: &[u8]) {
        self.done.feed(new);
    }

    /// Whether a stream that reached the caller is a whole answer: it ended with `[DONE]`
    /// (or cannot be read, and is then taken as it is).
    pub fn complete(&self) -> bool {
        self.unreadable || self.done.complete()
    }

    /// Keeps a streamed chunk for the cache while the answer fits in `max_entry_bytes`; past
    /// that, nothing more is kept (and it will not be cached).
    pub fn keep(&mut self, chunk: &[u8], max_entry_bytes: u64) {
        if !self.keep_body {
            return;
        }
        if (self.body.len() + chunk.len()) as u64 <= max_entry_bytes {
            self.body.extend_from_slice(chunk);
        } else {
            self.keep_body = false;
        }
    }

    /// Whether it is an SSE stream (the content type the cache replays it with).
    pub fn is_sse(&self) -> bool {
        header(&self.headers, "content-type")
            .is_some_and(|ct| Framing::from_content_type(ct) == Framing::Sse)
    }
}

/// What a complete (held) answer means, for the router's attempt and a dispatched one alike:
/// the core's one verdict (`unbusy_core::answer::assess`), which also says whether the answer
/// showed real progress and whether it may be cached.
pub fn judge(now: Nanos, status: u16, headers: &[(String, String)], body: &[u8]) -> Assessment {
    assess(status, &pairs(headers), body, Some(now / 1_000_000_000))
}

/// The verdict on an answer compressed in a way that could not be decoded (corrupt,
/// truncated or too large): a server error, retried or failed over, never cached.
pub fn undecodable() -> Assessment {
    Assessment {
        classification: Classification {
            class: OutcomeClass::ServerError,
            retry_after: None,
        },
        progressed: false,
        verdict: None,
        cacheable: false,
    }
}

/// Whether a held answer's verdict is reported to the engine as progress. For a stream
/// request, progress means the stream reached the caller (it can no longer be retried), so only
/// a success is; any other real answer ends the first-byte wait.
pub fn progress_to_report(verdict: &Assessment, stream: bool) -> bool {
    verdict.progressed && (!stream || verdict.classification.class == OutcomeClass::Success)
}

/// A dispatched call's whole answer, decoded if it came compressed although identity was
/// asked for: its headers (without the encoding's), its body and whether it decoded.
pub fn decode_call(
    mut headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> (Vec<(String, String)>, Vec<u8>, bool) {
    match Decoder::decode_all(
        header(&headers, "content-encoding"),
        &body,
        MAX_HELD_RESPONSE_BYTES,
    ) {
        Some(result) => {
            headers.retain(|(n, _)| !matches!(n.as_str(), "content-encoding" | "content-length"));
            let decoded = result.is_ok();
            (headers, result.unwrap_or_default(), decoded)
        }
        None => (headers, body, true),
    }
}
