//! The engine with the health checks' verdicts as events (`Engine::set_provider_health`): a
//! provider marked down is passed over while another is usable, and taken back once marked up.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod support;
use support::{actions, meta, outcome, provider};

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
        [Action::Send(s)] => s.provider,
        other => panic!("expected one send, got {other:?}"),
    }
}

#[test]
fn a_provider_marked_down_gets_no_first_attempt_and_is_taken_back_when_up() {
    let mut e = two();
    e.set_provider_health(0, 0, false);
    assert!(e.provider_down(0));
    for i in 0..20 {
        e.admit(ms(i), meta(i));
        assert_eq!(sent_to(&mut e), 1, "request {i} went to the down primary");
    }
    e.set_provider_health(ms(100), 0, true);
    assert!(!e.provider_down(0));
    e.admit(ms(100), meta(99));
    assert_eq!(sent_to(&mut e), 0);
}

#[test]
fn when_every_provider_is_down_they_are_tried_anyway() {
    let mut e = two();
    e.set_provider_health(0, 0, false);
    e.set_provider_health(0, 1, false);
    e.admit(0, meta(1));
    assert_eq!(
        sent_to(&mut e),
        0,
        "the preferred one, as without health checks"
    );
}

#[test]
fn a_down_provider_is_tried_when_the_other_is_paused() {
    let mut e = two();
    e.set_provider_health(0, 0, false);
    e.pause_provider(0, 1, secs(10));
    e.admit(ms(1), meta(1));
    assert_eq!(sent_to(&mut e), 0);
}

#[test]
fn a_retry_stays_off_the_down_provider() {
    let mut e = two();
    e.set_provider_health(0, 0, false);
    let id = e.admit(0, meta(1));
    assert_eq!(sent_to(&mut e), 1);
    e.on_outcome(ms(50), id, 1, outcome(OutcomeClass::ServerError, None));
    let mut sends = actions(&mut e);
    while sends.is_empty() {
        let now = e.next_wakeup().expect("a retry is scheduled");
        e.on_tick(now);
        sends = actions(&mut e);
    }
    match sends.as_slice() {
        [Action::Send(s)] => assert_eq!((s.attempt, s.provider), (2, 1)),
        other => panic!("expected the retry, got {other:?}"),
    }
}

#[test]
fn an_unknown_provider_index_is_ignored() {
    let mut e = two();
    e.set_provider_health(0, 9, false);
    assert!(!e.provider_down(9));
    e.admit(0, meta(1));
    assert_eq!(sent_to(&mut e), 0);
}
