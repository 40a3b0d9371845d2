//! Active health checks: when to probe each provider and what its probes say.
//!
//! Why: the engine learns a provider is down only from the attempts it sends there. A provider
//! that went down while the proxy was idle is found out by the next caller's request, which
//! pays for it with a failed attempt (a connection timeout, a 503) before it fails over. A
//! cheap authenticated probe (by default `GET /v1/models` with the provider's key) on a fixed
//! interval finds it out first, so that request goes straight to another provider, as a global
//! load balancer's health checks do.
//!
//! The rules, sans-IO like the rest of the core (the host sends the probes and reports them):
//! - **schedule**: each provider is probed every `interval`, the first time as soon as the
//!   host starts; a probe taken ([`ProbeState::claim`]) moves the next one on by the interval
//!   (or the probe's timeout, if longer, so one provider never has two probes in flight);
//! - **what a probe says** ([`probe_says_up`]): any HTTP answer below 500 means the provider
//!   is reachable and answering: 2xx, but also 401/403 (a bad or revoked key: the provider is
//!   up, and every attempt there would get the same answer, which the caller must see), 404
//!   (no `/models` on that API) and 429 (busy or rate limited: the engine's retries, backoff
//!   and breaker handle that, and a busy provider still answers some requests). No answer
//!   (refused connection, reset, timeout) and any 5xx mean down;
//! - **verdict** ([`ProbeState::record`]): `unhealthy_threshold` probes in a row saying down
//!   mark the provider down, `healthy_threshold` in a row saying up mark it up again (the same
//!   hysteresis as Envoy's own health checks, so one lost probe does not flap it). Every
//!   provider starts up;
//! - **what the engine does with it** ([`avoid`]): a provider marked down is not chosen while
//!   another provider is usable, like one with an open breaker; when none is, it is tried
//!   anyway (a probe can be wrong, say a gateway with no `/models`, and refusing every request
//!   on its word would be worse than not trying).
//!
//! The verdict state is a few words per provider ([`ProbeState`], with a fixed byte form) so that
//! the Envoy filter can keep it in shared data and have exactly one worker probe each provider
//! per interval, and every worker see the verdict. The npm package keeps it in a [`Prober`].

use crate::config::HealthCheckConfig;
use crate::request::{base_path, Endpoint};
use crate::time::{ms, Nanos};
use alloc::string::String;
use alloc::vec::Vec;

/// What came back from one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    /// An HTTP answer with this status.
    Status(u16),
    /// No HTTP answer: refused, reset, timed out, or the host could not send it.
    NoAnswer,
}

/// Whether a probe's result says the provider is up (see the module's rules): any status below
/// 500 is up, a 5xx or no answer is down.
///
/// ```rust
/// use unbusy_core::health::{probe_says_up, ProbeResult};
/// assert!(probe_says_up(ProbeResult::Status(200)));
/// assert!(probe_says_up(ProbeResult::Status(401))); // reachable, bad key
/// assert!(probe_says_up(ProbeResult::Status(429))); // reachable, busy
/// assert!(!probe_says_up(ProbeResult::Status(503)));
/// assert!(!probe_says_up(ProbeResult::NoAnswer));
/// ```
pub fn probe_says_up(result: ProbeResult) -> bool {
    matches!(result, ProbeResult::Status(s) if (100..500).contains(&s))
}

/// Whether the engine passes over a provider for an attempt: it is marked down and another
/// provider is usable. (A down provider is still tried when nothing else can be.)
pub fn avoid(down: bool, another_usable: bool) -> bool {
    down && another_usable
}

/// The probe's path under a provider's base URL: a known endpoint (`/v1/models`) lands under
/// the base's own path as a request to it would (`https://api.deepseek.com` takes
/// `/models`, `https://api.openai.com/v1` takes `/v1/models`); any other path loses an
/// OpenAI-style `/v1` and goes under the base path. Without a base URL, the path as configured.
///
/// ```rust
/// use unbusy_core::health::probe_path;
/// assert_eq!(probe_path(Some("https://api.deepseek.com"), "/v1/models"), "/models");
/// assert_eq!(probe_path(Some("https://api.openai.com/v1"), "/v1/models"), "/v1/models");
/// assert_eq!(probe_path(None, "/v1/models"), "/v1/models");
/// // Not an endpoint unbusy maps: under the base URL's path, without `/v1`.
/// assert_eq!(probe_path(Some("https://a.example/api/"), "/v1/health"), "/api/health");
/// assert_eq!(probe_path(Some("https://a.example"), "/healthz"), "/healthz");
/// ```
pub fn probe_path(base_url: Option<&str>, path: &str) -> String {
    let Some(base) = base_url else {
        return path.into();
    };
    match Endpoint::of_path(path) {
        Some((endpoint, rest)) => endpoint.under(base, rest, ""),
        None => crate::text::concat(&[base_path(base), path.strip_prefix("/v1").unwrap_or(path)]),
    }
}

/// The schedule and thresholds, from [`HealthCheckConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthSettings {
    /// Between two probes of one provider.
    pub interval: Nanos,
    /// How long a probe may take before it counts as no answer.
    pub timeout: Nanos,
    /// Probes in a row saying down that mark a provider down (at least 1).
    pub unhealthy_threshold: u32,
    /// Probes in a row saying up that mark a down provider up again (at least 1).
    pub healthy_threshold: u32,
}

impl HealthSettings {
    /// The settings of a configuration's `health_check` section.
    pub fn of(config: &HealthCheckConfig) -> Self {
        Self {
            interval: ms(config.interval_ms),
            timeout: ms(config.timeout_ms),
            unhealthy_threshold: config.unhealthy_threshold.max(1),
            healthy_threshold: config.healthy_threshold.max(1),
        }
    }
}

/// One provider's probe schedule and verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeState {
    /// The next probe is due at this instant (0: at once).
    pub next_at: Nanos,
    /// Probes in a row that said up.
    pub ups: u32,
    /// Probes in a row that said down.
    pub downs: u32,
    /// The verdict: marked down.
    pub down: bool,
}

impl ProbeState {
    /// The length of [`ProbeState::to_bytes`].
    pub const BYTES: usize = 17;

    /// Whether a probe is due.
    pub fn due(&self, now: Nanos) -> bool {
        now >= self.next_at
    }

    /// Takes the probe due now: the next is due an interval later (or a timeout later, if
    /// that is longer, so a probe in flight is never doubled).
    pub fn claim(&mut self, now: Nanos, settings: &HealthSettings) {
        self.next_at = now.saturating_add(settings.interval.max(settings.timeout).max(1));
    }

    /// Counts a probe's result; returns the new verdict (`true`: up) when it changed.
    pub fn record(&mut self, settings: &HealthSettings, result: ProbeResult) -> Option<bool> {
        if probe_says_up(result) {
            self.ups = self.ups.saturating_add(1);
            self.downs = 0;
            if self.down && self.ups >= settings.healthy_threshold {
                self.down = false;
                return Some(true);
            }
        } else {
            self.downs = self.downs.saturating_add(1);
            self.ups = 0;
            if !self.down && self.downs >= settings.unhealthy_threshold {
                self.down = true;
                return Some(false);
            }
        }
        None
    }

    /// A fixed byte form (little-endian `next_at`, `ups`, `downs`, then the verdict), for
    /// state shared between processes or threads.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.next_at.to_le_bytes());
        out[8..12].copy_from_slice(&self.ups.to_le_bytes());
        out[12..16].copy_from_slice(&self.downs.to_le_bytes());
        out[16] = u8::from(self.down);
        out
    }

    /// The state back from [`ProbeState::to_bytes`]; `None` for anything else.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::BYTES] = bytes.try_into().ok()?;
        let word = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
        };
        Some(Self {
            next_at: u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?),
            ups: word(8)?,
            downs: word(12)?,
            down: match bytes[16] {
                0 => false,
                1 => true,
                _ => return None,
            },
        })
    }
}

/// Every provider's probes in one process (the npm package): which provider to probe when,
/// and the verdicts.
#[derive(Debug, Clone)]
pub struct Prober {
    settings: HealthSettings,
    states: Vec<ProbeState>,
}

impl Prober {
    /// Probes for `providers` providers, each due at once.
    pub fn new(settings: HealthSettings, providers: usize) -> Self {
        Self {
            settings,
            states: alloc::vec![ProbeState::default(); providers],
        }
    }

    /// The next provider to probe now, if one is due; its probe is taken (see
    /// [`ProbeState::claim`]), so each is returned once per interval.
    pub fn poll_probe(&mut self, now: Nanos) -> Option<usize> {
        let settings = self.settings;
        let (i, state) = self
            .states
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.due(now))?;
        state.claim(now, &settings);
        Some(i)
    }

    /// Provider `index`'s probe came back; its new verdict (`true`: up) when it changed.
    pub fn on_result(&mut self, index: usize, result: ProbeResult) -> Option<bool> {
        let settings = self.settings;
        self.states.get_mut(index)?.record(&settings, result)
    }

    /// When the next probe is due.
    pub fn next_wakeup(&self) -> Option<Nanos> {
        self.states.iter().map(|s| s.next_at).min()
    }

    /// Whether provider `index` is marked down.
    pub fn is_down(&self, index: usize) -> bool {
        self.states.get(index).is_some_and(|s| s.down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings(unhealthy: u32, healthy: u32) -> HealthSettings {
        HealthSettings {
            interval: ms(200),
            timeout: ms(100),
            unhealthy_threshold: unhealthy,
            healthy_threshold: healthy,
        }
    }

    #[test]
    fn reachable_answers_are_up_and_5xx_or_silence_down() {
        for s in [200, 204, 301, 401, 402, 403, 404, 429, 499] {
            assert!(probe_says_up(ProbeResult::Status(s)), "{s}");
        }
        for s in [0, 99, 500, 502, 503, 504, 529, 599, 600] {
            assert!(!probe_says_up(ProbeResult::Status(s)), "{s}");
        }
        assert!(!probe_says_up(ProbeResult::NoAnswer));
    }

    #[test]
    fn thresholds_mark_down_and_up_with_hysteresis() {
        let s = settings(2, 3);
        let mut p = ProbeState::default();
        assert_eq!(p.record(&s, ProbeResult::NoAnswer), None);
        // A success in between resets the count: one lost probe never marks it down.
        assert_eq!(p.record(&s, ProbeResult::Status(200)), None);
        assert_eq!(p.record(&s, ProbeResult::Status(503)), None);
        assert_eq!(p.record(&s, ProbeResult::NoAnswer), Some(false));
        assert!(p.down);
        assert_eq!(p.record(&s, ProbeResult::NoAnswer), None);
        assert_eq!(p.record(&s, ProbeResult::Status(200)), None);
        assert_eq!(p.record(&s, ProbeResult::Status(401)), None);
        assert_eq!(p.record(&s, ProbeResult::Status(429)), Some(true));
        assert!(!p.down);
        assert_eq!(p.record(&s, ProbeResult::Status(200)), None);
    }

    #[test]
    fn a_threshold_of_one_acts_on_the_first_probe() {
        let s = settings(1, 1);
        let mut p = ProbeState::default();
        assert_eq!(p.record(&s, ProbeResult::NoAnswer), Some(false));
        assert_eq!(p.record(&s, ProbeResult::Status(200)), Some(true));
    }

    #[test]
    fn probes_come_once_per_interval_and_never_overlap_a_longer_timeout() {
        let mut prober = Prober::new(settings(2, 2), 2);
        assert_eq!(prober.poll_probe(0), Some(0));
        assert_eq!(prober.poll_probe(0), Some(1));
        assert_eq!(prober.poll_probe(ms(199)), None);
        assert_eq!(prober.next_wakeup(), Some(ms(200)));
        assert_eq!(prober.poll_probe(ms(200)), Some(0));
        let slow = HealthSettings {
            timeout: ms(500),
            ..settings(2, 2)
        };
        let mut p = ProbeState::default();
        p.claim(ms(10), &slow);
        assert_eq!(p.next_at, ms(510));
        assert!(!p.due(ms(509)));
        assert!(p.due(ms(510)));
    }

    #[test]
    fn the_prober_keeps_each_providers_verdict() {
        let mut prober = Prober::new(settings(2, 2), 2);
        assert!(!prober.is_down(0));
        assert_eq!(prober.on_result(1, ProbeResult::NoAnswer), None);
        assert_eq!(prober.on_result(1, ProbeResult::NoAnswer), Some(false));
        assert!(prober.is_down(1) && !prober.is_down(0));
        assert_eq!(prober.on_result(7, ProbeResult::NoAnswer), None);
        assert!(!prober.is_down(7));
    }

    #[test]
    fn a_down_provider_is_avoided_only_while_another_is_usable() {
        assert!(avoid(true, true));
        assert!(!avoid(true, false));
        assert!(!avoid(false, true));
        assert!(!avoid(false, false));
    }

    #[test]
    fn malformed_bytes_are_no_state() {
        assert_eq!(ProbeState::from_bytes(&[]), None);
        assert_eq!(ProbeState::from_bytes(&[0; 16]), None);
        let mut bad = [0u8; ProbeState::BYTES];
        bad[16] = 2;
        assert_eq!(ProbeState::from_bytes(&bad), None);
        assert_eq!(
            ProbeState::from_bytes(&[0; ProbeState::BYTES]),
            Some(ProbeState::default())
        );
    }

    proptest! {
        #[test]
        fn bytes_round_trip(next_at: u64, ups: u32, downs: u32, down: bool) {
            let s = ProbeState { next_at, ups, downs, down };
            prop_assert_eq!(ProbeState::from_bytes(&s.to_bytes()), Some(s));
        }

        /// Whatever the results, the verdict is down exactly when the latest run of
        /// probes saying down reached the unhealthy threshold since the provider was last
        /// marked up, and the reverse.
        #[test]
        fn the_verdict_follows_the_runs(
            results in proptest::collection::vec(any::<bool>(), 0..60),
            unhealthy in 1u32..5,
            healthy in 1u32..5,
        ) {
            let s = settings(unhealthy, healthy);
            let mut p = ProbeState::default();
            let mut down = false;
            let mut run = 0u32;
            let mut last = None;
            for up in results {
                run = if last == Some(up) { run + 1 } else { 1 };
                last = Some(up);
                let result = if up { ProbeResult::Status(200) } else { ProbeResult::NoAnswer };
                let changed = p.record(&s, result);
                let was = down;
                if up && down && run >= healthy {
                    down = false;
                } else if !up && !down && run >= unhealthy {
                    down = true;
                }
                prop_assert_eq!(p.down, down);
                prop_assert_eq!(changed, (was != down).then_some(!down));
            }
        }
    }
}
