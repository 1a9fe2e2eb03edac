//! The `Transport` trait: completion-based, batched one-sided operations on remote memory.
//!
//! Like verbs and io_uring: [`Transport::post`] queues many [`WorkRequest`]s, [`Transport::poll`]
//! harvests [`Completion`]s, which may arrive in any order (match them by `wr_id`). Every endpoint has
//! a bound on operations in flight ([`Transport::inflight_max`]); `post` takes only what fits.
//! Blocking conveniences ([`Transport::read`], [`Transport::write`], ...) sit on top as default methods;
//! [`AsyncTransport`] offers them to tokio code. One endpoint per thread: endpoints are `Send`, not shared.

use std::any::Any;
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::ids::RemoteAddr;
use crate::wire::MAX_OP_LEN;

/// Which transport an endpoint uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// Shared memory (memfd / dax / NUMA node) mapped into the client.
    Shm,
    /// RDMA verbs, RC queue pairs.
    Rdma,
    /// The server executes the op on the client's behalf over TCP.
    Tcp,
    /// A simulated transport (tests, simulation).
    Sim,
}

impl TransportKind {
    /// Lowercase name (`shm`, `rdma`, `tcp`, `sim`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shm => "shm",
            Self::Rdma => "rdma",
            Self::Tcp => "tcp",
            Self::Sim => "sim",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A one-sided operation: the same type the wire carries ([`crate::wire::WireOp`]), so posting over
/// TCP encodes it without conversion.
pub use crate::wire::WireOp as OpKind;

/// One queued operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkRequest {
    /// Caller's id, returned in the completion.
    pub wr_id: u64,
    /// Where.
    pub addr: RemoteAddr,
    /// What.
    pub op: OpKind,
}

/// What a successful operation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpOutput {
    /// Bytes read.
    Read(Bytes),
    /// A write completed.
    Write,
    /// Old value of an atomic.
    Atomic(u64),
}

/// The outcome of one [`WorkRequest`].
#[derive(Debug)]
pub struct Completion {
    /// The request's id.
    pub wr_id: u64,
    /// Its result.
    pub result: Result<OpOutput>,
}

/// A completion-based endpoint to remote memory. See the module docs.
pub trait Transport: Send {
    /// Which transport this is.
    fn kind(&self) -> TransportKind;

    /// Post as many requests from the front of `batch` as the in-flight window allows, removing them
    /// from `batch`; returns how many were posted. Requests that fail local checks still produce an
    /// error completion (they are "posted" and complete at once), so every posted `wr_id` completes
    /// exactly once. An `Err` means the endpoint itself is unusable.
    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize>;

    /// Move up to `max` completions into `out`, waiting up to `timeout` for the first one; a zero
    /// `timeout` never blocks. Returns how many were added (0 on timeout, or when nothing is in flight).
    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, timeout: Duration) -> Result<usize>;

    /// A descriptor that turns readable when completions may be ready, so that one thread can wait on
    /// many endpoints at once (`poll(2)`/`epoll(7)`) instead of one blocking `poll` per endpoint. Wait on
    /// it only after `poll(.., Duration::ZERO)` returned nothing: completions already received are
    /// buffered and do not make it readable. `None` (the default): this transport has no such
    /// descriptor; poll it directly.
    fn wait_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// Operations posted and not yet completed.
    fn inflight(&self) -> usize;

    /// The bound on operations in flight.
    fn inflight_max(&self) -> usize;

    /// The bound after which a posted operation is declared failed with `Timeout`.
    fn op_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }

    /// Post all of `batch` and wait for all of their completions (in completion order).
    fn execute(&mut self, mut batch: Vec<WorkRequest>) -> Result<Vec<Completion>> {
        let want = batch.len() + self.inflight();
        let mut out = Vec::with_capacity(batch.len());
        let deadline = Instant::now() + self.op_timeout() + self.op_timeout();
        while !batch.is_empty() || self.inflight() > 0 {
            if !batch.is_empty() {
                self.post(&mut batch)?;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(ErrorKind::Timeout, "operations did not complete in time"));
            }
            self.poll(&mut out, want, (deadline - now).min(Duration::from_millis(100)))?;
        }
        Ok(out)
    }

    /// Run one request and return its output.
    fn run_one(&mut self, wr: WorkRequest) -> Result<OpOutput> {
        run_one_executed(self, wr)
    }

    /// Read `buf.len()` bytes at `addr` into `buf` (split into operations of at most [`MAX_OP_LEN`]).
    fn read(&mut self, addr: RemoteAddr, buf: &mut [u8]) -> Result<()> {
        read_chunked(self, addr, buf)
    }

    /// Write `data` at `addr` (split into operations of at most [`MAX_OP_LEN`]).
    fn write(&mut self, addr: RemoteAddr, data: &[u8]) -> Result<()> {
        write_chunked(self, addr, data)
    }

    /// [`read`](Self::read) into `buf`, a range of caller memory that may be registered with this
    /// transport's device: `reg` is the registration's token (the client's `Arena` passes it; for the
    /// rdma transport an `Arc<farpool_rdma::Registration>`). A transport that recognizes the token
    /// places the bytes straight into `buf` (zero copy, as perftest reads into its registered buffer);
    /// any other token, and every other transport, reads as `read` does (the default).
    fn read_registered(&mut self, addr: RemoteAddr, buf: &mut [u8], reg: &dyn Any) -> Result<()> {
        let _ = reg;
        self.read(addr, buf)
    }

    /// [`write`](Self::write) of `data` from registered caller memory; see
    /// [`read_registered`](Self::read_registered).
    fn write_registered(&mut self, addr: RemoteAddr, data: &[u8], reg: &dyn Any) -> Result<()> {
        let _ = reg;
        self.write(addr, data)
    }

    /// Compare-and-swap the u64 at `addr`; returns the old value (equal to `expect` iff it swapped).
    fn compare_swap(&mut self, addr: RemoteAddr, expect: u64, new: u64) -> Result<u64> {
        atomic_value(self.run_one(WorkRequest { wr_id: 0, addr, op: OpKind::CompareSwap { expect, new } })?)
    }

    /// Fetch-and-add on the u64 at `addr`; returns the old value.
    fn fetch_add(&mut self, addr: RemoteAddr, add: u64) -> Result<u64> {
        atomic_value(self.run_one(WorkRequest { wr_id: 0, addr, op: OpKind::FetchAdd { add } })?)
    }
}

/// [`Transport::read`]'s default: chunks of at most [`MAX_OP_LEN`] through [`Transport::execute`]. For
/// transports that override `read` for some cases and fall back to this for the rest.
pub fn read_chunked<T: Transport + ?Sized>(t: &mut T, addr: RemoteAddr, buf: &mut [u8]) -> Result<()> {
    let chunk = MAX_OP_LEN as usize;
    let mut wrs = Vec::new();
    for (i, part) in buf.chunks(chunk).enumerate() {
        let addr = addr.offset_by((i * chunk) as u64);
        wrs.push(WorkRequest { wr_id: i as u64, addr, op: OpKind::Read { len: part.len() as u32 } });
    }
    for c in t.execute(wrs)? {
        let data = match c.result? {
            OpOutput::Read(d) => d,
            other => {
                return Err(Error::new(ErrorKind::Internal, format!("read completed as {other:?}")));
            }
        };
        let at = c.wr_id as usize * chunk;
        let dst = &mut buf[at..at + data.len()];
        dst.copy_from_slice(&data);
    }
    Ok(())
}

/// [`Transport::write`]'s default: chunks of at most [`MAX_OP_LEN`] through [`Transport::execute`].
pub fn write_chunked<T: Transport + ?Sized>(t: &mut T, addr: RemoteAddr, data: &[u8]) -> Result<()> {
    let chunk = MAX_OP_LEN as usize;
    let wrs = data
        .chunks(chunk)
        .enumerate()
        .map(|(i, part)| WorkRequest {
            wr_id: i as u64,
            addr: addr.offset_by((i * chunk) as u64),
            op: OpKind::Write { data: Bytes::copy_from_slice(part) },
        })
        .collect();
    for c in t.execute(wrs)? {
        c.result?;
    }
    Ok(())
}

/// [`Transport::run_one`]'s default: a batch of one through [`Transport::execute`].
pub fn run_one_executed<T: Transport + ?Sized>(t: &mut T, wr: WorkRequest) -> Result<OpOutput> {
    let mut done = t.execute(vec![wr])?;
    let c = done.pop().ok_or_else(|| Error::new(ErrorKind::Internal, "no completion"))?;
    c.result
}

/// Execute `op` on plain bytes at `offset` of `mem`: the reference semantics of the one-sided operations,
/// for in-memory and simulated backends (the page tier's test backend, `farpool-sim`). Bounds are checked
/// (`OutOfRange`); atomics act on little-endian u64 words (callers check alignment with
/// [`OpKind::check`], as every transport does before touching memory).
pub fn apply_to_bytes(mem: &mut [u8], offset: u64, op: &OpKind) -> Result<OpOutput> {
    let at = usize::try_from(offset).ok();
    let range = at.and_then(|a| Some(a..a.checked_add(usize::try_from(op.len()).ok()?)?));
    let Some(r) = range.filter(|r| r.end <= mem.len()) else {
        let msg = format!("{} bytes at offset {offset} are beyond the {} bytes of the slab", op.len(), mem.len());
        return Err(Error::new(ErrorKind::OutOfRange, msg));
    };
    let word = |m: &[u8]| u64::from_le_bytes(m[r.clone()].try_into().expect("atomics are 8 bytes"));
    Ok(match op {
        OpKind::Read { .. } => OpOutput::Read(Bytes::copy_from_slice(&mem[r])),
        OpKind::Write { data } => {
            mem[r].copy_from_slice(data);
            OpOutput::Write
        }
        OpKind::CompareSwap { expect, new } => {
            let old = word(mem);
            if old == *expect {
                mem[r].copy_from_slice(&new.to_le_bytes());
            }
            OpOutput::Atomic(old)
        }
        OpKind::FetchAdd { add } => {
            let old = word(mem);
            mem[r].copy_from_slice(&old.wrapping_add(*add).to_le_bytes());
            OpOutput::Atomic(old)
        }
    })
}

fn atomic_value(o: OpOutput) -> Result<u64> {
    match o {
        OpOutput::Atomic(v) => Ok(v),
        other => Err(Error::new(ErrorKind::Internal, format!("atomic completed as {other:?}"))),
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn kind(&self) -> TransportKind {
        (**self).kind()
    }
    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        (**self).post(batch)
    }
    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, timeout: Duration) -> Result<usize> {
        (**self).poll(out, max, timeout)
    }
    fn wait_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        (**self).wait_fd()
    }
    fn inflight(&self) -> usize {
        (**self).inflight()
    }
    fn inflight_max(&self) -> usize {
        (**self).inflight_max()
    }
    fn op_timeout(&self) -> Duration {
        (**self).op_timeout()
    }
    fn execute(&mut self, batch: Vec<WorkRequest>) -> Result<Vec<Completion>> {
        (**self).execute(batch)
    }
    fn run_one(&mut self, wr: WorkRequest) -> Result<OpOutput> {
        (**self).run_one(wr)
    }
    fn read(&mut self, addr: RemoteAddr, buf: &mut [u8]) -> Result<()> {
        (**self).read(addr, buf)
    }
    fn write(&mut self, addr: RemoteAddr, data: &[u8]) -> Result<()> {
        (**self).write(addr, data)
    }
    fn read_registered(&mut self, addr: RemoteAddr, buf: &mut [u8], reg: &dyn Any) -> Result<()> {
        (**self).read_registered(addr, buf, reg)
    }
    fn write_registered(&mut self, addr: RemoteAddr, data: &[u8], reg: &dyn Any) -> Result<()> {
        (**self).write_registered(addr, data, reg)
    }
    fn compare_swap(&mut self, addr: RemoteAddr, expect: u64, new: u64) -> Result<u64> {
        (**self).compare_swap(addr, expect, new)
    }
    fn fetch_add(&mut self, addr: RemoteAddr, add: u64) -> Result<u64> {
        (**self).fetch_add(addr, add)
    }
}

/// Async conveniences for tokio code: each call runs the blocking operation on tokio's blocking pool,
/// so the endpoint's waiting never stalls a runtime worker.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncTransport<T> {
    inner: std::sync::Arc<parking_lot::Mutex<T>>,
}

#[cfg(feature = "tokio")]
impl<T> Clone for AsyncTransport<T> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

#[cfg(feature = "tokio")]
impl<T: Transport + 'static> AsyncTransport<T> {
    /// Wrap an endpoint.
    pub fn new(t: T) -> Self {
        Self { inner: std::sync::Arc::new(parking_lot::Mutex::new(t)) }
    }

    async fn run<R: Send + 'static>(&self, f: impl FnOnce(&mut T) -> Result<R> + Send + 'static) -> Result<R> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut inner.lock()))
            .await
            .map_err(|e| Error::new(ErrorKind::Cancelled, "blocking task failed").with_source(e))?
    }

    /// Post and wait for a batch.
    pub async fn execute(&self, batch: Vec<WorkRequest>) -> Result<Vec<Completion>> {
        self.run(move |t| t.execute(batch)).await
    }

    /// Read `len` bytes.
    pub async fn read(&self, addr: RemoteAddr, len: usize) -> Result<Vec<u8>> {
        self.run(move |t| {
            let mut v = vec![0; len];
            t.read(addr, &mut v)?;
            Ok(v)
        })
        .await
    }

    /// Write bytes.
    pub async fn write(&self, addr: RemoteAddr, data: Bytes) -> Result<()> {
        self.run(move |t| t.write(addr, &data)).await
    }

    /// Compare-and-swap.
    pub async fn compare_swap(&self, addr: RemoteAddr, expect: u64, new: u64) -> Result<u64> {
        self.run(move |t| t.compare_swap(addr, expect, new)).await
    }

    /// Fetch-and-add.
    pub async fn fetch_add(&self, addr: RemoteAddr, add: u64) -> Result<u64> {
        self.run(move |t| t.fetch_add(addr, add)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_to_bytes_is_the_reference_semantics() {
        let mut m = vec![0u8; 64];
        let w = OpKind::Write { data: Bytes::from_static(b"abcdefgh") };
        assert_eq!(apply_to_bytes(&mut m, 8, &w).unwrap(), OpOutput::Write);
        assert_eq!(apply_to_bytes(&mut m, 8, &OpKind::Read { len: 8 }).unwrap(), OpOutput::Read("abcdefgh".into()));
        assert_eq!(apply_to_bytes(&mut m, 16, &OpKind::FetchAdd { add: 5 }).unwrap(), OpOutput::Atomic(0));
        let cas = |expect, new| OpKind::CompareSwap { expect, new };
        assert_eq!(apply_to_bytes(&mut m, 16, &cas(4, 9)).unwrap(), OpOutput::Atomic(5), "no swap");
        assert_eq!(apply_to_bytes(&mut m, 16, &cas(5, 9)).unwrap(), OpOutput::Atomic(5), "swap");
        assert_eq!(m[16..24], 9u64.to_le_bytes());
        for (off, op) in [(60, OpKind::Read { len: 8 }), (u64::MAX, OpKind::FetchAdd { add: 1 }), (64, w)] {
            assert_eq!(apply_to_bytes(&mut m, off, &op).unwrap_err().kind(), ErrorKind::OutOfRange);
        }
    }
}
