//! `simulate --scenario FILE [--scenario FILE ...] [--seed N] [--policy NAME|all] [--json]
//! [--markdown] [--svg FILE]`: runs client-side policies over busy-provider scenarios in a
//! deterministic discrete-event simulation and reports how each fared.
//!
//! `simulate --worlds N [--seed S] [--max-duration-s S] [--max-load N] [--json | --markdown]
//! [--write-failures DIR] [--write-worlds DIR]`: generates N
//! random worlds (see `unbusy_tests::sim::worlds`), runs every policy on each and reports
//! unbusy against each baseline, world by world and in total; worlds that break a principle
//! are written to DIR as scenario files (every world, with `--write-worlds`).

use std::path::PathBuf;
use std::process::ExitCode;
use unbusy_tests::plot::svg_chart;
use unbusy_tests::scenario::Scenario;
use unbusy_tests::sim::report::{markdown, run, table, Report, POLICIES};
use unbusy_tests::sim::worlds::{run_worlds, summary, Space};

const USAGE: &str = "usage: simulate --scenario FILE [--scenario FILE ...] [--seed N] \
[--policy NAME|all] [--json | --markdown] [--svg FILE]
       simulate --worlds N [--seed S] [--max-duration-s S] [--max-load N] [--json | --markdown] \
[--write-failures DIR] [--write-worlds DIR]
policies: none, naive, openai-sdk, envoy-native, unbusy, unbusy-blind (unbusy without the \
providers' capacities), all (default)";

struct Args {
    scenarios: Vec<PathBuf>,
    seed: Option<u64>,
    policies: Vec<String>,
    json: bool,
    markdown: bool,
    svg: Option<PathBuf>,
    worlds: Option<u64>,
    max_duration_s: Option<f64>,
    max_load: Option<f64>,
    write_failures: Option<PathBuf>,
    write_all: Option<PathBuf>,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        scenarios: Vec::new(),
        seed: None,
        policies: Vec::new(),
        json: false,
        markdown: false,
        svg: None,
        worlds: None,
        max_duration_s: None,
        max_load: None,
        write_failures: None,
        write_all: None,
    };
    while let Some(flag) = argv.next() {
        let mut value = |name: &str| argv.next().ok_or(format!("{name} needs a value"));
        match flag.as_str() {
            "--scenario" => a.scenarios.push(PathBuf::from(value("--scenario")?)),
            "--seed" => {
                let v = value("--seed")?;
                a.seed = Some(
                    v.parse()
                        .map_err(|_| format!("--seed: {v:?} is not a number"))?,
                );
            }
            "--policy" => {
                let v = value("--policy")?;
                if v == "all" {
                    a.policies.extend(POLICIES.iter().map(|p| p.to_string()));
                } else if POLICIES.contains(&v.as_str()) {
                    a.policies.push(v);
                } else {
                    return Err(format!("--policy: unknown policy {v:?}"));
                }
            }
            "--worlds" => {
                let v = value("--worlds")?;
                a.worlds = Some(
                    v.parse()
                        .map_err(|_| format!("--worlds: {v:?} is not a number"))?,
                );
            }
            "--max-duration-s" => {
                let v = value("--max-duration-s")?;
                a.max_duration_s = Some(v.parse::<f64>().ok().filter(|d| *d >= 20.0).ok_or(
                    format!("--max-duration-s: {v:?} is not a number of at least 20"),
                )?);
            }
            "--max-load" => {
                let v = value("--max-load")?;
                a.max_load = Some(
                    v.parse::<f64>()
                        .ok()
                        .filter(|d| *d >= 5.0)
                        .ok_or(format!("--max-load: {v:?} is not a number of at least 5"))?,
                );
            }
            "--write-worlds" => a.write_all = Some(PathBuf::from(value("--write-worlds")?)),
            "--write-failures" => {
                a.write_failures = Some(PathBuf::from(value("--write-failures")?))
            }
            "--json" => a.json = true,
            "--markdown" => a.markdown = true,
            "--svg" => a.svg = Some(PathBuf::from(value("--svg")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.scenarios.is_empty() && a.worlds.is_none() {
        return Err("--scenario or --worlds is required".into());
    }
    if a.policies.is_empty() {
        a.policies.extend(POLICIES.iter().map(|p| p.to_string()));
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("simulate: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Some(count) = args.worlds {
        return worlds(&args, count);
    }
    let mut reports: Vec<Report> = Vec::new();
    for path in &args.scenarios {
        let scenario = match Scenario::load(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("simulate: {e}");
                return ExitCode::from(2);
            }
        };
        let seed = args.seed.unwrap_or(scenario.seed);
        for policy in &args.policies {
            match run(&scenario, seed, policy) {
                Ok(r) => {
                    if args.json {
                        match serde_json::to_string(&r) {
                            Ok(line) => println!("{line}"),
                            Err(e) => {
                                eprintln!("simulate: {e}");
                                return ExitCode::FAILURE;
                            }
                        }
                    }
                    reports.push(r);
                }
                Err(e) => {
                    eprintln!("simulate: {}", e.0);
                    return ExitCode::from(2);
                }
            }
        }
    }
    if args.markdown {
        print!("{}", markdown(&reports));
    } else if !args.json {
        print!("{}", table(&reports));
    }
    if let Some(path) = &args.svg {
        if let Err(e) = std::fs::write(path, svg_chart(&reports)) {
            eprintln!("simulate: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn worlds(args: &Args, count: u64) -> ExitCode {
    let mut space = Space::default();
    if let Some(d) = args.max_duration_s {
        space.max_duration_s = d;
    }
    if let Some(l) = args.max_load {
        space.max_load = l;
    }
    let seed = args.seed.unwrap_or(1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let judged = match run_worlds(seed, count, space, threads) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("simulate: {}", e.0);
            return ExitCode::FAILURE;
        }
    };
    for w in &judged {
        let broken = w.judgement.broken();
        if args.json {
            match serde_json::to_string(&w.judgement) {
                Ok(j) => println!(
                    r#"{{"world":{:?},"judgement":{j},"broken":{:?}}}"#,
                    w.run.scenario, broken
                ),
                Err(e) => eprintln!("simulate: {e}"),
            }
        } else if !args.markdown {
            let rate = |p: &str| w.run.report(p).map_or(0.0, |r| r.success_rate * 100.0);
            println!(
                "{:<16} unbusy {:6.2}%  none {:6.2}%  naive {:6.2}%  openai-sdk {:6.2}%  envoy-native {:6.2}%  {:>6} ms  {}",
                w.run.scenario,
                rate("unbusy"),
                rate("none"),
                rate("naive"),
                rate("openai-sdk"),
                rate("envoy-native"),
                w.run.elapsed_ms,
                broken.join("; ")
            );
        }
        if let Some(dir) = &args.write_all {
            if let Err(e) = write_world(dir, &w.scenario, &broken) {
                eprintln!("simulate: {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
        }
        if let (Some(dir), false) = (&args.write_failures, broken.is_empty()) {
            if let Err(e) = write_world(dir, &w.scenario, &broken) {
                eprintln!("simulate: {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if !args.json {
        print!("\n{}", summary(&judged, args.markdown));
    }
    ExitCode::SUCCESS
}

/// Writes a world that broke a principle as a scenario file, named after it.
fn write_world(
    dir: &std::path::Path,
    scenario: &Scenario,
    broken: &[String],
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut s = scenario.clone();
    s.description = format!("{}; broke: {}", s.description, broken.join("; "));
    let text = serde_json::to_string_pretty(&s).map_err(std::io::Error::other)?;
    std::fs::write(dir.join(format!("{}.json", s.name)), text + "\n")
}
