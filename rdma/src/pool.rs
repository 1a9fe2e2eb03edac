//! The memory server's side: its pool known to the device, and one memory region per slab grant.
//!
//! Revocation is real: [`SlabMr::deregister`] (or dropping the `SlabMr`) calls `ibv_dereg_mr`, after
//! which the NIC rejects the old rkey (the peer's operation completes with a remote access error, which
//! [`crate::map_wc_status`] reports as `Revoked`). Each grant gets a fresh MR, so a re-granted slab has a
//! new rkey and an old credential never reaches the new tenant's bytes.
//!
//! Only granted ranges are registered (pinned). The pool as a whole is not: an MR over it would keep
//! every page pinned for the life of the server, so a slab given back to the OS (`MADV_DONTNEED`, a
//! punched hole) after a shrink would stay allocated, and its range would show the CPU fresh pages while
//! the MR still held the old ones. Instead, after a grant's MR is deregistered its pages are plain
//! memory again: the server may discard them, and registering the next grant of the slab pins (and, if
//! needed, faults in) whatever pages are there then.
//!
//! Per-grant MRs rather than memory windows: sideway 0.4.3 does not wrap `ibv_alloc_mw`/`ibv_bind_mw`
//! (they are static inline in `verbs.h`).

use std::any::Any;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use farpool_core::{Error, ErrorKind, Result};
use sideway::ibverbs::memory_region::MemoryRegion;

use crate::device::Context;
use crate::error::verbs;
use crate::mr::{Access, PinnedMemory, RemoteRegion};

/// The pool's memory, kept mapped while the pool or any grant of it lives.
struct PoolMem {
    _owner: Option<Box<dyn Any + Send + Sync>>,
    ptr: NonNull<u8>,
    len: usize,
    ctx: Arc<Context>,
}

// SAFETY: `ptr` is the address of memory owned by `_owner` or guaranteed valid by the `unsafe`
// `register_pool` contract; this type never dereferences it (only the NIC accesses granted ranges).
unsafe impl Send for PoolMem {}
// SAFETY: as above; shared access only reads the address and length.
unsafe impl Sync for PoolMem {}

/// The server's whole pool, known to the device; grants are registered from it one by one. Nothing is
/// pinned until a grant is (see the module docs).
pub struct PoolRegistration {
    mem: Arc<PoolMem>,
}

impl fmt::Debug for PoolRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolRegistration")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.mem.len)
            .field("device", &self.mem.ctx.name())
            .finish()
    }
}

impl Context {
    /// Take a pool the caller maps and owns (anonymous, memfd, devdax...) for granting.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be valid for reads and writes and stay mapped at this address until the
    /// returned pool and every [`SlabMr`] granted from it are dropped. Peers write into granted ranges at
    /// any time while their grant lives, so the caller must not hold Rust references to those bytes.
    pub unsafe fn register_pool(self: &Arc<Self>, ptr: NonNull<u8>, len: usize) -> Result<PoolRegistration> {
        PoolRegistration::new(self, ptr, len, None)
    }

    /// Take a pool whose memory the pool takes over (safe: see [`PinnedMemory`]).
    pub fn register_pool_owned<M: PinnedMemory>(self: &Arc<Self>, mem: M) -> Result<PoolRegistration> {
        let (ptr, len) = mem.as_raw();
        PoolRegistration::new(self, ptr, len, Some(Box::new(mem)))
    }
}

impl PoolRegistration {
    fn new(
        ctx: &Arc<Context>,
        ptr: NonNull<u8>,
        len: usize,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<Self> {
        if len == 0 {
            return Err(Error::new(ErrorKind::Config, "cannot register an empty pool"));
        }
        Ok(Self { mem: Arc::new(PoolMem { _owner: owner, ptr, len, ctx: ctx.clone() }) })
    }

    /// Address of the pool's first byte.
    pub fn addr(&self) -> u64 {
        self.mem.ptr.as_ptr() as u64
    }

    /// Pool length in bytes.
    pub fn len(&self) -> usize {
        self.mem.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.mem.len == 0
    }

    /// Register `offset..offset + len` of the pool for remote READ, WRITE and atomics: one grant. This
    /// pins the range (faulting in pages that were discarded). `OutOfRange` if the range leaves the
    /// pool or exceeds the device's `max_mr_size`.
    pub fn grant(&self, offset: u64, len: u64) -> Result<SlabMr> {
        let (off, n) = match (usize::try_from(offset), usize::try_from(len)) {
            (Ok(o), Ok(n)) if n > 0 && o.checked_add(n).is_some_and(|end| end <= self.mem.len) => (o, n),
            _ => {
                return Err(Error::new(
                    ErrorKind::OutOfRange,
                    format!("grant {offset}+{len} is not a range of the pool of {} bytes", self.mem.len),
                ));
            }
        };
        let ctx = &self.mem.ctx;
        if len > ctx.limits().max_mr_size {
            let m = format!("grant of {len} bytes exceeds the device's max_mr_size {}", ctx.limits().max_mr_size);
            return Err(Error::new(ErrorKind::OutOfRange, m));
        }
        let addr = self.addr() + offset;
        let flags = Access::REMOTE_ALL.flags();
        // SAFETY: the range was checked to lie inside the pool, whose memory stays mapped while `mem`
        // lives; the SlabMr keeps an Arc of it and drops its own MR first (field order).
        let mr = unsafe { ctx.pd().reg_mr(addr as usize, n, flags) }.map_err(|e| {
            let hint = "ulimit -l too low? (RDMA pins the granted pages)";
            verbs(ErrorKind::Io, format!("ibv_reg_mr for grant {off}+{n}; {hint}"), e)
        })?;
        tracing::debug!(offset, len, rkey = mr.rkey(), "slab MR registered");
        Ok(SlabMr { mr, _pool: self.mem.clone(), offset, len })
    }
}

/// One grant's memory region. Dropping it (or [`SlabMr::deregister`]) revokes the rkey at the NIC.
pub struct SlabMr {
    // Field order: the MR goes before the pool reference.
    mr: Arc<MemoryRegion>,
    _pool: Arc<PoolMem>,
    offset: u64,
    len: u64,
}

impl fmt::Debug for SlabMr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlabMr")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("rkey", &format_args!("{:#x}", self.rkey()))
            .finish()
    }
}

impl SlabMr {
    /// Remote key to hand to the client.
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }

    /// Virtual address of the grant's first byte (the credential's `base_addr`).
    pub fn addr(&self) -> u64 {
        self.mr.get_ptr() as u64
    }

    /// Offset of the grant in the pool.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// What the client needs: address, length, rkey.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion { addr: self.addr(), len: self.len, rkey: self.rkey() }
    }

    /// Deregister now: from here on the NIC refuses this rkey.
    pub fn deregister(self) {
        tracing::debug!(offset = self.offset, len = self.len, rkey = self.rkey(), "slab MR deregistered");
        drop(self);
    }
}
