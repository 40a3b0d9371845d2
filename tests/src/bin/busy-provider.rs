//! `busy-provider`: an OpenAI-compatible provider that is busy on purpose.
//!
//! ```text
//! busy-provider [--listen ADDR] [--name NAME] [--seed N]
//!               [--scenario FILE --provider NAME]
//!               [--busy-503 P] [--error-500 P] [--rate-limit-429 P] [--retry-after S]
//!               [--stall P] [--stall-s S] [--reset P] [--outage] [--capacity N]
//!               [--first-token-ms P50[,P99]] [--total-ms P50[,P99]] [--keepalive-ms MS]
//!               [--answer SHAPE] [--always-gzip]
//! ```
//! Flags apply for all time; a scenario's fault windows are timed from start-up. Flags given
//! with a scenario override its provider's entry. `--retry-after 0` sends 429s without the
//! header. `--answer` shapes the answers that draw no fault: `normal` (the default),
//! `truncated_json`, `html_200`, `sse_no_done`, `overload_200`, `retry_after_zero`,
//! `retry_after_past`, `sse_always` (see `AnswerShape`). Answers are gzip-encoded when the request's
//! `accept-encoding` allows it; `--always-gzip` does it whatever was asked.
//! Prints `busy-provider NAME listening on http://ADDR` once ready.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use unbusy_tests::emulator::{start, AnswerShape, Behaviour};
use unbusy_tests::scenario::{FaultWindow, Provider, Scenario};

const USAGE: &str = "usage: busy-provider [--listen ADDR] [--name NAME] [--seed N] \
[--scenario FILE --provider NAME] [--busy-503 P] [--error-500 P] [--rate-limit-429 P] \
[--retry-after S] [--stall P] [--stall-s S] [--reset P] [--outage] [--capacity N] \
[--first-token-ms P50[,P99]] [--total-ms P50[,P99]] [--keepalive-ms MS] [--answer SHAPE] [--always-gzip]";

struct Args {
    listen: String,
    seed: u64,
    behaviour: Behaviour,
}

fn latency(v: &str, flag: &str) -> Result<[f64; 2], String> {
    let parts: Vec<f64> = v
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{flag}: expected P50[,P99] in ms, got {v:?}"))?;
    match parts.as_slice() {
        [p50] if *p50 > 0.0 => Ok([*p50, *p50]),
        [p50, p99] if *p50 > 0.0 && p99 >= p50 => Ok([*p50, *p99]),
        _ => Err(format!("{flag}: need 0 < P50 <= P99, got {v:?}")),
    }
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut listen = String::from("127.0.0.1:0");
    let mut seed = 1;
    let mut name: Option<String> = None;
    let mut scenario: Option<PathBuf> = None;
    let mut provider_name: Option<String> = None;
    let mut window = FaultWindow {
        from_s: 0.0,
        to_s: f64::MAX,
        retry_after_s: 1.0,
        stall_s: 30.0,
        ..FaultWindow::default()
    };
    let mut flags_set = false;
    let mut capacity: Option<u32> = None;
    let mut first_token: Option<[f64; 2]> = None;
    let mut total: Option<[f64; 2]> = None;
    let mut keepalive_ms = 1000u64;
    let mut answer = AnswerShape::Normal;
    let mut always_gzip = false;
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or(format!("{flag} needs a value"));
        let prob = |v: String| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|p| (0.0..=1.0).contains(p))
                .ok_or(format!(
                    "{flag}: expected a probability in [0, 1], got {v:?}"
                ))
        };
        let num = |v: String| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|x| *x >= 0.0 && x.is_finite())
                .ok_or(format!("{flag}: expected a number >= 0, got {v:?}"))
        };
        match flag.as_str() {
            "--listen" => listen = value()?,
            "--name" => name = Some(value()?),
            "--seed" => seed = num(value()?)? as u64,
            "--scenario" => scenario = Some(PathBuf::from(value()?)),
            "--provider" => provider_name = Some(value()?),
            "--busy-503" => (window.busy_503, flags_set) = (prob(value()?)?, true),
            "--error-500" => (window.error_500, flags_set) = (prob(value()?)?, true),
            "--rate-limit-429" => (window.rate_limit_429, flags_set) = (prob(value()?)?, true),
            "--retry-after" => window.retry_after_s = num(value()?)?,
            "--stall" => (window.stall, flags_set) = (prob(value()?)?, true),
            "--stall-s" => window.stall_s = num(value()?)?,
            "--reset" => (window.reset, flags_set) = (prob(value()?)?, true),
            "--outage" => (window.outage, flags_set) = (true, true),
            "--capacity" => capacity = Some(num(value()?)? as u32),
            "--first-token-ms" => first_token = Some(latency(&value()?, &flag)?),
            "--total-ms" => total = Some(latency(&value()?, &flag)?),
            "--keepalive-ms" => keepalive_ms = (num(value()?)? as u64).max(1),
            "--always-gzip" => always_gzip = true,
            "--answer" => {
                let v = value()?;
                answer = AnswerShape::parse(&v).ok_or_else(|| {
                    let names: Vec<&str> = AnswerShape::ALL.iter().map(|s| s.name()).collect();
                    format!("--answer: expected one of {names:?}, got {v:?}")
                })?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let mut provider = match (scenario, provider_name) {
        (Some(path), Some(wanted)) => {
            let s = Scenario::load(&path).map_err(|e| e.to_string())?;
            s.providers
                .iter()
                .find(|p| p.name == wanted)
                .cloned()
                .ok_or_else(|| {
                    let names: Vec<&str> = s.providers.iter().map(|p| p.name.as_str()).collect();
                    format!("{}: no provider {wanted:?} (has {names:?})", path.display())
                })?
        }
        (Some(_), None) => return Err("--scenario needs --provider NAME".into()),
        (None, Some(_)) => return Err("--provider needs --scenario FILE".into()),
        (None, None) => Provider {
            name: String::from("busy"),
            latency_ms: unbusy_tests::scenario::Latency {
                first_token: [200.0, 800.0],
                total: [600.0, 2000.0],
            },
            ..Provider::default()
        },
    };
    if flags_set {
        provider.faults = vec![window];
    }
    if let Some(n) = name {
        provider.name = n;
    }
    if let Some(c) = capacity {
        provider.capacity = c;
    }
    if let Some(ft) = first_token {
        provider.latency_ms.first_token = ft;
    }
    if let Some(t) = total {
        provider.latency_ms.total = t;
    }
    if provider.latency_ms.total[0] < provider.latency_ms.first_token[0] {
        provider.latency_ms.total = provider.latency_ms.first_token;
    }
    Ok(Args {
        listen,
        seed,
        behaviour: Behaviour {
            provider,
            keepalive_every: Duration::from_millis(keepalive_ms),
            answer,
            always_gzip,
        },
    })
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("busy-provider: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("busy-provider: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let name = args.behaviour.provider.name.clone();
        let (_emulator, addr) = match start(args.behaviour, args.seed, &args.listen).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("busy-provider: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        println!("busy-provider {name} listening on http://{addr}");
        let _ = std::io::stdout().flush();
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    })
}
