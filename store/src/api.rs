//! The HTTP API (`docs/store.md`): routing, validation (every bad input is a 400 that names
//! the field, never a panic), and one Lua script per operation.

use crate::backend::{Backend, Health};
use crate::config::Settings;
use crate::scripts;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use redis::{FromRedisValue, ScriptInvocation};
use serde_json::{json, Map, Value};
use std::convert::Infallible;
use std::sync::Arc;

/// The largest JSON request body (quota, concurrency and pause calls).
const MAX_JSON_BYTES: usize = 256 * 1024;
/// Scopes per lease call, buckets per scope, providers per pause poll: enough for a proxy's
/// whole tick in one call, small enough that one call cannot tie Redis up.
const MAX_SCOPES: usize = 256;
const MAX_BUCKETS: usize = 8;
const MAX_PROVIDERS: usize = 64;
/// Longest cache lifetime (ttl + stale ttl) and pause: 30 days, far beyond any sane setting,
/// and far below what Redis's PX takes.
const MAX_LIFETIME_MS: u64 = 30 * 24 * 3600 * 1000;
/// Rates, bursts and units up to a trillion: tokens per minute of any real account, and small
/// enough that the scripts' doubles stay exact.
const MAX_UNITS: u64 = 1_000_000_000_000;

pub struct Store {
    pub backend: Backend,
    pub health: Health,
    pub settings: Settings,
}

/// Why a call failed, and the status it gets.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound(&'static str),
    MethodNotAllowed,
    TooLarge(String),
    /// Redis is down, timed out, or the cluster is reconfiguring: try again later.
    Unavailable(String),
    /// Redis refused a write because it is out of memory (`maxmemory` with `noeviction`).
    Full,
    /// Redis answered something this store did not expect (a key of the wrong type).
    Internal(String),
}

impl ApiError {
    fn response(&self) -> Response<Full<Bytes>> {
        let (status, kind, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m.clone()),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", (*m).to_string()),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path".to_string(),
            ),
            ApiError::TooLarge(m) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large", m.clone()),
            ApiError::Unavailable(m) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                m.clone(),
            ),
            ApiError::Full => (
                StatusCode::INSUFFICIENT_STORAGE,
                "store_full",
                "redis is out of memory".to_string(),
            ),
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error", m.clone()),
        };
        json_response(
            status,
            &json!({"error": {"type": kind, "message": message}}),
        )
    }
}

type Reply = Result<Response<Full<Bytes>>, ApiError>;

fn json_response(status: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn ok(v: &Value) -> Reply {
    Ok(json_response(StatusCode::OK, v))
}

fn no_content() -> Reply {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

/// The entry point: every request gets an answer, never an error of hyper's.
pub async fn handle(
    store: Arc<Store>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match route(&store, req).await {
        Ok(r) => r,
        Err(e) => e.response(),
    })
}

async fn route(store: &Store, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = req.method().clone();
    match segments.as_slice() {
        ["v1", "health"] => match method {
            Method::GET => health(store).await,
            _ => Err(ApiError::MethodNotAllowed),
        },
        ["v1", "cache", tenant, key] => {
            let redis_key = cache_key(store, tenant, key)?;
            match method {
                Method::GET => cache_get(store, redis_key).await,
                Method::PUT => cache_put(store, redis_key, req).await,
                Method::DELETE => cache_delete(store, redis_key).await,
                _ => Err(ApiError::MethodNotAllowed),
            }
        }
        ["v1", "quota", op @ ("lease" | "return")] => match method {
            Method::POST => quota(store, *op == "lease", json_body(req).await?).await,
            _ => Err(ApiError::MethodNotAllowed),
        },
        ["v1", "concurrency", op @ ("acquire" | "release")] => match method {
            Method::POST => concurrency(store, *op == "acquire", json_body(req).await?).await,
            _ => Err(ApiError::MethodNotAllowed),
        },
        ["v1", "provider", name, "pause"] => {
            let name = id(name, "provider name", false)?;
            match method {
                Method::GET => {
                    let mut all = pauses(store, &[name.to_string()]).await?;
                    ok(&all.remove(name).unwrap_or(Value::Null))
                }
                Method::PUT => pause_put(store, name, json_body(req).await?).await,
                Method::DELETE => {
                    let mut conn = store.backend.clone();
                    let key = format!("{}pause:{name}", store.settings.prefix);
                    let cmd = redis::cmd("DEL").arg(key).to_owned();
                    let _: i64 =
                        run(store, async move { cmd.query_async(&mut conn).await }).await?;
                    no_content()
                }
                _ => Err(ApiError::MethodNotAllowed),
            }
        }
        ["v1", "pauses"] => match method {
            Method::GET => {
                let names = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("providers="))
                    .ok_or_else(|| bad("query parameter providers=NAME[,NAME...] is required"))?;
                let names: Vec<String> = names
                    .split(',')
                    .map(|n| id(n, "provider name", false).map(String::from))
                    .collect::<Result<_, _>>()?;
                if names.len() > MAX_PROVIDERS {
                    return Err(bad(&format!("at most {MAX_PROVIDERS} providers per call")));
                }
                let all = pauses(store, &names).await?;
                ok(&json!({ "pauses": all }))
            }
            _ => Err(ApiError::MethodNotAllowed),
        },
        _ => Err(ApiError::NotFound("no such endpoint (see docs/store.md)")),
    }
}

fn bad(m: &str) -> ApiError {
    ApiError::BadRequest(m.to_string())
}

/// A name that goes into a Redis key: 1 to 128 of `A-Z a-z 0-9 _ . -` (and `:` where allowed,
/// which is only inside a hash tag, so keys stay unambiguous).
fn id<'a>(s: &'a str, what: &str, colon: bool) -> Result<&'a str, ApiError> {
    let fine =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') || (colon && c == ':');
    if s.is_empty() || s.len() > 128 || !s.chars().all(fine) {
        let extra = if colon { ", :" } else { "" };
        return Err(bad(&format!(
            "{what} must be 1 to 128 characters of A-Z a-z 0-9 _ . -{extra}"
        )));
    }
    Ok(s)
}

fn cache_key(store: &Store, tenant: &str, key: &str) -> Result<String, ApiError> {
    let tenant = id(tenant, "tenant", false)?;
    let key = id(key, "cache key", false)?;
    Ok(format!("{}cache:{tenant}:{key}", store.settings.prefix))
}

/// Runs one Redis operation within the store's timeout; an outage is a 503, logged once.
async fn run<T, F>(store: &Store, op: F) -> Result<T, ApiError>
where
    F: std::future::Future<Output = redis::RedisResult<T>>,
{
    let limit = store.settings.timeout;
    match tokio::time::timeout(limit, op).await {
        Err(_) => {
            store.health.failed("timed out");
            Err(ApiError::Unavailable(format!(
                "redis did not answer within {} ms",
                limit.as_millis()
            )))
        }
        Ok(Ok(v)) => {
            store.health.succeeded();
            Ok(v)
        }
        Ok(Err(e)) => {
            if e.code() == Some("OOM") {
                store.health.succeeded();
                return Err(ApiError::Full);
            }
            // A reply this store cannot read is its own bug (500), not an outage; a Redis
            // that is down, loading, failing over or refusing our credentials is an outage.
            let ours = matches!(
                e.kind(),
                redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType
            );
            let outage_code = matches!(
                e.code(),
                None | Some(
                    "LOADING"
                        | "BUSY"
                        | "TRYAGAIN"
                        | "CLUSTERDOWN"
                        | "MASTERDOWN"
                        | "READONLY"
                        | "NOAUTH"
                        | "WRONGPASS"
                        | "MOVED"
                        | "ASK"
                )
            );
            let unavailable = !ours
                && (e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || e.is_cluster_error()
                    || outage_code);
            if unavailable {
                store.health.failed(e.category());
                Err(ApiError::Unavailable(format!(
                    "redis unavailable: {}",
                    e.category()
                )))
            } else {
                store.health.succeeded();
                Err(ApiError::Internal(format!(
                    "redis refused the operation: {}",
                    e.code().unwrap_or(e.category())
                )))
            }
        }
    }
}

async fn invoke<T: FromRedisValue>(
    store: &Store,
    inv: ScriptInvocation<'static>,
) -> Result<T, ApiError> {
    let mut conn = store.backend.clone();
    run(store, async move { inv.invoke_async(&mut conn).await }).await
}

async fn health(store: &Store) -> Reply {
    let mut conn = store.backend.clone();
    let cmd = redis::cmd("PING");
    let _: String = run(store, async move { cmd.query_async(&mut conn).await }).await?;
    ok(&json!({"redis": "ok"}))
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::TooLarge(format!("body larger than {limit} bytes"));
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(_) => Err(bad("the request body could not be read")),
    }
}

async fn json_body(req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
    let body = read_body(req, MAX_JSON_BYTES).await?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("the body must be a JSON object")),
        Err(e) => Err(ApiError::BadRequest(format!("malformed JSON: {e}"))),
    }
}

fn number(
    m: &Map<String, Value>,
    field: &str,
    min: u64,
    max: u64,
    default: Option<u64>,
) -> Result<u64, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => {
            default.ok_or_else(|| ApiError::BadRequest(format!("{field} is required")))
        }
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "{field} must be a whole number from {min} to {max}"
            ))),
        },
    }
}

fn string<'a>(m: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, ApiError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::BadRequest(format!("{field} must be a string"))),
    }
}

fn header_number(
    req: &Request<Incoming>,
    name: &str,
    max: u64,
    default: Option<u64>,
) -> Result<u64, ApiError> {
    match req.headers().get(name) {
        None => default.ok_or_else(|| ApiError::BadRequest(format!("header {name} is required"))),
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) if n <= max => Ok(n),
            _ => Err(ApiError::BadRequest(format!(
                "header {name} must be a whole number of ms from 0 to {max}"
            ))),
        },
    }
}

/// A header value stored and sent back as is: visible ASCII and spaces, at most 256 bytes.
fn header_text(
    req: &Request<Incoming>,
    name: &hyper::header::HeaderName,
) -> Result<String, ApiError> {
    match req.headers().get(name) {
        None => Ok(String::new()),
        Some(v) => match v.to_str() {
            Ok(s) if s.len() <= 256 && s.bytes().all(|b| (0x20..0x7f).contains(&b)) => {
                Ok(s.to_string())
            }
            _ => Err(ApiError::BadRequest(format!(
                "header {name} must be at most 256 bytes of visible ASCII"
            ))),
        },
    }
}

async fn cache_put(store: &Store, key: String, req: Request<Incoming>) -> Reply {
    let ttl = header_number(&req, "x-unbusy-ttl-ms", MAX_LIFETIME_MS, None)?;
    if ttl == 0 {
        return Err(bad("header x-unbusy-ttl-ms must be at least 1"));
    }
    let stale = header_number(
        &req,
        "x-unbusy-stale-ttl-ms",
        MAX_LIFETIME_MS - ttl,
        Some(0),
    )?;
    let mut content_type = header_text(&req, &CONTENT_TYPE)?;
    if content_type.is_empty() {
        content_type = "application/json".into();
    }
    let encoding = header_text(&req, &CONTENT_ENCODING)?;
    let body = read_body(req, store.settings.max_value_bytes).await?;
    let mut inv = scripts::CACHE_PUT.prepare_invoke();
    inv.key(key)
        .arg(body.as_ref())
        .arg(content_type)
        .arg(encoding)
        .arg(ttl)
        .arg(stale);
    let _: i64 = invoke(store, inv).await?;
    no_content()
}

async fn cache_get(store: &Store, key: String) -> Reply {
    let mut inv = scripts::CACHE_GET.prepare_invoke();
    inv.key(key);
    let found: Option<(Vec<u8>, String, String, u64, u64, u64)> = invoke(store, inv).await?;
    let Some((body, content_type, encoding, age, ttl, stale)) = found else {
        return Err(ApiError::NotFound("no cached answer under this key"));
    };
    // The core's rule (`CacheLookup::for_age`): fresh below ttl, stale below ttl + stale ttl.
    let freshness = if age < ttl { "fresh" } else { "stale" };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    let h = r.headers_mut();
    let value = |s: String| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""));
    h.insert(CONTENT_TYPE, value(content_type));
    if !encoding.is_empty() {
        h.insert(CONTENT_ENCODING, value(encoding));
    }
    h.insert("x-unbusy-age-ms", HeaderValue::from(age));
    h.insert("x-unbusy-ttl-ms", HeaderValue::from(ttl));
    h.insert("x-unbusy-stale-ttl-ms", HeaderValue::from(stale));
    h.insert("x-unbusy-freshness", HeaderValue::from_static(freshness));
    Ok(r)
}

async fn cache_delete(store: &Store, key: String) -> Reply {
    let mut conn = store.backend.clone();
    let cmd = redis::cmd("DEL").arg(key).to_owned();
    let _: i64 = run(store, async move { cmd.query_async(&mut conn).await }).await?;
    no_content()
}

/// One scope's buckets, validated.
struct ScopeCall {
    scope: String,
    names: Vec<String>,
    keys: Vec<String>,
    args: Vec<String>,
}

fn scope_call(store: &Store, lease: bool, i: usize, v: &Value) -> Result<ScopeCall, ApiError> {
    let Value::Object(m) = v else {
        return Err(ApiError::BadRequest(format!(
            "leases[{i}] must be an object"
        )));
    };
    let scope = string(m, "scope")?
        .ok_or_else(|| ApiError::BadRequest(format!("leases[{i}].scope is required")))?;
    let scope = id(scope, &format!("leases[{i}].scope"), true)?.to_string();
    let Some(Value::Array(buckets)) = m.get("buckets") else {
        return Err(ApiError::BadRequest(format!(
            "leases[{i}].buckets must be an array"
        )));
    };
    if buckets.is_empty() || buckets.len() > MAX_BUCKETS {
        return Err(ApiError::BadRequest(format!(
            "leases[{i}].buckets must hold 1 to {MAX_BUCKETS} buckets"
        )));
    }
    let mut call = ScopeCall {
        scope: scope.clone(),
        names: Vec::new(),
        keys: Vec::new(),
        args: Vec::new(),
    };
    for (j, b) in buckets.iter().enumerate() {
        let at = format!("leases[{i}].buckets[{j}]");
        let Value::Object(b) = b else {
            return Err(ApiError::BadRequest(format!("{at} must be an object")));
        };
        let name = string(b, "name")?
            .ok_or_else(|| ApiError::BadRequest(format!("{at}.name is required")))?;
        let name = id(name, &format!("{at}.name"), false)?.to_string();
        if call.names.contains(&name) {
            return Err(ApiError::BadRequest(format!(
                "{at}.name {name:?} is named twice"
            )));
        }
        let per_minute =
            number(b, "per_minute", 1, MAX_UNITS, None).map_err(|e| prefixed(e, &at))?;
        let burst =
            number(b, "burst", 1, MAX_UNITS, Some(per_minute)).map_err(|e| prefixed(e, &at))?;
        let units_field = if lease { "want" } else { "units" };
        let units = number(b, units_field, 0, MAX_UNITS, None).map_err(|e| prefixed(e, &at))?;
        // Microseconds per unit; fractional for fast rates (a million tokens a minute: 60 µs).
        let interval = 60_000_000.0 / per_minute as f64;
        call.keys
            .push(format!("{}quota:{{{scope}}}:{name}", store.settings.prefix));
        call.args.push(format!("{interval:.6}"));
        call.args.push(burst.to_string());
        call.args.push(units.min(burst).to_string());
        call.names.push(name);
    }
    Ok(call)
}

fn prefixed(e: ApiError, at: &str) -> ApiError {
    match e {
        ApiError::BadRequest(m) => ApiError::BadRequest(format!("{at}.{m}")),
        other => other,
    }
}

async fn quota(store: &Store, lease: bool, body: Map<String, Value>) -> Reply {
    let Some(Value::Array(leases)) = body.get("leases") else {
        return Err(bad("leases must be an array"));
    };
    if leases.is_empty() || leases.len() > MAX_SCOPES {
        return Err(bad(&format!("leases must hold 1 to {MAX_SCOPES} scopes")));
    }
    let calls: Vec<ScopeCall> = leases
        .iter()
        .enumerate()
        .map(|(i, v)| scope_call(store, lease, i, v))
        .collect::<Result<_, _>>()?;
    // One script per scope (its keys share a hash tag, hence a slot), all in flight at once:
    // on one connection they are pipelined, in a cluster they go to their slots' nodes.
    let mode = if lease { "lease" } else { "return" };
    let runs = calls.iter().map(|c| {
        let mut inv = scripts::GCRA.prepare_invoke();
        for k in &c.keys {
            inv.key(k);
        }
        inv.arg(mode);
        for a in &c.args {
            inv.arg(a);
        }
        async move { invoke::<Vec<(u64, u64)>>(store, inv).await }
    });
    let results = join_all(runs).await;
    let mut out = Vec::with_capacity(calls.len());
    for (c, r) in calls.iter().zip(results) {
        let r = r?;
        let buckets: Vec<Value> = c
            .names
            .iter()
            .zip(r)
            .map(|(name, (granted, wait))| {
                if lease {
                    json!({"name": name, "granted": granted, "retry_after_ms": wait})
                } else {
                    json!({"name": name, "returned": granted})
                }
            })
            .collect();
        out.push(json!({"scope": c.scope, "buckets": buckets}));
    }
    let lease_ms = u64::try_from(store.settings.lease.as_millis()).unwrap_or(u64::MAX);
    ok(&json!({"lease_ms": lease_ms, "leases": out}))
}

/// Awaits every future, concurrently, in order (a small `join_all`, without futures-util).
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

async fn concurrency(store: &Store, acquire: bool, body: Map<String, Value>) -> Reply {
    let account = string(&body, "account")?.ok_or_else(|| bad("account is required"))?;
    let account = id(account, "account", false)?;
    let holder = string(&body, "holder")?.ok_or_else(|| bad("holder is required"))?;
    let holder = id(holder, "holder", true)?;
    let (want, limit, lease_ms) = if acquire {
        (
            number(&body, "want", 0, 1_000_000, Some(1))?,
            number(&body, "limit", 1, 1_000_000, None)?,
            number(&body, "lease_ms", 100, 3_600_000, Some(10_000))?,
        )
    } else {
        (0, 0, 100)
    };
    let prefix = &store.settings.prefix;
    let mut inv = scripts::SEMAPHORE.prepare_invoke();
    inv.key(format!("{prefix}sem:{{{account}}}:exp"))
        .key(format!("{prefix}sem:{{{account}}}:n"))
        .arg(holder)
        .arg(want)
        .arg(limit)
        .arg(lease_ms);
    let (held, in_use, wait): (u64, u64, u64) = invoke(store, inv).await?;
    if acquire {
        ok(
            &json!({"held": held, "in_use": in_use, "limit": limit, "lease_ms": lease_ms, "retry_after_ms": wait}),
        )
    } else {
        ok(&json!({"held": 0, "in_use": in_use}))
    }
}

async fn pause_put(store: &Store, name: &str, body: Map<String, Value>) -> Reply {
    let ms = number(&body, "for_ms", 1, MAX_LIFETIME_MS, None)?;
    let reason = string(&body, "reason")?.unwrap_or("paused");
    let reason = id(reason, "reason", false)?;
    if reason.len() > 64 {
        return Err(bad("reason must be at most 64 characters"));
    }
    let mut inv = scripts::PAUSE_SET.prepare_invoke();
    inv.key(format!("{}pause:{name}", store.settings.prefix))
        .arg(ms)
        .arg(reason);
    let (remaining, reason): (u64, String) = invoke(store, inv).await?;
    ok(&json!({"paused": true, "remaining_ms": remaining, "reason": reason}))
}

async fn pauses(store: &Store, names: &[String]) -> Result<Map<String, Value>, ApiError> {
    let runs = names.iter().map(|name| {
        let mut inv = scripts::PAUSE_GET.prepare_invoke();
        inv.key(format!("{}pause:{name}", store.settings.prefix));
        async move { invoke::<Option<(u64, String)>>(store, inv).await }
    });
    let results = join_all(runs).await;
    let mut out = Map::new();
    for (name, r) in names.iter().zip(results) {
        let v = match r? {
            Some((remaining, reason)) if remaining > 0 => {
                json!({"paused": true, "remaining_ms": remaining, "reason": reason})
            }
            _ => json!({"paused": false}),
        };
        out.insert(name.clone(), v);
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_that_reach_redis_keys_are_checked() {
        assert!(id("abc-1.2_x", "t", false).is_ok());
        assert!(
            id("a:b", "t", false).is_err(),
            "a colon would make cache keys ambiguous"
        );
        assert!(id("tenant:a", "t", true).is_ok());
        assert!(id("", "t", false).is_err());
        assert!(
            id("a{b}", "t", true).is_err(),
            "braces would move a hash tag"
        );
        assert!(id(&"x".repeat(129), "t", false).is_err());
        assert!(id("é", "t", false).is_err());
    }

    #[tokio::test]
    async fn join_all_keeps_order() {
        let outs = join_all((0..5).map(|i| async move {
            tokio::time::sleep(std::time::Duration::from_millis(10 * (5 - i))).await;
            i
        }))
        .await;
        assert_eq!(outs, vec![0, 1, 2, 3, 4]);
    }
}
