//! # unbusy-core
//!
//! Every resilience policy unbusy applies to calls against busy LLM APIs (DeepSeek first, any
//! OpenAI-compatible API after it), written once and driven by thin hosts: the Envoy proxy-wasm
//! filter, the npm package and the deterministic simulator.
//!
//! ## Why sans-IO
//! The same decisions must come out of an Envoy worker, a browser tab, an edge worker and a
//! simulator that replays two minutes of traffic in milliseconds. So nothing in this crate reads a
//! clock, a socket or a global random number generator:
//! - **time is a parameter**: every call that depends on time takes `now`, a [`time::Instant`]
//!   (nanoseconds since an origin the host chooses) (monotonic, never going backwards for one instance);
//! - **randomness is injected**: policies that jitter take a `&mut fastrand::Rng` that the host
//!   seeded, so a simulation with the same seed gives the same result;
//! - **state is fixed-size** where possible (rings of time buckets, bounded key tables), so a
//!   proxy's memory does not grow with traffic or with the number of tenants.
//!
//! The crate is `no_std` + `alloc` and builds for `wasm32-unknown-unknown`, `wasm32-wasip1` and
//! `wasm32v1-none`.
//!
//! ## The policies
//! | module | job |
//! |---|---|
//! | [`answer`] | whether a complete answer is one (valid JSON answer, SSE ending in `[DONE]`, readable encoding) before it is delivered, cached or counted |
//! | [`classify`] | what an attempt's outcome means: success, busy, rate limited, server error, transport fault, caller error; and the server's wait hint |
//! | [`backoff`] | when to try again: full, equal or decorrelated jitter, server hints within a cap, never past the deadline |
//! | [`budget`] | whether a retry is affordable: retries bounded by a fraction of recent traffic plus a floor |
//! | [`bucket`] | token buckets with cost (requests and LLM tokens), per tenant in bounded memory |
//! | [`lease`] | global limits across a fleet: quota leases from the fleet store (size, renewal, return) and the local share without one |
//! | [`throttle`] | adaptive client-side throttling (Google SRE) |
//! | [`concurrency`] | an AIMD concurrency limit per provider, so a provider with a concurrency quota is paced |
//! | [`breaker`] | circuit breaker: closed, open, half-open |
//! | [`choice`] | which provider gets the next attempt |
//! | [`health`] | active health checks: when to probe each provider, what a probe says, when it is marked down or up |
//! | [`progress`] | real progress versus keep-alive bytes in a response, first-token time and stalls |
//! | [`degrade`] | the degradation ladder: normal, feature, data, service |
//! | [`anomaly`] | rolling mean/deviation and EWMA detectors over latency and error rate |
//! | [`cache_key`] | canonical, tenant-scoped 128-bit keys for OpenAI-compatible requests |
//! | [`config`] | the configuration schema with defaults and field-naming validation errors |
//! | [`request`] | which endpoint a request calls and where it lives under each provider's base URL; whose it is (its tenant, by source); what a managed one asks for (per-request headers, model, stream, token estimate, cache key) and what an attempt changes in its body |
//! | [`reply`] | OpenAI-compatible local error replies that SDKs back off on correctly |
//!
//! The engine's boundary speaks in [`ids`] (request, provider, attempt) and [`time::Instant`]s.
//!
//! Plumbing beside them: [`json`] (a strict JSON reader and writer), [`sorted_map`] (the map
//! the engine and the configuration use) and [`text`] (messages appended, not `format!`ted).
//! None of them links float formatting or parsing, nor
//! `BTreeMap`, so the npm package's wasm stays small.
//!
//! [`engine::Engine`] composes them behind one sans-IO interface that every host drives.
//!
//! ## A host's round trip
//! A host admits a request, carries out the actions the engine queues, and reports back what
//! happened, always with the time; it decides nothing itself:
//!
//! ```rust
//! use unbusy_core::classify::{Classification, OutcomeClass};
//! use unbusy_core::config::Config;
//! use unbusy_core::engine::{Action, CacheLookup, Engine, Priority, RequestMeta};
//! use unbusy_core::ids::AttemptId;
//! use unbusy_core::time::{ms, Instant};
//!
//! let config = Config::from_json(
//!     br#"{"providers":[{"name":"deepseek","base_url":"https://api.deepseek.com"}]}"#,
//! )?;
//! let mut engine = Engine::new(config, 42)?; // 42 seeds the engine's jitter
//! let request = RequestMeta {
//!     tenant: unbusy_core::cache_key::tenant_id(b"Bearer sk-..."),
//!     model: "deepseek-chat".into(),
//!     stream: false,
//!     priority: Priority::Normal,
//!     estimated_tokens: 1200,
//!     deadline: None,
//!     cache_key: None,
//!     cached: CacheLookup::Miss,
//! };
//!
//! // Admitted at t0 (the host's origin of time): the engine asks for a first attempt, to the
//! // provider's base URL.
//! let t0 = Instant::ORIGIN;
//! let id = engine.admit(t0, request.clone());
//! let Some(Action::Send(send)) = engine.poll_action() else { unreachable!() };
//! assert_eq!((send.request, send.attempt), (id, AttemptId::FIRST));
//! assert_eq!(send.rewrite.base_url.as_deref(), Some("https://api.deepseek.com"));
//!
//! // The answer's first real byte at 300 ms, the whole answer at 900 ms: pass it on.
//! engine.on_first_progress(t0 + ms(300), id, send.attempt);
//! let answered = Classification { class: OutcomeClass::Success, retry_after: None };
//! engine.on_outcome(t0 + ms(900), id, send.attempt, answered);
//! assert_eq!(
//!     engine.poll_action(),
//!     Some(Action::Deliver { request: id, store_in_cache: false })
//! );
//!
//! // Another request is answered "busy": nothing to do until the backoff has passed; the host
//! // calls `on_tick` at `next_wakeup`, and the retry comes.
//! let id = engine.admit(t0 + ms(1000), request);
//! let Some(Action::Send(send)) = engine.poll_action() else { unreachable!() };
//! let busy = Classification { class: OutcomeClass::Busy, retry_after: None };
//! engine.on_outcome(t0 + ms(1100), id, send.attempt, busy);
//! assert_eq!(engine.poll_action(), None);
//! let wake = engine.next_wakeup().expect("a retry is scheduled");
//! engine.on_tick(wake);
//! let Some(Action::Send(retry)) = engine.poll_action() else { unreachable!() };
//! assert_eq!((retry.request, retry.attempt.get()), (id, 2));
//! # Ok::<(), unbusy_core::config::ConfigErrors>(())
//! ```
//!
//! [`window`] is the fixed ring of time buckets that the budget, the throttle and the breaker
//! count in.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod anomaly;
pub mod answer;
pub mod backoff;
pub mod breaker;
pub mod bucket;
pub mod budget;
pub mod cache_key;
pub mod choice;
pub mod classify;
pub mod concurrency;
pub mod config;
pub mod degrade;
pub mod encoding;
pub mod engine;
pub mod fleet;
pub mod genai;
pub mod health;
pub mod ids;
pub mod json;
pub mod lease;
pub mod progress;
pub mod reply;
pub mod request;
pub mod sorted_map;
pub mod text;
pub mod throttle;
pub mod time;
pub mod window;

pub use fastrand::Rng;
