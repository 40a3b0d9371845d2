//! # unbusy-envoy
//!
//! The Envoy / Istio host of the unbusy engine: a proxy-wasm HTTP filter (`wasm32-wasip1`
//! cdylib) that translates Envoy's callbacks into engine calls and the engine's decisions into
//! host calls. It holds no policy of its own; every decision comes from [`unbusy_core`].
//!
//! - [`filter`]: the per-VM state and the request flow (see its module doc);
//! - [`shared`]: rate limits and the L1 response cache in shared data, across workers;
//! - [`metrics`]: engine events as Envoy metrics;
//! - [`host`]: hostcalls that report failure instead of panicking.
//!
//! The plugin configuration is the engine's JSON schema (`docs/config.md`); every provider
//! needs a `cluster`. An invalid one makes `on_configure` fail with one log line naming the
//! field, and Envoy refuses the filter.

pub mod filter;
pub mod host;
pub mod metrics;
pub mod shared;

use filter::{Effect, State, MAX_REQUEST_BYTES};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use unbusy_core::config::Config;

/// How often the engine's timers are checked (first-token deadlines, backoff waits).
const TICK: Duration = Duration::from_millis(20);

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { state: None }) });
}}

type Shared = Rc<RefCell<State>>;

struct Root {
    state: Option<Shared>,
}

/// Carries out effects, outside the state's borrow. `inline` is the stream whose callback is
/// running: effects on it are applied without switching context, and a resume of it is
/// returned as `true` (the callback then answers `Continue`) instead of a resume hostcall.
fn run(state: &Shared, effects: Vec<Effect>, inline: Option<u32>) -> bool {
    let mut continue_inline = false;
    let mut pending = effects;
    while !pending.is_empty() {
        let mut next = Vec::new();
        for effect in pending {
            let ctx = match &effect {
                Effect::ResumeRequest { ctx, .. }
                | Effect::SetResponseHeader { ctx, .. }
                | Effect::ResumeResponse { ctx, .. }
                | Effect::Reply { ctx, .. }
                | Effect::Dispatch { ctx, .. } => *ctx,
            };
            let here = inline == Some(ctx);
            if !here && !host::enter(ctx) {
                continue; // the stream is gone
            }
            match effect {
                Effect::ResumeRequest { headers, body, .. } => {
                    for (name, value) in &headers {
                        host::set_header(MapType::HttpRequestHeaders, name, value.as_deref());
                    }
                    if let Some(b) = body {
                        let size = host::buffer(BufferType::HttpRequestBody, MAX_REQUEST_BYTES)
                            .map_or(0, |b| b.len());
                        host::set_buffer(BufferType::HttpRequestBody, size, &b);
                    }
                    if here {
                        continue_inline = true;
                    } else {
                        host::resume_request();
                    }
                }
                Effect::SetResponseHeader { name, value, .. } => {
                    host::set_header(MapType::HttpResponseHeaders, &name, Some(&value));
                }
                Effect::ResumeResponse { headers, .. } => {
                    for (name, value) in &headers {
                        host::set_header(MapType::HttpResponseHeaders, name, Some(value));
                    }
                    if here {
                        continue_inline = true;
                    } else {
                        host::resume_response();
                    }
                }
                Effect::Reply {
                    status,
                    headers,
                    body,
                    ..
                } => {
                    let h = host::pairs(&headers);
                    host::send_response(status, &h, &body);
                }
                Effect::Dispatch {
                    ctx,
                    request,
                    attempt,
                    cluster,
                    headers,
                    body,
                    timeout,
                } => {
                    let h = host::pairs(&headers);
                    let more = match host::dispatch(&cluster, &h, &body, timeout) {
                        Ok(token) => {
                            if let Ok(mut s) = state.try_borrow_mut() {
                                s.dispatched(token, ctx, request, attempt);
                            }
                            Vec::new()
                        }
                        Err(status) => {
                            host::warn(&format!(
                                "unbusy: could not dispatch to cluster {cluster:?}: {status:?}"
                            ));
                            state
                                .try_borrow_mut()
                                .map(|mut s| s.dispatch_failed(host::now(), request, attempt))
                                .unwrap_or_default()
                        }
                    };
                    next.extend(more);
                }
            }
        }
        pending = next;
    }
    continue_inline
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let Some(state) = &self.state else {
            return;
        };
        let headers = host::headers(MapType::HttpCallResponseHeaders);
        let body = host::buffer(BufferType::HttpCallResponseBody, body_size).unwrap_or_default();
        let effects = state
            .try_borrow_mut()
            .map(|mut s| s.call_response(token, host::now(), headers, body))
            .unwrap_or_default();
        run(state, effects, None);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes = host::buffer(BufferType::PluginConfiguration, size.max(1)).unwrap_or_default();
        let config = match Config::from_json(&bytes) {
            Ok(c) => c,
            Err(e) => {
                host::error(&format!("unbusy: invalid plugin configuration: {e}"));
                return false;
            }
        };
        let seed = host::now() ^ 0x756e_6275_7379;
        match State::new(config, seed) {
            Ok(state) => {
                self.state = Some(Rc::new(RefCell::new(state)));
                let _ = proxy_wasm::hostcalls::set_tick_period(TICK);
                host::info("unbusy: configured");
                true
            }
            Err(e) => {
                host::error(&format!("unbusy: invalid plugin configuration: {e}"));
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(state) = &self.state else {
            return;
        };
        let effects = state
            .try_borrow_mut()
            .map(|mut s| s.tick(host::now()))
            .unwrap_or_default();
        run(state, effects, None);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
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

struct Stream {
    id: u32,
    state: Shared,
}

impl Stream {
    /// Runs a response callback's effects and answers Envoy: keep holding the response unless
    /// the state let it go or an effect released it.
    fn hold_or_release(&self, (hold, effects): (bool, Vec<Effect>)) -> Action {
        let released = run(&self.state, effects, Some(self.id));
        if hold && !released {
            Action::Pause
        } else {
            Action::Continue
        }
    }

    fn with<T: Default>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        self.state
            .try_borrow_mut()
            .map(|mut s| f(&mut s))
            .unwrap_or_default()
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let headers = host::headers(MapType::HttpCallResponseHeaders);
        let body = host::buffer(BufferType::HttpCallResponseBody, body_size).unwrap_or_default();
        let effects = self.with(|s| s.call_response(token, host::now(), headers, body));
        run(&self.state, effects, None);
    }

    fn on_done(&mut self) -> bool {
        let id = self.id;
        let effects = self.with(|s| s.end(id, host::now()));
        run(&self.state, effects, None);
        true
    }
}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let method = host::header(MapType::HttpRequestHeaders, ":method").unwrap_or_default();
        let path = host::header(MapType::HttpRequestHeaders, ":path").unwrap_or_default();
        let route = path.split('?').next().unwrap_or("");
        let managed = method == "POST" && (route.ends_with("/chat/completions"));
        if !managed {
            for (name, value) in self.with(|s| s.passthrough_headers(&path)) {
                host::set_header(MapType::HttpRequestHeaders, &name, value.as_deref());
            }
            return Action::Continue;
        }
        if end_of_stream {
            let reply = unbusy_core::reply::local_reply(
                unbusy_core::reply::ReplyKind::BadRequest,
                "a chat/completions request needs a JSON body",
                None,
            );
            let h: Vec<(&str, &str)> = reply
                .headers
                .iter()
                .map(|(n, v)| (*n, v.as_str()))
                .collect();
            host::send_response(reply.status, &h, reply.body.as_bytes());
            return Action::Pause;
        }
        let headers = host::headers(MapType::HttpRequestHeaders);
        let id = self.id;
        self.with(|s| s.begin(id, path.clone(), headers));
        Action::Pause
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let id = self.id;
        if !self.with(|s| s.manages(id)) {
            return Action::Continue;
        }
        if size > MAX_REQUEST_BYTES {
            let reply = unbusy_core::reply::local_reply(
                unbusy_core::reply::ReplyKind::TooLarge,
                &format!("the request body is larger than {MAX_REQUEST_BYTES} bytes"),
                None,
            );
            let h: Vec<(&str, &str)> = reply
                .headers
                .iter()
                .map(|(n, v)| (*n, v.as_str()))
                .collect();
            host::send_response(reply.status, &h, reply.body.as_bytes());
            let effects = self.with(|s| s.end(id, host::now()));
            run(&self.state, effects, Some(id));
            return Action::Pause;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = host::buffer(BufferType::HttpRequestBody, size).unwrap_or_default();
        let effects = self.with(|s| s.request_body(id, host::now(), body));
        if run(&self.state, effects, Some(id)) {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        let id = self.id;
        if !self.with(|s| s.manages(id)) {
            return Action::Continue;
        }
        let headers = host::headers(MapType::HttpResponseHeaders);
        let verdict = self.with(|s| s.response_headers(id, host::now(), headers, end_of_stream));
        self.hold_or_release(verdict)
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        let id = self.id;
        if !self.with(|s| s.manages(id)) {
            return Action::Continue;
        }
        let body = host::buffer(BufferType::HttpResponseBody, size).unwrap_or_default();
        let verdict = self.with(|s| s.router_body(id, host::now(), &body, end_of_stream));
        self.hold_or_release(verdict)
    }
}
