//! What the filter needs from its host, as one trait, so that the same filter code runs on
//! Envoy ([`crate::proxy::ProxyWasm`], over the raw ABI) and natively in tests
//! ([`crate::fake::FakeHost`], in-memory shared data with Envoy's compare-and-swap rules, a
//! clock the test moves, recorded metrics, logs, replies and dispatches).
//!
//! Why a trait and not `cfg(test)` stubs: off wasm every hostcall used to fail, so shared
//! limits, the shared cache, shared breaker verdicts and quotas never engaged natively, and
//! only real Envoy could test them. With the host passed in, two filter states over one fake
//! process are two Envoy workers, and what one charges or stores the other sees.
//!
//! Every method reports failure as `None`/`false`/an empty value and never panics: a panic
//! kills the worker's VM and every later request on it.
//!
//! Two groups of calls:
//! - process-wide ones the filter's state makes while it decides (clock, log, shared data,
//!   metrics, whether the upstream instance runs in this VM);
//! - stream ones the driver makes after the state decided ([`crate::driver`]): they act on the
//!   context made current with [`Host::enter`] (proxy-wasm's effective context).

use std::num::NonZeroU32;
use std::time::Duration;
use unbusy_core::time::Nanos;

pub use crate::abi::{Buffer, Direction, Level, Map, Metric as MetricKind};

/// A shared-data compare-and-swap token, as the host hands it out with a value (Envoy's 0,
/// "no token", is `None` where one is taken).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cas(pub NonZeroU32);

/// A metric the host defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricId(pub u32);

/// A dispatched HTTP call, named by the token its answer comes back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CallToken(pub u32);

/// The host, as the filter uses it.
pub trait Host {
    /// The wall clock in nanoseconds since the Unix epoch: the same on every worker, so it can
    /// time state shared between workers (0 if the host cannot tell).
    fn now(&self) -> Nanos;

    /// Writes a log line.
    fn log(&self, level: Level, message: &str);

    /// A shared-data value (process-wide per VM id) with its compare-and-swap token.
    fn shared_get(&self, key: &str) -> (Option<Vec<u8>>, Option<Cas>);

    /// Stores a shared-data value if `cas` still matches; `false` when another worker wrote
    /// it first. As in Envoy, a token only guards a value that exists: a key that is absent is
    /// written whatever the token.
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<Cas>) -> bool;

    /// Defines a metric; `None` if the host refused it (it is then skipped).
    fn define_metric(&self, kind: MetricKind, name: &str) -> Option<MetricId>;

    /// Adds to a counter or gauge.
    fn increment_metric(&self, id: MetricId, by: i64);

    /// Sets a gauge or records a histogram value.
    fn record_metric(&self, id: MetricId, value: u64);

    /// Whether the filter's upstream instance (in the router) runs in this VM, which is what
    /// makes native failover possible.
    fn upstream_present(&self) -> bool;

    /// Makes `context` the one the stream calls below act on; `false` if it is gone.
    fn enter(&self, context: u32) -> bool;

    /// Every header of a map of the current context.
    fn headers(&self, map: Map) -> Vec<(String, String)>;

    /// One header's value.
    fn header(&self, map: Map, name: &str) -> Option<String>;

    /// Sets (or with `None`, removes) a header; `false` if the host refused (the map is gone).
    fn set_header(&self, map: Map, name: &str, value: Option<&str>) -> bool;

    /// A buffer's bytes (`max` at most).
    fn buffer(&self, kind: Buffer, max: usize) -> Option<Vec<u8>>;

    /// Replaces the first `size` bytes of a buffer with `value`.
    fn set_buffer(&self, kind: Buffer, size: usize, value: &[u8]) -> bool;

    /// Lets a paused direction of the current stream go on.
    fn resume(&self, direction: Direction) -> bool;

    /// Cuts the current stream's response (the caller sees it end short).
    fn reset_response(&self) -> bool;

    /// Answers the current stream locally.
    fn send_response(&self, status: u16, headers: &[(&str, &str)], body: &[u8]) -> bool;

    /// Sends a request to `cluster` outside any stream; its answer comes back with the token.
    /// `Err` says why the host refused it.
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<CallToken, String>;

    /// Logs at info level.
    fn info(&self, message: &str) {
        self.log(Level::Info, message);
    }

    /// Logs at warn level.
    fn warn(&self, message: &str) {
        self.log(Level::Warn, message);
    }

    /// Logs at error level.
    fn error(&self, message: &str) {
        self.log(Level::Error, message);
    }
}

/// Borrowed `(name, value)` pairs, the shape hostcalls and the classifier take.
pub fn pairs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}
