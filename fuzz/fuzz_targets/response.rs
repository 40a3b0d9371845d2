//! Response bytes as the hosts read them: status, headers (retry hints in every form), the
//! body's first bytes (classification), and the stream (progress detection across any chunk
//! split). Nothing may panic, and progress must not depend on how the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unbusy_core::classify::{classify, retry_hint, BodyProgress, Response};
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
    for progress in [BodyProgress::Real, BodyProgress::KeepAliveOnly] {
        let c = classify(&Response {
            status,
            headers: &headers,
            body_prefix: rest,
            progress,
            unix_now_s: Some(1_800_000_000),
        });
        if status == 200 && progress == BodyProgress::Real {
            let _ = c;
        }
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
});
