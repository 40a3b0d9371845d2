//! What the engine's test files share: a provider, a plain request, draining actions, an
//! outcome. (Each test file is its own crate and uses only some of these.)

#![allow(dead_code)]

use unbusy_core::classify::{Classification, OutcomeClass};
use unbusy_core::config::ProviderConfig;
use unbusy_core::engine::{Action, CacheLookup, Engine, Priority, RequestMeta};
use unbusy_core::time::Nanos;

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
