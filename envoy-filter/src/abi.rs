//! The proxy-wasm host ABI, called directly.
//!
//! Why not the SDK's `hostcalls`: almost every one of them `panic!`s when the host returns a
//! status it did not expect (setting a request header after the request went upstream,
//! resuming a stream that already ended), and its header readers `unwrap` UTF-8, so a caller
//! who sends a header with a byte above 0x7f would panic the VM. A panic kills the worker's
//! VM and every later request on it. Here every call returns the host's status, byte strings
//! are decoded lossily, and [`crate::host`] turns failures into `None`/`false`. The SDK is
//! still used for what it does well: the callback dispatch, its memory allocator (which the
//! host calls to hand over returned buffers), and `dispatch_http_call` (its dispatcher must
//! record the call's token).

use std::ptr::{null, null_mut};

/// The host's status for a call; `0` is success.
pub type Status = u32;
/// Success.
pub const OK: Status = 0;

/// Header maps (proxy-wasm `MapType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Map {
    /// The request's headers.
    RequestHeaders = 0,
    /// The response's headers.
    ResponseHeaders = 2,
    /// The headers of a dispatched call's answer.
    CallResponseHeaders = 6,
}

/// Buffers (proxy-wasm `BufferType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Buffer {
    /// The request body received so far.
    RequestBody = 0,
    /// The response body received so far.
    ResponseBody = 1,
    /// A dispatched call's answer body.
    CallResponseBody = 4,
    /// The plugin configuration.
    PluginConfiguration = 7,
}

/// Which direction of a stream to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Direction {
    /// The request.
    Request = 0,
    /// The response.
    Response = 1,
}

/// Metric kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Metric {
    /// Only goes up.
    Counter = 0,
    /// Set to a value.
    Gauge = 1,
    /// Records values.
    Histogram = 2,
}

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Level {
    /// Info.
    Info = 2,
    /// Warn.
    Warn = 3,
    /// Error.
    Error = 4,
}

/// Declares the host's imports once: on wasm they are the `env` module's functions; off wasm
/// (the crate's native tests) there is no host, and each fails cleanly with a status.
macro_rules! host_imports {
    ($(fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> Status;)*) => {
        #[cfg(target_arch = "wasm32")]
        #[link(wasm_import_module = "env")]
        extern "C" {
            $(fn $name($($arg: $ty),*) -> Status;)*
        }

        $(
            #[cfg(not(target_arch = "wasm32"))]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name($($arg: $ty),*) -> Status {
                let _ = ($($arg,)*);
                12 // unimplemented
            }
        )*
    };
}

host_imports! {
    fn proxy_log(level: u32, data: *const u8, size: usize) -> Status;
    fn proxy_get_current_time_nanoseconds(out: *mut u64) -> Status;
    fn proxy_set_tick_period_milliseconds(period: u32) -> Status;
    fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        out: *mut *mut u8,
        out_size: *mut usize,
    ) -> Status;
    fn proxy_set_buffer_bytes(
        kind: u32,
        start: usize,
        size: usize,
        data: *const u8,
        data_size: usize,
    ) -> Status;
    fn proxy_get_header_map_pairs(map: u32, out: *mut *mut u8, out_size: *mut usize) -> Status;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        out: *mut *mut u8,
        out_size: *mut usize,
    ) -> Status;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> Status;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> Status;
    fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        out: *mut *mut u8,
        out_size: *mut usize,
    ) -> Status;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        out: *mut *mut u8,
        out_size: *mut usize,
        out_cas: *mut u32,
    ) -> Status;
    fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> Status;
    fn proxy_continue_stream(direction: u32) -> Status;
    fn proxy_close_stream(direction: u32) -> Status;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> Status;
    fn proxy_set_effective_context(context: u32) -> Status;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, out: *mut u32) -> Status;
    fn proxy_increment_metric(id: u32, by: i64) -> Status;
    fn proxy_record_metric(id: u32, value: u64) -> Status;
}

/// Takes ownership of a buffer the host allocated through the SDK's allocator.
///
/// # Safety
/// `data` must be null or a buffer of `size` bytes from `proxy_on_memory_allocate`.
unsafe fn owned(data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if data.is_null() {
        return None;
    }
    // SAFETY: the host wrote `size` bytes into a buffer it obtained from the SDK's allocator,
    // which allocates a boxed slice of exactly `size` bytes.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

/// Serialises header pairs in the ABI's map format: a count, the sizes, then each name and
/// value followed by a NUL.
pub fn serialize_map(pairs: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(n, v)| n.len() + v.len() + 10)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (n, v) in pairs {
        out.extend_from_slice(&(n.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (n, v) in pairs {
        out.extend_from_slice(n.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Reads the ABI's map format; malformed input gives the pairs read so far, bytes that are
/// not UTF-8 are replaced (never a panic).
pub fn deserialize_map(bytes: &[u8]) -> Vec<(String, String)> {
    let word = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(b) as usize)
    };
    let Some(count) = word(0) else {
        return Vec::new();
    };
    let mut pairs = Vec::with_capacity(count.min(256));
    let Some(mut at) = count.checked_mul(8).and_then(|n| n.checked_add(4)) else {
        return pairs;
    };
    for i in 0..count {
        let (Some(n), Some(v)) = (word(4 + i * 8), word(8 + i * 8)) else {
            break;
        };
        let name = bytes.get(at..at.saturating_add(n));
        at = at.saturating_add(n).saturating_add(1);
        let value = bytes.get(at..at.saturating_add(v));
        at = at.saturating_add(v).saturating_add(1);
        let (Some(name), Some(value)) = (name, value) else {
            break;
        };
        pairs.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    pairs
}

/// Writes a log line.
pub fn log(level: Level, message: &str) -> Status {
    // SAFETY: a pointer and length of a live string.
    unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) }
}

/// The host's wall clock in nanoseconds.
pub fn now_nanos() -> Option<u64> {
    let mut t = 0u64;
    // SAFETY: `t` outlives the call.
    (unsafe { proxy_get_current_time_nanoseconds(&mut t) } == OK).then_some(t)
}

/// Sets the root context's tick period.
pub fn set_tick_period(ms: u32) -> Status {
    // SAFETY: plain value.
    unsafe { proxy_set_tick_period_milliseconds(ms) }
}

/// Up to `max` bytes of a buffer.
pub fn buffer(kind: Buffer, max: usize) -> Option<Vec<u8>> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: out-pointers outlive the call; the returned buffer is taken over by `owned`.
    unsafe {
        if proxy_get_buffer_bytes(kind as u32, 0, max, &mut data, &mut size) != OK {
            return None;
        }
        owned(data, size)
    }
}

/// Replaces `size` bytes at the start of a buffer with `value`.
pub fn set_buffer(kind: Buffer, size: usize, value: &[u8]) -> Status {
    // SAFETY: a pointer and length of a live slice.
    unsafe { proxy_set_buffer_bytes(kind as u32, 0, size, value.as_ptr(), value.len()) }
}

/// Every pair of a header map.
pub fn headers(map: Map) -> Vec<(String, String)> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in `buffer`.
    let bytes = unsafe {
        if proxy_get_header_map_pairs(map as u32, &mut data, &mut size) != OK {
            return Vec::new();
        }
        owned(data, size)
    };
    bytes.map(|b| deserialize_map(&b)).unwrap_or_default()
}

/// One header's value.
pub fn header(map: Map, name: &str) -> Option<String> {
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in `buffer`.
    let bytes = unsafe {
        if proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), &mut data, &mut size)
            != OK
        {
            return None;
        }
        owned(data, size)
    }?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Sets (or with `None`, removes) a header.
pub fn set_header(map: Map, name: &str, value: Option<&str>) -> Status {
    // SAFETY: pointers and lengths of live strings.
    unsafe {
        match value {
            Some(v) => proxy_replace_header_map_value(
                map as u32,
                name.as_ptr(),
                name.len(),
                v.as_ptr(),
                v.len(),
            ),
            None => proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()),
        }
    }
}

/// A property by path.
pub fn property(path: &[&str]) -> Option<Vec<u8>> {
    let joined = path.join("\0");
    let (mut data, mut size) = (null_mut(), 0usize);
    // SAFETY: as in `buffer`.
    unsafe {
        if proxy_get_property(joined.as_ptr(), joined.len(), &mut data, &mut size) != OK {
            return None;
        }
        owned(data, size)
    }
}

/// Shared data and its compare-and-swap token.
pub fn shared_get(key: &str) -> (Option<Vec<u8>>, Option<u32>) {
    let (mut data, mut size, mut cas) = (null_mut(), 0usize, 0u32);
    // SAFETY: as in `buffer`.
    unsafe {
        if proxy_get_shared_data(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) != OK {
            return (None, None);
        }
        (owned(data, size), (cas != 0).then_some(cas))
    }
}

/// Stores shared data if `cas` still matches.
pub fn shared_set(key: &str, value: &[u8], cas: Option<u32>) -> Status {
    // SAFETY: pointers and lengths of live data.
    unsafe {
        proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    }
}

/// Resumes a paused direction of the current stream.
pub fn resume(direction: Direction) -> Status {
    // SAFETY: plain value.
    unsafe { proxy_continue_stream(direction as u32) }
}

/// Resets a direction of the current stream (Envoy resets the whole stream: the caller's
/// connection sees its answer cut).
pub fn close(direction: Direction) -> Status {
    // SAFETY: plain value.
    unsafe { proxy_close_stream(direction as u32) }
}

/// Answers the current stream locally.
pub fn send_response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Status {
    let map = serialize_map(headers);
    // SAFETY: pointers and lengths of live data.
    unsafe {
        proxy_send_local_response(
            u32::from(status),
            null(),
            0,
            body.as_ptr(),
            body.len(),
            map.as_ptr(),
            map.len(),
            -1,
        )
    }
}

/// Makes `context` the one later calls act on.
pub fn set_effective_context(context: u32) -> Status {
    // SAFETY: plain value.
    unsafe { proxy_set_effective_context(context) }
}

/// Defines a metric.
pub fn define_metric(kind: Metric, name: &str) -> Option<u32> {
    let mut id = 0u32;
    // SAFETY: a live string; `id` outlives the call.
    (unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) } == OK)
        .then_some(id)
}

/// Adds to a counter or gauge.
pub fn increment_metric(id: u32, by: i64) -> Status {
    // SAFETY: plain values.
    unsafe { proxy_increment_metric(id, by) }
}

/// Sets a gauge or records into a histogram.
pub fn record_metric(id: u32, value: u64) -> Status {
    // SAFETY: plain values.
    unsafe { proxy_record_metric(id, value) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_round_trip_and_malformed_maps_never_panic() {
        let pairs = [
            (":status", "200"),
            ("x-a", ""),
            ("content-type", "text/plain"),
        ];
        let bytes = serialize_map(&pairs);
        let back = deserialize_map(&bytes);
        assert_eq!(
            back,
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        );
        // Non-UTF-8 values are replaced, not a panic.
        let mut raw = serialize_map(&[("x-b", "ab")]);
        let len = raw.len();
        raw[len - 2] = 0xff;
        assert_eq!(
            deserialize_map(&raw),
            vec![("x-b".into(), "a\u{fffd}".into())]
        );
        // Truncations and absurd counts stop cleanly.
        for cut in 0..bytes.len() {
            let _ = deserialize_map(&bytes[..cut]);
        }
        let _ = deserialize_map(&[0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0]);
    }
}
