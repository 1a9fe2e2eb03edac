//! The grant table: the data plane's read-mostly view of who may touch which slab.
//!
//! One slot per slab id, behind one `RwLock`. The data plane takes the read lock for the duration of one
//! operation: it checks the credential and bounds, then touches memory, all under the lock. The control
//! plane (grant, release, expiry, revoke) takes the write lock only to insert or remove a grant, and
//! zeroes a slab's memory *after* removing its grant: once `remove` has returned, no operation can still
//! be touching the slab, so no tenant ever sees another's bytes.
//!
//! Slab memory is reached through [`SlabMem`] (an `Arc<Region>` plus offset), not through a pool-wide
//! base pointer: a grant may be backed by the shared pool region or by a region of its own (e.g. the
//! shared-memory transport's per-grant memfd), without the data plane knowing the difference.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use farpool_core::{Epoch, ErrorKind, LeaseId, RemoteAddr, Result, SlabId, Token};
use farpool_cxl::Region;
use parking_lot::{RwLock, RwLockReadGuard};

/// Where a granted slab's bytes live: `len` bytes at `offset` of `region`.
#[derive(Clone, Debug)]
pub struct SlabMem {
    /// The mapping.
    pub region: Arc<Region>,
    /// Start of the slab inside the region.
    pub offset: u64,
    /// Length of the slab.
    pub len: u64,
}

impl SlabMem {
    /// Give the slab's pages back to the OS so that they read as zeros (`Region::discard`).
    pub fn discard(&self) -> Result<()> {
        self.region.discard(self.offset, self.len as usize)
    }
}

/// Expiry of a lease, shared by the lease record and every grant of the lease (renewal is one store).
#[derive(Debug)]
pub struct LeaseClock {
    expires_at_ms: AtomicU64,
}

impl LeaseClock {
    /// A clock expiring at `at_ms` (server-relative milliseconds).
    pub fn new(at_ms: u64) -> Self {
        Self { expires_at_ms: AtomicU64::new(at_ms) }
    }
    /// Move the expiry.
    pub fn set(&self, at_ms: u64) {
        self.expires_at_ms.store(at_ms, Ordering::Release);
    }
    /// The expiry.
    pub fn get(&self) -> u64 {
        self.expires_at_ms.load(Ordering::Acquire)
    }
    /// Whether the lease has expired at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.get()
    }
}

/// One live grant of a slab.
#[derive(Debug)]
pub struct Grant {
    /// The lease holding the slab.
    pub lease: LeaseId,
    /// Epoch of this grant.
    pub epoch: Epoch,
    /// Secret the client presents with each operation.
    pub token: Token,
    /// The slab's memory.
    pub mem: SlabMem,
    /// The lease's expiry.
    pub clock: Arc<LeaseClock>,
}

#[derive(Debug, Default)]
struct Slot {
    /// Epoch of the latest grant of this slab (also after the grant ended).
    epoch: u64,
    grant: Option<Grant>,
}

/// A failed access check: the kind and a message for the client.
pub type Denied = (ErrorKind, String);

/// The grant table. See the module docs.
#[derive(Debug, Default)]
pub struct GrantTable {
    slots: RwLock<Vec<Slot>>,
}

impl GrantTable {
    /// Make room for slab ids below `n`.
    pub fn ensure_len(&self, n: usize) {
        let mut s = self.slots.write();
        if s.len() < n {
            s.resize_with(n, Slot::default);
        }
    }

    /// Install a grant; the slot must be empty.
    pub fn insert(&self, slab: SlabId, grant: Grant) {
        let mut s = self.slots.write();
        let slot = &mut s[slab.0 as usize];
        assert!(slot.grant.is_none(), "slab {slab} granted while still granted");
        assert!(grant.epoch.0 > slot.epoch, "slab {slab} granted with a stale epoch");
        slot.epoch = grant.epoch.0;
        slot.grant = Some(grant);
    }

    /// Remove the grants of `slabs` (those that have one); after this returns no operation touches them.
    pub fn remove(&self, slabs: &[SlabId]) -> Vec<Grant> {
        let mut s = self.slots.write();
        slabs.iter().filter_map(|slab| s.get_mut(slab.0 as usize).and_then(|slot| slot.grant.take())).collect()
    }

    /// Check `addr` for an access of `len` bytes (`atomic`: 8 bytes, 8-aligned) and, if allowed, run `f`
    /// on the slab memory and the offset inside the region, under the read lock. No memory is touched
    /// unless every check passed.
    #[inline]
    pub fn with_access<R>(
        &self,
        addr: &RemoteAddr,
        len: u64,
        atomic: bool,
        now_ms: u64,
        f: impl FnOnce(&SlabMem, u64) -> R,
    ) -> Result<R, Denied> {
        self.view().with_access(addr, len, atomic, now_ms, f)
    }

    /// Hold the read lock for several operations (a batch of one connection): no grant can be removed,
    /// and so no slab zeroed or handed to another tenant, until the view is dropped. Keep it short and
    /// never across an `.await`; never take the write lock (a control-plane call) while holding it.
    pub fn view(&self) -> GrantView<'_> {
        GrantView { slots: self.slots.read() }
    }
}

/// The grant table under its read lock; see [`GrantTable::view`].
pub struct GrantView<'t> {
    slots: RwLockReadGuard<'t, Vec<Slot>>,
}

impl std::fmt::Debug for GrantView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantView").field("slots", &self.slots.len()).finish()
    }
}

impl GrantView<'_> {
    /// [`GrantTable::with_access`] under this view's lock; `f` may keep borrowing the slab memory for as
    /// long as the view lives (e.g. a [`farpool_cxl::gather::Span`] for a vectored write).
    #[inline]
    pub fn with_access<'v, R>(
        &'v self,
        addr: &RemoteAddr,
        len: u64,
        atomic: bool,
        now_ms: u64,
        f: impl FnOnce(&'v SlabMem, u64) -> R,
    ) -> Result<R, Denied> {
        let slots = &self.slots;
        let Some(slot) = slots.get(addr.slab.0 as usize) else {
            return Err((ErrorKind::Unauthorized, format!("no slab {} on this server", addr.slab)));
        };
        let g = match &slot.grant {
            Some(g) if g.lease == addr.cred.lease && g.epoch == addr.cred.epoch => g,
            _ => return Err(stale_or_forged(slot, addr)),
        };
        if g.token != addr.cred.token {
            return Err((ErrorKind::Unauthorized, format!("bad token for {addr}")));
        }
        if g.clock.expired(now_ms) {
            return Err((ErrorKind::Revoked, format!("lease {} has expired", g.lease)));
        }
        match addr.offset.checked_add(len) {
            Some(end) if end <= g.mem.len => {}
            _ => {
                let msg = format!("{}+{len} is outside the slab of {} bytes", addr.offset, g.mem.len);
                return Err((ErrorKind::OutOfRange, msg));
            }
        }
        if atomic && !addr.offset.is_multiple_of(8) {
            return Err((ErrorKind::Unaligned, format!("atomic at offset {} is not 8-byte aligned", addr.offset)));
        }
        Ok(f(&g.mem, g.mem.offset + addr.offset))
    }
}

/// Why a credential that does not match the slab's current grant is refused: a credential of an earlier
/// grant of this slab was revoked (or expired, or released); anything else was never issued.
#[cold]
fn stale_or_forged(slot: &Slot, addr: &RemoteAddr) -> Denied {
    let ep = addr.cred.epoch.0;
    let current = slot.grant.as_ref().map(|g| g.epoch.0);
    if ep > 0 && ep <= slot.epoch && Some(ep) != current {
        (ErrorKind::Revoked, format!("grant of slab {} at epoch {ep} was revoked", addr.slab))
    } else {
        (
            ErrorKind::Unauthorized,
            format!("lease {} holds no grant of slab {} at epoch {ep}", addr.cred.lease, addr.slab),
        )
    }
}

#[cfg(test)]
mod tests {
    use farpool_core::Credential;
    use farpool_cxl::Backing;

    use super::*;

    fn setup() -> (GrantTable, Credential) {
        let region = Arc::new(Backing::Anon.map(1 << 16, "t").unwrap());
        let t = GrantTable::default();
        t.ensure_len(2);
        let clock = Arc::new(LeaseClock::new(1000));
        let mem = SlabMem { region, offset: 1 << 15, len: 1 << 15 };
        t.insert(SlabId(1), Grant { lease: LeaseId(5), epoch: Epoch(1), token: Token(42), mem, clock });
        let cred = Credential { lease: LeaseId(5), epoch: Epoch(1), token: Token(42), rkey: 0, base_addr: 0 };
        (t, cred)
    }

    fn kind(t: &GrantTable, addr: RemoteAddr, len: u64, atomic: bool, now: u64) -> Option<ErrorKind> {
        t.with_access(&addr, len, atomic, now, |_, _| ()).err().map(|e| e.0)
    }

    #[test]
    fn every_check_denies_before_access() {
        let (t, cred) = setup();
        let a = RemoteAddr { slab: SlabId(1), offset: 8, cred };
        assert_eq!(t.with_access(&a, 8, true, 0, |m, o| (m.len, o)).unwrap(), (1 << 15, (1 << 15) + 8));
        assert_eq!(kind(&t, RemoteAddr { slab: SlabId(9), ..a }, 8, false, 0), Some(ErrorKind::Unauthorized));
        assert_eq!(kind(&t, RemoteAddr { slab: SlabId(0), ..a }, 8, false, 0), Some(ErrorKind::Unauthorized));
        let forged = Credential { token: Token(43), ..cred };
        assert_eq!(kind(&t, RemoteAddr { cred: forged, ..a }, 8, false, 0), Some(ErrorKind::Unauthorized));
        let other = Credential { lease: LeaseId(6), ..cred };
        assert_eq!(kind(&t, RemoteAddr { cred: other, ..a }, 8, false, 0), Some(ErrorKind::Unauthorized));
        let future = Credential { epoch: Epoch(2), ..cred };
        assert_eq!(kind(&t, RemoteAddr { cred: future, ..a }, 8, false, 0), Some(ErrorKind::Unauthorized));
        assert_eq!(kind(&t, a, 8, false, 1000), Some(ErrorKind::Revoked));
        assert_eq!(kind(&t, a.offset_by((1 << 15) - 8), 9, false, 0), Some(ErrorKind::OutOfRange));
        assert_eq!(kind(&t, RemoteAddr { offset: u64::MAX, ..a }, 8, false, 0), Some(ErrorKind::OutOfRange));
        assert_eq!(kind(&t, a.offset_by(4), 8, true, 0), Some(ErrorKind::Unaligned));
        assert_eq!(t.remove(&[SlabId(1), SlabId(0)]).len(), 1);
        assert_eq!(kind(&t, a, 8, false, 0), Some(ErrorKind::Revoked), "old epoch after removal");
    }
}
