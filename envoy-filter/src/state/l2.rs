//! The fleet's L2 cache (`unbusy-store`, `docs/store.md`), failing open: on an L1 miss of a
//! cacheable request, the request is held while the store is asked (bounded by
//! `store.timeout_ms`); a usable answer is served as an L1 hit would be and stored in L1, and
//! anything else (a miss, a timeout, an error, an answer this proxy cannot use) admits the
//! request as today. A valid answer stored in L1 is written back, fire-and-forget, from the
//! root context on the next tick (a call made from a stream's context would be cancelled when
//! the stream ends). A request with no cache key never reaches this module.

use super::State;
use crate::effect::Effect;
use crate::host::{CallToken, Host};
use crate::metrics::L2Result;
use crate::shared;
use crate::store::{self, Call};
use std::time::Duration;
use unbusy_core::cache_key::CacheKey;
use unbusy_core::engine::CacheLookup;
use unbusy_core::reply::CacheNote;
use unbusy_core::time::{ms, Nanos};

/// After the store failed, lookups and write-backs are skipped for this long (each counted as
/// an error), so an outage costs at most one timeout per worker per second, not one per request.
const BACK_OFF: Nanos = ms(1000);

/// Write-backs queued for the next tick beyond this many are dropped (a tick is 20 ms).
const MAX_QUEUED_WRITES: usize = 64;

/// This worker's view of the store.
#[derive(Default)]
pub struct L2 {
    /// Lookups in flight: the stream each belongs to (a few at a time: a `Vec` is smaller in
    /// wasm than another `HashMap` instance).
    calls: Vec<(CallToken, u32)>,
    /// Write-backs waiting for the tick.
    writes: Vec<Call>,
    /// The store failed last time (its outage was logged once).
    down: bool,
    /// No call to the store before this instant.
    skip_until: Nanos,
}

impl<H: Host> State<H> {
    /// The store's cluster, when the L2 cache is on and the store is not backing off.
    fn l2_cluster(&self, now: Nanos) -> Option<String> {
        let cluster = self.config.store.cache_cluster()?;
        if now < self.l2.skip_until {
            return None;
        }
        Some(cluster.to_string())
    }

    /// The L2 lookup of a cacheable request whose L1 lookup missed, or `None` (no store, or
    /// backing off after a failure: the request goes on as a miss).
    pub(super) fn l2_lookup(
        &mut self,
        ctx: u32,
        now: Nanos,
        tenant: u64,
        key: CacheKey,
    ) -> Option<Effect> {
        self.config.store.cache_cluster()?;
        let Some(cluster) = self.l2_cluster(now) else {
            self.metrics.l2(&self.host, L2Result::Error);
            return None;
        };
        Some(Effect::StoreLookup {
            ctx,
            cluster,
            call: store::cache_get(tenant, key),
            timeout: Duration::from_millis(self.config.store.timeout_ms),
        })
    }

    /// A lookup was dispatched for stream `ctx`.
    pub fn l2_dispatched(&mut self, token: CallToken, ctx: u32) {
        self.l2.calls.push((token, ctx));
    }

    /// The host refused a call to the store (its cluster is unknown, say): the stream `ctx`
    /// whose lookup it was, if any, goes on as a miss.
    pub fn l2_failed(&mut self, ctx: Option<u32>, now: Nanos, why: &str) -> Vec<Effect> {
        self.l2_outage(now, why);
        match ctx {
            Some(ctx) => {
                self.metrics.l2(&self.host, L2Result::Error);
                self.l2_miss(ctx, now)
            }
            None => Vec::new(),
        }
    }

    /// Whether `token` is one of this worker's lookups.
    pub(super) fn l2_owns(&self, token: CallToken) -> bool {
        self.l2.calls.iter().any(|(t, _)| *t == token)
    }

    /// The store answered a lookup (or Envoy did for it: a timeout, a reset, no host).
    pub(super) fn l2_answer(
        &mut self,
        token: CallToken,
        now: Nanos,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Vec<Effect> {
        let Some(i) = self.l2.calls.iter().position(|(t, _)| *t == token) else {
            return Vec::new();
        };
        let (_, ctx) = self.l2.calls.swap_remove(i);
        let status = store::status(headers);
        let answered = matches!(status, Some(200 | 404));
        if !answered {
            let why = if status.is_some() {
                "an error status"
            } else {
                "no answer within store.timeout_ms"
            };
            self.l2_outage(now, why);
        } else if self.l2.down {
            self.l2.down = false;
            self.host.info("unbusy: the store answers again");
        }
        let lookup = store::read_cached(headers, body).and_then(|c| {
            let age = ms(c.age_ms);
            match CacheLookup::for_age(age, &self.config.cache) {
                CacheLookup::Miss => None,
                l => Some((l, age, c)),
            }
        });
        let Some((lookup, age, cached)) = lookup else {
            let result = if answered {
                L2Result::Miss
            } else {
                L2Result::Error
            };
            self.metrics.l2(&self.host, result);
            return self.l2_miss(ctx, now);
        };
        let fresh = lookup == CacheLookup::Fresh;
        self.metrics.l2(
            &self.host,
            if fresh {
                L2Result::Hit
            } else {
                L2Result::Stale
            },
        );
        let stream = cached.content_type.starts_with("text/event-stream");
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return Vec::new();
        };
        let Some(mut meta) = flow.l2_wait.take() else {
            return Vec::new();
        };
        if let Some(key) = meta.cache_key {
            // Into L1 as stored `age` ago, so it ages there as it would have.
            if (cached.body.len() as u64) <= self.config.cache.max_entry_bytes {
                shared::cache_put(
                    &self.host,
                    key,
                    &self.cache_bounds,
                    now.saturating_sub(age),
                    stream,
                    &cached.body,
                );
            }
        }
        flow.cached = Some(shared::Cached {
            stream,
            body: cached.body,
        });
        flow.l2_hit = true;
        meta.cached = lookup;
        self.admit(ctx, now, meta)
    }

    /// The lookup of stream `ctx` found nothing usable: admitted as an L1 miss.
    fn l2_miss(&mut self, ctx: u32, now: Nanos) -> Vec<Effect> {
        match self.flows.get_mut(&ctx).and_then(|f| f.l2_wait.take()) {
            Some(meta) => self.admit(ctx, now, meta),
            None => Vec::new(),
        }
    }

    /// The store failed: one log line per outage (not per request), and a back-off.
    fn l2_outage(&mut self, now: Nanos, why: &str) {
        self.l2.skip_until = now.saturating_add(BACK_OFF);
        if !self.l2.down {
            self.l2.down = true;
            let mut line = String::from("unbusy: the store is unavailable (");
            line.push_str(why);
            line.push_str("); the L2 cache is skipped until it answers again");
            self.host.warn(&line);
        }
    }

    /// Queues the write-back of a valid answer just stored in L1 (sent on the next tick).
    pub(super) fn l2_write_back(&mut self, tenant: u64, key: CacheKey, stream: bool, body: &[u8]) {
        if self.config.store.cache_cluster().is_none() || self.l2.writes.len() >= MAX_QUEUED_WRITES
        {
            return;
        }
        let content_type = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        let c = &self.config.cache;
        self.l2.writes.push(store::cache_put(
            tenant,
            key,
            body,
            content_type,
            c.ttl_ms,
            c.stale_ttl_ms,
        ));
    }

    /// The write-backs to send now, from the root context, with the cluster they go to (none
    /// while the store backs off: they are dropped).
    pub fn l2_take_writes(&mut self, now: Nanos) -> Option<(String, Vec<Call>)> {
        if self.l2.writes.is_empty() {
            return None;
        }
        let writes = std::mem::take(&mut self.l2.writes);
        Some((self.l2_cluster(now)?, writes))
    }

    /// The cache note of an answer served from the cache: an L2 hit says so.
    pub(super) fn served_note(&self, ctx: u32, stale: bool) -> CacheNote {
        let l2 = self.flows.get(&ctx).is_some_and(|f| f.l2_hit);
        match (l2, stale) {
            (false, false) => CacheNote::Hit,
            (false, true) => CacheNote::Stale,
            (true, false) => CacheNote::HitL2,
            (true, true) => CacheNote::StaleL2,
        }
    }
}
