//! The configuration schema, its defaults and its validation.
//!
//! One schema serves every host: the Envoy filter reads it from its plugin configuration, the
//! npm package from `createFetch(config)`, the simulator from the command line. It is JSON with
//! a documented default for every field, so `{"providers":[...]}` is a complete configuration.
//! Unknown fields are refused (a typo must not silently become a default), and so are values of
//! the wrong type, each named by its path. Durations are whole milliseconds in fields ending in
//! `_ms`. It is read with [`crate::json`] rather than serde, which made up the largest part of
//! both wasm builds.
//!
//! Validation never panics and names the field that is wrong, the way an operator would look
//! for it: `providers[1].weight must be > 0`. All problems are reported at once, so a bad
//! configuration is fixed in one round.

use crate::backoff::{Backoff, Jitter};
use crate::breaker::BreakerSettings;
use crate::bucket::Rate;
use crate::budget::BudgetSettings;
use crate::concurrency::ConcurrencySettings;
use crate::degrade::{LadderSettings, Thresholds};
use crate::json::{self, Value};
use crate::sorted_map::SortedMap;
use crate::throttle::ThrottleSettings;
use crate::time::{ms, Nanos};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Config {
    /// The providers, in order of preference (see [`ProviderConfig::priority`]). At least one.
    pub providers: Vec<ProviderConfig>,
    /// Retries and backoff.
    pub retry: RetryConfig,
    /// The retry budget.
    pub budget: BudgetConfig,
    /// Token-bucket limits, global and per tenant.
    pub limits: LimitsConfig,
    /// The adaptive concurrency limit per provider.
    pub concurrency: ConcurrencyConfig,
    /// Adaptive client-side throttling per provider.
    pub throttle: ThrottleConfig,
    /// The circuit breaker per provider.
    pub breaker: BreakerConfig,
    /// Deadlines for a request and its attempts.
    pub deadlines: DeadlinesConfig,
    /// The response cache.
    pub cache: CacheConfig,
    /// The degradation ladder.
    pub degradation: DegradationConfig,
    /// How a request's tenant is identified.
    pub tenancy: TenancyConfig,
    /// What happens to requests for endpoints unbusy does not know.
    pub endpoints: EndpointsConfig,
    /// The fleet store (`unbusy-store`): the L2 cache shared by every proxy (Envoy filter).
    pub store: StoreConfig,
    /// Active health checks of every provider (see [`crate::health`]).
    pub health_check: HealthCheckConfig,
}

/// One upstream LLM provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    /// A unique name, used in metrics, logs and the `x-unbusy` header. Required.
    pub name: String,
    /// The provider's base URL, e.g. `https://api.deepseek.com` (JS package, `unbusy up`).
    /// One of `base_url` or `cluster` is required.
    pub base_url: Option<String>,
    /// The Envoy cluster that reaches the provider (Envoy filter).
    pub cluster: Option<String>,
    /// An Envoy aggregate cluster that starts with this provider's cluster and goes on with the
    /// other providers' in preference order (Envoy filter with its upstream instance). With it,
    /// an attempt that starts here fails over to the next provider as one of the router's own
    /// retries, so the next answer streams. Default: none (later attempts are dispatched by the
    /// filter and arrive whole).
    pub failover_cluster: Option<String>,
    /// The API key to send to this provider, replacing the caller's. Never logged. Default:
    /// none, the caller's `Authorization` is passed through. At most one of `api_key` and
    /// `api_key_env`.
    pub api_key: Option<String>,
    /// The name of an environment variable that holds the API key, read by the host when it
    /// loads the configuration (the Envoy filter: from the variables Envoy exposes to the VM
    /// through `vm_config.environment_variables`), so the key is in no configuration file and
    /// not in Envoy's `/config_dump`. Default: none.
    pub api_key_env: Option<String>,
    /// Model name mapping for this provider: the caller's model name to the provider's.
    /// Default: empty, names pass through.
    pub models: SortedMap<String, String>,
    /// Share of load within its priority tier. Default 1; must be > 0.
    pub weight: u32,
    /// Lower is preferred; a tier is used when every provider of better tiers is unusable.
    /// Default 0.
    pub priority: u32,
    /// The provider's concurrency quota (requests in flight) if known: caps the adaptive limit.
    /// Default: none, learned adaptively up to `concurrency.max`.
    pub max_concurrency: Option<u32>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            base_url: None,
            cluster: None,
            failover_cluster: None,
            api_key: None,
            api_key_env: None,
            models: SortedMap::new(),
            weight: 1,
            priority: 0,
            max_concurrency: None,
        }
    }
}

/// Retries and backoff. See [`crate::backoff`].
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Attempts per request, the first included. Default 8; 1 disables retries; at most 16.
    pub max_attempts: u32,
    /// The first retry's delay before jitter. Default 250.
    pub base_ms: u64,
    /// The longest delay. Default 8000.
    pub cap_ms: u64,
    /// `full`, `equal`, `decorrelated` or `none`. Default `full`.
    pub jitter: Jitter,
    /// The longest server hint (`Retry-After` and friends) honoured; a longer one makes the
    /// engine fail over or fail fast instead of waiting. Default 60000.
    pub max_hint_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let b = Backoff::DEFAULT;
        Self {
            max_attempts: b.max_attempts,
            base_ms: b.base / ms(1),
            cap_ms: b.cap / ms(1),
            jitter: b.jitter,
            max_hint_ms: b.max_hint / ms(1),
        }
    }
}

impl RetryConfig {
    /// The backoff policy.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: ms(self.base_ms),
            cap: ms(self.cap_ms),
            max_attempts: self.max_attempts,
            jitter: self.jitter,
            max_hint: ms(self.max_hint_ms),
        }
    }
}

/// The retry budget. See [`crate::budget`].
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetConfig {
    /// How long first attempts and retries count. Default 10000.
    pub window_ms: u64,
    /// Retries allowed as a fraction of first attempts. Default 1; between 0 and 10.
    pub ratio: f64,
    /// Retries per second always allowed. Default 1.
    pub min_per_second: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        let d = BudgetSettings::default();
        Self {
            window_ms: d.window / ms(1),
            ratio: f64::from(d.ratio_permille) / 1000.0,
            min_per_second: d.min_per_second,
        }
    }
}

impl BudgetConfig {
    /// The budget's settings.
    pub fn settings(&self) -> BudgetSettings {
        BudgetSettings {
            window: ms(self.window_ms),
            ratio_permille: libm::round(self.ratio * 1000.0) as u32,
            min_per_second: self.min_per_second,
        }
    }
}

/// A rate limit on requests and/or LLM tokens. See [`crate::bucket`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RateConfig {
    /// Requests per minute. Default: unlimited.
    pub requests_per_minute: Option<u64>,
    /// Estimated LLM tokens (prompt + `max_tokens`) per minute. Default: unlimited.
    pub tokens_per_minute: Option<u64>,
    /// Requests accepted at once from a full bucket. Default: `requests_per_minute`.
    pub burst_requests: Option<u64>,
    /// Tokens accepted at once from a full bucket. Default: `tokens_per_minute`.
    pub burst_tokens: Option<u64>,
}

impl RateConfig {
    /// The request rate, if limited.
    pub fn request_rate(&self) -> Option<Rate> {
        self.requests_per_minute
            .map(|r| Rate::per_minute(r).with_burst(self.burst_requests.unwrap_or(r)))
    }

    /// The token rate, if limited.
    pub fn token_rate(&self) -> Option<Rate> {
        self.tokens_per_minute
            .map(|r| Rate::per_minute(r).with_burst(self.burst_tokens.unwrap_or(r)))
    }
}

/// Token-bucket limits.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Across all tenants. Default: unlimited.
    pub global: RateConfig,
    /// Per tenant. Default: unlimited.
    pub per_tenant: RateConfig,
    /// Tenants tracked at once (fixed memory). Default 4096; at least 8.
    pub tenant_slots: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            global: RateConfig::default(),
            per_tenant: RateConfig::default(),
            tenant_slots: 4096,
        }
    }
}

/// The adaptive concurrency limit. See [`crate::concurrency`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyConfig {
    /// The lowest limit. Default 1.
    pub min: u32,
    /// The highest learned limit (a provider's `max_concurrency` caps it further). Default
    /// 100000.
    pub max: u32,
    /// Multiplier on overload, in (0, 1). Default 0.75.
    pub backoff_ratio: f64,
    /// The least time between two decreases. Default 500.
    pub decrease_cooldown_ms: u64,
    /// A success slower than this multiple of the average counts as mild overload; 0 disables.
    /// Default 0 (off: LLM latency follows answer length).
    pub latency_tolerance: f64,
    /// How long a request may wait for a free slot, or for a provider whose breaker is open
    /// (or which asked for a pause) to take attempts again, before it is refused (or served
    /// stale). Default 60000, the default deadline: by default only the request's deadline
    /// limits waiting, since callers that allow a minute are better served by waiting out a
    /// 30-second outage than by an immediate 503. Lower it to fail fast sooner.
    pub queue_timeout_ms: u64,
}

impl Default for ConcurrencyConfig {
    fn default() -> Self {
        let d = ConcurrencySettings::default();
        Self {
            min: d.min as u32,
            max: d.max as u32,
            backoff_ratio: d.backoff_ratio,
            decrease_cooldown_ms: d.decrease_cooldown / ms(1),
            latency_tolerance: d.latency_tolerance,
            queue_timeout_ms: 60_000,
        }
    }
}

impl ConcurrencyConfig {
    /// The limiter settings for a provider with the given quota.
    pub fn settings(&self, provider_quota: Option<u32>) -> ConcurrencySettings {
        let max = provider_quota.map_or(self.max, |q| q.min(self.max)).max(1);
        ConcurrencySettings {
            bound: provider_quota.is_some(),
            initial: f64::from(max),
            min: f64::from(self.min.min(max)),
            max: f64::from(max),
            backoff_ratio: self.backoff_ratio,
            decrease_cooldown: ms(self.decrease_cooldown_ms),
            latency_tolerance: self.latency_tolerance,
        }
    }
}

/// Adaptive throttling. See [`crate::throttle`].
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleConfig {
    /// Default true.
    pub enabled: bool,
    /// How long outcomes count. Default 20000.
    pub window_ms: u64,
    /// The multiplier K, at least 1. Default 2.
    pub k: f64,
    /// The highest rejection probability, in [0, 1). Default 0.9.
    pub max_reject: f64,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        let d = ThrottleSettings::default();
        Self {
            enabled: true,
            window_ms: d.window / ms(1),
            k: d.k,
            max_reject: d.max_reject,
        }
    }
}

impl ThrottleConfig {
    /// The throttle's settings.
    pub fn settings(&self) -> ThrottleSettings {
        ThrottleSettings {
            window: ms(self.window_ms),
            k: self.k,
            max_reject: self.max_reject,
        }
    }
}

/// The circuit breaker. See [`crate::breaker`].
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// How long outcomes count. Default 10000.
    pub window_ms: u64,
    /// Outcomes needed before the success rate is judged. Default 10.
    pub min_volume: u32,
    /// Open below this success rate, in [0, 1]. Default 0.05 (an outage, not a brownout).
    pub min_success_rate: f64,
    /// Open after this many failures in a row with no success in the last tenth of the
    /// window; 0 disables. Default 10.
    pub consecutive_failures: u32,
    /// The first open period. Default 500.
    pub open_ms: u64,
    /// The longest open period, at least `open_ms`. Default 1000.
    pub max_open_ms: u64,
    /// Probes in flight when half-open, at least 1. Default 1.
    pub half_open_probes: u32,
    /// Successful probes that close the breaker, at least 1. Default 1.
    pub probe_successes: u32,
    /// The probes allowed in flight double every quarter of `open_ms` while none fails.
    /// Default true.
    pub probe_ramp: bool,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        let d = BreakerSettings::default();
        Self {
            window_ms: d.window / ms(1),
            min_volume: d.min_volume,
            min_success_rate: d.min_success_rate,
            consecutive_failures: d.consecutive_failures,
            open_ms: d.open_for / ms(1),
            max_open_ms: d.max_open_for / ms(1),
            half_open_probes: d.half_open_probes,
            probe_successes: d.probe_successes,
            probe_ramp: d.probe_ramp,
        }
    }
}

impl BreakerConfig {
    /// The breaker's settings.
    pub fn settings(&self) -> BreakerSettings {
        BreakerSettings {
            window: ms(self.window_ms),
            min_volume: self.min_volume,
            min_success_rate: self.min_success_rate,
            consecutive_failures: self.consecutive_failures,
            open_for: ms(self.open_ms),
            max_open_for: ms(self.max_open_ms),
            half_open_probes: self.half_open_probes,
            probe_successes: self.probe_successes,
            probe_ramp: self.probe_ramp,
        }
    }
}

/// Deadlines.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadlinesConfig {
    /// The whole request, retries and waits included; a caller's own deadline (a header or an
    /// `AbortSignal`) may shorten it. Default 60000.
    pub total_ms: u64,
    /// Per attempt: real progress (the first SSE `data:` event, the first JSON byte) must start
    /// within this, keep-alive bytes do not count. Default 15000.
    pub first_token_ms: u64,
    /// Per non-streaming attempt: the answer (its first real byte) must arrive within this;
    /// keep-alive blank lines do not count. Default 25000: long enough for about a thousand
    /// tokens of output, short enough that two keep-alive stalls still leave time for a third
    /// attempt inside a one-minute deadline (the simulator's brownout: 99.83% answered at 30 s,
    /// 99.96% at 25 s). Raise it, or stream, for longer non-streaming generations.
    pub response_ms: u64,
    /// Per attempt: once started, real progress may pause at most this long. Default 30000.
    pub stall_ms: u64,
}

impl Default for DeadlinesConfig {
    fn default() -> Self {
        Self {
            total_ms: 60_000,
            first_token_ms: 15_000,
            response_ms: 25_000,
            stall_ms: 30_000,
        }
    }
}

impl DeadlinesConfig {
    /// The whole request's deadline as a duration.
    pub fn total(&self) -> Nanos {
        ms(self.total_ms)
    }
}

/// The response cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Default true. Only cacheable requests are cached (see [`crate::cache_key`]).
    pub enabled: bool,
    /// How long an answer is fresh. Default 300000 (5 minutes).
    pub ttl_ms: u64,
    /// How long past freshness an answer may still be served when degraded (tier 2+).
    /// Default 3600000 (1 hour).
    pub stale_ttl_ms: u64,
    /// The in-process cache's size bound. Default 67108864 (64 MiB).
    pub max_bytes: u64,
    /// Larger answers are not cached. Default 1048576 (1 MiB); at most `max_bytes`.
    pub max_entry_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_ms: 300_000,
            stale_ttl_ms: 3_600_000,
            max_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
        }
    }
}

/// Active health checks: a cheap authenticated request to every provider on an interval, so a
/// provider that went down while idle is skipped by the next request (see [`crate::health`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// Default false: every probe is a request to the provider's account, on its key.
    pub enabled: bool,
    /// The probe's path (a `GET` with the provider's key), placed under its base URL as a
    /// request would be. Default `/v1/models`; must start with `/`.
    pub path: String,
    /// Between two probes of one provider. Default 5000; > 0.
    pub interval_ms: u64,
    /// A probe unanswered this long counts as down. Default 2000; > 0.
    pub timeout_ms: u64,
    /// Probes in a row saying down that mark a provider down. Default 2; > 0.
    pub unhealthy_threshold: u32,
    /// Probes in a row saying up that mark it up again. Default 2; > 0.
    pub healthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: "/v1/models".into(),
            interval_ms: 5000,
            timeout_ms: 2000,
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        }
    }
}

/// The fleet store, `unbusy-store` (`docs/store.md`), as the Envoy filter reaches it. The
/// npm package ignores it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    /// The Envoy cluster that reaches the store. Default none: no store.
    pub cluster: Option<String>,
    /// How long a cache lookup may take before it counts as a miss. Default 20, at most 10000.
    pub timeout_ms: u64,
    /// L2 lookups on an L1 miss and write-back of valid answers. Default true.
    pub cache: bool,
    /// How often the root context polls fleet-wide pauses and renews this proxy's holdings of
    /// providers' `max_concurrency` quotas. Default 100, 10 to 60000.
    pub poll_ms: u64,
    /// How long a quota lease is spent before what is left of it is returned (ms). Default
    /// none: the store's `lease_ms` answer (1000 unless the store is run otherwise). 10 to
    /// 60000.
    pub quota_lease_ms: Option<u64>,
    /// N, the proxies expected in the fleet: without a lease, each applies `limit / N` of the
    /// global limits (a lease asks for at most `burst / N`), and without an answer from the
    /// store about a provider's quota, lets `max_concurrency / N` attempts go at once (at
    /// least 1). Default 1; 1 to 10000.
    pub expected_proxies: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            cluster: None,
            timeout_ms: 20,
            cache: true,
            poll_ms: 100,
            quota_lease_ms: None,
            expected_proxies: 1,
        }
    }
}

impl StoreConfig {
    /// The cluster to look answers up in, when the L2 cache is on.
    pub fn cache_cluster(&self) -> Option<&str> {
        self.cluster.as_deref().filter(|_| self.cache)
    }

    /// The cluster that shares concurrency quotas and pauses across the fleet (any store).
    pub fn fleet_cluster(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// The cluster to lease quotas from, when there is a store and `limits` has a rate to lease
    /// (global or per tenant; else no quota call is ever made).
    pub fn quota_cluster(&self, limits: &LimitsConfig) -> Option<&str> {
        let limited = [&limits.global, &limits.per_tenant]
            .iter()
            .any(|r| r.requests_per_minute.is_some() || r.tokens_per_minute.is_some());
        self.cluster.as_deref().filter(|_| limited)
    }
}

/// The degradation ladder. See [`crate::degrade`].
#[derive(Debug, Clone, PartialEq)]
pub struct DegradationConfig {
    /// Default true.
    pub enabled: bool,
    /// Pressure at which tiers 1, 2, 3 are entered, increasing, in (0, 1]. Default
    /// [0.3, 0.6, 0.9].
    pub enter: [f64; 3],
    /// Pressure below which they are left; each below its `enter`. Default [0.15, 0.4, 0.7].
    pub exit: [f64; 3],
    /// The least time between two tier changes. Default 10000.
    pub min_dwell_ms: u64,
    /// Tier 1+: `max_tokens` is capped at this. Default 1024; 0 disables the cap.
    pub max_tokens_cap: u32,
    /// Tier 1+: expensive model → cheaper model. Default: empty.
    pub model_fallbacks: SortedMap<String, String>,
}

impl Default for DegradationConfig {
    fn default() -> Self {
        let d = LadderSettings::default();
        Self {
            enabled: true,
            enter: d.tiers.map(|t| t.enter),
            exit: d.tiers.map(|t| t.exit),
            min_dwell_ms: d.min_dwell / ms(1),
            max_tokens_cap: 1024,
            model_fallbacks: SortedMap::new(),
        }
    }
}

impl DegradationConfig {
    /// The ladder's settings.
    pub fn settings(&self) -> LadderSettings {
        let mut tiers = [Thresholds {
            enter: 0.0,
            exit: 0.0,
        }; 3];
        for ((t, enter), exit) in tiers.iter_mut().zip(self.enter).zip(self.exit) {
            *t = Thresholds { enter, exit };
        }
        LadderSettings {
            tiers,
            min_dwell: ms(self.min_dwell_ms),
        }
    }
}

/// How the tenant of a request is identified.
#[derive(Debug, Clone, PartialEq)]
pub struct TenancyConfig {
    /// A request header whose value names the tenant (e.g. `x-tenant-id`). Default: none, the
    /// tenant is a hash of the caller's `Authorization` header.
    pub header: Option<String>,
    /// Whether the tenant header alone names the tenant. Default false: its value only divides
    /// the namespace of the caller's own `Authorization` (so a caller cannot read another key's
    /// cached answers by naming its tenant). Set true only when a trusted hop in front of unbusy
    /// sets or strips the header on every request.
    pub header_trusted: bool,
    /// The tenant of requests that carry neither. Default `anonymous`.
    pub default_tenant: String,
}

impl Default for TenancyConfig {
    fn default() -> Self {
        Self {
            header: None,
            header_trusted: false,
            default_tenant: "anonymous".to_string(),
        }
    }
}

/// What happens to a request for an endpoint unbusy does not manage or know (see
/// [`crate::request::handling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Passthrough {
    /// Answered locally with 403 `endpoint_not_allowed`; nothing is sent upstream. The default:
    /// a provider's key must not reach endpoints nobody chose to expose (files, fine-tuning,
    /// batches, deletions).
    #[default]
    Refuse,
    /// Forwarded to the preferred provider with the caller's own `Authorization` (none if the
    /// caller sent none), never the provider's key.
    CallerKey,
}

/// Endpoints beyond the ones unbusy knows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EndpointsConfig {
    /// `refuse` (default) or `caller_key`.
    pub passthrough: Passthrough,
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// The text is not JSON; the message says what and where.
    Syntax(String),
    /// Not a field of the schema.
    UnknownField(String),
    /// A value of the wrong type; says what the field takes.
    WrongType(&'static str),
    /// Must be greater than zero.
    MustBePositive,
    /// Must lie in a range.
    OutOfRange {
        /// Lowest allowed.
        min: f64,
        /// Highest allowed.
        max: f64,
    },
    /// Must not be empty.
    Empty,
    /// Must be unique; the value appears more than once.
    Duplicate(String),
    /// At least one of two fields must be set.
    AtLeastOneOf(&'static str, &'static str),
    /// At most one of two fields may be set.
    NotBoth(&'static str, &'static str),
    /// Must be an `http://` or `https://` URL with a host.
    NotAUrl,
    /// Must be at least another field's value.
    LessThan(&'static str),
    /// Must be below another field's value.
    NotBelow(&'static str),
    /// Must be a URL path: starting with `/`, without spaces.
    NotAPath,
}

/// One validation error: which field, what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The field's path, e.g. `providers[1].weight`.
    pub field: String,
    /// What is wrong.
    pub problem: Problem,
}

impl ConfigError {
    /// Appends the message, e.g. `providers[1].weight must be > 0`. Built by appending pieces,
    /// not with `write!`: core's formatting machinery (`Formatter`, padding, `Arguments`) was
    /// about 5 KB of the npm package's wasm (issue 13's size goal).
    pub fn write_to(&self, out: &mut String) {
        let field = self.field.as_str();
        let push = |out: &mut String, parts: &[&str]| parts.iter().for_each(|p| out.push_str(p));
        match &self.problem {
            Problem::Syntax(message) => push(out, &["invalid configuration: ", message]),
            Problem::UnknownField(name) if field.is_empty() => {
                push(out, &["unknown field `", name, "`"]);
            }
            Problem::UnknownField(name) => push(out, &["unknown field `", name, "` in ", field]),
            Problem::WrongType(what) => push(out, &[field, " must be ", what]),
            Problem::MustBePositive => push(out, &[field, " must be > 0"]),
            Problem::OutOfRange { min, max } => {
                // (Without `{}` on floats: core's float formatting is large in wasm.)
                push(out, &[field, " must be between "]);
                json::write_f64(out, *min, 6);
                out.push_str(" and ");
                json::write_f64(out, *max, 6);
            }
            Problem::Empty => push(out, &[field, " must not be empty"]),
            Problem::Duplicate(value) => {
                // Quoted as JSON, not with `{:?}`: `Debug` for strings links Unicode tables.
                push(out, &[field, " must be unique: "]);
                json::write_str(out, value);
                out.push_str(" repeats");
            }
            Problem::AtLeastOneOf(a, b) => {
                push(out, &[field, " must set `", a, "` or `", b, "` (or both)"]);
            }
            Problem::NotBoth(a, b) => push(
                out,
                &[
                    field,
                    ".",
                    a,
                    " and ",
                    field,
                    ".",
                    b,
                    " must not both be set",
                ],
            ),
            Problem::NotAUrl => push(
                out,
                &[field, " must be an http:// or https:// URL with a host"],
            ),
            Problem::LessThan(other) => push(out, &[field, " must be at least ", other]),
            Problem::NotBelow(other) => push(out, &[field, " must be below ", other]),
            Problem::NotAPath => push(out, &[field, " must be a path starting with /"]),
        }
    }

    /// The message (see [`ConfigError::write_to`]).
    pub fn message(&self) -> String {
        let mut out = String::new();
        self.write_to(&mut out);
        out
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl core::error::Error for ConfigError {}

/// Whether `field` is `path` or a member or element of it (every field is under the root, `""`).
fn under(field: &str, path: &str) -> bool {
    path.is_empty()
        || field
            .strip_prefix(path)
            .is_some_and(|rest| matches!(rest.bytes().next(), None | Some(b'.' | b'[')))
}

impl ConfigError {
    /// Whether this error is about the field at `path` (or under it), or relates another
    /// field to it.
    fn concerns(&self, path: &str) -> bool {
        let field = &self.field;
        under(field, path)
            || match self.problem {
                Problem::LessThan(other) | Problem::NotBelow(other) => under(other, path),
                Problem::AtLeastOneOf(a, b) | Problem::NotBoth(a, b) => path
                    .strip_prefix(field.as_str())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|member| member == a || member == b),
                _ => false,
            }
    }
}

/// Every problem found in a configuration (never empty).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Every message, joined with "; " (built without `core::fmt`, see
    /// [`ConfigError::write_to`]).
    pub fn message(&self) -> String {
        let mut out = String::new();
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            e.write_to(&mut out);
        }
        out
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message())
    }
}

impl core::error::Error for ConfigErrors {}

struct Check(Vec<ConfigError>);

impl Check {
    fn fail(&mut self, field: impl Into<String>, problem: Problem) {
        self.0.push(ConfigError {
            field: field.into(),
            problem,
        });
    }

    fn positive(&mut self, field: &str, value: u64) {
        if value == 0 {
            self.fail(field, Problem::MustBePositive);
        }
    }

    fn range(&mut self, field: &str, value: f64, min: f64, max: f64) {
        if !(value >= min && value <= max) {
            self.fail(field, Problem::OutOfRange { min, max });
        }
    }

    fn rate(&mut self, prefix: &str, rate: &RateConfig) {
        for (name, value) in [
            ("requests_per_minute", rate.requests_per_minute),
            ("tokens_per_minute", rate.tokens_per_minute),
            ("burst_requests", rate.burst_requests),
            ("burst_tokens", rate.burst_tokens),
        ] {
            if value == Some(0) {
                self.fail(
                    crate::text::concat(&[prefix, ".", name]),
                    Problem::MustBePositive,
                );
            }
        }
    }
}

fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(rest) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            !host.is_empty() && !host.starts_with(':') && !host.contains(char::is_whitespace)
        }
        None => false,
    }
}

impl Config {
    /// Parses and validates a JSON configuration.
    ///
    /// ```rust
    /// use unbusy_core::config::Config;
    ///
    /// // One provider is a complete configuration; every other field has its default.
    /// let c = Config::from_json(br#"{"providers":[{"name":"deepseek","cluster":"deepseek"}]}"#)?;
    /// assert_eq!(c.retry.max_attempts, 8);
    /// assert!(c.degradation.enabled);
    ///
    /// // Problems are all reported at once, each naming its field.
    /// let bad = br#"{"providers":[{"name":"a","cluster":"a","weight":0}],"retry":{"cap_ms":1}}"#;
    /// let message = Config::from_json(bad).unwrap_err().to_string();
    /// assert!(message.contains("providers[0].weight must be > 0"), "{message}");
    /// assert!(message.contains("retry.cap_ms"), "{message}");
    ///
    /// // A typo is refused, not silently turned into a default.
    /// let typo = br#"{"providers":[{"name":"a","cluster":"a","weigth":2}]}"#;
    /// assert!(Config::from_json(typo).unwrap_err().to_string().contains("weigth"));
    /// # Ok::<(), unbusy_core::config::ConfigErrors>(())
    /// ```
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigErrors> {
        let value = json::parse(json).map_err(|e| {
            ConfigErrors(alloc::vec![ConfigError {
                field: String::new(),
                problem: Problem::Syntax(e.message()),
            }])
        })?;
        let mut errors = Vec::new();
        let config = Self::read(&value, "", &mut errors).unwrap_or_default();
        // Validated even when some members could not be read, so that every problem is reported
        // at once; but a member that had the wrong type holds its default, and what validation
        // says about it (or about a rule relating it to another field) would be noise.
        if let Err(ConfigErrors(mut more)) = config.validate() {
            more.retain(|e| {
                !errors.iter().any(|unread| {
                    matches!(unread.problem, Problem::WrongType(_)) && e.concerns(&unread.field)
                })
            });
            errors.append(&mut more);
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Checks every field; returns all problems found.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut c = Check(Vec::new());
        if self.providers.is_empty() {
            c.fail("providers", Problem::Empty);
        }
        if self.providers.len() > crate::choice::MAX_PROVIDERS {
            c.fail(
                "providers",
                Problem::OutOfRange {
                    min: 1.0,
                    max: crate::choice::MAX_PROVIDERS as f64,
                },
            );
        }
        for (i, p) in self.providers.iter().enumerate() {
            let provider = indexed("providers", i);
            let at = |field: &str| crate::text::concat(&[provider.as_str(), ".", field]);
            if p.name.trim().is_empty() {
                c.fail(at("name"), Problem::Empty);
            } else if self.providers.iter().take(i).any(|q| q.name == p.name) {
                c.fail(at("name"), Problem::Duplicate(p.name.clone()));
            }
            // The Envoy filter routes by `cluster` and takes the host name and path prefix from
            // `base_url` when both are set; the npm package needs `base_url`.
            if let Some(url) = &p.base_url {
                if !is_http_url(url) {
                    c.fail(at("base_url"), Problem::NotAUrl);
                }
            }
            if let Some(cluster) = &p.cluster {
                if cluster.trim().is_empty() {
                    c.fail(at("cluster"), Problem::Empty);
                }
            }
            if let Some(cluster) = &p.failover_cluster {
                if cluster.trim().is_empty() {
                    c.fail(at("failover_cluster"), Problem::Empty);
                }
            }
            if p.base_url.is_none() && p.cluster.is_none() {
                c.fail(
                    provider.clone(),
                    Problem::AtLeastOneOf("base_url", "cluster"),
                );
            }
            if p.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
                c.fail(at("api_key"), Problem::Empty);
            }
            if p.api_key_env
                .as_deref()
                .is_some_and(|k| k.trim().is_empty())
            {
                c.fail(at("api_key_env"), Problem::Empty);
            }
            if p.api_key.is_some() && p.api_key_env.is_some() {
                c.fail(provider.clone(), Problem::NotBoth("api_key", "api_key_env"));
            }
            c.positive(&at("weight"), u64::from(p.weight));
            if p.max_concurrency == Some(0) {
                c.fail(at("max_concurrency"), Problem::MustBePositive);
            }
            for (from, to) in &p.models {
                if from.is_empty() || to.is_empty() {
                    let mut field = at("models[");
                    json::write_str(&mut field, from);
                    field.push(']');
                    c.fail(field, Problem::Empty);
                }
            }
        }

        let r = &self.retry;
        c.range("retry.max_attempts", f64::from(r.max_attempts), 1.0, 16.0);
        c.positive("retry.base_ms", r.base_ms);
        if r.cap_ms < r.base_ms {
            c.fail("retry.cap_ms", Problem::LessThan("retry.base_ms"));
        }

        let b = &self.budget;
        c.positive("budget.window_ms", b.window_ms);
        c.range("budget.ratio", b.ratio, 0.0, 10.0);

        c.rate("limits.global", &self.limits.global);
        c.rate("limits.per_tenant", &self.limits.per_tenant);
        c.range(
            "limits.tenant_slots",
            f64::from(self.limits.tenant_slots),
            8.0,
            1_048_576.0,
        );

        let k = &self.concurrency;
        c.positive("concurrency.min", u64::from(k.min));
        if k.max < k.min {
            c.fail("concurrency.max", Problem::LessThan("concurrency.min"));
        }
        if !(k.backoff_ratio > 0.0 && k.backoff_ratio < 1.0) {
            c.fail(
                "concurrency.backoff_ratio",
                Problem::OutOfRange { min: 0.0, max: 1.0 },
            );
        }
        c.range(
            "concurrency.latency_tolerance",
            k.latency_tolerance,
            0.0,
            1000.0,
        );

        let t = &self.throttle;
        c.positive("throttle.window_ms", t.window_ms);
        c.range("throttle.k", t.k, 1.0, 100.0);
        c.range("throttle.max_reject", t.max_reject, 0.0, 0.999);

        let br = &self.breaker;
        c.positive("breaker.window_ms", br.window_ms);
        c.range("breaker.min_success_rate", br.min_success_rate, 0.0, 1.0);
        c.positive("breaker.open_ms", br.open_ms);
        if br.max_open_ms < br.open_ms {
            c.fail("breaker.max_open_ms", Problem::LessThan("breaker.open_ms"));
        }
        c.positive("breaker.half_open_probes", u64::from(br.half_open_probes));
        c.positive("breaker.probe_successes", u64::from(br.probe_successes));

        let d = &self.deadlines;
        c.positive("deadlines.total_ms", d.total_ms);
        c.positive("deadlines.first_token_ms", d.first_token_ms);
        c.positive("deadlines.response_ms", d.response_ms);
        c.positive("deadlines.stall_ms", d.stall_ms);

        let ca = &self.cache;
        c.positive("cache.ttl_ms", ca.ttl_ms);
        c.positive("cache.max_entry_bytes", ca.max_entry_bytes);
        if ca.max_bytes < ca.max_entry_bytes {
            c.fail(
                "cache.max_bytes",
                Problem::LessThan("cache.max_entry_bytes"),
            );
        }

        let st = &self.store;
        if st.cluster.as_deref().is_some_and(|c| c.trim().is_empty()) {
            c.fail("store.cluster", Problem::Empty);
        }
        if !(1..=10_000).contains(&st.timeout_ms) {
            c.fail(
                "store.timeout_ms",
                Problem::OutOfRange {
                    min: 1.0,
                    max: 10_000.0,
                },
            );
        }
        if !(10..=60_000).contains(&st.poll_ms) {
            c.fail(
                "store.poll_ms",
                Problem::OutOfRange {
                    min: 10.0,
                    max: 60_000.0,
                },
            );
        }
        if st
            .quota_lease_ms
            .is_some_and(|l| !(10..=60_000).contains(&l))
        {
            c.fail(
                "store.quota_lease_ms",
                Problem::OutOfRange {
                    min: 10.0,
                    max: 60_000.0,
                },
            );
        }
        if !(1..=10_000).contains(&st.expected_proxies) {
            c.fail(
                "store.expected_proxies",
                Problem::OutOfRange {
                    min: 1.0,
                    max: 10_000.0,
                },
            );
        }

        let h = &self.health_check;
        if !h.path.starts_with('/') || h.path.contains(char::is_whitespace) {
            c.fail("health_check.path", Problem::NotAPath);
        }
        c.positive("health_check.interval_ms", h.interval_ms);
        c.positive("health_check.timeout_ms", h.timeout_ms);
        c.positive(
            "health_check.unhealthy_threshold",
            u64::from(h.unhealthy_threshold),
        );
        c.positive(
            "health_check.healthy_threshold",
            u64::from(h.healthy_threshold),
        );

        let g = &self.degradation;
        for i in 0..3 {
            let (enter, exit) = (
                g.enter.get(i).copied().unwrap_or(0.0),
                g.exit.get(i).copied().unwrap_or(0.0),
            );
            if !(enter > 0.0 && enter <= 1.0) {
                c.fail(
                    indexed("degradation.enter", i),
                    Problem::OutOfRange { min: 0.0, max: 1.0 },
                );
            }
            if !(exit >= 0.0 && exit < enter) {
                c.fail(
                    indexed("degradation.exit", i),
                    Problem::NotBelow("its degradation.enter"),
                );
            }
            if i > 0 && g.enter.get(i - 1).is_some_and(|prev| enter <= *prev) {
                c.fail(
                    indexed("degradation.enter", i),
                    Problem::LessThan("the previous tier's enter (strictly above)"),
                );
            }
        }

        if self
            .tenancy
            .header
            .as_deref()
            .is_some_and(|h| h.trim().is_empty())
        {
            c.fail("tenancy.header", Problem::Empty);
        }
        if self.tenancy.default_tenant.is_empty() {
            c.fail("tenancy.default_tenant", Problem::Empty);
        }

        if c.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(c.0))
        }
    }
}

/// Reading a configuration value from JSON: `None` (with the problem recorded under `path`)
/// when the value has the wrong type; the field then keeps its default.
trait FromJson: Sized {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self>;
}

fn wrong(path: &str, errors: &mut Vec<ConfigError>, what: &'static str) {
    errors.push(ConfigError {
        field: path.into(),
        problem: Problem::WrongType(what),
    });
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.into()
    } else {
        crate::text::concat(&[path, ".", field])
    }
}

/// `path[i]`, a field's path for an array's element (appended, not `format!`ted: see
/// [`ConfigError::write_to`]).
fn indexed(path: &str, i: usize) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    out.push_str(path);
    out.push('[');
    json::write_u64(&mut out, i as u64);
    out.push(']');
    out
}

impl FromJson for u64 {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let n = v.as_u64();
        if n.is_none() {
            wrong(
                path,
                errors,
                "a whole number from 0 to 18446744073709551615",
            );
        }
        n
    }
}

impl FromJson for u32 {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let n = v.as_u64().and_then(|n| u32::try_from(n).ok());
        if n.is_none() {
            wrong(path, errors, "a whole number from 0 to 4294967295");
        }
        n
    }
}

impl FromJson for f64 {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let n = v.as_f64().filter(|x| x.is_finite());
        if n.is_none() {
            wrong(path, errors, "a number");
        }
        n
    }
}

impl FromJson for bool {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let b = v.as_bool();
        if b.is_none() {
            wrong(path, errors, "true or false");
        }
        b
    }
}

impl FromJson for String {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let s = v.as_str().map(String::from);
        if s.is_none() {
            wrong(path, errors, "a string");
        }
        s
    }
}

impl<T: FromJson> FromJson for Option<T> {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            _ => T::read(v, path, errors).map(Some),
        }
    }
}

impl FromJson for SortedMap<String, String> {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let Value::Object(members) = v else {
            wrong(path, errors, "an object of strings");
            return None;
        };
        let mut map = SortedMap::new();
        for (k, val) in members {
            if let Some(s) = String::read(val, &crate::text::concat(&[path, ".", k]), errors) {
                map.insert(k.clone(), s);
            }
        }
        Some(map)
    }
}

impl FromJson for [f64; 3] {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let Value::Array(items) = v else {
            wrong(path, errors, "an array of three numbers");
            return None;
        };
        if items.len() != 3 {
            wrong(path, errors, "an array of three numbers");
            return None;
        }
        let mut out = [0.0; 3];
        for (i, (slot, item)) in out.iter_mut().zip(items).enumerate() {
            *slot = f64::read(item, &indexed(path, i), errors)?;
        }
        Some(out)
    }
}

impl FromJson for Vec<ProviderConfig> {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let Value::Array(items) = v else {
            wrong(path, errors, "an array of providers");
            return None;
        };
        Some(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    ProviderConfig::read(item, &indexed(path, i), errors).unwrap_or_default()
                })
                .collect(),
        )
    }
}

impl FromJson for Passthrough {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let p = match v.as_str() {
            Some("refuse") => Some(Passthrough::Refuse),
            Some("caller_key") => Some(Passthrough::CallerKey),
            _ => None,
        };
        if p.is_none() {
            wrong(path, errors, "\"refuse\" or \"caller_key\"");
        }
        p
    }
}

impl FromJson for Jitter {
    fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
        let j = match v.as_str() {
            Some("full") => Some(Jitter::Full),
            Some("equal") => Some(Jitter::Equal),
            Some("decorrelated") => Some(Jitter::Decorrelated),
            Some("none") => Some(Jitter::None),
            _ => None,
        };
        if j.is_none() {
            wrong(
                path,
                errors,
                "\"full\", \"equal\", \"decorrelated\" or \"none\"",
            );
        }
        j
    }
}

/// Stores a struct's member: its index in the struct's list of names, its value, its path.
type ReadField<'a> = dyn FnMut(usize, &Value, &str, &mut Vec<ConfigError>) + 'a;

/// Reads the members of a struct's object: each member the struct has (`names`) goes to
/// `field` with its index and its path, each it does not have is an unknown field (a typo must
/// not become a default). `None` when `v` is not an object.
///
/// One function for every struct, and `field` a `dyn` callback: in the wasm builds, a member's
/// dispatch in each struct's own code cost about 100 bytes a field.
fn read_members(
    v: &Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
    names: &[&str],
    field: &mut ReadField<'_>,
) -> Option<()> {
    let Value::Object(members) = v else {
        wrong(path, errors, "an object");
        return None;
    };
    for (key, val) in members {
        match names.iter().position(|name| name == key) {
            Some(i) => field(i, val, &join(path, key), errors),
            None => errors.push(ConfigError {
                field: path.into(),
                problem: Problem::UnknownField(key.clone()),
            }),
        }
    }
    Some(())
}

/// `FromJson` for a struct: starts from its defaults, reads each member it knows, refuses
/// members it does not (`read_members`).
macro_rules! read_struct {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        impl FromJson for $ty {
            fn read(v: &Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<Self> {
                let mut out = <$ty>::default();
                read_members(v, path, errors, &[$(stringify!($field)),*], &mut |i, val, at, errors| {
                    let mut n = 0;
                    $(
                        if i == n {
                            if let Some(x) = FromJson::read(val, at, errors) {
                                out.$field = x;
                            }
                            return;
                        }
                        n += 1;
                    )*
                    let _ = n;
                })?;
                Some(out)
            }
        }
    };
}

read_struct!(Config {
    providers,
    retry,
    budget,
    limits,
    concurrency,
    throttle,
    breaker,
    deadlines,
    cache,
    degradation,
    tenancy,
    endpoints,
    store,
    health_check,
});
read_struct!(HealthCheckConfig {
    enabled,
    path,
    interval_ms,
    timeout_ms,
    unhealthy_threshold,
    healthy_threshold,
});
read_struct!(StoreConfig {
    cluster,
    timeout_ms,
    cache,
    poll_ms,
    quota_lease_ms,
    expected_proxies,
});
read_struct!(ProviderConfig {
    name,
    base_url,
    cluster,
    failover_cluster,
    api_key,
    api_key_env,
    models,
    weight,
    priority,
    max_concurrency,
});
read_struct!(RetryConfig {
    max_attempts,
    base_ms,
    cap_ms,
    jitter,
    max_hint_ms,
});
read_struct!(BudgetConfig {
    window_ms,
    ratio,
    min_per_second,
});
read_struct!(RateConfig {
    requests_per_minute,
    tokens_per_minute,
    burst_requests,
    burst_tokens,
});
read_struct!(LimitsConfig {
    global,
    per_tenant,
    tenant_slots,
});
read_struct!(ConcurrencyConfig {
    min,
    max,
    backoff_ratio,
    decrease_cooldown_ms,
    latency_tolerance,
    queue_timeout_ms,
});
read_struct!(ThrottleConfig {
    enabled,
    window_ms,
    k,
    max_reject,
});
read_struct!(BreakerConfig {
    window_ms,
    min_volume,
    min_success_rate,
    consecutive_failures,
    open_ms,
    max_open_ms,
    half_open_probes,
    probe_successes,
    probe_ramp,
});
read_struct!(DeadlinesConfig {
    total_ms,
    first_token_ms,
    response_ms,
    stall_ms,
});
read_struct!(CacheConfig {
    enabled,
    ttl_ms,
    stale_ttl_ms,
    max_bytes,
    max_entry_bytes,
});
read_struct!(DegradationConfig {
    enabled,
    enter,
    exit,
    min_dwell_ms,
    max_tokens_cap,
    model_fallbacks,
});
read_struct!(EndpointsConfig { passthrough });
read_struct!(TenancyConfig {
    header,
    header_trusted,
    default_tenant,
});

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn errors(json: &str) -> String {
        match Config::from_json(json.as_bytes()) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::from_json(
            br#"{"providers":[{"name":"deepseek","base_url":"https://api.deepseek.com"}]}"#,
        );
        let c = c.unwrap();
        assert_eq!(c.retry.max_attempts, 8);
        assert_eq!(c.providers[0].weight, 1);
        assert_eq!(c.deadlines.first_token_ms, 15_000);
        assert_eq!(c.retry.backoff(), Backoff::DEFAULT);
        assert_eq!(c.breaker.settings(), BreakerSettings::default());
        assert_eq!(c.degradation.settings(), LadderSettings::default());
        assert_eq!(c.budget.settings(), BudgetSettings::default());
    }

    #[test]
    fn messages_appended_without_fmt_read_as_before() {
        // Each message built by pieces (not `format!`), pinned byte for byte: a JSON syntax
        // error's offset, an element's index, a map member's path and key, a rate's prefix.
        assert_eq!(
            errors(r#"{"providers":[}"#),
            "invalid configuration: expected a value at byte 14"
        );
        let bad = r#"{"providers":[{"name":"a","cluster":"c"},{"name":"b","cluster":"c",
            "models":{"":"x","y":1}}],"limits":{"per_tenant":{"burst_tokens":0}},
            "degradation":{"enabled":true,"enter":[0.5,0.4,1.5],"exit":[0.1,0.5,0.1]}}"#;
        let e = errors(bad);
        for part in [
            "providers[1].models.y must be a string",
            "providers[1].models[\"\"] must not be empty",
            "limits.per_tenant.burst_tokens must be > 0",
            "degradation.enter[1] must be at least the previous tier's enter (strictly above)",
            "degradation.enter[2] must be between 0 and 1",
            "degradation.exit[1] must be below its degradation.enter",
        ] {
            assert!(e.contains(part), "{part} not in {e}");
        }
        let all = Config::from_json(bad.as_bytes()).unwrap_err();
        assert_eq!(all.message(), e);
        assert_eq!(all.0[0].message(), all.0[0].to_string());
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            errors(
                r#"{"providers":[{"name":"a","base_url":"https://a"},
                                 {"name":"b","base_url":"https://b","weight":0}]}"#
            ),
            "providers[1].weight must be > 0"
        );
        assert_eq!(
            errors(r#"{"providers":[{"name":"a","base_url":"ftp://x"}]}"#),
            "providers[0].base_url must be an http:// or https:// URL with a host"
        );
        assert_eq!(
            errors(r#"{"providers":[{"name":"a"}]}"#),
            "providers[0] must set `base_url` or `cluster` (or both)"
        );
        assert_eq!(errors("{}"), "providers must not be empty");
        assert_eq!(
            errors(
                r#"{"providers":[{"name":"a","cluster":"c"},{"name":"a","cluster":"d"}],
                    "retry":{"max_attempts":0,"base_ms":500,"cap_ms":100}}"#
            ),
            "providers[1].name must be unique: \"a\" repeats; \
             retry.max_attempts must be between 1 and 16; retry.cap_ms must be at least retry.base_ms"
        );
    }

    #[test]
    fn reading_and_validation_problems_are_reported_together() {
        // An unknown field does not hide what validation finds elsewhere.
        assert_eq!(
            errors(
                r#"{"providers":[{"name":"a"},{"name":"b","base_url":"https://b","weight":0}],
                    "deadlines":{"first_token_m_s":1},"retry":{"max_attempts":0}}"#
            ),
            "unknown field `first_token_m_s` in deadlines; \
             providers[0] must set `base_url` or `cluster` (or both); \
             providers[1].weight must be > 0; retry.max_attempts must be between 1 and 16"
        );
        // A member of the wrong type holds its default: nothing else is said about it, nor
        // about the rules relating it to other fields.
        assert_eq!(
            errors(r#"{"providers":{"a":{"base_url":"https://a"}}}"#),
            "providers must be an array of providers"
        );
        assert_eq!(
            errors(r#"{"providers":[7,{"name":"b","cluster":"b"}]}"#),
            "providers[0] must be an object"
        );
        assert_eq!(
            errors(r#"{"providers":[{"name":"a","base_url":7}]}"#),
            "providers[0].base_url must be a string"
        );
        assert_eq!(
            errors(
                r#"{"providers":[{"name":"a","cluster":"c"}],"retry":{"base_ms":"x","cap_ms":100,
                    "max_attempts":0}}"#
            ),
            "retry.base_ms must be a whole number from 0 to 18446744073709551615; \
             retry.max_attempts must be between 1 and 16"
        );
    }

    #[test]
    fn unknown_and_mistyped_fields_are_refused() {
        let e = errors(r#"{"providers":[{"name":"a","cluster":"c","weigth":2}]}"#);
        assert_eq!(e, "unknown field `weigth` in providers[0]");
        let e = errors(r#"{"providers":[{"name":"a","cluster":"c","weight":-1}]}"#);
        assert_eq!(
            e,
            "providers[0].weight must be a whole number from 0 to 4294967295"
        );
        // Every problem at once, each with its path.
        let e = errors(
            r#"{"retry":{"jitter":"wild","base_ms":1.5},"cache":{"enabled":"yes"},"x":1,
                "degradation":{"enter":[0.1,"a",0.9]},"providers":[{"name":"a","cluster":"c"}]}"#,
        );
        assert_eq!(
            e,
            "retry.jitter must be \"full\", \"equal\", \"decorrelated\" or \"none\"; \
             retry.base_ms must be a whole number from 0 to 18446744073709551615; \
             cache.enabled must be true or false; unknown field `x`; \
             degradation.enter[1] must be a number"
        );
        assert!(errors("not json").starts_with("invalid configuration:"));
        assert!(errors(r#"{"providers":[],"providers":[]}"#).contains("duplicate key"));
    }

    #[test]
    fn a_key_comes_from_the_configuration_or_an_environment_variable_not_both() {
        let c = Config::from_json(
            br#"{"providers":[{"name":"a","cluster":"c","api_key_env":"UNBUSY_KEY_A"}]}"#,
        )
        .unwrap();
        assert_eq!(c.providers[0].api_key_env.as_deref(), Some("UNBUSY_KEY_A"));
        assert_eq!(c.providers[0].api_key, None);
        assert_eq!(
            errors(r#"{"providers":[{"name":"a","cluster":"c","api_key":"k","api_key_env":"K"}]}"#),
            "providers[0].api_key and providers[0].api_key_env must not both be set"
        );
        assert_eq!(
            errors(
                r#"{"providers":[{"name":"a","cluster":"c"},{"name":"b","cluster":"d","api_key_env":" "}]}"#
            ),
            "providers[1].api_key_env must not be empty"
        );
        assert_eq!(
            errors(r#"{"providers":[{"name":"a","cluster":"c","api_key_env":7}]}"#),
            "providers[0].api_key_env must be a string"
        );
    }

    #[test]
    fn unknown_endpoints_are_refused_unless_configured_otherwise() {
        let c = Config::from_json(br#"{"providers":[{"name":"a","cluster":"c"}]}"#).unwrap();
        assert_eq!(c.endpoints.passthrough, Passthrough::Refuse);
        let c = Config::from_json(
            br#"{"providers":[{"name":"a","cluster":"c"}],"endpoints":{"passthrough":"caller_key"}}"#,
        )
        .unwrap();
        assert_eq!(c.endpoints.passthrough, Passthrough::CallerKey);
        assert_eq!(
            errors(
                r#"{"providers":[{"name":"a","cluster":"c"}],"endpoints":{"passthrough":"provider_key"}}"#
            ),
            "endpoints.passthrough must be \"refuse\" or \"caller_key\""
        );
        assert_eq!(
            errors(r#"{"providers":[{"name":"a","cluster":"c"}],"endpoints":{"pass":"refuse"}}"#),
            "unknown field `pass` in endpoints"
        );
    }

    #[test]
    fn degradation_thresholds_must_be_ordered() {
        let e = errors(
            r#"{"providers":[{"name":"a","cluster":"c"}],
                "degradation":{"enter":[0.5,0.4,0.9],"exit":[0.6,0.3,0.8]}}"#,
        );
        assert!(
            e.contains("degradation.exit[0] must be below its degradation.enter"),
            "{e}"
        );
        assert!(e.contains("degradation.enter[1]"), "{e}");
    }

    #[test]
    fn nan_is_out_of_range() {
        let mut c = Config::default();
        c.providers.push(ProviderConfig {
            name: "a".into(),
            cluster: Some("c".into()),
            ..ProviderConfig::default()
        });
        c.throttle.k = f64::NAN;
        let e = c.validate().unwrap_err().to_string();
        assert_eq!(e, "throttle.k must be between 1 and 100");
    }

    #[test]
    fn health_checks_are_off_by_default_and_bad_fields_are_named() {
        let c = Config::from_json(br#"{"providers":[{"name":"a","cluster":"c"}]}"#).unwrap();
        assert!(!c.health_check.enabled);
        assert_eq!(c.health_check.path, "/v1/models");
        let on = br#"{"providers":[{"name":"a","cluster":"c"}],
            "health_check":{"enabled":true,"interval_ms":200,"unhealthy_threshold":1}}"#;
        let c = Config::from_json(on).unwrap();
        assert!(c.health_check.enabled);
        assert_eq!(
            (
                c.health_check.interval_ms,
                c.health_check.unhealthy_threshold
            ),
            (200, 1)
        );
        let e = errors(
            r#"{"providers":[{"name":"a","cluster":"c"}],"health_check":{"path":"v1/models",
            "interval_ms":0,"timeout_ms":0,"unhealthy_threshold":0,"healthy_threshold":0}}"#,
        );
        for field in [
            "health_check.path must be a path starting with /",
            "health_check.interval_ms must be > 0",
            "health_check.timeout_ms must be > 0",
            "health_check.unhealthy_threshold must be > 0",
            "health_check.healthy_threshold must be > 0",
        ] {
            assert!(e.contains(field), "{field} missing from {e}");
        }
        let e =
            errors(r#"{"providers":[{"name":"a","cluster":"c"}],"health_check":{"intervl_ms":1}}"#);
        assert!(
            e.contains("unknown field `intervl_ms` in health_check"),
            "{e}"
        );
    }

    #[test]
    fn the_store_section_defaults_to_no_store_and_names_bad_fields() {
        let c = Config::from_json(br#"{"providers":[{"name":"a","cluster":"c"}]}"#).unwrap();
        assert_eq!(c.store, StoreConfig::default());
        assert_eq!(c.store.timeout_ms, 20);
        assert_eq!(c.store.cache_cluster(), None);
        let c = Config::from_json(
            br#"{"providers":[{"name":"a","cluster":"c"}],"store":{"cluster":"unbusy_store","timeout_ms":5}}"#,
        )
        .unwrap();
        assert_eq!(c.store.cache_cluster(), Some("unbusy_store"));
        assert_eq!(c.store.timeout_ms, 5);
        let c = Config::from_json(
            br#"{"providers":[{"name":"a","cluster":"c"}],"store":{"cluster":"s","cache":false}}"#,
        )
        .unwrap();
        assert_eq!(c.store.cache_cluster(), None);
        assert_eq!(
            errors(
                r#"{"providers":[{"name":"a","cluster":"c"}],"store":{"cluster":" ","timeout_ms":0,"lease":1}}"#
            ),
            "unknown field `lease` in store; store.cluster must not be empty; \
             store.timeout_ms must be between 1 and 10000"
        );
        let c = Config::from_json(
            br#"{"providers":[{"name":"a","cluster":"c"}],"store":{"cluster":"s","poll_ms":250,"expected_proxies":4}}"#,
        )
        .unwrap();
        assert_eq!((c.store.poll_ms, c.store.expected_proxies), (250, 4));
        assert_eq!(c.store.fleet_cluster(), Some("s"));
        assert_eq!(
            errors(
                r#"{"providers":[{"name":"a","cluster":"c"}],"store":{"poll_ms":5,"expected_proxies":0}}"#
            ),
            "store.poll_ms must be between 10 and 60000; \
             store.expected_proxies must be between 1 and 10000"
        );
        assert_eq!(
            errors(r#"{"providers":[{"name":"a","cluster":"c"}],"store":{"cache":"yes"}}"#),
            "store.cache must be true or false"
        );
        let c = Config::from_json(
            br#"{"providers":[{"name":"a","cluster":"c"}],"limits":{"global":{"requests_per_minute":60}},
                "store":{"cluster":"s","quota_lease_ms":500,"expected_proxies":4}}"#,
        )
        .unwrap();
        assert_eq!(c.store.quota_lease_ms, Some(500));
        assert_eq!(c.store.expected_proxies, 4);
        assert_eq!(c.store.quota_cluster(&c.limits), Some("s"));
        assert_eq!(
            c.store.quota_cluster(&LimitsConfig::default()),
            None,
            "no limit, no quota calls"
        );
        assert_eq!(
            errors(
                r#"{"providers":[{"name":"a","cluster":"c"}],"store":{"quota_lease_ms":5,"expected_proxies":0}}"#
            ),
            "store.quota_lease_ms must be between 10 and 60000; \
             store.expected_proxies must be between 1 and 10000"
        );
    }
}
