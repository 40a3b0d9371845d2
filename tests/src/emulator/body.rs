//! Response bodies: whole JSON answers, and bodies fed from a channel by a task (SSE streams
//! and keep-alive stalls), which end (or break the connection) when the task says so; and gzip
//! encoding of either, whole or frame by frame.

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Response, StatusCode};
use serde_json::Value;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Every response body the emulator sends.
pub type ResponseBody = BoxBody<Bytes, std::io::Error>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn builder(status: StatusCode, content_type: &str) -> hyper::http::response::Builder {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        // Browsers call the emulator directly in the npm package's tests.
        .header("access-control-allow-origin", "*")
        .header(
            "access-control-expose-headers",
            "retry-after, retry-after-ms, x-busy-provider, x-request-id, content-encoding",
        )
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    builder(status, "application/json")
        .body(full(value.to_string()))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// A whole body of `content_type` (any bytes, valid JSON or not).
pub fn text_response(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    builder(status, content_type)
        .body(full(body))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// An SSE response fed by `body`.
pub fn sse_response(body: ChannelBody) -> Response<ResponseBody> {
    stream_response("text/event-stream; charset=utf-8", body)
}

/// A streamed response of `content_type` fed by `body`.
pub fn stream_response(content_type: &str, body: ChannelBody) -> Response<ResponseBody> {
    builder(StatusCode::OK, content_type)
        .header("cache-control", "no-cache")
        .body(body.boxed())
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// The answer to a CORS preflight.
pub fn cors_preflight() -> Response<ResponseBody> {
    builder(StatusCode::NO_CONTENT, "text/plain")
        .header("access-control-allow-methods", "GET, POST, PUT, OPTIONS")
        .header(
            "access-control-allow-headers",
            "authorization, content-type, x-stainless-retry-count, x-unbusy-tenant, *",
        )
        .header("access-control-max-age", "600")
        .body(full(Bytes::new()))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// A body whose frames come from a channel; an `Err` frame breaks the connection.
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>,
}

impl ChannelBody {
    /// A body reading from `rx` until it closes.
    pub fn new(rx: mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>) -> Self {
        Self { rx }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Whether an `accept-encoding` value lets the answer be gzip-encoded: `gzip` (or `x-gzip`),
/// or failing that `*`, with a q-value above 0 (RFC 9110 12.5.3).
pub fn accepts_gzip(accept_encoding: Option<&str>) -> bool {
    let Some(value) = accept_encoding else {
        return false;
    };
    let (mut gzip, mut any) = (None, None);
    for member in value.split(',') {
        let mut params = member.split(';');
        let coding = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q = 1.0f64;
        for p in params {
            let p = p.trim();
            if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                q = v.trim().parse().unwrap_or(0.0);
            }
        }
        match coding.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q),
            "*" => any = Some(q),
            _ => {}
        }
    }
    gzip.or(any).is_some_and(|q| q > 0.0)
}

/// `bytes` gzip-encoded whole.
pub fn gzip_bytes(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    if enc.write_all(bytes).is_err() {
        return Vec::new();
    }
    enc.finish().unwrap_or_default()
}

/// `resp` gzip-encoded, as a provider answers a caller whose `accept-encoding` allows it:
/// `content-encoding: gzip`, `vary: accept-encoding`; a whole body is compressed whole (with
/// its new `content-length`), a streamed one frame by frame with a sync flush after each, so a
/// gzip stream still streams. An answer without a body is left alone.
pub async fn gzip_response(resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    let exact = body.size_hint().exact();
    if exact == Some(0) || parts.status == StatusCode::NO_CONTENT {
        return Response::from_parts(parts, body);
    }
    parts.headers.insert(
        hyper::header::CONTENT_ENCODING,
        hyper::header::HeaderValue::from_static("gzip"),
    );
    parts.headers.remove(hyper::header::CONTENT_LENGTH);
    parts.headers.append(
        hyper::header::VARY,
        hyper::header::HeaderValue::from_static("accept-encoding"),
    );
    let body = if exact.is_some() {
        let whole = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        full(gzip_bytes(&whole))
    } else {
        GzipBody {
            inner: body,
            encoder: Some(GzEncoder::new(Vec::new(), Compression::default())),
        }
        .boxed()
    };
    Response::from_parts(parts, body)
}

/// A body gzip-encoded as it streams: each data frame is compressed and flushed (a sync
/// flush), so the caller can decode every event as it arrives; the gzip trailer follows the
/// last frame. A broken inner body breaks this one (no trailer), as a real broken stream does.
struct GzipBody {
    inner: ResponseBody,
    encoder: Option<GzEncoder<Vec<u8>>>,
}

impl Body for GzipBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        use std::io::Write;
        let this = self.get_mut();
        loop {
            let Some(encoder) = this.encoder.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(f) => f,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        if let Err(e) = encoder.write_all(&data).and_then(|()| encoder.flush()) {
                            this.encoder = None;
                            return Poll::Ready(Some(Err(e)));
                        }
                        let out = std::mem::take(encoder.get_mut());
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                Some(Err(e)) => {
                    this.encoder = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let Some(encoder) = this.encoder.take() else {
                        return Poll::Ready(None);
                    };
                    return match encoder.finish() {
                        Ok(rest) if rest.is_empty() => Poll::Ready(None),
                        Ok(rest) => Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest))))),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.encoder.is_none()
    }
}
