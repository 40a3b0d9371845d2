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
//! seen at once, while a provider that accepts nothing receives only a trickle. Locally rejected
//! attempts count as requests (as in the book), so the probability stays high while the provider
//! is down, and falls as soon as accepts return.
//!
//! Unlike the book, a sent attempt is counted when its outcome arrives, not when it leaves: LLM
//! calls take seconds, and counting attempts still in flight as "not accepted" would throttle a
//! healthy provider whenever traffic starts.

use crate::time::{Nanos, SECOND};
use crate::window::Ring;
use fastrand::Rng;

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    requests: u32,
    accepts: u32,
}

/// Buckets in the window (one per 5 s with the default 60 s window).
const BUCKETS: usize = 12;

/// The throttle's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleSettings {
    /// How long requests and accepts count. Default 60 s (the book uses two minutes; LLM
    /// providers' brownouts come and go faster).
    pub window: Nanos,
    /// The multiplier `K`. Default 2.0, the book's recommendation. Lower is more aggressive.
    pub k: f64,
    /// The highest rejection probability, so some probes always go through. Default 0.9.
    pub max_reject: f64,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            window: 60 * SECOND,
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
        let requests = requests as f64;
        let p = (requests - self.settings.k * accepts as f64) / (requests + 1.0);
        p.clamp(0.0, self.settings.max_reject)
    }

    /// Decides whether to reject an attempt locally (`false`: send it, and report its outcome
    /// with [`AdaptiveThrottle::on_outcome`]). A rejection counts as a request at once.
    pub fn should_reject(&mut self, now: Nanos, rng: &mut Rng) -> bool {
        let p = self.reject_probability(now);
        let reject = p > 0.0 && rng.f64() < p;
        if reject {
            let counts = self.ring.current(now);
            counts.requests = counts.requests.saturating_add(1);
        }
        reject
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
