//! Far I/O: a pool of idle endpoints per server and batched slot reads and writes over them.
//!
//! An endpoint is used by one thread at a time (checked out, driven, checked back in only if it is idle
//! and healthy). A batch is posted whole and its completions are matched by `wr_id`, in whatever order
//! they arrive; every wait is bounded by twice the endpoint's op timeout.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use farpool_core::{Error, ErrorKind, OpKind, OpOutput, RemoteAddr, Result, ServerId, Transport, WorkRequest};
use parking_lot::Mutex;

use super::inner::Inner;
use super::layout::HEADER_LEN;
use crate::endpoint::breaks_connection;

pub(crate) struct Endpoints {
    idle: Mutex<HashMap<ServerId, Vec<Box<dyn Transport>>>>,
    idle_max: usize,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle: usize = self.idle.lock().values().map(Vec::len).sum();
        f.debug_struct("Endpoints").field("idle", &idle).field("idle_max", &self.idle_max).finish()
    }
}

impl Endpoints {
    pub(crate) fn new(idle_max: usize) -> Self {
        Self { idle: Mutex::new(HashMap::new()), idle_max }
    }

    pub(crate) fn forget(&self, server: ServerId) {
        self.idle.lock().remove(&server);
    }
}

/// Post `wrs` and hand each completion to `on(wr_id, result)`. `Err` if the endpoint broke or the batch
/// did not complete in time; ops not reported by then never will be (the caller treats them as failed).
/// A batch of one runs as one blocking `run_one` (its result is reported even when it also broke the
/// endpoint).
pub(crate) fn drive(
    ep: &mut dyn Transport,
    mut wrs: Vec<WorkRequest>,
    mut on: impl FnMut(usize, Result<OpOutput>),
) -> Result<()> {
    let total = wrs.len();
    if total == 1 && ep.inflight() == 0 {
        // One operation (a single page fault or write-back): the transport's blocking call, which RDMA
        // runs on its depth-1 path. Reported either way; `Err` as well when it broke the endpoint.
        let wr = wrs.pop().expect("one request");
        let id = wr.wr_id as usize;
        let r = ep.run_one(wr);
        let broke = r.as_ref().err().filter(|e| breaks_connection(e.kind())).map(Error::duplicate);
        on(id, r);
        return broke.map_or(Ok(()), Err);
    }
    let mut got = 0;
    let deadline = Instant::now() + ep.op_timeout() * 2;
    let mut out = Vec::with_capacity(total);
    while got < total {
        if !wrs.is_empty() {
            ep.post(&mut wrs)?;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::new(ErrorKind::Timeout, "far batch did not complete in time"));
        }
        out.clear();
        ep.poll(&mut out, total - got, (deadline - now).min(Duration::from_millis(50)))?;
        for c in out.drain(..) {
            got += 1;
            on(c.wr_id as usize, c.result);
        }
    }
    Ok(())
}

impl Inner {
    fn checkout(&self, server: ServerId) -> Result<Box<dyn Transport>> {
        if let Some(ep) = self.endpoints.idle.lock().get_mut(&server).and_then(Vec::pop) {
            return Ok(ep);
        }
        self.backend.endpoint(server)
    }

    fn checkin(&self, server: ServerId, ep: Box<dyn Transport>) {
        if ep.inflight() != 0 {
            return;
        }
        let mut idle = self.endpoints.idle.lock();
        let list = idle.entry(server).or_default();
        if list.len() < self.endpoints.idle_max {
            list.push(ep);
        }
    }

    /// Run one batch on an endpoint of `server`; returns per-op results (missing ones as `Err`).
    fn run_batch(&self, server: ServerId, wrs: Vec<WorkRequest>) -> Vec<Result<OpOutput>> {
        let n = wrs.len();
        let mut res: Vec<Option<Result<OpOutput>>> = (0..n).map(|_| None).collect();
        let outcome = self.checkout(server).and_then(|mut ep| {
            let r = drive(&mut *ep, wrs, |i, r| {
                if let Some(slot) = res.get_mut(i) {
                    *slot = Some(r);
                }
            });
            if r.is_ok() {
                self.checkin(server, ep);
            }
            r
        });
        let err = outcome.err();
        res.into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    let kind = err.as_ref().map_or(ErrorKind::Internal, Error::kind);
                    Err(Error::new(kind, "far operation never completed"))
                })
            })
            .collect()
    }

    /// Read whole slots (header + page) of `server`.
    pub(crate) fn read_slots(&self, server: ServerId, addrs: &[RemoteAddr]) -> Vec<Result<Bytes>> {
        let len = (HEADER_LEN + self.cfg.page_size) as u32;
        let wrs = addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| WorkRequest { wr_id: i as u64, addr, op: OpKind::Read { len } })
            .collect();
        let t0 = Instant::now();
        let res = self.run_batch(server, wrs);
        self.note_rtt(t0.elapsed());
        res.into_iter()
            .map(|r| match r? {
                OpOutput::Read(b) => Ok(b),
                other => Err(Error::new(ErrorKind::Protocol, format!("read completed as {other:?}"))),
            })
            .collect()
    }

    /// Write slot images to `server`; per-op success.
    pub(crate) fn write_slots(&self, server: ServerId, writes: Vec<(RemoteAddr, Bytes)>) -> Vec<Result<()>> {
        let wrs = writes
            .into_iter()
            .enumerate()
            .map(|(i, (addr, data))| WorkRequest { wr_id: i as u64, addr, op: OpKind::Write { data } })
            .collect();
        self.run_batch(server, wrs).into_iter().map(|r| r.map(|_| ())).collect()
    }

    /// Fold a measured round trip into the EWMA (weight 1/8).
    fn note_rtt(&self, d: Duration) {
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        let old = self.stats.rtt_ewma_ns.load(std::sync::atomic::Ordering::Relaxed);
        let new = if old == 0 { ns } else { old - old / 8 + ns / 8 };
        self.stats.rtt_ewma_ns.store(new, std::sync::atomic::Ordering::Relaxed);
    }
}
