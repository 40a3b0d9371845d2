//! # unbusy-envoy
//!
//! The Envoy / Istio host of the unbusy engine: a proxy-wasm HTTP filter (`wasm32-wasip1`
//! cdylib) that translates Envoy's callbacks into engine calls and the engine's decisions into
//! host calls. It holds no policy of its own; every decision comes from [`unbusy_core`].
//!
//! The filter itself arrives with its own issue; until then this crate only pins the layout and
//! proves that the core builds for `wasm32-wasip1` inside a cdylib.
#![forbid(unsafe_code)]

pub use unbusy_core as engine;
