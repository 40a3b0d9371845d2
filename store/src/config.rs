//! The store's settings, from flags or the environment (a flag wins over its variable).

use std::time::Duration;

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or a primary with replicas behind a proxy): `redis://`, `redis+unix://`,
    /// `unix://`.
    Single(String),
    /// A Redis Cluster, given by one or more seed nodes (`redis://host:port`).
    Cluster(Vec<String>),
}

/// Everything the store is told at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The HTTP listen address; port 0 binds a free port, printed on stdout.
    pub listen: String,
    pub redis: RedisTarget,
    /// Prepended to every key this store reads or writes.
    pub prefix: String,
    /// The longest any one operation may take, Redis included, before the store answers 503.
    pub timeout: Duration,
    /// The longest a (re)connection to Redis may take.
    pub connect_timeout: Duration,
    /// The longest cache value accepted (larger: 413).
    pub max_value_bytes: usize,
    /// How long a quota lease may be spent, returned to callers with every lease.
    pub lease: Duration,
}

pub const USAGE: &str = "\
unbusy-store: the unbusy fleet store (HTTP/1.1 in front of Redis)

  --listen ADDR            HTTP listen address (default 127.0.0.1:7379; port 0 picks one)  [UNBUSY_STORE_LISTEN]
  --redis URL              redis://host:port[/db], redis+unix:///path/redis.sock            [UNBUSY_STORE_REDIS]
                           (default redis://127.0.0.1:6379)
  --redis-cluster URLS     Redis Cluster seed nodes, comma-separated redis://host:port       [UNBUSY_STORE_REDIS_CLUSTER]
  --prefix P               key prefix (default \"unbusy:\"; no braces, no whitespace)         [UNBUSY_STORE_PREFIX]
  --timeout-ms N           bound on each operation, Redis included (default 250)             [UNBUSY_STORE_TIMEOUT_MS]
  --connect-timeout-ms N   bound on each (re)connection to Redis (default 250)               [UNBUSY_STORE_CONNECT_TIMEOUT_MS]
  --max-value-bytes N      largest cache value accepted (default 4194304)                    [UNBUSY_STORE_MAX_VALUE_BYTES]
  --lease-ms N             how long a quota lease may be spent (default 1000)                [UNBUSY_STORE_LEASE_MS]

Prints `listening on ADDR` on stdout once it accepts connections. API: docs/store.md.";

impl Settings {
    /// Reads flags (`args` without the program name) over `env` (a variable lookup).
    pub fn parse(args: &[String], env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut flags: Vec<(&str, String)> = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (name, inline) = match a.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (a.as_str(), None),
            };
            let known = [
                "--listen",
                "--redis",
                "--redis-cluster",
                "--prefix",
                "--timeout-ms",
                "--connect-timeout-ms",
                "--max-value-bytes",
                "--lease-ms",
            ];
            let Some(flag) = known.iter().find(|k| **k == name) else {
                return Err(format!("unknown argument {name:?}\n\n{USAGE}"));
            };
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{flag} needs a value"))?,
            };
            flags.push((flag, value));
        }
        let get = |flag: &str, var: &str| -> Option<String> {
            flags
                .iter()
                .rev()
                .find(|(f, _)| *f == flag)
                .map(|(_, v)| v.clone())
                .or_else(|| env(var).filter(|v| !v.is_empty()))
        };
        let number = |flag: &str, var: &str, default: u64, min: u64, max: u64| match get(flag, var)
        {
            None => Ok(default),
            Some(v) => match v.trim().parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(format!("{flag} must be a whole number from {min} to {max}")),
            },
        };
        let listen =
            get("--listen", "UNBUSY_STORE_LISTEN").unwrap_or_else(|| "127.0.0.1:7379".into());
        let cluster = get("--redis-cluster", "UNBUSY_STORE_REDIS_CLUSTER");
        let single = get("--redis", "UNBUSY_STORE_REDIS");
        let redis = match (single, cluster) {
            (Some(_), Some(_)) => {
                return Err("give --redis or --redis-cluster, not both".into());
            }
            (_, Some(c)) => {
                let nodes: Vec<String> = c
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                if nodes.is_empty() {
                    return Err("--redis-cluster needs at least one node URL".into());
                }
                RedisTarget::Cluster(nodes)
            }
            (Some(s), None) => RedisTarget::Single(s),
            (None, None) => RedisTarget::Single("redis://127.0.0.1:6379".into()),
        };
        let prefix = get("--prefix", "UNBUSY_STORE_PREFIX").unwrap_or_else(|| "unbusy:".into());
        // Braces would change which part of a key Redis Cluster hashes (the hash tags this
        // store sets so that a script's keys share a slot); whitespace is a typo.
        if prefix.len() > 64
            || prefix
                .chars()
                .any(|c| c == '{' || c == '}' || c.is_whitespace() || c.is_control())
        {
            return Err(
                "--prefix must be at most 64 characters, without braces or whitespace".into(),
            );
        }
        let timeout = number("--timeout-ms", "UNBUSY_STORE_TIMEOUT_MS", 250, 1, 60_000)?;
        let connect = number(
            "--connect-timeout-ms",
            "UNBUSY_STORE_CONNECT_TIMEOUT_MS",
            250,
            1,
            60_000,
        )?;
        let max_value = number(
            "--max-value-bytes",
            "UNBUSY_STORE_MAX_VALUE_BYTES",
            4 << 20,
            1,
            512 << 20,
        )?;
        let lease = number("--lease-ms", "UNBUSY_STORE_LEASE_MS", 1000, 10, 3_600_000)?;
        Ok(Settings {
            listen,
            redis,
            prefix,
            timeout: Duration::from_millis(timeout),
            connect_timeout: Duration::from_millis(connect),
            max_value_bytes: usize::try_from(max_value).unwrap_or(usize::MAX),
            lease: Duration::from_millis(lease),
        })
    }
}

/// A Redis URL fit for a log line: any password (and user name) replaced by `***`.
pub fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            // Userinfo ends at the last '@' before the path.
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rfind('@') {
                Some(at) => format!(
                    "{scheme}://***@{}{path}",
                    authority.get(at + 1..).unwrap_or("")
                ),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

impl RedisTarget {
    /// The target for a log line, passwords redacted.
    pub fn describe(&self) -> String {
        match self {
            RedisTarget::Single(u) => redacted(u),
            RedisTarget::Cluster(nodes) => format!(
                "cluster {}",
                nodes
                    .iter()
                    .map(|n| redacted(n))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(args: &[&str], env: &[(&str, &str)]) -> Result<Settings, String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::parse(&args, &|k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_flags_and_environment() {
        let s = parse(&[], &[]).unwrap();
        assert_eq!(s.listen, "127.0.0.1:7379");
        assert_eq!(
            s.redis,
            RedisTarget::Single("redis://127.0.0.1:6379".into())
        );
        assert_eq!(s.prefix, "unbusy:");
        assert_eq!(s.timeout, Duration::from_millis(250));
        let s = parse(
            &["--listen", "127.0.0.1:0", "--timeout-ms=50"],
            &[
                ("UNBUSY_STORE_TIMEOUT_MS", "9"),
                ("UNBUSY_STORE_PREFIX", "p:"),
            ],
        )
        .unwrap();
        assert_eq!(s.listen, "127.0.0.1:0");
        assert_eq!(
            s.timeout,
            Duration::from_millis(50),
            "a flag wins over its variable"
        );
        assert_eq!(s.prefix, "p:");
        let s = parse(&["--redis-cluster", "redis://a:1, redis://b:2"], &[]).unwrap();
        assert_eq!(
            s.redis,
            RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        assert!(parse(&["--nope"], &[]).unwrap_err().contains("--nope"));
        assert!(parse(&["--timeout-ms", "0"], &[])
            .unwrap_err()
            .contains("--timeout-ms"));
        assert!(parse(&["--timeout-ms"], &[])
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse(&["--prefix", "a{b}"], &[])
            .unwrap_err()
            .contains("--prefix"));
        assert!(parse(
            &["--redis", "redis://x", "--redis-cluster", "redis://y"],
            &[]
        )
        .is_err());
    }

    #[test]
    fn passwords_never_reach_a_log_line() {
        assert_eq!(
            redacted("redis://:hunter2@h:6379/0"),
            "redis://***@h:6379/0"
        );
        assert_eq!(redacted("redis://user:pw@h"), "redis://***@h");
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
        assert_eq!(
            redacted("redis+unix:///tmp/r.sock"),
            "redis+unix:///tmp/r.sock"
        );
        let c = RedisTarget::Cluster(vec!["redis://:s3cret@a:1".into()]);
        assert!(!c.describe().contains("s3cret"));
    }
}
