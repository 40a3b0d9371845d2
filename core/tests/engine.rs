//! The engine end to end, driven as a host would drive it: scenarios for each decision, then
//! invariants over many seeds with random provider behaviour.

// Test helpers may panic: a panic here is a failing test, not a dead proxy.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;
use support::{actions, instant, meta, nanos, nth, outcome, pid, provider};

use std::collections::HashMap;
use unbusy_core::cache_key::CacheKey;
use unbusy_core::classify::{classify_fault, OutcomeClass, TransportFault};
use unbusy_core::config::{Config, ProviderConfig};
use unbusy_core::engine::{AbortReason, Action, CacheLookup, Engine, RequestId, RequestMeta};
use unbusy_core::time::{ms, secs, Nanos};
use unbusy_core::Rng;

fn config(providers: Vec<ProviderConfig>) -> Config {
    Config {
        providers,
        ..Config::default()
    }
}

fn sent(a: &[Action]) -> (u32, usize) {
    match a {
        [Action::Send(s)] => (s.attempt.get(), s.provider.index()),
        other => panic!("expected one send, got {other:?}"),
    }
}

#[test]
fn success_is_delivered_and_cached_when_cacheable() {
    let mut e = Engine::new(config(vec![provider("deepseek", 0)]), 1).unwrap();
    let id = e.admit(
        instant(0),
        RequestMeta {
            cache_key: Some(CacheKey(7)),
            ..meta(1)
        },
    );
    assert_eq!(sent(&actions(&mut e)), (1, 0));
    e.on_first_progress(instant(ms(400)), id, nth(1));
    e.on_outcome(
        instant(ms(900)),
        id,
        nth(1),
        outcome(OutcomeClass::Success, None),
    );
    assert_eq!(
        actions(&mut e),
        vec![Action::Deliver {
            request: id,
            store_in_cache: true
        }]
    );
    assert_eq!(e.active_requests(), 0);
    assert_eq!(e.in_flight(pid(0)), 0);
}

#[test]
fn busy_primary_fails_over_to_backup_at_once() {
    let mut e = Engine::new(
        config(vec![provider("deepseek", 0), provider("backup", 1)]),
        1,
    )
    .unwrap();
    let id = e.admit(instant(0), meta(1));
    assert_eq!(sent(&actions(&mut e)), (1, 0));
    e.on_outcome(
        instant(ms(50)),
        id,
        nth(1),
        outcome(OutcomeClass::Busy, Some(secs(5))),
    );
    // The primary's hint does not delay the backup.
    assert_eq!(sent(&actions(&mut e)), (2, 1));
}

#[test]
fn single_provider_retry_honours_the_hint() {
    let mut e = Engine::new(config(vec![provider("deepseek", 0)]), 1).unwrap();
    let id = e.admit(instant(0), meta(1));
    actions(&mut e);
    e.on_outcome(
        instant(ms(10)),
        id,
        nth(1),
        outcome(OutcomeClass::RateLimited, Some(secs(2))),
    );
    assert!(actions(&mut e).is_empty());
    let wake = e.next_wakeup().map(nanos).unwrap();
    assert!(
        wake >= ms(10) + secs(2) && wake <= ms(10) + secs(2) + ms(250),
        "{wake}"
    );
    e.on_tick(instant(wake - 1));
    assert!(actions(&mut e).is_empty());
    e.on_tick(instant(wake));
    assert_eq!(sent(&actions(&mut e)), (2, 0));
}

#[test]
fn caller_errors_are_passed_through_not_retried() {
    let mut e = Engine::new(config(vec![provider("a", 0), provider("b", 0)]), 1).unwrap();
    let id = e.admit(instant(0), meta(1));
    actions(&mut e);
    let bad = OutcomeClass::CallerError(unbusy_core::classify::CallerErrorKind::BadRequest);
    e.on_outcome(instant(ms(10)), id, nth(1), outcome(bad, None));
    assert_eq!(
        actions(&mut e),
        vec![Action::Deliver {
            request: id,
            store_in_cache: false
        }]
    );
}

#[test]
fn keepalive_past_first_token_deadline_fails_over() {
    let mut e = Engine::new(
        config(vec![provider("deepseek", 0), provider("backup", 1)]),
        1,
    )
    .unwrap();
    let id = e.admit(
        instant(0),
        RequestMeta {
            stream: true,
            ..meta(1)
        },
    );
    let first = match actions(&mut e).as_slice() {
        [Action::Send(s)] => s.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(first.first_token_deadline, instant(secs(15)));
    assert_eq!(e.next_wakeup().map(nanos), Some(secs(15)));
    e.on_tick(instant(secs(15)));
    let a = actions(&mut e);
    assert_eq!(
        a[0],
        Action::Abort {
            request: id,
            attempt: nth(1),
            reason: AbortReason::FirstTokenDeadline
        }
    );
    assert_eq!(sent(&a[1..]), (2, 1));
    // A late report from the aborted attempt changes nothing.
    e.on_outcome(
        instant(secs(16)),
        id,
        nth(1),
        outcome(OutcomeClass::Success, None),
    );
    assert!(actions(&mut e).is_empty());
}

#[test]
fn tenant_limit_refuses_with_retry_after_and_spares_other_tenants() {
    let mut c = config(vec![provider("deepseek", 0)]);
    c.limits.per_tenant.requests_per_minute = Some(1);
    let mut e = Engine::new(c, 1).unwrap();
    e.admit(instant(0), meta(1));
    assert!(matches!(actions(&mut e).as_slice(), [Action::Send(_)]));
    e.admit(instant(ms(1)), meta(1));
    match actions(&mut e).as_slice() {
        [Action::Reply { reply, .. }] => {
            assert_eq!(reply.status, 429);
            let ra = reply
                .headers
                .iter()
                .find(|(n, _)| *n == "retry-after")
                .unwrap();
            assert_eq!(ra.1, "60");
        }
        other => panic!("{other:?}"),
    }
    e.admit(instant(ms(2)), meta(2));
    assert!(matches!(actions(&mut e).as_slice(), [Action::Send(_)]));
}

#[test]
fn cache_fresh_and_stale() {
    let mut e = Engine::new(config(vec![provider("deepseek", 0)]), 1).unwrap();
    let id = e.admit(
        instant(0),
        RequestMeta {
            cached: CacheLookup::Fresh,
            ..meta(1)
        },
    );
    assert_eq!(
        actions(&mut e),
        vec![Action::ServeCache {
            request: id,
            stale: false
        }]
    );
    // Stale entries are used only when the provider cannot answer.
    let mut c = config(vec![provider("deepseek", 0)]);
    c.retry.max_attempts = 1;
    let mut e = Engine::new(c, 1).unwrap();
    let id = e.admit(
        instant(0),
        RequestMeta {
            cached: CacheLookup::Stale,
            ..meta(1)
        },
    );
    actions(&mut e);
    e.on_outcome(
        instant(ms(5)),
        id,
        nth(1),
        outcome(OutcomeClass::Busy, None),
    );
    assert_eq!(
        actions(&mut e),
        vec![Action::ServeCache {
            request: id,
            stale: true
        }]
    );
}

#[test]
fn concurrency_quota_paces_instead_of_sending() {
    let mut p = provider("deepseek", 0);
    p.max_concurrency = Some(1);
    let mut e = Engine::new(config(vec![p]), 1).unwrap();
    let first = e.admit(instant(0), meta(1));
    assert_eq!(sent(&actions(&mut e)), (1, 0));
    let second = e.admit(instant(ms(1)), meta(2));
    assert!(
        actions(&mut e).is_empty(),
        "the second request must wait for the slot"
    );
    assert_eq!(e.in_flight(pid(0)), 1);
    e.on_outcome(
        instant(ms(500)),
        first,
        nth(1),
        outcome(OutcomeClass::Success, None),
    );
    let a = actions(&mut e);
    assert_eq!(
        a[0],
        Action::Deliver {
            request: first,
            store_in_cache: false
        }
    );
    match &a[1] {
        Action::Send(s) => assert_eq!((s.request, s.attempt.get()), (second, 1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_quota_shared_with_other_engines_counts_their_attempts_and_wakes_when_they_end() {
    // Quota 3, of which other workers hold 3: nothing may be sent, the requests queue (no
    // refusal, no backoff); as the others' attempts end, the queue drains earliest deadline
    // first while it moves (it has not stood for half a request's time).
    let mut p = provider("deepseek", 0);
    p.max_concurrency = Some(3);
    let mut e = Engine::new(config(vec![p]), 1).unwrap();
    e.set_external_in_flight(instant(0), pid(0), 3);
    let first = e.admit(instant(ms(1)), meta(1));
    let second = e.admit(instant(ms(2)), meta(2));
    assert!(actions(&mut e).is_empty(), "the shared quota is full");
    e.set_external_in_flight(instant(ms(100)), pid(0), 2);
    match actions(&mut e).as_slice() {
        [Action::Send(s)] => assert_eq!(s.request, first),
        other => panic!("{other:?}"),
    }
    e.set_external_in_flight(instant(ms(150)), pid(0), 2);
    assert!(
        actions(&mut e).is_empty(),
        "no change, no room: 1 mine + 2 theirs"
    );
    e.set_external_in_flight(instant(ms(200)), pid(0), 0);
    match actions(&mut e).as_slice() {
        [Action::Send(s)] => assert_eq!(s.request, second),
        other => panic!("{other:?}"),
    }
    assert_eq!(e.in_flight(pid(0)), 2);
}

#[test]
fn a_breaker_opened_elsewhere_pauses_the_provider_here_until_it_would_probe() {
    let mut c = config(vec![provider("primary", 0), provider("backup", 1)]);
    c.breaker.consecutive_failures = 2;
    let mut opener = Engine::new(c.clone(), 1).unwrap();
    let mut other = Engine::new(c, 2).unwrap();
    // Two failures in a row open the breaker on one engine...
    for i in 0..2 {
        let id = opener.admit(instant(ms(i)), meta(1));
        let (attempt, provider) = sent(&actions(&mut opener));
        assert_eq!(provider, 0);
        opener.on_outcome(
            instant(ms(i) + 1),
            id,
            nth(attempt),
            outcome(OutcomeClass::Busy, None),
        );
        actions(&mut opener);
    }
    let until = opener
        .breaker_open_until(instant(ms(10)), pid(0))
        .map(nanos)
        .expect("open");
    assert!(until > ms(10));
    assert_eq!(
        other.breaker_open_until(instant(ms(10)), pid(0)).map(nanos),
        None
    );
    // ...and the other, told so, sends straight to the backup until then.
    other.pause_provider(instant(ms(10)), pid(0), instant(until));
    other.admit(instant(ms(11)), meta(2));
    assert_eq!(sent(&actions(&mut other)).1, 1, "paused: the backup first");
    other.admit(instant(until), meta(3));
    assert_eq!(sent(&actions(&mut other)).1, 0, "the pause is over");
}

#[test]
fn everything_down_fails_fast_with_an_sdk_friendly_reply() {
    let mut c = config(vec![provider("deepseek", 0)]);
    c.retry.max_attempts = 2;
    let mut e = Engine::new(c, 1).unwrap();
    let id = e.admit(instant(0), meta(1));
    actions(&mut e);
    e.on_outcome(
        instant(ms(5)),
        id,
        nth(1),
        outcome(OutcomeClass::Busy, None),
    );
    let wake = e.next_wakeup().map(nanos).unwrap();
    e.on_tick(instant(wake));
    let (attempt, _) = sent(&actions(&mut e));
    e.on_outcome(
        instant(wake + ms(5)),
        id,
        nth(attempt),
        outcome(OutcomeClass::Busy, None),
    );
    match actions(&mut e).as_slice() {
        [Action::Reply { reply, .. }] => {
            assert_eq!(reply.status, 503);
            assert!(reply.body.contains("overloaded"), "{}", reply.body);
            assert!(reply
                .headers
                .iter()
                .any(|(n, v)| *n == "x-should-retry" && v == "true"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_stream_that_stalls_after_its_first_token_is_cut_not_retried() {
    let mut e = Engine::new(config(vec![provider("a", 0), provider("b", 1)]), 1).unwrap();
    let id = e.admit(
        instant(0),
        RequestMeta {
            stream: true,
            ..meta(1)
        },
    );
    actions(&mut e);
    e.on_first_progress(instant(secs(1)), id, nth(1));
    e.on_progress(instant(secs(5)), id, nth(1));
    // stall_ms defaults to 30 s after the latest progress.
    assert_eq!(e.next_wakeup().map(nanos), Some(secs(35)));
    e.on_tick(instant(secs(35) - 1));
    assert!(actions(&mut e).is_empty());
    e.on_tick(instant(secs(35)));
    assert_eq!(
        actions(&mut e),
        vec![Action::Abort {
            request: id,
            attempt: nth(1),
            reason: AbortReason::Stalled
        }]
    );
    assert_eq!(e.active_requests(), 0);
    assert_eq!(e.in_flight(pid(0)), 0);
}

#[test]
fn a_non_streaming_answer_that_stalls_is_retried_elsewhere() {
    let mut e = Engine::new(config(vec![provider("a", 0), provider("b", 1)]), 1).unwrap();
    let id = e.admit(instant(0), meta(1));
    let first = match actions(&mut e).as_slice() {
        [Action::Send(s)] => s.clone(),
        other => panic!("{other:?}"),
    };
    // Non-streaming attempts get deadlines.response_ms (25 s), not first_token_ms (15 s).
    assert_eq!(first.first_token_deadline, instant(secs(25)));
    e.on_first_progress(instant(secs(2)), id, nth(1));
    e.on_tick(instant(secs(32)));
    let a = actions(&mut e);
    assert!(matches!(
        a[0],
        Action::Abort {
            reason: AbortReason::Stalled,
            ..
        }
    ));
    assert_eq!(sent(&a[1..]), (2, 1));
}

#[test]
fn a_retry_hint_answers_only_the_request_that_got_it() {
    let mut e = Engine::new(config(vec![provider("a", 0)]), 1).unwrap();
    // Five requests in a row get 429 + Retry-After: 10 s; each waits out its own hint.
    let mut t = 0;
    let mut hinted = Vec::new();
    for i in 0..5 {
        t += ms(10);
        let id = e.admit(instant(t), meta(i));
        assert_eq!(sent(&actions(&mut e)), (1, 0));
        e.on_outcome(
            instant(t + ms(5)),
            id,
            nth(1),
            outcome(OutcomeClass::RateLimited, Some(secs(10))),
        );
        assert!(actions(&mut e).is_empty(), "request {i} waits for its hint");
        hinted.push((id, t + ms(5)));
    }
    // Another request's retry after a plain server error is not held back by their hints: it
    // goes after its own backoff (at most the 250 ms base for a first retry), long before 10 s.
    let id = e.admit(instant(t + ms(100)), meta(9));
    assert_eq!(sent(&actions(&mut e)), (1, 0));
    e.on_outcome(
        instant(t + ms(110)),
        id,
        nth(1),
        outcome(OutcomeClass::ServerError, None),
    );
    assert!(actions(&mut e).is_empty());
    let mut now = t + ms(110);
    let mut retried_at = None;
    while let Some(at) = e.next_wakeup().map(nanos).filter(|at| *at < t + secs(5)) {
        now = at;
        e.on_tick(instant(now));
        for a in actions(&mut e) {
            if let Action::Send(s) = a {
                assert_eq!(s.request, id, "a hinted request went early");
                retried_at = Some(now);
            }
        }
    }
    let retried_at = retried_at.expect("the unhinted retry never went");
    assert!(
        retried_at <= t + ms(110) + ms(250),
        "retried at {retried_at}"
    );
    // The hinted ones go once their own hint has passed, and not before.
    e.on_outcome(
        instant(now),
        id,
        nth(2),
        outcome(OutcomeClass::Success, None),
    );
    actions(&mut e);
    let mut went = Vec::new();
    while let Some(at) = e.next_wakeup().map(nanos).filter(|at| *at < t + secs(13)) {
        e.on_tick(instant(at));
        for a in actions(&mut e) {
            if let Action::Send(s) = a {
                went.push((s.request, at));
            }
        }
    }
    assert_eq!(went.len(), 5, "{went:?}");
    for (id, got_at) in hinted {
        let at = went
            .iter()
            .find(|(r, _)| *r == id)
            .map(|(_, at)| *at)
            .unwrap();
        assert!(
            at >= got_at + secs(10),
            "request {id:?} retried at {at}, before its hint"
        );
    }
}

#[test]
fn an_isolated_rate_limit_does_not_pause_the_provider() {
    let mut e = Engine::new(config(vec![provider("a", 0)]), 1).unwrap();
    let id = e.admit(instant(0), meta(1));
    actions(&mut e);
    e.on_outcome(
        instant(ms(5)),
        id,
        nth(1),
        outcome(OutcomeClass::RateLimited, Some(secs(5))),
    );
    actions(&mut e);
    let other = e.admit(instant(ms(6)), meta(2));
    assert_eq!(sent(&actions(&mut e)), (1, 0));
    e.on_outcome(
        instant(ms(7)),
        other,
        nth(1),
        outcome(OutcomeClass::Success, None),
    );
}

#[test]
fn open_breaker_makes_requests_wait_for_the_probe_not_fail() {
    let mut e = Engine::new(config(vec![provider("a", 0)]), 1).unwrap();
    // Ten failures in a row open the breaker (for 5 s).
    let mut t = 0;
    for _ in 0..10 {
        t += ms(1);
        let id = e.admit(instant(t), meta(1));
        let (attempt, _) = sent(&actions(&mut e));
        e.on_outcome(
            instant(t),
            id,
            nth(attempt),
            outcome(OutcomeClass::Busy, None),
        );
        // Each is retried later or given up; cancel to keep the test about new requests.
        actions(&mut e);
        e.cancel(instant(t), id);
    }
    assert!(matches!(
        e.breaker_state(pid(0), instant(t)),
        Some(unbusy_core::breaker::BreakerState::Open { .. })
    ));
    let waiting = e.admit(instant(t + ms(1)), meta(3));
    assert!(actions(&mut e).is_empty(), "must wait, not fail");
    let wake = e.next_wakeup().map(nanos).unwrap();
    assert!(wake <= t + secs(5), "wakes when the breaker probes: {wake}");
    e.on_tick(instant(t + secs(5)));
    let (attempt, p) = sent(&actions(&mut e));
    assert_eq!((attempt, p), (1, 0));
    e.on_outcome(
        instant(t + secs(6)),
        waiting,
        nth(1),
        outcome(OutcomeClass::Success, None),
    );
    assert!(matches!(actions(&mut e)[0], Action::Deliver { .. }));
}

#[test]
fn an_outage_longer_than_the_wait_limit_fails_fast_with_retry_after() {
    let mut c = config(vec![provider("a", 0)]);
    c.breaker.open_ms = 60_000;
    c.breaker.max_open_ms = 60_000;
    c.concurrency.queue_timeout_ms = 10_000;
    let mut e = Engine::new(c, 1).unwrap();
    let mut t = 0;
    for _ in 0..10 {
        t += ms(1);
        let id = e.admit(instant(t), meta(1));
        let (attempt, _) = sent(&actions(&mut e));
        e.on_outcome(
            instant(t),
            id,
            nth(attempt),
            outcome(OutcomeClass::Busy, None),
        );
        actions(&mut e);
        e.cancel(instant(t), id);
    }
    e.admit(instant(t + ms(1)), meta(3));
    match actions(&mut e).as_slice() {
        [Action::Reply { reply, .. }] => {
            assert_eq!(reply.status, 503);
            let retry_after = reply
                .headers
                .iter()
                .find(|(n, _)| *n == "retry-after")
                .map(|(_, v)| v.parse::<u64>().unwrap())
                .unwrap();
            assert!((55..=60).contains(&retry_after), "{retry_after}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn each_attempt_carries_its_providers_rewrites() {
    let mut primary = provider("deepseek", 0);
    primary.api_key = Some("sk-primary".into());
    primary
        .models
        .insert("gpt-4o".into(), "deepseek-chat".into());
    let mut backup = provider("backup", 1);
    backup.cluster = None;
    backup.base_url = Some("https://backup.example/v1".into());
    let mut e = Engine::new(config(vec![primary, backup]), 1).unwrap();
    let id = e.admit(
        instant(0),
        RequestMeta {
            model: "gpt-4o".into(),
            ..meta(1)
        },
    );
    let first = match actions(&mut e).as_slice() {
        [Action::Send(s)] => s.rewrite.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(first.cluster.as_deref(), Some("deepseek"));
    assert_eq!(first.authorization.as_deref(), Some("Bearer sk-primary"));
    assert_eq!(first.model.as_deref(), Some("deepseek-chat"));
    e.on_outcome(
        instant(ms(5)),
        id,
        nth(1),
        outcome(OutcomeClass::Busy, None),
    );
    let second = match actions(&mut e).as_slice() {
        [Action::Send(s)] => s.rewrite.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        second.base_url.as_deref(),
        Some("https://backup.example/v1")
    );
    assert_eq!(second.cluster, None);
    assert_eq!(
        second.authorization, None,
        "the caller's key passes through"
    );
    assert_eq!(second.model, None, "no mapping for this provider");
}

#[test]
fn invalid_config_is_refused() {
    assert!(Engine::new(Config::default(), 1).is_err());
}

/// A random busy world: each attempt ends busy, rate limited, in a server error, a stall, a
/// reset, a caller error or a success, after a random time; callers sometimes cancel.
/// What a random world exercised, so the test can show it had chances to fail.
#[derive(Default)]
struct Exercised {
    stall_aborts: u32,
    cache_answers: u32,
    limit_replies: u32,
}

fn run_world(seed: u64) -> Exercised {
    let mut seen = Exercised::default();
    let mut rng = Rng::with_seed(seed);
    let mut c = config(vec![provider("a", 0), provider("b", 0), provider("c", 1)]);
    c.limits.per_tenant.requests_per_minute = Some(60 + rng.u64(0..120));
    c.retry.max_attempts = 1 + rng.u32(0..5);
    c.providers[0].max_concurrency = Some(1 + rng.u32(0..4));
    c.deadlines.total_ms = 2_000 + rng.u64(0..20_000);
    c.deadlines.first_token_ms = 500 + rng.u64(0..5_000);
    let max_attempts = c.retry.max_attempts;
    let quota = c.providers[0].max_concurrency.unwrap();
    let mut e = Engine::new(c, seed).unwrap();
    let mut now: Nanos = 0;
    // request -> (deadline-ish admitted_at, attempts seen, tenant, cache key)
    let mut admitted: HashMap<RequestId, (Nanos, u32)> = HashMap::new();
    let mut in_flight: Vec<(Nanos, RequestId, u32)> = Vec::new();
    let mut finished = 0;
    // Other workers sharing provider a's quota, and their breaker verdicts (the Envoy host
    // reports both at every tick).
    let mut external = 0u32;
    for step in 0..400u32 {
        now += rng.u64(0..ms(300));
        if rng.u8(0..4) == 0 {
            external = rng.u32(0..=quota);
            e.set_external_in_flight(instant(now), pid(0), external);
        }
        if rng.u8(0..40) == 0 {
            e.pause_provider(
                instant(now),
                pid(rng.usize(0..3)),
                instant(now + rng.u64(0..ms(2_000))),
            );
        }
        if step < 300 && rng.bool() {
            let cached = match rng.u8(0..10) {
                0 => CacheLookup::Fresh,
                1 => CacheLookup::Stale,
                _ => CacheLookup::Miss,
            };
            let id = e.admit(
                instant(now),
                RequestMeta {
                    stream: rng.bool(),
                    cache_key: (cached != CacheLookup::Miss).then_some(CacheKey(u128::from(step))),
                    cached,
                    ..meta(rng.u64(0..5))
                },
            );
            admitted.insert(id, (now, 0));
        }
        if rng.u8(0..20) == 0 {
            if let Some(&(_, id, _)) = in_flight.first() {
                e.cancel(instant(now), id);
                in_flight.retain(|(_, r, _)| *r != id);
                admitted.remove(&id);
            }
        }
        // Attempts that end now.
        let (due, later): (Vec<_>, Vec<_>) = in_flight.into_iter().partition(|(t, _, _)| *t <= now);
        in_flight = later;
        for (_, id, attempt) in due {
            let result = match rng.u8(0..8) {
                0 => outcome(OutcomeClass::Busy, None),
                1 => outcome(OutcomeClass::RateLimited, Some(ms(rng.u64(0..3_000)))),
                2 => outcome(OutcomeClass::ServerError, None),
                3 => classify_fault(TransportFault::Reset),
                4 => outcome(
                    OutcomeClass::CallerError(unbusy_core::classify::CallerErrorKind::BadRequest),
                    None,
                ),
                _ => outcome(OutcomeClass::Success, None),
            };
            if rng.bool() {
                e.on_first_progress(instant(now), id, nth(attempt));
            }
            e.on_outcome(instant(now), id, nth(attempt), result);
        }
        if let Some(t) = e.next_wakeup().map(nanos) {
            if t <= now {
                e.on_tick(instant(now));
            }
        }
        while let Some(action) = e.poll_action() {
            let id = action.request();
            match action {
                Action::Send(s) => {
                    let (admitted_at, attempts) =
                        admitted.get_mut(&id).expect("send for a live request");
                    *attempts += 1;
                    assert_eq!(s.attempt.get(), *attempts, "attempts are numbered in order");
                    assert!(
                        s.attempt.get() <= max_attempts,
                        "attempt {} > max {max_attempts}",
                        s.attempt.get()
                    );
                    assert!(
                        instant(now) < s.deadline,
                        "attempt started at or past the deadline"
                    );
                    assert!(s.deadline <= instant(*admitted_at + secs(22)));
                    // A provider's known quota is never exceeded, counting the other workers'
                    // attempts when a new one starts there.
                    assert!(
                        e.in_flight(pid(0)) <= quota,
                        "{} in flight over a quota of {quota}",
                        e.in_flight(pid(0))
                    );
                    if s.provider == pid(0) {
                        assert!(
                            e.in_flight(pid(0)) + external <= quota,
                            "{} + {external} elsewhere over a quota of {quota}",
                            e.in_flight(pid(0))
                        );
                    }
                    let limit = e.concurrency_limit(pid(s.provider));
                    assert!(limit.is_none_or(|l| l <= 100_000), "limit {limit:?}");
                    // One attempt in six stalls: keep-alive bytes only, no outcome until the
                    // engine aborts it at its first-token deadline (or the request's).
                    let ends = if rng.u8(0..6) == 0 {
                        now + secs(600)
                    } else {
                        now + rng.u64(0..ms(3_000))
                    };
                    in_flight.push((ends, id, s.attempt.get()));
                }
                Action::Abort {
                    attempt, reason, ..
                } => {
                    seen.stall_aborts += u32::from(reason == AbortReason::FirstTokenDeadline);
                    in_flight.retain(|(_, r, a)| !(*r == id && *a == attempt.get()));
                }
                Action::ServeCache { .. } => {
                    seen.cache_answers += 1;
                    assert!(admitted.remove(&id).is_some(), "finished twice: {id:?}");
                    finished += 1;
                }
                Action::Reply { ref reply, .. } if reply.status == 429 => {
                    seen.limit_replies += 1;
                    assert!(admitted.remove(&id).is_some(), "finished twice: {id:?}");
                    in_flight.retain(|(_, r, _)| *r != id);
                    finished += 1;
                }
                Action::Deliver { .. } | Action::Reply { .. } => {
                    assert!(admitted.remove(&id).is_some(), "finished twice: {id:?}");
                    in_flight.retain(|(_, r, _)| *r != id);
                    finished += 1;
                }
            }
        }
        while e.poll_event().is_some() {}
    }
    // Let everything left run out: deadlines end every request.
    for _ in 0..200 {
        now += ms(500);
        for (_, id, attempt) in std::mem::take(&mut in_flight) {
            e.on_outcome(
                instant(now),
                id,
                nth(attempt),
                outcome(OutcomeClass::Busy, None),
            );
        }
        e.on_tick(instant(now));
        while let Some(action) = e.poll_action() {
            match action {
                Action::Send(s) => {
                    assert!(instant(now) < s.deadline);
                    in_flight.push((now, s.request, s.attempt.get()));
                }
                Action::Abort {
                    request, attempt, ..
                } => {
                    in_flight.retain(|(_, r, a)| !(*r == request && *a == attempt.get()));
                }
                other => {
                    admitted.remove(&other.request());
                    finished += 1;
                }
            }
        }
    }
    assert_eq!(
        e.active_requests(),
        0,
        "seed {seed}: requests never finished"
    );
    assert!(
        admitted.is_empty(),
        "seed {seed}: {} requests got no final action",
        admitted.len()
    );
    assert!(finished > 0);
    for p in 0..3 {
        assert_eq!(
            e.in_flight(pid(p)),
            0,
            "seed {seed}: provider {p} leaked a slot"
        );
    }
    seen
}

#[test]
fn invariants_hold_for_every_seed() {
    let mut total = Exercised::default();
    for seed in 0..300 {
        let seen = run_world(seed);
        total.stall_aborts += seen.stall_aborts;
        total.cache_answers += seen.cache_answers;
        total.limit_replies += seen.limit_replies;
    }
    // The worlds held what they promise: stalls the engine cut, cache answers, limits.
    assert!(
        total.stall_aborts >= 100,
        "{} stalls cut",
        total.stall_aborts
    );
    assert!(
        total.cache_answers >= 100,
        "{} cache answers",
        total.cache_answers
    );
    assert!(
        total.limit_replies >= 10,
        "{} limit replies",
        total.limit_replies
    );
}

/// `RequestFinished` carries what the GenAI metrics label and time (issue 15): the provider that
/// answered after a failover, the bounded model label, and for a stream the time from admission
/// to the first chunk that reached the caller.
#[test]
fn a_finished_request_names_its_provider_model_and_first_chunk() {
    use unbusy_core::engine::{Event, RequestOutcome};
    let finished = |e: &mut Engine| {
        let mut found = Vec::new();
        while let Some(ev) = e.poll_event() {
            if let Event::RequestFinished { .. } = ev {
                found.push(ev);
            }
        }
        found
    };
    let mut e = Engine::new(config(vec![provider("a", 0), provider("b", 1)]), 1).unwrap();
    let id = e.admit(
        instant(ms(10)),
        RequestMeta {
            model: "deepseek-v3.2".into(),
            stream: true,
            ..meta(1)
        },
    );
    assert_eq!(sent(&actions(&mut e)), (1, 0));
    e.on_outcome(
        instant(ms(50)),
        id,
        nth(1),
        outcome(OutcomeClass::Busy, None),
    );
    assert_eq!(sent(&actions(&mut e)), (2, 1));
    e.on_first_progress(instant(ms(310)), id, nth(2));
    e.on_outcome(
        instant(ms(900)),
        id,
        nth(2),
        outcome(OutcomeClass::Success, None),
    );
    actions(&mut e);
    assert_eq!(
        finished(&mut e),
        vec![Event::RequestFinished {
            outcome: RequestOutcome::Success,
            attempts: 2,
            latency: ms(890),
            request: id,
            provider: Some(pid(1)),
            model: "deepseek-v3.2".into(),
            first_chunk: Some(ms(300)),
        }]
    );

    // Not a stream: no first chunk. Past 16 distinct unconfigured models: `_OTHER`.
    for n in 0..17 {
        let id = e.admit(
            instant(secs(2)),
            RequestMeta {
                model: format!("model-{n}"),
                ..meta(1)
            },
        );
        actions(&mut e);
        e.on_first_progress(instant(secs(3)), id, nth(1));
        e.on_outcome(
            instant(secs(3)),
            id,
            nth(1),
            outcome(OutcomeClass::Success, None),
        );
        actions(&mut e);
        let events = finished(&mut e);
        let [Event::RequestFinished {
            model, first_chunk, ..
        }] = events.as_slice()
        else {
            panic!("one request finished");
        };
        assert_eq!(*first_chunk, None);
        // ("deepseek-v3.2" took one of the 16.)
        let want = if n < 15 {
            format!("model-{n}")
        } else {
            "_OTHER".into()
        };
        assert_eq!(*model, want);
    }
}
