//! The engine: every policy composed behind one sans-IO interface.
//!
//! Hosts (the Envoy filter, the npm package, the simulator) translate their events into calls
//! and carry out the actions the engine queues; they decide nothing about retries, limits,
//! providers, caching or degradation. In the style of quinn-proto:
//! - the host calls [`Engine::admit`] for a new request, [`Engine::on_first_progress`] when an
//!   attempt's first real byte (first token) arrives, [`Engine::on_outcome`] when an attempt
//!   ends, [`Engine::cancel`] when the caller gives up, and [`Engine::on_tick`] at (or after)
//!   [`Engine::next_wakeup`];
//! - every call takes `now`, and the engine's randomness comes from the seed the host gave;
//! - the host drains [`Engine::poll_action`] after every call and carries each action out
//!   (send an attempt, abort one, deliver, serve from cache, reply locally), and drains
//!   [`Engine::poll_event`] into its metrics.
//!
//! A request lives from `admit` until an action finishes it (deliver, cache, local reply) or the
//! host cancels it. At most one attempt per request is in flight.
//!
//! The composition follows principles, each proven on generated worlds against the baselines
//! (`docs/engine.md` has them in full, `BENCHMARKS.md` the figures):
//! - **never worse than not trying**: a request fails locally only when a configured limit or
//!   tier-1 shedding refuses it, its deadline cannot be met (less time left than any usable
//!   provider's fastest recent answer), or every provider is known unable to answer in time (an
//!   open breaker with no probe due, a `Retry-After` past the deadline). Everything learned
//!   (breaker doubt short of an outage, learned concurrency limits, throttling, repeated hints)
//!   shapes retries only; a first attempt is held back only by a configured limit or an outage;
//! - **breakers trip on outages, not brownouts**, probe often, ramp their probes and count only
//!   their own;
//! - **deadline-aware queueing**: earliest deadline first while the queue moves, most time left
//!   first once it stands and for a half-open probe; no attempt that cannot finish;
//! - **concurrency limits only where a quota is configured or shown**;
//! - **a retry hint answers its own request**; the retry budget bounds failed retries.

use crate::anomaly::SigmaDetector;
use crate::backoff::{Backoff, GiveUp, Schedule};
use crate::breaker::{BreakerState, CircuitBreaker};
use crate::bucket::{combine, Decision, KeyedBuckets, RequestAndTokenBuckets, TokenBucket};
use crate::budget::RetryBudget;
use crate::cache_key::CacheKey;
use crate::choice::{choose, Candidate, Choice, Tried};
use crate::classify::{Classification, OutcomeClass};
use crate::concurrency::{AimdLimit, Release};
use crate::config::{Config, ConfigErrors};
use crate::degrade::{pressure, Ladder, Tier};
use crate::genai::ModelLabels;
pub use crate::ids::RequestId;
use crate::ids::{AttemptId, ProviderId};
use crate::reply::{gave_up_after, local_reply, LocalReply, ReplyKind};
use crate::sorted_map::SortedMap;
use crate::throttle::AdaptiveThrottle;
use crate::time::{ms, Instant, Nanos, SECOND};
use crate::window::Ring;
use alloc::boxed::Box;
use alloc::collections::{BinaryHeap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::cmp::Reverse;
use fastrand::Rng;

/// How important a request is to its caller; low-priority requests are shed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Priority {
    /// Shed at tier 1 and above.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Never shed (still subject to limits and fail-fast).
    High,
}

/// What the host knows of a cached answer for this request, looked up before `admit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLookup {
    /// No entry (or the request is not cacheable).
    Miss,
    /// A fresh entry.
    Fresh,
    /// An entry past its TTL but within the stale window: served only when degraded or when no
    /// provider can answer.
    Stale,
}

impl CacheLookup {
    /// What a cached answer stored `age` ago is under the `cache` configuration, the one rule
    /// every host's cache applies: fresh before `ttl_ms`, stale before `ttl_ms + stale_ttl_ms`,
    /// expired ([`CacheLookup::Miss`]: the host may drop it) from then on.
    ///
    /// ```rust
    /// use unbusy_core::config::CacheConfig;
    /// use unbusy_core::engine::CacheLookup;
    /// use unbusy_core::time::ms;
    /// let cache = CacheConfig { ttl_ms: 1000, stale_ttl_ms: 500, ..Default::default() };
    /// assert_eq!(CacheLookup::for_age(ms(999), &cache), CacheLookup::Fresh);
    /// assert_eq!(CacheLookup::for_age(ms(1000), &cache), CacheLookup::Stale);
    /// assert_eq!(CacheLookup::for_age(ms(1500), &cache), CacheLookup::Miss);
    /// ```
    pub fn for_age(age: Nanos, cache: &crate::config::CacheConfig) -> Self {
        let ttl = crate::time::ms(cache.ttl_ms);
        if age < ttl {
            Self::Fresh
        } else if age < ttl.saturating_add(crate::time::ms(cache.stale_ttl_ms)) {
            Self::Stale
        } else {
            Self::Miss
        }
    }
}

/// A new request as the engine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestMeta {
    /// A hash of the tenant's identity (see `tenancy` in the configuration).
    pub tenant: u64,
    /// The requested model, for model mapping.
    pub model: String,
    /// Whether the caller asked for a stream.
    pub stream: bool,
    /// The caller's priority.
    pub priority: Priority,
    /// Estimated prompt tokens plus `max_tokens`, charged to token buckets.
    pub estimated_tokens: u64,
    /// The caller's own deadline, if earlier than the configured one (`None`: the configured
    /// `deadlines.total_ms` from admission).
    pub deadline: Option<Instant>,
    /// The cache key, if the request is cacheable.
    pub cache_key: Option<CacheKey>,
    /// What the host's cache holds for the key.
    pub cached: CacheLookup,
}

/// The rewrites an attempt needs on its way to a provider.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rewrite {
    /// Where the attempt goes: the provider's Envoy cluster (Envoy filter)...
    pub cluster: Option<String>,
    /// ...or its base URL (the npm package, `unbusy up`).
    pub base_url: Option<String>,
    /// Replace the caller's `Authorization` header with this value (`Bearer <api_key>` from
    /// the provider's configuration); `None` passes the caller's through. Hosts never log it.
    pub authorization: Option<String>,
    /// Replace the request's model with this one.
    pub model: Option<String>,
    /// Cap `max_tokens` at this (degraded).
    pub max_tokens_cap: Option<u32>,
}

/// Send attempt number `attempt` of a request to a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendAttempt {
    /// The request.
    pub request: RequestId,
    /// Which attempt ([`AttemptId::FIRST`] for the first).
    pub attempt: AttemptId,
    /// The provider.
    pub provider: ProviderId,
    /// Real progress must start before this instant; the engine aborts the attempt otherwise.
    /// (Always set: the request's deadline at the latest.)
    pub first_token_deadline: Instant,
    /// The request's deadline.
    pub deadline: Instant,
    /// What to change in the request.
    pub rewrite: Rewrite,
}

/// Why an attempt is aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// No real progress before the first-token deadline (keep-alive bytes do not count).
    FirstTokenDeadline,
    /// The request's deadline passed.
    Deadline,
    /// Real progress started, then paused longer than `deadlines.stall_ms`. For a stream the
    /// request ends with this abort (what reached the caller is all there is; the host ends the
    /// caller's stream); otherwise another action follows.
    Stalled,
}

/// What the host must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start an attempt.
    Send(SendAttempt),
    /// Abort the attempt in flight (the engine has already accounted for it; do not report
    /// its outcome). When nothing reached the caller yet, another action for the request follows.
    Abort {
        /// The request.
        request: RequestId,
        /// The attempt.
        attempt: AttemptId,
        /// Why.
        reason: AbortReason,
    },
    /// Pass the attempt's answer to the caller; the request is finished.
    Deliver {
        /// The request.
        request: RequestId,
        /// Whether to store the answer in the cache (a successful answer to a cacheable request).
        store_in_cache: bool,
    },
    /// Answer from the cache; the request is finished.
    ServeCache {
        /// The request.
        request: RequestId,
        /// Whether the entry is stale (the host adds a `Warning`/`x-unbusy` note).
        stale: bool,
    },
    /// Answer locally; the request is finished.
    Reply {
        /// The request.
        request: RequestId,
        /// The reply.
        reply: LocalReply,
    },
}

impl Action {
    /// The request this action is about.
    pub fn request(&self) -> RequestId {
        match self {
            Self::Send(s) => s.request,
            Self::Abort { request, .. }
            | Self::Deliver { request, .. }
            | Self::ServeCache { request, .. }
            | Self::Reply { request, .. } => *request,
        }
    }
}

/// How a request ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A provider's successful answer.
    Success,
    /// A provider's caller-error answer, passed through.
    CallerError,
    /// A fresh cache hit.
    Cached,
    /// A stale cache entry.
    Stale,
    /// Refused by a rate limit.
    RateLimited,
    /// Shed by degradation.
    Shed,
    /// Failed fast or after retries: no provider could answer.
    Failed,
    /// The deadline passed.
    DeadlineExceeded,
    /// The caller cancelled.
    Cancelled,
}

impl RequestOutcome {
    /// A stable label for metrics.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::CallerError => "caller_error",
            Self::Cached => "cached",
            Self::Stale => "stale",
            Self::RateLimited => "rate_limited",
            Self::Shed => "shed",
            Self::Failed => "failed",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Cancelled => "cancelled",
        }
    }
}

/// Something that happened, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A request finished.
    RequestFinished {
        /// How.
        outcome: RequestOutcome,
        /// Attempts made.
        attempts: u32,
        /// From admission to the end.
        latency: Nanos,
        /// The request.
        request: RequestId,
        /// The provider of its last attempt (the one that answered, if any did); `None` when
        /// no attempt was sent (a cache hit, shed, rate limited before any).
        provider: Option<ProviderId>,
        /// Its model as a bounded metric label ([`crate::genai::ModelLabels`]).
        model: String,
        /// For a stream: from admission to the first real progress that reached the caller
        /// (`gen_ai.client.operation.time_to_first_chunk`); `None` for other requests and
        /// streams that never progressed.
        first_chunk: Option<Nanos>,
    },
    /// An attempt finished (or was aborted).
    AttemptFinished {
        /// The provider.
        provider: ProviderId,
        /// How (a [`OutcomeClass::label`]).
        class: OutcomeClass,
        /// From send to the end.
        latency: Nanos,
    },
    /// An attempt's first real progress.
    FirstToken {
        /// The provider.
        provider: ProviderId,
        /// From send to first token.
        latency: Nanos,
    },
    /// A retry was refused by the retry budget.
    BudgetExhausted,
    /// A provider's breaker changed state (0 closed, 1 half-open, 2 open).
    BreakerChanged {
        /// The provider.
        provider: ProviderId,
        /// The new state's gauge value.
        state: u8,
    },
    /// The degradation tier changed.
    TierChanged {
        /// The new tier.
        tier: Tier,
    },
    /// An attempt was rejected locally by adaptive throttling.
    Throttled {
        /// The provider.
        provider: ProviderId,
    },
}

struct ProviderState {
    breaker: CircuitBreaker,
    limit: AimdLimit,
    throttle: AdaptiveThrottle,
    last_breaker_gauge: u8,
    /// Rate-limit answers with a retry hint since the last success.
    consecutive_rate_limits: u32,
    /// Until this instant, retries prefer other providers: this one answered several requests
    /// in a row with a retry hint (see [`RATE_LIMIT_COOLDOWN_AFTER`]).
    cooldown_until: Nanos,
    /// No attempts at all before this instant: another engine in front of the provider found
    /// it down (its breaker opened), as good as this engine's own breaker.
    paused_until: Nanos,
    /// Attempts to this provider in flight from other engines that share its
    /// `max_concurrency` quota (other Envoy workers), as the host last reported them.
    external_in_flight: u32,
    /// Its active health checks marked it down (see [`crate::health`]): passed over while
    /// another provider is usable.
    health_down: bool,
    /// How long its recent successful attempts took, send to answer.
    answered_in: Recent,
    /// How long its recent attempts took to their first real byte: `[non-streaming, streaming]`
    /// (see [`learned_first_byte_wait`]).
    first_byte_in: [Recent; 2],
}

/// How many times the slowest recent first real byte an attempt may wait for its own, once the
/// provider's recent answers are known (see [`learned_first_byte_wait`]).
const FIRST_BYTE_WAIT_FACTOR: u64 = 4;

/// The least a learned first-byte wait can be: below it, ordinary jitter of a healthy provider
/// would abandon answers that were on their way.
const FIRST_BYTE_WAIT_FLOOR: Nanos = 2 * SECOND;

/// How long an attempt waits for its first real byte (the first SSE `data:` event, the first
/// non-blank JSON byte; keep-alive bytes do not count) before it is abandoned for another: the
/// configured wait (`deadlines.first_token_ms` for streams, `deadlines.response_ms` otherwise),
/// shortened to [`FIRST_BYTE_WAIT_FACTOR`] times the slowest of the provider's recent first
/// bytes for the same kind of request (at least [`FIRST_BYTE_WAIT_FLOOR`]) once enough are
/// known. A provider that answered in 1 to 2 s and now sends only keep-alive blank lines for
/// 20 s costs 8 s instead of the 25 s a non-streaming attempt was given; a provider whose
/// answers are slow keeps the configured wait. The attempt that is a request's last chance
/// keeps waiting anyway (see the first-token rule in `on_tick`).
fn learned_first_byte_wait(configured: Nanos, recent: &Recent) -> Nanos {
    recent.slowest().map_or(configured, |slowest| {
        slowest
            .saturating_mul(FIRST_BYTE_WAIT_FACTOR)
            .max(FIRST_BYTE_WAIT_FLOOR)
            .min(configured)
    })
}

/// The durations of a provider's last few successful attempts, in fixed memory.
///
/// Their minimum is what the engine has observed to be the least an answer takes: an attempt
/// with less time left than that cannot finish, so it is not started, and an attempt in flight
/// is not abandoned for a replacement that could not finish either.
#[derive(Debug, Clone, Copy, Default)]
struct Recent {
    samples: [Nanos; RECENT],
    len: usize,
    next: usize,
}

/// Waiters in a row that find no usable room before a wake-up pass stops.
const REWAITS_BEFORE_STOPPING: u32 = 8;

/// Successes remembered per provider.
const RECENT: usize = 16;

/// Successes needed before the engine judges what an answer takes.
const RECENT_ENOUGH: usize = 8;

impl Recent {
    fn push(&mut self, d: Nanos) {
        if let Some(slot) = self.samples.get_mut(self.next) {
            *slot = d;
        }
        self.next = (self.next + 1) % RECENT;
        self.len = (self.len + 1).min(RECENT);
    }

    /// The slowest recent answer, once there are enough.
    fn slowest(&self) -> Option<Nanos> {
        (self.len >= RECENT_ENOUGH)
            .then(|| self.samples.iter().take(self.len).copied().max())
            .flatten()
    }

    /// The fastest recent answer, once there are enough.
    fn fastest(&self) -> Option<Nanos> {
        (self.len >= RECENT_ENOUGH)
            .then(|| self.samples.iter().take(self.len).copied().min())
            .flatten()
    }
}

impl ProviderState {
    /// Whether a retry may go to this provider as it comes back from an outage: its breaker's
    /// recovery ramp has room for one more attempt in flight.
    fn recovery_room(&self, now: Nanos) -> bool {
        self.breaker
            .retry_cap(now)
            .is_none_or(|cap| self.limit.in_flight() < cap)
    }
}

/// Whether an attempt may take a slot of a provider's concurrency limit, which has `room` or
/// not (the one rule [`Engine::candidates`] and `dispatch` both apply).
///
/// A configured quota (`max_concurrency`) holds every attempt: the operator knows it. A learned
/// one holds only retries. A bare 429 is the quota signal, but not proof: the generated worlds
/// showed random bare 429s (half of all answers for ten seconds, whatever the load) shrinking
/// a learned limit to one slot, after which first attempts queued until their deadlines and a
/// quarter of the requests that one plain attempt answered failed. AIMD cannot tell random
/// refusals from a quota (TCP's old trouble with random loss), so a first attempt, which a
/// caller without us would send anyway, is never held back on that guess: a real quota answers
/// it with a quick 429, and its retry then waits for a slot.
///
/// A provider just back from an outage also bounds retries, by `recovery_room` (see
/// [`crate::breaker::CircuitBreaker::retry_cap`]).
fn paced(
    cfg: &crate::config::ProviderConfig,
    retry: bool,
    room: bool,
    recovery_room: bool,
) -> bool {
    (room || !(retry || cfg.max_concurrency.is_some())) && (recovery_room || !retry)
}

/// After this many rate-limit answers in a row carrying a retry hint, retries prefer other
/// providers until the hint has passed: the limit is likely the account's, and another
/// provider answers sooner (two providers taking turns at 90% 429s: without it, retries went
/// back to the limited one and 4% of requests ran out of attempts). It never holds a retry
/// back: a hint answers the request that got it, which waits it out (see `backoff`), and a
/// provider-wide pause rolled forward with every new hint in a 429 storm (58% of answers with
/// `Retry-After: 16`), so no retry went before its caller's deadline: one retry after the
/// hint, as the OpenAI SDKs make it, answered 98% where the pause answered 83%.
const RATE_LIMIT_COOLDOWN_AFTER: u32 = 3;

/// How far a provider cooling down after rate limits falls behind in preference for retries:
/// below every configured priority.
const COOLDOWN_PRIORITY_PENALTY: u32 = 1 << 20;

#[derive(Debug, Clone, Copy)]
struct InFlight {
    attempt: AttemptId,
    provider: usize,
    sent_at: Nanos,
    first_token_deadline: Nanos,
    progressed: bool,
    /// The latest real progress (for the stall deadline).
    last_progress: Nanos,
}

#[derive(Debug, Clone)]
struct RequestState {
    meta: RequestMeta,
    admitted_at: Nanos,
    deadline: Nanos,
    attempts: u32,
    tried: Tried,
    in_flight: Option<InFlight>,
    /// Waiting for a backoff delay or a free slot until this instant.
    waiting_until: Option<Nanos>,
    /// Whether the wait is for capacity (re-dispatched as soon as a slot frees).
    waiting_for_capacity: bool,
    /// When the current wait for a slot began (cleared when an attempt is sent).
    capacity_wait_since: Option<Nanos>,
    /// Whether the request waited for a breaker to let anything through: its first attempt
    /// is then no longer what a caller without us would send now (that one went when the
    /// provider was down), and it is paced as a retry (see [`paced`]).
    held_by_breaker: bool,
    /// Whether the wait is for the retry budget (the retry asks it again when the wait ends).
    budget_wait: bool,
    previous_delay: Nanos,
    last_class: Option<OutcomeClass>,
    last_hint: Option<Nanos>,
    /// The provider of the latest attempt sent (for [`Event::RequestFinished`]).
    last_provider: Option<usize>,
    /// When an attempt first progressed (for [`Event::RequestFinished`]'s `first_chunk`).
    first_progress_at: Option<Nanos>,
}

impl RequestState {
    /// The earliest instant at which [`Engine::on_tick`] has something to do for this request.
    fn due_at(&self, stall: Nanos) -> Nanos {
        let mut due = self.deadline;
        if let Some(t) = self.waiting_until {
            due = due.min(t);
        }
        if let Some(f) = self.in_flight {
            due = due.min(if f.progressed {
                f.last_progress.saturating_add(stall)
            } else {
                f.first_token_deadline
            });
        }
        due
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Health {
    ok: u32,
    failed: u32,
    /// First-token (or whole-response) latencies flagged as 3-sigma outliers.
    slow: u32,
}

/// Latency outliers in the health window needed before latency counts as anomalous, and their
/// least share of successful outcomes: LLM latency is heavy-tailed, so one outlier says
/// nothing, but a fifth of answers far slower than usual is a provider queueing.
const SLOW_MIN: u64 = 5;
const SLOW_SHARE: f64 = 0.2;

/// How often the degradation ladder is re-evaluated without other events.
const LADDER_PERIOD: Nanos = SECOND;

/// The engine.
pub struct Engine {
    config: Config,
    backoff: Backoff,
    providers: Vec<ProviderState>,
    budget: RetryBudget,
    global: RequestAndTokenBuckets,
    tenant_requests: Option<KeyedBuckets>,
    tenant_tokens: Option<KeyedBuckets>,
    ladder: Ladder,
    health: Ring<Health, 10>,
    /// When the outcomes now in the health window started arriving.
    health_since: Nanos,
    first_token_latency: SigmaDetector<64>,
    response_latency: SigmaDetector<64>,
    stall: Nanos,
    requests: SortedMap<RequestId, Box<RequestState>>,
    /// When each request next has something due (its deadline, a wait's end, an attempt's
    /// first-token or stall deadline), earliest first. Entries go stale as requests change or
    /// end, and are checked when they come up: a request's due time only ever moves earlier
    /// where an entry is pushed ([`Engine::arm`]), so none is missed. Thousands of requests
    /// may wait at once, and scanning them all on every tick and wake-up took 40 s for one
    /// simulated minute.
    timers: BinaryHeap<Reverse<(Nanos, RequestId)>>,
    /// The requests waiting for a slot or a probe, by deadline, and whether each is a retry.
    waiters: SortedMap<(Nanos, RequestId), bool>,
    next_id: RequestId,
    next_ladder_at: Nanos,
    /// The latest `now` a call brought (time never goes back inside the engine).
    latest: Nanos,
    rng: Rng,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    /// The bounded model labels of [`Event::RequestFinished`].
    model_labels: ModelLabels,
}

impl Engine {
    /// An engine for a validated configuration, with randomness from `seed`.
    pub fn new(config: Config, seed: u64) -> Result<Self, ConfigErrors> {
        config.validate()?;
        let providers = config
            .providers
            .iter()
            .map(|p| ProviderState {
                breaker: CircuitBreaker::new(config.breaker.settings()),
                limit: AimdLimit::new(config.concurrency.settings(p.max_concurrency)),
                throttle: AdaptiveThrottle::new(config.throttle.settings()),
                last_breaker_gauge: 0,
                consecutive_rate_limits: 0,
                cooldown_until: 0,
                paused_until: 0,
                external_in_flight: 0,
                health_down: false,
                answered_in: Recent::default(),
                first_byte_in: [Recent::default(); 2],
            })
            .collect();
        let limits = &config.limits;
        let slots = limits.tenant_slots as usize;
        Ok(Self {
            backoff: config.retry.backoff(),
            budget: RetryBudget::new(config.budget.settings()),
            global: RequestAndTokenBuckets {
                requests: limits.global.request_rate().map(TokenBucket::new),
                tokens: limits.global.token_rate().map(TokenBucket::new),
            },
            tenant_requests: limits
                .per_tenant
                .request_rate()
                .map(|r| KeyedBuckets::new(r, slots)),
            tenant_tokens: limits
                .per_tenant
                .token_rate()
                .map(|r| KeyedBuckets::new(r, slots)),
            ladder: Ladder::new(config.degradation.settings()),
            health: Ring::new(10 * SECOND),
            health_since: 0,
            first_token_latency: SigmaDetector::new(3.0, 20),
            response_latency: SigmaDetector::new(3.0, 20),
            stall: ms(config.deadlines.stall_ms),
            providers,
            requests: SortedMap::new(),
            timers: BinaryHeap::new(),
            waiters: SortedMap::new(),
            next_id: RequestId::FIRST,
            next_ladder_at: 0,
            latest: 0,
            rng: Rng::with_seed(seed),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            model_labels: ModelLabels::new(&config),
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The next action for the host, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next event for metrics, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The current degradation tier.
    pub fn tier(&self) -> Tier {
        self.ladder.tier()
    }

    /// Requests admitted and not finished.
    pub fn active_requests(&self) -> usize {
        self.requests.len()
    }

    /// The host reports how many attempts to provider `index` other engines sharing its
    /// `max_concurrency` quota have in flight (Envoy's workers, through shared data). The
    /// quota then counts them: with it full, requests wait for a slot (in order) instead of
    /// being sent into a refusal, and when the count drops, waiting requests go at once.
    pub fn set_external_in_flight(&mut self, now: Instant, provider: ProviderId, in_flight: u32) {
        let (now, index) = (now.as_nanos(), provider.index());
        self.latest = self.latest.max(now);
        let Some(p) = self.providers.get_mut(index) else {
            return;
        };
        let dropped = in_flight < p.external_in_flight;
        p.external_in_flight = in_flight;
        if dropped {
            self.wake_capacity_waiters(now);
        }
    }

    /// Until when provider `index`'s breaker is open (`None`: closed or probing), for hosts
    /// that share the verdict with other engines in front of the same provider.
    pub fn breaker_open_until(&self, now: Instant, provider: ProviderId) -> Option<Instant> {
        let breaker = &self.providers.get(provider.index())?.breaker;
        match breaker.state(now.as_nanos()) {
            BreakerState::Open { until } => Some(Instant::from_nanos(until)),
            _ => None,
        }
    }

    /// Until when retries avoid provider `index` after a run of rate limits with a retry hint
    /// (`None`: not cooling down), for hosts that share the verdict with other proxies in front
    /// of the same account (the limit is likely the account's).
    pub fn cooldown_until(&self, now: Instant, provider: ProviderId) -> Option<Instant> {
        let until = self.providers.get(provider.index())?.cooldown_until;
        (until > now.as_nanos()).then_some(Instant::from_nanos(until))
    }

    /// How many requests are waiting for a provider's slot (or a breaker's probe) now.
    pub fn waiting_for_capacity(&self) -> usize {
        self.waiters.len()
    }

    /// Another engine in front of the same provider (another Envoy worker) opened its breaker
    /// for provider `index` until `until`: no attempts go there before then, as after a
    /// provider's own request to pause (requests fail over, or wait if nothing else can help).
    /// This engine's breaker is left as it is; the one that opened probes when it half-opens.
    pub fn pause_provider(&mut self, now: Instant, provider: ProviderId, until: Instant) {
        self.latest = self.latest.max(now.as_nanos());
        if let Some(p) = self.providers.get_mut(provider.index()) {
            p.paused_until = p.paused_until.max(until.as_nanos());
        }
    }

    /// The host's active health checks (see [`crate::health`]) marked provider `index` down
    /// (`up` false) or up again: while down, it is not chosen for an attempt if another
    /// provider is usable, so a provider that went down while idle costs the next request
    /// nothing. Every provider starts up.
    pub fn set_provider_health(&mut self, now: Instant, provider: ProviderId, up: bool) {
        self.latest = self.latest.max(now.as_nanos());
        if let Some(p) = self.providers.get_mut(provider.index()) {
            p.health_down = !up;
        }
    }

    /// Whether provider `index` is marked down by the host's health checks.
    pub fn provider_down(&self, provider: ProviderId) -> bool {
        self.providers
            .get(provider.index())
            .is_some_and(|p| p.health_down)
    }

    /// Attempts in flight to provider `index`.
    pub fn in_flight(&self, provider: ProviderId) -> u32 {
        self.providers
            .get(provider.index())
            .map_or(0, |p| p.limit.in_flight())
    }

    /// Provider `provider`'s current concurrency limit (at least 1), or `None` while no limit
    /// binds it (no quota configured or shown) or for an id that names no provider.
    pub fn concurrency_limit(&self, provider: ProviderId) -> Option<u32> {
        let p = self.providers.get(provider.index())?;
        p.limit
            .binds(self.latest)
            .then(|| p.limit.limit(self.latest))
    }

    /// Provider `index`'s breaker state.
    pub fn breaker_state(&self, provider: ProviderId, now: Instant) -> Option<BreakerState> {
        let p = self.providers.get(provider.index())?;
        Some(p.breaker.state(now.as_nanos()))
    }

    /// The earliest instant at which [`Engine::on_tick`] has something to do. (The degradation
    /// ladder is re-evaluated on every call at most once a second; it needs no wake-up of its
    /// own, since it only matters to requests being admitted.)
    pub fn next_wakeup(&self) -> Option<Instant> {
        // Waiters are woken when a provider takes attempts again (a spare tick when nobody
        // waits does nothing).
        let probe = if self.requests.is_empty() {
            None
        } else {
            self.earliest_probe(self.latest)
        };
        let due = self.timers.peek().map(|Reverse((at, _))| *at);
        let at = match (probe, due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        at.map(Instant::from_nanos)
    }

    /// Admits a new request; its first action is queued. Returns its id.
    pub fn admit(&mut self, now: Instant, meta: RequestMeta) -> RequestId {
        let id = self.admit_untidy(now.as_nanos(), meta);
        self.tidy_timers();
        id
    }

    fn admit_untidy(&mut self, now: Nanos, meta: RequestMeta) -> RequestId {
        self.latest = self.latest.max(now);
        let id = self.next_id;
        self.next_id = id.successor();
        self.update_ladder(now);
        let total = self.config.deadlines.total();
        let deadline = meta.deadline.map_or(now.saturating_add(total), |d| {
            d.as_nanos().min(now.saturating_add(total))
        });
        let state = RequestState {
            meta,
            admitted_at: now,
            deadline,
            attempts: 0,
            tried: Tried::default(),
            in_flight: None,
            waiting_until: None,
            waiting_for_capacity: false,
            capacity_wait_since: None,
            held_by_breaker: false,
            budget_wait: false,
            previous_delay: 0,
            last_class: None,
            last_hint: None,
            last_provider: None,
            first_progress_at: None,
        };
        let cached = state.meta.cached;
        let priority = state.meta.priority;
        let tenant = state.meta.tenant;
        let tokens = state.meta.estimated_tokens;
        self.requests.insert(id, Box::new(state));
        self.arm(id);
        let tier = self.ladder.tier();

        if cached == CacheLookup::Fresh {
            self.finish_cache(now, id, false);
            return id;
        }
        let stale = cached == CacheLookup::Stale;
        if stale && self.config.degradation.enabled && tier.serves_stale() {
            self.finish_cache(now, id, true);
            return id;
        }
        if self.config.degradation.enabled && tier.fails_fast() && !self.help_in_time(now, id) {
            let wait = ms(self.config.degradation.min_dwell_ms);
            self.fail(
                now,
                id,
                ReplyKind::Overloaded,
                Some(wait),
                "all providers are overloaded",
            );
            return id;
        }
        if self.config.degradation.enabled && tier.degrades_features() && priority == Priority::Low
        {
            if stale {
                self.finish_cache(now, id, true);
            } else {
                let wait = ms(self.config.degradation.min_dwell_ms);
                self.fail(
                    now,
                    id,
                    ReplyKind::Shed,
                    Some(wait),
                    "low-priority request shed",
                );
            }
            return id;
        }
        match self.charge_limits(now, tenant, tokens) {
            Decision::Allowed => {
                self.budget.deposit(now);
                self.dispatch(now, id);
            }
            Decision::NotUntil(at) => {
                let wait = at.saturating_sub(now);
                self.fail(
                    now,
                    id,
                    ReplyKind::RateLimited,
                    Some(wait),
                    "rate limit reached",
                );
            }
            Decision::Never => {
                self.fail(
                    now,
                    id,
                    ReplyKind::TooLarge,
                    None,
                    "the request's estimated tokens exceed the configured burst",
                );
            }
        }
        id
    }

    /// Charges the global and per-tenant buckets, all or nothing.
    fn charge_limits(&mut self, now: Nanos, tenant: u64, tokens: u64) -> Decision {
        let check = |b: &Option<KeyedBuckets>, cost: u64| {
            b.as_ref()
                .map_or(Decision::Allowed, |b| b.check(tenant, now, cost))
        };
        let tenant_decision = combine(
            check(&self.tenant_requests, 1),
            check(&self.tenant_tokens, tokens),
        );
        if !tenant_decision.is_allowed() {
            return tenant_decision;
        }
        let global = self.global.take(now, tokens);
        if global.is_allowed() {
            if let Some(b) = self.tenant_requests.as_mut() {
                b.take(tenant, now, 1);
            }
            if let Some(b) = self.tenant_tokens.as_mut() {
                b.take(tenant, now, tokens);
            }
        }
        global
    }

    /// Records that the attempt's first real progress arrived (first token).
    pub fn on_first_progress(&mut self, now: Instant, request: RequestId, attempt: AttemptId) {
        self.on_first_progress_untidy(now.as_nanos(), request, attempt);
        self.tidy_timers();
    }

    fn on_first_progress_untidy(&mut self, now: Nanos, request: RequestId, attempt: AttemptId) {
        self.latest = self.latest.max(now);
        let mut wake = false;
        let Some(r) = self.requests.get_mut(&request) else {
            return;
        };
        let stream = r.meta.stream;
        if let Some(f) = r.in_flight.as_mut().filter(|f| f.attempt == attempt) {
            f.last_progress = f.last_progress.max(now);
            if !f.progressed {
                f.progressed = true;
                r.first_progress_at.get_or_insert(now);
                let latency = now.saturating_sub(f.sent_at);
                let provider = f.provider;
                self.events.push_back(Event::FirstToken {
                    provider: ProviderId::new(provider),
                    latency,
                });
                if let Some(p) = self.providers.get_mut(provider) {
                    if let Some(recent) = p.first_byte_in.get_mut(usize::from(stream)) {
                        recent.push(latency);
                    }
                    p.breaker.on_progress(now);
                    let gauge = p.breaker.state(now).gauge();
                    if gauge != p.last_breaker_gauge {
                        // A probe is answering: the requests held for it go now.
                        p.last_breaker_gauge = gauge;
                        self.events.push_back(Event::BreakerChanged {
                            provider: ProviderId::new(provider),
                            state: gauge,
                        });
                        wake = true;
                    }
                }
                let detector = if stream {
                    &mut self.first_token_latency
                } else {
                    &mut self.response_latency
                };
                let verdict = detector.observe(latency as f64 / 1e6);
                if verdict.anomalous {
                    let h = self.health.current(now);
                    h.slow = h.slow.saturating_add(1);
                }
            }
        }
        self.arm(request);
        if wake {
            self.wake_capacity_waiters(now);
        }
    }

    /// Records more real progress on an attempt (a later SSE event or body chunk): resets its
    /// stall deadline. Hosts may call it for every chunk; it is cheap.
    pub fn on_progress(&mut self, now: Instant, request: RequestId, attempt: AttemptId) {
        self.on_progress_untidy(now.as_nanos(), request, attempt);
        self.tidy_timers();
    }

    fn on_progress_untidy(&mut self, now: Nanos, request: RequestId, attempt: AttemptId) {
        let first = self
            .requests
            .get(&request)
            .and_then(|r| r.in_flight)
            .is_some_and(|f| f.attempt == attempt && !f.progressed);
        if first {
            self.on_first_progress_untidy(now, request, attempt);
            return;
        }
        self.latest = self.latest.max(now);
        if let Some(f) = self
            .requests
            .get_mut(&request)
            .and_then(|r| r.in_flight.as_mut())
            .filter(|f| f.attempt == attempt)
        {
            f.last_progress = f.last_progress.max(now);
        }
    }

    /// Records how an attempt ended and queues what comes next.
    pub fn on_outcome(
        &mut self,
        now: Instant,
        request: RequestId,
        attempt: AttemptId,
        outcome: Classification,
    ) {
        self.on_outcome_untidy(now.as_nanos(), request, attempt, outcome);
        self.tidy_timers();
    }

    fn on_outcome_untidy(
        &mut self,
        now: Nanos,
        request: RequestId,
        attempt: AttemptId,
        outcome: Classification,
    ) {
        self.latest = self.latest.max(now);
        let Some(flight) = self
            .requests
            .get(&request)
            .and_then(|r| r.in_flight)
            .filter(|f| f.attempt == attempt)
        else {
            return; // stale report (aborted attempt, cancelled request): already accounted for
        };
        self.settle_attempt_hinted(now, request, flight, outcome.class, outcome.retry_after);
        let class = outcome.class;
        if let Some(r) = self.requests.get_mut(&request) {
            r.last_class = Some(class);
            r.last_hint = outcome.retry_after;
        }
        match class {
            OutcomeClass::Success => {
                if attempt.is_retry() {
                    self.budget.refund(now);
                }
                let cacheable = self
                    .requests
                    .get(&request)
                    .is_some_and(|r| r.meta.cache_key.is_some() && self.config.cache.enabled);
                self.finish(now, request, RequestOutcome::Success);
                self.actions.push_back(Action::Deliver {
                    request,
                    store_in_cache: cacheable,
                });
            }
            c if !(c.is_retryable() || c.fails_over() && self.has_untried_ready(now, request)) => {
                // The caller's fault (or this provider's account's, with nowhere else to go):
                // the provider's answer is the most useful thing to pass on.
                self.finish(now, request, RequestOutcome::CallerError);
                self.actions.push_back(Action::Deliver {
                    request,
                    store_in_cache: false,
                });
            }
            _ if flight.progressed
                && self.requests.get(&request).is_some_and(|r| r.meta.stream) =>
            {
                // Bytes already reached the caller: a stream cannot be retried from here.
                self.finish(now, request, RequestOutcome::Failed);
                self.actions.push_back(Action::Deliver {
                    request,
                    store_in_cache: false,
                });
            }
            _ => self.retry(now, request),
        }
        self.wake_capacity_waiters(now);
    }

    /// The caller gave up: frees what the request held. Nothing more is queued for it.
    pub fn cancel(&mut self, now: Instant, request: RequestId) {
        self.cancel_untidy(now.as_nanos(), request);
        self.tidy_timers();
    }

    fn cancel_untidy(&mut self, now: Nanos, request: RequestId) {
        self.latest = self.latest.max(now);
        let Some(r) = self.requests.get(&request) else {
            return;
        };
        if let Some(f) = r.in_flight {
            self.release_slot(now, f, None, None);
        }
        self.finish(now, request, RequestOutcome::Cancelled);
        self.wake_capacity_waiters(now);
    }

    /// Handles everything due at `now`: backoff waits that ended, first-token deadlines, request
    /// deadlines and the degradation ladder.
    pub fn on_tick(&mut self, now: Instant) {
        self.on_tick_untidy(now.as_nanos());
        self.tidy_timers();
    }

    fn on_tick_untidy(&mut self, now: Nanos) {
        self.latest = self.latest.max(now);
        self.update_ladder(now);
        // Only requests with something due: thousands may be waiting on one tick.
        let mut ids: Vec<RequestId> = Vec::new();
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            ids.push(id);
        }
        crate::sorted_map::sort_by(&mut ids, |a, b| a < b);
        ids.dedup();
        for id in ids {
            let Some(r) = self.requests.get(&id) else {
                continue; // finished: a stale entry
            };
            if r.due_at(self.stall) > now {
                // Its due time moved later since the entry was made.
                self.arm(id);
                continue;
            }
            let (deadline, in_flight, waiting) = (r.deadline, r.in_flight, r.waiting_until);
            if now >= deadline {
                if let Some(f) = in_flight {
                    self.actions.push_back(Action::Abort {
                        request: id,
                        attempt: f.attempt,
                        reason: AbortReason::Deadline,
                    });
                    self.settle_attempt(
                        now,
                        id,
                        f,
                        OutcomeClass::Transport(crate::classify::TransportFault::Timeout),
                    );
                    if f.progressed {
                        // The answer was streaming: what the caller got is what there is.
                        self.finish(now, id, RequestOutcome::DeadlineExceeded);
                        continue;
                    }
                }
                self.give_up(now, id, GiveUp::PastDeadline);
                continue;
            }
            let stream = r.meta.stream;
            match (in_flight, waiting) {
                (Some(f), _)
                    if f.progressed && now >= f.last_progress.saturating_add(self.stall) =>
                {
                    self.actions.push_back(Action::Abort {
                        request: id,
                        attempt: f.attempt,
                        reason: AbortReason::Stalled,
                    });
                    let stall = OutcomeClass::Transport(crate::classify::TransportFault::Stall);
                    self.settle_attempt(now, id, f, stall);
                    if let Some(r) = self.requests.get_mut(&id) {
                        r.last_class = Some(stall);
                        r.last_hint = None;
                    }
                    if stream {
                        // Bytes reached the caller: the stream ends here, cut short.
                        self.finish(now, id, RequestOutcome::Failed);
                    } else {
                        self.retry(now, id);
                    }
                }
                (Some(f), _)
                    if !f.progressed
                        && now >= f.first_token_deadline
                        && self
                            .fastest_answer(now)
                            .is_some_and(|least| now.saturating_add(least) > deadline) =>
                {
                    // No replacement could finish in the time left: this attempt is the
                    // request's last chance, as it would be without us. Keep waiting.
                    if let Some(f) = self
                        .requests
                        .get_mut(&id)
                        .and_then(|r| r.in_flight.as_mut())
                    {
                        f.first_token_deadline = deadline;
                    }
                }
                (Some(f), _) if !f.progressed && now >= f.first_token_deadline => {
                    self.actions.push_back(Action::Abort {
                        request: id,
                        attempt: f.attempt,
                        reason: AbortReason::FirstTokenDeadline,
                    });
                    let stall = OutcomeClass::Transport(crate::classify::TransportFault::Stall);
                    self.settle_attempt(now, id, f, stall);
                    if let Some(r) = self.requests.get_mut(&id) {
                        r.last_class = Some(stall);
                        r.last_hint = None;
                    }
                    self.retry(now, id);
                }
                (None, Some(until)) if now >= until => {
                    let mut budget_wait = false;
                    self.set_waiting(id, false);
                    if let Some(r) = self.requests.get_mut(&id) {
                        r.waiting_until = None;
                        budget_wait = core::mem::take(&mut r.budget_wait);
                    }
                    if budget_wait {
                        self.retry(now, id);
                    } else {
                        self.dispatch(now, id);
                    }
                }
                _ => {}
            }
            self.arm(id);
        }
        self.wake_capacity_waiters(now);
    }

    /// Drops stale entries from the top of `timers`, so that [`Engine::next_wakeup`] is the
    /// instant something is really due: an entry whose request ended goes, one whose request is
    /// now due later is moved there.
    fn tidy_timers(&mut self) {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            match self.requests.get(&id).map(|r| r.due_at(self.stall)) {
                Some(due) if due <= at => break,
                Some(_) => {
                    self.timers.pop();
                    self.arm(id);
                }
                None => {
                    self.timers.pop();
                }
            }
        }
    }

    /// Records when request `id` next has something due (see `timers`).
    fn arm(&mut self, id: RequestId) {
        if let Some(r) = self.requests.get(&id) {
            let at = r.due_at(self.stall);
            self.timers.push(Reverse((at, id)));
        }
    }

    /// Accounts for the end of an attempt: slots, breaker, throttle, health, events.
    fn settle_attempt(&mut self, now: Nanos, id: RequestId, f: InFlight, class: OutcomeClass) {
        self.settle_attempt_hinted(now, id, f, class, None);
    }

    /// [`Engine::settle_attempt`] with the provider's retry hint, which tells a rate limit
    /// (paced by the hint) from a concurrency quota verdict (429 without one).
    fn settle_attempt_hinted(
        &mut self,
        now: Nanos,
        id: RequestId,
        f: InFlight,
        class: OutcomeClass,
        hint: Option<Nanos>,
    ) {
        self.release_slot(now, f, Some(class), hint);
        if let Some(r) = self.requests.get_mut(&id) {
            r.in_flight = None;
        }
        if self
            .health
            .fold(now, true, |e, h| e && h.ok == 0 && h.failed == 0)
        {
            self.health_since = now;
        }
        let h = self.health.current(now);
        if class.is_retryable() {
            h.failed = h.failed.saturating_add(1);
        } else {
            h.ok = h.ok.saturating_add(1);
        }
        self.events.push_back(Event::AttemptFinished {
            provider: ProviderId::new(f.provider),
            class,
            latency: now.saturating_sub(f.sent_at),
        });
    }

    fn release_slot(
        &mut self,
        now: Nanos,
        f: InFlight,
        class: Option<OutcomeClass>,
        hint: Option<Nanos>,
    ) {
        let Some(p) = self.providers.get_mut(f.provider) else {
            return;
        };
        if class == Some(OutcomeClass::Success) {
            p.answered_in.push(now.saturating_sub(f.sent_at));
        }
        let release = match class {
            Some(OutcomeClass::Success) => Release::Success(now.saturating_sub(f.sent_at)),
            // Only a quota verdict shrinks the concurrency limit (see `concurrency`).
            Some(OutcomeClass::RateLimited) if hint.is_none() => Release::Overload,
            _ => Release::Neutral,
        };
        p.limit.release(now, release);
        let pending = p.limit.in_flight();
        match (class, hint) {
            (Some(OutcomeClass::Success), _) => p.consecutive_rate_limits = 0,
            (Some(OutcomeClass::RateLimited), Some(h)) => {
                p.consecutive_rate_limits = p.consecutive_rate_limits.saturating_add(1);
                if p.consecutive_rate_limits >= RATE_LIMIT_COOLDOWN_AFTER {
                    let until = now.saturating_add(h.min(self.backoff.max_hint));
                    p.cooldown_until = p.cooldown_until.max(until);
                }
            }
            _ => {}
        }
        match class {
            Some(c) => {
                p.breaker
                    .on_outcome_of(now, f.sent_at, c.breaker_signal(), pending);
                p.throttle.on_outcome(now, !c.is_overload());
            }
            // A cancelled attempt proves nothing; free its half-open probe slot, if it held one.
            None => p.breaker.on_outcome_of(
                now,
                f.sent_at,
                crate::classify::BreakerSignal::Ignore,
                pending,
            ),
        }
        let gauge = p.breaker.state(now).gauge();
        if gauge != p.last_breaker_gauge {
            p.last_breaker_gauge = gauge;
            self.events.push_back(Event::BreakerChanged {
                provider: ProviderId::new(f.provider),
                state: gauge,
            });
        }
    }

    /// Decides what follows a failed attempt: failover now, a later retry, or giving up.
    fn retry(&mut self, now: Nanos, id: RequestId) {
        let Some(r) = self.requests.get(&id) else {
            return;
        };
        let next_attempt = r.attempts + 1;
        let hint = r.last_hint;
        if next_attempt > self.backoff.max_attempts {
            self.give_up(now, id, GiveUp::AttemptsExhausted);
            return;
        }
        if !self.budget.try_withdraw(now) {
            // The budget bounds attempts, not patience: wait (no load on anyone) and ask the
            // budget again, until the deadline. Failing here turned the first seconds of an
            // outage, before the breaker opened, into hundreds of failed requests that the
            // provider's recovery a few seconds later would have answered (the simulator's
            // herd scenario).
            self.events.push_back(Event::BudgetExhausted);
            if let Some(r) = self.requests.get_mut(&id) {
                r.budget_wait = true;
            }
            self.wait_backoff(now, id, next_attempt, hint);
            return;
        }
        // Another provider that this request has not tried, usable now: fail over at once.
        // A provider's hint and a backoff apply to the provider that was busy, not to others.
        if self.has_untried_ready(now, id) {
            self.dispatch(now, id);
            return;
        }
        self.wait_backoff(now, id, next_attempt, hint);
    }

    /// Schedules attempt `next_attempt` after a backoff (honouring `hint`), or gives up.
    fn wait_backoff(&mut self, now: Nanos, id: RequestId, next_attempt: u32, hint: Option<Nanos>) {
        let Some(r) = self.requests.get(&id) else {
            return;
        };
        let schedule = self.backoff.schedule(
            now,
            r.deadline,
            next_attempt,
            r.previous_delay,
            hint,
            &mut self.rng,
        );
        match schedule {
            Schedule::RetryAt { at, delay } => {
                if let Some(r) = self.requests.get_mut(&id) {
                    r.waiting_until = Some(at);
                    r.previous_delay = delay;
                }
                self.arm(id);
            }
            Schedule::GiveUp(why) => self.give_up(now, id, why),
        }
    }

    /// Sends the request's next attempt, or queues it for capacity, or gives up.
    fn dispatch(&mut self, now: Nanos, id: RequestId) {
        // Each pass either sends, waits, gives up, or marks one more provider as tried, so
        // providers + 1 passes always suffice.
        for _ in 0..=self.providers.len() {
            let Some((tried, deadline, retry, paced_as_retry)) = self.requests.get(&id).map(|r| {
                let retry = r.attempts > 0;
                (r.tried, r.deadline, retry, retry || r.held_by_breaker)
            }) else {
                return;
            };
            // Hosts may call late; an attempt never starts at or past the deadline, nor with
            // less time left than any provider has been seen to answer in.
            let cannot_finish = self
                .fastest_answer(now)
                .is_some_and(|least| now.saturating_add(least) > deadline);
            if now >= deadline || cannot_finish {
                return self.give_up(now, id, GiveUp::PastDeadline);
            }
            let candidates = self.candidates(now, paced_as_retry);
            let index = match choose(&candidates, tried, &mut self.rng) {
                Choice::Provider(index) => index,
                Choice::WaitForCapacity => return self.wait_for_capacity(now, id),
                Choice::NoneAvailable => return self.wait_for_probe(now, id),
            };
            let throttle_enabled = self.config.throttle.enabled;
            let Some(p) = self.providers.get_mut(index) else {
                return;
            };
            // Throttling sheds retries only: a request's first attempt is what a caller without
            // us would send, and holding it back could only answer less.
            if throttle_enabled && retry && p.throttle.should_reject(now, &mut self.rng) {
                self.events.push_back(Event::Throttled {
                    provider: ProviderId::new(index),
                });
                let Some(r) = self.requests.get_mut(&id) else {
                    return;
                };
                if tried.contains(index) {
                    // Nothing untried is left and this one is throttled: back off.
                    r.last_class = Some(OutcomeClass::Busy);
                    return self.retry_later(now, id);
                }
                r.tried.insert(index);
                continue;
            }
            if !p.breaker.try_acquire(now) {
                return self.wait_for_capacity(now, id);
            }
            let room = p.limit.has_room(now);
            let recovery_room = p.recovery_room(now);
            let admitted = self
                .config
                .providers
                .get(index)
                .is_some_and(|cfg| paced(cfg, paced_as_retry, room, recovery_room));
            if !admitted {
                p.breaker
                    .on_outcome(now, crate::classify::BreakerSignal::Ignore);
                return self.wait_for_capacity(now, id);
            }
            p.limit.acquire();
            return self.send(now, id, index);
        }
        self.retry_later(now, id);
    }

    /// Backs off before trying again when no attempt could even be sent (every provider
    /// throttled locally): no server hint applies.
    fn retry_later(&mut self, now: Nanos, id: RequestId) {
        let Some(next) = self.requests.get(&id).map(|r| (r.attempts + 1).max(2)) else {
            return;
        };
        self.wait_backoff(now, id, next, None);
    }

    /// Every provider's breaker is open: wait for the earliest to let a probe through if that
    /// happens before the request's wait limit (a short outage costs latency, not the request),
    /// or fail fast with Retry-After now (waiting would only hang the caller).
    fn wait_for_probe(&mut self, now: Nanos, id: RequestId) {
        let queue_timeout = ms(self.config.concurrency.queue_timeout_ms);
        let Some(limit) = self.requests.get(&id).map(|r| {
            r.capacity_wait_since
                .unwrap_or(now)
                .saturating_add(queue_timeout)
                .min(r.deadline)
        }) else {
            return;
        };
        if self.probing(now) || self.earliest_probe(now).is_some_and(|at| at < limit) {
            if let Some(r) = self.requests.get_mut(&id) {
                r.held_by_breaker = true;
            }
            self.wait_for_capacity(now, id)
        } else {
            self.give_up(now, id, GiveUp::AttemptsExhausted)
        }
    }

    /// Whether a half-open breaker would let a probe through now.
    fn probe_slot_free(&self, now: Nanos) -> bool {
        self.providers.iter().any(|p| {
            matches!(p.breaker.state(now), BreakerState::HalfOpen { .. })
                && p.breaker.would_allow(now)
        })
    }

    /// The least time any usable provider has been seen to take for an answer, once known:
    /// with less time left, no attempt can finish.
    fn fastest_answer(&self, now: Nanos) -> Option<Nanos> {
        self.providers
            .iter()
            .filter(|p| p.breaker.would_allow(now) && now >= p.paused_until)
            .map(|p| p.answered_in.fastest())
            .try_fold(Nanos::MAX, |least, f| f.map(|f| least.min(f)))
            .filter(|least| *least < Nanos::MAX)
    }

    /// How long a slow answer (the slowest of the recent ones) takes at the usable provider
    /// where that is least, once known: a request with less time left may not be answered.
    fn slow_answer(&self, now: Nanos) -> Option<Nanos> {
        self.providers
            .iter()
            .filter(|p| p.breaker.would_allow(now) && now >= p.paused_until)
            .filter_map(|p| p.answered_in.slowest())
            .min()
    }

    /// Whether a half-open breaker's probe is in flight: its outcome will wake the waiters.
    fn probing(&self, now: Nanos) -> bool {
        self.providers
            .iter()
            .any(|p| matches!(p.breaker.state(now), BreakerState::HalfOpen { .. }))
    }

    /// Whether a provider can take an attempt now, or will before the request's wait limit.
    /// Tier 3 fails fast only when neither is true: the simulator's thundering-herd scenario
    /// showed failing everything for the ladder's dwell time after a provider recovered costing
    /// more answers than the baselines lost.
    fn help_in_time(&self, now: Nanos, id: RequestId) -> bool {
        let Some(r) = self.requests.get(&id) else {
            return false;
        };
        let usable_now = self
            .candidates(now, false)
            .iter()
            .any(|c| c.breaker_allows && c.weight > 0);
        let limit = now
            .saturating_add(ms(self.config.concurrency.queue_timeout_ms))
            .min(r.deadline);
        usable_now || self.probing(now) || self.earliest_probe(now).is_some_and(|at| at < limit)
    }

    /// When the first provider that is unavailable now (breaker open, or cooling down after
    /// rate limits) will take attempts again.
    fn earliest_probe(&self, now: Nanos) -> Option<Nanos> {
        self.providers
            .iter()
            .filter_map(|p| {
                // An open breaker half-opens, a half-open one with its probes in flight
                // allows more (see `breaker`).
                let open = if p.breaker.would_allow(now) {
                    // A recovery ramp allows more retries at its next step.
                    p.breaker
                        .retry_cap(now)
                        .and_then(|_| p.breaker.next_change(now))
                        .unwrap_or(now)
                } else {
                    p.breaker.next_change(now).unwrap_or(now)
                };
                // A learned limit being forgotten has room for more at its next step.
                let at = match p.limit.next_growth(now) {
                    Some(growth) if !p.limit.has_room(now) => open.max(growth),
                    _ => open,
                }
                .max(p.paused_until);
                (at > now).then_some(at)
            })
            .min()
    }

    fn wait_for_capacity(&mut self, now: Nanos, id: RequestId) {
        let queue_timeout = ms(self.config.concurrency.queue_timeout_ms);
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        // The wait is measured from when it starts: a request that already spent 15 s on a
        // stalled attempt still deserves its turn for a slot (the deadline bounds it anyway).
        let since = *r.capacity_wait_since.get_or_insert(now);
        let limit = since.saturating_add(queue_timeout).min(r.deadline);
        if now >= limit {
            self.give_up(now, id, GiveUp::PastDeadline);
            return;
        }
        r.waiting_until = Some(limit);
        self.set_waiting(id, true);
        self.arm(id);
    }

    /// Marks request `id` as waiting for a slot or a probe, or not, keeping `waiters` in step.
    fn set_waiting(&mut self, id: RequestId, waiting: bool) {
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        let key = (r.deadline, id);
        let retry = r.attempts > 0;
        if core::mem::replace(&mut r.waiting_for_capacity, waiting) == waiting {
            return;
        }
        if waiting {
            self.waiters.insert(key, retry);
        } else {
            self.waiters.remove(&key);
        }
    }

    /// Re-dispatches requests waiting for a slot (or for a breaker's probe) while slots are
    /// free: earliest deadline first while the queue moves, and the request with the most time
    /// left first (adaptive LIFO, as in Facebook's "Fail at Scale") once it stands, or when the
    /// slot is a half-open breaker's probe.
    ///
    /// Earliest deadline first serves every request that can still finish while waits are
    /// short: in a closed loop of 60 callers against a quota of 20, most-time-left first
    /// starved the oldest until their deadlines while FIFO answered every request after a few
    /// seconds' wait. But once the queue stands (its oldest request has waited more than half
    /// its time), FIFO serves only requests with too little time left: 86 requests a second
    /// against a quota of 85 slots answered 7% where one plain attempt answered 27%. Then the
    /// newest go first, and those still have the time to be answered. The probe always goes to
    /// the request with the most time left: given to the oldest waiter, whose deadline was
    /// milliseconds away, it was cancelled before any answer came, the breaker never learned
    /// that the provider was back, and the next oldest got the probe, forever (the simulator,
    /// after a 20 s outage).
    fn wake_capacity_waiters(&mut self, now: Nanos) {
        if !self.any_room(now, false) {
            return;
        }
        let Some(&((earliest, head), _)) = self.waiters.iter().next() else {
            return;
        };
        // The queue stands when the request first in line (earliest deadline) has waited more
        // than half its time. Serving the earliest deadline first also only helps while it is
        // sure to be answered in time: a slot given to a request that then runs out of time is
        // a slot a fresh request would have used (a quota of 198 slots met with answers slower
        // than most deadlines: earliest deadline first answered fewer than one plain attempt).
        let mut standing = self.requests.get(&head).is_some_and(|r| {
            let waited = now.saturating_sub(r.capacity_wait_since.unwrap_or(now));
            waited > r.deadline.saturating_sub(r.admitted_at) / 2
        });
        let slow = self.slow_answer(now);
        standing |= slow.is_some_and(|t| earliest.saturating_sub(now) < t);
        let latest_first = standing || self.probe_slot_free(now);
        let mut waiting: Vec<(Nanos, RequestId, bool)> = self
            .waiters
            .iter()
            .map(|&((deadline, id), retry)| (deadline, id, retry))
            .collect();
        if latest_first {
            waiting.reverse();
        }
        // In that order, while there is room. Retries need room a learned limit leaves them.
        // A waiter can find no room it can use (its untried provider is the full one) and wait
        // again; after a few in a row nothing more can be served now. Without that bound,
        // thousands of waiters were re-dispatched on every event (42 s for one simulated
        // minute).
        let mut waited_again = 0;
        let mut room_for_retries = self.any_room(now, true);
        for (_, id, retry) in waiting {
            if retry && !room_for_retries {
                continue;
            }
            if !retry && !self.any_room(now, false) {
                return;
            }
            self.set_waiting(id, false);
            if let Some(r) = self.requests.get_mut(&id) {
                r.waiting_until = None;
            }
            self.dispatch(now, id);
            let again = self
                .requests
                .get(&id)
                .is_some_and(|r| r.waiting_for_capacity);
            waited_again = if again { waited_again + 1 } else { 0 };
            if waited_again >= REWAITS_BEFORE_STOPPING {
                return;
            }
            room_for_retries = self.any_room(now, true);
        }
    }

    /// Whether some provider could take an attempt now (a retry, with `retry`).
    fn any_room(&self, now: Nanos, retry: bool) -> bool {
        self.candidates(now, retry)
            .iter()
            .any(|c| c.breaker_allows && c.has_room && c.weight > 0)
    }

    fn has_untried_ready(&self, now: Nanos, id: RequestId) -> bool {
        let Some(r) = self.requests.get(&id) else {
            return false;
        };
        self.candidates(now, true)
            .iter()
            .enumerate()
            .any(|(i, c)| !r.tried.contains(i) && c.breaker_allows && c.has_room && c.weight > 0)
    }

    /// Every provider as [`choose`] sees it for an attempt; `retry` for a request that already
    /// made one (a provider's own request to pause holds back retries only).
    fn candidates(&self, now: Nanos, retry: bool) -> Vec<Candidate> {
        let mut candidates: Vec<Candidate> = self
            .config
            .providers
            .iter()
            .zip(&self.providers)
            .map(|(cfg, p)| Candidate {
                priority: if retry && now < p.cooldown_until {
                    cfg.priority.saturating_add(COOLDOWN_PRIORITY_PENALTY)
                } else {
                    cfg.priority
                },
                weight: cfg.weight,
                outstanding: p.limit.in_flight(),
                breaker_allows: p.breaker.would_allow(now) && now >= p.paused_until,
                has_room: paced(cfg, retry, p.limit.has_room(now), p.recovery_room(now))
                    && cfg.max_concurrency.is_none_or(|quota| {
                        p.limit.in_flight().saturating_add(p.external_in_flight) < quota
                    }),
            })
            .collect();
        // A provider its health checks marked down is passed over while another is usable.
        if !self.providers.iter().any(|p| p.health_down) {
            return candidates;
        }
        let usable_up = |skip: usize| {
            candidates
                .iter()
                .zip(&self.providers)
                .enumerate()
                .any(|(j, (c, p))| j != skip && !p.health_down && c.breaker_allows && c.weight > 0)
        };
        let avoided: Vec<bool> = (0..candidates.len())
            .map(|i| {
                let down = self.providers.get(i).is_some_and(|p| p.health_down);
                crate::health::avoid(down, down && usable_up(i))
            })
            .collect();
        for (c, avoid) in candidates.iter_mut().zip(avoided) {
            if avoid {
                c.breaker_allows = false;
            }
        }
        candidates
    }

    fn send(&mut self, now: Nanos, id: RequestId, provider: usize) {
        // (The slot for this attempt was taken in `dispatch`.)
        let degrade = self.degrades_features();
        let Some(r) = self.requests.get_mut(&id) else {
            return;
        };
        r.attempts += 1;
        r.tried.insert(provider);
        r.capacity_wait_since = None;
        let configured = ms(if r.meta.stream {
            self.config.deadlines.first_token_ms
        } else {
            self.config.deadlines.response_ms
        });
        let first_byte_within = self
            .providers
            .get(provider)
            .and_then(|p| p.first_byte_in.get(usize::from(r.meta.stream)))
            .map_or(configured, |recent| {
                learned_first_byte_wait(configured, recent)
            });
        let first_token_deadline = now.saturating_add(first_byte_within).min(r.deadline);
        r.last_provider = Some(provider);
        // `attempts` was just counted up from 0, so it is never 0 here.
        let attempt = AttemptId::new(r.attempts).unwrap_or(AttemptId::FIRST);
        r.in_flight = Some(InFlight {
            attempt,
            provider,
            sent_at: now,
            first_token_deadline,
            progressed: false,
            last_progress: now,
        });
        let deadline = r.deadline;
        let model = r.meta.model.clone();
        self.arm(id);
        let provider = ProviderId::new(provider);
        let rewrite = self.rewrite(provider, &model, degrade);
        self.actions.push_back(Action::Send(SendAttempt {
            request: id,
            attempt,
            provider,
            first_token_deadline: Instant::from_nanos(first_token_deadline),
            deadline: Instant::from_nanos(deadline),
            rewrite,
        }));
    }

    /// What an attempt for a request asking for `model` changes when it goes to `provider`:
    /// its cluster or base URL, its credentials, its model name (a degraded fallback first when
    /// `degraded`, then the provider's mapping) and, degraded, the `max_tokens` cap. Hosts that
    /// learn an attempt reached another provider than the one chosen use it too.
    pub fn rewrite(&self, provider: ProviderId, model: &str, degraded: bool) -> Rewrite {
        let cfg = &self.config;
        let mut model = String::from(model);
        let mut mapped = false;
        if degraded {
            if let Some(cheaper) = cfg.degradation.model_fallbacks.get(&model) {
                model = cheaper.clone();
                mapped = true;
            }
        }
        let target = cfg.providers.get(provider.index());
        if let Some(provider_model) = target.and_then(|p| p.models.get(&model)) {
            model = provider_model.clone();
            mapped = true;
        }
        let cap = cfg.degradation.max_tokens_cap;
        Rewrite {
            cluster: target.and_then(|p| p.cluster.clone()),
            base_url: target.and_then(|p| p.base_url.clone()),
            authorization: target
                .and_then(|p| p.api_key.as_deref())
                .map(|key| crate::text::concat(&["Bearer ", key])),
            model: mapped.then_some(model),
            max_tokens_cap: (degraded && cap > 0).then_some(cap),
        }
    }

    /// Whether the degradation ladder cuts features now (tier 1 and above, when enabled).
    pub fn degrades_features(&self) -> bool {
        self.config.degradation.enabled && self.ladder.tier().degrades_features()
    }

    fn give_up(&mut self, now: Nanos, id: RequestId, why: GiveUp) {
        let Some(r) = self.requests.get(&id) else {
            return;
        };
        if r.meta.cached == CacheLookup::Stale {
            self.finish_cache(now, id, true);
            return;
        }
        let (kind, outcome) = match (why, r.last_class) {
            (GiveUp::PastDeadline, _) if now >= r.deadline => (
                ReplyKind::DeadlineExceeded,
                RequestOutcome::DeadlineExceeded,
            ),
            (_, Some(OutcomeClass::RateLimited)) => {
                (ReplyKind::RateLimited, RequestOutcome::Failed)
            }
            _ => (ReplyKind::Overloaded, RequestOutcome::Failed),
        };
        let hint = match why {
            GiveUp::HintTooLong(h) => Some(h),
            _ => r.last_hint.or(Some(self.suggested_wait(now))),
        };
        let message = match (why, r.last_class) {
            (GiveUp::PastDeadline, _) => String::from("no provider answered before the deadline"),
            (_, Some(class)) => gave_up_after(r.attempts, class),
            (_, None) => String::from("every provider is unavailable"),
        };
        let reply = local_reply(kind, &message, hint);
        self.finish(now, id, outcome);
        self.actions.push_back(Action::Reply { request: id, reply });
    }

    /// How long a caller should wait when every provider is unavailable: until the earliest
    /// open breaker may probe again, at least a second.
    fn suggested_wait(&self, now: Nanos) -> Nanos {
        self.providers
            .iter()
            .filter_map(|p| match p.breaker.state(now) {
                BreakerState::Open { until } => Some(until.saturating_sub(now)),
                _ => None,
            })
            .min()
            .unwrap_or(SECOND)
            .max(SECOND)
    }

    fn fail(
        &mut self,
        now: Nanos,
        id: RequestId,
        kind: ReplyKind,
        wait: Option<Nanos>,
        message: &str,
    ) {
        let outcome = match kind {
            ReplyKind::RateLimited => RequestOutcome::RateLimited,
            ReplyKind::Shed => RequestOutcome::Shed,
            ReplyKind::DeadlineExceeded => RequestOutcome::DeadlineExceeded,
            _ => RequestOutcome::Failed,
        };
        let reply = local_reply(kind, message, wait);
        self.finish(now, id, outcome);
        self.actions.push_back(Action::Reply { request: id, reply });
    }

    fn finish_cache(&mut self, now: Nanos, id: RequestId, stale: bool) {
        let outcome = if stale {
            RequestOutcome::Stale
        } else {
            RequestOutcome::Cached
        };
        self.finish(now, id, outcome);
        self.actions
            .push_back(Action::ServeCache { request: id, stale });
    }

    fn finish(&mut self, now: Nanos, id: RequestId, outcome: RequestOutcome) {
        self.set_waiting(id, false);
        if let Some(r) = self.requests.remove(&id) {
            let first_chunk = r
                .first_progress_at
                .filter(|_| r.meta.stream)
                .map(|t| t.saturating_sub(r.admitted_at));
            self.events.push_back(Event::RequestFinished {
                outcome,
                attempts: r.attempts,
                latency: now.saturating_sub(r.admitted_at),
                request: id,
                provider: r.last_provider.map(ProviderId::new),
                model: self.model_labels.label(&r.meta.model).into(),
                first_chunk,
            });
        }
    }

    fn update_ladder(&mut self, now: Nanos) {
        if now < self.next_ladder_at {
            return;
        }
        self.next_ladder_at = now.saturating_add(LADDER_PERIOD);
        let (ok, failed, slow) = self.health.fold(now, (0u64, 0u64, 0u64), |(o, f, s), h| {
            (
                o + u64::from(h.ok),
                f + u64::from(h.failed),
                s + u64::from(h.slow),
            )
        });
        let latency_anomalous = slow >= SLOW_MIN && slow as f64 >= SLOW_SHARE * ok.max(1) as f64;
        // Too few outcomes say nothing about health, and neither do the first seconds of
        // traffic: busy answers return in 100 ms, successes take seconds, so early outcomes
        // are nearly all failures (as in the breaker).
        let spans_enough = now.saturating_sub(self.health_since) >= 5 * SECOND;
        let error_rate = if ok + failed >= 10 && spans_enough {
            failed as f64 / (ok + failed) as f64
        } else {
            0.0
        };
        let open = self
            .providers
            .iter()
            .filter(|p| matches!(p.breaker.state(now), BreakerState::Open { .. }))
            .count();
        let open_share = open as f64 / self.providers.len().max(1) as f64;
        let before = self.ladder.tier();
        let after = self
            .ladder
            .update(now, pressure(error_rate, open_share, latency_anomalous));
        if before != after {
            self.events.push_back(Event::TierChanged { tier: after });
        }
    }
}
