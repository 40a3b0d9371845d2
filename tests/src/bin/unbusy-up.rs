//! `unbusy-up`: Envoy with the unbusy filter in front of LLM providers, in one command.
//!
//! ```text
//! unbusy-up --provider NAME=URL [--provider NAME=URL ...] [--listen ADDR] [--admin ADDR]
//!           [--config FILE] [--concurrency N] [--print-config]
//! ```
//! The order of `--provider` flags is the order of preference. `--config` is the engine's JSON
//! configuration (`docs/config.md`) for everything else; an API key for provider NAME is read
//! from `UNBUSY_KEY_<NAME>` and never printed. Envoy comes from the project's `.venv` (`make
//! setup`) or `UNBUSY_ENVOY`; the filter from `make filter` or `UNBUSY_WASM`. Envoy runs in the
//! foreground, replacing this process: stopping it stops Envoy.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use unbusy_tests::envoy::{envoy_binary, filter_config, filter_wasm, render, Render, Upstream};

const USAGE: &str = "usage: unbusy-up --provider NAME=URL [--provider NAME=URL ...] \
[--listen ADDR] [--admin ADDR] [--config FILE] [--concurrency N] [--print-config]";

fn split_addr(flag: &str, v: &str) -> Result<(String, u16), String> {
    let (h, p) = v
        .rsplit_once(':')
        .ok_or_else(|| format!("{flag} {v:?}: expected HOST:PORT"))?;
    let port = p
        .parse()
        .map_err(|_| format!("{flag} {v:?}: bad port {p:?}"))?;
    Ok((h.trim_matches(['[', ']']).to_string(), port))
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("unbusy-up: {e}");
            }
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let mut args = std::env::args().skip(1);
    let mut upstreams = Vec::new();
    let mut listen = ("127.0.0.1".to_string(), 10000u16);
    let mut admin = ("127.0.0.1".to_string(), 9901u16);
    let mut config_file: Option<PathBuf> = None;
    let mut print = false;
    let mut concurrency: Option<u32> = None;
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--provider" => upstreams.push(Upstream::parse(&value()?)?),
            "--listen" => listen = split_addr("--listen", &value()?)?,
            "--admin" => admin = split_addr("--admin", &value()?)?,
            "--config" => config_file = Some(PathBuf::from(value()?)),
            "--concurrency" => {
                let v = value()?;
                concurrency = Some(
                    v.parse()
                        .map_err(|_| format!("--concurrency {v:?}: not a number"))?,
                );
            }
            "--print-config" => print = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if upstreams.is_empty() {
        return Err("at least one --provider NAME=URL is required".into());
    }
    let base = match &config_file {
        Some(path) => {
            let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => serde_json::Value::Null,
    };
    let keys = |name: &str| std::env::var(name).ok().filter(|k| !k.is_empty());
    let mut filter = filter_config(&base, &upstreams, &keys)?;
    let wasm = filter_wasm();
    if print {
        // Never print a key.
        if let Some(ps) = filter.get_mut("providers").and_then(|p| p.as_array_mut()) {
            for p in ps {
                if p.get("api_key").is_some() {
                    p["api_key"] = serde_json::Value::from("<from UNBUSY_KEY_*>");
                }
            }
        }
    }
    let yaml = render(&Render {
        listen: (&listen.0, listen.1),
        admin: (&admin.0, admin.1),
        upstreams: &upstreams,
        filter: Some(&filter),
        wasm: &wasm,
        native: None,
    });
    if print {
        print!("{yaml}");
        return Ok(ExitCode::SUCCESS);
    }
    if !wasm.exists() {
        return Err(format!(
            "{} is missing: run `make filter` (or set UNBUSY_WASM)",
            wasm.display()
        ));
    }
    let dir = std::env::temp_dir().join("unbusy-up");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("envoy-{}.yaml", std::process::id()));
    std::fs::write(&path, &yaml).map_err(|e| format!("{}: {e}", path.display()))?;
    let envoy = envoy_binary();
    let mut cmd = Command::new(&envoy);
    cmd.arg("-c")
        .arg(&path)
        .args(["--log-level", "warn", "--component-log-level", "wasm:info"]);
    if let Some(n) = concurrency {
        cmd.args(["--concurrency", &n.to_string()]);
    }
    eprintln!(
        "unbusy-up: Envoy on http://{}:{} (admin http://{}:{}), providers {}",
        listen.0,
        listen.1,
        admin.0,
        admin.1,
        upstreams
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>()
            .join(" > ")
    );
    let err = cmd.exec();
    Err(format!(
        "cannot run {}: {err} (run `make setup`, or set UNBUSY_ENVOY)",
        envoy.display()
    ))
}
