//! The engine's principles, proven on generated worlds it was not tuned on (see
//! `unbusy_tests::sim::worlds`), and the worlds that once broke one, kept as regressions.
//!
//! Every world must satisfy the hard principles: unbusy never below one plain attempt (`none`)
//! by more than half a point, never past a configured capacity, retries within the retry
//! budget, and recovery once the faults end. In at least 98% of worlds unbusy is also level
//! with or ahead of `openai-sdk` and `envoy-native`. Every baseline and every closed-loop
//! caller must have behaved exactly as defined. A world that fails is written to
//! `target/failed-worlds/` as a scenario file, to replay with `simulate --scenario` and to keep
//! under `tests/scenarios/regressions/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use unbusy_tests::scenario::Scenario;
use unbusy_tests::sim::report::POLICIES;
use unbusy_tests::sim::worlds::{judge, run_world, run_worlds, Judged, Judgement, Space, LEVEL};

/// The hard principles a world breaks (the soft goals, such as attempts at or below naive's,
/// are measured and reported by `simulate --worlds`, not asserted).
fn hard(j: &Judgement) -> Vec<String> {
    j.broken()
        .into_iter()
        .filter(|b| !b.contains("naive's attempts"))
        .collect()
}

/// The most in flight over a provider's capacity `unbusy-blind` may reach in the generated
/// worlds (see the test).
const BLIND_OVERLOAD_BOUND: f64 = 25.0;

fn baseline_deviations(w: &Judged) -> Vec<String> {
    w.run
        .reports
        .iter()
        .filter(|r| {
            let v = &r.violations;
            v.off_definition + v.too_many_attempts + v.caller_model > 0
        })
        .map(|r| format!("{}: {:?}", r.policy, r.violations.first))
        .collect()
}

fn write_failed(worlds: &[&Judged]) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/failed-worlds");
    std::fs::create_dir_all(&dir).unwrap();
    for w in worlds {
        let text = serde_json::to_string_pretty(&w.scenario).unwrap();
        std::fs::write(dir.join(format!("{}.json", w.scenario.name)), text).unwrap();
    }
    dir
}

#[test]
fn unbusy_keeps_its_principles_on_300_generated_worlds() {
    let space = Space {
        max_duration_s: 60.0,
        max_load: 60.0,
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let worlds = run_worlds(2026, 300, space, threads).unwrap();
    assert_eq!(worlds.len(), 300);

    let failing: Vec<&Judged> = worlds
        .iter()
        .filter(|w| !hard(&w.judgement).is_empty() || !baseline_deviations(w).is_empty())
        .collect();
    if !failing.is_empty() {
        let dir = write_failed(&failing);
        let lines: Vec<String> = failing
            .iter()
            .map(|w| {
                format!(
                    "{}: {:?} {:?}",
                    w.run.scenario,
                    hard(&w.judgement),
                    baseline_deviations(w)
                )
            })
            .collect();
        panic!(
            "{} of 300 worlds broke a principle (written to {}):\n{}",
            failing.len(),
            dir.display(),
            lines.join("\n")
        );
    }
    for (name, vs) in [
        (
            "openai-sdk",
            (|j: &Judgement| j.vs_openai_sdk) as fn(&Judgement) -> f64,
        ),
        ("envoy-native", |j: &Judgement| j.vs_envoy_native),
    ] {
        let behind: Vec<&str> = worlds
            .iter()
            .filter(|w| vs(&w.judgement) < -LEVEL)
            .map(|w| w.run.scenario.as_str())
            .collect();
        assert!(
            behind.len() * 50 <= worlds.len(),
            "behind {name} in {} worlds (at most 2%): {behind:?}",
            behind.len()
        );
    }
    // A capacity unbusy must learn (`unbusy-blind`) is a stated bound, not the goal of 1.1
    // (docs/engine.md says why first attempts are not held on a guess): requests held through
    // an outage come back in a ramp and a learned limit is forgotten by doubling, so no world
    // pushes a provider past 25 times its capacity (22.5 at most in these worlds; 590 when
    // both released everything at once).
    let blind_worst = worlds
        .iter()
        .map(|w| (w.judgement.overload_blind, w.run.scenario.as_str()))
        .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
    assert!(
        blind_worst.0 <= BLIND_OVERLOAD_BOUND,
        "unbusy-blind pushed {} to {}x its capacity (bound {BLIND_OVERLOAD_BOUND})",
        blind_worst.1,
        blind_worst.0
    );
    // The check must have had chances to fail: the worlds hold outages, capacities, retries
    // and recoveries.
    let judged_recovery = worlds
        .iter()
        .filter(|w| w.judgement.recovery.is_some())
        .count();
    let with_capacity = worlds
        .iter()
        .filter(|w| w.scenario.providers.iter().any(|p| p.capacity > 0))
        .count();
    let none_failed = worlds
        .iter()
        .filter(|w| w.run.report("none").unwrap().success_rate < 0.9)
        .count();
    assert!(
        judged_recovery >= 60,
        "recovery judged in {judged_recovery}"
    );
    assert!(
        with_capacity >= 100,
        "{with_capacity} worlds with a capacity"
    );
    assert!(
        none_failed >= 100,
        "{none_failed} worlds where one attempt often fails"
    );
}

#[test]
fn worlds_that_once_broke_a_principle_keep_them() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios/regressions");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty());
    for path in paths {
        let scenario = Scenario::load(&path).unwrap();
        let run = run_world(&scenario, scenario.seed, &POLICIES).unwrap();
        let j = judge(&run);
        assert!(hard(&j).is_empty(), "{}: {:?}", path.display(), hard(&j));
    }
}
