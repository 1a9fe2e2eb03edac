//! [`ShmTransport`]: `farpool_core::Transport` over mapped grants.
//!
//! Every operation runs synchronously inside `post` (a memcpy or an atomic on the mapping) and its
//! completion waits in a bounded queue (`ready`, at most `inflight_max`) for the next `poll`. Checks,
//! all in safe code before memory is touched: the slab is attached, the credential (lease, epoch,
//! token) equals the attached grant's, `offset + len <= grant.len`, atomics 8-byte aligned.
//! `read`/`write` are overridden to copy straight between the mapping and the caller's buffer.
//!
//! A mapping whose grant the server revoked reads zeros (the server punched its pages out); the owner
//! of the endpoint removes it on the control plane's `Revoked` notice ([`ShmTransport::remove`]).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use farpool_core::{
    Completion, Error, ErrorKind, OpKind, OpOutput, RemoteAddr, Result, SlabId, Transport, TransportKind, WorkRequest,
};

use super::client::ShmMapping;
use crate::coherence::Coherence;
use crate::region::Region;

/// Options of an shm endpoint.
#[derive(Clone, Debug)]
pub struct ShmOptions {
    /// Completions waiting for `poll` at most (the in-flight bound). Default 1024.
    pub inflight_max: usize,
    /// Coherence mode. Default [`Coherence::Coherent`].
    pub coherence: Coherence,
}

impl Default for ShmOptions {
    fn default() -> Self {
        Self { inflight_max: 1024, coherence: Coherence::Coherent }
    }
}

impl ShmOptions {
    /// Set the in-flight bound (default 1024; at least 1).
    #[must_use]
    pub fn with_inflight_max(mut self, n: usize) -> Self {
        self.inflight_max = n.max(1);
        self
    }

    /// Set the coherence mode (default `coherent`).
    #[must_use]
    pub fn with_coherence(mut self, c: Coherence) -> Self {
        self.coherence = c;
        self
    }
}

/// An shm endpoint. See the module docs.
#[derive(Debug)]
pub struct ShmTransport {
    maps: HashMap<SlabId, ShmMapping>,
    ready: VecDeque<Completion>,
    opts: ShmOptions,
}

impl ShmTransport {
    /// An endpoint with no grants attached yet.
    pub fn new(opts: ShmOptions) -> Self {
        Self { maps: HashMap::new(), ready: VecDeque::with_capacity(opts.inflight_max), opts }
    }

    /// Make a mapped grant reachable (replaces an older mapping of the same slab).
    pub fn insert(&mut self, m: ShmMapping) {
        self.maps.insert(m.grant().slab, m);
    }

    /// Forget a slab's mapping (on revoke or release); the mapping is unmapped when its last clone goes.
    pub fn remove(&mut self, slab: SlabId) -> Option<ShmMapping> {
        self.maps.remove(&slab)
    }

    /// The mapping of a slab, if reachable.
    pub fn mapping(&self, slab: SlabId) -> Option<&ShmMapping> {
        self.maps.get(&slab)
    }

    /// Slabs currently reachable.
    pub fn slabs(&self) -> impl Iterator<Item = SlabId> + '_ {
        self.maps.keys().copied()
    }

    /// The coherence mode.
    pub fn coherence(&self) -> Coherence {
        self.opts.coherence
    }

    /// The mapping and in-region offset for `len` bytes at `addr`, after every check.
    fn resolve(&self, addr: &RemoteAddr, len: u64) -> Result<(&Region, u64)> {
        let m = self.maps.get(&addr.slab).ok_or_else(|| {
            Error::new(
                ErrorKind::Revoked,
                format!("slab {} is not mapped (not attached, released or revoked)", addr.slab),
            )
        })?;
        let g = m.grant();
        if addr.cred.lease != g.cred.lease || addr.cred.epoch != g.cred.epoch {
            return Err(Error::new(ErrorKind::Revoked, format!("{addr}: stale lease or epoch")));
        }
        if addr.cred.token != g.cred.token {
            return Err(Error::new(ErrorKind::Unauthorized, format!("{addr}: bad token")));
        }
        match addr.offset.checked_add(len) {
            Some(end) if end <= g.len => Ok((m.region(), addr.offset)),
            _ => Err(Error::new(ErrorKind::OutOfRange, format!("{addr}+{len} is outside the slab of {} bytes", g.len))),
        }
    }

    fn exec(&self, wr: &WorkRequest) -> Result<OpOutput> {
        wr.op.check(&wr.addr)?;
        let (r, off) = self.resolve(&wr.addr, wr.op.len())?;
        let c = self.opts.coherence;
        match &wr.op {
            OpKind::Read { len } => {
                let mut v = vec![0u8; *len as usize];
                c.before_read(r, off, v.len())?;
                r.read_at(off, &mut v)?;
                Ok(OpOutput::Read(Bytes::from(v)))
            }
            OpKind::Write { data } => {
                r.write_at(off, data)?;
                c.after_write(r, off, data.len())?;
                Ok(OpOutput::Write)
            }
            OpKind::CompareSwap { expect, new } => {
                c.before_read(r, off, 8)?;
                let old = r.compare_swap_u64(off, *expect, *new)?;
                c.after_write(r, off, 8)?;
                Ok(OpOutput::Atomic(old))
            }
            OpKind::FetchAdd { add } => {
                c.before_read(r, off, 8)?;
                let old = r.fetch_add_u64(off, *add)?;
                c.after_write(r, off, 8)?;
                Ok(OpOutput::Atomic(old))
            }
        }
    }
}

impl Transport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        let room = self.opts.inflight_max.saturating_sub(self.ready.len()).min(batch.len());
        for wr in batch.drain(..room) {
            let result = self.exec(&wr);
            self.ready.push_back(Completion { wr_id: wr.wr_id, result });
        }
        Ok(room)
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, _timeout: Duration) -> Result<usize> {
        let n = max.min(self.ready.len());
        out.extend(self.ready.drain(..n));
        Ok(n)
    }

    fn inflight(&self) -> usize {
        self.ready.len()
    }

    fn inflight_max(&self) -> usize {
        self.opts.inflight_max
    }

    fn read(&mut self, addr: RemoteAddr, buf: &mut [u8]) -> Result<()> {
        let (r, off) = self.resolve(&addr, buf.len() as u64)?;
        self.opts.coherence.before_read(r, off, buf.len())?;
        r.read_at(off, buf)
    }

    fn write(&mut self, addr: RemoteAddr, data: &[u8]) -> Result<()> {
        let (r, off) = self.resolve(&addr, data.len() as u64)?;
        r.write_at(off, data)?;
        self.opts.coherence.after_write(r, off, data.len())
    }
}
