//! The fleet's share of providers' concurrency quotas and pauses, through `unbusy-store`
//! (`docs/store.md`, steps 3 and 4): the bytes only; every rule is in
//! [`unbusy_core::fleet`].
//!
//! Why it lives in the root context's tick and shared data: a quota and a pause are the
//! proxy's, not a worker's, and the hot path must never wait on the store. So once per
//! `store.poll_ms` one worker of the proxy (whichever claims the shared poll instant first)
//! renews the proxy's holding of each quota (holder: a random id the first worker made,
//! shared by all) and reads the pauses other proxies published; it writes what it learns into
//! shared data, where every worker's admission already reads the in-flight counts and the
//! breaker verdicts it shares with the others. Each worker publishes its own engine's verdicts
//! (an open breaker, a run of hinted 429s) as it sees them. Answers come back to the root
//! context that sent them. Anything but the expected answer is an outage: local behaviour
//! only (the last holding until its lease ends, then the local share), one log line per
//! outage.

use super::{breaker_key, slot_key, State};
use crate::host::{CallToken, Host};
use crate::shared;
use crate::store::{self, Call};
use unbusy_core::fleet::{self, Holding};
use unbusy_core::ids::ProviderId;
use unbusy_core::time::{ms, Instant, Nanos};

/// The shared-data key of the proxy's holder id in the store's semaphores.
const HOLDER: &str = "unbusy:fleet:holder";

/// The shared-data key of the next instant a worker polls the store.
const POLL_AT: &str = "unbusy:fleet:poll_at";

/// The shared-data key of the proxy's requests waiting for a provider's slot.
const WAITING: &str = "unbusy:fleet:waiting";

/// The bound on each call to the store: they are off the hot path, so the store's own 250 ms.
pub const CALL_TIMEOUT_MS: u64 = 250;

/// The shared-data key of the proxy's holding of provider `i`'s quota.
fn holding_key(provider: usize) -> String {
    format!("unbusy:fleet:held:{provider}")
}

/// The shared-data key of the attempts turned away from a provider for want of a slot since
/// the last renewal (demand that went elsewhere: see `fleet::want`).
fn turned_away_key(provider: usize) -> String {
    format!("unbusy:fleet:turned:{provider}")
}

/// The shared-data key of when an attempt was last turned away from a provider.
fn turned_away_at_key(provider: usize) -> String {
    format!("unbusy:fleet:turned_at:{provider}")
}

/// A holding as stored: held (4), lease end (8), and when the latest renewal was asked (8),
/// so an answer to an older one is not applied over it.
fn holding_bytes(h: Holding, asked: Nanos) -> [u8; 20] {
    let mut v = [0u8; 20];
    v[..4].copy_from_slice(&h.held.to_le_bytes());
    v[4..12].copy_from_slice(&h.until.to_le_bytes());
    v[12..].copy_from_slice(&asked.to_le_bytes());
    v
}

/// A stored holding, its renewal instant, and its compare-and-swap token (held 0 until 0:
/// absent or malformed, the fallback share).
fn holding(host: &impl Host, key: &str) -> (Holding, Nanos, Option<crate::host::Cas>) {
    let (v, cas) = host.shared_get(key);
    let v = v.unwrap_or_default();
    let word = |r: std::ops::Range<usize>| v.get(r).map(<[u8]>::to_vec).unwrap_or_default();
    let held = <[u8; 4]>::try_from(word(0..4).as_slice()).map_or(0, u32::from_le_bytes);
    let until = <[u8; 8]>::try_from(word(4..12).as_slice()).map_or(0, u64::from_le_bytes);
    let asked = <[u8; 8]>::try_from(word(12..20).as_slice()).map_or(0, u64::from_le_bytes);
    (Holding { held, until }, asked, cas)
}

/// Compare-and-swap rounds for a holding.
const ROUNDS: usize = 16;

/// Rewrites provider `i`'s holding with `f` (given the holding and when it was last asked;
/// `None` leaves it).
fn update(host: &impl Host, key: &str, f: impl Fn(Holding, Nanos) -> Option<(Holding, Nanos)>) {
    for _ in 0..ROUNDS {
        let (h, asked, cas) = holding(host, key);
        let Some((h, asked)) = f(h, asked) else {
            return;
        };
        if host.shared_set(key, &holding_bytes(h, asked), cas) {
            return;
        }
    }
}

/// Whether the store accepts `name` in a key (1 to 128 of `A-Z a-z 0-9 _ . -`): a provider
/// named otherwise is left out of the fleet's state rather than draw a 400 every poll.
fn store_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// What a call to the store was for.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// Renewing the proxy's holding of provider `.0`'s quota, asked at `.1`.
    Hold(usize, Nanos),
    /// Reading the pauses other proxies published.
    Poll,
    /// Publishing a verdict of this worker's engine.
    Publish,
}

/// This worker's side of the fleet's state.
#[derive(Default)]
pub struct Fleet {
    /// Calls in flight.
    calls: Vec<(CallToken, Purpose)>,
    /// Per provider, the latest verdict this worker published (until when).
    published: Vec<Nanos>,
    /// How many waiting requests this worker counts in [`WAITING`].
    waiting: u32,
    /// The store failed last time (its outage was logged once).
    down: bool,
}

impl<H: Host> State<H> {
    /// Creates the fleet's shared keys (see [`shared::ensure`]): the holder id (the first
    /// worker's random one), the poll instant, and a holding of nothing until the first renewal
    /// can have been answered.
    pub(super) fn fleet_setup(&mut self, seed: u64) {
        if self.config.store.fleet_cluster().is_none() {
            return;
        }
        let host = &self.host;
        let mut rng = unbusy_core::Rng::with_seed(seed ^ 0x6669_6565_7473);
        let id = format!("unbusy-{:016x}", rng.u64(..));
        shared::ensure(host, HOLDER, id.as_bytes());
        shared::ensure(host, POLL_AT, &0u64.to_le_bytes());
        shared::ensure(host, WAITING, &0u32.to_le_bytes());
        let now = host.now();
        let start = fleet::starting(now, self.config.store.poll_ms, CALL_TIMEOUT_MS);
        for (i, p) in self.config.providers.iter().enumerate() {
            if p.max_concurrency.is_some() {
                shared::ensure(host, &holding_key(i), &holding_bytes(start, 0));
            }
        }
        self.fleet.published = vec![0; self.config.providers.len()];
    }

    /// An attempt goes to provider `chosen`: every other provider of the same or a better
    /// tier (one the engine would have preferred or weighed with it; a worse tier is only
    /// used when this one is unusable, so it lost nothing) whose fleet quota this proxy has
    /// used up gets one more attempt turned away, the demand its next renewal asks for
    /// (`fleet::want`). The usual case, the most preferred provider chosen alone in its tier,
    /// reads nothing.
    pub(super) fn count_turned_away(&self, now: Nanos, chosen: usize) {
        let Some(tier) = self.config.providers.get(chosen).map(|p| p.priority) else {
            return;
        };
        for (i, p) in self.config.providers.iter().enumerate() {
            if i == chosen || p.max_concurrency.is_none() || p.priority > tier {
                continue;
            }
            let full = self
                .quota(now, i)
                .is_some_and(|q| shared::slots_held(&self.host, &slot_key(i)) >= q);
            if full {
                self.turned_away(now, i);
            }
        }
    }

    /// Counts an attempt turned away from provider `i` for want of a slot: demand for the
    /// next renewal (`fleet::want`).
    pub(super) fn turned_away(&self, now: Nanos, i: usize) {
        shared::add(&self.host, &turned_away_key(i), 1);
        shared::raise(&self.host, &turned_away_at_key(i), now);
    }

    /// How many attempts this proxy may have in flight to provider `i`: its fleet holding with
    /// a store, else the provider's `max_concurrency` (`None`: no quota).
    pub(super) fn quota(&self, now: Nanos, i: usize) -> Option<u32> {
        let p = self.config.providers.get(i)?;
        let max = p.max_concurrency?;
        if self.config.store.fleet_cluster().is_none() || !store_name(&p.name) {
            return Some(max);
        }
        let (h, _, _) = holding(&self.host, &holding_key(i));
        Some(fleet::quota(
            now,
            h,
            max,
            self.config.store.expected_proxies,
        ))
    }

    /// The calls to send to the store now, from the root context, with its cluster: this
    /// worker's new verdicts, and, when this worker claims this poll, the proxy's holdings and
    /// the poll of pauses. Also counts this worker's waiting requests for the proxy.
    pub fn fleet_calls(&mut self, now: Nanos) -> Option<(String, Vec<(Purpose, Call)>)> {
        let cluster = self.config.store.fleet_cluster()?.to_string();
        let mut calls = Vec::new();
        self.count_waiting();
        for (i, p) in self.config.providers.iter().enumerate() {
            if !store_name(&p.name) {
                continue;
            }
            let breaker = self
                .engine
                .breaker_open_until(Instant::from_nanos(now), ProviderId::new(i))
                .map(Instant::as_nanos);
            let cooldown = self
                .engine
                .cooldown_until(Instant::from_nanos(now), ProviderId::new(i))
                .map(Instant::as_nanos);
            let (until, reason) = match (breaker, cooldown) {
                (Some(b), Some(c)) if c > b => (c, "retry_after"),
                (Some(b), _) => (b, "breaker_open"),
                (None, Some(c)) => (c, "retry_after"),
                (None, None) => continue,
            };
            let Some(last) = self.fleet.published.get_mut(i) else {
                continue;
            };
            if until <= *last {
                continue;
            }
            if let Some(for_ms) = fleet::pause_for_ms(now, until) {
                *last = until;
                calls.push((
                    Purpose::Publish,
                    store::publish_pause(&p.name, for_ms, reason),
                ));
            }
        }
        if self.claim_poll(now) {
            calls.extend(self.renewals(now));
            let names: Vec<&str> = self
                .config
                .providers
                .iter()
                .map(|p| p.name.as_str())
                .filter(|n| store_name(n))
                .take(64)
                .collect();
            if !names.is_empty() {
                calls.push((Purpose::Poll, store::poll_pauses(&names)));
            }
        }
        (!calls.is_empty()).then_some((cluster, calls))
    }

    /// Keeps this worker's count of waiting requests in the proxy's shared count.
    fn count_waiting(&mut self) {
        let mine = u32::try_from(self.engine.waiting_for_capacity()).unwrap_or(u32::MAX);
        if mine != self.fleet.waiting
            && shared::add(
                &self.host,
                WAITING,
                i64::from(mine) - i64::from(self.fleet.waiting),
            )
        {
            self.fleet.waiting = mine;
        }
    }

    /// Whether this worker polls now: the first to move the shared poll instant past `now`.
    fn claim_poll(&self, now: Nanos) -> bool {
        let (at, cas) = self.host.shared_get(POLL_AT);
        let at = at
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_le_bytes);
        if now < at {
            return false;
        }
        let next = now.saturating_add(ms(self.config.store.poll_ms));
        self.host.shared_set(POLL_AT, &next.to_le_bytes(), cas)
    }

    /// The renewals of the proxy's holdings, each lowering the holding at once to what it asks
    /// when that is less.
    fn renewals(&self, now: Nanos) -> Vec<(Purpose, Call)> {
        let holder = self.host.shared_get(HOLDER).0.unwrap_or_default();
        let holder = String::from_utf8_lossy(&holder);
        let waiting = shared::slots_held(&self.host, WAITING);
        let lease = fleet::lease_ms(self.config.store.poll_ms);
        let mut calls = Vec::new();
        for (i, p) in self.config.providers.iter().enumerate() {
            let Some(max) = p.max_concurrency else {
                continue;
            };
            if !store_name(&p.name) {
                continue;
            }
            let in_flight = shared::slots_held(&self.host, &slot_key(i));
            // Taken, not read: what is turned away after this is counted for the next renewal.
            let turned = shared::slots_held(&self.host, &turned_away_key(i));
            if turned > 0 {
                shared::add(&self.host, &turned_away_key(i), -i64::from(turned));
            }
            let last = shared::instant(&self.host, &turned_away_at_key(i));
            let recently = last > 0 && now.saturating_sub(last) < ms(lease);
            let want = fleet::want(in_flight, waiting, turned, recently, max);
            update(&self.host, &holding_key(i), |h, _| {
                Some((fleet::asking(h, want), now))
            });
            calls.push((
                Purpose::Hold(i, now),
                store::hold(&p.name, &holder, u64::from(want), u64::from(max), lease),
            ));
        }
        calls
    }

    /// A call to the store was dispatched.
    pub fn fleet_dispatched(&mut self, token: CallToken, purpose: Purpose) {
        self.fleet.calls.push((token, purpose));
    }

    /// Whether `token` is one of this worker's fleet calls.
    pub(super) fn fleet_owns(&self, token: CallToken) -> bool {
        self.fleet.calls.iter().any(|(t, _)| *t == token)
    }

    /// The store answered a fleet call (or Envoy did for it: a timeout, a reset).
    pub(super) fn fleet_answer(
        &mut self,
        token: CallToken,
        now: Nanos,
        headers: &[(String, String)],
        body: &[u8],
    ) {
        let Some(i) = self.fleet.calls.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, purpose) = self.fleet.calls.swap_remove(i);
        let ok = match purpose {
            Purpose::Hold(i, asked) => match store::read_held(headers, body) {
                Some(held) => {
                    let lease = fleet::lease_ms(self.config.store.poll_ms);
                    let held = u32::try_from(held).unwrap_or(u32::MAX);
                    // Only the latest renewal's answer: an older one may grant what the latest
                    // gave up.
                    update(&self.host, &holding_key(i), |_, latest| {
                        (latest == asked).then(|| (fleet::granted(held, asked, lease), asked))
                    });
                    true
                }
                None => false,
            },
            Purpose::Poll => match store::read_pauses(headers, body) {
                Some(pauses) => {
                    for (name, remaining) in pauses {
                        let Some(i) = self.config.providers.iter().position(|p| p.name == name)
                        else {
                            continue;
                        };
                        let until = fleet::pause_until(now, remaining);
                        shared::raise(&self.host, &breaker_key(i), until);
                    }
                    true
                }
                None => false,
            },
            Purpose::Publish => matches!(store::status(headers), Some(200 | 204)),
        };
        if ok {
            self.fleet_up();
        } else {
            let why = if store::status(headers).is_some() {
                "an error status"
            } else {
                "no answer in time"
            };
            self.fleet_failed(why);
        }
    }

    /// The store answered: a line if it had failed.
    fn fleet_up(&mut self) {
        self.metrics.store_poll(&self.host, true);
        if self.fleet.down {
            self.fleet.down = false;
            self.host
                .info("unbusy: fleet quotas and pauses: the store answers again");
        }
    }

    /// A fleet call failed or was refused: one log line per outage, and a metric.
    pub fn fleet_failed(&mut self, why: &str) {
        self.metrics.store_poll(&self.host, false);
        if !self.fleet.down {
            self.fleet.down = true;
            let mut line = String::from("unbusy: fleet quotas and pauses: no store (");
            line.push_str(why);
            line.push_str("); local only until it answers again");
            self.host.warn(&line);
        }
    }
}
