//! Native failover: a request sent to a provider's failover aggregate (this provider, then the
//! others in preference order), whose later attempts are the router's own retries, so the next
//! provider's answer streams. The filter's upstream instance carries each of the router's
//! attempts; the engine still decides, and the router only retries when the engine's next step
//! is exactly the aggregate's next provider, right away (anything else is dispatched).
//!
//! Kept apart from the state machine: the aggregate's order, the link between a request and
//! the router's attempts ([`crate::routing::FLOW_HEADER`], written and read here only), and the
//! rule for when the router may carry the engine's next attempt.

use unbusy_core::config::ProviderConfig;
use unbusy_core::engine::SendAttempt;

/// The status the upstream instance gives an attempt's held answer so that the router retries
/// on the aggregate cluster's next provider (the route's `retriable_status_codes`). Providers
/// do not send it; it reaches the caller's filter only if the router could not retry, and is
/// then judged like any busy answer.
pub const NATIVE_RETRY_STATUS: u16 = 591;

/// The providers after `first` in an aggregate failover cluster starting with it: the others
/// in preference order (priority, then listing order), as `unbusy up` renders it.
pub fn failover_order(providers: &[ProviderConfig], first: usize) -> Vec<usize> {
    let mut rest: Vec<usize> = (0..providers.len()).filter(|&i| i != first).collect();
    // The key ends with the index, so no two are equal and the core's small heapsort gives
    // the stable sort's order without linking the standard library's (issue 13: size).
    let key = |i: usize| (providers.get(i).map_or(u32::MAX, |p| p.priority), i);
    unbusy_core::sorted_map::sort_by(&mut rest, |&a, &b| key(a) < key(b));
    rest
}

/// The flow header's value: `"<registry index>:<stream>"`.
pub fn flow_value(index: usize, stream: u32) -> String {
    format!("{index}:{stream}")
}

/// Reads a flow header's value back.
pub fn parse_flow(value: &str) -> Option<(usize, u32)> {
    let (index, ctx) = value.split_once(':')?;
    Some((index.parse().ok()?, ctx.parse().ok()?))
}

/// A request on the native path.
#[derive(Debug)]
pub struct Native {
    /// The aggregate's providers still ahead, in its order.
    ahead: Vec<usize>,
    /// The attempt the router is about to carry (rewritten per attempt by the upstream
    /// instance, or dispatched if the router cannot retry).
    pub pending: Option<SendAttempt>,
}

impl Native {
    /// Attempt `send`, entering the aggregate of its provider.
    pub fn enter(providers: &[ProviderConfig], send: &SendAttempt) -> Self {
        Self {
            ahead: failover_order(providers, send.provider.index()),
            pending: Some(send.clone()),
        }
    }

    /// Whether the router can carry `send` as its next retry: its provider is the aggregate's
    /// next one. If so, the router is about to carry it.
    pub fn retry(&mut self, send: &SendAttempt) -> bool {
        if self.ahead.first() != Some(&send.provider.index()) {
            return false;
        }
        self.ahead.remove(0);
        self.pending = Some(send.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unbusy_core::config::Config;

    #[test]
    fn the_aggregate_goes_by_priority_then_listing_and_a_flow_value_reads_back() {
        let config = Config::from_json(
            br#"{"providers":[{"name":"a","cluster":"a","priority":1},
                {"name":"b","cluster":"b","priority":0},{"name":"c","cluster":"c","priority":1},
                {"name":"d","cluster":"d","priority":0}]}"#,
        )
        .unwrap();
        assert_eq!(failover_order(&config.providers, 0), [1, 3, 2]);
        assert_eq!(failover_order(&config.providers, 3), [1, 0, 2]);
        assert_eq!(parse_flow(&flow_value(7, 42)), Some((7, 42)));
        assert_eq!(parse_flow("7"), None);
        assert_eq!(parse_flow("x:1"), None);
    }
}
