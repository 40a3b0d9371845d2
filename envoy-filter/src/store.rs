//! The filter's side of `unbusy-store`'s protocol (`docs/store.md`): the requests it will send
//! with `dispatch_http_call` and how it reads the answers, pure and host-free so they are
//! tested natively. The filter uses the cache calls (`state::l2`) and the quota calls
//! ([`crate::quota`]); the semaphore and pause calls are not wired yet (`docs/store.md`).
//!
//! Every reader fails open: anything but the expected status and shape is `None`, which the
//! caller treats as "the store knows nothing" (a cache miss, no lease, no pause), never as a
//! refusal.

use unbusy_core::cache_key::CacheKey;
use unbusy_core::json::{self, Value};

/// The `:authority` of every call: the store ignores it, Envoy requires one.
pub const AUTHORITY: &str = "unbusy-store";

/// One request to the store, ready for [`crate::host::Host::dispatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: &'static str,
    pub path: String,
    /// Extra headers beyond the pseudo-headers.
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Call {
    /// The header list `dispatch` takes: pseudo-headers first.
    pub fn header_pairs(&self) -> Vec<(&str, &str)> {
        let mut h = vec![
            (":method", self.method),
            (":path", self.path.as_str()),
            (":authority", AUTHORITY),
        ];
        h.extend(self.headers.iter().map(|(k, v)| (*k, v.as_str())));
        h
    }
}

fn json_call(path: &str, body: String) -> Call {
    Call {
        method: "POST",
        path: path.into(),
        headers: vec![("content-type", "application/json".into())],
        body: body.into_bytes(),
    }
}

/// Where an answer lives: the tenant id and the core's (tenant-scoped) key, both in hex.
pub fn cache_path(tenant: u64, key: CacheKey) -> String {
    format!("/v1/cache/{tenant:016x}/{:032x}", key.0)
}

/// An L2 lookup, made on an L1 miss.
pub fn cache_get(tenant: u64, key: CacheKey) -> Call {
    Call {
        method: "GET",
        path: cache_path(tenant, key),
        headers: Vec::new(),
        body: Vec::new(),
    }
}

/// A write-back of a valid answer, with the lifetimes of `cache.ttl_ms` and
/// `cache.stale_ttl_ms`.
pub fn cache_put(
    tenant: u64,
    key: CacheKey,
    body: &[u8],
    content_type: &str,
    ttl_ms: u64,
    stale_ttl_ms: u64,
) -> Call {
    Call {
        method: "PUT",
        path: cache_path(tenant, key),
        headers: vec![
            ("content-type", content_type.into()),
            ("x-unbusy-ttl-ms", ttl_ms.to_string()),
            ("x-unbusy-stale-ttl-ms", stale_ttl_ms.to_string()),
        ],
        body: body.to_vec(),
    }
}

/// An answer the L2 cache had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub body: Vec<u8>,
    pub content_type: String,
    /// By Redis's clock, so the same for every proxy: judge it with `CacheLookup::for_age`.
    pub age_ms: u64,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A call's answer's status (`None`: no answer, as Envoy reports a timeout or a reset).
pub fn status(headers: &[(String, String)]) -> Option<u16> {
    header(headers, ":status").and_then(|s| s.parse().ok())
}

/// The answer to [`cache_get`]: `None` on a miss, an error, or an encoded answer (the filter
/// asks providers for `identity` and caches what it judged; anything else is not ours).
pub fn read_cached(headers: &[(String, String)], body: Vec<u8>) -> Option<Cached> {
    if status(headers)? != 200 {
        return None;
    }
    if header(headers, "content-encoding").is_some_and(|e| !e.eq_ignore_ascii_case("identity")) {
        return None;
    }
    let age_ms = header(headers, "x-unbusy-age-ms")?.parse().ok()?;
    let content_type = header(headers, "content-type")
        .unwrap_or("application/json")
        .to_string();
    Some(Cached {
        body,
        content_type,
        age_ms,
    })
}

/// One bucket of a lease request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want<'a> {
    pub name: &'a str,
    pub per_minute: u64,
    pub burst: u64,
    pub want: u64,
}

/// The body of a lease or return call, written bucket by bucket as a proxy's tick finds them
/// (the buckets of one scope one after another), so no list of scopes is built first.
#[derive(Debug)]
pub struct QuotaBody {
    out: String,
    /// The scope being written, once one is.
    scope: Option<String>,
}

impl Default for QuotaBody {
    fn default() -> Self {
        Self {
            out: String::from("{\"leases\":["),
            scope: None,
        }
    }
}

impl QuotaBody {
    /// Adds bucket `name` of `scope` with these numeric fields (`per_minute`, `burst` and
    /// `want` to lease; `units` to return).
    pub fn bucket(&mut self, scope: &str, name: &str, fields: &[(&str, u64)]) {
        let out = &mut self.out;
        if self.scope.as_deref() == Some(scope) {
            out.push(',');
        } else {
            if self.scope.is_some() {
                out.push_str("]},");
            }
            out.push_str("{\"scope\":");
            json::write_str(out, scope);
            out.push_str(",\"buckets\":[");
            self.scope = Some(scope.to_string());
        }
        out.push_str("{\"name\":");
        json::write_str(out, name);
        for (field, n) in fields {
            out.push_str(",\"");
            out.push_str(field);
            out.push_str("\":");
            json::write_u64(out, *n);
        }
        out.push('}');
    }

    /// Whether no bucket was added.
    pub fn is_empty(&self) -> bool {
        self.scope.is_none()
    }

    /// The call: `/v1/quota/lease` or `/v1/quota/return`.
    pub fn call(mut self, path: &str) -> Call {
        if self.scope.is_some() {
            self.out.push_str("]}");
        }
        self.out.push_str("]}");
        json_call(path, self.out)
    }
}

/// A lease call for several scopes (`global`, `tenant:<id hex>`).
pub fn lease(scopes: &[(&str, &[Want<'_>])]) -> Call {
    let mut body = QuotaBody::default();
    for (scope, buckets) in scopes {
        for b in *buckets {
            let fields = [
                ("per_minute", b.per_minute),
                ("burst", b.burst),
                ("want", b.want),
            ];
            body.bucket(scope, b.name, &fields);
        }
    }
    body.call("/v1/quota/lease")
}

/// The answer to [`lease`]: how long the lease may be spent, and the answer, whose grants
/// [`grant`] finds.
pub fn read_lease(headers: &[(String, String)], body: &[u8]) -> Option<(u64, Value)> {
    if status(headers)? != 200 {
        return None;
    }
    let v = json::parse(body).ok()?;
    let lease_ms = v.get("lease_ms")?.as_u64()?;
    Some((lease_ms, v))
}

/// What bucket `name` of `scope` was granted in a lease answer, and when the next unit fits
/// (ms): `None` if the answer does not say (nothing granted).
pub fn grant(answer: &Value, scope: &str, name: &str) -> Option<(u64, u64)> {
    let Value::Array(scopes) = answer.get("leases")? else {
        return None;
    };
    let s = scopes
        .iter()
        .find(|s| s.get("scope").and_then(Value::as_str) == Some(scope))?;
    let Value::Array(buckets) = s.get("buckets")? else {
        return None;
    };
    let b = buckets
        .iter()
        .find(|b| b.get("name").and_then(Value::as_str) == Some(name))?;
    Some((
        b.get("granted")?.as_u64()?,
        b.get("retry_after_ms")?.as_u64()?,
    ))
}

/// Sets what this proxy holds of a provider account's concurrency quota (0 releases).
pub fn hold(account: &str, holder: &str, want: u64, limit: u64, lease_ms: u64) -> Call {
    let mut out = String::from("{\"account\":");
    json::write_str(&mut out, account);
    out.push_str(",\"holder\":");
    json::write_str(&mut out, holder);
    for (field, n) in [("want", want), ("limit", limit), ("lease_ms", lease_ms)] {
        out.push_str(",\"");
        out.push_str(field);
        out.push_str("\":");
        json::write_u64(&mut out, n);
    }
    out.push('}');
    json_call("/v1/concurrency/acquire", out)
}

/// The answer to [`hold`]: the slots this proxy now holds.
pub fn read_held(headers: &[(String, String)], body: &[u8]) -> Option<u64> {
    if status(headers)? != 200 {
        return None;
    }
    json::parse(body).ok()?.get("held")?.as_u64()
}

/// Publishes a pause of `provider` for the fleet (an open breaker, a run of hinted 429s).
pub fn publish_pause(provider: &str, for_ms: u64, reason: &str) -> Call {
    let mut out = String::from("{\"for_ms\":");
    json::write_u64(&mut out, for_ms);
    out.push_str(",\"reason\":");
    json::write_str(&mut out, reason);
    out.push('}');
    Call {
        method: "PUT",
        path: format!("/v1/provider/{provider}/pause"),
        headers: vec![("content-type", "application/json".into())],
        body: out.into_bytes(),
    }
}

/// The tick's poll of every provider's pause.
pub fn poll_pauses(providers: &[&str]) -> Call {
    Call {
        method: "GET",
        path: providers.iter().enumerate().fold(
            String::from("/v1/pauses?providers="),
            |mut path, (i, p)| {
                if i > 0 {
                    path.push(',');
                }
                path.push_str(p);
                path
            },
        ),
        headers: Vec::new(),
        body: Vec::new(),
    }
}

/// The answer to [`poll_pauses`]: each paused provider and the ms its pause has left.
pub fn read_pauses(headers: &[(String, String)], body: &[u8]) -> Option<Vec<(String, u64)>> {
    if status(headers)? != 200 {
        return None;
    }
    let v = json::parse(body).ok()?;
    let Value::Object(all) = v.get("pauses")? else {
        return None;
    };
    Some(
        all.iter()
            .filter(|(_, p)| p.get("paused").and_then(Value::as_bool) == Some(true))
            .filter_map(|(name, p)| Some((name.clone(), p.get("remaining_ms")?.as_u64()?)))
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn answer(status: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut h = vec![(":status".to_string(), status.to_string())];
        h.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        h
    }

    #[test]
    fn cache_calls_name_the_tenant_and_the_key_in_hex() {
        let key = CacheKey(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let get = cache_get(0xbeef, key);
        assert_eq!(
            get.path,
            "/v1/cache/000000000000beef/0123456789abcdef0011223344556677"
        );
        let pairs = get.header_pairs();
        assert_eq!(pairs[0], (":method", "GET"));
        assert_eq!(pairs[2], (":authority", AUTHORITY));
        let put = cache_put(1, key, b"{}", "application/json", 300_000, 3_600_000);
        assert_eq!(put.method, "PUT");
        assert!(put
            .headers
            .contains(&("x-unbusy-stale-ttl-ms", "3600000".into())));
        assert_eq!(put.body, b"{}");
    }

    #[test]
    fn a_cached_answer_is_read_and_anything_else_is_a_miss() {
        let hit = answer(
            "200",
            &[
                ("content-type", "text/event-stream"),
                ("x-unbusy-age-ms", "1200"),
            ],
        );
        let c = read_cached(&hit, b"data: x".to_vec()).unwrap();
        assert_eq!(
            (c.age_ms, c.content_type.as_str()),
            (1200, "text/event-stream")
        );
        assert_eq!(read_cached(&answer("404", &[]), Vec::new()), None);
        assert_eq!(read_cached(&answer("503", &[]), Vec::new()), None);
        assert_eq!(read_cached(&[], Vec::new()), None, "a dispatch that failed");
        let gz = answer(
            "200",
            &[("x-unbusy-age-ms", "1"), ("content-encoding", "gzip")],
        );
        assert_eq!(read_cached(&gz, Vec::new()), None);
        let no_age = answer("200", &[]);
        assert_eq!(read_cached(&no_age, Vec::new()), None);
    }

    #[test]
    fn leases_are_asked_and_read_as_the_store_documents() {
        let global = [
            Want {
                name: "requests",
                per_minute: 600,
                burst: 600,
                want: 12,
            },
            Want {
                name: "tokens",
                per_minute: 200_000,
                burst: 200_000,
                want: 8000,
            },
        ];
        let call = lease(&[("global", &global)]);
        assert_eq!(call.path, "/v1/quota/lease");
        let body = json::parse(&call.body).unwrap();
        let b = body.get("leases").unwrap();
        let Value::Array(scopes) = b else { panic!() };
        assert_eq!(scopes[0].get("scope").unwrap().as_str(), Some("global"));
        let reply = br#"{"lease_ms":1000,"leases":[{"scope":"global","buckets":[
            {"name":"requests","granted":12,"retry_after_ms":0},
            {"name":"tokens","granted":5000,"retry_after_ms":40}]}]}"#;
        let (ms, v) = read_lease(&answer("200", &[]), reply).unwrap();
        assert_eq!(ms, 1000);
        assert_eq!(grant(&v, "global", "tokens"), Some((5000, 40)));
        assert_eq!(grant(&v, "global", "requests"), Some((12, 0)));
        assert_eq!(grant(&v, "tenant:01", "requests"), None);
        assert!(read_lease(&answer("503", &[]), reply).is_none());
        let (_, v) = read_lease(&answer("200", &[]), b"{\"lease_ms\":1}").unwrap();
        assert_eq!(
            grant(&v, "global", "requests"),
            None,
            "no grant: nothing granted"
        );
        // Two scopes, and a return.
        let mut back = QuotaBody::default();
        assert!(back.is_empty());
        back.bucket("global", "requests", &[("units", 3)]);
        back.bucket("global", "tokens", &[("units", 400)]);
        back.bucket("tenant:00000000000000ff", "requests", &[("units", 1)]);
        let call = back.call("/v1/quota/return");
        assert_eq!(
            String::from_utf8(call.body).unwrap(),
            r#"{"leases":[{"scope":"global","buckets":[{"name":"requests","units":3},{"name":"tokens","units":400}]},{"scope":"tenant:00000000000000ff","buckets":[{"name":"requests","units":1}]}]}"#
        );
    }

    #[test]
    fn holdings_and_pauses() {
        let call = hold("deepseek", "proxy-1", 4, 10, 5000);
        let v = json::parse(&call.body).unwrap();
        assert_eq!(v.get("want").unwrap().as_u64(), Some(4));
        assert_eq!(
            read_held(&answer("200", &[]), br#"{"held":3,"in_use":10}"#),
            Some(3)
        );
        assert_eq!(read_held(&answer("503", &[]), b"{}"), None);
        let p = publish_pause("deepseek", 5000, "breaker_open");
        assert_eq!(p.path, "/v1/provider/deepseek/pause");
        assert_eq!(poll_pauses(&["a", "b"]).path, "/v1/pauses?providers=a,b");
        let reply = br#"{"pauses":{"a":{"paused":true,"remaining_ms":900,"reason":"retry_after"},"b":{"paused":false}}}"#;
        assert_eq!(
            read_pauses(&answer("200", &[]), reply),
            Some(vec![("a".to_string(), 900)])
        );
        assert_eq!(read_pauses(&answer("200", &[]), b"not json"), None);
    }
}
