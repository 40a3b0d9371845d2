//! What a caller's request is, read the same way by every host: which endpoint it calls (and so
//! where that endpoint lives under each provider's base URL) and whose it is (its tenant).
//!
//! **Endpoints.** Providers' base URLs come in every shape: `https://api.deepseek.com` (which
//! serves `/chat/completions` and `/v1/chat/completions`), `https://api.openai.com/v1`,
//! `https://gateway.example/openai/v1`, `https://host/api/paas/v4`. A caller's URL is under one
//! of them, or is a path such as `/v1/chat/completions` sent to a proxy. Appending the caller's
//! path suffix as is sends `/v1/v1/chat/completions` to a provider whose base already ends in
//! `/v1`; so the endpoint is recognised by its own name ([`Endpoint::of_path`]) and placed under
//! each provider's base ([`Endpoint::under`]), whatever prefix each has.
//!
//! **Which requests carry a provider's key** ([`handling`]). unbusy manages
//! `POST .../chat/completions` and knows a few other endpoints (legacy completions, embeddings,
//! the model list); only those are sent with a provider's configured key. Anything else (files,
//! fine-tuning, batches, assistants, a `DELETE` of anything, a `GET` of stored completions) is
//! refused by default, or forwarded with the caller's own key when the configuration says so
//! (`endpoints.passthrough`): a provider's key must not reach endpoints nobody chose to expose.
//!
//! **Tenants.** The tenant scopes the cache and the per-tenant limits. It comes from one of three
//! sources, and a value from one source can never name a tenant of another
//! ([`tenant_identity`]): otherwise a caller sending `x-tenant: Bearer victim` would read the
//! answers cached for the key `victim`, and `x-tenant: anonymous` those of callers without a key.
//! A tenant header is trusted only when a trusted hop sets or strips it
//! (`tenancy.header_trusted`); otherwise it only divides the caller's own key's namespace.
//!
//! **What a managed request asks for** ([`read`]). Every rule that decides something about a
//! chat/completions request before it is admitted (its tenant, the per-request headers
//! `x-unbusy-priority`, `x-unbusy-deadline-ms` and `x-unbusy-cache`, its model and `stream`, the
//! tokens it is charged, its cache key) is read here, once, for every host: the Envoy filter and
//! the npm package call [`read`] and nothing else. So is what an attempt changes in the body
//! ([`rewrite_body`]). The headers are documented for callers in `docs/requests.md`.
//!
//! **The token estimate** ([`estimate_tokens`]): what a request is charged against a
//! tokens-per-minute limit before anyone has counted its tokens. It is the UTF-8 size of the body
//! with JSON's escapes decoded and its insignificant whitespace dropped, divided by 4 and rounded
//! up, plus `max_tokens` (1024 when absent). UTF-8 bytes, not characters nor UTF-16 units:
//! tokenizers work on UTF-8 bytes, and a character outside ASCII costs more tokens than a letter.
//! DeepSeek documents about 0.3 tokens per English character and 0.6 per Chinese one; OpenAI's
//! tokenizers take about one token per common Chinese character. Bytes / 4 charges 0.25 and 0.75:
//! within a factor of 1.5 of both for both scripts. Characters or UTF-16 units / 4 would charge a
//! Chinese character 0.25, a third of that, so a Chinese prompt would get two to four times the
//! budget of an English one of the same real size. Escapes are decoded so that the same prompt
//! costs the same whichever JSON encoder the client used (Python's `json.dumps` writes `\u4f60`
//! for 你: 6 bytes for 3).

use crate::cache_key::{cache_key, tenant_id, CacheKey, KeyRequest, OptIn};
use crate::config::{Config, EndpointsConfig, Passthrough, TenancyConfig};
use crate::engine::{CacheLookup, Priority, RequestMeta, Rewrite};
use crate::json;
use crate::reply::{local_reply, LocalReply, ReplyKind};
use crate::time::{ms, Instant, Nanos};
use alloc::borrow::Cow;
use alloc::string::String;
use alloc::vec::Vec;

/// An OpenAI-compatible endpoint unbusy knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `chat/completions`: the managed endpoint.
    ChatCompletions,
    /// `completions` (legacy text completions).
    Completions,
    /// `embeddings`.
    Embeddings,
    /// `models`, or `models/{id}`.
    Models,
}

impl Endpoint {
    /// Its path below a base URL, without the leading slash.
    pub const fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Models => "models",
        }
    }

    /// The endpoint a request path (or a URL's path, or a suffix below a base URL) calls, and
    /// the rest after the endpoint's name (`/deepseek-chat` for `models/deepseek-chat`, else
    /// empty). The query string is not part of it. Matched on the last segments, so any prefix
    /// (`/v1`, `/openai/v1`, none) is accepted.
    ///
    /// ```rust
    /// use unbusy_core::request::Endpoint;
    /// assert_eq!(Endpoint::of_path("/v1/chat/completions"), Some((Endpoint::ChatCompletions, "")));
    /// assert_eq!(Endpoint::of_path("/chat/completions?x=1"), Some((Endpoint::ChatCompletions, "")));
    /// assert_eq!(Endpoint::of_path("/v1/completions"), Some((Endpoint::Completions, "")));
    /// assert_eq!(Endpoint::of_path("/v1/models/deepseek-chat"), Some((Endpoint::Models, "/deepseek-chat")));
    /// assert_eq!(Endpoint::of_path("/v1/files/abc"), None);
    /// ```
    pub fn of_path(path: &str) -> Option<(Endpoint, &str)> {
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = path.trim_end_matches('/');
        if path.ends_with("/chat/completions") || path == "chat/completions" {
            return Some((Self::ChatCompletions, ""));
        }
        for e in [Self::Completions, Self::Embeddings] {
            let name = e.path();
            if path == name || path.strip_suffix(name).is_some_and(|p| p.ends_with('/')) {
                return Some((e, ""));
            }
        }
        // `models` or `models/{id}` (an id has no slash).
        let (head, last) = match path.rsplit_once('/') {
            Some((h, l)) => (h, l),
            None => ("", path),
        };
        if last == "models" {
            return Some((Self::Models, ""));
        }
        let parent = head.rsplit('/').next().unwrap_or(head);
        if parent == "models" && !last.is_empty() {
            let rest = path.get(path.len() - last.len() - 1..).unwrap_or("");
            return Some((Self::Models, rest));
        }
        None
    }

    /// The path of this endpoint under a provider's base URL (or base path): the base's own
    /// path, then the endpoint, then `rest` (see [`Endpoint::of_path`]), then the caller's
    /// query string, if any.
    ///
    /// ```rust
    /// use unbusy_core::request::Endpoint;
    /// let chat = Endpoint::ChatCompletions;
    /// assert_eq!(chat.under("https://api.deepseek.com", "", ""), "/chat/completions");
    /// assert_eq!(chat.under("https://api.openai.com/v1/", "", ""), "/v1/chat/completions");
    /// assert_eq!(chat.under("https://gw.example/openai/v1", "", "?api-version=1"), "/openai/v1/chat/completions?api-version=1");
    /// assert_eq!(Endpoint::Models.under("http://127.0.0.1:8080", "/m1", ""), "/models/m1");
    /// ```
    pub fn under(self, base_url: &str, rest: &str, query: &str) -> String {
        let mut out = String::from(base_path(base_url));
        out.push('/');
        out.push_str(self.path());
        out.push_str(rest);
        out.push_str(query);
        out
    }
}

/// How a host handles a request, by its method and path (see [`handling`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// `POST .../chat/completions`: the engine manages it (limits, cache, retries, failover),
    /// each attempt with the chosen provider's key.
    Managed,
    /// Another endpoint unbusy knows, with the method that reads or computes (`POST`
    /// completions and embeddings, `GET`/`HEAD` models): forwarded to the preferred provider
    /// with that provider's key.
    ProviderKey(Endpoint),
    /// Forwarded to the preferred provider with the caller's own `Authorization` (none if the
    /// caller sent none), never a provider's key: any other request under
    /// `endpoints.passthrough: caller_key`, and a CORS preflight (`OPTIONS`) of a known
    /// endpoint, which carries no credentials.
    CallerKey,
    /// Answered locally with 403 (`endpoint_not_allowed`), nothing sent upstream: any other
    /// request under `endpoints.passthrough: refuse`, the default.
    Refuse,
}

/// Whether a request is managed, forwarded with the provider's key, forwarded with the caller's
/// key, or refused: the one rule every host applies before a provider's key goes anywhere.
/// `method` is the HTTP method (case-sensitive, as HTTP defines it), `path` the request path
/// with its query.
///
/// ```rust
/// use unbusy_core::config::{EndpointsConfig, Passthrough};
/// use unbusy_core::request::{handling, Endpoint, Handling};
/// let refuse = EndpointsConfig::default();
/// assert_eq!(handling("POST", "/v1/chat/completions", &refuse), Handling::Managed);
/// assert_eq!(handling("GET", "/v1/models", &refuse), Handling::ProviderKey(Endpoint::Models));
/// assert_eq!(handling("DELETE", "/v1/files/x", &refuse), Handling::Refuse);
/// assert_eq!(handling("DELETE", "/v1/models/ft-1", &refuse), Handling::Refuse);
/// let caller = EndpointsConfig { passthrough: Passthrough::CallerKey };
/// assert_eq!(handling("DELETE", "/v1/files/x", &caller), Handling::CallerKey);
/// ```
pub fn handling(method: &str, path: &str, endpoints: &EndpointsConfig) -> Handling {
    let known = Endpoint::of_path(path).map(|(e, _)| e);
    match (method, known) {
        ("POST", Some(Endpoint::ChatCompletions)) => Handling::Managed,
        ("POST", Some(e @ (Endpoint::Completions | Endpoint::Embeddings)))
        | ("GET" | "HEAD", Some(e @ Endpoint::Models)) => Handling::ProviderKey(e),
        ("OPTIONS", Some(_)) => Handling::CallerKey,
        _ => match endpoints.passthrough {
            Passthrough::Refuse => Handling::Refuse,
            Passthrough::CallerKey => Handling::CallerKey,
        },
    }
}

/// The path part of a base URL, without its trailing slash (`""` for a bare host).
pub fn base_path(base_url: &str) -> &str {
    let rest = base_url
        .strip_prefix("https://")
        .or_else(|| base_url.strip_prefix("http://"))
        .unwrap_or(base_url);
    let path = match rest.find('/') {
        Some(i) => rest.get(i..).unwrap_or(""),
        None => "",
    };
    path.split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
}

/// The query string of a request path, with its `?` (empty if none).
pub fn query_of(path: &str) -> &str {
    let without_fragment = path.split('#').next().unwrap_or("");
    without_fragment
        .find('?')
        .and_then(|i| without_fragment.get(i..))
        .unwrap_or("")
}

/// Where a request's tenant came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantSource<'a> {
    /// The configured tenant header, trusted (a trusted hop sets or strips it).
    TrustedHeader(&'a str),
    /// The configured tenant header, within the namespace of the caller's key (or of the
    /// default tenant, when there is no key).
    HeaderUnderKey {
        /// The header's value.
        header: &'a str,
        /// The caller's `Authorization`, if any.
        authorization: Option<&'a str>,
    },
    /// The caller's `Authorization` header.
    Key(&'a str),
    /// Neither: the configured default tenant.
    Default(&'a str),
}

impl<'a> TenantSource<'a> {
    /// The source of a request's tenant: the tenant header's value (if a header is configured
    /// and present), the caller's `Authorization` (if present), whether the header is trusted,
    /// and the default tenant. Empty values count as absent.
    pub fn of(
        header: Option<&'a str>,
        authorization: Option<&'a str>,
        header_trusted: bool,
        default_tenant: &'a str,
    ) -> Self {
        let header = header.map(str::trim).filter(|h| !h.is_empty());
        let authorization = authorization.map(str::trim).filter(|a| !a.is_empty());
        match (header, authorization) {
            (Some(h), _) if header_trusted => Self::TrustedHeader(h),
            (Some(h), a) => Self::HeaderUnderKey {
                header: h,
                authorization: a,
            },
            (None, Some(a)) => Self::Key(a),
            (None, None) => Self::Default(default_tenant),
        }
    }
}

/// The bytes that identify a tenant (hashed by [`crate::cache_key::tenant_id`] and fed to the
/// cache key): each source has its own prefix, and the parts are separated by a NUL byte, which
/// no HTTP header value can hold, so no value from one source can spell a tenant of another.
///
/// ```rust
/// use unbusy_core::request::{tenant_identity, TenantSource};
/// let victim = tenant_identity(TenantSource::of(None, Some("Bearer victim"), false, "anonymous"));
/// let forged = tenant_identity(TenantSource::of(Some("Bearer victim"), Some("Bearer mine"), true, "anonymous"));
/// assert_ne!(victim, forged);
/// let nobody = tenant_identity(TenantSource::of(None, None, false, "anonymous"));
/// let named = tenant_identity(TenantSource::of(Some("anonymous"), None, true, "anonymous"));
/// assert_ne!(nobody, named);
/// ```
pub fn tenant_identity(source: TenantSource<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut part = |tag: &[u8], value: &str| {
        if !out.is_empty() {
            out.push(0);
        }
        out.extend_from_slice(tag);
        out.push(0);
        out.extend_from_slice(value.as_bytes());
    };
    match source {
        TenantSource::TrustedHeader(h) => part(b"header", h),
        TenantSource::HeaderUnderKey {
            header,
            authorization,
        } => {
            match authorization {
                Some(a) => part(b"key", a),
                None => part(b"default", ""),
            }
            part(b"header", header);
        }
        TenantSource::Key(a) => part(b"key", a),
        TenantSource::Default(d) => part(b"default", d),
    }
    out
}

/// A request's tenant identity under the `tenancy` configuration, with `header` looking up a
/// request header by its (lower-case) name: the one rule every host applies.
pub fn tenant_of<'a>(
    tenancy: &'a TenancyConfig,
    header: impl Fn(&str) -> Option<&'a str>,
) -> Vec<u8> {
    let named = tenancy
        .header
        .as_deref()
        .and_then(|h| header(&h.to_ascii_lowercase()));
    tenant_identity(TenantSource::of(
        named,
        header("authorization"),
        tenancy.header_trusted,
        &tenancy.default_tenant,
    ))
}

/// The request header that sets a request's priority: `low`, `normal` (the default) or `high`.
pub const PRIORITY_HEADER: &str = "x-unbusy-priority";
/// The request header that sets the caller's own deadline for the whole request: a whole number
/// of milliseconds from now, at least 1. The earlier of it and `deadlines.total_ms` wins.
pub const DEADLINE_HEADER: &str = "x-unbusy-deadline-ms";
/// The request header that overrides the cache rule: `always` (cache whatever the sampling),
/// `never` (neither read nor store), or `default` (the same as no header: deterministic
/// requests only). It cannot turn on a cache the configuration turned off.
pub const CACHE_HEADER: &str = "x-unbusy-cache";
/// `max_tokens` as charged when a request does not say (most providers' default is larger).
pub const DEFAULT_MAX_TOKENS: u64 = 1024;
/// The headers [`read`] reads, besides the configured `tenancy.header`: a host that copies
/// headers across a boundary (the npm package into its wasm module) copies these.
pub const READ_HEADERS: [&str; 4] = [
    "authorization",
    PRIORITY_HEADER,
    DEADLINE_HEADER,
    CACHE_HEADER,
];

/// What a managed chat/completions request asks for, read by [`read`].
#[derive(Debug, Clone, PartialEq)]
pub struct RequestInfo {
    /// Its tenant ([`tenant_of`], hashed by [`tenant_id`]): scopes limits and the cache.
    pub tenant: u64,
    /// From [`PRIORITY_HEADER`].
    pub priority: Priority,
    /// From [`DEADLINE_HEADER`]: how long from admission the caller waits at most.
    pub deadline_in: Option<Nanos>,
    /// From [`CACHE_HEADER`].
    pub cache: OptIn,
    /// The body's `model` (empty when it has none, or not a string).
    pub model: String,
    /// Whether the body's `stream` is `true`.
    pub stream: bool,
    /// The body's `max_tokens`, when it is a whole number.
    pub max_tokens: Option<u64>,
    /// What it is charged against token limits ([`estimate_tokens`]).
    pub estimated_tokens: u64,
    /// Its tenant-scoped cache key, when the cache is enabled and the request is cacheable
    /// ([`crate::cache_key`], with the [`CACHE_HEADER`] opt-in).
    pub cache_key: Option<CacheKey>,
}

impl RequestInfo {
    /// The engine's view of the request, admitted at `now` with what the cache holds for it.
    pub fn meta(&self, now: Instant, cached: CacheLookup) -> RequestMeta {
        RequestMeta {
            tenant: self.tenant,
            model: self.model.clone(),
            stream: self.stream,
            priority: self.priority,
            estimated_tokens: self.estimated_tokens,
            deadline: self.deadline_in.map(|d| now + d),
            cache_key: self.cache_key,
            cached,
        }
    }
}

/// Why a request was refused before admission: always a 400 `invalid_request_error` (no retry
/// will help), with a message that says what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    /// What is wrong, for the caller.
    pub message: String,
}

impl BadRequest {
    /// The `x-unbusy` note of the refusal.
    pub const NOTE: &'static str = "refused=bad_request";

    /// The OpenAI-shaped 400 every host answers with.
    pub fn reply(&self) -> LocalReply {
        local_reply(ReplyKind::BadRequest, &self.message, None)
    }
}

/// Reads a managed request: `headers` are its `(name, value)` pairs (names matched without
/// regard to case; a header whose value is empty or only spaces and tabs counts as absent; a
/// per-request header given more than once counts as its values joined by `, `), `body` its
/// whole body. The one rule every host applies before admission.
///
/// Refused with a [`BadRequest`]: a body that is not a JSON object, and a per-request header
/// with a value it does not define (a typo such as `x-unbusy-priority: hihg` or
/// `x-unbusy-deadline-ms: 1.5s` would otherwise be silently ignored, and the caller would
/// believe it had a priority or a deadline it does not have). Keywords are matched without
/// regard to ASCII case.
///
/// ```rust
/// use unbusy_core::config::Config;
/// use unbusy_core::engine::Priority;
/// use unbusy_core::request::read;
/// let config = Config::from_json(br#"{"providers":[{"name":"p","base_url":"http://p"}]}"#)?;
/// let body = br#"{"model":"deepseek-chat","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
/// let headers = [("authorization", "Bearer sk-1"), ("x-unbusy-priority", "high")];
/// let r = read(&headers, body, &config).unwrap();
/// assert_eq!((r.model.as_str(), r.stream, r.priority), ("deepseek-chat", false, Priority::High));
/// assert!(r.cache_key.is_some());
/// let typo = read(&[("x-unbusy-priority", "hihg")], body, &config).unwrap_err();
/// assert!(typo.message.contains("x-unbusy-priority"));
/// # Ok::<(), unbusy_core::config::ConfigErrors>(())
/// ```
pub fn read(
    headers: &[(&str, &str)],
    body: &[u8],
    config: &Config,
) -> Result<RequestInfo, BadRequest> {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim_ascii())
            .filter(|v| !v.is_empty())
    };
    let (priority, cache, deadline) = (
        list(headers, PRIORITY_HEADER),
        list(headers, CACHE_HEADER),
        list(headers, DEADLINE_HEADER),
    );
    const PRIORITIES: [Priority; 3] = [Priority::Normal, Priority::Low, Priority::High];
    let priority = keyword(priority.as_deref(), &["normal", "low", "high"])
        .map_err(|v| bad_header(PRIORITY_HEADER, v, "low, normal or high"))?
        .and_then(|i| PRIORITIES.get(i).copied())
        .unwrap_or_default();
    const OPT_INS: [OptIn; 3] = [OptIn::Default, OptIn::Always, OptIn::Never];
    let cache = keyword(cache.as_deref(), &["default", "always", "never"])
        .map_err(|v| bad_header(CACHE_HEADER, v, "always, never or default"))?
        .and_then(|i| OPT_INS.get(i).copied())
        .unwrap_or_default();
    let deadline_in = match deadline.as_deref() {
        None => None,
        Some(v) => match whole_ms(v) {
            Some(n) if n > 0 => Some(ms(n)),
            _ => {
                return Err(bad_header(
                    DEADLINE_HEADER,
                    v,
                    "a whole number of milliseconds, at least 1",
                ))
            }
        },
    };
    let v = match json::parse_shallow(body) {
        Ok(v @ json::Value::Object(_)) => v,
        Ok(_) => return Err(bad("the request body must be a JSON object".into())),
        Err(e) => {
            let mut m = String::from("the request body is not valid JSON: ");
            m.push_str(e.what);
            m.push_str(" at byte ");
            json::write_u64(&mut m, e.at as u64);
            return Err(bad(m));
        }
    };
    let max_tokens = v.get("max_tokens").and_then(json::Value::as_u64);
    let identity = tenant_of(&config.tenancy, header);
    // Without an opt-in, only a request whose top-level `temperature` is a zero number can
    // have a key (`cache_key`'s determinism rule): any other is told apart here, from the
    // fields already read, without canonicalising the whole conversation for nothing.
    let sampled = cache == OptIn::Default
        && !matches!(v.get("temperature"), Some(json::Value::Number(t))
            if crate::cache_key::is_zero(t.as_str().as_bytes()));
    let cache_key = if config.cache.enabled && !sampled {
        cache_key(&KeyRequest {
            tenant: &identity,
            endpoint: "/v1/chat/completions",
            body,
            opt_in: cache,
        })
        .ok()
    } else {
        None
    };
    Ok(RequestInfo {
        tenant: tenant_id(&identity),
        priority,
        deadline_in,
        cache,
        model: v
            .get("model")
            .and_then(json::Value::as_str)
            .unwrap_or("")
            .into(),
        stream: v
            .get("stream")
            .and_then(json::Value::as_bool)
            .unwrap_or(false),
        max_tokens,
        estimated_tokens: estimate_tokens(body, max_tokens),
        cache_key,
    })
}

/// Which of `words` a keyword header's value is (ASCII case ignored): `Ok(None)` when the
/// header is absent, `Err` with the value when it is none of them.
fn keyword<'v>(value: Option<&'v str>, words: &[&str]) -> Result<Option<usize>, &'v str> {
    let Some(v) = value else {
        return Ok(None);
    };
    match words.iter().position(|w| w.eq_ignore_ascii_case(v)) {
        Some(i) => Ok(Some(i)),
        None => Err(v),
    }
}

/// A per-request header's value; one given more than once is one list, joined by commas as HTTP
/// defines (and as fetch's `Headers` joins it), so every host sees the same value.
#[inline(never)]
fn list<'a>(headers: &[(&str, &'a str)], name: &str) -> Option<Cow<'a, str>> {
    let mut all: Option<Cow<'a, str>> = None;
    for (_, v) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)) {
        let v = v.trim_ascii();
        match &mut all {
            None => all = Some(Cow::Borrowed(v)),
            Some(list) => {
                let list = list.to_mut();
                list.push_str(", ");
                list.push_str(v);
            }
        }
    }
    all.filter(|v| !v.is_empty())
}

fn bad(message: String) -> BadRequest {
    BadRequest { message }
}

fn bad_header(name: &str, value: &str, allowed: &str) -> BadRequest {
    // The value is quoted as JSON, cut short: it is the caller's own, but may be long.
    let mut end = value.len().min(40);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    let mut m = String::from(name);
    m.push_str(" must be ");
    m.push_str(allowed);
    m.push_str(", not ");
    json::write_str(&mut m, value.get(..end).unwrap_or(""));
    bad(m)
}

/// Decimal digits only (no sign, no fraction, no unit), saturating.
fn whole_ms(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

/// The tokens a request is charged before anyone counted them: its body's
/// [`content_bytes`] / 4, rounded up, plus `max_tokens` ([`DEFAULT_MAX_TOKENS`] when absent).
/// See the module's documentation for why UTF-8 bytes.
///
/// ```rust
/// use unbusy_core::request::estimate_tokens;
/// // The same Chinese prompt, raw or escaped as Python's json.dumps writes it: the same charge.
/// let raw = r#"{"messages":[{"role":"user","content":"你好"}]}"#;
/// let escaped = r#"{"messages": [{"role": "user", "content": "\u4f60\u597d"}]}"#;
/// assert_eq!(estimate_tokens(raw.as_bytes(), None), estimate_tokens(escaped.as_bytes(), None));
/// assert_eq!(estimate_tokens(raw.as_bytes(), Some(100)), (raw.len() as u64).div_ceil(4) + 100);
/// ```
pub fn estimate_tokens(body: &[u8], max_tokens: Option<u64>) -> u64 {
    content_bytes(body)
        .div_ceil(4)
        .saturating_add(max_tokens.unwrap_or(DEFAULT_MAX_TOKENS))
}

/// The UTF-8 size of a JSON text as it would be written compactly and unescaped: whitespace
/// outside strings is not counted, and an escape counts as the UTF-8 bytes of the character it
/// stands for (`\u4f60` as 3, `\n` as 1, a surrogate pair as 4). Bytes that are not JSON are
/// counted as they are.
pub fn content_bytes(body: &[u8]) -> u64 {
    let (mut n, mut i, mut in_string) = (0u64, 0usize, false);
    while let Some(&b) = body.get(i) {
        i += 1;
        n += match (in_string, b) {
            (false, b' ' | b'\t' | b'\n' | b'\r') => 0,
            (_, b'"') => {
                in_string = !in_string;
                1
            }
            (true, b'\\') => {
                let escaped = body.get(i).copied();
                i += 1;
                if escaped != Some(b'u') {
                    1
                } else {
                    // `\uXXXX`: each half of a surrogate pair counts 2 (the pair is 4 bytes).
                    let unit = body
                        .get(i..i + 4)
                        .unwrap_or_default()
                        .iter()
                        .try_fold(0u32, |c, &d| Some(c << 4 | char::from(d).to_digit(16)?));
                    i += 4;
                    match unit {
                        Some(0..=0x7F) => 1,
                        Some(0x80..=0x7FF | 0xD800..=0xDFFF) => 2,
                        _ => 3,
                    }
                }
            }
            _ => 1,
        };
    }
    n
}

/// The body an attempt sends, when its [`Rewrite`] changes the body: the model replaced, and
/// `max_tokens` capped (set to the cap when absent). Only those members change; the rest is
/// written back as the caller sent it. `None` when nothing changes (or the body is not JSON,
/// which [`read`] refuses before any attempt).
pub fn rewrite_body(body: &[u8], rewrite: &Rewrite) -> Option<Vec<u8>> {
    if rewrite.model.is_none() && rewrite.max_tokens_cap.is_none() {
        return None;
    }
    let mut v = json::parse(body).ok()?;
    if let Some(m) = &rewrite.model {
        v.set("model", json::Value::String(m.clone()));
    }
    if let Some(cap) = rewrite.max_tokens_cap {
        let current = v.get("max_tokens").and_then(json::Value::as_u64);
        let capped = current.map_or(u64::from(cap), |c| c.min(u64::from(cap)));
        v.set("max_tokens", json::Value::from_u64(capped));
    }
    Some(v.to_text().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    /// `read` tells a sampled request apart before canonicalising it: for every spelling of
    /// `temperature` (and `n`, and the opt-in header), it has a key exactly when `cache_key`
    /// gives one.
    #[test]
    fn the_sampled_shortcut_agrees_with_the_cache_key() {
        let config =
            Config::from_json(br#"{"providers":[{"name":"p","base_url":"http://p"}]}"#).unwrap();
        let temperatures = [
            "", "0", "0.0", "-0", "0e5", "0E-3", "0.000", "0.7", "1", "1e-400", "null", "\"0\"",
            "true", "[]", "{}",
        ];
        for t in temperatures {
            for n in ["", ",\"n\":1", ",\"n\":2", ",\"n\":null", ",\"n\":1.0"] {
                for opt_in in [None, Some("always"), Some("never"), Some("default")] {
                    let body = if t.is_empty() {
                        format!(r#"{{"model":"m","messages":[]{n}}}"#)
                    } else {
                        format!(r#"{{"model":"m","temperature":{t},"messages":[]{n}}}"#)
                    };
                    let mut headers = alloc::vec![("authorization", "Bearer k")];
                    if let Some(o) = opt_in {
                        headers.push((CACHE_HEADER, o));
                    }
                    let info = read(&headers, body.as_bytes(), &config).unwrap();
                    let identity = tenant_of(&config.tenancy, |name: &str| {
                        headers
                            .iter()
                            .find(|(h, _)| h.eq_ignore_ascii_case(name))
                            .map(|(_, v)| *v)
                    });
                    let expected = cache_key(&KeyRequest {
                        tenant: &identity,
                        endpoint: "/v1/chat/completions",
                        body: body.as_bytes(),
                        opt_in: info.cache,
                    })
                    .ok();
                    assert_eq!(info.cache_key, expected, "{body} {opt_in:?}");
                }
            }
        }
    }

    #[test]
    fn every_base_url_shape_gets_the_endpoint_once() {
        let bases = [
            ("https://api.deepseek.com", "/chat/completions"),
            ("https://api.deepseek.com/", "/chat/completions"),
            ("https://api.deepseek.com/v1", "/v1/chat/completions"),
            ("https://api.openai.com/v1/", "/v1/chat/completions"),
            (
                "https://gw.example/openai/v1",
                "/openai/v1/chat/completions",
            ),
            (
                "https://open.bigmodel.cn/api/paas/v4",
                "/api/paas/v4/chat/completions",
            ),
            ("http://127.0.0.1:8080", "/chat/completions"),
        ];
        let callers = [
            "/v1/chat/completions",
            "/chat/completions",
            "https://api.deepseek.com/v1/chat/completions",
            "/openai/v1/chat/completions/",
        ];
        for caller in callers {
            let (e, rest) = Endpoint::of_path(caller).expect(caller);
            assert_eq!((e, rest), (Endpoint::ChatCompletions, ""));
            for (base, want) in bases {
                assert_eq!(
                    e.under(base, rest, query_of(caller)),
                    want,
                    "{caller} to {base}"
                );
            }
        }
    }

    #[test]
    fn only_known_endpoints_are_recognised() {
        for p in [
            "/v1/files/abc",
            "/v1/chat",
            "/v1/completionsx",
            "/v1/xcompletions",
            "/v1/audio/speech",
            "/v1/fine_tuning/jobs",
            "",
            "/",
            "/v1/models/a/b",
        ] {
            assert_eq!(Endpoint::of_path(p), None, "{p}");
        }
        assert_eq!(
            Endpoint::of_path("completions"),
            Some((Endpoint::Completions, ""))
        );
        assert_eq!(
            Endpoint::of_path("/v1/embeddings"),
            Some((Endpoint::Embeddings, ""))
        );
        assert_eq!(Endpoint::of_path("/models"), Some((Endpoint::Models, "")));
    }

    #[test]
    fn only_known_endpoints_with_their_own_methods_get_a_providers_key() {
        let refuse = EndpointsConfig::default();
        let caller = EndpointsConfig {
            passthrough: Passthrough::CallerKey,
        };
        for (method, path, want) in [
            ("POST", "/v1/chat/completions", Handling::Managed),
            ("POST", "/chat/completions?x=1", Handling::Managed),
            (
                "POST",
                "/v1/completions",
                Handling::ProviderKey(Endpoint::Completions),
            ),
            (
                "POST",
                "/v1/embeddings",
                Handling::ProviderKey(Endpoint::Embeddings),
            ),
            ("GET", "/v1/models", Handling::ProviderKey(Endpoint::Models)),
            (
                "HEAD",
                "/v1/models/deepseek-chat",
                Handling::ProviderKey(Endpoint::Models),
            ),
            ("OPTIONS", "/v1/chat/completions", Handling::CallerKey),
        ] {
            assert_eq!(handling(method, path, &refuse), want, "{method} {path}");
            assert_eq!(handling(method, path, &caller), want, "{method} {path}");
        }
        // Everything else: another path, or a known path with a method that lists stored
        // data, deletes or changes something.
        for (method, path) in [
            ("DELETE", "/v1/files/x"),
            ("GET", "/v1/files"),
            ("POST", "/v1/files"),
            ("POST", "/v1/fine_tuning/jobs"),
            ("GET", "/v1/chat/completions"),
            ("GET", "/v1/chat/completions/abc"),
            ("DELETE", "/v1/chat/completions/abc"),
            ("DELETE", "/v1/models/ft-1"),
            ("POST", "/v1/models"),
            ("GET", "/v1/embeddings"),
            ("post", "/v1/chat/completions"),
            ("POST", "/"),
            ("GET", ""),
        ] {
            assert_eq!(
                handling(method, path, &refuse),
                Handling::Refuse,
                "{method} {path}"
            );
            assert_eq!(
                handling(method, path, &caller),
                Handling::CallerKey,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn queries_are_kept_and_fragments_dropped() {
        assert_eq!(query_of("/v1/chat/completions?a=1&b=2"), "?a=1&b=2");
        assert_eq!(query_of("/v1/chat/completions#x?y"), "");
        assert_eq!(query_of("/v1/chat/completions"), "");
    }

    #[test]
    fn no_value_of_one_source_names_a_tenant_of_another() {
        let values = ["", "anonymous", "Bearer victim", "key", "header", "acme"];
        let mut seen: Vec<(Vec<u8>, &str)> = Vec::new();
        for trusted in [false, true] {
            for h in values.iter().map(|v| Some(*v)).chain([None]) {
                for a in values.iter().map(|v| Some(*v)).chain([None]) {
                    let s = TenantSource::of(h, a, trusted, "anonymous");
                    let id = tenant_identity(s);
                    let label = match s {
                        TenantSource::TrustedHeader(_) => "trusted header",
                        TenantSource::HeaderUnderKey { .. } => "header under key",
                        TenantSource::Key(_) => "key",
                        TenantSource::Default(_) => "default",
                    };
                    for (other, other_label) in &seen {
                        if *other == id {
                            assert_eq!(*other_label, label, "{h:?} {a:?} {trusted}");
                        }
                    }
                    seen.push((id, label));
                }
            }
        }
        // An untrusted header stays within the caller's key.
        let mine = tenant_identity(TenantSource::of(
            Some("acme"),
            Some("Bearer me"),
            false,
            "d",
        ));
        let theirs = tenant_identity(TenantSource::of(
            Some("acme"),
            Some("Bearer you"),
            false,
            "d",
        ));
        assert_ne!(mine, theirs);
        // A trusted one names the tenant whatever the key.
        let a = tenant_identity(TenantSource::of(Some("acme"), Some("Bearer me"), true, "d"));
        let b = tenant_identity(TenantSource::of(
            Some("acme"),
            Some("Bearer you"),
            true,
            "d",
        ));
        assert_eq!(a, b);
    }

    fn config(json: &str) -> Config {
        Config::from_json(json.as_bytes()).unwrap()
    }

    const PROVIDERS: &str = r#"{"providers":[{"name":"p","base_url":"http://p"}]}"#;
    const DETERMINISTIC: &[u8] =
        br#"{"model":"m","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
    const SAMPLED: &[u8] =
        br#"{"model":"m","temperature":0.7,"stream":true,"max_tokens":300,"messages":[]}"#;

    #[test]
    fn the_per_request_headers_are_read_the_same_for_every_host() {
        let c = config(PROVIDERS);
        let plain = read(&[], DETERMINISTIC, &c).unwrap();
        assert_eq!(plain.priority, Priority::Normal);
        assert_eq!(plain.deadline_in, None);
        assert_eq!(plain.cache, OptIn::Default);
        assert!(plain.cache_key.is_some(), "temperature 0 is cacheable");
        assert_eq!((plain.model.as_str(), plain.stream), ("m", false));
        for (value, want) in [
            ("low", Priority::Low),
            ("normal", Priority::Normal),
            ("high", Priority::High),
            (" HIGH ", Priority::High),
            ("Low", Priority::Low),
        ] {
            let r = read(&[("x-unbusy-priority", value)], DETERMINISTIC, &c).unwrap();
            assert_eq!(r.priority, want, "{value:?}");
        }
        let r = read(&[("X-Unbusy-Deadline-Ms", "1500")], DETERMINISTIC, &c).unwrap();
        assert_eq!(r.deadline_in, Some(ms(1500)));
        let at = Instant::from_nanos;
        assert_eq!(
            r.meta(at(ms(10)), CacheLookup::Miss).deadline,
            Some(at(ms(1510)))
        );
        let huge = read(
            &[(DEADLINE_HEADER, "99999999999999999999999")],
            DETERMINISTIC,
            &c,
        );
        assert_eq!(huge.unwrap().deadline_in, Some(u64::MAX));
        // The cache opt-in: `always` caches what sampling would not, `never` nothing.
        let sampled = read(&[], SAMPLED, &c).unwrap();
        assert_eq!(sampled.cache_key, None);
        let always = read(&[("x-unbusy-cache", "always")], SAMPLED, &c).unwrap();
        assert_eq!(always.cache, OptIn::Always);
        assert!(always.cache_key.is_some());
        let never = read(&[("x-unbusy-cache", "never")], DETERMINISTIC, &c).unwrap();
        assert_eq!(never.cache_key, None);
        let default = read(&[("x-unbusy-cache", "default")], DETERMINISTIC, &c).unwrap();
        assert_eq!(default.cache_key, plain.cache_key);
        // ...and it cannot turn on a cache the configuration turned off.
        let off = config(
            r#"{"providers":[{"name":"p","base_url":"http://p"}],"cache":{"enabled":false}}"#,
        );
        let r = read(&[("x-unbusy-cache", "always")], SAMPLED, &off).unwrap();
        assert_eq!(r.cache_key, None);
        // An empty value is no header (as for the tenant's headers).
        let empty = read(
            &[
                (PRIORITY_HEADER, ""),
                (DEADLINE_HEADER, " "),
                (CACHE_HEADER, ""),
            ],
            DETERMINISTIC,
            &c,
        )
        .unwrap();
        assert_eq!(empty, plain);
        // A repeated header is one list, as fetch's Headers joins it: no keyword.
        let twice = read(
            &[(PRIORITY_HEADER, "low"), (PRIORITY_HEADER, "high")],
            DETERMINISTIC,
            &c,
        );
        let joined = read(&[(PRIORITY_HEADER, "low, high")], DETERMINISTIC, &c);
        assert_eq!(twice.unwrap_err(), joined.unwrap_err());
        let e = read(
            &[(DEADLINE_HEADER, "5"), (DEADLINE_HEADER, "6")],
            DETERMINISTIC,
            &c,
        );
        assert!(e.unwrap_err().message.ends_with(r#"not "5, 6""#));
    }

    #[test]
    fn a_header_value_it_does_not_define_is_a_bad_request_naming_the_header() {
        let c = config(PROVIDERS);
        for (name, value, says) in [
            (PRIORITY_HEADER, "urgent", "low, normal or high"),
            (PRIORITY_HEADER, "\u{fffd}", "low, normal or high"), // a non-UTF-8 byte, read lossily
            (CACHE_HEADER, "force", "always, never or default"),
            (CACHE_HEADER, "no-store", "always, never or default"),
            (DEADLINE_HEADER, "0", "at least 1"),
            (DEADLINE_HEADER, "-5", "whole number"),
            (DEADLINE_HEADER, "1.5", "whole number"),
            (DEADLINE_HEADER, "2s", "whole number"),
            (DEADLINE_HEADER, "+100", "whole number"),
        ] {
            let e = read(&[(name, value)], DETERMINISTIC, &c).unwrap_err();
            assert!(e.message.starts_with(name), "{}", e.message);
            assert!(e.message.contains(says), "{}", e.message);
            let reply = e.reply();
            assert_eq!(reply.status, 400);
            assert!(
                reply.body.contains("invalid_request_error"),
                "{}",
                reply.body
            );
        }
        // A long value is quoted cut short, as JSON.
        let long = "x".repeat(1000);
        let e = read(&[(PRIORITY_HEADER, long.as_str())], DETERMINISTIC, &c).unwrap_err();
        assert!(e.message.len() < 120, "{}", e.message);
    }

    #[test]
    fn a_body_that_is_not_a_json_object_is_a_bad_request() {
        let c = config(PROVIDERS);
        for (body, says) in [
            (&b"{\"model\":"[..], "not valid JSON"),
            (b"[1,2]", "must be a JSON object"),
            (b"", "not valid JSON"),
            (b"{\"a\":1,\"a\":2}", "not valid JSON"),
        ] {
            let e = read(&[], body, &c).unwrap_err();
            assert!(e.message.contains(says), "{}", e.message);
        }
        // A stream request, its max_tokens and a model that is not a string.
        let r = read(&[], br#"{"model":5,"stream":true,"max_tokens":77}"#, &c).unwrap();
        assert_eq!(
            (r.model.as_str(), r.stream, r.max_tokens),
            ("", true, Some(77))
        );
    }

    #[test]
    fn the_tenant_is_tenant_of_and_scopes_the_cache_key() {
        let c = config(
            r#"{"providers":[{"name":"p","base_url":"http://p"}],"tenancy":{"header":"X-Tenant"}}"#,
        );
        let headers = [("authorization", "Bearer a"), ("x-tenant", "t1")];
        let r = read(&headers, DETERMINISTIC, &c).unwrap();
        let identity = tenant_of(&c.tenancy, |n| {
            headers.iter().find(|(h, _)| *h == n).map(|(_, v)| *v)
        });
        assert_eq!(r.tenant, tenant_id(&identity));
        let other = read(
            &[("authorization", "Bearer b"), ("x-tenant", "t1")],
            DETERMINISTIC,
            &c,
        )
        .unwrap();
        assert_ne!(other.tenant, r.tenant);
        assert_ne!(other.cache_key, r.cache_key);
    }

    #[test]
    fn a_chinese_prompt_costs_the_same_however_it_is_encoded() {
        // As a JS client writes it (raw UTF-8), as Python's json.dumps does (escaped, spaced),
        // and pretty-printed: one charge.
        let raw = r#"{"model":"deepseek-chat","messages":[{"role":"user","content":"请用三句话介绍长城"}]}"#;
        let escaped = r#"{"model": "deepseek-chat", "messages": [{"role": "user", "content": "\u8bf7\u7528\u4e09\u53e5\u8bdd\u4ecb\u7ecd\u957f\u57ce"}]}"#;
        let pretty = "{\n  \"model\": \"deepseek-chat\",\n  \"messages\": [\n    {\"role\": \"user\", \"content\": \"请用三句话介绍长城\"}\n  ]\n}";
        let want = (raw.len() as u64).div_ceil(4) + DEFAULT_MAX_TOKENS;
        for body in [raw, escaped, pretty] {
            assert_eq!(content_bytes(body.as_bytes()), raw.len() as u64, "{body}");
            assert_eq!(estimate_tokens(body.as_bytes(), None), want, "{body}");
            let c = config(PROVIDERS);
            assert_eq!(
                read(&[], body.as_bytes(), &c).unwrap().estimated_tokens,
                want
            );
        }
        // Nine Chinese characters are 27 bytes: about 7 tokens, as tokenizers count them
        // (UTF-16 units would say 2).
        let nine = "请用三句话介绍长城";
        assert_eq!(content_bytes(format!("\"{nine}\"").as_bytes()), 29);
        // Other escapes: one byte each; a surrogate pair is one 4-byte character; escaped
        // quotes and backslashes do not end the string.
        assert_eq!(content_bytes(br#""a\nb\"c\\""#), 8);
        assert_eq!(content_bytes(br#""\ud83d\ude00""#), 2 + 4);
        assert_eq!(content_bytes("\"😀\"".as_bytes()), 2 + 4);
        assert_eq!(content_bytes(br#""\u00e9 \u0041""#), 2 + 2 + 1 + 1);
        assert_eq!(content_bytes(br#"{"a" : [1, 2]}"#), 11);
        assert_eq!(estimate_tokens(b"", Some(5)), 5);
        assert_eq!(estimate_tokens(b"{}", Some(u64::MAX)), u64::MAX);
    }

    #[test]
    fn a_rewrite_changes_only_the_model_and_max_tokens() {
        let body =
            br#"{"model":"big","max_tokens":4000,"messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(rewrite_body(body, &Rewrite::default()), None);
        let both = Rewrite {
            model: Some("small".into()),
            max_tokens_cap: Some(256),
            ..Rewrite::default()
        };
        assert_eq!(
            rewrite_body(body, &both).unwrap(),
            br#"{"model":"small","max_tokens":256,"messages":[{"role":"user","content":"hi"}]}"#
        );
        // A cap above the caller's max_tokens leaves it; none is set to the cap.
        let cap = Rewrite {
            max_tokens_cap: Some(8000),
            ..Rewrite::default()
        };
        assert_eq!(rewrite_body(body, &cap).unwrap(), body.to_vec());
        let bare = br#"{"model":"m"}"#;
        assert_eq!(
            rewrite_body(bare, &cap).unwrap(),
            br#"{"model":"m","max_tokens":8000}"#
        );
        assert_eq!(rewrite_body(b"not json", &cap), None);
    }

    #[test]
    fn freshness_is_fresh_then_stale_then_expired() {
        use crate::config::CacheConfig;
        let cache = CacheConfig {
            ttl_ms: 100,
            stale_ttl_ms: 50,
            ..CacheConfig::default()
        };
        assert_eq!(CacheLookup::for_age(0, &cache), CacheLookup::Fresh);
        assert_eq!(
            CacheLookup::for_age(ms(100) - 1, &cache),
            CacheLookup::Fresh
        );
        assert_eq!(CacheLookup::for_age(ms(100), &cache), CacheLookup::Stale);
        assert_eq!(
            CacheLookup::for_age(ms(150) - 1, &cache),
            CacheLookup::Stale
        );
        assert_eq!(CacheLookup::for_age(ms(150), &cache), CacheLookup::Miss);
        assert_eq!(CacheLookup::for_age(u64::MAX, &cache), CacheLookup::Miss);
        let no_stale = CacheConfig {
            stale_ttl_ms: 0,
            ..cache
        };
        assert_eq!(CacheLookup::for_age(ms(100), &no_stale), CacheLookup::Miss);
    }
}
