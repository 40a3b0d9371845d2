//! An adaptive concurrency limit per provider.
//!
//! DeepSeek limits concurrency per account: a request counts from send until the response
//! completes, and above the quota every request gets 429. Retrying such a 429 quickly only adds
//! to the queue. The answer is to learn the quota and *pace*: keep at most `limit` attempts in
//! flight, and let the others wait for a slot (the engine queues them) instead of sending them.
//!
//! **A limit binds only where a provider has a quota.** Thousands of long LLM calls in flight
//! are normal, and a provider without a concurrency quota gains nothing from our queueing: the
//! simulator showed a provider answering in 11.5 s at 90 requests a second (about 1,000 calls in
//! flight by Little's law) starved by a limit that started at 64, its requests queueing until
//! their deadlines. So the limit binds from the start only when the operator configured the
//! provider's quota (`max_concurrency`, where it starts), and otherwise only from the first
//! quota verdict, where it starts at `backoff_ratio` times what was in flight when the provider
//! said "no more".
//!
//! Once it binds, the limit is AIMD (additive increase, multiplicative decrease, as TCP and
//! Netflix's `concurrency-limits`):
//! - each successful completion adds `1 / limit` (so one whole slot per `limit` successes);
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
//!
//! A learned limit that sees no quota verdict for [`FORGET_AFTER`] is forgotten: random bare
//! 429s (a storm, whatever the load) shrink any AIMD limit to its floor, as random loss does
//! TCP's window, and additive increase from one slot would take thousands of answers to undo.
//! It is forgotten gradually, doubling every [`FORGET_STEP`] until it no longer binds at
//! [`FORGET_CEILING`]: at once, it released every request it held in the same instant (a
//! provider with room for 80, paced at 55 for five quiet seconds after an outage, got 747 in
//! flight when its learned limit was dropped). Doubling gives the held requests back within a
//! second or two, and a real quota refuses the excess while it is at most twice its size,
//! which is a quota verdict that keeps the limit.
//! A configured quota is fixed: the operator knows it, and a bare 429 below it is not a verdict
//! on our concurrency. Which attempts a limit holds back is the engine's rule (`engine::paced`).
//!
//! Fixed-size state, `now` passed in.

/// 2 to the power `n` (0 to 1023), exactly: what `libm::exp2` gives for a whole number, without
/// its 4 KB table in the wasm builds.
fn pow2(n: u64) -> f64 {
    f64::from_bits((1023 + n.min(1023)) << 52)
}

#[cfg(test)]
use crate::time::secs;
use crate::time::{ms, Nanos};

/// The limit's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConcurrencySettings {
    /// Whether the limit is the provider's known quota: it binds from the start at `initial`
    /// and learns nothing (a bare 429 below a configured quota is not ours to shrink for).
    /// Default false: it binds from the first quota verdict, and learns.
    pub bound: bool,
    /// The limit to start with when it binds from the start. Default 64.
    pub initial: f64,
    /// Never below this. Default 1: one request in flight always makes progress.
    pub min: f64,
    /// Never above this (a quota the operator knows). Default 100,000: in effect, only a
    /// configured quota caps it.
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
            bound: false,
            initial: 64.0,
            min: 1.0,
            max: 100_000.0,
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
    /// Whether the limit binds (see the module doc).
    bound: bool,
    /// Whether it is a configured quota, which never changes.
    fixed: bool,
}

/// A learned limit with no quota verdict for this long stops binding: the provider's refusals
/// were a passing storm, not a quota (a real quota soon refuses again, and the limit is learned
/// anew from what is in flight then).
pub const FORGET_AFTER: Nanos = 5_000_000_000;

/// How often a learned limit being forgotten doubles (see the module doc).
pub const FORGET_STEP: Nanos = 125_000_000;

/// A learned limit being forgotten stops binding at this many slots.
pub const FORGET_CEILING: f64 = 4096.0;

impl AimdLimit {
    /// A limiter at its initial limit with nothing in flight.
    pub fn new(settings: ConcurrencySettings) -> Self {
        Self {
            limit: settings.initial.max(settings.min).min(settings.max),
            settings,
            in_flight: 0,
            last_decrease: None,
            latency_avg: None,
            bound: settings.bound,
            fixed: settings.bound,
        }
    }

    /// A limit already learned at `limit` slots, as after a quota verdict.
    pub fn learned(settings: ConcurrencySettings, limit: f64) -> Self {
        let mut l = Self::new(ConcurrencySettings {
            bound: false,
            ..settings
        });
        l.bound = true;
        l.limit = limit.max(settings.min).min(settings.max);
        l
    }

    /// The limit at `now`, `None` while it does not bind: the learned one, or, after
    /// [`FORGET_AFTER`] without a quota verdict, the learned one doubled every [`FORGET_STEP`]
    /// since, until [`FORGET_CEILING`].
    fn effective(&self, now: Nanos) -> Option<f64> {
        if !self.bound {
            return None;
        }
        let Some(quiet_from) = self
            .last_decrease
            .filter(|_| !self.fixed)
            .map(|t| t.saturating_add(FORGET_AFTER))
        else {
            return Some(self.limit); // a configured quota, or no verdict to forget
        };
        if now < quiet_from {
            return Some(self.limit);
        }
        let doublings = (now - quiet_from) / FORGET_STEP + 1;
        let grown = self.limit * pow2(doublings.min(64));
        (grown < FORGET_CEILING && grown < self.settings.max).then_some(grown)
    }

    /// The limit at `now` as a whole number of slots (at least 1); `u32::MAX` while it does
    /// not bind.
    pub fn limit(&self, now: Nanos) -> u32 {
        self.effective(now).map_or(u32::MAX, |l| (l as u32).max(1))
    }

    /// Whether the limit binds at `now`: a quota was configured or shown, and is not yet
    /// forgotten.
    pub fn binds(&self, now: Nanos) -> bool {
        self.effective(now).is_some()
    }

    /// When a learned limit being forgotten next grows, if it binds at `now` and will.
    pub fn next_growth(&self, now: Nanos) -> Option<Nanos> {
        if self.fixed || !self.binds(now) {
            return None;
        }
        let quiet_from = self.last_decrease?.saturating_add(FORGET_AFTER);
        if now < quiet_from {
            return Some(quiet_from);
        }
        let step = (now - quiet_from) / FORGET_STEP + 1;
        Some(quiet_from.saturating_add(step.saturating_mul(FORGET_STEP)))
    }

    /// Attempts in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Whether a slot is free at `now`.
    pub fn has_room(&self, now: Nanos) -> bool {
        self.in_flight < self.limit(now)
    }

    /// Takes a slot if one is free at `now`.
    pub fn try_acquire(&mut self, now: Nanos) -> bool {
        if self.has_room(now) {
            self.acquire();
            true
        } else {
            false
        }
    }

    /// Takes a slot whether or not one is free (an attempt the limit must not hold back, see
    /// the engine's `paced`).
    pub fn acquire(&mut self) {
        self.in_flight = self.in_flight.saturating_add(1);
    }

    /// Returns a slot and learns from how the attempt ended.
    pub fn release(&mut self, now: Nanos, how: Release) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if self.fixed {
            return;
        }
        // (Read only while the limit binds: an unbound one learns from its first verdict.)
        let forgetting = self
            .last_decrease
            .is_some_and(|t| now.saturating_sub(t) >= FORGET_AFTER);
        let grown = self.effective(now);
        if grown.is_none() {
            self.bound = false;
        }
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
                if !self.bound {
                    // Nothing to learn until the provider shows a quota.
                } else if slow {
                    self.decrease(now, (1.0 + self.settings.backoff_ratio) / 2.0);
                } else if self.in_flight + 1 >= self.limit(now) / 2 {
                    // Only grow when the limit is actually being used: a limit that is never
                    // reached proves nothing about the provider.
                    self.limit = (self.limit + 1.0 / self.limit).min(self.settings.max);
                }
            }
            Release::Overload if !self.bound => {
                // The first quota verdict: the provider's room is below what was in flight.
                self.bound = true;
                let shown = f64::from(self.in_flight.saturating_add(1));
                self.limit = (shown * self.settings.backoff_ratio)
                    .max(self.settings.min)
                    .min(self.settings.max);
                self.last_decrease = Some(now);
            }
            Release::Overload => {
                if let (true, Some(grown)) = (forgetting, grown) {
                    // A verdict while being forgotten: decrease from what it has grown to.
                    self.limit = grown;
                }
                self.decrease(now, self.settings.backoff_ratio);
            }
            Release::Neutral => {}
        }
    }

    fn decrease(&mut self, now: Nanos, ratio: f64) {
        let cooled = self
            .last_decrease
            .is_none_or(|t| now.saturating_sub(t) >= self.settings.decrease_cooldown);
        if cooled {
            self.limit = (self.limit * ratio).max(self.settings.min);
            self.last_decrease = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_is_exp2_for_the_doublings() {
        for n in 0..=64 {
            assert_eq!(pow2(n), libm::exp2(n as f64), "2^{n}");
        }
    }

    #[test]
    fn slots_are_bounded() {
        let mut l = AimdLimit::learned(ConcurrencySettings::default(), 2.0);
        assert!(l.try_acquire(0));
        assert!(l.try_acquire(0));
        assert!(!l.try_acquire(0));
        l.release(0, Release::Neutral);
        assert!(l.try_acquire(0));
    }

    #[test]
    fn overload_burst_decreases_once_per_cooldown() {
        let mut l = AimdLimit::learned(ConcurrencySettings::default(), 16.0);
        for _ in 0..16 {
            assert!(l.try_acquire(0));
        }
        for _ in 0..10 {
            l.release(ms(1000), Release::Overload);
        }
        assert_eq!(l.limit(ms(1000)), 12);
        l.release(ms(1600), Release::Overload);
        assert_eq!(l.limit(ms(1600)), 9);
    }

    #[test]
    fn a_configured_quota_is_fixed() {
        let settings = ConcurrencySettings {
            bound: true,
            initial: 3.0,
            ..ConcurrencySettings::default()
        };
        let mut l = AimdLimit::new(settings);
        for now in 0..100 {
            while l.try_acquire(ms(now * 1000)) {}
            assert_eq!(l.in_flight(), 3);
            l.release(ms(now * 1000), Release::Overload);
            l.release(ms(now * 1000), Release::Success(ms(10)));
            assert_eq!(l.limit(ms(now * 1000)), 3);
        }
    }

    #[test]
    fn a_learned_limit_is_forgotten_without_verdicts_doubling_until_it_no_longer_binds() {
        let mut l = AimdLimit::learned(ConcurrencySettings::default(), 10.0);
        l.release(ms(0), Release::Overload); // 10 * 0.75
        assert_eq!(l.limit(0), 7);
        assert_eq!(l.limit(FORGET_AFTER - 1), 7);
        assert_eq!(l.next_growth(ms(1)), Some(FORGET_AFTER));
        // Then it doubles every step, never all at once: the requests it holds are let go
        // within a second or two, and a real quota can refuse the excess while it is small.
        for step in 0..9u32 {
            let at = FORGET_AFTER + u64::from(step) * FORGET_STEP;
            assert_eq!(
                l.limit(at),
                (7.5 * f64::from(2u32 << step)) as u32,
                "step {step}"
            );
            assert!(l.binds(at));
            assert_eq!(l.next_growth(at), Some(at + FORGET_STEP));
        }
        // 7.5 * 2^10 = 7680 is past the ceiling: it no longer binds.
        let end = FORGET_AFTER + 9 * FORGET_STEP;
        assert!(!l.binds(end));
        assert_eq!(l.limit(end), u32::MAX);
        l.release(end, Release::Success(ms(10)));
        assert!(!l.binds(end));
    }

    #[test]
    fn a_limit_being_forgotten_stops_binding_at_the_ceiling_or_the_maximum() {
        let halving = ConcurrencySettings {
            backoff_ratio: 0.5,
            ..ConcurrencySettings::default()
        };
        let mut l = AimdLimit::learned(halving, 32.0);
        l.release(0, Release::Overload); // 16
                                         // 16 * 2^7 = 2048 still binds; 16 * 2^8 = 4096 is the ceiling, where it stops.
        assert_eq!(l.limit(FORGET_AFTER + 6 * FORGET_STEP), 2048);
        assert!(!l.binds(FORGET_AFTER + 7 * FORGET_STEP));
        assert_eq!(l.next_growth(FORGET_AFTER + 7 * FORGET_STEP), None);
        // A lower maximum ends it sooner, at the maximum.
        let mut l = AimdLimit::learned(
            ConcurrencySettings {
                max: 256.0,
                ..halving
            },
            32.0,
        );
        l.release(0, Release::Overload); // 16
        assert_eq!(l.limit(FORGET_AFTER + 2 * FORGET_STEP), 128);
        assert!(!l.binds(FORGET_AFTER + 3 * FORGET_STEP), "16 * 2^4 = 256");
        // A configured quota is never forgotten and never grows.
        let quota = AimdLimit::new(ConcurrencySettings {
            bound: true,
            initial: 3.0,
            ..ConcurrencySettings::default()
        });
        assert_eq!(quota.next_growth(secs(60)), None);
        assert_eq!(quota.limit(secs(60)), 3);
        // Nor does one that does not bind.
        assert_eq!(
            AimdLimit::new(ConcurrencySettings::default()).next_growth(0),
            None
        );
    }

    #[test]
    fn a_verdict_while_forgetting_decreases_from_what_the_limit_has_grown_to() {
        let mut l = AimdLimit::learned(ConcurrencySettings::default(), 40.0);
        l.release(0, Release::Overload); // 30
        for _ in 0..100 {
            l.acquire();
        }
        // Three steps in: 30 * 8 = 240; a quota verdict then: 0.75 of it, and binding again.
        let at = FORGET_AFTER + 2 * FORGET_STEP;
        assert_eq!(l.limit(at), 240);
        l.release(at, Release::Overload);
        assert_eq!(l.limit(at), 180);
        assert_eq!(l.limit(at + FORGET_AFTER - 1), 180);
    }

    #[test]
    fn unbound_until_the_first_quota_verdict() {
        let mut l = AimdLimit::new(ConcurrencySettings::default());
        for _ in 0..5_000 {
            assert!(l.try_acquire(0), "no quota shown: no limit");
        }
        for _ in 0..100 {
            l.release(ms(1), Release::Success(ms(10)));
        }
        assert!(!l.binds(ms(1)));
        assert_eq!(l.limit(ms(1)), u32::MAX);
        // 4,900 in flight, then a quota verdict: 0.75 of what was in flight.
        l.release(ms(2), Release::Overload);
        assert!(l.binds(ms(2)));
        assert_eq!(l.limit(ms(2)), 3_675);
        assert!(!l.has_room(ms(2)));
    }

    #[test]
    fn converges_near_a_quota() {
        // A provider that overloads above 10 in flight: the limit must settle around 10.
        let quota = 10;
        let mut l = AimdLimit::new(ConcurrencySettings::default());
        let mut now = 0;
        // One round per second: every attempt takes about a second, as LLM calls do. Until the
        // limit binds, a round sends 100.
        for _ in 0..600 {
            now += ms(1000);
            let mut sent = 0;
            while sent < 100 && l.try_acquire(now) {
                sent += 1;
            }
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
        assert!((8..=14).contains(&l.limit(now)), "limit {}", l.limit(now));
    }

    #[test]
    fn a_used_limit_grows_by_one_slot_per_limit_successes_and_an_unused_one_not_at_all() {
        let mut l = AimdLimit::learned(ConcurrencySettings::default(), 10.0);
        // Used (at least half of it in flight): each success adds 1/limit.
        for _ in 0..10 {
            l.acquire();
        }
        l.release(ms(1), Release::Success(ms(100)));
        assert!((l.limit - 10.1).abs() < 1e-9, "{}", l.limit);
        // Down to four in flight; the next release leaves three, and 3 + 1 is below half the
        // limit: no growth.
        for _ in 0..5 {
            l.release(ms(2), Release::Success(ms(100)));
        }
        // Six successes grew it, the last with 4 + 1 in flight, exactly half of 10.
        let mut expected = 10.0;
        for _ in 0..6 {
            expected += 1.0 / expected;
        }
        assert!(
            (l.limit - expected).abs() < 1e-9,
            "{} vs {expected}",
            l.limit
        );
        let before = l.limit;
        l.release(ms(3), Release::Success(ms(100)));
        assert_eq!(l.limit, before, "grew while 3 of 10 were in flight");
        // Neutral outcomes teach nothing.
        l.acquire();
        l.release(ms(4), Release::Neutral);
        assert_eq!(l.limit, before);
    }

    #[test]
    fn with_a_latency_tolerance_a_slow_success_is_half_an_overload() {
        let settings = ConcurrencySettings {
            latency_tolerance: 2.0,
            ..ConcurrencySettings::default()
        };
        let mut l = AimdLimit::learned(settings, 16.0);
        for _ in 0..16 {
            l.acquire();
        }
        // The average starts at the first latency, 100 ms.
        l.release(ms(1), Release::Success(ms(100)));
        let used = l.limit;
        // Twice the average is not slower than the tolerance; just above it is.
        l.release(ms(2), Release::Success(ms(200)));
        assert!(
            l.limit >= used,
            "{} after exactly twice the average",
            l.limit
        );
        // The average is now 105 ms (0.05 of the way from 100 to 200): 205 ms is within twice
        // it; then 110 ms, and 221 ms is not.
        let before = l.limit;
        l.release(ms(3), Release::Success(ms(205)));
        assert!(l.limit >= before, "{} after 205 ms against 105", l.limit);
        let before = l.limit;
        l.release(secs(1), Release::Success(ms(221)));
        let expected = before * (1.0 + 0.75) / 2.0;
        assert!(
            (l.limit - expected).abs() < 1e-9,
            "{} vs {expected}",
            l.limit
        );
        // Off by default: however slow, no decrease.
        let mut l = AimdLimit::learned(ConcurrencySettings::default(), 16.0);
        for _ in 0..16 {
            l.acquire();
        }
        l.release(ms(1), Release::Success(ms(100)));
        let before = l.limit;
        l.release(secs(1), Release::Success(secs(100)));
        assert!(l.limit >= before);
    }

    #[test]
    fn a_learned_limit_learns_whatever_the_settings_say_about_a_configured_quota() {
        let settings = ConcurrencySettings {
            bound: true,
            ..ConcurrencySettings::default()
        };
        let mut l = AimdLimit::learned(settings, 8.0);
        l.acquire();
        l.release(ms(1), Release::Overload);
        assert_eq!(l.limit(ms(1)), 6, "a learned limit decreases on a verdict");
    }

    #[test]
    fn limit_stays_within_bounds() {
        let settings = ConcurrencySettings {
            max: 20.0,
            ..ConcurrencySettings::default()
        };
        let mut l = AimdLimit::learned(settings, 1.0);
        for i in 0..2_000 {
            while l.try_acquire(i) {}
            while l.in_flight() > 0 {
                l.release(i, Release::Success(ms(10)));
            }
        }
        // A fully used limit grows to the maximum and no further.
        assert_eq!(l.limit(2_000), 20);
        for i in 0..100 {
            l.release(ms(1000 * i), Release::Overload);
        }
        assert_eq!(l.limit(ms(99_000)), 1);
    }
}
