//! Data endpoints: one connection to one server's data plane, used by one thread.
//!
//! Owns: [`Endpoint`] (a `Box<dyn Transport>` plus the server it reaches) and the connect step per
//! negotiated transport ([`connect_transport`], the one place where the shm and rdma transports plug in).
//! The lease-addressed operations check every access against the lease before posting it (see
//! [`crate::lease`]); batched forms post everything and harvest completions, pipelined up to the
//! endpoint's in-flight bound.
//!
//! Invariants: an endpoint whose connection failed (`Unreachable`, `Timeout`, `Closed`, `Protocol`, `Io`)
//! is marked unhealthy and never returned to the pool's idle cache; operations larger than
//! [`MAX_OP_LEN`] are split; nothing waits longer than the op timeout (twice it for a whole batch).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use farpool_core::tcp::{TcpOptions, TcpTransport};
use farpool_core::wire::MAX_OP_LEN;
use farpool_core::{Error, ErrorKind, OpKind, OpOutput, Result, Transport, TransportKind, WorkRequest};

use crate::arena::ArenaSlice;
#[cfg(feature = "rdma")]
use crate::lease::Expiry;
use crate::lease::Lease;

/// Connect a data transport of `kind` to the server at `addr`.
pub(crate) fn connect_transport(
    kind: TransportKind,
    addr: &str,
    name: &str,
    connect_timeout: Duration,
    op_timeout: Duration,
    inflight_max: usize,
) -> Result<Box<dyn Transport>> {
    match kind {
        TransportKind::Tcp => {
            let opts = TcpOptions { connect_timeout, op_timeout, inflight_max, name: name.to_owned() };
            Ok(Box::new(TcpTransport::connect(addr, opts)?))
        }
        other => {
            Err(Error::new(ErrorKind::Unsupported, format!("the {other} transport is not built into this client")))
        }
    }
}

/// A per-thread data endpoint to one server. See the module docs.
pub struct Endpoint {
    server: usize,
    link: Link,
    healthy: bool,
}

/// An endpoint's transport: behind the trait, or the rdma one held as itself, so that a READ into a
/// registered arena can run the lease's expiry check while the READ is in flight (see
/// [`Endpoint::read_into`]).
enum Link {
    Any(Box<dyn Transport>),
    #[cfg(feature = "rdma")]
    Rdma(Box<crate::rdma::RdmaLink>),
}

impl Link {
    fn t(&mut self) -> &mut dyn Transport {
        match self {
            Link::Any(t) => &mut **t,
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => &mut **l,
        }
    }

    fn t_ref(&self) -> &dyn Transport {
        match self {
            Link::Any(t) => &**t,
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => &**l,
        }
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("server", &self.server)
            .field("kind", &self.link.t_ref().kind())
            .field("healthy", &self.healthy)
            .finish()
    }
}

pub(crate) fn breaks_connection(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Unreachable
            | ErrorKind::Timeout
            | ErrorKind::Closed
            | ErrorKind::Protocol
            | ErrorKind::Io
            | ErrorKind::Cancelled
            | ErrorKind::Internal
    )
}

impl Endpoint {
    pub(crate) fn new(server: usize, transport: Box<dyn Transport>) -> Self {
        Self { server, link: Link::Any(transport), healthy: true }
    }

    /// An endpoint over the client's rdma link.
    pub(crate) fn rdma(server: usize, link: Box<crate::rdma::RdmaLink>) -> Self {
        #[cfg(feature = "rdma")]
        let link = Link::Rdma(link);
        #[cfg(not(feature = "rdma"))]
        let link = Link::Any(link);
        Self { server, link, healthy: true }
    }

    /// Index of the server this endpoint reaches.
    pub fn server(&self) -> usize {
        self.server
    }

    /// The transport in use.
    pub fn kind(&self) -> TransportKind {
        self.link.t_ref().kind()
    }

    /// Whether no connection-level failure has been seen.
    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    /// The raw transport, for `post`/`poll` with addresses from [`Lease::addr`]. Harvest every raw
    /// completion before calling the lease-addressed methods again: they expect an idle endpoint.
    pub fn transport(&mut self) -> &mut dyn Transport {
        self.link.t()
    }

    /// The transport's descriptor to wait on when one thread drives many endpoints (see
    /// [`Transport::wait_fd`]); `None` for transports without one (shm completes at once; rdma polls).
    pub fn wait_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.link.t_ref().wait_fd()
    }

    /// The underlying transport, owned (e.g. to wrap it in a decorator such as `farpool_core::fault::Faulty`).
    pub fn into_transport(self) -> Box<dyn Transport> {
        match self.link {
            Link::Any(t) => t,
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => l,
        }
    }

    #[inline]
    fn track<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r
            && breaks_connection(e.kind())
        {
            self.healthy = false;
        }
        r
    }

    #[inline]
    fn same_server(&self, lease: &Lease) -> Result<()> {
        if lease.server() != self.server {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "lease {} is on server {}, this endpoint reaches server {}",
                    lease.id(),
                    lease.server(),
                    self.server
                ),
            ));
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` of grant `grant` of `lease`.
    pub fn read(&mut self, lease: &Lease, grant: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.same_server(lease)?;
        let addr = lease.addr(grant, offset, buf.len() as u64)?;
        let r = self.link.t().read(addr, buf);
        self.track(r)
    }

    /// Write `data` at `offset` of grant `grant` of `lease`.
    pub fn write(&mut self, lease: &Lease, grant: usize, offset: u64, data: &[u8]) -> Result<()> {
        self.same_server(lease)?;
        let addr = lease.addr(grant, offset, data.len() as u64)?;
        let r = self.link.t().write(addr, data);
        self.track(r)
    }

    /// Read `dst.len()` bytes at `offset` of grant `grant` of `lease` into `dst`, a slice of an
    /// [`Arena`](crate::Arena): over rdma with a registered arena the NIC places them there with no
    /// copy; otherwise as [`read`](Self::read).
    ///
    /// Over rdma the lease's bounds are checked before the READ is sent and its expiry (a clock read)
    /// while the READ is in flight, so that the clock is not read between one completion and the next
    /// post: on Soft-RoCE under emulation that time decides the latency. A lease that turns out to be
    /// expired fails the call with `Revoked` once the NIC is done, and `dst` may then hold the bytes
    /// read (of this lease's own slab: the server revokes a slab's rkey before anyone else gets it).
    #[inline]
    pub fn read_into(&mut self, lease: &Lease, grant: usize, offset: u64, dst: &mut ArenaSlice<'_>) -> Result<()> {
        self.same_server(lease)?;
        let (buf, reg) = dst.parts();
        let len = buf.len() as u64;
        #[cfg(feature = "rdma")]
        if let (Link::Rdma(link), Some(reg)) = (&mut self.link, reg) {
            // (Inlined down to the post: on Soft-RoCE under emulation each call and return between one
            // completion and the next post costs; see BENCHMARKS.md, rdma, session 9.)
            let (g, expiry) = lease.state.check_bounds(grant, offset, len)?;
            let deferred = matches!(expiry, Expiry::Deferred);
            let check = || if deferred { lease.state.check_expiry(grant, offset, len) } else { Ok(()) };
            let r = link.read_checked(g, offset, buf, reg, check);
            return self.track(r);
        }
        let addr = lease.addr(grant, offset, len)?;
        let r = match reg {
            Some(reg) => self.link.t().read_registered(addr, buf, reg),
            None => self.link.t().read(addr, buf),
        };
        self.track(r)
    }

    /// Write `src` (a slice of an [`Arena`](crate::Arena)) at `offset` of grant `grant` of `lease`: over
    /// rdma with a registered arena the NIC sends it from there with no copy; otherwise as
    /// [`write`](Self::write).
    pub fn write_from(&mut self, lease: &Lease, grant: usize, offset: u64, src: &ArenaSlice<'_>) -> Result<()> {
        self.same_server(lease)?;
        let (data, reg) = src.shared_parts();
        let addr = lease.addr(grant, offset, data.len() as u64)?;
        let r = match reg {
            Some(reg) => self.link.t().write_registered(addr, data, reg),
            None => self.link.t().write(addr, data),
        };
        self.track(r)
    }

    /// Compare-and-swap the 8-byte-aligned u64 at `offset`; returns the old value (`== expect` iff swapped).
    pub fn compare_swap(&mut self, lease: &Lease, grant: usize, offset: u64, expect: u64, new: u64) -> Result<u64> {
        self.same_server(lease)?;
        let addr = lease.addr(grant, offset, 8)?;
        let r = self.link.t().compare_swap(addr, expect, new);
        self.track(r)
    }

    /// Fetch-and-add on the 8-byte-aligned u64 at `offset`; returns the old value.
    pub fn fetch_add(&mut self, lease: &Lease, grant: usize, offset: u64, add: u64) -> Result<u64> {
        self.same_server(lease)?;
        let addr = lease.addr(grant, offset, 8)?;
        let r = self.link.t().fetch_add(addr, add);
        self.track(r)
    }

    /// Read every `(grant, offset, len)` item, pipelined; returns the bytes in item order. Every item
    /// is checked before anything is sent; the first failed item (in item order) fails the call.
    pub fn read_many(&mut self, lease: &Lease, items: &[(usize, u64, usize)]) -> Result<Vec<Bytes>> {
        self.same_server(lease)?;
        let mut wrs = Vec::new();
        let mut owner = Vec::new(); // wr_id -> (item, chunk start within the item)
        for (i, &(grant, offset, len)) in items.iter().enumerate() {
            let addr = lease.addr(grant, offset, len as u64)?;
            for start in (0..len).step_by(MAX_OP_LEN as usize) {
                let n = (len - start).min(MAX_OP_LEN as usize) as u32;
                wrs.push(WorkRequest {
                    wr_id: owner.len() as u64,
                    addr: addr.offset_by(start as u64),
                    op: OpKind::Read { len: n },
                });
                owner.push((i, start));
            }
        }
        let done = self.run(wrs, owner.len())?;
        let mut out: Vec<BytesMut> = items.iter().map(|&(_, _, len)| BytesMut::zeroed(len)).collect();
        for (wr_id, output) in done.into_iter().enumerate() {
            let (item, start) = owner[wr_id];
            match output {
                OpOutput::Read(b) if start + b.len() <= items[item].2 => {
                    out[item][start..start + b.len()].copy_from_slice(&b)
                }
                other => return Err(Error::new(ErrorKind::Protocol, format!("read completed as {other:?}"))),
            }
        }
        Ok(out.into_iter().map(BytesMut::freeze).collect())
    }

    /// Write every `(grant, offset, data)` item, pipelined. Every item is checked before anything is
    /// sent; the first failed item (in item order) fails the call (other items may have been written).
    pub fn write_many(&mut self, lease: &Lease, items: &[(usize, u64, &[u8])]) -> Result<()> {
        self.same_server(lease)?;
        let mut wrs = Vec::new();
        for &(grant, offset, data) in items {
            let addr = lease.addr(grant, offset, data.len() as u64)?;
            for (k, part) in data.chunks(MAX_OP_LEN as usize).enumerate() {
                let at = (k * MAX_OP_LEN as usize) as u64;
                let op = OpKind::Write { data: Bytes::copy_from_slice(part) };
                wrs.push(WorkRequest { wr_id: wrs.len() as u64, addr: addr.offset_by(at), op });
            }
        }
        let n = wrs.len();
        self.run(wrs, n).map(drop)
    }

    /// Execute `wrs` (ids `0..n`) and return their outputs indexed by id, or the lowest-id error.
    fn run(&mut self, wrs: Vec<WorkRequest>, n: usize) -> Result<Vec<OpOutput>> {
        let r = self.link.t().execute(wrs);
        let completions = self.track(r)?;
        let mut slots: Vec<Option<Result<OpOutput>>> = (0..n).map(|_| None).collect();
        for c in completions {
            let slot = slots.get_mut(c.wr_id as usize).ok_or_else(|| {
                Error::new(ErrorKind::Internal, format!("completion for unknown work request {}", c.wr_id))
            })?;
            *slot = Some(c.result);
        }
        let mut outs = Vec::with_capacity(n);
        for (id, s) in slots.into_iter().enumerate() {
            let r =
                s.unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, format!("work request {id} never completed"))));
            outs.push(self.track(r)?);
        }
        Ok(outs)
    }
}
