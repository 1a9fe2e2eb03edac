//! The memory server's side: its pool registered once, and one memory region per slab grant.
//!
//! Revocation is real: [`SlabMr::deregister`] (or dropping the `SlabMr`) calls `ibv_dereg_mr`, after
//! which the NIC rejects the old rkey (the peer's operation completes with a remote access error, which
//! [`crate::map_wc_status`] reports as `Revoked`). Each grant gets a fresh MR, so a re-granted slab has a
//! new rkey and an old credential never reaches the new tenant's bytes.
//!
//! Per-grant MRs rather than memory windows: sideway 0.4.3 does not wrap `ibv_alloc_mw`/`ibv_bind_mw`
//! (they are static inline in `verbs.h`). Registering a grant costs a page-table walk over its range;
//! the pool registration taken once at start keeps those pages pinned and resident, so that walk does
//! not fault memory in.

use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use farpool_core::{Error, ErrorKind, Result};
use sideway::ibverbs::memory_region::MemoryRegion;

use crate::device::Context;
use crate::error::verbs;
use crate::mr::{Access, PinnedMemory, Registration, RemoteRegion};

/// The server's whole pool, registered once for local access (pins it).
pub struct PoolRegistration {
    reg: Arc<Registration>,
}

impl fmt::Debug for PoolRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PoolRegistration").field(&self.reg).finish()
    }
}

impl Context {
    /// Register a pool the caller maps and owns (anonymous, memfd, devdax...).
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be valid for reads and writes and stay mapped at this address until the
    /// returned pool and every [`SlabMr`] granted from it are dropped. Peers write into granted ranges at
    /// any time while their grant lives, so the caller must not hold Rust references to those bytes.
    pub unsafe fn register_pool(self: &Arc<Self>, ptr: NonNull<u8>, len: usize) -> Result<PoolRegistration> {
        // SAFETY: forwarded to our caller's contract above.
        let reg = unsafe { self.register(ptr, len, Access::LOCAL)? };
        Ok(PoolRegistration { reg })
    }

    /// Register a pool whose memory the registration takes over (safe: see [`PinnedMemory`]).
    pub fn register_pool_owned<M: PinnedMemory>(self: &Arc<Self>, mem: M) -> Result<PoolRegistration> {
        Ok(PoolRegistration { reg: self.register_owned(mem, Access::LOCAL)? })
    }
}

impl PoolRegistration {
    /// Address of the pool's first byte.
    pub fn addr(&self) -> u64 {
        self.reg.addr()
    }

    /// Pool length in bytes.
    pub fn len(&self) -> usize {
        self.reg.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.reg.is_empty()
    }

    /// The pool's own registration (local key for server-side copies).
    pub fn registration(&self) -> &Arc<Registration> {
        &self.reg
    }

    /// Register `offset..offset + len` of the pool for remote READ, WRITE and atomics: one grant.
    /// `OutOfRange` if the range leaves the pool.
    pub fn grant(&self, offset: u64, len: u64) -> Result<SlabMr> {
        let (off, n) = match (usize::try_from(offset), usize::try_from(len)) {
            (Ok(o), Ok(n)) if n > 0 => (o, n),
            _ => return Err(Error::new(ErrorKind::OutOfRange, format!("grant {offset}+{len} is not a valid range"))),
        };
        self.reg.check_range(off, n)?;
        let addr = self.reg.addr() + offset;
        let flags = Access::REMOTE_ALL.flags();
        // SAFETY: the range was checked to lie inside the pool registration, whose memory is valid until
        // `self.reg` is dropped; the SlabMr keeps an Arc of it and drops its own MR first.
        let mr = unsafe { self.reg.context().pd().reg_mr(addr as usize, n, flags) }
            .map_err(|e| verbs(ErrorKind::Io, format!("ibv_reg_mr for grant {offset}+{len}"), e))?;
        tracing::debug!(offset, len, rkey = mr.rkey(), "slab MR registered");
        Ok(SlabMr { mr, _pool: self.reg.clone(), offset, len })
    }
}

/// One grant's memory region. Dropping it (or [`SlabMr::deregister`]) revokes the rkey at the NIC.
pub struct SlabMr {
    // Field order: the MR goes before the pool reference.
    mr: Arc<MemoryRegion>,
    _pool: Arc<Registration>,
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
