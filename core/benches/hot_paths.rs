//! Hot-path benchmarks for the policies, with a baseline run side by side where one exists.
//!
//! `cargo bench -p unbusy-core --bench hot_paths` (or `make bench-core`). Each case is timed in
//! samples of about 20 ms after a warm-up; the median of 15 samples is printed in ns per
//! operation. The cache key is compared with the obvious implementation: parse into a
//! `serde_json::Value` (keys sorted, as its map is a BTreeMap), serialise again, hash with the
//! same SipHash-1-3-128.
//!
//! Numbers only: nothing here asserts a time. Record results in BENCHMARKS.md.

#![allow(clippy::expect_used, clippy::indexing_slicing)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;
use unbusy_core::backoff::Backoff;
use unbusy_core::breaker::{BreakerSettings, CircuitBreaker};
use unbusy_core::bucket::{KeyedBuckets, Rate, TokenBucket};
use unbusy_core::budget::{BudgetSettings, RetryBudget};
use unbusy_core::cache_key::{Canonicalizer, KeyRequest, OptIn};
use unbusy_core::choice::{choose, Candidate, Tried};
use unbusy_core::classify::{classify, BodyProgress, BreakerSignal, Response};
use unbusy_core::progress::{Framing, ProgressDetector};
use unbusy_core::time::ms;
use unbusy_core::Rng;

const SAMPLES: usize = 15;
const SAMPLE_TARGET: Duration = Duration::from_millis(20);

/// Median nanoseconds per call of `f`.
fn measure(mut f: impl FnMut()) -> f64 {
    // Calibrate: double the batch until it takes a tenth of a sample, then scale.
    let mut batch = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        let elapsed = t.elapsed();
        if elapsed >= SAMPLE_TARGET / 10 {
            let per = elapsed.as_secs_f64() / batch as f64;
            batch = ((SAMPLE_TARGET.as_secs_f64() / per) as u64).max(1);
            break;
        }
        batch *= 2;
    }
    let mut samples: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            t.elapsed().as_secs_f64() * 1e9 / batch as f64
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[SAMPLES / 2]
}

fn row(name: &str, ns: f64, extra: &str) {
    println!("| {name:<44} | {ns:>12.1} | {extra:<30} |");
}

/// A chat/completions request of roughly `target` bytes: a system prompt, then alternating
/// user/assistant turns with prose, quotes, newlines and some non-ASCII text.
fn chat_request(target: usize) -> Vec<u8> {
    let sentence =
        "The provider answered \"server busy\" again; retry after 2 s.\nCafé ☕ 服务器繁忙 — ok. ";
    let mut messages = vec![serde_json::json!({
        "role": "system",
        "content": "You are a helpful assistant. Answer briefly."
    })];
    let mut size = 200;
    let mut turn = 0;
    while size < target {
        let words = sentence.repeat(1 + turn % 4);
        size += words.len() + 40;
        messages.push(serde_json::json!({
            "role": if turn % 2 == 0 { "user" } else { "assistant" },
            "content": words,
        }));
        turn += 1;
    }
    let body = serde_json::json!({
        "model": "deepseek-chat",
        "messages": messages,
        "temperature": 0,
        "max_tokens": 1024,
        "top_p": 1.0,
        "stream": false,
        "user": "alice",
    });
    serde_json::to_vec(&body).expect("serialisable")
}

fn baseline_key(tenant: &[u8], endpoint: &str, body: &[u8]) -> u128 {
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return 0,
    };
    let canonical = serde_json::to_vec(&value).unwrap_or_default();
    let mut h = SipHasher13::new_with_keys(1, 2);
    for part in [tenant, endpoint.as_bytes(), &canonical] {
        h.write_u64(part.len() as u64);
        h.write(part);
    }
    h.finish128().as_u128()
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run once, quickly.
    let quick = !std::env::args().any(|a| a == "--bench");
    println!("| case | ns/op | note |");
    println!("|---|---:|---|");

    let mut now = 1u64 << 40;
    let mut bucket = TokenBucket::new(Rate::per_second(1_000_000_000));
    let ns = measure(|| {
        now += 1;
        black_box(bucket.take(black_box(now), 1));
    });
    row("token bucket take (GCRA)", ns, "");

    let mut keyed = KeyedBuckets::new(Rate::per_second(1_000_000), 4096);
    let mut key = 0u64;
    let ns = measure(|| {
        key = key.wrapping_add(0x9e37_79b9_7f4a_7c15) % 3000;
        now += 1;
        black_box(keyed.take(black_box(key), now, 1));
    });
    row("keyed bucket take (3000 tenants, 4096 slots)", ns, "");

    let backoff = Backoff::DEFAULT;
    let mut rng = Rng::with_seed(1);
    let ns = measure(|| {
        black_box(backoff.schedule(
            black_box(now),
            now + ms(60_000),
            3,
            ms(300),
            black_box(None),
            &mut rng,
        ));
    });
    row("backoff schedule (full jitter)", ns, "");

    let mut budget = RetryBudget::new(BudgetSettings::default());
    let ns = measure(|| {
        now += 1000;
        budget.deposit(now);
        black_box(budget.try_withdraw(now));
    });
    row("retry budget deposit + withdraw", ns, "");

    let mut breaker = CircuitBreaker::new(BreakerSettings::default());
    let ns = measure(|| {
        now += 1000;
        if breaker.try_acquire(now) {
            breaker.on_outcome(now, BreakerSignal::Success);
        }
    });
    row("breaker acquire + outcome", ns, "");

    let candidates = [
        Candidate {
            priority: 0,
            weight: 3,
            outstanding: 4,
            breaker_allows: true,
            has_room: true,
        },
        Candidate {
            priority: 0,
            weight: 1,
            outstanding: 1,
            breaker_allows: true,
            has_room: true,
        },
        Candidate {
            priority: 1,
            weight: 1,
            outstanding: 0,
            breaker_allows: true,
            has_room: true,
        },
    ];
    let ns = measure(|| {
        black_box(choose(black_box(&candidates), Tried::default(), &mut rng));
    });
    row("provider choice (3 providers, 2 tiers)", ns, "");

    let overload = br#"{"error":{"message":"Server overloaded, please retry shortly.","type":"server_error","code":"overloaded"}}"#;
    let success = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}"#;
    let headers = [
        ("content-type", "application/json"),
        ("retry-after", "2"),
        ("x-request-id", "abc123"),
    ];
    for (name, status, body) in [
        ("classify a 503 with Retry-After", 503u16, &overload[..]),
        ("classify a 500 with an overload body", 500, &overload[..]),
        ("classify a 200 answer", 200, &success[..]),
    ] {
        let ns = measure(|| {
            black_box(classify(black_box(&Response {
                status,
                headers: &headers,
                body_prefix: body,
                progress: BodyProgress::Real,
                unix_now_s: None,
            })));
        });
        row(name, ns, "");
    }

    let mut sse = Vec::new();
    while sse.len() < 64 * 1024 {
        sse.extend_from_slice(b": keep-alive\n\n");
        sse.extend_from_slice(
            b"data: {\"id\":\"x\",\"choices\":[{\"delta\":{\"content\":\"token \"}}]}\n\n",
        );
    }
    let ns = measure(|| {
        let mut d = ProgressDetector::new(Framing::Sse, 0);
        for chunk in sse.chunks(1024) {
            black_box(d.feed(1, chunk));
        }
    });
    let mbps = sse.len() as f64 / ns * 1e3;
    row(
        "progress detector, 64 KB SSE in 1 KB chunks",
        ns,
        &format!("{mbps:.0} MB/s"),
    );

    let mut canonicalizer = Canonicalizer::new();
    for kb in [1usize, 8, 64] {
        let request = chat_request(kb * 1024);
        let ours = measure(|| {
            black_box(
                canonicalizer
                    .key(&KeyRequest {
                        tenant: b"tenant-a",
                        endpoint: "/v1/chat/completions",
                        body: black_box(&request),
                        opt_in: OptIn::Default,
                    })
                    .ok(),
            );
        });
        let baseline = measure(|| {
            black_box(baseline_key(
                b"tenant-a",
                "/v1/chat/completions",
                black_box(&request),
            ));
        });
        let mbps = request.len() as f64 / ours * 1e3;
        row(
            &format!("cache key, {kb} KB request ({} B)", request.len()),
            ours,
            &format!("{mbps:.0} MB/s"),
        );
        row(
            &format!("  baseline: serde_json Value + sort + hash, {kb} KB"),
            baseline,
            &format!("unbusy is {:.2}x faster", baseline / ours),
        );
        if quick {
            break;
        }
    }
}
