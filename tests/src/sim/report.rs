//! Running a policy over a scenario and summarising what happened.

use super::baseline::{Baseline, BaselinePolicy};
use super::conformance::{check_baseline, check_callers};
use super::unbusy::{config_for, UnbusyPolicy};
use super::{Policy, Violations, World};
use crate::scenario::Scenario;
use serde::Serialize;
use unbusy_core::time::MILLISECOND;

/// Every policy the simulator knows, in report order.
pub const POLICIES: [&str; 6] = [
    "none",
    "naive",
    "openai-sdk",
    "envoy-native",
    "unbusy",
    "unbusy-blind",
];

/// The outcome of one policy over one scenario.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// The policy's name.
    pub policy: String,
    /// The seed.
    pub seed: u64,
    /// Requests the callers made.
    pub requests: u64,
    /// Requests answered successfully (cache hits included).
    pub succeeded: u64,
    /// `succeeded / requests`.
    pub success_rate: f64,
    /// Median latency of successful requests, ms.
    pub p50_ms: f64,
    /// 99th-percentile latency of successful requests, ms.
    pub p99_ms: f64,
    /// Upstream attempts per request.
    pub attempts_per_request: f64,
    /// The largest in-flight / capacity ratio over providers with a capacity (0 if none).
    pub max_overload: f64,
    /// Successful requests answered from the cache.
    pub cache_hits: u64,
    /// Of those, stale answers.
    pub stale_hits: u64,
    /// Invariant violations (all zero for a correct policy).
    #[serde(skip)]
    pub violations: Violations,
    /// The most attempts one request got.
    #[serde(skip)]
    pub max_attempts_seen: u32,
    /// Retries (attempts after a request's first) that were not answered successfully.
    #[serde(skip)]
    pub unanswered_retries: u64,
    /// When the last event happened, ms.
    #[serde(skip)]
    pub end_ms: f64,
    /// Requests repeating a prompt another tenant sent before (what a cache without tenant
    /// scoping would have served across tenants).
    #[serde(skip)]
    pub cross_tenant_repeats: u64,
    /// Every request's arrival (ms) and whether it succeeded, in arrival order.
    #[serde(skip)]
    pub outcomes: Vec<(f64, bool)>,
}

impl Report {
    /// Requests that arrived at or after `at_s` seconds, and how many of them succeeded.
    pub fn arrived_after(&self, at_s: f64) -> (u64, u64) {
        let at_ms = at_s * 1000.0;
        self.outcomes
            .iter()
            .filter(|(arrival, _)| *arrival >= at_ms)
            .fold((0, 0), |(n, ok), (_, s)| (n + 1, ok + u64::from(*s)))
    }
}

/// Why a run could not start.
#[derive(Debug)]
pub struct UnknownPolicy(pub String);

/// Runs `policy` over `scenario` with `seed`.
pub fn run(scenario: &Scenario, seed: u64, policy: &str) -> Result<Report, UnknownPolicy> {
    let mut world = World::new(scenario.clone(), seed);
    let providers = scenario.providers.len();
    let baseline = match policy {
        "none" => Some(Baseline::None),
        "naive" => Some(Baseline::Naive),
        "openai-sdk" => Some(Baseline::OpenAiSdk),
        "envoy-native" => Some(Baseline::EnvoyNative),
        _ => None,
    };
    let mut driver: Box<dyn Policy> = match (baseline, policy) {
        (Some(kind), _) => Box::new(BaselinePolicy::new(kind, providers)),
        (None, "unbusy" | "unbusy-blind") => {
            let config = config_for(&world, policy == "unbusy");
            let p = UnbusyPolicy::new(config, seed ^ 0x00ba_d5ee_d000)
                .map_err(|e| UnknownPolicy(format!("the unbusy configuration is invalid: {e}")))?;
            Box::new(p)
        }
        _ => {
            return Err(UnknownPolicy(format!(
                "unknown policy {policy:?}; expected one of {}",
                POLICIES.join(", ")
            )))
        }
    };
    world.run(driver.as_mut());
    if let Some(kind) = baseline {
        let mut v = std::mem::take(&mut world.violations);
        check_baseline(kind, &world, &mut v);
        world.violations = v;
    }
    let mut v = std::mem::take(&mut world.violations);
    check_callers(&world, &mut v);
    world.violations = v;
    Ok(summarise(&world, policy, seed))
}

fn summarise(w: &World, policy: &str, seed: u64) -> Report {
    let requests = w.requests.len() as u64;
    let mut latencies: Vec<f64> = w
        .requests
        .iter()
        .filter(|r| r.succeeded)
        .map(|r| {
            let end = r.done_at.unwrap_or(r.arrival);
            end.saturating_sub(r.arrival) as f64 / MILLISECOND as f64
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let succeeded = latencies.len() as u64;
    let attempts: u64 = w.requests.iter().map(|r| u64::from(r.attempts)).sum();
    let max_overload = w
        .providers
        .iter()
        .map(|p| p.max_overload)
        .fold(0.0, f64::max);
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Report {
        scenario: w.scenario.name.clone(),
        policy: policy.to_string(),
        seed,
        requests,
        succeeded,
        success_rate: ratio(succeeded, requests),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        attempts_per_request: ratio(attempts, requests),
        max_overload,
        cache_hits: w.cache_hits,
        stale_hits: w.stale_hits,
        violations: w.violations.clone(),
        max_attempts_seen: w.requests.iter().map(|r| r.attempts).max().unwrap_or(0),
        unanswered_retries: w
            .requests
            .iter()
            .flat_map(|r| r.attempt_ids.iter().skip(1))
            .filter(|&&a| !w.attempts[a].answered)
            .count() as u64,
        end_ms: w.now as f64 / MILLISECOND as f64,
        cross_tenant_repeats: cross_tenant_repeats(w),
        outcomes: w
            .requests
            .iter()
            .map(|r| (r.arrival as f64 / MILLISECOND as f64, r.succeeded))
            .collect(),
    }
}

fn cross_tenant_repeats(w: &World) -> u64 {
    let mut first_tenant = std::collections::HashMap::new();
    let mut n = 0;
    for r in &w.requests {
        let t = *first_tenant.entry(r.prompt).or_insert(r.tenant);
        n += u64::from(t != r.tenant);
    }
    n
}

/// The `q` quantile of sorted values (nearest rank); 0 when empty.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(0.0)
}

/// A readable table of reports.
pub fn table(reports: &[Report]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<14} {:<13} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
        "scenario",
        "policy",
        "requests",
        "succeeded",
        "success",
        "p50 ms",
        "p99 ms",
        "att/req",
        "overload",
        "cached"
    ));
    for r in reports {
        out.push_str(&format!(
            "{:<14} {:<13} {:>8} {:>9} {:>8.2}% {:>9.0} {:>9.0} {:>9.2} {:>9.2} {:>7}\n",
            r.scenario,
            r.policy,
            r.requests,
            r.succeeded,
            r.success_rate * 100.0,
            r.p50_ms,
            r.p99_ms,
            r.attempts_per_request,
            r.max_overload,
            r.cache_hits
        ));
    }
    out
}

/// Markdown tables, one per scenario.
pub fn markdown(reports: &[Report]) -> String {
    let mut out = String::new();
    let mut current: Option<&str> = None;
    for r in reports {
        if current != Some(r.scenario.as_str()) {
            current = Some(r.scenario.as_str());
            out.push_str(&format!(
                "\n#### {} (seed {})\n\n| policy | requests | succeeded | success rate | p50 ms | p99 ms | attempts/request | max overload | cache hits |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
                r.scenario, r.seed
            ));
        }
        out.push_str(&format!(
            "| {} | {} | {} | {:.2}% | {:.0} | {:.0} | {:.2} | {:.2} | {} |\n",
            r.policy,
            r.requests,
            r.succeeded,
            r.success_rate * 100.0,
            r.p50_ms,
            r.p99_ms,
            r.attempts_per_request,
            r.max_overload,
            r.cache_hits
        ));
    }
    out
}
