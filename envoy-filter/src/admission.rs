//! Admission's shared rate limits: per tenant and global, requests and tokens, charged in
//! shared data so they hold across every worker (the per-worker engine gets none of them).
//!
//! Kept apart from the state machine because it is the one rule here about races between
//! workers: a request is checked against every bucket first, so one bucket's refusal charges
//! none; then charged, and the charge decides, since another worker may have taken the last
//! unit between the check and the charge (a per-tenant limit of 6 over two workers once let 7
//! through); the loser gives back what it already charged.
//!
//! With the fleet store leasing the limits ([`crate::quota`]), a bucket is charged to its lease
//! while one is in force, and to the local bucket at `limit / N` otherwise.

use crate::host::Host;
use crate::quota;
use crate::shared;
use unbusy_core::bucket::{Decision, Rate};
use unbusy_core::config::LimitsConfig;
use unbusy_core::lease::{self, Spend};
use unbusy_core::time::Nanos;

/// Shared-data keys of the global rate limits (see [`shared::EMPTY_BUCKET`]).
pub const GLOBAL_REQUESTS: &str = "unbusy:limit:global:r";
/// The global token bucket's key.
pub const GLOBAL_TOKENS: &str = "unbusy:limit:global:t";

/// The shared-data key of a tenant slot's bucket: `r` requests, `t` tokens.
pub fn tenant_key(slot: u64, kind: char) -> String {
    format!("unbusy:limit:tenant:{slot}:{kind}")
}

/// The configured limits, as the filter applies them.
#[derive(Debug, Clone)]
pub struct SharedLimits {
    global_requests: Option<Rate>,
    global_tokens: Option<Rate>,
    tenant_requests: Option<Rate>,
    tenant_tokens: Option<Rate>,
    tenant_slots: u64,
    /// The buckets are leased from the fleet store: the largest lease (`burst / N`) of the
    /// tenant requests, tenant tokens, global requests and global tokens buckets; their local
    /// buckets are at `limit / N`.
    leased: Option<[u64; 4]>,
}

/// One bucket a request is charged to: its rate, key, owner and cost, and its lease's key and
/// largest size if it is leased.
type Charge<'a> = (&'a Rate, String, u64, u64, Option<(String, u64)>);

impl SharedLimits {
    /// The limits of a configuration.
    pub fn new(limits: &LimitsConfig) -> Self {
        Self {
            global_requests: limits.global.request_rate(),
            global_tokens: limits.global.token_rate(),
            tenant_requests: limits.per_tenant.request_rate(),
            tenant_tokens: limits.per_tenant.token_rate(),
            tenant_slots: u64::from(limits.tenant_slots.max(1)),
            leased: None,
        }
    }

    /// Leases the limits from the fleet store, `proxies` (N) expected: without a lease in force
    /// the local buckets apply `limit / N`.
    pub fn leased(mut self, proxies: Option<u32>) -> Self {
        let Some(n) = proxies else {
            return self;
        };
        let mut most = [0; 4];
        for (rate, most) in [
            &mut self.tenant_requests,
            &mut self.tenant_tokens,
            &mut self.global_requests,
            &mut self.global_tokens,
        ]
        .into_iter()
        .zip(most.iter_mut())
        {
            if let Some(r) = rate {
                *most = lease::most(r.burst, n);
                *r = lease::share(r, n);
            }
        }
        self.leased = Some(most);
        self
    }

    /// Creates every bucket's key (see [`shared::ensure`]: compare-and-swap only guards a key
    /// that exists), at configuration time.
    pub fn ensure_keys(&self, host: &impl Host, limits: &LimitsConfig) {
        for key in [GLOBAL_REQUESTS, GLOBAL_TOKENS] {
            shared::ensure(host, key, &shared::EMPTY_BUCKET);
        }
        for slot in 0..u64::from(limits.tenant_slots) {
            if self.tenant_requests.is_some() {
                shared::ensure(host, &tenant_key(slot, 'r'), &shared::EMPTY_BUCKET);
            }
            if self.tenant_tokens.is_some() {
                shared::ensure(host, &tenant_key(slot, 't'), &shared::EMPTY_BUCKET);
            }
        }
    }

    /// Whether no limit is configured at all.
    fn none(&self) -> bool {
        self.global_requests.is_none()
            && self.global_tokens.is_none()
            && self.tenant_requests.is_none()
            && self.tenant_tokens.is_none()
    }

    /// The buckets a request of `tenant` estimated at `tokens` is charged to, in order.
    fn charges(&self, tenant: u64, tokens: u64) -> Vec<Charge<'_>> {
        let slot = tenant % self.tenant_slots;
        let lease = |i: usize, key: String| Some((key, self.leased?.get(i).copied()?));
        [
            (
                self.tenant_requests.as_ref(),
                tenant_key(slot, 'r'),
                tenant,
                1,
                lease(0, quota::tenant_key(slot, 'r')),
            ),
            (
                self.tenant_tokens.as_ref(),
                tenant_key(slot, 't'),
                tenant,
                tokens,
                lease(1, quota::tenant_key(slot, 't')),
            ),
            (
                self.global_requests.as_ref(),
                GLOBAL_REQUESTS.into(),
                0,
                1,
                lease(2, quota::LEASE_REQUESTS.into()),
            ),
            (
                self.global_tokens.as_ref(),
                GLOBAL_TOKENS.into(),
                0,
                tokens,
                lease(3, quota::LEASE_TOKENS.into()),
            ),
        ]
        .into_iter()
        .filter_map(|(rate, key, owner, cost, lease)| Some((rate?, key, owner, cost, lease)))
        // A cost beyond the largest lease never fits one: the local share decides (`Never`).
        .map(|(rate, key, owner, cost, lease)| {
            (
                rate,
                key,
                owner,
                cost,
                lease.filter(|(_, most)| cost <= *most),
            )
        })
        .collect()
    }

    /// Admits a request of `tenant` estimated at `tokens` against every limit, across workers:
    /// checked first, then charged; a bucket refusing at the charge (another worker took the
    /// last unit since the check) refunds the buckets already charged.
    pub fn admit(&self, host: &impl Host, tenant: u64, tokens: u64, now: Nanos) -> Decision {
        if self.none() {
            return Decision::Allowed; // no limit configured: nothing to build or read
        }
        let charges = self.charges(tenant, tokens);
        for (rate, key, owner, cost, lease) in &charges {
            if let Some((lease, _)) = lease {
                match quota::check(host, lease, *owner, now, *cost) {
                    Spend::Leased => continue,
                    Spend::Refused(at) => {
                        quota::note_demand(host, lease, *owner, now, *cost);
                        return Decision::NotUntil(at);
                    }
                    Spend::Local => {}
                }
            }
            let decision = shared::check(host, key, *owner, rate, now, *cost);
            if decision != Decision::Allowed {
                return decision;
            }
        }
        // Where each charge went: `true` to its lease, `false` to the local bucket.
        let mut charged: Vec<bool> = Vec::with_capacity(charges.len());
        for (rate, key, owner, cost, lease) in &charges {
            let spend = lease
                .as_ref()
                .map(|(lease, most)| (lease, *most, quota::take(host, lease, *owner, now, *cost)));
            let decision = match spend {
                Some((_, _, Spend::Leased)) => {
                    charged.push(true);
                    continue;
                }
                Some((_, _, Spend::Refused(at))) => Decision::NotUntil(at),
                Some((lease, most, Spend::Local)) => {
                    let d = shared::charge(host, key, *owner, rate, now, *cost);
                    if d.is_allowed() {
                        quota::spent_locally(host, lease, *owner, now, *cost, most);
                    }
                    d
                }
                None => shared::charge(host, key, *owner, rate, now, *cost),
            };
            if decision != Decision::Allowed {
                for ((rate, key, owner, cost, lease), to_lease) in charges.iter().zip(charged) {
                    match lease.as_ref().filter(|_| to_lease) {
                        Some((lease, _)) => quota::refund(host, lease, *owner, now, *cost),
                        None => shared::refund(host, key, *owner, rate, *cost),
                    }
                }
                return decision;
            }
            charged.push(false);
        }
        Decision::Allowed
    }
}
