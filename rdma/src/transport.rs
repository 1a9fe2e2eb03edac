//! [`RdmaTransport`]: the `farpool_core::Transport` implementation over one [`Endpoint`].
//!
//! A `RemoteAddr` becomes `(cred.base_addr + offset, cred.rkey)`. The NIC enforces the grant's bounds
//! and liveness; when the transport knows a grant's length ([`RdmaTransport::add_grant`]) it also
//! checks bounds before posting, so an out-of-range access fails with `OutOfRange` without costing the
//! queue pair (a NIC-side access error moves it to the error state), and a NIC rejection of an
//! in-bounds access then means `Revoked`.

use std::any::Any;
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use farpool_core::{
    Completion, Error, ErrorKind, OpKind, OpOutput, RemoteAddr, Result, SlabGrant, Transport, TransportKind,
    WorkRequest,
};

use farpool_core::transport::{read_chunked, run_one_executed, write_chunked};
use farpool_core::wire::MAX_OP_LEN;

use crate::alone::Alone;
use crate::endpoint::{Endpoint, EndpointState, Kind, Output, QpExchange, RdmaCompletion, Remote};
use crate::mr::Registration;
use crate::ops::{Admit, kind_of};

/// Hash of an rkey for the per-post grant lookup: one multiplication instead of SipHash, which cost more
/// than the rest of the pre-post checks under emulation. rkeys come from the server's device driver
/// (and only slow this client's own lookups if they collided), so flooding resistance buys nothing.
#[derive(Default)]
struct RkeyHasher(u64);

impl Hasher for RkeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// `Transport` over RDMA: staged one-sided operations on one RC connection.
pub struct RdmaTransport {
    ep: Endpoint,
    /// rkey -> grant length, for bounds checks before posting.
    grants: HashMap<u32, u64, BuildHasherDefault<RkeyHasher>>,
    /// The last grant `resolve` found, `(rkey, length)`, rkey 0 for none: a buffer manager's faults
    /// mostly hit one slab after another, and under emulation the map lookup (a call) shows in the
    /// depth-1 latency. Cleared whenever `grants` changes.
    last: Cell<(u32, u64)>,
    exchange: Option<Box<dyn QpExchange>>,
    done: Vec<RdmaCompletion>,
}

impl fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("endpoint", &self.ep)
            .field("grants", &self.grants.len())
            .field("auto_reconnect", &self.exchange.is_some())
            .finish()
    }
}

impl RdmaTransport {
    /// Wrap a connected endpoint.
    pub fn new(ep: Endpoint) -> Self {
        Self { ep, grants: HashMap::default(), last: Cell::new((0, 0)), exchange: None, done: Vec::new() }
    }

    /// Reconnect automatically (at the next `post`) after the queue pair broke, swapping `QpInfo` with
    /// the server through `exchange`. Default: off (`post` fails with `Closed` until [`Self::reconnect`]).
    #[must_use]
    pub fn with_exchange(mut self, exchange: Box<dyn QpExchange>) -> Self {
        self.exchange = Some(exchange);
        self
    }

    /// Remember a grant's length so accesses beyond it fail with `OutOfRange` before reaching the NIC.
    pub fn add_grant(&mut self, grant: &SlabGrant) {
        self.grants.insert(grant.cred.rkey, grant.len);
        self.last.set((0, 0));
    }

    /// Forget a grant (after revoke or release).
    pub fn remove_grant(&mut self, grant: &SlabGrant) {
        self.grants.remove(&grant.cred.rkey);
        self.last.set((0, 0));
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.ep
    }

    /// The endpoint, mutably (zero-copy calls, explicit reconnects).
    pub fn endpoint_mut(&mut self) -> &mut Endpoint {
        &mut self.ep
    }

    /// Reconnect now through the exchange given to [`Self::with_exchange`].
    pub fn reconnect(&mut self) -> Result<()> {
        match self.exchange.as_mut() {
            Some(x) => self.ep.reconnect(x.as_mut()),
            None => Err(Error::new(ErrorKind::Config, "no QP exchange configured for reconnect")),
        }
    }

    /// Re-establish a queue pair in error (when an exchange is configured) before posting on it.
    #[inline]
    fn revive(&mut self) -> Result<()> {
        if matches!(self.ep.state(), EndpointState::Broken(_)) && self.exchange.is_some() {
            self.reconnect()?;
        }
        Ok(())
    }

    /// One zero-copy operation per chunk of at most [`MAX_OP_LEN`] bytes of `local` (inside `reg`).
    #[inline]
    fn registered(&mut self, addr: RemoteAddr, local: Local<'_>, reg: &Arc<Registration>) -> Result<()> {
        let remote = self.resolve(&addr, local.len() as u64)?;
        self.revive()?;
        let step = MAX_OP_LEN as usize;
        let at = |i: usize| Remote { addr: remote.addr + (i * step) as u64, rkey: remote.rkey };
        let ep = &mut self.ep;
        match local {
            Local::Into(buf) => buf.chunks_mut(step).enumerate().try_for_each(|(i, part)| ep.read_to(reg, part, at(i))),
            Local::From(data) => data.chunks(step).enumerate().try_for_each(|(i, part)| ep.write_of(reg, part, at(i))),
        }
    }

    /// [`Transport::read_registered`] into `reg` (memory registered with this transport's device) with
    /// a check of the caller's that may run while the READ is in flight: see
    /// [`Endpoint::read_to_checked`]. A registration of another device is read with a copy, after the
    /// check; so is a read of more than one operation.
    #[inline]
    pub fn read_registered_checked(
        &mut self,
        addr: RemoteAddr,
        buf: &mut [u8],
        reg: &Arc<Registration>,
        mut check: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        if buf.len() > MAX_OP_LEN as usize || !Arc::ptr_eq(reg.context(), self.ep.context()) {
            check()?;
            return self.read_registered(addr, buf, reg);
        }
        let remote = self.resolve(&addr, buf.len() as u64)?;
        self.read_at_checked(remote, buf, reg, check)
    }

    /// [`read_registered_checked`](Self::read_registered_checked) of a remote range the caller has
    /// already resolved and checked against its grant (the client library's leases do): no grant
    /// lookup here. The NIC still checks the rkey, but not the grant's bounds within a region that
    /// spans several grants. One operation: `buf` at most [`MAX_OP_LEN`] bytes, `reg` of this
    /// transport's device (`OutOfRange` or `Config` otherwise, as [`Endpoint::read_to`]).
    #[inline]
    pub fn read_at_checked(
        &mut self,
        remote: Remote,
        buf: &mut [u8],
        reg: &Arc<Registration>,
        check: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        self.revive()?;
        self.ep.read_to_checked(reg, buf, remote, check)
    }

    /// Local checks that need no NIC: op size and alignment, RDMA credential present, grant bounds.
    fn precheck(&self, wr: &WorkRequest) -> Result<Remote> {
        wr.op.check(&wr.addr)?;
        self.resolve(&wr.addr, wr.op.len())
    }

    /// The length of the grant of `rkey`, if known; remembered as the last one found.
    #[inline(never)]
    fn lookup(&self, rkey: u32) -> Option<u64> {
        let slab = *self.grants.get(&rkey)?;
        self.last.set((rkey, slab));
        Some(slab)
    }

    /// The NIC address of `len` bytes at `addr`, checked against the grant when it is known.
    #[inline]
    fn resolve(&self, addr: &RemoteAddr, len: u64) -> Result<Remote> {
        let RemoteAddr { offset, cred, .. } = *addr;
        if cred.rkey == 0 {
            return Err(Error::new(ErrorKind::Unsupported, format!("{addr} has no RDMA registration (rkey 0)")));
        }
        let end = offset.checked_add(len);
        let known = match self.last.get() {
            (rkey, slab) if rkey == cred.rkey => Some(slab),
            _ => self.lookup(cred.rkey),
        };
        if let Some(slab) = known
            && end.is_none_or(|e| e > slab)
        {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("{addr} + {len} bytes is outside the slab of {slab} bytes"),
            ));
        }
        match cred.base_addr.checked_add(offset) {
            Some(at) => Ok(Remote { addr: at, rkey: cred.rkey }),
            None => Err(Error::new(ErrorKind::OutOfRange, format!("{addr} overflows the address space"))),
        }
    }

    /// Whether a blocking call may take the endpoint's depth-1 path (`alone.rs`): nothing in flight and
    /// the endpoint ready (a broken one goes through `post`, which reconnects).
    fn idle(&self) -> bool {
        self.ep.inflight() == 0 && matches!(self.ep.state(), EndpointState::Ready)
    }

    /// One operation on the depth-1 path; `None` when not eligible (nothing was done).
    fn alone(&mut self, wr: &WorkRequest, into: Option<&mut [u8]>) -> Option<Result<Output>> {
        if !self.idle() {
            return None;
        }
        let remote = match self.precheck(wr) {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        let len = u32::try_from(wr.op.len()).ok()?;
        let local = match &wr.op {
            OpKind::Write { data } => Alone::Write(data),
            _ => Alone::Staged,
        };
        self.ep.run_alone(kind_of(&wr.op), remote, len, local, into)
    }
}

/// The caller's side of a zero-copy call: where a READ lands, or what a WRITE sends.
enum Local<'a> {
    Into(&'a mut [u8]),
    From(&'a [u8]),
}

impl Local<'_> {
    fn len(&self) -> usize {
        match self {
            Local::Into(b) => b.len(),
            Local::From(d) => d.len(),
        }
    }
}

/// The registration behind a token of [`Transport::read_registered`] when it is one of this
/// endpoint's device.
fn ours<'a>(reg: &'a dyn Any, ep: &Endpoint) -> Option<&'a Arc<Registration>> {
    reg.downcast_ref::<Arc<Registration>>().filter(|r| Arc::ptr_eq(r.context(), ep.context()))
}

fn to_core(c: RdmaCompletion) -> Completion {
    let result = c.result.and_then(|o| match o {
        Output::Read(b) => Ok(OpOutput::Read(b)),
        Output::Write => Ok(OpOutput::Write),
        Output::Atomic(v) => Ok(OpOutput::Atomic(v)),
        Output::Placed => Err(Error::new(ErrorKind::Internal, "zero-copy completion on the transport path")),
    });
    Completion { wr_id: c.wr_id, result }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        self.revive()?;
        self.ep.ensure_ready()?;
        let first = self.ep.records.len();
        let mut taken = 0;
        for (i, wr) in batch.iter().enumerate() {
            let admit = match self.precheck(wr) {
                Err(e) => {
                    self.ep.ready.push_back(RdmaCompletion { wr_id: wr.wr_id, result: Err(e) });
                    Admit::Immediate
                }
                Ok(remote) => {
                    let data = match &wr.op {
                        OpKind::Write { data } => Some(&data[..]),
                        _ => None,
                    };
                    self.ep.admit(wr.wr_id, kind_of(&wr.op), remote, wr.op.len(), data, i, false)
                }
            };
            match admit {
                Admit::Queued | Admit::Immediate => taken = i + 1,
                Admit::NoRoom => break,
            }
        }
        self.ep.submit(first, |i| match &batch[i].op {
            OpKind::Write { data } => &data[..],
            _ => &[],
        });
        batch.drain(..taken);
        Ok(taken)
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, timeout: Duration) -> Result<usize> {
        self.done.clear();
        let n = self.ep.poll_completions(&mut self.done, max, timeout)?;
        out.extend(self.done.drain(..).map(to_core));
        Ok(n)
    }

    fn inflight(&self) -> usize {
        self.ep.inflight()
    }

    fn inflight_max(&self) -> usize {
        self.ep.inflight_max()
    }

    fn op_timeout(&self) -> Duration {
        self.ep.op_timeout()
    }

    // The blocking conveniences take the endpoint's depth-1 path (one `ibv_post_send`, one-entry
    // `ibv_poll_cq`, no completion list) when nothing else is in flight; see `alone.rs`.

    fn run_one(&mut self, wr: WorkRequest) -> Result<OpOutput> {
        match self.alone(&wr, None) {
            Some(result) => to_core(RdmaCompletion { wr_id: wr.wr_id, result }).result,
            None => run_one_executed(self, wr),
        }
    }

    fn read(&mut self, addr: RemoteAddr, buf: &mut [u8]) -> Result<()> {
        if buf.len() <= MAX_OP_LEN as usize {
            let wr = WorkRequest { wr_id: 0, addr, op: OpKind::Read { len: buf.len() as u32 } };
            if let Some(result) = self.alone(&wr, Some(&mut *buf)) {
                return match result? {
                    Output::Placed => Ok(()),
                    Output::Read(b) if b.len() == buf.len() => {
                        buf.copy_from_slice(&b);
                        Ok(())
                    }
                    o => Err(Error::new(ErrorKind::Internal, format!("read completed as {o:?}"))),
                };
            }
        }
        read_chunked(self, addr, buf)
    }

    // A registration of this endpoint's device: the bytes go straight between the NIC and `buf`.
    // Anything else (another device's registration, a foreign token) is read or written as usual.

    fn read_registered(&mut self, addr: RemoteAddr, buf: &mut [u8], reg: &dyn Any) -> Result<()> {
        match ours(reg, &self.ep) {
            Some(r) => self.registered(addr, Local::Into(buf), r),
            None => self.read(addr, buf),
        }
    }

    fn write_registered(&mut self, addr: RemoteAddr, data: &[u8], reg: &dyn Any) -> Result<()> {
        match ours(reg, &self.ep) {
            Some(r) => self.registered(addr, Local::From(data), r),
            None => self.write(addr, data),
        }
    }

    fn write(&mut self, addr: RemoteAddr, data: &[u8]) -> Result<()> {
        if data.len() <= MAX_OP_LEN as usize && self.idle() {
            let len = data.len() as u32;
            let remote = self.resolve(&addr, u64::from(len))?;
            if let Some(result) = self.ep.run_alone(Kind::Write, remote, len, Alone::Write(data), None) {
                return match result? {
                    Output::Write => Ok(()),
                    o => Err(Error::new(ErrorKind::Internal, format!("write completed as {o:?}"))),
                };
            }
        }
        write_chunked(self, addr, data)
    }
}
