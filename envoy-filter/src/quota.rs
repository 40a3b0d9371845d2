//! Global limits across the fleet: quota leases from `unbusy-store` (`docs/store.md`), kept in
//! shared data beside the local buckets of [`crate::admission`].
//!
//! Why leases: one Envoy's buckets are shared by its workers but not by the fleet, so N proxies
//! let N times `limits.global` through. The store holds the fleet's bucket in Redis and hands
//! out units ahead of use; the hot path spends them with one compare-and-swap, as it does a
//! local bucket, and never waits on the store. The rules (how much to ask for, when, what to
//! give back, what applies without a lease) are `unbusy_core::lease`'s; this module only keeps a
//! [`Lease`] per global bucket in shared data, applies those rules to it atomically, and builds
//! and reads the calls. The root context's tick makes the calls ([`Quotas::tick`]), from
//! whichever worker first claims the lease (one call at a time per proxy); its answer lands in
//! that worker's root context ([`Quotas::answer`]).
//!
//! Failing open: a call refused by the host, an error status or no answer within the timeout
//! leaves the lease to end; after it the global limits apply locally at `limit / N`
//! (`store.expected_proxies`). One warning per outage per worker, one line when the store grants
//! again, and `unbusy_store_lease_total{result}` counts every call's outcome.

use crate::host::{CallToken, Cas, Host, MetricId, MetricKind};
use crate::store::{self, Call, Want};
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

const WORDS: usize = 7;

fn encode(l: &Lease) -> [u8; WORDS * 8] {
    let mut out = [0u8; WORDS * 8];
    let words = [
        l.remaining,
        l.expires,
        l.retry_at,
        l.demand,
        l.demand_since,
        l.asking_until,
        l.debt,
    ];
    for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    out
}

fn decode(bytes: Option<&[u8]>) -> Lease {
    let word = |i: usize| {
        bytes
            .and_then(|b| b.get(i * 8..i * 8 + 8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes)
    };
    Lease {
        remaining: word(0),
        expires: word(1),
        retry_at: word(2),
        demand: word(3),
        demand_since: word(4),
        asking_until: word(5),
        debt: word(6),
    }
}

fn read(host: &impl Host, key: &str) -> (Lease, Option<Cas>) {
    let (value, cas) = host.shared_get(key);
    (decode(value.as_deref()), cas)
}

/// Applies `step` to the lease at `key` atomically across workers (`None`: contention beyond
/// `CAS_ROUNDS`, nothing changed).
pub fn update<T>(host: &impl Host, key: &str, mut step: impl FnMut(&mut Lease) -> T) -> Option<T> {
    for _ in 0..CAS_ROUNDS {
        let (mut lease, cas) = read(host, key);
        let out = step(&mut lease);
        if host.shared_set(key, &encode(&lease), cas) {
            return Some(out);
        }
    }
    None
}

/// What the lease at `key` would say about `cost` now, without charging it.
pub fn check(host: &impl Host, key: &str, now: Nanos, cost: u64) -> Spend {
    read(host, key).0.check(now, cost)
}

/// Charges `cost` to the lease at `key` (see `Lease::take`). Contention beyond the rounds is
/// [`Spend::Local`]: the local share decides rather than a race refusing.
pub fn take(host: &impl Host, key: &str, now: Nanos, cost: u64) -> Spend {
    update(host, key, |l| l.take(now, cost)).unwrap_or(Spend::Local)
}

/// Counts `cost` asked and refused as demand (the next lease's size).
pub fn note_demand(host: &impl Host, key: &str, now: Nanos, cost: u64) {
    update(host, key, |l| l.note_demand(now, cost));
}

/// The local share admitted `cost` while no lease was in force: owed to the fleet's bucket
/// (at most `most`, the largest lease).
pub fn spent_locally(host: &impl Host, key: &str, cost: u64, most: u64) {
    update(host, key, |l| l.spent_locally(cost, most));
}

/// Gives back `cost` taken from the lease at `key`.
pub fn refund(host: &impl Host, key: &str, cost: u64) {
    update(host, key, |l| l.refund(cost));
}

/// One leased bucket: its shared-data key, its name in the store, its limits.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    key: &'static str,
    name: &'static str,
    per_minute: u64,
    burst: u64,
}

/// The outcome of a lease call, for `unbusy_store_lease_total`.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Granted = 0,
    Short = 1,
    Error = 2,
}

/// This worker's side of the fleet's global quotas.
pub struct Quotas {
    /// The store's cluster (`None`: no store, or no global limit: no call is ever made).
    cluster: Option<String>,
    buckets: Vec<Bucket>,
    proxies: u32,
    /// `store.quota_lease_ms`, if set.
    configured: Option<Nanos>,
    /// The lease period: configured, else the store's last `lease_ms`.
    period: Nanos,
    /// Lease calls this worker made that are not answered yet: each bucket's key and want.
    calls: Vec<(CallToken, Vec<(&'static str, u64)>)>,
    /// The lease call [`Quotas::tick`] built last, until the driver says it left.
    pending: Option<Vec<(&'static str, u64)>>,
    /// The last call failed (its outage was logged).
    down: bool,
    lease_metric: [Option<MetricId>; 3],
    returned_metric: Option<MetricId>,
}

impl Quotas {
    /// The quotas of a configuration; defines their metrics and creates their shared keys
    /// when a store leases them.
    pub fn new(host: &impl Host, store: &StoreConfig, limits: &LimitsConfig) -> Self {
        let cluster = store.quota_cluster(limits).map(str::to_string);
        let g = &limits.global;
        let buckets: Vec<Bucket> = [
            (
                LEASE_REQUESTS,
                "requests",
                g.requests_per_minute,
                g.burst_requests,
            ),
            (LEASE_TOKENS, "tokens", g.tokens_per_minute, g.burst_tokens),
        ]
        .into_iter()
        .filter_map(|(key, name, per_minute, burst)| {
            let per_minute = per_minute?;
            Some(Bucket {
                key,
                name,
                per_minute,
                burst: burst.unwrap_or(per_minute),
            })
        })
        .collect();
        let configured = store.quota_lease_ms.map(ms);
        let leasing = cluster.is_some();
        if leasing {
            for b in &buckets {
                crate::shared::ensure(host, b.key, &encode(&Lease::default()));
            }
        }
        let define = |name: &str| {
            leasing
                .then(|| host.define_metric(MetricKind::Counter, name))
                .flatten()
        };
        Self {
            cluster,
            buckets,
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

    /// The number of proxies the local share divides the global limits by, when the global
    /// limits are leased (`None`: they are applied locally, whole, as without a store).
    pub fn leasing(&self) -> Option<u32> {
        self.cluster.as_ref().map(|_| self.proxies)
    }

    fn count(&self, host: &impl Host, outcome: Outcome) {
        if let Some(id) = self.lease_metric.get(outcome as usize).copied().flatten() {
            host.increment_metric(id, 1);
        }
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
        let mut back = Vec::new();
        let mut wants = Vec::new();
        for b in &self.buckets {
            let step = update(host, b.key, |l| {
                let units = l.expire(now);
                let want = l.wants(now, period, b.burst, proxies);
                if want.is_some() {
                    l.asked(now, asking_until);
                }
                (units, want)
            });
            let Some((units, want)) = step else {
                continue;
            };
            if units > 0 {
                back.push((b.name, units));
                if let Some(id) = self.returned_metric {
                    host.increment_metric(id, units as i64);
                }
            }
            if let Some(want) = want {
                wants.push((*b, want));
            }
        }
        let mut calls = Vec::new();
        if !back.is_empty() {
            calls.push((cluster.clone(), store::give_back(&[(SCOPE, &back)]), false));
        }
        if !wants.is_empty() {
            let asked: Vec<Want<'_>> = wants
                .iter()
                .map(|(b, want)| Want {
                    name: b.name,
                    per_minute: b.per_minute,
                    burst: b.burst,
                    want: *want,
                })
                .collect();
            calls.push((cluster, store::lease(&[(SCOPE, &asked)]), true));
            self.pending = Some(wants.iter().map(|(b, w)| (b.key, *w)).collect());
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
    pub fn refused(&mut self, host: &impl Host, why: &str) {
        if let Some(asked) = self.pending.take() {
            self.failed(host, &asked, why);
        }
    }

    fn failed(&mut self, host: &impl Host, asked: &[(&'static str, u64)], why: &str) {
        for (key, _) in asked {
            update(host, key, Lease::failed);
        }
        self.count(host, Outcome::Error);
        if !self.down {
            self.down = true;
            let mut line = String::from("unbusy: the store did not grant a quota lease (");
            line.push_str(why);
            line.push_str("); the global limits apply locally at limit / store.expected_proxies once the lease in force ends");
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
            self.failed(host, &asked, why);
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
        for (key, want) in &asked {
            let Some(b) = self.buckets.iter().find(|b| b.key == *key) else {
                continue;
            };
            let grant = grants
                .iter()
                .find(|g| g.scope == SCOPE && g.bucket == b.name);
            let (granted, retry_after) = grant.map_or((0, 0), |g| (g.granted, g.retry_after_ms));
            short |= granted < *want;
            update(host, key, |l| {
                l.granted(now, granted, period, ms(retry_after))
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
