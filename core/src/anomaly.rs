//! Rolling statistics and EWMA detectors over latency and error rate.
//!
//! The degradation ladder should move when a provider is *unusually* slow or failing, not when it
//! is merely slow by nature. Two detectors, both constant memory:
//! - [`RollingStats`]: mean and standard deviation over the last `N` samples (a fixed ring with
//!   running sums, recomputed from the ring every `N` samples so floating-point drift cannot
//!   accumulate); a sample more than `k` deviations above the mean (3-sigma by default) is
//!   anomalous. The sample is judged against the window *before* it joins it.
//! - [`Ewma`]: an exponentially weighted moving average whose weight depends on the time since
//!   the previous sample (`alpha = 1 - 2^(-dt / half_life)`), so irregular traffic is averaged
//!   over time rather than over sample counts.
//!
//! [`SigmaDetector`] judges one signal (latency in ms, or a 0/1 error indicator) against its
//! rolling window; [`AnomalyDetector`] is that with an EWMA beside it. The engine uses the first:
//! it reads only the verdicts, and an EWMA nobody reads would cost the wasm builds `libm`'s
//! `exp2` and its 4 KB table.

use crate::time::Nanos;

/// Mean and deviation over the last `N` samples.
#[derive(Debug, Clone)]
pub struct RollingStats<const N: usize> {
    samples: [f64; N],
    next: usize,
    len: usize,
    sum: f64,
    sum_sq: f64,
}

impl<const N: usize> Default for RollingStats<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> RollingStats<N> {
    /// An empty window.
    pub const fn new() -> Self {
        const { assert!(N > 0, "a window needs at least one sample") };
        Self {
            samples: [0.0; N],
            next: 0,
            len: 0,
            sum: 0.0,
            sum_sq: 0.0,
        }
    }

    /// Samples in the window.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the window is empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a sample, evicting the oldest when full. Non-finite samples are ignored.
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        if let Some(slot) = self.samples.get_mut(self.next) {
            if self.len == N {
                let old = *slot;
                self.sum -= old;
                self.sum_sq -= old * old;
            } else {
                self.len += 1;
            }
            *slot = x;
        }
        self.sum += x;
        self.sum_sq += x * x;
        self.next = (self.next + 1) % N;
        if self.next == 0 {
            // Once per lap, recompute from the ring to shed accumulated rounding error.
            let live = self.samples.get(..self.len).unwrap_or(&[]);
            self.sum = live.iter().sum();
            self.sum_sq = live.iter().map(|v| v * v).sum();
        }
    }

    /// The mean (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.len == 0 {
            0.0
        } else {
            self.sum / self.len as f64
        }
    }

    /// The population standard deviation (0 when empty).
    pub fn std_dev(&self) -> f64 {
        if self.len == 0 {
            return 0.0;
        }
        let n = self.len as f64;
        let mean = self.sum / n;
        libm::sqrt((self.sum_sq / n - mean * mean).max(0.0))
    }

    /// How many deviations `x` is above the mean (0 when the window has no spread).
    pub fn z_score(&self, x: f64) -> f64 {
        let sd = self.std_dev();
        if sd <= f64::EPSILON {
            0.0
        } else {
            (x - self.mean()) / sd
        }
    }
}

/// A time-aware exponentially weighted moving average.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    half_life: Nanos,
    value: Option<f64>,
    last: Nanos,
}

impl Ewma {
    /// An average whose old samples weigh half after `half_life`.
    pub const fn with_half_life(half_life: Nanos) -> Self {
        Self {
            half_life,
            value: None,
            last: 0,
        }
    }

    /// Adds a sample observed at `now`.
    pub fn observe(&mut self, now: Nanos, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.value = Some(match self.value {
            None => x,
            Some(v) => {
                let dt = now.saturating_sub(self.last) as f64;
                let alpha = 1.0 - libm::exp2(-dt / (self.half_life.max(1) as f64));
                v + alpha * (x - v)
            }
        });
        self.last = now;
    }

    /// The average, if any sample was seen.
    pub const fn value(&self) -> Option<f64> {
        self.value
    }
}

/// The verdict on one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Deviations above the window's mean.
    pub z_score: f64,
    /// Whether the sample is anomalous.
    pub anomalous: bool,
}

/// A 3-sigma detector over one signal: each sample is judged against the rolling window of the
/// ones before it.
#[derive(Debug, Clone)]
pub struct SigmaDetector<const N: usize> {
    stats: RollingStats<N>,
    sigmas: f64,
    min_samples: usize,
}

impl<const N: usize> SigmaDetector<N> {
    /// A detector flagging samples more than `sigmas` deviations above the mean once it has
    /// `min_samples` samples.
    pub const fn new(sigmas: f64, min_samples: usize) -> Self {
        Self {
            stats: RollingStats::new(),
            sigmas,
            min_samples,
        }
    }

    /// Judges `x` against the window, then adds it.
    pub fn observe(&mut self, x: f64) -> Verdict {
        let z = self.stats.z_score(x);
        let anomalous = self.stats.len() >= self.min_samples && z > self.sigmas;
        self.stats.push(x);
        Verdict {
            z_score: z,
            anomalous,
        }
    }

    /// The rolling window.
    pub const fn stats(&self) -> &RollingStats<N> {
        &self.stats
    }
}

/// A 3-sigma detector with an EWMA beside it, over one signal.
#[derive(Debug, Clone)]
pub struct AnomalyDetector<const N: usize> {
    sigma: SigmaDetector<N>,
    ewma: Ewma,
}

impl<const N: usize> AnomalyDetector<N> {
    /// A detector flagging samples more than `sigmas` deviations above the mean once it has
    /// `min_samples` samples, with an EWMA of the given half-life.
    pub const fn new(sigmas: f64, min_samples: usize, half_life: Nanos) -> Self {
        Self {
            sigma: SigmaDetector::new(sigmas, min_samples),
            ewma: Ewma::with_half_life(half_life),
        }
    }

    /// Judges `x` against the window, then adds it.
    pub fn observe(&mut self, now: Nanos, x: f64) -> Verdict {
        let verdict = self.sigma.observe(x);
        self.ewma.observe(now, x);
        verdict
    }

    /// The rolling window.
    pub const fn stats(&self) -> &RollingStats<N> {
        self.sigma.stats()
    }

    /// The EWMA.
    pub const fn ewma(&self) -> Option<f64> {
        self.ewma.value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::secs;

    #[test]
    fn a_window_is_empty_until_a_finite_sample_arrives() {
        let mut s: RollingStats<2> = RollingStats::new();
        assert!(s.is_empty());
        s.push(f64::INFINITY);
        assert!(s.is_empty(), "a non-finite sample is not kept");
        s.push(1.0);
        assert!(!s.is_empty());
        s.push(2.0);
        s.push(3.0);
        assert!(!s.is_empty());
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn mean_and_deviation() {
        let mut s: RollingStats<4> = RollingStats::new();
        for x in [2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0] {
            s.push(x);
        }
        // Window holds the last four: 5, 5, 7, 9.
        assert!((s.mean() - 6.5).abs() < 1e-9);
        assert!((s.std_dev() - libm::sqrt(2.75)).abs() < 1e-9);
        s.push(f64::NAN);
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn three_sigma() {
        let mut d: AnomalyDetector<64> = AnomalyDetector::new(3.0, 20, secs(10));
        for i in 0..64 {
            let v = 1000.0 + (i % 10) as f64 * 10.0;
            assert!(!d.observe(secs(i), v).anomalous);
        }
        assert!(d.observe(secs(65), 5000.0).anomalous);
        assert!(!d.observe(secs(66), 1040.0).anomalous);
    }

    #[test]
    fn a_sample_exactly_at_the_threshold_is_not_an_anomaly() {
        // Window {0, 2}: mean 1, population deviation 1. 4 is exactly 3 deviations above.
        let fed = || {
            let mut d: AnomalyDetector<8> = AnomalyDetector::new(3.0, 2, secs(10));
            d.observe(0, 0.0);
            d.observe(secs(1), 2.0);
            d
        };
        let at = fed().observe(secs(2), 4.0);
        assert_eq!(at.z_score, 3.0);
        assert!(
            !at.anomalous,
            "more than 3 sigmas is anomalous, 3 itself is not"
        );
        assert!(fed().observe(secs(2), 4.001).anomalous);
    }

    #[test]
    fn the_detector_keeps_an_ewma_of_what_it_saw() {
        let mut d: AnomalyDetector<8> = AnomalyDetector::new(3.0, 2, secs(10));
        assert_eq!(d.ewma(), None);
        d.observe(0, 2.0);
        assert_eq!(d.ewma(), Some(2.0));
        d.observe(secs(10), 6.0);
        assert!(
            (d.ewma().unwrap_or(0.0) - 4.0).abs() < 1e-9,
            "{:?}",
            d.ewma()
        );
    }

    #[test]
    fn ewma_half_life() {
        let mut e = Ewma::with_half_life(secs(10));
        e.observe(0, 0.0);
        e.observe(secs(10), 1.0);
        assert!((e.value().unwrap_or(0.0) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn ewma_moves_toward_each_sample_by_the_weight_its_age_gives() {
        let mut e = Ewma::with_half_life(secs(10));
        e.observe(0, 2.0);
        assert_eq!(e.value(), Some(2.0), "the first sample is the average");
        // One half-life later, halfway from 2 to 6.
        e.observe(secs(10), 6.0);
        assert!(
            (e.value().unwrap_or(0.0) - 4.0).abs() < 1e-9,
            "{:?}",
            e.value()
        );
        // Two half-lives later, three quarters of the way from 4 down to 0.
        e.observe(secs(30), 0.0);
        assert!(
            (e.value().unwrap_or(0.0) - 1.0).abs() < 1e-9,
            "{:?}",
            e.value()
        );
        // A sample at the same instant moves nothing; a non-finite one is ignored.
        e.observe(secs(30), 100.0);
        e.observe(secs(40), f64::NAN);
        assert!(
            (e.value().unwrap_or(0.0) - 1.0).abs() < 1e-9,
            "{:?}",
            e.value()
        );
    }
}
