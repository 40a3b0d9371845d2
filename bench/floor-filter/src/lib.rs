//! The floor of `bench-envoy`: a trivial proxy-wasm HTTP filter that does what any filter
//! judging LLM requests and answers must do at least, and nothing more. It holds the request
//! until its whole body arrived and reads it once, holds the response until its whole body
//! arrived and reads it once, and sets one response header. unbusy's filter does this and
//! decides; the difference between the two in one run is what unbusy's own work costs.
//!
//! Built to `wasm32-wasip1` by the Makefile's `bench-envoy` target (profile `wasm-filter`).

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root) });
}}

struct Root;

impl Context for Root {}

impl RootContext for Root {
    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { read: 0 }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Stream {
    /// Bytes read from both bodies (kept so the reads are not optimised away).
    read: usize,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause; // buffered until the whole body arrived
        }
        self.read += self.get_http_request_body(0, size).map_or(0, |b| b.len());
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        self.set_http_response_header("x-floor", Some("1"));
        if end_of_stream {
            Action::Continue
        } else {
            Action::Pause // held with the body, as unbusy holds an answer until it is judged
        }
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if !end_of_stream {
            return Action::Pause;
        }
        self.read += self.get_http_response_body(0, size).map_or(0, |b| b.len());
        Action::Continue
    }
}
