//! [`CycleClock`]: the per-iteration clock of perftest-style latency loops.
//!
//! perftest stamps each iteration with the CPU's cycle counter (`get_cycles`, `rdtsc` on x86_64) and
//! converts to microseconds afterwards. A vDSO `clock_gettime` per iteration instead costs a few hundred
//! nanoseconds of the very time being measured, and under emulation (Soft-RoCE in qemu TCG) that user
//! time is paid several times over: in the guest, one `Instant::now()` per iteration moved our 8 B
//! READ minimum from perftest's ~23 us to ~26 us. So the farpool latency loops that stand beside
//! perftest read the cycle counter too, and convert with the rate measured over the whole run against
//! [`Instant`]. Elsewhere than x86_64, or without the `rdma` feature (the crate is then free of
//! `unsafe`), they fall back to `Instant`.

use std::time::Instant;

/// Readings of a cycle counter (x86_64) or of [`Instant`], converted to nanoseconds at the end.
#[derive(Clone, Copy, Debug)]
pub struct CycleClock {
    tsc: bool,
    origin: Instant,
    tsc0: u64,
}

impl CycleClock {
    /// Start; `cycles` asks for the cycle counter (ignored where there is none).
    pub fn start(cycles: bool) -> Self {
        let tsc = cycles && cfg!(all(target_arch = "x86_64", feature = "rdma"));
        let tsc0 = if tsc { read_cycles() } else { 0 };
        Self { tsc, origin: Instant::now(), tsc0 }
    }

    /// Whether readings are cycles (else nanoseconds).
    pub fn is_cycles(&self) -> bool {
        self.tsc
    }

    /// A reading: cycles since the start, or nanoseconds.
    #[inline]
    pub fn now(&self) -> u64 {
        if self.tsc { read_cycles().wrapping_sub(self.tsc0) } else { self.origin.elapsed().as_nanos() as u64 }
    }

    /// The counter's rate over the run so far in MHz (cycles per microsecond), measured against
    /// [`Instant`]; `None` when the readings are nanoseconds already.
    pub fn mhz(&self) -> Option<f64> {
        let ns = self.origin.elapsed().as_nanos() as f64;
        (self.tsc && ns > 0.0).then(|| self.now() as f64 * 1e3 / ns)
    }

    /// Convert readings of [`CycleClock::now`] to nanoseconds in place, with the rate of the counter
    /// over the run so far.
    pub fn to_ns(&self, readings: &mut [u64]) {
        if !self.tsc {
            return;
        }
        let rate = self.origin.elapsed().as_nanos() as f64 / self.now().max(1) as f64;
        readings.iter_mut().for_each(|t| *t = (*t as f64 * rate) as u64);
    }
}

#[cfg(all(target_arch = "x86_64", feature = "rdma"))]
#[inline]
fn read_cycles() -> u64 {
    // SAFETY: `rdtsc` has no preconditions on x86_64 (user mode may execute it unless the OS set
    // CR4.TSD, which Linux does not by default).
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(all(target_arch = "x86_64", feature = "rdma")))]
fn read_cycles() -> u64 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn readings_convert_to_elapsed_nanoseconds() {
        for cycles in [true, false] {
            let c = CycleClock::start(cycles);
            let a = c.now();
            std::thread::sleep(Duration::from_millis(20));
            let b = c.now();
            let mut r = [a, b];
            c.to_ns(&mut r);
            let d = r[1] - r[0];
            assert!((15_000_000..2_000_000_000).contains(&d), "cycles={cycles}: {d} ns for a 20 ms sleep");
        }
    }

    #[test]
    fn rate_is_reported_only_for_a_cycle_counter() {
        assert_eq!(CycleClock::start(false).mhz(), None);
        let c = CycleClock::start(true);
        std::thread::sleep(Duration::from_millis(5));
        match c.mhz() {
            Some(mhz) => assert!(c.is_cycles() && (10.0..100_000.0).contains(&mhz), "{mhz} MHz"),
            None => assert!(!c.is_cycles(), "a cycle counter must report its rate"),
        }
    }
}

/// The post-gap probe: cycles from a depth-1 completion seen to the next `ibv_post_send`, the user time
/// that decides between Soft-RoCE's two latency modes (BENCHMARKS.md, rdma, sessions 6 and 7). Built
/// with the `probe` feature, the depth-1 path records one sample per post that follows a completion
/// (the last 65536; lock-free, two cycle-counter reads per operation); without it every function here
/// is empty and [`take`] returns nothing. Process-wide: meant for one timed loop at a time
/// (`farbench rdma`, `farpool-vm-rdma --lat`).
pub mod probe {
    #[cfg(all(feature = "probe", target_arch = "x86_64"))]
    mod on {
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

        const N: usize = 1 << 16;
        static LAST: AtomicU64 = AtomicU64::new(0);
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        static GAPS: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];

        pub fn completion() {
            LAST.store(super::super::read_cycles(), Relaxed);
        }

        pub fn post() {
            let now = super::super::read_cycles();
            let last = LAST.swap(0, Relaxed);
            if last != 0 {
                let i = NEXT.fetch_add(1, Relaxed);
                GAPS[i % N].store(now.wrapping_sub(last), Relaxed);
            }
        }

        pub fn take() -> Vec<u64> {
            let n = NEXT.swap(0, Relaxed).min(N);
            LAST.store(0, Relaxed);
            (0..n).map(|i| GAPS[i].load(Relaxed)).collect()
        }
    }

    /// A depth-1 completion was seen.
    #[inline(always)]
    pub fn completion() {
        #[cfg(all(feature = "probe", target_arch = "x86_64"))]
        on::completion();
    }

    /// A post is about to be made (records the gap since the last completion, if any).
    #[inline(always)]
    pub fn post() {
        #[cfg(all(feature = "probe", target_arch = "x86_64"))]
        on::post();
    }

    /// The gaps recorded since the last call, in cycles of [`CycleClock`](super::CycleClock) (convert
    /// with its `mhz`), and start over. Empty without the `probe` feature.
    #[cfg(all(feature = "probe", target_arch = "x86_64"))]
    pub fn take() -> Vec<u64> {
        on::take()
    }

    /// The gaps recorded since the last call: none without the `probe` feature.
    #[cfg(not(all(feature = "probe", target_arch = "x86_64")))]
    pub fn take() -> Vec<u64> {
        Vec::new()
    }

    /// The median of [`take`]'s gaps in microseconds, for a cycle counter running at `mhz`; `None`
    /// when nothing was recorded.
    pub fn take_p50_us(mhz: f64) -> Option<f64> {
        let mut gaps = take();
        gaps.sort_unstable();
        gaps.get(gaps.len() / 2).map(|&c| c as f64 / mhz)
    }
}
