//! # unbusy-tests
//!
//! The harness around the engine:
//! - [`scenario`]: the busy-provider scenario format shared by the simulator and the emulator;
//! - [`sim`]: the deterministic discrete-event simulator (binary `simulate`) comparing unbusy
//!   with the baseline client policies;
//! - [`plot`]: the SVG chart of simulator results in `BENCHMARKS.md`;
//! - the `busy-provider` binary: a real HTTP/1.1 server behaving like a struggling
//!   OpenAI-compatible provider, for end-to-end tests and the demo;
//! - [`envoy`], [`harness`]: Envoy's configuration (rendered by `unbusy-envoy-config`, as
//!   `unbusy up` renders it) and running it for the end-to-end tests, the demo and the
//!   benchmark;
//! - [`world`]: the end-to-end tests' worlds (emulated providers behind Envoy with the filter).

// The harness is test tooling, not a proxy: indexing its own vectors may panic on a bug, and a
// panic here is a failed run, not a dead worker.
#![allow(clippy::indexing_slicing)]

pub mod emulator;
pub mod envoy;
pub mod fleet;
pub mod harness;
pub mod plot;
pub mod scenario;
pub mod sim;
pub mod world;
