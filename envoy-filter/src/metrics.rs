//! Engine events as Envoy metrics (`/stats/prometheus`). Names carry their labels as
//! `.label.value` segments; `unbusy-up` configures Envoy's tag extraction to turn them into
//! Prometheus labels (`unbusy_requests_total{outcome="success"}`).

use crate::host;
use crate::host::MetricKind as MetricType;
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
    requests: Vec<Option<u32>>,
    attempts: Vec<Vec<Option<u32>>>,
    first_token: Vec<Option<u32>>,
    in_flight: Vec<Option<u32>>,
    /// This VM's share of each in-flight gauge.
    in_flight_seen: Vec<u32>,
    breaker: Vec<Option<u32>>,
    duration: Option<u32>,
    tier: Option<u32>,
    cache: [Option<u32>; 3],
    cache_bytes: Option<u32>,
    rejections: [Option<u32>; 5],
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
    pub fn define(providers: &[String]) -> Self {
        use MetricType::{Counter, Gauge, Histogram};
        let each = |kind, f: &dyn Fn(&str) -> String| {
            providers
                .iter()
                .map(|p| host::metric(kind, &f(p)))
                .collect::<Vec<_>>()
        };
        Self {
            requests: OUTCOMES
                .iter()
                .map(|o| {
                    host::metric(
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
                            host::metric(
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
            breaker: each(Gauge, &|p| format!("unbusy_breaker_state.provider.{p}")),
            duration: host::metric(Histogram, "unbusy_request_duration_ms"),
            tier: host::metric(Gauge, "unbusy_degradation_tier"),
            cache_bytes: host::metric(Gauge, "unbusy_cache_bytes"),
            cache: ["hit", "miss", "stale"]
                .map(|r| host::metric(Counter, &format!("unbusy_cache_total.result.{r}"))),
            rejections: [
                "budget",
                "throttled",
                "rate_limited",
                "shed",
                "endpoint_not_allowed",
            ]
            .map(|r| host::metric(Counter, &format!("unbusy_rejections_total.reason.{r}"))),
        }
    }

    /// Records one engine event.
    pub fn event(&self, event: &Event) {
        let ms = |n: u64| n / 1_000_000;
        match event {
            Event::RequestFinished {
                outcome, latency, ..
            } => {
                let i = OUTCOMES.iter().position(|o| o == outcome);
                host::bump(i.and_then(|i| self.requests.get(i)).copied().flatten(), 1);
                host::record(self.duration, ms(*latency));
                if *outcome == RequestOutcome::Shed {
                    self.rejection(Rejection::Shed);
                }
            }
            Event::AttemptFinished {
                provider, class, ..
            } => {
                let id = self
                    .attempts
                    .get(*provider)
                    .and_then(|r| r.get(result_index(*class)))
                    .copied()
                    .flatten();
                host::bump(id, 1);
            }
            Event::FirstToken { provider, latency } => {
                host::record(
                    self.first_token.get(*provider).copied().flatten(),
                    ms(*latency),
                );
            }
            Event::BudgetExhausted => self.rejection(Rejection::Budget),
            Event::Throttled { .. } => self.rejection(Rejection::Throttled),
            Event::BreakerChanged { provider, state } => {
                host::record(
                    self.breaker.get(*provider).copied().flatten(),
                    u64::from(*state),
                );
            }
            Event::TierChanged { tier } => host::record(self.tier, u64::from(tier.level())),
        }
    }

    /// Moves a provider's in-flight gauge to this VM's count. Each worker VM adds the change
    /// in its own count, so the gauge is the sum over workers (setting it would leave only the
    /// last writer's count); no change, no hostcall.
    pub fn in_flight(&mut self, provider: usize, value: u32) {
        let Some(last) = self.in_flight_seen.get_mut(provider) else {
            return;
        };
        if *last != value {
            let delta = i64::from(value) - i64::from(*last);
            *last = value;
            host::bump(self.in_flight.get(provider).copied().flatten(), delta);
        }
    }

    /// Sets the cache's size gauge (the shared ledger: the same for every worker).
    pub fn cache_bytes(&self, bytes: u64) {
        host::record(self.cache_bytes, bytes);
    }

    /// Counts a cache lookup.
    pub fn cache(&self, result: CacheResult) {
        host::bump(self.cache.get(result as usize).copied().flatten(), 1);
    }

    /// Counts a refusal.
    pub fn rejection(&self, why: Rejection) {
        host::bump(self.rejections.get(why as usize).copied().flatten(), 1);
    }
}
