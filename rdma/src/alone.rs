//! The depth-1 path of the blocking helpers (`read_into`, `write_from`, `read`, small `write`,
//! `compare_swap`, `fetch_add`) when nothing else is in flight: one work request posted with one
//! `ibv_post_send` from the stack, then one-entry `ibv_poll_cq` until its completion, with no record
//! queue, no completion list and no reference counting on the way. This is exactly the loop of
//! perftest's `ib_read_lat`, and it is where a buffer manager's page faults go.
//!
//! Why a separate path: on Soft-RoCE under emulation every microsecond of user work between a
//! completion and the next post costs several more (the device's kernel worker goes idle; perftest's
//! own `--latency_gap=2` adds ~9 us to its 23 us minimum). Segment timings in the guest measured the
//! general path at ~0.5 us before the post and ~0.7 us after the completion, against ~0.03 us for a
//! raw loop, and its `ibv_start_poll`/`ibv_end_poll` pair at ~2.5x the cost of one `ibv_poll_cq`.
//! On real NICs the two paths cost about the same; `ibv_post_send` and `ibv_poll_cq` are valid on
//! queue pairs and completion queues created with either verbs API.
//!
//! Ordering rule: between a completion and the next doorbell only what the post needs runs (the
//! checks, the work request); the sequence bookkeeping and the allocation of a copied READ's output
//! come after `ibv_post_send`, while the device works. On rxe the doorbell (a `write()` on the uverbs
//! fd) that arrives while the send task is still finishing the previous completion is taken up in the
//! same run of the task; one that arrives after the task went idle queues new work and wakes a kworker,
//! ~7 us more per READ in the guest. See BENCHMARKS.md (rdma, session 6).
//!
//! Zero-copy READs and WRITEs (a buffer manager's frames) take [`Endpoint::direct_alone`], which is
//! small and `#[inline(always)]`, as are the layers above it down from the client library's
//! `Endpoint::read_into`; everything unusual goes to one cold [`Endpoint::hand_over`]. Under TCG each
//! call and return between a completion and the next post costs tens of nanoseconds (a return is an
//! indirect jump, looked up by the emulator). In the same boot, perftest's own loop written in Rust on
//! our queue pair ran at 0.90x `ib_read_lat`'s median while the layered paths ran at 1.27x (endpoint)
//! and 1.60x (client); BENCHMARKS.md, rdma, session 9.
//!
//! A caller's check that may run late (`Endpoint::read_to_checked`: the client's lease-expiry check,
//! which reads a clock) runs right after the doorbell, while the device works, by the same rule; its
//! error is returned once the device is done with the caller's memory.
//!
//! Anything unusual leaves this path for the general one, which then owns the operation: a check that
//! refuses the operation (it is re-run there, to produce the precise error), a staging ring without
//! room (the 16 KiB scratch buffer serves small staged operations without the ring's lock), a failed
//! post, an error completion, or no completion within `spin_polls` polls. "Leaving" means queueing the
//! very record the general path would have made, with the sequence number already posted, so
//! timeouts, flushes, teardown and error mapping stay in one place.

use std::sync::Arc;

use farpool_core::{Error, ErrorKind, Result};
use rdma_mummy_sys as sys;
use sideway::ibverbs::completion::CompletionQueue;
use sideway::ibverbs::queue_pair::QueuePair;

use bytes::Bytes;

use crate::endpoint::{Endpoint, EndpointState, Kind, Local, Output, Record, Remote, SCRATCH_BYTES};
use crate::error::wc_status;
use crate::mr::Registration;
use crate::staging::Span;

/// Where a depth-1 operation's local bytes are.
#[derive(Clone, Copy)]
enum Staged {
    /// Caller's bytes, inline in the work request.
    No,
    /// The endpoint's scratch buffer.
    Scratch,
    /// A span of the staging ring (READs to be lent, or too big for the scratch buffer).
    Span(Span),
}

/// The local side of a staged or inline depth-1 operation (zero-copy ones take
/// [`Endpoint::direct_alone`]).
#[derive(Clone, Copy)]
pub(crate) enum Alone<'a> {
    /// A WRITE of the caller's bytes: inline when they fit `max_inline`, else copied into the scratch
    /// buffer (or a staging span) first.
    Write(&'a [u8]),
    /// A READ or an atomic through the endpoint's scratch buffer (or a staging span: READs of at
    /// least `lend_min_bytes` without `into`, which are lent, and anything over [`SCRATCH_BYTES`]).
    Staged,
}

impl Endpoint {
    /// Run one blocking operation on the depth-1 path. `None`: not eligible (something else is in
    /// flight, the endpoint is not ready, or a check would refuse it): use the general path, which has
    /// done nothing yet. `Some`: the operation ran (possibly finished by the general path).
    ///
    /// With `into` (exactly `len` bytes), a staged READ that completes here copies its bytes there and
    /// returns `Output::Placed` instead of allocating; if the general path finishes it, the output is
    /// `Output::Read` as usual.
    pub(crate) fn run_alone(
        &mut self,
        kind: Kind,
        remote: Remote,
        len: u32,
        local: Alone<'_>,
        into: Option<&mut [u8]>,
    ) -> Option<Result<Output>> {
        if !self.records.is_empty() || !matches!(self.state, EndpointState::Ready) || len == 0 {
            return None;
        }
        if self.refusal(kind, remote, u64::from(len)).is_some() {
            return None;
        }
        if into
            .as_ref()
            .is_some_and(|b| b.len() != len as usize || kind != Kind::Read || !matches!(local, Alone::Staged))
        {
            return None;
        }
        let (qp, cq) = {
            let qp = self.qp.as_ref()?;
            // SAFETY: the handles are only borrowed here; sideway keeps owning (and later destroys) the
            // objects, which outlive this call (the endpoint is borrowed mutably throughout).
            unsafe { (QueuePair::qp(&qp.qp).as_ptr(), CompletionQueue::cq(&self.cq).as_ptr()) }
        };
        let (addr, lkey, staged, inline) = match local {
            Alone::Write(data) if kind == Kind::Write && data.len() == len as usize && len <= self.max_inline() => {
                (data.as_ptr() as u64, 0, Staged::No, true)
            }
            Alone::Write(_) | Alone::Staged => {
                let data = match local {
                    Alone::Write(d) => Some(d),
                    _ => None,
                };
                if (kind == Kind::Write) != data.is_some() || data.is_some_and(|d| d.len() != len as usize) {
                    return None;
                }
                // The scratch buffer unless a READ result is to be lent (staging span as `Bytes`).
                let lend = kind == Kind::Read && into.is_none() && len as usize >= self.cfg.lend_min_bytes;
                let (ptr, addr, lkey, staged) = if len as usize <= SCRATCH_BYTES && !lend {
                    let reg = self.scratch.registration();
                    (reg.ptr().as_ptr(), reg.addr(), reg.lkey(), Staged::Scratch)
                } else if len as usize <= self.staging.capacity() {
                    let span = self.staging.alloc(len as usize)?;
                    // SAFETY: the span lies inside the staging buffer.
                    let ptr = unsafe { self.staging_ptr().add(span.offset) };
                    (ptr, self.staging.addr() + span.offset as u64, self.staging.lkey(), Staged::Span(span))
                } else {
                    return None;
                };
                if let Some(d) = data {
                    // SAFETY: `ptr` has room for `len == d.len()` bytes (scratch or a fresh span) that
                    // nothing else touches: the scratch buffer is only used by a depth-1 operation, and
                    // nothing is in flight; the span is not posted yet.
                    unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), ptr, d.len()) };
                }
                (addr, lkey, staged, false)
            }
        };
        let seq = self.next_seq;
        let to_record = |local: Local| Record {
            seq,
            wr_id: 0,
            kind,
            remote,
            len,
            local,
            src: 0,
            overdue: false,
            sync: true,
            failed: None,
        };
        let local_of = || match (local, staged) {
            (_, Staged::Span(span)) => Local::Staged(span),
            (_, Staged::Scratch) => Local::Scratch,
            _ => Local::Inline,
        };

        let mut sge = sys::ibv_sge { addr, length: len, lkey };
        // SAFETY: `ibv_send_wr` is a C struct of integers, raw pointers and unions of those: all-zero is a
        // valid value, and every field the provider reads for this opcode is set below.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = seq;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        if inline {
            // rxe reads the payload from the WQE only with IBV_SEND_INLINE; the provider copies the
            // caller's bytes during the call.
            wr.send_flags |= sys::ibv_send_flags::IBV_SEND_INLINE.0;
        }
        match kind {
            Kind::Read | Kind::Write => {
                wr.opcode = if kind == Kind::Read {
                    sys::ibv_wr_opcode::IBV_WR_RDMA_READ
                } else {
                    sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE
                };
                wr.wr.rdma = sys::rdma_t { remote_addr: remote.addr, rkey: remote.rkey };
            }
            Kind::Cas { expect, new } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
                wr.wr.atomic =
                    sys::atomic_t { remote_addr: remote.addr, compare_add: expect, swap: new, rkey: remote.rkey };
            }
            Kind::Faa { add } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
                wr.wr.atomic = sys::atomic_t { remote_addr: remote.addr, compare_add: add, swap: 0, rkey: remote.rkey };
            }
        }
        // (The local memory stays valid until the completion: inline bytes are copied by the provider
        // during the call; the scratch buffer is only used here, with nothing else in flight; a staging
        // span stays reserved until it is freed after the completion, here or by the general path.)
        let ret = self.post_one(qp, &mut wr);
        // A copied READ's output buffer is allocated while the device works, not after the completion.
        let mut out_buf = (kind == Kind::Read && into.is_none() && matches!(staged, Staged::Scratch))
            .then(|| Vec::with_capacity(len as usize));
        if ret != 0 {
            return Some(self.hand_over(to_record(local_of()), Waited::NotPosted(ret), None));
        }
        match self.wait_one(cq, seq) {
            Waited::Done => {}
            why => return Some(self.hand_over(to_record(local_of()), why, None)),
        }
        if kind == Kind::Read
            && into.is_none()
            && let Staged::Span(span) = staged
        {
            // A READ to be lent (or copied, by the general path's rule).
            let mut rec = to_record(Local::Staged(span));
            let out = self.output(&mut rec);
            if let Local::Staged(span) = rec.local {
                self.staging.free(span);
            }
            return Some(Ok(out));
        }
        let at = match staged {
            Staged::No => {
                // (only inline WRITEs)
                return Some(Ok(Output::Write));
            }
            Staged::Scratch => self.scratch.registration().ptr().as_ptr(),
            // SAFETY: the span lies inside the staging buffer.
            Staged::Span(span) => unsafe { self.staging_ptr().add(span.offset) },
        };
        // SAFETY: the operation completed, so the NIC is done with these `len` bytes (the scratch buffer,
        // or a span still reserved until freed below), which hold the result.
        let got = || unsafe { std::slice::from_raw_parts(at, len as usize) };
        let out = match (kind, into) {
            (Kind::Write, _) => Output::Write,
            (Kind::Read, Some(buf)) => {
                buf.copy_from_slice(got());
                Output::Placed
            }
            (Kind::Read, None) => {
                // (Only the scratch buffer gets here: staging spans returned above.)
                let mut v = out_buf.take().unwrap_or_default();
                v.extend_from_slice(got());
                Output::Read(Bytes::from(v))
            }
            // The NIC writes the old value in host byte order.
            _ => Output::Atomic(u64::from_ne_bytes(got()[..8].try_into().expect("atomics are 8 bytes"))),
        };
        if let Staged::Span(span) = staged {
            self.staging.free(span);
        }
        Some(Ok(out))
    }
}

/// How the wait for a depth-1 operation ended, when it did not simply complete.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Waited {
    /// Completed successfully.
    Done,
    /// `ibv_post_send` failed with this errno: nothing was posted.
    NotPosted(i32),
    /// `ibv_poll_cq` failed with this (negative) value.
    PollFailed(i32),
    /// No completion within `spin_polls` polls.
    Slow,
    /// An error completion.
    Error { status: u32, vendor: u32 },
}

impl Endpoint {
    /// The doorbell of a depth-1 operation, then the sequence bookkeeping (after it: see the module
    /// docs). The work request's `wr_id` is `self.next_seq`. Returns `ibv_post_send`'s value.
    #[inline(always)]
    fn post_one(&mut self, qp: *mut sys::ibv_qp, wr: &mut sys::ibv_send_wr) -> i32 {
        crate::clock::probe::post();
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the caller passes a live queue pair (borrowed from `self`) and a work request whose
        // SGE and local memory stay valid until the completion (see the callers).
        let ret = unsafe { sys::ibv_post_send(qp, wr, &mut bad) };
        self.next_seq += 1;
        self.since_signal = 0;
        self.sync_done = None;
        ret
    }

    /// Spin on a one-entry `ibv_poll_cq` until the completion of `seq` (perftest's loop).
    #[inline(always)]
    fn wait_one(&self, cq: *mut sys::ibv_cq, seq: u64) -> Waited {
        // SAFETY: all-zero is a valid `ibv_wc` (integers only); the provider fills it.
        let mut wc: sys::ibv_wc = unsafe { std::mem::zeroed() };
        let mut polls = 0u32;
        loop {
            // SAFETY: `cq` is live (borrowed from `self` by the caller); `wc` has room for one entry.
            let n = unsafe { sys::ibv_poll_cq(cq, 1, &mut wc) };
            if n > 0 && wc.wr_id == seq {
                crate::clock::probe::completion();
                break;
            }
            if n < 0 {
                return Waited::PollFailed(n);
            }
            if n == 0 {
                // (n > 0 with another wr_id: a late completion of an operation already finished or
                // destroyed, as `reap` would ignore it; nothing else can be in flight.)
                polls += 1;
                if polls >= self.cfg.spin_polls {
                    return Waited::Slow;
                }
            }
        }
        if wc.status == wc_status::SUCCESS {
            Waited::Done
        } else {
            Waited::Error { status: wc.status, vendor: wc.vendor_err }
        }
    }

    /// The general path takes over a depth-1 operation that did not simply complete: `rec` is the
    /// record it would have made (sequence number already posted, unless `why` is `NotPosted`).
    /// `deferred`: the error of the caller's late check, reported after the operation's own.
    #[cold]
    #[inline(never)]
    fn hand_over(&mut self, rec: Record, why: Waited, deferred: Option<Error>) -> Result<Output> {
        let seq = rec.seq;
        self.records.push_back(rec);
        let r = match why {
            Waited::NotPosted(ret) => {
                let err = Error::new(ErrorKind::Io, "ibv_post_send failed")
                    .with_source(std::io::Error::from_raw_os_error(ret));
                tracing::warn!(error = %err, "posting failed; queue pair moved to the error state");
                self.fail_unposted(self.records.len() - 1, err);
                self.wait_sync()
            }
            Waited::PollFailed(n) => {
                let err = std::io::Error::from_raw_os_error(-n);
                return Err(Error::new(ErrorKind::Io, "ibv_poll_cq failed").with_source(err));
            }
            // Slow today: the general path finishes it (yielding, `op_timeout`, flush, teardown).
            Waited::Slow | Waited::Done => self.wait_sync(),
            Waited::Error { status, vendor } => {
                self.on_cqe(seq, status, vendor);
                self.wait_sync()
            }
        };
        match deferred {
            Some(e) => r.and(Err(e)),
            None => r,
        }
    }

    /// The depth-1 path of a zero-copy READ into / WRITE from `reg[offset..offset + len]` (the
    /// buffer manager's page fault and write-back), kept small so that it inlines into its callers: on
    /// Soft-RoCE under emulation every call and return between one completion and the next post costs
    /// (BENCHMARKS.md, rdma, session 9). `None`: not eligible, nothing done (the check did not run);
    /// use the general path. `check` runs right after the doorbell, while the device works; its error
    /// is returned once the device is done with the memory, after the operation's own.
    #[inline(always)]
    pub(crate) fn direct_alone(
        &mut self,
        kind: Kind,
        reg: &Arc<Registration>,
        offset: usize,
        len: u32,
        remote: Remote,
        check: Option<&mut impl FnMut() -> Result<()>>,
    ) -> Option<Result<()>> {
        let read = kind == Kind::Read;
        if !self.records.is_empty()
            || !matches!(self.state, EndpointState::Ready)
            || len == 0
            || !(read || kind == Kind::Write)
            || !Arc::ptr_eq(reg.context(), &self.ctx)
            || !reg.contains(offset, len as usize)
        {
            return None;
        }
        let (qp, cq) = {
            let qp = self.qp.as_ref()?;
            // SAFETY: as in `run_alone`: borrowed handles of objects that outlive this call.
            unsafe { (QueuePair::qp(&qp.qp).as_ptr(), CompletionQueue::cq(&self.cq).as_ptr()) }
        };
        let seq = self.next_seq;
        let mut sge = sys::ibv_sge { addr: reg.addr() + offset as u64, length: len, lkey: reg.lkey() };
        // SAFETY: all-zero is a valid `ibv_send_wr` (see `run_alone`); the fields of a READ or WRITE are
        // set below.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = seq;
        wr.sg_list = &mut sge;
        wr.num_sge = 1;
        wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.opcode = if read { sys::ibv_wr_opcode::IBV_WR_RDMA_READ } else { sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE };
        wr.wr.rdma = sys::rdma_t { remote_addr: remote.addr, rkey: remote.rkey };
        let record = |reg: &Arc<Registration>| Record {
            seq,
            wr_id: 0,
            kind,
            remote,
            len,
            local: Local::Direct { reg: reg.clone(), offset },
            src: 0,
            overdue: false,
            sync: true,
            failed: None,
        };
        // (The local range is registered and stays borrowed by the blocking caller until the
        // completion, or until the general path has finished the operation.)
        let ret = self.post_one(qp, &mut wr);
        if ret != 0 {
            return Some(self.hand_over(record(reg), Waited::NotPosted(ret), None).map(drop));
        }
        let deferred = check.and_then(|c| c().err());
        match self.wait_one(cq, seq) {
            Waited::Done => Some(match deferred {
                Some(e) => Err(e),
                None => Ok(()),
            }),
            why => Some(self.hand_over(record(reg), why, deferred).map(drop)),
        }
    }
}

#[cfg(feature = "probe")]
impl Endpoint {
    /// Diagnostic floor (feature `probe`): perftest's `ib_read_lat` loop on this endpoint's own queue
    /// pair and completion queue. For each of `n` READs of `len` bytes into `reg` at `offset`: `stamp(i)`,
    /// one `ibv_post_send` of a stack work request, then a one-entry `ibv_poll_cq` spin; `stamp(n)` after
    /// the last. None of the endpoint's bookkeeping runs, so it is only valid on a ready endpoint with
    /// nothing in flight, and it leaves the endpoint's sequence numbers alone (`wr_id` is `u64::MAX`, which
    /// the endpoint ignores as a stray completion). Any error completion or failure ends the loop with
    /// an error; the queue pair may then be in error, so drop the endpoint.
    pub fn probe_raw_reads(
        &mut self,
        reg: &Arc<Registration>,
        offset: usize,
        len: u32,
        remote: Remote,
        n: usize,
        mut stamp: impl FnMut(usize),
    ) -> Result<()> {
        if !self.records.is_empty() || !matches!(self.state, EndpointState::Ready) {
            return Err(Error::new(ErrorKind::Internal, "probe_raw_reads needs a ready, idle endpoint"));
        }
        if !Arc::ptr_eq(reg.context(), &self.ctx) {
            return Err(Error::new(ErrorKind::Config, "the registration belongs to another device context"));
        }
        reg.check_range(offset, len as usize)?;
        let (qp, cq) = {
            let qp = self.qp.as_ref().ok_or_else(|| Error::new(ErrorKind::Internal, "no queue pair"))?;
            // SAFETY: as in `run_alone`: borrowed handles of objects that outlive this call.
            unsafe { (QueuePair::qp(&qp.qp).as_ptr(), CompletionQueue::cq(&self.cq).as_ptr()) }
        };
        let mut sge = sys::ibv_sge { addr: reg.addr() + offset as u64, length: len, lkey: reg.lkey() };
        // SAFETY: all-zero is a valid `ibv_send_wr` (see `run_alone`); the fields for a READ are set below.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = u64::MAX;
        wr.num_sge = 1;
        wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
        wr.wr.rdma = sys::rdma_t { remote_addr: remote.addr, rkey: remote.rkey };
        // SAFETY: all-zero is a valid `ibv_wc`.
        let mut wc: sys::ibv_wc = unsafe { std::mem::zeroed() };
        for i in 0..n {
            stamp(i);
            wr.sg_list = &mut sge;
            let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
            // SAFETY: live handles (above); the work request and SGE live on this frame; the local range
            // is registered (checked above) and `reg` is borrowed for the whole loop.
            let ret = unsafe { sys::ibv_post_send(qp, &mut wr, &mut bad) };
            if ret != 0 {
                return Err(Error::new(ErrorKind::Io, "ibv_post_send failed")
                    .with_source(std::io::Error::from_raw_os_error(ret)));
            }
            loop {
                // SAFETY: live CQ; room for one entry.
                let got = unsafe { sys::ibv_poll_cq(cq, 1, &mut wc) };
                if got < 0 {
                    return Err(Error::new(ErrorKind::Io, "ibv_poll_cq failed"));
                }
                if got > 0 && wc.wr_id == u64::MAX {
                    break;
                }
            }
            if wc.status != wc_status::SUCCESS {
                return Err(Error::new(ErrorKind::Io, format!("READ completed with status {}", wc.status)));
            }
        }
        stamp(n);
        Ok(())
    }
}
