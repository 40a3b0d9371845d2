//! Engine events as Envoy metrics (`/stats/prometheus`). Names carry their labels as
//! `.label.value` segments; `unbusy up` configures Envoy's tag extraction to turn them into
//! Prometheus labels (`unbusy_requests_total{outcome="success"}`).

use crate::host::{Host, MetricId, MetricKind as MetricType};
use unbusy_core::classify::{OutcomeClass, TransportFault};
use unbusy_core::engine::{Event, RequestOutcome};

const OUTCOMES: [RequestOutcome; 9] = [
    RequestOutcome::Success,
    RequestOutcome::CallerError,
    RequestOutcome::Cached,
    RequestOutcome::Stale,
    RequestOutcome::RateLimited,
    RequestOutcome::Shed,
    RequestOutcome::Failed,
    RequestOutcome::DeadlineExceeded,
    RequestOutcome::Cancelled,
];

/// The attempt results, in the order of [`result_index`].
const RESULTS: [&str; 9] = [
    "success",
    "busy",
    "rate_limited",
    "server_error",
    "reset",
    "refused",
    "timeout",
    "stall",
    "caller_error",
];

fn result_index(class: OutcomeClass) -> usize {
    match class {
        OutcomeClass::Success => 0,
        OutcomeClass::Busy => 1,
        OutcomeClass::RateLimited => 2,
        OutcomeClass::ServerError => 3,
        OutcomeClass::Transport(TransportFault::Reset) => 4,
        OutcomeClass::Transport(TransportFault::Refused) => 5,
        OutcomeClass::Transport(TransportFault::Timeout) => 6,
        OutcomeClass::Transport(TransportFault::Stall) => 7,
        OutcomeClass::CallerError(_) => 8,
    }
}

/// Metric ids, defined once per VM at configuration.
pub struct Metrics {
    requests: Vec<Option<MetricId>>,
    attempts: Vec<Vec<Option<MetricId>>>,
    first_token: Vec<Option<MetricId>>,
    in_flight: Vec<Option<MetricId>>,
    /// This VM's share of each in-flight gauge.
    in_flight_seen: Vec<u32>,
    /// Each provider's concurrency quota (`max_concurrency`, or with a store the proxy's
    /// holding of the fleet's): the same for every worker, so set, not added to.
    quota: Vec<Option<MetricId>>,
    /// The quota each gauge was last set to (`u32::MAX`: never).
    quota_seen: Vec<u32>,
    breaker: Vec<Option<MetricId>>,
    duration: Option<MetricId>,
    tier: Option<MetricId>,
    cache: [Option<MetricId>; 3],
    cache_bytes: Option<MetricId>,
    l2: [Option<MetricId>; 4],
    store_poll: [Option<MetricId>; 2],
    rejections: [Option<MetricId>; 5],
}

/// Cache lookups, for [`Metrics::cache`].
#[derive(Debug, Clone, Copy)]
pub enum CacheResult {
    /// A fresh hit.
    Hit = 0,
    /// No entry.
    Miss = 1,
    /// A stale entry.
    Stale = 2,
}

/// L2 (fleet store) lookups, for [`Metrics::l2`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Result {
    /// A fresh answer, served.
    Hit = 0,
    /// An answer past its freshness (offered to the engine as stale).
    Stale = 1,
    /// The store had none (404, or an answer expired by this proxy's `cache` settings).
    Miss = 2,
    /// The store did not answer in time, answered an error or anything unexpected, or was
    /// skipped because it just failed: the request went on as a miss.
    Error = 3,
}

/// Why a request or retry was refused, for [`Metrics::rejection`].
#[derive(Debug, Clone, Copy)]
pub enum Rejection {
    /// The retry budget said no.
    Budget = 0,
    /// Adaptive throttling.
    Throttled = 1,
    /// A rate limit (shared across workers).
    RateLimited = 2,
    /// Degradation shed it.
    Shed = 3,
    /// An endpoint unbusy does not forward (`endpoints.passthrough: refuse`).
    EndpointNotAllowed = 4,
}

impl Metrics {
    /// Defines every metric for these providers.
    pub fn define(host: &impl Host, providers: &[String]) -> Self {
        use MetricType::{Counter, Gauge, Histogram};
        let each = |kind, f: &dyn Fn(&str) -> String| {
            providers
                .iter()
                .map(|p| host.define_metric(kind, &f(p)))
                .collect::<Vec<_>>()
        };
        Self {
            requests: OUTCOMES
                .iter()
                .map(|o| {
                    host.define_metric(
                        Counter,
                        &format!("unbusy_requests_total.outcome.{}", o.label()),
                    )
                })
                .collect(),
            attempts: providers
                .iter()
                .map(|p| {
                    RESULTS
                        .iter()
                        .map(|r| {
                            host.define_metric(
                                Counter,
                                &format!("unbusy_attempts_total.provider.{p}.result.{r}"),
                            )
                        })
                        .collect()
                })
                .collect(),
            first_token: each(Histogram, &|p| {
                format!("unbusy_first_token_ms.provider.{p}")
            }),
            in_flight: each(Gauge, &|p| format!("unbusy_in_flight.provider.{p}")),
            in_flight_seen: vec![0; providers.len()],
            quota: each(Gauge, &|p| format!("unbusy_concurrency_quota.provider.{p}")),
            quota_seen: vec![u32::MAX; providers.len()],
            breaker: each(Gauge, &|p| format!("unbusy_breaker_state.provider.{p}")),
            duration: host.define_metric(Histogram, "unbusy_request_duration_ms"),
            tier: host.define_metric(Gauge, "unbusy_degradation_tier"),
            cache_bytes: host.define_metric(Gauge, "unbusy_cache_bytes"),
            cache: ["hit", "miss", "stale"]
                .map(|r| host.define_metric(Counter, &format!("unbusy_cache_total.result.{r}"))),
            // (Whole names, not `format!`: every byte counts in the filter's size.)
            l2: [
                "unbusy_l2_cache_total.result.hit",
                "unbusy_l2_cache_total.result.stale",
                "unbusy_l2_cache_total.result.miss",
                "unbusy_l2_cache_total.result.error",
            ]
            .map(|name| host.define_metric(Counter, name)),
            store_poll: [
                "unbusy_store_poll_total.result.ok",
                "unbusy_store_poll_total.result.error",
            ]
            .map(|name| host.define_metric(Counter, name)),
            rejections: [
                "budget",
                "throttled",
                "rate_limited",
                "shed",
                "endpoint_not_allowed",
            ]
            .map(|r| host.define_metric(Counter, &format!("unbusy_rejections_total.reason.{r}"))),
        }
    }

    /// Records one engine event.
    pub fn event(&self, host: &impl Host, event: &Event) {
        let ms = |n: u64| n / 1_000_000;
        match event {
            Event::RequestFinished {
                outcome, latency, ..
            } => {
                let i = OUTCOMES.iter().position(|o| o == outcome);
                bump(
                    host,
                    i.and_then(|i| self.requests.get(i)).copied().flatten(),
                    1,
                );
                record(host, self.duration, ms(*latency));
                if *outcome == RequestOutcome::Shed {
                    self.rejection(host, Rejection::Shed);
                }
            }
            Event::AttemptFinished {
                provider, class, ..
            } => {
                let id = self
                    .attempts
                    .get(provider.index())
                    .and_then(|r| r.get(result_index(*class)))
                    .copied()
                    .flatten();
                bump(host, id, 1);
            }
            Event::FirstToken { provider, latency } => {
                record(
                    host,
                    self.first_token.get(provider.index()).copied().flatten(),
                    ms(*latency),
                );
            }
            Event::BudgetExhausted => self.rejection(host, Rejection::Budget),
            Event::Throttled { .. } => self.rejection(host, Rejection::Throttled),
            Event::BreakerChanged { provider, state } => {
                record(
                    host,
                    self.breaker.get(provider.index()).copied().flatten(),
                    u64::from(*state),
                );
            }
            Event::TierChanged { tier } => record(host, self.tier, u64::from(tier.level())),
        }
    }

    /// Moves a provider's in-flight gauge to this VM's count. Each worker VM adds the change
    /// in its own count, so the gauge is the sum over workers (setting it would leave only the
    /// last writer's count); no change, no hostcall.
    pub fn in_flight(&mut self, host: &impl Host, provider: usize, value: u32) {
        let Some(last) = self.in_flight_seen.get_mut(provider) else {
            return;
        };
        if *last != value {
            let delta = i64::from(value) - i64::from(*last);
            *last = value;
            bump(host, self.in_flight.get(provider).copied().flatten(), delta);
        }
    }

    /// Sets a provider's quota gauge, when it changed.
    pub fn quota(&mut self, host: &impl Host, provider: usize, value: u32) {
        if let Some(last) = self.quota_seen.get_mut(provider) {
            if *last != value {
                *last = value;
                record(
                    host,
                    self.quota.get(provider).copied().flatten(),
                    u64::from(value),
                );
            }
        }
    }

    /// Sets the cache's size gauge (the shared ledger: the same for every worker).
    pub fn cache_bytes(&self, host: &impl Host, bytes: u64) {
        record(host, self.cache_bytes, bytes);
    }

    /// Counts a cache lookup.
    pub fn cache(&self, host: &impl Host, result: CacheResult) {
        bump(host, self.cache.get(result as usize).copied().flatten(), 1);
    }

    /// Counts a call for the fleet's quotas and pauses (`ok`: the store answered as expected).
    pub fn store_poll(&self, host: &impl Host, ok: bool) {
        bump(
            host,
            self.store_poll.get(usize::from(!ok)).copied().flatten(),
            1,
        );
    }

    /// Counts an L2 lookup.
    pub fn l2(&self, host: &impl Host, result: L2Result) {
        bump(host, self.l2.get(result as usize).copied().flatten(), 1);
    }

    /// Counts a refusal.
    pub fn rejection(&self, host: &impl Host, why: Rejection) {
        bump(
            host,
            self.rejections.get(why as usize).copied().flatten(),
            1,
        );
    }
}

/// Adds to a counter or gauge the host defined.
fn bump(host: &impl Host, id: Option<MetricId>, by: i64) {
    if let Some(id) = id {
        host.increment_metric(id, by);
    }
}

/// Sets a gauge or records a histogram value, if the host defined it.
fn record(host: &impl Host, id: Option<MetricId>, value: u64) {
    if let Some(id) = id {
        host.record_metric(id, value);
    }
}
