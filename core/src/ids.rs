//! The ids that cross the engine's boundary: which request, which provider, which attempt.
//!
//! Each was a bare integer (a `u64`, a `usize` index, a `u32`), so a host could hand the engine
//! a provider index where an attempt number belonged, or an attempt number where a request id
//! did, and the compiler agreed. As newtypes they cannot be mixed up, they carry no arithmetic
//! (adding two request ids means nothing), and the ids that are never zero say so in their type
//! ([`core::num::NonZero`]) rather than leaving 0 free to mean "none": an absent id is an
//! `Option`. Hosts that keep ids as plain numbers (the npm package's JS, a header) convert
//! explicitly with `new`/`get`.
//!
//! A plain index is not a provider id:
//!
//! ```compile_fail,E0308
//! use unbusy_core::config::{Config, ProviderConfig};
//! use unbusy_core::engine::Engine;
//! let config = Config {
//!     providers: vec![ProviderConfig { name: "a".into(), cluster: Some("a".into()), ..Default::default() }],
//!     ..Config::default()
//! };
//! let engine = Engine::new(config, 1).unwrap();
//! let index: usize = 0;
//! let _ = engine.in_flight(index); // expects a ProviderId
//! ```
//!
//! ```rust
//! # use unbusy_core::config::{Config, ProviderConfig};
//! # use unbusy_core::engine::Engine;
//! use unbusy_core::ids::ProviderId;
//! # let config = Config {
//! #     providers: vec![ProviderConfig { name: "a".into(), cluster: Some("a".into()), ..Default::default() }],
//! #     ..Config::default()
//! # };
//! # let engine = Engine::new(config, 1).unwrap();
//! assert_eq!(engine.in_flight(ProviderId::new(0)), 0);
//! ```

use core::num::{NonZeroU32, NonZeroU64};

/// Identifies a request for the life of the engine that admitted it. Never zero: the engine
/// numbers requests from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(NonZeroU64);

impl RequestId {
    /// The id numbered `raw` (`None` for 0, which no request has), for hosts that carry ids as
    /// plain numbers.
    pub const fn new(raw: u64) -> Option<Self> {
        match NonZeroU64::new(raw) {
            Some(n) => Some(Self(n)),
            None => None,
        }
    }

    /// The id as a plain number (never 0).
    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The engine's first request.
    pub(crate) const FIRST: Self = Self(NonZeroU64::MIN);

    /// The id the engine gives the request after this one's (saturating: 2^64 requests away).
    pub(crate) const fn successor(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

/// A provider: its index in the configuration's `providers` list. An index past the end names no
/// provider; the engine's calls then do nothing (or answer `None`/0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProviderId(usize);

impl ProviderId {
    /// The provider at `index` in the configuration's `providers`.
    pub const fn new(index: usize) -> Self {
        Self(index)
    }

    /// Its index in the configuration's `providers`.
    pub const fn index(self) -> usize {
        self.0
    }
}

/// Which attempt of its request an attempt is: 1 for the first, 2 for the first retry, and so
/// on. Never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AttemptId(NonZeroU32);

impl AttemptId {
    /// A request's first attempt.
    pub const FIRST: Self = Self(NonZeroU32::MIN);

    /// Attempt number `n` (`None` for 0, which no attempt has), for hosts that carry attempt
    /// numbers as plain numbers.
    pub const fn new(n: u32) -> Option<Self> {
        match NonZeroU32::new(n) {
            Some(n) => Some(Self(n)),
            None => None,
        }
    }

    /// The attempt's number (1 for the first).
    pub const fn get(self) -> u32 {
        self.0.get()
    }

    /// Whether this is a retry (any attempt after the first).
    pub const fn is_retry(self) -> bool {
        self.0.get() > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_no_request_and_no_attempt() {
        assert_eq!(RequestId::new(0), None);
        assert_eq!(AttemptId::new(0), None);
        assert_eq!(RequestId::new(u64::MAX).map(RequestId::get), Some(u64::MAX));
        assert_eq!(AttemptId::new(u32::MAX).map(AttemptId::get), Some(u32::MAX));
    }

    #[test]
    fn the_first_attempt_is_number_one_and_no_retry() {
        assert_eq!(AttemptId::FIRST.get(), 1);
        assert_eq!(AttemptId::new(1), Some(AttemptId::FIRST));
        assert!(!AttemptId::FIRST.is_retry());
        assert!(AttemptId::new(2).is_some_and(AttemptId::is_retry));
    }

    #[test]
    fn a_provider_id_is_its_index() {
        assert_eq!(ProviderId::new(3).index(), 3);
        assert_ne!(ProviderId::new(3), ProviderId::new(4));
    }
}
