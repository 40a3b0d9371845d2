//! The request phase: the whole body arrived; the core reads it, the shared limits admit it,
//! the shared cache is looked up, and the engine admits it.

use super::{local, State};
use crate::effect::Effect;
use crate::host::{pairs, Host};
use crate::metrics::{CacheResult, Rejection};
use crate::shared;
use unbusy_core::bucket::Decision;
use unbusy_core::engine::{CacheLookup, RequestMeta};
use unbusy_core::reply::{local_reply, CacheNote, ReplyKind};
use unbusy_core::request::{read, BadRequest};
use unbusy_core::time::{Instant, Nanos};

impl<H: Host> State<H> {
    /// The whole request body arrived: checks, limits, cache, admission.
    pub fn request_body(&mut self, ctx: u32, now: Nanos, body: Vec<u8>) -> Vec<Effect> {
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return Vec::new();
        };
        // The core's one reading of the request (`unbusy_core::request::read`).
        let info = match read(&pairs(&flow.caller.headers), &body, &self.config) {
            Ok(info) => info,
            Err(e) => return self.refuse(ctx, ReplyKind::BadRequest, &e.message),
        };
        flow.caller.stream = info.stream;
        flow.caller.model = info.model.clone();
        flow.caller.body = body;
        // Rate limits, shared by every worker (and leased by the fleet: this worker's tick keeps
        // the tenant's leases).
        self.quotas.saw(info.tenant);
        match self
            .limits
            .admit(&self.host, info.tenant, info.estimated_tokens, now)
        {
            Decision::Allowed => {}
            Decision::NotUntil(at) => {
                self.metrics.rejection(&self.host, Rejection::RateLimited);
                let reply = local_reply(
                    ReplyKind::RateLimited,
                    "rate limit reached",
                    Some(at.saturating_sub(now)),
                );
                self.flows.remove(&ctx);
                return vec![local(ctx, &reply, "limit=rate")];
            }
            Decision::Never => {
                return self.refuse(
                    ctx,
                    ReplyKind::TooLarge,
                    "the request's estimated tokens exceed the configured burst",
                );
            }
        }
        // The cache, scoped by tenant.
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return Vec::new();
        };
        let key = info.cache_key;
        flow.cache_key = key;
        let (cached, entry) = match key {
            Some(k) => {
                shared::cache_get(&self.host, k, &self.cache_bounds, now, &self.config.cache)
            }
            None => (CacheLookup::Miss, None),
        };
        if key.is_some() {
            self.metrics.cache(
                &self.host,
                match cached {
                    CacheLookup::Fresh => CacheResult::Hit,
                    CacheLookup::Stale => CacheResult::Stale,
                    CacheLookup::Miss => CacheResult::Miss,
                },
            );
            flow.cache_note = CacheNote::Miss;
        }
        flow.cached = entry;
        flow.tenant = info.tenant;
        let meta = info.meta(Instant::from_nanos(now), cached);
        // An L1 miss of a cacheable request asks the fleet's L2 cache first (held meanwhile).
        if let (Some(k), CacheLookup::Miss) = (key, cached) {
            if let Some(lookup) = self.l2_lookup(ctx, now, info.tenant, k) {
                if let Some(flow) = self.flows.get_mut(&ctx) {
                    flow.l2_wait = Some(meta);
                }
                return vec![lookup];
            }
        }
        self.admit(ctx, now, meta)
    }

    /// Admits a request whose cache lookups are done, and carries out the engine's first steps.
    pub(super) fn admit(&mut self, ctx: u32, now: Nanos, meta: RequestMeta) -> Vec<Effect> {
        self.share_views(now);
        let request = self.engine.admit(Instant::from_nanos(now), meta);
        if let Some(flow) = self.flows.get_mut(&ctx) {
            flow.request = Some(request);
        }
        self.by_request.insert(request, ctx);
        self.drain(now)
    }

    /// Refuses the request locally (it never reaches the engine).
    fn refuse(&mut self, ctx: u32, kind: ReplyKind, message: &str) -> Vec<Effect> {
        self.flows.remove(&ctx);
        vec![local(
            ctx,
            &local_reply(kind, message, None),
            BadRequest::NOTE,
        )]
    }
}
