//! Sending an attempt the engine chose: on the caller's own stream (attempt 1), into the
//! provider's failover aggregate or as the router's native retry (see [`crate::failover`]), or
//! as a dispatched call; and the upstream instance's side of a native attempt.

use super::{slot_key, State};
use crate::effect::{Effect, UpstreamPlan};
use crate::failover::{flow_value, Native};
use crate::flow::Phase;
use crate::host::{CallToken, Host};
use crate::routing;
use crate::shared;
use unbusy_core::classify::{classify_fault, Classification, OutcomeClass, TransportFault};
use unbusy_core::engine::{RequestId, SendAttempt};
use unbusy_core::ids::{AttemptId, ProviderId};
use unbusy_core::time::{Instant, Nanos};

impl<H: Host> State<H> {
    /// Carries out the engine's `Send`.
    pub(super) fn send(
        &mut self,
        ctx: u32,
        now: Nanos,
        send: &SendAttempt,
        effects: &mut Vec<Effect>,
    ) {
        // A provider's concurrency quota holds across workers: each worker's engine paces its
        // own attempts, and a shared count makes the sum respect the quota. A full count is
        // answered as the provider itself would (429 without a hint: a quota verdict), so the
        // engine fails over, queues or backs off exactly as for the real thing.
        // With a store, the quota is the proxy's share of the fleet's (see `fleet`).
        let provider = send.provider.index();
        if self.config.store.fleet_cluster().is_some() {
            self.count_turned_away(now, provider);
        }
        if let Some(quota) = self.quota(now, provider) {
            if !shared::slot_acquire(&self.host, &slot_key(provider), quota) {
                if self.config.store.fleet_cluster().is_some() {
                    self.turned_away(now, provider);
                }
                self.engine.on_outcome(
                    Instant::from_nanos(now),
                    send.request,
                    send.attempt,
                    Classification {
                        class: OutcomeClass::RateLimited,
                        retry_after: None,
                    },
                );
                return;
            }
            if let Some(flow) = self.flows.get_mut(&ctx) {
                flow.slot = Some(send.provider);
            }
        }
        let authority = self.authorities.get(provider);
        let providers = &self.config.providers;
        let native = self
            .registry_index
            .filter(|_| self.host.upstream_present())
            .and_then(|index| {
                let cluster = providers.get(provider)?.failover_cluster.clone()?;
                Some((index, cluster, Native::enter(providers, send)))
            });
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return;
        };
        if flow.phase == Phase::RequestHeld {
            if let Some((index, cluster, native)) = native {
                // The router carries this attempt and, natively, the failovers after it; the
                // upstream instance rewrites each for the provider it reaches.
                flow.phase = Phase::Router;
                flow.router_attempt = Some(send.attempt);
                flow.attempt = Some(send.attempt);
                flow.provider = Some(send.provider);
                flow.native = Some(native);
                effects.push(Effect::ResumeRequest {
                    ctx,
                    headers: routing::native_entry(cluster, flow_value(index, ctx)),
                    body: None,
                });
                return;
            }
        } else if flow.held && flow.carrier != ctx {
            // The router's attempt is held by the upstream instance: if the engine's choice is
            // the aggregate's next provider, the router retries there and the answer streams.
            if flow.native.as_mut().is_some_and(|n| n.retry(send)) {
                flow.phase = Phase::Router;
                flow.router_attempt = Some(send.attempt);
                flow.attempt = Some(send.attempt);
                flow.provider = Some(send.provider);
                flow.held = false;
                let index = self.registry_index.unwrap_or(0);
                effects.push(Effect::RetryNatively {
                    ctx: flow.carrier,
                    stream: ctx,
                    flow: flow_value(index, ctx),
                });
                return;
            }
        }
        if flow.phase == Phase::RequestHeld {
            let (headers, body) = routing::first_attempt(&flow.caller, send, authority);
            flow.attempt = Some(send.attempt);
            flow.provider = Some(send.provider);
            flow.phase = Phase::Router;
            flow.router_attempt = Some(send.attempt);
            effects.push(Effect::ResumeRequest { ctx, headers, body });
            return;
        }
        if let Some(e) = self.dispatch_effect(ctx, now, send) {
            effects.push(e);
        }
    }

    /// The attempt `send` as a `dispatch_http_call` (for attempts the router cannot carry):
    /// the caller's request rewritten for the provider, answered whole.
    pub(super) fn dispatch_effect(
        &mut self,
        ctx: u32,
        now: Nanos,
        send: &SendAttempt,
    ) -> Option<Effect> {
        let authority = self.authorities.get(send.provider.index());
        let flow = self.flows.get_mut(&ctx)?;
        let call = routing::dispatched(&flow.caller, send, authority, now);
        flow.attempt = Some(send.attempt);
        flow.provider = Some(send.provider);
        flow.phase = Phase::Waiting;
        Some(Effect::Dispatch {
            ctx,
            request: send.request,
            attempt: send.attempt,
            cluster: call.cluster,
            headers: call.headers,
            body: call.body,
            timeout: call.timeout,
        })
    }

    /// Envoy accepted a dispatch: its answer will come with `token`.
    pub fn dispatched(
        &mut self,
        token: CallToken,
        ctx: u32,
        request: RequestId,
        attempt: AttemptId,
    ) {
        self.calls.insert(token, (ctx, request, attempt));
    }

    /// A dispatch could not even start (unknown cluster, no healthy host): a refused attempt.
    pub fn dispatch_failed(
        &mut self,
        now: Nanos,
        request: RequestId,
        attempt: AttemptId,
    ) -> Vec<Effect> {
        if let Some(ctx) = self.by_request.get(&request).copied() {
            self.release_slot(ctx);
        }
        self.engine.on_outcome(
            Instant::from_nanos(now),
            request,
            attempt,
            classify_fault(TransportFault::Refused),
        );
        self.drain(now)
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
        if flow.phase != Phase::Router {
            return None;
        }
        let mut send = flow.native.as_mut()?.pending.take()?;
        flow.carrier = from;
        flow.held = false;
        let reached = picked.and_then(|n| self.config.providers.iter().position(|p| p.name == n));
        if let Some(r) = reached.filter(|&r| r != send.provider.index()) {
            // The router reached another provider than the engine chose (the aggregate's
            // order differs from the configuration's): rewrite for the one it reached, so
            // its own credentials and model names go to it.
            self.host
                .warn("unbusy: the failover cluster reached a provider out of the expected order");
            send.provider = ProviderId::new(r);
            send.rewrite = self.engine.rewrite(
                send.provider,
                &flow.caller.model,
                self.engine.degrades_features(),
            );
        }
        let (headers, body) = routing::native_attempt(
            &flow.caller,
            &send,
            self.authorities.get(send.provider.index()),
        );
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
                if flow.reading() {
                    flow.phase = Phase::Router;
                }
            }
        }
    }
}
