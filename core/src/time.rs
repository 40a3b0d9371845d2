//! Time as a parameter.
//!
//! The engine never reads a clock. Hosts pass `now` as an [`Instant`]: nanoseconds since an
//! origin of their choosing (process start in Envoy, `performance.now()` in JS, zero in the
//! simulator). Durations stay plain [`Nanos`] (the same unit), so the two cannot be confused at
//! the engine's boundary: an instant plus a duration is an instant, an instant minus an earlier
//! one is a duration, and an instant plus an instant does not compile. (Inside the policy modules
//! instants are still `Nanos` where that reads more simply; [`Instant::as_nanos`] and
//! [`Instant::from_nanos`] convert at the boundary.)
//!
//! All arithmetic on instants saturates: a host that hands us a bogus time gets a bogus
//! decision, never an overflow panic.
//!
//! ```compile_fail,E0308
//! use unbusy_core::time::Instant;
//! let a = Instant::from_nanos(1);
//! let _ = a + a; // an instant plus an instant means nothing
//! ```
//!
//! ```compile_fail,E0308
//! use unbusy_core::time::{ms, Instant};
//! fn deadline_in(now: Instant) -> Instant { now + ms(5) }
//! let _ = deadline_in(ms(5)); // a duration is not an instant
//! ```

use core::ops::Add;

/// Nanoseconds: a duration (an instant is an [`Instant`]).
pub type Nanos = u64;

/// A point in time: nanoseconds since the host's origin.
///
/// Ordered; `instant + duration` saturates at [`Instant::MAX`]; the duration between two
/// instants is [`Instant::saturating_since`] (zero when "earlier" is later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(Nanos);

impl Instant {
    /// The host's origin.
    pub const ORIGIN: Self = Self(0);
    /// The last representable instant (where saturating arithmetic stops).
    pub const MAX: Self = Self(Nanos::MAX);

    /// The instant `nanos` nanoseconds after the host's origin.
    pub const fn from_nanos(nanos: Nanos) -> Self {
        Self(nanos)
    }

    /// Nanoseconds since the host's origin.
    pub const fn as_nanos(self) -> Nanos {
        self.0
    }

    /// `self + d`, saturating at [`Instant::MAX`].
    pub const fn saturating_add(self, d: Nanos) -> Self {
        Self(self.0.saturating_add(d))
    }

    /// `self - d`, saturating at [`Instant::ORIGIN`].
    pub const fn saturating_sub(self, d: Nanos) -> Self {
        Self(self.0.saturating_sub(d))
    }

    /// How long after `earlier` this instant is; zero if it is not after it.
    pub const fn saturating_since(self, earlier: Self) -> Nanos {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Nanos> for Instant {
    type Output = Self;

    /// Saturating: see [`Instant::saturating_add`].
    fn add(self, d: Nanos) -> Self {
        self.saturating_add(d)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instant_plus_a_duration_saturates_at_the_last_instant() {
        let near_end = Instant::from_nanos(u64::MAX - 5);
        assert_eq!(near_end + 5, Instant::MAX);
        assert_eq!(near_end + 6, Instant::MAX);
        assert_eq!(Instant::MAX + u64::MAX, Instant::MAX);
        assert_eq!(near_end.saturating_add(4).as_nanos(), u64::MAX - 1);
        assert_eq!(
            Instant::from_nanos(7) + ms(1),
            Instant::from_nanos(1_000_007)
        );
    }

    #[test]
    fn an_instant_minus_a_duration_saturates_at_the_origin() {
        assert_eq!(Instant::from_nanos(5).saturating_sub(6), Instant::ORIGIN);
        assert_eq!(Instant::MAX.saturating_sub(u64::MAX), Instant::ORIGIN);
        assert_eq!(Instant::MAX.saturating_sub(1).as_nanos(), u64::MAX - 1);
    }

    #[test]
    fn the_time_since_a_later_instant_is_zero() {
        let (early, late) = (Instant::from_nanos(10), Instant::from_nanos(25));
        assert_eq!(late.saturating_since(early), 15);
        assert_eq!(early.saturating_since(late), 0);
        assert_eq!(Instant::MAX.saturating_since(Instant::ORIGIN), u64::MAX);
        assert_eq!(Instant::ORIGIN.saturating_since(Instant::MAX), 0);
        assert_eq!(Instant::MAX.saturating_since(Instant::MAX), 0);
    }
}
