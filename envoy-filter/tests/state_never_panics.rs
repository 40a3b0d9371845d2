//! The filter's state machine driven natively (hostcalls fail cleanly off wasm) through random
//! sequences of Envoy callbacks: caller-side and upstream-instance callbacks in any order,
//! attempts that end, break or never answer, ticks, callers going away. Nothing may panic (a
//! panic kills the worker's VM), effects only name contexts that exist, and every stream that
//! is not answered yet is still being handled.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;
use unbusy_core::config::Config;
use unbusy_core::Rng;
use unbusy_envoy::filter::{Effect, State};

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
    for seed in 0..300u64 {
        let mut rng = Rng::with_seed(seed);
        let mut s = State::new(config.clone(), seed).unwrap();
        // Half the runs with the upstream instance present (native failover on).
        if seed % 2 == 0 {
            unbusy_envoy::registry::set_upstream_present();
            s.registry_index = Some(0);
        }

        let mut now = 1_000_000_000u64;
        let mut live: BTreeSet<u32> = BTreeSet::new(); // caller streams
        let mut upstream: Vec<(u32, u32)> = Vec::new(); // (upstream ctx, stream)
        let mut next_ctx = 2u32;
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
                    upstream.retain(|(_, st)| *st != ctx);
                    effects = s.end(ctx, now);
                }
                _ => effects = s.tick(now),
            }
            let known: BTreeSet<u32> = live
                .iter()
                .copied()
                .chain(upstream.iter().map(|(u, _)| *u))
                .collect();
            for e in &effects {
                let ctx = e.ctx();
                assert!(
                    known.contains(&ctx),
                    "seed {seed}: an effect for unknown context {ctx}: {e:?}"
                );
            }
            native_retries += effects
                .iter()
                .filter(|e| matches!(e, Effect::RetryNatively { .. }))
                .count();
            // Answered streams are done from the caller's side.
            for e in &effects {
                if let Effect::Reply { ctx, .. } = e {
                    live.remove(ctx);
                }
            }
        }
        // Everything left ends cleanly.
        for ctx in std::mem::take(&mut live) {
            let _ = s.end(ctx, now);
        }
        let _ = s.tick(now + 10_000_000_000);
    }
    assert!(native_retries > 0, "the native path was never taken");
}
