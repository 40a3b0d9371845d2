//! # unbusy-js
//!
//! The engine for JavaScript hosts (browsers, Node, edge workers), built with wasm-bindgen for
//! `wasm32-unknown-unknown`. The npm package `unbusy` (in `npm/`) drives it from `fetch`; this
//! crate only translates: JSON configuration in, classification of what `fetch` returned, and
//! the engine's actions and events out as JSON. Policy stays in `unbusy-core`.
//!
//! Times cross the boundary as milliseconds (`f64`, from `performance.now()` or `Date.now()`)
//! and become the engine's nanoseconds here.
//!
//! On wasm the crate is `no_std` with its own allocator (`heap`) and a panic handler that traps
//! without formatting: together they keep the standard library's allocator, panic machinery and
//! the float formatting it drags in out of the package (its size goal is 60 KB gzipped). Nothing
//! here panics on purpose; the handler is only the last resort the language requires.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

#[cfg(target_arch = "wasm32")]
mod heap;

#[cfg(target_arch = "wasm32")]
#[global_allocator]
static HEAP: heap::Heap = heap::Heap::new();

#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn trap(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use unbusy_core::answer::{assess, Assessment};
use unbusy_core::classify::{classify_fault, Classification, OutcomeClass, TransportFault};
use unbusy_core::config::Config;
use unbusy_core::engine::{Action, CacheLookup, Engine, Event, Rewrite};
use unbusy_core::genai::{self, Usage};
use unbusy_core::health::{probe_path, HealthSettings, ProbeResult, Prober};
use unbusy_core::ids::{AttemptId, ProviderId, RequestId};
use unbusy_core::json;
use unbusy_core::progress::{Feed, Framing, ProgressDetector};
use unbusy_core::reply::{note, CacheNote};
use unbusy_core::request::{
    query_of, read, rewrite_body, BadRequest, Endpoint, RequestInfo, READ_HEADERS,
};
use unbusy_core::time::{Instant, Nanos};
use wasm_bindgen::prelude::*;

fn ns(ms: f64) -> Nanos {
    if ms.is_finite() && ms > 0.0 {
        (ms * 1e6) as Nanos
    } else {
        0
    }
}

fn ms(ns: Nanos) -> f64 {
    ns as f64 / 1e6
}

/// `now` from JS (ms since its origin) as the engine's instant.
fn at(now: f64) -> Instant {
    Instant::from_nanos(ns(now))
}

/// A request and attempt as JS numbers them (the numbers `nextAction` gave), as the engine's
/// ids; `None` for numbers no request or attempt has (0, NaN), which then change nothing.
fn ids(request: f64, attempt: u32) -> Option<(RequestId, AttemptId)> {
    Some((RequestId::new(request as u64)?, AttemptId::new(attempt)?))
}

/// The engine, as the npm package drives it.
#[wasm_bindgen]
pub struct JsEngine {
    engine: Engine,
    /// The rewrite of the send `nextAction` returned last (`rewriteBody` applies it).
    rewrite: Rewrite,
    /// The reply `nextAction` (or a refusal by `read`) returned last (its numbers cannot carry
    /// its strings).
    reply: Option<unbusy_core::reply::LocalReply>,
    /// Requests `read` has read and `admit` has not admitted yet (waiting for the host's cache
    /// lookup), by handle.
    pending: Vec<(f64, RequestInfo)>,
    /// The last handle `read` gave.
    handles: f64,
    /// The action `nextAction` moved out last, as numbers.
    action: [f64; 6],
    /// Whether anyone takes the events.
    listening: bool,
    /// The active health checks' schedule and verdicts (`health_check.enabled`), driven by the
    /// package's probe timer.
    prober: Option<Prober>,
    /// The token usage of answers whose request has not finished yet (its `requestFinished`
    /// event carries it: `gen_ai.client.token.usage`).
    usage: Vec<(u64, Usage)>,
}

/// The most answers whose usage waits for their request's end (a bound, should events stop
/// being taken: the oldest is dropped).
const MAX_PENDING_USAGE: usize = 4096;

impl JsEngine {
    /// Removes and returns a request's pending usage.
    fn take_usage(&mut self, request: u64) -> Option<Usage> {
        let i = self.usage.iter().position(|(r, _)| *r == request)?;
        Some(self.usage.remove(i).1)
    }

    /// Keeps a request's usage for its `requestFinished` event.
    fn keep_usage(&mut self, request: u64, usage: Usage) {
        self.take_usage(request);
        if self.usage.len() >= MAX_PENDING_USAGE {
            self.usage.remove(0);
        }
        self.usage.push((request, usage));
    }
}

/// Why an attempt was aborted, as `nextAction` numbers it.
fn abort_code(reason: &unbusy_core::engine::AbortReason) -> f64 {
    match reason {
        unbusy_core::engine::AbortReason::FirstTokenDeadline => 0.0,
        unbusy_core::engine::AbortReason::Deadline => 1.0,
        unbusy_core::engine::AbortReason::Stalled => 2.0,
    }
}

/// A JSON object written member by member (no serde: size).
struct Obj(String);

impl Obj {
    fn new() -> Self {
        Obj(String::from("{"))
    }

    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        json::write_str(&mut self.0, k);
        self.0.push(':');
    }

    fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        json::write_str(&mut self.0, v);
        self
    }

    fn opt_str(mut self, k: &str, v: Option<&str>) -> Self {
        self.key(k);
        match v {
            Some(v) => json::write_str(&mut self.0, v),
            None => self.0.push_str("null"),
        }
        self
    }

    fn bool(mut self, k: &str, v: bool) -> Self {
        self.key(k);
        self.0.push_str(if v { "true" } else { "false" });
        self
    }

    fn num(mut self, k: &str, v: f64) -> Self {
        self.key(k);
        json::write_f64(&mut self.0, v, 3);
        self
    }

    fn end(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

fn event_json(e: &Event, usage: Option<Usage>) -> String {
    match e {
        Event::RequestFinished {
            outcome,
            attempts,
            latency,
            provider,
            model,
            first_chunk,
            ..
        } => {
            // The GenAI attributes (see `docs/metrics.md`): the answering provider, the
            // bounded model label, `error.type`, the stream's time to first chunk.
            let mut o = Obj::new()
                .str("type", "requestFinished")
                .str("outcome", outcome.label())
                .num("attempts", f64::from(*attempts))
                .num("latencyMs", ms(*latency))
                .str("model", model)
                .opt_str("errorType", unbusy_core::genai::error_type(*outcome));
            if let Some(p) = provider {
                o = o.num("provider", p.index() as f64);
            }
            if let Some(t) = first_chunk {
                o = o.num("firstChunkMs", ms(*t));
            }
            if let Some(u) = usage {
                o = o
                    .num("inputTokens", u.input as f64)
                    .num("outputTokens", u.output as f64);
            }
            o
        }
        Event::AttemptFinished {
            provider,
            class,
            latency,
        } => Obj::new()
            .str("type", "attemptFinished")
            .num("provider", provider.index() as f64)
            .str("result", class.label())
            .num("latencyMs", ms(*latency)),
        Event::FirstToken { provider, latency } => Obj::new()
            .str("type", "firstToken")
            .num("provider", provider.index() as f64)
            .num("latencyMs", ms(*latency)),
        Event::BudgetExhausted => Obj::new().str("type", "budgetExhausted"),
        Event::BreakerChanged { provider, state } => Obj::new()
            .str("type", "breakerChanged")
            .num("provider", provider.index() as f64)
            .num("state", f64::from(*state)),
        Event::TierChanged { tier } => Obj::new()
            .str("type", "tierChanged")
            .num("tier", f64::from(tier.level())),
        Event::Throttled { provider } => Obj::new()
            .str("type", "throttled")
            .num("provider", provider.index() as f64),
    }
    .end()
}

#[wasm_bindgen]
impl JsEngine {
    /// An engine for a configuration in the engine's JSON schema (snake_case); throws with
    /// every problem (`ConfigErrors`: joined with "; "), each naming its field (the host spells
    /// them as the caller did, and refuses the Envoy filter's `api_key_env` itself).
    #[wasm_bindgen(constructor)]
    pub fn new(config_json: &str, seed: f64) -> Result<JsEngine, JsError> {
        let engine = Config::from_json(config_json.as_bytes())
            .and_then(|config| Engine::new(config, seed.to_bits()))
            .map_err(|e| JsError::new(&e.message()))?;
        let checks = &engine.config().health_check;
        let prober = checks
            .enabled
            .then(|| Prober::new(HealthSettings::of(checks), engine.config().providers.len()));
        Ok(Self {
            prober,
            engine,
            rewrite: Rewrite::default(),
            reply: None,
            pending: Vec::new(),
            handles: 0.0,
            action: [0.0; 6],
            listening: true,
            usage: Vec::new(),
        })
    }

    /// The names of the request headers `read` reads (comma-separated): the caller's
    /// `Authorization`, the per-request headers (`request::READ_HEADERS`) and the configured
    /// tenant header. Hosts ask once and pass only these.
    #[wasm_bindgen(js_name = headerNames)]
    pub fn header_names(&self) -> String {
        let tenant = self.engine.config().tenancy.header.as_deref();
        let mut out = String::new();
        for name in READ_HEADERS.iter().copied().chain(tenant) {
            out.push_str(name);
            out.push(',');
        }
        out
    }

    /// Reads a managed chat/completions request (`request::read`, the rule the Envoy filter
    /// applies too): `headers_json` is `[[name, value], ...]` of the headers `headerNames`
    /// lists that the request has (empty for none), `body` its whole body. Returns its cache key
    /// (32 hex digits) when it has one, and lays out in the action buffer
    /// `[handle, stream 0/1, status]`: a handle (> 0) for `admit`, or 0 when the request is
    /// refused, with the status of the reply (400) whose headers (its `x-unbusy` note included)
    /// and body `replyHeaders` / `replyBody` give.
    pub fn read(&mut self, headers_json: &str, body: &str) -> Option<String> {
        let pairs = header_pairs(headers_json);
        let headers: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        match read(&headers, body.as_bytes(), self.engine.config()) {
            Ok(info) => {
                self.handles += 1.0;
                let key = info.cache_key.map(|k| hex(k.0, 32));
                self.action = [
                    self.handles,
                    f64::from(u8::from(info.stream)),
                    0.0,
                    0.0,
                    0.0,
                    0.0,
                ];
                self.pending.push((self.handles, info));
                key
            }
            Err(e) => {
                let mut reply = e.reply();
                reply
                    .headers
                    .push(("x-unbusy", BadRequest::NOTE.to_string()));
                self.action = [0.0, 0.0, f64::from(reply.status), 0.0, 0.0, 0.0];
                self.reply = Some(reply);
                None
            }
        }
    }

    /// The tenant of the request `read` gave `handle` for, before it is admitted: its
    /// `tenant_id` (`request::tenant_of`, hashed) as 16 hex digits, the form `unbusy-store`'s
    /// paths and Redis keys take beside the (already tenant-scoped) cache key, so a Node host
    /// and an Envoy fleet address one entry alike. `None` for an unknown handle.
    #[wasm_bindgen(js_name = tenantOf)]
    pub fn tenant_of(&self, handle: f64) -> Option<String> {
        self.pending
            .iter()
            .find(|(h, _)| *h == handle)
            .map(|(_, info)| hex(u128::from(info.tenant), 16))
    }

    /// Admits the request `read` gave `handle` for; returns its id (NaN for an unknown
    /// handle). `cached_age_ms`: how long ago the host's cache stored the answer under its key,
    /// NaN when it holds none; fresh, stale or expired by the core's rule
    /// (`CacheLookup::for_age`).
    pub fn admit(&mut self, now: f64, handle: f64, cached_age_ms: f64) -> f64 {
        let Some(i) = self.pending.iter().position(|(h, _)| *h == handle) else {
            return f64::NAN;
        };
        let (_, info) = self.pending.swap_remove(i);
        let cached = if cached_age_ms >= 0.0 {
            CacheLookup::for_age(ns(cached_age_ms), &self.engine.config().cache)
        } else {
            CacheLookup::Miss
        };
        self.engine.admit(at(now), info.meta(at(now), cached)).get() as f64
    }

    /// The `x-unbusy` note of an answer (`reply::note`): the provider of the last attempt, how
    /// many attempts, what the cache did (0 none, 1 miss, 2 hit, 3 stale) and the tier.
    pub fn note(&self, provider: usize, attempts: u32, cache: u8, tier: u8) -> String {
        let name = self
            .engine
            .config()
            .providers
            .get(provider)
            .map(|p| p.name.as_str());
        let cache = match cache {
            1 => CacheNote::Miss,
            2 => CacheNote::Hit,
            3 => CacheNote::Stale,
            _ => CacheNote::None,
        };
        note(name, attempts, cache, tier)
    }

    /// The body of the send `nextAction` returned last (`request::rewrite_body`): the caller's
    /// `body` with the send's model mapping and `max_tokens` cap; `undefined` when it changes
    /// nothing.
    #[wasm_bindgen(js_name = rewriteBody)]
    pub fn rewrite_body(&self, body: &str) -> Option<String> {
        rewrite_body(body.as_bytes(), &self.rewrite).and_then(|b| String::from_utf8(b).ok())
    }

    /// The attempt's first real progress arrived.
    #[wasm_bindgen(js_name = onFirstProgress)]
    pub fn on_first_progress(&mut self, now: f64, request: f64, attempt: u32) {
        if let Some((request, attempt)) = ids(request, attempt) {
            self.engine.on_first_progress(at(now), request, attempt);
        }
    }

    /// More real progress arrived.
    #[wasm_bindgen(js_name = onProgress)]
    pub fn on_progress(&mut self, now: f64, request: f64, attempt: u32) {
        if let Some((request, attempt)) = ids(request, attempt) {
            self.engine.on_progress(at(now), request, attempt);
        }
    }

    /// An attempt ended with a complete HTTP answer: `headers` is `[[name, value], ...]` as
    /// JSON (only `content-type`, `content-encoding` when the runtime did not decode the body,
    /// and the hint headers matter; empty for none), `body` the whole body of a 2xx (its first
    /// bytes otherwise). The core's one verdict (`answer::assess`) decides what it is: a 2xx
    /// that is not an answer (truncated JSON, an HTML page, an error object, keep-alive bytes
    /// only) is a failure like any other, retried or failed over (nothing of it reached the
    /// caller). Returns 1 when the answer may be cached.
    #[wasm_bindgen(js_name = onAnswer)]
    #[allow(clippy::too_many_arguments)]
    pub fn on_answer(
        &mut self,
        now: f64,
        request: f64,
        attempt: u32,
        status: u16,
        headers_json: &str,
        body: &[u8],
        unix_now_s: f64,
    ) -> u8 {
        let a = assessed(status, headers_json, body, unix_now_s);
        if self.listening && a.classification.class == OutcomeClass::Success {
            if let Some(u) = genai::usage(body) {
                self.keep_usage(request as u64, u);
            }
        }
        // The first real byte of an answer held whole, once it is known to be one: an answer
        // that is not one reached nobody (for a stream request, progress would mean bytes
        // reached the caller, and it could not be retried).
        if let Some((request, attempt)) = ids(request, attempt) {
            if a.progressed && a.classification.class == OutcomeClass::Success {
                self.engine.on_first_progress(at(now), request, attempt);
            }
            self.engine
                .on_outcome(at(now), request, attempt, a.classification);
        }
        u8::from(a.cacheable)
    }

    /// The usage a stream's `DoneTracker` saw (its `stream_options.include_usage` chunk), for
    /// the request's `requestFinished` event; call before `onStreamEnd`.
    #[wasm_bindgen(js_name = onStreamUsage)]
    pub fn on_stream_usage(&mut self, request: f64, tracker: &mut DoneTracker) {
        if let Some(u) = tracker.1.finish().filter(|_| self.listening) {
            self.keep_usage(request as u64, u);
        }
    }

    /// A streamed answer ended (its body ended, or the caller stopped reading): an answer if it
    /// was `complete` (its last event `data: [DONE]`, see `DoneTracker`), else the provider's
    /// failure (the caller already has its bytes, so it is not retried, only never cached).
    #[wasm_bindgen(js_name = onStreamEnd)]
    pub fn on_stream_end(&mut self, now: f64, request: f64, attempt: u32, complete: bool) {
        let class = if complete {
            OutcomeClass::Success
        } else {
            OutcomeClass::ServerError
        };
        let Some((request, attempt)) = ids(request, attempt) else {
            return;
        };
        self.engine.on_outcome(
            at(now),
            request,
            attempt,
            Classification {
                class,
                retry_after: None,
            },
        );
    }

    /// An attempt failed below HTTP: `kind` is `reset`, `refused`, `timeout` or `stall`.
    #[wasm_bindgen(js_name = onFault)]
    pub fn on_fault(&mut self, now: f64, request: f64, attempt: u32, kind: &str) {
        let fault = match kind {
            "refused" => TransportFault::Refused,
            "timeout" => TransportFault::Timeout,
            "stall" => TransportFault::Stall,
            _ => TransportFault::Reset,
        };
        if let Some((request, attempt)) = ids(request, attempt) {
            self.engine
                .on_outcome(at(now), request, attempt, classify_fault(fault));
        }
    }

    /// The caller gave up.
    pub fn cancel(&mut self, now: f64, request: f64) {
        if let Some(request) = RequestId::new(request as u64) {
            self.engine.cancel(at(now), request);
        }
    }

    /// Timers due at `now`.
    pub fn tick(&mut self, now: f64) {
        self.engine.on_tick(at(now));
    }

    /// When `tick` has something to do next (ms), or NaN.
    #[wasm_bindgen(js_name = nextWakeup)]
    pub fn next_wakeup(&self) -> f64 {
        self.engine
            .next_wakeup()
            .map_or(f64::NAN, |t| ms(t.as_nanos()))
    }

    /// Moves the next queued action into the action buffer (see `actionBuffer`) and returns its
    /// kind, or 0 when none is queued (then, with nobody listening, the events queued so far are
    /// dropped: `listen(false)`). The buffer's numbers by kind:
    /// - 1 send `[1, request, attempt, provider, max_tokens cap or NaN, 1 if a model rewrite]`
    ///   (the body it sends from `rewriteBody`, the provider's base URL and credentials from
    ///   `route`);
    /// - 2 abort `[2, request, attempt, reason]` (0 first-token deadline, 1 deadline, 2 stalled);
    /// - 3 deliver `[3, request, store in cache 0/1, tier]`; 4 serve from cache
    ///   `[4, request, stale 0/1, tier]`;
    /// - 5 reply `[5, request, status, tier]` (headers and body from `replyHeaders` /
    ///   `replyBody`).
    ///
    /// (`tier`: the degradation tier now, for the answer's `x-unbusy` header.)
    ///
    /// Numbers in a buffer the host reads in place: no JSON, no array per action.
    #[wasm_bindgen(js_name = nextAction)]
    pub fn next_action(&mut self) -> u32 {
        let Some(action) = self.engine.poll_action() else {
            if !self.listening {
                while self.engine.poll_event().is_some() {}
            }
            return 0;
        };
        let tier = f64::from(self.engine.tier().level());
        self.action = match action {
            Action::Send(s) => {
                let has_model = s.rewrite.model.is_some();
                let cap = s.rewrite.max_tokens_cap;
                self.rewrite = s.rewrite;
                [
                    1.0,
                    s.request.get() as f64,
                    f64::from(s.attempt.get()),
                    s.provider.index() as f64,
                    cap.map_or(f64::NAN, f64::from),
                    if has_model { 1.0 } else { 0.0 },
                ]
            }
            Action::Abort {
                request,
                attempt,
                reason,
            } => [
                2.0,
                request.get() as f64,
                f64::from(attempt.get()),
                abort_code(&reason),
                0.0,
                0.0,
            ],
            Action::Deliver {
                request,
                store_in_cache,
            } => [
                3.0,
                request.get() as f64,
                f64::from(u8::from(store_in_cache)),
                tier,
                0.0,
                0.0,
            ],
            Action::ServeCache { request, stale } => [
                4.0,
                request.get() as f64,
                f64::from(u8::from(stale)),
                tier,
                0.0,
                0.0,
            ],
            Action::Reply { request, reply } => {
                let status = f64::from(reply.status);
                self.reply = Some(reply);
                [5.0, request.get() as f64, status, tier, 0.0, 0.0]
            }
        };
        self.action[0] as u32
    }

    /// Where the action buffer lives in the module's memory (six `f64`s; stable for the
    /// engine's life).
    #[wasm_bindgen(js_name = actionBuffer)]
    pub fn action_buffer(&self) -> usize {
        self.action.as_ptr() as usize
    }

    /// Whether events are kept for `takeEvents` (default) or dropped as they come.
    pub fn listen(&mut self, on: bool) {
        self.listening = on;
    }

    /// The headers of the reply `nextAction` returned last, as JSON `[[name, value], ...]`.
    #[wasm_bindgen(js_name = replyHeaders)]
    pub fn reply_headers(&self) -> String {
        let mut out = String::from("[");
        for (i, (n, v)) in self.reply.iter().flat_map(|r| r.headers.iter()).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('[');
            json::write_str(&mut out, n);
            out.push(',');
            json::write_str(&mut out, v);
            out.push(']');
        }
        out.push(']');
        out
    }

    /// The body of the reply `nextAction` returned last.
    #[wasm_bindgen(js_name = replyBody)]
    pub fn reply_body(&self) -> String {
        self.reply
            .as_ref()
            .map(|r| r.body.clone())
            .unwrap_or_default()
    }

    /// Where a provider's attempts go and with which credentials, as JSON
    /// `{"baseUrl": ..., "authorization": ...}`: the same for every attempt to it, so hosts ask
    /// once per provider.
    pub fn route(&self, provider: usize) -> String {
        let p = self.engine.config().providers.get(provider);
        let authorization = p
            .and_then(|p| p.api_key.as_ref())
            .map(|k| unbusy_core::text::concat(&["Bearer ", k.as_str()]));
        Obj::new()
            .opt_str("baseUrl", p.and_then(|p| p.base_url.as_deref()))
            .opt_str("authorization", authorization.as_deref())
            .end()
    }

    /// The queued events, as a JSON array (empty string when none).
    #[wasm_bindgen(js_name = takeEvents)]
    pub fn take_events(&mut self) -> String {
        let mut out = String::new();
        while let Some(e) = self.engine.poll_event() {
            out.push(if out.is_empty() { '[' } else { ',' });
            let usage = match &e {
                Event::RequestFinished { request, .. } => self.take_usage(request.get()),
                _ => None,
            };
            out.push_str(&event_json(&e, usage));
        }
        if !out.is_empty() {
            out.push(']');
        }
        out
    }

    /// The provider to probe now (its index), or -1 when none is due or health checks are
    /// off; the probe is taken (`health::Prober::poll_probe`), so call until -1.
    #[wasm_bindgen(js_name = nextProbe)]
    pub fn next_probe(&mut self, now: f64) -> i32 {
        self.prober
            .as_mut()
            .and_then(|p| p.poll_probe(ns(now)))
            .and_then(|i| i32::try_from(i).ok())
            .unwrap_or(-1)
    }

    /// When the next probe is due (ms), NaN when health checks are off.
    #[wasm_bindgen(js_name = nextProbeAt)]
    pub fn next_probe_at(&self) -> f64 {
        self.prober
            .as_ref()
            .and_then(Prober::next_wakeup)
            .map_or(f64::NAN, ms)
    }

    /// The path a probe of `provider` requests under its base URL's origin
    /// (`health::probe_path`: `health_check.path` placed as a request's would be).
    #[wasm_bindgen(js_name = probePath)]
    pub fn probe_path(&self, provider: usize) -> String {
        let config = self.engine.config();
        let base = config
            .providers
            .get(provider)
            .and_then(|p| p.base_url.as_deref());
        probe_path(base, &config.health_check.path)
    }

    /// How long a probe may take (ms) before it counts as no answer.
    #[wasm_bindgen(js_name = probeTimeoutMs)]
    pub fn probe_timeout_ms(&self) -> f64 {
        self.engine.config().health_check.timeout_ms as f64
    }

    /// A probe of `provider` came back with `status` (0: no answer: a network error, a
    /// timeout). Returns the verdict when it changed (1 up, 0 down), else -1; the engine takes
    /// it (`Engine::set_provider_health`).
    #[wasm_bindgen(js_name = onProbe)]
    pub fn on_probe(&mut self, now: f64, provider: usize, status: u16) -> i32 {
        let result = match status {
            0 => ProbeResult::NoAnswer,
            s => ProbeResult::Status(s),
        };
        let Some(up) = self
            .prober
            .as_mut()
            .and_then(|p| p.on_result(provider, result))
        else {
            return -1;
        };
        self.engine
            .set_provider_health(at(now), ProviderId::new(provider), up);
        i32::from(up)
    }

    /// The current degradation tier (0 to 3).
    pub fn tier(&self) -> u8 {
        self.engine.tier().level()
    }
}

/// `k`'s low `digits` hex digits, lower-case, zero-padded: a cache key as 32 (as `CacheKey`'s
/// `Display`), a tenant id as 16 (as the filter's `{:016x}`), without the formatting
/// machinery's 128-bit division in the module.
fn hex(k: u128, digits: u32) -> String {
    (0..digits)
        .rev()
        .map(|i| {
            let d = ((k >> (i * 4)) & 0xf) as u8;
            char::from(if d < 10 { b'0' + d } else { b'a' + d - 10 })
        })
        .collect()
}

/// `[[name, value], ...]` as JSON, as header pairs; anything else is no headers.
fn header_pairs(headers_json: &str) -> Vec<(String, String)> {
    let parsed = if headers_json.is_empty() {
        None
    } else {
        json::parse(headers_json.as_bytes()).ok()
    };
    match parsed {
        Some(json::Value::Array(items)) => items
            .into_iter()
            .filter_map(|pair| match pair {
                json::Value::Array(nv) => match <[json::Value; 2]>::try_from(nv) {
                    Ok([json::Value::String(n), json::Value::String(v)]) => Some((n, v)),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn assessed(status: u16, headers_json: &str, body: &[u8], unix_now_s: f64) -> Assessment {
    let pairs = header_pairs(headers_json);
    let headers: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assess(
        status,
        &headers,
        body,
        (unix_now_s > 0.0).then_some(unix_now_s as u64),
    )
}

/// The core's verdict on a complete answer (`answer::assess`): `status`, its headers as JSON
/// `[[name, value], ...]` and its whole body give
/// `{"outcome": class, "retryAfterMs": ms or null, "progressed": bool, "cacheable": bool}`.
#[wasm_bindgen(js_name = assess)]
pub fn js_assess(status: u16, headers_json: &str, body: &[u8], unix_now_s: f64) -> String {
    let a = assessed(status, headers_json, body, unix_now_s);
    let mut o = Obj::new().str("outcome", a.classification.class.label());
    o.key("retryAfterMs");
    match a.classification.retry_after {
        Some(d) => json::write_f64(&mut o.0, ms(d), 3),
        None => o.0.push_str("null"),
    }
    o.bool("progressed", a.progressed)
        .bool("cacheable", a.cacheable)
        .end()
}

/// The endpoint a path (a URL's path, or the suffix below a base URL) calls
/// (`request::Endpoint::of_path`): 1 chat/completions, 2 completions, 3 embeddings, 4 models,
/// 0 none of them.
#[wasm_bindgen(js_name = endpointOf)]
pub fn endpoint_of(path: &str) -> u8 {
    match Endpoint::of_path(path) {
        Some((Endpoint::ChatCompletions, _)) => 1,
        Some((Endpoint::Completions, _)) => 2,
        Some((Endpoint::Embeddings, _)) => 3,
        Some((Endpoint::Models, _)) => 4,
        None => 0,
    }
}

/// The path of the endpoint `path` calls under a provider's base URL, whatever prefix each has
/// (`request::Endpoint::under`: `/v1/chat/completions` under `https://api.deepseek.com` is
/// `/chat/completions`, under `https://host/openai/v1` it is `/openai/v1/chat/completions`),
/// with the path's query; `undefined` when `path` calls no known endpoint. (The host puts the
/// base URL's origin in front.)
#[wasm_bindgen(js_name = endpointUnder)]
pub fn endpoint_under(base_url: &str, path: &str) -> Option<String> {
    let (endpoint, rest) = Endpoint::of_path(path)?;
    Some(endpoint.under(base_url, rest, query_of(path)))
}

/// Whether the SSE bytes seen so far end with `data: [DONE]` (`answer::DoneTracker`): a stream
/// is an answer, and may be cached, only once it has.
#[wasm_bindgen]
pub struct DoneTracker(unbusy_core::answer::DoneTracker, genai::UsageScan);

#[wasm_bindgen]
impl DoneTracker {
    /// A tracker at the start of a stream.
    #[wasm_bindgen(constructor)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> DoneTracker {
        Self(
            unbusy_core::answer::DoneTracker::new(),
            genai::UsageScan::default(),
        )
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.0.feed(chunk);
        self.1.feed(chunk);
    }

    /// Whether the stream so far ends with its `data: [DONE]` event.
    pub fn complete(&self) -> bool {
        self.0.complete()
    }
}

/// Tells real progress from keep-alive bytes in a response body.
#[wasm_bindgen]
pub struct ProgressTracker {
    detector: ProgressDetector,
}

#[wasm_bindgen]
impl ProgressTracker {
    /// A tracker for an SSE body (`sse`) or a JSON one.
    #[wasm_bindgen(constructor)]
    pub fn new(sse: bool) -> ProgressTracker {
        let framing = if sse { Framing::Sse } else { Framing::Json };
        Self {
            detector: ProgressDetector::new(framing, 0),
        }
    }

    /// Feeds a chunk: 0 keep-alive only, 1 the first real progress, 2 more progress.
    pub fn feed(&mut self, chunk: &[u8]) -> u8 {
        match self.detector.feed(0, chunk) {
            Feed::KeepAlive => 0,
            Feed::FirstProgress => 1,
            Feed::Progress => 2,
        }
    }
}
