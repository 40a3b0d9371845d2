//! Rate limits across the fleet: quota leases from `unbusy-store` (`docs/store.md`) for
//! `limits.global` (scope `global`) and `limits.per_tenant` (scope `tenant:<id hex>`), kept in
//! shared data beside the local buckets of [`crate::admission`].
//!
//! Why leases: one Envoy's buckets are shared by its workers but not by the fleet, so N proxies
//! let N times a limit through. The store holds the fleet's bucket in Redis and hands
//! out units ahead of use; the hot path spends them with one compare-and-swap, as it does a
//! local bucket, and never waits on the store. The rules (how much to ask for, when, what to
//! give back, what applies without a lease) are `unbusy_core::lease`'s; this module only keeps a
//! [`Lease`] per bucket in shared data (a tenant's in its tenant slot, with its owner: a slot
//! another tenant's lease is busy in leaves the request to the local share, as slots are shared
//! for local buckets), applies those rules to it atomically, and builds and reads the calls.
//! A worker's tick looks at the global leases and at the slots of the tenants it admitted
//! requests for, until their leases are idle again (never at every slot). The root context's tick makes the calls ([`Quotas::tick`]), from
//! whichever worker first claims the lease (one call at a time per proxy); its answer lands in
//! that worker's root context ([`Quotas::answer`]).
//!
//! Failing open: a call refused by the host, an error status or no answer within the timeout
//! leaves the lease to end; after it the global limits apply locally at `limit / N`
//! (`store.expected_proxies`). One warning per outage per worker, one line when the store grants
//! again, and `unbusy_store_lease_total{result}` counts every call's outcome.

use crate::host::{CallToken, Cas, Host, MetricId, MetricKind};
use crate::store::{self, Call, QuotaBody};
use std::time::Duration;
use unbusy_core::config::{LimitsConfig, StoreConfig};
use unbusy_core::lease::{Lease, Spend};
use unbusy_core::time::{ms, Nanos};

/// The shared-data key of the global requests bucket's lease.
pub const LEASE_REQUESTS: &str = "unbusy:lease:global:r";
/// The shared-data key of the global tokens bucket's lease.
pub const LEASE_TOKENS: &str = "unbusy:lease:global:t";

/// The scope of the global buckets in the store.
const SCOPE: &str = "global";

/// How long a lease or return call may take (the store bounds its own work at 250 ms).
pub const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// The lease period until the store says otherwise (the store's default `--lease-ms`).
const DEFAULT_LEASE: Nanos = ms(1000);

/// Compare-and-swap rounds before giving up on a lease update.
const CAS_ROUNDS: usize = 16;

const WORDS: usize = 8;

/// A lease's value: the lease, then its owner (a tenant id; 0 for the global buckets).
fn encode(l: &Lease, owner: u64) -> [u8; WORDS * 8] {
    let mut out = [0u8; WORDS * 8];
    let words = [
        l.remaining,
        l.expires,
        l.retry_at,
        l.demand,
        l.demand_since,
        l.asking_until,
        l.debt,
        owner,
    ];
    for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    out
}

fn decode(bytes: Option<&[u8]>) -> (Lease, u64) {
    let word = |i: usize| {
        bytes
            .and_then(|b| b.get(i * 8..i * 8 + 8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes)
    };
    let lease = Lease {
        remaining: word(0),
        expires: word(1),
        retry_at: word(2),
        demand: word(3),
        demand_since: word(4),
        asking_until: word(5),
        debt: word(6),
    };
    (lease, word(7))
}

/// Whether a lease still holds its slot for its owner: in force, or asked for. An ended one
/// does not, even with units or a debt left: its owner's worker may have stopped looking at
/// the slot (another tenant's request took its place there), and a slot must not stay held
/// forever. Taking it over drops those units (lost to the fleet until the store's bucket
/// refills) and that debt (at most one share's burst).
fn busy(l: &Lease, now: Nanos) -> bool {
    l.in_force(now) || l.asking_until > now
}

/// The lease at `key` as `owner` sees it, and its compare-and-swap token: `None` while another
/// tenant's busy lease holds the slot (tenants share slots, as their local buckets do); another
/// tenant's idle lease is a fresh one for `owner`.
fn read(host: &impl Host, key: &str, owner: u64, now: Nanos) -> Option<(Lease, Option<Cas>)> {
    let (value, cas) = host.shared_get(key);
    let (lease, held_by) = decode(value.as_deref());
    if held_by == owner {
        Some((lease, cas))
    } else if busy(&lease, now) {
        None
    } else {
        Some((Lease::default(), cas))
    }
}

/// Applies `step` to `owner`'s lease at `key` atomically across workers (`None`: another
/// tenant holds the slot, or contention beyond `CAS_ROUNDS`; nothing changed).
pub fn update<T>(
    host: &impl Host,
    key: &str,
    owner: u64,
    now: Nanos,
    mut step: impl FnMut(&mut Lease) -> T,
) -> Option<T> {
    for _ in 0..CAS_ROUNDS {
        let (mut lease, cas) = read(host, key, owner, now)?;
        let out = step(&mut lease);
        if host.shared_set(key, &encode(&lease, owner), cas) {
            return Some(out);
        }
    }
    None
}

/// What `owner`'s lease at `key` would say about `cost` now, without charging it (another
/// tenant's busy lease in the slot: [`Spend::Local`]).
pub fn check(host: &impl Host, key: &str, owner: u64, now: Nanos, cost: u64) -> Spend {
    read(host, key, owner, now).map_or(Spend::Local, |(l, _)| l.check(now, cost))
}

/// Charges `cost` to `owner`'s lease at `key` (see `Lease::take`). Contention beyond the rounds
/// or a slot held by another tenant is [`Spend::Local`]: the local share decides rather than a
/// race refusing.
pub fn take(host: &impl Host, key: &str, owner: u64, now: Nanos, cost: u64) -> Spend {
    update(host, key, owner, now, |l| l.take(now, cost)).unwrap_or(Spend::Local)
}

/// Counts `cost` asked and refused as demand (the next lease's size).
pub fn note_demand(host: &impl Host, key: &str, owner: u64, now: Nanos, cost: u64) {
    update(host, key, owner, now, |l| l.note_demand(now, cost));
}

/// The local share admitted `cost` while no lease was in force: owed to the fleet's bucket
/// (at most `most`, the largest lease).
pub fn spent_locally(host: &impl Host, key: &str, owner: u64, now: Nanos, cost: u64, most: u64) {
    update(host, key, owner, now, |l| l.spent_locally(cost, most));
}

/// Gives back `cost` taken from `owner`'s lease at `key`.
pub fn refund(host: &impl Host, key: &str, owner: u64, now: Nanos, cost: u64) {
    update(host, key, owner, now, |l| l.refund(cost));
}

/// The shared-data key of a tenant slot's lease: `r` requests, `t` tokens.
pub fn tenant_key(slot: u64, kind: char) -> String {
    format!("unbusy:lease:tenant:{slot}:{kind}")
}

/// A tenant's scope in the store.
fn tenant_scope(tenant: u64) -> String {
    format!("tenant:{tenant:016x}")
}

/// One leased bucket's limits and name in the store.
#[derive(Debug, Clone, Copy)]
struct Limit {
    /// `r` or `t` in its shared-data key.
    kind: char,
    name: &'static str,
    per_minute: u64,
    burst: u64,
}

impl Limit {
    fn of(kind: char, per_minute: Option<u64>, burst: Option<u64>) -> Option<Self> {
        let per_minute = per_minute?;
        Some(Self {
            kind,
            name: if kind == 'r' { "requests" } else { "tokens" },
            per_minute,
            burst: burst.unwrap_or(per_minute),
        })
    }
}

/// One bucket of a call: its lease's key and owner, its scope, its limits, what was asked.
#[derive(Debug, Clone)]
struct Asked {
    key: String,
    owner: u64,
    scope: String,
    limit: Limit,
    want: u64,
}

/// The store takes at most this many scopes per call (the global one and 255 tenants).
const MAX_SCOPES: usize = 256;

/// The outcome of a lease call, for `unbusy_store_lease_total`.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Granted = 0,
    Short = 1,
    Error = 2,
}

/// This worker's side of the fleet's leased limits.
pub struct Quotas {
    /// The store's cluster (`None`: no store, or no limit to lease: no call is ever made).
    cluster: Option<String>,
    /// The global buckets' limits.
    global: Vec<Limit>,
    /// Each tenant's buckets' limits.
    tenant: Vec<Limit>,
    tenant_slots: u64,
    /// The tenant slots this worker admitted requests for, with their tenant, until their
    /// leases are idle again (the tick looks only at these, not at every slot).
    active: Vec<(u64, u64)>,
    proxies: u32,
    /// `store.quota_lease_ms`, if set.
    configured: Option<Nanos>,
    /// The lease period: configured, else the store's last `lease_ms`.
    period: Nanos,
    /// Lease calls this worker made that are not answered yet, with what each asked.
    calls: Vec<(CallToken, Vec<Asked>)>,
    /// The lease call [`Quotas::tick`] built last, until the driver says it left.
    pending: Option<Vec<Asked>>,
    /// The last call failed (its outage was logged).
    down: bool,
    lease_metric: [Option<MetricId>; 3],
    returned_metric: Option<MetricId>,
}

impl Quotas {
    /// The leased limits of a configuration; defines their metrics and creates their shared
    /// keys when a store leases them.
    pub fn new(host: &impl Host, store: &StoreConfig, limits: &LimitsConfig) -> Self {
        let cluster = store.quota_cluster(limits).map(str::to_string);
        let (g, t) = (&limits.global, &limits.per_tenant);
        let global: Vec<Limit> = [
            Limit::of('r', g.requests_per_minute, g.burst_requests),
            Limit::of('t', g.tokens_per_minute, g.burst_tokens),
        ]
        .into_iter()
        .flatten()
        .collect();
        let tenant: Vec<Limit> = [
            Limit::of('r', t.requests_per_minute, t.burst_requests),
            Limit::of('t', t.tokens_per_minute, t.burst_tokens),
        ]
        .into_iter()
        .flatten()
        .collect();
        let configured = store.quota_lease_ms.map(ms);
        let leasing = cluster.is_some();
        let tenant_slots = u64::from(limits.tenant_slots.max(1));
        if leasing {
            let empty = encode(&Lease::default(), 0);
            for l in &global {
                crate::shared::ensure(host, global_key(l.kind), &empty);
            }
            for slot in 0..tenant_slots {
                for l in &tenant {
                    crate::shared::ensure(host, &tenant_key(slot, l.kind), &empty);
                }
            }
        }
        let define = |name: &str| {
            leasing
                .then(|| host.define_metric(MetricKind::Counter, name))
                .flatten()
        };
        Self {
            cluster,
            global,
            tenant,
            tenant_slots,
            active: Vec::new(),
            proxies: store.expected_proxies,
            configured,
            period: configured.unwrap_or(DEFAULT_LEASE),
            calls: Vec::new(),
            pending: None,
            down: false,
            lease_metric: [
                define("unbusy_store_lease_total.result.granted"),
                define("unbusy_store_lease_total.result.short"),
                define("unbusy_store_lease_total.result.error"),
            ],
            returned_metric: define("unbusy_store_returned_units_total"),
        }
    }

    /// The number of proxies the local share divides the limits by, when the limits are leased
    /// (`None`: they are applied locally, whole, as without a store).
    pub fn leasing(&self) -> Option<u32> {
        self.cluster.as_ref().map(|_| self.proxies)
    }

    /// A request of `tenant` was admitted or refused here: its slot's leases are kept by this
    /// worker's tick until they are idle.
    pub fn saw(&mut self, tenant: u64) {
        if self.cluster.is_none() || self.tenant.is_empty() {
            return;
        }
        let slot = tenant % self.tenant_slots;
        match self.active.iter_mut().find(|(s, _)| *s == slot) {
            Some(entry) => entry.1 = tenant,
            None => self.active.push((slot, tenant)),
        }
    }

    fn count(&self, host: &impl Host, outcome: Outcome) {
        if let Some(id) = self.lease_metric.get(outcome as usize).copied().flatten() {
            host.increment_metric(id, 1);
        }
    }

    /// Every bucket the tick looks at: the global ones, then each active tenant's.
    fn buckets(&self) -> Vec<(String, u64, String, Limit)> {
        let mut all = Vec::new();
        for l in &self.global {
            all.push((global_key(l.kind).to_string(), 0, SCOPE.to_string(), *l));
        }
        for &(slot, tenant) in &self.active {
            for l in &self.tenant {
                all.push((tenant_key(slot, l.kind), tenant, tenant_scope(tenant), *l));
            }
        }
        all
    }

    /// The tick's calls: what is left of ended leases goes back, and buckets running low are
    /// leased again, if this worker claims them first. Each with the cluster to send it to;
    /// `true` marks the lease call, whose answer [`Quotas::answer`] reads.
    pub fn tick(&mut self, host: &impl Host, now: Nanos) -> Vec<(String, Call, bool)> {
        let Some(cluster) = self.cluster.clone() else {
            return Vec::new();
        };
        let asking_until = now.saturating_add(ms(CALL_TIMEOUT.as_millis() as u64 + 100));
        let (period, proxies) = (self.period, self.proxies);
        let mut back = QuotaBody::default();
        let mut ask = QuotaBody::default();
        let mut asked: Vec<Asked> = Vec::new();
        let mut idle: Vec<u64> = Vec::new();
        let mut scopes = 0;
        for (key, owner, scope, limit) in self.buckets() {
            let same_scope = asked.last().is_some_and(|a| a.scope == scope);
            let room = scopes < MAX_SCOPES || same_scope;
            let step = update(host, &key, owner, now, |l| {
                let units = l.expire(now);
                let want = l.wants(now, period, limit.burst, proxies).filter(|_| room);
                if want.is_some() {
                    l.asked(now, asking_until);
                }
                let quiet = !busy(l, now) && l.demand == 0 && l.remaining == 0 && l.debt == 0;
                (units, want, quiet)
            });
            let Some((units, want, quiet)) = step else {
                if owner != 0 {
                    idle.push(owner); // another tenant holds the slot now
                }
                continue;
            };
            if quiet && owner != 0 {
                idle.push(owner);
            }
            if units > 0 {
                back.bucket(&scope, limit.name, &[("units", units)]);
                if let Some(id) = self.returned_metric {
                    host.increment_metric(id, units as i64);
                }
            }
            if let Some(want) = want {
                let fields = [
                    ("per_minute", limit.per_minute),
                    ("burst", limit.burst),
                    ("want", want),
                ];
                ask.bucket(&scope, limit.name, &fields);
                scopes += usize::from(!same_scope);
                asked.push(Asked {
                    key,
                    owner,
                    scope,
                    limit,
                    want,
                });
            }
        }
        // A tenant whose every lease is idle leaves the active list (its next request puts it
        // back); one with a bucket still busy stays.
        let kinds = self.tenant.len();
        self.active.retain(|(_, tenant)| {
            let quiet = idle.iter().filter(|&&o| o == *tenant).count() >= kinds;
            !quiet || asked.iter().any(|a| a.owner == *tenant)
        });
        let mut calls = Vec::new();
        if !back.is_empty() {
            calls.push((cluster.clone(), back.call("/v1/quota/return"), false));
        }
        if !ask.is_empty() {
            calls.push((cluster, ask.call("/v1/quota/lease"), true));
            self.pending = Some(asked);
        }
        calls
    }

    /// The lease call just built by [`Quotas::tick`] left with `token`.
    pub fn dispatched(&mut self, token: CallToken) {
        if let Some(asked) = self.pending.take() {
            self.calls.push((token, asked));
        }
    }

    /// Whether `token` is one of this worker's lease calls.
    pub fn owns(&self, token: CallToken) -> bool {
        self.calls.iter().any(|(t, _)| *t == token)
    }

    /// The lease call just built could not leave (the host refused it): its buckets may ask
    /// again, and the outage is noted.
    pub fn refused(&mut self, host: &impl Host, now: Nanos, why: &str) {
        if let Some(asked) = self.pending.take() {
            self.failed(host, now, &asked, why);
        }
    }

    fn failed(&mut self, host: &impl Host, now: Nanos, asked: &[Asked], why: &str) {
        for a in asked {
            update(host, &a.key, a.owner, now, Lease::failed);
        }
        self.count(host, Outcome::Error);
        if !self.down {
            self.down = true;
            let mut line = String::from("unbusy: the store did not grant a quota lease (");
            line.push_str(why);
            line.push_str("); the limits apply locally at limit / store.expected_proxies once the lease in force ends");
            host.warn(&line);
        }
    }

    /// The store answered a lease call (or Envoy did for it: a timeout, a reset, no host).
    pub fn answer(
        &mut self,
        host: &impl Host,
        token: CallToken,
        now: Nanos,
        headers: &[(String, String)],
        body: &[u8],
    ) {
        let Some(i) = self.calls.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, asked) = self.calls.swap_remove(i);
        let Some((lease_ms, grants)) = store::read_lease(headers, body) else {
            let why = if store::status(headers).is_some() {
                "an error status"
            } else {
                "no answer in time"
            };
            self.failed(host, now, &asked, why);
            return;
        };
        if self.down {
            self.down = false;
            host.info("unbusy: the store grants quota leases again");
        }
        if self.configured.is_none() && lease_ms > 0 {
            self.period = ms(lease_ms);
        }
        let period = self.period;
        let mut short = false;
        for a in &asked {
            let (granted, retry_after) =
                store::grant(&grants, &a.scope, a.limit.name).unwrap_or((0, 0));
            short |= granted < a.want;
            update(host, &a.key, a.owner, now, |l| {
                l.granted(now, granted, period, ms(retry_after));
            });
        }
        self.count(
            host,
            if short {
                Outcome::Short
            } else {
                Outcome::Granted
            },
        );
    }
}

/// The shared-data key of a global bucket's lease (`r` requests, `t` tokens).
pub fn global_key(kind: char) -> &'static str {
    if kind == 'r' {
        LEASE_REQUESTS
    } else {
        LEASE_TOKENS
    }
}
