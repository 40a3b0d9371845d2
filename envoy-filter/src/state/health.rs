//! Active health checks from the root context's tick (`health_check` in the configuration,
//! the rules in [`unbusy_core::health`]).
//!
//! Why here and not Envoy's own health checks: a proxy-wasm filter cannot read a cluster's host
//! health (no ABI call exposes it), so the filter probes for itself. Each provider's schedule and
//! verdict live in shared data ([`unbusy_core::health::ProbeState`] in its byte form, one key per
//! provider): on a tick, a worker that finds a probe due claims it with compare-and-swap, so one
//! worker of the process probes each provider per interval, and writes the probe's result back
//! the same way. Every worker reads the verdicts at every tick and admission and hands them to
//! its engine ([`unbusy_core::engine::Engine::set_provider_health`]), so a provider one worker
//! found down is skipped by every worker's next request.
//!
//! A probe is a `GET` of `health_check.path` under the provider's base URL, with the provider's
//! key as its attempts carry it, dispatched from the root context (no stream's end cancels it).
//! No answer within `health_check.timeout_ms` (Envoy calls back with no headers), a connection
//! Envoy could not make (its own 503), a refused dispatch or any 5xx says down. A verdict that
//! changes is logged once, with the provider's name and the probe's status, never its key, and
//! shown by the gauge `unbusy_provider_down{provider}` (1 while marked down; every worker sets
//! it as it takes the verdict).

use super::State;
use crate::host::{CallToken, Host, MetricId, MetricKind};
use crate::routing::Call;
use crate::shared;
use std::time::Duration;
use unbusy_core::health::{probe_path, HealthSettings, ProbeResult, ProbeState};
use unbusy_core::ids::ProviderId;
use unbusy_core::time::{Instant, Nanos};

/// Compare-and-swap rounds for a probe's result (past them the result is dropped; the next
/// probe counts again).
const CAS_ROUNDS: usize = 16;

/// The shared-data key of provider `i`'s probe schedule and verdict.
pub fn health_key(i: usize) -> String {
    format!("unbusy:health:{i}")
}

/// Provider `i`'s probe state as shared (a fresh state when absent or malformed), with its
/// compare-and-swap token.
fn read(host: &impl Host, i: usize) -> (ProbeState, Option<crate::host::Cas>) {
    let (value, cas) = host.shared_get(&health_key(i));
    let state = value
        .as_deref()
        .and_then(ProbeState::from_bytes)
        .unwrap_or_default();
    (state, cas)
}

/// Each provider's `unbusy_provider_down` gauge (1 while its health checks mark it down, else
/// 0), defined only when health checks are on.
pub fn define_gauges(
    host: &impl Host,
    config: &unbusy_core::config::Config,
) -> Vec<Option<MetricId>> {
    if !config.health_check.enabled {
        return Vec::new();
    }
    config
        .providers
        .iter()
        .map(|p| {
            let name = format!("unbusy_provider_down.provider.{}", p.name);
            let id = host.define_metric(MetricKind::Gauge, &name);
            if let Some(id) = id {
                host.record_metric(id, 0);
            }
            id
        })
        .collect()
}

impl<H: Host> State<H> {
    /// Creates the shared keys of the probes (when health checks are on).
    pub(super) fn ensure_health_keys(host: &H, config: &unbusy_core::config::Config) {
        if config.health_check.enabled {
            for i in 0..config.providers.len() {
                shared::ensure(host, &health_key(i), &ProbeState::default().to_bytes());
            }
        }
    }

    fn health_settings(&self) -> HealthSettings {
        HealthSettings::of(&self.config.health_check)
    }

    /// The probes this worker is to send now: each due one it claimed in shared data, as the
    /// provider's index and the call. Nothing when health checks are off.
    pub fn probes_due(&mut self, now: Nanos) -> Vec<(usize, Call)> {
        let check = &self.config.health_check;
        if !check.enabled {
            return Vec::new();
        }
        let settings = self.health_settings();
        let mut due = Vec::new();
        for (i, p) in self.config.providers.iter().enumerate() {
            let (mut state, cas) = read(&self.host, i);
            if !state.due(now) {
                continue;
            }
            state.claim(now, &settings);
            if !self.host.shared_set(&health_key(i), &state.to_bytes(), cas) {
                continue; // another worker claimed it
            }
            let Some(cluster) = p.cluster.clone() else {
                continue;
            };
            let mut headers = vec![
                (":method".to_string(), "GET".to_string()),
                (
                    ":path".to_string(),
                    probe_path(p.base_url.as_deref(), &check.path),
                ),
                (
                    ":authority".to_string(),
                    self.authorities.get(i).unwrap_or_else(|| cluster.clone()),
                ),
            ];
            if let Some(key) = &p.api_key {
                headers.push(("authorization".to_string(), format!("Bearer {key}")));
            }
            due.push((
                i,
                Call {
                    cluster,
                    headers,
                    body: Vec::new(),
                    timeout: Duration::from_millis(check.timeout_ms.max(1)),
                },
            ));
        }
        due
    }

    /// A probe of provider `provider` was dispatched: its answer comes back with `token`.
    pub fn probe_dispatched(&mut self, token: CallToken, provider: usize) {
        self.probes.push((token, provider));
    }

    /// Whether a call's answer is a probe's.
    pub(super) fn probe_owns(&self, token: CallToken) -> bool {
        self.probes.iter().any(|(t, _)| *t == token)
    }

    /// A probe's answer (its `:status`, `None` when Envoy called back without headers).
    pub(super) fn probe_answer(&mut self, token: CallToken, now: Nanos, status: Option<u16>) {
        if let Some(i) = self.probes.iter().position(|(t, _)| *t == token) {
            let (_, provider) = self.probes.swap_remove(i);
            let result = status.map_or(ProbeResult::NoAnswer, ProbeResult::Status);
            self.probe_result(provider, now, result);
        }
    }

    /// Counts a probe's result into the shared verdict, and hands the verdict to the engine.
    pub fn probe_result(&mut self, provider: usize, now: Nanos, result: ProbeResult) {
        let settings = self.health_settings();
        for _ in 0..CAS_ROUNDS {
            let (mut state, cas) = read(&self.host, provider);
            let changed = state.record(&settings, result);
            if !self
                .host
                .shared_set(&health_key(provider), &state.to_bytes(), cas)
            {
                continue;
            }
            if let Some(up) = changed {
                let name = self
                    .config
                    .providers
                    .get(provider)
                    .map_or("", |p| p.name.as_str());
                let what = match result {
                    // As a u32: u16's own Display would be linked for this line alone.
                    ProbeResult::Status(s) => format!("status {}", u32::from(s)),
                    ProbeResult::NoAnswer => "no answer".to_string(),
                };
                let verdict = if up { "up" } else { "down" };
                self.host.info(&format!(
                    "unbusy: health checks mark provider {} {verdict} (last probe: {what})",
                    unbusy_core::json::quoted(name)
                ));
            }
            break;
        }
        self.sync_health(now);
    }

    /// Every provider's shared verdict into this worker's engine.
    pub(super) fn sync_health(&mut self, now: Nanos) {
        if !self.config.health_check.enabled {
            return;
        }
        for i in 0..self.config.providers.len() {
            let down = read(&self.host, i).0.down;
            if down != self.engine.provider_down(ProviderId::new(i)) {
                self.engine.set_provider_health(
                    Instant::from_nanos(now),
                    ProviderId::new(i),
                    !down,
                );
                if let Some(Some(id)) = self.down_gauges.get(i) {
                    self.host.record_metric(*id, u64::from(down));
                }
            }
        }
    }
}
