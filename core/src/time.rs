//! Time as a parameter.
//!
//! The engine never reads a clock. Hosts pass `now` as nanoseconds since an origin of their
//! choosing (process start in Envoy, `performance.now()` in JS, zero in the simulator). Durations
//! use the same unit. All arithmetic on instants saturates: a host that hands us a bogus time
//! gets a bogus decision, never an overflow panic.

/// Nanoseconds: an instant since the host's origin, or a duration.
pub type Nanos = u64;

/// One microsecond in [`Nanos`].
pub const MICROSECOND: Nanos = 1_000;
/// One millisecond in [`Nanos`].
pub const MILLISECOND: Nanos = 1_000_000;
/// One second in [`Nanos`].
pub const SECOND: Nanos = 1_000_000_000;

/// `n` milliseconds as [`Nanos`], saturating.
pub const fn ms(n: u64) -> Nanos {
    n.saturating_mul(MILLISECOND)
}

/// `n` seconds as [`Nanos`], saturating.
pub const fn secs(n: u64) -> Nanos {
    n.saturating_mul(SECOND)
}

/// A duration in whole milliseconds, rounded up (so a wait is never announced shorter than it is).
pub const fn to_ms_ceil(d: Nanos) -> u64 {
    d.div_ceil(MILLISECOND)
}

/// A duration in whole seconds, rounded up.
pub const fn to_secs_ceil(d: Nanos) -> u64 {
    d.div_ceil(SECOND)
}
