//! The per-operation verbs calls, made straight on libibverbs' one-call entry points: `ibv_post_send`
//! with a chain of work requests built in reused scratch space, and `ibv_poll_cq` into a reused array.
//!
//! Why not sideway's builders here (sideway still creates and owns every object): its extended-API
//! posting makes four provider calls per work request (`ibv_wr_start`, the opcode, the SGE,
//! `ibv_wr_complete`) and its legacy-API poller and post guard allocate vectors on every call. On
//! Soft-RoCE under emulation each extra call between a completion and the next post costs several
//! microseconds of latency, because the device's kernel worker goes idle meanwhile (perftest's own
//! `--latency_gap=2` adds ~9 us to its 23 us minimum); one `ibv_post_send` and one `ibv_poll_cq` per
//! step are exactly what `ib_read_lat` does. On real NICs the two paths are equivalent; both APIs are
//! valid on queue pairs and completion queues created with either.

use std::ptr;

use rdma_mummy_sys as sys;

/// One work request, as the endpoint describes it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Wr {
    pub wr_id: u64,
    pub op: RawOp,
    pub remote_addr: u64,
    pub rkey: u32,
    pub signaled: bool,
    /// Local side: (address, length, lkey). For an inline WRITE the address is the caller's bytes (the
    /// provider copies them during the call) and the lkey is ignored.
    pub local: (u64, u32, u32),
    pub inline: bool,
}

/// The operation of a [`Wr`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum RawOp {
    Read,
    Write,
    Cas { expect: u64, new: u64 },
    Faa { add: u64 },
}

/// Reused space for one chain of work requests. The raw pointers inside (`next`, `sg_list`) are set
/// in [`PostScratch::post`] right before the call and mean nothing after it returns.
pub(crate) struct PostScratch {
    wrs: Vec<sys::ibv_send_wr>,
    sges: Vec<sys::ibv_sge>,
}

// SAFETY: the pointers stored in `wrs` point into `sges`/`wrs` of this same value and are only written
// and read inside `post` (which takes `&mut self`); between calls they are dead values, never
// dereferenced, so moving the scratch to another thread cannot make anything alias.
unsafe impl Send for PostScratch {}
// SAFETY: as above; `&PostScratch` gives no access to the pointers at all.
unsafe impl Sync for PostScratch {}

impl std::fmt::Debug for PostScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostScratch").field("wrs", &self.wrs.len()).finish()
    }
}

impl PostScratch {
    pub fn with_capacity(n: usize) -> Self {
        Self { wrs: Vec::with_capacity(n), sges: Vec::with_capacity(n) }
    }

    pub fn clear(&mut self) {
        self.wrs.clear();
        self.sges.clear();
    }

    pub fn push(&mut self, w: &Wr) {
        let (addr, length, lkey) = w.local;
        self.sges.push(sys::ibv_sge { addr, length, lkey });
        // SAFETY: `ibv_send_wr` is a C struct of integers, raw pointers and unions of those: all-zero
        // is a valid value (null pointers, opcode 0), and every field the provider reads is set below
        // or in `post`.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = w.wr_id;
        wr.num_sge = i32::from(length > 0);
        let mut flags = 0u32;
        if w.signaled {
            flags |= sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        if w.inline {
            flags |= sys::ibv_send_flags::IBV_SEND_INLINE.0;
        }
        wr.send_flags = flags;
        match w.op {
            RawOp::Read | RawOp::Write => {
                wr.opcode = if matches!(w.op, RawOp::Read) {
                    sys::ibv_wr_opcode::IBV_WR_RDMA_READ
                } else {
                    sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE
                };
                wr.wr.rdma = sys::rdma_t { remote_addr: w.remote_addr, rkey: w.rkey };
            }
            RawOp::Cas { expect, new } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
                wr.wr.atomic =
                    sys::atomic_t { remote_addr: w.remote_addr, compare_add: expect, swap: new, rkey: w.rkey };
            }
            RawOp::Faa { add } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
                wr.wr.atomic = sys::atomic_t { remote_addr: w.remote_addr, compare_add: add, swap: 0, rkey: w.rkey };
            }
        }
        self.wrs.push(wr);
    }

    /// Post the pushed work requests as one chain (one doorbell). `Err(errno)` if the provider refused
    /// the chain (the queue pair is then unusable for what was not posted; the caller marks it broken).
    ///
    /// # Safety
    ///
    /// `qp` must be a live queue pair of the context whose memory the SGEs name, and every local range
    /// must stay valid until its completion (inline data: until this call returns).
    pub unsafe fn post(&mut self, qp: *mut sys::ibv_qp) -> Result<(), i32> {
        let n = self.wrs.len();
        if n == 0 {
            return Ok(());
        }
        let wrs = self.wrs.as_mut_ptr();
        let sges = self.sges.as_mut_ptr();
        for i in 0..n {
            // SAFETY: `i < n == wrs.len() == sges.len()`; both vectors stay untouched until the call
            // below has returned, so the pointers written here stay valid for its duration.
            unsafe {
                let wr = &mut *wrs.add(i);
                wr.sg_list = sges.add(i);
                wr.next = if i + 1 < n { wrs.add(i + 1) } else { ptr::null_mut() };
            }
        }
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: the chain is well formed (above) and `qp` is live (caller's contract).
        let ret = unsafe { sys::ibv_post_send(qp, wrs, &mut bad) };
        if ret == 0 { Ok(()) } else { Err(ret) }
    }
}

/// Reused completion array for [`poll`].
pub(crate) struct Completions {
    wcs: Vec<sys::ibv_wc>,
}

impl std::fmt::Debug for Completions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Completions").field("capacity", &self.wcs.capacity()).finish()
    }
}

impl Completions {
    pub fn with_capacity(n: usize) -> Self {
        Self { wcs: Vec::with_capacity(n.max(1)) }
    }

    /// Poll `cq` once for up to the capacity; the completions as (wr_id, status, vendor_err).
    ///
    /// # Safety
    ///
    /// `cq` must be a live completion queue.
    pub unsafe fn poll(&mut self, cq: *mut sys::ibv_cq, out: &mut Vec<(u64, u32, u32)>) -> Result<usize, i32> {
        let cap = self.wcs.capacity();
        self.wcs.clear();
        // SAFETY: the array has room for `cap` entries; `ibv_poll_cq` writes at most that many and
        // returns how many it wrote (or a negative error), and `cq` is live (caller's contract).
        let ret = unsafe { sys::ibv_poll_cq(cq, cap as i32, self.wcs.as_mut_ptr()) };
        if ret < 0 {
            return Err(-ret);
        }
        let n = ret as usize;
        // SAFETY: the provider initialised the first `n <= cap` entries.
        unsafe { self.wcs.set_len(n) };
        for wc in &self.wcs {
            let status = wc.status;
            out.push((wc.wr_id, status, if status == 0 { 0 } else { wc.vendor_err }));
        }
        Ok(n)
    }
}
