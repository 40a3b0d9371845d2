//! The engine's principles (see the `engine` module doc and `docs/engine.md`), each shown on a
//! small world driven by hand: what a user can rely on, not how it is implemented.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;
use support::{actions, instant, nanos, nth, pid, provider};

use unbusy_core::classify::{Classification, OutcomeClass};
use unbusy_core::config::{Config, ProviderConfig};
use unbusy_core::engine::{Action, CacheLookup, Engine, Priority, RequestId, RequestMeta};
use unbusy_core::time::{ms, secs, Nanos};

fn engine(providers: Vec<ProviderConfig>) -> Engine {
    Engine::new(
        Config {
            providers,
            ..Config::default()
        },
        7,
    )
    .unwrap()
}

fn meta(deadline: Option<Nanos>) -> RequestMeta {
    RequestMeta {
        tenant: 1,
        model: "deepseek-chat".into(),
        stream: false,
        priority: Priority::Normal,
        estimated_tokens: 100,
        deadline: deadline.map(instant),
        cache_key: None,
        cached: CacheLookup::Miss,
    }
}

fn sends(a: &[Action]) -> Vec<(RequestId, u32)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Send(s) => Some((s.request, s.attempt.get())),
            _ => None,
        })
        .collect()
}

fn outcome(class: OutcomeClass) -> Classification {
    Classification {
        class,
        retry_after: None,
    }
}

/// Ten requests fail at once: the breaker of a lone provider opens. Returns the time.
fn open_breaker(e: &mut Engine) -> Nanos {
    let mut t = 0;
    for _ in 0..10 {
        t += ms(1);
        let id = e.admit(instant(t), meta(None));
        let s = sends(&actions(e));
        assert_eq!(s.len(), 1);
        e.on_outcome(instant(t), id, nth(1), outcome(OutcomeClass::Busy));
        actions(e);
    }
    assert_eq!(
        e.breaker_state(pid(0), instant(t)).map(|b| b.gauge()),
        Some(2),
        "open"
    );
    t
}

/// Runs the engine's ticks up to `until`, collecting what it sends.
fn tick_until(e: &mut Engine, until: Nanos) -> Vec<(RequestId, u32)> {
    let mut out = Vec::new();
    while let Some(at) = e.next_wakeup().map(nanos).filter(|at| *at <= until) {
        e.on_tick(instant(at));
        out.extend(sends(&actions(e)));
    }
    out
}

#[test]
fn a_slow_provider_that_recovered_gets_its_held_requests_back_within_seconds() {
    let mut e = engine(vec![provider("only", 0)]);
    let t = open_breaker(&mut e);
    // Requests arrive while it is open: held, not failed.
    let held: Vec<RequestId> = (0..40)
        .map(|i| e.admit(instant(t + ms(10 + i)), meta(None)))
        .collect();
    let replies: Vec<Action> = actions(&mut e);
    assert!(replies.is_empty(), "{replies:?}");
    // The provider is back, but answers take 20 s: the first probe stays in flight. The
    // probes allowed double every second while none fails, so within six seconds every held
    // request has been sent.
    let sent = tick_until(&mut e, t + secs(8));
    let mut first_attempts: Vec<RequestId> = sent
        .iter()
        .filter(|(_, a)| *a >= 1)
        .map(|(r, _)| *r)
        .collect();
    first_attempts.sort_unstable();
    first_attempts.dedup();
    let waiting = held
        .iter()
        .filter(|id| !first_attempts.contains(id))
        .count();
    assert!(
        waiting == 0,
        "{waiting} of 40 held requests still waiting 8 s after the breaker half-opened"
    );
}

#[test]
fn a_half_open_probe_goes_to_the_waiting_request_with_the_most_time_left() {
    // One attempt per request, so that the requests that opened the breaker are over.
    let mut config = Config {
        providers: vec![provider("only", 0)],
        ..Config::default()
    };
    config.retry.max_attempts = 1;
    let mut e = Engine::new(config, 7).unwrap();
    let t = open_breaker(&mut e);
    // Held while open: one about to give up, one with time to wait for an answer.
    let hurried = e.admit(instant(t + ms(1)), meta(Some(t + ms(900))));
    let patient = e.admit(instant(t + ms(2)), meta(Some(t + secs(30))));
    assert!(actions(&mut e).is_empty());
    let at = e.next_wakeup().map(nanos).unwrap();
    e.on_tick(instant(at));
    let sent = sends(&actions(&mut e));
    assert_eq!(
        sent,
        vec![(patient, 1)],
        "the probe went to {sent:?}, not {patient:?}"
    );
    // The hurried one gives up at its deadline; the probe is still in flight and answers.
    e.cancel(instant(t + ms(900)), hurried);
    e.on_outcome(
        instant(t + secs(2)),
        patient,
        nth(1),
        outcome(OutcomeClass::Success),
    );
    assert_eq!(
        e.breaker_state(pid(0), instant(t + secs(2)))
            .map(|b| b.gauge()),
        Some(0)
    );
}

#[test]
fn a_first_attempt_is_never_held_back_by_a_learned_limit() {
    let mut e = engine(vec![provider("only", 0)]);
    let ids: Vec<RequestId> = (0..8)
        .map(|i| e.admit(instant(ms(i)), meta(None)))
        .collect();
    assert_eq!(sends(&actions(&mut e)).len(), 8);
    // A bare 429 (no retry hint): the quota signal. The limit learned is 6 of the 7 left in
    // flight, and they fill it.
    e.on_outcome(
        instant(ms(100)),
        ids[0],
        nth(1),
        Classification {
            class: OutcomeClass::RateLimited,
            retry_after: None,
        },
    );
    actions(&mut e);
    assert_eq!(e.concurrency_limit(pid(0)), Some(6));
    // A new request's first attempt still goes at once: a caller without unbusy would send it.
    let fresh = e.admit(instant(ms(101)), meta(None));
    assert_eq!(sends(&actions(&mut e)), vec![(fresh, 1)]);
}

#[test]
fn requests_held_through_an_outage_go_back_in_a_ramp_not_at_once() {
    let mut e = engine(vec![provider("only", 0)]);
    let t = open_breaker(&mut e);
    // 500 requests arrive while it is down: held (a caller without us sent them into the
    // outage, where they failed).
    for i in 0..500 {
        e.admit(instant(t + ms(1) + i), meta(None));
    }
    assert!(sends(&actions(&mut e)).is_empty());
    // It half-opens and its first probe's first byte comes back: it is up again.
    let mut half_open = t;
    let mut probes = Vec::new();
    while probes.is_empty() {
        half_open = e.next_wakeup().map(nanos).unwrap();
        assert!(half_open < t + secs(2), "no probe by {half_open}");
        e.on_tick(instant(half_open));
        probes = sends(&actions(&mut e));
    }
    assert_eq!(probes.len(), 1, "{probes:?}");
    let (probe, attempt) = probes[0];
    let up = half_open + ms(300);
    e.on_first_progress(instant(up), probe, nth(attempt));
    let at_once = sends(&actions(&mut e)).len();
    assert!(
        at_once < 50,
        "{at_once} held requests went in the instant the breaker closed"
    );
    // The ramp doubles: within two seconds every held request has gone, never more than
    // twice as many in flight as a step before.
    let mut in_flight = e.in_flight(pid(0));
    let mut now = up;
    while let Some(at) = e.next_wakeup().map(nanos).filter(|at| *at <= up + secs(2)) {
        now = at;
        e.on_tick(instant(at));
        actions(&mut e);
        let after = e.in_flight(pid(0));
        assert!(
            after <= 2 * in_flight.max(8),
            "{in_flight} -> {after} in flight at {at}"
        );
        in_flight = after;
    }
    // (With the ten whose failures opened the breaker, retrying.)
    assert_eq!(
        e.in_flight(pid(0)),
        510,
        "in flight by {now} (closed at {up})"
    );
}
