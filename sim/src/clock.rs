//! Virtual time and seed derivation.
//!
//! [`SimClock`] is the cluster's virtual clock in nanoseconds. It only moves forward, and only when a
//! simulated endpoint waits: a `poll` that finds nothing due jumps the clock to the next due completion
//! (or by the poll's timeout), the way a discrete-event simulator skips idle time. No simulated delay is
//! ever slept in wall time, so a run with seconds of virtual latency takes milliseconds.
//!
//! [`mix`] derives independent seeds (per endpoint, per thread, per schedule) from the run's seed, so
//! every random decision of a run descends from the one seed that is printed on failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The cluster's virtual clock. See the module docs.
#[derive(Debug, Default)]
pub struct SimClock {
    now_ns: AtomicU64,
}

impl SimClock {
    /// A clock at virtual time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Virtual nanoseconds since the start of the run.
    pub fn now_ns(&self) -> u64 {
        self.now_ns.load(Ordering::Acquire)
    }

    /// Move the clock to `t_ns` unless it is already past it; returns the time now.
    pub fn advance_to(&self, t_ns: u64) -> u64 {
        self.now_ns.fetch_max(t_ns, Ordering::AcqRel).max(t_ns)
    }

    /// Move the clock forward by `d`; returns the time now.
    pub fn advance_by(&self, d: Duration) -> u64 {
        let d_ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.now_ns.fetch_add(d_ns, Ordering::AcqRel).saturating_add(d_ns)
    }
}

/// SplitMix64 of `a` and `b`: a seed for a sub-generator, independent of its siblings.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_only_moves_forward() {
        let c = SimClock::new();
        assert_eq!(c.advance_to(100), 100);
        assert_eq!(c.advance_to(50), 100, "never backwards");
        assert_eq!(c.advance_by(Duration::from_nanos(5)), 105);
        assert_eq!(c.now_ns(), 105);
    }

    #[test]
    fn mix_separates_streams() {
        assert_ne!(mix(1, 0), mix(1, 1));
        assert_ne!(mix(0, 1), mix(1, 0));
        assert_eq!(mix(7, 9), mix(7, 9));
    }
}
