//! The proxy-wasm face of the caller-side filter: the root context (configuration, the tick,
//! dispatched answers) and each stream's context, forwarding Envoy's callbacks to
//! [`crate::driver`] on the [`ProxyWasm`] host. Nothing here decides anything; it is the only
//! place that names the real host.

use crate::configure::resolve_keys;
use crate::driver::{self, Shared};
use crate::host::{Buffer, Host};
use crate::proxy::{self, ProxyWasm};
use crate::registry;
use crate::state::State;
use crate::upstream;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use unbusy_core::config::Config;

/// Overrides of `proxy_wasm::traits::Context`'s default methods the filter never calls (gRPC,
/// shared queues, foreign functions, and the property and shared-data calls it makes through
/// [`crate::abi`] instead) with stubs that fail: every default method sits in each
/// context's vtable, so each default's hostcall wrapper was linked into the `.wasm` (about 1.5
/// KB after `wasm-opt`) though nothing calls it.
macro_rules! unused_context_calls {
    () => {
        fn get_property(&self, _: Vec<&str>) -> Option<proxy_wasm::types::Bytes> {
            None
        }
        fn set_property(&self, _: Vec<&str>, _: Option<&[u8]>) {}
        fn get_shared_data(&self, _: &str) -> (Option<proxy_wasm::types::Bytes>, Option<u32>) {
            (None, None)
        }
        fn set_shared_data(
            &self,
            _: &str,
            _: Option<&[u8]>,
            _: Option<u32>,
        ) -> Result<(), proxy_wasm::types::Status> {
            Err(proxy_wasm::types::Status::InternalFailure)
        }
        fn remove_shared_data(
            &self,
            _: &str,
            _: Option<u32>,
        ) -> Result<(), proxy_wasm::types::Status> {
            Err(proxy_wasm::types::Status::InternalFailure)
        }
        fn register_shared_queue(&self, _: &str) -> u32 {
            0
        }
        fn resolve_shared_queue(&self, _: &str, _: &str) -> Option<u32> {
            None
        }
        fn dequeue_shared_queue(
            &self,
            _: u32,
        ) -> Result<Option<proxy_wasm::types::Bytes>, proxy_wasm::types::Status> {
            Err(proxy_wasm::types::Status::InternalFailure)
        }
        fn enqueue_shared_queue(
            &self,
            _: u32,
            _: Option<&[u8]>,
        ) -> Result<(), proxy_wasm::types::Status> {
            Err(proxy_wasm::types::Status::InternalFailure)
        }
        fn dispatch_grpc_call(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: Vec<(&str, &[u8])>,
            _: Option<&[u8]>,
            _: std::time::Duration,
        ) -> Result<u32, proxy_wasm::types::Status> {
            Err(proxy_wasm::types::Status::InternalFailure)
        }
        fn get_grpc_call_response_body(
            &self,
            _: usize,
            _: usize,
        ) -> Option<proxy_wasm::types::Bytes> {
            None
        }
        fn cancel_grpc_call(&self, _: u32) {}
        fn open_grpc_stream(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: Vec<(&str, &[u8])>,
        ) -> Result<u32, proxy_wasm::types::Status> {
            Err(proxy_wasm::types::Status::InternalFailure)
        }
        fn get_grpc_stream_initial_metadata(&self) -> Vec<(String, proxy_wasm::types::Bytes)> {
            Vec::new()
        }
        fn get_grpc_stream_initial_metadata_value(
            &self,
            _: &str,
        ) -> Option<proxy_wasm::types::Bytes> {
            None
        }
        fn send_grpc_stream_message(&self, _: u32, _: Option<&[u8]>, _: bool) {}
        fn get_grpc_stream_message(
            &mut self,
            _: usize,
            _: usize,
        ) -> Option<proxy_wasm::types::Bytes> {
            None
        }
        fn get_grpc_stream_trailing_metadata(&self) -> Vec<(String, proxy_wasm::types::Bytes)> {
            Vec::new()
        }
        fn get_grpc_stream_trailing_metadata_value(
            &self,
            _: &str,
        ) -> Option<proxy_wasm::types::Bytes> {
            None
        }
        fn cancel_grpc_stream(&self, _: u32) {}
        fn close_grpc_stream(&self, _: u32) {}
        fn get_grpc_status(&self) -> (u32, Option<String>) {
            (0, None)
        }
        fn call_foreign_function(
            &self,
            _: &str,
            _: Option<&[u8]>,
        ) -> Result<Option<proxy_wasm::types::Bytes>, proxy_wasm::types::Status> {
            Err(proxy_wasm::types::Status::InternalFailure)
        }
    };
}
pub(crate) use unused_context_calls;

/// How often the engine's timers are checked (first-token deadlines, backoff waits).
const TICK: Duration = Duration::from_millis(20);

/// The root id that makes an instance of this module the upstream filter in the router.
pub const UPSTREAM_ROOT_ID: &str = "unbusy_upstream";

/// A plugin configuration's root context.
pub struct Root {
    state: Option<Shared<ProxyWasm>>,
    /// This root is the upstream instance.
    upstream: bool,
}

impl Root {
    /// A root not configured yet.
    pub fn new() -> Self {
        Self {
            state: None,
            upstream: false,
        }
    }
}

impl Default for Root {
    fn default() -> Self {
        Self::new()
    }
}

impl Context for Root {
    unused_context_calls!();

    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        if let Some(state) = &self.state {
            driver::call_response(&ProxyWasm, state, token, body_size);
        }
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let host = ProxyWasm;
        if host.property(&["plugin_root_id"]).as_deref() == Some(UPSTREAM_ROOT_ID.as_bytes()) {
            self.upstream = true;
            proxy::set_upstream_present();
            host.info("unbusy: upstream instance configured (native failover)");
            return true;
        }
        let bytes = host
            .buffer(Buffer::PluginConfiguration, size.max(1))
            .unwrap_or_default();
        let mut config = match Config::from_json(&bytes) {
            Ok(c) => c,
            Err(e) => {
                host.error(&format!("unbusy: invalid plugin configuration: {e}"));
                return false;
            }
        };
        // Keys named by `api_key_env`, from the variables Envoy passes to the VM
        // (`vm_config.environment_variables`), read through WASI's `environ_get`.
        if let Err(e) = resolve_keys(&mut config, crate::environ::var) {
            host.error(&format!("unbusy: invalid plugin configuration: {e}"));
            return false;
        }
        let seed = host.now() ^ 0x756e_6275_7379;
        match State::new(host, config, seed) {
            Ok(state) => {
                let shared = Rc::new(RefCell::new(state));
                let index = registry::register(&shared);
                if let Ok(mut s) = shared.try_borrow_mut() {
                    s.registry_index = Some(index);
                }
                self.state = Some(shared);
                let _ = host.set_tick_period(TICK);
                host.info("unbusy: configured");
                true
            }
            Err(e) => {
                host.error(&format!("unbusy: invalid plugin configuration: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        if let Some(state) = &self.state {
            driver::tick(&ProxyWasm, state);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.upstream {
            return Some(Box::new(upstream::Attempt::new(context_id)));
        }
        let state = self.state.clone()?;
        Some(Box::new(Stream {
            id: context_id,
            state,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// A caller's stream.
struct Stream {
    id: u32,
    state: Shared<ProxyWasm>,
}

impl Context for Stream {
    unused_context_calls!();

    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        driver::call_response(&ProxyWasm, &self.state, token, body_size);
    }

    fn on_done(&mut self) -> bool {
        driver::stream_done(&ProxyWasm, &self.state, self.id);
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        driver::request_headers(&ProxyWasm, &self.state, self.id, end_of_stream)
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        driver::request_body(&ProxyWasm, &self.state, self.id, size, end_of_stream)
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        driver::response_headers(&ProxyWasm, &self.state, self.id, self.id, end_of_stream)
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        driver::response_body(
            &ProxyWasm,
            &self.state,
            self.id,
            self.id,
            size,
            end_of_stream,
        )
    }
}
