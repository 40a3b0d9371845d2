//! The filter's per-VM state: the engine, the requests it manages ([`Flow`]), and the
//! translation of Envoy's callbacks into engine calls and of the engine's actions into
//! [`Effect`]s the driver carries out after the state is released.
//!
//! The state is generic over its [`Host`]: on Envoy the proxy-wasm ABI, in native tests a fake
//! process whose workers share data as Envoy's do. It calls the host only for what it must read
//! or write while deciding (shared data, metrics, a log line); everything that acts on a stream
//! is an [`Effect`].
//!
//! How an attempt reaches a provider:
//! - the first one rides the stream itself: the request is held until its body is read, the
//!   engine's choice is written into `x-unbusy-cluster` (the route's `cluster_header`), the
//!   provider's credentials and model mapping into headers and body, and the request goes on,
//!   so a good answer streams to the caller as it arrives;
//! - its response headers are held until the answer shows real progress (the first SSE `data:`
//!   event, the first non-blank JSON byte); keep-alive comments and blank lines do not count;
//! - with a provider's `failover_cluster` (an aggregate cluster: this provider, then the others
//!   in preference order) and the filter's upstream instance in the router, the attempt goes to
//!   that aggregate instead, and the upstream instance sees each of the router's attempts: it
//!   rewrites the request for the provider the router picked, holds and judges the answer there
//!   (the *carrier* of the attempt is then the upstream context, not the caller's), and when
//!   the engine's next step is the aggregate's next provider, right away, it marks the held
//!   answer [`crate::failover::NATIVE_RETRY_STATUS`] so the router retries there: that answer
//!   streams;
//! - any other later attempt (a delayed retry, a provider out of the aggregate's order, after
//!   a reset before any answer) is a `dispatch_http_call` to the chosen provider's cluster and
//!   is answered with `send_http_response` while nothing has reached the caller: such an
//!   answer arrives whole (proxy-wasm buffers it), streams included. See
//!   `docs/envoy-filter.md`.
//!
//! The methods are grouped by the phase of a request they serve, one submodule each:
//! `request` (the request phase: reading, limits, cache, admission), `attempt` (sending
//! an attempt: on the stream, natively, or dispatched), `response` (reading and judging an
//! attempt's answer), `actions` (the engine's actions: deliver, serve the cache, reply,
//! abort). This module holds what they share and the callbacks that are not tied to a phase
//! (a stream's end, the tick, what workers share about providers).

mod actions;
mod attempt;
mod fleet;
mod health;
mod l2;
mod request;
mod response;

pub use fleet::{Purpose as FleetPurpose, CALL_TIMEOUT_MS as FLEET_CALL_TIMEOUT_MS};

use crate::admission::SharedLimits;
use crate::configure::check_config;
use crate::effect::{Effect, Interest};
use crate::flow::{Flow, Phase};
use crate::genai::GenAiMetrics;
use crate::host::{CallToken, Host};
use crate::metrics::Metrics;
use crate::quota::Quotas;
use crate::routing::{Authorities, HeaderEdits};
use crate::shared::{self, CacheBounds};
use hashbrown::HashMap;
use unbusy_core::classify::Classification;
use unbusy_core::config::Config;
use unbusy_core::engine::{Engine, RequestId};
use unbusy_core::ids::{AttemptId, ProviderId};
use unbusy_core::reply::{note, LocalReply};
use unbusy_core::request::{handling, Handling};
use unbusy_core::time::{Instant, Nanos};

/// The shared-data key of a provider's breaker verdict (until when it is open).
fn breaker_key(provider: usize) -> String {
    format!("unbusy:breaker:{provider}")
}

/// The shared-data key of a provider's count of attempts in flight (its `max_concurrency`).
fn slot_key(provider: usize) -> String {
    format!("unbusy:slots:{provider}")
}

/// A dispatched attempt awaiting its answer: the stream, the engine's request, the attempt.
type Call = (u32, RequestId, AttemptId);

/// The state of one filter VM (one per Envoy worker thread).
pub struct State<H: Host> {
    host: H,
    engine: Engine,
    config: Config,
    metrics: Metrics,
    genai: GenAiMetrics,
    flows: HashMap<u32, Flow>,
    by_request: HashMap<RequestId, u32>,
    calls: HashMap<CallToken, Call>,
    /// Health-check probes in flight: the provider each is for (a handful, at most one per
    /// provider and interval until answered or timed out: a list, as a `HashMap` of its own type
    /// cost the filter 1.3 KB, issue 13).
    probes: Vec<(CallToken, usize)>,
    /// Each provider's `unbusy_provider_down` gauge (health checks on only).
    down_gauges: Vec<Option<crate::host::MetricId>>,
    l2: l2::L2,
    fleet: fleet::Fleet,
    limits: SharedLimits,
    quotas: Quotas,
    cache_bounds: CacheBounds,
    authorities: Authorities,
    /// This state's place in the VM's registry, through which the upstream instance finds it
    /// (`None`: not registered, native failover off).
    pub registry_index: Option<usize>,
}

impl<H: Host> State<H> {
    /// The state for a checked configuration, on `host`. Creates every fixed shared-data key
    /// (compare-and-swap only guards a key that exists: see [`shared::ensure`]).
    pub fn new(host: H, config: Config, seed: u64) -> Result<Self, String> {
        check_config(&config)?;
        // Rate limits must hold across workers: the filter applies them through shared data,
        // so the per-worker engine gets none.
        let mut engine_config = config.clone();
        engine_config.limits.global = Default::default();
        engine_config.limits.per_tenant = Default::default();
        let engine = Engine::new(engine_config, seed).map_err(|e| e.to_string())?;
        let names: Vec<String> = config.providers.iter().map(|p| p.name.clone()).collect();
        for (i, p) in config.providers.iter().enumerate() {
            shared::ensure(&host, &breaker_key(i), &0u64.to_le_bytes());
            if p.max_concurrency.is_some() {
                shared::ensure(&host, &slot_key(i), &0u32.to_le_bytes());
            }
        }
        shared::ensure(&host, shared::LEDGER, &0u64.to_le_bytes());
        Self::ensure_health_keys(&host, &config);
        let down_gauges = health::define_gauges(&host, &config);
        let quotas = Quotas::new(&host, &config.store, &config.limits);
        let limits = SharedLimits::new(&config.limits).leased(quotas.leasing());
        limits.ensure_keys(&host, &config.limits);
        let mut state = Self {
            metrics: Metrics::define(&host, &names),
            genai: GenAiMetrics::new(&names),
            host,
            engine,
            flows: HashMap::new(),
            by_request: HashMap::new(),
            calls: HashMap::new(),
            probes: Vec::new(),
            down_gauges,
            l2: l2::L2::default(),
            fleet: fleet::Fleet::default(),
            limits,
            quotas,
            cache_bounds: CacheBounds::for_max_bytes(config.cache.max_bytes),
            authorities: Authorities::of(&config.providers),
            config,
            registry_index: None,
        };
        state.fleet_setup(seed);
        Ok(state)
    }

    /// The host this state runs on.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// Whether this stream is one the filter manages.
    pub fn manages(&self, ctx: u32) -> bool {
        self.flows.contains_key(&ctx)
    }

    /// What a response callback running in context `from` must do for stream `ctx`, decided
    /// before any header or body is copied out of Envoy (most callbacks need neither).
    pub fn interest(&self, ctx: u32, from: u32) -> Interest {
        let Some(flow) = self.flows.get(&ctx) else {
            return Interest::Pass;
        };
        if from != flow.carrier {
            return match flow.phase {
                Phase::Streaming | Phase::Done => Interest::Pass,
                Phase::Router if from == ctx => Interest::Judge { bytes: true },
                _ => Interest::Hold,
            };
        }
        match flow.phase {
            Phase::Done => Interest::Pass,
            // Every chunk is read, streaming too: whether the stream ends with `[DONE]` decides
            // its outcome.
            _ => Interest::Judge { bytes: true },
        }
    }

    /// How a request with this method and path is handled (`unbusy_core::request::handling`
    /// under this configuration's `endpoints`).
    pub fn handling(&self, method: &str, path: &str) -> Handling {
        handling(method, path, &self.config.endpoints)
    }

    /// Counts a request refused because of its endpoint.
    pub fn refused_endpoint(&self) {
        self.metrics
            .rejection(&self.host, crate::metrics::Rejection::EndpointNotAllowed);
    }

    /// The headers that send a request the filter does not manage to the preferred provider:
    /// with the provider's key when `provider_key` (an endpoint unbusy knows, see
    /// [`State::handling`]), else with the caller's own `Authorization`, untouched.
    pub fn passthrough_headers(&self, path: &str, provider_key: bool) -> HeaderEdits {
        crate::routing::passthrough(
            &self.config.providers,
            &self.authorities,
            path,
            provider_key,
        )
    }

    /// Starts managing a chat/completions request whose headers arrived.
    pub fn begin(&mut self, ctx: u32, path: String, headers: Vec<(String, String)>) {
        self.flows.insert(ctx, Flow::new(ctx, path, headers));
    }

    /// The stream ended (answered, or the caller went away).
    pub fn end(&mut self, ctx: u32, now: Nanos) -> Vec<Effect> {
        self.release_slot(ctx);
        if let Some(request) = self.flows.remove(&ctx).and_then(|f| f.request) {
            if self.by_request.remove(&request).is_some() {
                self.engine.cancel(Instant::from_nanos(now), request);
            }
        }
        self.drain(now)
    }

    /// The tick's quota calls (returns and leases of the limits, see [`Quotas::tick`]),
    /// each with its cluster; `true` marks a lease call.
    pub fn quota_tick(&mut self, now: Nanos) -> Vec<(String, crate::store::Call, bool)> {
        self.quotas.tick(&self.host, now)
    }

    /// The lease call of this tick left with `token`.
    pub fn quota_dispatched(&mut self, token: CallToken) {
        self.quotas.dispatched(token);
    }

    /// The host refused this tick's lease call.
    pub fn quota_refused(&mut self, now: Nanos, why: &str) {
        self.quotas.refused(&self.host, now, why);
    }

    /// The periodic tick: the engine's timers.
    pub fn tick(&mut self, now: Nanos) -> Vec<Effect> {
        self.share_views(now);
        if self
            .engine
            .next_wakeup()
            .map(Instant::as_nanos)
            .is_some_and(|t| t <= now)
            || self.engine.active_requests() > 0
        {
            self.engine.on_tick(Instant::from_nanos(now));
        }
        let effects = self.drain(now);
        self.publish_in_flight(now);
        effects
    }

    /// What the workers share about each provider, both ways, at every tick and admission:
    /// - how many attempts the other workers have in flight to a provider with a
    ///   `max_concurrency` quota (the shared count less this worker's own slots), so a full
    ///   quota makes requests queue for a slot, and a freed one wakes them within a tick;
    /// - until when any worker's breaker for it is open: this worker publishes its own, and
    ///   pauses the provider until the latest one published, so one worker's verdict spares
    ///   the others from paying their own `consecutive_failures` to reach it (the fleet's
    ///   pauses, polled from the store, arrive in the same place: see `fleet`);
    /// - with a store, the proxy's fleet holding of the quota, as slots taken elsewhere;
    /// - the health checks' verdicts (see `health`).
    fn share_views(&mut self, now: Nanos) {
        self.sync_health(now);
        for (i, p) in self.config.providers.iter().enumerate() {
            let breaker = breaker_key(i);
            if let Some(until) = self
                .engine
                .breaker_open_until(Instant::from_nanos(now), ProviderId::new(i))
                .map(Instant::as_nanos)
            {
                shared::raise(&self.host, &breaker, until);
            }
            let until = shared::instant(&self.host, &breaker);
            if until > now {
                self.engine.pause_provider(
                    Instant::from_nanos(now),
                    ProviderId::new(i),
                    Instant::from_nanos(until),
                );
            }
            let Some(max) = p.max_concurrency else {
                continue;
            };
            let total = shared::slots_held(&self.host, &slot_key(i));
            let mine = self
                .flows
                .values()
                .filter(|f| f.slot == Some(ProviderId::new(i)))
                .count() as u32;
            // With a store, the proxy's fleet holding is its quota: the slots it does not hold
            // count as taken.
            let quota = self.quota(now, i).unwrap_or(max);
            let external = fleet_external(total.saturating_sub(mine), max, quota);
            self.engine.set_external_in_flight(
                Instant::from_nanos(now),
                ProviderId::new(i),
                external,
            );
        }
    }

    /// Reports an attempt's outcome, first giving back its provider slot.
    fn outcome(
        &mut self,
        ctx: u32,
        now: Nanos,
        request: RequestId,
        attempt: AttemptId,
        outcome: Classification,
    ) {
        self.release_slot(ctx);
        self.engine
            .on_outcome(Instant::from_nanos(now), request, attempt, outcome);
    }

    /// Gives back the cross-worker slot the stream's attempt holds, if any.
    fn release_slot(&mut self, ctx: u32) {
        if let Some(p) = self.flows.get_mut(&ctx).and_then(|f| f.slot.take()) {
            shared::slot_release(&self.host, &slot_key(p.index()));
        }
    }

    /// The `x-unbusy` note of a stream's answer.
    fn note(&self, ctx: u32) -> String {
        let Some(flow) = self.flows.get(&ctx) else {
            return String::new();
        };
        let provider = flow
            .provider
            .and_then(|p| self.config.providers.get(p.index()));
        note(
            provider.map(|p| p.name.as_str()),
            flow.attempt.map_or(0, AttemptId::get),
            flow.cache_note,
            self.engine.tier().level(),
        )
    }
}

/// The attempts the engine counts as in flight elsewhere (see
/// [`unbusy_core::fleet::external_in_flight`]).
fn fleet_external(others: u32, max: u32, quota: u32) -> u32 {
    unbusy_core::fleet::external_in_flight(others, max, quota)
}

/// A local reply to stream `ctx`, noted in `x-unbusy`.
fn local(ctx: u32, reply: &LocalReply, note: &str) -> Effect {
    let mut headers: Vec<(String, String)> = reply
        .headers
        .iter()
        .map(|(n, v)| ((*n).to_string(), v.clone()))
        .collect();
    headers.push(("x-unbusy".into(), note.to_string()));
    Effect::Reply {
        ctx,
        status: reply.status,
        headers,
        body: reply.body.clone().into_bytes(),
    }
}
