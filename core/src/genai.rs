//! The rules behind the OpenTelemetry GenAI metrics both hosts publish
//! (`gen_ai.client.operation.duration`, `gen_ai.client.operation.time_to_first_chunk`,
//! `gen_ai.client.token.usage`, see `docs/metrics.md`): the token usage an answer reports,
//! the `error.type` of a request's outcome, and the bounded `gen_ai.request.model` label.
//!
//! Why here and not in the hosts: the Envoy filter and the npm package must publish the same
//! values under the same rules, and an answer is provider input (anything may arrive), so the
//! reading is done once, never panics, and is tested here.
//!
//! Why the model label is bounded: a request's `model` is whatever the caller wrote, and every
//! distinct value is a new time series in Prometheus (a new stat in Envoy, kept for the life of
//! the process). The models the configuration names plus the first [`MODEL_LABELS_SEEN`] others
//! seen get their own label; any further one is `_OTHER`, as the OpenTelemetry conventions
//! recommend for values past a cardinality limit.

use crate::config::Config;
use crate::engine::RequestOutcome;
use crate::json::{parse, Value};
use alloc::string::String;
use alloc::vec::Vec;

/// Tokens an answer says it used (`usage.prompt_tokens`, `usage.completion_tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// `gen_ai.token.type="input"`: `prompt_tokens`.
    pub input: u64,
    /// `gen_ai.token.type="output"`: `completion_tokens`.
    pub output: u64,
}

/// The counts of a `usage` object (`{"prompt_tokens": .., "completion_tokens": ..}`); `None`
/// when they are not non-negative integers. A missing count of the two is 0 (some providers
/// omit `completion_tokens` for embeddings-like answers); both missing is `None`.
fn counts(usage: &Value) -> Option<Usage> {
    if !matches!(usage, Value::Object(_)) {
        return None;
    }
    let count = |k: &str| match usage.get(k) {
        None | Some(Value::Null) => Some(None),
        Some(v) => v.as_u64().map(Some),
    };
    let (input, output) = (count("prompt_tokens")?, count("completion_tokens")?);
    if input.is_none() && output.is_none() {
        return None;
    }
    Some(Usage {
        input: input.unwrap_or(0),
        output: output.unwrap_or(0),
    })
}

/// The token usage a complete answer reports: a JSON chat completion's `usage`, or, for a
/// server-sent-event stream, the last `data:` event that carries one (the chunk a provider
/// sends before `[DONE]` when the request asked for `stream_options.include_usage`). No usage,
/// a `null` one, a usage object cut short, not JSON, not UTF-8: `None`. Never panics.
///
/// Hosts call it on answers already judged complete (`answer::assess`), so only the `usage`
/// object is parsed, not the whole answer: the last `"usage"` key's object, found by a scan
/// that skips strings (a `"usage"` followed by `:` outside a string can only be a key).
/// Parsing the whole answer into a tree again cost the Envoy filter's pass-through path about
/// 17,000 instructions per request (callgrind, `examples/hot_path`).
pub fn usage(body: &[u8]) -> Option<Usage> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body.get(start) == Some(&b'{') {
        return usage_in(body);
    }
    let mut scan = UsageScan::default();
    scan.feed(body);
    scan.finish()
}

/// The usage of a JSON object's last `"usage"` key whose value is an object.
fn usage_in(json: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = json.len();
    // (Compared only where a quote is: a window compare at every byte cost more than the parse.)
    while let Some(at) = json.get(..end)?.iter().rposition(|&b| b == b'"') {
        if json.get(at..at + KEY.len()) != Some(KEY) {
            end = at;
            continue;
        }
        let after = json.get(at + KEY.len()..)?;
        if let Some(value) = trim_start(after).strip_prefix(b":") {
            return counts(&parse(object_at(trim_start(value))?).ok()?);
        }
        end = at;
    }
    None
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let skip = bytes.iter().take_while(|b| b.is_ascii_whitespace()).count();
    bytes.get(skip..).unwrap_or_default()
}

/// The JSON object `text` starts with, up to its matching `}` (strings skipped), or `None`
/// if it does not start with one or is cut short.
fn object_at(text: &[u8]) -> Option<&[u8]> {
    if text.first() != Some(&b'{') {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in text.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return text.get(..=i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The longest SSE line [`UsageScan`] keeps while it waits for the line's end: a usage chunk
/// is a few hundred bytes; a content chunk longer than this cannot be the usage one.
pub const MAX_USAGE_LINE: usize = 8 * 1024;

/// Reads a server-sent-event stream chunk by chunk, as it passes, for the usage its last
/// usage-bearing `data:` event reports (see [`usage`]). Keeps at most one partial line of
/// [`MAX_USAGE_LINE`] bytes, and parses only lines that mention `"usage"`.
#[derive(Debug, Clone, Default)]
pub struct UsageScan {
    line: Vec<u8>,
    /// The current line is longer than [`MAX_USAGE_LINE`]: skipped to its end.
    skipping: bool,
    found: Option<Usage>,
}

impl UsageScan {
    /// Reads the next bytes of the stream.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n' || b == b'\r');
            let (part, rest, ended) = match end {
                Some(i) => {
                    let (part, rest) = bytes.split_at(i);
                    (part, rest.get(1..).unwrap_or_default(), true)
                }
                None => (bytes, &[][..], false),
            };
            if !self.skipping {
                if self.line.len() + part.len() > MAX_USAGE_LINE {
                    self.skipping = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(part);
                }
            }
            if ended {
                self.end_line();
            }
            bytes = rest;
        }
    }

    fn end_line(&mut self) {
        if !self.skipping {
            if let Some(found) = line_usage(&self.line) {
                self.found = Some(found);
            }
        }
        self.skipping = false;
        self.line.clear();
    }

    /// The usage seen so far, the stream's last line included even without its line end.
    pub fn finish(&mut self) -> Option<Usage> {
        if !self.line.is_empty() || self.skipping {
            self.end_line();
        }
        self.found
    }
}

/// The usage of one SSE line, if it is a `data:` event carrying one.
fn line_usage(line: &[u8]) -> Option<Usage> {
    let data = line.strip_prefix(b"data:")?;
    usage_in(trim_start(data))
}

/// The `error.type` of a request that ended so (the outcome's label), or `None` for an answer:
/// a provider's success, a cache hit (fresh or stale) and a provider's caller-error answer
/// passed through (the provider answered; the caller's mistake is not an operation error, and
/// its 4xx reaches the caller as it is).
pub fn error_type(outcome: RequestOutcome) -> Option<&'static str> {
    match outcome {
        RequestOutcome::Success
        | RequestOutcome::Cached
        | RequestOutcome::Stale
        | RequestOutcome::CallerError => None,
        RequestOutcome::RateLimited
        | RequestOutcome::Shed
        | RequestOutcome::Failed
        | RequestOutcome::DeadlineExceeded
        | RequestOutcome::Cancelled => Some(outcome.label()),
    }
}

/// How many models outside the configuration get their own `gen_ai.request.model` label.
pub const MODEL_LABELS_SEEN: usize = 16;

/// The label of models past the bound.
pub const OTHER_MODEL: &str = "_OTHER";

/// The longest model label; a longer name is `_OTHER`.
pub const MAX_MODEL_LABEL: usize = 128;

/// Hands out bounded `gen_ai.request.model` labels (see the module's documentation).
#[derive(Debug, Clone, Default)]
pub struct ModelLabels {
    configured: Vec<String>,
    seen: Vec<String>,
}

impl ModelLabels {
    /// The labels for this configuration: every model its providers' `models` mappings name
    /// (the callers' names) always have their own label.
    pub fn new(config: &Config) -> Self {
        let mut configured: Vec<String> = Vec::new();
        for p in &config.providers {
            for name in p.models.keys() {
                if labelable(name) && !configured.contains(name) {
                    configured.push(name.clone());
                }
            }
        }
        Self {
            configured,
            seen: Vec::new(),
        }
    }

    /// The label of a request's model: the name itself while the bound allows, else
    /// [`OTHER_MODEL`]. Names with characters outside letters, digits and `-_.:/@+` or longer
    /// than [`MAX_MODEL_LABEL`] are `_OTHER` too (labels end up in stat names and queries). An
    /// empty model (none given) is `_OTHER`.
    pub fn label(&mut self, model: &str) -> &str {
        if !labelable(model) {
            return OTHER_MODEL;
        }
        if let Some(m) = self.configured.iter().find(|m| *m == model) {
            return m;
        }
        if let Some(i) = self.seen.iter().position(|m| m == model) {
            return self.seen.get(i).map_or(OTHER_MODEL, String::as_str);
        }
        if self.seen.len() < MODEL_LABELS_SEEN {
            self.seen.push(String::from(model));
            if let Some(last) = self.seen.last() {
                return last;
            }
        }
        OTHER_MODEL
    }
}

fn labelable(model: &str) -> bool {
    !model.is_empty()
        && model.len() <= MAX_MODEL_LABEL
        && model != OTHER_MODEL
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@+".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(input: u64, output: u64) -> Option<Usage> {
        Some(Usage { input, output })
    }

    #[test]
    fn reads_a_completions_usage() {
        let body = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
        assert_eq!(usage(body), u(12, 7));
        assert_eq!(usage(br#" {"usage":{"prompt_tokens":3}}"#), u(3, 0));
        assert_eq!(usage(br#"{"usage":{"completion_tokens":4}}"#), u(0, 4));
    }

    #[test]
    fn reads_a_usage_with_nested_details() {
        // DeepSeek and OpenAI add objects and arrays inside `usage` (cache and reasoning
        // details): the whole object is read, not cut at the first inner `}`.
        let body = br#"{"usage":{"prompt_tokens_details":{"cached_tokens":4},"x":[1,{"y":[]}],"prompt_tokens":12,"completion_tokens":7}}"#;
        assert_eq!(usage(body), u(12, 7));
        // Brackets and escaped quotes inside its strings are text, not structure.
        let body = br#"{"usage":{"note":"a}b]\"{","prompt_tokens":2,"completion_tokens":3}}"#;
        assert_eq!(usage(body), u(2, 3));
    }

    #[test]
    fn no_usage_is_none() {
        for body in [
            &b""[..],
            b"   ",
            b"{}",
            br#"{"usage":null}"#,
            br#"{"usage":{}}"#,
            br#"{"usage":[1,2]}"#,
            br#"{"usage":{"prompt_tokens":-1,"completion_tokens":2}}"#,
            br#"{"usage":{"prompt_tokens":1.5}}"#,
            br#"{"usage":{"prompt_tokens":"3"}}"#,
            br#"{"usage":{"prompt_tokens":99999999999999999999999}}"#,
            br#"{"usage":{"prompt_tokens":3"#,
            br#"{"usage":{"prompt_tokens":3,"x":"}"#,
            br#"{"id":"usage","choices":[]}"#,
            br#"{"id":"\"usage\": {\"prompt_tokens\": 5}","choices":[]}"#,
            b"not json",
            b"\xff\xfe{\"usage\":",
        ] {
            assert_eq!(usage(body), None, "{:?}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn reads_the_usage_chunk_of_a_stream() {
        let stream = concat!(
            ": keep-alive\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":9}}\r\n\r\n",
            "data: [DONE]\n\n"
        );
        assert_eq!(usage(stream.as_bytes()), u(5, 9));
        // Cut anywhere, chunk by chunk, the same.
        for cut in 0..stream.len() {
            let mut scan = UsageScan::default();
            scan.feed(&stream.as_bytes()[..cut]);
            scan.feed(&stream.as_bytes()[cut..]);
            assert_eq!(scan.finish(), u(5, 9), "cut at {cut}");
        }
        // Without the usage chunk: none.
        assert_eq!(usage(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n"), None);
        // The last one wins; a line without its end still counts.
        assert_eq!(
            usage(
                b"data: {\"usage\":{\"prompt_tokens\":1}}\ndata: {\"usage\":{\"prompt_tokens\":2}}"
            ),
            u(2, 0)
        );
    }

    #[test]
    fn an_overlong_line_is_skipped_not_kept() {
        let mut scan = UsageScan::default();
        let mut long = b"data: {\"usage\":{\"prompt_tokens\":1},\"pad\":\"".to_vec();
        long.extend(core::iter::repeat_n(b'x', MAX_USAGE_LINE));
        long.extend_from_slice(b"\"}\n");
        scan.feed(&long);
        assert!(scan.line.len() <= MAX_USAGE_LINE);
        assert_eq!(scan.finish(), None);
        scan.feed(b"data: {\"usage\":{\"completion_tokens\":2}}\n");
        assert_eq!(scan.finish(), u(0, 2));
        // A usage line of a few kilobytes (a long id, a system fingerprint, the last delta) is
        // within the bound, fed in pieces: it is read.
        let mut scan = UsageScan::default();
        let mut line = b"data: {\"id\":\"".to_vec();
        line.extend(core::iter::repeat_n(b'y', 4000));
        line.extend_from_slice(b"\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n");
        for piece in line.chunks(700) {
            scan.feed(piece);
        }
        assert_eq!(scan.finish(), u(3, 4));
    }

    #[test]
    fn error_types() {
        use RequestOutcome::*;
        for o in [Success, Cached, Stale, CallerError] {
            assert_eq!(error_type(o), None);
        }
        assert_eq!(error_type(RateLimited), Some("rate_limited"));
        assert_eq!(error_type(Shed), Some("shed"));
        assert_eq!(error_type(Failed), Some("failed"));
        assert_eq!(error_type(DeadlineExceeded), Some("deadline_exceeded"));
        assert_eq!(error_type(Cancelled), Some("cancelled"));
    }

    #[test]
    fn model_labels_are_bounded() {
        let config = Config::from_json(
            br#"{"providers":[{"name":"a","cluster":"a","models":{"gpt-4.1":"x"}},{"name":"b","cluster":"b"}]}"#,
        )
        .unwrap();
        let mut labels = ModelLabels::new(&config);
        for i in 0..MODEL_LABELS_SEEN {
            let m = alloc::format!("m{i}.5");
            assert_eq!(labels.label(&m), m);
        }
        assert_eq!(labels.label("one-too-many"), OTHER_MODEL);
        // Configured and already seen ones keep theirs.
        assert_eq!(labels.label("gpt-4.1"), "gpt-4.1");
        assert_eq!(labels.label("m3.5"), "m3.5");
        for bad in ["", "a b", "x\"y", "é", OTHER_MODEL] {
            assert_eq!(ModelLabels::default().label(bad), OTHER_MODEL, "{bad:?}");
        }
        let long = "a".repeat(MAX_MODEL_LABEL + 1);
        assert_eq!(ModelLabels::default().label(&long), OTHER_MODEL);
        let ok = "meta-llama/Llama-3.1-8B:free@v1+x";
        assert_eq!(ModelLabels::default().label(ok), ok);
    }
}
