//! Property tests: the invariants each policy promises, checked over generated inputs.
//! Failing cases are saved under `core/tests/properties.proptest-regressions` and replayed.

// Test helpers may panic: a panic here is a failing test, not a dead proxy.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use proptest::prelude::*;
use unbusy_core::anomaly::RollingStats;
use unbusy_core::backoff::{Backoff, GiveUp, Jitter, Schedule};
use unbusy_core::breaker::{BreakerSettings, BreakerState, CircuitBreaker};
use unbusy_core::bucket::{Decision, KeyedBuckets, Rate, TokenBucket};
use unbusy_core::budget::{BudgetSettings, RetryBudget};
use unbusy_core::cache_key::{cache_key, Canonicalizer, KeyRequest, NotCacheable, OptIn};
use unbusy_core::choice::{choose, Candidate, Choice, Tried};
use unbusy_core::classify::{self, BodyProgress, BreakerSignal, OutcomeClass, Response};
use unbusy_core::concurrency::{AimdLimit, ConcurrencySettings, Release};
use unbusy_core::config::Config;
use unbusy_core::degrade::{Ladder, LadderSettings, Tier};
use unbusy_core::progress::{Framing, ProgressDetector};
use unbusy_core::reply::{local_reply, ReplyKind};
use unbusy_core::throttle::{AdaptiveThrottle, ThrottleSettings};
use unbusy_core::time::{ms, secs, Nanos, SECOND};
use unbusy_core::Rng;

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
        Just(Jitter::None)
    ]
}

// ---------------------------------------------------------------- classification

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("retry-after".to_string()),
        Just("Retry-After-Ms".to_string()),
        Just("x-ratelimit-reset-requests".to_string()),
        Just("x-ratelimit-reset-tokens".to_string()),
        Just("x-ratelimit-remaining-tokens".to_string()),
        "[a-z-]{1,20}",
    ]
}

/// Formats Unix seconds as an IMF-fixdate, to round-trip the parser.
fn imf_fixdate(unix: u64) -> String {
    let days = unix / 86_400;
    let rem = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {day:02} {} {year:04} {:02}:{:02}:{:02} GMT",
        months[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

proptest! {
    #[test]
    fn classification_never_panics_and_caller_errors_are_final(
        status in 0u16..1000,
        headers in proptest::collection::vec((header_name(), ".{0,30}"), 0..6),
        body in proptest::collection::vec(any::<u8>(), 0..600),
        keepalive in any::<bool>(),
    ) {
        let headers: Vec<(&str, &str)> =
            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let c = classify::classify(&Response {
            status,
            headers: &headers,
            body_prefix: &body,
            progress: if keepalive { BodyProgress::KeepAliveOnly } else { BodyProgress::Real },
            unix_now_s: Some(1_800_000_000),
        });
        if let OutcomeClass::CallerError(_) = c.class {
            prop_assert!(!c.class.is_retryable());
            prop_assert!((400..500).contains(&status));
        }
        if c.class == OutcomeClass::Success {
            prop_assert!((200..300).contains(&status));
        }
        if let Some(hint) = c.retry_after {
            prop_assert!(hint <= 24 * 3600 * SECOND);
        }
    }

    #[test]
    fn http_dates_round_trip(unix in 0u64..4_102_444_800) {
        prop_assert_eq!(classify::parse_http_date(&imf_fixdate(unix)), Some(unix));
    }

    #[test]
    fn delta_seconds_hint(secs_value in 0u64..100_000) {
        let v = secs_value.to_string();
        prop_assert_eq!(
            classify::retry_hint(&[("retry-after", v.as_str())], None),
            Some(secs(secs_value).min(24 * 3600 * SECOND))
        );
    }
}

// ---------------------------------------------------------------- backoff

proptest! {
    #[test]
    fn delays_respect_their_jitter(
        seed in any::<u64>(),
        base_ms in 1u64..2_000,
        cap_factor in 1u64..100,
        retry in 1u32..40,
        previous in 0u64..100_000_000_000,
        jitter in jitter(),
    ) {
        let b = Backoff::DEFAULT
            .with_base(ms(base_ms))
            .with_cap(ms(base_ms * cap_factor))
            .with_jitter(jitter);
        let mut rng = Rng::with_seed(seed);
        let d = b.delay(retry, previous, &mut rng);
        let exp = b.exponential(retry);
        prop_assert!(d <= b.cap);
        match jitter {
            Jitter::Full => prop_assert!(d <= exp),
            Jitter::Equal => prop_assert!(d >= exp / 2 && d <= exp),
            Jitter::Decorrelated => prop_assert!(d >= b.base),
            Jitter::None => prop_assert_eq!(d, exp),
        }
    }

    #[test]
    fn schedules_never_reach_the_deadline_nor_exceed_attempts(
        seed in any::<u64>(),
        now in 0u64..1_000_000_000_000,
        budget_left in 0u64..120_000_000_000,
        next_attempt in 0u32..10,
        max_attempts in 1u32..8,
        hint in proptest::option::of(0u64..200_000_000_000),
        jitter in jitter(),
    ) {
        let b = Backoff::DEFAULT.with_max_attempts(max_attempts).with_jitter(jitter);
        let deadline = now + budget_left;
        let mut rng = Rng::with_seed(seed);
        match b.schedule(now, deadline, next_attempt, 0, hint, &mut rng) {
            Schedule::RetryAt { at, delay } => {
                prop_assert!(at < deadline);
                prop_assert_eq!(at, now + delay);
                prop_assert!(next_attempt <= max_attempts && next_attempt >= 2);
                if let Some(h) = hint {
                    prop_assert!(delay >= h && h <= b.max_hint);
                }
            }
            Schedule::GiveUp(GiveUp::HintTooLong(h)) => prop_assert!(h > b.max_hint),
            Schedule::GiveUp(_) => {}
        }
    }
}

// ---------------------------------------------------------------- retry budget

proptest! {
    #[test]
    fn retries_stay_within_ratio_of_traffic_plus_floor(
        events in proptest::collection::vec((0u64..2_000, any::<bool>()), 1..400),
        ratio_permille in 0u32..1000,
        min_per_second in 0u32..3,
    ) {
        let settings = BudgetSettings { window: secs(10), ratio_permille, min_per_second };
        let mut budget = RetryBudget::new(settings);
        let bucket = secs(1);
        let mut now = 0;
        // (epoch, is_deposit) of everything that happened, to recount each window.
        let mut log: Vec<(u64, bool)> = Vec::new();
        for (step_ms, is_deposit) in events {
            now += ms(step_ms);
            let epoch = now / bucket;
            if is_deposit {
                budget.deposit(now);
                log.push((epoch, true));
            } else if budget.try_withdraw(now) {
                log.push((epoch, false));
                let live = |e: u64| e + 10 > epoch;
                let deposits = log.iter().filter(|(e, d)| *d && live(*e)).count() as i64;
                let retries = log.iter().filter(|(e, d)| !*d && live(*e)).count() as i64;
                let reserve = i64::from(min_per_second) * 10 * 1000;
                prop_assert!(
                    retries * 1000 <= reserve + deposits * i64::from(ratio_permille),
                    "{retries} retries against {deposits} deposits"
                );
            }
        }
    }
}

// ---------------------------------------------------------------- token buckets

proptest! {
    #[test]
    fn gcra_never_admits_more_than_burst_plus_rate(
        amount in 1u64..1_000,
        burst_extra in 0u64..1_000,
        steps in proptest::collection::vec((0u64..500, 1u64..50), 1..200),
    ) {
        let rate = Rate::per_second(amount).with_burst(amount + burst_extra);
        let mut bucket = TokenBucket::new(rate);
        let mut now = secs(100);
        let mut admitted: Vec<(Nanos, u64)> = Vec::new();
        for (step_ms, cost) in steps {
            now += ms(step_ms);
            match bucket.take(now, cost) {
                Decision::Allowed => admitted.push((now, cost)),
                Decision::NotUntil(t) => {
                    prop_assert!(t > now);
                    // Waiting until T is enough (nothing else was admitted meanwhile).
                    prop_assert!(bucket.check(t, cost).is_allowed());
                }
                Decision::Never => prop_assert!(cost > rate.burst),
            }
        }
        for i in 0..admitted.len() {
            let mut total = 0u64;
            for j in i..admitted.len() {
                total += admitted[j].1;
                let elapsed = admitted[j].0 - admitted[i].0;
                let refill = (u128::from(elapsed) * u128::from(amount) / u128::from(SECOND)) as u64;
                prop_assert!(total <= rate.burst + refill + 1, "{total} in {elapsed} ns");
            }
        }
    }

    #[test]
    fn keyed_buckets_keep_fixed_memory_and_isolate_live_keys(
        keys in proptest::collection::vec(any::<u64>(), 1..2_000),
    ) {
        let mut table = KeyedBuckets::new(Rate::per_second(1), 64);
        for (i, key) in keys.iter().enumerate() {
            let _ = table.take(*key, secs(1) + i as u64, 1);
        }
        prop_assert_eq!(table.capacity(), 64);
        // A key that just spent its only token is refused right after, whatever came before.
        let key = keys[0] ^ 0x5555;
        prop_assert!(table.take(key, secs(10), 1).is_allowed());
        prop_assert!(!table.take(key, secs(10), 1).is_allowed());
    }
}

// ---------------------------------------------------------------- throttle, concurrency

proptest! {
    #[test]
    fn throttle_probability_is_bounded(
        events in proptest::collection::vec((0u64..3_000, any::<bool>()), 0..500),
        seed in any::<u64>(),
    ) {
        let settings = ThrottleSettings::default();
        let mut t = AdaptiveThrottle::new(settings);
        let mut rng = Rng::with_seed(seed);
        let mut now = 0;
        for (step, accepted) in events {
            now += ms(step);
            let p = t.reject_probability(now);
            prop_assert!((0.0..=settings.max_reject).contains(&p));
            if !t.should_reject(now, &mut rng) {
                t.on_outcome(now, accepted);
            }
        }
    }

    #[test]
    fn concurrency_limit_holds_bounds_and_slots(
        ops in proptest::collection::vec((0u8..4, 0u64..2_000), 0..600),
        min in 1u32..4,
        extra in 0u32..50,
    ) {
        let settings = ConcurrencySettings {
            min: f64::from(min),
            max: f64::from(min + extra),
            ..ConcurrencySettings::default()
        };
        let mut l = AimdLimit::learned(settings, f64::from(min + extra / 2));
        let mut now = 0;
        for (op, step) in ops {
            now += ms(step);
            match op {
                0 => {
                    let before = l.in_flight();
                    if l.try_acquire(now) {
                        prop_assert!(before < l.limit(now));
                    }
                }
                1 if l.in_flight() > 0 => l.release(now, Release::Success(ms(step))),
                2 if l.in_flight() > 0 => l.release(now, Release::Overload),
                3 if l.in_flight() > 0 => l.release(now, Release::Neutral),
                _ => {}
            }
            // A learned limit binds within its bounds, or (forgotten) not at all.
            prop_assert!(!l.binds(now) || (l.limit(now) >= min && l.limit(now) <= min + extra));
        }
    }
}

// ---------------------------------------------------------------- breaker, choice

proptest! {
    #[test]
    fn breaker_blocks_while_open_and_limits_probes(
        limit in 2u32..5,
        probe_successes in 1u32..6,
        events in proptest::collection::vec((0u8..6, 0u64..700, 0u8..3, any::<usize>()), 0..400),
    ) {
        // Explicit settings (not the defaults): several probes at once, a short open period.
        let settings = BreakerSettings {
            window: secs(10),
            min_volume: 5,
            min_success_rate: 0.5,
            consecutive_failures: 3,
            open_for: secs(1),
            max_open_for: secs(4),
            half_open_probes: limit,
            probe_successes,
            probe_ramp: false,
        };
        check_breaker_probes(settings, &events)?;
    }

    #[test]
    fn choice_picks_an_eligible_provider_of_the_best_tier(
        cands in proptest::collection::vec(
            (0u32..3, 0u32..4, 0u32..20, any::<bool>(), any::<bool>()), 1..8),
        tried_bits in any::<u8>(),
        seed in any::<u64>(),
    ) {
        let cands: Vec<Candidate> = cands
            .into_iter()
            .map(|(priority, weight, outstanding, breaker_allows, has_room)| Candidate {
                priority, weight, outstanding, breaker_allows, has_room,
            })
            .collect();
        let mut tried = Tried::default();
        for i in 0..cands.len() {
            if tried_bits & (1 << i) != 0 {
                tried.insert(i);
            }
        }
        let mut rng = Rng::with_seed(seed);
        let usable = |c: &Candidate| c.breaker_allows && c.has_room && c.weight > 0;
        match choose(&cands, tried, &mut rng) {
            Choice::Provider(i) => {
                let c = &cands[i];
                prop_assert!(usable(c));
                let untried_usable: Vec<&Candidate> = cands
                    .iter()
                    .enumerate()
                    .filter(|(j, c)| !tried.contains(*j) && usable(c))
                    .map(|(_, c)| c)
                    .collect();
                if !untried_usable.is_empty() {
                    prop_assert!(!tried.contains(i), "chose a tried provider over untried ones");
                    let best = untried_usable.iter().map(|c| c.priority).min();
                    prop_assert_eq!(Some(c.priority), best);
                }
            }
            Choice::WaitForCapacity => {
                prop_assert!(cands.iter().any(|c| c.breaker_allows && c.weight > 0 && !c.has_room));
            }
            Choice::NoneAvailable => prop_assert!(!cands.iter().any(usable)),
        }
    }
}

// ---------------------------------------------------------------- progress

/// The signal an event's outcome carries.
fn breaker_signal(what: u8) -> BreakerSignal {
    match what {
        0 => BreakerSignal::Success,
        1 => BreakerSignal::Failure,
        _ => BreakerSignal::Ignore,
    }
}

/// Drives a breaker through `events` (what, step in ms, outcome, which probe), holding the
/// probes let through while half-open across other events, and checks it against a model:
/// nothing passes while open; while half-open exactly `half_open_probes` probes are in flight
/// at most, a probe is refused only when that many are, and the breaker's own count is the
/// number really in flight; a probe whose outcome has not come after `open_for` is lost (the
/// breaker lets a new one through and the model forgets the old ones, whose outcomes then never
/// arrive). Attempts let through while closed get their outcome at once. When the half-open
/// episode ends (a failure re-opens, enough successes close), the probes still in flight
/// report at once. Returns the most probes that were in flight at once.
fn check_breaker_probes(
    settings: BreakerSettings,
    events: &[(u8, u64, u8, usize)],
) -> Result<u32, TestCaseError> {
    let mut b = CircuitBreaker::new(settings);
    let mut now = 0;
    // The probes in flight (when each was let through), and the episode's successes so far.
    let mut probes: Vec<Nanos> = Vec::new();
    let mut successes = 0u32;
    let mut last_probe = 0;
    let mut most = 0u32;
    for &(op, step, what, pick) in events {
        now += ms(step);
        match op {
            0..=2 => {
                let state = b.state(now);
                let allowed = b.try_acquire(now);
                match state {
                    BreakerState::Open { until } => {
                        prop_assert!(now < until);
                        prop_assert!(!allowed, "let through while open");
                    }
                    BreakerState::Closed => {
                        prop_assert!(allowed, "refused while closed");
                        prop_assert!(probes.is_empty());
                        b.on_outcome(now, breaker_signal(what));
                    }
                    BreakerState::HalfOpen { .. } => {
                        let lost = !probes.is_empty() && now - last_probe >= settings.open_for;
                        let room = (probes.len() as u32) < settings.half_open_probes;
                        prop_assert_eq!(
                            allowed,
                            room || lost,
                            "{} probes in flight, lost: {}",
                            probes.len(),
                            lost
                        );
                        if allowed {
                            if lost {
                                probes.clear();
                            }
                            probes.push(now);
                            last_probe = now;
                        }
                    }
                }
            }
            3 | 4 if !probes.is_empty() => {
                probes.remove(pick % probes.len());
                let signal = breaker_signal(what);
                b.on_outcome(now, signal);
                match signal {
                    BreakerSignal::Failure => {
                        let open =
                            matches!(b.state(now), BreakerState::Open { until } if until > now);
                        prop_assert!(open, "a failed probe did not re-open it");
                    }
                    BreakerSignal::Success => {
                        successes += 1;
                        if successes >= settings.probe_successes {
                            prop_assert_eq!(b.state(now), BreakerState::Closed);
                        } else {
                            let still = matches!(b.state(now), BreakerState::HalfOpen { .. });
                            prop_assert!(
                                still,
                                "closed after {} of {} successes",
                                successes,
                                settings.probe_successes
                            );
                        }
                    }
                    BreakerSignal::Ignore => {}
                }
                if !matches!(b.state(now), BreakerState::HalfOpen { .. }) {
                    // The episode is over: the other probes' outcomes arrive now.
                    for i in 0..std::mem::take(&mut probes).len() {
                        let before = b.state(now);
                        b.on_outcome(now, breaker_signal(what.wrapping_add(i as u8) % 3));
                        if let BreakerState::Open { .. } = before {
                            prop_assert_eq!(
                                b.state(now),
                                before,
                                "an outcome changed an open breaker"
                            );
                        }
                    }
                }
            }
            _ => {}
        }
        if !matches!(b.state(now), BreakerState::HalfOpen { .. }) {
            successes = 0;
        }
        if let BreakerState::HalfOpen {
            probes: counted, ..
        } = b.state(now)
        {
            prop_assert_eq!(
                counted,
                probes.len() as u32,
                "the breaker's count of probes in flight"
            );
        }
        prop_assert!(probes.len() as u32 <= settings.half_open_probes);
        most = most.max(probes.len() as u32);
    }
    Ok(most)
}

#[test]
fn a_half_open_breaker_lets_exactly_its_probes_through_at_once() {
    let settings = BreakerSettings {
        window: secs(10),
        min_volume: 5,
        min_success_rate: 0.5,
        consecutive_failures: 3,
        open_for: secs(1),
        max_open_for: secs(4),
        half_open_probes: 3,
        probe_successes: 2,
        probe_ramp: false,
    };
    // Three failures open it; after a second, three probes go at once and a fourth waits; one
    // proving nothing frees its slot; a success keeps it half-open, a second closes it.
    let events = [
        (0, 0, 1, 0),
        (0, 1, 1, 0),
        (0, 1, 1, 0),
        (0, 1000, 0, 0),
        (0, 1, 0, 0),
        (0, 1, 0, 0),
        (1, 1, 0, 0),
        (3, 1, 2, 0),
        (0, 1, 0, 0),
        (3, 1, 0, 0),
        (3, 1, 0, 0),
        (0, 1, 0, 0),
    ];
    assert_eq!(check_breaker_probes(settings, &events).unwrap(), 3);
    let mut b = CircuitBreaker::new(settings);
    for i in 0..3 {
        assert!(b.try_acquire(ms(i)));
        b.on_outcome(ms(i), BreakerSignal::Failure);
    }
    let t = ms(2) + secs(1);
    assert!((0..3).all(|_| b.try_acquire(t)));
    assert!(
        !b.try_acquire(t),
        "a fourth probe while three are in flight"
    );
    b.on_outcome(t, BreakerSignal::Ignore);
    assert!(b.try_acquire(t));
    assert!(!b.try_acquire(t));
}

fn keepalive_piece() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just(": keep-alive\n\n"),
        Just("\n"),
        Just("\r\n"),
        Just(":\r\n"),
        Just("event: ping\n"),
        Just("data:   \n"),
        Just("id: 7\r\n\r\n"),
    ]
}

proptest! {
    #[test]
    fn keepalive_never_counts_and_splits_do_not_matter(
        pieces in proptest::collection::vec(keepalive_piece(), 0..30),
        with_data in any::<bool>(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut body = pieces.concat();
        if with_data {
            body.push_str("data: {\"choices\":[]}\n\n");
        }
        let bytes = body.as_bytes();
        let mut whole = ProgressDetector::new(Framing::Sse, 0);
        whole.feed(1, bytes);
        prop_assert_eq!(whole.has_progressed(), with_data);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        let mut split = ProgressDetector::new(Framing::Sse, 0);
        for w in points.windows(2) {
            split.feed(1, &bytes[w[0]..w[1]]);
        }
        prop_assert_eq!(split.has_progressed(), with_data);
    }

    #[test]
    fn detector_never_panics_on_bytes(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20),
        sse in any::<bool>(),
    ) {
        let mut d = ProgressDetector::new(if sse { Framing::Sse } else { Framing::Json }, 0);
        for (i, c) in chunks.iter().enumerate() {
            d.feed(i as u64, c);
        }
        prop_assert!(d.keepalive_bytes() <= d.bytes());
    }
}

// ---------------------------------------------------------------- degradation, anomaly

proptest! {
    #[test]
    fn ladder_respects_dwell(
        pressures in proptest::collection::vec((0u64..5_000, 0.0f64..1.0), 1..300),
    ) {
        let settings = LadderSettings::default();
        let mut ladder = Ladder::new(settings);
        let mut now = 0;
        let mut last_change: Option<Nanos> = None;
        let mut tier = Tier::Normal;
        for (step, p) in pressures {
            now += ms(step);
            let next = ladder.update(now, p);
            if next != tier {
                if let Some(t) = last_change {
                    prop_assert!(now - t >= settings.min_dwell);
                }
                if next < tier {
                    // Recovery goes one tier at a time.
                    prop_assert_eq!(next.level() + 1, tier.level());
                }
                last_change = Some(now);
                tier = next;
            }
        }
    }

    #[test]
    fn rolling_stats_match_a_naive_computation(
        samples in proptest::collection::vec(-1e6f64..1e6, 1..100),
    ) {
        let mut s: RollingStats<16> = RollingStats::new();
        for x in &samples {
            s.push(*x);
        }
        let window: Vec<f64> = samples.iter().rev().take(16).copied().collect();
        let n = window.len() as f64;
        let mean = window.iter().sum::<f64>() / n;
        let var = window.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        prop_assert!((s.mean() - mean).abs() <= 1e-6 * (1.0 + mean.abs()));
        prop_assert!((s.std_dev() - var.sqrt()).abs() <= 1e-3 * (1.0 + var.sqrt()));
    }
}

// ---------------------------------------------------------------- cache keys

/// JSON values as generated text with members in a chosen order and optional whitespace.
#[derive(Debug, Clone)]
enum J {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

fn json_value() -> impl Strategy<Value = J> {
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::Int),
        (-1e30f64..1e30).prop_map(J::Float),
        "\\PC{0,12}".prop_map(J::Str),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(J::Arr),
            proptest::collection::btree_map("[a-z\\u{e9}\\u{1F600}]{1,6}", inner, 0..6)
                .prop_map(|m| J::Obj(m.into_iter().collect())),
        ]
    })
}

fn write_json(v: &J, reverse: bool, ws: &str, out: &mut String) {
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Int(i) => out.push_str(&i.to_string()),
        J::Float(f) => out.push_str(&format!("{f:e}")),
        J::Str(s) => out.push_str(&serde_json::to_string(s).unwrap()),
        J::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    out.push_str(ws);
                }
                write_json(item, reverse, ws, out);
            }
            out.push(']');
        }
        J::Obj(members) => {
            out.push('{');
            out.push_str(ws);
            let order: Vec<&(String, J)> = if reverse {
                members.iter().rev().collect()
            } else {
                members.iter().collect()
            };
            for (i, (k, v)) in order.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                // Escape every key's first char differently in the two spellings.
                if reverse {
                    let mut chars = k.chars();
                    let first = chars.next().unwrap();
                    let mut units = [0u16; 2];
                    out.push('"');
                    for u in first.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                    out.push_str(chars.as_str());
                    out.push('"');
                } else {
                    out.push_str(&serde_json::to_string(k).unwrap());
                }
                out.push_str(ws);
                out.push(':');
                write_json(v, reverse, ws, out);
            }
            out.push_str(ws);
            out.push('}');
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn cache_key_never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = cache_key(&KeyRequest {
            tenant: b"t",
            endpoint: "/v1/chat/completions",
            body: &body,
            opt_in: OptIn::Always,
        });
        let _ = Config::from_json(&body);
    }

    #[test]
    fn key_ignores_member_order_whitespace_and_escapes(fields in proptest::collection::btree_map("[a-z]{1,8}", json_value(), 0..8)) {
        let members: Vec<(String, J)> = fields.into_iter().collect();
        let doc = J::Obj(members);
        let (mut a, mut b) = (String::new(), String::new());
        write_json(&doc, false, "", &mut a);
        write_json(&doc, true, " \n\t", &mut b);
        let key = |body: &str, tenant: &[u8]| cache_key(&KeyRequest {
            tenant,
            endpoint: "/v1/chat/completions",
            body: body.as_bytes(),
            opt_in: OptIn::Always,
        });
        let ka = key(&a, b"tenant-a");
        prop_assert!(ka.is_ok(), "{:?} for {}", ka, a);
        prop_assert_eq!(ka, key(&b, b"tenant-a"));
        // Another tenant never shares the key.
        prop_assert_ne!(ka, key(&a, b"tenant-b"));
    }

    #[test]
    fn canonical_form_preserves_meaning_and_is_idempotent(doc in json_value()) {
        let mut text = String::new();
        write_json(&doc, true, " ", &mut text);
        let mut c = Canonicalizer::new();
        let canonical = c.canonical_json(text.as_bytes());
        prop_assert!(canonical.is_ok(), "{:?} for {}", canonical, text);
        let canonical = canonical.unwrap();
        let original: serde_json::Value = serde_json::from_str(&text).unwrap();
        let reparsed: serde_json::Value = serde_json::from_str(&canonical).unwrap();
        prop_assert!(same_json(&original, &reparsed), "{} vs {}", text, canonical);
        prop_assert_eq!(c.canonical_json(canonical.as_bytes()), Ok(canonical.clone()));
    }
}

/// Equality where numbers compare as doubles (canonicalisation may turn 1e2 into 100).
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => x.as_f64() == y.as_f64(),
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_json(p, q))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

#[test]
fn malformed_bodies_are_not_cacheable_not_panics() {
    for body in [&b"\xff\xfe"[..], b"{\"a\":", b"null", b"{\"a\":1e999}"] {
        let r = cache_key(&KeyRequest {
            tenant: b"t",
            endpoint: "/",
            body,
            opt_in: OptIn::Always,
        });
        assert!(
            matches!(
                r,
                Err(NotCacheable::Malformed { .. } | NotCacheable::NotAnObject)
            ),
            "{r:?}"
        );
    }
}

// ---------------------------------------------------------------- replies

proptest! {
    #[test]
    fn replies_announce_at_least_the_wait(wait in 0u64..100_000_000_000, message in "\\PC{0,40}") {
        let r = local_reply(ReplyKind::RateLimited, &message, Some(wait));
        let get = |name: &str| r.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
        let secs_header: u64 = get("retry-after").unwrap().parse().unwrap();
        let ms_header: u64 = get("retry-after-ms").unwrap().parse().unwrap();
        prop_assert!(secs_header * SECOND >= wait && secs_header >= 1);
        prop_assert!(ms_header * 1_000_000 >= wait);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        prop_assert_eq!(v["error"]["message"].as_str(), Some(message.as_str()));
    }
}

// ---------------------------------------------------------------- GenAI usage

proptest! {
    /// Any bytes, cut anywhere: reading usage never panics, and reading a stream chunk by chunk
    /// finds what reading it whole finds.
    #[test]
    fn usage_never_panics_and_chunking_does_not_matter(
        body in proptest::collection::vec(any::<u8>(), 0..400),
        cut in 0usize..400,
    ) {
        let _ = unbusy_core::genai::usage(&body);
        let cut = cut.min(body.len());
        let mut whole = unbusy_core::genai::UsageScan::default();
        whole.feed(&body);
        let mut parts = unbusy_core::genai::UsageScan::default();
        parts.feed(&body[..cut]);
        parts.feed(&body[cut..]);
        prop_assert_eq!(whole.finish(), parts.finish());
    }

    /// Whatever counts a completion or a stream's usage chunk carries (amid noise), they are
    /// read back exactly; a stream cut anywhere into two chunks too.
    #[test]
    fn usage_reads_back_what_was_written(
        input in any::<u64>(),
        output in any::<u64>(),
        noise in "[a-z :{}\"\\n]{0,40}",
        stream in any::<bool>(),
        cut in 0usize..1000,
    ) {
        let usage = serde_json::json!({"prompt_tokens": input, "completion_tokens": output});
        let want = Some(unbusy_core::genai::Usage { input, output });
        if stream {
            let chunk = serde_json::json!({"choices": [], "usage": usage});
            let body = format!(": {}\n\ndata: {{\"choices\":[]}}\n\ndata: {chunk}\n\ndata: [DONE]\n\n", noise.replace('\n', " "));
            prop_assert_eq!(unbusy_core::genai::usage(body.as_bytes()), want);
            let cut = cut % (body.len() + 1);
            let mut scan = unbusy_core::genai::UsageScan::default();
            scan.feed(&body.as_bytes()[..cut]);
            scan.feed(&body.as_bytes()[cut..]);
            prop_assert_eq!(scan.finish(), want);
        } else {
            let body = serde_json::json!({"id": noise, "choices": [], "usage": usage}).to_string();
            prop_assert_eq!(unbusy_core::genai::usage(body.as_bytes()), want);
        }
    }
}
