//! Token buckets with cost.
//!
//! LLM providers limit requests *and* tokens per minute, so admission has to charge both: one
//! unit per request, and the estimated prompt tokens plus `max_tokens` per request. A refusal is
//! not just "no" but "not until T": T becomes the `Retry-After` of the local 429, so well-behaved
//! SDKs come back exactly when there is room instead of hammering.
//!
//! The bucket is GCRA (the generic cell rate algorithm, as `governor`): its whole state is one
//! number, the theoretical arrival time (TAT). That makes it cheap, exact in integer nanoseconds,
//! and easy to share between Envoy worker threads with one compare-and-swap on shared data
//! ([`gcra`] is the pure step a host applies to a shared TAT).
//!
//! [`KeyedBuckets`] holds one TAT per tenant in a fixed table with bounded probing. Memory never
//! grows with the number of tenants: when the probe window is full, the entry with the oldest TAT
//! (the tenant closest to a full bucket) is evicted, and a fully refilled bucket is
//! indistinguishable from a fresh one, so evicting idle tenants loses nothing. Under adversarial
//! key churn an evicted busy tenant gets a fresh bucket: memory stays bounded at the price of
//! some leniency, which is the documented trade.

use crate::time::{Nanos, SECOND};
use alloc::vec::Vec;

/// A rate: `amount` units per `period`, with bursts up to `burst` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units replenished per period (> 0).
    pub amount: u64,
    /// The period (> 0).
    pub period: Nanos,
    /// The largest cost accepted at once when the bucket is full (> 0).
    pub burst: u64,
}

impl Rate {
    /// `amount` per second with a burst of `amount`.
    pub const fn per_second(amount: u64) -> Self {
        Self {
            amount,
            period: SECOND,
            burst: amount,
        }
    }

    /// `amount` per minute with a burst of `amount`.
    pub const fn per_minute(amount: u64) -> Self {
        Self {
            amount,
            period: 60 * SECOND,
            burst: amount,
        }
    }

    /// Sets the burst.
    pub const fn with_burst(mut self, burst: u64) -> Self {
        self.burst = burst;
        self
    }

    /// Time that `cost` units take to replenish, rounded up.
    fn interval(&self, cost: u64) -> Nanos {
        let amount = self.amount.max(1);
        // In 64 bits when the product fits (always, for real rates): 128-bit division is a
        // software routine on wasm, on every admission's path.
        if let Some(product) = cost.checked_mul(self.period) {
            return product.div_ceil(amount);
        }
        match div_wide(u128::from(cost) * u128::from(self.period), amount) {
            Some((q, 0)) => q,
            Some((q, _)) => q.saturating_add(1),
            None => u64::MAX,
        }
    }

    /// The burst expressed as time: how far ahead of `now` the TAT may run.
    fn tolerance(&self) -> Nanos {
        self.interval(self.burst)
    }
}

/// `n / d` (`d` > 0) and its remainder, or `None` when the quotient does not fit in 64 bits: a
/// shift-and-subtract division rather than `u128`'s, which is a 1 KB software routine on wasm
/// (only products that overflow 64 bits come here). Never inlined: where rustc inlined it, the
/// Envoy filter came out 18 KB larger (293,962 bytes rather than 275,455).
#[inline(never)]
fn div_wide(n: u128, d: u64) -> Option<(u64, u64)> {
    let (mut rem, mut low) = ((n >> 64) as u64, n as u64);
    if rem >= d {
        return None;
    }
    let mut q = 0u64;
    for _ in 0..64 {
        // rem < d throughout; shifting in the next bit may carry out of 64 bits.
        let carry = rem >> 63;
        rem = (rem << 1) | (low >> 63);
        low <<= 1;
        q <<= 1;
        if carry == 1 || rem >= d {
            rem = rem.wrapping_sub(d);
            q |= 1;
        }
    }
    Some((q, rem))
}

/// The answer of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead (the cost was charged, if this was a `take`).
    Allowed,
    /// Not before this instant.
    NotUntil(Nanos),
    /// The cost exceeds the burst: it will never fit. The caller must reduce it (or the
    /// operator the cost), not wait.
    Never,
}

impl Decision {
    /// Whether the request may proceed.
    pub const fn is_allowed(self) -> bool {
        matches!(self, Self::Allowed)
    }
}

/// A bucket's theoretical arrival time once `cost` charged to it is given back (a request
/// refused by another bucket after this one was charged).
pub fn gcra_refund(rate: &Rate, tat: Nanos, cost: u64) -> Nanos {
    tat.saturating_sub(rate.interval(cost))
}

/// One GCRA step on a bare TAT: returns the decision and the TAT to store if it was allowed.
/// Hosts that keep the TAT in shared memory apply this in a compare-and-swap loop.
pub fn gcra(rate: &Rate, tat: Nanos, now: Nanos, cost: u64) -> (Decision, Nanos) {
    if cost > rate.burst {
        return (Decision::Never, tat);
    }
    let start = tat.max(now);
    let new_tat = start.saturating_add(rate.interval(cost));
    let allow_at = new_tat.saturating_sub(rate.tolerance());
    if allow_at <= now {
        (Decision::Allowed, new_tat)
    } else {
        (Decision::NotUntil(allow_at), tat)
    }
}

/// A single token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    rate: Rate,
    tat: Nanos,
}

impl TokenBucket {
    /// A full bucket.
    pub const fn new(rate: Rate) -> Self {
        Self { rate, tat: 0 }
    }

    /// The bucket's rate.
    pub const fn rate(&self) -> &Rate {
        &self.rate
    }

    /// Would `cost` be allowed at `now`? Charges nothing.
    pub fn check(&self, now: Nanos, cost: u64) -> Decision {
        gcra(&self.rate, self.tat, now, cost).0
    }

    /// Charges `cost` if allowed.
    pub fn take(&mut self, now: Nanos, cost: u64) -> Decision {
        let (decision, tat) = gcra(&self.rate, self.tat, now, cost);
        self.tat = tat;
        decision
    }

    /// Gives back `cost` units (an estimate that turned out too high, a request refused later).
    pub fn refund(&mut self, cost: u64) {
        self.tat = gcra_refund(&self.rate, self.tat, cost);
    }

    /// Units available now, rounded down.
    pub fn available(&self, now: Nanos) -> u64 {
        let used = self.tat.saturating_sub(now);
        let free = self.rate.tolerance().saturating_sub(used);
        let period = self.rate.period.max(1);
        let units = match free.checked_mul(self.rate.amount) {
            Some(product) => product / period,
            None => div_wide(u128::from(free) * u128::from(self.rate.amount), period)
                .map_or(u64::MAX, |(q, _)| q),
        };
        units.min(self.rate.burst)
    }
}

/// A request bucket and a token bucket charged together: both allow, or neither is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestAndTokenBuckets {
    /// Charged one unit per request.
    pub requests: Option<TokenBucket>,
    /// Charged the estimated LLM tokens per request.
    pub tokens: Option<TokenBucket>,
}

impl RequestAndTokenBuckets {
    /// Charges one request and `tokens` tokens if both buckets allow; otherwise charges nothing
    /// and says when both would.
    pub fn take(&mut self, now: Nanos, tokens: u64) -> Decision {
        let by_requests = self
            .requests
            .as_ref()
            .map_or(Decision::Allowed, |b| b.check(now, 1));
        let by_tokens = self
            .tokens
            .as_ref()
            .map_or(Decision::Allowed, |b| b.check(now, tokens));
        match combine(by_requests, by_tokens) {
            Decision::Allowed => {
                if let Some(b) = self.requests.as_mut() {
                    b.take(now, 1);
                }
                if let Some(b) = self.tokens.as_mut() {
                    b.take(now, tokens);
                }
                Decision::Allowed
            }
            other => other,
        }
    }
}

/// The stricter of two decisions.
pub fn combine(a: Decision, b: Decision) -> Decision {
    match (a, b) {
        (Decision::Never, _) | (_, Decision::Never) => Decision::Never,
        (Decision::NotUntil(x), Decision::NotUntil(y)) => Decision::NotUntil(x.max(y)),
        (Decision::NotUntil(x), Decision::Allowed) | (Decision::Allowed, Decision::NotUntil(x)) => {
            Decision::NotUntil(x)
        }
        (Decision::Allowed, Decision::Allowed) => Decision::Allowed,
    }
}

/// How many slots past a key's home slot are searched. Eight keeps a lookup within one or two
/// cache lines and makes eviction choose among eight candidates.
const PROBE: usize = 8;

/// One bucket per key (tenant) in a fixed-size table.
#[derive(Debug, Clone)]
pub struct KeyedBuckets {
    rate: Rate,
    /// `(key, tat)`; key 0 marks an empty slot (keys are remapped away from 0).
    slots: Vec<(u64, Nanos)>,
}

impl KeyedBuckets {
    /// A table for about `capacity` concurrently active keys (at least `PROBE`).
    pub fn new(rate: Rate, capacity: usize) -> Self {
        Self {
            rate,
            slots: alloc::vec![(0, 0); capacity.max(PROBE)],
        }
    }

    /// The number of slots (fixed at construction).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Would `cost` be allowed for `key` at `now`? Charges nothing.
    pub fn check(&self, key: u64, now: Nanos, cost: u64) -> Decision {
        let key = if key == 0 { 1 } else { key };
        let len = self.slots.len();
        let home = (mix(key) % len as u64) as usize;
        let tat = (0..PROBE.min(len))
            .filter_map(|step| self.slots.get((home + step) % len))
            .find(|(k, _)| *k == key)
            .map_or(0, |(_, tat)| *tat);
        gcra(&self.rate, tat, now, cost).0
    }

    /// Charges `cost` to `key`'s bucket if allowed. `key` is a hash of the tenant identity.
    pub fn take(&mut self, key: u64, now: Nanos, cost: u64) -> Decision {
        let rate = self.rate;
        let key = if key == 0 { 1 } else { key };
        let len = self.slots.len();
        let home = (mix(key) % len as u64) as usize;
        let mut victim = home;
        let mut victim_tat = Nanos::MAX;
        for step in 0..PROBE.min(len) {
            let index = (home + step) % len;
            let Some(&(k, tat)) = self.slots.get(index) else {
                continue;
            };
            if k == key {
                let (decision, new_tat) = gcra(&rate, tat, now, cost);
                if let Some(slot) = self.slots.get_mut(index) {
                    slot.1 = new_tat;
                }
                return decision;
            }
            // Empty slots and fully refilled buckets are free to reuse; otherwise remember the
            // slot whose bucket is closest to full.
            let effective_tat = if k == 0 { 0 } else { tat };
            if effective_tat < victim_tat {
                victim = index;
                victim_tat = effective_tat;
            }
        }
        let (decision, new_tat) = gcra(&rate, 0, now, cost);
        if let Some(slot) = self.slots.get_mut(victim) {
            *slot = (key, new_tat);
        }
        decision
    }
}

/// A cheap 64-bit mixer (the finaliser of splitmix64) so that similar keys land apart.
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{ms, secs};

    #[test]
    fn the_key_mixer_is_splitmix64s_finaliser() {
        // splitmix64 seeded with 0 yields mix(k * golden gamma) for k = 1, 2, 3: its published
        // first outputs. Any weaker mixer still keeps the table correct, only clustered.
        let gamma: u64 = 0x9e37_79b9_7f4a_7c15;
        assert_eq!(mix(gamma), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix(gamma.wrapping_mul(2)), 0x6e78_9e6a_a1b9_65f4);
        assert_eq!(mix(gamma.wrapping_mul(3)), 0x06c4_5d18_8009_454f);
    }

    #[test]
    fn a_refunded_token_bucket_gives_back_exactly_the_refund() {
        let mut b = TokenBucket::new(Rate::per_minute(3));
        for _ in 0..3 {
            assert!(b.take(secs(10), 1).is_allowed());
        }
        assert!(!b.take(secs(10), 1).is_allowed());
        b.refund(1);
        assert!(b.take(secs(10), 1).is_allowed());
        assert!(!b.take(secs(10), 1).is_allowed());
    }

    #[test]
    fn keyed_buckets_keep_every_active_key_apart_while_there_is_room() {
        // Similar keys (consecutive tenant hashes) in a roomy table: each keeps its own bucket,
        // so once each has spent its burst, every one of them is refused.
        let mut t = KeyedBuckets::new(Rate::per_minute(3), 1024);
        for key in 1..=200u64 {
            for _ in 0..3 {
                assert!(t.take(key, secs(10), 1).is_allowed(), "key {key}");
            }
        }
        for key in 1..=200u64 {
            assert!(
                !t.check(key, secs(10), 1).is_allowed(),
                "key {key} found a fresh bucket"
            );
            assert!(
                !t.take(key, secs(10), 1).is_allowed(),
                "key {key} found a fresh bucket"
            );
        }
    }

    #[test]
    fn a_full_keyed_table_gives_up_the_bucket_closest_to_full() {
        // Eight slots, all probed by every key: keys 1 to 8 spend 1 to 8 of a burst of 10.
        let mut t = KeyedBuckets::new(Rate::per_minute(10), PROBE);
        for key in 1..=8u64 {
            assert!(t.take(key, secs(10), key).is_allowed());
        }
        // A ninth key takes the slot of the bucket closest to full: key 1's.
        assert!(t.take(9, secs(10), 10).is_allowed());
        for key in 2..=8u64 {
            assert!(t.check(key, secs(10), 10 - key).is_allowed(), "key {key}");
            assert!(
                !t.check(key, secs(10), 11 - key).is_allowed(),
                "key {key} lost its bucket"
            );
        }
        assert!(!t.check(9, secs(10), 1).is_allowed());
        // Key 1 comes back to a fresh bucket.
        assert!(t.check(1, secs(10), 10).is_allowed());
    }

    #[test]
    fn a_refund_gives_back_exactly_what_a_charge_took() {
        let rate = Rate::per_minute(6);
        let (d, tat) = gcra(&rate, 0, secs(100), 1);
        assert_eq!(d, Decision::Allowed);
        assert_eq!(gcra_refund(&rate, tat, 1), secs(100));
        // Six in a burst, then refused; one refunded, one more allowed, and no further.
        let mut tat = 0;
        for _ in 0..6 {
            let (d, next) = gcra(&rate, tat, secs(100), 1);
            assert_eq!(d, Decision::Allowed);
            tat = next;
        }
        assert!(!gcra(&rate, tat, secs(100), 1).0.is_allowed());
        tat = gcra_refund(&rate, tat, 1);
        let (d, next) = gcra(&rate, tat, secs(100), 1);
        assert_eq!(d, Decision::Allowed);
        assert!(!gcra(&rate, next, secs(100), 1).0.is_allowed());
    }

    /// The 64-bit fast paths give what 128-bit arithmetic gives, at the edges too.

    #[test]
    fn interval_and_availability_match_wide_arithmetic() {
        let mut rng = fastrand::Rng::with_seed(17);
        let pick = |rng: &mut fastrand::Rng| match rng.u8(..3) {
            0 => rng.u64(..1000),
            1 => rng.u64(..1 << 40),
            _ => rng.u64(..),
        };
        for _ in 0..100_000 {
            let rate = Rate {
                amount: pick(&mut rng),
                period: pick(&mut rng),
                burst: pick(&mut rng),
            };
            let cost = pick(&mut rng);
            let wide = (u128::from(cost) * u128::from(rate.period))
                .div_ceil(u128::from(rate.amount.max(1)));
            assert_eq!(
                u128::from(rate.interval(cost)),
                wide.min(u128::from(u64::MAX)),
                "{rate:?} {cost}"
            );
            let bucket = TokenBucket {
                rate,
                tat: pick(&mut rng),
            };
            let now = pick(&mut rng);
            let free = rate
                .tolerance()
                .saturating_sub(bucket.tat.saturating_sub(now));
            let wide = u128::from(free) * u128::from(rate.amount) / u128::from(rate.period.max(1));
            let want = u64::try_from(wide).unwrap_or(u64::MAX).min(rate.burst);
            assert_eq!(bucket.available(now), want, "{rate:?}");
        }
    }

    #[test]
    fn div_wide_is_u128_division() {
        let mut rng = fastrand::Rng::with_seed(21);
        let edges = [1, 2, 3, u64::MAX / 2, (1 << 63) + 1, u64::MAX - 1, u64::MAX];
        for _ in 0..100_000 {
            let n = match rng.u8(..3) {
                0 => u128::from(rng.u64(..)) * u128::from(rng.u64(..)),
                1 => rng.u128(..),
                _ => u128::MAX - u128::from(rng.u64(..)),
            };
            let d = if rng.bool() {
                edges[rng.usize(..edges.len())]
            } else {
                rng.u64(1..)
            };
            let (q, r) = (n / u128::from(d), n % u128::from(d));
            let want = u64::try_from(q).ok().map(|q| (q, r as u64));
            assert_eq!(div_wide(n, d), want, "{n} / {d}");
        }
    }

    #[test]
    fn burst_then_paced() {
        let mut b = TokenBucket::new(Rate::per_second(10));
        for _ in 0..10 {
            assert_eq!(b.take(secs(1), 1), Decision::Allowed);
        }
        assert_eq!(b.take(secs(1), 1), Decision::NotUntil(secs(1) + ms(100)));
        assert_eq!(b.take(secs(1) + ms(100), 1), Decision::Allowed);
    }

    #[test]
    fn cost_and_never() {
        let mut b = TokenBucket::new(Rate::per_minute(60_000));
        assert_eq!(b.take(secs(60), 50_000), Decision::Allowed);
        // 10k left; 20k more needs 10k to refill: 10 s at 1000/s.
        assert_eq!(b.take(secs(60), 20_000), Decision::NotUntil(secs(70)));
        assert_eq!(b.take(secs(60), 60_001), Decision::Never);
        assert_eq!(b.available(secs(60)), 10_000);
    }

    #[test]
    fn combined_charges_both_or_neither() {
        let mut both = RequestAndTokenBuckets {
            requests: Some(TokenBucket::new(Rate::per_second(100))),
            tokens: Some(TokenBucket::new(Rate::per_second(1000))),
        };
        assert_eq!(both.take(secs(1), 900), Decision::Allowed);
        assert!(matches!(both.take(secs(1), 900), Decision::NotUntil(_)));
        // The refused request did not consume a request unit.
        let requests = both.requests.as_ref().map(|b| b.available(secs(1)));
        assert_eq!(requests, Some(99));
    }

    #[test]
    fn keyed_buckets_isolate_tenants() {
        let mut k = KeyedBuckets::new(Rate::per_second(2), 64);
        assert!(k.take(1, secs(1), 1).is_allowed());
        assert!(k.take(1, secs(1), 1).is_allowed());
        assert!(!k.take(1, secs(1), 1).is_allowed());
        assert!(k.take(2, secs(1), 1).is_allowed());
        assert_eq!(k.capacity(), 64);
    }

    #[test]
    fn keyed_buckets_stay_bounded() {
        let mut k = KeyedBuckets::new(Rate::per_second(1), 16);
        for key in 0..10_000u64 {
            let _ = k.take(key, secs(1), 1);
        }
        assert_eq!(k.capacity(), 16);
    }
}
