//! Global quotas through the fleet store: the rules a proxy follows with its quota leases.
//!
//! One proxy's rate limits are shared by its workers, not by the fleet, so N proxies let N
//! times a global limit through. The fleet store (`unbusy-store`, `docs/store.md`) holds one
//! GCRA bucket per limit in Redis and *leases* units: a proxy asks for a few, spends them
//! locally without asking again, and asks again off the hot path when they run low. So the
//! fleet stays within the limit and no request waits on Redis.
//!
//! Why these rules live here, not in a host: how big a lease to ask for, when to ask again,
//! what to give back and what to do without a lease are policy, the same for every host that
//! will lease (the Envoy filter today). The host only moves bytes: it keeps a [`Lease`] per
//! bucket where its workers share it, applies these steps to it atomically, and makes the calls
//! they ask for.
//!
//! The rules:
//! - **size** ([`want`]): what the proxy will spend in one lease period, from its recent demand
//!   (units asked, granted or not), at least 1 and at most `burst / N` (N the expected number of
//!   proxies), so one proxy cannot strand the whole burst;
//! - **renew** ([`Lease::wants`]): when there was demand and the lease is gone or below half of
//!   that size, unless a call is already out;
//! - **spend** ([`Lease::take`]): a lease in force is authoritative, even empty (the store said
//!   how much fits: an empty lease refuses until the next grant, and that is the fleet's limit);
//! - **give back** ([`Lease::expire`]): units left when a lease ends are returned, so another
//!   proxy may take them;
//! - **fail open** ([`share`]): no lease in force (the store is down, or not answering yet) is
//!   the local bucket at `limit / N`: never a fleet-wide refusal, never N times the limit;
//! - **settle** ([`Lease::spent_locally`]): what the local share admitted is owed to the
//!   fleet's bucket, up to one share's burst, and the next grant pays it first; without this,
//!   every proxy's first second (before its first lease arrives) adds its share's burst to the
//!   fleet's (measured natively: 119 admitted where 110 were allowed over 10 s, two proxies).

use crate::bucket::{Decision, Rate};
use crate::time::{Nanos, MILLISECOND};

/// One bucket's lease, as the proxy's workers share it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lease {
    /// Units granted and not spent yet.
    pub remaining: u64,
    /// When the lease ends (0: never granted). Until then it is authoritative.
    pub expires: Nanos,
    /// When the store said the next unit fits, for a refusal's `Retry-After`.
    pub retry_at: Nanos,
    /// Units asked (granted or refused) since `demand_since`.
    pub demand: u64,
    /// Since when `demand` counts (0: no demand yet).
    pub demand_since: Nanos,
    /// A lease call is out until then (0: none): no second one meanwhile.
    pub asking_until: Nanos,
    /// Units the local share admitted without a lease, owed to the fleet's bucket.
    pub debt: u64,
}

/// What a lease says about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Charged to the lease.
    Leased,
    /// The lease is in force and too short: refused until then.
    Refused(Nanos),
    /// No lease in force: the local share ([`share`]) decides.
    Local,
}

impl Lease {
    /// Whether the lease is in force at `now`.
    pub const fn in_force(&self, now: Nanos) -> bool {
        self.expires > now
    }

    /// Counts `cost` asked at `now` as demand (a host that refused it before [`Lease::take`]
    /// counts it here).
    pub fn note_demand(&mut self, now: Nanos, cost: u64) {
        if self.demand_since == 0 {
            self.demand_since = now;
        }
        self.demand = self.demand.saturating_add(cost);
    }

    /// What charging `cost` at `now` would do, without charging it.
    pub const fn check(&self, now: Nanos, cost: u64) -> Spend {
        if !self.in_force(now) {
            Spend::Local
        } else if self.remaining >= cost {
            Spend::Leased
        } else {
            Spend::Refused(if self.retry_at > now {
                self.retry_at
            } else {
                now
            })
        }
    }

    /// Charges `cost` at `now`: from the lease in force, or not at all (refused, or no lease:
    /// [`Spend::Local`]). Every cost asked counts as demand, the next lease's size.
    pub fn take(&mut self, now: Nanos, cost: u64) -> Spend {
        let spend = self.check(now, cost);
        self.note_demand(now, cost);
        if spend == Spend::Leased {
            self.remaining -= cost;
        }
        spend
    }

    /// The local share admitted `cost` (no lease in force): owed to the fleet's bucket, at most
    /// `most` (one share's burst; what the share's rate admits during an outage is the
    /// fail-open allowance, not a debt).
    pub fn spent_locally(&mut self, cost: u64, most: u64) {
        self.debt = self.debt.saturating_add(cost).min(most);
    }

    /// Gives back `cost` charged by [`Lease::take`] (another bucket refused the request).
    pub fn refund(&mut self, cost: u64) {
        self.remaining = self.remaining.saturating_add(cost);
    }

    /// The units to ask the store for now, if it is time to ask: there was demand, no call is
    /// out, and the lease is gone or below half of what the proxy will spend in a period.
    pub fn wants(&self, now: Nanos, period: Nanos, burst: u64, proxies: u32) -> Option<u64> {
        if (self.demand == 0 && self.debt == 0) || self.asking_until > now {
            return None;
        }
        let size = want(
            self.demand,
            now.saturating_sub(self.demand_since),
            period,
            burst,
            proxies,
        );
        let low = self.remaining.saturating_mul(2) < size;
        // The debt is asked for on top, so the grant that pays it still leaves a lease.
        let ask = size.saturating_add(self.debt).min(burst.max(1));
        (!self.in_force(now) || low || self.debt > 0).then_some(ask)
    }

    /// A lease call went out at `now` and may take until `until`: demand counts afresh.
    pub fn asked(&mut self, now: Nanos, until: Nanos) {
        self.asking_until = until;
        self.demand = 0;
        self.demand_since = now;
    }

    /// The store granted `granted` units at `now`, to spend for `period`; the next unit fits
    /// `retry_after` from now. What is left of the old lease joins the new one.
    pub fn granted(&mut self, now: Nanos, granted: u64, period: Nanos, retry_after: Nanos) {
        let paid = granted.min(self.debt);
        self.debt -= paid;
        self.remaining = self.remaining.saturating_add(granted - paid);
        self.expires = now.saturating_add(period.max(1));
        self.retry_at = now.saturating_add(retry_after);
        self.asking_until = 0;
    }

    /// The call failed (no answer, an error): another may go out. The lease in force stays until
    /// it ends; then the local share applies.
    pub fn failed(&mut self) {
        self.asking_until = 0;
    }

    /// The units to give back at `now`: those of a lease that ended unspent (they are no longer
    /// this proxy's to spend).
    pub fn expire(&mut self, now: Nanos) -> u64 {
        if self.expires == 0 || self.in_force(now) {
            return 0;
        }
        core::mem::take(&mut self.remaining)
    }
}

/// The size of a lease: recent demand (`demand` units over `over`) scaled to one lease
/// `period`, at least 1 and at most [`most`].
pub fn want(demand: u64, over: Nanos, period: Nanos, burst: u64, proxies: u32) -> u64 {
    // A window shorter than a millisecond says little: counted as one.
    let over = over.max(MILLISECOND);
    // In 64 bits (128-bit division is a software routine on wasm); a product past them is
    // more than any lease, capped below.
    let scaled = demand.checked_mul(period).map_or(u64::MAX, |p| p / over);
    scaled.clamp(1, most(burst, proxies))
}

/// The largest lease a proxy asks for: its share of the burst, `burst / N`, at least 1.
pub fn most(burst: u64, proxies: u32) -> u64 {
    (burst / u64::from(proxies.max(1))).max(1)
}

/// The local bucket without a lease: `limit / N` and `burst / N`, each at least 1.
pub fn share(rate: &Rate, proxies: u32) -> Rate {
    let n = u64::from(proxies.max(1));
    Rate {
        amount: (rate.amount / n).max(1),
        period: rate.period,
        burst: (rate.burst / n).max(1),
    }
}

/// Whether a charge is decided by the lease or by the local share (for hosts that check a
/// request against several buckets before charging any).
pub fn decide(spend: Spend) -> Option<Decision> {
    match spend {
        Spend::Leased => Some(Decision::Allowed),
        Spend::Refused(at) => Some(Decision::NotUntil(at)),
        Spend::Local => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{ms, secs};

    #[test]
    fn a_lease_is_sized_to_recent_demand_within_one_proxys_share_of_the_burst() {
        // 30 units in 100 ms is 300 in a 1 s lease; the burst of 600 over 4 proxies caps it.
        assert_eq!(want(30, ms(100), secs(1), 600, 4), 150);
        assert_eq!(want(30, ms(100), secs(1), 6000, 4), 300);
        assert_eq!(want(0, ms(100), secs(1), 600, 4), 1, "at least 1");
        assert_eq!(want(1, secs(60), secs(1), 600, 4), 1);
        assert_eq!(
            want(5, 0, secs(1), 600, 1),
            600,
            "a window under 1 ms is 1 ms"
        );
        assert_eq!(want(u64::MAX, ms(1), secs(1), 600, 4), 150, "no overflow");
        assert_eq!(most(3, 4), 1);
        assert_eq!(most(600, 0), 600, "0 proxies is 1");
    }

    #[test]
    fn the_local_share_is_the_limit_over_the_expected_proxies() {
        let r = Rate::per_minute(600).with_burst(100);
        let s = share(&r, 4);
        assert_eq!((s.amount, s.burst, s.period), (150, 25, r.period));
        assert_eq!(share(&Rate::per_minute(3).with_burst(2), 4).amount, 1);
        assert_eq!(share(&r, 1), r);
    }

    #[test]
    fn a_lease_in_force_is_spent_then_refuses_and_without_one_the_share_decides() {
        let mut l = Lease::default();
        assert_eq!(l.take(ms(10), 1), Spend::Local, "never granted");
        l.granted(ms(20), 2, secs(1), ms(300));
        assert_eq!(l.take(ms(30), 1), Spend::Leased);
        assert_eq!(l.check(ms(30), 2), Spend::Refused(ms(320)));
        assert_eq!(l.take(ms(30), 1), Spend::Leased);
        assert_eq!(
            l.take(ms(400), 1),
            Spend::Refused(ms(400)),
            "no earlier than now"
        );
        assert_eq!(l.remaining, 0);
        l.refund(1);
        assert_eq!(l.remaining, 1);
        assert_eq!(l.demand, 4, "every unit asked, granted or not");
        assert_eq!(l.demand_since, ms(10));
        assert_eq!(l.take(ms(1020), 1), Spend::Local, "ended");
        assert_eq!(decide(Spend::Leased), Some(Decision::Allowed));
        assert_eq!(decide(Spend::Local), None);
    }

    #[test]
    fn a_lease_is_renewed_when_low_once_at_a_time_and_its_rest_is_given_back() {
        let period = secs(1);
        let mut l = Lease::default();
        assert_eq!(l.wants(ms(5), period, 100, 2), None, "no demand, no call");
        l.take(ms(10), 1);
        assert_eq!(l.wants(ms(20), period, 100, 2), Some(50));
        l.asked(ms(20), ms(270));
        l.take(ms(21), 1);
        assert_eq!(l.wants(ms(30), period, 100, 2), None, "one call at a time");
        l.granted(ms(30), 40, period, 0);
        assert_eq!(l.wants(ms(40), period, 100, 2), None, "40 of 50 is not low");
        for _ in 0..30 {
            l.take(ms(40), 1);
        }
        assert_eq!(l.remaining, 10);
        assert_eq!(l.wants(ms(60), period, 100, 2), Some(50), "10 of 50 is low");
        l.failed();
        assert_eq!(l.expire(ms(500)), 0, "still in force");
        assert_eq!(l.expire(ms(1030)), 10, "ended: its rest goes back");
        assert_eq!(l.expire(ms(1040)), 0, "once");
        assert!(!l.in_force(ms(1030)));
    }

    #[test]
    fn what_the_local_share_admitted_is_paid_from_the_next_grant() {
        let period = secs(1);
        let mut l = Lease::default();
        assert_eq!(l.take(ms(10), 1), Spend::Local);
        l.spent_locally(1, 5);
        l.spent_locally(9, 5);
        assert_eq!(l.debt, 5, "at most one share's burst");
        // Asked on top of the lease's size (2 units in 10 ms would be 200: capped at 100 / 2).
        assert_eq!(l.wants(ms(20), period, 100, 2), Some(55));
        l.asked(ms(20), ms(500));
        l.granted(ms(30), 3, period, 0);
        assert_eq!((l.debt, l.remaining), (2, 0), "the debt first");
        assert_eq!(l.wants(ms(40), period, 100, 2), Some(3), "owed, so asked");
        l.granted(ms(40), 10, period, 0);
        assert_eq!((l.debt, l.remaining), (0, 8));
    }
}
