//! What the engine's test files share: a provider, a plain request, draining actions, an
//! outcome, and the conversions a host makes at the engine's typed boundary (`at`, `pid`, `nth`:
//! the tests count time in plain `Nanos` since the origin and providers by index). (Each test
//! file is its own crate and uses only some of these.)

#![allow(dead_code)]

use unbusy_core::classify::{Classification, OutcomeClass};
use unbusy_core::config::ProviderConfig;
use unbusy_core::engine::{Action, CacheLookup, Engine, Priority, RequestMeta};
use unbusy_core::ids::{AttemptId, ProviderId};
use unbusy_core::time::{Instant, Nanos};

/// A provider reached through the Envoy cluster of its name.
pub fn provider(name: &str, priority: u32) -> ProviderConfig {
    ProviderConfig {
        name: name.into(),
        cluster: Some(name.into()),
        priority,
        ..ProviderConfig::default()
    }
}

/// A plain, non-streaming, uncached request of `tenant` with the configured deadline.
pub fn meta(tenant: u64) -> RequestMeta {
    RequestMeta {
        tenant,
        model: "deepseek-chat".into(),
        stream: false,
        priority: Priority::Normal,
        estimated_tokens: 100,
        deadline: None,
        cache_key: None,
        cached: CacheLookup::Miss,
    }
}

/// Every action the engine has queued.
pub fn actions(e: &mut Engine) -> Vec<Action> {
    std::iter::from_fn(|| e.poll_action()).collect()
}

/// An outcome of `class`, with a retry hint or not.
pub fn outcome(class: OutcomeClass, retry_after: Option<Nanos>) -> Classification {
    Classification { class, retry_after }
}

/// Something a test names an instant with: nanoseconds since the origin, or an instant the
/// engine gave.
pub trait AsInstant {
    /// The instant.
    fn instant(self) -> Instant;
}
impl AsInstant for Nanos {
    fn instant(self) -> Instant {
        Instant::from_nanos(self)
    }
}
impl AsInstant for Instant {
    fn instant(self) -> Instant {
        self
    }
}

/// The instant `t` (nanoseconds since the origin, or already an instant).
pub fn instant(t: impl AsInstant) -> Instant {
    t.instant()
}

/// Something a test names a provider with: its index, or an id the engine gave.
pub trait AsProvider {
    /// The provider's id.
    fn provider(self) -> ProviderId;
}
impl AsProvider for usize {
    fn provider(self) -> ProviderId {
        ProviderId::new(self)
    }
}
impl AsProvider for ProviderId {
    fn provider(self) -> ProviderId {
        self
    }
}

/// The provider at index `p` (or already an id).
pub fn pid(p: impl AsProvider) -> ProviderId {
    p.provider()
}

/// Something a test names an attempt with: its number, or an id the engine gave.
pub trait AsAttempt {
    /// The attempt's id.
    fn attempt(self) -> AttemptId;
}
impl AsAttempt for u32 {
    fn attempt(self) -> AttemptId {
        AttemptId::new(self).expect("attempts are numbered from 1")
    }
}
impl AsAttempt for AttemptId {
    fn attempt(self) -> AttemptId {
        self
    }
}

/// Attempt number `n` (from 1; or already an id).
pub fn nth(n: impl AsAttempt) -> AttemptId {
    n.attempt()
}

/// An instant the engine gave, as the tests count time: nanoseconds since the origin.
pub fn nanos(t: Instant) -> Nanos {
    t.as_nanos()
}
