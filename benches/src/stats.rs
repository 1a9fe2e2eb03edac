//! Latency histograms and the figures one measured phase produces.
//!
//! Owns: [`LatencyHist`] (an hdrhistogram of nanoseconds, 1 ns .. 60 s, 3 significant digits) and
//! [`Figures`], the serializable summary of one phase (percentiles, throughput, bandwidth).
//! Invariant: a [`Figures`] is only ever built from operations that actually completed successfully;
//! a phase with zero completed operations is an error, never a row of zeros.

use std::time::Duration;

use anyhow::{Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency the histogram tracks (larger values saturate): 60 s.
const HIST_MAX_NS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds.
#[derive(Clone, Debug)]
pub struct LatencyHist {
    hist: Histogram<u64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    /// An empty histogram (1 ns .. 60 s, 3 significant digits).
    pub fn new() -> Self {
        let hist = Histogram::new_with_bounds(1, HIST_MAX_NS, 3).expect("static histogram bounds are valid");
        Self { hist }
    }

    /// Record one latency (saturates above 60 s, clamps 0 to 1 ns).
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(ns);
    }

    /// Merge another histogram into this one.
    pub fn merge(&mut self, other: &LatencyHist) {
        self.hist.add(&other.hist).expect("histograms with identical bounds always merge");
    }

    /// Number of recorded values.
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The value at quantile `q` (0..=1), in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// Mean in microseconds.
    pub fn mean_us(&self) -> f64 {
        self.hist.mean() / 1000.0
    }
}

/// What one measured phase produced: latency percentiles and throughput.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Figures {
    /// Operations completed (and checked) during the measured window.
    pub ops: u64,
    /// Payload bytes moved by those operations.
    pub bytes: u64,
    /// Length of the measured window, in seconds.
    pub elapsed_s: f64,
    /// Median latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
    /// Mean latency, microseconds.
    pub mean_us: f64,
    /// Millions of operations per second.
    pub mops: f64,
    /// Payload bandwidth in MB/s (10^6 bytes per second).
    pub mb_s: f64,
}

impl Figures {
    /// Summarize a phase: `ops` operations of `bytes_per_op` payload each, in `elapsed`.
    pub fn from_hist(hist: &LatencyHist, ops: u64, bytes_per_op: u64, elapsed: Duration) -> Result<Self> {
        if ops == 0 || hist.is_empty() {
            bail!("no operation completed in the measured window");
        }
        let secs = elapsed.as_secs_f64().max(1e-9);
        let bytes = ops.saturating_mul(bytes_per_op);
        Ok(Self {
            ops,
            bytes,
            elapsed_s: secs,
            p50_us: hist.quantile_us(0.50),
            p99_us: hist.quantile_us(0.99),
            p999_us: hist.quantile_us(0.999),
            mean_us: hist.mean_us(),
            mops: ops as f64 / secs / 1e6,
            mb_s: bytes as f64 / secs / 1e6,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_rates() {
        let mut h = LatencyHist::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let f = Figures::from_hist(&h, 1000, 8192, Duration::from_millis(500)).unwrap();
        assert!((f.p50_us - 500.0).abs() < 1.0, "p50 {}", f.p50_us);
        assert!((f.p99_us - 990.0).abs() < 2.0, "p99 {}", f.p99_us);
        assert!((f.mops - 0.002).abs() < 1e-9);
        assert!((f.mb_s - 1000.0 * 8192.0 / 0.5 / 1e6).abs() < 1e-6);
        assert_eq!(f.bytes, 8_192_000);
    }

    #[test]
    fn empty_phase_is_an_error() {
        let h = LatencyHist::new();
        assert!(Figures::from_hist(&h, 0, 8, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = LatencyHist::new();
        let mut b = LatencyHist::new();
        a.record(Duration::from_micros(3));
        b.record(Duration::from_micros(5));
        b.record(Duration::ZERO);
        a.merge(&b);
        assert_eq!(a.len(), 3);
    }
}
