//! The engine's actions, turned into effects: send an attempt, abort one, deliver the current
//! answer (storing it in the shared cache if the engine and the judge both allow it), serve the
//! cache, or reply locally. Then the engine's events become metrics.

use super::{local, State};
use crate::effect::Effect;
use crate::flow::Phase;
use crate::genai::Finished;
use crate::host::Host;
use crate::shared;
use unbusy_core::engine::{Action, Event};
use unbusy_core::genai::usage;
use unbusy_core::ids::ProviderId;
use unbusy_core::reply::{local_reply, ReplyKind};
use unbusy_core::time::Nanos;

impl<H: Host> State<H> {
    /// Turns the engine's queued actions into host effects.
    pub(super) fn drain(&mut self, now: Nanos) -> Vec<Effect> {
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
                    if store_in_cache {
                        self.store(ctx, now);
                    }
                    let Some(flow) = self.flows.get_mut(&ctx) else {
                        continue;
                    };
                    let from_router = flow.router_attempt.is_some_and(|a| flow.attempt == Some(a));
                    if flow.phase != Phase::Streaming {
                        flow.answer.usage = usage(&flow.answer.body);
                    }
                    match flow.phase {
                        Phase::Streaming => {} // already flowing
                        // A decoded answer is replied with its decoded bytes (the router's
                        // held bytes are the compressed ones).
                        _ if from_router && !flow.answer.decoded() => {
                            // (Its `x-unbusy` was set with its headers.)
                            flow.phase = Phase::Done;
                            flow.held = false;
                            effects.push(Effect::ResumeResponse {
                                ctx: flow.carrier,
                                headers: Vec::new(),
                            });
                        }
                        _ => {
                            flow.phase = Phase::Done;
                            let mut headers: Vec<(String, String)> = flow
                                .answer
                                .headers
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
                                status: flow.answer.status,
                                headers,
                                body: std::mem::take(&mut flow.answer.body),
                            });
                        }
                    }
                }
                Action::ServeCache { request, stale } => {
                    self.by_request.remove(&request);
                    let served = self.served_note(ctx, stale);
                    let Some(flow) = self.flows.get_mut(&ctx) else {
                        continue;
                    };
                    flow.cache_note = served;
                    let Some(flow) = self.flows.get_mut(&ctx) else {
                        continue;
                    };
                    flow.phase = Phase::Done;
                    let note = self.note(ctx);
                    let Some(flow) = self.flows.get_mut(&ctx) else {
                        continue;
                    };
                    let Some(entry) = flow.cached.take() else {
                        // (The engine serves the cache only when admission found an entry.)
                        let reply = local_reply(ReplyKind::Overloaded, "no cached answer", None);
                        effects.push(local(ctx, &reply, &note));
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
                    effects.push(local(ctx, &reply, &note));
                }
            }
        }
        while let Some(event) = self.engine.poll_event() {
            self.metrics.event(&self.host, &event);
            self.genai_event(&event);
        }
        effects
    }

    /// Records a finished request's GenAI histograms, with the token usage of the answer its
    /// stream carried (the flow is still there: streams end after their request does).
    fn genai_event(&mut self, event: &Event) {
        let Event::RequestFinished {
            outcome,
            latency,
            request,
            provider,
            model,
            first_chunk,
            ..
        } = event
        else {
            return;
        };
        let usage = self
            .flows
            .values_mut()
            .find(|f| f.request == Some(*request))
            .and_then(|f| f.answer.usage.or_else(|| f.answer.usage_scan.finish()));
        self.genai.finished(
            &self.host,
            &Finished {
                provider: *provider,
                model,
                outcome: *outcome,
                latency: *latency,
                first_chunk: *first_chunk,
                usage,
            },
        );
    }

    /// Moves each provider's in-flight gauge to the engine's count. Called at every tick (20
    /// ms), not after every action: a request that is sent and answered between two ticks would
    /// otherwise cost two hostcalls that cancel out, and a gauge is only ever read by a scrape.
    /// The quota gauge of each provider that has one, too (for saturation: in flight against
    /// quota).
    pub(super) fn publish_in_flight(&mut self, now: Nanos) {
        for i in 0..self.config.providers.len() {
            self.metrics
                .in_flight(&self.host, i, self.engine.in_flight(ProviderId::new(i)));
            if let Some(quota) = self.quota(now, i) {
                self.metrics.quota(&self.host, i, quota);
            }
        }
    }

    /// Stores the stream's current answer in the shared cache if it is a complete, valid one
    /// that fits (`cache.max_entry_bytes`), replayed later with the content type it came with
    /// (a stream to a request whose `stream` was not literally `true` is SSE).
    fn store(&mut self, ctx: u32, now: Nanos) {
        let Some(flow) = self.flows.get(&ctx) else {
            return;
        };
        let answer = &flow.answer;
        let Some(key) = flow.cache_key.filter(|_| answer.cacheable) else {
            return;
        };
        if answer.body.len() as u64 > self.config.cache.max_entry_bytes {
            return;
        }
        let (stream, tenant) = (answer.is_sse(), flow.tenant);
        let body = answer.body.clone();
        shared::cache_put(&self.host, key, &self.cache_bounds, now, stream, &body);
        self.l2_write_back(tenant, key, stream, &body);
        self.metrics
            .cache_bytes(&self.host, shared::cache_bytes(&self.host));
    }
}
