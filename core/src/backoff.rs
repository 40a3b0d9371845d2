//! When to try again.
//!
//! Clients that retry on a fixed schedule (1 s, doubling, five times, all at once) turn a
//! provider's brownout into an outage: every failed wave comes back as a bigger synchronised wave.
//! Jitter spreads the retries out (AWS Architecture Blog, "Exponential Backoff and Jitter"):
//! - **full**: `random(0, min(cap, base * 2^n))`; the least total work, the widest spread;
//! - **equal**: half of the exponential step fixed, half random; never retries almost at once;
//! - **decorrelated**: `min(cap, random(base, previous * 3))`; grows from the last delay actually
//!   slept rather than from the attempt number.
//!
//! A server's hint (`Retry-After`, `retry-after-ms`, rate-limit reset; see [`crate::classify`]) is
//! honoured when it is within `max_hint` (the OpenAI SDKs believe 0 to 60 s), with a little jitter
//! on top so that every client told "retry in 1 s" does not come back in the same millisecond.
//! A hint beyond `max_hint` means this provider is out for longer than we are willing to wait:
//! the schedule gives up on it (the engine then fails over, or fails fast with that hint).
//!
//! Nothing is ever scheduled at or past the request's deadline: a retry that cannot finish in
//! time only adds load. Builders are `const fn` with documented defaults, after `backon`.

use crate::time::{ms, secs, Nanos};
use fastrand::Rng;

/// How retry delays are randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// `random(0, exp)` where `exp = min(cap, base * 2^(n-1))`.
    Full,
    /// `exp / 2 + random(0, exp / 2)`.
    Equal,
    /// `min(cap, random(base, 3 * previous))`.
    Decorrelated,
    /// `exp`, no randomness: for tests and for comparison with naive clients only.
    None,
}

/// A backoff schedule: base delay, cap, attempt limit, jitter and how far a server hint is
/// believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first retry's (pre-jitter) delay. Default 250 ms: an overloaded LLM provider does not
    /// recover within Envoy's 25 ms, and the first retry should already leave room.
    pub base: Nanos,
    /// The largest delay. Default 8 s, as the OpenAI SDKs.
    pub cap: Nanos,
    /// The most attempts in total, the first included. Default 4 (three retries).
    pub max_attempts: u32,
    /// The randomisation. Default [`Jitter::Full`].
    pub jitter: Jitter,
    /// The longest server hint honoured. Default 60 s, as the OpenAI SDKs.
    pub max_hint: Nanos,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Why no retry was scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// `max_attempts` were made.
    AttemptsExhausted,
    /// The retry would start at or after the request's deadline.
    PastDeadline,
    /// The server asked for a wait longer than `max_hint`; carries the hint.
    HintTooLong(Nanos),
}

/// The answer to "when may attempt `n` start?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Start the next attempt at `at` (`delay` after now).
    RetryAt {
        /// When.
        at: Nanos,
        /// How long after `now` that is; feed it back as `previous` next time.
        delay: Nanos,
    },
    /// Do not retry.
    GiveUp(GiveUp),
}

impl Backoff {
    /// The documented defaults: 250 ms base, 8 s cap, 8 attempts, full jitter, 60 s hint cap.
    /// Eight attempts because a brownout answering 35% of requests busy leaves 1.5% of
    /// requests failed after four attempts and 0.02% after eight; the retry budget, not the
    /// attempt count, is what bounds the extra load.
    pub const DEFAULT: Self = Self {
        base: ms(250),
        cap: secs(8),
        max_attempts: 8,
        jitter: Jitter::Full,
        max_hint: secs(60),
    };

    /// Sets the base delay.
    pub const fn with_base(mut self, base: Nanos) -> Self {
        self.base = base;
        self
    }

    /// Sets the cap.
    pub const fn with_cap(mut self, cap: Nanos) -> Self {
        self.cap = cap;
        self
    }

    /// Sets the attempt limit (the first attempt included).
    pub const fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets the jitter.
    pub const fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets the longest server hint honoured.
    pub const fn with_max_hint(mut self, max_hint: Nanos) -> Self {
        self.max_hint = max_hint;
        self
    }

    /// The un-jittered exponential step before retry number `retry` (1 for the first retry):
    /// `min(cap, base * 2^(retry-1))`.
    pub fn exponential(&self, retry: u32) -> Nanos {
        let shift = retry.saturating_sub(1).min(63);
        self.base.saturating_mul(1u64 << shift).min(self.cap)
    }

    /// The jittered delay before retry number `retry` (1-based). `previous` is the delay slept
    /// before the previous retry (0 before the first), used by decorrelated jitter.
    pub fn delay(&self, retry: u32, previous: Nanos, rng: &mut Rng) -> Nanos {
        let exp = self.exponential(retry);
        match self.jitter {
            Jitter::None => exp,
            Jitter::Full => rng.u64(0..=exp),
            Jitter::Equal => {
                let half = exp / 2;
                half + rng.u64(0..=exp - half)
            }
            Jitter::Decorrelated => {
                let low = self.base.min(self.cap);
                let high = previous.saturating_mul(3).max(low).min(self.cap.max(low));
                rng.u64(low..=high)
            }
        }
    }

    /// Decides when attempt number `next_attempt` (2 for the first retry) may start, given the
    /// server's hint, the request's deadline and the previous delay. The returned instant is
    /// always strictly before `deadline`.
    pub fn schedule(
        &self,
        now: Nanos,
        deadline: Nanos,
        next_attempt: u32,
        previous: Nanos,
        hint: Option<Nanos>,
        rng: &mut Rng,
    ) -> Schedule {
        if next_attempt > self.max_attempts || next_attempt < 2 {
            return Schedule::GiveUp(GiveUp::AttemptsExhausted);
        }
        let delay = match hint {
            Some(h) if h > self.max_hint => return Schedule::GiveUp(GiveUp::HintTooLong(h)),
            // Honour the hint, plus up to 10% (at most one base step) so that clients told the
            // same reset time do not return in the same instant. A hint is a lower bound, never
            // a replacement for the backoff: a short hint repeated on every answer must not
            // turn the retries into a storm.
            Some(h) => h
                .saturating_add(rng.u64(0..=(h / 10).min(self.base)))
                .max(self.delay(next_attempt - 1, previous, rng)),
            None => self.delay(next_attempt - 1, previous, rng),
        };
        let at = now.saturating_add(delay);
        if at >= deadline {
            Schedule::GiveUp(GiveUp::PastDeadline)
        } else {
            Schedule::RetryAt { at, delay }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden vectors: the first five delays of each jitter from seed 42. A change here changes
    /// every simulation's result; update only on purpose.
    #[test]
    fn golden_vectors() {
        let expected: [(Jitter, [Nanos; 5]); 4] = [
            (
                Jitter::None,
                [
                    250_000_000,
                    500_000_000,
                    1_000_000_000,
                    2_000_000_000,
                    4_000_000_000,
                ],
            ),
            (Jitter::Full, GOLDEN_FULL),
            (Jitter::Equal, GOLDEN_EQUAL),
            (Jitter::Decorrelated, GOLDEN_DECORRELATED),
        ];
        for (jitter, want) in expected {
            let b = Backoff::DEFAULT.with_jitter(jitter);
            let mut rng = Rng::with_seed(42);
            let mut previous = 0;
            let mut got = [0; 5];
            for (i, slot) in got.iter_mut().enumerate() {
                let d = b.delay(i as u32 + 1, previous, &mut rng);
                *slot = d;
                previous = d;
            }
            assert_eq!(got, want, "{jitter:?}");
        }
    }

    const GOLDEN_FULL: [Nanos; 5] = [197699912, 246792975, 804458731, 79838475, 2168010177];
    const GOLDEN_EQUAL: [Nanos; 5] = [223849956, 373396487, 902229366, 1039919237, 3084005088];
    const GOLDEN_DECORRELATED: [Nanos; 5] =
        [250000000, 496792975, 1247833656, 389457896, 747760875];

    #[test]
    fn a_hint_is_spread_by_at_most_a_tenth_and_a_base_step_and_the_longest_allowed_is_honoured() {
        let b = Backoff::DEFAULT
            .with_base(ms(100))
            .with_jitter(Jitter::None)
            .with_max_hint(secs(60));
        let deadline = secs(1_000);
        let delay_of = |s: Schedule| match s {
            Schedule::RetryAt { delay, .. } => delay,
            other => panic!("{other:?}"),
        };
        // A 500 ms hint: waited 500 ms plus up to 50 ms (a tenth of it, under one base step),
        // and the spread is real.
        let mut seen = alloc::vec::Vec::new();
        for seed in 0..200 {
            let mut rng = Rng::with_seed(seed);
            let d = delay_of(b.schedule(0, deadline, 2, 0, Some(ms(500)), &mut rng));
            assert!((ms(500)..=ms(550)).contains(&d), "seed {seed}: {d}");
            seen.push(d);
        }
        assert!(seen.iter().max() > seen.iter().min(), "no spread");
        // The longest hint allowed is honoured; one past it gives up.
        let mut rng = Rng::with_seed(1);
        assert!(matches!(
            b.schedule(0, deadline, 2, 0, Some(secs(60)), &mut rng),
            Schedule::RetryAt { .. }
        ));
        assert!(matches!(
            b.schedule(0, deadline, 2, 0, Some(secs(60) + 1), &mut rng),
            Schedule::GiveUp(GiveUp::HintTooLong(_))
        ));
        // A hint shorter than the backoff: the first retry's backoff, one base step.
        assert_eq!(
            delay_of(b.schedule(0, deadline, 2, 0, Some(ms(1)), &mut rng)),
            ms(100)
        );
    }

    #[test]
    fn exponential_is_capped_and_never_overflows() {
        let b = Backoff::DEFAULT;
        assert_eq!(b.exponential(1), ms(250));
        assert_eq!(b.exponential(3), ms(1000));
        assert_eq!(b.exponential(10), secs(8));
        assert_eq!(b.exponential(u32::MAX), secs(8));
    }

    #[test]
    fn hint_is_honoured_within_cap_and_refused_beyond() {
        let b = Backoff::DEFAULT;
        let mut rng = Rng::with_seed(1);
        match b.schedule(0, secs(60), 2, 0, Some(secs(2)), &mut rng) {
            Schedule::RetryAt { delay, .. } => {
                assert!(delay >= secs(2) && delay <= secs(2) + ms(200), "{delay}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            b.schedule(0, secs(600), 2, 0, Some(secs(300)), &mut rng),
            Schedule::GiveUp(GiveUp::HintTooLong(secs(300)))
        );
    }

    #[test]
    fn a_short_hint_never_shortens_the_backoff() {
        // Retry-After of 1 ms on every answer: each wait is at least the backoff's own, as
        // without the hint (same seed, same draws), never the hint alone.
        let b = Backoff::DEFAULT.with_jitter(Jitter::None);
        let mut rng = Rng::with_seed(3);
        for attempt in 2..=8 {
            let want = b.exponential(attempt - 1);
            match b.schedule(0, secs(600), attempt, 0, Some(ms(1)), &mut rng) {
                Schedule::RetryAt { delay, .. } => assert!(delay >= want, "{attempt}: {delay}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn never_past_deadline() {
        let b = Backoff::DEFAULT;
        let mut rng = Rng::with_seed(7);
        assert_eq!(
            b.schedule(secs(10), secs(11), 2, 0, Some(secs(5)), &mut rng),
            Schedule::GiveUp(GiveUp::PastDeadline)
        );
        assert_eq!(
            b.schedule(secs(10), secs(10), 2, 0, None, &mut rng),
            Schedule::GiveUp(GiveUp::PastDeadline)
        );
    }

    #[test]
    fn attempts_are_limited() {
        let b = Backoff::DEFAULT.with_max_attempts(3);
        let mut rng = Rng::with_seed(7);
        assert!(matches!(
            b.schedule(0, secs(100), 3, 0, None, &mut rng),
            Schedule::RetryAt { .. }
        ));
        assert_eq!(
            b.schedule(0, secs(100), 4, 0, None, &mut rng),
            Schedule::GiveUp(GiveUp::AttemptsExhausted)
        );
    }
}
