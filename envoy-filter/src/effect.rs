//! What the filter's state tells its driver to do, as data: every callback borrows the state,
//! decides, releases it, and only then are these carried out as hostcalls
//! ([`crate::driver::run`]). Envoy may call back into the VM from inside a hostcall (a local
//! reply runs the encoder filters), and a second borrow of the state would fail; and as data,
//! what a callback decided can be checked natively without a host.

use std::time::Duration;
use unbusy_core::engine::RequestId;
use unbusy_core::ids::AttemptId;

/// What the host must do after a callback, outside the state's borrow.
#[derive(Debug)]
pub enum Effect {
    /// Rewrite the held request and let it go to the router.
    ResumeRequest {
        /// The stream.
        ctx: u32,
        /// Headers to set (`None` removes).
        headers: Vec<(String, Option<String>)>,
        /// A replacement body.
        body: Option<Vec<u8>>,
    },
    /// Set (or, with `None`, remove) a response header on the held response.
    SetResponseHeader {
        /// The stream.
        ctx: u32,
        /// Name.
        name: String,
        /// Value.
        value: Option<String>,
    },
    /// Replace the response body bytes the callback running on `ctx` holds (the buffered body
    /// while it is held, or the current chunk once it streams) with these.
    ReplaceResponseBody {
        /// The stream.
        ctx: u32,
        /// How many bytes the callback holds (all of them are replaced).
        size: usize,
        /// The new bytes.
        body: Vec<u8>,
    },
    /// Let the held response go to the caller, with these headers added.
    ResumeResponse {
        /// The stream.
        ctx: u32,
        /// Headers to set.
        headers: Vec<(String, String)>,
    },
    /// Cut the caller's stream: its answer was already flowing when the engine gave up on it
    /// (stalled, or past the request's deadline).
    ResetResponse {
        /// The stream.
        ctx: u32,
    },
    /// Answer the caller locally (or with an answer obtained by a dispatched attempt).
    Reply {
        /// The stream.
        ctx: u32,
        /// Status.
        status: u16,
        /// Headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: Vec<u8>,
    },
    /// Mark the held answer of the router's attempt for a native retry and let it go to the
    /// router (which retries on the aggregate cluster's next provider).
    RetryNatively {
        /// The upstream context carrying the attempt.
        ctx: u32,
        /// The caller's stream.
        stream: u32,
        /// The [`crate::routing::FLOW_HEADER`] value to put back on the request: the router retries with the
        /// request headers as the upstream instance left them.
        flow: String,
    },
    /// Send an attempt outside the stream.
    Dispatch {
        /// The stream.
        ctx: u32,
        /// The engine's request.
        request: RequestId,
        /// The attempt.
        attempt: AttemptId,
        /// The provider's cluster.
        cluster: String,
        /// Headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: Vec<u8>,
        /// Give up after this long.
        timeout: Duration,
    },
    /// Ask the fleet store's L2 cache for the held request's answer (`store.timeout_ms`).
    StoreLookup {
        /// The stream.
        ctx: u32,
        /// The store's cluster.
        cluster: String,
        /// The lookup.
        call: crate::store::Call,
        /// Give up after this long (a miss).
        timeout: Duration,
    },
}

impl Effect {
    /// The context the effect acts on.
    pub fn ctx(&self) -> u32 {
        match self {
            Effect::ResumeRequest { ctx, .. }
            | Effect::SetResponseHeader { ctx, .. }
            | Effect::ReplaceResponseBody { ctx, .. }
            | Effect::ResumeResponse { ctx, .. }
            | Effect::ResetResponse { ctx }
            | Effect::Reply { ctx, .. }
            | Effect::RetryNatively { ctx, .. }
            | Effect::Dispatch { ctx, .. }
            | Effect::StoreLookup { ctx, .. } => *ctx,
        }
    }
}

/// What a response callback needs to do (see [`crate::state::State::interest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Let it through untouched.
    Pass,
    /// Keep holding it (an answer being replaced by another attempt's).
    Hold,
    /// Hand it to the state; `bytes`: with its headers or body (or, mid-stream, only the
    /// event that a chunk passed).
    Judge {
        /// Whether the state reads the bytes.
        bytes: bool,
    },
}

/// How the upstream instance prepares one of the router's native attempts.
#[derive(Debug, Default)]
pub struct UpstreamPlan {
    /// Headers to set (`None` removes).
    pub headers: Vec<(String, Option<String>)>,
    /// A replacement body.
    pub body: Option<Vec<u8>>,
}
