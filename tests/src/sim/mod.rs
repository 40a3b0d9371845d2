//! A deterministic discrete-event simulation of callers, a client-side policy and providers.
//!
//! Why: the engine's decisions only show their worth against busy providers over minutes of
//! traffic, and comparing policies is only fair when every policy meets the same callers. The
//! world here draws arrivals from one random stream (so every policy sees the same requests),
//! provider behaviour from a second and policy randomness from a third, all from one seed;
//! same seed, same output.
//!
//! Model choices where the scenario format is silent (documented in `BENCHMARKS.md` too):
//! - Error answers (503, 500, 429) arrive after a lognormal 100 ms median / 800 ms p99; a
//!   reset after 20 ms / 200 ms; a refused connection after 1 ms and never counts as in flight.
//! - A non-streaming answer's first real byte is its whole body, at the total latency; a
//!   stream's first token arrives at the first-token latency, its end at the total latency
//!   (never before the first token).
//! - A provider's in-flight count includes every open connection, the quick 429s it sends
//!   above its capacity included; `max_overload` is the largest in-flight / capacity seen.
//! - Closed-loop callers behave as the scenarios README says: the next request 100 ms after
//!   the previous one ended, and after a failure that carried a retry hint (`retry-after-ms`,
//!   else `Retry-After`), that hint first, capped at 60 s. Simulated time always advances.
//! - A rate-limit fault with `retry_after_s` above 0 sends both `retry-after-ms` and
//!   `Retry-After` in whole seconds rounded up ([`RetryHint`]); 0 sends neither, a bare 429.
//! - Baselines send to the preferred priority group (weighted within it), as an SDK or a
//!   single-cluster route would; only unbusy fails over across priorities.

pub mod baseline;
pub mod conformance;
pub mod report;
pub mod unbusy;
pub mod worlds;

use crate::scenario::{Fault, LogNormal, RetryHint, Scenario};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use unbusy_core::time::{Nanos, SECOND};
use unbusy_core::Rng;

/// Index of a request in the run.
pub type ReqId = usize;
/// Index of an attempt in the run.
pub type AttId = usize;

/// Seconds (scenario units) to nanoseconds.
pub fn ns(seconds: f64) -> Nanos {
    if seconds <= 0.0 || !seconds.is_finite() {
        0
    } else {
        (seconds * SECOND as f64) as Nanos
    }
}

/// A request as the caller made it.
#[derive(Debug, Clone)]
pub struct Request {
    /// When it arrived.
    pub arrival: Nanos,
    /// When the caller gives up.
    pub deadline: Nanos,
    /// Whether it streams.
    pub stream: bool,
    /// Which tenant sent it.
    pub tenant: u32,
    /// Which prompt it carries: identical prompts are identical requests.
    pub prompt: u64,
    /// Whether it has ended (either way).
    pub done: bool,
    /// Whether it succeeded.
    pub succeeded: bool,
    /// When it ended.
    pub done_at: Option<Nanos>,
    /// Attempts sent to providers.
    pub attempts: u32,
    /// Its attempts, in order.
    pub attempt_ids: Vec<AttId>,
    /// The closed-loop caller that sent it, if any.
    pub caller: Option<u32>,
    /// The retry hint its failure told the caller (a closed-loop caller waits it out).
    pub hint_told: Option<Nanos>,
}

impl Request {
    /// The request's JSON body, as an OpenAI-compatible client would send it.
    pub fn body(&self) -> String {
        format!(
            r#"{{"model":"deepseek-chat","messages":[{{"role":"system","content":"You are terse."}},{{"role":"user","content":"Question number {} about busy servers?"}}],"temperature":0,"max_tokens":256,"stream":{}}}"#,
            self.prompt, self.stream
        )
    }
}

/// How an attempt ended, as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttemptResult {
    /// 200 with a complete answer.
    Ok,
    /// An HTTP error status.
    Status {
        /// The status.
        status: u16,
        /// The retry hint headers, if sent.
        hint: Option<RetryHint>,
    },
    /// 200 and only keep-alive bytes, then the provider closed.
    StallClosed,
    /// Reset before any byte.
    Reset,
    /// Connection refused.
    Refused,
}

impl AttemptResult {
    /// The body a provider sends with an error status.
    pub fn body(&self) -> &'static str {
        match self {
            Self::Status { status: 503, .. } => {
                r#"{"error":{"message":"Server overloaded, please try again later.","type":"server_error","code":"server_busy"}}"#
            }
            Self::Status { status: 429, .. } => {
                r#"{"error":{"message":"Rate limit reached for requests","type":"rate_limit_error","code":"rate_limit_exceeded"}}"#
            }
            Self::Status { .. } => {
                r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","code":null}}"#
            }
            _ => "",
        }
    }
}

impl AttemptResult {
    /// The wait a caller reading `retry-after-ms` first, then `Retry-After`, is told.
    pub fn hinted_wait(&self) -> Option<Nanos> {
        match self {
            Self::Status { hint: Some(h), .. } => Some(h.millis * 1_000_000),
            _ => None,
        }
    }
}

/// A closed-loop caller's think time between one request's end and its next.
pub const THINK_TIME: Nanos = 100_000_000;

/// The longest retry hint a closed-loop caller waits out before its next request.
pub const CALLER_MAX_HINT: Nanos = 60 * SECOND;

/// An attempt at a provider.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Its request.
    pub req: ReqId,
    /// The provider's index.
    pub provider: usize,
    /// When it was sent.
    pub sent: Nanos,
    /// Whether the connection is still open.
    pub open: bool,
    /// Whether it counts against the provider's capacity.
    accepted: bool,
    /// How it will end.
    pub result: AttemptResult,
    /// When it will end.
    pub ends_at: Nanos,
    /// Whether its successful end reached the policy (not aborted before).
    pub answered: bool,
    /// When its connection closed (its end, an abort, or the caller giving up).
    pub closed_at: Option<Nanos>,
}

/// A streaming answer's chunks arrive this far apart after its first token.
const CHUNK_INTERVAL: Nanos = SECOND;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival { caller: Option<u32> },
    CallerDeadline(ReqId),
    FirstToken(AttId),
    Progress(AttId),
    AttemptEnd(AttId),
    Timer(u64),
}

/// A provider's live state.
#[derive(Debug, Clone, Default)]
pub struct ProviderLive {
    /// Open connections.
    pub open: u32,
    /// Open connections counting against capacity.
    accepted: u32,
    /// The largest `open / capacity` seen.
    pub max_overload: f64,
    /// Attempts received.
    pub attempts: u64,
}

/// Violations of what every policy must respect, counted for the invariant tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations {
    /// Attempts sent at or after the request's deadline.
    pub sent_past_deadline: u64,
    /// Attempts sent for a request that had already ended.
    pub sent_after_done: u64,
    /// Requests ended twice.
    pub finished_twice: u64,
    /// Cache hits serving another tenant's answer.
    pub cross_tenant_hits: u64,
    /// Requests with more attempts than the policy allows.
    pub too_many_attempts: u64,
    /// Requests a baseline handled otherwise than its definition (see [`conformance`]).
    pub off_definition: u64,
    /// Closed-loop arrivals not at the caller model's instant.
    pub caller_model: u64,
    /// The first deviation found, for the failure message.
    pub first: Option<String>,
}

/// The world a policy acts in.
pub struct World {
    /// The scenario.
    pub scenario: Scenario,
    /// The current time.
    pub now: Nanos,
    /// Every request so far.
    pub requests: Vec<Request>,
    /// Every attempt so far.
    pub attempts: Vec<Attempt>,
    /// Providers' live state.
    pub providers: Vec<ProviderLive>,
    /// Randomness for the policy.
    pub policy_rng: Rng,
    /// What went wrong.
    pub violations: Violations,
    /// Successful requests answered from a cache (fresh or stale).
    pub cache_hits: u64,
    /// Of those, stale ones.
    pub stale_hits: u64,
    arrival_rng: Rng,
    /// Provider behaviour: attempt `k` of request `r` to provider `p` draws its fate from a
    /// stream seeded by (this, r, k, p), the same under every policy.
    provider_seed: u64,
    queue: BinaryHeap<Reverse<(Nanos, u64, Ev)>>,
    seq: u64,
    prompt_stream: Vec<bool>,
    first_token: Vec<LogNormal>,
    total: Vec<LogNormal>,
    error_latency: LogNormal,
    reset_latency: LogNormal,
}

/// A client-side policy under test.
pub trait Policy {
    /// A new request arrived.
    fn on_arrival(&mut self, w: &mut World, req: ReqId);
    /// An attempt's first real byte (first token) arrived.
    fn on_first_token(&mut self, w: &mut World, att: AttId);
    /// More of a streaming answer arrived.
    fn on_progress(&mut self, _w: &mut World, _att: AttId) {}
    /// An attempt ended (not called for attempts the policy aborted).
    fn on_attempt_end(&mut self, w: &mut World, att: AttId);
    /// A timer the policy set fired.
    fn on_timer(&mut self, w: &mut World, key: u64);
    /// The caller gave up on the request (its open attempts are already closed).
    fn on_caller_gave_up(&mut self, w: &mut World, req: ReqId);
}

impl World {
    /// A world for `scenario` with everything random drawn from `seed`.
    pub fn new(scenario: Scenario, seed: u64) -> Self {
        let first_token = scenario
            .providers
            .iter()
            .map(|p| LogNormal::from_percentiles(p.latency_ms.first_token))
            .collect();
        let total = scenario
            .providers
            .iter()
            .map(|p| LogNormal::from_percentiles(p.latency_ms.total))
            .collect();
        let providers = vec![ProviderLive::default(); scenario.providers.len()];
        let mut w = Self {
            now: 0,
            requests: Vec::new(),
            attempts: Vec::new(),
            providers,
            policy_rng: Rng::with_seed(seed ^ 0x5eed_0f90_11c7),
            violations: Violations::default(),
            cache_hits: 0,
            stale_hits: 0,
            arrival_rng: Rng::with_seed(seed),
            provider_seed: seed ^ 0x9e37_79b9_7f4a_7c15,
            queue: BinaryHeap::new(),
            seq: 0,
            prompt_stream: Vec::new(),
            first_token,
            total,
            error_latency: LogNormal::from_percentiles([100.0, 800.0]),
            reset_latency: LogNormal::from_percentiles([20.0, 200.0]),
            scenario,
        };
        let clients = w.scenario.clients.clone();
        if clients.concurrency > 0 {
            for caller in 0..clients.concurrency {
                // Callers start spread over the first second, not in one instant.
                let at = (w.arrival_rng.f64() * SECOND as f64) as Nanos;
                w.push(
                    at,
                    Ev::Arrival {
                        caller: Some(caller),
                    },
                );
            }
        } else {
            let end = ns(w.scenario.duration_s);
            let mut t = 0.0f64;
            loop {
                t += -(1.0 - w.arrival_rng.f64()).ln() / clients.rps;
                let at = ns(t);
                if at >= end {
                    break;
                }
                w.push(at, Ev::Arrival { caller: None });
            }
        }
        w
    }

    fn push(&mut self, at: Nanos, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    /// Runs the scenario to the end with `policy`.
    pub fn run(&mut self, policy: &mut dyn Policy) {
        while let Some(Reverse((at, _, ev))) = self.queue.pop() {
            self.now = self.now.max(at);
            match ev {
                Ev::Arrival { caller } => {
                    let req = self.new_request(caller);
                    self.push(self.requests[req].deadline, Ev::CallerDeadline(req));
                    policy.on_arrival(self, req);
                }
                Ev::CallerDeadline(req) => {
                    if !self.requests[req].done {
                        self.close_attempts_of(req);
                        // A caller that timed out read no answer, and so no hint.
                        self.finish_with_hint(req, false, None);
                        policy.on_caller_gave_up(self, req);
                    }
                }
                Ev::FirstToken(att) => {
                    if self.attempts[att].open {
                        self.next_chunk(att);
                        policy.on_first_token(self, att);
                    }
                }
                Ev::Progress(att) => {
                    if self.attempts[att].open {
                        self.next_chunk(att);
                        policy.on_progress(self, att);
                    }
                }
                Ev::AttemptEnd(att) => {
                    if self.attempts[att].open {
                        self.close(att);
                        self.attempts[att].answered =
                            self.attempts[att].result == AttemptResult::Ok;
                        policy.on_attempt_end(self, att);
                    }
                }
                Ev::Timer(key) => policy.on_timer(self, key),
            }
        }
    }

    fn next_chunk(&mut self, att: AttId) {
        let a = &self.attempts[att];
        let at = self.now + CHUNK_INTERVAL;
        if self.requests[a.req].stream && at < a.ends_at {
            self.push(at, Ev::Progress(att));
        }
    }

    fn new_request(&mut self, caller: Option<u32>) -> ReqId {
        let c = &self.scenario.clients;
        let stream = self.arrival_rng.f64() < c.stream_fraction;
        let tenant = self.arrival_rng.u32(0..c.tenants.max(1));
        let repeat = !self.prompt_stream.is_empty() && self.arrival_rng.f64() < c.repeat_fraction;
        let (prompt, stream) = if repeat {
            // The same request as an earlier one: same prompt, same stream flag.
            let p = self.arrival_rng.usize(0..self.prompt_stream.len());
            (p as u64, self.prompt_stream[p])
        } else {
            self.prompt_stream.push(stream);
            ((self.prompt_stream.len() - 1) as u64, stream)
        };
        self.requests.push(Request {
            arrival: self.now,
            deadline: self.now + ns(c.deadline_s),
            stream,
            tenant,
            prompt,
            done: false,
            succeeded: false,
            done_at: None,
            attempts: 0,
            attempt_ids: Vec::new(),
            caller,
            hint_told: None,
        });
        self.requests.len() - 1
    }

    /// Sends an attempt of `req` to `provider`; the provider decides its fate now.
    pub fn send(&mut self, req: ReqId, provider: usize) -> AttId {
        let now = self.now;
        let r = &mut self.requests[req];
        if r.done {
            self.violations.sent_after_done += 1;
        }
        if now >= r.deadline {
            self.violations.sent_past_deadline += 1;
        }
        r.attempts += 1;
        let r_attempts = r.attempts;
        r.attempt_ids.push(self.attempts.len());
        let stream = r.stream;
        let spec = &self.scenario.providers[provider];
        let at_s = now as f64 / SECOND as f64;
        let live = &mut self.providers[provider];
        live.attempts += 1;
        // Common random numbers: policies that send the same attempt meet the same fate, so
        // their difference is theirs, not the draw's (a per-send sequence made two policies
        // sending the same requests differ by two points from sampling alone).
        let mut fate = Rng::with_seed(
            self.provider_seed
                ^ (req as u64).wrapping_mul(0xff51_afd7_ed55_8ccd)
                ^ u64::from(r_attempts).wrapping_mul(0xc4ce_b9fe_1a85_ec53)
                ^ (provider as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
        );
        // (One draw discarded: the first output of a fresh stream is less mixed.)
        fate.u64(..);
        let rng = &mut fate;
        let sample =
            |d: &LogNormal, rng: &mut Rng| ns(d.sample(1.0 - rng.f64(), rng.f64()) / 1000.0);
        let id = self.attempts.len();
        let (result, accepted, first_token, end) = if spec.refusing_at(at_s) {
            (AttemptResult::Refused, false, None, now + 1_000_000)
        } else if spec.capacity > 0 && live.accepted >= spec.capacity {
            let e = now + sample(&self.error_latency, rng);
            let r = AttemptResult::Status {
                status: 429,
                hint: None,
            };
            (r, false, None, e)
        } else {
            let fault = spec.fault_at(at_s, rng.f64());
            match fault {
                Fault::None => {
                    let ft = sample(&self.first_token[provider], rng);
                    let total = sample(&self.total[provider], rng).max(ft + 1_000_000);
                    let first = if stream { now + ft } else { now + total };
                    (AttemptResult::Ok, true, Some(first), now + total)
                }
                Fault::Busy503 | Fault::Error500 | Fault::RateLimit429 { .. } => {
                    let (status, hint) = match fault {
                        Fault::Busy503 => (503, None),
                        Fault::Error500 => (500, None),
                        Fault::RateLimit429 { retry_after_s } => {
                            (429, RetryHint::from_seconds(retry_after_s))
                        }
                        _ => (500, None),
                    };
                    let r = AttemptResult::Status { status, hint };
                    (r, true, None, now + sample(&self.error_latency, rng))
                }
                Fault::Stall { stall_s } => {
                    (AttemptResult::StallClosed, true, None, now + ns(stall_s))
                }
                Fault::Reset => (
                    AttemptResult::Reset,
                    true,
                    None,
                    now + sample(&self.reset_latency, rng),
                ),
                Fault::Refused => (AttemptResult::Refused, false, None, now + 1_000_000),
            }
        };
        if result != AttemptResult::Refused {
            live.open += 1;
            if accepted {
                live.accepted += 1;
            }
            if spec.capacity > 0 {
                let ratio = f64::from(live.open) / f64::from(spec.capacity);
                live.max_overload = live.max_overload.max(ratio);
            }
        }
        self.attempts.push(Attempt {
            req,
            provider,
            sent: now,
            open: true,
            accepted,
            result,
            ends_at: end,
            answered: false,
            closed_at: None,
        });
        if let Some(t) = first_token {
            self.push(t, Ev::FirstToken(id));
        }
        self.push(end, Ev::AttemptEnd(id));
        id
    }

    fn close(&mut self, att: AttId) {
        let a = &mut self.attempts[att];
        if !a.open {
            return;
        }
        a.open = false;
        a.closed_at = Some(self.now);
        if a.result != AttemptResult::Refused {
            let live = &mut self.providers[a.provider];
            live.open = live.open.saturating_sub(1);
            if a.accepted {
                live.accepted = live.accepted.saturating_sub(1);
            }
        }
    }

    /// The client closes an attempt's connection (an abort); its end is never reported.
    pub fn abort(&mut self, att: AttId) {
        self.close(att);
    }

    fn close_attempts_of(&mut self, req: ReqId) {
        for a in self.requests[req].attempt_ids.clone() {
            self.close(a);
        }
    }

    /// The request ends with the answer of its last attempt; a closed-loop caller sends its
    /// next one after its think time (and a failure's retry hint).
    pub fn finish(&mut self, req: ReqId, succeeded: bool) {
        let hint = self.requests[req]
            .attempt_ids
            .last()
            .and_then(|&a| self.attempts[a].result.hinted_wait());
        self.finish_with_hint(req, succeeded, hint);
    }

    /// The request ends with an answer that carried this retry hint (a local reply's).
    pub fn finish_with_hint(&mut self, req: ReqId, succeeded: bool, hint: Option<Nanos>) {
        let r = &mut self.requests[req];
        if r.done {
            self.violations.finished_twice += 1;
            return;
        }
        r.done = true;
        r.succeeded = succeeded;
        r.done_at = Some(self.now);
        r.hint_told = if succeeded { None } else { hint };
        if let Some(caller) = r.caller {
            let wait = r.hint_told.unwrap_or(0).min(CALLER_MAX_HINT);
            let next = self.now + wait + THINK_TIME;
            if next < ns(self.scenario.duration_s) {
                self.push(
                    next,
                    Ev::Arrival {
                        caller: Some(caller),
                    },
                );
            }
        }
        if succeeded {
            // Close anything still open (a policy that finished early must not leak).
            self.close_attempts_of(req);
        }
    }

    /// Calls the policy's `on_timer(key)` at `at`.
    pub fn timer(&mut self, at: Nanos, key: u64) {
        self.push(at.max(self.now), Ev::Timer(key));
    }

    /// The preferred priority group, weighted: the provider a single-endpoint client uses.
    pub fn pick_preferred(&mut self) -> usize {
        let providers = &self.scenario.providers;
        let best = providers.iter().map(|p| p.priority).min().unwrap_or(0);
        let total: u64 = providers
            .iter()
            .filter(|p| p.priority == best)
            .map(|p| u64::from(p.weight))
            .sum();
        let mut draw = self.policy_rng.u64(0..total.max(1));
        for (i, p) in providers.iter().enumerate() {
            if p.priority != best {
                continue;
            }
            if draw < u64::from(p.weight) {
                return i;
            }
            draw -= u64::from(p.weight);
        }
        0
    }
}
