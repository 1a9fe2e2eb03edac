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
    /// Caller's memory (zero-copy, or inline).
    No,
    /// The endpoint's scratch buffer.
    Scratch,
    /// A span of the staging ring (READs to be lent, or too big for the scratch buffer).
    Span(Span),
}

/// The local side of a depth-1 operation.
#[derive(Clone, Copy)]
pub(crate) enum Alone<'a> {
    /// The caller's registered memory (zero-copy READ into / WRITE from it).
    Direct { reg: &'a Arc<Registration>, offset: usize },
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
        check: Option<&mut dyn FnMut() -> Result<()>>,
    ) -> Option<Result<Output>> {
        if !self.records.is_empty() || !matches!(self.state, EndpointState::Ready) || len == 0 {
            return None;
        }
        let atomic = matches!(kind, Kind::Cas { .. } | Kind::Faa { .. });
        if !matches!(local, Alone::Direct { .. }) && self.refusal(kind, remote, u64::from(len)).is_some() {
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
            Alone::Direct { reg, offset } => {
                if atomic || !Arc::ptr_eq(reg.context(), &self.ctx) || reg.check_range(offset, len as usize).is_err() {
                    return None;
                }
                (reg.addr() + offset as u64, reg.lkey(), Staged::No, false)
            }
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
            (Alone::Direct { reg, offset }, Staged::No) => Local::Direct { reg: reg.clone(), offset },
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
        crate::clock::probe::post();
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: `qp` is live (above); the work request and its SGE live on this stack frame for the
        // call; the local range is registered (checked above, or a fresh staging span) and stays valid
        // until the completion: the caller's buffer is borrowed by the blocking call, and a staging span
        // stays reserved until it is freed after the completion (here or by the general path).
        let ret = unsafe { sys::ibv_post_send(qp, &mut wr, &mut bad) };
        // Bookkeeping after the doorbell, not before it (see the module docs: the time from one
        // completion to the next post is what decides Soft-RoCE's latency mode).
        self.next_seq += 1;
        self.since_signal = 0;
        self.sync_done = None;
        // A copied READ's output buffer is allocated while the device works, not after the completion.
        let mut out_buf = (kind == Kind::Read && into.is_none() && matches!(staged, Staged::Scratch))
            .then(|| Vec::with_capacity(len as usize));
        if ret != 0 {
            self.records.push_back(to_record(local_of()));
            let err =
                Error::new(ErrorKind::Io, "ibv_post_send failed").with_source(std::io::Error::from_raw_os_error(ret));
            tracing::warn!(error = %err, "posting failed; queue pair moved to the error state");
            self.fail_unposted(self.records.len() - 1, err);
            return Some(self.wait_sync());
        }
        // The caller's deferred check, while the device works; its error is reported once the device is
        // done with the local memory (the operation's own error first).
        let deferred = check.and_then(|c| c().err());
        let settle = |r: Result<Output>| match deferred {
            Some(e) => r.and(Err(e)),
            None => r,
        };

        // SAFETY: all-zero is a valid `ibv_wc` (integers only); the provider fills it.
        let mut wc: sys::ibv_wc = unsafe { std::mem::zeroed() };
        let mut polls = 0u32;
        loop {
            // SAFETY: `cq` is live (above); `wc` has room for the one entry asked for.
            let n = unsafe { sys::ibv_poll_cq(cq, 1, &mut wc) };
            if n > 0 && wc.wr_id == seq {
                crate::clock::probe::completion();
                break;
            }
            if n < 0 {
                self.records.push_back(to_record(local_of()));
                let err = std::io::Error::from_raw_os_error(-n);
                return Some(Err(Error::new(ErrorKind::Io, "ibv_poll_cq failed").with_source(err)));
            }
            if n == 0 {
                // (n > 0 with another wr_id: a late completion of an operation already finished or
                // destroyed, as `reap` would ignore it; nothing else can be in flight.)
                polls += 1;
                if polls >= self.cfg.spin_polls {
                    // Slow today: the general path takes over (yielding, `op_timeout`, flush, teardown).
                    self.records.push_back(to_record(local_of()));
                    return Some(settle(self.wait_sync()));
                }
            }
        }
        if wc.status != wc_status::SUCCESS {
            self.records.push_back(to_record(local_of()));
            self.on_cqe(seq, wc.status, wc.vendor_err);
            return Some(settle(self.wait_sync()));
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
            return Some(settle(Ok(out)));
        }
        let at = match staged {
            Staged::No => {
                // (zero-copy and inline operations are READs or WRITEs, checked above)
                return Some(settle(Ok(if kind == Kind::Read { Output::Placed } else { Output::Write })));
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
        Some(settle(Ok(out)))
    }
}
