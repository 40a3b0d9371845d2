//! Where an attempt goes and what it carries: the caller's request rewritten for one provider
//! (cluster, `Host`, path under the provider's base URL, credentials, `Content-Length`, the
//! encoding unbusy asks for), for each way an attempt leaves Envoy: riding the caller's stream,
//! entering the failover aggregate, one of the router's native attempts, or a dispatched call.
//!
//! Kept apart from the state machine because these are pure functions of the request, the
//! engine's [`SendAttempt`] and the configuration: one place says which headers a provider's
//! attempt sets, so one provider's credentials never leak to the next (the router retries with
//! the headers as the previous attempt left them, so every header an attempt may rewrite is set
//! each time).

use std::time::Duration;
use unbusy_core::answer::MANAGED_ACCEPT_ENCODING;
use unbusy_core::config::ProviderConfig;
use unbusy_core::engine::SendAttempt;
use unbusy_core::request::{base_path, query_of, rewrite_body, Endpoint};
use unbusy_core::time::{Instant, Nanos};

/// The request header that ties the router's attempts to their managed request (set by the
/// filter, removed by its upstream instance before the request leaves Envoy).
pub const FLOW_HEADER: &str = "x-unbusy-flow";

/// The caller's own deadline for its request, in ms from now: for unbusy only, never sent on
/// to a provider.
pub const DEADLINE_HEADER: &str = "x-unbusy-deadline-ms";

/// The request header whose value is the cluster the route sends to (`cluster_header`).
pub const CLUSTER_HEADER: &str = "x-unbusy-cluster";

/// Headers to set on a held request (`None` removes one).
pub type HeaderEdits = Vec<(String, Option<String>)>;

/// The caller's request, as read when its body arrived.
#[derive(Debug, Default)]
pub struct CallerRequest {
    /// Its path.
    pub path: String,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its body.
    pub body: Vec<u8>,
    /// The model it asked for.
    pub model: String,
    /// Whether it asked for a stream.
    pub stream: bool,
}

impl CallerRequest {
    /// One of its headers (names compared without case).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// Its body rewritten for an attempt (model mapping, a degraded `max_tokens` cap), or
    /// `None` when the attempt sends it as it is.
    pub fn body_for(&self, send: &SendAttempt) -> Option<Vec<u8>> {
        rewrite_body(&self.body, &send.rewrite)
    }
}

/// A header's value (names compared without case).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The `Host` of a base URL (`https://api.deepseek.com/v1` gives `api.deepseek.com`).
pub fn authority_of(base_url: &str) -> Option<String> {
    let rest = base_url
        .strip_prefix("https://")
        .or_else(|| base_url.strip_prefix("http://"))?;
    let host = rest.split('/').next()?;
    (!host.is_empty()).then(|| host.to_string())
}

/// The caller's path under the provider's base URL: a known endpoint (`chat/completions`,
/// `models`, ...) is placed under the base's own path whatever prefix the caller used
/// (`/v1/chat/completions` goes to `https://api.deepseek.com/chat/completions` and to
/// `https://api.openai.com/v1/chat/completions` alike; see `unbusy_core::request`); another path
/// loses an OpenAI-style `/v1` and goes under the base path. Without a base URL it is unchanged.
pub fn routed_path(base_url: Option<&str>, path: &str) -> String {
    let Some(base) = base_url else {
        return path.to_string();
    };
    match Endpoint::of_path(path) {
        Some((endpoint, rest)) => endpoint.under(base, rest, query_of(path)),
        None => format!(
            "{}{}",
            base_path(base),
            path.strip_prefix("/v1").unwrap_or(path)
        ),
    }
}

/// Each provider's `Host`, from its base URL, worked out once.
#[derive(Debug, Default)]
pub struct Authorities(Vec<Option<String>>);

impl Authorities {
    /// For these providers.
    pub fn of(providers: &[ProviderConfig]) -> Self {
        Self(
            providers
                .iter()
                .map(|p| p.base_url.as_deref().and_then(authority_of))
                .collect(),
        )
    }

    /// Provider `i`'s.
    pub fn get(&self, i: usize) -> Option<String> {
        self.0.get(i).cloned().flatten()
    }
}

/// The headers that send a request the filter does not manage to the preferred provider:
/// with the provider's key when `provider_key` (an endpoint unbusy knows), else with the
/// caller's own `Authorization`, untouched.
pub fn passthrough(
    providers: &[ProviderConfig],
    authorities: &Authorities,
    path: &str,
    provider_key: bool,
) -> HeaderEdits {
    let Some((i, p)) = providers.iter().enumerate().min_by_key(|(_, p)| p.priority) else {
        return Vec::new();
    };
    let mut h = vec![
        (CLUSTER_HEADER.to_string(), p.cluster.clone()),
        (FLOW_HEADER.to_string(), None),
    ];
    if let Some(key) = p.api_key.as_ref().filter(|_| provider_key) {
        h.push(("authorization".into(), Some(format!("Bearer {key}"))));
    }
    if let Some(a) = authorities.get(i) {
        h.push((":authority".into(), Some(a)));
    }
    if p.base_url.is_some() {
        h.push((
            ":path".into(),
            Some(routed_path(p.base_url.as_deref(), path)),
        ));
    }
    h
}

/// Attempt 1 riding the caller's own stream to the provider's plain cluster: the headers to
/// set and the body to replace, if the attempt rewrites it.
pub fn first_attempt(
    request: &CallerRequest,
    send: &SendAttempt,
    authority: Option<String>,
) -> (HeaderEdits, Option<Vec<u8>>) {
    let path = routed_path(send.rewrite.base_url.as_deref(), &request.path);
    let body = request.body_for(send);
    let cluster = send.rewrite.cluster.clone().unwrap_or_default();
    // (A caller's own flow header would tie its request to another's attempts.)
    // Answers are asked for unencoded: the judge, the progress detector and the cache must read
    // them (the caller then gets identity, which every client accepts).
    // Each edit is a hostcall: a header the caller did not send needs no removal, and an
    // `accept-encoding` that already says exactly what is asked for needs no rewrite.
    let mut headers = vec![(CLUSTER_HEADER.to_string(), Some(cluster))];
    for name in [FLOW_HEADER, DEADLINE_HEADER] {
        if request.header(name).is_some() {
            headers.push((name.to_string(), None));
        }
    }
    let mut encodings = request
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("accept-encoding"));
    let asked = encodings
        .next()
        .is_some_and(|(_, v)| v == MANAGED_ACCEPT_ENCODING)
        && encodings.next().is_none();
    if !asked {
        headers.push((
            "accept-encoding".to_string(),
            Some(MANAGED_ACCEPT_ENCODING.to_string()),
        ));
    }
    if let Some(auth) = &send.rewrite.authorization {
        headers.push(("authorization".into(), Some(auth.clone())));
    }
    if let Some(a) = authority {
        headers.push((":authority".into(), Some(a)));
    }
    if path != request.path {
        headers.push((":path".into(), Some(path)));
    }
    if let Some(b) = &body {
        headers.push(("content-length".into(), Some(b.len().to_string())));
    }
    (headers, body)
}

/// Attempt 1 sent to a provider's failover aggregate, tied to its request by `flow` (the
/// upstream instance rewrites it per attempt for the provider the router reaches).
pub fn native_entry(cluster: String, flow: String) -> HeaderEdits {
    vec![
        (CLUSTER_HEADER.to_string(), Some(cluster)),
        (FLOW_HEADER.to_string(), Some(flow)),
        (
            "accept-encoding".to_string(),
            Some(MANAGED_ACCEPT_ENCODING.to_string()),
        ),
        (DEADLINE_HEADER.to_string(), None),
    ]
}

/// One of the router's native attempts, rewritten by the upstream instance for the provider
/// it reaches: every header an attempt may rewrite is set, from the caller's original where
/// the provider keeps it (the router retries with the headers as the last attempt left them).
pub fn native_attempt(
    request: &CallerRequest,
    send: &SendAttempt,
    authority: Option<String>,
) -> (HeaderEdits, Option<Vec<u8>>) {
    let original = |name: &str| request.header(name).map(str::to_string);
    let authority = authority.or_else(|| original(":authority"));
    let path = routed_path(send.rewrite.base_url.as_deref(), &request.path);
    let authorization = send
        .rewrite
        .authorization
        .clone()
        .or_else(|| original("authorization"));
    let body = request.body_for(send);
    let length = body.as_ref().map_or(request.body.len(), Vec::len);
    let headers = vec![
        (FLOW_HEADER.to_string(), None),
        (CLUSTER_HEADER.to_string(), None),
        (":authority".to_string(), authority),
        (":path".to_string(), Some(path)),
        ("authorization".to_string(), authorization),
        ("content-length".to_string(), Some(length.to_string())),
        (
            "accept-encoding".to_string(),
            Some(MANAGED_ACCEPT_ENCODING.to_string()),
        ),
    ];
    (headers, body)
}

/// An attempt as a `dispatch_http_call`.
#[derive(Debug)]
pub struct Call {
    /// The provider's cluster.
    pub cluster: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Give up after this long.
    pub timeout: Duration,
}

/// The attempt `send` as a call outside the stream (for attempts the router cannot carry): the
/// caller's request rewritten for the provider, with at least a millisecond to answer.
pub fn dispatched(
    request: &CallerRequest,
    send: &SendAttempt,
    authority: Option<String>,
    now: Nanos,
) -> Call {
    let path = routed_path(send.rewrite.base_url.as_deref(), &request.path);
    let body = request.body_for(send);
    let cluster = send.rewrite.cluster.clone().unwrap_or_default();
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .filter(|(n, _)| {
            !matches!(
                n.as_str(),
                ":authority"
                    | ":path"
                    | ":method"
                    | ":scheme"
                    | "content-length"
                    | "transfer-encoding"
                    | CLUSTER_HEADER
                    | FLOW_HEADER
                    | DEADLINE_HEADER
                    | "authorization"
                    | "accept-encoding"
            )
        })
        .cloned()
        .collect();
    headers.push((":method".into(), "POST".into()));
    headers.push((":path".into(), path));
    headers.push((
        ":authority".into(),
        authority.unwrap_or_else(|| cluster.clone()),
    ));
    let auth = send
        .rewrite
        .authorization
        .clone()
        .or_else(|| request.header("authorization").map(str::to_string));
    if let Some(a) = auth {
        headers.push(("authorization".into(), a));
    }
    headers.push(("accept-encoding".into(), MANAGED_ACCEPT_ENCODING.into()));
    headers.push(("x-unbusy-attempt".into(), send.attempt.get().to_string()));
    let timeout = Duration::from_nanos(
        send.deadline
            .saturating_since(Instant::from_nanos(now))
            .max(1_000_000),
    );
    Call {
        cluster,
        headers,
        body: body.unwrap_or_else(|| request.body.clone()),
        timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::routed_path;

    #[test]
    fn a_known_endpoint_lands_under_every_shape_of_base_url_once() {
        let cases = [
            (
                "https://api.deepseek.com",
                "/v1/chat/completions",
                "/chat/completions",
            ),
            (
                "https://api.openai.com/v1",
                "/v1/chat/completions",
                "/v1/chat/completions",
            ),
            (
                "https://api.openai.com/v1/",
                "/chat/completions",
                "/v1/chat/completions",
            ),
            (
                "https://gw.example/openai/v1",
                "/v1/chat/completions?api-version=2",
                "/openai/v1/chat/completions?api-version=2",
            ),
            (
                "http://127.0.0.1:9/v1",
                "/v1/models/deepseek-chat",
                "/v1/models/deepseek-chat",
            ),
            ("http://127.0.0.1:9", "/v1/files/abc", "/files/abc"),
        ];
        for (base, path, want) in cases {
            assert_eq!(routed_path(Some(base), path), want, "{path} under {base}");
        }
        assert_eq!(
            routed_path(None, "/v1/chat/completions"),
            "/v1/chat/completions"
        );
    }
}
