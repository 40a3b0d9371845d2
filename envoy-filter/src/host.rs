//! Hostcalls as the filter uses them: every one returns `Option`/`bool` instead of panicking,
//! because a panic kills the worker's VM and every later request on it. They go through
//! [`crate::abi`], never the SDK's `hostcalls` (which panic on statuses they did not expect
//! and on header bytes that are not UTF-8).

use crate::abi::{self, Direction, Level, Metric, OK};
use std::time::Duration;
use unbusy_core::time::Nanos;

pub use crate::abi::{Buffer, Map};

/// Envoy's wall clock in nanoseconds since the Unix epoch: the same on every worker, so it can
/// time state shared between workers.
pub fn now() -> Nanos {
    abi::now_nanos().unwrap_or(0)
}

/// Logs at info level.
pub fn info(message: &str) {
    let _ = abi::log(Level::Info, message);
}

/// Logs at warn level.
pub fn warn(message: &str) {
    let _ = abi::log(Level::Warn, message);
}

/// Logs at error level.
pub fn error(message: &str) {
    let _ = abi::log(Level::Error, message);
}

/// Asks for the root context's `on_tick` every `period`.
pub fn set_tick_period(period: Duration) -> bool {
    abi::set_tick_period(u32::try_from(period.as_millis()).unwrap_or(u32::MAX)) == OK
}

/// Borrowed `(name, value)` pairs, the shape hostcalls and the classifier take.
pub fn pairs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

/// A host property (`["plugin_root_id"]`, `["xds", "upstream_host_metadata", ...]`).
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    abi::property(path)
}

/// Makes `context_id` the one later hostcalls act on.
pub fn enter(context_id: u32) -> bool {
    abi::set_effective_context(context_id) == OK
}

/// A buffer's bytes (`max` at most).
pub fn buffer(kind: Buffer, max: usize) -> Option<Vec<u8>> {
    abi::buffer(kind, max)
}

/// Replaces a whole buffer.
pub fn set_buffer(kind: Buffer, size: usize, value: &[u8]) -> bool {
    abi::set_buffer(kind, size, value) == OK
}

/// A header (or pseudo-header) value (bytes that are not UTF-8 replaced).
pub fn header(map: Map, name: &str) -> Option<String> {
    abi::header(map, name)
}

/// Every header of a map.
pub fn headers(map: Map) -> Vec<(String, String)> {
    abi::headers(map)
}

/// Sets (or with `None`, removes) a header; `false` if the host refused (the map is gone).
pub fn set_header(map: Map, name: &str, value: Option<&str>) -> bool {
    abi::set_header(map, name, value) == OK
}

/// Answers the current stream locally.
pub fn send_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
    abi::send_response(status, headers, body) == OK
}

/// Lets the paused request go on.
pub fn resume_request() -> bool {
    abi::resume(Direction::Request) == OK
}

/// Lets the paused response go on.
pub fn resume_response() -> bool {
    abi::resume(Direction::Response) == OK
}

/// Cuts the current stream's response (the caller sees it end short, with an error).
pub fn reset_response() -> bool {
    abi::close(Direction::Response) == OK
}

/// Sends a request to `cluster` outside the stream; the answer arrives in
/// `on_http_call_response` with the returned token.
///
/// This one goes through the SDK: its dispatcher must record the token to route the answer
/// back (and fails on an answer whose token it does not know). Envoy answers it only with
/// success, `BadArgument` (unknown cluster, bad headers) or `InternalFailure`, which the SDK
/// returns as errors.
pub fn dispatch(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<u32, proxy_wasm::types::Status> {
    proxy_wasm::hostcalls::dispatch_http_call(
        cluster,
        headers.to_vec(),
        Some(body),
        Vec::new(),
        timeout,
    )
}

/// Shared data (process-wide per VM id) with its compare-and-swap token.
pub fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    abi::shared_get(key)
}

/// Stores shared data if `cas` still matches; `false` when another worker won the race.
pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> bool {
    abi::shared_set(key, value, cas) == OK
}

/// Metric kinds.
pub use crate::abi::Metric as MetricKind;

/// Defines a metric; `None` if the host refused it (metrics are then skipped).
pub fn metric(kind: Metric, name: &str) -> Option<u32> {
    abi::define_metric(kind, name)
}

/// Adds to a counter or gauge.
pub fn bump(id: Option<u32>, by: i64) {
    if let Some(id) = id {
        let _ = abi::increment_metric(id, by);
    }
}

/// Sets a gauge or records a histogram value.
pub fn record(id: Option<u32>, value: u64) {
    if let Some(id) = id {
        let _ = abi::record_metric(id, value);
    }
}
