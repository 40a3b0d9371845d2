//! [`Host`] on Envoy: every call goes to the proxy-wasm ABI through [`crate::abi`], never the
//! SDK's `hostcalls` (which panic on statuses they did not expect and on header bytes that are
//! not UTF-8), except `dispatch_http_call`, whose SDK dispatcher must record the call's token to
//! route the answer back. Each call is exactly the hostcall the filter made before the trait
//! existed; failures become `None`/`false`.

use crate::abi::{self, Direction, Level, Map, Metric, OK};
use crate::host::{Buffer, CallToken, Cas, Host, MetricId};
use std::cell::Cell;
use std::num::NonZeroU32;
use std::time::Duration;
use unbusy_core::time::Nanos;

thread_local! {
    static UPSTREAM: Cell<bool> = const { Cell::new(false) };
}

/// The filter's upstream instance was configured in this VM (both instances share one VM per
/// worker, so thread-local state is common to them): native failover is possible.
pub fn set_upstream_present() {
    UPSTREAM.with(|u| u.set(true));
}

/// The host of a proxy-wasm VM (a zero-sized handle: the ABI is global to the VM).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyWasm;

impl ProxyWasm {
    /// Asks for the root context's `on_tick` every `period`.
    pub fn set_tick_period(self, period: Duration) -> bool {
        abi::set_tick_period(u32::try_from(period.as_millis()).unwrap_or(u32::MAX)) == OK
    }

    /// A host property (`["plugin_root_id"]`, `["xds", "upstream_host_metadata", ...]`).
    pub fn property(self, path: &[&str]) -> Option<Vec<u8>> {
        abi::property(path)
    }
}

impl Host for ProxyWasm {
    fn now(&self) -> Nanos {
        abi::now_nanos().unwrap_or(0)
    }

    fn log(&self, level: Level, message: &str) {
        let _ = abi::log(level, message);
    }

    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<Cas>) {
        let (value, cas) = abi::shared_get(key);
        (value, cas.and_then(NonZeroU32::new).map(Cas))
    }

    fn shared_set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> bool {
        abi::shared_set(key, value, cas.map(|c| c.0.get())) == OK
    }

    fn define_metric(&self, kind: Metric, name: &str) -> Option<MetricId> {
        abi::define_metric(kind, name).map(MetricId)
    }

    fn increment_metric(&self, id: MetricId, by: i64) {
        let _ = abi::increment_metric(id.0, by);
    }

    fn record_metric(&self, id: MetricId, value: u64) {
        let _ = abi::record_metric(id.0, value);
    }

    fn upstream_present(&self) -> bool {
        UPSTREAM.with(Cell::get)
    }

    fn enter(&self, context: u32) -> bool {
        abi::set_effective_context(context) == OK
    }

    fn headers(&self, map: Map) -> Vec<(String, String)> {
        abi::headers(map)
    }

    fn header(&self, map: Map, name: &str) -> Option<String> {
        abi::header(map, name)
    }

    fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> bool {
        abi::set_header(map, name, value) == OK
    }

    fn buffer(&self, kind: Buffer, max: usize) -> Option<Vec<u8>> {
        abi::buffer(kind, max)
    }

    fn set_buffer(&self, kind: Buffer, size: usize, value: &[u8]) -> bool {
        abi::set_buffer(kind, size, value) == OK
    }

    fn resume(&self, direction: Direction) -> bool {
        abi::resume(direction) == OK
    }

    fn reset_response(&self) -> bool {
        abi::close(Direction::Response) == OK
    }

    fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool {
        abi::send_response(status, headers, body) == OK
    }

    /// Envoy answers a dispatch only with success, `BadArgument` (unknown cluster, bad headers)
    /// or `InternalFailure`, which the SDK returns as errors.
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<CallToken, String> {
        proxy_wasm::hostcalls::dispatch_http_call(
            cluster,
            headers.to_vec(),
            Some(body),
            Vec::new(),
            timeout,
        )
        .map(CallToken)
        .map_err(|status| format!("{status:?}"))
    }
}
