//! # unbusy-envoy
//!
//! The Envoy / Istio host of the unbusy engine: a proxy-wasm HTTP filter (`wasm32-wasip1`
//! cdylib) that translates Envoy's callbacks into engine calls and the engine's decisions into
//! host calls. It holds no policy of its own; every decision comes from [`unbusy_core`].
//!
//! - [`filter`]: the per-VM state and the request flow (see its module doc);
//! - [`upstream`]: the same module as an upstream filter in the router (native failover);
//! - [`registry`]: how the two instances in one VM find each other;
//! - [`shared`]: rate limits and the L1 response cache in shared data, across workers;
//! - [`metrics`]: engine events as Envoy metrics;
//! - [`host`]: hostcalls that report failure instead of panicking, over [`abi`] (the raw ABI).
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
//! own key, or refused with 403 is `unbusy_core::request::handling`'s decision. The upstream instance is the same module with the
//! root id [`UPSTREAM_ROOT_ID`]; its configuration is ignored.

pub mod abi;
pub mod filter;
pub mod host;
pub mod metrics;
pub mod registry;
pub mod shared;
pub mod upstream;

use filter::{Effect, Interest, State, FLOW_HEADER, MAX_REQUEST_BYTES, NATIVE_RETRY_STATUS};
use host::{Buffer, Map};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use registry::Shared;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use unbusy_core::config::Config;
use unbusy_core::request::Handling;

/// How often the engine's timers are checked (first-token deadlines, backoff waits).
const TICK: Duration = Duration::from_millis(20);

/// The root id that makes an instance of this module the upstream filter in the router.
pub const UPSTREAM_ROOT_ID: &str = "unbusy_upstream";

proxy_wasm::main! {{
    // (No `proxy_wasm::set_log_level`: the filter logs through `abi::log`, not the `log` crate,
    // and the SDK's logger would only add code.)
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { state: None, upstream: false })
    });
}}

struct Root {
    state: Option<Shared>,
    /// This root is the upstream instance.
    upstream: bool,
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
            let ctx = effect.ctx();
            let here = inline == Some(ctx);
            if !here && !host::enter(ctx) {
                continue; // the stream is gone
            }
            match effect {
                Effect::ResumeRequest { headers, body, .. } => {
                    for (name, value) in &headers {
                        host::set_header(Map::RequestHeaders, name, value.as_deref());
                    }
                    if let Some(b) = body {
                        let size = host::buffer(Buffer::RequestBody, MAX_REQUEST_BYTES)
                            .map_or(0, |b| b.len());
                        host::set_buffer(Buffer::RequestBody, size, &b);
                    }
                    if here {
                        continue_inline = true;
                    } else {
                        host::resume_request();
                    }
                }
                Effect::SetResponseHeader { name, value, .. } => {
                    host::set_header(Map::ResponseHeaders, &name, value.as_deref());
                }
                Effect::ReplaceResponseBody { size, body, .. } => {
                    host::set_buffer(Buffer::ResponseBody, size, &body);
                }
                Effect::ResumeResponse { headers, .. } => {
                    for (name, value) in &headers {
                        host::set_header(Map::ResponseHeaders, name, Some(value));
                    }
                    if here {
                        continue_inline = true;
                    } else {
                        host::resume_response();
                    }
                }
                Effect::ResetResponse { .. } => {
                    host::reset_response();
                }
                Effect::RetryNatively { ctx, stream, flow } => {
                    // The router retries with the caller's request headers, as the upstream
                    // instance left them (it removed the flow header): put it back, from the
                    // caller's stream (the upstream context may not touch request headers in
                    // its response phase).
                    if host::enter(stream) {
                        host::set_header(Map::RequestHeaders, FLOW_HEADER, Some(&flow));
                    }
                    if !host::enter(ctx) {
                        continue;
                    }
                    let status = NATIVE_RETRY_STATUS.to_string();
                    host::set_header(Map::ResponseHeaders, ":status", Some(&status));
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
        let headers = host::headers(Map::CallResponseHeaders);
        let body = host::buffer(Buffer::CallResponseBody, body_size).unwrap_or_default();
        let effects = state
            .try_borrow_mut()
            .map(|mut s| s.call_response(token, host::now(), headers, body))
            .unwrap_or_default();
        run(state, effects, None);
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        if host::property(&["plugin_root_id"]).as_deref() == Some(UPSTREAM_ROOT_ID.as_bytes()) {
            self.upstream = true;
            registry::set_upstream_present();
            host::info("unbusy: upstream instance configured (native failover)");
            return true;
        }
        let bytes = host::buffer(Buffer::PluginConfiguration, size.max(1)).unwrap_or_default();
        let mut config = match Config::from_json(&bytes) {
            Ok(c) => c,
            Err(e) => {
                host::error(&format!("unbusy: invalid plugin configuration: {e}"));
                return false;
            }
        };
        // Keys named by `api_key_env`, from the variables Envoy passes to the VM
        // (`vm_config.environment_variables`), read through WASI's `environ_get`.
        if let Err(e) = filter::resolve_keys(&mut config, |name| std::env::var(name).ok()) {
            host::error(&format!("unbusy: invalid plugin configuration: {e}"));
            return false;
        }
        let seed = host::now() ^ 0x756e_6275_7379;
        match State::new(config, seed) {
            Ok(state) => {
                let shared = Rc::new(RefCell::new(state));
                let index = registry::register(&shared);
                if let Ok(mut s) = shared.try_borrow_mut() {
                    s.registry_index = Some(index);
                }
                self.state = Some(shared);
                let _ = host::set_tick_period(TICK);
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

struct Stream {
    id: u32,
    state: Shared,
}

/// Runs a response callback's effects (the callback runs in context `id`) and answers Envoy:
/// keep holding the response unless the state let it go or an effect released it.
fn hold_or_release(state: &Shared, id: u32, (hold, effects): (bool, Vec<Effect>)) -> Action {
    let released = run(state, effects, Some(id));
    if hold && !released {
        Action::Pause
    } else {
        Action::Continue
    }
}

/// A response callback of stream `ctx`, running in context `from` (the stream itself, or the
/// upstream instance's context carrying its attempt): asks the state what it needs first, so
/// most callbacks copy nothing out of Envoy; `read` fetches what it needs (`true`: the bytes),
/// `judge` hands it to the state.
fn on_response<T>(
    state: &Shared,
    ctx: u32,
    from: u32,
    read: impl FnOnce(bool) -> T,
    judge: impl FnOnce(&mut State, T) -> (bool, Vec<Effect>),
) -> Action {
    let interest = state
        .try_borrow()
        .map_or(Interest::Pass, |s| s.interest(ctx, from));
    match interest {
        Interest::Pass => Action::Continue,
        Interest::Hold => Action::Pause,
        Interest::Judge { bytes } => {
            let input = read(bytes);
            let verdict = state
                .try_borrow_mut()
                .map(|mut s| judge(&mut s, input))
                .unwrap_or_default();
            hold_or_release(state, from, verdict)
        }
    }
}

/// The response headers of stream `ctx`, seen by context `from`.
pub(crate) fn response_headers(state: &Shared, ctx: u32, from: u32, end: bool) -> Action {
    on_response(
        state,
        ctx,
        from,
        |_| host::headers(Map::ResponseHeaders),
        |s, headers| s.response_headers(ctx, from, host::now(), headers, end),
    )
}

/// A response body chunk of stream `ctx`, seen by context `from`.
pub(crate) fn response_body(state: &Shared, ctx: u32, from: u32, size: usize, end: bool) -> Action {
    on_response(
        state,
        ctx,
        from,
        |bytes| {
            if bytes {
                host::buffer(Buffer::ResponseBody, size).unwrap_or_default()
            } else {
                Vec::new() // mid-stream, only the fact that a chunk passed counts
            }
        },
        |s, body| s.router_body(ctx, from, host::now(), &body, end),
    )
}

impl Stream {
    fn with<T: Default>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        self.state
            .try_borrow_mut()
            .map(|mut s| f(&mut s))
            .unwrap_or_default()
    }
}

impl Context for Stream {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _: usize) {
        let headers = host::headers(Map::CallResponseHeaders);
        let body = host::buffer(Buffer::CallResponseBody, body_size).unwrap_or_default();
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
        // One hostcall for every header; a managed request keeps them all.
        let headers = host::headers(Map::RequestHeaders);
        let value = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map_or("", |(_, v)| v.as_str())
        };
        let method = value(":method");
        let path = value(":path").to_string();
        // (If the state cannot be borrowed, nothing is forwarded: refusing is the safe side.)
        let handling = self
            .with(|s| Some(s.handling(method, &path)))
            .unwrap_or(Handling::Refuse);
        let provider_key = match handling {
            Handling::Managed => None,
            Handling::ProviderKey(_) => Some(true),
            Handling::CallerKey => Some(false),
            Handling::Refuse => {
                let route = path.split(['?', '#']).next().unwrap_or("");
                let reply = unbusy_core::reply::local_reply(
                    unbusy_core::reply::ReplyKind::EndpointNotAllowed,
                    &format!(
                        "{method} {route} is not an endpoint this proxy forwards: only \
                         chat/completions, completions and embeddings (POST) and models (GET) \
                         are (endpoints.passthrough is \"refuse\")"
                    ),
                    None,
                );
                let mut h: Vec<(&str, &str)> = reply
                    .headers
                    .iter()
                    .map(|(n, v)| (*n, v.as_str()))
                    .collect();
                h.push(("x-unbusy", "refused=endpoint_not_allowed"));
                host::send_response(reply.status, &h, reply.body.as_bytes());
                self.with(|s| s.refused_endpoint());
                return Action::Pause;
            }
        };
        if let Some(provider_key) = provider_key {
            for (name, value) in self.with(|s| s.passthrough_headers(&path, provider_key)) {
                host::set_header(Map::RequestHeaders, &name, value.as_deref());
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
        let id = self.id;
        self.with(|s| s.begin(id, path, headers));
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
        let body = host::buffer(Buffer::RequestBody, size).unwrap_or_default();
        let effects = self.with(|s| s.request_body(id, host::now(), body));
        if run(&self.state, effects, Some(id)) {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_response_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
        response_headers(&self.state, self.id, self.id, end_of_stream)
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        response_body(&self.state, self.id, self.id, size, end_of_stream)
    }
}
