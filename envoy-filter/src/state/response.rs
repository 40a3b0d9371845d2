//! Reading and judging an attempt's answer: the router's (at the caller's stream, or at the
//! upstream instance's context carrying a native attempt) and a dispatched call's. What an
//! answer means is [`crate::judging`]'s; here it moves the request's phase and tells the engine.

use super::State;
use crate::effect::Effect;
use crate::failover::NATIVE_RETRY_STATUS;
use crate::flow::Phase;
use crate::host::{CallToken, Host};
use crate::judging::{
    decode_call, judge, progress_to_report, undecodable, Answer, Reading, MAX_HELD_RESPONSE_BYTES,
};
use crate::routing::header;
use unbusy_core::classify::{classify_fault, Classification, OutcomeClass, TransportFault};
use unbusy_core::engine::RequestId;
use unbusy_core::ids::AttemptId;
use unbusy_core::progress::Feed;
use unbusy_core::time::{Instant, Nanos};

impl<H: Host> State<H> {
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
        let pending = flow.native.as_ref().is_some_and(|n| n.pending.is_some());
        if from == ctx && flow.phase == Phase::Router && pending {
            let status = header(&headers, ":status").unwrap_or("");
            if status == NATIVE_RETRY_STATUS.to_string() {
                // The router could not retry (its retry budget or circuit breaker, no host in
                // the next priority): the engine's attempt never started. Send it ourselves,
                // and keep this answer from the caller.
                flow.carrier = ctx;
                flow.held = false;
                flow.router_attempt = None; // its answer will be the dispatched one
                let send = flow.native.as_mut().and_then(|n| n.pending.take());
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
        let (answer, reading) = Answer::begin(now, headers);
        flow.phase = Phase::Reading(reading);
        let mut effects = Vec::new();
        if answer.decoded() {
            // Compressed although identity was asked for: every byte toward the caller is
            // decoded, so the headers that describe the compressed bytes go.
            for name in ["content-encoding", "content-length"] {
                effects.push(Effect::SetResponseHeader {
                    ctx: from,
                    name: name.into(),
                    value: None,
                });
            }
        }
        flow.answer = answer;
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
        let (Some(request), Some(attempt)) = (flow.request, flow.router_attempt) else {
            // No attempt with the router: nothing of this may reach the caller.
            return (flow.phase != Phase::Done, Vec::new());
        };
        match flow.phase {
            Phase::Reading(Reading::HoldingStream) => {
                let answer = &mut flow.answer;
                let new = answer.take_held(body);
                let feed = answer.feed_progress(now, &new);
                answer.feed_done(&new);
                if feed == Feed::FirstProgress || feed == Feed::Progress {
                    flow.phase = Phase::Streaming;
                    flow.held = false;
                    answer.keep_body = flow.cache_key.is_some();
                    let mut all = Vec::new();
                    if answer.decoded() {
                        // What the caller gets is the decoded stream so far.
                        let plain = answer.take_plain();
                        all.push(Effect::ReplaceResponseBody {
                            ctx: from,
                            size: body.len(),
                            body: plain.clone(),
                        });
                        answer.usage_scan.feed(&plain);
                        if answer.keep_body {
                            answer.body.extend_from_slice(&plain);
                        }
                    } else {
                        answer.usage_scan.feed(body);
                        if answer.keep_body {
                            answer.body.extend_from_slice(body);
                        }
                    }
                    if end_of_stream {
                        answer.decode_finish();
                    }
                    self.engine
                        .on_first_progress(Instant::from_nanos(now), request, attempt);
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
                let answer = &mut flow.answer;
                // (Borrowed as is unless the answer is being decoded: no copy per chunk.)
                let chunk = answer.decode(body);
                let mut effects = Vec::new();
                if answer.decoded() {
                    if end_of_stream {
                        answer.decode_finish();
                    }
                    effects.push(Effect::ReplaceResponseBody {
                        ctx: from,
                        size: body.len(),
                        body: chunk.to_vec(),
                    });
                }
                answer.feed_done(&chunk);
                answer.usage_scan.feed(&chunk);
                answer.keep(&chunk, self.config.cache.max_entry_bytes);
                self.engine
                    .on_progress(Instant::from_nanos(now), request, attempt);
                if end_of_stream {
                    effects.extend(self.finish_router(ctx, now, request, attempt));
                }
                (false, effects)
            }
            Phase::Reading(reading) => {
                let stream = flow.caller.stream;
                let answer = &mut flow.answer;
                let new = answer.take_held(body);
                if !end_of_stream && body.len() <= MAX_HELD_RESPONSE_BYTES {
                    // The first real byte of a held answer is progress, as a stream's first
                    // event is: the first-byte wait is over (blank lines do not count). Not for
                    // a stream request: to the engine, a stream that progressed has reached the
                    // caller, and this one is held until it is judged.
                    if reading == Reading::BufferingBody && !stream {
                        match answer.feed_progress(now, &new) {
                            Feed::FirstProgress => self.engine.on_first_progress(
                                Instant::from_nanos(now),
                                request,
                                attempt,
                            ),
                            Feed::Progress => {
                                self.engine
                                    .on_progress(Instant::from_nanos(now), request, attempt)
                            }
                            _ => {}
                        }
                    }
                    return (true, Vec::new());
                }
                flow.phase = Phase::Waiting;
                let decoded = !answer.decoded() || answer.decode_finish();
                answer.body = if answer.decoded() {
                    answer.take_plain()
                } else {
                    body.to_vec()
                };
                let verdict = if decoded {
                    judge(now, answer.status, &answer.headers, &answer.body)
                } else {
                    undecodable()
                };
                answer.cacheable = verdict.cacheable && body.len() <= MAX_HELD_RESPONSE_BYTES;
                if progress_to_report(&verdict, stream) {
                    self.engine
                        .on_first_progress(Instant::from_nanos(now), request, attempt);
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
            Phase::RequestHeld | Phase::Router | Phase::Waiting => (true, Vec::new()),
        }
    }

    /// A stream that reached the caller ended.
    fn finish_router(
        &mut self,
        ctx: u32,
        now: Nanos,
        request: RequestId,
        attempt: AttemptId,
    ) -> Vec<Effect> {
        // A stream that reached the caller is an answer only if it ended with `[DONE]`; cut
        // short, it counts as the provider's failure and is never cached.
        let mut complete = false;
        if let Some(flow) = self.flows.get_mut(&ctx) {
            let answer = &mut flow.answer;
            complete = answer.complete();
            answer.cacheable = complete && !answer.unreadable && answer.keep_body;
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

    /// A dispatched attempt's answer (no status: it failed before an answer).
    pub fn call_response(
        &mut self,
        token: CallToken,
        now: Nanos,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Vec<Effect> {
        if self.l2_owns(token) {
            return self.l2_answer(token, now, &headers, body);
        }
        if self.fleet_owns(token) {
            self.fleet_answer(token, now, &headers, &body);
            return self.tick(now);
        }
        if self.probe_owns(token) {
            let status = header(&headers, ":status")
                .and_then(|s| s.parse::<u16>().ok())
                .filter(|&s| s != 0);
            self.probe_answer(token, now, status);
            return self.drain(now);
        }
        if self.quotas.owns(token) {
            self.quotas.answer(&self.host, token, now, &headers, &body);
            return Vec::new();
        }
        let Some((ctx, request, attempt)) = self.calls.remove(&token) else {
            return Vec::new();
        };
        let Some(flow) = self.flows.get_mut(&ctx) else {
            return Vec::new();
        };
        if flow.request != Some(request) || flow.attempt != Some(attempt) {
            return Vec::new(); // aborted: the engine already moved on
        }
        let status = header(&headers, ":status")
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|&s| s != 0);
        let stream = flow.caller.stream;
        let (headers, body, decoded) = decode_call(headers, body);
        let (outcome, cacheable) = match status {
            None => (classify_fault(TransportFault::Reset), false),
            Some(status) => {
                let verdict = if decoded {
                    judge(now, status, &headers, &body)
                } else {
                    undecodable()
                };
                if progress_to_report(&verdict, stream) {
                    self.engine
                        .on_first_progress(Instant::from_nanos(now), request, attempt);
                }
                (verdict.classification, verdict.cacheable)
            }
        };
        if let Some(flow) = self.flows.get_mut(&ctx) {
            flow.answer = Answer::whole(status.unwrap_or(0), headers, body, cacheable);
            flow.phase = Phase::Waiting;
        }
        self.outcome(ctx, now, request, attempt, outcome);
        self.drain(now)
    }
}
