//! `unbusy-up`: Envoy with the unbusy filter in front of LLM providers, in one command.
//!
//! ```text
//! unbusy-up --provider NAME=URL [--provider NAME=URL ...] [--listen ADDR] [--admin ADDR]
//!           [--config FILE] [--concurrency N] [--print-config]
//! ```
//! The order of `--provider` flags is the order of preference. `--config` is the engine's JSON
//! configuration (`docs/config.md`) for everything else. An API key for provider NAME is read
//! from `UNBUSY_KEY_<NAME>` and never written anywhere: the rendered configuration names the
//! variable (`api_key_env`, and `host_env_keys` in the VM's configuration), Envoy inherits it,
//! and the filter reads it from there, so it is in no file and not in Envoy's `/config_dump`.
//! Envoy comes from the project's `.venv` (`make setup`) or `UNBUSY_ENVOY`; the filter from
//! `make filter` or `UNBUSY_WASM`.
//!
//! The rendered configuration goes into a fresh private directory under `$TMPDIR`
//! (`unbusy-up-<random>`, mode 0700; the file mode 0600), which is removed when Envoy exits.
//! Envoy runs as a child: SIGINT and SIGTERM are passed on to it, and `unbusy-up` exits with
//! its status. Envoy gets `--base-id <pid of unbusy-up>`, so several can run on one machine.

use std::path::PathBuf;
use std::process::ExitCode;
use unbusy_tests::envoy::{envoy_binary, filter_config, filter_wasm, render, Render, Upstream};
use unbusy_tests::private::PrivateDir;

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
    let has_key = |name: &str| std::env::var_os(name).is_some_and(|k| !k.is_empty());
    let mut filter = filter_config(&base, &upstreams, &has_key)?;
    let inline_keys = filter
        .get("providers")
        .and_then(|p| p.as_array())
        .is_some_and(|ps| ps.iter().any(|p| p.get("api_key").is_some()));
    if inline_keys && !print {
        eprintln!(
            "unbusy-up: warning: an api_key in {} is written into Envoy's configuration and \
             shown by its admin /config_dump; put it in UNBUSY_KEY_<NAME> instead",
            config_file
                .as_deref()
                .map_or("the configuration".into(), |p| p.display().to_string())
        );
    }
    let wasm = filter_wasm();
    if print {
        // Never print a key.
        if let Some(ps) = filter.get_mut("providers").and_then(|p| p.as_array_mut()) {
            for p in ps {
                if p.get("api_key").is_some() {
                    p["api_key"] = serde_json::Value::from("<hidden: api_key from --config>");
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
    let dir = PrivateDir::create(&std::env::temp_dir(), "unbusy-up-").map_err(|e| {
        format!(
            "cannot make a private directory in {}: {e}",
            std::env::temp_dir().display()
        )
    })?;
    let path = dir
        .write("envoy.yaml", yaml.as_bytes())
        .map_err(|e| e.to_string())?;
    let envoy = envoy_binary();
    let mut cmd = tokio::process::Command::new(&envoy);
    cmd.arg("-c")
        .arg(&path)
        .args(["--base-id", &std::process::id().to_string()])
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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let status = runtime.block_on(supervise(cmd)).map_err(|e| {
        format!(
            "cannot run {}: {e} (run `make setup`, or set UNBUSY_ENVOY)",
            envoy.display()
        )
    });
    drop(dir); // the rendered configuration goes with Envoy
    status
}

/// Runs Envoy until it exits, passing SIGINT and SIGTERM on to it; its exit status as ours
/// (128 + the signal if a signal ended it).
async fn supervise(mut cmd: tokio::process::Command) -> std::io::Result<ExitCode> {
    use std::os::unix::process::ExitStatusExt;
    use tokio::signal::unix::{signal, SignalKind};
    // Listening before Envoy starts: a signal from then on is passed on, never fatal to us
    // (which would leave the directory behind).
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut child = cmd.spawn()?;
    let pass_on = |pid: Option<u32>, sig: libc::c_int| {
        if let Some(pid) = pid.and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: kill(2) has no memory effects; the pid is our child's, not yet reaped
            // (`id()` is `None` once it has been).
            unsafe {
                libc::kill(pid, sig);
            }
        }
    };
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                let code = status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(1);
                return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
            }
            _ = interrupt.recv() => pass_on(child.id(), libc::SIGINT),
            _ = terminate.recv() => pass_on(child.id(), libc::SIGTERM),
        }
    }
}
