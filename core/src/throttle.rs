//! Adaptive client-side throttling (Google SRE book, "Handling Overload").
//!
//! When a provider rejects most of what it is sent, sending it everything anyway wastes its
//! capacity on saying no. Each client counts, over a sliding window, the `requests` it attempted
//! and the `accepts` the provider answered without an overload verdict, and rejects new attempts
//! locally with probability
//!
//! ```text
//! p = max(0, (requests - K * accepts) / (requests + 1))
//! ```
//!
//! With `K = 2` the client keeps sending up to twice what the provider accepts, so recovery is
//! seen at once, while a provider that accepts nothing receives only a trickle.
//!
//! Two departures from the book, both found in the simulator (`simulate`):
//! - A sent attempt is counted when its outcome arrives, not when it leaves: LLM calls take
//!   seconds, and counting attempts still in flight as "not accepted" would throttle a healthy
//!   provider whenever traffic starts.
//! - Locally rejected attempts are not counted as requests, and nothing is rejected before
//!   [`MIN_OUTCOMES`] outcomes are in the window. Busy answers arrive in 100 ms while successes
//!   take seconds, so the first outcomes of any traffic start are mostly failures; with
//!   rejections counted, the probability then fed itself (`p' = 1 - K a (1 - p)` moves away from
//!   1 only by a factor `K a` per window) and a provider answering 65% of requests stayed
//!   throttled at 90% for minutes. Counting only real outcomes, `p = 0` whenever the provider
//!   accepts more than `1/K` of what it gets, and recovery shows within one round trip.

use crate::time::{Nanos, SECOND};
use crate::window::Ring;
use fastrand::Rng;

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u32,
    accepts: u32,
}

/// Buckets in the window (one per 1.7 s with the default 20 s window).
const BUCKETS: usize = 12;

/// Outcomes needed in the window before anything is rejected: a handful of early failures is
/// not a verdict on a provider.
pub const MIN_OUTCOMES: u64 = 20;

/// The throttle's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleSettings {
    /// How long requests and accepts count. Default 20 s (the book uses two minutes; LLM
    /// providers' rate-limit bursts come and go in seconds, and the simulator's alternating
    /// scenario showed a 60 s memory throttling a provider 40 s after it recovered).
    pub window: Nanos,
    /// The multiplier `K`. Default 2.0, the book's recommendation. Lower is more aggressive.
    pub k: f64,
    /// The highest rejection probability, so some probes always go through. Default 0.9.
    pub max_reject: f64,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            window: 20 * SECOND,
            k: 2.0,
            max_reject: 0.9,
        }
    }
}

/// An adaptive throttle for one provider (or one client of it).
#[derive(Debug, Clone)]
pub struct AdaptiveThrottle {
    ring: Ring<Counts, BUCKETS>,
    settings: ThrottleSettings,
}

impl AdaptiveThrottle {
    /// A throttle that has seen nothing (and so rejects nothing).
    pub fn new(settings: ThrottleSettings) -> Self {
        Self {
            ring: Ring::new(settings.window),
            settings,
        }
    }

    /// The current rejection probability.
    pub fn reject_probability(&self, now: Nanos) -> f64 {
        let (requests, accepts) = self.ring.fold(now, (0u64, 0u64), |(r, a), c| {
            (r + u64::from(c.requests), a + u64::from(c.accepts))
        });
        if requests < MIN_OUTCOMES {
            return 0.0;
        }
        let requests = requests as f64;
        let p = (requests - self.settings.k * accepts as f64) / (requests + 1.0);
        // (`max`/`min`, not `clamp`: `clamp` panics on a NaN bound and links float formatting.)
        p.max(0.0).min(self.settings.max_reject)
    }

    /// Decides whether to reject an attempt locally (`false`: send it, and report its outcome
    /// with [`AdaptiveThrottle::on_outcome`]).
    pub fn should_reject(&self, now: Nanos, rng: &mut Rng) -> bool {
        let p = self.reject_probability(now);
        p > 0.0 && rng.f64() < p
    }

    /// Counts a sent attempt's outcome: `accepted` when the provider answered without an
    /// overload verdict.
    pub fn on_outcome(&mut self, now: Nanos, accepted: bool) {
        let counts = self.ring.current(now);
        counts.requests = counts.requests.saturating_add(1);
        if accepted {
            counts.accepts = counts.accepts.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ms;

    #[test]
    fn healthy_provider_is_never_throttled() {
        let mut t = AdaptiveThrottle::new(ThrottleSettings::default());
        let mut rng = Rng::with_seed(3);
        for i in 0..1000 {
            assert!(!t.should_reject(ms(i), &mut rng));
            t.on_outcome(ms(i), true);
        }
        assert_eq!(t.reject_probability(ms(1000)), 0.0);
    }

    #[test]
    fn early_failures_do_not_lock_a_mostly_healthy_provider() {
        // Failures answer fast, successes slowly: the first outcomes are all failures. Once
        // successes arrive at 65%, nothing is rejected.
        let mut t = AdaptiveThrottle::new(ThrottleSettings::default());
        let mut rng = Rng::with_seed(9);
        for i in 0..15 {
            t.on_outcome(ms(i * 10), false);
        }
        assert_eq!(
            t.reject_probability(ms(150)),
            0.0,
            "too few outcomes to judge"
        );
        for i in 0..100u64 {
            t.on_outcome(ms(1000 + i * 10), i % 20 < 13);
        }
        assert_eq!(t.reject_probability(ms(2000)), 0.0);
        assert!(!t.should_reject(ms(2000), &mut rng));
    }

    /// Feeds `requests` outcomes, the first `accepts` of them accepted, all at `at`.
    fn fed(settings: ThrottleSettings, at: Nanos, requests: u32, accepts: u32) -> AdaptiveThrottle {
        let mut t = AdaptiveThrottle::new(settings);
        for i in 0..requests {
            t.on_outcome(at, i < accepts);
        }
        t
    }

    #[test]
    fn rejection_probability_is_the_books_formula_once_enough_outcomes_are_in() {
        let now = ms(500);
        // 40 outcomes, 10 accepted: (40 - 2 * 10) / (40 + 1).
        let t = fed(ThrottleSettings::default(), now, 40, 10);
        assert_eq!(t.reject_probability(now), 20.0 / 41.0);
        // K is the configured multiplier: with K = 1, (40 - 10) / 41.
        let k1 = ThrottleSettings {
            k: 1.0,
            ..ThrottleSettings::default()
        };
        assert_eq!(fed(k1, now, 40, 10).reject_probability(now), 30.0 / 41.0);
        // Outcomes in different buckets of the window all count.
        let mut spread = AdaptiveThrottle::new(ThrottleSettings::default());
        for i in 0..40u64 {
            spread.on_outcome(ms(i * 400), i < 10);
        }
        assert_eq!(spread.reject_probability(ms(16_000)), 20.0 / 41.0);
    }

    #[test]
    fn the_twentieth_outcome_is_the_first_that_can_reject() {
        let now = ms(100);
        let below = fed(ThrottleSettings::default(), now, MIN_OUTCOMES as u32 - 1, 0);
        assert_eq!(below.reject_probability(now), 0.0);
        let at = fed(ThrottleSettings::default(), now, MIN_OUTCOMES as u32, 5);
        // (20 - 10) / 21: rejected with that probability, not held at zero.
        assert_eq!(at.reject_probability(now), 10.0 / 21.0);
    }

    #[test]
    fn rejection_is_capped_at_max_reject_and_never_negative() {
        let now = ms(100);
        let dead = fed(ThrottleSettings::default(), now, 100, 0);
        assert_eq!(dead.reject_probability(now), 0.9);
        let capped = ThrottleSettings {
            max_reject: 0.5,
            ..ThrottleSettings::default()
        };
        assert_eq!(fed(capped, now, 100, 0).reject_probability(now), 0.5);
        // More accepted than 1/K of all: the formula is negative, the probability zero.
        let healthy = fed(ThrottleSettings::default(), now, 100, 80);
        assert_eq!(healthy.reject_probability(now), 0.0);
    }

    #[test]
    fn attempts_are_rejected_at_the_stated_probability() {
        // p = 20/41 ~ 0.488: over 4000 draws the rejected share is within 3 points of it.
        let now = ms(500);
        let t = fed(ThrottleSettings::default(), now, 40, 10);
        let mut rng = Rng::with_seed(11);
        let rejected = (0..4000).filter(|_| t.should_reject(now, &mut rng)).count();
        let share = rejected as f64 / 4000.0;
        assert!((share - 20.0 / 41.0).abs() < 0.03, "rejected share {share}");
    }

    #[test]
    fn outcomes_leave_the_window_after_it_passes() {
        let t = fed(ThrottleSettings::default(), ms(0), 100, 0);
        assert_eq!(
            t.reject_probability(ms(18_000)),
            0.9,
            "still inside the 20 s window"
        );
        assert_eq!(
            t.reject_probability(ms(20_001)),
            0.0,
            "the window has passed"
        );
    }

    #[test]
    fn dead_provider_gets_a_trickle_and_recovers() {
        let mut t = AdaptiveThrottle::new(ThrottleSettings::default());
        let mut rng = Rng::with_seed(3);
        let mut sent = 0;
        for i in 0..1000 {
            if !t.should_reject(ms(i * 10), &mut rng) {
                sent += 1;
                t.on_outcome(ms(i * 10), false);
            }
        }
        assert!(sent < 200, "sent {sent} of 1000 to a dead provider");
        assert!(sent >= 50, "some probes must still go through, sent {sent}");
        // After the window passes with the provider accepting again, nothing is rejected.
        let later = ms(10_000) + 61 * SECOND;
        assert_eq!(t.reject_probability(later), 0.0);
    }
}
