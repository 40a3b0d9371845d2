//! The busy-provider emulator: a real HTTP/1.1 server (tokio + hyper) that behaves like a
//! struggling OpenAI-compatible LLM provider, for the end-to-end tests and the demo.
//!
//! Why a real server: the Envoy filter and the npm package must meet the bytes a busy provider
//! really sends (503 bodies, 429 with and without `Retry-After`, 200 followed only by
//! `: keep-alive`, resets, a concurrency quota), over real sockets, with real timing.
//!
//! Behaviour comes from one scenario provider entry (`--scenario FILE --provider NAME`, fault
//! windows timed from start-up) or from flags (one window for all time), and can be replaced
//! at run time with `PUT /control` and the same JSON shape, so one emulator serves many tests.
//!
//! Endpoints: `POST /v1/chat/completions` (JSON with usage, or SSE chunks then
//! `data: [DONE]`), `GET /v1/models`, `GET /stats` (counters), `POST /stats/reset`,
//! `PUT /control`. Malformed requests get a 400 with an OpenAI-shaped error, as real providers
//! answer.
//!
//! **Answer shapes** ([`AnswerShape`], `"answer"` in `PUT /control`, `--answer` on the command
//! line, default `normal`): the bad answers that arrive with a good status or a useless hint
//! (a cut-off JSON body, a gateway's HTML page as `200`, a stream that never says
//! `data: [DONE]`, DeepSeek's `服务器繁忙` as a `200`, `Retry-After: 0`, a `Retry-After` date
//! in the past). A shape applies to the requests that draw no fault; a drawn fault wins. The
//! shapes that are not an answer (`html_200`, `overload_200`, the 429s) come after the
//! provider's first-token latency, so a test sets how fast they are.
//!
//! **Compression**, as real providers do it: when the request's `accept-encoding` allows gzip
//! (q > 0), every answer (JSON, errors, SSE, keep-alive stalls, the shapes) is gzip-encoded with
//! `content-encoding: gzip`; a stream is compressed event by event with a sync flush, so it
//! still streams. Without it, identity, unless `always_gzip` (`"always_gzip": true` in
//! `PUT /control`, `--always-gzip`) makes chat answers gzip whatever was asked.

mod body;
mod shape;
mod stats;

use crate::scenario::{Fault, LogNormal, Provider, RetryHint};
pub use body::{accepts_gzip, gzip_bytes};
use body::{json_response, ChannelBody, ResponseBody};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
pub use shape::{http_date, AnswerShape, HTML_502, OVERLOAD_200};
pub use stats::{RecentRequest, SeenRequest, Stats};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use unbusy_core::Rng;

/// The largest request body read; larger ones get 413.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// How the emulator behaves now.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// The provider entry: name, capacity, latencies, fault windows.
    pub provider: Provider,
    /// Interval between keep-alive bytes during a stall.
    pub keepalive_every: Duration,
    /// What a request that draws no fault gets: a normal answer or a bad one.
    pub answer: AnswerShape,
    /// Whether answers are gzip-encoded only when asked (`false`, the default), or always,
    /// whatever `accept-encoding` says (a provider or CDN that ignores `identity`).
    pub always_gzip: bool,
}

impl Default for Behaviour {
    /// The default provider entry, keep-alive every second, normal answers.
    fn default() -> Self {
        Self {
            provider: Provider::default(),
            keepalive_every: Duration::from_secs(1),
            answer: AnswerShape::Normal,
            always_gzip: false,
        }
    }
}

/// The part of a `PUT /control` body that is not the scenario provider entry.
#[derive(Debug, Default, serde::Deserialize)]
struct ControlExtra {
    /// The answer shape; absent: `normal` (a control body replaces the whole behaviour).
    #[serde(default)]
    answer: AnswerShape,
    /// Gzip every answer whatever the request accepts; absent: false.
    #[serde(default)]
    always_gzip: bool,
}

struct State {
    behaviour: Behaviour,
    /// Fault windows are timed from here.
    origin: Instant,
    first_token: LogNormal,
    total: LogNormal,
    rng: Rng,
    stats: Stats,
}

/// A running emulator's shared state.
pub struct Emulator {
    state: Mutex<State>,
    in_flight: AtomicU32,
    next_id: AtomicU32,
    /// Arrival times count from here (never reset).
    started: Instant,
}

/// Decrements the in-flight count when an answer ends, however it ends (completed, or the
/// client went away and the body was dropped).
struct InFlightGuard(Arc<Emulator>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The error a handler returns to make hyper drop the connection without answering.
#[derive(Debug)]
pub struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by the emulator (a fault)")
    }
}

impl std::error::Error for ResetConnection {}

fn openai_error(
    status: StatusCode,
    message: &str,
    kind: &str,
    code: Value,
) -> Response<ResponseBody> {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    json_response(status, &body)
}

impl Emulator {
    /// An emulator behaving as `behaviour`, its randomness seeded with `seed`.
    pub fn new(behaviour: Behaviour, seed: u64) -> Arc<Self> {
        let first_token = LogNormal::from_percentiles(behaviour.provider.latency_ms.first_token);
        let total = LogNormal::from_percentiles(behaviour.provider.latency_ms.total);
        Arc::new(Self {
            state: Mutex::new(State {
                behaviour,
                origin: Instant::now(),
                first_token,
                total,
                rng: Rng::with_seed(seed),
                stats: Stats::default(),
            }),
            in_flight: AtomicU32::new(0),
            next_id: AtomicU32::new(1),
            started: Instant::now(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters now.
    pub fn stats(&self) -> Stats {
        let mut s = self.state().stats.clone();
        s.in_flight = self.in_flight.load(Ordering::SeqCst);
        s
    }

    /// Serves connections from `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let emulator = self.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = hyper::service::service_fn(move |req| {
                    let emulator = emulator.clone();
                    async move { emulator.handle(req).await }
                });
                // A connection error (including the resets we cause) only ends that connection.
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(io, service)
                    .await;
            });
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ResetConnection> {
        let gzip = accepts_gzip(accept_encoding(&req).as_deref())
            || (self.state().behaviour.always_gzip && req.method() == Method::POST);
        let resp = self.clone().route(req).await?;
        if !gzip {
            return Ok(resp);
        }
        let resp = body::gzip_response(resp).await;
        if resp.headers().contains_key(hyper::header::CONTENT_ENCODING) {
            self.state().stats.gzip_answers += 1;
        }
        Ok(resp)
    }

    async fn route(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ResetConnection> {
        let path = req.uri().path().to_string();
        if !matches!(path.as_str(), "/stats" | "/stats/reset" | "/control") {
            let seen = SeenRequest {
                method: req.method().to_string(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| path.clone(), |p| p.to_string()),
                authorization: req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
            };
            self.state().stats.saw(seen);
        }
        match (req.method().clone(), path.as_str()) {
            (Method::POST, "/v1/chat/completions" | "/chat/completions") => self.chat(req).await,
            (Method::GET, "/v1/models" | "/models") => Ok(self.models()),
            (Method::GET, "/stats") => Ok(json_response(
                StatusCode::OK,
                &serde_json::to_value(self.stats()).unwrap_or(Value::Null),
            )),
            (Method::POST, "/stats/reset") => {
                self.state().stats = Stats::default();
                Ok(json_response(StatusCode::OK, &json!({"reset": true})))
            }
            (Method::PUT, "/control") => Ok(self.control(req).await),
            (Method::OPTIONS, _) => Ok(body::cors_preflight()),
            _ => Ok(openai_error(
                StatusCode::NOT_FOUND,
                &format!("no route for {path}"),
                "invalid_request_error",
                json!("not_found"),
            )),
        }
    }

    fn models(&self) -> Response<ResponseBody> {
        let name = self.state().behaviour.provider.name.clone();
        json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [
                {"id": "deepseek-chat", "object": "model", "owned_by": name},
                {"id": "deepseek-reasoner", "object": "model", "owned_by": name},
            ]}),
        )
    }

    async fn control(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let bytes = match read_body(req).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let parsed = serde_json::from_slice::<Provider>(&bytes).and_then(|provider| {
            serde_json::from_slice::<ControlExtra>(&bytes).map(|extra| (provider, extra))
        });
        match parsed {
            Ok((mut provider, extra)) => {
                let mut st = self.state();
                if provider.name == Provider::default().name {
                    provider.name = st.behaviour.provider.name.clone();
                }
                st.first_token = LogNormal::from_percentiles(provider.latency_ms.first_token);
                st.total = LogNormal::from_percentiles(provider.latency_ms.total);
                st.behaviour.provider = provider;
                st.behaviour.answer = extra.answer;
                st.behaviour.always_gzip = extra.always_gzip;
                st.origin = Instant::now();
                json_response(StatusCode::OK, &json!({"applied": true}))
            }
            Err(e) => openai_error(
                StatusCode::BAD_REQUEST,
                &format!("invalid control body: {e}"),
                "invalid_request_error",
                json!("invalid_control"),
            ),
        }
    }

    async fn chat(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ResetConnection> {
        let at_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let accept_encoding = accept_encoding(&req);
        let authorization = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let unbusy_headers: Vec<String> = req
            .headers()
            .keys()
            .map(|n| n.as_str())
            .filter(|n| n.starts_with("x-unbusy"))
            .map(str::to_string)
            .collect();
        let bytes = match read_body(req).await {
            Ok(b) => b,
            Err(resp) => {
                self.state().stats.malformed_400 += 1;
                return Ok(resp);
            }
        };
        let parsed = match parse_chat(&bytes) {
            Ok(p) => p,
            Err(message) => {
                self.state().stats.malformed_400 += 1;
                return Ok(openai_error(
                    StatusCode::BAD_REQUEST,
                    &message,
                    "invalid_request_error",
                    json!("invalid_request"),
                ));
            }
        };
        // Decide this request's fate under the lock, then act without it.
        let (fault, over_capacity, name, keepalive, first_token, total, error_delay, shape) = {
            let mut st = self.state();
            st.stats.attempts += 1;
            st.stats.remember(RecentRequest {
                model: parsed.model.clone(),
                stream: parsed.stream,
                max_tokens: parsed.max_tokens,
                authorization: authorization.clone(),
                at_ms,
                accept_encoding,
                unbusy_headers,
            });
            let capacity = st.behaviour.provider.capacity;
            let over_capacity = capacity > 0 && self.in_flight.load(Ordering::SeqCst) >= capacity;
            let elapsed = st.origin.elapsed().as_secs_f64();
            let u = st.rng.f64();
            let fault = st.behaviour.provider.fault_at(elapsed, u);
            let draw = |d: &LogNormal, rng: &mut Rng| d.sample(1.0 - rng.f64(), rng.f64());
            let (ft_d, total_d) = (st.first_token, st.total);
            let ft = draw(&ft_d, &mut st.rng);
            let total = draw(&total_d, &mut st.rng).max(ft + 1.0);
            let error_delay = draw(&LogNormal::from_percentiles([30.0, 200.0]), &mut st.rng);
            (
                fault,
                over_capacity,
                st.behaviour.provider.name.clone(),
                st.behaviour.keepalive_every,
                Duration::from_secs_f64(ft / 1000.0),
                Duration::from_secs_f64(total / 1000.0),
                Duration::from_secs_f64(error_delay / 1000.0),
                st.behaviour.answer,
            )
        };
        if over_capacity {
            self.state().stats.capacity_429 += 1;
            tokio::time::sleep(error_delay).await;
            return Ok(with_provider(
                openai_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Rate Limit Reached: too many concurrent requests for this account",
                    "rate_limit_error",
                    json!("rate_limit_exceeded"),
                ),
                &name,
            ));
        }
        let guard = {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
            let now = self.in_flight.load(Ordering::SeqCst);
            let mut st = self.state();
            st.stats.max_in_flight = st.stats.max_in_flight.max(now);
            InFlightGuard(self.clone())
        };
        match fault {
            Fault::Busy503 => {
                self.state().stats.busy_503 += 1;
                tokio::time::sleep(error_delay).await;
                Ok(with_provider(
                    openai_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Server overloaded, please try again later.",
                        "server_error",
                        json!("server_overloaded"),
                    ),
                    &name,
                ))
            }
            Fault::Error500 => {
                self.state().stats.error_500 += 1;
                tokio::time::sleep(error_delay).await;
                Ok(with_provider(
                    openai_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "The server had an error while processing your request.",
                        "server_error",
                        Value::Null,
                    ),
                    &name,
                ))
            }
            Fault::RateLimit429 { retry_after_s } => {
                tokio::time::sleep(error_delay).await;
                let mut resp = openai_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Rate limit reached for requests",
                    "rate_limit_error",
                    json!("rate_limit_exceeded"),
                );
                let mut st = self.state();
                if let Some(hint) = RetryHint::from_seconds(retry_after_s) {
                    st.stats.rate_limit_429 += 1;
                    let headers = resp.headers_mut();
                    if let Ok(v) = hint.seconds.to_string().parse() {
                        headers.insert(hyper::header::RETRY_AFTER, v);
                    }
                    if let Ok(v) = hint.millis.to_string().parse() {
                        headers.insert("retry-after-ms", v);
                    }
                } else {
                    st.stats.rate_limit_429_bare += 1;
                }
                Ok(with_provider(resp, &name))
            }
            Fault::Reset | Fault::Refused => {
                self.state().stats.resets += 1;
                tokio::time::sleep(error_delay / 4).await;
                Err(ResetConnection)
            }
            Fault::Stall { stall_s } => {
                self.state().stats.stalls += 1;
                Ok(with_provider(
                    stall_response(parsed.stream, stall_s, keepalive, guard),
                    &name,
                ))
            }
            Fault::None => {
                let id = self.next_id.fetch_add(1, Ordering::SeqCst);
                let answer = Answer {
                    id: format!("chatcmpl-{name}-{id}"),
                    model: parsed.model,
                    content: format!(
                        "[{name}] An answer to: {}",
                        parsed.last_user.chars().take(60).collect::<String>()
                    ),
                    prompt_tokens: (bytes.len() / 4).max(1) as u64,
                };
                self.state().stats.count(shape, parsed.stream);
                let resp = match shape {
                    AnswerShape::Html200 => {
                        tokio::time::sleep(first_token).await;
                        drop(guard);
                        body::text_response(StatusCode::OK, "text/html", HTML_502)
                    }
                    AnswerShape::Overload200 => {
                        tokio::time::sleep(first_token).await;
                        drop(guard);
                        body::text_response(StatusCode::OK, "application/json", OVERLOAD_200)
                    }
                    AnswerShape::RetryAfterZero | AnswerShape::RetryAfterPast => {
                        tokio::time::sleep(first_token).await;
                        drop(guard);
                        let mut resp = openai_error(
                            StatusCode::TOO_MANY_REQUESTS,
                            "Rate limit reached for requests",
                            "rate_limit_error",
                            json!("rate_limit_exceeded"),
                        );
                        let headers = resp.headers_mut();
                        if shape == AnswerShape::RetryAfterZero {
                            headers.insert(
                                hyper::header::RETRY_AFTER,
                                hyper::header::HeaderValue::from_static("0"),
                            );
                            headers.insert(
                                "retry-after-ms",
                                hyper::header::HeaderValue::from_static("0"),
                            );
                        } else if let Ok(v) = shape::an_hour_ago().parse() {
                            headers.insert(hyper::header::RETRY_AFTER, v);
                        }
                        resp
                    }
                    _ if parsed.stream || shape == AnswerShape::SseAlways => {
                        let done =
                            !matches!(shape, AnswerShape::SseNoDone | AnswerShape::TruncatedJson);
                        stream_response(
                            answer,
                            parsed.include_usage,
                            first_token,
                            total,
                            done,
                            guard,
                        )
                    }
                    AnswerShape::TruncatedJson => {
                        tokio::time::sleep(total).await;
                        drop(guard);
                        let whole = answer.completion().to_string();
                        let mut cut = whole.len() / 2;
                        while !whole.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        let half = whole.get(..cut).unwrap_or("").to_string();
                        body::text_response(StatusCode::OK, "application/json", half)
                    }
                    _ => {
                        tokio::time::sleep(total).await;
                        drop(guard);
                        json_response(StatusCode::OK, &answer.completion())
                    }
                };
                Ok(with_provider(resp, &name))
            }
        }
    }
}

/// The request's `accept-encoding` values, joined as one list.
fn accept_encoding(req: &Request<Incoming>) -> Option<String> {
    let values: Vec<&str> = req
        .headers()
        .get_all(hyper::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

fn with_provider(mut resp: Response<ResponseBody>, name: &str) -> Response<ResponseBody> {
    if let Ok(v) = name.parse() {
        resp.headers_mut().insert("x-busy-provider", v);
    }
    resp
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<ResponseBody>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(openai_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body larger than {MAX_BODY_BYTES} bytes"),
            "invalid_request_error",
            json!("request_too_large"),
        )),
        Err(e) => Err(openai_error(
            StatusCode::BAD_REQUEST,
            &format!("could not read the request body: {e}"),
            "invalid_request_error",
            json!("invalid_body"),
        )),
    }
}

/// What the emulator needs from a chat/completions request.
#[derive(Debug)]
struct ChatRequest {
    model: String,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
    last_user: String,
}

fn parse_chat(bytes: &[u8]) -> Result<ChatRequest, String> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("The request body must be a JSON object.")?;
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or("you must provide a model parameter")?
        .to_string();
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("'messages' is a required property")?;
    if messages.is_empty() {
        return Err("'messages' must contain at least one message".into());
    }
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("'stream' must be a boolean".into()),
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let max_tokens = obj.get("max_tokens").and_then(Value::as_u64);
    Ok(ChatRequest {
        model,
        stream,
        include_usage,
        max_tokens,
        last_user,
    })
}

struct Answer {
    id: String,
    model: String,
    content: String,
    prompt_tokens: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Answer {
    fn completion_tokens(&self) -> u64 {
        self.content.split_whitespace().count() as u64
    }

    fn usage(&self) -> Value {
        let c = self.completion_tokens();
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": c,
               "total_tokens": self.prompt_tokens + c})
    }

    fn completion(&self) -> Value {
        json!({
            "id": self.id, "object": "chat.completion", "created": unix_now(), "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.content},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": self.usage(),
        })
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let v = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": unix_now(),
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        Bytes::from(format!("data: {v}\n\n"))
    }
}

fn stream_response(
    answer: Answer,
    include_usage: bool,
    first_token: Duration,
    total: Duration,
    done: bool,
    guard: InFlightGuard,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    tokio::spawn(async move {
        let _guard = guard;
        tokio::time::sleep(first_token).await;
        let words: Vec<String> = answer
            .content
            .split_inclusive(' ')
            .map(str::to_string)
            .collect();
        let gap = total.saturating_sub(first_token) / (words.len().max(1) as u32);
        let mut first = true;
        for w in &words {
            let delta = if first {
                json!({"role": "assistant", "content": w})
            } else {
                json!({"content": w})
            };
            first = false;
            if tx
                .send(Ok(Frame::data(answer.chunk(delta, None))))
                .await
                .is_err()
            {
                return; // the client went away
            }
            tokio::time::sleep(gap).await;
        }
        let _ = tx
            .send(Ok(Frame::data(answer.chunk(json!({}), Some("stop")))))
            .await;
        if include_usage {
            let v = json!({"id": answer.id, "object": "chat.completion.chunk",
                "created": unix_now(), "model": answer.model, "choices": [],
                "usage": answer.usage()});
            let _ = tx
                .send(Ok(Frame::data(Bytes::from(format!("data: {v}\n\n")))))
                .await;
        }
        if done {
            let _ = tx
                .send(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))))
                .await;
        }
        // Without `[DONE]` the body still ends cleanly: the channel closes.
    });
    body::sse_response(ChannelBody::new(rx))
}

/// 200, then only keep-alive bytes (`: keep-alive` comments for streams, blank lines
/// otherwise) for `stall_s`, then the connection is dropped mid-body.
fn stall_response(
    stream: bool,
    stall_s: f64,
    every: Duration,
    guard: InFlightGuard,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let keepalive: &'static [u8] = if stream { b": keep-alive\n\n" } else { b"\n" };
    tokio::spawn(async move {
        let _guard = guard;
        let end = Instant::now() + Duration::from_secs_f64(stall_s.max(0.0));
        while Instant::now() < end {
            if tx
                .send(Ok(Frame::data(Bytes::from_static(keepalive))))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(every.min(end.saturating_duration_since(Instant::now()))).await;
        }
        // Close without finishing the body, as DeepSeek does after a long stall.
        let _ = tx
            .send(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "stall over",
            )))
            .await;
    });
    if stream {
        body::sse_response(ChannelBody::new(rx))
    } else {
        body::stream_response("application/json", ChannelBody::new(rx))
    }
}

/// Starts an emulator on `addr` in the current tokio runtime; returns its address.
pub async fn start(
    behaviour: Behaviour,
    seed: u64,
    addr: &str,
) -> std::io::Result<(Arc<Emulator>, std::net::SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let emulator = Emulator::new(behaviour, seed);
    tokio::spawn(emulator.clone().serve(listener));
    Ok((emulator, local))
}
