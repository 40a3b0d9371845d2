//! Which provider gets the next attempt.
//!
//! Providers come in priority tiers (DeepSeek first, a backup after it). Within the best tier
//! that has a usable provider, the choice follows Envoy's `least_request` balancer: with equal
//! weights, the provider with the fewest outstanding requests (ties at random); with unequal
//! weights, a weighted draw where a provider's effective weight is `weight / (outstanding + 1)`.
//! So weights decide the split when load is light and outstanding work shifts it when load is
//! not, which keeps a slow provider from piling up requests.
//!
//! A provider is usable when its breaker lets an attempt through, its concurrency limit has a
//! free slot, and this request has not tried it already (a request that got "busy" from a
//! provider should try another one, not the same one again, while there is another one that can
//! take it now). When every provider with a usable breaker is only full (limit reached) the
//! answer is "wait for capacity" rather than "nothing left": pacing, not failing.

use fastrand::Rng;

/// The most providers one configuration may list (the tried set is a bitmask).
pub const MAX_PROVIDERS: usize = 64;

/// What choice needs to know about one provider right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Lower is preferred.
    pub priority: u32,
    /// Share of load within the tier (> 0).
    pub weight: u32,
    /// Attempts in flight to it.
    pub outstanding: u32,
    /// Its breaker would let an attempt through.
    pub breaker_allows: bool,
    /// Its concurrency limit has a free slot.
    pub has_room: bool,
}

/// The set of providers this request already tried, by index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried(u64);

impl Tried {
    /// Marks provider `index` as tried.
    pub fn insert(&mut self, index: usize) {
        if index < MAX_PROVIDERS {
            self.0 |= 1 << index;
        }
    }

    /// Whether provider `index` was tried.
    pub fn contains(self, index: usize) -> bool {
        index < MAX_PROVIDERS && self.0 & (1 << index) != 0
    }

    /// How many providers were tried.
    pub fn count(self) -> u32 {
        self.0.count_ones()
    }
}

/// The answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Send to the provider at this index.
    Provider(usize),
    /// Untried providers exist, but all are at their concurrency limit: wait for a slot.
    WaitForCapacity,
    /// Every untried provider has an open breaker, or all were tried.
    NoneAvailable,
}

/// Chooses a provider among `candidates`, preferring those not in `tried`. When no untried
/// provider has room now (one provider, every other one full or with an open breaker), the
/// tried ones become eligible again: retrying a provider with room after a backoff is better
/// than waiting for a full one, or giving up, while the deadline allows (a request that had
/// tried the one provider with room waited for two full ones with quotas of 2 and 4 until its
/// deadline). Only when none has room is the answer to wait (or that nothing is available).
pub fn choose(candidates: &[Candidate], tried: Tried, rng: &mut Rng) -> Choice {
    match choose_among(candidates, |i| !tried.contains(i), rng) {
        Choice::Provider(index) => Choice::Provider(index),
        untried => match choose_among(candidates, |_| true, rng) {
            Choice::Provider(index) => Choice::Provider(index),
            Choice::WaitForCapacity => Choice::WaitForCapacity,
            Choice::NoneAvailable => untried,
        },
    }
}

fn choose_among(
    candidates: &[Candidate],
    allowed: impl Fn(usize) -> bool,
    rng: &mut Rng,
) -> Choice {
    let eligible = |i: usize, c: &Candidate| {
        i < MAX_PROVIDERS && allowed(i) && c.breaker_allows && c.weight > 0
    };
    let mut any_full = false;
    let mut best_tier: Option<u32> = None;
    for (i, c) in candidates.iter().enumerate() {
        if eligible(i, c) {
            if c.has_room {
                best_tier = Some(best_tier.map_or(c.priority, |t| t.min(c.priority)));
            } else {
                any_full = true;
            }
        }
    }
    let Some(tier) = best_tier else {
        return if any_full {
            Choice::WaitForCapacity
        } else {
            Choice::NoneAvailable
        };
    };
    let in_tier = |i: usize, c: &Candidate| eligible(i, c) && c.has_room && c.priority == tier;
    let first_weight = candidates
        .iter()
        .enumerate()
        .find(|(i, c)| in_tier(*i, c))
        .map_or(1, |(_, c)| c.weight);
    let equal_weights = candidates
        .iter()
        .enumerate()
        .all(|(i, c)| !in_tier(i, c) || c.weight == first_weight);
    // Envoy's least_request: with equal weights, the fewest outstanding (ties at random); with
    // unequal weights, a weighted draw with effective weight `weight / (outstanding + 1)`, so the
    // configured split holds at idle and a provider piling up work gets proportionally less.
    let least = candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| in_tier(*i, c))
        .map(|(_, c)| c.outstanding)
        .min()
        .unwrap_or(0);
    let effective = |c: &Candidate| -> u64 {
        if equal_weights {
            u64::from(c.outstanding == least)
        } else {
            (u64::from(c.weight) << 20) / (u64::from(c.outstanding) + 1)
        }
    };
    let total: u64 = candidates
        .iter()
        .enumerate()
        .filter(|(i, c)| in_tier(*i, c))
        .map(|(_, c)| effective(c))
        .sum();
    let mut ticket = rng.u64(0..total.max(1));
    let mut last = None;
    for (i, c) in candidates.iter().enumerate() {
        if in_tier(i, c) {
            let w = effective(c);
            if w == 0 {
                continue;
            }
            last = Some(i);
            if ticket < w {
                return Choice::Provider(i);
            }
            ticket -= w;
        }
    }
    last.map_or(Choice::NoneAvailable, Choice::Provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(priority: u32, weight: u32, outstanding: u32) -> Candidate {
        Candidate {
            priority,
            weight,
            outstanding,
            breaker_allows: true,
            has_room: true,
        }
    }

    #[test]
    fn tried_holds_every_provider_index_and_ignores_the_rest() {
        let mut t = Tried::default();
        assert_eq!(t.count(), 0);
        for index in [0, 1, MAX_PROVIDERS - 1] {
            t.insert(index);
            assert!(t.contains(index));
        }
        t.insert(1);
        assert_eq!(t.count(), 3);
        t.insert(MAX_PROVIDERS);
        assert!(!t.contains(MAX_PROVIDERS));
        assert!(!t.contains(2));
        assert_eq!(t.count(), 3);
    }

    #[test]
    fn priority_first() {
        let mut rng = Rng::with_seed(1);
        let cands = [c(1, 1, 0), c(0, 1, 50)];
        assert_eq!(
            choose(&cands, Tried::default(), &mut rng),
            Choice::Provider(1)
        );
    }

    #[test]
    fn fails_over_past_tried_and_open() {
        let mut rng = Rng::with_seed(1);
        let mut tried = Tried::default();
        tried.insert(0);
        let cands = [c(0, 1, 0), c(1, 1, 0)];
        assert_eq!(choose(&cands, tried, &mut rng), Choice::Provider(1));
        let open = [
            c(0, 1, 0),
            Candidate {
                breaker_allows: false,
                ..c(1, 1, 0)
            },
        ];
        // The backup's breaker is open: the tried primary is better than nothing.
        assert_eq!(choose(&open, tried, &mut rng), Choice::Provider(0));
        let all_open = [
            Candidate {
                breaker_allows: false,
                ..c(0, 1, 0)
            },
            Candidate {
                breaker_allows: false,
                ..c(1, 1, 0)
            },
        ];
        assert_eq!(choose(&all_open, tried, &mut rng), Choice::NoneAvailable);
    }

    #[test]
    fn full_providers_mean_wait() {
        let mut rng = Rng::with_seed(1);
        let cands = [Candidate {
            has_room: false,
            ..c(0, 1, 10)
        }];
        assert_eq!(
            choose(&cands, Tried::default(), &mut rng),
            Choice::WaitForCapacity
        );
    }

    #[test]
    fn weights_split_idle_load() {
        let mut rng = Rng::with_seed(9);
        let cands = [c(0, 3, 0), c(0, 1, 0)];
        let mut first = 0;
        for _ in 0..4000 {
            if choose(&cands, Tried::default(), &mut rng) == Choice::Provider(0) {
                first += 1;
            }
        }
        assert!((2800..3200).contains(&first), "{first}");
    }

    #[test]
    fn least_outstanding_under_load() {
        let mut rng = Rng::with_seed(1);
        let cands = [c(0, 1, 9), c(0, 1, 2)];
        for _ in 0..100 {
            assert_eq!(
                choose(&cands, Tried::default(), &mut rng),
                Choice::Provider(1)
            );
        }
        // Unequal weights: 3/(9+1) against 1/(0+1), so the idle one gets about 77%.
        let cands = [c(0, 3, 9), c(0, 1, 0)];
        let idle = (0..4000)
            .filter(|_| choose(&cands, Tried::default(), &mut rng) == Choice::Provider(1))
            .count();
        assert!((2900..3250).contains(&idle), "{idle}");
    }

    #[test]
    fn equal_idle_providers_share_the_load_evenly() {
        // Equal weights, nobody outstanding: a uniform draw over the three.
        let mut rng = Rng::with_seed(5);
        let cands = [c(0, 1, 0), c(0, 1, 0), c(0, 1, 0)];
        let mut counts = [0u32; 3];
        for _ in 0..3000 {
            match choose(&cands, Tried::default(), &mut rng) {
                Choice::Provider(i) => counts[i] += 1,
                other => panic!("{other:?}"),
            }
        }
        for (i, n) in counts.iter().enumerate() {
            assert!(
                (900..1100).contains(n),
                "provider {i} got {n} of 3000: {counts:?}"
            );
        }
    }

    #[test]
    fn providers_past_the_tracked_maximum_are_never_chosen() {
        let mut rng = Rng::with_seed(2);
        // Only the provider at index MAX_PROVIDERS could take it: nothing is available.
        let mut cands = [Candidate {
            breaker_allows: false,
            ..c(0, 1, 0)
        }; MAX_PROVIDERS + 1];
        cands[MAX_PROVIDERS].breaker_allows = true;
        assert_eq!(
            choose(&cands, Tried::default(), &mut rng),
            Choice::NoneAvailable
        );
        // The last one tracked still is.
        cands[MAX_PROVIDERS - 1].breaker_allows = true;
        assert_eq!(
            choose(&cands, Tried::default(), &mut rng),
            Choice::Provider(MAX_PROVIDERS - 1)
        );
    }

    #[test]
    fn single_provider_is_retried_after_it_was_tried() {
        let mut rng = Rng::with_seed(1);
        let mut tried = Tried::default();
        tried.insert(0);
        assert_eq!(choose(&[c(0, 1, 0)], tried, &mut rng), Choice::Provider(0));
    }
}
