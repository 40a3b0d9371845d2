//! # unbusy-tests
//!
//! The harness around the engine: the busy-provider emulator, the deterministic simulator and the
//! launchers for real Envoy, Redis, workerd and Chromium used by the end-to-end tests. Each
//! arrives with the issue that needs it; this crate holds the place in the workspace.
