//! Generated worlds: the proof that a policy is general, not tuned.
//!
//! Six hand-written scenarios say little about a policy's composition: the engine was once
//! tuned on them and then did worse than one plain attempt on most worlds it had not seen. So
//! worlds are drawn at random over the whole space the scenario format allows (1 to 3
//! providers with priorities and weights, capacities, latencies, every fault kind and outages,
//! 429 storms, open and closed loops, deadlines, tenants, repeats), every policy runs on each,
//! and unbusy is judged against every baseline world by world.
//!
//! A world is a plain [`Scenario`], so a failing one is written out as a scenario file with its
//! seed and replayed with `simulate --scenario` (and kept under `tests/scenarios/regressions/`).
//!
//! Liveness is judged on the same world with its faults removed: requests arriving 10 s after
//! the last fault ended should succeed as often as the same requests in the fault-free twin.

use super::report::{run, Report, UnknownPolicy};
use crate::scenario::{Clients, FaultWindow, Latency, Provider, Scenario};
use serde::Serialize;
use unbusy_core::Rng;

/// How much of the space to draw from.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    /// The longest run, seconds (arrivals stop then).
    pub max_duration_s: f64,
    /// The most requests per second (open loop) or callers (closed loop).
    pub max_load: f64,
}

impl Default for Space {
    fn default() -> Self {
        Self {
            max_duration_s: 120.0,
            max_load: 100.0,
        }
    }
}

/// A number between `lo` and `hi`, uniform in its logarithm (latencies, rates, counts: each
/// order of magnitude is as likely as the next).
fn log_uniform(rng: &mut Rng, lo: f64, hi: f64) -> f64 {
    (lo.ln() + rng.f64() * (hi.ln() - lo.ln())).exp()
}

/// One decimal place of precision is plenty and keeps written-out worlds readable.
fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A fault rate up to 0.6, most often small: a rate drawn as the square of a uniform.
fn rate(rng: &mut Rng) -> f64 {
    let u = rng.f64();
    round3(0.6 * u * u)
}

/// World number `index` of the set drawn from `seed`.
pub fn generate(seed: u64, index: u64, space: Space) -> Scenario {
    let world_seed = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index.wrapping_mul(0xd1b5_4a32_d192_ed03))
        ^ 0x5851_f42d_4c95_7f2d;
    let mut rng = Rng::with_seed(world_seed);
    let duration_s = round1(rng.f64() * (space.max_duration_s - 20.0).max(0.0) + 20.0);
    let closed = rng.f64() < 0.3;
    let load = log_uniform(&mut rng, 5.0, space.max_load.max(5.0));
    let stream_fraction = match rng.u32(0..4) {
        0 => 0.0,
        1 => 1.0,
        2 => 0.5,
        _ => round3(rng.f64()),
    };
    let clients = Clients {
        rps: if closed { 0.0 } else { round1(load) },
        concurrency: if closed { load.round() as u32 } else { 0 },
        stream_fraction,
        deadline_s: round1(log_uniform(&mut rng, 10.0, 120.0)),
        repeat_fraction: if rng.bool() {
            0.0
        } else {
            round3(rng.f64() * 0.5)
        },
        tenants: log_uniform(&mut rng, 1.0, 50.0).round() as u32,
    };
    // Half the worlds end their faults early enough to judge recovery.
    let faults_end_s = if rng.bool() {
        round1(duration_s * (0.4 + 0.3 * rng.f64()))
    } else {
        duration_s
    };
    let count = rng.usize(1..=3);
    let providers = (0..count)
        .map(|i| provider(&mut rng, i, duration_s, faults_end_s))
        .collect();
    Scenario {
        name: format!("world-{seed}-{index}"),
        description: format!("generated: simulate --worlds {} --seed {seed}", index + 1),
        seed: world_seed,
        duration_s,
        clients,
        providers,
    }
}

fn provider(rng: &mut Rng, i: usize, duration_s: f64, faults_end_s: f64) -> Provider {
    let ft_p50 = log_uniform(rng, 100.0, 3000.0);
    let ft_p99 = ft_p50 * log_uniform(rng, 1.5, 8.0);
    let total_p50 = (ft_p50 * log_uniform(rng, 1.2, 12.0))
        .min(20_000.0)
        .max(ft_p50);
    let total_p99 = total_p50 * log_uniform(rng, 1.3, 4.0);
    let capacity = if rng.f64() < 0.5 {
        0
    } else {
        log_uniform(rng, 1.0, 200.0).round() as u32
    };
    let mut faults = Vec::new();
    for _ in 0..rng.usize(0..=3) {
        faults.push(fault_window(rng, duration_s, faults_end_s));
    }
    Provider {
        name: format!("p{i}"),
        priority: if rng.bool() { 0 } else { rng.u32(0..3) },
        weight: if rng.bool() { 1 } else { rng.u32(1..6) },
        capacity,
        latency_ms: Latency {
            first_token: [round1(ft_p50), round1(ft_p99)],
            total: [round1(total_p50), round1(total_p99)],
        },
        faults,
    }
}

fn fault_window(rng: &mut Rng, duration_s: f64, end_s: f64) -> FaultWindow {
    let span = |rng: &mut Rng, lo: f64, hi: f64| {
        let len = (lo + rng.f64() * (hi - lo)).min(end_s);
        let from = rng.f64() * (end_s - len).max(0.0);
        (round1(from), round1(from + len))
    };
    match rng.u32(0..4) {
        // Background trouble over the faulty part of the run.
        0 => {
            let mut w = mixed(rng);
            w.from_s = 0.0;
            w.to_s = end_s;
            w
        }
        // An outage, answered 503 or refused.
        1 => {
            let (from_s, to_s) = span(rng, 5.0, 60.0);
            FaultWindow {
                from_s,
                to_s,
                outage: true,
                refuse: rng.bool(),
                ..FaultWindow::default()
            }
        }
        // A 429 storm.
        2 => {
            let (from_s, to_s) = span(rng, 5.0, 30.0);
            FaultWindow {
                from_s,
                to_s,
                rate_limit_429: round3(0.2 + 0.4 * rng.f64()),
                retry_after_s: retry_after(rng),
                ..FaultWindow::default()
            }
        }
        // A burst of mixed faults.
        _ => {
            let (from_s, to_s) = span(rng, 5.0, duration_s.max(5.0));
            let mut w = mixed(rng);
            w.from_s = from_s;
            w.to_s = to_s;
            w
        }
    }
}

fn retry_after(rng: &mut Rng) -> f64 {
    match rng.u32(0..3) {
        0 => 0.0,
        1 => round1(rng.f64() * 3.0),
        _ => round1(rng.f64() * 30.0),
    }
}

fn mixed(rng: &mut Rng) -> FaultWindow {
    let mut w = FaultWindow::default();
    // One to three kinds of fault at once.
    for _ in 0..rng.usize(1..=3) {
        match rng.u32(0..5) {
            0 => w.busy_503 = rate(rng),
            1 => w.error_500 = rate(rng),
            2 => {
                w.rate_limit_429 = rate(rng);
                w.retry_after_s = retry_after(rng);
            }
            3 => {
                w.stall = rate(rng);
                w.stall_s = round1(log_uniform(rng, 2.0, 60.0));
            }
            _ => w.reset = rate(rng),
        }
    }
    w
}

/// When the scenario's last fault ends, seconds (0 for a fault-free world).
pub fn faults_end_s(s: &Scenario) -> f64 {
    s.providers
        .iter()
        .flat_map(|p| &p.faults)
        .map(|w| w.to_s)
        .fold(0.0, f64::max)
}

/// The same world without faults: what recovery is measured against.
pub fn fault_free(s: &Scenario) -> Scenario {
    let mut twin = s.clone();
    for p in &mut twin.providers {
        p.faults.clear();
    }
    twin.name = format!("{}-fault-free", s.name);
    twin
}

/// Requests arriving this long after the last fault ended are judged for recovery.
pub const RECOVERY_S: f64 = 10.0;

/// Fewer judged requests than this say nothing about recovery.
pub const RECOVERY_MIN_REQUESTS: u64 = 50;

/// Every policy on one world, with unbusy's recovery against its fault-free twin.
#[derive(Debug, Clone, Serialize)]
pub struct WorldRun {
    /// The world.
    pub scenario: String,
    /// One line describing it.
    pub description: String,
    /// Each policy's report, in [`super::report::POLICIES`] order.
    pub reports: Vec<Report>,
    /// Requests judged for recovery (arriving [`RECOVERY_S`] after the last fault), and how
    /// many unbusy answered in the world and in its fault-free twin.
    pub recovery: Option<Recovery>,
    /// Wall-clock milliseconds the runs took (not part of any verdict).
    pub elapsed_ms: u64,
}

/// Recovery after the faults end.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Recovery {
    /// Requests arriving after the faults ended plus [`RECOVERY_S`], in the world.
    pub requests: u64,
    /// Of those, answered by unbusy.
    pub succeeded: u64,
    /// The same window's requests in the fault-free twin.
    pub twin_requests: u64,
    /// Of those, answered by unbusy.
    pub twin_succeeded: u64,
}

impl Recovery {
    /// The success rate after the faults, and the twin's.
    pub fn rates(&self) -> (f64, f64) {
        let r = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        (
            r(self.succeeded, self.requests),
            r(self.twin_succeeded, self.twin_requests),
        )
    }
}

impl WorldRun {
    /// The report of `policy`.
    pub fn report(&self, policy: &str) -> Option<&Report> {
        self.reports.iter().find(|r| r.policy == policy)
    }
}

/// A short description of a world for tables.
pub fn describe(s: &Scenario) -> String {
    let c = &s.clients;
    let load = if c.concurrency > 0 {
        format!("{} callers", c.concurrency)
    } else {
        format!("{} rps", c.rps)
    };
    let providers: Vec<String> = s
        .providers
        .iter()
        .map(|p| {
            let mut faults: Vec<String> = Vec::new();
            for w in &p.faults {
                let mut kinds = Vec::new();
                if w.outage {
                    kinds.push(if w.refuse { "refused" } else { "outage" }.to_string());
                }
                for (name, v) in [
                    ("503", w.busy_503),
                    ("500", w.error_500),
                    ("429", w.rate_limit_429),
                    ("stall", w.stall),
                    ("reset", w.reset),
                ] {
                    if v > 0.0 {
                        kinds.push(format!("{name} {:.0}%", v * 100.0));
                    }
                }
                faults.push(format!("{} {}-{}s", kinds.join("+"), w.from_s, w.to_s));
            }
            format!(
                "{}(prio {}, w {}, cap {}, ft {:.0}ms, total {:.0}ms{}{})",
                p.name,
                p.priority,
                p.weight,
                p.capacity,
                p.latency_ms.first_token[0],
                p.latency_ms.total[0],
                if faults.is_empty() { "" } else { "; " },
                faults.join(", ")
            )
        })
        .collect();
    format!(
        "{}s, {load}, deadline {}s, stream {:.0}%, {} tenants, repeats {:.0}%; {}",
        s.duration_s,
        c.deadline_s,
        c.stream_fraction * 100.0,
        c.tenants,
        c.repeat_fraction * 100.0,
        providers.join("; ")
    )
}

/// Runs every policy on `scenario` with `seed`, and unbusy on its fault-free twin.
pub fn run_world(
    scenario: &Scenario,
    seed: u64,
    policies: &[&str],
) -> Result<WorldRun, UnknownPolicy> {
    let started = std::time::Instant::now();
    let mut reports = Vec::new();
    for policy in policies {
        reports.push(run(scenario, seed, policy)?);
    }
    let end = faults_end_s(scenario);
    let judged_from = end + RECOVERY_S;
    let recovery = if end > 0.0 && judged_from < scenario.duration_s {
        let window = |r: &Report| r.arrived_after(judged_from);
        let unbusy = reports.iter().find(|r| r.policy == "unbusy");
        match unbusy {
            Some(u) => {
                let twin = run(&fault_free(scenario), seed, "unbusy")?;
                let (requests, succeeded) = window(u);
                let (twin_requests, twin_succeeded) = window(&twin);
                (requests >= RECOVERY_MIN_REQUESTS).then_some(Recovery {
                    requests,
                    succeeded,
                    twin_requests,
                    twin_succeeded,
                })
            }
            None => None,
        }
    } else {
        None
    };
    Ok(WorldRun {
        scenario: scenario.name.clone(),
        description: describe(scenario),
        reports,
        recovery,
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}

/// Success-rate differences smaller than this (half a point) count as level.
pub const LEVEL: f64 = 0.005;

/// How unbusy did on one world, against each principle and baseline.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Judgement {
    /// unbusy's success rate minus `none`'s, `naive`'s, `openai-sdk`'s and `envoy-native`'s.
    pub vs_none: f64,
    /// See `vs_none`.
    pub vs_naive: f64,
    /// See `vs_none`.
    pub vs_openai_sdk: f64,
    /// See `vs_none`.
    pub vs_envoy_native: f64,
    /// unbusy's attempts per request over naive's (at most 1 is the goal).
    pub attempts_vs_naive: f64,
    /// The largest in-flight / capacity unbusy caused with capacities configured, and without.
    pub overload: f64,
    /// See `overload`.
    pub overload_blind: f64,
    /// The largest in-flight / capacity one plain attempt per request caused (`none`).
    pub overload_none: f64,
    /// Unanswered retries over what the retry budget allows (at most 1).
    pub budget_use: f64,
    /// Recovery: the success rate after the faults ended minus the fault-free twin's.
    pub recovery: Option<f64>,
    /// How far below the twin recovery may fall: two standard errors of the difference of two
    /// success rates over these windows, and at least [`bounds::RECOVERY`].
    pub recovery_tolerance: f64,
}

/// What each principle allows.
pub mod bounds {
    /// The most a configured capacity may be exceeded.
    pub const OVERLOAD: f64 = 1.0;
    /// The most a learned capacity may be exceeded.
    pub const OVERLOAD_LEARNED: f64 = 1.1;
    /// Recovery: the least tolerance below the fault-free twin's success rate after the
    /// faults (the two runs share their random draws, but not their queues and choices, so
    /// a window of some hundred requests differs by a few of them).
    pub const RECOVERY: f64 = 0.02;
}

/// Judges one world's run.
pub fn judge(run: &WorldRun) -> Judgement {
    let rate = |p: &str| run.report(p).map_or(0.0, |r| r.success_rate);
    let u = rate("unbusy");
    let unbusy = run.report("unbusy");
    let naive_att = run.report("naive").map_or(0.0, |r| r.attempts_per_request);
    let defaults = unbusy_core::config::Config::default().budget;
    let budget_use = unbusy.map_or(0.0, |r| {
        let bound = defaults.ratio * r.requests as f64
            + f64::from(defaults.min_per_second)
                * (r.end_ms / 1000.0 + defaults.window_ms as f64 / 1000.0);
        r.unanswered_retries as f64 / bound.max(1.0)
    });
    Judgement {
        vs_none: u - rate("none"),
        vs_naive: u - rate("naive"),
        vs_openai_sdk: u - rate("openai-sdk"),
        vs_envoy_native: u - rate("envoy-native"),
        attempts_vs_naive: unbusy.map_or(0.0, |r| r.attempts_per_request) / naive_att.max(1e-9),
        overload: unbusy.map_or(0.0, |r| r.max_overload),
        overload_blind: run.report("unbusy-blind").map_or(0.0, |r| r.max_overload),
        overload_none: run.report("none").map_or(0.0, |r| r.max_overload),
        budget_use,
        recovery: run.recovery.map(|r| {
            let (after, twin) = r.rates();
            after - twin
        }),
        recovery_tolerance: run.recovery.map_or(bounds::RECOVERY, |r| {
            let (_, p) = r.rates();
            let n = |x: u64| (x.max(1)) as f64;
            let se = (p * (1.0 - p) * (1.0 / n(r.requests) + 1.0 / n(r.twin_requests))).sqrt();
            (2.0 * se).max(bounds::RECOVERY)
        }),
    }
}

impl Judgement {
    /// The principles this world breaks (each must hold in every world).
    pub fn broken(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.vs_none < -LEVEL {
            out.push(format!("below none by {:.2} points", -self.vs_none * 100.0));
        }
        if self.overload > bounds::OVERLOAD {
            out.push(format!(
                "configured capacity exceeded {:.2}x",
                self.overload
            ));
        }
        if self.budget_use > 1.0 {
            out.push(format!("retry budget exceeded {:.2}x", self.budget_use));
        }
        if self.attempts_vs_naive > 1.0 + 1e-9 {
            out.push(format!(
                "{:.2}x naive's attempts per request",
                self.attempts_vs_naive
            ));
        }
        if let Some(r) = self.recovery.filter(|r| *r < -self.recovery_tolerance) {
            out.push(format!(
                "recovery {:.2} points below the fault-free twin",
                -r * 100.0
            ));
        }
        out
    }
}

/// One world, judged.
#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    /// The run.
    pub run: WorldRun,
    /// The judgement.
    pub judgement: Judgement,
    /// The world itself, to write out when it fails.
    #[serde(skip)]
    pub scenario: Scenario,
}

/// Generates `count` worlds from `seed` and runs and judges each, on up to `threads` threads.
pub fn run_worlds(
    seed: u64,
    count: u64,
    space: Space,
    threads: usize,
) -> Result<Vec<Judged>, UnknownPolicy> {
    let indices: Vec<u64> = (0..count).collect();
    let chunks: Vec<Vec<u64>> = indices
        .chunks(indices.len().div_ceil(threads.max(1)).max(1))
        .map(<[u64]>::to_vec)
        .collect();
    let results: Vec<Result<Vec<Judged>, UnknownPolicy>> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|i| {
                            let scenario = generate(seed, i, space);
                            let run =
                                run_world(&scenario, scenario.seed, &super::report::POLICIES)?;
                            let judgement = judge(&run);
                            Ok(Judged {
                                run,
                                judgement,
                                scenario,
                            })
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(UnknownPolicy("a world's run panicked".into())))
            })
            .collect()
    });
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

/// One of a judgement's differences against a baseline.
type Difference = fn(&Judgement) -> f64;

/// The random-world table: per baseline, worlds where unbusy is ahead, level and behind; each
/// policy's mean success; the worst five worlds.
pub fn summary(worlds: &[Judged], markdown: bool) -> String {
    let mut out = String::new();
    let n = worlds.len().max(1) as f64;
    let count = |f: &dyn Fn(&Judgement) -> bool| worlds.iter().filter(|w| f(&w.judgement)).count();
    let line = |out: &mut String, cells: &[String]| {
        if markdown {
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        } else {
            out.push_str(&format!(
                "{}\n",
                cells.iter().map(|c| format!("{c:>14}")).collect::<String>()
            ));
        }
    };
    out.push_str(&format!("{} generated worlds\n\n", worlds.len()));
    line(
        &mut out,
        &[
            "baseline".into(),
            "unbusy ahead".into(),
            "level".into(),
            "behind".into(),
            "level or ahead".into(),
        ],
    );
    if markdown {
        out.push_str("|---|---:|---:|---:|---:|\n");
    }
    let vs: [(&str, Difference); 4] = [
        ("none", |j| j.vs_none),
        ("naive", |j| j.vs_naive),
        ("openai-sdk", |j| j.vs_openai_sdk),
        ("envoy-native", |j| j.vs_envoy_native),
    ];
    for (name, d) in vs {
        let ahead = count(&|j| d(j) > LEVEL);
        let behind = count(&|j| d(j) < -LEVEL);
        let level = worlds.len() - ahead - behind;
        line(
            &mut out,
            &[
                name.into(),
                ahead.to_string(),
                level.to_string(),
                behind.to_string(),
                format!("{:.1}%", (ahead + level) as f64 / n * 100.0),
            ],
        );
    }
    let naive_ahead: Vec<&Judged> = worlds
        .iter()
        .filter(|w| w.judgement.vs_naive < -LEVEL)
        .collect();
    let fewer = naive_ahead
        .iter()
        .filter(|w| w.judgement.attempts_vs_naive < 1.0)
        .count();
    out.push_str(&format!(
        "\nwhere naive is ahead ({} worlds), unbusy sent fewer attempts per request in {}\n",
        naive_ahead.len(),
        fewer
    ));
    out.push_str("\nmean success rate (and attempts per request) per policy:\n\n");
    line(
        &mut out,
        &[
            "policy".into(),
            "mean success".into(),
            "attempts/req".into(),
            "max overload".into(),
        ],
    );
    if markdown {
        out.push_str("|---|---:|---:|---:|\n");
    }
    for policy in super::report::POLICIES {
        let reports: Vec<&Report> = worlds.iter().filter_map(|w| w.run.report(policy)).collect();
        let mean = reports.iter().map(|r| r.success_rate).sum::<f64>() / n;
        let att = reports.iter().map(|r| r.attempts_per_request).sum::<f64>() / n;
        let over = reports.iter().map(|r| r.max_overload).fold(0.0, f64::max);
        line(
            &mut out,
            &[
                policy.into(),
                format!("{:.2}%", mean * 100.0),
                format!("{att:.2}"),
                format!("{over:.2}"),
            ],
        );
    }
    let broken = worlds
        .iter()
        .filter(|w| !w.judgement.broken().is_empty())
        .count();
    let recovered: Vec<f64> = worlds.iter().filter_map(|w| w.judgement.recovery).collect();
    out.push_str(&format!(
        "\nworlds breaking a principle: {broken}; recovery judged in {} worlds, worst {:.2} points vs the fault-free twin\n",
        recovered.len(),
        recovered.iter().copied().fold(0.0, f64::min) * 100.0
    ));
    let mut worst: Vec<&Judged> = worlds.iter().collect();
    worst.sort_by(|a, b| {
        let key = |j: &Judgement| {
            j.vs_none
                .min(j.vs_openai_sdk)
                .min(j.vs_envoy_native)
                .min(j.vs_naive)
        };
        key(&a.judgement).total_cmp(&key(&b.judgement))
    });
    out.push_str("\nworst five worlds (unbusy minus each baseline, points):\n\n");
    for w in worst.iter().take(5) {
        let j = &w.judgement;
        out.push_str(&format!(
            "- {}: unbusy {:.2}%; vs none {:+.2}, naive {:+.2}, openai-sdk {:+.2}, envoy-native {:+.2}; {}\n",
            w.run.scenario,
            w.run.report("unbusy").map_or(0.0, |r| r.success_rate) * 100.0,
            j.vs_none * 100.0,
            j.vs_naive * 100.0,
            j.vs_openai_sdk * 100.0,
            j.vs_envoy_native * 100.0,
            w.run.description
        ));
    }
    out
}
