//! `unbusy up` end to end: the binary cargo builds, in front of busy-provider emulators on
//! loopback, with Envoy from the project (`make setup`) and the filter built into it by
//! `make filter`:
//! - it says on stdout where it listens, the ports Envoy bound when asked for port 0, and those
//!   serve at once (no test picks a port that something else can take first);
//! - a key given as an environment variable reaches the provider and is in no file and not in
//!   Envoy's `/config_dump`;
//! - it writes its rendered configuration into a private directory of its own, removes it when
//!   Envoy exits, runs next to another `unbusy up`, and follows nothing planted in `$TMPDIR`;
//! - copied out of the checkout and run from elsewhere, it needs nothing from the checkout:
//!   Envoy from `PATH`, the filter from inside the binary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use unbusy_tests::emulator::{start, Behaviour};
use unbusy_tests::envoy::envoy_binary;
use unbusy_tests::harness::{chat, chat_body, request};
use unbusy_tests::redis::{RedisCluster, RedisServer};
use unbusy_tests::world;

fn healthy(name: &str) -> Behaviour {
    world::healthy(name, [20.0, 40.0], [60.0, 100.0])
}

/// A key no other test uses, so finding it anywhere means it leaked from this test.
fn unique_key(what: &str) -> String {
    format!(
        "sk-{what}-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    )
}

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "unbusy-cli-e2e-{}-{}-{name}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Every file under `dir` (not following symlinks), with its text.
fn files_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for p in entries(dir) {
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            out.extend(files_under(&p));
        } else if m.is_file() {
            out.push((
                p.clone(),
                String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned(),
            ));
        }
    }
    out
}

/// Waits (polling) until `done` holds, for at most `within`.
async fn wait_for<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> F,
) {
    let until = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How to run `unbusy up` in a test.
struct Launch<'a> {
    /// The binary.
    exe: PathBuf,
    /// `$TMPDIR`.
    tmpdir: &'a Path,
    /// Added to its environment.
    env: &'a [(&'a str, &'a str)],
    /// `--envoy` (else Envoy is found on `PATH`).
    envoy: Option<PathBuf>,
    /// The working directory (else the test's).
    cwd: Option<&'a Path>,
    /// `PATH` (else the test's).
    path: Option<std::ffi::OsString>,
    /// More arguments after `up`.
    args: Vec<String>,
    /// `--config` (else none).
    config: Option<&'a Path>,
}

impl<'a> Launch<'a> {
    /// The binary cargo built, with the project's Envoy given as `--envoy`.
    fn new(tmpdir: &'a Path, env: &'a [(&'a str, &'a str)]) -> Self {
        Self {
            exe: PathBuf::from(env!("CARGO_BIN_EXE_unbusy")),
            tmpdir,
            env,
            envoy: Some(envoy_binary()),
            cwd: None,
            path: None,
            args: Vec::new(),
            config: None,
        }
    }
}

/// `unbusy up`, running with its own `$TMPDIR`.
struct UnbusyUp {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

/// `http://ADDR` in `line` after `prefix`, e.g. `listening on http://127.0.0.1:43121`.
fn announced(line: &str, prefix: &str) -> Option<SocketAddr> {
    line.strip_prefix(prefix)?
        .strip_prefix("http://")?
        .parse()
        .ok()
}

impl UnbusyUp {
    /// Starts `unbusy up --provider primary=http://<provider>` with `tmpdir` as `$TMPDIR` and
    /// `env` added to its environment, both ports 0.
    async fn start(tmpdir: &Path, provider: SocketAddr, env: &[(&str, &str)]) -> Self {
        Self::launch(&Launch::new(tmpdir, env), provider).await
    }

    /// Starts `unbusy up` as `launch` says, its listener and admin interface on port 0, and
    /// waits until it says where they are (its stdout), which is then where its Envoy serves.
    async fn launch(launch: &Launch<'_>, provider: SocketAddr) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let log = launch.tmpdir.parent().unwrap().join(format!(
            "unbusy-up-{}.log",
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(&launch.exe);
        cmd.arg("up")
            .args(["--provider", &format!("primary=http://{provider}")])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--concurrency", "1"])
            .args(&launch.args)
            .env("TMPDIR", launch.tmpdir)
            .env_remove("UNBUSY_ENVOY")
            .envs(launch.env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log_file);
        if let Some(envoy) = &launch.envoy {
            cmd.arg("--envoy").arg(envoy);
        }
        if let Some(cwd) = launch.cwd {
            cmd.current_dir(cwd);
        }
        if let Some(config) = launch.config {
            cmd.arg("--config").arg(config);
        }
        if let Some(path) = &launch.path {
            cmd.env("PATH", path);
        }
        let mut child = cmd.spawn().unwrap();
        // Its stdout, line by line, as it comes (a reader thread: the pipe read blocks).
        let (lines, next_line) = std::sync::mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut up = Self {
            child,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let until = Instant::now() + Duration::from_secs(30);
        let (mut listen, mut admin) = (None, None);
        loop {
            while let Ok(line) = next_line.try_recv() {
                listen = listen.or(announced(&line, "listening on "));
                admin = admin.or(announced(&line, "admin on "));
            }
            if let (Some(listen), Some(admin)) = (listen, admin) {
                up.listen = listen;
                up.admin = admin;
                break;
            }
            if let Some(status) = up.child.try_wait().unwrap() {
                panic!("unbusy up exited ({status}):\n{}", up.log_text());
            }
            assert!(
                Instant::now() < until,
                "unbusy up did not say where it listens within 30 s:\n{}",
                up.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What it announced is bound and serving: no waiting, no retry.
        assert_ne!(up.listen.port(), 0);
        assert_ne!(up.admin.port(), 0);
        let ready = request(up.admin, "GET", "/ready", &[], "").await.unwrap();
        assert_eq!(ready.status, 200, "{}", ready.text());
        up
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits (polling) for unbusy up to exit.
    async fn exited(&mut self, within: Duration) -> ExitStatus {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < until,
                "unbusy up still running after {within:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for UnbusyUp {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SIGTERM first: unbusy up passes it on to Envoy and cleans up.
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let until = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

async fn config_dump(admin: SocketAddr) -> String {
    let r = request(admin, "GET", "/config_dump?include_eds", &[], "")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    r.text()
}

// ---- keys from the environment ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_unbusy_ups_environment_reaches_the_provider_and_no_file_or_config_dump() {
    let (emu, addr) = start(healthy("primary"), 7, "127.0.0.1:0").await.unwrap();
    let tmp = scratch("key");
    let tmpdir = tmp.join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let key = unique_key("env");
    let up = UnbusyUp::start(&tmpdir, addr, &[("UNBUSY_KEY_PRIMARY", &key)]).await;

    let r = chat(up.listen, &chat_body("whose key", false, false), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let models = request(up.listen, "GET", "/v1/models", &[], "")
        .await
        .unwrap();
    assert_eq!(models.status, 200, "{}", models.text());
    let bearer = format!("Bearer {key}");
    let seen = emu.stats().seen;
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(s.authorization.as_deref(), Some(bearer.as_str()), "{s:?}");
    }

    let dump = config_dump(up.admin).await;
    assert!(!dump.contains(&key), "the key is in /config_dump");
    assert!(
        dump.contains("UNBUSY_KEY_PRIMARY"),
        "the dump names the variable"
    );
    for path in ["/stats", "/stats/prometheus", "/server_info"] {
        let text = request(up.admin, "GET", path, &[], "")
            .await
            .unwrap()
            .text();
        assert!(!text.contains(&key), "the key is in {path}");
    }
    // Nor in the rendered configuration (read while Envoy runs), nor in any log.
    let files = files_under(&tmpdir);
    assert!(!files.is_empty());
    for (path, text) in &files {
        assert!(!text.contains(&key), "the key is in {}", path.display());
    }
    assert!(!up.log_text().contains(&key), "the key is in the log");
    drop(up);
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---- health checks ----

/// With `health_check` on in `--config`, the provider is probed with its key from the
/// environment, both by the filter and by Envoy's own health checks (rendered on its cluster,
/// passing), and the key is still in no file and not in `/config_dump`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_probe_the_provider_with_its_key_and_envoy_checks_it_too() {
    let (emu, addr) = start(healthy("primary"), 7, "127.0.0.1:0").await.unwrap();
    let tmp = scratch("health");
    let tmpdir = tmp.join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let config = tmp.join("unbusy.json");
    std::fs::write(
        &config,
        r#"{"health_check": {"enabled": true, "interval_ms": 200, "timeout_ms": 1000}}"#,
    )
    .unwrap();
    let key = unique_key("health");
    let env = [("UNBUSY_KEY_PRIMARY", key.as_str())];
    let mut launch = Launch::new(&tmpdir, &env);
    launch.config = Some(&config);
    let up = UnbusyUp::launch(&launch, addr).await;

    // Envoy's own checks pass (they run every 200 ms), and the filter's probes arrive too.
    let admin = up.admin;
    wait_for(
        "Envoy's health checks pass",
        Duration::from_secs(20),
        || async move {
            let stats = request(
                admin,
                "GET",
                "/stats?filter=unbusy_primary.health_check.success",
                &[],
                "",
            )
            .await
            .map(|r| r.text())
            .unwrap_or_default();
            stats
                .lines()
                .filter_map(|l| l.split(": ").nth(1)?.trim().parse::<u64>().ok())
                .any(|n| n >= 3)
        },
    )
    .await;
    let seen = emu.stats().seen;
    let probes: Vec<_> = seen
        .iter()
        .filter(|s| s.method == "GET" && s.path == "/models")
        .collect();
    assert!(probes.len() >= 4, "{seen:?}");
    let bearer = format!("Bearer {key}");
    for s in &probes {
        assert_eq!(s.authorization.as_deref(), Some(bearer.as_str()), "{s:?}");
    }
    let dump = config_dump(up.admin).await;
    assert!(
        dump.contains("%ENVIRONMENT(UNBUSY_KEY_PRIMARY)%"),
        "no health check header in the dump"
    );
    assert!(!dump.contains(&key), "the key is in /config_dump");
    for (path, text) in &files_under(&tmpdir) {
        assert!(!text.contains(&key), "the key is in {}", path.display());
    }
    drop(up);
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---- its private directory ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbusy_up_keeps_its_config_in_a_private_directory_removed_when_envoy_exits() {
    let (_emu, addr) = start(healthy("primary"), 7, "127.0.0.1:0").await.unwrap();
    let tmp = scratch("private");
    let tmpdir = tmp.join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let mut up = UnbusyUp::start(&tmpdir, addr, &[]).await;

    let dirs = entries(&tmpdir);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let dir = &dirs[0];
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let meta = std::fs::symlink_metadata(dir).unwrap();
    assert!(meta.is_dir());
    assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{name}");
    assert!(
        name.starts_with("unbusy-up-") && name.len() > "unbusy-up-".len() + 8,
        "not a fresh name: {name}"
    );
    // SAFETY: getuid(2) has no preconditions.
    assert_eq!(meta.uid(), unsafe { libc::getuid() });
    let files = entries(dir);
    assert!(!files.is_empty());
    for f in &files {
        let m = std::fs::symlink_metadata(f).unwrap();
        assert!(m.is_file(), "{}", f.display());
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{}", f.display());
    }

    up.signal(libc::SIGTERM);
    let status = up.exited(Duration::from_secs(20)).await;
    assert!(
        entries(&tmpdir).is_empty(),
        "left behind after Envoy exited ({status}): {:?}",
        entries(&tmpdir)
    );
    // Envoy went with it.
    wait_for(
        "Envoy's admin to close",
        Duration::from_secs(10),
        || async { tokio::net::TcpStream::connect(up.admin).await.is_err() },
    )
    .await;
    drop(up);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_unbusy_ups_run_at_once_and_both_serve() {
    let (emu, addr) = start(healthy("primary"), 7, "127.0.0.1:0").await.unwrap();
    let tmp = scratch("two");
    let tmpdir = tmp.join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    let mut a = UnbusyUp::start(&tmpdir, addr, &[]).await;
    let mut b = UnbusyUp::start(&tmpdir, addr, &[]).await;
    assert_eq!(entries(&tmpdir).len(), 2, "one private directory each");
    for up in [&a, &b] {
        let r = chat(up.listen, &chat_body("two at once", false, false), &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(emu.stats().attempts, 2);
    // Ctrl-C (SIGINT) is passed on like SIGTERM.
    a.signal(libc::SIGINT);
    a.exited(Duration::from_secs(20)).await;
    let r = chat(b.listen, &chat_body("still serving", false, false), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "the other one stopped too");
    b.signal(libc::SIGTERM);
    b.exited(Duration::from_secs(20)).await;
    assert!(entries(&tmpdir).is_empty(), "{:?}", entries(&tmpdir));
    drop((a, b));
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_planted_at_the_old_fixed_name_is_not_followed() {
    let (_emu, addr) = start(healthy("primary"), 7, "127.0.0.1:0").await.unwrap();
    let tmp = scratch("planted");
    let tmpdir = tmp.join("tmp");
    let theirs = tmp.join("theirs");
    std::fs::create_dir(&tmpdir).unwrap();
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o777)).unwrap();
    // Someone else got there first: `$TMPDIR/unbusy-up` as a symlink to a folder they read.
    std::os::unix::fs::symlink(&theirs, tmpdir.join("unbusy-up")).unwrap();
    let up = UnbusyUp::start(&tmpdir, addr, &[]).await;
    let r = chat(up.listen, &chat_body("planted", false, false), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        entries(&theirs).is_empty(),
        "written through the planted symlink: {:?}",
        entries(&theirs)
    );
    let link = std::fs::symlink_metadata(tmpdir.join("unbusy-up")).unwrap();
    assert!(
        link.file_type().is_symlink(),
        "the planted link was replaced"
    );
    drop(up);
    assert!(entries(&theirs).is_empty());
    let _ = std::fs::remove_dir_all(&tmp);
}

// ---- the installed binary, from anywhere ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_and_run_outside_the_checkout_it_finds_envoy_on_path_and_its_filter_inside() {
    let (emu, addr) = start(healthy("primary"), 7, "127.0.0.1:0").await.unwrap();
    let tmp = scratch("installed");
    let tmpdir = tmp.join("tmp");
    let bin = tmp.join("bin");
    let envoy_dir = tmp.join("envoy");
    let cwd = tmp.join("somewhere");
    for d in [&tmpdir, &bin, &envoy_dir, &cwd] {
        std::fs::create_dir(d).unwrap();
    }
    // As `cargo install` leaves it: the binary alone, in a directory of its own.
    let exe = bin.join("unbusy");
    std::fs::copy(env!("CARGO_BIN_EXE_unbusy"), &exe).unwrap();
    // Envoy only on PATH, under the name `envoy`.
    std::os::unix::fs::symlink(envoy_binary(), envoy_dir.join("envoy")).unwrap();
    let path = std::env::join_paths([envoy_dir.clone(), "/usr/bin".into(), "/bin".into()]).unwrap();
    let launch = Launch {
        exe,
        envoy: None,
        cwd: Some(&cwd),
        path: Some(path),
        ..Launch::new(&tmpdir, &[])
    };
    let up = UnbusyUp::launch(&launch, addr).await;
    let r = chat(up.listen, &chat_body("from anywhere", false, false), &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let x_unbusy = r.header("x-unbusy").unwrap_or_default();
    assert!(x_unbusy.contains("provider=primary"), "{x_unbusy}");
    assert_eq!(emu.stats().attempts, 1, "not answered through the emulator");
    // The Envoy running is the one on PATH...
    let envoys = children(up.child.id());
    assert_eq!(envoys.len(), 1, "{envoys:?}");
    let on_path = envoy_dir.join("envoy").display().to_string();
    assert!(envoys[0].contains(&on_path), "not {on_path}: {envoys:?}");
    // ...and it runs the filter built into the binary, written into the private directory.
    let dirs = entries(&tmpdir);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let wasm = dirs[0].join("unbusy_envoy.wasm");
    assert!(std::fs::read(&wasm).unwrap().starts_with(b"\0asm"));
    let yaml = std::fs::read_to_string(dirs[0].join("envoy.yaml")).unwrap();
    let code = format!("filename: \"{}\"", wasm.display());
    assert!(yaml.contains(&code), "not {code}:\n{yaml}");
    assert!(entries(&cwd).is_empty(), "wrote into its working directory");
    drop(up);
    assert!(entries(&tmpdir).is_empty(), "{:?}", entries(&tmpdir));
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The command lines of `pid`'s children (arguments joined by spaces).
fn children(pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`, where comm may hold spaces and parentheses.
        let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
        if after.split_whitespace().nth(1) == Some(pid.to_string().as_str()) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
        }
    }
    found
}

#[test]
fn without_envoy_on_path_it_says_how_to_get_it() {
    let tmp = scratch("no-envoy");
    let err = tmp.join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_unbusy"))
        .args(["up", "--provider", "primary=http://127.0.0.1:9"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("PATH", &tmp)
        .env("TMPDIR", &tmp)
        .env_remove("UNBUSY_ENVOY")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running without Envoy on PATH (it found one elsewhere)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    let err = std::fs::read_to_string(&err).unwrap();
    assert!(
        err.contains("Envoy is not on PATH") && err.contains("--envoy PATH"),
        "{err}"
    );
    assert_eq!(entries(&tmp), [tmp.join("stderr")], "left something behind");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The fleet in two commands: `unbusy up --redis URL` (or `--redis-cluster URLS`) twice, one
/// Redis. Each runs the store in its own process, so an answer fetched through one is a hit on
/// the other (`cache=hit-l2`), and the provider sees one call for both.
async fn two_proxies_share_one_cache_through(flag: &str, url: String, keys: impl Fn() -> u64) {
    let (emu, addr) = start(healthy("primary"), 7, "127.0.0.1:0").await.unwrap();
    let tmp = scratch("redis");
    let tmpdir = tmp.join("tmp");
    std::fs::create_dir(&tmpdir).unwrap();
    // The default lookup timeout (20 ms) is for an idle host; this test is about sharing.
    let config = tmp.join("config.json");
    std::fs::write(&config, r#"{"store": {"timeout_ms": 2000}}"#).unwrap();
    let mut launch = Launch::new(&tmpdir, &[]);
    launch.args = vec![
        flag.into(),
        url,
        "--config".into(),
        config.display().to_string(),
    ];
    let a = UnbusyUp::launch(&launch, addr).await;
    let b = UnbusyUp::launch(&launch, addr).await;
    for up in [&a, &b] {
        assert!(
            up.log_text()
                .contains("the fleet store on http://127.0.0.1:"),
            "{}",
            up.log_text()
        );
    }
    for i in 0..4 {
        let body = chat_body(&format!("one fleet, one cache {i}"), false, true);
        let before = keys();
        let first = chat(a.listen, &body, &[]).await.unwrap();
        assert_eq!(first.status, 200, "{}", first.text());
        assert!(
            first
                .header("x-unbusy")
                .unwrap_or("")
                .contains("cache=miss"),
            "{:?}",
            first.header("x-unbusy")
        );
        // A's write-back leaves on its next tick: wait until Redis holds the entry.
        wait_for("the entry in Redis", Duration::from_secs(10), || async {
            keys() > before
        })
        .await;
        let hit = chat(b.listen, &body, &[]).await.unwrap();
        assert_eq!(hit.status, 200);
        assert!(
            hit.header("x-unbusy")
                .unwrap_or("")
                .contains("cache=hit-l2"),
            "{:?}\n{}",
            hit.header("x-unbusy"),
            b.log_text()
        );
        assert_eq!(hit.text(), first.text());
        assert_eq!(
            emu.stats().attempts,
            i + 1,
            "one provider call for both proxies"
        );
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbusy_up_with_redis_runs_a_store_and_two_proxies_share_one_cache() {
    let redis = RedisServer::start("up");
    two_proxies_share_one_cache_through("--redis", redis.url(), || redis.keys()).await;
}

/// The same on a Redis Cluster of three primaries: the four entries land on whichever nodes
/// their keys hash to, and both proxies find them there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbusy_up_with_a_redis_cluster_shares_one_cache_too() {
    let cluster = RedisCluster::start();
    two_proxies_share_one_cache_through("--redis-cluster", cluster.urls(), || {
        cluster.keys_per_node().iter().sum()
    })
    .await;
}

#[test]
fn redis_and_a_store_url_together_are_refused_before_anything_starts() {
    let out = Command::new(env!("CARGO_BIN_EXE_unbusy"))
        .args([
            "up",
            "--provider",
            "p=http://127.0.0.1:9",
            "--redis",
            "redis://127.0.0.1:1",
        ])
        .args(["--store", "http://127.0.0.1:2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("give one of them"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_unbusy"))
        .args([
            "up",
            "--provider",
            "p=http://127.0.0.1:9",
            "--redis",
            "redis://127.0.0.1:1",
        ])
        .arg("--print-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--print-config with --redis"));
}
