//! Circuit breaker per provider.
//!
//! A provider that fails most of what it gets should get almost nothing for a while: its
//! failures cost callers their latency budget, and our traffic costs it its recovery. The breaker
//! follows linkerd2-proxy's success-rate breaker and the classic state machine:
//! - **closed**: attempts flow; outcomes are counted in a fixed ring of time buckets. The breaker
//!   opens when, with at least `min_volume` outcomes in the window, the success rate falls below
//!   `min_success_rate`, or when `consecutive_failures` failures arrive in a row (which catches a
//!   hard outage at low traffic before the window has volume);
//! - **open**: nothing flows until `open_for` has passed; each consecutive re-open doubles the
//!   wait up to `max_open_for`, so a provider that stays down is probed less and less often;
//! - **half-open**: at most `half_open_probes` attempts in flight at once; `probe_successes`
//!   successes close the breaker (and reset the window), any failure re-opens it. A probe whose
//!   outcome never arrives (the host lost it) frees its slot after `open_for`.
//!
//! What counts as success or failure is [`crate::classify::OutcomeClass::breaker_signal`].

use crate::classify::BreakerSignal;
use crate::time::{secs, Nanos};
use crate::window::Ring;

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    successes: u32,
    failures: u32,
}

/// Buckets in the window: with the default 10 s window, outcomes expire within a second of
/// their nominal age.
const BUCKETS: usize = 10;

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// How long outcomes count. Default 10 s.
    pub window: Nanos,
    /// Outcomes needed in the window before the success rate is judged. Default 10.
    pub min_volume: u32,
    /// Open below this success rate. Default 0.5.
    pub min_success_rate: f64,
    /// Open after this many failures in a row, whatever the volume. Default 5; 0 disables.
    pub consecutive_failures: u32,
    /// The first open period. Default 5 s.
    pub open_for: Nanos,
    /// The longest open period after repeated re-opens. Default 60 s.
    pub max_open_for: Nanos,
    /// Probes in flight at once when half-open. Default 1.
    pub half_open_probes: u32,
    /// Successful probes that close the breaker. Default 2.
    pub probe_successes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window: secs(10),
            min_volume: 10,
            min_success_rate: 0.5,
            consecutive_failures: 5,
            open_for: secs(5),
            max_open_for: secs(60),
            half_open_probes: 1,
            probe_successes: 2,
        }
    }
}

/// The breaker's state, as exported in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Attempts flow.
    Closed,
    /// Nothing flows until `until`.
    Open {
        /// When probing may start.
        until: Nanos,
    },
    /// A few probes flow.
    HalfOpen {
        /// Probes in flight.
        probes: u32,
        /// Probes that succeeded so far.
        successes: u32,
        /// When the latest probe was let through.
        last_probe: Nanos,
    },
}

impl BreakerState {
    /// 0 closed, 1 half-open, 2 open: the gauge value hosts export.
    pub const fn gauge(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen { .. } => 1,
            Self::Open { .. } => 2,
        }
    }
}

/// A circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    ring: Ring<Counts, BUCKETS>,
    state: BreakerState,
    consecutive_failures: u32,
    /// Opens since the breaker last closed, for the doubling open period.
    reopen_count: u32,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            ring: Ring::new(settings.window),
            state: BreakerState::Closed,
            consecutive_failures: 0,
            reopen_count: 0,
        }
    }

    /// The state at `now` (an open breaker whose time has passed reports half-open).
    pub fn state(&self, now: Nanos) -> BreakerState {
        match self.state {
            BreakerState::Open { until } if now >= until => BreakerState::HalfOpen {
                probes: 0,
                successes: 0,
                last_probe: now,
            },
            state => state,
        }
    }

    /// Whether an attempt could be let through now, without reserving anything.
    pub fn would_allow(&self, now: Nanos) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen {
                probes, last_probe, ..
            } => probes < self.settings.half_open_probes || self.probe_lost(now, last_probe),
        }
    }

    fn probe_lost(&self, now: Nanos, last_probe: Nanos) -> bool {
        now.saturating_sub(last_probe) >= self.settings.open_for
    }

    /// Lets an attempt through if the state allows, reserving a probe slot when half-open.
    /// Every `true` must be followed by [`CircuitBreaker::on_outcome`] for that attempt.
    pub fn try_acquire(&mut self, now: Nanos) -> bool {
        if !self.would_allow(now) {
            return false;
        }
        self.state = match self.state(now) {
            BreakerState::HalfOpen {
                probes,
                successes,
                last_probe,
            } => BreakerState::HalfOpen {
                probes: if self.probe_lost(now, last_probe) {
                    1
                } else {
                    probes + 1
                },
                successes,
                last_probe: now,
            },
            state => state,
        };
        true
    }

    /// Records an attempt's outcome.
    pub fn on_outcome(&mut self, now: Nanos, signal: BreakerSignal) {
        match (self.state, signal) {
            (_, BreakerSignal::Ignore) => {
                if let BreakerState::HalfOpen {
                    probes,
                    successes,
                    last_probe,
                } = self.state
                {
                    // The probe proved nothing; free its slot.
                    self.state = BreakerState::HalfOpen {
                        probes: probes.saturating_sub(1),
                        successes,
                        last_probe,
                    };
                }
            }
            (BreakerState::HalfOpen { successes, .. }, BreakerSignal::Success) => {
                if successes + 1 >= self.settings.probe_successes {
                    self.close();
                } else if let BreakerState::HalfOpen {
                    probes, last_probe, ..
                } = self.state
                {
                    self.state = BreakerState::HalfOpen {
                        probes: probes.saturating_sub(1),
                        successes: successes + 1,
                        last_probe,
                    };
                }
            }
            (BreakerState::HalfOpen { .. }, BreakerSignal::Failure) => self.open(now),
            // Outcomes of attempts let through before the breaker opened change nothing.
            (BreakerState::Open { .. }, _) => {}
            (BreakerState::Closed, BreakerSignal::Success) => {
                self.consecutive_failures = 0;
                let c = self.ring.current(now);
                c.successes = c.successes.saturating_add(1);
            }
            (BreakerState::Closed, BreakerSignal::Failure) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let c = self.ring.current(now);
                c.failures = c.failures.saturating_add(1);
                if self.should_trip(now) {
                    self.open(now);
                }
            }
        }
    }

    fn should_trip(&self, now: Nanos) -> bool {
        let s = &self.settings;
        if s.consecutive_failures > 0 && self.consecutive_failures >= s.consecutive_failures {
            return true;
        }
        let (ok, failed) = self.ring.fold(now, (0u64, 0u64), |(o, f), c| {
            (o + u64::from(c.successes), f + u64::from(c.failures))
        });
        let total = ok + failed;
        total >= u64::from(s.min_volume.max(1)) && (ok as f64) < s.min_success_rate * total as f64
    }

    fn open(&mut self, now: Nanos) {
        let shift = self.reopen_count.min(16);
        let wait = self
            .settings
            .open_for
            .saturating_mul(1u64 << shift)
            .min(self.settings.max_open_for.max(self.settings.open_for));
        self.reopen_count = self.reopen_count.saturating_add(1);
        self.state = BreakerState::Open {
            until: now.saturating_add(wait),
        };
    }

    fn close(&mut self) {
        self.state = BreakerState::Closed;
        self.reopen_count = 0;
        self.consecutive_failures = 0;
        self.ring.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ms;

    fn settle(b: &mut CircuitBreaker, now: Nanos, signal: BreakerSignal) {
        assert!(b.try_acquire(now), "not allowed at {now}");
        b.on_outcome(now, signal);
    }

    #[test]
    fn opens_on_consecutive_failures_then_half_opens_then_closes() {
        let mut b = CircuitBreaker::new(BreakerSettings::default());
        for i in 0..5 {
            settle(&mut b, ms(i), BreakerSignal::Failure);
        }
        assert_eq!(
            b.state(ms(5)),
            BreakerState::Open {
                until: ms(4) + secs(5)
            }
        );
        assert!(!b.try_acquire(ms(100)));
        let t = ms(4) + secs(5);
        assert!(b.try_acquire(t));
        // One probe at a time.
        assert!(!b.try_acquire(t));
        b.on_outcome(t, BreakerSignal::Success);
        settle(&mut b, t + 1, BreakerSignal::Success);
        assert_eq!(b.state(t + 2), BreakerState::Closed);
    }

    #[test]
    fn opens_on_success_rate_with_volume() {
        let mut b = CircuitBreaker::new(BreakerSettings {
            consecutive_failures: 0,
            ..BreakerSettings::default()
        });
        // Alternate 1 success, 2 failures: rate 1/3 < 0.5, tripped once volume reaches 10.
        let mut i = 0;
        while b.would_allow(ms(i)) {
            let signal = if i % 3 == 0 {
                BreakerSignal::Success
            } else {
                BreakerSignal::Failure
            };
            settle(&mut b, ms(i), signal);
            i += 1;
            assert!(i < 100);
        }
        assert!((9..=12).contains(&i), "tripped after {i}");
    }

    #[test]
    fn reopen_doubles_wait() {
        let mut b = CircuitBreaker::new(BreakerSettings::default());
        for _ in 0..5 {
            settle(&mut b, 0, BreakerSignal::Failure);
        }
        settle(&mut b, secs(5), BreakerSignal::Failure);
        assert_eq!(b.state(secs(5)), BreakerState::Open { until: secs(15) });
    }

    #[test]
    fn lost_probe_frees_its_slot() {
        let mut b = CircuitBreaker::new(BreakerSettings::default());
        for _ in 0..5 {
            settle(&mut b, 0, BreakerSignal::Failure);
        }
        assert!(b.try_acquire(secs(5)));
        assert!(!b.try_acquire(secs(6)));
        assert!(b.try_acquire(secs(10)));
    }
}
