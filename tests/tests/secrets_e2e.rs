//! Where provider keys go, end to end on real Envoy with the filter built by `make filter`, in
//! front of busy-provider emulators on loopback:
//! - a key given as an environment variable reaches the provider and is in no file and not in
//!   Envoy's `/config_dump`; a missing variable refuses the configuration;
//! - `unbusy-up` writes its rendered configuration into a private directory of its own, removes
//!   it when Envoy exits, runs next to another `unbusy-up`, and follows nothing planted in
//!   `$TMPDIR`;
//! - only endpoints unbusy knows get a provider's key: anything else is refused, or carries the
//!   caller's own key.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use unbusy_tests::emulator::{start, Behaviour};
use unbusy_tests::envoy::{filter_config, filter_wasm, render, Render, Upstream};
use unbusy_tests::harness::{chat, chat_body, request, Envoy};
use unbusy_tests::world::{self, World};

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
        "unbusy-secrets-e2e-{}-{}-{name}",
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

/// A loopback port free right now (the kernel's pick, released for the test to hand out).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// The `unbusy-up` binary, running with its own `$TMPDIR`.
struct UnbusyUp {
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl UnbusyUp {
    /// Starts `unbusy-up --provider primary=http://<provider>` with `tmpdir` as `$TMPDIR` and
    /// `env` added to its environment, and waits until its Envoy serves.
    async fn start(tmpdir: &Path, provider: SocketAddr, env: &[(&str, &str)]) -> Self {
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = tmpdir
            .parent()
            .unwrap()
            .join(format!("unbusy-up-{}.log", listen.port()));
        let log_file = std::fs::File::create(&log).unwrap();
        let wasm = filter_wasm();
        assert!(
            wasm.exists(),
            "{} missing: run `make filter`",
            wasm.display()
        );
        let child = Command::new(env!("CARGO_BIN_EXE_unbusy-up"))
            .args(["--provider", &format!("primary=http://{provider}")])
            .args(["--listen", &listen.to_string()])
            .args(["--admin", &admin.to_string()])
            .args(["--concurrency", "1"])
            .env("TMPDIR", tmpdir)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        let mut up = Self {
            child,
            listen,
            admin,
            log,
        };
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = up.child.try_wait().unwrap() {
                panic!("unbusy-up exited ({status}):\n{}", up.log_text());
            }
            let ready = request(admin, "GET", "/ready", &[], "")
                .await
                .is_ok_and(|r| r.status == 200);
            if ready && tokio::net::TcpStream::connect(listen).await.is_ok() {
                return up;
            }
            assert!(
                Instant::now() < until,
                "unbusy-up not ready after 30 s:\n{}",
                up.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Waits (polling) for unbusy-up to exit.
    async fn exited(&mut self, within: Duration) -> ExitStatus {
        let until = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < until,
                "unbusy-up still running after {within:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for UnbusyUp {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SIGTERM first: unbusy-up passes it on to Envoy and cleans up.
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

// ---- 11: keys from the environment ----

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

/// Starts Envoy with provider `primary` whose key is the variable `variable`, with `env` in
/// Envoy's environment: the log of a refused configuration (panics if Envoy accepted it).
fn refused_log(variable: &str, env: &[(&str, &str)]) -> String {
    let upstreams = [Upstream::parse("primary=http://127.0.0.1:9").unwrap()];
    let config = json!({"providers": [{"name": "primary", "api_key_env": variable}]});
    let filter = filter_config(&config, &upstreams, &|_| false).unwrap();
    let yaml = render(&Render {
        listen: ("127.0.0.1", 0),
        admin: ("127.0.0.1", 0),
        upstreams: &upstreams,
        filter: Some(&filter),
        wasm: &filter_wasm(),
        native: None,
    });
    assert!(
        yaml.contains(&format!("host_env_keys: [\"{variable}\"]")),
        "{yaml}"
    );
    match Envoy::start_yaml_env(&yaml, 1, env) {
        Ok(mut envoy) => {
            // Envoy may come up before refusing the filter: it must still refuse it.
            let exited = envoy.wait_exit(Duration::from_secs(10));
            assert!(exited.is_some(), "Envoy accepted the configuration");
            envoy.log_text()
        }
        Err(e) => e,
    }
}

#[test]
fn a_missing_or_empty_key_variable_makes_envoy_refuse_the_configuration() {
    let variable = format!("UNBUSY_TEST_NO_SUCH_KEY_{}", std::process::id());
    assert!(std::env::var_os(&variable).is_none());
    for (env, what) in [
        (vec![], "missing"),
        (vec![(variable.as_str(), " ")], "empty"),
    ] {
        let log = refused_log(&variable, &env);
        let line = log
            .lines()
            .find(|l| l.contains("unbusy: invalid plugin configuration"))
            .unwrap_or_else(|| panic!("{what}: no refusal in the log:\n{log}"));
        assert!(
            line.contains(&format!(
                "providers[0] (\"primary\"): api_key_env names \"{variable}\""
            )),
            "{what}: {line}"
        );
    }
}

// ---- 12: unbusy-up's private directory ----

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

// ---- 13: which endpoints carry which key ----

/// One healthy provider `primary` with the key `provider-key`, and `extra` in the filter's
/// configuration.
async fn world(extra: Value) -> World {
    let config = world::merged(
        json!({"providers": [{"name": "primary", "api_key": "provider-key"}]}),
        &extra,
    );
    World::start(vec![healthy("primary")], &config, 1)
        .await
        .unwrap()
}

const CALLER: (&str, &str) = ("authorization", "Bearer caller-key");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_endpoint_is_refused_and_the_provider_sees_nothing() {
    let w = world(json!({})).await;
    for (method, path, body) in [
        ("DELETE", "/v1/files/x", ""),
        ("POST", "/v1/files", "{\"purpose\":\"batch\"}"),
        ("GET", "/v1/files?limit=1", ""),
        ("GET", "/v1/chat/completions", ""),
        ("DELETE", "/v1/models/ft-x", ""),
        ("POST", "/v1/fine_tuning/jobs", "{\"model\":\"m\"}"),
    ] {
        let r = request(w.envoy.listen, method, path, &[CALLER], body.to_string())
            .await
            .unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        let error = &r.json()["error"];
        assert_eq!(error["type"], "endpoint_not_allowed", "{}", r.text());
        let message = error["message"].as_str().unwrap_or("");
        assert!(
            message.contains(method) && message.contains("refuse"),
            "{message}"
        );
        assert_eq!(r.header("x-should-retry"), Some("false"));
        assert_eq!(r.header("x-unbusy"), Some("refused=endpoint_not_allowed"));
    }
    assert_eq!(
        w.providers[0].stats().seen,
        vec![],
        "something reached the provider"
    );
    let stats = w
        .envoy
        .admin_text("/stats?filter=unbusy_rejections")
        .await
        .unwrap();
    assert!(stats.contains("reason.endpoint_not_allowed: 6"), "{stats}");

    // The endpoints unbusy knows still get the provider's key.
    let models = request(w.envoy.listen, "GET", "/v1/models", &[CALLER], "")
        .await
        .unwrap();
    assert_eq!(models.status, 200, "{}", models.text());
    let managed = chat(w.envoy.listen, &chat_body("managed", false, false), &[])
        .await
        .unwrap();
    assert_eq!(managed.status, 200, "{}", managed.text());
    let seen = w.providers[0].stats().seen;
    let auth: Vec<_> = seen.iter().map(|s| s.authorization.as_deref()).collect();
    assert_eq!(auth, [Some("Bearer provider-key"); 2], "{seen:?}");
    let log = w.envoy.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_caller_key_an_unknown_endpoint_carries_the_callers_key_never_the_providers() {
    let w = world(json!({"endpoints": {"passthrough": "caller_key"}})).await;
    let r = request(w.envoy.listen, "DELETE", "/v1/files/x", &[CALLER], "")
        .await
        .unwrap();
    // The emulator has no files endpoint: its own 404 came back.
    assert_eq!(r.status, 404, "{}", r.text());
    let anonymous = request(w.envoy.listen, "DELETE", "/v1/files/y", &[], "")
        .await
        .unwrap();
    assert_eq!(anonymous.status, 404, "{}", anonymous.text());
    let models = request(w.envoy.listen, "GET", "/v1/models", &[CALLER], "")
        .await
        .unwrap();
    assert_eq!(models.status, 200);
    let seen = w.providers[0].stats().seen;
    let got: Vec<_> = seen
        .iter()
        .map(|s| {
            (
                s.method.as_str(),
                s.path.as_str(),
                s.authorization.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("DELETE", "/files/x", Some("Bearer caller-key")),
            ("DELETE", "/files/y", None),
            ("GET", "/models", Some("Bearer provider-key")),
        ]
    );
}
