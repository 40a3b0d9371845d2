//! State that must hold across Envoy's worker threads, kept in proxy-wasm shared data (one
//! store per VM id, process-wide) with compare-and-swap:
//! - rate limits: a GCRA theoretical arrival time per bucket, stepped with
//!   [`unbusy_core::bucket::gcra`] and written back only if no other worker wrote first;
//! - the L1 response cache: tenant-scoped keys (the engine's cache key), with the time each
//!   answer was stored so the engine's fresh/stale rule applies, bounded in bytes (see
//!   [`CacheBounds`]).

use crate::host::{Cas, Host};
use unbusy_core::bucket::{gcra, gcra_refund, Decision, Rate};
use unbusy_core::cache_key::CacheKey;
use unbusy_core::config::CacheConfig;
use unbusy_core::engine::CacheLookup;
use unbusy_core::time::Nanos;

/// A little-endian number stored in shared data (0 when absent or malformed), with its
/// compare-and-swap token.
fn read<const N: usize, T: Default>(
    host: &impl Host,
    key: &str,
    decode: fn([u8; N]) -> T,
) -> (T, Option<Cas>) {
    let (value, cas) = host.shared_get(key);
    let n = value
        .and_then(|v| <[u8; N]>::try_from(v.as_slice()).ok())
        .map_or_else(T::default, decode);
    (n, cas)
}

/// Compare-and-swap rounds before giving up (and allowing, rather than refusing on contention).
const CAS_ROUNDS: usize = 16;

/// A rate-limit bucket in shared data: its owner (a tenant id; 0 for global buckets) and its
/// GCRA theoretical arrival time. Tenants live in a fixed number of slots (their keys exist from
/// configuration time, so compare-and-swap always guards them): a tenant takes a slot whose
/// owner's bucket is idle (full again, so nothing is lost), and shares it while the owner's is
/// not (two tenants then draw on one bucket; with `limits.tenant_slots` slots, rarely).
pub const EMPTY_BUCKET: [u8; 16] = [0; 16];

/// A bucket's value as read: its owner and its TAT (0 and 0 when absent or malformed), and the
/// compare-and-swap token to write it back with.
fn bucket_value(host: &impl Host, key: &str) -> ((u64, u64), Option<Cas>) {
    let (value, cas) = host.shared_get(key);
    let word = |at: usize| {
        value
            .as_deref()
            .and_then(|v| v.get(at..at + 8))
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map_or(0, u64::from_le_bytes)
    };
    ((word(0), word(8)), cas)
}

/// A bucket's value as written: its owner and its TAT.
fn bucket_bytes(owner: u64, tat: Nanos) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&owner.to_le_bytes());
    value[8..].copy_from_slice(&tat.to_le_bytes());
    value
}

fn bucket(host: &impl Host, key: &str, owner: u64, now: Nanos) -> (u64, Option<Cas>) {
    let ((held_by, tat), cas) = bucket_value(host, key);
    let tat = if held_by == owner || tat > now {
        tat
    } else {
        0
    };
    (tat, cas)
}

/// Charges `cost` to the bucket `key` for `owner` at `rate`: one GCRA step applied atomically
/// across workers. Contention beyond `CAS_ROUNDS` lets the request through (a limit may be
/// briefly exceeded; a request is never refused for a race it lost).
pub fn charge(
    host: &impl Host,
    key: &str,
    owner: u64,
    rate: &Rate,
    now: Nanos,
    cost: u64,
) -> Decision {
    for _ in 0..CAS_ROUNDS {
        let (tat, cas) = bucket(host, key, owner, now);
        let (decision, new_tat) = gcra(rate, tat, now, cost);
        if !decision.is_allowed() {
            return decision;
        }
        if host.shared_set(key, &bucket_bytes(owner, new_tat), cas) {
            return decision;
        }
    }
    Decision::Allowed
}

/// Gives back `cost` charged to `owner`'s bucket `key` (the request was refused by another
/// bucket after this one was charged). A bucket another tenant has taken since is left alone.
pub fn refund(host: &impl Host, key: &str, owner: u64, rate: &Rate, cost: u64) {
    for _ in 0..CAS_ROUNDS {
        let ((held_by, tat), cas) = bucket_value(host, key);
        if held_by != owner {
            return;
        }
        if host.shared_set(key, &bucket_bytes(owner, gcra_refund(rate, tat, cost)), cas) {
            return;
        }
    }
}

/// Checks `cost` against `owner`'s bucket without charging it.
pub fn check(
    host: &impl Host,
    key: &str,
    owner: u64,
    rate: &Rate,
    now: Nanos,
    cost: u64,
) -> Decision {
    gcra(rate, bucket(host, key, owner, now).0, now, cost).0
}

/// Creates a shared value as `zero` unless it exists. Envoy's compare-and-swap only guards a
/// value that exists: two workers that both find a key absent both write it, and one update is
/// lost (two workers each taking "the first" of a provider's slots left the count one short for
/// the whole run, and the provider saw a fourth request on a quota of three). So every fixed
/// key is created at configuration time, before any request uses it.
pub fn ensure(host: &impl Host, key: &str, zero: &[u8]) {
    if host.shared_get(key).0.is_none() {
        host.shared_set(key, zero, None);
    }
}

/// A shared instant (0 when absent).
pub fn instant(host: &impl Host, key: &str) -> Nanos {
    read(host, key, u64::from_le_bytes).0
}

/// Raises a shared instant to `at` (never lowers it).
pub fn raise(host: &impl Host, key: &str, at: Nanos) {
    for _ in 0..CAS_ROUNDS {
        let (held, cas) = read(host, key, u64::from_le_bytes);
        if held >= at || host.shared_set(key, &at.to_le_bytes(), cas) {
            return;
        }
    }
}

/// How many slots of a shared counter are taken, by every worker together.
pub fn slots_held(host: &impl Host, key: &str) -> u32 {
    read(host, key, u32::from_le_bytes).0
}

/// Adds `delta` to a shared counter (never below 0); `false` if contention won every round.
pub fn add(host: &impl Host, key: &str, delta: i64) -> bool {
    for _ in 0..CAS_ROUNDS {
        let (held, cas) = read(host, key, u32::from_le_bytes);
        let next = i64::from(held)
            .saturating_add(delta)
            .clamp(0, i64::from(u32::MAX)) as u32;
        if host.shared_set(key, &next.to_le_bytes(), cas) {
            return true;
        }
    }
    false
}

/// Takes one of `quota` slots of a counter shared by every worker; `false` when all are taken.
pub fn slot_acquire(host: &impl Host, key: &str, quota: u32) -> bool {
    for _ in 0..CAS_ROUNDS {
        let (held, cas) = read(host, key, u32::from_le_bytes);
        if held >= quota {
            return false;
        }
        if host.shared_set(key, &(held + 1).to_le_bytes(), cas) {
            return true;
        }
    }
    false
}

/// Gives a slot back.
pub fn slot_release(host: &impl Host, key: &str) {
    for _ in 0..CAS_ROUNDS {
        let (held, cas) = read(host, key, u32::from_le_bytes);
        if host.shared_set(key, &held.saturating_sub(1).to_le_bytes(), cas) {
            return;
        }
    }
}

/// How the L1 cache stays bounded in shared data, which has no eviction and no delete:
/// - answers live in a fixed number of buckets (direct-mapped by the key's hash; a bucket holds
///   one answer and the full key it belongs to, and a newer answer for another key in the same
///   bucket replaces it), so the number of shared-data keys is bounded;
/// - a ledger counts the bytes held by all buckets; an answer that would take it past
///   `max_bytes` is not stored (answers already cached stay until they expire or are replaced),
///   so the bytes are bounded;
/// - an expired answer is emptied when a lookup finds it, and its bytes leave the ledger.
///
/// Bucket and ledger are two shared-data values, each updated with compare-and-swap; a worker
/// adjusts the ledger by exactly the change its own successful bucket write made.
#[derive(Debug, Clone, Copy)]
pub struct CacheBounds {
    /// Total bytes of cached answers (their bodies and 25 bytes of header each).
    pub max_bytes: u64,
    /// How many buckets.
    pub buckets: u64,
}

impl CacheBounds {
    /// One bucket per 16 KiB of `max_bytes` (a long chat answer), between 64 and 65536.
    pub fn for_max_bytes(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            buckets: (max_bytes / (16 << 10)).clamp(64, 65_536),
        }
    }
}

/// The shared-data key of the bytes ledger.
pub const LEDGER: &str = "unbusy:cache:bytes";

/// The bytes the cache holds now, across workers.
pub fn cache_bytes(host: &impl Host) -> u64 {
    read(host, LEDGER, u64::from_le_bytes).0
}

/// Adds `delta` to the ledger; with `limit`, only if the result stays within it.
fn ledger_add(host: &impl Host, delta: i64, limit: Option<u64>) -> bool {
    for _ in 0..CAS_ROUNDS {
        let (held, cas) = read(host, LEDGER, u64::from_le_bytes);
        let next = held.saturating_add_signed(delta);
        if limit.is_some_and(|l| delta > 0 && next > l) {
            return false;
        }
        if host.shared_set(LEDGER, &next.to_le_bytes(), cas) {
            return true;
        }
    }
    false
}

/// Bytes of a stored answer before its body: stored-at (8), stream flag (1), the key (16).
const ENTRY_HEADER: usize = 25;

fn cache_slot(key: CacheKey, bounds: &CacheBounds) -> String {
    let bucket = (key.0 % u128::from(bounds.buckets.max(1))) as u64;
    format!("unbusy:cache:{bucket}")
}

/// A cached answer.
pub struct Cached {
    /// Whether it is an SSE stream (else JSON).
    pub stream: bool,
    /// The body.
    pub body: Vec<u8>,
}

/// Looks `key` up: fresh, stale or expired by the core's rule (`CacheLookup::for_age`). An
/// expired answer found in the key's bucket is emptied.
pub fn cache_get(
    host: &impl Host,
    key: CacheKey,
    bounds: &CacheBounds,
    now: Nanos,
    config: &CacheConfig,
) -> (CacheLookup, Option<Cached>) {
    let slot = cache_slot(key, bounds);
    let (Some(v), cas) = host.shared_get(&slot) else {
        return (CacheLookup::Miss, None);
    };
    let (Some(stamp), Some(&stream), Some(stored_key), Some(body)) =
        (v.get(..8), v.get(8), v.get(9..25), v.get(ENTRY_HEADER..))
    else {
        return (CacheLookup::Miss, None);
    };
    let stored = <[u8; 8]>::try_from(stamp).map_or(0, u64::from_le_bytes);
    let lookup = CacheLookup::for_age(now.saturating_sub(stored), config);
    if lookup == CacheLookup::Miss {
        // Expired (whoever's it was): free its bytes.
        if host.shared_set(&slot, &[], cas) {
            ledger_add(host, -(v.len() as i64), None);
        }
        return (CacheLookup::Miss, None);
    }
    if stored_key != key.0.to_le_bytes() {
        return (CacheLookup::Miss, None); // another key's answer shares the bucket
    }
    (
        lookup,
        Some(Cached {
            stream: stream == 1,
            body: body.to_vec(),
        }),
    )
}

/// Stores an answer in its bucket (last writer wins; answers to the same key are
/// interchangeable). Returns `false` when it was not stored: the cache is full, or another
/// worker wrote the bucket at the same moment.
pub fn cache_put(
    host: &impl Host,
    key: CacheKey,
    bounds: &CacheBounds,
    now: Nanos,
    stream: bool,
    body: &[u8],
) -> bool {
    let mut v = Vec::with_capacity(body.len() + ENTRY_HEADER);
    v.extend_from_slice(&now.to_le_bytes());
    v.push(u8::from(stream));
    v.extend_from_slice(&key.0.to_le_bytes());
    v.extend_from_slice(body);
    let slot = cache_slot(key, bounds);
    let (old, cas) = host.shared_get(&slot);
    let delta = v.len() as i64 - old.map_or(0, |o| o.len() as i64);
    // Growth is reserved in the ledger first, so concurrent writers cannot overshoot together.
    if delta > 0 && !ledger_add(host, delta, Some(bounds.max_bytes)) {
        return false;
    }
    if !host.shared_set(&slot, &v, cas) {
        if delta > 0 {
            ledger_add(host, -delta, None);
        }
        return false;
    }
    if delta < 0 {
        ledger_add(host, delta, None);
    }
    true
}
