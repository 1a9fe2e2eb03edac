//! The closed-loop load driver shared by every system under test (farpool, TCP ping-pong, Redis).
//!
//! Owns: the [`Endpoint`] trait (one connection that can keep several operations in flight) and
//! [`run_phase`], which drives `conns` endpoints at a fixed queue depth for a bounded number of operations
//! and a bounded time, and returns a [`Sample`] (rounds of one phase merge, then summarize as [`Figures`]).
//!
//! Threads: with `threads == 0` (or `threads >= conns`) every connection has a thread of its own that
//! blocks in [`Endpoint::reap`]. Otherwise the connections are dealt round-robin to `threads` threads;
//! each thread reaps its connections without blocking and, when none made progress, waits in `poll(2)`
//! on their [`Endpoint::wait_fd`]s, as `redis-benchmark` and `memtier_benchmark` drive many connections
//! from few threads. Every system under test is driven the same way.
//!
//! Invariants:
//! - Every loop is bounded: a phase ends at `iters` operations per connection or at `duration`, whichever
//!   comes first; draining what is still in flight is bounded by `op_timeout`; warm-up is bounded in count
//!   and time. Nothing here waits without a deadline.
//! - Endpoints complete operations in submission order (all three protocols answer in order per
//!   connection), so a completion's latency is measured against the oldest submission time.
//! - Only operations whose result the endpoint checked (status, length) are counted.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
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
    /// completed (in submission order); 0 when the wait ran out. A zero `timeout` never blocks.
    fn reap(&mut self, timeout: Duration) -> Result<usize>;

    /// The socket to wait on (readable when `reap` may make progress), for driving several endpoints
    /// from one thread.
    fn wait_fd(&self) -> BorrowedFd<'_>;
}

/// Shape of one measured phase.
#[derive(Clone, Debug)]
pub struct PhaseSpec {
    /// Connections.
    pub conns: usize,
    /// Client threads driving them (0: one per connection). See the module docs.
    pub threads: usize,
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
    /// When a connection sends more operations.
    pub refill: Refill,
}

/// How a connection keeps its `depth` operations going.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Refill {
    /// Pipelining as `redis-benchmark -P DEPTH` does it: send `depth` operations in one write, wait for
    /// all their replies, send the next `depth`.
    #[default]
    Batch,
    /// A sliding window (fio's iodepth): every completion is replaced by a new operation at once.
    Window,
}

impl PhaseSpec {
    /// A latency phase: `conns` connections at depth `depth`, at most `iters` ops each, at most `duration`.
    pub fn latency(conns: usize, depth: usize, iters: u64, duration: Duration) -> Self {
        Self {
            conns,
            threads: 0,
            depth,
            iters,
            duration,
            warmup_ops: (iters / 10).clamp(10, 500),
            op_timeout: Duration::from_secs(5),
            refill: Refill::Window,
        }
    }

    /// A throughput phase: time-bound only, pipelined as `redis-benchmark -P depth` ([`Refill::Batch`]).
    pub fn throughput(conns: usize, depth: usize, duration: Duration) -> Self {
        Self { iters: u64::MAX, warmup_ops: 200, refill: Refill::Batch, ..Self::latency(conns, depth, 0, duration) }
    }

    /// The same phase driven by `threads` client threads (0: one per connection).
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    /// Client threads actually used: at most one per connection.
    pub fn effective_threads(&self) -> usize {
        if self.threads == 0 { self.conns } else { self.threads.min(self.conns) }
    }

    /// The same phase with another refill policy.
    #[must_use]
    pub fn with_refill(mut self, refill: Refill) -> Self {
        self.refill = refill;
        self
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
/// The phase's window is the longest thread's; its operations are all connections'.
pub fn run_phase<F>(spec: &PhaseSpec, open: F) -> Result<Sample>
where
    F: Fn(usize) -> Result<Box<dyn Endpoint>>,
{
    assert!(spec.conns >= 1 && spec.depth >= 1, "a phase needs at least one connection and depth 1");
    let threads = spec.effective_threads();
    let mut groups: Vec<Vec<Box<dyn Endpoint>>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..spec.conns {
        groups[i % threads].push(open(i).with_context(|| format!("opening connection {i}"))?);
    }
    let barrier = Barrier::new(threads);
    let abort = AtomicBool::new(false);
    let results: Vec<Result<Sample>> = std::thread::scope(|s| {
        let (barrier, abort) = (&barrier, &abort);
        let handles: Vec<_> =
            groups.into_iter().map(|mut g| s.spawn(move || drive_group(&mut g, spec, barrier, abort))).collect();
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

/// One thread's connections: warm-up, the barrier shared by all threads, the measured window.
fn drive_group(
    eps: &mut [Box<dyn Endpoint>],
    spec: &PhaseSpec,
    barrier: &Barrier,
    abort: &AtomicBool,
) -> Result<Sample> {
    let warm = warm_up(eps, spec);
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
    let (ops, last) = pump_any(eps, spec, start + spec.duration, spec.iters, Some(&mut hist), abort)
        .inspect_err(|_| abort.store(true, Ordering::Relaxed))?;
    Ok(Sample { hist, ops, elapsed: last.saturating_duration_since(start) })
}

fn warm_up(eps: &mut [Box<dyn Endpoint>], spec: &PhaseSpec) -> Result<()> {
    if spec.warmup_ops == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + spec.duration / 4;
    let never = AtomicBool::new(false);
    pump_any(eps, spec, deadline, spec.warmup_ops, None, &never).map(|_| ()).context("warm-up")
}

/// [`pump`] for one connection (blocking reaps), [`pump_many`] for several.
fn pump_any(
    eps: &mut [Box<dyn Endpoint>],
    spec: &PhaseSpec,
    deadline: Instant,
    iters: u64,
    hist: Option<&mut LatencyHist>,
    abort: &AtomicBool,
) -> Result<(u64, Instant)> {
    match eps {
        [one] => pump(one.as_mut(), spec, deadline, iters, hist, abort),
        many => pump_many(many, spec, deadline, iters, hist, abort),
    }
}

/// The closed loop of one connection: what it has in flight and what it did.
struct Flow {
    sent_at: VecDeque<Instant>,
    submitted: u64,
    done: u64,
}

impl Flow {
    fn new(depth: usize) -> Self {
        Self { sent_at: VecDeque::with_capacity(depth), submitted: 0, done: 0 }
    }

    /// How many operations to submit now (0: none).
    fn want(&self, spec: &PhaseSpec, iters: u64, stop: bool) -> usize {
        let room = match spec.refill {
            Refill::Window => spec.depth - self.sent_at.len(),
            Refill::Batch if self.sent_at.is_empty() => spec.depth,
            Refill::Batch => 0,
        };
        if stop { 0 } else { room.min(usize::try_from(iters - self.submitted).unwrap_or(usize::MAX)) }
    }

    fn submit(&mut self, ep: &mut dyn Endpoint, n: usize, now: Instant) -> Result<()> {
        ep.submit(n)?;
        self.sent_at.extend(std::iter::repeat_n(now, n));
        self.submitted += n as u64;
        Ok(())
    }

    /// Account `k` completions observed at `t`.
    fn complete(&mut self, k: usize, t: Instant, mut hist: Option<&mut LatencyHist>) -> Result<()> {
        if k > self.sent_at.len() {
            bail!("endpoint reported {k} completions with only {} operations in flight", self.sent_at.len());
        }
        for s in self.sent_at.drain(..k) {
            if let Some(h) = hist.as_deref_mut() {
                h.record(t.duration_since(s));
            }
        }
        self.done += k as u64;
        Ok(())
    }

    fn check_stuck(&self, spec: &PhaseSpec, t: Instant) -> Result<()> {
        match self.sent_at.front() {
            Some(&oldest) if t.duration_since(oldest) > spec.op_timeout => {
                bail!("no completion within {:?} ({} operations in flight)", spec.op_timeout, self.sent_at.len())
            }
            _ => Ok(()),
        }
    }
}

/// Several connections from one thread: non-blocking reaps, and `poll(2)` on their sockets (bounded to
/// 100 ms per wait) when none made progress. Ends when every connection stopped submitting and drained.
fn pump_many(
    eps: &mut [Box<dyn Endpoint>],
    spec: &PhaseSpec,
    deadline: Instant,
    iters: u64,
    mut hist: Option<&mut LatencyHist>,
    abort: &AtomicBool,
) -> Result<(u64, Instant)> {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut flows: Vec<Flow> = eps.iter().map(|_| Flow::new(spec.depth)).collect();
    let mut last = Instant::now();
    loop {
        let now = Instant::now();
        let stop = now >= deadline || abort.load(Ordering::Relaxed);
        let mut progressed = false;
        for (ep, f) in eps.iter_mut().zip(flows.iter_mut()) {
            let n = f.want(spec, iters, stop);
            if n > 0 {
                f.submit(ep.as_mut(), n, now)?;
            }
            if f.sent_at.is_empty() {
                continue;
            }
            let k = ep.reap(Duration::ZERO)?;
            let t = Instant::now();
            if k > 0 {
                f.complete(k, t, hist.as_deref_mut())?;
                last = t;
                progressed = true;
            } else {
                f.check_stuck(spec, t)?;
            }
        }
        if flows.iter().all(|f| f.sent_at.is_empty()) && (stop || flows.iter().all(|f| f.submitted >= iters)) {
            break;
        }
        if !progressed {
            let mut fds: Vec<PollFd<'_>> = eps
                .iter()
                .zip(&flows)
                .filter(|(_, f)| !f.sent_at.is_empty())
                .map(|(ep, _)| PollFd::new(ep.wait_fd(), PollFlags::POLLIN))
                .collect();
            if !fds.is_empty() {
                nix::poll::poll(&mut fds, PollTimeout::from(100u8)).context("poll(2) on the connections")?;
            }
        }
    }
    Ok((flows.iter().map(|f| f.done).sum(), last))
}

/// Keep `spec.depth` operations in flight on one connection until `iters` were submitted or `deadline`
/// passed, then drain; reaps block (bounded). Returns the number completed and the time of the last
/// completion.
fn pump(
    ep: &mut dyn Endpoint,
    spec: &PhaseSpec,
    deadline: Instant,
    iters: u64,
    mut hist: Option<&mut LatencyHist>,
    abort: &AtomicBool,
) -> Result<(u64, Instant)> {
    let mut f = Flow::new(spec.depth);
    let mut last = Instant::now();
    loop {
        let now = Instant::now();
        let stop = now >= deadline || abort.load(Ordering::Relaxed);
        let n = f.want(spec, iters, stop);
        if n > 0 {
            f.submit(ep, n, now)?;
        }
        if f.sent_at.is_empty() {
            break;
        }
        let k = ep.reap(spec.op_timeout.min(Duration::from_millis(100)))?;
        let t = Instant::now();
        if k == 0 {
            f.check_stuck(spec, t)?;
            continue;
        }
        f.complete(k, t, hist.as_deref_mut())?;
        last = t;
    }
    Ok((f.done, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory endpoint completing everything at once, after an optional delay per reap.
    struct Instant0 {
        sock: std::os::unix::net::UnixStream,
        outstanding: usize,
        fail_after: Option<u64>,
        reaped: u64,
    }

    impl Instant0 {
        fn boxed(fail_after: Option<u64>) -> Box<dyn Endpoint> {
            let sock = std::os::unix::net::UnixStream::pair().unwrap().0;
            Box::new(Instant0 { sock, outstanding: 0, fail_after, reaped: 0 })
        }
    }

    impl Endpoint for Instant0 {
        fn wait_fd(&self) -> BorrowedFd<'_> {
            use std::os::fd::AsFd;
            self.sock.as_fd()
        }
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
        let mut s = run_phase(&spec, |_| Ok(Instant0::boxed(None))).unwrap();
        assert_eq!(s.ops, 2000);
        assert_eq!(s.figures(8).unwrap().bytes, 16_000);
        let again = run_phase(&spec.slice(4), |_| Ok(Instant0::boxed(None)));
        s.merge(&again.unwrap());
        assert_eq!(s.ops, 2500, "a quarter slice runs 250 per connection");
        assert_eq!(s.hist.len(), 2500);
    }

    #[test]
    fn iteration_bound_is_exact_when_threads_drive_several_connections() {
        for refill in [Refill::Batch, Refill::Window] {
            let spec = PhaseSpec::latency(5, 4, 1000, Duration::from_secs(10)).with_threads(2).with_refill(refill);
            assert_eq!(spec.effective_threads(), 2);
            let s = run_phase(&spec, |_| Ok(Instant0::boxed(None))).unwrap();
            assert_eq!(s.ops, 5000, "{refill:?}");
            assert_eq!(s.hist.len(), 5000);
        }
        assert_eq!(PhaseSpec::latency(3, 1, 1, Duration::from_secs(1)).with_threads(8).effective_threads(), 3);
    }

    #[test]
    fn a_failing_connection_fails_a_multiplexed_phase_without_hanging() {
        let spec = PhaseSpec::throughput(3, 4, Duration::from_secs(30)).with_threads(1);
        let t = Instant::now();
        let r = run_phase(&spec, |i| Ok(Instant0::boxed((i == 2).then_some(5000))));
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    }

    #[test]
    fn time_bound_stops_the_phase() {
        let spec = PhaseSpec::throughput(1, 16, Duration::from_millis(50));
        let t = Instant::now();
        let f = run_phase(&spec, |_| Ok(Instant0::boxed(None))).unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert!(f.ops > 0);
    }

    #[test]
    fn a_failing_connection_fails_the_phase_without_hanging() {
        let spec = PhaseSpec::throughput(3, 4, Duration::from_secs(30));
        let t = Instant::now();
        let r = run_phase(&spec, |i| {
            let fail_after = (i == 1).then_some(5000);
            Ok(Instant0::boxed(fail_after))
        });
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
    }
}
