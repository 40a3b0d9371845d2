//! # unbusy-envoy-config
//!
//! Rendering a complete Envoy configuration for unbusy (`unbusy up`, the demo, the end-to-end
//! tests and the benchmark): a listener with the wasm filter and the router, one cluster per
//! provider (TLS for https URLs), and Envoy's tag extraction for the filter's metric labels.
//!
//! With two or more providers it also renders native failover: per provider an aggregate
//! cluster (that provider, then the others in preference order), the filter's upstream
//! instance in the router, and a route retry policy that retries only on the status that
//! instance sets when the engine chooses the next provider. Every endpoint names its provider
//! in `filter_metadata.unbusy.provider`, which the upstream instance reads.

pub mod admin;

use serde_json::{Map, Value};
use std::fmt::Write;
use std::path::Path;

/// A provider as given on the command line: `NAME=URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The provider's name.
    pub name: String,
    /// `https` or `http`.
    pub tls: bool,
    /// Host name or IP.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The URL as given.
    pub url: String,
}

impl Upstream {
    /// Parses `NAME=URL`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, url) = spec
            .split_once('=')
            .ok_or_else(|| format!("--provider {spec:?}: expected NAME=URL"))?;
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "--provider {spec:?}: the name must be letters, digits, - or _"
            ));
        }
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "--provider {spec:?}: the URL must start with http:// or https://"
            ));
        };
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse::<u16>()
                    .map_err(|_| format!("--provider {spec:?}: bad port {p:?}"))?,
            ),
            None => (authority.to_string(), if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(format!("--provider {spec:?}: the URL has no host"));
        }
        Ok(Self {
            name: name.to_string(),
            tls,
            host,
            port,
            url: url.trim_end_matches('/').to_string(),
        })
    }

    /// The Envoy cluster's name.
    pub fn cluster(&self) -> String {
        format!("unbusy_{}", self.name)
    }

    /// The aggregate cluster that starts with this provider and fails over natively.
    pub fn failover_cluster(&self) -> String {
        format!("unbusy_{}_failover", self.name)
    }
}

/// The environment variable that holds provider `name`'s key: `UNBUSY_KEY_<NAME>` (upper
/// case, `-` as `_`).
pub fn key_variable(name: &str) -> String {
    format!("UNBUSY_KEY_{}", name.to_ascii_uppercase().replace('-', "_"))
}

/// Builds the filter's configuration: `base` (the engine schema, possibly empty) with the
/// upstreams as its providers, in order of preference. A provider already in `base` keeps its
/// settings (credentials, model mapping, quota); its URL, cluster and priority come from the
/// command line. When `has_key` says the variable [`key_variable`] is set, the provider's key
/// is that variable (`api_key_env`, replacing any `api_key`): the filter reads it from Envoy's
/// environment, and [`render`] lists it in `host_env_keys`, so the key itself is in no file and
/// not in Envoy's `/config_dump`.
pub fn filter_config(
    base: &Value,
    upstreams: &[Upstream],
    has_key: &dyn Fn(&str) -> bool,
) -> Result<Value, String> {
    let mut config = match base {
        Value::Null => Map::new(),
        Value::Object(o) => o.clone(),
        _ => return Err("the configuration file must hold a JSON object".into()),
    };
    let existing: Vec<Value> = config
        .get("providers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut providers = Vec::new();
    for (i, u) in upstreams.iter().enumerate() {
        let mut p = existing
            .iter()
            .filter_map(Value::as_object)
            .find(|p| p.get("name").and_then(Value::as_str) == Some(u.name.as_str()))
            .cloned()
            .unwrap_or_default();
        p.insert("name".into(), Value::from(u.name.clone()));
        p.insert("base_url".into(), Value::from(u.url.clone()));
        p.insert("cluster".into(), Value::from(u.cluster()));
        p.insert("priority".into(), Value::from(i as u64));
        if upstreams.len() > 1 {
            p.insert("failover_cluster".into(), Value::from(u.failover_cluster()));
        }
        let env = key_variable(&u.name);
        if has_key(&env) {
            p.remove("api_key");
            p.insert("api_key_env".into(), Value::from(env));
        }
        providers.push(Value::Object(p));
    }
    config.insert("providers".into(), Value::Array(providers));
    let config = Value::Object(config);
    let text = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
    unbusy_core::config::Config::from_json(&text)
        .map_err(|e| format!("invalid configuration: {e}"))?;
    Ok(config)
}

/// The Envoy cluster that reaches `unbusy-store` (the filter's `store.cluster`).
pub const STORE_CLUSTER: &str = "unbusy_store";

/// The store's address as given on the command line (`--store http://HOST:PORT`): plain HTTP,
/// a sidecar on loopback or the pod's own address.
pub fn store_upstream(url: &str) -> Result<Upstream, String> {
    if !url.starts_with("http://") {
        return Err(format!("--store {url:?}: the URL must start with http://"));
    }
    let mut u = Upstream::parse(&format!("store={url}"))
        .map_err(|e| e.replace("--provider \"store=", "--store \""))?;
    u.name = "store".into();
    Ok(u)
}

/// Points the filter's configuration at the store rendered as [`STORE_CLUSTER`] (`store.cluster`;
/// the section's other settings are kept).
pub fn use_store(filter: &mut Value) {
    if let Value::Object(config) = filter {
        let store = config
            .entry("store")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(store) = store {
            store.insert("cluster".into(), Value::from(STORE_CLUSTER));
        }
    }
}

/// What the rendered Envoy runs.
pub struct Render<'a> {
    /// Listener address.
    pub listen: (&'a str, u16),
    /// Admin address.
    pub admin: (&'a str, u16),
    /// The upstreams.
    pub upstreams: &'a [Upstream],
    /// The filter's configuration (JSON); `None` renders Envoy without the filter (bare).
    pub filter: Option<&'a Value>,
    /// The filter's `.wasm`.
    pub wasm: &'a Path,
    /// Envoy's native `local_ratelimit` and route `retry_policy` instead of the filter, with
    /// this many requests per second (the benchmark's comparison).
    pub native: Option<u32>,
    /// `unbusy-store`, rendered as the cluster [`STORE_CLUSTER`] (see [`use_store`]).
    pub store: Option<&'a Upstream>,
}

fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The environment variables the filter's configuration reads keys from (its providers'
/// `api_key_env`), as a YAML flow list: Envoy passes exactly these to the VM.
fn host_env_keys(filter: &Value) -> String {
    let names: Vec<String> = filter
        .get("providers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("api_key_env").and_then(Value::as_str))
        .map(yaml_str)
        .collect();
    format!("[{}]", names.join(", "))
}

/// The tag extraction of the filter's GenAI histograms (`unbusy-envoy`'s `genai` module): stat
/// names `wasmcustom.gen_ai_client_<metric>.gen_ai_operation_name.<op>.gen_ai_provider_name.<p>
/// [.error_type.<e>][.gen_ai_token_type.<t>].gen_ai_request_model.<model>` become
/// `gen_ai_client_<metric>{gen_ai_operation_name, gen_ai_provider_name, error_type,
/// gen_ai_token_type, gen_ai_request_model}`. Every value but the model's is one dot-free
/// segment; the model is last and takes the whole rest of the name, so `gpt-4.1` stays whole.
///
/// (Envoy keeps, per stat, only the first extractor of a tag name that matched and logs
/// "Skipping duplicate tag" for the others (`tag_producer_impl.cc`), so each tag name here
/// has one regex; the filter's three `result` counters share one for the same reason.)
pub const GENAI_STATS_TAGS: &str = r"  - { tag_name: gen_ai_operation_name, regex: '^wasmcustom\.gen_ai_client_[a-z_]+(\.gen_ai_operation_name\.([^.]+))' }
  - { tag_name: gen_ai_provider_name, regex: '^wasmcustom\.gen_ai_client_[a-z_]+\.gen_ai_operation_name\.[^.]+(\.gen_ai_provider_name\.([^.]+))' }
  - { tag_name: error_type, regex: '^wasmcustom\.gen_ai_client_[a-z_]+\.gen_ai_operation_name\.[^.]+\.gen_ai_provider_name\.[^.]+(\.error_type\.([^.]+))' }
  - { tag_name: gen_ai_token_type, regex: '^wasmcustom\.gen_ai_client_token_usage\.gen_ai_operation_name\.[^.]+\.gen_ai_provider_name\.[^.]+(?:\.error_type\.[^.]+)?(\.gen_ai_token_type\.([^.]+))' }
  - { tag_name: gen_ai_request_model, regex: '^wasmcustom\.gen_ai_client_[a-z_]+\.gen_ai_operation_name\.[^.]+\.gen_ai_provider_name\.[^.]+(?:\.error_type\.[^.]+)?(?:\.gen_ai_token_type\.[^.]+)?(\.gen_ai_request_model\.(.+))$' }
";

/// Bucket bounds of the GenAI operation duration, in milliseconds: OpenTelemetry's advised
/// boundaries for `gen_ai.client.operation.duration` (0.01 s doubling to 81.92 s), then on to
/// about five minutes, as long generations and retried requests can take.
pub const DURATION_BUCKETS_MS: [u64; 16] = [
    10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 20480, 40960, 81920, 163840, 327680,
];

/// Bucket bounds of the time to first chunk, in milliseconds: OpenTelemetry's advised
/// boundaries for `gen_ai.client.operation.time_to_first_chunk` (1 ms to 10 s), then 30 s, one
/// and two minutes (a first token behind a busy provider's queue).
pub const FIRST_CHUNK_BUCKETS_MS: [u64; 19] = [
    1, 5, 10, 20, 40, 60, 80, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000, 30000, 60000,
    120000,
];

/// Bucket bounds of token usage: OpenTelemetry's advised boundaries for
/// `gen_ai.client.token.usage` (powers of 4 from 1 to 67,108,864).
pub const TOKEN_BUCKETS: [u64; 14] = [
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
];

/// Envoy's `histogram_bucket_settings` for the GenAI histograms (matched on the stat's full
/// name, before tag extraction); every other histogram keeps Envoy's default buckets.
fn histogram_buckets() -> String {
    let mut y = String::new();
    for (prefix, buckets) in [
        (
            "wasmcustom.gen_ai_client_operation_duration_milliseconds.",
            &DURATION_BUCKETS_MS[..],
        ),
        (
            "wasmcustom.gen_ai_client_operation_time_to_first_chunk_milliseconds.",
            &FIRST_CHUNK_BUCKETS_MS[..],
        ),
        ("wasmcustom.gen_ai_client_token_usage.", &TOKEN_BUCKETS[..]),
    ] {
        let list: Vec<String> = buckets.iter().map(u64::to_string).collect();
        let _ = writeln!(
            y,
            "  - {{ match: {{ prefix: {prefix} }}, buckets: [{}] }}",
            list.join(", ")
        );
    }
    y
}

/// Envoy's YAML.
pub fn render(r: &Render<'_>) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        r#"# Rendered by unbusy up. Envoy with the unbusy wasm filter in front of LLM providers.
admin:
  address: {{ socket_address: {{ address: {admin_host}, port_value: {admin_port} }} }}
stats_config:
  stats_tags:
  - {{ tag_name: outcome, regex: '^wasmcustom\.unbusy_requests_total(\.outcome\.([^.]+))$' }}
  - {{ tag_name: result, regex: '^wasmcustom\.unbusy_(?:attempts_total\.provider\.[^.]+|cache_total|l2_cache_total|store_poll_total|store_lease_total)(\.result\.([^.]+))$' }}
  - {{ tag_name: provider, regex: '^wasmcustom\.unbusy_[a-z_]+(\.provider\.([^.]+))' }}
  - {{ tag_name: reason, regex: '^wasmcustom\.unbusy_rejections_total(\.reason\.([^.]+))$' }}
{genai_tags}  histogram_bucket_settings:
{genai_buckets}static_resources:
  listeners:
  - name: unbusy
    address: {{ socket_address: {{ address: {listen_host}, port_value: {listen_port} }} }}
    per_connection_buffer_limit_bytes: 16777216
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: unbusy
          stream_idle_timeout: 600s
          route_config:
            name: providers
            virtual_hosts:
            - name: providers
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
"#,
        genai_tags = GENAI_STATS_TAGS,
        genai_buckets = histogram_buckets(),
        admin_host = yaml_str(r.admin.0),
        admin_port = r.admin.1,
        listen_host = yaml_str(r.listen.0),
        listen_port = r.listen.1,
    );
    let first = r
        .upstreams
        .first()
        .map(Upstream::cluster)
        .unwrap_or_default();
    let native_failover = r.filter.is_some() && r.upstreams.len() > 1;
    if r.filter.is_some() {
        y.push_str("                  cluster_header: x-unbusy-cluster\n");
        y.push_str("                  timeout: 0s\n");
        if native_failover {
            // Only the filter's upstream instance asks for a retry (status 591, which no
            // provider sends), when the engine's next provider is the aggregate's next one;
            // the engine has already done the pacing, so the router's own backoff is minimal.
            let _ = write!(
                y,
                r#"                  retry_policy:
                    retry_on: retriable-status-codes
                    retriable_status_codes: [{status}]
                    num_retries: {retries}
                    retry_back_off: {{ base_interval: 0.001s, max_interval: 0.002s }}
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig
                        update_frequency: 1
"#,
                status = unbusy_envoy::failover::NATIVE_RETRY_STATUS,
                retries = r.upstreams.len() - 1,
            );
        }
    } else {
        let _ = writeln!(y, "                  cluster: {first}");
        y.push_str("                  timeout: 0s\n");
        if let Some(u) = r.upstreams.first() {
            if u.tls {
                let _ = writeln!(
                    y,
                    "                  host_rewrite_literal: {}",
                    yaml_str(&u.host)
                );
            }
        }
        if r.native.is_some() {
            y.push_str(
                r#"                  retry_policy:
                    retry_on: "5xx,reset,connect-failure,retriable-status-codes"
                    retriable_status_codes: [429, 503]
                    num_retries: 2
                    retry_back_off: { base_interval: 0.025s, max_interval: 0.25s }
                    rate_limited_retry_back_off:
                      reset_headers: [{ name: retry-after, format: SECONDS }]
                      max_interval: 300s
"#,
            );
        }
    }
    y.push_str("          http_filters:\n");
    if let Some(rps) = r.native {
        let _ = write!(
            y,
            r#"          - name: envoy.filters.http.local_ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              stat_prefix: native_limit
              token_bucket: {{ max_tokens: {rps}, tokens_per_fill: {rps}, fill_interval: 1s }}
              filter_enabled: {{ default_value: {{ numerator: 100, denominator: HUNDRED }}, runtime_key: rl_enabled }}
              filter_enforced: {{ default_value: {{ numerator: 100, denominator: HUNDRED }}, runtime_key: rl_enforced }}
"#
        );
    }
    let wasm = yaml_str(&r.wasm.display().to_string());
    if let Some(config) = r.filter {
        let json = serde_json::to_string(config).unwrap_or_else(|_| "{}".into());
        let _ = write!(
            y,
            r#"          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: unbusy
                root_id: unbusy
                allow_on_headers_stop_iteration: true
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {json}
                vm_config:
                  vm_id: unbusy
                  runtime: envoy.wasm.runtime.v8
                  code: {{ local: {{ filename: {wasm} }} }}
                  environment_variables: {{ host_env_keys: {env} }}
"#,
            json = yaml_str(&json),
            env = host_env_keys(config),
        );
    }
    y.push_str(
        r#"          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
    );
    if native_failover {
        // The same module and vm_config as above, so Envoy runs both in one VM per worker.
        let _ = write!(
            y,
            r#"              upstream_http_filters:
              - name: envoy.filters.http.wasm
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
                  config:
                    name: unbusy_upstream
                    root_id: {root}
                    allow_on_headers_stop_iteration: true
                    vm_config:
                      vm_id: unbusy
                      runtime: envoy.wasm.runtime.v8
                      code: {{ local: {{ filename: {wasm} }} }}
                      environment_variables: {{ host_env_keys: {env} }}
              - name: envoy.filters.http.upstream_codec
                typed_config:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec
"#,
            root = unbusy_envoy::UPSTREAM_ROOT_ID,
            env = r.filter.map(host_env_keys).unwrap_or_default(),
        );
    }
    y.push_str("  clusters:\n");
    let breakers = "    circuit_breakers:
      # unbusy decides how many attempts and retries are in flight; Envoy's defaults
      # (1024 requests, 3 retries) must not cap it silently.
      thresholds: [{ max_connections: 100000, max_pending_requests: 100000, max_requests: 100000, max_retries: 100000 }]
";
    if native_failover {
        for (i, u) in r.upstreams.iter().enumerate() {
            let mut order = vec![u.cluster()];
            order.extend(
                r.upstreams
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, o)| o.cluster()),
            );
            let _ = write!(
                y,
                r#"  - name: {name}
    connect_timeout: 5s
    lb_policy: CLUSTER_PROVIDED
{breakers}    cluster_type:
      name: envoy.clusters.aggregate
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig
        clusters: [{order}]
"#,
                name = u.failover_cluster(),
                order = order.join(", "),
            );
        }
    }
    if let Some(store) = r.store {
        // Short connect timeout: a lookup that cannot connect is a miss within the filter's
        // `store.timeout_ms` anyway.
        let address = if store.host.parse::<std::net::IpAddr>().is_ok() {
            "STATIC"
        } else {
            "STRICT_DNS"
        };
        let _ = write!(
            y,
            r#"  - name: {STORE_CLUSTER}
    type: {address}
    connect_timeout: 0.25s
    dns_lookup_family: V4_PREFERRED
{breakers}    load_assignment:
      cluster_name: {STORE_CLUSTER}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {port} }} }} }}
"#,
            host = yaml_str(&store.host),
            port = store.port,
        );
    }
    for u in r.upstreams {
        let address = if u.host.parse::<std::net::IpAddr>().is_ok() {
            "STATIC"
        } else {
            "STRICT_DNS"
        };
        let _ = write!(
            y,
            r#"  - name: {cluster}
    type: {address}
    connect_timeout: 5s
    dns_lookup_family: V4_PREFERRED
    per_connection_buffer_limit_bytes: 16777216
{breakers}    load_assignment:
      cluster_name: {cluster}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {host}, port_value: {port} }} }} }}
          metadata: {{ filter_metadata: {{ unbusy: {{ provider: {name} }} }} }}
"#,
            cluster = u.cluster(),
            host = yaml_str(&u.host),
            port = u.port,
            name = yaml_str(&u.name),
        );
        if u.tls {
            let _ = write!(
                y,
                r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {host}
        common_tls_context:
          validation_context:
            trusted_ca: {{ filename: /etc/ssl/certs/ca-certificates.crt }}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{ exact: {host} }}
"#,
                host = yaml_str(&u.host)
            );
        }
        if let Some(check) = r.filter.and_then(health_check) {
            y.push_str(&health_checks(&check, u, r.filter));
        }
    }
    y
}

/// The filter's `health_check` section when it is on (and the configuration is valid: an
/// invalid one is refused by the filter anyway).
fn health_check(filter: &Value) -> Option<unbusy_core::config::HealthCheckConfig> {
    let bytes = serde_json::to_vec(filter).ok()?;
    let config = unbusy_core::config::Config::from_json(&bytes).ok()?;
    config.health_check.enabled.then_some(config.health_check)
}

/// Envoy's own active health checks on a provider's cluster, with the filter's path, interval,
/// timeout and thresholds, so Envoy's load balancing within the cluster (and the failover
/// aggregates') agrees with the filter's probes. `no_traffic_interval` is the interval too:
/// Envoy's default probes a cluster that has had no traffic once a minute, and an idle
/// provider is the one these checks are for. What counts as healthy is the filter's rule
/// (`unbusy_core::health::probe_says_up`): any status below 500. The key goes as the filter
/// sends it, read by Envoy from the variable the provider's `api_key_env` names
/// (`%ENVIRONMENT(...)%`), so the key is not in the configuration or `/config_dump` either.
fn health_checks(
    check: &unbusy_core::config::HealthCheckConfig,
    u: &Upstream,
    filter: Option<&Value>,
) -> String {
    let path = unbusy_core::health::probe_path(Some(&u.url), &check.path);
    let key_env = filter
        .and_then(|f| f.get("providers"))
        .and_then(Value::as_array)
        .and_then(|ps| ps.iter().find(|p| p["name"] == u.name.as_str()))
        .and_then(|p| p.get("api_key_env"))
        .and_then(Value::as_str);
    let mut y = String::new();
    let _ = write!(
        y,
        r#"    health_checks:
    - timeout: {timeout}s
      interval: {interval}s
      no_traffic_interval: {interval}s
      unhealthy_threshold: {unhealthy}
      healthy_threshold: {healthy}
      http_health_check:
        path: {path}
        host: {host}
        expected_statuses: [{{ start: 100, end: 500 }}]
"#,
        timeout = seconds(check.timeout_ms),
        interval = seconds(check.interval_ms),
        unhealthy = check.unhealthy_threshold,
        healthy = check.healthy_threshold,
        path = yaml_str(&path),
        host = yaml_str(&u.host),
    );
    if let Some(var) = key_env {
        let _ = write!(
            y,
            "        request_headers_to_add:\n        - header: {{ key: authorization, value: {value} }}\n",
            value = yaml_str(&format!("Bearer %ENVIRONMENT({var})%")),
        );
    }
    y
}

/// Whole milliseconds as Envoy's seconds (`1.5`).
fn seconds(ms: u64) -> String {
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_store_is_rendered_as_its_cluster_and_named_in_the_filter_configuration() {
        let upstreams = [Upstream::parse("a=http://127.0.0.1:1").unwrap()];
        let mut filter = filter_config(&Value::Null, &upstreams, &|_| false).unwrap();
        use_store(&mut filter);
        assert_eq!(filter["store"]["cluster"], STORE_CLUSTER);
        let text = serde_json::to_vec(&filter).unwrap();
        let config = unbusy_core::config::Config::from_json(&text).unwrap();
        assert_eq!(config.store.cache_cluster(), Some(STORE_CLUSTER));
        let store = store_upstream("http://127.0.0.2:7379").unwrap();
        let mut r = Render {
            listen: ("127.0.0.1", 0),
            admin: ("127.0.0.1", 0),
            upstreams: &upstreams,
            filter: Some(&filter),
            wasm: Path::new("f.wasm"),
            native: None,
            store: Some(&store),
        };
        let yaml = render(&r);
        assert!(yaml.contains("  - name: unbusy_store\n"), "{yaml}");
        assert!(yaml.contains("address: \"127.0.0.2\", port_value: 7379"));
        r.store = None;
        assert!(!render(&r).contains("- name: unbusy_store"));
        assert!(store_upstream("https://s:1").is_err());
        assert!(store_upstream("http://:1")
            .unwrap_err()
            .starts_with("--store"));
    }

    #[test]
    fn health_checks_are_rendered_on_each_provider_cluster_only_when_on() {
        let upstreams = [
            Upstream::parse("a=https://api.a.example").unwrap(),
            Upstream::parse("b=http://127.0.0.1:9/v1").unwrap(),
        ];
        let base = serde_json::json!({"health_check": {"enabled": true, "interval_ms": 1500,
            "timeout_ms": 250, "unhealthy_threshold": 3, "healthy_threshold": 1}});
        let filter = filter_config(&base, &upstreams, &|name| name == "UNBUSY_KEY_A").unwrap();
        let mut r = Render {
            listen: ("127.0.0.1", 0),
            admin: ("127.0.0.1", 0),
            upstreams: &upstreams,
            filter: Some(&filter),
            wasm: Path::new("f.wasm"),
            native: None,
            store: None,
        };
        let yaml = render(&r);
        assert_eq!(yaml.matches("    health_checks:\n").count(), 2, "{yaml}");
        for line in [
            "    - timeout: 0.250s\n      interval: 1.500s\n      no_traffic_interval: 1.500s\n",
            "      unhealthy_threshold: 3\n      healthy_threshold: 1\n",
            "        path: \"/models\"\n        host: \"api.a.example\"\n",
            "        path: \"/v1/models\"\n        host: \"127.0.0.1\"\n",
            "expected_statuses: [{ start: 100, end: 500 }]",
            "value: \"Bearer %ENVIRONMENT(UNBUSY_KEY_A)%\"",
        ] {
            assert!(yaml.contains(line), "{line:?} not in {yaml}");
        }
        assert_eq!(
            yaml.matches("request_headers_to_add:\n        - header")
                .count(),
            1
        );
        let off = filter_config(&Value::Null, &upstreams, &|_| true).unwrap();
        r.filter = Some(&off);
        assert!(!render(&r).contains("health_checks"));
        r.filter = None;
        assert!(!render(&r).contains("health_checks"));
    }
}
