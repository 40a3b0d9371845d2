//! One managed request as the filter tracks it between Envoy's callbacks: the caller's
//! request, where it stands ([`Phase`]), its current attempt and that attempt's answer, and
//! what ties it to the cache, to a provider's shared concurrency slot and to the router's
//! native attempts.
//!
//! Kept apart so the state machine ([`crate::state`]) reads as transitions over this data, and
//! what belongs to an attempt's answer ([`Answer`]) or to the native path ([`Native`]) lives in
//! one value that is replaced whole, not in loose fields reset one by one.

use crate::failover::Native;
use crate::judging::{Answer, Reading};
use crate::routing::CallerRequest;
use crate::shared::Cached;
use unbusy_core::cache_key::CacheKey;
use unbusy_core::engine::{RequestId, RequestMeta};
use unbusy_core::ids::{AttemptId, ProviderId};
use unbusy_core::reply::CacheNote;

/// Where a managed request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Request held in the request phase (body being read, or waiting for the engine).
    RequestHeld,
    /// An attempt is with the router; nothing received yet.
    Router,
    /// The router's answer is being read, held from the caller (see [`Reading`]).
    Reading(Reading),
    /// The router's answer is flowing to the caller.
    Streaming,
    /// Waiting for another action from the engine (after a failed attempt, or a dispatch).
    Waiting,
    /// Answered; nothing more to do.
    Done,
}

/// A managed request.
pub struct Flow {
    /// The engine's request, once admitted.
    pub request: Option<RequestId>,
    /// The caller's request.
    pub caller: CallerRequest,
    /// Its cache key, when it is cacheable.
    pub cache_key: Option<CacheKey>,
    /// What the answer's `x-unbusy` says about the cache.
    pub cache_note: CacheNote,
    /// The cache entry found at admission (served if the engine says so, even after attempts
    /// whose answers replaced [`Flow::answer`]).
    pub cached: Option<Cached>,
    /// Its tenant id (scopes the L2 cache's paths).
    pub tenant: u64,
    /// The request as the engine will admit it, kept while the L2 cache is asked (held in the
    /// request phase; `None` otherwise).
    pub l2_wait: Option<RequestMeta>,
    /// [`Flow::cached`] came from the L2 cache.
    pub l2_hit: bool,
    /// Where it stands.
    pub phase: Phase,
    /// The current attempt (`None` before the first).
    pub attempt: Option<AttemptId>,
    /// The current attempt's provider (`None` before the first attempt).
    pub provider: Option<ProviderId>,
    /// The attempt the router carries (its answer arrives through response callbacks).
    pub router_attempt: Option<AttemptId>,
    /// The current attempt's answer.
    pub answer: Answer,
    /// The provider whose cross-worker concurrency slot the current attempt holds.
    pub slot: Option<ProviderId>,
    /// The context whose response callbacks carry the router's attempt: the caller's stream,
    /// or the upstream instance's context for the current native attempt.
    pub carrier: u32,
    /// The native path, when attempt 1 went to a failover aggregate.
    pub native: Option<Native>,
    /// The upstream carrier holds its attempt's answer (its headers not yet released).
    pub held: bool,
}

impl Flow {
    /// A request whose headers arrived on stream `ctx`, held until its body is read.
    pub fn new(ctx: u32, path: String, headers: Vec<(String, String)>) -> Self {
        Self {
            request: None,
            caller: CallerRequest {
                path,
                headers,
                ..CallerRequest::default()
            },
            cache_key: None,
            cache_note: CacheNote::None,
            cached: None,
            tenant: 0,
            l2_wait: None,
            l2_hit: false,
            phase: Phase::RequestHeld,
            attempt: None,
            provider: None,
            router_attempt: None,
            answer: Answer::default(),
            slot: None,
            carrier: ctx,
            native: None,
            held: false,
        }
    }

    /// Whether the router's answer is being read (held from the caller).
    pub fn reading(&self) -> bool {
        matches!(self.phase, Phase::Reading(_))
    }
}
