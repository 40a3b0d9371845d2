//! The scenario format shared by the simulator and the busy-provider emulator (see
//! `../shared/scenarios/README.md`): clients and providers misbehaving over time.
//!
//! Missing fields take the README's defaults and unknown fields are ignored, so any file that
//! follows the format loads; values that cannot mean anything (negative rates, probabilities
//! outside [0, 1], a window that ends before it starts) are refused with the field named.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// A whole scenario.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Scenario {
    /// Short id used in reports.
    pub name: String,
    /// Why the scenario matters.
    pub description: String,
    /// The default seed.
    pub seed: u64,
    /// Arrivals stop after this many seconds; requests in flight finish.
    pub duration_s: f64,
    /// The callers.
    pub clients: Clients,
    /// The providers, in file order.
    pub providers: Vec<Provider>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            name: String::from("unnamed"),
            description: String::new(),
            seed: 1,
            duration_s: 60.0,
            clients: Clients::default(),
            providers: Vec::new(),
        }
    }
}

/// The callers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Clients {
    /// Open-loop Poisson arrivals per second (used when `concurrency` is 0).
    pub rps: f64,
    /// When > 0: a closed loop of this many callers, each sending its next request 100 ms
    /// after the previous one ended (after a failure with a retry hint, that hint first).
    pub concurrency: u32,
    /// Share of requests with `"stream": true`.
    pub stream_fraction: f64,
    /// A caller gives up after this many seconds (a failure).
    pub deadline_s: f64,
    /// Share of requests identical to an earlier one.
    pub repeat_fraction: f64,
    /// Distinct API keys.
    pub tenants: u32,
}

impl Default for Clients {
    fn default() -> Self {
        Self {
            rps: 10.0,
            concurrency: 0,
            stream_fraction: 0.5,
            deadline_s: 60.0,
            repeat_fraction: 0.0,
            tenants: 1,
        }
    }
}

/// One provider.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Provider {
    /// Its name.
    pub name: String,
    /// Lower is preferred.
    pub priority: u32,
    /// Share of load among equal priorities.
    pub weight: u32,
    /// Max requests in flight; above it, 429 without Retry-After. 0: no limit.
    pub capacity: u32,
    /// Latency distributions.
    pub latency_ms: Latency,
    /// Fault windows.
    pub faults: Vec<FaultWindow>,
}

impl Default for Provider {
    fn default() -> Self {
        Self {
            name: String::from("provider"),
            priority: 0,
            weight: 1,
            capacity: 0,
            latency_ms: Latency::default(),
            faults: Vec::new(),
        }
    }
}

/// Lognormal latencies, each given as `[p50, p99]` in milliseconds.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct Latency {
    /// Time to the first token.
    pub first_token: [f64; 2],
    /// Time to the end of the answer.
    pub total: [f64; 2],
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            first_token: [400.0, 3000.0],
            total: [1500.0, 9000.0],
        }
    }
}

/// A window of faults; windows may overlap and their probabilities add up.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct FaultWindow {
    /// Start, seconds since the scenario began.
    pub from_s: f64,
    /// End (exclusive).
    pub to_s: f64,
    /// 503 with an overload body.
    pub busy_503: f64,
    /// 500 server error.
    pub error_500: f64,
    /// 429 with `Retry-After: retry_after_s`.
    pub rate_limit_429: f64,
    /// The Retry-After of those 429s, seconds.
    pub retry_after_s: f64,
    /// 200, then only keep-alive bytes for `stall_s`, then close.
    pub stall: f64,
    /// How long a stall lasts, seconds.
    pub stall_s: f64,
    /// Connection reset before any byte.
    pub reset: f64,
    /// Every request fails: 503, or a refused connection with `refuse`.
    pub outage: bool,
    /// With `outage`: refuse connections instead of answering 503.
    pub refuse: bool,
}

/// What a provider does with one request, drawn from its fault windows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// 503 with an overload body.
    Busy503,
    /// 500.
    Error500,
    /// 429 with Retry-After (seconds).
    RateLimit429 {
        /// Seconds.
        retry_after_s: f64,
    },
    /// Keep-alive only for this many seconds, then close.
    Stall {
        /// Seconds.
        stall_s: f64,
    },
    /// Reset before any byte.
    Reset,
    /// Connection refused (outage with `refuse`).
    Refused,
}

impl Provider {
    /// The fault for a request arriving `at_s` seconds into the scenario, given a uniform draw
    /// `u` in [0, 1).
    pub fn fault_at(&self, at_s: f64, u: f64) -> Fault {
        let active = || {
            self.faults
                .iter()
                .filter(move |w| at_s >= w.from_s && at_s < w.to_s)
        };
        if let Some(w) = active().find(|w| w.outage) {
            return if w.refuse {
                Fault::Refused
            } else {
                Fault::Busy503
            };
        }
        let mut edge = 0.0;
        for w in active() {
            let choices = [
                (w.busy_503, Fault::Busy503),
                (w.error_500, Fault::Error500),
                (
                    w.rate_limit_429,
                    Fault::RateLimit429 {
                        retry_after_s: w.retry_after_s,
                    },
                ),
                (
                    w.stall,
                    Fault::Stall {
                        stall_s: if w.stall_s > 0.0 { w.stall_s } else { 30.0 },
                    },
                ),
                (w.reset, Fault::Reset),
            ];
            for (p, fault) in choices {
                edge += p;
                if u < edge {
                    return fault;
                }
            }
        }
        Fault::None
    }

    /// Whether an outage with refused connections is active at `at_s`.
    pub fn refusing_at(&self, at_s: f64) -> bool {
        self.faults
            .iter()
            .any(|w| w.outage && w.refuse && at_s >= w.from_s && at_s < w.to_s)
    }
}

/// The retry hint a provider sends with a rate-limit answer whose `retry_after_s` is above 0:
/// `retry-after-ms` with the exact wait and `Retry-After` in whole seconds, rounded up (as
/// OpenAI does). A `retry_after_s` of 0 sends neither: a bare 429, the quota signal. The
/// simulator and the emulator both send exactly this, so every client reads the same headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryHint {
    /// `retry-after-ms`.
    pub millis: u64,
    /// `Retry-After`, whole seconds.
    pub seconds: u64,
}

impl RetryHint {
    /// The headers for a `retry_after_s`, if any are sent.
    pub fn from_seconds(retry_after_s: f64) -> Option<Self> {
        if !(retry_after_s > 0.0 && retry_after_s.is_finite()) {
            return None;
        }
        let millis = (retry_after_s * 1000.0).round().max(1.0) as u64;
        Some(Self {
            millis,
            seconds: millis.div_ceil(1000),
        })
    }
}

/// Why a scenario file was refused.
#[derive(Debug)]
pub struct ScenarioError(pub String);

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text =
            std::fs::read(path).map_err(|e| ScenarioError(format!("{}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| ScenarioError(format!("{}: {}", path.display(), e.0)))
    }

    /// Parses and checks a scenario.
    pub fn from_json(text: &[u8]) -> Result<Self, ScenarioError> {
        let s: Self = serde_json::from_slice(text).map_err(|e| ScenarioError(e.to_string()))?;
        s.check()?;
        Ok(s)
    }

    fn check(&self) -> Result<(), ScenarioError> {
        let mut problems = Vec::new();
        let mut need = |ok: bool, what: String| {
            if !ok {
                problems.push(what);
            }
        };
        let c = &self.clients;
        need(self.duration_s > 0.0, "duration_s must be > 0".into());
        need(
            c.rps >= 0.0 && c.rps.is_finite(),
            "clients.rps must be >= 0".into(),
        );
        need(
            c.rps > 0.0 || c.concurrency > 0,
            "clients: rps or concurrency must be > 0".into(),
        );
        need(c.deadline_s > 0.0, "clients.deadline_s must be > 0".into());
        for (name, v) in [
            ("stream_fraction", c.stream_fraction),
            ("repeat_fraction", c.repeat_fraction),
        ] {
            need(
                (0.0..=1.0).contains(&v),
                format!("clients.{name} must be in [0, 1]"),
            );
        }
        need(
            !self.providers.is_empty(),
            "providers must not be empty".into(),
        );
        for (i, p) in self.providers.iter().enumerate() {
            need(p.weight > 0, format!("providers[{i}].weight must be > 0"));
            for (name, [p50, p99]) in [
                ("first_token", p.latency_ms.first_token),
                ("total", p.latency_ms.total),
            ] {
                need(
                    p50 > 0.0 && p99 >= p50,
                    format!("providers[{i}].latency_ms.{name} must be [p50 > 0, p99 >= p50]"),
                );
            }
            for (j, w) in p.faults.iter().enumerate() {
                need(
                    w.to_s >= w.from_s,
                    format!("providers[{i}].faults[{j}]: to_s must be >= from_s"),
                );
                for (name, v) in [
                    ("busy_503", w.busy_503),
                    ("error_500", w.error_500),
                    ("rate_limit_429", w.rate_limit_429),
                    ("stall", w.stall),
                    ("reset", w.reset),
                ] {
                    need(
                        (0.0..=1.0).contains(&v),
                        format!("providers[{i}].faults[{j}].{name} must be in [0, 1]"),
                    );
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ScenarioError(problems.join("; ")))
        }
    }
}

/// A lognormal distribution given by its median and 99th percentile.
#[derive(Debug, Clone, Copy)]
pub struct LogNormal {
    mu: f64,
    sigma: f64,
}

/// The standard normal's 99th percentile.
const Z99: f64 = 2.326_347_874;

impl LogNormal {
    /// From `[p50, p99]`.
    pub fn from_percentiles([p50, p99]: [f64; 2]) -> Self {
        let p50 = p50.max(1e-3);
        Self {
            mu: p50.ln(),
            sigma: (p99.max(p50) / p50).ln() / Z99,
        }
    }

    /// A sample, from two uniform draws in (0, 1] (Box-Muller).
    pub fn sample(&self, u1: f64, u2: f64) -> f64 {
        let z = (-2.0 * u1.max(f64::MIN_POSITIVE).ln()).sqrt()
            * (2.0 * std::f64::consts::PI * u2).cos();
        (self.mu + self.sigma * z).exp()
    }
}
