//! The baseline policies every report compares against, exactly as the scenarios README
//! defines them.

use super::{AttId, AttemptResult, Policy, ReqId, World};
use unbusy_core::time::{Nanos, MILLISECOND, SECOND};

/// Which baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// One attempt.
    None,
    /// Up to 5 retries, 1 s first delay, doubling, no jitter, on any error.
    Naive,
    /// The OpenAI SDKs: 2 retries on 408/409/429/5xx and transport errors, min(0.5 s * 2^n,
    /// 8 s) * (1 - 0.25 * random), `retry-after` honoured when 0 to 60 s.
    OpenAiSdk,
    /// Envoy route retries: 2 retries on 5xx, reset, 429; full jitter from 25 ms to 250 ms;
    /// Retry-After honoured up to 300 s; at most 3 retries outstanding per cluster; no
    /// failover across providers.
    EnvoyNative,
}

impl Baseline {
    /// The policy's report name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Naive => "naive",
            Self::OpenAiSdk => "openai-sdk",
            Self::EnvoyNative => "envoy-native",
        }
    }

    /// The most attempts a request may get.
    pub const fn max_attempts(self) -> u32 {
        match self {
            Self::None => 1,
            Self::Naive => 6,
            Self::OpenAiSdk | Self::EnvoyNative => 3,
        }
    }
}

/// Envoy's default `max_retries` circuit breaker.
const ENVOY_MAX_RETRIES_OUTSTANDING: u32 = 3;

/// A baseline driving the world.
pub struct BaselinePolicy {
    kind: Baseline,
    /// Per request: the provider it is pinned to and whether a retry of it is outstanding.
    pinned: Vec<Option<usize>>,
    retry_outstanding: Vec<bool>,
    /// Per provider: retries outstanding (Envoy's circuit breaker).
    retries_outstanding: Vec<u32>,
}

impl BaselinePolicy {
    /// A new baseline policy.
    pub fn new(kind: Baseline, providers: usize) -> Self {
        Self {
            kind,
            pinned: Vec::new(),
            retry_outstanding: Vec::new(),
            retries_outstanding: vec![0; providers],
        }
    }

    fn grow(&mut self, req: ReqId) {
        if self.pinned.len() <= req {
            self.pinned.resize(req + 1, None);
            self.retry_outstanding.resize(req + 1, false);
        }
    }

    fn end_retry(&mut self, req: ReqId) {
        if std::mem::take(&mut self.retry_outstanding[req]) {
            if let Some(p) = self.pinned[req] {
                self.retries_outstanding[p] = self.retries_outstanding[p].saturating_sub(1);
            }
        }
    }

    fn retryable(&self, result: AttemptResult, stream: bool) -> bool {
        use AttemptResult as R;
        match self.kind {
            Baseline::None => false,
            Baseline::Naive => result != R::Ok,
            Baseline::OpenAiSdk => match result {
                R::Status { status, .. } => matches!(status, 408 | 409 | 429) || status >= 500,
                R::Reset | R::Refused => true,
                // A stream's 200 headers reached the caller before the keep-alive bytes: the
                // SDK has returned the stream and cannot retry it. A non-streaming answer is
                // read inside the SDK's request, where the broken body is a connection error
                // it retries.
                R::StallClosed => !stream,
                R::Ok => false,
            },
            // A stall answered 200: headers went downstream, Envoy cannot retry it.
            Baseline::EnvoyNative => match result {
                R::Status { status, .. } => status == 429 || status >= 500,
                R::Reset | R::Refused => true,
                R::StallClosed | R::Ok => false,
            },
        }
    }

    /// The delay before retry number `n` (0 for the first retry).
    fn delay(&self, w: &mut World, n: u32, result: AttemptResult) -> Nanos {
        let hint = match result {
            AttemptResult::Status { hint, .. } => hint,
            _ => None,
        };
        match self.kind {
            Baseline::None => 0,
            Baseline::Naive => SECOND << n.min(20),
            // The SDKs read `retry-after-ms`, then `retry-after`, and believe 0 to 60 s.
            Baseline::OpenAiSdk => match hint {
                Some(h) if h.millis <= 60_000 => h.millis * MILLISECOND,
                _ => {
                    let base = (0.5 * f64::from(1u32 << n.min(20))).min(8.0);
                    super::ns(base * (1.0 - 0.25 * w.policy_rng.f64()))
                }
            },
            // Envoy's rate-limited back-off reads `Retry-After` (whole seconds), up to 300 s.
            Baseline::EnvoyNative => match hint {
                Some(h) if h.seconds <= 300 => h.seconds * SECOND,
                _ => {
                    let ceiling = ((25 * MILLISECOND) << n.min(20)).min(250 * MILLISECOND);
                    w.policy_rng.u64(0..=ceiling)
                }
            },
        }
    }
}

impl Policy for BaselinePolicy {
    fn on_arrival(&mut self, w: &mut World, req: ReqId) {
        self.grow(req);
        let p = w.pick_preferred();
        self.pinned[req] = Some(p);
        w.send(req, p);
    }

    fn on_first_token(&mut self, _w: &mut World, _att: AttId) {}

    fn on_attempt_end(&mut self, w: &mut World, att: AttId) {
        let (req, result) = (w.attempts[att].req, w.attempts[att].result);
        self.end_retry(req);
        if w.requests[req].done {
            return;
        }
        if result == AttemptResult::Ok {
            w.finish(req, true);
            return;
        }
        let made = w.requests[req].attempts;
        if !self.retryable(result, w.requests[req].stream) || made >= self.kind.max_attempts() {
            w.finish(req, false);
            return;
        }
        let Some(p) = self.pinned[req] else {
            w.finish(req, false);
            return;
        };
        if self.kind == Baseline::EnvoyNative {
            if self.retries_outstanding[p] >= ENVOY_MAX_RETRIES_OUTSTANDING {
                // Overflow: Envoy passes the upstream's failure on.
                w.finish(req, false);
                return;
            }
            self.retries_outstanding[p] += 1;
            self.retry_outstanding[req] = true;
        }
        let delay = self.delay(w, made - 1, result);
        w.timer(w.now + delay, req as u64);
    }

    fn on_timer(&mut self, w: &mut World, key: u64) {
        let req = key as ReqId;
        if w.requests[req].done {
            self.end_retry(req);
            return;
        }
        // Clients without a deadline of their own still stop when the caller gave up; an
        // attempt is never sent past the caller's deadline.
        if w.now >= w.requests[req].deadline {
            self.end_retry(req);
            w.finish(req, false);
            return;
        }
        if let Some(p) = self.pinned[req] {
            w.send(req, p);
        }
    }

    fn on_caller_gave_up(&mut self, _w: &mut World, req: ReqId) {
        self.end_retry(req);
    }
}
