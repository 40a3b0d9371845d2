//! The engine with the health checks' verdicts as events (`Engine::set_provider_health`): a
//! provider marked down is passed over while another is usable, and taken back once marked up.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;
use support::{actions, instant, meta, nanos, nth, outcome, pid, provider};

use unbusy_core::classify::OutcomeClass;
use unbusy_core::config::Config;
use unbusy_core::engine::{Action, Engine};
use unbusy_core::time::{ms, secs};

fn two() -> Engine {
    let config = Config {
        providers: vec![provider("primary", 0), provider("backup", 1)],
        ..Config::default()
    };
    Engine::new(config, 1).unwrap()
}

/// The provider of the one attempt the engine asks for.
fn sent_to(e: &mut Engine) -> usize {
    match actions(e).as_slice() {
        [Action::Send(s)] => s.provider.index(),
        other => panic!("expected one send, got {other:?}"),
    }
}

#[test]
fn a_provider_marked_down_gets_no_first_attempt_and_is_taken_back_when_up() {
    let mut e = two();
    e.set_provider_health(instant(0), pid(0), false);
    assert!(e.provider_down(pid(0)));
    for i in 0..20 {
        e.admit(instant(ms(i)), meta(i));
        assert_eq!(sent_to(&mut e), 1, "request {i} went to the down primary");
    }
    e.set_provider_health(instant(ms(100)), pid(0), true);
    assert!(!e.provider_down(pid(0)));
    e.admit(instant(ms(100)), meta(99));
    assert_eq!(sent_to(&mut e), 0);
}

#[test]
fn when_every_provider_is_down_they_are_tried_anyway() {
    let mut e = two();
    e.set_provider_health(instant(0), pid(0), false);
    e.set_provider_health(instant(0), pid(1), false);
    e.admit(instant(0), meta(1));
    assert_eq!(
        sent_to(&mut e),
        0,
        "the preferred one, as without health checks"
    );
}

#[test]
fn a_down_provider_is_tried_when_the_other_is_paused() {
    let mut e = two();
    e.set_provider_health(instant(0), pid(0), false);
    e.pause_provider(instant(0), pid(1), instant(secs(10)));
    e.admit(instant(ms(1)), meta(1));
    assert_eq!(sent_to(&mut e), 0);
}

#[test]
fn a_retry_stays_off_the_down_provider() {
    let mut e = two();
    e.set_provider_health(instant(0), pid(0), false);
    let id = e.admit(instant(0), meta(1));
    assert_eq!(sent_to(&mut e), 1);
    e.on_outcome(
        instant(ms(50)),
        id,
        nth(1),
        outcome(OutcomeClass::ServerError, None),
    );
    let mut sends = actions(&mut e);
    while sends.is_empty() {
        let now = e.next_wakeup().map(nanos).expect("a retry is scheduled");
        e.on_tick(instant(now));
        sends = actions(&mut e);
    }
    match sends.as_slice() {
        [Action::Send(s)] => assert_eq!((s.attempt.get(), s.provider.index()), (2, 1)),
        other => panic!("expected the retry, got {other:?}"),
    }
}

#[test]
fn an_unknown_provider_index_is_ignored() {
    let mut e = two();
    e.set_provider_health(instant(0), pid(9), false);
    assert!(!e.provider_down(pid(9)));
    e.admit(instant(0), meta(1));
    assert_eq!(sent_to(&mut e), 0);
}
