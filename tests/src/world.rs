//! The end-to-end tests' worlds, written once: emulated providers (`busy-provider` in process)
//! behind real Envoy with the filter, and the short test deadlines they share.

use crate::emulator::{start, Behaviour, Emulator};
use crate::envoy::{filter_config, filter_wasm, render, Render, Upstream};
use crate::harness::Envoy;
use crate::scenario::{Latency, Provider};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// A healthy emulated provider `name` answering with these first-token and total latencies
/// (p50 and p99, ms), sending keep-alive bytes every 100 ms while it thinks.
pub fn healthy(name: &str, first_token: [f64; 2], total: [f64; 2]) -> Behaviour {
    Behaviour {
        provider: Provider {
            name: name.into(),
            latency_ms: Latency { first_token, total },
            ..Provider::default()
        },
        keepalive_every: Duration::from_millis(100),
        ..Behaviour::default()
    }
}

/// `extra`'s top-level fields over `base`'s (both JSON objects).
pub fn merged(mut base: Value, extra: &Value) -> Value {
    if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    base
}

/// The filter's configuration for tests: short deadlines (a missed first token costs 1.5 s,
/// not 15), with `extra` over them.
pub fn test_config(extra: &Value) -> Value {
    merged(
        json!({
            "deadlines": {"first_token_ms": 1500, "response_ms": 3000, "total_ms": 20000, "stall_ms": 5000},
        }),
        extra,
    )
}

/// Emulated providers behind Envoy with the filter.
pub struct World {
    /// Envoy, with the filter in front of the providers.
    pub envoy: Envoy,
    /// The providers, in order of preference.
    pub providers: Vec<Arc<Emulator>>,
    /// Where each provider listens.
    pub addrs: Vec<SocketAddr>,
}

impl World {
    /// Starts one emulator per behaviour (in order of preference) and Envoy with `concurrency`
    /// workers and the filter configured by `config`.
    pub async fn start(
        behaviours: Vec<Behaviour>,
        config: &Value,
        concurrency: u32,
    ) -> Result<World, String> {
        Self::start_edited(behaviours, config, concurrency, |_| {}, |y| y).await
    }

    /// [`World::start`], with the filter's configuration changed by `edit` and the rendered
    /// Envoy YAML by `edit_yaml` before Envoy starts.
    pub async fn start_edited(
        behaviours: Vec<Behaviour>,
        config: &Value,
        concurrency: u32,
        edit: impl FnOnce(&mut Value),
        edit_yaml: impl FnOnce(String) -> String,
    ) -> Result<World, String> {
        let mut upstreams = Vec::new();
        let mut providers = Vec::new();
        let mut addrs = Vec::new();
        for b in behaviours {
            let name = b.provider.name.clone();
            let (emu, addr) = start(b, 7, "127.0.0.1:0")
                .await
                .map_err(|e| format!("emulator {name}: {e}"))?;
            let upstream = Upstream::parse(&format!("{name}=http://{addr}"))?;
            upstreams.push(upstream);
            providers.push(emu);
            addrs.push(addr);
        }
        let mut filter = filter_config(config, &upstreams, &|_| false)?;
        edit(&mut filter);
        let wasm = filter_wasm();
        if !wasm.exists() {
            return Err(format!("{} missing: run `make filter`", wasm.display()));
        }
        // Port 0 for both: Envoy binds free ports itself and the harness reads them back.
        let yaml = edit_yaml(render(&Render {
            listen: ("127.0.0.1", 0),
            admin: ("127.0.0.1", 0),
            upstreams: &upstreams,
            filter: Some(&filter),
            wasm: &wasm,
            native: None,
            store: None,
        }));
        let envoy = Envoy::start_yaml(&yaml, concurrency).map_err(|e| format!("Envoy: {e}"))?;
        Ok(World {
            envoy,
            providers,
            addrs,
        })
    }
}
