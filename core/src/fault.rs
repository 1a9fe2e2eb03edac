//! `Faulty`: a seeded fault-injecting decorator around any [`Transport`], for tests.
//!
//! Faults: **drop** (the op is never executed; it completes with `Timeout` after `delay`), **error**
//! (fails before execution), **error after** (executed, but reported failed: the mid-write failure a
//! write-behind pipeline must survive), **delay** (the completion is held back), **reorder** (each
//! poll's completions are shuffled, so the last op of a batch may complete first). The same seed
//! gives the same fault decisions for the same sequence of calls; print it when a test fails.

use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::error::{Error, ErrorKind, Result};
use crate::transport::{Completion, Transport, TransportKind, WorkRequest};

/// Probabilities (0.0..=1.0) of each fault, per operation.
#[derive(Clone, Debug, Default)]
pub struct FaultConfig {
    /// The op is never executed and completes with `Timeout` after `delay`.
    pub drop: f64,
    /// The op fails with `Io` before execution.
    pub error: f64,
    /// The op is executed but reported failed with `Io`.
    pub error_after: f64,
    /// The completion is held back by `delay`.
    pub delay_prob: f64,
    /// How long delayed and dropped completions are held. Default 0.
    pub delay: Duration,
    /// Shuffle the completions each poll returns.
    pub reorder: bool,
}

/// Counts of injected faults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Dropped ops.
    pub dropped: u64,
    /// Ops failed before execution.
    pub errored: u64,
    /// Ops failed after execution.
    pub errored_after: u64,
    /// Completions delayed.
    pub delayed: u64,
}

/// The decorator. See the module docs.
#[derive(Debug)]
pub struct Faulty<T> {
    inner: T,
    cfg: FaultConfig,
    seed: u64,
    rng: SmallRng,
    held: Vec<(Instant, Completion)>,
    stats: FaultStats,
}

impl<T: Transport> Faulty<T> {
    /// Wrap `inner`, deciding faults with a generator seeded by `seed`.
    pub fn new(inner: T, cfg: FaultConfig, seed: u64) -> Self {
        Self { inner, cfg, seed, rng: SmallRng::seed_from_u64(seed), held: Vec::new(), stats: FaultStats::default() }
    }

    /// The seed (print it on failure to reproduce).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Faults injected so far.
    pub fn stats(&self) -> FaultStats {
        self.stats
    }

    /// Change the fault probabilities from now on.
    pub fn set_config(&mut self, cfg: FaultConfig) {
        self.cfg = cfg;
    }

    /// The wrapped transport.
    pub fn inner_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    fn hold(&mut self, after: Duration, c: Completion) {
        self.held.push((Instant::now() + after, c));
    }

    fn release_due(&mut self, out: &mut Vec<Completion>, max: usize) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() && out.len() < max {
            if self.held[i].0 <= now {
                out.push(self.held.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
    }
}

impl<T: Transport> Transport for Faulty<T> {
    fn kind(&self) -> TransportKind {
        self.inner.kind()
    }

    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        let room = self.inflight_max().saturating_sub(self.inflight());
        let n = room.min(batch.len());
        let mut forward = Vec::with_capacity(n);
        for wr in batch.drain(..n) {
            if self.rng.random_bool(self.cfg.drop) {
                self.stats.dropped += 1;
                let e = Error::new(ErrorKind::Timeout, format!("injected drop (seed {})", self.seed));
                self.hold(self.cfg.delay, Completion { wr_id: wr.wr_id, result: Err(e) });
            } else if self.rng.random_bool(self.cfg.error) {
                self.stats.errored += 1;
                let e = Error::new(ErrorKind::Io, format!("injected error (seed {})", self.seed));
                self.hold(Duration::ZERO, Completion { wr_id: wr.wr_id, result: Err(e) });
            } else {
                forward.push(wr);
            }
        }
        while !forward.is_empty() {
            if self.inner.post(&mut forward)? == 0 {
                // The inner window is full of ops we must harvest before posting more.
                let mut tmp = Vec::new();
                self.inner.poll(&mut tmp, usize::MAX, self.inner.op_timeout())?;
                for c in tmp {
                    self.hold(Duration::ZERO, c);
                }
            }
        }
        Ok(n)
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, timeout: Duration) -> Result<usize> {
        let start = out.len();
        let deadline = Instant::now() + timeout;
        loop {
            let mut got = Vec::new();
            let wait = if self.held.is_empty() { timeout } else { Duration::from_millis(1) };
            if self.inner.inflight() > 0 {
                self.inner.poll(&mut got, max, wait.min(deadline.saturating_duration_since(Instant::now())))?;
            }
            for mut c in got {
                if c.result.is_ok() && self.rng.random_bool(self.cfg.error_after) {
                    self.stats.errored_after += 1;
                    let msg = format!("injected failure after execution (seed {})", self.seed);
                    c.result = Err(Error::new(ErrorKind::Io, msg));
                }
                let delay = if self.rng.random_bool(self.cfg.delay_prob) {
                    self.stats.delayed += 1;
                    self.cfg.delay
                } else {
                    Duration::ZERO
                };
                self.hold(delay, c);
            }
            self.release_due(out, start + max);
            if out.len() > start || self.inflight() == 0 || Instant::now() >= deadline {
                break;
            }
            if self.inner.inflight() == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if self.cfg.reorder {
            out[start..].shuffle(&mut self.rng);
        }
        Ok(out.len() - start)
    }

    fn inflight(&self) -> usize {
        self.inner.inflight() + self.held.len()
    }

    fn inflight_max(&self) -> usize {
        self.inner.inflight_max()
    }

    fn op_timeout(&self) -> Duration {
        self.inner.op_timeout() + self.cfg.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::*;
    use crate::transport::OpKind;

    /// An in-memory transport: a flat byte array, every op completes at once, in order.
    #[derive(Debug)]
    struct Mem {
        bytes: Vec<u8>,
        done: Vec<Completion>,
    }

    impl Transport for Mem {
        fn kind(&self) -> TransportKind {
            TransportKind::Sim
        }
        fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
            let n = batch.len();
            for wr in batch.drain(..) {
                let result = crate::transport::apply_to_bytes(&mut self.bytes, wr.addr.offset, &wr.op);
                self.done.push(Completion { wr_id: wr.wr_id, result });
            }
            Ok(n)
        }
        fn poll(&mut self, out: &mut Vec<Completion>, max: usize, _: Duration) -> Result<usize> {
            let n = max.min(self.done.len());
            out.extend(self.done.drain(..n));
            Ok(n)
        }
        fn inflight(&self) -> usize {
            self.done.len()
        }
        fn inflight_max(&self) -> usize {
            16
        }
    }

    fn addr(offset: u64) -> RemoteAddr {
        let cred = Credential { lease: LeaseId(1), epoch: Epoch(1), token: Token(1), rkey: 0, base_addr: 0 };
        RemoteAddr { slab: SlabId(0), offset, cred }
    }

    fn writes(n: u64) -> Vec<WorkRequest> {
        (0..n)
            .map(|i| WorkRequest { wr_id: i, addr: addr(i * 8), op: OpKind::Write { data: vec![i as u8; 8].into() } })
            .collect()
    }

    #[test]
    fn every_op_completes_exactly_once_under_faults() {
        for seed in 0..20 {
            let cfg = FaultConfig {
                drop: 0.1,
                error: 0.1,
                error_after: 0.1,
                delay_prob: 0.2,
                delay: Duration::from_millis(2),
                reorder: true,
            };
            let mut t = Faulty::new(Mem { bytes: vec![0; 4096], done: Vec::new() }, cfg, seed);
            let done = t.execute(writes(100)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            let mut ids: Vec<u64> = done.iter().map(|c| c.wr_id).collect();
            ids.sort_unstable();
            assert_eq!(ids, (0..100).collect::<Vec<_>>(), "seed {seed}");
            let s = t.stats();
            let failed = done.iter().filter(|c| c.result.is_err()).count() as u64;
            assert_eq!(failed, s.dropped + s.errored + s.errored_after, "seed {seed}");
        }
    }

    #[test]
    fn same_seed_same_faults_and_reordering_happens() {
        let run = |seed| {
            let cfg = FaultConfig { error: 0.3, reorder: true, ..Default::default() };
            let mut t = Faulty::new(Mem { bytes: vec![0; 4096], done: Vec::new() }, cfg, seed);
            t.execute(writes(16)).unwrap().iter().map(|c| (c.wr_id, c.result.is_ok())).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        let order: Vec<u64> = run(7).iter().map(|x| x.0).collect();
        assert_ne!(order, (0..16).collect::<Vec<_>>(), "reorder must change the order");
    }
}
