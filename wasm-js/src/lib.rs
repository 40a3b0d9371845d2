//! # unbusy-js
//!
//! The JavaScript host of the unbusy engine: a `wasm32-unknown-unknown` build exported through
//! wasm-bindgen to the npm package `unbusy`, a drop-in `fetch` for browsers, Node and edge
//! workers. Like the Envoy filter it holds no policy; every decision comes from [`unbusy_core`].
//!
//! The bindings arrive with their own issue; until then this crate only pins the layout and
//! proves that the core builds for `wasm32-unknown-unknown` inside a cdylib.
#![forbid(unsafe_code)]

pub use unbusy_core as engine;
