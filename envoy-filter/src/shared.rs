//! State that must hold across Envoy's worker threads, kept in proxy-wasm shared data (one
//! store per VM id, process-wide) with compare-and-swap:
//! - rate limits: a GCRA theoretical arrival time per bucket, stepped with
//!   [`unbusy_core::bucket::gcra`] and written back only if no other worker wrote first;
//! - the L1 response cache: tenant-scoped keys (the engine's cache key), bounded per entry,
//!   with the time it was stored so the engine's fresh/stale rule applies.

use crate::host;
use unbusy_core::bucket::{gcra, Decision, Rate};
use unbusy_core::cache_key::CacheKey;
use unbusy_core::engine::CacheLookup;
use unbusy_core::time::Nanos;

/// A little-endian number stored in shared data (0 when absent or malformed), with its
/// compare-and-swap token.
fn read<const N: usize, T: Default>(key: &str, decode: fn([u8; N]) -> T) -> (T, Option<u32>) {
    let (value, cas) = host::shared_get(key);
    let n = value
        .and_then(|v| <[u8; N]>::try_from(v.as_slice()).ok())
        .map_or_else(T::default, decode);
    (n, cas)
}

/// Compare-and-swap rounds before giving up (and allowing, rather than refusing on contention).
const CAS_ROUNDS: usize = 16;

/// Charges `cost` to the bucket `key` at `rate`: one GCRA step applied atomically across
/// workers. Contention beyond [`CAS_ROUNDS`] lets the request through (a limit may be briefly
/// exceeded; a request is never refused for a race it lost).
pub fn charge(key: &str, rate: &Rate, now: Nanos, cost: u64) -> Decision {
    for _ in 0..CAS_ROUNDS {
        let (tat, cas) = read(key, u64::from_le_bytes);
        let (decision, new_tat) = gcra(rate, tat, now, cost);
        if !decision.is_allowed() {
            return decision;
        }
        if host::shared_set(key, &new_tat.to_le_bytes(), cas) {
            return decision;
        }
    }
    Decision::Allowed
}

/// Checks `cost` against the bucket without charging it.
pub fn check(key: &str, rate: &Rate, now: Nanos, cost: u64) -> Decision {
    gcra(rate, read(key, u64::from_le_bytes).0, now, cost).0
}

/// Takes one of `quota` slots of a counter shared by every worker; `false` when all are taken.
pub fn slot_acquire(key: &str, quota: u32) -> bool {
    for _ in 0..CAS_ROUNDS {
        let (held, cas) = read(key, u32::from_le_bytes);
        if held >= quota {
            return false;
        }
        if host::shared_set(key, &(held + 1).to_le_bytes(), cas) {
            return true;
        }
    }
    false
}

/// Gives a slot back.
pub fn slot_release(key: &str) {
    for _ in 0..CAS_ROUNDS {
        let (held, cas) = read(key, u32::from_le_bytes);
        if host::shared_set(key, &held.saturating_sub(1).to_le_bytes(), cas) {
            return;
        }
    }
}

fn cache_slot(key: CacheKey) -> String {
    format!("unbusy:cache:{key}")
}

/// A cached answer.
pub struct Cached {
    /// Whether it is an SSE stream (else JSON).
    pub stream: bool,
    /// The body.
    pub body: Vec<u8>,
}

/// Looks `key` up: fresh within `ttl`, stale within `ttl + stale_ttl`.
pub fn cache_get(
    key: CacheKey,
    now: Nanos,
    ttl: Nanos,
    stale_ttl: Nanos,
) -> (CacheLookup, Option<Cached>) {
    let Some(v) = host::shared_get(&cache_slot(key)).0 else {
        return (CacheLookup::Miss, None);
    };
    let (Some(stamp), Some(&stream), Some(body)) = (v.get(..8), v.get(8), v.get(9..)) else {
        return (CacheLookup::Miss, None);
    };
    let stored = <[u8; 8]>::try_from(stamp).map_or(0, u64::from_le_bytes);
    let age = now.saturating_sub(stored);
    let lookup = if age < ttl {
        CacheLookup::Fresh
    } else if age < ttl.saturating_add(stale_ttl) {
        CacheLookup::Stale
    } else {
        return (CacheLookup::Miss, None);
    };
    (
        lookup,
        Some(Cached {
            stream: stream == 1,
            body: body.to_vec(),
        }),
    )
}

/// Stores an answer (last writer wins; answers to the same key are interchangeable).
pub fn cache_put(key: CacheKey, now: Nanos, stream: bool, body: &[u8]) {
    let mut v = Vec::with_capacity(body.len() + 9);
    v.extend_from_slice(&now.to_le_bytes());
    v.push(u8::from(stream));
    v.extend_from_slice(body);
    let slot = cache_slot(key);
    let cas = host::shared_get(&slot).1;
    let _ = host::shared_set(&slot, &v, cas);
}
