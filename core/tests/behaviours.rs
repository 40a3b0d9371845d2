//! Configured behaviours the other engine tests leave untouched, each driven through the engine
//! as a host drives it (`admit`, `poll_action`, `on_outcome`, `on_tick` with explicit `now`),
//! from a configuration parsed from JSON as an operator writes it. Each test states what a user
//! can rely on, and each was checked to fail when its feature is switched off or broken.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;
use support::{actions, instant, meta, nanos, nth, outcome, pid};

use unbusy_core::cache_key::{tenant_id, CacheKey};
use unbusy_core::classify::{Classification, OutcomeClass};
use unbusy_core::config::Config;
use unbusy_core::degrade::Tier;
use unbusy_core::engine::{
    Action, CacheLookup, Engine, Event, Priority, RequestId, RequestMeta, SendAttempt,
};
use unbusy_core::reply::LocalReply;
use unbusy_core::time::{ms, secs, Nanos};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An engine for a configuration with one provider and the given other top-level members.
fn one_provider(rest: &str) -> Engine {
    let sep = if rest.is_empty() { "" } else { "," };
    with_providers(r#"[{"name":"p","cluster":"p"}]"#, &format!("{sep}{rest}"))
}

fn with_providers(providers: &str, rest: &str) -> Engine {
    let json = format!(r#"{{"providers":{providers}{rest}}}"#);
    let config = Config::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}: {json}"));
    Engine::new(config, 7).unwrap()
}

fn stale(tenant: u64) -> RequestMeta {
    RequestMeta {
        cache_key: Some(CacheKey(u128::from(tenant))),
        cached: CacheLookup::Stale,
        ..meta(tenant)
    }
}

fn busy() -> Classification {
    outcome(OutcomeClass::Busy, None)
}

fn success() -> Classification {
    outcome(OutcomeClass::Success, None)
}

/// The one send among `a`.
fn the_send(a: &[Action]) -> SendAttempt {
    match a {
        [Action::Send(s)] => s.clone(),
        other => panic!("expected one send, got {other:?}"),
    }
}

/// The one local reply among `a`.
fn the_reply(a: &[Action]) -> LocalReply {
    match a {
        [Action::Reply { reply, .. }] => reply.clone(),
        other => panic!("expected one local reply, got {other:?}"),
    }
}

fn header<'a>(reply: &'a LocalReply, name: &str) -> Option<&'a str> {
    reply
        .headers
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.as_str())
}

/// A host in miniature: answers every attempt the engine sends after a fixed latency (or never,
/// when `answer` says `None`) and calls `on_tick` at every wake-up.
struct Host {
    e: Engine,
    now: Nanos,
    latency: Nanos,
    answer: fn(&SendAttempt) -> Option<Classification>,
    pending: Vec<(Nanos, RequestId, u32, Classification)>,
    log: Vec<(Nanos, Action)>,
    events: Vec<(Nanos, Event)>,
}

impl Host {
    fn new(e: Engine, latency: Nanos, answer: fn(&SendAttempt) -> Option<Classification>) -> Self {
        Self {
            e,
            now: 0,
            latency,
            answer,
            pending: Vec::new(),
            log: Vec::new(),
            events: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Some(a) = self.e.poll_action() {
            if let Action::Send(s) = &a {
                if let Some(c) = (self.answer)(s) {
                    self.pending
                        .push((self.now + self.latency, s.request, s.attempt.get(), c));
                }
            }
            self.log.push((self.now, a));
        }
        while let Some(ev) = self.e.poll_event() {
            self.events.push((self.now, ev));
        }
    }

    fn admit(&mut self, at: Nanos, meta: RequestMeta) -> RequestId {
        self.now = self.now.max(at);
        let id = self.e.admit(instant(self.now), meta);
        self.drain();
        id
    }

    /// Delivers outcomes and ticks in time order up to `until`.
    fn run_until(&mut self, until: Nanos) {
        for _ in 0..1_000_000 {
            let next_outcome = self
                .pending
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| p.0)
                .map(|(i, p)| (i, p.0));
            let next_tick = self.e.next_wakeup().map(nanos);
            let next = match (next_outcome, next_tick) {
                (Some((_, o)), Some(t)) => o.min(t),
                (Some((_, o)), None) => o,
                (None, Some(t)) => t,
                (None, None) => return,
            };
            if next > until {
                return;
            }
            self.now = self.now.max(next);
            match next_outcome {
                Some((i, at)) if at == next => {
                    let (_, request, attempt, c) = self.pending.swap_remove(i);
                    self.e
                        .on_outcome(instant(self.now), request, nth(attempt), c);
                }
                _ => self.e.on_tick(instant(self.now)),
            }
            self.drain();
        }
        panic!("the engine kept waking without progress");
    }

    fn sends(&self) -> impl Iterator<Item = (Nanos, &SendAttempt)> {
        self.log.iter().filter_map(|(t, a)| match a {
            Action::Send(s) => Some((*t, s)),
            _ => None,
        })
    }

    fn count_events(&self, want: fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|(_, e)| want(e)).count()
    }
}

// ---------------------------------------------------------------------------------------------
// Degradation tiers 2 and 3, and `degradation.enabled: false`
// ---------------------------------------------------------------------------------------------

/// A brownout: for six seconds one provider answers two requests in three busy (an error rate
/// of 2/3: above tier 2's `enter` of 0.6, below tier 3's 0.9). One attempt per request, so
/// every outcome is one request's. Returns the time the brownout has lasted.
fn brownout(e: &mut Engine) -> Nanos {
    let mut t = 0;
    for i in 0..12 {
        t = ms(500 * i);
        let id = e.admit(instant(t), meta(i));
        let a = actions(e);
        let s = the_send(&a);
        let answer = if i % 3 == 2 { success() } else { busy() };
        e.on_outcome(instant(t + ms(1)), id, nth(s.attempt), answer);
        actions(e);
    }
    t + ms(500)
}

#[test]
fn tier_2_serves_a_stale_entry_instead_of_calling_a_provider() {
    let mut e = one_provider(r#""retry":{"max_attempts":1}"#);
    // While the provider is healthy, a stale entry is not good enough: the provider is asked.
    let id = e.admit(instant(0), stale(100));
    assert_eq!(the_send(&actions(&mut e)).request, id);
    e.cancel(instant(1), id);
    let t = brownout(&mut e);
    // Under pressure 2/3 the ladder is at tier 2: the stale entry is served at once, and no
    // attempt goes to the struggling provider.
    let id = e.admit(instant(t), stale(200));
    assert_eq!(e.tier(), Tier::Data);
    assert_eq!(
        actions(&mut e),
        vec![Action::ServeCache {
            request: id,
            stale: true
        }]
    );
    // Tier 2 does not fail fast: a request with nothing cached still goes to the provider.
    let id = e.admit(instant(t + ms(1)), meta(300));
    assert_eq!(the_send(&actions(&mut e)).request, id);
}

#[test]
fn with_degradation_disabled_no_stale_entry_is_served_while_the_provider_answers() {
    let mut e = one_provider(r#""retry":{"max_attempts":1},"degradation":{"enabled":false}"#);
    let t = brownout(&mut e);
    // The ladder is off: the provider still answers a third of requests, so it is asked.
    let id = e.admit(instant(t), stale(200));
    let a = actions(&mut e);
    assert!(
        matches!(a.as_slice(), [Action::Send(s)] if s.request == id),
        "with degradation disabled a stale entry was served instead of asking the provider: \
         {a:?}"
    );
}

/// An outage: one provider's breaker opens at 10 ms (ten busy answers in a row) and stays open
/// for 5 s. Returns when it probes again.
fn outage(e: &mut Engine) -> Nanos {
    for i in 1..=10 {
        let id = e.admit(instant(ms(i)), meta(i));
        let a = actions(e);
        e.on_outcome(instant(ms(i)), id, nth(the_send(&a).attempt), busy());
        actions(e);
    }
    e.breaker_open_until(instant(ms(10)), pid(0))
        .map(nanos)
        .expect("the breaker is open")
}

const OUTAGE: &str = r#""retry":{"max_attempts":1},"breaker":{"open_ms":5000,"max_open_ms":5000}"#;

#[test]
fn tier_3_holds_a_request_that_a_probe_will_serve_in_time() {
    let mut e = one_provider(OUTAGE);
    let probe_at = outage(&mut e);
    // Every breaker is open: the ladder is at tier 3. The breaker probes in 5 s, well within
    // the request's minute: it is not failed, it waits for the probe.
    let id = e.admit(instant(secs(2)), meta(1));
    assert_eq!(e.tier(), Tier::Service);
    assert_eq!(
        actions(&mut e),
        vec![],
        "failed although a probe comes in time"
    );
    let wake = e.next_wakeup().map(nanos).unwrap();
    assert!(wake <= probe_at, "{wake} > {probe_at}");
    e.on_tick(instant(probe_at));
    assert_eq!(the_send(&actions(&mut e)).request, id);
}

#[test]
fn tier_3_fails_fast_when_no_provider_can_help_in_time() {
    let mut e = one_provider(&format!(
        r#"{OUTAGE},"degradation":{{"min_dwell_ms":7000}}"#
    ));
    let probe_at = outage(&mut e);
    // The caller allows one second; the breaker probes in three. Nothing can help in time:
    // the answer is at once a busy error telling the caller to come back when the ladder may
    // have changed (its dwell time), not a wait that ends at the deadline.
    let now = secs(2);
    assert!(probe_at > now + secs(1));
    e.admit(
        instant(now),
        RequestMeta {
            deadline: Some(instant(now + secs(1))),
            ..meta(1)
        },
    );
    assert_eq!(e.tier(), Tier::Service);
    let reply = the_reply(&actions(&mut e));
    assert_eq!(reply.status, 503);
    assert_eq!(header(&reply, "retry-after"), Some("7"), "{reply:?}");
    assert_eq!(header(&reply, "x-should-retry"), Some("true"));
    // Low-priority traffic is shed at tier 3 (it includes tier 1), even with help in time.
    e.admit(
        instant(now),
        RequestMeta {
            priority: Priority::Low,
            ..meta(2)
        },
    );
    let shed = the_reply(&actions(&mut e));
    assert_eq!(shed.status, 503);
    assert!(shed.body.contains("load_shed"), "{}", shed.body);
}

#[test]
fn with_degradation_disabled_nothing_is_shed_or_failed_fast_by_the_ladder() {
    let mut e = one_provider(&format!(
        r#"{OUTAGE},"degradation":{{"enabled":false,"min_dwell_ms":7000}}"#
    ));
    let probe_at = outage(&mut e);
    let now = secs(2);
    assert!(!e.degrades_features());
    // A low-priority request is not shed: it waits for the probe like any other.
    let low = e.admit(
        instant(now),
        RequestMeta {
            priority: Priority::Low,
            ..meta(2)
        },
    );
    assert_eq!(actions(&mut e), vec![], "shed with degradation disabled");
    // A request nothing can help in time still gets an immediate answer (waiting would only
    // hang its caller), but the ordinary one: come back when the breaker probes, not after the
    // ladder's dwell time.
    e.admit(
        instant(now),
        RequestMeta {
            deadline: Some(instant(now + secs(1))),
            ..meta(1)
        },
    );
    let reply = the_reply(&actions(&mut e));
    assert_eq!(reply.status, 503);
    let wait = probe_at - now;
    let want = wait.div_ceil(secs(1)).to_string();
    assert_eq!(
        header(&reply, "retry-after"),
        Some(want.as_str()),
        "{reply:?}"
    );
    e.on_tick(instant(probe_at));
    assert_eq!(the_send(&actions(&mut e)).request, low);
}

// ---------------------------------------------------------------------------------------------
// The retry budget and the SRE throttle
// ---------------------------------------------------------------------------------------------

#[test]
fn an_exhausted_retry_budget_holds_retries_until_it_refills() {
    // No retries earned by traffic (ratio 0), one a second always allowed, counted over 1 s.
    let e = one_provider(
        r#""budget":{"ratio":0,"min_per_second":1,"window_ms":1000},
           "retry":{"jitter":"none","base_ms":100,"cap_ms":100},
           "degradation":{"enabled":false}"#,
    );
    // Every first attempt fails; retries are never answered (they stay in flight).
    let mut h = Host::new(e, ms(10), |s| (s.attempt.get() == 1).then(busy));
    let a = h.admit(0, meta(1));
    let b = h.admit(0, meta(2));
    h.run_until(secs(2));
    let retry_at = |id| {
        h.sends()
            .find(|(_, s)| s.request == id && s.attempt.get() == 2)
            .map(|(t, _)| t)
    };
    // The first failure spends the one retry the budget holds: it goes after its backoff.
    assert_eq!(retry_at(a), Some(ms(110)));
    // The second finds the budget empty: its retry waits (asking again after each backoff)
    // until the spent retry has left the 1 s window, and then goes.
    let b_at = retry_at(b).expect("the held retry never went");
    assert!(
        (secs(1)..=secs(1) + ms(200)).contains(&b_at),
        "retry sent at {b_at}, before the budget refilled or long after"
    );
    assert!(h.count_events(|e| matches!(e, Event::BudgetExhausted)) >= 1);
}

/// Fifteen requests against a provider that answers every attempt busy in 1 ms, with retries
/// 50 ms apart, a budget and a breaker that never stop them, for three seconds. Returns the
/// host afterwards.
fn failing_provider(throttle_enabled: bool) -> Host {
    let e = one_provider(&format!(
        r#""throttle":{{"enabled":{throttle_enabled}}},
           "retry":{{"max_attempts":16,"jitter":"none","base_ms":50,"cap_ms":50}},
           "budget":{{"ratio":10,"min_per_second":1000}},
           "breaker":{{"consecutive_failures":0,"min_success_rate":0}},
           "deadlines":{{"total_ms":3000}},
           "degradation":{{"enabled":false}}"#
    ));
    let mut h = Host::new(e, ms(1), |_| Some(busy()));
    for i in 0..10 {
        h.admit(0, meta(i));
    }
    h.run_until(secs(1));
    // Five more arrive once the provider has failed hundreds of attempts.
    for i in 10..15 {
        let id = h.admit(secs(1), meta(i));
        let first = h.sends().find(|(_, s)| s.request == id).map(|(t, _)| t);
        assert_eq!(first, Some(secs(1)), "a first attempt was held back");
    }
    h.run_until(secs(5));
    h
}

#[test]
fn without_throttling_every_retry_reaches_a_failing_provider() {
    let h = failing_provider(false);
    assert_eq!(h.count_events(|e| matches!(e, Event::Throttled { .. })), 0);
    // Each request made all 16 attempts its configuration allows.
    assert_eq!(h.sends().count(), 15 * 16);
}

#[test]
fn with_throttling_retries_to_a_failing_provider_are_shed_locally_but_first_attempts_are_not() {
    let h = failing_provider(true);
    let throttled = h.count_events(|e| matches!(e, Event::Throttled { .. }));
    let sent = h.sends().count();
    assert!(throttled > 100, "only {throttled} retries throttled");
    assert!(
        sent < 15 * 16 / 2,
        "{sent} attempts reached the failing provider"
    );
    // (`failing_provider` checked that the late requests' first attempts went at once.)
    let firsts = h.sends().filter(|(_, s)| s.attempt.get() == 1).count();
    assert_eq!(firsts, 15);
}

// ---------------------------------------------------------------------------------------------
// Limits: global, per tenant, tenant slots, tenancy
// ---------------------------------------------------------------------------------------------

#[test]
fn the_global_request_limit_takes_its_burst_at_once_then_paces_every_tenant() {
    let mut e =
        one_provider(r#""limits":{"global":{"requests_per_minute":60,"burst_requests":3}}"#);
    // Three requests at once, from three tenants: the burst.
    for tenant in 1..=3 {
        e.admit(instant(0), meta(tenant));
        the_send(&actions(&mut e));
    }
    // A fourth tenant is refused too: the limit is global. Room again in one second (60/min).
    e.admit(instant(0), meta(4));
    let reply = the_reply(&actions(&mut e));
    assert_eq!(reply.status, 429);
    assert_eq!(header(&reply, "retry-after"), Some("1"));
    e.admit(instant(secs(1)), meta(4));
    the_send(&actions(&mut e));
    e.admit(instant(secs(1)), meta(5));
    assert_eq!(the_reply(&actions(&mut e)).status, 429);
}

#[test]
fn the_global_token_limit_charges_estimated_tokens_within_its_burst() {
    // 6000 tokens a minute (100 a second), at most 1000 at once.
    let mut e =
        one_provider(r#""limits":{"global":{"tokens_per_minute":6000,"burst_tokens":1000}}"#);
    let tokens = |n, tenant| RequestMeta {
        estimated_tokens: n,
        ..meta(tenant)
    };
    e.admit(instant(0), tokens(600, 1));
    the_send(&actions(&mut e));
    // 400 left: 600 more need 200 to refill, two seconds.
    e.admit(instant(0), tokens(600, 2));
    let reply = the_reply(&actions(&mut e));
    assert_eq!(reply.status, 429);
    assert_eq!(header(&reply, "retry-after"), Some("2"));
    // More than the burst never fits: no wait helps, so the caller is told so.
    e.admit(instant(0), tokens(1001, 3));
    let too_large = the_reply(&actions(&mut e));
    assert_eq!(too_large.status, 413);
    assert_eq!(header(&too_large, "x-should-retry"), Some("false"));
    e.admit(instant(secs(2)), tokens(600, 2));
    the_send(&actions(&mut e));
}

#[test]
fn per_tenant_request_and_token_limits_bind_each_tenant_alone() {
    let mut e = one_provider(
        r#""limits":{"per_tenant":{"requests_per_minute":600,"burst_requests":2,
                                   "tokens_per_minute":60000,"burst_tokens":500}}"#,
    );
    let tokens = |n, tenant| RequestMeta {
        estimated_tokens: n,
        ..meta(tenant)
    };
    // Tenant 1: two requests at once (its request burst), the third waits 100 ms (600/min).
    for _ in 0..2 {
        e.admit(instant(0), tokens(100, 1));
        the_send(&actions(&mut e));
    }
    e.admit(instant(0), tokens(100, 1));
    let reply = the_reply(&actions(&mut e));
    assert_eq!(reply.status, 429);
    assert_eq!(header(&reply, "retry-after-ms"), Some("100"));
    // Tenant 2: its token burst in one request, then nothing more for now.
    e.admit(instant(0), tokens(500, 2));
    the_send(&actions(&mut e));
    e.admit(instant(0), tokens(100, 2));
    assert_eq!(the_reply(&actions(&mut e)).status, 429);
    // Tenant 3 is untouched by the others.
    e.admit(instant(0), tokens(500, 3));
    the_send(&actions(&mut e));
    e.admit(instant(ms(100)), tokens(100, 1));
    the_send(&actions(&mut e));
}

#[test]
fn a_refused_request_uses_up_no_limit() {
    // One request a minute per tenant, two at once globally (then one per 500 ms).
    let mut e = one_provider(
        r#""limits":{"per_tenant":{"requests_per_minute":1},
                     "global":{"requests_per_minute":120,"burst_requests":2}}"#,
    );
    e.admit(instant(0), meta(1));
    the_send(&actions(&mut e));
    // Refused by its tenant's limit: the global limit is not charged for it...
    e.admit(instant(0), meta(1));
    assert_eq!(the_reply(&actions(&mut e)).status, 429);
    // ...so another tenant still gets the second global slot.
    e.admit(instant(0), meta(2));
    the_send(&actions(&mut e));
    // Refused by the global limit: the tenant's own limit is not charged for it...
    e.admit(instant(0), meta(3));
    assert_eq!(the_reply(&actions(&mut e)).status, 429);
    // ...so it gets in as soon as the global limit has room.
    e.admit(instant(ms(500)), meta(3));
    the_send(&actions(&mut e));
}

#[test]
fn more_tenants_than_slots_are_each_still_limited_and_never_limited_by_each_other() {
    // Eight slots (the least allowed), a hundred tenants.
    let mut e =
        one_provider(r#""limits":{"tenant_slots":8,"per_tenant":{"requests_per_minute":1}}"#);
    for tenant in 1..=100 {
        let t = ms(tenant);
        e.admit(instant(t), meta(tenant));
        let a = actions(&mut e);
        assert!(
            matches!(a.as_slice(), [Action::Send(_)]),
            "tenant {tenant}'s first request refused: {a:?}"
        );
        e.admit(instant(t), meta(tenant));
        let reply = the_reply(&actions(&mut e));
        assert_eq!(reply.status, 429, "tenant {tenant}'s second request");
    }
}

#[test]
fn tenants_that_went_idle_make_room_before_a_limited_tenant_is_forgotten() {
    let mut e =
        one_provider(r#""limits":{"tenant_slots":8,"per_tenant":{"requests_per_minute":1}}"#);
    // Fifty tenants came and went a while ago (their buckets are full again).
    for tenant in 1000..1050 {
        e.admit(instant(ms(tenant - 1000)), meta(tenant));
        actions(&mut e);
    }
    // Tenant 1 uses its one request of the minute.
    let now = secs(100);
    e.admit(instant(now), meta(1));
    the_send(&actions(&mut e));
    // Seven new tenants arrive: with tenant 1 they fill the eight slots, displacing idle ones.
    for tenant in 2..=8 {
        e.admit(instant(now + ms(tenant)), meta(tenant));
        the_send(&actions(&mut e));
    }
    // Tenant 1 is still remembered, and still limited.
    e.admit(instant(now + ms(10)), meta(1));
    assert_eq!(the_reply(&actions(&mut e)).status, 429);
}

#[test]
fn each_identity_is_its_own_tenant() {
    // Which bytes name the tenant (`tenancy.header`, else `Authorization`, else
    // `tenancy.default_tenant`) is the hosts' choice (envoy-filter, wasm-js); the identity's hash
    // is core's `tenant_id`, which every host uses.
    let a = tenant_id(b"Bearer sk-a");
    let b = tenant_id(b"Bearer sk-b");
    assert_eq!(
        a,
        tenant_id(b"Bearer sk-a"),
        "the same identity, the same tenant"
    );
    assert_ne!(a, b);
    assert_ne!(tenant_id(b"anonymous"), a);
    let mut e = one_provider(r#""limits":{"per_tenant":{"requests_per_minute":1}}"#);
    e.admit(instant(0), meta(a));
    the_send(&actions(&mut e));
    e.admit(instant(0), meta(b));
    the_send(&actions(&mut e));
    e.admit(instant(0), meta(tenant_id(b"Bearer sk-a")));
    assert_eq!(the_reply(&actions(&mut e)).status, 429);
}

// ---------------------------------------------------------------------------------------------
// Retry timing: max_hint_ms, jitter, base_ms and cap_ms
// ---------------------------------------------------------------------------------------------

fn rate_limited(after: Nanos) -> Classification {
    outcome(OutcomeClass::RateLimited, Some(after))
}

#[test]
fn a_retry_hint_longer_than_max_hint_is_not_waited_for() {
    let mut e = one_provider(r#""retry":{"max_hint_ms":5000}"#);
    // 4 s is within the 5 s honoured: the request waits it out, then retries.
    let waits = e.admit(instant(0), meta(1));
    let a = actions(&mut e);
    e.on_outcome(
        instant(ms(10)),
        waits,
        nth(the_send(&a).attempt),
        rate_limited(secs(4)),
    );
    assert_eq!(actions(&mut e), vec![]);
    let wake = e.next_wakeup().map(nanos).unwrap();
    assert!(
        (ms(10) + secs(4)..ms(10) + secs(5)).contains(&wake),
        "{wake}"
    );
    // 6 s is longer: with nowhere else to go, the caller is told at once, with that hint.
    let id = e.admit(instant(ms(20)), meta(2));
    let a = actions(&mut e);
    e.on_outcome(
        instant(ms(30)),
        id,
        nth(the_send(&a).attempt),
        rate_limited(secs(6)),
    );
    let reply = the_reply(&actions(&mut e));
    assert_eq!(reply.status, 429);
    assert_eq!(header(&reply, "retry-after"), Some("6"));
    e.on_tick(instant(wake));
    assert_eq!(the_send(&actions(&mut e)).request, waits);
}

#[test]
fn a_retry_hint_longer_than_max_hint_fails_over_at_once() {
    let mut e = with_providers(
        r#"[{"name":"a","cluster":"a"},{"name":"b","cluster":"b","priority":1}]"#,
        r#","retry":{"max_hint_ms":5000}"#,
    );
    let id = e.admit(instant(0), meta(1));
    let first = the_send(&actions(&mut e));
    assert_eq!(first.provider.index(), 0);
    e.on_outcome(instant(ms(10)), id, nth(1), rate_limited(secs(30)));
    let second = the_send(&actions(&mut e));
    assert_eq!((second.attempt.get(), second.provider.index()), (2, 1));
    // The backup asks for too long as well: nothing left to try within the hint cap.
    e.on_outcome(instant(ms(20)), id, nth(2), rate_limited(secs(30)));
    let reply = the_reply(&actions(&mut e));
    assert_eq!(reply.status, 429);
    assert_eq!(header(&reply, "retry-after"), Some("30"));
}

/// The delays before each retry of one request whose every attempt fails at once, read from
/// the engine's wake-ups.
fn retry_delays(e: &mut Engine) -> Vec<Nanos> {
    let id = e.admit(instant(0), meta(1));
    let mut a = actions(e);
    let mut now = 0;
    let mut delays = Vec::new();
    loop {
        let s = match a.as_slice() {
            [Action::Send(s)] => s.clone(),
            [Action::Reply { .. }] => return delays,
            other => panic!("{other:?}"),
        };
        now += ms(1);
        e.on_outcome(instant(now), id, nth(s.attempt), busy());
        a = actions(e);
        if !a.is_empty() {
            continue;
        }
        let wake = e.next_wakeup().map(nanos).unwrap();
        delays.push(wake - now);
        now = wake;
        e.on_tick(instant(now));
        a = actions(e);
    }
}

#[test]
fn with_no_jitter_retries_wait_exactly_base_doubling_up_to_the_cap() {
    let mut e = one_provider(
        r#""retry":{"jitter":"none","base_ms":100,"cap_ms":500,"max_attempts":7},
           "degradation":{"enabled":false}"#,
    );
    assert_eq!(
        retry_delays(&mut e),
        [100, 200, 400, 500, 500, 500].map(ms).to_vec()
    );
}

#[test]
fn retry_delays_follow_the_configured_base_and_cap() {
    // Equal jitter: the retry n waits between half and all of min(cap, base * 2^(n-1)).
    let mut seen = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for seed in 0..40 {
        let json = r#"{"providers":[{"name":"p","cluster":"p"}],
            "retry":{"jitter":"equal","base_ms":100,"cap_ms":300,"max_attempts":5},
            "degradation":{"enabled":false}}"#;
        let mut e = Engine::new(Config::from_json(json.as_bytes()).unwrap(), seed).unwrap();
        for (n, d) in retry_delays(&mut e).into_iter().enumerate() {
            seen[n].push(d);
        }
    }
    for (n, delays) in seen.iter().enumerate() {
        let exp = (ms(100) << n).min(ms(300));
        assert_eq!(delays.len(), 40);
        for d in delays {
            assert!(
                (exp / 2..=exp).contains(d),
                "retry {} waited {d}, outside [{}, {exp}]",
                n + 1,
                exp / 2
            );
        }
        let (lo, hi) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(lo < hi, "retry {} never jittered", n + 1);
    }
}

// ---------------------------------------------------------------------------------------------
// AIMD through the engine: backoff_ratio and decrease_cooldown_ms
// ---------------------------------------------------------------------------------------------

const AIMD: &str = r#""concurrency":{"backoff_ratio":0.5,"decrease_cooldown_ms":1000},
    "retry":{"jitter":"none","base_ms":100,"cap_ms":100},
    "degradation":{"enabled":false}"#;

fn quota_full() -> Classification {
    outcome(OutcomeClass::RateLimited, None)
}

/// Admits `n` requests at 0; returns their ids (each with attempt 1 in flight).
fn in_flight(e: &mut Engine, n: u64) -> Vec<RequestId> {
    (0..n)
        .map(|i| {
            let id = e.admit(instant(0), meta(i));
            the_send(&actions(e));
            id
        })
        .collect()
}

#[test]
fn a_bare_429_teaches_a_limit_of_backoff_ratio_times_what_was_in_flight_and_paces_retries() {
    let mut e = one_provider(AIMD);
    let ids = in_flight(&mut e, 8);
    assert_eq!(
        e.concurrency_limit(pid(0)),
        None,
        "no limit before a quota shows"
    );
    // A 429 without a retry hint with eight in flight: the quota is below eight. Learned
    // limit: 0.5 x 8.
    e.on_outcome(instant(ms(100)), ids[0], nth(1), quota_full());
    assert_eq!(actions(&mut e), vec![]);
    assert_eq!(e.concurrency_limit(pid(0)), Some(4));
    // Its retry is due at 200 ms, but seven attempts are in flight: it waits for a slot.
    e.on_tick(instant(ms(200)));
    assert_eq!(
        actions(&mut e),
        vec![],
        "a retry went past the learned limit"
    );
    // A new request's first attempt is not held back by a learned limit.
    let fresh = e.admit(instant(ms(250)), meta(99));
    assert_eq!(the_send(&actions(&mut e)).request, fresh);
    // As answers come in, the retry waits exactly while the limit has no room.
    let mut retried = false;
    for (i, id) in ids[1..].iter().chain([&fresh]).enumerate() {
        e.on_outcome(instant(ms(300 + 10 * i as u64)), *id, nth(1), success());
        let sent = actions(&mut e)
            .iter()
            .any(|a| matches!(a, Action::Send(s) if s.request == ids[0]));
        if retried {
            continue;
        }
        if sent {
            retried = true;
            assert!(Some(e.in_flight(pid(0))) <= e.concurrency_limit(pid(0)));
        } else {
            assert!(
                Some(e.in_flight(pid(0))) >= e.concurrency_limit(pid(0)),
                "the retry waited with room: {} in flight, limit {:?}",
                e.in_flight(pid(0)),
                e.concurrency_limit(pid(0))
            );
        }
    }
    assert!(retried, "the retry never went");
}

#[test]
fn a_burst_of_bare_429s_shrinks_the_limit_once_per_decrease_cooldown() {
    let mut e = one_provider(AIMD);
    let ids = in_flight(&mut e, 8);
    e.on_outcome(instant(ms(100)), ids[0], nth(1), quota_full());
    assert_eq!(e.concurrency_limit(pid(0)), Some(4));
    // The same burst of overload, 100 ms later: within the 1 s cooldown, no second cut.
    e.on_outcome(instant(ms(200)), ids[1], nth(1), quota_full());
    assert_eq!(e.concurrency_limit(pid(0)), Some(4));
    // A second later it is a new verdict: halved again.
    e.on_outcome(instant(ms(1100)), ids[2], nth(1), quota_full());
    assert_eq!(e.concurrency_limit(pid(0)), Some(2));
}

// ---------------------------------------------------------------------------------------------
// Breaker: min_volume and probe_successes
// ---------------------------------------------------------------------------------------------

#[test]
fn the_breaker_judges_the_success_rate_only_over_min_volume_outcomes() {
    // Only the success-rate rule (consecutive failures off); twenty outcomes needed.
    let mut e = one_provider(
        r#""breaker":{"consecutive_failures":0,"min_volume":20},
           "retry":{"max_attempts":1},"degradation":{"enabled":false}"#,
    );
    // Every attempt fails, one every 300 ms (the window is judged once it spans 5 s).
    for i in 0..20u64 {
        let t = ms(300 * i);
        assert_eq!(
            e.breaker_state(pid(0), instant(t)).map(|b| b.gauge()),
            Some(0),
            "open after only {i} outcomes"
        );
        let id = e.admit(instant(t), meta(i));
        let a = actions(&mut e);
        e.on_outcome(instant(t + ms(1)), id, nth(the_send(&a).attempt), busy());
        actions(&mut e);
    }
    let t = ms(300 * 19) + ms(1);
    assert_eq!(
        e.breaker_state(pid(0), instant(t)).map(|b| b.gauge()),
        Some(2),
        "open"
    );
    // Open: the next request is held for the probe, not sent.
    e.admit(instant(t), meta(100));
    assert_eq!(actions(&mut e), vec![]);
}

#[test]
fn a_half_open_breaker_closes_only_after_probe_successes_answers() {
    let mut e = one_provider(
        r#""breaker":{"consecutive_failures":2,"open_ms":1000,"max_open_ms":1000,
                      "probe_ramp":false,"half_open_probes":1,"probe_successes":3},
           "retry":{"max_attempts":1},"degradation":{"enabled":false}"#,
    );
    for i in 0..2 {
        let id = e.admit(instant(ms(2 * i)), meta(i));
        let a = actions(&mut e);
        e.on_outcome(
            instant(ms(2 * i + 1)),
            id,
            nth(the_send(&a).attempt),
            busy(),
        );
        actions(&mut e);
    }
    assert_eq!(
        e.breaker_state(pid(0), instant(ms(10))).map(|b| b.gauge()),
        Some(2)
    );
    // Half-open after 1 s: three requests, one probe at a time.
    let mut now = ms(1100);
    let first = e.admit(instant(now), meta(10));
    let mut probe = the_send(&actions(&mut e));
    assert_eq!(probe.request, first);
    e.admit(instant(now), meta(11));
    e.admit(instant(now), meta(12));
    assert_eq!(actions(&mut e), vec![], "one probe at a time");
    for answered in 1..=3 {
        now += ms(100);
        // (No first-token report: a probe's first real byte would close the breaker at once.)
        e.on_outcome(instant(now), probe.request, nth(probe.attempt), success());
        let a = actions(&mut e);
        let gauge = e.breaker_state(pid(0), instant(now)).map(|b| b.gauge());
        if answered < 3 {
            assert_eq!(
                gauge,
                Some(1),
                "closed after {answered} successful probe(s)"
            );
            assert_eq!(e.in_flight(pid(0)), 1);
            probe = a
                .iter()
                .find_map(|a| match a {
                    Action::Send(s) => Some(s.clone()),
                    _ => None,
                })
                .expect("the next probe");
        } else {
            assert_eq!(gauge, Some(0), "still not closed after three successes");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cache
// ---------------------------------------------------------------------------------------------

fn delivered(e: &mut Engine, meta: RequestMeta) -> Vec<Action> {
    let id = e.admit(instant(0), meta);
    let a = actions(e);
    e.on_outcome(instant(ms(100)), id, nth(the_send(&a).attempt), success());
    actions(e)
}

#[test]
fn with_the_cache_enabled_a_cacheable_answer_is_stored_and_others_are_not() {
    let mut e = one_provider("");
    let cacheable = RequestMeta {
        cache_key: Some(CacheKey(1)),
        ..meta(1)
    };
    assert!(matches!(
        delivered(&mut e, cacheable).as_slice(),
        [Action::Deliver {
            store_in_cache: true,
            ..
        }]
    ));
    assert!(matches!(
        delivered(&mut e, meta(1)).as_slice(),
        [Action::Deliver {
            store_in_cache: false,
            ..
        }]
    ));
}

#[test]
fn with_the_cache_disabled_no_answer_is_stored() {
    let mut e = one_provider(r#""cache":{"enabled":false}"#);
    let cacheable = RequestMeta {
        cache_key: Some(CacheKey(1)),
        ..meta(1)
    };
    assert!(matches!(
        delivered(&mut e, cacheable).as_slice(),
        [Action::Deliver {
            store_in_cache: false,
            ..
        }]
    ));
}

// ---------------------------------------------------------------------------------------------
// The first-byte wait
// ---------------------------------------------------------------------------------------------

/// Answers `n` non-streaming requests whose first real byte comes after `first_byte`; returns
/// the time after the last.
fn answered_after(e: &mut Engine, mut now: Nanos, n: u32, first_byte: Nanos) -> Nanos {
    for _ in 0..n {
        let id = e.admit(instant(now), meta(1));
        let send = the_send(&actions(e));
        e.on_first_progress(instant(now + first_byte), id, nth(send.attempt));
        e.on_outcome(instant(now + first_byte), id, nth(send.attempt), success());
        let _ = actions(e);
        now += first_byte + ms(10);
    }
    now
}

#[test]
fn the_first_byte_wait_shortens_to_what_the_provider_has_shown_and_no_further() {
    let mut e = one_provider(r#""deadlines":{"response_ms":25000,"total_ms":60000}"#);
    // Before it has seen enough answers, the configured wait holds.
    let now = answered_after(&mut e, 0, 7, ms(1500));
    e.admit(instant(now), meta(1));
    let send = the_send(&actions(&mut e));
    assert_eq!(send.first_token_deadline, instant(now + secs(25)));
    e.cancel(instant(now), send.request);
    let _ = actions(&mut e);
    // After 8 answers within 1.5 s, an attempt waits 4 x 1.5 s for its first byte.
    let now = answered_after(&mut e, now + ms(10), 1, ms(1500));
    e.admit(instant(now), meta(1));
    let send = the_send(&actions(&mut e));
    assert_eq!(send.first_token_deadline, instant(now + secs(6)));
    e.cancel(instant(now), send.request);
    let _ = actions(&mut e);
    // Never below the floor, never above the configured wait.
    let mut fast = one_provider("");
    let now = answered_after(&mut fast, 0, 8, ms(50));
    fast.admit(instant(now), meta(1));
    assert_eq!(
        the_send(&actions(&mut fast)).first_token_deadline,
        instant(now + secs(2))
    );
    let mut slow = one_provider(r#""deadlines":{"response_ms":25000,"total_ms":120000}"#);
    let now = answered_after(&mut slow, 0, 8, secs(10));
    slow.admit(instant(now), meta(1));
    assert_eq!(
        the_send(&actions(&mut slow)).first_token_deadline,
        instant(now + secs(25))
    );
}
