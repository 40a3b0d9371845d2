//! Circuit breaker per provider.
//!
//! A provider that is down should get almost nothing for a while: its failures cost callers
//! their latency budget, and our traffic costs it its recovery. But **a breaker trips on
//! outages, not on brownouts**: a provider that still answers 40% of attempts is worth every
//! attempt a caller would make without us, and the retry budget, pacing and failover handle its
//! failures. The simulator showed what a brownout breaker costs: with one provider failing 30
//! to 60% of attempts at random, a breaker opening below 50% success held nearly every request
//! back and answered 1% where one plain attempt answered 30%. So the defaults open only on
//! near-total failure (below 5% success over the window), or on a run of failures with no
//! success at all for a while (a hard outage at low traffic). The breaker follows
//! linkerd2-proxy's success-rate breaker and the classic state machine:
//! - **closed**: attempts flow; outcomes are counted in a fixed ring of time buckets. The breaker
//!   opens when, with at least `min_volume` outcomes in the window, the success rate falls below
//!   `min_success_rate`, or when `consecutive_failures` failures arrive in a row with no success
//!   in the last tenth of the window (which catches a hard outage at low traffic before the
//!   window has volume; at 60% random failures and 100 attempts a second, ten failures in a row
//!   happen every few seconds, but between successes 25 ms apart). The success rate is judged only
//!   once the outcomes counted span half a window: busy answers come back in 100 ms while
//!   successes take seconds, so the first outcomes after traffic starts are nearly all
//!   failures, and the simulator showed a brownout answering 65% of requests tripping the
//!   breaker (and with one provider, failing everything) in its first second;
//! - **open**: nothing flows until `open_for` has passed; each consecutive re-open doubles the
//!   wait up to `max_open_for`, so a provider that stays down is probed less and less often;
//! - **half-open**: at most `half_open_probes` attempts in flight at once, doubling every
//!   `open_for` while none fails (`probe_ramp`); `probe_successes`
//!   successes close the breaker (and reset the window), and so does a probe's first real
//!   progress ([`CircuitBreaker::on_progress`]: a provider streaming tokens is up, and the
//!   requests held for it should not wait for the whole answer); any failure re-opens it. A
//!   probe whose outcome never arrives (the host lost it) frees its slot after `open_for`, and
//!   one cancelled by its caller frees it at once without counting (an
//!   [`BreakerSignal::Ignore`]).
//!
//! Open periods are short (500 ms, doubling to 1 s): a probe costs one attempt, while every second
//! a recovered provider stays unprobed costs every request held for it a second of its
//! deadline.
//!
//! What counts as success or failure is [`crate::classify::OutcomeClass::breaker_signal`].

use crate::classify::BreakerSignal;
use crate::time::{ms, secs, Nanos};
use crate::window::Ring;

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    successes: u32,
    failures: u32,
}

/// Buckets in the window: with the default 10 s window, outcomes expire within a second of
/// their nominal age.
const BUCKETS: usize = 10;

/// The breaker's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerSettings {
    /// How long outcomes count. Default 10 s.
    pub window: Nanos,
    /// Outcomes needed in the window before the success rate is judged. Default 10.
    pub min_volume: u32,
    /// Open below this success rate. Default 0.05: near-total failure, an outage.
    pub min_success_rate: f64,
    /// Open after this many failures in a row with no success in the last tenth of the window,
    /// whatever the volume. Default 10; 0 disables.
    pub consecutive_failures: u32,
    /// The first open period. Default 500 ms.
    pub open_for: Nanos,
    /// The longest open period after repeated re-opens. Default 1 s: a provider that comes
    /// back is found within a second, well inside a caller's deadline (with 5 s, requests
    /// that arrived just after an outage ended waited out a third of a 13 s deadline); a probe
    /// a second costs a provider that is down nothing.
    pub max_open_for: Nanos,
    /// Probes in flight at once when half-open. Default 1.
    pub half_open_probes: u32,
    /// Successful probes that close the breaker. Default 1.
    pub probe_successes: u32,
    /// Whether the probes allowed in flight double every quarter of `open_for` while none has
    /// failed.
    /// Default true: a slow provider's probe takes as long as its answers (20 s for a long
    /// non-streaming one), and one probe at a time held every request that arrived after the
    /// provider recovered until its deadline (generated worlds: 11% answered where one plain
    /// attempt answered 30%). A provider still down fails a probe within a second and
    /// re-opens; one that is answering gets its traffic back within a few doublings.
    pub probe_ramp: bool,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window: secs(10),
            min_volume: 10,
            min_success_rate: 0.05,
            consecutive_failures: 10,
            open_for: ms(500),
            max_open_for: secs(1),
            half_open_probes: 1,
            probe_successes: 1,
            probe_ramp: true,
        }
    }
}

/// The breaker's state, as exported in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Attempts flow.
    Closed,
    /// Nothing flows until `until`.
    Open {
        /// When probing may start.
        until: Nanos,
    },
    /// A few probes flow.
    HalfOpen {
        /// Probes in flight.
        probes: u32,
        /// Probes that succeeded so far.
        successes: u32,
        /// When the latest probe was let through.
        last_probe: Nanos,
        /// When the breaker became half-open.
        since: Nanos,
    },
}

impl BreakerState {
    /// 0 closed, 1 half-open, 2 open: the gauge value hosts export.
    pub const fn gauge(self) -> u8 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen { .. } => 1,
            Self::Open { .. } => 2,
        }
    }
}

/// A circuit breaker.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    ring: Ring<Counts, BUCKETS>,
    state: BreakerState,
    consecutive_failures: u32,
    /// Opens since the breaker last closed, for the doubling open period.
    reopen_count: u32,
    /// When the outcomes now in the window started arriving.
    counting_since: Nanos,
    /// Attempts in flight besides the one whose outcome is being recorded.
    pending: u32,
    /// The latest success recorded while closed.
    last_success: Option<Nanos>,
    /// When the half-open episode that closed the breaker began: its probe ramp goes on for
    /// retries after it closes (see [`CircuitBreaker::retry_cap`]).
    recovered_from: Option<Nanos>,
}

/// How many doublings of the probe ramp (from the half-open episode's start) the recovery ramp
/// lasts after the breaker closed: 12, so it ends 1.5 s into the episode with the defaults, at
/// 4,096 retries in flight.
const RECOVERY_DOUBLINGS: u64 = 12;

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            ring: Ring::new(settings.window),
            state: BreakerState::Closed,
            consecutive_failures: 0,
            reopen_count: 0,
            counting_since: 0,
            pending: 0,
            last_success: None,
            recovered_from: None,
        }
    }

    /// The state at `now` (an open breaker whose time has passed reports half-open).
    pub fn state(&self, now: Nanos) -> BreakerState {
        match self.state {
            BreakerState::Open { until } if now >= until => BreakerState::HalfOpen {
                probes: 0,
                successes: 0,
                last_probe: now,
                since: until,
            },
            state => state,
        }
    }

    /// Whether an attempt could be let through now, without reserving anything.
    pub fn would_allow(&self, now: Nanos) -> bool {
        match self.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open { .. } => false,
            BreakerState::HalfOpen {
                probes,
                last_probe,
                since,
                ..
            } => probes < self.probe_limit(now, since) || self.probe_lost(now, last_probe),
        }
    }

    /// Probes allowed in flight at `now` in a half-open episode that began at `since`.
    fn probe_limit(&self, now: Nanos, since: Nanos) -> u32 {
        let s = &self.settings;
        if !s.probe_ramp {
            return s.half_open_probes;
        }
        let doublings = now.saturating_sub(since) / self.ramp_step();
        s.half_open_probes
            .saturating_mul(1u32 << doublings.min(20) as u32)
    }

    /// How often a half-open breaker's allowed probes double: a quarter of `open_for`, so a
    /// thousand are allowed 2.5 s after the first probe (doubling once a second, a provider
    /// answering in 12 s at 50 requests a second got its traffic back only after ten seconds,
    /// and requests held for it ran out of time where one plain attempt was answered).
    fn ramp_step(&self) -> Nanos {
        (self.settings.open_for / 4).max(1)
    }

    /// How many retries may be in flight at `now` just after an outage, `None` when the breaker
    /// puts no bound on them.
    ///
    /// A provider that comes back from an outage has every request that waited through it to
    /// answer at once: with the first probe's first byte the breaker closes, and without a
    /// bound every waiting retry would go in the same instant (a provider with room for 80
    /// got 620 in flight when a 30 s outage ended, and answered those with 429s until the
    /// callers' deadlines passed). So the half-open episode's probe ramp goes on for retries
    /// after the breaker closed, doubling every quarter of `open_for`, until
    /// `RECOVERY_DOUBLINGS` doublings from the episode's start: a provider without a quota
    /// gets its waiting requests back within about a second, and one with a quota refuses the
    /// excess while it is at most twice what it can take, which is when a learned
    /// concurrency limit binds (see `concurrency`). First attempts are never bounded by it: a
    /// caller without us sends them anyway.
    pub fn retry_cap(&self, now: Nanos) -> Option<u32> {
        let since = self.recovered_from?;
        let s = &self.settings;
        if self.state != BreakerState::Closed || !s.probe_ramp {
            return None;
        }
        let doublings = now.saturating_sub(since) / self.ramp_step();
        (doublings < RECOVERY_DOUBLINGS).then(|| self.probe_limit(now, since))
    }

    /// When the breaker's verdict next changes by itself: an open breaker half-opens, a
    /// half-open one allows more probes, a recovery ramp allows more retries. `None` when
    /// closed otherwise.
    pub fn next_change(&self, now: Nanos) -> Option<Nanos> {
        let open_for = self.settings.open_for.max(1);
        match self.state(now) {
            BreakerState::Closed => {
                let since = self.recovered_from?;
                self.retry_cap(now)?;
                let ramp = self.ramp_step();
                let step = now.saturating_sub(since) / ramp + 1;
                Some(since.saturating_add(step.saturating_mul(ramp)))
            }
            BreakerState::Open { until } => Some(until),
            BreakerState::HalfOpen { since, .. } if self.settings.probe_ramp => {
                let ramp = self.ramp_step();
                let step = now.saturating_sub(since) / ramp + 1;
                Some(since.saturating_add(step.saturating_mul(ramp)))
            }
            BreakerState::HalfOpen { last_probe, .. } => Some(last_probe.saturating_add(open_for)),
        }
    }

    fn probe_lost(&self, now: Nanos, last_probe: Nanos) -> bool {
        now.saturating_sub(last_probe) >= self.settings.open_for
    }

    /// Lets an attempt through if the state allows, reserving a probe slot when half-open.
    /// Every `true` must be followed by [`CircuitBreaker::on_outcome`] for that attempt.
    pub fn try_acquire(&mut self, now: Nanos) -> bool {
        if !self.would_allow(now) {
            return false;
        }
        self.state = match self.state(now) {
            BreakerState::HalfOpen {
                probes,
                successes,
                last_probe,
                since,
            } => BreakerState::HalfOpen {
                probes: if self.probe_lost(now, last_probe) {
                    1
                } else {
                    probes + 1
                },
                successes,
                last_probe: now,
                since,
            },
            state => state,
        };
        true
    }

    /// Records an attempt's outcome.
    pub fn on_outcome(&mut self, now: Nanos, signal: BreakerSignal) {
        self.on_outcome_pending(now, signal, 0);
    }

    /// Records an attempt's outcome while `pending` other attempts to the provider are still
    /// in flight. A run of failures no longer than the attempts still pending is not a verdict
    /// yet: failures come back in 100 ms and successes take seconds, so after traffic starts
    /// (or after the breaker closes and the requests that waited are sent at once) the first
    /// ten outcomes are often ten failures while the successes are still on their way. The
    /// simulator at 60 requests a second showed the breaker flapping open every few seconds
    /// against a provider answering 65% of requests. In a hard outage nothing stays pending, so
    /// the run still trips it.
    pub fn on_outcome_pending(&mut self, now: Nanos, signal: BreakerSignal, pending: u32) {
        self.on_outcome_of(now, now, signal, pending);
    }

    /// [`CircuitBreaker::on_outcome_pending`] for an attempt let through at `sent_at`. While
    /// half-open, only the episode's probes count: an attempt let through before the breaker
    /// half-opened held no probe slot and says nothing about the provider now (a 25 s stall
    /// from before an outage re-opened a recovered provider's breaker, again and again, and a
    /// cancelled one freed a probe slot it never held).
    pub fn on_outcome_of(
        &mut self,
        now: Nanos,
        sent_at: Nanos,
        signal: BreakerSignal,
        pending: u32,
    ) {
        if let BreakerState::HalfOpen { since, .. } = self.state(now) {
            if sent_at < since {
                return;
            }
        }
        self.pending = pending;
        match (self.state, signal) {
            (_, BreakerSignal::Ignore) => {
                if let BreakerState::HalfOpen {
                    probes,
                    successes,
                    last_probe,
                    since,
                } = self.state
                {
                    // The probe proved nothing; free its slot.
                    self.state = BreakerState::HalfOpen {
                        probes: probes.saturating_sub(1),
                        successes,
                        last_probe,
                        since,
                    };
                }
            }
            (BreakerState::HalfOpen { successes, .. }, BreakerSignal::Success) => {
                if successes + 1 >= self.settings.probe_successes {
                    self.close(now);
                } else if let BreakerState::HalfOpen {
                    probes,
                    last_probe,
                    since,
                    ..
                } = self.state
                {
                    self.state = BreakerState::HalfOpen {
                        probes: probes.saturating_sub(1),
                        successes: successes + 1,
                        last_probe,
                        since,
                    };
                }
            }
            (BreakerState::HalfOpen { .. }, BreakerSignal::Failure) => self.open(now),
            // Outcomes of attempts let through before the breaker opened change nothing.
            (BreakerState::Open { .. }, _) => {}
            (BreakerState::Closed, BreakerSignal::Success) => {
                self.note_counting(now);
                self.consecutive_failures = 0;
                self.last_success = Some(now);
                let c = self.ring.current(now);
                c.successes = c.successes.saturating_add(1);
            }
            (BreakerState::Closed, BreakerSignal::Failure) => {
                self.note_counting(now);
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                let c = self.ring.current(now);
                c.failures = c.failures.saturating_add(1);
                if self.should_trip(now) {
                    self.open(now);
                }
            }
        }
    }

    /// An attempt let through made real progress (its first token or byte): a half-open
    /// breaker closes at once, since the provider is answering.
    pub fn on_progress(&mut self, now: Nanos) {
        if let BreakerState::HalfOpen { .. } = self.state(now) {
            self.close(now);
        }
    }

    fn should_trip(&self, now: Nanos) -> bool {
        let s = &self.settings;
        let silent = self
            .last_success
            .is_none_or(|at| now.saturating_sub(at) >= s.window / 10);
        if s.consecutive_failures > 0
            && self.consecutive_failures >= s.consecutive_failures
            && self.consecutive_failures > self.pending
            && silent
        {
            return true;
        }
        let (ok, failed) = self.ring.fold(now, (0u64, 0u64), |(o, f), c| {
            (o + u64::from(c.successes), f + u64::from(c.failures))
        });
        let total = ok + failed;
        let spans_enough = now.saturating_sub(self.counting_since) >= s.window / 2;
        spans_enough
            && total >= u64::from(s.min_volume.max(1))
            && (ok as f64) < s.min_success_rate * total as f64
    }

    /// Starts the span clock when the window holds nothing yet.
    fn note_counting(&mut self, now: Nanos) {
        let empty = self
            .ring
            .fold(now, true, |e, c| e && c.successes == 0 && c.failures == 0);
        if empty {
            self.counting_since = now;
        }
    }

    fn open(&mut self, now: Nanos) {
        let shift = self.reopen_count.min(16);
        let wait = self
            .settings
            .open_for
            .saturating_mul(1u64 << shift)
            .min(self.settings.max_open_for.max(self.settings.open_for));
        self.reopen_count = self.reopen_count.saturating_add(1);
        self.recovered_from = None;
        self.state = BreakerState::Open {
            until: now.saturating_add(wait),
        };
    }

    fn close(&mut self, now: Nanos) {
        self.recovered_from = match self.state(now) {
            BreakerState::HalfOpen { since, .. } => Some(since),
            _ => None,
        };
        self.state = BreakerState::Closed;
        self.reopen_count = 0;
        self.consecutive_failures = 0;
        self.ring.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::ms;

    /// Settings that exercise every part of the state machine: a success-rate threshold a
    /// brownout crosses, two probes to close, longer open periods.
    fn mechanics() -> BreakerSettings {
        BreakerSettings {
            min_success_rate: 0.5,
            open_for: secs(5),
            max_open_for: secs(30),
            probe_successes: 2,
            ..BreakerSettings::default()
        }
    }

    #[test]
    fn defaults_ride_out_a_brownout_and_trip_on_an_outage() {
        let mut b = CircuitBreaker::new(BreakerSettings::default());
        // 40% success at 100 outcomes a second for a minute, in a fixed pattern with runs of
        // up to twelve failures: never a verdict.
        let (mut now, mut last_success) = (0, 0);
        for i in 0..6_000u64 {
            now = ms(i * 10);
            let signal = if i % 25 < 10 {
                last_success = now;
                BreakerSignal::Success
            } else {
                BreakerSignal::Failure
            };
            settle(&mut b, now, signal);
        }
        assert_eq!(b.state(now), BreakerState::Closed);
        // Then nothing succeeds: the run opens it once a second passed since the last success.
        for i in 1..=200u64 {
            let at = now + ms(i * 10);
            if !b.try_acquire(at) {
                let silence = at - last_success;
                assert!(
                    (secs(1)..secs(1) + ms(20)).contains(&silence),
                    "opened {silence} ns after the last success"
                );
                return;
            }
            b.on_outcome(at, BreakerSignal::Failure);
        }
        panic!("an outage never opened the breaker");
    }

    #[test]
    fn a_probe_that_makes_progress_closes_the_breaker() {
        let mut b = CircuitBreaker::new(BreakerSettings::default());
        for i in 0..10 {
            settle(&mut b, ms(i), BreakerSignal::Failure);
        }
        let open_until = match b.state(ms(10)) {
            BreakerState::Open { until } => until,
            other => panic!("{other:?}"),
        };
        assert_eq!(open_until, ms(9) + ms(500));
        assert!(b.try_acquire(open_until));
        assert!(!b.try_acquire(open_until + 1), "one probe at a time");
        b.on_progress(open_until + ms(300));
        assert_eq!(b.state(open_until + ms(300)), BreakerState::Closed);
        // Progress while closed changes nothing.
        b.on_progress(open_until + ms(400));
        assert_eq!(b.state(open_until + ms(400)), BreakerState::Closed);
    }

    fn settle(b: &mut CircuitBreaker, now: Nanos, signal: BreakerSignal) {
        assert!(b.try_acquire(now), "not allowed at {now}");
        b.on_outcome(now, signal);
    }

    #[test]
    fn opens_on_consecutive_failures_then_half_opens_then_closes() {
        let mut b = CircuitBreaker::new(mechanics());
        for i in 0..10 {
            settle(&mut b, ms(i), BreakerSignal::Failure);
        }
        assert_eq!(
            b.state(ms(10)),
            BreakerState::Open {
                until: ms(9) + secs(5)
            }
        );
        assert!(!b.try_acquire(ms(100)));
        let t = ms(9) + secs(5);
        assert!(b.try_acquire(t));
        // One probe at a time.
        assert!(!b.try_acquire(t));
        b.on_outcome(t, BreakerSignal::Success);
        settle(&mut b, t + 1, BreakerSignal::Success);
        assert_eq!(b.state(t + 2), BreakerState::Closed);
    }

    #[test]
    fn opens_on_success_rate_with_volume() {
        let mut b = CircuitBreaker::new(BreakerSettings {
            consecutive_failures: 0,
            ..mechanics()
        });
        // 1 success, 2 failures, one outcome every 500 ms: rate 1/3 < 0.5; volume reaches 10
        // at 4.5 s, but the outcomes span half the window only at 5 s.
        let mut i = 0;
        while b.would_allow(ms(i * 500)) {
            let signal = if i % 3 == 0 {
                BreakerSignal::Success
            } else {
                BreakerSignal::Failure
            };
            settle(&mut b, ms(i * 500), signal);
            i += 1;
            assert!(i < 100);
        }
        assert!((11..=12).contains(&i), "tripped after {i}");
    }

    #[test]
    fn early_fast_failures_do_not_trip_on_rate() {
        // Traffic starts: failures answer in 100 ms, successes in seconds. Six failures and
        // four successes in the first 1.5 s are not a verdict.
        let mut b = CircuitBreaker::new(mechanics());
        for i in 0..6 {
            settle(&mut b, ms(100 + i * 50), BreakerSignal::Failure);
        }
        for i in 0..4 {
            settle(&mut b, ms(1000 + i * 100), BreakerSignal::Success);
        }
        settle(&mut b, ms(1500), BreakerSignal::Failure);
        assert_eq!(b.state(ms(1500)), BreakerState::Closed);
    }

    #[test]
    fn failures_while_more_attempts_are_pending_are_not_a_run() {
        let mut b = CircuitBreaker::new(mechanics());
        for i in 0..10 {
            assert!(b.try_acquire(ms(i)));
            b.on_outcome_pending(ms(i), BreakerSignal::Failure, 40);
        }
        assert_eq!(b.state(ms(10)), BreakerState::Closed);
        // Nothing pending any more: the run is a verdict.
        assert!(b.try_acquire(ms(11)));
        b.on_outcome_pending(ms(11), BreakerSignal::Failure, 0);
        assert!(matches!(b.state(ms(11)), BreakerState::Open { .. }));
    }

    #[test]
    fn reopen_doubles_wait() {
        let mut b = CircuitBreaker::new(mechanics());
        for _ in 0..10 {
            settle(&mut b, 0, BreakerSignal::Failure);
        }
        settle(&mut b, secs(5), BreakerSignal::Failure);
        assert_eq!(b.state(secs(5)), BreakerState::Open { until: secs(15) });
    }

    fn is_open(b: &CircuitBreaker, now: Nanos) -> bool {
        matches!(b.state(now), BreakerState::Open { .. })
    }

    #[test]
    fn a_run_of_failures_trips_at_its_length_and_only_after_a_silent_tenth_of_the_window() {
        let s = BreakerSettings::default(); // 10 in a row, 10 s window
        let mut b = CircuitBreaker::new(s);
        for i in 0..9 {
            settle(&mut b, ms(i), BreakerSignal::Failure);
        }
        assert!(!is_open(&b, ms(9)), "9 failures in a row are not 10");
        settle(&mut b, ms(9), BreakerSignal::Failure);
        assert!(is_open(&b, ms(9)));
        // A success a tenth of the window before the tenth failure: silent long enough.
        let mut b = CircuitBreaker::new(s);
        settle(&mut b, 0, BreakerSignal::Success);
        for i in 1..10 {
            settle(&mut b, ms(i), BreakerSignal::Failure);
        }
        let tenth = s.window / 10;
        settle(&mut b, tenth - 1, BreakerSignal::Failure);
        assert!(!is_open(&b, tenth - 1), "a success less than a tenth ago");
        settle(&mut b, tenth, BreakerSignal::Failure);
        assert!(is_open(&b, tenth), "a success exactly a tenth ago");
        // A run no longer than the attempts still pending is not a verdict yet.
        let mut b = CircuitBreaker::new(s);
        for i in 0..12 {
            assert!(b.try_acquire(ms(i)));
            b.on_outcome_pending(ms(i), BreakerSignal::Failure, 12);
        }
        assert!(!is_open(&b, ms(12)), "12 failures with 12 still pending");
        assert!(b.try_acquire(ms(13)));
        b.on_outcome_pending(ms(13), BreakerSignal::Failure, 12);
        assert!(is_open(&b, ms(13)), "13 failures with 12 pending");
    }

    #[test]
    fn the_success_rate_is_judged_strictly_below_its_threshold_with_volume_and_span() {
        let s = BreakerSettings {
            consecutive_failures: 0, // the rate alone
            min_success_rate: 0.5,
            min_volume: 10,
            ..BreakerSettings::default()
        };
        let half = s.window / 2;
        // Exactly half succeed: not below the threshold.
        let mut b = CircuitBreaker::new(s);
        settle(&mut b, 0, BreakerSignal::Success);
        for _ in 0..4 {
            settle(&mut b, half, BreakerSignal::Success);
        }
        for _ in 0..5 {
            settle(&mut b, half, BreakerSignal::Failure);
        }
        assert!(!is_open(&b, half), "5 of 10 is not below 0.5");
        settle(&mut b, half, BreakerSignal::Failure);
        assert!(is_open(&b, half), "5 of 11 is");
        // Volume: nine failures are not enough, the tenth is.
        let mut b = CircuitBreaker::new(s);
        settle(&mut b, 0, BreakerSignal::Failure);
        for _ in 0..8 {
            settle(&mut b, half, BreakerSignal::Failure);
        }
        assert!(!is_open(&b, half), "9 outcomes");
        settle(&mut b, half, BreakerSignal::Failure);
        assert!(is_open(&b, half), "10 outcomes");
        // Span: outcomes that began less than half a window ago are not judged yet.
        let mut b = CircuitBreaker::new(s);
        settle(&mut b, ms(1), BreakerSignal::Failure);
        for _ in 0..10 {
            settle(&mut b, half, BreakerSignal::Failure);
        }
        assert!(!is_open(&b, half), "spanning half a window less 1 ms");
        settle(&mut b, half + ms(1), BreakerSignal::Failure);
        assert!(is_open(&b, half + ms(1)), "spanning half a window");
    }

    #[test]
    fn the_span_clock_restarts_when_the_window_empties() {
        let s = BreakerSettings {
            consecutive_failures: 0,
            min_success_rate: 0.5,
            min_volume: 10,
            ..BreakerSettings::default()
        };
        let mut b = CircuitBreaker::new(s);
        settle(&mut b, 0, BreakerSignal::Success);
        // Two windows later the ring is empty: the span starts again at the next outcome, so
        // ten failures at once are not judged.
        let later = 2 * s.window;
        for _ in 0..10 {
            settle(&mut b, later, BreakerSignal::Failure);
        }
        assert!(!is_open(&b, later), "a span of zero");
        settle(&mut b, later + s.window / 2, BreakerSignal::Failure);
        assert!(is_open(&b, later + s.window / 2));
    }

    #[test]
    fn a_half_open_breaker_wakes_its_waiters_at_each_doubling() {
        let mut b = CircuitBreaker::new(BreakerSettings::default());
        for i in 0..10 {
            settle(&mut b, ms(i), BreakerSignal::Failure);
        }
        let until = match b.state(ms(9)) {
            BreakerState::Open { until } => until,
            other => panic!("{other:?}"),
        };
        assert_eq!(b.next_change(ms(9)), Some(until));
        let step = b.ramp_step();
        assert_eq!(b.next_change(until), Some(until + step));
        assert_eq!(b.next_change(until + step - 1), Some(until + step));
        assert_eq!(b.next_change(until + step), Some(until + 2 * step));
        // Without the ramp: a lost probe's slot frees after `open_for`.
        let mut b = CircuitBreaker::new(BreakerSettings {
            probe_ramp: false,
            ..BreakerSettings::default()
        });
        for i in 0..10 {
            settle(&mut b, ms(i), BreakerSignal::Failure);
        }
        assert!(b.try_acquire(until));
        assert_eq!(
            b.next_change(until + ms(1)),
            Some(until + BreakerSettings::default().open_for)
        );
    }

    #[test]
    fn after_an_outage_the_probe_ramp_goes_on_for_retries_then_ends() {
        let mut b = CircuitBreaker::new(BreakerSettings::default());
        assert_eq!(b.retry_cap(0), None, "no outage, no bound");
        for i in 0..10 {
            settle(&mut b, ms(i), BreakerSignal::Failure);
        }
        let half_open = ms(9) + BreakerSettings::default().open_for;
        assert!(b.try_acquire(half_open));
        // The probe's first byte: closed, and the ramp goes on from the episode's start.
        let up = half_open + ms(300);
        b.on_progress(up);
        assert_eq!(b.state(up), BreakerState::Closed);
        let step = b.ramp_step();
        assert_eq!(b.retry_cap(up), Some(1 << (ms(300) / step)));
        assert_eq!(
            b.next_change(up),
            Some(half_open + (ms(300) / step + 1) * step)
        );
        let last = half_open + (RECOVERY_DOUBLINGS - 1) * step;
        assert_eq!(b.retry_cap(last), Some(1 << (RECOVERY_DOUBLINGS - 1)));
        assert_eq!(b.retry_cap(last + step), None, "the ramp ends");
        assert_eq!(b.next_change(last + step), None);
        // A new outage ends it at once.
        let mut b2 = b.clone();
        for i in 0..10 {
            settle(&mut b2, up + ms(i), BreakerSignal::Failure);
        }
        assert!(matches!(b2.state(up + ms(10)), BreakerState::Open { .. }));
        assert_eq!(b2.retry_cap(up + ms(10)), None);
        // Without the probe ramp there is no recovery ramp either.
        let mut b3 = CircuitBreaker::new(BreakerSettings {
            probe_ramp: false,
            ..BreakerSettings::default()
        });
        for i in 0..10 {
            settle(&mut b3, ms(i), BreakerSignal::Failure);
        }
        assert!(b3.try_acquire(half_open));
        b3.on_progress(up);
        assert_eq!(b3.state(up), BreakerState::Closed);
        assert_eq!(b3.retry_cap(up), None);
    }

    #[test]
    fn lost_probe_frees_its_slot() {
        let mut b = CircuitBreaker::new(mechanics());
        for _ in 0..10 {
            settle(&mut b, 0, BreakerSignal::Failure);
        }
        assert!(b.try_acquire(secs(5)));
        assert!(!b.try_acquire(secs(6)));
        assert!(b.try_acquire(secs(10)));
    }
}
