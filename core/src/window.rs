//! A fixed ring of time buckets.
//!
//! The retry budget, the adaptive throttle and the circuit breaker all ask "how many X happened in
//! the last W seconds?". Following linkerd2-proxy's success-rate breaker, the window is a fixed
//! array of `N` buckets, each covering `W / N` of time and tagged with the epoch (bucket number
//! since the origin) it was last written in. A bucket whose epoch fell out of the window counts as
//! empty and is cleared when reused. Memory is constant, there is no timer, and `now` is passed in.
//!
//! The window's resolution is one bucket: an event leaves the sum between `W - W/N` and `W` after
//! it happened. Callers pick `N` for the precision they need (10 buckets: 10%).

use crate::time::Nanos;

/// A ring of `N` time buckets, each holding a `T` (a counter struct).
#[derive(Debug, Clone)]
pub struct Ring<T, const N: usize> {
    bucket_ns: Nanos,
    slots: [(u64, T); N],
}

impl<T: Copy + Default, const N: usize> Ring<T, N> {
    /// A ring covering `window_ns` with `N` buckets. A zero window is treated as one nanosecond
    /// per bucket (config validation rejects it long before).
    pub fn new(window_ns: Nanos) -> Self {
        const { assert!(N > 0, "a ring needs at least one bucket") };
        let buckets = N as u64;
        Self {
            bucket_ns: (window_ns / buckets).max(1),
            // u64::MAX marks a bucket that was never written.
            slots: [(u64::MAX, T::default()); N],
        }
    }

    /// The whole window this ring covers.
    pub fn window_ns(&self) -> Nanos {
        self.bucket_ns.saturating_mul(N as u64)
    }

    fn epoch(&self, now: Nanos) -> u64 {
        now / self.bucket_ns
    }

    fn is_live(&self, slot_epoch: u64, now_epoch: u64) -> bool {
        slot_epoch != u64::MAX && slot_epoch <= now_epoch && now_epoch - slot_epoch < N as u64
    }

    /// The bucket for `now`, cleared first if it last held an older epoch.
    pub fn current(&mut self, now: Nanos) -> &mut T {
        let epoch = self.epoch(now);
        // `epoch % N < N` and `N > 0` is checked at compile time in `new`.
        #[allow(clippy::indexing_slicing)]
        let slot = &mut self.slots[(epoch % N as u64) as usize];
        if slot.0 != epoch {
            *slot = (epoch, T::default());
        }
        &mut slot.1
    }

    /// Folds the buckets still inside the window at `now`.
    pub fn fold<A>(&self, now: Nanos, init: A, mut f: impl FnMut(A, &T) -> A) -> A {
        let now_epoch = self.epoch(now);
        let mut acc = init;
        for (epoch, value) in &self.slots {
            if self.is_live(*epoch, now_epoch) {
                acc = f(acc, value);
            }
        }
        acc
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        for slot in &mut self.slots {
            *slot = (u64::MAX, T::default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::secs;

    #[test]
    fn counts_inside_window_and_forgets_outside() {
        let mut ring: Ring<u32, 10> = Ring::new(secs(10));
        *ring.current(0) += 1;
        *ring.current(secs(5)) += 2;
        assert_eq!(ring.fold(secs(5), 0, |a, v| a + v), 3);
        // At t=10.5 s the bucket of t=0 is out, the one of t=5 is in.
        assert_eq!(ring.fold(secs(10) + 500_000_000, 0, |a, v| a + v), 2);
        assert_eq!(ring.fold(secs(16), 0, |a, v| a + v), 0);
    }

    #[test]
    fn reused_bucket_is_cleared() {
        let mut ring: Ring<u32, 4> = Ring::new(secs(4));
        *ring.current(0) += 7;
        // Same slot index four seconds later: must not inherit the old count.
        *ring.current(secs(4)) += 1;
        assert_eq!(ring.fold(secs(4), 0, |a, v| a + v), 1);
    }

    #[test]
    fn time_going_backwards_does_not_count_future_buckets() {
        let mut ring: Ring<u32, 4> = Ring::new(secs(4));
        *ring.current(secs(100)) += 1;
        assert_eq!(ring.fold(secs(50), 0, |a, v| a + v), 0);
    }
}
