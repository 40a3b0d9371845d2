//! The degradation ladder.
//!
//! When providers are struggling, answering *something useful* beats answering nothing, and
//! answering "busy, retry in 20 s" at once beats hanging for ten minutes. The ladder has four
//! tiers, each a superset of the one below:
//! - **0 normal**: everything as configured;
//! - **1 feature**: shed low-priority traffic, cap `max_tokens`, map an expensive model to a
//!   cheaper one where configured: less work per request, same callers served;
//! - **2 data**: serve stale cached answers where there are any, instead of calling a provider;
//! - **3 service**: fail fast with a clear busy error and `Retry-After`, sparing callers the wait
//!   and providers the load (probes still go through the breakers).
//!
//! The ladder is driven by a single *pressure* in `[0, 1]` (see [`pressure`]) and has hysteresis:
//! a tier is entered when pressure reaches its `enter` threshold, left only when pressure falls
//! below its lower `exit` threshold, and never left before `min_dwell` has passed since the last
//! change. Escalation may jump several tiers at once (an outage is not a brownout); recovery goes
//! down one tier at a time, so a provider that has just come back is not hit with full traffic at
//! once.

use crate::time::{secs, Nanos};

/// A degradation tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Tier {
    /// Everything as configured.
    #[default]
    Normal = 0,
    /// Shed low priority, cap `max_tokens`, map to cheaper models.
    Feature = 1,
    /// Also serve stale cached answers.
    Data = 2,
    /// Also fail fast.
    Service = 3,
}

impl Tier {
    /// The tier's number (the gauge hosts export).
    pub const fn level(self) -> u8 {
        self as u8
    }

    const fn from_level(level: u8) -> Self {
        match level {
            0 => Self::Normal,
            1 => Self::Feature,
            2 => Self::Data,
            _ => Self::Service,
        }
    }

    /// Whether feature degradation applies (shed low priority, cap tokens, cheaper model).
    pub const fn degrades_features(self) -> bool {
        self.level() >= 1
    }

    /// Whether stale cached answers are served.
    pub const fn serves_stale(self) -> bool {
        self.level() >= 2
    }

    /// Whether requests fail fast.
    pub const fn fails_fast(self) -> bool {
        self.level() >= 3
    }
}

/// Thresholds for one tier: entered at `enter`, left below `exit` (`exit < enter`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Pressure at which the tier is entered.
    pub enter: f64,
    /// Pressure below which the tier is left.
    pub exit: f64,
}

/// The ladder's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LadderSettings {
    /// Thresholds for tiers 1, 2 and 3. Defaults: 0.3/0.15, 0.6/0.4, 0.9/0.7.
    pub tiers: [Thresholds; 3],
    /// The least time between two changes. Default 10 s.
    pub min_dwell: Nanos,
}

impl Default for LadderSettings {
    fn default() -> Self {
        Self {
            tiers: [
                Thresholds {
                    enter: 0.3,
                    exit: 0.15,
                },
                Thresholds {
                    enter: 0.6,
                    exit: 0.4,
                },
                Thresholds {
                    enter: 0.9,
                    exit: 0.7,
                },
            ],
            min_dwell: secs(10),
        }
    }
}

/// Combines the health signals into one pressure in `[0, 1]`: the worst of the recent error
/// rate, the share of providers whose breaker is open, and a latency anomaly (a 3-sigma latency
/// outlier counts 0.5: slow is bad, but not as bad as failing).
// `max`/`min`, not `clamp`: `f64::clamp`'s panic message links core's float formatting (about
// 20 KB of the npm package's wasm).
#[allow(clippy::manual_clamp)]
pub fn pressure(error_rate: f64, open_breaker_share: f64, latency_anomalous: bool) -> f64 {
    let latency = if latency_anomalous { 0.5 } else { 0.0 };
    let p = error_rate.max(open_breaker_share).max(latency);
    if p.is_nan() {
        0.0
    } else {
        p.max(0.0).min(1.0)
    }
}

/// The ladder's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ladder {
    settings: LadderSettings,
    tier: Tier,
    changed_at: Option<Nanos>,
}

impl Ladder {
    /// A ladder at tier 0.
    pub const fn new(settings: LadderSettings) -> Self {
        Self {
            settings,
            tier: Tier::Normal,
            changed_at: None,
        }
    }

    /// The current tier.
    pub const fn tier(&self) -> Tier {
        self.tier
    }

    /// Feeds the current pressure; returns the (possibly new) tier.
    pub fn update(&mut self, now: Nanos, pressure: f64) -> Tier {
        let dwelt = self
            .changed_at
            .is_none_or(|t| now.saturating_sub(t) >= self.settings.min_dwell);
        if !dwelt {
            return self.tier;
        }
        let target_up = self
            .settings
            .tiers
            .iter()
            .rposition(|t| pressure >= t.enter)
            .map_or(Tier::Normal, |i| Tier::from_level(i as u8 + 1));
        let next = if target_up > self.tier {
            target_up
        } else {
            let level = self.tier.level();
            let exit = level
                .checked_sub(1)
                .and_then(|i| self.settings.tiers.get(usize::from(i)))
                .map(|t| t.exit);
            match exit {
                Some(exit) if pressure < exit => Tier::from_level(level - 1),
                _ => self.tier,
            }
        };
        if next != self.tier {
            self.tier = next;
            self.changed_at = Some(now);
        }
        self.tier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalates_at_once_and_recovers_one_tier_per_dwell() {
        let mut l = Ladder::new(LadderSettings::default());
        assert_eq!(l.update(0, 0.1), Tier::Normal);
        assert_eq!(l.update(secs(1), 0.95), Tier::Service);
        // Dwell: no change for 10 s even if pressure vanishes.
        assert_eq!(l.update(secs(5), 0.0), Tier::Service);
        assert_eq!(l.update(secs(11), 0.0), Tier::Data);
        assert_eq!(l.update(secs(12), 0.0), Tier::Data);
        assert_eq!(l.update(secs(21), 0.0), Tier::Feature);
        assert_eq!(l.update(secs(31), 0.0), Tier::Normal);
    }

    #[test]
    fn hysteresis_band_holds_the_tier() {
        let mut l = Ladder::new(LadderSettings::default());
        assert_eq!(l.update(0, 0.35), Tier::Feature);
        // 0.2 is below enter (0.3) but above exit (0.15): stay.
        assert_eq!(l.update(secs(20), 0.2), Tier::Feature);
        assert_eq!(l.update(secs(40), 0.1), Tier::Normal);
    }

    #[test]
    fn each_tier_adds_its_measure_to_those_below() {
        let measures = |t: Tier| (t.degrades_features(), t.serves_stale(), t.fails_fast());
        assert_eq!(measures(Tier::Normal), (false, false, false));
        assert_eq!(measures(Tier::Feature), (true, false, false));
        assert_eq!(measures(Tier::Data), (true, true, false));
        assert_eq!(measures(Tier::Service), (true, true, true));
        assert_eq!(
            [Tier::Normal, Tier::Feature, Tier::Data, Tier::Service].map(Tier::level),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn a_tier_is_entered_at_its_threshold_and_left_only_below_its_exit() {
        let mut l = Ladder::new(LadderSettings::default());
        // Exactly at `enter` enters tier 2 (not only above it).
        assert_eq!(l.update(0, 0.6), Tier::Data);
        // Exactly at tier 2's `exit` (0.4) stays; just below leaves, one tier at a time.
        assert_eq!(l.update(secs(10), 0.4), Tier::Data);
        assert_eq!(l.update(secs(20), 0.39), Tier::Feature);
        assert_eq!(l.update(secs(30), 0.15), Tier::Feature);
        assert_eq!(l.update(secs(40), 0.149), Tier::Normal);
    }

    #[test]
    fn the_dwell_ends_exactly_min_dwell_after_a_change() {
        let mut l = Ladder::new(LadderSettings::default());
        assert_eq!(l.update(secs(3), 0.95), Tier::Service);
        // One nanosecond short of 10 s after the change: held; at 10 s: one tier down.
        assert_eq!(l.update(secs(13) - 1, 0.0), Tier::Service);
        assert_eq!(l.update(secs(13), 0.0), Tier::Data);
        // The dwell also holds escalation: pressure back up 1 s after a change waits.
        assert_eq!(l.update(secs(14), 0.95), Tier::Data);
        assert_eq!(l.update(secs(23), 0.95), Tier::Service);
    }

    #[test]
    fn pressure_is_bounded() {
        assert_eq!(pressure(2.0, 0.0, false), 1.0);
        assert_eq!(pressure(f64::NAN, f64::NAN, false), 0.0);
        assert_eq!(pressure(0.1, 0.5, false), 0.5);
        assert_eq!(pressure(0.1, 0.0, true), 0.5);
    }
}
