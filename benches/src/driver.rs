//! The closed-loop load driver shared by every system under test (farpool, TCP ping-pong, Redis).
//!
//! Owns: the [`Endpoint`] trait (one connection that can keep several operations in flight) and
//! [`run_phase`], which drives `conns` endpoints, one thread each, at a fixed queue depth for a bounded
//! number of operations and a bounded time, and returns a [`Sample`] (rounds of one phase merge, then
//! summarize as [`Figures`]).
//!
//! Invariants:
//! - Every loop is bounded: a phase ends at `iters` operations per connection or at `duration`, whichever
//!   comes first; draining what is still in flight is bounded by `op_timeout`; warm-up is bounded in count
//!   and time. Nothing here waits without a deadline.
//! - Endpoints complete operations in submission order (all three protocols answer in order per
//!   connection), so a completion's latency is measured against the oldest submission time.
//! - Only operations whose result the endpoint checked (status, length) are counted.

use std::collections::VecDeque;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::stats::{Figures, LatencyHist};

/// One connection to a system under test.
pub trait Endpoint: Send {
    /// Send `n` more operations (in one write when the protocol allows it).
    fn submit(&mut self, n: usize) -> Result<()>;

    /// Wait up to `timeout` for completions of earlier submissions, check them, and return how many
    /// completed (in submission order); 0 when the wait ran out.
    fn reap(&mut self, timeout: Duration) -> Result<usize>;
}

/// Shape of one measured phase.
#[derive(Clone, Debug)]
pub struct PhaseSpec {
    /// Connections, one thread each.
    pub conns: usize,
    /// Operations kept in flight per connection.
    pub depth: usize,
    /// Bound on operations per connection in the measured window (`u64::MAX`: time-bound only).
    pub iters: u64,
    /// Bound on the measured window's length.
    pub duration: Duration,
    /// Un-measured operations per connection before the window (bounded by `duration / 4` too).
    pub warmup_ops: u64,
    /// An operation outstanding longer than this fails the phase.
    pub op_timeout: Duration,
}

impl PhaseSpec {
    /// A latency phase: `conns` connections at depth `depth`, at most `iters` ops each, at most `duration`.
    pub fn latency(conns: usize, depth: usize, iters: u64, duration: Duration) -> Self {
        Self {
            conns,
            depth,
            iters,
            duration,
            warmup_ops: (iters / 10).clamp(10, 500),
            op_timeout: Duration::from_secs(5),
        }
    }

    /// A throughput phase: time-bound only.
    pub fn throughput(conns: usize, depth: usize, duration: Duration) -> Self {
        Self { iters: u64::MAX, warmup_ops: 200, ..Self::latency(conns, depth, 0, duration) }
    }

    /// One of `rounds` equal slices of this phase (iterations and time divided, warm-up kept).
    pub fn slice(&self, rounds: u32) -> Self {
        let r = rounds.max(1);
        let iters = if self.iters == u64::MAX { u64::MAX } else { self.iters.div_ceil(u64::from(r)) };
        Self { iters, duration: self.duration / r, ..self.clone() }
    }
}

/// The raw outcome of a phase, or of several rounds of it merged: latencies, operations, measured time.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Latency of every measured operation.
    pub hist: LatencyHist,
    /// Operations completed and checked.
    pub ops: u64,
    /// Measured time (rounds merged: the sum of each round's window).
    pub elapsed: Duration,
}

impl Sample {
    /// Add another round of the same phase.
    pub fn merge(&mut self, other: &Sample) {
        self.hist.merge(&other.hist);
        self.ops += other.ops;
        self.elapsed += other.elapsed;
    }

    /// Summarize with `bytes_per_op` payload bytes per operation.
    pub fn figures(&self, bytes_per_op: u64) -> Result<Figures> {
        Figures::from_hist(&self.hist, self.ops, bytes_per_op, self.elapsed)
    }
}

/// Run one phase: open `spec.conns` endpoints with `open(i)`, warm them up, then measure them together.
/// The phase's window is the longest connection's; its operations are all connections'.
pub fn run_phase<F>(spec: &PhaseSpec, open: F) -> Result<Sample>
where
    F: Fn(usize) -> Result<Box<dyn Endpoint>>,
{
    assert!(spec.conns >= 1 && spec.depth >= 1, "a phase needs at least one connection and depth 1");
    let mut eps = Vec::with_capacity(spec.conns);
    for i in 0..spec.conns {
        eps.push(open(i).with_context(|| format!("opening connection {i}"))?);
    }
    let barrier = Barrier::new(spec.conns);
    let abort = AtomicBool::new(false);
    let results: Vec<Result<Sample>> = std::thread::scope(|s| {
        let (barrier, abort) = (&barrier, &abort);
        let handles: Vec<_> =
            eps.into_iter().map(|mut ep| s.spawn(move || drive_conn(ep.as_mut(), spec, barrier, abort))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("driver thread panicked"))))
            .collect()
    });
    let mut all = Sample::default();
    for r in results {
        let r = r?;
        all.hist.merge(&r.hist);
        all.ops += r.ops;
        all.elapsed = all.elapsed.max(r.elapsed);
    }
    Ok(all)
}

fn drive_conn(ep: &mut dyn Endpoint, spec: &PhaseSpec, barrier: &Barrier, abort: &AtomicBool) -> Result<Sample> {
    let warm = warm_up(ep, spec);
    if warm.is_err() {
        abort.store(true, Ordering::Relaxed);
    }
    barrier.wait();
    warm?;
    if abort.load(Ordering::Relaxed) {
        bail!("another connection of the phase failed during warm-up");
    }
    let mut hist = LatencyHist::new();
    let start = Instant::now();
    let (ops, last) = pump(ep, spec, start + spec.duration, spec.iters, Some(&mut hist), abort)
        .inspect_err(|_| abort.store(true, Ordering::Relaxed))?;
    Ok(Sample { hist, ops, elapsed: last.saturating_duration_since(start) })
}

fn warm_up(ep: &mut dyn Endpoint, spec: &PhaseSpec) -> Result<()> {
    if spec.warmup_ops == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + spec.duration / 4;
    let never = AtomicBool::new(false);
    pump(ep, spec, deadline, spec.warmup_ops, None, &never).map(|_| ()).context("warm-up")
}

/// Keep `spec.depth` operations in flight until `iters` were submitted or `deadline` passed, then drain.
/// Returns the number completed and the time of the last completion.
fn pump(
    ep: &mut dyn Endpoint,
    spec: &PhaseSpec,
    deadline: Instant,
    iters: u64,
    mut hist: Option<&mut LatencyHist>,
    abort: &AtomicBool,
) -> Result<(u64, Instant)> {
    let mut sent_at: VecDeque<Instant> = VecDeque::with_capacity(spec.depth);
    let (mut submitted, mut done) = (0u64, 0u64);
    let mut last = Instant::now();
    loop {
        let now = Instant::now();
        let stop = now >= deadline || submitted >= iters || abort.load(Ordering::Relaxed);
        if !stop && sent_at.len() < spec.depth {
            let n = (spec.depth - sent_at.len()).min(usize::try_from(iters - submitted).unwrap_or(usize::MAX));
            ep.submit(n)?;
            sent_at.extend(std::iter::repeat_n(now, n));
            submitted += n as u64;
        }
        let Some(&oldest) = sent_at.front() else { break };
        let k = ep.reap(spec.op_timeout.min(Duration::from_millis(100)))?;
        let t = Instant::now();
        if k == 0 {
            if t.duration_since(oldest) > spec.op_timeout {
                bail!("no completion within {:?} ({} operations in flight)", spec.op_timeout, sent_at.len());
            }
            continue;
        }
        if k > sent_at.len() {
            bail!("endpoint reported {k} completions with only {} operations in flight", sent_at.len());
        }
        for s in sent_at.drain(..k) {
            if let Some(h) = hist.as_deref_mut() {
                h.record(t.duration_since(s));
            }
        }
        done += k as u64;
        last = t;
    }
    Ok((done, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory endpoint completing everything at once, after an optional delay per reap.
    struct Instant0 {
        outstanding: usize,
        fail_after: Option<u64>,
        reaped: u64,
    }

    impl Endpoint for Instant0 {
        fn submit(&mut self, n: usize) -> Result<()> {
            self.outstanding += n;
            Ok(())
        }
        fn reap(&mut self, _timeout: Duration) -> Result<usize> {
            if let Some(f) = self.fail_after
                && self.reaped >= f
            {
                bail!("injected failure");
            }
            let k = self.outstanding;
            self.outstanding = 0;
            self.reaped += k as u64;
            Ok(k)
        }
    }

    #[test]
    fn iteration_bound_is_exact() {
        let spec = PhaseSpec::latency(2, 4, 1000, Duration::from_secs(10));
        let mut s =
            run_phase(&spec, |_| Ok(Box::new(Instant0 { outstanding: 0, fail_after: None, reaped: 0 }))).unwrap();
        assert_eq!(s.ops, 2000);
        assert_eq!(s.figures(8).unwrap().bytes, 16_000);
        let again =
            run_phase(&spec.slice(4), |_| Ok(Box::new(Instant0 { outstanding: 0, fail_after: None, reaped: 0 })));
        s.merge(&again.unwrap());
        assert_eq!(s.ops, 2500, "a quarter slice runs 250 per connection");
        assert_eq!(s.hist.len(), 2500);
    }

    #[test]
    fn time_bound_stops_the_phase() {
        let spec = PhaseSpec::throughput(1, 16, Duration::from_millis(50));
        let t = Instant::now();
        let f = run_phase(&spec, |_| Ok(Box::new(Instant0 { outstanding: 0, fail_after: None, reaped: 0 }))).unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(f.ops > 0);
    }

    #[test]
    fn a_failing_connection_fails_the_phase_without_hanging() {
        let spec = PhaseSpec::throughput(3, 4, Duration::from_secs(30));
        let t = Instant::now();
        let r = run_phase(&spec, |i| {
            let fail_after = (i == 1).then_some(5000);
            Ok(Box::new(Instant0 { outstanding: 0, fail_after, reaped: 0 }))
        });
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    }
}
