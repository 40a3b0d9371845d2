//! The `unbusy` policy: the engine with its default configuration plus the scenario's
//! providers, driven exactly as a host drives it (admit, progress, outcomes, ticks; carry out
//! every action), with a tenant-scoped response cache beside it.

use super::{AttId, AttemptResult, Policy, ReqId, World};
use std::collections::HashMap;
use unbusy_core::cache_key::CacheKey;
use unbusy_core::classify::{
    classify, classify_fault, retry_hint, BodyProgress, Classification, Response, TransportFault,
};
use unbusy_core::config::{Config, ConfigErrors, ProviderConfig};
use unbusy_core::engine::{Action, CacheLookup, Engine, RequestId};
use unbusy_core::ids::{AttemptId, ProviderId};
use unbusy_core::reply::LocalReply;
use unbusy_core::request::read;
use unbusy_core::time::{Instant, Nanos};

/// The configuration the `unbusy` policy runs with: defaults plus the scenario's providers
/// (a provider's capacity becomes its `max_concurrency`, the quota a user would configure).
pub fn config_for(world: &World, use_capacity: bool) -> Config {
    let providers = world
        .scenario
        .providers
        .iter()
        .map(|p| ProviderConfig {
            name: p.name.clone(),
            cluster: Some(p.name.clone()),
            weight: p.weight,
            priority: p.priority,
            max_concurrency: (use_capacity && p.capacity > 0).then_some(p.capacity),
            ..ProviderConfig::default()
        })
        .collect();
    Config {
        providers,
        ..Config::default()
    }
}

struct Entry {
    tenant: u32,
    stored_at: Nanos,
}

/// The engine as a simulated client.
pub struct UnbusyPolicy {
    engine: Engine,
    cache: HashMap<CacheKey, Entry>,
    by_engine: HashMap<RequestId, ReqId>,
    engine_id: Vec<Option<RequestId>>,
    keys: Vec<Option<CacheKey>>,
    attempt_of: HashMap<(RequestId, AttemptId), AttId>,
    engine_attempt: Vec<Option<(RequestId, AttemptId)>>,
    tick_at: Option<Nanos>,
    /// Print every action and event to stderr (`UNBUSY_SIM_TRACE=1`).
    trace: bool,
}

impl UnbusyPolicy {
    /// A policy for this configuration, its randomness seeded from the world.
    pub fn new(config: Config, seed: u64) -> Result<Self, ConfigErrors> {
        Ok(Self {
            engine: Engine::new(config, seed)?,
            cache: HashMap::new(),
            by_engine: HashMap::new(),
            engine_id: Vec::new(),
            keys: Vec::new(),
            attempt_of: HashMap::new(),
            engine_attempt: Vec::new(),
            tick_at: None,
            trace: std::env::var_os("UNBUSY_SIM_TRACE").is_some(),
        })
    }

    /// The engine (for invariant checks).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    fn carry_out(&mut self, w: &mut World) {
        while let Some(action) = self.engine.poll_action() {
            let Some(&req) = self.by_engine.get(&action.request()) else {
                continue;
            };
            match action {
                Action::Send(s) => {
                    if self.trace {
                        eprintln!(
                            "{:>10.3} send r{} a{} p{} in_flight {:?} limits {:?} breakers {:?}",
                            w.now as f64 / 1e9,
                            s.request.get(),
                            s.attempt.get(),
                            s.provider.index(),
                            (0..w.providers.len())
                                .map(|i| self.engine.in_flight(ProviderId::new(i)))
                                .collect::<Vec<_>>(),
                            (0..w.providers.len())
                                .map(|i| self.engine.concurrency_limit(ProviderId::new(i)))
                                .collect::<Vec<_>>(),
                            (0..w.providers.len())
                                .map(|i| self
                                    .engine
                                    .breaker_state(ProviderId::new(i), Instant::from_nanos(w.now))
                                    .map(|b| b.gauge()))
                                .collect::<Vec<_>>(),
                        );
                    }
                    let att = w.send(req, s.provider.index());
                    self.attempt_of.insert((s.request, s.attempt), att);
                    if self.engine_attempt.len() <= att {
                        self.engine_attempt.resize(att + 1, None);
                    }
                    self.engine_attempt[att] = Some((s.request, s.attempt));
                }
                Action::Abort {
                    request, attempt, ..
                } => {
                    if let Some(att) = self.attempt_of.remove(&(request, attempt)) {
                        w.abort(att);
                    }
                }
                Action::Deliver {
                    request,
                    store_in_cache,
                } => {
                    let last_ok = w.requests[req]
                        .attempt_ids
                        .last()
                        .is_some_and(|&a| w.attempts[a].result == AttemptResult::Ok);
                    if store_in_cache && last_ok {
                        if let Some(key) = self.keys[req] {
                            let tenant = w.requests[req].tenant;
                            self.cache.insert(
                                key,
                                Entry {
                                    tenant,
                                    stored_at: w.now,
                                },
                            );
                        }
                    }
                    self.by_engine.remove(&request);
                    if !w.requests[req].done {
                        w.finish(req, last_ok);
                    }
                }
                Action::ServeCache { request, stale } => {
                    self.by_engine.remove(&request);
                    if !w.requests[req].done {
                        w.cache_hits += 1;
                        w.stale_hits += u64::from(stale);
                        w.finish(req, true);
                    }
                }
                Action::Reply { request, reply } => {
                    if self.trace {
                        eprintln!(
                            "{:>10.3} reply r{} {} {}",
                            w.now as f64 / 1e9,
                            request.get(),
                            reply.status,
                            reply.body
                        );
                    }
                    self.by_engine.remove(&request);
                    if !w.requests[req].done {
                        w.finish_with_hint(req, false, reply_hint(&reply));
                    }
                }
            }
        }
        while let Some(e) = self.engine.poll_event() {
            if self.trace {
                eprintln!("{:>10.3} {e:?}", w.now as f64 / 1e9);
            }
        }
        if let Some(next) = self.engine.next_wakeup().map(Instant::as_nanos) {
            let next = next.max(w.now + 1);
            if self.tick_at.is_none_or(|t| next < t) {
                self.tick_at = Some(next);
                w.timer(next, 0);
            }
        }
    }

    fn lookup(&self, w: &mut World, req: ReqId, key: Option<CacheKey>) -> CacheLookup {
        let Some(entry) = key.and_then(|k| self.cache.get(&k)) else {
            return CacheLookup::Miss;
        };
        if entry.tenant != w.requests[req].tenant {
            w.violations.cross_tenant_hits += 1;
        }
        CacheLookup::for_age(
            w.now.saturating_sub(entry.stored_at),
            &self.engine.config().cache,
        )
    }
}

/// The wait a local reply tells its caller, read as an OpenAI SDK reads it.
fn reply_hint(reply: &LocalReply) -> Option<Nanos> {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    retry_hint(&headers, None)
}

/// How the client classifies an attempt's end, through the same code a host uses.
pub fn classification(result: AttemptResult) -> Classification {
    match result {
        AttemptResult::Ok => classify(&Response {
            status: 200,
            headers: &[("content-type", "application/json")],
            body_prefix: b"",
            progress: BodyProgress::Real,
            unix_now_s: None,
        }),
        AttemptResult::Status { status, hint } => {
            let values = hint.map(|h| (h.millis.to_string(), h.seconds.to_string()));
            let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
            if let Some((millis, seconds)) = values.as_ref() {
                headers.push(("retry-after-ms", millis));
                headers.push(("retry-after", seconds));
            }
            classify(&Response {
                status,
                headers: &headers,
                body_prefix: result.body().as_bytes(),
                progress: BodyProgress::Real,
                unix_now_s: None,
            })
        }
        AttemptResult::StallClosed => classify_fault(TransportFault::Stall),
        AttemptResult::Reset => classify_fault(TransportFault::Reset),
        AttemptResult::Refused => classify_fault(TransportFault::Refused),
    }
}

impl Policy for UnbusyPolicy {
    fn on_arrival(&mut self, w: &mut World, req: ReqId) {
        // The request as every host reads it (`request::read`): its tenant is the caller's key.
        let body = w.requests[req].body();
        let key_of_tenant = format!("Bearer tenant-{}", w.requests[req].tenant);
        let headers = [("authorization", key_of_tenant.as_str())];
        let Ok(info) = read(&headers, body.as_bytes(), self.engine.config()) else {
            return; // (the simulator's bodies are valid requests)
        };
        let key = info.cache_key;
        if self.keys.len() <= req {
            self.keys.resize(req + 1, None);
            self.engine_id.resize(req + 1, None);
        }
        self.keys[req] = key;
        let cached = self.lookup(w, req, key);
        let now = Instant::from_nanos(w.now);
        let mut meta = info.meta(now, cached);
        meta.deadline = Some(Instant::from_nanos(w.requests[req].deadline));
        let id = self.engine.admit(now, meta);
        self.by_engine.insert(id, req);
        self.engine_id[req] = Some(id);
        self.carry_out(w);
    }

    fn on_first_token(&mut self, w: &mut World, att: AttId) {
        let Some((request, attempt)) = self.engine_attempt[att] else {
            return;
        };
        self.engine
            .on_first_progress(Instant::from_nanos(w.now), request, attempt);
        self.carry_out(w);
    }

    fn on_progress(&mut self, w: &mut World, att: AttId) {
        let Some((request, attempt)) = self.engine_attempt[att] else {
            return;
        };
        self.engine
            .on_progress(Instant::from_nanos(w.now), request, attempt);
        self.carry_out(w);
    }

    fn on_attempt_end(&mut self, w: &mut World, att: AttId) {
        let Some((request, attempt)) = self.engine_attempt[att] else {
            return;
        };
        self.attempt_of.remove(&(request, attempt));
        let outcome = classification(w.attempts[att].result);
        if self.trace {
            eprintln!(
                "{:>10.3} end r{} a{} p{} {:?}",
                w.now as f64 / 1e9,
                request.get(),
                attempt.get(),
                w.attempts[att].provider,
                outcome
            );
        }
        self.engine
            .on_outcome(Instant::from_nanos(w.now), request, attempt, outcome);
        self.carry_out(w);
    }

    fn on_timer(&mut self, w: &mut World, _key: u64) {
        if self.tick_at.is_some_and(|t| t > w.now) {
            return; // superseded by an earlier tick that already ran
        }
        self.tick_at = None;
        self.engine.on_tick(Instant::from_nanos(w.now));
        self.carry_out(w);
    }

    fn on_caller_gave_up(&mut self, w: &mut World, req: ReqId) {
        if let Some(id) = self.engine_id[req] {
            if self.by_engine.remove(&id).is_some() {
                self.engine.cancel(Instant::from_nanos(w.now), id);
            }
        }
        self.carry_out(w);
    }
}
