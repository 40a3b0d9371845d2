//! The filter's state machine driven natively (over the fake host) through random
//! sequences of Envoy callbacks: caller-side and upstream-instance callbacks in any order,
//! attempts that end, break or never answer, ticks, callers going away. Nothing may panic (a
//! panic kills the worker's VM), effects only name contexts that exist, and every stream that
//! is not answered yet is still being handled: between any two callbacks it is still managed,
//! and once its deadline passes (ticks alone, no provider answering) it is answered. Ending a
//! stream (Envoy ends every one, answered or not) never acts on a stream that is gone and
//! leaves it unmanaged; with every stream ended, a tick has nothing left to do.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use unbusy_core::config::Config;
use unbusy_core::Rng;
use unbusy_envoy::effect::Effect;
use unbusy_envoy::fake::{FakeHost, FakeProcess};
use unbusy_envoy::state::State;

/// A context a response callback runs in, and its stream: an upstream attempt's, or a caller's
/// own (0 when there is none).
fn pick(rng: &mut Rng, live: &BTreeSet<u32>, upstream: &[(u32, u32)]) -> (u32, u32) {
    if rng.bool() && !upstream.is_empty() {
        upstream[rng.usize(0..upstream.len())]
    } else {
        let c = *live
            .iter()
            .nth(rng.usize(0..live.len().max(1)))
            .unwrap_or(&0);
        (c, c)
    }
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

#[test]
fn random_callback_sequences_never_panic() {
    let config = Config::from_json(
        br#"{"providers":[
            {"name":"a","cluster":"ca","failover_cluster":"fa","base_url":"https://a.example/v1"},
            {"name":"b","cluster":"cb","failover_cluster":"fb","api_key":"k","models":{"m":"mb"}},
            {"name":"c","cluster":"cc","priority":1,"max_concurrency":3}],
            "deadlines":{"first_token_ms":300,"response_ms":600,"total_ms":3000,"stall_ms":500},
            "limits":{"per_tenant":{"requests_per_minute":100}}}"#,
    )
    .unwrap();
    let bodies: [&[u8]; 6] = [
        br#"{"model":"m","stream":true,"messages":[]}"#,
        br#"{"model":"m","stream":false,"temperature":0,"messages":[]}"#,
        b"{not json",
        b"[1,2]",
        br#"{"model":"m","model":"n"}"#,
        b"",
    ];
    let answers: [&[u8]; 5] = [
        b"data: {\"x\":1}\n\n",
        b": keep-alive\n\n",
        b"   \n",
        b"{\"id\":1}",
        b"\xff\xfe",
    ];
    let mut native_retries = 0;
    let mut answered_late = 0;
    for seed in 0..300u64 {
        let mut rng = Rng::with_seed(seed);
        let host = FakeHost::worker(&FakeProcess::new(0));
        let mut s = State::new(host.clone(), config.clone(), seed).unwrap();
        // Half the runs with the upstream instance present (native failover on).
        if seed % 2 == 0 {
            host.set_upstream_present(true);
            s.registry_index = Some(0);
        }

        let mut now = 1_000_000_000u64;
        let mut live: BTreeSet<u32> = BTreeSet::new(); // caller streams
        let mut upstream: Vec<(u32, u32)> = Vec::new(); // (upstream ctx, stream)
        let mut next_ctx = 2u32;
        let mut answered: BTreeSet<u32> = BTreeSet::new(); // answered caller streams
        let mut ended: BTreeSet<u32> = BTreeSet::new(); // caller streams Envoy ended
        let mut upstream_ctxs: BTreeSet<u32> = BTreeSet::new(); // every upstream context
        for _ in 0..200 {
            now += rng.u64(0..200_000_000);
            let mut effects = Vec::new();
            match rng.u8(0..10) {
                0 | 1 => {
                    let ctx = next_ctx;
                    next_ctx += 1;
                    s.begin(
                        ctx,
                        "/v1/chat/completions".into(),
                        headers(&[(":authority", "x"), ("authorization", "Bearer t")]),
                    );
                    live.insert(ctx);
                    let body = bodies[rng.usize(0..bodies.len())].to_vec();
                    effects = s.request_body(ctx, now, body);
                }
                2 if !live.is_empty() => {
                    // The router starts an attempt through the upstream instance.
                    let stream = *live.iter().nth(rng.usize(0..live.len())).unwrap();
                    let up = next_ctx;
                    next_ctx += 1;
                    upstream_ctxs.insert(up);
                    let picked = ["a", "b", "c", "zz"][rng.usize(0..4)];
                    if s.upstream_request(stream, up, Some(picked)).is_some() {
                        upstream.push((up, stream));
                    }
                }
                3 | 4 if !live.is_empty() || !upstream.is_empty() => {
                    // Response headers, at the caller's stream or an upstream context.
                    let (from, stream) = pick(&mut rng, &live, &upstream);
                    let status = ["200", "503", "429", "500", "591", "x"][rng.usize(0..6)];
                    let ct = ["text/event-stream", "application/json", ""][rng.usize(0..3)];
                    let (_, e) = s.response_headers(
                        stream,
                        from,
                        now,
                        headers(&[
                            (":status", status),
                            ("content-type", ct),
                            ("retry-after", "1"),
                        ]),
                        rng.u8(0..5) == 0,
                    );
                    effects = e;
                }
                5 | 6 if !live.is_empty() || !upstream.is_empty() => {
                    let (from, stream) = pick(&mut rng, &live, &upstream);
                    let body = answers[rng.usize(0..answers.len())];
                    let (_, e) = s.router_body(stream, from, now, body, rng.bool());
                    effects = e;
                }
                7 if !upstream.is_empty() => {
                    let (up, stream) = upstream.remove(rng.usize(0..upstream.len()));
                    s.upstream_done(stream, up);
                }
                8 if !live.is_empty() => {
                    let ctx = *live.iter().nth(rng.usize(0..live.len())).unwrap();
                    live.remove(&ctx);
                    ended.insert(ctx);
                    upstream.retain(|(_, st)| *st != ctx);
                    effects = s.end(ctx, now);
                }
                _ => effects = s.tick(now),
            }
            check_contexts(seed, &effects, &live, &upstream);
            native_retries += effects
                .iter()
                .filter(|e| matches!(e, Effect::RetryNatively { .. }))
                .count();
            note_answers(&effects, &upstream, &mut live, &mut answered);
            still_handled(seed, &s, &live, &answered);
        }
        // Every stream not answered yet is still being handled: with nothing more from the
        // providers (dispatched attempts never answer here), its total deadline (3 s) passes
        // and the engine answers it. Ticks as Envoy gives them, for longer than that.
        let unanswered: Vec<u32> = live.difference(&answered).copied().collect();
        for _ in 0..250 {
            now += 20_000_000;
            let effects = s.tick(now);
            check_contexts(seed, &effects, &live, &upstream);
            note_answers(&effects, &upstream, &mut live, &mut answered);
            still_handled(seed, &s, &live, &answered);
        }
        for ctx in &unanswered {
            assert!(
                answered.contains(ctx),
                "seed {seed}: stream {ctx} was never answered, 5 s after its last event"
            );
        }
        answered_late += unanswered.len();
        // Everything left ends cleanly (Envoy ends every stream, answered or not): ending a
        // stream never acts on it, nor on any stream already gone, and it is no longer
        // managed.
        let mut open: BTreeSet<u32> = (2..next_ctx)
            .filter(|c| !ended.contains(c) && !upstream_ctxs.contains(c))
            .collect();
        while let Some(ctx) = open.pop_first() {
            live.remove(&ctx);
            upstream.retain(|(_, st)| *st != ctx);
            let effects = s.end(ctx, now);
            check_contexts(seed, &effects, &live, &upstream);
            assert!(
                !s.manages(ctx),
                "seed {seed}: stream {ctx} still managed after its end"
            );
            note_answers(&effects, &upstream, &mut live, &mut answered);
        }
        // Nothing is left to act on, and no stream ever begun is still managed.
        let effects = s.tick(now + 10_000_000_000);
        assert!(
            effects.is_empty(),
            "seed {seed}: effects with no stream left: {effects:?}"
        );
        for ctx in (2..next_ctx).filter(|c| !upstream_ctxs.contains(c)) {
            assert!(
                !s.manages(ctx),
                "seed {seed}: stream {ctx} still managed after everything ended"
            );
        }
    }
    assert!(native_retries > 0, "the native path was never taken");
    assert!(
        answered_late > 0,
        "no stream was left to its deadline: the check never ran"
    );
}

/// Every effect names a context that exists: a caller stream still live, or an upstream
/// instance's context still carrying an attempt.
fn check_contexts(seed: u64, effects: &[Effect], live: &BTreeSet<u32>, upstream: &[(u32, u32)]) {
    for e in effects {
        let ctx = e.ctx();
        assert!(
            live.contains(&ctx) || upstream.iter().any(|(u, _)| *u == ctx),
            "seed {seed}: an effect for unknown context {ctx}: {e:?}"
        );
    }
}

/// Records the streams that `effects` answer: a local reply (the stream is then done from the
/// caller's side), or the router's answer let go to the caller, at the stream itself or at the
/// upstream context carrying its attempt.
fn note_answers(
    effects: &[Effect],
    upstream: &[(u32, u32)],
    live: &mut BTreeSet<u32>,
    answered: &mut BTreeSet<u32>,
) {
    for e in effects {
        match e {
            Effect::Reply { ctx, .. } => {
                live.remove(ctx);
                answered.insert(*ctx);
            }
            Effect::ResumeResponse { ctx, .. } => {
                let stream = upstream
                    .iter()
                    .find(|(u, _)| u == ctx)
                    .map_or(*ctx, |(_, st)| *st);
                answered.insert(stream);
            }
            _ => {}
        }
    }
}

/// The promise between events: a stream begun and not answered is still managed (its
/// request or attempt is held, or an answer is awaited).
fn still_handled(seed: u64, s: &State<FakeHost>, live: &BTreeSet<u32>, answered: &BTreeSet<u32>) {
    for ctx in live.difference(answered) {
        assert!(
            s.manages(*ctx),
            "seed {seed}: stream {ctx} is neither answered nor managed"
        );
    }
}
