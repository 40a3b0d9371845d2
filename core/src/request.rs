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

use crate::config::{EndpointsConfig, Passthrough, TenancyConfig};
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
