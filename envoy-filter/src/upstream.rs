//! The filter as an upstream HTTP filter in the router (`upstream_http_filters`, root id
//! [`crate::UPSTREAM_ROOT_ID`], the same `vm_config`): it sees each of the router's attempts
//! at a managed request separately, and is what makes a failover one of the router's own
//! retries, so the next provider's answer streams to the caller.
//!
//! Per attempt: the request names its managed request in [`FLOW_HEADER`] (removed here); the
//! provider is read from the chosen host's metadata (`filter_metadata.unbusy.provider`, which
//! `unbusy-up` renders on every endpoint); the request is rewritten for that provider (host,
//! path prefix, credentials, model mapping). Its answer is judged here exactly as the
//! caller-side filter judges one (held until real progress, errors buffered and classified),
//! and the engine's verdict either lets it go on, or marks it [`NATIVE_RETRY_STATUS`] for the
//! router to retry on the next provider, or holds it while the caller-side filter answers
//! another way. Requests without the header pass untouched.
//!
//! [`NATIVE_RETRY_STATUS`]: crate::filter::NATIVE_RETRY_STATUS

use crate::filter::{FLOW_HEADER, MAX_REQUEST_BYTES};
use crate::host::{Buffer, Map};
use crate::registry::{self, Shared};
use crate::{host, response_body, response_headers};
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

/// The host metadata path that names the provider an attempt reaches.
const PROVIDER_METADATA: [&str; 5] = [
    "xds",
    "upstream_host_metadata",
    "filter_metadata",
    "unbusy",
    "provider",
];

/// One of the router's attempts.
pub struct Attempt {
    id: u32,
    /// The managed request's state and stream, when the attempt belongs to one.
    link: Option<(Shared, u32)>,
    /// The body to send instead of the caller's (a model mapping or a degraded cap).
    body: Option<Vec<u8>>,
}

impl Attempt {
    /// A new attempt context.
    pub fn new(id: u32) -> Self {
        Self {
            id,
            link: None,
            body: None,
        }
    }
}

/// `"<registry index>:<stream>"`.
fn parse_flow(value: &str) -> Option<(usize, u32)> {
    let (index, ctx) = value.split_once(':')?;
    Some((index.parse().ok()?, ctx.parse().ok()?))
}

impl Context for Attempt {
    fn on_done(&mut self) -> bool {
        if let Some((state, ctx)) = &self.link {
            if let Ok(mut s) = state.try_borrow_mut() {
                s.upstream_done(*ctx, self.id);
            }
        }
        true
    }
}

impl HttpContext for Attempt {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let Some(flow) = host::header(Map::RequestHeaders, FLOW_HEADER) else {
            return Action::Continue;
        };
        host::set_header(Map::RequestHeaders, FLOW_HEADER, None);
        let Some((state, ctx)) =
            parse_flow(&flow).and_then(|(index, ctx)| Some((registry::lookup(index)?, ctx)))
        else {
            return Action::Continue;
        };
        let picked = host::property(&PROVIDER_METADATA)
            .and_then(|v| String::from_utf8(v).ok())
            .filter(|v| !v.is_empty());
        let plan = state
            .try_borrow_mut()
            .ok()
            .and_then(|mut s| s.upstream_request(ctx, self.id, picked.as_deref()));
        let Some(plan) = plan else {
            return Action::Continue;
        };
        for (name, value) in &plan.headers {
            host::set_header(Map::RequestHeaders, name, value.as_deref());
        }
        self.body = plan.body;
        self.link = Some((state, ctx));
        Action::Continue
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.body.is_none() {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause; // the router buffers the request; replace it whole
        }
        if let Some(body) = self.body.take() {
            let held = host::buffer(Buffer::RequestBody, size.min(MAX_REQUEST_BYTES))
                .map_or(0, |b| b.len());
            host::set_buffer(Buffer::RequestBody, held.max(size), &body);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        match &self.link {
            Some((state, ctx)) => response_headers(state, *ctx, self.id, end_of_stream),
            None => Action::Continue,
        }
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        match &self.link {
            Some((state, ctx)) => response_body(state, *ctx, self.id, size, end_of_stream),
            None => Action::Continue,
        }
    }
}
