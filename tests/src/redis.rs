//! Real Redis for the fleet tests (the store's, the filter's and `unbusy up`'s): Debian's
//! `redis-server` (installed by `make setup`; or `UNBUSY_REDIS_SERVER`).
//! - [`RedisServer`]: one server on a unix socket in a private directory (`--port 0`, so no TCP
//!   port is raced for), without persistence; it can be killed, hung and restarted on the same
//!   socket, and is killed when dropped.
//! - [`RedisCluster`]: three primaries on loopback joined by `redis-cli --cluster create`.
//!   Cluster nodes need TCP ports (and their bus port, +10000): each node's pair is checked free
//!   just before it starts, and a node that still loses the race starts again on another pair.

// Test tooling: Redis that cannot be started or answers nonsense is a failed test, said loudly.
#![allow(clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `redis-server` binary: `UNBUSY_REDIS_SERVER`, else from `PATH`.
pub fn redis_server() -> PathBuf {
    std::env::var_os("UNBUSY_REDIS_SERVER").map_or_else(|| "redis-server".into(), PathBuf::from)
}

/// The `redis-cli` binary: `UNBUSY_REDIS_CLI`, else from `PATH`.
pub fn redis_cli() -> PathBuf {
    std::env::var_os("UNBUSY_REDIS_CLI").map_or_else(|| "redis-cli".into(), PathBuf::from)
}

/// Fails the test, saying how to get it, when `redis-server` cannot be started. (The tests that
/// need it are behind the `e2e` features, which `make test` turns on after `make setup`
/// installed Redis; a bare `cargo test --workspace` leaves them out.)
pub fn require_redis(test: &str) {
    let found = Command::new(redis_server())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{test}: {} not found (make setup installs it, or apt-get install redis-server; \
         UNBUSY_REDIS_SERVER names another binary)",
        redis_server().display()
    );
}

/// A fresh private directory, short enough for a unix socket path (108 bytes).
pub fn private_dir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ubr-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// Sends one inline command over `conn` and returns what came back in one read (enough for the
/// short replies the tests look at: `+PONG`, `:3`, a bulk string).
pub fn command_on(mut conn: impl Read + Write, line: &str) -> Option<String> {
    conn.write_all(format!("{line}\r\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 65536];
    let n = conn.read(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// `redis-server` listening only on a unix socket.
pub struct RedisServer {
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts one in a new private directory named after `name`.
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts one with extra `redis-server` arguments.
    pub fn start_with(name: &str, extra: &[&str]) -> Self {
        let mut r = Self {
            child: None,
            dir: private_dir(name),
            extra: extra.iter().map(|s| (*s).to_string()).collect(),
        };
        r.restart();
        r
    }

    /// Its private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its unix socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// Its URL for `unbusy-store --redis` and `unbusy up --redis`.
    pub fn url(&self) -> String {
        format!("redis+unix://{}", self.socket().display())
    }

    /// Starts it (again) on the same socket and waits until it answers `PING`.
    ///
    /// # Panics
    /// When it cannot be started or does not answer within 10 s.
    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::File::create(self.dir.join("redis.log")).ok();
        let child = Command::new(redis_server())
            .args(["--port", "0", "--unixsocket"])
            .arg(self.socket())
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(log.map_or_else(Stdio::null, Stdio::from))
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (make setup installs redis-server; or UNBUSY_REDIS_SERVER)",
                    redis_server().display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self
                .try_command("PING")
                .is_some_and(|r| r.starts_with("+PONG"))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not answer on {}", self.socket().display());
    }

    /// SIGKILL: no goodbye to any client.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (`true`) or SIGCONT: a Redis that accepts and never answers, as a hung server
    /// or a network black hole would.
    pub fn pause(&self, stop: bool) {
        let Some(pid) = self
            .child
            .as_ref()
            .and_then(|c| libc::pid_t::try_from(c.id()).ok())
        else {
            return;
        };
        let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on our own child, not yet reaped (`child` is taken when it is).
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// A command through the socket (RESP inline), `None` when Redis does not answer in 2 s.
    pub fn try_command(&self, line: &str) -> Option<String> {
        let s = UnixStream::connect(self.socket()).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        command_on(s, line)
    }

    /// A command through the socket, for tests that look at the keys.
    ///
    /// # Panics
    /// When Redis does not answer.
    pub fn command(&self, line: &str) -> String {
        self.try_command(line)
            .unwrap_or_else(|| panic!("redis at {} did not answer {line:?}", self.dir.display()))
    }

    /// How many keys it holds (`DBSIZE`).
    ///
    /// # Panics
    /// When Redis does not answer.
    pub fn keys(&self) -> u64 {
        let reply = self.command("DBSIZE");
        reply
            .trim()
            .trim_start_matches(':')
            .parse()
            .unwrap_or_else(|_| panic!("DBSIZE answered {reply:?}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.pause(false);
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three primaries on loopback.
pub struct RedisCluster {
    nodes: Vec<(Child, u16)>,
    dir: PathBuf,
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (c, _) in &mut self.nodes {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A command to a cluster node's TCP port.
pub fn node_command(port: u16, line: &str) -> Option<String> {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    command_on(s, line)
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl RedisCluster {
    /// Starts three cluster-enabled nodes, joins them, and waits until the cluster is ok.
    ///
    /// # Panics
    /// When no free port pairs are found, `redis-cli` fails, or the cluster does not become ok
    /// within 20 s.
    pub fn start() -> Self {
        let dir = private_dir("cluster");
        let mut cluster = Self {
            nodes: Vec::new(),
            dir: dir.clone(),
        };
        let mut tries = 0;
        while cluster.nodes.len() < 3 {
            tries += 1;
            assert!(tries < 50, "no free port pairs for a cluster node");
            let port = fastrand::u16(20_000..40_000);
            if !port_free(port) || !port_free(port + 10_000) {
                continue;
            }
            let log = std::fs::File::create(dir.join(format!("node-{port}.log"))).ok();
            let mut child = Command::new(redis_server())
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(dir.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(&dir)
                .args(["--save", "", "--appendonly", "no"])
                .stdout(log.map_or_else(Stdio::null, Stdio::from))
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("{}: {e}", redis_server().display()));
            let t = Instant::now();
            let mut up = false;
            while t.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // lost the port race: another pair
                }
                if node_command(port, "PING").is_some_and(|r| r.starts_with("+PONG")) {
                    up = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if up {
                cluster.nodes.push((child, port));
            } else {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let out = Command::new(redis_cli())
            .arg("--cluster")
            .arg("create")
            .args(cluster.nodes.iter().map(|(_, p)| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", redis_cli().display()));
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let t = Instant::now();
        while !cluster.nodes.iter().all(|(_, p)| {
            node_command(*p, "CLUSTER INFO").is_some_and(|r| r.contains("cluster_state:ok"))
        }) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the cluster did not become ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// The nodes' TCP ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|(_, p)| *p).collect()
    }

    /// The seed URLs for `--redis-cluster`, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|(_, p)| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// How many keys each node holds.
    ///
    /// # Panics
    /// When a node does not answer.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|(_, p)| {
                let r = node_command(*p, "DBSIZE").unwrap_or_else(|| panic!("node {p} silent"));
                r.trim().trim_start_matches(':').parse().unwrap_or(0)
            })
            .collect()
    }
}

/// Redis's own clock (`TIME`), in seconds, over a connection that writes `TIME` and reads the
/// reply. Quota scripts charge by this clock, so a bound on what they may grant over a run is
/// computed from it, not from the test's: the two clocks can differ by more than one emission
/// interval over seconds on a loaded machine.
///
/// # Panics
/// When Redis closes the connection or answers something else.
pub fn redis_time_s(mut conn: impl Read + Write) -> f64 {
    conn.write_all(b"TIME\r\n")
        .unwrap_or_else(|e| panic!("TIME: {e}"));
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    // `*2\r\n$10\r\nSECONDS\r\n$6\r\nMICROS\r\n`: complete once it has five line ends.
    while reply.iter().filter(|&&b| b == b'\n').count() < 5 {
        let n = conn.read(&mut buf).unwrap_or(0);
        assert!(n > 0, "redis closed the connection");
        reply.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let text = String::from_utf8_lossy(&reply);
    let lines: Vec<&str> = text.split("\r\n").collect();
    let field = |i: usize| -> f64 {
        lines
            .get(i)
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("TIME answered {text:?}"))
    };
    field(2) + field(4) / 1e6
}
