//! Response bodies: whole JSON answers, and bodies fed from a channel by a task (SSE streams
//! and keep-alive stalls), which end (or break the connection) when the task says so.

use bytes::Bytes;
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
            "retry-after, retry-after-ms, x-busy-provider, x-request-id",
        )
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    builder(status, "application/json")
        .body(full(value.to_string()))
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
