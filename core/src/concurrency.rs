//! An adaptive concurrency limit per provider.
//!
//! DeepSeek limits concurrency per account: a request counts from send until the response
//! completes, and above the quota every request gets 429. Retrying such a 429 quickly only adds
//! to the queue. The answer is to learn the quota and *pace*: keep at most `limit` attempts in
//! flight, and let the others wait for a slot (the engine queues them) instead of sending them.
//!
//! The limit is AIMD (additive increase, multiplicative decrease, as TCP and Netflix's
//! `concurrency-limits`):
//! - each successful completion adds `1 / limit` (so one whole slot per `limit` successes),
//!   except in *slow start*, before the first quota verdict, when it adds a whole slot (TCP's
//!   slow start: the limit doubles per round trip). Without it, a provider with no quota whose
//!   answers held slots longer (keep-alive stalls) queued our requests for minutes while the
//!   limit crept up one slot every few seconds (the simulator's brownout);
//! - a quota verdict multiplies the limit by `backoff_ratio`, at most once per
//!   `decrease_cooldown`, because one burst of overload returns many 429s at once and should
//!   shrink the limit once, not twenty times. The engine reports a quota verdict for a 429 that
//!   carries no retry hint (DeepSeek's concurrency quota answers exactly so); a 429 with a hint
//!   is paced by the hint, and 503 "busy" and keep-alive stalls are provider-wide conditions
//!   that our own concurrency does not cause: the breaker and the adaptive throttle handle
//!   them. The simulator showed why: treating a brownout's random 503s (25% of answers) as a
//!   quota verdict collapsed the limit to 1 and failed 95% of requests waiting for a slot;
//! - the optional latency signal: a success slower than `latency_tolerance` times the long-run
//!   average (an EWMA of successful latencies) counts as a gentle overload (half a decrease).
//!   Off by default: an LLM answer's latency follows its length (p99 is often 6x p50), so
//!   slowness alone says little about queueing.
//!
//! Fixed-size state, `now` passed in.

use crate::time::{ms, Nanos};

/// The limit's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencySettings {
    /// The limit to start with. Default 64: LLM calls take seconds, so 20 requests a second
    /// already keep 40-60 in flight; a low start would queue a healthy provider's traffic.
    pub initial: f64,
    /// Never below this. Default 1: one request in flight always makes progress.
    pub min: f64,
    /// Never above this (a quota the operator knows). Default 256.
    pub max: f64,
    /// Multiplier on overload. Default 0.75: gentler than TCP's 0.5, because LLM overload
    /// verdicts arrive in bursts and a quota is usually a plateau, not a cliff.
    pub backoff_ratio: f64,
    /// The least time between two decreases. Default 500 ms.
    pub decrease_cooldown: Nanos,
    /// A success slower than this multiple of the average counts as mild overload. Default 0
    /// (off): LLM latency varies with output length.
    pub latency_tolerance: f64,
}

impl Default for ConcurrencySettings {
    fn default() -> Self {
        Self {
            initial: 64.0,
            min: 1.0,
            max: 256.0,
            backoff_ratio: 0.75,
            decrease_cooldown: ms(500),
            latency_tolerance: 0.0,
        }
    }
}

/// How an attempt that held a slot ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Release {
    /// Completed normally after this long (for the latency signal).
    Success(Nanos),
    /// The provider said our account has no room (a quota verdict).
    Overload,
    /// Anything else (caller error, transport fault unrelated to load, cancelled).
    Neutral,
}

/// The EWMA weight of a new latency sample: about the last 20 successes.
const LATENCY_EWMA_ALPHA: f64 = 0.05;

/// An AIMD concurrency limiter.
#[derive(Debug, Clone, PartialEq)]
pub struct AimdLimit {
    settings: ConcurrencySettings,
    limit: f64,
    in_flight: u32,
    last_decrease: Option<Nanos>,
    latency_avg: Option<f64>,
    /// Before the first decrease: grow a slot per success.
    slow_start: bool,
}

impl AimdLimit {
    /// A limiter at its initial limit with nothing in flight.
    pub fn new(settings: ConcurrencySettings) -> Self {
        Self {
            limit: settings.initial.max(settings.min).min(settings.max),
            settings,
            in_flight: 0,
            last_decrease: None,
            latency_avg: None,
            slow_start: true,
        }
    }

    /// The current limit as a whole number of slots (at least 1).
    pub fn limit(&self) -> u32 {
        (self.limit as u32).max(1)
    }

    /// Attempts in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether a slot is free.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.limit()
    }

    /// Takes a slot if one is free.
    pub fn try_acquire(&mut self) -> bool {
        if self.has_room() {
            self.in_flight += 1;
            true
        } else {
            false
        }
    }

    /// Returns a slot and learns from how the attempt ended.
    pub fn release(&mut self, now: Nanos, how: Release) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match how {
            Release::Success(latency) => {
                let latency = latency as f64;
                let slow = match self.latency_avg {
                    Some(avg) => {
                        self.settings.latency_tolerance > 0.0
                            && latency > avg * self.settings.latency_tolerance
                    }
                    None => false,
                };
                self.latency_avg = Some(match self.latency_avg {
                    Some(avg) => avg + LATENCY_EWMA_ALPHA * (latency - avg),
                    None => latency,
                });
                if slow {
                    self.decrease(now, (1.0 + self.settings.backoff_ratio) / 2.0);
                } else if self.in_flight + 1 >= self.limit() / 2 {
                    // Only grow when the limit is actually being used: a limit that is never
                    // reached proves nothing about the provider.
                    let step = if self.slow_start {
                        1.0
                    } else {
                        1.0 / self.limit
                    };
                    self.limit = (self.limit + step).min(self.settings.max);
                }
            }
            Release::Overload => self.decrease(now, self.settings.backoff_ratio),
            Release::Neutral => {}
        }
    }

    fn decrease(&mut self, now: Nanos, ratio: f64) {
        let cooled = self
            .last_decrease
            .is_none_or(|t| now.saturating_sub(t) >= self.settings.decrease_cooldown);
        if cooled {
            self.slow_start = false;
            self.limit = (self.limit * ratio).max(self.settings.min);
            self.last_decrease = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded() {
        let mut l = AimdLimit::new(ConcurrencySettings {
            initial: 2.0,
            ..ConcurrencySettings::default()
        });
        assert!(l.try_acquire());
        assert!(l.try_acquire());
        assert!(!l.try_acquire());
        l.release(0, Release::Neutral);
        assert!(l.try_acquire());
    }

    #[test]
    fn overload_burst_decreases_once_per_cooldown() {
        let mut l = AimdLimit::new(ConcurrencySettings {
            initial: 16.0,
            ..ConcurrencySettings::default()
        });
        for _ in 0..16 {
            assert!(l.try_acquire());
        }
        for _ in 0..10 {
            l.release(ms(1000), Release::Overload);
        }
        assert_eq!(l.limit(), 12);
        l.release(ms(1600), Release::Overload);
        assert_eq!(l.limit(), 9);
    }

    #[test]
    fn converges_near_a_quota() {
        // A provider that overloads above 10 in flight: the limit must settle around 10.
        let quota = 10;
        let mut l = AimdLimit::new(ConcurrencySettings::default());
        let mut now = 0;
        // One round per second: every attempt takes about a second, as LLM calls do.
        for _ in 0..600 {
            now += ms(1000);
            while l.try_acquire() {}
            let in_flight = l.in_flight();
            for i in 0..in_flight {
                let how = if i >= quota {
                    Release::Overload
                } else {
                    Release::Success(ms(1000))
                };
                l.release(now, how);
            }
        }
        assert!((8..=14).contains(&l.limit()), "limit {}", l.limit());
    }

    #[test]
    fn slow_start_grows_fast_until_the_first_quota_verdict() {
        let mut l = AimdLimit::new(ConcurrencySettings {
            initial: 4.0,
            ..ConcurrencySettings::default()
        });
        // Steady use: every slot refilled as soon as it frees. Twelve successes: 4 -> 16.
        for _ in 0..12 {
            while l.try_acquire() {}
            l.release(ms(1), Release::Success(ms(10)));
        }
        assert_eq!(l.limit(), 16);
        while l.try_acquire() {}
        l.release(ms(10), Release::Overload);
        assert_eq!(l.limit(), 12);
        // Now additive: about a limit's worth of successes adds one slot.
        for _ in 0..13 {
            while l.try_acquire() {}
            l.release(ms(20), Release::Success(ms(10)));
        }
        assert_eq!(l.limit(), 13);
    }

    #[test]
    fn limit_stays_within_bounds() {
        let mut l = AimdLimit::new(ConcurrencySettings {
            max: 20.0,
            ..ConcurrencySettings::default()
        });
        for i in 0..2_000 {
            while l.try_acquire() {}
            while l.in_flight() > 0 {
                l.release(i, Release::Success(ms(10)));
            }
        }
        // A fully used limit grows to the maximum and no further.
        assert_eq!(l.limit(), 20);
        for i in 0..100 {
            l.release(ms(1000 * i), Release::Overload);
        }
        assert_eq!(l.limit(), 1);
    }
}
