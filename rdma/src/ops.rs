//! Posting work requests and turning completions into per-operation results (see `endpoint.rs` for the
//! state rules these functions keep).

use std::sync::Arc;

use bytes::Bytes;
use farpool_core::{Error, ErrorKind, OpKind, Result};
use sideway::ibverbs::completion::PollCompletionQueueError;
use sideway::ibverbs::queue_pair::{PostSendGuard, QueuePair, SetInlineData, SetScatterGatherEntry, WorkRequestFlags};

use crate::endpoint::{
    Endpoint, EndpointState, Kind, Local, Op, Output, RETIRED_STAGING_MAX, Record, Remote, WATCH_EVERY,
};
use crate::error::{WcContext, map_wc_status, wc_status};
use crate::lend::Staging;
use crate::mr::Registration;
use crate::staging::Span;

/// Outcome of admitting one operation.
pub(crate) enum Admit {
    /// A record was queued for the NIC.
    Queued,
    /// Completed at once (refused by a local check, or zero-length).
    Immediate,
    /// No room now (send queue or staging full): stop this batch here.
    NoRoom,
}

/// Direction of a zero-copy operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// RDMA READ from the peer into local memory.
    Read,
    /// RDMA WRITE of local memory to the peer.
    Write,
}

/// A zero-copy operation for [`Endpoint::post_direct`]: the local side is a range of a registration.
#[derive(Clone, Debug)]
pub struct DirectOp {
    /// Caller's id.
    pub wr_id: u64,
    /// READ into, or WRITE from, `local`.
    pub dir: Direction,
    /// Local registration.
    pub local: Arc<Registration>,
    /// Offset in it.
    pub offset: usize,
    /// Bytes.
    pub len: u32,
    /// Target.
    pub remote: Remote,
}

/// `VecDeque::pop_front_if` (std has it only from Rust 1.93; the workspace supports 1.88).
fn pop_front_if(q: &mut std::collections::VecDeque<Record>, pred: impl Fn(&Record) -> bool) -> Option<Record> {
    if q.front().is_some_and(pred) { q.pop_front() } else { None }
}

pub(crate) fn kind_of(op: &OpKind) -> Kind {
    match op {
        OpKind::Read { .. } => Kind::Read,
        OpKind::Write { .. } => Kind::Write,
        OpKind::CompareSwap { expect, new } => Kind::Cas { expect: *expect, new: *new },
        OpKind::FetchAdd { add } => Kind::Faa { add: *add },
    }
}

impl Endpoint {
    /// Post as many of `ops` (from the front) as the send queue and the staging buffer take, removing
    /// them from `ops`; returns how many. Operations refused by a local check (misaligned atomic, larger
    /// than the staging buffer, no atomics on this device) are taken too and complete at once with the
    /// error. `Err` only when the endpoint is not usable (not connected, or broken: reconnect).
    pub fn post_ops(&mut self, ops: &mut Vec<Op>) -> Result<usize> {
        self.ensure_ready()?;
        let first = self.records.len();
        let mut taken = 0;
        for (i, op) in ops.iter().enumerate() {
            let data = match &op.kind {
                OpKind::Write { data } => Some(&data[..]),
                _ => None,
            };
            let len = op.kind.len();
            match self.admit(op.wr_id, kind_of(&op.kind), op.remote, len, data, i, false) {
                Admit::Queued | Admit::Immediate => taken = i + 1,
                Admit::NoRoom => break,
            }
        }
        self.submit(first, |i| match &ops[i].kind {
            OpKind::Write { data } => &data[..],
            _ => &[],
        });
        ops.drain(..taken);
        Ok(taken)
    }

    /// Post zero-copy operations (from the front of `ops`, removing the ones taken; returns how many):
    /// READs land directly in, and WRITEs send directly from, the caller's registered memory.
    ///
    /// # Safety
    ///
    /// Until the completion of an operation has been returned by [`Endpoint::poll_completions`] (or the
    /// endpoint was reconnected or dropped), the caller must not read the local range of a READ nor
    /// write the local range of a WRITE, through any pointer or reference: the NIC accesses it
    /// concurrently. The registration itself is kept alive by the endpoint meanwhile.
    pub unsafe fn post_direct(&mut self, ops: &mut Vec<DirectOp>) -> Result<usize> {
        self.ensure_ready()?;
        let first = self.records.len();
        let mut taken = 0;
        for (i, op) in ops.iter().enumerate() {
            let kind = if op.dir == Direction::Read { Kind::Read } else { Kind::Write };
            match self.admit_direct(op, kind, i, false) {
                Admit::Queued | Admit::Immediate => taken = i + 1,
                Admit::NoRoom => break,
            }
        }
        self.submit(first, |_| &[]);
        ops.drain(..taken);
        Ok(taken)
    }

    pub(crate) fn admit_direct(&mut self, op: &DirectOp, kind: Kind, src: usize, sync: bool) -> Admit {
        if self.records.len() >= self.cfg.inflight_max {
            return Admit::NoRoom;
        }
        let refuse = if !Arc::ptr_eq(op.local.context(), &self.ctx) {
            Some(Error::new(ErrorKind::Config, "registration belongs to another device context"))
        } else {
            op.local.check_range(op.offset, op.len as usize).err()
        };
        let local = Local::Direct { reg: op.local.clone(), offset: op.offset };
        self.push_record(op.wr_id, kind, op.remote, op.len, local, src, sync, refuse)
    }

    /// Validate one operation, reserve what it needs, and queue its record.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn admit(
        &mut self,
        wr_id: u64,
        kind: Kind,
        remote: Remote,
        len: u64,
        data: Option<&[u8]>,
        src: usize,
        sync: bool,
    ) -> Admit {
        if self.records.len() >= self.cfg.inflight_max {
            return Admit::NoRoom;
        }
        let refuse = self.refusal(kind, remote, len);
        let inline = kind == Kind::Write && len <= u64::from(self.max_inline());
        let local = if refuse.is_some() || len == 0 {
            Local::Empty
        } else if inline {
            Local::Inline
        } else {
            match self.alloc_staged(len as usize) {
                Err(e) => return self.push_record(wr_id, kind, remote, len as u32, Local::Empty, src, sync, Some(e)),
                Ok(Some(span)) => {
                    if let Some(d) = data.filter(|_| kind == Kind::Write) {
                        // SAFETY: the span was just allocated inside the staging buffer, is `len` bytes
                        // (>= d.len()) long and is not posted yet, so neither the NIC nor any reference
                        // touches it.
                        unsafe {
                            std::ptr::copy_nonoverlapping(d.as_ptr(), self.staging_ptr().add(span.offset), d.len());
                        }
                    }
                    Local::Staged(span)
                }
                Ok(None) => return Admit::NoRoom,
            }
        };
        self.push_record(wr_id, kind, remote, len as u32, local, src, sync, refuse)
    }

    /// Why a staged operation is refused before posting, if it is: a misaligned atomic, atomics on a
    /// device without them, more than the staging buffer holds.
    pub(crate) fn refusal(&self, kind: Kind, remote: Remote, len: u64) -> Option<Error> {
        let atomic = matches!(kind, Kind::Cas { .. } | Kind::Faa { .. });
        if atomic && !remote.addr.is_multiple_of(8) {
            Some(Error::new(ErrorKind::Unaligned, format!("atomic at {:#x} is not 8-byte aligned", remote.addr)))
        } else if atomic && !self.ctx.limits().atomics {
            Some(Error::new(ErrorKind::Unsupported, format!("{} does not execute remote atomics", self.ctx.name())))
        } else if len > self.staging.capacity() as u64 {
            Some(Error::new(
                ErrorKind::NoSpace,
                format!("operation of {len} bytes exceeds the staging buffer of {} bytes", self.staging.capacity()),
            ))
        } else {
            None
        }
    }

    /// A staging span for `len` bytes (`len <= capacity`); `Ok(None)`: wait for completions. When the
    /// ring has no room although nothing is in flight, lent spans block it: retire the buffer (it lives
    /// on until they are dropped) and register a fresh one (see the endpoint's module docs).
    fn alloc_staged(&mut self, len: usize) -> Result<Option<Span>> {
        if let Some(span) = self.staging.alloc(len) {
            return Ok(Some(span));
        }
        if !self.records.is_empty() {
            return Ok(None);
        }
        self.retired.retain(|s| Arc::strong_count(s) > 1);
        if self.retired.len() >= RETIRED_STAGING_MAX {
            // Unreachable by the lending rule (no lending while this many are retired); refuse the
            // operation rather than wait for the caller to drop data.
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "staging buffer held by lent READ data ({} bytes) and {RETIRED_STAGING_MAX} retired buffers",
                    self.staging.used()
                ),
            ));
        }
        let fresh = Staging::new(&self.ctx, self.cfg.staging_bytes)?;
        let old = std::mem::replace(&mut self.staging, fresh);
        tracing::debug!(
            held = old.used(),
            retired = self.retired.len() + 1,
            "staging blocked by lent READ data: replaced"
        );
        self.retired.push(old);
        Ok(self.staging.alloc(len))
    }

    /// Whether a completed READ may keep its span (lend) rather than be copied out: not while
    /// `RETIRED_STAGING_MAX` retired buffers are still lent from.
    fn may_lend(&mut self) -> bool {
        if self.retired.len() >= RETIRED_STAGING_MAX {
            self.retired.retain(|s| Arc::strong_count(s) > 1);
        }
        self.retired.len() < RETIRED_STAGING_MAX
    }

    #[allow(clippy::too_many_arguments)]
    fn push_record(
        &mut self,
        wr_id: u64,
        kind: Kind,
        remote: Remote,
        len: u32,
        local: Local,
        src: usize,
        sync: bool,
        refuse: Option<Error>,
    ) -> Admit {
        let mut rec = Record { seq: 0, wr_id, kind, remote, len, local, src, overdue: false, sync, failed: None };
        if let Some(e) = refuse {
            self.deliver(rec, Err(e));
            return Admit::Immediate;
        }
        if matches!(rec.local, Local::Empty) && kind == Kind::Read {
            self.deliver(rec, Ok(Output::Read(Bytes::new())));
            return Admit::Immediate;
        }
        if matches!(rec.local, Local::Empty) && kind == Kind::Write {
            self.deliver(rec, Ok(Output::Write));
            return Admit::Immediate;
        }
        rec.seq = self.next_seq;
        self.next_seq += 1;
        self.records.push_back(rec);
        Admit::Queued
    }

    pub(crate) fn staging_ptr(&self) -> *mut u8 {
        self.staging.ptr()
    }

    /// Build and post the work requests of `records[first..]` as one batch (one doorbell).
    pub(crate) fn submit<'a>(&mut self, first: usize, inline_src: impl Fn(usize) -> &'a [u8]) {
        let n = self.records.len().saturating_sub(first);
        if n == 0 {
            return;
        }
        let Some(qp) = self.qp.as_mut() else {
            self.fail_unposted(first, Error::new(ErrorKind::Closed, "endpoint has no queue pair"));
            return;
        };
        let (slkey, saddr) = (self.staging.lkey(), self.staging.addr());
        let mut guard = qp.qp.start_post_send();
        for (k, rec) in self.records.range(first..).enumerate() {
            self.since_signal += 1;
            let signaled = k + 1 == n || self.since_signal >= self.cfg.signal_every;
            if signaled {
                self.since_signal = 0;
            }
            let mut flags = if signaled { WorkRequestFlags::Signaled } else { WorkRequestFlags::none() };
            if matches!(rec.local, Local::Inline) {
                // The extended API implies inline for ibv_wr_set_inline_data, but rxe's kernel side
                // reads the payload from the WQE only when IBV_SEND_INLINE is in the send flags.
                flags |= WorkRequestFlags::Inline;
            }
            let wr = guard.construct_wr(rec.seq, flags);
            let (rkey, raddr) = (rec.remote.rkey, rec.remote.addr);
            let h = match rec.kind {
                Kind::Read => wr.setup_read(rkey, raddr),
                Kind::Write => wr.setup_write(rkey, raddr),
                Kind::Cas { expect, new } => wr.setup_atomic_compare_swap(rkey, raddr, expect, new),
                Kind::Faa { add } => wr.setup_atomic_fetch_add(rkey, raddr, add),
            };
            match &rec.local {
                Local::Inline => h.setup_inline_data(inline_src(rec.src)),
                // SAFETY: the span lies inside the registered staging buffer, which outlives the queue
                // pair (field order), and is reserved for this record until it completes.
                Local::Staged(s) => unsafe { h.setup_sge(slkey, saddr + s.offset as u64, rec.len) },
                // SAFETY: the range was checked against the registration, which the record keeps alive
                // until completion; the caller of the unsafe zero-copy call keeps the CPU away from it.
                Local::Direct { reg, offset } => unsafe {
                    h.setup_sge(reg.lkey(), reg.addr() + *offset as u64, rec.len)
                },
                Local::Scratch => {
                    unreachable!("scratch operations are posted by the depth-1 path, never queued unposted")
                }
                Local::Empty => unreachable!("empty operations complete at admission"),
            }
        }
        if let Err(e) = guard.post() {
            let err = Error::new(ErrorKind::Io, "ibv_post_send failed").with_source(e);
            tracing::warn!(error = %err, "posting failed; queue pair moved to the error state");
            self.fail_unposted(first, err);
        }
    }

    pub(crate) fn fail_unposted(&mut self, first: usize, err: Error) {
        for rec in self.records.range_mut(first..) {
            rec.failed = Some(err.duplicate());
        }
        self.mark_broken(err.to_string());
    }

    pub(crate) fn mark_broken(&mut self, cause: String) {
        if !matches!(self.state, EndpointState::Broken(_)) {
            tracing::debug!(%cause, "RDMA endpoint broken");
            self.state = EndpointState::Broken(cause);
        }
        if let Some(qp) = self.qp.as_mut() {
            // Flush whatever is still queued behind the failure; ERR is reachable from every state.
            if let Err(e) = qp.enter_error() {
                tracing::debug!(error = %e, "QP -> ERR failed");
            }
        }
    }

    /// Poll the completion queue once, finish records, and enforce `op_timeout`.
    pub(crate) fn reap(&mut self) -> Result<usize> {
        self.cqes.clear();
        match self.cq.start_poll() {
            Ok(poller) => {
                for wc in poller {
                    let status = wc.status();
                    let vendor = if status == wc_status::SUCCESS { 0 } else { wc.vendor_err() };
                    self.cqes.push((wc.wr_id(), status, vendor));
                    if self.cqes.len() == self.cqes.capacity() {
                        break;
                    }
                }
            }
            Err(PollCompletionQueueError::CompletionQueueEmpty) => {}
            Err(e) => return Err(Error::new(ErrorKind::Io, "ibv_poll_cq failed").with_source(e)),
        }
        let n = self.cqes.len();
        for i in 0..n {
            let (seq, status, vendor) = self.cqes[i];
            self.on_cqe(seq, status, vendor);
        }
        self.finish_unposted_front();
        if n > 0 {
            self.empty_polls = 0;
        } else {
            self.empty_polls = self.empty_polls.wrapping_add(1);
            if self.empty_polls.is_multiple_of(WATCH_EVERY) {
                self.check_overdue();
            }
        }
        Ok(n)
    }

    /// A completion for `seq`: every earlier record succeeded (in-order RC send queue), `seq` itself
    /// has `status`.
    pub(crate) fn on_cqe(&mut self, seq: u64, status: u32, vendor: u32) {
        if self.records.front().is_none_or(|r| seq < r.seq) {
            tracing::trace!(seq, status, "completion of an already finished or destroyed operation");
            return;
        }
        while let Some(mut rec) = pop_front_if(&mut self.records, |r| r.seq <= seq) {
            let result = match rec.failed.take() {
                Some(e) => Err(e),
                None if rec.seq < seq || status == wc_status::SUCCESS => Ok(self.output(&mut rec)),
                None => {
                    let ctx = WcContext {
                        op: rec.kind.class(),
                        remote_addr: rec.remote.addr,
                        rkey: rec.remote.rkey,
                        len: rec.len,
                        overdue: rec.overdue,
                    };
                    Err(map_wc_status(status, vendor, &ctx))
                }
            };
            if let Local::Staged(span) = rec.local {
                self.staging.free(span);
            }
            self.deliver(rec, result);
        }
        if status != wc_status::SUCCESS {
            self.mark_broken(format!("{} on work request {seq}", wc_status::name(status)));
        }
    }

    /// What a successfully completed record produced. A lent READ span moves into the output (the
    /// record's local becomes `Empty`, so the caller does not free it).
    pub(crate) fn output(&mut self, rec: &mut Record) -> Output {
        match (&rec.local, rec.kind) {
            (Local::Direct { .. }, Kind::Read) => Output::Placed,
            (_, Kind::Write) => Output::Write,
            (&Local::Staged(s), Kind::Read) if rec.len as usize >= self.cfg.lend_min_bytes && self.may_lend() => {
                rec.local = Local::Empty;
                Output::Read(self.staging.lend(s, rec.len as usize))
            }
            (Local::Staged(s), Kind::Read) => {
                // SAFETY: the record completed, so the NIC is done with its span, which lies inside the
                // staging buffer and is still reserved (freed after this copy).
                let bytes = unsafe { std::slice::from_raw_parts(self.staging_ptr().add(s.offset), rec.len as usize) };
                Output::Read(Bytes::copy_from_slice(bytes))
            }
            (Local::Scratch, Kind::Read) => {
                Output::Read(Bytes::copy_from_slice(&self.scratch.as_slice()[..rec.len as usize]))
            }
            (Local::Scratch, Kind::Cas { .. } | Kind::Faa { .. }) => {
                let b = self.scratch.as_slice();
                Output::Atomic(u64::from_ne_bytes(b[..8].try_into().expect("scratch holds 8 bytes")))
            }
            (Local::Staged(s), Kind::Cas { .. } | Kind::Faa { .. }) => {
                // SAFETY: as above; spans are 64-byte aligned, so the u64 read is aligned. The NIC writes
                // the old value in host byte order.
                Output::Atomic(unsafe { std::ptr::read(self.staging_ptr().add(s.offset).cast::<u64>()) })
            }
            (local, kind) => unreachable!("record {kind:?} with local {local:?} cannot complete successfully"),
        }
    }

    /// Records that never reached the NIC complete once everything before them has.
    fn finish_unposted_front(&mut self) {
        while let Some(mut rec) = pop_front_if(&mut self.records, |r| r.failed.is_some()) {
            if let Local::Staged(span) = rec.local {
                self.staging.free(span);
            }
            let err = rec.failed.take().unwrap_or_else(|| Error::new(ErrorKind::Internal, "unposted record"));
            self.deliver(rec, Err(err));
        }
    }
}
