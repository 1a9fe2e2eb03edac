//! `SimEndpoint`: a [`Transport`] to one simulated server incarnation, with seeded faults and virtual
//! latency.
//!
//! `post` draws each operation's fate and virtual latency from the endpoint's own generator (seeded from
//! the run's seed and the endpoint's ordinal) and queues it; nothing executes at post. `poll` advances the
//! virtual clock to the next due completion if none is due (bounded by the poll's timeout, also taken as
//! virtual), then executes the due operations against server memory in due-time order (ties broken at
//! random) and returns their completions: the order of execution and completion differs from the order of
//! posting, within a batch and across endpoints. Late-landing writes (see [`crate::faults`]) execute when
//! any endpoint's poll passes their landing time.
//!
//! Invariant (the `Transport` contract): every posted `wr_id` completes exactly once, unless the endpoint
//! is dropped first. A `post` to a dead server fails as a whole (`Unreachable`: the connection is gone).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use farpool_core::{
    Completion, Error, ErrorKind, OpKind, OpOutput, Result, ServerId, Transport, TransportKind, WorkRequest,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::cluster::{Core, Late};
use crate::faults::{Corruption, corrupt_image};
use crate::stats::SimCounters;

/// What will become of one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Normal,
    ErrorBefore,
    ErrorAfter,
    /// Only this many bytes of the write land.
    Torn(usize),
    Drop,
    /// Reported timed out; the write lands later (already deferred at post).
    LateLand,
}

#[derive(Debug)]
struct Pending {
    due_ns: u64,
    tiebreak: u64,
    wr: WorkRequest,
    fate: Fate,
}

/// See the module docs.
#[derive(Debug)]
pub struct SimEndpoint {
    core: Arc<Core>,
    server: ServerId,
    rng: SmallRng,
    pending: Vec<Pending>,
}

fn injected(kind: ErrorKind, what: &str, seed: u64) -> Error {
    Error::new(kind, format!("sim: injected {what} (run seed {seed})"))
}

impl SimEndpoint {
    pub(crate) fn new(core: Arc<Core>, server: ServerId, seed: u64) -> Self {
        Self { core, server, rng: SmallRng::seed_from_u64(seed), pending: Vec::new() }
    }

    fn fate(&mut self, wr: &WorkRequest) -> Fate {
        let f = &self.core.faults;
        let c = &self.core.counters;
        let write_len = match &wr.op {
            OpKind::Write { data } => Some(data.len()),
            _ => None,
        };
        let r = &mut self.rng;
        if r.random_bool(f.error_before) {
            SimCounters::add(&c.error_before, 1);
            Fate::ErrorBefore
        } else if r.random_bool(f.error_after) {
            SimCounters::add(&c.error_after, 1);
            Fate::ErrorAfter
        } else if r.random_bool(f.drop) {
            SimCounters::add(&c.drops, 1);
            Fate::Drop
        } else if let Some(len) = write_len.filter(|&l| l > 1 && r.random_bool(f.torn_write)) {
            SimCounters::add(&c.torn_writes, 1);
            Fate::Torn(r.random_range(1..len))
        } else if write_len.is_some() && r.random_bool(f.late_landing) {
            SimCounters::add(&c.late_landings, 1);
            Fate::LateLand
        } else {
            Fate::Normal
        }
    }

    fn latency_ns(&mut self) -> u64 {
        let f = &self.core.faults;
        if self.rng.random_bool(f.tail) {
            SimCounters::add(&self.core.counters.tail_delays, 1);
            self.rng.random_range(f.tail_ns.0..=f.tail_ns.1.max(f.tail_ns.0))
        } else {
            self.rng.random_range(f.latency_ns.0..=f.latency_ns.1.max(f.latency_ns.0))
        }
    }

    fn op_timeout_ns(&self) -> u64 {
        u64::try_from(self.core.cfg.op_timeout.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Execute (or fail) one due operation.
    fn deliver(&mut self, p: Pending) -> Completion {
        let seed = self.core.seed;
        let result = match p.fate {
            Fate::Normal => self.core.exec(self.server, &p.wr, None).map(|o| self.maybe_corrupt(o)),
            Fate::ErrorBefore => Err(injected(ErrorKind::Io, "error before execution", seed)),
            Fate::ErrorAfter => {
                self.core.exec(self.server, &p.wr, None).and_then(|_| Err(injected(ErrorKind::Io, "lost ack", seed)))
            }
            Fate::Torn(n) => self
                .core
                .exec(self.server, &p.wr, Some(n))
                .and_then(|_| Err(injected(ErrorKind::Io, "torn write", seed))),
            Fate::Drop => Err(injected(ErrorKind::Timeout, "drop", seed)),
            Fate::LateLand => Err(injected(ErrorKind::Timeout, "timeout (the write lands later)", seed)),
        };
        Completion { wr_id: p.wr.wr_id, result }
    }

    fn maybe_corrupt(&mut self, out: OpOutput) -> OpOutput {
        let f = &self.core.faults;
        let OpOutput::Read(b) = &out else { return out };
        if f.corruption == Corruption::None || !self.rng.random_bool(f.corrupt) {
            return out;
        }
        let mut img = b.to_vec();
        if !corrupt_image(f.corruption, &mut img, &mut self.rng) {
            return out;
        }
        SimCounters::add(&self.core.counters.corruptions, 1);
        OpOutput::Read(Bytes::from(img))
    }
}

impl Transport for SimEndpoint {
    fn kind(&self) -> TransportKind {
        TransportKind::Sim
    }

    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        if !self.core.is_alive(self.server) {
            SimCounters::add(&self.core.counters.unreachable, 1);
            return Err(Error::new(ErrorKind::Unreachable, format!("sim: connection to server {} lost", self.server)));
        }
        let n = batch.len().min(self.inflight_max().saturating_sub(self.pending.len()));
        let now = self.core.clock.now_ns();
        for wr in batch.drain(..n).collect::<Vec<_>>() {
            SimCounters::add(&self.core.counters.ops, 1);
            let fate = self.fate(&wr);
            let latency = self.latency_ns();
            let due_ns = if fate == Fate::Drop { now + self.op_timeout_ns() } else { now + latency };
            if fate == Fate::LateLand {
                let land = due_ns + self.rng.random_range(10_000..20_000_000);
                self.core.defer(Late { due_ns: land, server: self.server, wr: wr.clone() });
            }
            let tiebreak = self.rng.random();
            self.pending.push(Pending { due_ns, tiebreak, wr, fate });
        }
        Ok(n)
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, timeout: Duration) -> Result<usize> {
        let mut now = self.core.clock.now_ns();
        self.core.land_late(now);
        let Some(next) = self.pending.iter().map(|p| p.due_ns).min() else { return Ok(0) };
        if next > now {
            let wait_ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
            if next - now > wait_ns {
                let now = self.core.clock.advance_by(timeout);
                self.core.land_late(now);
                return Ok(0);
            }
            now = self.core.clock.advance_to(next);
            self.core.land_late(now);
        }
        self.pending.sort_by_key(|p| (p.due_ns, p.tiebreak));
        let due = self.pending.iter().take_while(|p| p.due_ns <= now).count().min(max);
        let start = out.len();
        for p in self.pending.drain(..due).collect::<Vec<_>>() {
            let c = self.deliver(p);
            out.push(c);
        }
        Ok(out.len() - start)
    }

    fn inflight(&self) -> usize {
        self.pending.len()
    }

    fn inflight_max(&self) -> usize {
        self.core.cfg.inflight_max
    }

    fn op_timeout(&self) -> Duration {
        self.core.cfg.op_timeout
    }
}
