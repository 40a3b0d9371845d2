//! Whether a retry is affordable.
//!
//! Per-request attempt limits do not bound a storm: if every request retries three times, a
//! provider at 100% errors sees four times the traffic exactly when it can least take it. A retry
//! budget bounds the *ratio*: retries may add at most `ratio` of recent first attempts, plus a
//! small floor so that a quiet service can still retry at all (tower's `TpsBudget`, gRPC's
//! `retryThrottling.tokenRatio`, the AWS SDK's retry quota).
//!
//! Accounting follows tower: integer units, each first attempt deposits `ratio × 1000` units into
//! the current time bucket, each retry withdraws 1000. The balance is the reserve (`floor per
//! second × window`) plus the sum of the buckets still inside the window. Deposits and
//! withdrawals both expire with their bucket, so the budget heals by itself once traffic is
//! normal again, with no timers.
//!
//! Unlike tower, a retry that gets answered refunds its withdrawal ([`RetryBudget::refund`]):
//! it added load the provider could carry, which is not the storm the budget exists to stop.
//! So the ratio bounds *failed* retries, and total attempts stay below `(2 + ratio)` times the
//! requests even in the worst case (each request succeeds at most once). The simulator's
//! brownout (35% of answers busy, at random) showed why: there every retry has the same 65%
//! chance as a first attempt, and charging answered retries failed requests that two more
//! tries would have answered.

use crate::time::{Nanos, SECOND};
use crate::window::Ring;

/// Units one retry costs. A deposit is `ratio_permille` units, so a ratio of 200 ‰ lets five
/// first attempts pay for one retry.
const WITHDRAW_UNITS: i64 = 1000;

/// Buckets in the window: a withdrawal or deposit expires within a tenth of the window of its
/// nominal age, precise enough for a budget and small enough to copy.
const BUCKETS: usize = 10;

/// A retry budget over a sliding window.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ring: Ring<i64, BUCKETS>,
    deposit_units: i64,
    reserve_units: i64,
}

/// The budget's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetSettings {
    /// How long deposits and withdrawals count. Default 10 s (tower's default).
    pub window: Nanos,
    /// Retries allowed per thousand first attempts. Default 1000 (one failed retry per first
    /// attempt; answered retries are refunded). Tower's 20% suits RPCs that rarely fail; a
    /// provider in a brownout answers a third of requests busy, and 20% failed a fifth of all
    /// requests in the simulator's brownout. On generated worlds 60% still cost answers where
    /// the OpenAI SDKs' own two retries got them (a 58% 429 storm); 100% keeps the attempts per
    /// request below the textbook retry loop's in all but a few worlds, and the breaker stops
    /// retries to a provider that is really down long before the budget does.
    pub ratio_permille: u32,
    /// Retries per second always allowed, however quiet the traffic. Default 1: an LLM proxy
    /// often sees a few requests a second, and must still retry a lone failure.
    pub min_per_second: u32,
}

impl Default for BudgetSettings {
    fn default() -> Self {
        Self {
            window: 10 * SECOND,
            ratio_permille: 1000,
            min_per_second: 1,
        }
    }
}

impl RetryBudget {
    /// A budget with these settings.
    pub fn new(settings: BudgetSettings) -> Self {
        let window_secs = i64::try_from(settings.window / SECOND)
            .unwrap_or(i64::MAX)
            .max(1);
        Self {
            ring: Ring::new(settings.window),
            deposit_units: i64::from(settings.ratio_permille),
            reserve_units: i64::from(settings.min_per_second)
                .saturating_mul(window_secs)
                .saturating_mul(WITHDRAW_UNITS),
        }
    }

    /// Records a first attempt (not a retry): earns `ratio` of a retry.
    pub fn deposit(&mut self, now: Nanos) {
        let slot = self.ring.current(now);
        *slot = slot.saturating_add(self.deposit_units);
    }

    /// The balance at `now`, in units (1000 per retry).
    pub fn balance(&self, now: Nanos) -> i64 {
        self.ring
            .fold(now, self.reserve_units, |acc, v| acc.saturating_add(*v))
    }

    /// Retries affordable at `now` (rounded down).
    pub fn available(&self, now: Nanos) -> u64 {
        u64::try_from(self.balance(now) / WITHDRAW_UNITS).unwrap_or(0)
    }

    /// Gives back one retry's units: the retry was answered.
    pub fn refund(&mut self, now: Nanos) {
        let slot = self.ring.current(now);
        *slot = slot.saturating_add(WITHDRAW_UNITS);
    }

    /// Spends one retry if the balance allows; `false` means "do not retry".
    pub fn try_withdraw(&mut self, now: Nanos) -> bool {
        if self.balance(now) < WITHDRAW_UNITS {
            return false;
        }
        let slot = self.ring.current(now);
        *slot = slot.saturating_sub(WITHDRAW_UNITS);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{ms, secs};

    #[test]
    fn floor_allows_retries_with_no_traffic() {
        let mut b = RetryBudget::new(BudgetSettings::default());
        // 1 per second over 10 s: 10 retries, then none until they expire.
        for _ in 0..10 {
            assert!(b.try_withdraw(0));
        }
        assert!(!b.try_withdraw(0));
        assert!(b.try_withdraw(secs(11)));
    }

    #[test]
    fn ratio_of_traffic() {
        let mut b = RetryBudget::new(BudgetSettings {
            min_per_second: 0,
            ratio_permille: 600,
            ..BudgetSettings::default()
        });
        for i in 0..100 {
            b.deposit(ms(i));
        }
        let mut retries = 0;
        while b.try_withdraw(ms(100)) {
            retries += 1;
        }
        assert_eq!(retries, 60);
    }

    #[test]
    fn answered_retries_are_refunded() {
        let mut b = RetryBudget::new(BudgetSettings {
            min_per_second: 0,
            ratio_permille: 600,
            ..BudgetSettings::default()
        });
        for _ in 0..10 {
            b.deposit(0);
        }
        assert_eq!(b.available(0), 6);
        for _ in 0..6 {
            assert!(b.try_withdraw(0));
        }
        assert!(!b.try_withdraw(0));
        b.refund(0);
        assert!(b.try_withdraw(0));
        assert!(!b.try_withdraw(0));
    }

    #[test]
    fn deposits_expire() {
        let mut b = RetryBudget::new(BudgetSettings {
            min_per_second: 0,
            ratio_permille: 600,
            ..BudgetSettings::default()
        });
        for _ in 0..50 {
            b.deposit(0);
        }
        assert_eq!(b.available(secs(1)), 30);
        assert_eq!(b.available(secs(11)), 0);
    }
}
