//! Engine rules that a host relies on and no other test pins: what the engine reports about
//! itself (its configuration, its requests, who waits for a slot, a provider's cooldown), what
//! it learns from answers (the fastest answer bounds when an attempt may still start), how a
//! shared quota's slots freed by other workers wake waiting requests, and how a provider just
//! back from an outage takes retries. Each test was checked to fail under the mutant of the
//! rule it states (see `make mutants`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;
use support::{actions, instant, meta, nanos, nth, outcome, pid};

use unbusy_core::classify::{Classification, OutcomeClass};
use unbusy_core::config::Config;
use unbusy_core::degrade::Tier;
use unbusy_core::engine::{
    Action, Engine, Event, Priority, RequestId, RequestMeta, RequestOutcome, SendAttempt,
};
use unbusy_core::time::{ms, secs, Instant, Nanos};

fn engine(json: &str) -> Engine {
    let config = Config::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}: {json}"));
    Engine::new(config, 11).unwrap()
}

fn sends(a: &[Action]) -> Vec<SendAttempt> {
    a.iter()
        .filter_map(|a| match a {
            Action::Send(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn the_send(a: &[Action]) -> SendAttempt {
    match sends(a).as_slice() {
        [s] => s.clone(),
        other => panic!("expected one send, got {other:?} among {a:?}"),
    }
}

fn success() -> Classification {
    outcome(OutcomeClass::Success, None)
}

fn busy() -> Classification {
    outcome(OutcomeClass::Busy, None)
}

fn rate_limited(hint: Nanos) -> Classification {
    outcome(OutcomeClass::RateLimited, Some(hint))
}

#[test]
fn the_engine_reports_the_configuration_it_was_built_with() {
    let e = engine(
        r#"{"providers":[{"name":"first","cluster":"a"},{"name":"second","cluster":"b","priority":3}],
            "retry":{"max_attempts":4}}"#,
    );
    let names: Vec<&str> = e
        .config()
        .providers
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(e.config().providers[1].priority, 3);
    assert_eq!(e.config().retry.max_attempts, 4);
}

#[test]
fn requests_are_counted_while_active_and_while_they_wait_for_a_slot() {
    let mut e = engine(r#"{"providers":[{"name":"p","cluster":"p","max_concurrency":1}]}"#);
    assert_eq!((e.active_requests(), e.waiting_for_capacity()), (0, 0));
    let first = e.admit(instant(0), meta(1));
    let sent = the_send(&actions(&mut e));
    assert_eq!(sent.request, first);
    let second = e.admit(instant(ms(1)), meta(2));
    assert_eq!(actions(&mut e), vec![], "the quota's one slot is taken");
    assert_eq!((e.active_requests(), e.waiting_for_capacity()), (2, 1));
    // The first answer frees the slot: the second goes, and waits no longer.
    e.on_outcome(instant(ms(100)), first, sent.attempt, success());
    let next = the_send(&actions(&mut e));
    assert_eq!(next.request, second);
    assert_eq!((e.active_requests(), e.waiting_for_capacity()), (1, 0));
    e.on_outcome(instant(ms(200)), second, next.attempt, success());
    actions(&mut e);
    assert_eq!((e.active_requests(), e.waiting_for_capacity()), (0, 0));
}

#[test]
fn slots_of_a_shared_quota_freed_by_other_workers_send_a_waiting_request_at_once() {
    let mut e = engine(r#"{"providers":[{"name":"p","cluster":"p","max_concurrency":2}]}"#);
    // Other workers hold both slots of the account's quota.
    e.set_external_in_flight(instant(0), pid(0), 2);
    let id = e.admit(instant(ms(1)), meta(1));
    assert_eq!(actions(&mut e), vec![], "no slot left");
    // Reported again, unchanged: still no slot.
    e.set_external_in_flight(instant(ms(2)), pid(0), 2);
    assert_eq!(actions(&mut e), vec![]);
    assert_eq!(e.waiting_for_capacity(), 1);
    // One of them finished: the waiting request goes now, not at some later tick.
    e.set_external_in_flight(instant(ms(3)), pid(0), 1);
    assert_eq!(the_send(&actions(&mut e)).request, id);
}

/// Two providers, the first preferred; retries after 10 to 20 ms.
const TWO: &str = r#"{"providers":[{"name":"a","cluster":"a"},{"name":"b","cluster":"b","priority":1}],
    "retry":{"base_ms":10,"cap_ms":20,"max_attempts":3},"degradation":{"enabled":false}"#;

/// Runs request `id` to its end, answering each attempt at provider `a` with `at_a` and at `b`
/// with `at_b` 1 ms after it is sent, ticking at every wake-up; returns the providers its
/// attempts went to and the time it ended.
fn run(
    e: &mut Engine,
    mut now: Nanos,
    id: RequestId,
    mut pending: Vec<SendAttempt>,
    answer: impl Fn(usize) -> Classification,
) -> (Vec<usize>, Nanos) {
    let mut went = Vec::new();
    for _ in 0..100 {
        if let Some(s) = pending.pop() {
            assert_eq!(s.request, id);
            went.push(s.provider.index());
            now += ms(1);
            e.on_outcome(instant(now), id, s.attempt, answer(s.provider.index()));
        } else if let Some(t) = e.next_wakeup() {
            now = now.max(nanos(t));
            e.on_tick(instant(now));
        } else {
            return (went, now);
        }
        let a = actions(e);
        pending.extend(sends(&a));
        if a.iter()
            .any(|a| matches!(a, Action::Deliver { .. } | Action::Reply { .. }))
        {
            return (went, now);
        }
    }
    panic!("request {id:?} never ended");
}

#[test]
fn after_three_hinted_rate_limits_in_a_row_retries_prefer_other_providers_until_the_hint_passes() {
    let mut e = engine(&format!("{TWO}}}"));
    let mut now = 0;
    // Three requests in a row are refused by `a` with a 2 s hint.
    for i in 0..3 {
        assert_eq!(
            e.cooldown_until(instant(now), pid(0)),
            None,
            "cooling down after {i} hint(s)"
        );
        let id = e.admit(instant(now), meta(i));
        let s = the_send(&actions(&mut e));
        assert_eq!(s.provider.index(), 0);
        now += ms(1);
        e.on_outcome(instant(now), id, s.attempt, rate_limited(secs(2)));
        actions(&mut e);
    }
    let until = now + secs(2);
    assert_eq!(e.cooldown_until(instant(now), pid(0)), Some(instant(until)));
    assert_eq!(
        e.cooldown_until(instant(until - 1), pid(0)),
        Some(instant(until))
    );
    assert_eq!(
        e.cooldown_until(instant(until), pid(0)),
        None,
        "the hint has passed"
    );
    assert_eq!(
        e.cooldown_until(instant(now), pid(1)),
        None,
        "b was never refused"
    );
    assert_eq!(
        e.cooldown_until(instant(now), pid(7)),
        None,
        "no such provider"
    );

    // While `a` cools down, a first attempt still goes to it (a caller would send it anyway);
    // once both providers failed the request, its last retry goes to `b`, not the preferred `a`.
    let id = e.admit(instant(now), meta(10));
    let first = sends(&actions(&mut e));
    assert_eq!(
        first.iter().map(|s| s.provider.index()).collect::<Vec<_>>(),
        [0]
    );
    let (went, end) = run(&mut e, now, id, first, |_| busy());
    assert!(
        end < until,
        "the request ended at {end}, after the cooldown"
    );
    assert_eq!(went, [0, 1, 1], "attempts went to providers {went:?}");

    // After the hint has passed, the same request's last retry goes back to `a`.
    let later = until + ms(1);
    let id = e.admit(instant(later), meta(11));
    let first = sends(&actions(&mut e));
    let (went, _) = run(&mut e, later, id, first, |_| busy());
    assert_eq!(went, [0, 1, 0], "attempts went to providers {went:?}");
}

#[test]
fn an_attempt_never_starts_with_less_time_left_than_the_fastest_answer_seen() {
    let mut e = engine(r#"{"providers":[{"name":"p","cluster":"p"}]}"#);
    // Answers take 1 s, then 1.2 s, 1.4 s, …: the fastest is 1 s.
    let mut now = 0;
    let ask = |e: &mut Engine, now: Nanos, tenant: u64| {
        let id = e.admit(
            instant(now),
            RequestMeta {
                deadline: Some(instant(now + ms(900))),
                ..meta(tenant)
            },
        );
        (id, actions(e))
    };
    for i in 0..20u64 {
        if i == 7 {
            // Seven answers are not enough to judge by: a request with 900 ms left is sent.
            let (id, a) = ask(&mut e, now, 100);
            assert_eq!(the_send(&a).request, id, "held back after {i} answers");
            e.cancel(instant(now), id);
            actions(&mut e);
        }
        let id = e.admit(instant(now), meta(i));
        let s = the_send(&actions(&mut e));
        now += ms(1000 + 200 * (i % 5));
        e.on_outcome(instant(now), id, s.attempt, success());
        actions(&mut e);
    }
    // With twenty answers known (more than the sixteen remembered), none faster than 1 s: a
    // request with 900 ms left cannot be answered in time and is told so at once.
    let (_, a) = ask(&mut e, now, 101);
    assert!(sends(&a).is_empty(), "sent with too little time: {a:?}");
    assert!(
        matches!(a.as_slice(), [Action::Reply { reply, .. }]
            if reply.status == 503 && reply.body.contains("before the deadline")),
        "{a:?}"
    );
    // One with exactly as long left as the fastest answer took still goes.
    let id = e.admit(
        instant(now),
        RequestMeta {
            deadline: Some(instant(now + secs(1))),
            ..meta(103)
        },
    );
    assert_eq!(the_send(&actions(&mut e)).request, id);
    e.cancel(instant(now), id);
    actions(&mut e);
    // One with 1.1 s left still goes.
    let id = e.admit(
        instant(now),
        RequestMeta {
            deadline: Some(instant(now + ms(1100))),
            ..meta(102)
        },
    );
    assert_eq!(the_send(&actions(&mut e)).request, id);
}

/// One provider whose breaker opened at 2 ms (two failures in a row; one attempt per request,
/// no degradation), for `open_ms` 1 s with one probe, ramped or not; `extra` adds top-level
/// members. Returns the engine and when the breaker half-opens.
fn after_an_outage(probe_ramp: bool, extra: &str) -> (Engine, Instant) {
    let mut e = engine(&format!(
        r#"{{"providers":[{{"name":"p","cluster":"p"}}],
            "breaker":{{"consecutive_failures":2,"open_ms":1000,"max_open_ms":1000,
                       "half_open_probes":1,"probe_ramp":{probe_ramp}}},
            "retry":{{"max_attempts":1}},"degradation":{{"enabled":false}}{extra}}}"#
    ));
    for i in 0..2 {
        let id = e.admit(instant(ms(i)), meta(i));
        let s = the_send(&actions(&mut e));
        e.on_outcome(instant(ms(i + 1)), id, s.attempt, busy());
        actions(&mut e);
    }
    let until = e.breaker_open_until(instant(ms(2)), pid(0)).expect("open");
    (e, until)
}

#[test]
fn a_provider_back_from_an_outage_takes_held_requests_back_gradually_and_fresh_ones_at_once() {
    let (mut e, until) = after_an_outage(true, "");
    // Four requests arrive during the outage and wait for the provider.
    for i in 0..4 {
        e.admit(instant(ms(500)), meta(10 + i));
    }
    assert_eq!(actions(&mut e), vec![]);
    // Half-open: one probe; its first real byte closes the breaker.
    e.on_tick(instant(until));
    let probe = the_send(&actions(&mut e));
    e.on_first_progress(instant(until + ms(10)), probe.request, probe.attempt);
    let a = actions(&mut e);
    assert!(sends(&a).is_empty(), "held requests rushed back: {a:?}");
    assert_eq!(
        e.in_flight(pid(0)),
        1,
        "the recovery ramp allows one in flight yet"
    );
    // A fresh request is not one that waited: a caller would send it anyway, and it goes.
    let fresh = e.admit(instant(until + ms(20)), meta(99));
    assert_eq!(the_send(&actions(&mut e)).request, fresh);
    assert_eq!(e.in_flight(pid(0)), 2);
}

#[test]
fn a_probes_first_byte_closes_the_breaker_and_without_a_ramp_every_held_request_goes_at_once() {
    let (mut e, until) = after_an_outage(false, "");
    for i in 0..3 {
        e.admit(instant(ms(500)), meta(10 + i));
    }
    e.on_tick(instant(until));
    let probe = the_send(&actions(&mut e));
    while e.poll_event().is_some() {}
    e.on_first_progress(instant(until + ms(10)), probe.request, probe.attempt);
    let events: Vec<Event> = std::iter::from_fn(|| e.poll_event()).collect();
    assert!(
        events.iter().any(|ev| matches!(
            ev,
            Event::BreakerChanged {
                provider,
                state: 0
            } if *provider == pid(0)
        )),
        "no closed breaker reported: {events:?}"
    );
    assert_eq!(sends(&actions(&mut e)).len(), 2, "the other held requests");
    // A later byte of the same answer changes nothing more.
    e.on_first_progress(instant(until + ms(20)), probe.request, probe.attempt);
    assert_eq!(actions(&mut e), vec![]);
    assert!(
        !std::iter::from_fn(|| e.poll_event()).any(|ev| matches!(ev, Event::BreakerChanged { .. })),
        "a breaker change reported twice"
    );
}

#[test]
fn answers_turning_far_slower_than_usual_raise_the_degradation_tier() {
    let mut e = engine(r#"{"providers":[{"name":"p","cluster":"p"}]}"#);
    // A minute of answers whose first byte comes in 100 to 140 ms, one a second.
    let mut now = 0;
    for i in 0..60u64 {
        now = secs(i);
        let id = e.admit(instant(now), meta(i));
        let s = the_send(&actions(&mut e));
        e.on_first_progress(instant(now + ms(100 + 10 * (i % 5))), id, s.attempt);
        e.on_outcome(instant(now + ms(200)), id, s.attempt, success());
        actions(&mut e);
    }
    assert_eq!(e.tier(), Tier::Normal);
    // Then, within a second, six whose first byte takes 3 s: far outside what was usual.
    let start = now + secs(1);
    let slow: Vec<(RequestId, SendAttempt)> = (0..6)
        .map(|i| {
            let id = e.admit(instant(start + ms(100 * i)), meta(100 + i));
            (id, the_send(&actions(&mut e)))
        })
        .collect();
    for (i, (id, s)) in slow.iter().enumerate() {
        let at = start + ms(100 * i as u64) + secs(3);
        e.on_first_progress(instant(at), *id, s.attempt);
        e.on_outcome(instant(at + ms(10)), *id, s.attempt, success());
        actions(&mut e);
    }
    e.on_tick(instant(start + secs(5)));
    assert_eq!(
        e.tier(),
        Tier::Feature,
        "slow answers did not raise the tier"
    );
    // The change is reported once, as it happened.
    let changes: Vec<Tier> = std::iter::from_fn(|| e.poll_event())
        .filter_map(|ev| match ev {
            Event::TierChanged { tier } => Some(tier),
            _ => None,
        })
        .collect();
    assert_eq!(changes, [Tier::Feature]);
}

#[test]
fn at_its_first_byte_deadline_an_attempt_is_replaced_only_if_a_replacement_could_finish_in_time() {
    let mut e = engine(r#"{"providers":[{"name":"p","cluster":"p"}]}"#);
    // Ten answers: first byte after 100 ms, whole answer after 1 s.
    let mut now = 0;
    for i in 0..10u64 {
        let id = e.admit(instant(now), meta(i));
        let s = the_send(&actions(&mut e));
        e.on_first_progress(instant(now + ms(100)), id, s.attempt);
        now += secs(1);
        e.on_outcome(instant(now), id, s.attempt, success());
        actions(&mut e);
    }
    let ask = |e: &mut Engine, now: Nanos, tenant: u64, left: Nanos| {
        let id = e.admit(
            instant(now),
            RequestMeta {
                deadline: Some(instant(now + left)),
                ..meta(tenant)
            },
        );
        (id, the_send(&actions(e)))
    };
    // Five seconds left when the first byte is overdue: a replacement can still finish (an
    // answer takes 1 s here), so the silent attempt is cut and replaced.
    let (roomy, first) = ask(&mut e, now, 20, secs(5));
    assert!(
        nanos(first.first_token_deadline) < now + secs(4),
        "{first:?}"
    );
    e.on_tick(instant(first.first_token_deadline));
    let a = actions(&mut e);
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::Abort { request, .. } if *request == roomy)),
        "the overdue attempt was not cut: {a:?}"
    );
    e.cancel(instant(first.first_token_deadline), roomy);
    actions(&mut e);
    // Exactly as long left as the fastest answer took: a replacement can still finish.
    let now = first.first_token_deadline.as_nanos() + ms(1);
    let (exact, attempt) = ask(&mut e, now, 22, secs(3));
    assert_eq!(nanos(attempt.first_token_deadline), now + secs(2));
    e.on_tick(instant(attempt.first_token_deadline));
    let a = actions(&mut e);
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::Abort { request, .. } if *request == exact)),
        "the overdue attempt with time for a replacement was not cut: {a:?}"
    );
    e.cancel(instant(attempt.first_token_deadline), exact);
    actions(&mut e);
    let first = attempt;
    // 2.5 s left: when its first byte is overdue (after 2 s, the least a learned wait is), no
    // replacement could finish in the half second left, so the attempt is the request's last chance, as it would be without us: it is left
    // to answer, and its answer is delivered.
    let now = first.first_token_deadline.as_nanos() + ms(1);
    let (tight, attempt) = ask(&mut e, now, 21, ms(2500));
    assert!(
        nanos(attempt.first_token_deadline) < now + ms(2500),
        "{attempt:?}"
    );
    e.on_tick(instant(attempt.first_token_deadline));
    assert_eq!(actions(&mut e), vec![], "the last chance was cut");
    e.on_outcome(instant(now + ms(2400)), tight, attempt.attempt, success());
    let a = actions(&mut e);
    assert!(
        matches!(a.as_slice(), [Action::Deliver { request, .. }] if *request == tight),
        "{a:?}"
    );
}

#[test]
fn after_a_quiet_spell_the_first_seconds_of_failures_do_not_yet_raise_the_tier() {
    // The breaker left out (it would open on the failures), one attempt per request.
    let mut e = engine(
        r#"{"providers":[{"name":"p","cluster":"p"}],
            "breaker":{"consecutive_failures":0,"min_volume":100000},
            "retry":{"max_attempts":1}}"#,
    );
    let answer_at = |e: &mut Engine, t: Nanos, tenant: u64, answer: Classification| {
        let id = e.admit(instant(t), meta(tenant));
        let s = the_send(&actions(e));
        e.on_outcome(instant(t + ms(1)), id, s.attempt, answer);
        actions(e);
    };
    for i in 0..6 {
        answer_at(&mut e, secs(i), i, success());
    }
    // Half a minute without traffic, then ten failures in a second: too early to judge the
    // provider's health (its first seconds of traffic after the quiet spell).
    for i in 0..10 {
        answer_at(&mut e, secs(30) + ms(100 * i), 100 + i, busy());
    }
    e.on_tick(instant(secs(31) + ms(100)));
    assert_eq!(e.tier(), Tier::Normal, "judged on a second of traffic");
    // Failures going on for more than five seconds are judged: the tier rises.
    for i in 0..50 {
        answer_at(&mut e, secs(31) + ms(100 * i), 200 + i, busy());
    }
    e.on_tick(instant(secs(37)));
    assert_ne!(
        e.tier(),
        Tier::Normal,
        "five seconds of failures not judged"
    );
}

#[test]
fn only_hinted_rate_limits_in_a_row_start_a_cooldown_a_success_between_them_resets_the_count() {
    let mut e = engine(&format!("{TWO}}}"));
    let mut now = 0;
    for (i, hinted) in [true, true, false, true, true].into_iter().enumerate() {
        let id = e.admit(instant(now), meta(i as u64));
        let s = the_send(&actions(&mut e));
        assert_eq!(s.provider.index(), 0);
        now += ms(1);
        let answer = if hinted {
            rate_limited(secs(2))
        } else {
            success()
        };
        e.on_outcome(instant(now), id, s.attempt, answer);
        actions(&mut e);
        e.cancel(instant(now), id);
        actions(&mut e);
    }
    assert_eq!(
        e.cooldown_until(instant(now), pid(0)),
        None,
        "four hints, but not three in a row"
    );
    let id = e.admit(instant(now), meta(9));
    let s = the_send(&actions(&mut e));
    now += ms(1);
    e.on_outcome(instant(now), id, s.attempt, rate_limited(secs(2)));
    assert_eq!(
        e.cooldown_until(instant(now), pid(0)),
        Some(instant(now + secs(2))),
        "three in a row"
    );
}

#[test]
fn a_learned_limit_comes_from_bare_429s_only_and_grows_back_with_successes() {
    let mut e = engine(
        r#"{"providers":[{"name":"p","cluster":"p"}],
            "concurrency":{"backoff_ratio":0.5,"decrease_cooldown_ms":1000},
            "retry":{"jitter":"none","base_ms":100,"cap_ms":100},
            "degradation":{"enabled":false}}"#,
    );
    let ids: Vec<RequestId> = (0..8)
        .map(|i| {
            let id = e.admit(instant(0), meta(i));
            the_send(&actions(&mut e));
            id
        })
        .collect();
    // A 429 with a retry hint is a rate limit, not a sign of the account's concurrency.
    e.on_outcome(instant(ms(100)), ids[0], nth(1), rate_limited(secs(1)));
    actions(&mut e);
    assert_eq!(
        e.concurrency_limit(pid(0)),
        None,
        "learned from a hinted 429"
    );
    // A bare one with seven in flight is: 0.5 x 7, rounded down.
    e.on_outcome(
        instant(ms(200)),
        ids[1],
        nth(1),
        outcome(OutcomeClass::RateLimited, None),
    );
    actions(&mut e);
    assert_eq!(e.concurrency_limit(pid(0)), Some(3));
    // Successes while the limit is in use grow it back.
    for (i, id) in ids[2..].iter().enumerate() {
        e.on_outcome(instant(ms(300 + 10 * i as u64)), *id, nth(1), success());
        actions(&mut e);
    }
    assert!(
        e.concurrency_limit(pid(0)) > Some(3),
        "six successes left the limit at {:?}",
        e.concurrency_limit(pid(0))
    );
}

#[test]
fn while_a_probe_is_in_flight_new_requests_wait_for_its_outcome_instead_of_failing() {
    let (mut e, until) = after_an_outage(false, r#","concurrency":{"queue_timeout_ms":100}"#);
    let first = e.admit(instant(until), meta(10));
    let probe = the_send(&actions(&mut e));
    assert_eq!(probe.request, first);
    // The probe takes the one slot: the next request waits for what it shows (the probe is
    // lost only after `open_ms`, beyond the request's 100 ms wait, yet its answer may come
    // sooner).
    let next = e.admit(instant(until + ms(10)), meta(11));
    assert_eq!(
        actions(&mut e),
        vec![],
        "failed while a probe could still bring the provider back"
    );
    e.on_outcome(instant(until + ms(50)), first, probe.attempt, success());
    let a = actions(&mut e);
    assert!(
        sends(&a).iter().any(|s| s.request == next),
        "the waiting request did not go when the probe succeeded: {a:?}"
    );
}

#[test]
fn the_fastest_answer_that_bounds_a_start_is_a_usable_providers() {
    // `a` answers in 100 ms, `b` in 2 s (each seen through requests `a`'s breaker steers).
    let mut e = engine(
        r#"{"providers":[{"name":"a","cluster":"a"},{"name":"b","cluster":"b","priority":1}],
            "breaker":{"consecutive_failures":2,"open_ms":30000,"max_open_ms":30000},
            "retry":{"max_attempts":1},"degradation":{"enabled":false}}"#,
    );
    let mut now = 0;
    let answer = |e: &mut Engine, now: &mut Nanos, tenant: u64, took: Nanos, c: Classification| {
        let id = e.admit(instant(*now), meta(tenant));
        let s = the_send(&actions(e));
        *now += took;
        e.on_outcome(instant(*now), id, s.attempt, c);
        actions(e);
        s.provider.index()
    };
    for i in 0..8 {
        assert_eq!(answer(&mut e, &mut now, i, ms(100), success()), 0);
    }
    // Then, after a quiet second (the breaker trips on failures only once successes stop),
    // two failures in a row open its breaker.
    now += secs(2);
    for i in 0..2 {
        assert_eq!(answer(&mut e, &mut now, 20 + i, ms(1), busy()), 0);
    }
    assert!(
        e.breaker_open_until(instant(now), pid(0)).is_some(),
        "a's breaker is open: {:?}",
        e.breaker_state(pid(0), instant(now))
    );
    for i in 0..8 {
        assert_eq!(answer(&mut e, &mut now, 40 + i, secs(2), success()), 1);
    }
    // One second left: only `a`, which cannot be used, could answer that fast.
    e.admit(
        instant(now),
        RequestMeta {
            deadline: Some(instant(now + secs(1))),
            ..meta(99)
        },
    );
    let a = actions(&mut e);
    assert!(
        sends(&a).is_empty(),
        "sent to a provider that cannot answer in time: {a:?}"
    );
}

/// Who of two requests waiting for a quota's one slot gets it when it frees `free_after` after
/// both arrived: `a`, with `a_left` to its deadline, or `b`, with ten seconds more. With
/// `learned`, the provider's recent answers took 0.5 to 2 s before.
fn who_goes_first(learned: bool, a_left: Nanos, free_after: Nanos) -> &'static str {
    let mut e = engine(
        r#"{"providers":[{"name":"p","cluster":"p","max_concurrency":1}],
            "concurrency":{"queue_timeout_ms":60000},"degradation":{"enabled":false}}"#,
    );
    let mut now = 0;
    if learned {
        for i in 0..8u64 {
            let id = e.admit(instant(now), meta(i));
            let s = the_send(&actions(&mut e));
            now += if i == 0 { secs(2) } else { ms(500 + 100 * i) };
            e.on_outcome(instant(now), id, s.attempt, success());
            actions(&mut e);
        }
    }
    let x = e.admit(instant(now), meta(50));
    let sx = the_send(&actions(&mut e));
    let with_left = |tenant, left| RequestMeta {
        deadline: Some(instant(now + left)),
        ..meta(tenant)
    };
    let a = e.admit(instant(now), with_left(51, a_left));
    let b = e.admit(instant(now), with_left(52, a_left + secs(10)));
    assert_eq!(actions(&mut e), vec![], "the slot is taken");
    e.on_outcome(instant(now + free_after), x, sx.attempt, success());
    let first = sends(&actions(&mut e)).first().map(|s| s.request);
    match first {
        Some(r) if r == a => "a",
        Some(r) if r == b => "b",
        other => panic!("no waiter went: {other:?}"),
    }
}

#[test]
fn a_moving_queue_serves_the_earliest_deadline_first_a_standing_one_the_most_time_left() {
    // The head has waited a tenth, or exactly half, of its time: the queue moves.
    assert_eq!(who_goes_first(false, secs(10), secs(1)), "a");
    assert_eq!(who_goes_first(false, secs(10), secs(5)), "a");
    // More than half: the queue stands, and the request with the most time left goes.
    assert_eq!(who_goes_first(false, secs(10), secs(6)), "b");
    // With answers known to take up to 2 s: the head has 9 s left, or exactly 2 s, and is
    // served first; with 1.5 s left (less than a slow answer takes) the queue stands.
    assert_eq!(who_goes_first(true, secs(10), secs(1)), "a");
    assert_eq!(who_goes_first(true, secs(3), secs(1)), "a");
    assert_eq!(who_goes_first(true, ms(2500), secs(1)), "b");
}

#[test]
fn a_degraded_attempt_caps_max_tokens_only_when_a_cap_is_configured() {
    let capped = engine(
        r#"{"providers":[{"name":"p","cluster":"p"}],"degradation":{"max_tokens_cap":512}}"#,
    );
    assert_eq!(capped.rewrite(pid(0), "m", true).max_tokens_cap, Some(512));
    assert_eq!(capped.rewrite(pid(0), "m", false).max_tokens_cap, None);
    let uncapped =
        engine(r#"{"providers":[{"name":"p","cluster":"p"}],"degradation":{"max_tokens_cap":0}}"#);
    assert_eq!(uncapped.rewrite(pid(0), "m", true).max_tokens_cap, None);
}

/// The engine after slow answers raised the ladder (see the test of that above).
fn after_slow_answers(degradation: &str) -> Engine {
    let mut e = engine(&format!(
        r#"{{"providers":[{{"name":"p","cluster":"p"}}],"degradation":{degradation}}}"#
    ));
    let mut now = 0;
    for i in 0..60u64 {
        now = secs(i);
        let id = e.admit(instant(now), meta(i));
        let s = the_send(&actions(&mut e));
        e.on_first_progress(instant(now + ms(100 + 10 * (i % 5))), id, s.attempt);
        e.on_outcome(instant(now + ms(200)), id, s.attempt, success());
        actions(&mut e);
    }
    assert!(!e.degrades_features(), "degrading at tier {:?}", e.tier());
    let start = now + secs(1);
    for i in 0..6u64 {
        let at = start + ms(100 * i);
        let id = e.admit(instant(at), meta(100 + i));
        let s = the_send(&actions(&mut e));
        e.on_first_progress(instant(at + secs(3)), id, s.attempt);
        e.on_outcome(instant(at + secs(3) + ms(10)), id, s.attempt, success());
        actions(&mut e);
    }
    e.on_tick(instant(start + secs(5)));
    e
}

#[test]
fn features_are_degraded_from_tier_1_and_never_with_degradation_disabled() {
    let enabled = after_slow_answers(r#"{"enabled":true}"#);
    assert_eq!(enabled.tier(), Tier::Feature);
    assert!(enabled.degrades_features());
    let disabled = after_slow_answers(r#"{"enabled":false}"#);
    assert!(!disabled.degrades_features(), "tier {:?}", disabled.tier());
}

/// How request `id` finished, by the engine's `RequestFinished` event.
fn finished_as(e: &mut Engine, id: RequestId) -> Option<RequestOutcome> {
    std::iter::from_fn(|| e.poll_event()).find_map(|ev| match ev {
        Event::RequestFinished {
            request, outcome, ..
        } if request == id => Some(outcome),
        _ => None,
    })
}

#[test]
fn refusals_are_reported_as_what_they_are_rate_limited_shed_or_out_of_time() {
    // A local rate limit's refusal.
    let mut e = engine(
        r#"{"providers":[{"name":"p","cluster":"p"}],
            "limits":{"global":{"requests_per_minute":60,"burst_requests":1}}}"#,
    );
    let first = e.admit(instant(0), meta(1));
    actions(&mut e);
    e.cancel(instant(1), first);
    let refused = e.admit(instant(2), meta(2));
    assert!(
        matches!(actions(&mut e).as_slice(), [Action::Reply { reply, .. }] if reply.status == 429)
    );
    assert_eq!(
        finished_as(&mut e, refused),
        Some(RequestOutcome::RateLimited)
    );

    // A low-priority request shed at tier 1.
    let mut e = after_slow_answers(r#"{"enabled":true}"#);
    while e.poll_event().is_some() {}
    let low = e.admit(
        instant(secs(70)),
        RequestMeta {
            priority: Priority::Low,
            ..meta(3)
        },
    );
    actions(&mut e);
    assert_eq!(finished_as(&mut e, low), Some(RequestOutcome::Shed));

    // A request still waiting for a quota's slot at its deadline: out of time (504).
    let mut e = engine(
        r#"{"providers":[{"name":"p","cluster":"p","max_concurrency":1}],
            "concurrency":{"queue_timeout_ms":60000}}"#,
    );
    e.admit(instant(0), meta(4));
    actions(&mut e);
    let waiting = e.admit(
        instant(0),
        RequestMeta {
            deadline: Some(instant(secs(1))),
            ..meta(5)
        },
    );
    assert_eq!(actions(&mut e), vec![]);
    e.on_tick(instant(secs(1)));
    let a = actions(&mut e);
    assert!(
        matches!(a.as_slice(), [Action::Reply { reply, .. }] if reply.status == 504),
        "{a:?}"
    );
    assert_eq!(
        finished_as(&mut e, waiting),
        Some(RequestOutcome::DeadlineExceeded)
    );
}

#[test]
fn a_half_open_breakers_probe_goes_to_the_held_request_with_the_most_time_left() {
    let (mut e, until) = after_an_outage(false, "");
    // Held through the outage: one with little time left, one with much.
    let with_left = |tenant, left| RequestMeta {
        deadline: Some(instant(ms(500) + left)),
        ..meta(tenant)
    };
    let short = e.admit(instant(ms(500)), with_left(10, secs(2)));
    let long = e.admit(instant(ms(500)), with_left(11, secs(30)));
    assert_eq!(actions(&mut e), vec![]);
    // The probe is the provider's one chance to show it is back: it goes to the request that
    // can wait longest for its answer, not the one about to run out of time.
    e.on_tick(instant(until));
    let probe = the_send(&actions(&mut e));
    assert_eq!(
        probe.request, long,
        "the probe went to {:?} (short: {short:?})",
        probe.request
    );
}

#[test]
fn a_few_slow_answers_among_many_fast_ones_are_no_anomaly() {
    let mut e = engine(r#"{"providers":[{"name":"p","cluster":"p"}]}"#);
    let mut now = 0;
    let answer = |e: &mut Engine, at: Nanos, tenant: u64, first_byte: Nanos| {
        let id = e.admit(instant(at), meta(tenant));
        let s = the_send(&actions(e));
        e.on_first_progress(instant(at + first_byte), id, s.attempt);
        e.on_outcome(instant(at + first_byte + ms(10)), id, s.attempt, success());
        actions(e);
    };
    for i in 0..60u64 {
        now = secs(i);
        answer(&mut e, now, i, ms(100 + 10 * (i % 5)));
    }
    // In the last seconds, forty more fast answers, then the same six slow ones as above:
    // six outliers among fifty-odd answers are below the share that makes latency anomalous.
    let start = now + ms(500);
    for i in 0..40u64 {
        answer(&mut e, start + ms(50 * i), 200 + i, ms(100 + 10 * (i % 5)));
    }
    let slow_from = start + secs(2);
    for i in 0..6u64 {
        answer(&mut e, slow_from + ms(100 * i), 300 + i, secs(3));
    }
    e.on_tick(instant(slow_from + secs(5)));
    assert_eq!(e.tier(), Tier::Normal, "six outliers among many answers");
}

#[test]
fn one_open_breaker_of_two_providers_is_half_the_pressure() {
    let mut e = engine(
        r#"{"providers":[{"name":"a","cluster":"a"},{"name":"b","cluster":"b","priority":1}],
            "breaker":{"consecutive_failures":2,"open_ms":30000,"max_open_ms":30000},
            "retry":{"max_attempts":1}}"#,
    );
    for i in 0..2 {
        let id = e.admit(instant(secs(2) + ms(i)), meta(i));
        let s = the_send(&actions(&mut e));
        e.on_outcome(instant(secs(2) + ms(i) + 1), id, s.attempt, busy());
        actions(&mut e);
    }
    assert!(e
        .breaker_open_until(instant(secs(2) + ms(5)), pid(0))
        .is_some());
    e.on_tick(instant(secs(4)));
    // Half the providers unavailable: tier 1 (its entry is 0.3), not tier 2 (0.6) or 3.
    assert_eq!(e.tier(), Tier::Feature);
}

#[test]
fn a_cooldown_ends_at_its_instant() {
    // Exact retry delays (100 ms each here) to put a retry at the cooldown's last instant.
    let mut e = engine(
        r#"{"providers":[{"name":"a","cluster":"a"},{"name":"b","cluster":"b","priority":1}],
            "retry":{"jitter":"none","base_ms":100,"cap_ms":1000,"max_attempts":3},
            "degradation":{"enabled":false}}"#,
    );
    let mut now = 0;
    for i in 0..3 {
        let id = e.admit(instant(now), meta(i));
        let s = the_send(&actions(&mut e));
        now += ms(1);
        e.on_outcome(instant(now), id, s.attempt, rate_limited(secs(2)));
        actions(&mut e);
        e.cancel(instant(now), id);
        actions(&mut e);
    }
    let until = nanos(
        e.cooldown_until(instant(now), pid(0))
            .expect("cooling down"),
    );
    // Attempts at until - 202 ms (a), - 101 ms (b), then the last one at `until` exactly:
    // the cooldown is over, so it goes to the preferred `a` again.
    let start = until - ms(202);
    let id = e.admit(instant(start), meta(10));
    let first = sends(&actions(&mut e));
    let (went, end) = run(&mut e, start, id, first, |_| busy());
    assert_eq!(
        end,
        until + ms(1),
        "the last attempt was not at the cooldown's end"
    );
    assert_eq!(went, [0, 1, 0], "attempts went to providers {went:?}");
}

#[test]
fn only_a_usable_providers_slow_answers_make_a_queue_stand() {
    // `p` (a quota of one) answered in 1 to 2 s; `q` in 0.5 s, but `q` is paused now.
    let mut e = engine(
        r#"{"providers":[{"name":"p","cluster":"p","max_concurrency":1},
                         {"name":"q","cluster":"q","priority":1}],
            "concurrency":{"queue_timeout_ms":60000},"degradation":{"enabled":false}}"#,
    );
    let mut now = 0;
    let answer = |e: &mut Engine, now: &mut Nanos, tenant: u64, took: Nanos| {
        let id = e.admit(instant(*now), meta(tenant));
        let s = the_send(&actions(e));
        *now += took;
        e.on_outcome(instant(*now), id, s.attempt, success());
        actions(e);
        s.provider.index()
    };
    for i in 0..8u64 {
        let took = if i == 0 { secs(2) } else { secs(1) };
        assert_eq!(answer(&mut e, &mut now, i, took), 0);
    }
    e.pause_provider(instant(now), pid(0), instant(now + secs(10)));
    for i in 0..8u64 {
        assert_eq!(answer(&mut e, &mut now, 20 + i, ms(500)), 1);
    }
    now += secs(10);
    e.pause_provider(instant(now), pid(1), instant(now + secs(600)));
    // Two requests wait for `p`'s slot; when it frees, the first in line has 1.5 s left: less
    // than `p`'s slow answer (2 s), so the queue stands and the other goes first. `q`'s quick
    // answers do not count: it cannot be used.
    let x = e.admit(instant(now), meta(50));
    let sx = the_send(&actions(&mut e));
    assert_eq!(sx.provider.index(), 0);
    let with_left = |tenant, left| RequestMeta {
        deadline: Some(instant(now + left)),
        ..meta(tenant)
    };
    let a = e.admit(instant(now), with_left(51, ms(2500)));
    let b = e.admit(instant(now), with_left(52, ms(12500)));
    assert_eq!(actions(&mut e), vec![], "the slot is taken");
    e.on_outcome(instant(now + secs(1)), x, sx.attempt, success());
    let first = sends(&actions(&mut e)).first().map(|s| s.request);
    assert_eq!(first, Some(b), "a: {a:?}, b: {b:?}");
}

#[test]
fn a_request_waits_for_a_probe_only_if_it_comes_before_its_wait_ends() {
    let (mut e, until) = after_an_outage(false, r#","concurrency":{"queue_timeout_ms":500}"#);
    let until = nanos(until);
    // Its wait would end exactly when the breaker half-opens: too late, it fails at once.
    let late = e.admit(instant(until - ms(500)), meta(10));
    let a = actions(&mut e);
    assert!(
        matches!(a.as_slice(), [Action::Reply { request, reply }] if *request == late && reply.status == 503),
        "{a:?}"
    );
    // A nanosecond later, the probe comes before its wait ends: it waits and is the probe.
    let waits = e.admit(instant(until - ms(500) + 1), meta(11));
    assert_eq!(actions(&mut e), vec![]);
    e.on_tick(instant(until));
    assert_eq!(the_send(&actions(&mut e)).request, waits);
}

#[test]
fn at_tier_3_a_request_is_failed_fast_unless_a_probe_comes_before_its_wait_ends() {
    // Degradation on: with the only breaker open, the ladder is at tier 3.
    let mut e = engine(
        r#"{"providers":[{"name":"p","cluster":"p"}],
            "breaker":{"consecutive_failures":2,"open_ms":5000,"max_open_ms":5000},
            "retry":{"max_attempts":1},"concurrency":{"queue_timeout_ms":1000}}"#,
    );
    for i in 0..2 {
        let id = e.admit(instant(ms(i)), meta(i));
        let s = the_send(&actions(&mut e));
        e.on_outcome(instant(ms(i + 1)), id, s.attempt, busy());
        actions(&mut e);
    }
    let until = nanos(e.breaker_open_until(instant(ms(2)), pid(0)).expect("open"));
    // Its wait would end exactly when the breaker half-opens: no help in time, failed fast
    // (the ladder's answer: come back after its dwell time).
    let at = until - secs(1);
    e.admit(instant(at), meta(10));
    assert_eq!(e.tier(), Tier::Service);
    let a = actions(&mut e);
    assert!(
        matches!(a.as_slice(), [Action::Reply { reply, .. }]
            if reply.status == 503 && reply.body.contains("all providers are overloaded")),
        "{a:?}"
    );
    // A nanosecond later, the probe comes in time: held for it.
    let held = e.admit(instant(at + 1), meta(11));
    assert_eq!(actions(&mut e), vec![]);
    e.on_tick(instant(until));
    assert_eq!(the_send(&actions(&mut e)).request, held);
}
