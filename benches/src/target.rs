//! The farpool system under test: a memory server (embedded in-process on 127.0.0.1:0, or one given by
//! address) reached through the client library `farpool::Pool` over the TCP transport.
//!
//! Owns: [`FarpoolTarget`] (server handle when embedded, the pool, one lease) and [`FarpoolEndpoint`]
//! (one data endpoint of the pool, driven through the raw completion-based `Transport` so the bench
//! controls batching and queue depth exactly).
//!
//! Invariants: the lease is held (and renewed by the pool's heartbeat) for the whole run and released
//! before the embedded server shuts down (field order); every completion is checked: status OK, a READ
//! returns exactly SIZE bytes; operations rotate over [`SLOTS`] disjoint slots like the Redis baseline
//! rotates over its keys; atomics of connection `i` hit their own 8-byte word.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use farpool::{Lease, Pool, PoolBuilder, TransportChoice};
use farpool_core::{Completion, OpKind, OpOutput, RemoteAddr, WorkRequest};
use farpool_memserver::{Server, ServerConfig, ServerHandle};

use crate::driver::Endpoint;
use crate::op::{BenchOp, MAX_SIZE};

/// Distinct slots (SIZE-byte regions) the bench rotates over; Redis uses as many keys.
pub const SLOTS: usize = crate::redis::KEYS;
/// Pool capacity of the embedded server: 256 MiB (4 slabs of 64 MiB).
pub const EMBEDDED_CAPACITY_BYTES: u64 = 256 << 20;
/// Operations in flight per data endpoint the pool allows (the deepest `--qd` / `--tput-depth`).
pub const INFLIGHT_MAX: usize = 256;
/// Region of the slab where atomics live (after the data slots: 16 x 1 MiB).
const ATOMIC_BASE: u64 = (SLOTS * MAX_SIZE) as u64;

/// A farpool server plus a pool with one lease on it.
pub struct FarpoolTarget {
    // Drop order matters: lease, then pool, then the embedded server.
    lease: Lease,
    pool: Pool,
    embedded: Option<ServerHandle>,
    addr: SocketAddr,
}

impl std::fmt::Debug for FarpoolTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FarpoolTarget").field("addr", &self.addr).field("embedded", &self.embedded.is_some()).finish()
    }
}

impl FarpoolTarget {
    /// Start an embedded server on 127.0.0.1:0 (when `server` is `None`) with `workers` I/O threads (0: the
    /// server's default, one per CPU), or use `server`; then lease a slab.
    pub fn start(server: Option<SocketAddr>, workers: usize) -> Result<Self> {
        let (embedded, addr) = match server {
            Some(a) => (None, a),
            None => {
                let cfg = ServerConfig::default()
                    .with_listen(SocketAddr::from(([127, 0, 0, 1], 0)))
                    .with_capacity_bytes(EMBEDDED_CAPACITY_BYTES)
                    .with_workers(workers);
                let h = Server::start(cfg).context("starting the embedded memory server")?;
                let a = h.local_addr();
                (Some(h), a)
            }
        };
        let pool = PoolBuilder::new([addr])
            .with_transport(TransportChoice::Tcp)
            .with_inflight_max(INFLIGHT_MAX)
            .with_name("farbench")
            .build()
            .with_context(|| format!("connecting a farpool pool to {addr}"))?;
        let lease = pool.lease(0, 1).with_context(|| format!("leasing one slab from {addr}"))?;
        let need = ATOMIC_BASE + 8 * 1024;
        if lease.len_bytes() < need {
            bail!("the server's slab of {} bytes is smaller than the {need} bytes the bench needs", lease.len_bytes());
        }
        Ok(Self { lease, pool, embedded, addr })
    }

    /// Where the server listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the server runs in this process (its CPU time is then measurable).
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// How the server was reached, for the report.
    pub fn describe(&self) -> String {
        match self.embedded {
            Some(_) => format!("embedded (in-process, started by farbench on {})", self.addr),
            None => format!("external at {}", self.addr),
        }
    }

    /// Fill the slots of `size` with a known pattern (so reads return real bytes).
    pub fn populate(&self, size: usize) -> Result<()> {
        let data = vec![0xC3u8; size];
        for i in 0..SLOTS {
            self.lease.write(0, (i * size) as u64, &data).with_context(|| format!("populating slot {i}"))?;
        }
        Ok(())
    }

    /// Write `data` at slot 0 and read it back through a fresh endpoint: the data path really works.
    pub fn verify_round_trip(&self, data: &[u8]) -> Result<()> {
        let mut ep = self.pool.endpoint(0)?;
        ep.write(&self.lease, 0, 0, data)?;
        let mut back = vec![0u8; data.len()];
        ep.read(&self.lease, 0, 0, &mut back)?;
        if back != data {
            bail!("read-back of {} bytes differs from what was written", data.len());
        }
        Ok(())
    }

    /// A new data endpoint (one connection) issuing `op` of `size` bytes; `conn` picks its atomic word.
    pub fn endpoint(&self, op: BenchOp, size: usize, conn: usize) -> Result<FarpoolEndpoint> {
        let ep = self.pool.endpoint(0).context("opening a farpool data endpoint")?;
        let addrs = if op.is_atomic() {
            let off = ATOMIC_BASE + 8 * (conn as u64 % 1024);
            vec![self.lease.addr(0, off, 8)?]
        } else {
            (0..SLOTS).map(|i| self.lease.addr(0, (i * size) as u64, size as u64)).collect::<Result<_, _>>()?
        };
        let payload = Bytes::from(vec![0x3Cu8; size]);
        Ok(FarpoolEndpoint { ep, op, size, addrs, next: 0, payload, wrs: Vec::new(), done: Vec::new(), id: 0 })
    }
}

/// One data endpoint of the pool, driven through its raw transport.
pub struct FarpoolEndpoint {
    ep: farpool::Endpoint,
    op: BenchOp,
    size: usize,
    addrs: Vec<RemoteAddr>,
    next: usize,
    payload: Bytes,
    wrs: Vec<WorkRequest>,
    done: Vec<Completion>,
    id: u64,
}

impl std::fmt::Debug for FarpoolEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FarpoolEndpoint").field("op", &self.op).field("size", &self.size).finish_non_exhaustive()
    }
}

impl FarpoolEndpoint {
    fn op_kind(&self) -> OpKind {
        match self.op {
            BenchOp::Read => OpKind::Read { len: self.size as u32 },
            BenchOp::Write => OpKind::Write { data: self.payload.clone() },
            BenchOp::Cas => OpKind::CompareSwap { expect: 0, new: 0 },
            BenchOp::Faa => OpKind::FetchAdd { add: 1 },
        }
    }

    fn check(&self, c: Completion) -> Result<()> {
        match (self.op, c.result) {
            (_, Err(e)) => Err(anyhow::Error::new(e).context("farpool operation failed")),
            (BenchOp::Read, Ok(OpOutput::Read(b))) if b.len() == self.size => Ok(()),
            (BenchOp::Write, Ok(OpOutput::Write)) => Ok(()),
            (BenchOp::Cas | BenchOp::Faa, Ok(OpOutput::Atomic(_))) => Ok(()),
            (op, Ok(other)) => bail!("farpool {op} of {} bytes completed as {other:?}", self.size),
        }
    }
}

impl Endpoint for FarpoolEndpoint {
    fn submit(&mut self, n: usize) -> Result<()> {
        self.wrs.clear();
        for _ in 0..n {
            let addr = self.addrs[self.next];
            self.next = (self.next + 1) % self.addrs.len();
            self.id = self.id.wrapping_add(1);
            self.wrs.push(WorkRequest { wr_id: self.id, addr, op: self.op_kind() });
        }
        let posted = self.ep.transport().post(&mut self.wrs)?;
        if posted != n {
            bail!("the transport took {posted} of {n} operations (in-flight bound {INFLIGHT_MAX})");
        }
        Ok(())
    }

    fn wait_fd(&self) -> BorrowedFd<'_> {
        self.ep.wait_fd().expect("the bench forces the tcp transport, which has a socket")
    }

    fn reap(&mut self, timeout: Duration) -> Result<usize> {
        self.done.clear();
        let k = self.ep.transport().poll(&mut self.done, usize::MAX, timeout)?;
        let mut done = std::mem::take(&mut self.done);
        let checked = done.drain(..).try_for_each(|c| self.check(c));
        self.done = done;
        checked.map(|()| k)
    }
}
