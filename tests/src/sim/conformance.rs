//! Checks, after a run, that the baselines behaved exactly as `../shared/scenarios/README.md`
//! defines them and that closed-loop callers followed the caller model.
//!
//! The verdict "unbusy beats every baseline" is only worth something if the baselines are the
//! real ones: a baseline that retried more, or sooner, or elsewhere than its definition would
//! make unbusy look worse, and one that retried less would make it look better. The checks read
//! only what the world recorded (each attempt's provider, send and close times, the hints it
//! carried), never the baseline's own state, so a mistake in a baseline cannot hide itself.

use super::baseline::Baseline;
use super::{Attempt, AttemptResult, Violations, World, CALLER_MAX_HINT, THINK_TIME};
use unbusy_core::time::{Nanos, MILLISECOND, SECOND};

/// The most attempts a request may get, as the scenarios README defines each baseline (kept
/// apart from the baselines' own code, so that a mistake there cannot hide itself).
const fn defined_attempts(kind: Baseline) -> u32 {
    match kind {
        Baseline::None => 1,
        // "up to 5 retries"
        Baseline::Naive => 6,
        // "2 retries"
        Baseline::OpenAiSdk | Baseline::EnvoyNative => 3,
    }
}

/// Whether the README's definition of `kind` retries after `result` (for a stream: after its
/// 200 headers reached the caller, no SDK or proxy can retry it).
fn defined_retry(kind: Baseline, result: AttemptResult, stream: bool) -> bool {
    use AttemptResult as R;
    match (kind, result) {
        (Baseline::None, _) | (_, R::Ok) => false,
        (Baseline::Naive, _) => true,
        (Baseline::OpenAiSdk, R::Status { status, .. }) => {
            matches!(status, 408 | 409 | 429) || status >= 500
        }
        (Baseline::OpenAiSdk, R::StallClosed) => !stream,
        (Baseline::OpenAiSdk, R::Reset | R::Refused) => true,
        (Baseline::EnvoyNative, R::Status { status, .. }) => status == 429 || status >= 500,
        (Baseline::EnvoyNative, R::Reset | R::Refused) => true,
        (Baseline::EnvoyNative, R::StallClosed) => false,
    }
}

/// Records a deviation.
fn note(v: &mut Violations, what: String) -> u64 {
    if v.first.is_none() {
        v.first = Some(what);
    }
    1
}

/// Whether `delay`, the wait between attempt `prev`'s end and the next send, fits retry
/// number `n` (0 for the first retry) of `kind`.
fn delay_fits(kind: Baseline, n: u32, prev: &Attempt, delay: Nanos) -> bool {
    let hint = match prev.result {
        AttemptResult::Status { hint, .. } => hint,
        _ => None,
    };
    match kind {
        Baseline::None => false,
        Baseline::Naive => delay == SECOND << n,
        Baseline::OpenAiSdk => match hint {
            Some(h) if h.millis <= 60_000 => delay == h.millis * MILLISECOND,
            _ => {
                let base = ((500 * MILLISECOND) << n).min(8 * SECOND);
                // (1 - 0.25 * random) of the base, random in [0, 1); one nanosecond of float
                // rounding either way.
                delay + 1 >= base - base / 4 && delay <= base
            }
        },
        Baseline::EnvoyNative => match hint {
            Some(h) if h.seconds <= 300 => delay == h.seconds * SECOND,
            _ => delay <= ((25 * MILLISECOND) << n).min(250 * MILLISECOND),
        },
    }
}

/// Counts requests `kind` handled otherwise than its definition.
pub fn check_baseline(kind: Baseline, w: &World, v: &mut Violations) {
    let providers = &w.scenario.providers;
    let best = providers.iter().map(|p| p.priority).min().unwrap_or(0);
    // Envoy: intervals during which a retry was outstanding, per provider: from the end of the
    // attempt it retries until the retry's connection closed.
    let mut retry_spans: Vec<Vec<(Nanos, i32)>> = vec![Vec::new(); providers.len()];
    for (id, r) in w.requests.iter().enumerate() {
        let attempts: Vec<&Attempt> = r.attempt_ids.iter().map(|&a| &w.attempts[a]).collect();
        if attempts.len() as u32 > defined_attempts(kind) {
            v.too_many_attempts += note(
                v,
                format!(
                    "{}: request {id} got {} attempts",
                    kind.name(),
                    attempts.len()
                ),
            );
        }
        let Some(first) = attempts.first() else {
            continue;
        };
        if providers[first.provider].priority != best {
            v.off_definition += note(
                v,
                format!(
                    "{}: request {id} went to a provider outside the preferred group",
                    kind.name()
                ),
            );
        }
        for (n, pair) in attempts.windows(2).enumerate() {
            let (prev, next) = (pair[0], pair[1]);
            if next.provider != prev.provider {
                v.off_definition += note(
                    v,
                    format!("{}: request {id} retried on another provider", kind.name()),
                );
            }
            if !defined_retry(kind, prev.result, r.stream) {
                v.off_definition += note(
                    v,
                    format!(
                        "{}: request {id} retried after {:?} (stream: {})",
                        kind.name(),
                        prev.result,
                        r.stream
                    ),
                );
            }
            let prev_end = prev.closed_at.unwrap_or(prev.ends_at);
            let delay = next.sent.saturating_sub(prev_end);
            if !delay_fits(kind, n as u32, prev, delay) {
                v.off_definition += note(
                    v,
                    format!(
                        "{}: request {id} retry {} after {delay} ns (previous {:?})",
                        kind.name(),
                        n + 1,
                        prev.result
                    ),
                );
            }
            if kind == Baseline::EnvoyNative {
                let spans = &mut retry_spans[next.provider];
                spans.push((prev_end, 1));
                spans.push((next.closed_at.unwrap_or(next.ends_at), -1));
            }
        }
    }
    if kind == Baseline::EnvoyNative {
        for (p, spans) in retry_spans.iter_mut().enumerate() {
            // Ends before starts at the same instant: a retry slot freed and taken at once.
            spans.sort_unstable();
            let mut outstanding = 0;
            for &(at, change) in spans.iter() {
                outstanding += change;
                if outstanding > 3 {
                    v.off_definition += note(
                        v,
                        format!("envoy-native: {outstanding} retries outstanding on provider {p} at {at} ns"),
                    );
                    break;
                }
            }
        }
    }
}

/// Counts closed-loop arrivals that are not at the previous request's end plus the think time
/// plus the hint its failure carried (capped), or that came after the run's end.
pub fn check_callers(w: &World, v: &mut Violations) {
    if w.scenario.clients.concurrency == 0 {
        return;
    }
    let mut last: Vec<Option<usize>> = vec![None; w.scenario.clients.concurrency as usize];
    for (id, r) in w.requests.iter().enumerate() {
        let Some(caller) = r.caller else {
            continue;
        };
        let Some(slot) = last.get_mut(caller as usize) else {
            continue;
        };
        match slot.map(|p| &w.requests[p]) {
            None => {
                if r.arrival >= SECOND {
                    v.caller_model +=
                        note(v, format!("caller {caller} started at {} ns", r.arrival));
                }
            }
            Some(prev) => {
                let wait = prev.hint_told.unwrap_or(0).min(CALLER_MAX_HINT);
                let expected = prev.done_at.map(|d| d + wait + THINK_TIME);
                if expected != Some(r.arrival) {
                    v.caller_model += note(
                        v,
                        format!(
                            "caller {caller}: request {id} at {} ns, expected {expected:?}",
                            r.arrival
                        ),
                    );
                }
            }
        }
        *slot = Some(id);
    }
}
