//! `simulate --scenario FILE [--scenario FILE ...] [--seed N] [--policy NAME|all] [--json]
//! [--markdown] [--svg FILE]`: runs client-side policies over busy-provider scenarios in a
//! deterministic discrete-event simulation and reports how each fared.

use std::path::PathBuf;
use std::process::ExitCode;
use unbusy_tests::plot::svg_chart;
use unbusy_tests::scenario::Scenario;
use unbusy_tests::sim::report::{markdown, run, table, Report, POLICIES};

const USAGE: &str = "usage: simulate --scenario FILE [--scenario FILE ...] [--seed N] \
[--policy NAME|all] [--json | --markdown] [--svg FILE]
policies: none, naive, openai-sdk, envoy-native, unbusy, unbusy-blind (unbusy without the \
providers' capacities), all (default)";

struct Args {
    scenarios: Vec<PathBuf>,
    seed: Option<u64>,
    policies: Vec<String>,
    json: bool,
    markdown: bool,
    svg: Option<PathBuf>,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        scenarios: Vec::new(),
        seed: None,
        policies: Vec::new(),
        json: false,
        markdown: false,
        svg: None,
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
            "--json" => a.json = true,
            "--markdown" => a.markdown = true,
            "--svg" => a.svg = Some(PathBuf::from(value("--svg")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.scenarios.is_empty() {
        return Err("--scenario is required".into());
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
