//! Hostcalls as the filter uses them: every one returns `Option`/`bool` instead of panicking,
//! because a panic kills the worker's VM and every later request on it. (The SDK's trait
//! helpers `unwrap` hostcall errors; the filter never uses them.)

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use std::time::{Duration, UNIX_EPOCH};
use unbusy_core::time::Nanos;

/// Envoy's wall clock in nanoseconds since the Unix epoch: the same on every worker, so it can
/// time state shared between workers.
pub fn now() -> Nanos {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Logs at info level.
pub fn info(message: &str) {
    let _ = hostcalls::log(proxy_wasm::types::LogLevel::Info, message);
}

/// Logs at warn level.
pub fn warn(message: &str) {
    let _ = hostcalls::log(proxy_wasm::types::LogLevel::Warn, message);
}

/// Logs at error level.
pub fn error(message: &str) {
    let _ = hostcalls::log(proxy_wasm::types::LogLevel::Error, message);
}

/// Borrowed `(name, value)` pairs, the shape hostcalls and the classifier take.
pub fn pairs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

/// Makes `context_id` the one later hostcalls act on.
pub fn enter(context_id: u32) -> bool {
    hostcalls::set_effective_context(context_id).is_ok()
}

/// A buffer's bytes (`max` at most).
pub fn buffer(kind: BufferType, max: usize) -> Option<Vec<u8>> {
    hostcalls::get_buffer(kind, 0, max).ok().flatten()
}

/// Replaces a whole buffer.
pub fn set_buffer(kind: BufferType, size: usize, value: &[u8]) -> bool {
    hostcalls::set_buffer(kind, 0, size, value).is_ok()
}

/// A header (or pseudo-header) value.
pub fn header(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value(map, name).ok().flatten()
}

/// Every header of a map.
pub fn headers(map: MapType) -> Vec<(String, String)> {
    hostcalls::get_map(map).unwrap_or_default()
}

/// Sets (or with `None`, removes) a header.
pub fn set_header(map: MapType, name: &str, value: Option<&str>) -> bool {
    hostcalls::set_map_value(map, name, value).is_ok()
}

/// Answers the current stream locally.
pub fn send_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
    // `send_http_response` panics on an unexpected status; Envoy only returns Ok or a
    // documented error for a live stream, which is the only kind the filter answers.
    hostcalls::send_http_response(u32::from(status), headers.to_vec(), Some(body)).is_ok()
}

/// Lets the paused request go on.
pub fn resume_request() -> bool {
    hostcalls::resume_http_request().is_ok()
}

/// Lets the paused response go on.
pub fn resume_response() -> bool {
    hostcalls::resume_http_response().is_ok()
}

/// Sends a request to `cluster` outside the stream; the answer arrives in
/// `on_http_call_response` with the returned token.
pub fn dispatch(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<u32, Status> {
    hostcalls::dispatch_http_call(cluster, headers.to_vec(), Some(body), vec![], timeout)
}

/// Shared data (process-wide per VM id) with its compare-and-swap token.
pub fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    hostcalls::get_shared_data(key).unwrap_or((None, None))
}

/// Stores shared data if `cas` still matches; `false` when another worker won the race.
pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> bool {
    hostcalls::set_shared_data(key, Some(value), cas).is_ok()
}

/// Defines a metric; `None` if the host refused it (metrics are then skipped).
pub fn metric(kind: MetricType, name: &str) -> Option<u32> {
    hostcalls::define_metric(kind, name).ok()
}

/// Adds to a counter or gauge.
pub fn bump(id: Option<u32>, by: i64) {
    if let Some(id) = id {
        let _ = hostcalls::increment_metric(id, by);
    }
}

/// Sets a gauge or records a histogram value.
pub fn record(id: Option<u32>, value: u64) {
    if let Some(id) = id {
        let _ = hostcalls::record_metric(id, value);
    }
}
