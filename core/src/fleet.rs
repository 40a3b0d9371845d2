//! Rules for sharing providers' concurrency quotas and pauses across a fleet of proxies through
//! the store (`docs/store.md`: the semaphore and the pauses), so hosts only move bytes.
//!
//! Why these rules, and not a round trip per attempt: the hot path never waits on the store.
//! Each proxy holds a part of a provider's `max_concurrency` in the store's semaphore (one
//! holder per proxy, renewed on every poll), and lets at most that many attempts go at once;
//! the store grants a holder at most what the others leave, so together the proxies never
//! exceed the quota. What can go wrong is timing, and each rule below closes one gap:
//! - a proxy asks for what it uses and waits for ([`want`]), so idle slots move to the proxy
//!   that needs them at poll speed;
//! - a proxy that asks for *fewer* slots stops using them as it asks ([`asking`]), before the
//!   store can hand them to another proxy (else both would use them for one round trip);
//! - a grant counts from when it was asked, not answered ([`granted`]): the store's lease
//!   started no earlier, so the proxy never uses a slot the store already gave away;
//! - before the first answer a proxy holds nothing ([`starting`]): a proxy that started using
//!   a local share while the store granted the others the whole quota would exceed it;
//! - without any answer, past its lease, a proxy falls back to a local share
//!   ([`fallback_share`]), so a store outage is never a fleet-wide refusal.
//!
//! Pauses: a pause another proxy published is kept for the time the store says it has left
//! (relative, so proxies' clocks never meet: [`pause_until`]), and a local verdict is
//! published for the time it has left ([`pause_for_ms`]).

use crate::time::{ms, Nanos};

/// What a proxy holds of one provider's quota: `held` slots until `until`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Holding {
    /// Slots granted.
    pub held: u32,
    /// When the grant's lease ends (the proxy's clock).
    pub until: Nanos,
}

/// The slots a proxy asks for: its demand on the provider, at most the quota (asking for more
/// keeps slots another proxy waits for). Demand is the attempts in flight, the requests
/// waiting for a slot, and the attempts turned away for want of one since the last renewal:
/// with another provider to fail over to, a request that finds no slot does not wait, it goes
/// elsewhere, and a proxy that counted only what waits would ask for nothing and never get
/// the provider back. And while any attempt was turned away within the last lease period
/// (`recently_turned_away`), at least one slot: requests a second apart would otherwise find
/// the slot the previous renewal got already given back by the renewal after it.
pub fn want(
    in_flight: u32,
    waiting: u32,
    turned_away: u32,
    recently_turned_away: bool,
    max: u32,
) -> u32 {
    let demand = in_flight
        .saturating_add(waiting)
        .saturating_add(turned_away);
    demand.max(u32::from(recently_turned_away)).min(max)
}

/// How long a holding is leased for, asked with each renewal: ten polls, at least a second
/// (a few lost polls do not drop it; a dead proxy's slots come back within it), at most the
/// store's bound.
pub fn lease_ms(poll_ms: u64) -> u64 {
    poll_ms.saturating_mul(10).clamp(1000, 3_600_000)
}

/// The holding while a renewal asking for `want` is in flight: a smaller `want` takes effect
/// now, since the store may grant the slots given up to another proxy as soon as it answers.
pub fn asking(current: Holding, want: u32) -> Holding {
    Holding {
        held: current.held.min(want),
        until: current.until,
    }
}

/// The holding the store granted (`held`) to a call sent at `sent`: its lease counts from then.
pub fn granted(held: u32, sent: Nanos, lease_ms: u64) -> Holding {
    Holding {
        held,
        until: sent.saturating_add(ms(lease_ms)),
    }
}

/// A proxy's holding at start: nothing, until the first renewal can have been answered (its
/// poll period and the call's timeout); past that, without an answer, the fallback share.
pub fn starting(now: Nanos, poll_ms: u64, timeout_ms: u64) -> Holding {
    Holding {
        held: 0,
        until: now.saturating_add(ms(poll_ms.saturating_add(timeout_ms))),
    }
}

/// The local share of a quota of `max` among `expected_proxies`, at least one slot.
pub fn fallback_share(max: u32, expected_proxies: u32) -> u32 {
    (max / expected_proxies.max(1)).max(1)
}

/// How many attempts the proxy may have in flight to the provider now: its holding while its
/// lease lasts, else the fallback share.
pub fn quota(now: Nanos, holding: Holding, max: u32, expected_proxies: u32) -> u32 {
    if now < holding.until {
        holding.held.min(max)
    } else {
        fallback_share(max, expected_proxies)
    }
}

/// The count of attempts in flight elsewhere to report to an engine configured with a quota of
/// `max`, so that its own limit is `quota`: the other workers' attempts plus the slots the
/// proxy does not hold.
pub fn external_in_flight(others: u32, max: u32, quota: u32) -> u32 {
    others.saturating_add(max.saturating_sub(quota))
}

/// Until when a pause another proxy published holds, `remaining_ms` after `now`.
pub fn pause_until(now: Nanos, remaining_ms: u64) -> Nanos {
    now.saturating_add(ms(remaining_ms))
}

/// How long a local verdict that holds until `until` is published for, in whole ms rounded
/// up (`None`: it is over).
pub fn pause_for_ms(now: Nanos, until: Nanos) -> Option<u64> {
    let left = until.checked_sub(now).filter(|&d| d > 0)?;
    Some(left.div_ceil(ms(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_wants_what_it_uses_and_waits_for_within_the_quota() {
        assert_eq!(want(2, 1, 0, false, 4), 3);
        assert_eq!(want(3, 9, 0, false, 4), 4);
        assert_eq!(want(0, 0, 0, false, 4), 0);
        assert_eq!(want(u32::MAX, 1, 0, false, 4), 4);
        assert_eq!(want(0, 0, 2, false, 4), 2, "turned away is demand");
        assert_eq!(want(1, 1, u32::MAX, false, 4), 4);
        assert_eq!(want(0, 0, 0, true, 4), 1, "recent demand keeps a slot");
        assert_eq!(want(2, 0, 0, true, 4), 2);
        assert_eq!(want(0, 0, 0, true, 0), 0);
    }

    #[test]
    fn leases_span_ten_polls_within_the_stores_bounds() {
        assert_eq!(lease_ms(100), 1000);
        assert_eq!(lease_ms(10), 1000);
        assert_eq!(lease_ms(500), 5000);
        assert_eq!(lease_ms(u64::MAX), 3_600_000);
    }

    #[test]
    fn asking_for_fewer_gives_them_up_at_once_asking_for_more_waits_for_the_grant() {
        let h = Holding {
            held: 4,
            until: ms(5),
        };
        assert_eq!(asking(h, 1).held, 1);
        assert_eq!(asking(h, 4).held, 4);
        assert_eq!(asking(h, 9).held, 4);
        assert_eq!(asking(h, 1).until, ms(5));
    }

    #[test]
    fn a_grant_counts_from_when_it_was_asked() {
        assert_eq!(
            granted(3, ms(100), 1000),
            Holding {
                held: 3,
                until: ms(1100)
            }
        );
    }

    #[test]
    fn a_holding_stands_until_its_lease_ends_then_the_local_share() {
        let h = granted(3, ms(100), 1000);
        assert_eq!(quota(ms(100), h, 4, 2), 3);
        assert_eq!(quota(ms(1099), h, 4, 2), 3);
        assert_eq!(quota(ms(1100), h, 4, 2), 2);
        assert_eq!(quota(ms(1100), h, 4, 1), 4);
        assert_eq!(quota(ms(100), granted(9, 0, 1000), 4, 1), 4, "capped");
    }

    #[test]
    fn a_proxy_starts_holding_nothing_then_falls_back() {
        let h = starting(ms(1000), 100, 250);
        assert_eq!(quota(ms(1000), h, 4, 2), 0);
        assert_eq!(quota(ms(1349), h, 4, 2), 0);
        assert_eq!(quota(ms(1350), h, 4, 2), 2);
    }

    #[test]
    fn the_fallback_share_is_at_least_one_slot() {
        assert_eq!(fallback_share(4, 1), 4);
        assert_eq!(fallback_share(4, 3), 1);
        assert_eq!(fallback_share(4, 8), 1);
        assert_eq!(fallback_share(4, 0), 4);
    }

    #[test]
    fn the_engine_sees_the_slots_not_held_as_taken() {
        assert_eq!(external_in_flight(1, 4, 4), 1);
        assert_eq!(external_in_flight(1, 4, 2), 3);
        assert_eq!(external_in_flight(0, 4, 0), 4);
        assert_eq!(external_in_flight(u32::MAX, 4, 0), u32::MAX);
    }

    #[test]
    fn pauses_travel_as_time_left() {
        assert_eq!(pause_until(ms(10), 5000), ms(5010));
        assert_eq!(pause_for_ms(ms(10), ms(5010)), Some(5000));
        assert_eq!(pause_for_ms(ms(10), ms(10) + 1), Some(1), "rounded up");
        assert_eq!(pause_for_ms(ms(10), ms(10)), None);
        assert_eq!(pause_for_ms(ms(10), ms(9)), None);
    }
}
