//! The filter as an upstream HTTP filter in the router (`upstream_http_filters`, root id
//! [`crate::contexts::UPSTREAM_ROOT_ID`], the same `vm_config`): it sees each of the router's
//! attempts at a managed request separately, and is what makes a failover one of the router's
//! own retries, so the next provider's answer streams to the caller.
//!
//! Per attempt: the request names its managed request in [`crate::routing::FLOW_HEADER`]
//! (removed here); the provider is read from the chosen host's metadata
//! (`filter_metadata.unbusy.provider`, which `unbusy up` renders on every endpoint); the
//! request is rewritten for that provider (host, path prefix, credentials, model mapping). Its
//! answer is judged here exactly as the caller-side filter judges one (held until real
//! progress, errors buffered and classified), and the engine's verdict either lets it go on, or
//! marks it [`crate::failover::NATIVE_RETRY_STATUS`] for the router to retry on the next
//! provider, or holds it while the caller-side filter answers another way. Requests without the
//! header pass untouched. The logic is [`crate::driver::Attempt`]'s; this is its proxy-wasm face.

use crate::driver::{self, PROVIDER_METADATA};
use crate::proxy::ProxyWasm;
use crate::registry;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

/// One of the router's attempts.
pub struct Attempt(driver::Attempt<ProxyWasm>);

impl Attempt {
    /// A new attempt context.
    pub fn new(id: u32) -> Self {
        Self(driver::Attempt::new(id))
    }
}

impl Context for Attempt {
    crate::contexts::unused_context_calls!();

    fn on_done(&mut self) -> bool {
        self.0.done();
        true
    }
}

impl HttpContext for Attempt {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        self.0.request_headers(&ProxyWasm, registry::lookup, || {
            ProxyWasm
                .property(&PROVIDER_METADATA)
                .and_then(|v| String::from_utf8(v).ok())
                .filter(|v| !v.is_empty())
        })
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.0.request_body(&ProxyWasm, size, end_of_stream)
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        self.0.response_headers(&ProxyWasm, end_of_stream)
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        self.0.response_body(&ProxyWasm, size, end_of_stream)
    }
}
