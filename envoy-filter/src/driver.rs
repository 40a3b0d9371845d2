//! The thin driver: Envoy's callbacks as calls on the filter's [`State`], and the state's
//! [`Effect`]s as hostcalls. Everything here is generic over the [`Host`], so the same code that
//! runs in Envoy's worker VM runs natively over [`crate::fake`] in tests; the proxy-wasm trait
//! impls ([`crate::contexts`], [`crate::upstream`]) only forward to it.
//!
//! State is borrowed only while deciding; hostcalls run after the borrow ends, since a local
//! reply calls back into the VM. A state that cannot be borrowed (a callback re-entered) makes a
//! callback do nothing rather than panic.

use crate::effect::{Effect, Interest};
use crate::failover::{parse_flow, NATIVE_RETRY_STATUS};
use crate::host::{pairs, Buffer, Direction, Host, Map};
use crate::routing::FLOW_HEADER;
use crate::state::State;
use proxy_wasm::types::Action;
use std::cell::RefCell;
use std::rc::Rc;
use unbusy_core::health::ProbeResult;
use unbusy_core::reply::{local_reply, ReplyKind};
use unbusy_core::request::Handling;

/// Request bodies larger than this are refused with 413 (a chat request is kilobytes).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// The filter state of one plugin configuration, shared by its contexts.
pub type Shared<H> = Rc<RefCell<State<H>>>;

/// Runs `f` on the state if it can be borrowed (else the default: do nothing).
fn with<H: Host, T: Default>(state: &Shared<H>, f: impl FnOnce(&mut State<H>) -> T) -> T {
    state
        .try_borrow_mut()
        .map(|mut s| f(&mut s))
        .unwrap_or_default()
}

/// Answers the current stream with a local reply of the core's.
fn reply<H: Host>(host: &H, kind: ReplyKind, message: &str, note: Option<&str>) {
    let reply = local_reply(kind, message, None);
    let mut h: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .collect();
    if let Some(note) = note {
        h.push(("x-unbusy", note));
    }
    host.send_response(reply.status, &h, reply.body.as_bytes());
}

/// Carries out effects, outside the state's borrow. `inline` is the stream whose callback is
/// running: effects on it are applied without switching context, and a resume of it is
/// returned as `true` (the callback then answers `Continue`) instead of a resume hostcall.
pub fn run<H: Host>(
    host: &H,
    state: &Shared<H>,
    effects: Vec<Effect>,
    inline: Option<u32>,
) -> bool {
    let mut continue_inline = false;
    let mut pending = effects;
    while !pending.is_empty() {
        let mut next = Vec::new();
        for effect in pending {
            let ctx = effect.ctx();
            let here = inline == Some(ctx);
            if !here && !host.enter(ctx) {
                continue; // the stream is gone
            }
            match effect {
                Effect::ResumeRequest { headers, body, .. } => {
                    for (name, value) in &headers {
                        host.set_header(Map::RequestHeaders, name, value.as_deref());
                    }
                    if let Some(b) = body {
                        let size = host
                            .buffer(Buffer::RequestBody, MAX_REQUEST_BYTES)
                            .map_or(0, |b| b.len());
                        host.set_buffer(Buffer::RequestBody, size, &b);
                    }
                    if here {
                        continue_inline = true;
                    } else {
                        host.resume(Direction::Request);
                    }
                }
                Effect::SetResponseHeader { name, value, .. } => {
                    host.set_header(Map::ResponseHeaders, &name, value.as_deref());
                }
                Effect::ReplaceResponseBody { size, body, .. } => {
                    host.set_buffer(Buffer::ResponseBody, size, &body);
                }
                Effect::ResumeResponse { headers, .. } => {
                    for (name, value) in &headers {
                        host.set_header(Map::ResponseHeaders, name, Some(value));
                    }
                    if here {
                        continue_inline = true;
                    } else {
                        host.resume(Direction::Response);
                    }
                }
                Effect::ResetResponse { .. } => {
                    host.reset_response();
                }
                Effect::RetryNatively { ctx, stream, flow } => {
                    // The router retries with the caller's request headers, as the upstream
                    // instance left them (it removed the flow header): put it back, from the
                    // caller's stream (the upstream context may not touch request headers in
                    // its response phase).
                    if host.enter(stream) {
                        host.set_header(Map::RequestHeaders, FLOW_HEADER, Some(&flow));
                    }
                    if !host.enter(ctx) {
                        continue;
                    }
                    let status = NATIVE_RETRY_STATUS.to_string();
                    host.set_header(Map::ResponseHeaders, ":status", Some(&status));
                    if here {
                        continue_inline = true;
                    } else {
                        host.resume(Direction::Response);
                    }
                }
                Effect::Reply {
                    status,
                    headers,
                    body,
                    ..
                } => {
                    host.send_response(status, &pairs(&headers), &body);
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
                    let more = match host.dispatch(&cluster, &pairs(&headers), &body, timeout) {
                        Ok(token) => {
                            with(state, |s| s.dispatched(token, ctx, request, attempt));
                            Vec::new()
                        }
                        Err(status) => {
                            host.warn(&format!(
                                "unbusy: could not dispatch to cluster {}: {status}",
                                unbusy_core::json::quoted(&cluster)
                            ));
                            with(state, |s| s.dispatch_failed(host.now(), request, attempt))
                        }
                    };
                    next.extend(more);
                }
                Effect::StoreLookup {
                    ctx,
                    cluster,
                    call,
                    timeout,
                } => {
                    let headers = call.header_pairs();
                    let more = match host.dispatch(&cluster, &headers, &call.body, timeout) {
                        Ok(token) => {
                            with(state, |s| s.l2_dispatched(token, ctx));
                            Vec::new()
                        }
                        Err(why) => with(state, |s| s.l2_failed(Some(ctx), host.now(), &why)),
                    };
                    next.extend(more);
                }
            }
        }
        pending = next;
    }
    continue_inline
}

/// Runs a response callback's effects (the callback runs in context `id`) and answers Envoy:
/// keep holding the response unless the state let it go or an effect released it.
fn hold_or_release<H: Host>(
    host: &H,
    state: &Shared<H>,
    id: u32,
    (hold, effects): (bool, Vec<Effect>),
) -> Action {
    let released = run(host, state, effects, Some(id));
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
fn on_response<H: Host, T>(
    host: &H,
    state: &Shared<H>,
    ctx: u32,
    from: u32,
    read: impl FnOnce(bool) -> T,
    judge: impl FnOnce(&mut State<H>, T) -> (bool, Vec<Effect>),
) -> Action {
    let interest = state
        .try_borrow()
        .map_or(Interest::Pass, |s| s.interest(ctx, from));
    match interest {
        Interest::Pass => Action::Continue,
        Interest::Hold => Action::Pause,
        Interest::Judge { bytes } => {
            let input = read(bytes);
            let verdict = with(state, |s| judge(s, input));
            hold_or_release(host, state, from, verdict)
        }
    }
}

/// The response headers of stream `ctx`, seen by context `from`.
pub fn response_headers<H: Host>(
    host: &H,
    state: &Shared<H>,
    ctx: u32,
    from: u32,
    end: bool,
) -> Action {
    on_response(
        host,
        state,
        ctx,
        from,
        |_| host.headers(Map::ResponseHeaders),
        |s, headers| s.response_headers(ctx, from, host.now(), headers, end),
    )
}

/// A response body chunk of stream `ctx`, seen by context `from`.
pub fn response_body<H: Host>(
    host: &H,
    state: &Shared<H>,
    ctx: u32,
    from: u32,
    size: usize,
    end: bool,
) -> Action {
    on_response(
        host,
        state,
        ctx,
        from,
        |bytes| {
            if bytes {
                host.buffer(Buffer::ResponseBody, size).unwrap_or_default()
            } else {
                Vec::new() // mid-stream, only the fact that a chunk passed counts
            }
        },
        |s, body| s.router_body(ctx, from, host.now(), &body, end),
    )
}

/// A dispatched call answered (at the root context or a stream's).
pub fn call_response<H: Host>(host: &H, state: &Shared<H>, token: u32, body_size: usize) {
    let headers = host.headers(Map::CallResponseHeaders);
    let body = host
        .buffer(Buffer::CallResponseBody, body_size)
        .unwrap_or_default();
    let token = crate::host::CallToken(token);
    let effects = with(state, |s| s.call_response(token, host.now(), headers, body));
    run(host, state, effects, None);
}

/// The root context's tick: the engine's timers, the L2 write-backs queued since the last
/// one (dispatched from the root context, so no stream's end cancels them; their answers are
/// not awaited), the fleet's concurrency holdings and pauses (whose answers come back to this
/// root), the leased limits' returns and leases (a lease's answer comes back to this root; a
/// return's is not awaited), and the health checks' probes due now (their answers come back to
/// the root context too; a probe the host refuses to send says down).
pub fn tick<H: Host>(host: &H, state: &Shared<H>) {
    if let Some((cluster, writes)) = with(state, |s| s.l2_take_writes(host.now())) {
        for call in writes {
            let headers = call.header_pairs();
            if let Err(why) = host.dispatch(&cluster, &headers, &call.body, STORE_WRITE_TIMEOUT) {
                with(state, |s| s.l2_failed(None, host.now(), &why));
                break;
            }
        }
    }
    if let Some((cluster, calls)) = with(state, |s| s.fleet_calls(host.now())) {
        let timeout = std::time::Duration::from_millis(crate::state::FLEET_CALL_TIMEOUT_MS);
        for (purpose, call) in calls {
            let headers = call.header_pairs();
            match host.dispatch(&cluster, &headers, &call.body, timeout) {
                Ok(token) => with(state, |s| s.fleet_dispatched(token, purpose)),
                Err(why) => with(state, |s| s.fleet_failed(&why)),
            }
        }
    }
    for (provider, call) in with(state, |s| s.probes_due(host.now())) {
        match host.dispatch(
            &call.cluster,
            &pairs(&call.headers),
            &call.body,
            call.timeout,
        ) {
            Ok(token) => with(state, |s| s.probe_dispatched(token, provider)),
            Err(_) => with(state, |s| {
                s.probe_result(provider, host.now(), ProbeResult::NoAnswer)
            }),
        }
    }
    for (cluster, call, lease) in with(state, |s| s.quota_tick(host.now())) {
        let headers = call.header_pairs();
        match host.dispatch(&cluster, &headers, &call.body, crate::quota::CALL_TIMEOUT) {
            Ok(token) if lease => with(state, |s| s.quota_dispatched(token)),
            Ok(_) => {}
            Err(why) if lease => with(state, |s| s.quota_refused(host.now(), &why)),
            Err(_) => {} // units not returned are lost to the fleet until their bucket refills
        }
    }
    let effects = with(state, |s| s.tick(host.now()));
    run(host, state, effects, None);
}

/// A write-back's bound (the store's own is 250 ms; nothing waits for it).
const STORE_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Stream `id` ended.
pub fn stream_done<H: Host>(host: &H, state: &Shared<H>, id: u32) {
    let effects = with(state, |s| s.end(id, host.now()));
    run(host, state, effects, None);
}

/// The request headers of stream `id`: which endpoint, and how it is handled.
pub fn request_headers<H: Host>(host: &H, state: &Shared<H>, id: u32, end: bool) -> Action {
    // One hostcall for every header; a managed request keeps them all.
    let headers = host.headers(Map::RequestHeaders);
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
    };
    let method = value(":method");
    let path = value(":path").to_string();
    // (If the state cannot be borrowed, nothing is forwarded: refusing is the safe side.)
    let handling = with(state, |s| Some(s.handling(method, &path))).unwrap_or(Handling::Refuse);
    let provider_key = match handling {
        Handling::Managed => None,
        Handling::ProviderKey(_) => Some(true),
        Handling::CallerKey => Some(false),
        Handling::Refuse => {
            let route = path.split(['?', '#']).next().unwrap_or("");
            reply(
                host,
                ReplyKind::EndpointNotAllowed,
                &format!(
                    "{method} {route} is not an endpoint this proxy forwards: only \
                     chat/completions, completions and embeddings (POST) and models (GET) \
                     are (endpoints.passthrough is \"refuse\")"
                ),
                Some("refused=endpoint_not_allowed"),
            );
            with(state, |s| s.refused_endpoint());
            return Action::Pause;
        }
    };
    if let Some(provider_key) = provider_key {
        for (name, value) in with(state, |s| s.passthrough_headers(&path, provider_key)) {
            host.set_header(Map::RequestHeaders, &name, value.as_deref());
        }
        return Action::Continue;
    }
    if end {
        reply(
            host,
            ReplyKind::BadRequest,
            "a chat/completions request needs a JSON body",
            None,
        );
        return Action::Pause;
    }
    with(state, |s| s.begin(id, path, headers));
    Action::Pause
}

/// A request body chunk of stream `id`: a managed request is held until all of it arrived.
pub fn request_body<H: Host>(
    host: &H,
    state: &Shared<H>,
    id: u32,
    size: usize,
    end: bool,
) -> Action {
    if !with(state, |s| s.manages(id)) {
        return Action::Continue;
    }
    if size > MAX_REQUEST_BYTES {
        reply(
            host,
            ReplyKind::TooLarge,
            &format!("the request body is larger than {MAX_REQUEST_BYTES} bytes"),
            None,
        );
        let effects = with(state, |s| s.end(id, host.now()));
        run(host, state, effects, Some(id));
        return Action::Pause;
    }
    if !end {
        return Action::Pause;
    }
    let body = host.buffer(Buffer::RequestBody, size).unwrap_or_default();
    let effects = with(state, |s| s.request_body(id, host.now(), body));
    if run(host, state, effects, Some(id)) {
        Action::Continue
    } else {
        Action::Pause
    }
}

/// The host metadata path that names the provider an attempt reaches.
pub const PROVIDER_METADATA: [&str; 5] = [
    "xds",
    "upstream_host_metadata",
    "filter_metadata",
    "unbusy",
    "provider",
];

/// One of the router's attempts, as the upstream instance sees it (see [`crate::upstream`]).
pub struct Attempt<H: Host> {
    id: u32,
    /// The managed request's state and stream, when the attempt belongs to one.
    link: Option<(Shared<H>, u32)>,
    /// The body to send instead of the caller's (a model mapping or a degraded cap).
    body: Option<Vec<u8>>,
}

impl<H: Host> Attempt<H> {
    /// A new attempt context.
    pub fn new(id: u32) -> Self {
        Self {
            id,
            link: None,
            body: None,
        }
    }

    /// Its request headers: the flow header (removed here) names the managed request, found
    /// with `lookup` (by registry index); `picked` is the provider the router's host names.
    /// The request is rewritten for that provider.
    pub fn request_headers(
        &mut self,
        host: &H,
        lookup: impl FnOnce(usize) -> Option<Shared<H>>,
        picked: impl FnOnce() -> Option<String>,
    ) -> Action {
        let Some(flow) = host.header(Map::RequestHeaders, FLOW_HEADER) else {
            return Action::Continue;
        };
        host.set_header(Map::RequestHeaders, FLOW_HEADER, None);
        let Some((state, ctx)) =
            parse_flow(&flow).and_then(|(index, ctx)| Some((lookup(index)?, ctx)))
        else {
            return Action::Continue;
        };
        let picked = picked();
        let plan = state
            .try_borrow_mut()
            .ok()
            .and_then(|mut s| s.upstream_request(ctx, self.id, picked.as_deref()));
        let Some(plan) = plan else {
            return Action::Continue;
        };
        for (name, value) in &plan.headers {
            host.set_header(Map::RequestHeaders, name, value.as_deref());
        }
        self.body = plan.body;
        self.link = Some((state, ctx));
        Action::Continue
    }

    /// Its request body: replaced whole when the attempt rewrites it.
    pub fn request_body(&mut self, host: &H, size: usize, end: bool) -> Action {
        if self.body.is_none() {
            return Action::Continue;
        }
        if !end {
            return Action::Pause; // the router buffers the request; replace it whole
        }
        if let Some(body) = self.body.take() {
            let held = host
                .buffer(Buffer::RequestBody, size.min(MAX_REQUEST_BYTES))
                .map_or(0, |b| b.len());
            host.set_buffer(Buffer::RequestBody, held.max(size), &body);
        }
        Action::Continue
    }

    /// Its response headers, judged for its request.
    pub fn response_headers(&self, host: &H, end: bool) -> Action {
        match &self.link {
            Some((state, ctx)) => response_headers(host, state, *ctx, self.id, end),
            None => Action::Continue,
        }
    }

    /// A chunk of its response, judged for its request.
    pub fn response_body(&self, host: &H, size: usize, end: bool) -> Action {
        match &self.link {
            Some((state, ctx)) => response_body(host, state, *ctx, self.id, size, end),
            None => Action::Continue,
        }
    }

    /// It ended.
    pub fn done(&self) {
        if let Some((state, ctx)) = &self.link {
            if let Ok(mut s) = state.try_borrow_mut() {
                s.upstream_done(*ctx, self.id);
            }
        }
    }
}
