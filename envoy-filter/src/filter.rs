//! The filter's per-VM state: the engine, the requests it manages, and the translation of
//! Envoy's callbacks into engine calls and of engine actions into host effects.
//!
//! Every callback borrows this state, computes what to do, releases it, and only then makes
//! the hostcalls (see [`Effect`]): Envoy may call back into the VM from inside a hostcall
//! (a local reply runs the encoder filters), and a second borrow would panic.
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
//!   answer [`NATIVE_RETRY_STATUS`] so the router retries there: that answer streams;
//! - any other later attempt (a delayed retry, a provider out of the aggregate's order, after
//!   a reset before any answer) is a `dispatch_http_call` to the chosen provider's cluster and
//!   is answered with `send_http_response` while nothing has reached the caller: such an
//!   answer arrives whole (proxy-wasm buffers it), streams included. See
//!   `docs/envoy-filter.md`.

use crate::host;
use crate::metrics::{CacheResult, Metrics, Rejection};
use crate::shared;
use std::collections::HashMap;
use std::time::Duration;
use unbusy_core::answer::{assess, is_readable_encoding, DoneTracker, MANAGED_ACCEPT_ENCODING};
use unbusy_core::bucket::{Decision, Rate};
use unbusy_core::cache_key::CacheKey;
use unbusy_core::classify::{classify_fault, Classification, OutcomeClass, TransportFault};
use unbusy_core::config::Config;
use unbusy_core::encoding::{DecodeError, Decoder};
use unbusy_core::engine::{Action, CacheLookup, Engine, RequestId, SendAttempt};
use unbusy_core::progress::{Feed, Framing, ProgressDetector};
use unbusy_core::reply::{local_reply, note, CacheNote, LocalReply, ReplyKind};
use unbusy_core::request::{
    base_path, handling, query_of, read, rewrite_body, BadRequest, Endpoint, Handling,
};
use unbusy_core::time::Nanos;

/// Request bodies larger than this are refused with 413 (a chat request is kilobytes).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Answers larger than this are passed on without being held or cached.
pub const MAX_HELD_RESPONSE_BYTES: usize = 8 << 20;
/// The status the upstream instance gives an attempt's held answer so that the router retries
/// on the aggregate cluster's next provider (the route's `retriable_status_codes`). Providers
/// do not send it; it reaches the caller's filter only if the router could not retry, and is
/// then judged like any busy answer.
pub const NATIVE_RETRY_STATUS: u16 = 591;
/// Shared-data keys of the global rate limits (see [`shared::EMPTY_BUCKET`]).
const GLOBAL_REQUESTS: &str = "unbusy:limit:global:r";
const GLOBAL_TOKENS: &str = "unbusy:limit:global:t";

/// The shared-data key of a tenant slot's bucket: `r` requests, `t` tokens.
fn tenant_key(slot: u64, kind: char) -> String {
    format!("unbusy:limit:tenant:{slot}:{kind}")
}
/// The request header that ties the router's attempts to their managed request (set by the
/// filter, removed by its upstream instance before the request leaves Envoy).
pub const FLOW_HEADER: &str = "x-unbusy-flow";

/// The caller's own deadline for its request, in ms from now: for unbusy only, never sent on
/// to a provider.
pub const DEADLINE_HEADER: &str = "x-unbusy-deadline-ms";

/// What the host must do after a callback, outside the state's borrow.
#[derive(Debug)]
pub enum Effect {
    /// Rewrite the held request and let it go to the router.
    ResumeRequest {
        /// The stream.
        ctx: u32,
        /// Headers to set (`None` removes).
        headers: Vec<(String, Option<String>)>,
        /// A replacement body.
        body: Option<Vec<u8>>,
    },
    /// Set (or, with `None`, remove) a response header on the held response.
    SetResponseHeader {
        /// The stream.
        ctx: u32,
        /// Name.
        name: String,
        /// Value.
        value: Option<String>,
    },
    /// Replace the response body bytes the callback running on `ctx` holds (the buffered body
    /// while it is held, or the current chunk once it streams) with these.
    ReplaceResponseBody {
        /// The stream.
        ctx: u32,
        /// How many bytes the callback holds (all of them are replaced).
        size: usize,
        /// The new bytes.
        body: Vec<u8>,
    },
    /// Let the held response go to the caller, with these headers added.
    ResumeResponse {
        /// The stream.
        ctx: u32,
        /// Headers to set.
        headers: Vec<(String, String)>,
    },
    /// Cut the caller's stream: its answer was already flowing when the engine gave up on it
    /// (stalled, or past the request's deadline).
    ResetResponse {
        /// The stream.
        ctx: u32,
    },
    /// Answer the caller locally (or with an answer obtained by a dispatched attempt).
    Reply {
        /// The stream.
        ctx: u32,
        /// Status.
        status: u16,
        /// Headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: Vec<u8>,
    },
    /// Mark the held answer of the router's attempt for a native retry and let it go to the
    /// router (which retries on the aggregate cluster's next provider).
    RetryNatively {
        /// The upstream context carrying the attempt.
        ctx: u32,
        /// The caller's stream.
        stream: u32,
        /// The [`FLOW_HEADER`] value to put back on the request: the router retries with the
        /// request headers as the upstream instance left them.
        flow: String,
    },
    /// Send an attempt outside the stream.
    Dispatch {
        /// The stream.
        ctx: u32,
        /// The engine's request.
        request: RequestId,
        /// The attempt.
        attempt: u32,
        /// The provider's cluster.
        cluster: String,
        /// Headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: Vec<u8>,
        /// Give up after this long.
        timeout: Duration,
    },
}

impl Effect {
    /// The context the effect acts on.
    pub fn ctx(&self) -> u32 {
        match self {
            Effect::ResumeRequest { ctx, .. }
            | Effect::SetResponseHeader { ctx, .. }
            | Effect::ReplaceResponseBody { ctx, .. }
            | Effect::ResumeResponse { ctx, .. }
            | Effect::ResetResponse { ctx }
            | Effect::Reply { ctx, .. }
            | Effect::RetryNatively { ctx, .. }
            | Effect::Dispatch { ctx, .. } => *ctx,
        }
    }
}

/// Where a managed request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Request held in the request phase (body being read, or waiting for the engine).
    RequestHeld,
    /// Attempt 1 is with the router; nothing received yet.
    Router,
    /// Router answer: 200 stream, headers held until the first real event.
    HoldingStream,
    /// Router answer: 200 JSON, body being buffered.
    BufferingBody,
    /// Router answer: an error, body being buffered for classification.
    BufferingError,
    /// Router answer is flowing to the caller.
    Streaming,
    /// Waiting for another action from the engine (after a failed attempt, or a dispatch).
    Waiting,
    /// Answered; nothing more to do.
    Done,
}

struct Flow {
    request: RequestId,
    /// The model the caller asked for.
    model: String,
    stream: bool,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    cache_key: Option<CacheKey>,
    cache_note: CacheNote,
    phase: Phase,
    attempt: u32,
    provider: usize,
    router_attempt: Option<u32>,
    detector: ProgressDetector,
    /// Whether the streamed answer has ended with `data: [DONE]` so far.
    done: DoneTracker,
    /// The answer's encoding cannot be read (the provider ignored `accept-encoding: identity`):
    /// any byte counts as progress, and nothing is judged as text or cached.
    unreadable: bool,
    /// The answer is compressed although identity was asked for: it is decoded as it arrives,
    /// and the judge, the detector, the cache and the caller get the decoded bytes.
    decoder: Option<Decoder>,
    /// Why the compressed answer could not be decoded (it then counts as a server error).
    decode_failed: Option<DecodeError>,
    /// The decoded bytes of a held compressed answer so far.
    plain: Vec<u8>,
    /// The current answer is a complete, valid one that may be stored (see `answer::assess`).
    cacheable: bool,
    fed: usize,
    response_status: u16,
    response_headers: Vec<(String, String)>,
    response_body: Vec<u8>,
    keep_body: bool,
    /// The provider whose cross-worker concurrency slot the current attempt holds.
    slot: Option<usize>,
    /// The context whose response callbacks carry the router's attempt: the caller's stream,
    /// or the upstream instance's context for the current native attempt.
    carrier: u32,
    /// Native failover: the providers of the aggregate cluster still ahead, in its order.
    native: Option<Vec<usize>>,
    /// The attempt the router is about to carry natively (its rewrites are made per attempt).
    native_send: Option<SendAttempt>,
    /// The upstream carrier holds its attempt's answer (its headers not yet released).
    held: bool,
    /// The cache entry found at admission (served if the engine says so, even after attempts
    /// whose answers went into `response_body`).
    cached: Option<shared::Cached>,
}

impl Flow {
    /// Decodes a compressed answer's new bytes (as is without a decoder). A body that cannot
    /// be decoded yields nothing more, and is remembered as a failure.
    fn decode<'a>(&mut self, new: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let Some(decoder) = self.decoder.as_mut() else {
            return std::borrow::Cow::Borrowed(new);
        };
        let mut out = Vec::new();
        if let Err(e) = decoder.feed(new, &mut out, MAX_HELD_RESPONSE_BYTES) {
            self.decode_failed.get_or_insert(e);
            out.clear();
        }
        std::borrow::Cow::Owned(out)
    }

    /// The bytes of a held answer (`body`: all of it buffered so far) not seen before,
    /// decoded; a decoded answer also keeps them in `plain`.
    fn take_held<'a>(&mut self, body: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let new = self.decode(body.get(self.fed..).unwrap_or(&[]));
        self.fed = body.len();
        if self.decoder.is_some() {
            self.plain.extend_from_slice(&new);
        }
        new
    }

    /// The compressed answer ended: whether all of it decoded.
    fn decode_finish(&mut self) -> bool {
        if let Some(Err(e)) = self.decoder.as_ref().map(Decoder::finish) {
            self.decode_failed.get_or_insert(e);
        }
        self.decode_failed.is_none()
    }

    /// Feeds the answer's new bytes to the progress detector. Compressed bytes cannot be told
    /// from keep-alive ones, so for an unreadable encoding any byte is progress.
    fn feed_progress(&mut self, now: Nanos, new: &[u8]) -> Feed {
        if self.unreadable && !new.is_empty() {
            Feed::FirstProgress
        } else {
            self.detector.feed(now, new)
        }
    }
}

/// The state of one filter VM (one per Envoy worker thread).
pub struct State {
    engine: Engine,
    config: Config,
    metrics: Metrics,
    flows: HashMap<u32, Flow>,
    by_request: HashMap<RequestId, u32>,
    calls: HashMap<u32, (u32, RequestId, u32)>,
    global_requests: Option<Rate>,
    global_tokens: Option<Rate>,
    tenant_requests: Option<Rate>,
    tenant_tokens: Option<Rate>,
    cache_bounds: shared::CacheBounds,
    authorities: Vec<Option<String>>,
    /// This state's place in the VM's registry, through which the upstream instance finds it
    /// (`None`: not registered, native failover off).
    pub registry_index: Option<usize>,
}

/// What a response callback needs to do (see [`State::interest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Let it through untouched.
    Pass,
    /// Keep holding it (an answer being replaced by another attempt's).
    Hold,
    /// Hand it to the state; `bytes`: with its headers or body (or, mid-stream, only the
    /// event that a chunk passed).
    Judge {
        /// Whether the state reads the bytes.
        bytes: bool,
    },
}

/// How the upstream instance prepares one of the router's native attempts.
#[derive(Debug, Default)]
pub struct UpstreamPlan {
    /// Headers to set (`None` removes).
    pub headers: Vec<(String, Option<String>)>,
    /// A replacement body.
    pub body: Option<Vec<u8>>,
}

fn authority_of(base_url: &str) -> Option<String> {
    let rest = base_url
        .strip_prefix("https://")
        .or_else(|| base_url.strip_prefix("http://"))?;
    let host = rest.split('/').next()?;
    (!host.is_empty()).then(|| host.to_string())
}

/// The caller's path under the provider's base URL: a known endpoint (`chat/completions`,
/// `models`, ...) is placed under the base's own path whatever prefix the caller used
/// (`/v1/chat/completions` goes to `https://api.deepseek.com/chat/completions` and to
/// `https://api.openai.com/v1/chat/completions` alike; see `unbusy_core::request`); another path
/// loses an OpenAI-style `/v1` and goes under the base path. Without a base URL it is unchanged.
fn routed_path(base_url: Option<&str>, path: &str) -> String {
    let Some(base) = base_url else {
        return path.to_string();
    };
    match Endpoint::of_path(path) {
        Some((endpoint, rest)) => endpoint.under(base, rest, query_of(path)),
        None => format!(
            "{}{}",
            base_path(base),
            path.strip_prefix("/v1").unwrap_or(path)
        ),
    }
}

/// What a complete (held) answer means, for the router's attempt and a dispatched one alike:
/// the core's one verdict (`unbusy_core::answer::assess`), which also says whether the answer
/// showed real progress and whether it may be cached.
fn judge_answer(
    now: Nanos,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
) -> unbusy_core::answer::Assessment {
    let pairs = host::pairs(headers);
    assess(status, &pairs, body, Some(now / 1_000_000_000))
}

/// The verdict on an answer compressed in a way that could not be decoded (corrupt,
/// truncated or too large): a server error, retried or failed over, never cached.
fn undecodable() -> unbusy_core::answer::Assessment {
    unbusy_core::answer::Assessment {
        classification: Classification {
            class: OutcomeClass::ServerError,
            retry_after: None,
        },
        progressed: false,
        verdict: None,
        cacheable: false,
    }
}

/// Whether a held answer's verdict is reported to the engine as progress. For a stream
/// request, progress means the stream reached the caller (it can no longer be retried), so only
/// a success is; any other real answer ends the first-byte wait.
fn progress_to_report(verdict: &unbusy_core::answer::Assessment, stream: bool) -> bool {
    verdict.progressed && (!stream || verdict.classification.class == OutcomeClass::Success)
}

/// Reads the key of every provider configured with `api_key_env` from the environment (`env`
/// looks a variable up) into its `api_key`. A variable that is missing or empty (after trimming
/// whitespace, which a key never holds) refuses the configuration: the message names each such
/// provider and variable, and never holds a value.
pub fn resolve_keys(
    config: &mut Config,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), String> {
    let mut missing = Vec::new();
    for (i, p) in config.providers.iter_mut().enumerate() {
        let Some(name) = p.api_key_env.take() else {
            continue;
        };
        match env(&name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
        {
            Some(key) => p.api_key = Some(key),
            None => missing.push(format!(
                "providers[{i}] ({:?}): api_key_env names {name:?}, which is not set or empty \
                 in the VM's environment",
                p.name
            )),
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} (Envoy passes a variable of its own environment to the VM when \
             vm_config.environment_variables.host_env_keys lists it)",
            missing.join("; ")
        ))
    }
}

/// Why a configuration was refused, in one line naming the field.
pub fn check_config(config: &Config) -> Result<(), String> {
    config.validate().map_err(|e| e.to_string())?;
    for (i, p) in config.providers.iter().enumerate() {
        if p.cluster.as_deref().is_none_or(str::is_empty) {
            return Err(format!(
                "providers[{i}].cluster is required by the Envoy filter (the cluster that reaches {:?})",
                p.name
            ));
        }
    }
    Ok(())
}

impl State {
    /// The state for a checked configuration.
    pub fn new(config: Config, seed: u64) -> Result<Self, String> {
        check_config(&config)?;
        // Rate limits must hold across workers: the filter applies them through shared data,
        // so the per-worker engine gets none.
        let mut engine_config = config.clone();
        engine_config.limits.global = Default::default();
        engine_config.limits.per_tenant = Default::default();
        let engine = Engine::new(engine_config, seed).map_err(|e| e.to_string())?;
        let names: Vec<String> = config.providers.iter().map(|p| p.name.clone()).collect();
        for (i, p) in config.providers.iter().enumerate() {
            shared::ensure(&Self::breaker_key(i), &0u64.to_le_bytes());
            if p.max_concurrency.is_some() {
                shared::ensure(&Self::slot_key(i), &0u32.to_le_bytes());
            }
        }
        shared::ensure(shared::LEDGER, &0u64.to_le_bytes());
        for key in [GLOBAL_REQUESTS, GLOBAL_TOKENS] {
            shared::ensure(key, &shared::EMPTY_BUCKET);
        }
        let limits = &config.limits;
        for slot in 0..u64::from(limits.tenant_slots) {
            if limits.per_tenant.request_rate().is_some() {
                shared::ensure(&tenant_key(slot, 'r'), &shared::EMPTY_BUCKET);
            }
            if limits.per_tenant.token_rate().is_some() {
                shared::ensure(&tenant_key(slot, 't'), &shared::EMPTY_BUCKET);
            }
        }
        let limits = &config.limits;
        Ok(Self {
            engine,
            metrics: Metrics::define(&names),
            flows: HashMap::new(),
            by_request: HashMap::new(),
            calls: HashMap::new(),
            global_requests: limits.global.request_rate(),
            global_tokens: limits.global.token_rate(),
            tenant_requests: limits.per_tenant.request_rate(),
            tenant_tokens: limits.per_tenant.token_rate(),
            cache_bounds: shared::CacheBounds::for_max_bytes(config.cache.max_bytes),
            authorities: config
                .providers
                .iter()
                .map(|p| p.base_url.as_deref().and_then(authority_of))
                .collect(),
            config,
            registry_index: None,
        })
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
            // Every chunk is read: whether the stream ends with `[DONE]` decides its outcome.
            Phase::Streaming => Interest::Judge { bytes: true },
            _ => Interest::Judge { bytes: true },
        }
    }

    /// Counts a request refused because of its endpoint.
    pub fn refused_endpoint(&self) {
        self.metrics.rejection(Rejection::EndpointNotAllowed);
    }

    /// How a request with this method and path is handled (`unbusy_core::request::handling`
    /// under this configuration's `endpoints`).
    pub fn handling(&self, method: &str, path: &str) -> Handling {
        handling(method, path, &self.config.endpoints)
    }

    /// The headers that send a request the filter does not manage to the preferred provider:
    /// with the provider's key when `provider_key` (an endpoint unbusy knows, see
    /// [`State::handling`]), else with the caller's own `Authorization`, untouched.
    pub fn passthrough_headers(
        &self,
        path: &str,
        provider_key: bool,
    ) -> Vec<(String, Option<String>)> {
        let Some((i, p)) = self
            .config
            .providers
            .iter()
            .enumerate()
            .min_by_key(|(_, p)| p.priority)
        else {
            return Vec::new();
        };
        let mut h = vec![
            ("x-unbusy-cluster".to_string(), p.cluster.clone()),
            (FLOW_HEADER.to_string(), None),
        ];
        if let Some(key) = p.api_key.as_ref().filter(|_| provider_key) {
            h.push(("authorization".into(), Some(format!("Bearer {key}"))));
        }
        if let Some(a) = self.authorities.get(i).cloned().flatten() {
            h.push((":authority".into(), Some(a)));
        }
        if p.base_url.is_some() {
            h.push((
                ":path".into(),
                Some(routed_path(p.base_url.as_deref(), path)),
            ));
        }
        h
    }

    /// Starts managing a chat/completions request whose headers arrived.
    pub fn begin(&mut self, ctx: u32, path: String, headers: Vec<(String, String)>) {
        self.flows.insert(
            ctx,
            Flow {
                request: 0,
                model: String::new(),
                stream: false,
                path,
                headers,
                body: Vec::new(),
                cache_key: None,
                cache_note: CacheNote::None,
                phase: Phase::RequestHeld,
                attempt: 0,
                provider: 0,
                router_attempt: None,
                detector: ProgressDetector::new(Framing::Sse, 0),
                done: DoneTracker::new(),
                unreadable: false,
                decoder: None,
                decode_failed: None,
                plain: Vec::new(),
                cacheable: false,
                fed: 0,
                response_status: 0,
                response_headers: Vec::new(),
                response_body: Vec::new(),
                keep_body: false,
                slot: None,
                cached: None,
                carrier: ctx,
                native: None,
                native_send: None,
                held: false,
            },
        );
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

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

    /// The whole request body arrived: checks, limits, cache, admission.
    pub fn request_body(&mut self, ctx: u32, now: Nanos, body: Vec<u8>) -> Vec<Effect> {
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return Vec::new();
        };
        // The core's one reading of the request (`unbusy_core::request::read`).
        let info = match read(&host::pairs(&flow.headers), &body, &self.config) {
            Ok(info) => info,
            Err(e) => return self.refuse(ctx, ReplyKind::BadRequest, &e.message),
        };
        let (tenant, estimated_tokens) = (info.tenant, info.estimated_tokens);
        flow.stream = info.stream;
        flow.model = info.model.clone();
        flow.body = body;
        // Rate limits, shared by every worker.
        let slot = tenant % u64::from(self.config.limits.tenant_slots.max(1));
        let checks = [
            (
                self.tenant_requests.as_ref(),
                tenant_key(slot, 'r'),
                tenant,
                1,
            ),
            (
                self.tenant_tokens.as_ref(),
                tenant_key(slot, 't'),
                tenant,
                estimated_tokens,
            ),
            (
                self.global_requests.as_ref(),
                GLOBAL_REQUESTS.to_string(),
                0,
                1,
            ),
            (
                self.global_tokens.as_ref(),
                GLOBAL_TOKENS.to_string(),
                0,
                estimated_tokens,
            ),
        ];
        // Checked first, so that a request one bucket refuses charges none; then charged, and
        // the charge decides: another worker may have taken the last unit between the two (a
        // per-tenant limit of 6 over two workers once let 7 through), and then the buckets
        // already charged for this request are given back.
        let mut charged = 0;
        let mut verdict = Decision::Allowed;
        for charging in [false, true] {
            for (rate, key, owner, cost) in &checks {
                let Some(rate) = rate else { continue };
                let decision = if charging {
                    shared::charge(key, *owner, rate, now, *cost)
                } else {
                    shared::check(key, *owner, rate, now, *cost)
                };
                if decision != Decision::Allowed {
                    verdict = decision;
                    break;
                }
                charged += usize::from(charging);
            }
            if verdict != Decision::Allowed {
                break;
            }
        }
        if verdict != Decision::Allowed {
            for (rate, key, owner, cost) in checks.iter().filter(|c| c.0.is_some()).take(charged) {
                if let Some(rate) = rate {
                    shared::refund(key, *owner, rate, *cost);
                }
            }
        }
        match verdict {
            Decision::Allowed => {}
            Decision::NotUntil(at) => {
                self.metrics.rejection(Rejection::RateLimited);
                let reply = local_reply(
                    ReplyKind::RateLimited,
                    "rate limit reached",
                    Some(at.saturating_sub(now)),
                );
                self.flows.remove(&ctx);
                return vec![Self::local(ctx, &reply, "limit=rate")];
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
            Some(k) => shared::cache_get(k, &self.cache_bounds, now, &self.config.cache),
            None => (CacheLookup::Miss, None),
        };
        if key.is_some() {
            self.metrics.cache(match cached {
                CacheLookup::Fresh => CacheResult::Hit,
                CacheLookup::Stale => CacheResult::Stale,
                CacheLookup::Miss => CacheResult::Miss,
            });
            flow.cache_note = CacheNote::Miss;
        }
        flow.cached = entry;
        self.share_views(now);
        let request = self.engine.admit(now, info.meta(now, cached));
        if let Some(flow) = self.flows.get_mut(&ctx) {
            flow.request = request;
        }
        self.by_request.insert(request, ctx);
        self.drain(now)
    }

    fn refuse(&mut self, ctx: u32, kind: ReplyKind, message: &str) -> Vec<Effect> {
        self.flows.remove(&ctx);
        vec![Self::local(
            ctx,
            &local_reply(kind, message, None),
            BadRequest::NOTE,
        )]
    }

    /// The headers of the router's answer to an attempt, seen by context `from`: the caller's
    /// stream, or the upstream instance's context of a native attempt. Returns whether to hold.
    pub fn response_headers(
        &mut self,
        ctx: u32,
        from: u32,
        now: Nanos,
        headers: Vec<(String, String)>,
        end_of_stream: bool,
    ) -> (bool, Vec<Effect>) {
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return (false, Vec::new());
        };
        if from == ctx && flow.phase == Phase::Router && flow.native_send.is_some() {
            let status = Self::header(&headers, ":status").unwrap_or("");
            if status == NATIVE_RETRY_STATUS.to_string() {
                // The router could not retry (its retry budget or circuit breaker, no host in
                // the next priority): the engine's attempt never started. Send it ourselves,
                // and keep this answer from the caller.
                flow.carrier = ctx;
                flow.held = false;
                flow.router_attempt = None; // its answer will be the dispatched one
                let send = flow.native_send.take();
                let effects = send
                    .and_then(|s| self.dispatch_effect(ctx, now, &s))
                    .into_iter()
                    .collect();
                return (true, effects);
            }
        }
        if from != flow.carrier {
            match flow.phase {
                // The upstream instance judged and released it.
                Phase::Streaming | Phase::Done => return (false, Vec::new()),
                // An answer the upstream instance never saw (the router's own reply to a reset
                // or a refused connection): the caller's stream carries it from here.
                Phase::Router if from == ctx => {
                    flow.carrier = ctx;
                    flow.held = false;
                }
                _ => return (true, Vec::new()),
            }
        }
        match flow.phase {
            Phase::Router => {}
            // Our own local reply (an answer from a dispatched attempt, the cache, or an
            // error) passes through the encoder filters too: let it go.
            Phase::Done => return (false, Vec::new()),
            // An attempt the engine gave up on (first-token deadline): keep it from the caller.
            _ => return (true, Vec::new()),
        }
        let status = Self::header(&headers, ":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(502);
        let content_type = Self::header(&headers, "content-type")
            .unwrap_or("")
            .to_string();
        flow.response_status = status;
        flow.response_headers = headers;
        flow.fed = 0;
        flow.response_body.clear();
        flow.phase = match status {
            200 if content_type.contains("event-stream") => Phase::HoldingStream,
            200 => Phase::BufferingBody,
            _ => Phase::BufferingError,
        };
        flow.detector = ProgressDetector::new(Framing::from_content_type(&content_type), now);
        flow.done = DoneTracker::new();
        flow.cacheable = false;
        let encoding = Self::header(&flow.response_headers, "content-encoding");
        flow.decoder = Decoder::for_encoding(encoding);
        flow.decode_failed = None;
        flow.plain.clear();
        flow.unreadable = !is_readable_encoding(encoding) && flow.decoder.is_none();
        let mut effects = Vec::new();
        if flow.decoder.is_some() {
            // Compressed although identity was asked for: every byte toward the caller is
            // decoded, so the headers that describe the compressed bytes go.
            flow.response_headers
                .retain(|(n, _)| !matches!(n.as_str(), "content-encoding" | "content-length"));
            for name in ["content-encoding", "content-length"] {
                effects.push(Effect::SetResponseHeader {
                    ctx: from,
                    name: name.into(),
                    value: None,
                });
            }
        }
        // Headers can only be changed here, before they are released; a local reply that
        // replaces this answer carries its own note.
        flow.held = from != ctx;
        let note = self.note(ctx);
        effects.push(Effect::SetResponseHeader {
            ctx: from,
            name: "x-unbusy".into(),
            value: Some(note),
        });
        if end_of_stream {
            let (hold, more) = self.router_body(ctx, from, now, &[], true);
            effects.extend(more);
            return (hold, effects);
        }
        (true, effects)
    }

    /// A chunk of the router's answer. `body` is everything buffered so far (the filter keeps
    /// the body buffered while it holds the headers) or, once streaming, the new chunk.
    /// Returns whether to keep holding it.
    pub fn router_body(
        &mut self,
        ctx: u32,
        from: u32,
        now: Nanos,
        body: &[u8],
        end_of_stream: bool,
    ) -> (bool, Vec<Effect>) {
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return (false, Vec::new());
        };
        if from != flow.carrier {
            // The upstream instance carries (and has judged) this attempt.
            let pass = matches!(flow.phase, Phase::Streaming | Phase::Done);
            return (!pass, Vec::new());
        }
        let (request, attempt) = (flow.request, flow.router_attempt.unwrap_or(0));
        match flow.phase {
            Phase::HoldingStream => {
                let new = flow.take_held(body);
                let feed = flow.feed_progress(now, &new);
                flow.done.feed(&new);
                if feed == Feed::FirstProgress || feed == Feed::Progress {
                    flow.phase = Phase::Streaming;
                    flow.held = false;
                    flow.keep_body = flow.cache_key.is_some();
                    let mut all = Vec::new();
                    let delivered = if flow.decoder.is_some() {
                        // What the caller gets is the decoded stream so far.
                        let plain = std::mem::take(&mut flow.plain);
                        all.push(Effect::ReplaceResponseBody {
                            ctx: from,
                            size: body.len(),
                            body: plain.clone(),
                        });
                        plain
                    } else {
                        body.to_vec()
                    };
                    if flow.keep_body {
                        flow.response_body.extend_from_slice(&delivered);
                    }
                    if end_of_stream {
                        flow.decode_finish();
                    }
                    self.engine.on_first_progress(now, request, attempt);
                    let mut effects = Vec::new();
                    if end_of_stream {
                        effects = self.finish_router(ctx, now, request, attempt);
                    }
                    all.push(Effect::ResumeResponse {
                        ctx: from,
                        headers: Vec::new(),
                    });
                    all.extend(effects);
                    return (false, all);
                }
                if end_of_stream || body.len() > MAX_HELD_RESPONSE_BYTES {
                    // Only keep-alive bytes, then the end: busy in disguise.
                    self.outcome(
                        ctx,
                        now,
                        request,
                        attempt,
                        classify_fault(TransportFault::Stall),
                    );
                    let effects = self.drain(now);
                    return (true, effects);
                }
                (true, Vec::new())
            }
            Phase::Streaming => {
                // (Borrowed as is unless the answer is being decoded: no copy per chunk.)
                let chunk = flow.decode(body);
                let mut effects_before = Vec::new();
                if flow.decoder.is_some() {
                    if end_of_stream {
                        flow.decode_finish();
                    }
                    effects_before.push(Effect::ReplaceResponseBody {
                        ctx: from,
                        size: body.len(),
                        body: chunk.to_vec(),
                    });
                }
                flow.done.feed(&chunk);
                if flow.keep_body {
                    if flow.response_body.len() + chunk.len()
                        <= self.config.cache.max_entry_bytes as usize
                    {
                        flow.response_body.extend_from_slice(&chunk);
                    } else {
                        flow.keep_body = false;
                    }
                }
                self.engine.on_progress(now, request, attempt);
                if end_of_stream {
                    effects_before.extend(self.finish_router(ctx, now, request, attempt));
                }
                (false, effects_before)
            }
            Phase::BufferingBody | Phase::BufferingError => {
                let new = flow.take_held(body);
                if !end_of_stream && body.len() <= MAX_HELD_RESPONSE_BYTES {
                    // The first real byte of a held answer is progress, as a stream's first
                    // event is: the first-byte wait is over (blank lines do not count). Not for
                    // a stream request: to the engine, a stream that progressed has reached the
                    // caller, and this one is held until it is judged.
                    if flow.phase == Phase::BufferingBody && !flow.stream {
                        match flow.feed_progress(now, &new) {
                            Feed::FirstProgress => {
                                self.engine.on_first_progress(now, request, attempt)
                            }
                            Feed::Progress => self.engine.on_progress(now, request, attempt),
                            _ => {}
                        }
                    }
                    return (true, Vec::new());
                }
                flow.phase = Phase::Waiting;
                let decoded = flow.decoder.is_none() || flow.decode_finish();
                flow.response_body = if flow.decoder.is_some() {
                    std::mem::take(&mut flow.plain)
                } else {
                    body.to_vec()
                };
                let stream = flow.stream;
                let verdict = if decoded {
                    judge_answer(
                        now,
                        flow.response_status,
                        &flow.response_headers,
                        &flow.response_body,
                    )
                } else {
                    undecodable()
                };
                flow.cacheable = verdict.cacheable && body.len() <= MAX_HELD_RESPONSE_BYTES;
                if progress_to_report(&verdict, stream) {
                    self.engine.on_first_progress(now, request, attempt);
                }
                self.outcome(ctx, now, request, attempt, verdict.classification);
                let effects = self.drain(now);
                // Delivering the router's own answer releases it; otherwise keep holding it.
                let released = effects.iter().any(|e| {
                    matches!(e, Effect::ResumeResponse { ctx: c, .. }
                        | Effect::RetryNatively { ctx: c, .. } if *c == from)
                });
                (!released, effects)
            }
            Phase::Done => (false, Vec::new()),
            // Replaced by another attempt: never let this one through.
            _ => (true, Vec::new()),
        }
    }

    fn finish_router(
        &mut self,
        ctx: u32,
        now: Nanos,
        request: RequestId,
        attempt: u32,
    ) -> Vec<Effect> {
        // A stream that reached the caller is an answer only if it ended with `[DONE]`; cut
        // short, it counts as the provider's failure and is never cached.
        let complete = self
            .flows
            .get(&ctx)
            .is_some_and(|f| f.unreadable || f.done.complete());
        if let Some(flow) = self.flows.get_mut(&ctx) {
            flow.cacheable = complete && !flow.unreadable && flow.keep_body;
        }
        let class = if complete {
            OutcomeClass::Success
        } else {
            OutcomeClass::ServerError
        };
        self.outcome(
            ctx,
            now,
            request,
            attempt,
            Classification {
                class,
                retry_after: None,
            },
        );
        self.drain(now)
    }

    /// A dispatched attempt's answer (status 0: it failed before an answer).
    pub fn call_response(
        &mut self,
        token: u32,
        now: Nanos,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Vec<Effect> {
        let Some((ctx, request, attempt)) = self.calls.remove(&token) else {
            return Vec::new();
        };
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return Vec::new();
        };
        if flow.request != request || flow.attempt != attempt {
            return Vec::new(); // aborted: the engine already moved on
        }
        let status = Self::header(&headers, ":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let stream = flow.stream;
        let (mut headers, mut body) = (headers, body);
        let mut decoded = true;
        if let Some(result) = Decoder::decode_all(
            Self::header(&headers, "content-encoding"),
            &body,
            MAX_HELD_RESPONSE_BYTES,
        ) {
            // Compressed although identity was asked for: judged, cached and delivered decoded.
            headers.retain(|(n, _)| !matches!(n.as_str(), "content-encoding" | "content-length"));
            decoded = result.is_ok();
            body = result.unwrap_or_default();
        }
        let (outcome, cacheable) = if status == 0 {
            (classify_fault(TransportFault::Reset), false)
        } else {
            let verdict = if decoded {
                judge_answer(now, status, &headers, &body)
            } else {
                undecodable()
            };
            if progress_to_report(&verdict, stream) {
                self.engine.on_first_progress(now, request, attempt);
            }
            (verdict.classification, verdict.cacheable)
        };
        if let Some(flow) = self.flows.get_mut(&ctx) {
            flow.cacheable = cacheable;
            flow.response_status = status;
            flow.response_headers = headers;
            flow.response_body = body;
            flow.phase = Phase::Waiting;
        }
        self.outcome(ctx, now, request, attempt, outcome);
        self.drain(now)
    }

    /// Reports an attempt's outcome, first giving back its provider slot.
    fn outcome(
        &mut self,
        ctx: u32,
        now: Nanos,
        request: RequestId,
        attempt: u32,
        outcome: unbusy_core::classify::Classification,
    ) {
        self.release_slot(ctx);
        self.engine.on_outcome(now, request, attempt, outcome);
    }

    /// Gives back the cross-worker slot the stream's attempt holds, if any.
    fn release_slot(&mut self, ctx: u32) {
        if let Some(p) = self.flows.get_mut(&ctx).and_then(|f| f.slot.take()) {
            shared::slot_release(&Self::slot_key(p));
        }
    }

    fn slot_key(provider: usize) -> String {
        format!("unbusy:slots:{provider}")
    }

    /// Envoy accepted a dispatch: its answer will come with `token`.
    pub fn dispatched(&mut self, token: u32, ctx: u32, request: RequestId, attempt: u32) {
        self.calls.insert(token, (ctx, request, attempt));
    }

    /// A dispatch could not even start (unknown cluster, no healthy host): a refused attempt.
    pub fn dispatch_failed(&mut self, now: Nanos, request: RequestId, attempt: u32) -> Vec<Effect> {
        let ctx = self.by_request.get(&request).copied().unwrap_or(0);
        self.outcome(
            ctx,
            now,
            request,
            attempt,
            classify_fault(TransportFault::Refused),
        );
        self.drain(now)
    }

    /// The providers after `first` in an aggregate failover cluster starting with it: the
    /// others in preference order (priority, then listing order), as `unbusy-up` renders it.
    pub fn failover_order(&self, first: usize) -> Vec<usize> {
        let mut rest: Vec<usize> = (0..self.config.providers.len())
            .filter(|&i| i != first)
            .collect();
        rest.sort_by_key(|&i| {
            (
                self.config
                    .providers
                    .get(i)
                    .map_or(u32::MAX, |p| p.priority),
                i,
            )
        });
        rest
    }

    /// The router starts one of a native flow's attempts; the upstream instance's context
    /// `from` carries it, to the provider named `picked` (its host's metadata). Returns the
    /// rewrites for that provider, or `None` when the stream is not a native flow waiting for
    /// an attempt (the request then goes on untouched).
    pub fn upstream_request(
        &mut self,
        ctx: u32,
        from: u32,
        picked: Option<&str>,
    ) -> Option<UpstreamPlan> {
        let flow = self.flows.get_mut(&ctx)?;
        if flow.native.is_none() || flow.phase != Phase::Router {
            return None;
        }
        let mut send = flow.native_send.take()?;
        let model = flow.model.clone();
        flow.carrier = from;
        flow.held = false;
        let reached = picked.and_then(|n| self.config.providers.iter().position(|p| p.name == n));
        if let Some(r) = reached.filter(|&r| r != send.provider) {
            // The router reached another provider than the engine chose (the aggregate's
            // order differs from the configuration's): rewrite for the one it reached, so
            // its own credentials and model names go to it.
            host::warn("unbusy: the failover cluster reached a provider out of the expected order");
            send.provider = r;
            send.rewrite = self
                .engine
                .rewrite(r, &model, self.engine.degrades_features());
        }
        let flow = self.flows.get_mut(&ctx)?;
        // The router retries with the headers as this attempt leaves them, so every header an
        // attempt may rewrite is set each time, from the caller's original where the provider
        // keeps it: one provider's credentials never go on to the next.
        let original = |name: &str| Self::header(&flow.headers, name).map(str::to_string);
        let authority = self
            .authorities
            .get(send.provider)
            .cloned()
            .flatten()
            .or_else(|| original(":authority"));
        let path = routed_path(send.rewrite.base_url.as_deref(), &flow.path);
        let authorization = send
            .rewrite
            .authorization
            .clone()
            .or_else(|| original("authorization"));
        let body = Self::rewritten_body(flow, &send);
        let length = body.as_ref().map_or(flow.body.len(), Vec::len);
        let headers = vec![
            (FLOW_HEADER.to_string(), None),
            ("x-unbusy-cluster".to_string(), None),
            (":authority".to_string(), authority),
            (":path".to_string(), Some(path)),
            ("authorization".to_string(), authorization),
            ("content-length".to_string(), Some(length.to_string())),
            (
                "accept-encoding".to_string(),
                Some(MANAGED_ACCEPT_ENCODING.to_string()),
            ),
        ];
        Some(UpstreamPlan { headers, body })
    }

    /// The upstream instance's context `from` ended: if it carried the flow's attempt, the
    /// caller's stream carries whatever comes next (the router's own reply, say).
    pub fn upstream_done(&mut self, ctx: u32, from: u32) {
        if let Some(flow) = self.flows.get_mut(&ctx) {
            if flow.carrier == from {
                flow.carrier = ctx;
                flow.held = false;
                // It ended while its answer was still being judged (the provider reset the
                // stream): the router answers the caller's stream itself now, and that answer
                // is this attempt's outcome.
                if matches!(
                    flow.phase,
                    Phase::HoldingStream | Phase::BufferingBody | Phase::BufferingError
                ) {
                    flow.phase = Phase::Router;
                }
            }
        }
    }

    /// The stream ended (answered, or the caller went away).
    pub fn end(&mut self, ctx: u32, now: Nanos) -> Vec<Effect> {
        self.release_slot(ctx);
        if let Some(flow) = self.flows.remove(&ctx) {
            if self.by_request.remove(&flow.request).is_some() {
                self.engine.cancel(now, flow.request);
            }
        }
        self.drain(now)
    }

    /// The periodic tick: the engine's timers.
    pub fn tick(&mut self, now: Nanos) -> Vec<Effect> {
        self.share_views(now);
        if self.engine.next_wakeup().is_some_and(|t| t <= now) || self.engine.active_requests() > 0
        {
            self.engine.on_tick(now);
        }
        self.drain(now)
    }

    /// What the workers share about each provider, both ways, at every tick and admission:
    /// - how many attempts the other workers have in flight to a provider with a
    ///   `max_concurrency` quota (the shared count less this worker's own slots), so a full
    ///   quota makes requests queue for a slot, and a freed one wakes them within a tick;
    /// - until when any worker's breaker for it is open: this worker publishes its own, and
    ///   pauses the provider until the latest one published, so one worker's verdict spares
    ///   the others from paying their own `consecutive_failures` to reach it.
    fn share_views(&mut self, now: Nanos) {
        for (i, p) in self.config.providers.iter().enumerate() {
            let breaker = Self::breaker_key(i);
            if let Some(until) = self.engine.breaker_open_until(now, i) {
                shared::raise(&breaker, until);
            }
            let until = shared::instant(&breaker);
            if until > now {
                self.engine.pause_provider(now, i, until);
            }
            if p.max_concurrency.is_none() {
                continue;
            }
            let total = shared::slots_held(&Self::slot_key(i));
            let mine = self.flows.values().filter(|f| f.slot == Some(i)).count() as u32;
            self.engine
                .set_external_in_flight(now, i, total.saturating_sub(mine));
        }
    }

    fn breaker_key(provider: usize) -> String {
        format!("unbusy:breaker:{provider}")
    }

    fn note(&self, ctx: u32) -> String {
        let Some(flow) = self.flows.get(&ctx) else {
            return String::new();
        };
        let provider = self.config.providers.get(flow.provider);
        note(
            provider.map(|p| p.name.as_str()),
            flow.attempt,
            flow.cache_note,
            self.engine.tier().level(),
        )
    }

    fn rewritten_body(flow: &Flow, send: &SendAttempt) -> Option<Vec<u8>> {
        rewrite_body(&flow.body, &send.rewrite)
    }

    /// Turns the engine's queued actions into host effects.
    fn drain(&mut self, now: Nanos) -> Vec<Effect> {
        let mut effects = Vec::new();
        while let Some(action) = self.engine.poll_action() {
            let Some(&ctx) = self.by_request.get(&action.request()) else {
                continue;
            };
            match action {
                Action::Send(send) => self.send(ctx, now, &send, &mut effects),
                Action::Abort { .. } => {
                    self.release_slot(ctx);
                    // A router attempt stays held (its answer never reaches the caller); a
                    // dispatched one is ignored when it answers (its token no longer matches).
                    // (The engine ignores an aborted attempt's late outcome itself.)
                    if let Some(flow) = self.flows.get_mut(&ctx) {
                        // One already streaming to the caller is cut there: held from now on,
                        // its stream would hang until the provider ended it, and its last bytes
                        // would never be let go.
                        if flow.phase == Phase::Streaming {
                            effects.push(Effect::ResetResponse { ctx });
                        }
                        flow.phase = Phase::Waiting;
                    }
                }
                Action::Deliver {
                    request,
                    store_in_cache,
                } => {
                    self.by_request.remove(&request);
                    let note = self.note(ctx);
                    let Some(flow) = self.flows.get_mut(&ctx) else {
                        continue;
                    };
                    let from_router = flow.router_attempt == Some(flow.attempt);
                    let carrier = flow.carrier;
                    if store_in_cache && flow.cacheable {
                        if let Some(key) = flow.cache_key {
                            if flow.response_body.len() as u64 <= self.config.cache.max_entry_bytes
                            {
                                // Replayed with the content type it came with (a stream to a
                                // request whose `stream` was not literally `true` is SSE).
                                let sse = Self::header(&flow.response_headers, "content-type")
                                    .is_some_and(|ct| {
                                        Framing::from_content_type(ct) == Framing::Sse
                                    });
                                shared::cache_put(
                                    key,
                                    &self.cache_bounds,
                                    now,
                                    sse,
                                    &flow.response_body,
                                );
                                self.metrics.cache_bytes(shared::cache_bytes());
                            }
                        }
                    }
                    match flow.phase {
                        Phase::Streaming => {} // already flowing
                        // A decoded answer is replied with its decoded bytes (the router's
                        // held bytes are the compressed ones).
                        _ if from_router && flow.decoder.is_none() => {
                            // (Its `x-unbusy` was set with its headers.)
                            flow.phase = Phase::Done;
                            flow.held = false;
                            effects.push(Effect::ResumeResponse {
                                ctx: carrier,
                                headers: Vec::new(),
                            });
                        }
                        _ => {
                            flow.phase = Phase::Done;
                            let mut headers: Vec<(String, String)> = flow
                                .response_headers
                                .iter()
                                .filter(|(n, _)| {
                                    !n.starts_with(':')
                                        && !matches!(
                                            n.as_str(),
                                            "content-length" | "transfer-encoding" | "connection"
                                        )
                                })
                                .cloned()
                                .collect();
                            headers.push(("x-unbusy".into(), note));
                            effects.push(Effect::Reply {
                                ctx,
                                status: flow.response_status,
                                headers,
                                body: std::mem::take(&mut flow.response_body),
                            });
                        }
                    }
                }
                Action::ServeCache { request, stale } => {
                    self.by_request.remove(&request);
                    let Some(flow) = self.flows.get_mut(&ctx) else {
                        continue;
                    };
                    flow.cache_note = if stale {
                        CacheNote::Stale
                    } else {
                        CacheNote::Hit
                    };
                    flow.phase = Phase::Done;
                    let note = self.note(ctx);
                    let Some(flow) = self.flows.get_mut(&ctx) else {
                        continue;
                    };
                    let Some(entry) = flow.cached.take() else {
                        // (The engine serves the cache only when admission found an entry.)
                        let reply = local_reply(ReplyKind::Overloaded, "no cached answer", None);
                        effects.push(Self::local(ctx, &reply, &note));
                        continue;
                    };
                    let content_type = if entry.stream {
                        "text/event-stream"
                    } else {
                        "application/json"
                    };
                    effects.push(Effect::Reply {
                        ctx,
                        status: 200,
                        headers: vec![
                            ("content-type".into(), content_type.into()),
                            ("x-unbusy".into(), note),
                        ],
                        body: entry.body,
                    });
                }
                Action::Reply { request, reply } => {
                    self.by_request.remove(&request);
                    let note = self.note(ctx);
                    if let Some(flow) = self.flows.get_mut(&ctx) {
                        flow.phase = Phase::Done;
                    }
                    effects.push(Self::local(ctx, &reply, &note));
                }
            }
        }
        while let Some(event) = self.engine.poll_event() {
            self.metrics.event(&event);
        }
        for i in 0..self.config.providers.len() {
            self.metrics.in_flight(i, self.engine.in_flight(i));
        }
        effects
    }

    fn send(&mut self, ctx: u32, now: Nanos, send: &SendAttempt, effects: &mut Vec<Effect>) {
        // A provider's concurrency quota holds across workers: each worker's engine paces its
        // own attempts, and a shared count makes the sum respect the quota. A full count is
        // answered as the provider itself would (429 without a hint: a quota verdict), so the
        // engine fails over, queues or backs off exactly as for the real thing.
        if let Some(quota) = self
            .config
            .providers
            .get(send.provider)
            .and_then(|p| p.max_concurrency)
        {
            if !shared::slot_acquire(&Self::slot_key(send.provider), quota) {
                self.engine.on_outcome(
                    now,
                    send.request,
                    send.attempt,
                    unbusy_core::classify::Classification {
                        class: unbusy_core::classify::OutcomeClass::RateLimited,
                        retry_after: None,
                    },
                );
                return;
            }
            if let Some(flow) = self.flows.get_mut(&ctx) {
                flow.slot = Some(send.provider);
            }
        }
        let authority = self.authorities.get(send.provider).cloned().flatten();
        let native = self
            .registry_index
            .filter(|_| crate::registry::upstream_present())
            .and_then(|index| {
                let cluster = self
                    .config
                    .providers
                    .get(send.provider)?
                    .failover_cluster
                    .clone()?;
                Some((index, cluster, self.failover_order(send.provider)))
            });
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return;
        };
        if flow.phase == Phase::RequestHeld {
            if let Some((index, cluster, rest)) = native {
                // The router carries this attempt and, natively, the failovers after it; the
                // upstream instance rewrites each for the provider it reaches.
                flow.phase = Phase::Router;
                flow.router_attempt = Some(send.attempt);
                flow.attempt = send.attempt;
                flow.provider = send.provider;
                flow.native = Some(rest);
                flow.native_send = Some(send.clone());
                let headers = vec![
                    ("x-unbusy-cluster".to_string(), Some(cluster)),
                    (FLOW_HEADER.to_string(), Some(format!("{index}:{ctx}"))),
                    (
                        "accept-encoding".to_string(),
                        Some(MANAGED_ACCEPT_ENCODING.to_string()),
                    ),
                    (DEADLINE_HEADER.to_string(), None),
                ];
                effects.push(Effect::ResumeRequest {
                    ctx,
                    headers,
                    body: None,
                });
                return;
            }
        } else if flow.held && flow.carrier != ctx {
            // The router's attempt is held by the upstream instance: if the engine's choice is
            // the aggregate's next provider, the router retries there and the answer streams.
            if let Some(rest) = flow.native.as_mut() {
                if rest.first() == Some(&send.provider) {
                    rest.remove(0);
                    flow.phase = Phase::Router;
                    flow.router_attempt = Some(send.attempt);
                    flow.attempt = send.attempt;
                    flow.provider = send.provider;
                    flow.native_send = Some(send.clone());
                    flow.held = false;
                    let index = self.registry_index.unwrap_or(0);
                    effects.push(Effect::RetryNatively {
                        ctx: flow.carrier,
                        stream: ctx,
                        flow: format!("{index}:{ctx}"),
                    });
                    return;
                }
            }
        }
        if flow.phase == Phase::RequestHeld {
            let path = routed_path(send.rewrite.base_url.as_deref(), &flow.path);
            flow.attempt = send.attempt;
            flow.provider = send.provider;
            let body = Self::rewritten_body(flow, send);
            let cluster = send.rewrite.cluster.clone().unwrap_or_default();
            flow.phase = Phase::Router;
            flow.router_attempt = Some(send.attempt);
            // (A caller's own flow header would tie its request to another's attempts.)
            // Answers are asked for unencoded: the judge, the progress detector and the cache
            // must read them (the caller then gets identity, which every client accepts).
            let mut headers = vec![
                ("x-unbusy-cluster".to_string(), Some(cluster)),
                (FLOW_HEADER.to_string(), None),
                (
                    "accept-encoding".to_string(),
                    Some(MANAGED_ACCEPT_ENCODING.to_string()),
                ),
                (DEADLINE_HEADER.to_string(), None),
            ];
            if let Some(auth) = &send.rewrite.authorization {
                headers.push(("authorization".into(), Some(auth.clone())));
            }
            if let Some(a) = authority {
                headers.push((":authority".into(), Some(a)));
            }
            if path != flow.path {
                headers.push((":path".into(), Some(path)));
            }
            if let Some(b) = &body {
                headers.push(("content-length".into(), Some(b.len().to_string())));
            }
            effects.push(Effect::ResumeRequest { ctx, headers, body });
            return;
        }
        if let Some(e) = self.dispatch_effect(ctx, now, send) {
            effects.push(e);
        }
    }

    /// The attempt `send` as a `dispatch_http_call` (for attempts the router cannot carry):
    /// the caller's request rewritten for the provider, answered whole.
    fn dispatch_effect(&mut self, ctx: u32, now: Nanos, send: &SendAttempt) -> Option<Effect> {
        let authority = self.authorities.get(send.provider).cloned().flatten();
        let flow = self.flows.get_mut(&ctx)?;
        let path = routed_path(send.rewrite.base_url.as_deref(), &flow.path);
        let body = Self::rewritten_body(flow, send);
        let cluster = send.rewrite.cluster.clone().unwrap_or_default();
        flow.attempt = send.attempt;
        flow.provider = send.provider;
        flow.phase = Phase::Waiting;
        let mut headers: Vec<(String, String)> = flow
            .headers
            .iter()
            .filter(|(n, _)| {
                !matches!(
                    n.as_str(),
                    ":authority"
                        | ":path"
                        | ":method"
                        | ":scheme"
                        | "content-length"
                        | "transfer-encoding"
                        | "x-unbusy-cluster"
                        | "x-unbusy-flow"
                        | DEADLINE_HEADER
                        | "authorization"
                        | "accept-encoding"
                )
            })
            .cloned()
            .collect();
        headers.push((":method".into(), "POST".into()));
        headers.push((":path".into(), path));
        headers.push((
            ":authority".into(),
            authority.unwrap_or_else(|| cluster.clone()),
        ));
        let auth = send
            .rewrite
            .authorization
            .clone()
            .or_else(|| Self::header(&flow.headers, "authorization").map(str::to_string));
        if let Some(a) = auth {
            headers.push(("authorization".into(), a));
        }
        headers.push(("accept-encoding".into(), MANAGED_ACCEPT_ENCODING.into()));
        headers.push(("x-unbusy-attempt".into(), send.attempt.to_string()));
        let timeout = Duration::from_nanos(send.deadline.saturating_sub(now).max(1_000_000));
        Some(Effect::Dispatch {
            ctx,
            request: send.request,
            attempt: send.attempt,
            cluster,
            headers,
            body: body.unwrap_or_else(|| flow.body.clone()),
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{resolve_keys, routed_path};
    use unbusy_core::config::Config;

    #[test]
    fn keys_named_by_variables_are_read_and_a_missing_one_refuses_the_configuration() {
        let json = br#"{"providers":[
            {"name":"a","cluster":"ca","api_key_env":"KEY_A"},
            {"name":"b","cluster":"cb","api_key":"inline"},
            {"name":"c","cluster":"cc","api_key_env":"KEY_C"}]}"#;
        let mut config = Config::from_json(json).unwrap();
        let env = |name: &str| match name {
            "KEY_A" => Some("sk-a\n".to_string()),
            "KEY_C" => Some("sk-c".to_string()),
            _ => None,
        };
        resolve_keys(&mut config, env).unwrap();
        let keys: Vec<_> = config.providers.iter().map(|p| p.api_key.clone()).collect();
        assert_eq!(
            keys,
            [
                Some("sk-a".into()),
                Some("inline".into()),
                Some("sk-c".into())
            ]
        );
        assert!(config.providers.iter().all(|p| p.api_key_env.is_none()));
        // Resolved, it is still a valid configuration for the filter.
        super::check_config(&config).unwrap();

        let mut config = Config::from_json(json).unwrap();
        let only_a = |name: &str| (name == "KEY_A").then(|| "secret-a".to_string());
        let e = resolve_keys(&mut config, only_a).unwrap_err();
        assert!(
            e.starts_with("providers[2] (\"c\"): api_key_env names \"KEY_C\""),
            "{e}"
        );
        assert!(!e.contains("secret-a"), "{e}");
        let mut config = Config::from_json(json).unwrap();
        let blank = |_: &str| Some("  ".to_string());
        let e = resolve_keys(&mut config, blank).unwrap_err();
        assert!(
            e.contains("providers[0]") && e.contains("providers[2]"),
            "{e}"
        );
    }

    #[test]
    fn a_known_endpoint_lands_under_every_shape_of_base_url_once() {
        let cases = [
            (
                "https://api.deepseek.com",
                "/v1/chat/completions",
                "/chat/completions",
            ),
            (
                "https://api.openai.com/v1",
                "/v1/chat/completions",
                "/v1/chat/completions",
            ),
            (
                "https://api.openai.com/v1/",
                "/chat/completions",
                "/v1/chat/completions",
            ),
            (
                "https://gw.example/openai/v1",
                "/v1/chat/completions?api-version=2",
                "/openai/v1/chat/completions?api-version=2",
            ),
            (
                "http://127.0.0.1:9/v1",
                "/v1/models/deepseek-chat",
                "/v1/models/deepseek-chat",
            ),
            ("http://127.0.0.1:9", "/v1/files/abc", "/files/abc"),
        ];
        for (base, path, want) in cases {
            assert_eq!(routed_path(Some(base), path), want, "{path} under {base}");
        }
        assert_eq!(
            routed_path(None, "/v1/chat/completions"),
            "/v1/chat/completions"
        );
    }
}
