//! # unbusy-envoy
//!
//! The Envoy / Istio host of the unbusy engine: a proxy-wasm HTTP filter (`wasm32-wasip1`
//! cdylib) that translates Envoy's callbacks into engine calls and the engine's decisions into
//! host calls. It holds no policy of its own; every decision comes from [`unbusy_core`].
//!
//! The plugin configuration is the engine's JSON schema (`docs/config.md`); every provider
//! needs a `cluster`. A provider's `api_key_env` is read at configure time from the variables
//! Envoy passes to the VM (`vm_config.environment_variables`, through WASI's `environ_get`), so
//! the key need not be in the configuration (which Envoy's `/config_dump` shows). An invalid
//! configuration, or a key variable that is missing or empty, makes `on_configure` fail with one
//! log line naming the field (or the provider and the variable, never a value), and Envoy
//! refuses the filter.
//!
//! Which requests are managed, forwarded with a provider's key, forwarded with the caller's
//! own key, or refused with 403 is `unbusy_core::request::handling`'s decision. The upstream
//! instance is the same module with the root id [`contexts::UPSTREAM_ROOT_ID`]; its
//! configuration is ignored.
//!
//! Modules, each using only those listed before it (no cycles):
//! - [`abi`]: the raw proxy-wasm ABI, never panicking;
//! - [`host`]: the [`host::Host`] trait, everything the filter needs from its host;
//! - [`proxy`]: that trait on Envoy, over [`abi`]; [`fake`] (native builds only): an in-memory
//!   process of workers for tests;
//! - [`shared`]: shared-data protocols across workers (buckets, slots, instants, the L1 cache);
//! - [`store`]: the protocol of `unbusy-store` (the fleet's state in Redis); its L2 cache is wired in `state`;
//! - [`quota`]: global limits across the fleet, leased from the store and kept in shared data;
//! - [`metrics`]: engine events as Envoy metrics; [`genai`]: the OpenTelemetry GenAI histograms;
//! - [`effect`]: what the state tells the driver to do;
//! - [`routing`]: a request rewritten for a provider, per way an attempt leaves Envoy;
//! - [`judging`]: reading an attempt's answer and the core's verdict on it;
//! - [`admission`]: rate limits shared across workers (check, charge, refund);
//! - [`failover`]: the native failover path's order and link to the router's attempts;
//! - [`configure`]: the plugin configuration and keys from the environment; [`environ`]: a
//!   variable of the VM's environment, through WASI;
//! - [`flow`]: one managed request and its phase;
//! - [`state`]: the per-VM state machine, one submodule per phase;
//! - [`driver`]: callbacks to state calls, effects to hostcalls, generic over the host;
//! - [`registry`], [`upstream`], [`contexts`]: the proxy-wasm contexts on the real host.

pub mod abi;
pub mod admission;
pub mod configure;
pub mod contexts;
pub mod driver;
pub mod effect;
pub mod environ;
pub mod failover;
#[cfg(not(target_arch = "wasm32"))]
pub mod fake;
pub mod flow;
pub mod genai;
pub mod heap;
pub mod host;
pub mod judging;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod registry;
pub mod routing;
pub mod shared;
pub mod state;
pub mod store;
pub mod upstream;

pub use contexts::UPSTREAM_ROOT_ID;

proxy_wasm::main! {{
    // (No `proxy_wasm::set_log_level`: the filter logs through `abi::log`, not the `log` crate,
    // and the SDK's logger would only add code.)
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(contexts::Root::new())
    });
}}
