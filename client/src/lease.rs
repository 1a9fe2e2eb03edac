//! Leases: slabs of one server's memory granted to this client until expiry or revocation.
//!
//! Owns: [`Lease`] (the user's handle) and `LeaseState` (shared with the pool's registry, the heartbeat
//! and the control-connection readers). The state's mutable part sits behind one mutex and is touched
//! only in short critical sections: the heartbeat moves `expiry`/`next_renew`, the readers mark slabs
//! revoking/revoked, and the handle reads it to check an access. While the lease is active with nothing
//! revoked or under notice, every change also publishes the expiry into an atomic, and an access check
//! then takes no lock: it reads that atomic and the coarse monotonic clock (threads sharing a lease do
//! not contend on its mutex).
//!
//! Invariants: an access is checked client-side before it is sent: the lease is active and unexpired by
//! the local clock (the expiry is computed from the *send* time of the renewal, so it never runs ahead of
//! the server's), the grant index exists, `offset + len` stays inside the grant, and the slab is neither
//! revoked nor past its revoke deadline. The server checks again; the client check only fails faster.
//! One exception, for a READ into a registered arena over rdma (`Endpoint::read_into`): when the lease
//! is clean, the bounds are checked before the READ is sent and the expiry (the clock read) while it is
//! in flight; an expired lease then fails the call with `Revoked` after the fact, and the arena may hold
//! the bytes read from the lease's own slab (a slab is revoked at the NIC before anyone else gets it).
//! A lease is in the pool's registry exactly while it is `Active`. Dropping a handle releases the lease
//! (best effort, without waiting); [`Lease::release`] waits for the server's answer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use farpool_core::wire::Msg;
use farpool_core::{Error, ErrorKind, LeaseId, RemoteAddr, Result, SlabGrant, SlabId};
use parking_lot::Mutex;

use crate::arena::ArenaSlice;
use crate::pool::Core;

/// Where a lease stands.
#[derive(Clone, Debug)]
pub enum LeaseStatus {
    /// Usable (possibly with some slabs revoked or under a revoke notice).
    Active,
    /// Given back by this client.
    Released,
    /// Every slab was revoked by the server.
    Revoked,
    /// Renewal failed or the server went down: the memory is gone.
    Lost(Arc<Error>),
}

#[derive(Debug)]
struct LeaseMut {
    expiry: Instant,
    duration: Duration,
    next_renew: Instant,
    status: LeaseStatus,
    revoking: HashMap<SlabId, Instant>,
    revoked: HashSet<SlabId>,
}

/// The shared state of one lease. See the module docs.
#[derive(Debug)]
pub(crate) struct LeaseState {
    pub(crate) id: LeaseId,
    /// The lease's secret (from `LeaseGranted`), carried by `Renew` and `Release`.
    pub(crate) secret: u64,
    pub(crate) server: usize,
    pub(crate) grants: Vec<SlabGrant>,
    m: Mutex<LeaseMut>,
    /// While the lease is active with no slab revoked or under notice: its expiry on `CLOCK_MONOTONIC`
    /// in nanoseconds (no later than `expiry`); else 0. Written under `m` after every change, read
    /// without it by the access check's fast path (see [`mono`]).
    clean_until: AtomicU64,
}

/// The clocks of the access check's fast path.
///
/// `CLOCK_MONOTONIC_COARSE` is the monotonic clock as of the last timer tick, read from the vDSO's data
/// page without the cycle counter (a clock read costs 0.3-0.5 us of emulated time in the project's qemu
/// guest, where every access pays it). It lags the precise clock by less than its resolution, so
/// `coarse + slack < deadline`, with the slack at least twice the resolution, proves the deadline has not
/// passed; anything closer goes to the precise check.
mod mono {
    use std::sync::OnceLock;

    use nix::time::{ClockId, clock_getres, clock_gettime};

    fn ns(clock: ClockId) -> Option<u64> {
        let t = clock_gettime(clock).ok()?;
        u64::try_from(t.tv_sec()).ok()?.checked_mul(1_000_000_000)?.checked_add(u64::try_from(t.tv_nsec()).ok()?)
    }

    /// `CLOCK_MONOTONIC` now, in nanoseconds (`None` if unreadable).
    pub(super) fn precise_ns() -> Option<u64> {
        ns(ClockId::CLOCK_MONOTONIC)
    }

    /// A lower bound of `CLOCK_MONOTONIC` now and the most it may lag (`None` if unreadable).
    pub(super) fn coarse_ns() -> Option<(u64, u64)> {
        static SLACK: OnceLock<Option<u64>> = OnceLock::new();
        // Twice the resolution, and at least 10 ms (HZ=100): a margin, not a measurement.
        let slack = (*SLACK.get_or_init(|| {
            let r = clock_getres(ClockId::CLOCK_MONOTONIC_COARSE).ok()?;
            let res = u64::try_from(r.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(r.tv_nsec()).ok()?;
            Some(res.saturating_mul(2).max(10_000_000))
        }))?;
        Some((ns(ClockId::CLOCK_MONOTONIC_COARSE)?, slack))
    }
}

impl LeaseState {
    /// A lease granted at `granted_at` (the request's send time) for `duration`; renewed at
    /// `renew_every` or, when `None`, at a third of its duration.
    pub(crate) fn new(
        id: LeaseId,
        secret: u64,
        server: usize,
        grants: Vec<SlabGrant>,
        granted_at: Instant,
        duration: Duration,
        renew_every: Option<Duration>,
    ) -> Self {
        let every = renew_every.unwrap_or(duration / 3);
        let m = LeaseMut {
            expiry: granted_at + duration,
            duration,
            next_renew: granted_at + every,
            status: LeaseStatus::Active,
            revoking: HashMap::new(),
            revoked: HashSet::new(),
        };
        let s = Self { id, secret, server, grants, m: Mutex::new(m), clean_until: AtomicU64::new(0) };
        s.publish(&s.m.lock());
        s
    }

    /// Refresh `clean_until` from `m` (call with the lock held, after every change).
    fn publish(&self, m: &LeaseMut) {
        let clean = matches!(m.status, LeaseStatus::Active) && m.revoking.is_empty() && m.revoked.is_empty();
        // The clock first, then the time left: `base + left` is then no later than `expiry`.
        let until = match mono::precise_ns() {
            Some(base) if clean => {
                let left = m.expiry.saturating_duration_since(Instant::now());
                if left.is_zero() { 0 } else { base.saturating_add(left.as_nanos() as u64) }
            }
            _ => 0,
        };
        self.clean_until.store(until, Ordering::Release);
    }

    pub(crate) fn status(&self) -> LeaseStatus {
        self.m.lock().status.clone()
    }

    pub(crate) fn is_active(&self) -> bool {
        matches!(self.m.lock().status, LeaseStatus::Active)
    }

    pub(crate) fn expiry(&self) -> Instant {
        self.m.lock().expiry
    }

    pub(crate) fn duration(&self) -> Duration {
        self.m.lock().duration
    }

    pub(crate) fn next_renew(&self) -> Instant {
        self.m.lock().next_renew
    }

    /// A renewal sent at `sent_at` was answered with `expires_in_ms`.
    pub(crate) fn renewed(&self, sent_at: Instant, expires_in_ms: u64, renew_every: Option<Duration>) -> Instant {
        let mut m = self.m.lock();
        m.duration = Duration::from_millis(expires_in_ms);
        m.expiry = sent_at + m.duration;
        m.next_renew = sent_at + renew_every.unwrap_or(m.duration / 3);
        self.publish(&m);
        m.expiry
    }

    /// A renewal failed in a way that may pass: try again after `after`.
    pub(crate) fn retry_renew_after(&self, after: Duration) {
        self.m.lock().next_renew = Instant::now() + after;
    }

    /// Move from `Active` to `to`; false when it was no longer active.
    pub(crate) fn finish(&self, to: LeaseStatus) -> bool {
        let mut m = self.m.lock();
        if !matches!(m.status, LeaseStatus::Active) {
            return false;
        }
        m.status = to;
        self.publish(&m);
        true
    }

    pub(crate) fn mark_revoking(&self, slabs: &[SlabId], deadline: Instant) {
        let mut m = self.m.lock();
        for s in slabs {
            m.revoking.insert(*s, deadline);
        }
        self.publish(&m);
    }

    /// Mark slabs revoked; returns true when every slab of the lease is now revoked.
    pub(crate) fn mark_revoked(&self, slabs: &[SlabId]) -> bool {
        let mut m = self.m.lock();
        m.revoked.extend(slabs.iter().copied());
        self.publish(&m);
        self.grants.iter().all(|g| m.revoked.contains(&g.slab))
    }

    /// Whether the lease may be used at all: active and unexpired (local clock); `Revoked` if not.
    pub(crate) fn usable(&self) -> Result<()> {
        self.usable_locked(&self.m.lock())
    }

    fn usable_locked(&self, m: &LeaseMut) -> Result<()> {
        let revoked = |why: String| Err(Error::new(ErrorKind::Revoked, format!("lease {}: {why}", self.id)));
        match &m.status {
            LeaseStatus::Active if Instant::now() >= m.expiry => revoked("expired".into()),
            LeaseStatus::Active => Ok(()),
            LeaseStatus::Lost(e) => revoked(format!("lost: {e}")),
            other => revoked(format!("not active ({other:?})")),
        }
    }

    /// Grant `grant`, if `len` bytes at `offset` lie inside it; `OutOfRange` if not.
    #[inline]
    fn in_bounds(&self, grant: usize, offset: u64, len: u64) -> Result<&SlabGrant> {
        let g = self.grants.get(grant).ok_or_else(|| {
            Error::new(
                ErrorKind::OutOfRange,
                format!("lease {} has {} grants; index {grant} is out of range", self.id, self.grants.len()),
            )
        })?;
        let end = offset.checked_add(len).filter(|&e| e <= g.len);
        if end.is_none() {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("{len} bytes at offset {offset} exceed grant {grant} (slab {}) of {} bytes", g.slab, g.len),
            ));
        }
        Ok(g)
    }

    /// The lock-free check: an active lease with nothing revoked or under notice, before its expiry
    /// (coarse clock, with slack). `false` means "ask the precise path", not "denied".
    #[inline]
    fn clean_now(&self) -> bool {
        let until = self.clean_until.load(Ordering::Acquire);
        until != 0 && mono::coarse_ns().is_some_and(|(now, slack)| now.saturating_add(slack) < until)
    }

    /// The address of `len` bytes at `offset` of grant `grant`, after the client-side checks.
    pub(crate) fn check(&self, grant: usize, offset: u64, len: u64) -> Result<RemoteAddr> {
        let g = self.in_bounds(grant, offset, len)?;
        if self.clean_now() {
            return Ok(RemoteAddr::in_grant(g, offset));
        }
        let m = self.m.lock();
        self.usable_locked(&m)?;
        let revoked = |why: String| Err(Error::new(ErrorKind::Revoked, format!("lease {}: {why}", self.id)));
        if m.revoked.contains(&g.slab) {
            return revoked(format!("slab {} was revoked", g.slab));
        }
        // The clock only for a slab under a revoke notice (one clock read per access, not two).
        if m.revoking.get(&g.slab).is_some_and(|d| Instant::now() >= *d) {
            return revoked(format!("slab {} is past its revoke deadline", g.slab));
        }
        Ok(RemoteAddr::in_grant(g, offset))
    }
}

/// What [`LeaseState::check_bounds`] left to check.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
#[derive(Debug)]
pub(crate) enum Expiry {
    /// Nothing: every check ran.
    Checked,
    /// The clock: the lease was clean (active, nothing revoked or under notice) when the bounds were
    /// checked; [`LeaseState::check_expiry`] finishes the check.
    Deferred,
}

#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
impl LeaseState {
    /// [`check`](Self::check) split for an operation whose result can be refused after it ran (a READ
    /// into the caller's memory), giving the grant `len` bytes at `offset` lie in: the bounds now, and the expiry, which reads a clock, later with
    /// [`check_expiry`](Self::check_expiry) when the lease is clean. A lease that is not clean gets
    /// the whole check now.
    #[inline]
    pub(crate) fn check_bounds(&self, grant: usize, offset: u64, len: u64) -> Result<(&SlabGrant, Expiry)> {
        let g = self.in_bounds(grant, offset, len)?;
        if self.clean_until.load(Ordering::Acquire) != 0 {
            return Ok((g, Expiry::Deferred));
        }
        self.check(grant, offset, len).map(|_| (g, Expiry::Checked))
    }

    /// The rest of [`check_bounds`](Self::check_bounds) after [`Expiry::Deferred`]: the same verdict
    /// as [`check`](Self::check) now.
    #[inline]
    pub(crate) fn check_expiry(&self, grant: usize, offset: u64, len: u64) -> Result<()> {
        if self.clean_now() {
            return Ok(());
        }
        self.check(grant, offset, len).map(drop)
    }
}

/// A lease: a handle to slabs of one server's memory. See the module docs.
///
/// Data conveniences (`read`, `write`, ...) borrow a pooled data endpoint for the call; for a hot loop,
/// take a dedicated [`crate::Endpoint`] with [`crate::Pool::endpoint`] instead.
pub struct Lease {
    pub(crate) core: Arc<Core>,
    pub(crate) state: Arc<LeaseState>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("id", &self.state.id)
            .field("server", &self.state.server)
            .field("grants", &self.state.grants.len())
            .field("status", &self.state.status())
            .finish()
    }
}

impl Lease {
    /// The lease id (server-assigned).
    pub fn id(&self) -> LeaseId {
        self.state.id
    }

    /// Index of the server that granted it.
    pub fn server(&self) -> usize {
        self.state.server
    }

    /// The granted slabs, addressed by their index in this slice.
    pub fn grants(&self) -> &[SlabGrant] {
        &self.state.grants
    }

    /// Total bytes granted.
    pub fn len_bytes(&self) -> u64 {
        self.state.grants.iter().map(|g| g.len).sum()
    }

    /// When the lease expires unless renewed (local clock).
    pub fn expiry(&self) -> Instant {
        self.state.expiry()
    }

    /// Where the lease stands.
    pub fn status(&self) -> LeaseStatus {
        self.state.status()
    }

    /// Whether it is still usable.
    pub fn is_active(&self) -> bool {
        self.state.is_active()
    }

    /// The checked remote address of `len` bytes at `offset` in grant `grant`, for raw
    /// [`farpool_core::Transport`] use.
    pub fn addr(&self, grant: usize, offset: u64, len: u64) -> Result<RemoteAddr> {
        self.state.check(grant, offset, len)
    }

    /// Renew now and return the new expiry (the heartbeat does this in the background by default).
    pub fn renew(&self) -> Result<Instant> {
        let conn = self.core.current_conn(self.state.server)?;
        let pending = conn.send("renew", |req| Msg::Renew { req, lease: self.state.id, secret: self.state.secret })?;
        let sent_at = pending.sent_at();
        match pending.wait(conn.op_timeout())? {
            Msg::Renewed { expires_in_ms, .. } => {
                Ok(self.state.renewed(sent_at, expires_in_ms, self.core.cfg.renew_interval))
            }
            other => Err(Error::new(ErrorKind::Protocol, format!("renew answered with {other:?}"))),
        }
    }

    /// Give the lease back and wait for the server's acknowledgement (within the op timeout).
    /// A lease already revoked or lost is simply forgotten.
    pub fn release(self) -> Result<()> {
        if !self.state.finish(LeaseStatus::Released) {
            return Ok(());
        }
        self.core.forget_lease(&self.state);
        let conn = self.core.current_conn(self.state.server)?;
        match conn.call("release", |req| Msg::Release { req, lease: self.state.id, secret: self.state.secret })? {
            Msg::Ack { .. } => Ok(()),
            other => Err(Error::new(ErrorKind::Protocol, format!("release answered with {other:?}"))),
        }
    }

    /// Read `buf.len()` bytes at `offset` of grant `grant`.
    pub fn read(&self, grant: usize, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.state.usable()?;
        self.core.with_endpoint(self.state.server, |ep| ep.read(self, grant, offset, buf))
    }

    /// Write `data` at `offset` of grant `grant`.
    pub fn write(&self, grant: usize, offset: u64, data: &[u8]) -> Result<()> {
        self.state.usable()?;
        self.core.with_endpoint(self.state.server, |ep| ep.write(self, grant, offset, data))
    }

    /// Read into `dst`, a slice of an [`Arena`](crate::Arena) (zero copy over rdma; see
    /// [`Endpoint::read_into`](crate::Endpoint::read_into)).
    pub fn read_into(&self, grant: usize, offset: u64, dst: &mut ArenaSlice<'_>) -> Result<()> {
        self.state.usable()?;
        self.core.with_endpoint(self.state.server, |ep| ep.read_into(self, grant, offset, dst))
    }

    /// Write `src`, a slice of an [`Arena`](crate::Arena) (zero copy over rdma; see
    /// [`Endpoint::write_from`](crate::Endpoint::write_from)).
    pub fn write_from(&self, grant: usize, offset: u64, src: &ArenaSlice<'_>) -> Result<()> {
        self.state.usable()?;
        self.core.with_endpoint(self.state.server, |ep| ep.write_from(self, grant, offset, src))
    }

    /// Compare-and-swap the 8-byte-aligned u64 at `offset`; returns the old value.
    pub fn compare_swap(&self, grant: usize, offset: u64, expect: u64, new: u64) -> Result<u64> {
        self.state.usable()?;
        self.core.with_endpoint(self.state.server, |ep| ep.compare_swap(self, grant, offset, expect, new))
    }

    /// Fetch-and-add on the 8-byte-aligned u64 at `offset`; returns the old value.
    pub fn fetch_add(&self, grant: usize, offset: u64, add: u64) -> Result<u64> {
        self.state.usable()?;
        self.core.with_endpoint(self.state.server, |ep| ep.fetch_add(self, grant, offset, add))
    }

    /// Pipelined reads of `(grant, offset, len)` items; see [`crate::Endpoint::read_many`].
    pub fn read_many(&self, items: &[(usize, u64, usize)]) -> Result<Vec<Bytes>> {
        self.state.usable()?;
        self.core.with_endpoint(self.state.server, |ep| ep.read_many(self, items))
    }

    /// Pipelined writes of `(grant, offset, data)` items; see [`crate::Endpoint::write_many`].
    pub fn write_many(&self, items: &[(usize, u64, &[u8])]) -> Result<()> {
        self.state.usable()?;
        self.core.with_endpoint(self.state.server, |ep| ep.write_many(self, items))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.state.finish(LeaseStatus::Released) {
            self.core.forget_lease(&self.state);
            self.core.release_oneway(&self.state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use farpool_core::{Credential, Epoch, Token};

    fn state(duration_ms: u64) -> LeaseState {
        let cred = Credential { lease: LeaseId(9), epoch: Epoch(1), token: Token(7), rkey: 0, base_addr: 0 };
        let grants = (0..2).map(|i| SlabGrant { slab: SlabId(10 + i), len: 4096, cred }).collect();
        LeaseState::new(LeaseId(9), 0x5ec2e7, 0, grants, Instant::now(), Duration::from_millis(duration_ms), None)
    }

    #[test]
    fn bounds_are_checked_client_side() {
        let s = state(60_000);
        assert_eq!(s.check(0, 0, 4096).unwrap().offset, 0);
        assert_eq!(s.check(1, 4088, 8).unwrap().slab, SlabId(11));
        assert_eq!(s.check(2, 0, 1).unwrap_err().kind(), ErrorKind::OutOfRange);
        assert_eq!(s.check(0, 4090, 8).unwrap_err().kind(), ErrorKind::OutOfRange);
        assert_eq!(s.check(0, u64::MAX, 2).unwrap_err().kind(), ErrorKind::OutOfRange);
    }

    #[test]
    fn revocation_and_expiry_deny_access() {
        let s = state(60_000);
        s.mark_revoking(&[SlabId(10)], Instant::now() + Duration::from_secs(60));
        assert!(s.check(0, 0, 8).is_ok(), "before the deadline access continues");
        s.mark_revoking(&[SlabId(10)], Instant::now());
        assert_eq!(s.check(0, 0, 8).unwrap_err().kind(), ErrorKind::Revoked);
        assert!(!s.mark_revoked(&[SlabId(11)]));
        assert_eq!(s.check(1, 0, 8).unwrap_err().kind(), ErrorKind::Revoked);
        assert!(s.mark_revoked(&[SlabId(10)]), "all slabs revoked");
        let short = state(1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.check(0, 0, 8).unwrap_err().message().contains("expired"));
        let t = Instant::now();
        let exp = short.renewed(t, 1000, None);
        assert_eq!(exp, t + Duration::from_secs(1));
        assert!(short.check(0, 0, 8).is_ok());
        assert!(short.finish(LeaseStatus::Released));
        assert!(!short.finish(LeaseStatus::Revoked), "only an active lease can finish");
        assert_eq!(short.check(0, 0, 8).unwrap_err().kind(), ErrorKind::Revoked);
    }

    /// The lock-free fast path is open exactly while nothing needs the slow path's checks.
    #[test]
    fn the_fast_path_closes_on_every_change_that_can_deny_access() {
        let open = |s: &LeaseState| s.clean_until.load(Ordering::Acquire) != 0;
        let s = state(60_000);
        assert!(open(&s), "a fresh active lease");
        s.mark_revoking(&[SlabId(10)], Instant::now() + Duration::from_secs(60));
        assert!(!open(&s), "a revoke notice sends every access through the slow path");
        let s = state(60_000);
        s.mark_revoked(&[SlabId(11)]);
        assert!(!open(&s));
        assert!(s.check(0, 0, 8).is_ok() && s.check(1, 0, 8).is_err());
        let s = state(60_000);
        assert!(s.finish(LeaseStatus::Released) && !open(&s));
        let short = state(1);
        std::thread::sleep(Duration::from_millis(5));
        assert!(open(&short) && short.check(0, 0, 8).is_err(), "expired: the clock closes the fast path");
        short.renewed(Instant::now(), 60_000, None);
        assert!(short.check(0, 0, 8).is_ok());
    }

    /// The split check (bounds before a READ is sent, expiry while it is in flight) gives the same
    /// verdicts as the whole one.
    #[test]
    fn the_split_check_defers_only_the_clock_of_a_clean_lease() {
        let deferred = |r: Result<(&SlabGrant, Expiry)>| matches!(r, Ok((_, Expiry::Deferred)));
        let s = state(60_000);
        assert!(deferred(s.check_bounds(1, 4088, 8)), "a clean lease leaves the clock for later");
        assert_eq!(s.check_bounds(1, 4090, 8).unwrap_err().kind(), ErrorKind::OutOfRange, "bounds come first");
        assert_eq!(s.check_bounds(2, 0, 8).unwrap_err().kind(), ErrorKind::OutOfRange);
        assert!(s.check_expiry(1, 4088, 8).is_ok());

        // Not clean: everything is checked at once, and a refusal comes before anything is sent.
        s.mark_revoked(&[SlabId(11)]);
        assert_eq!(s.check_bounds(1, 0, 8).unwrap_err().kind(), ErrorKind::Revoked);
        assert!(matches!(s.check_bounds(0, 0, 8), Ok((_, Expiry::Checked))));

        // Clean when the bounds were checked, expired by the time the clock is read.
        let short = state(1);
        assert!(deferred(short.check_bounds(0, 0, 8)));
        std::thread::sleep(Duration::from_millis(5));
        let e = short.check_expiry(0, 0, 8).unwrap_err();
        assert!(e.kind() == ErrorKind::Revoked && e.message().contains("expired"), "{e}");
        short.renewed(Instant::now(), 60_000, None);
        assert!(short.check_expiry(0, 0, 8).is_ok());
        assert!(short.finish(LeaseStatus::Released));
        assert_eq!(short.check_expiry(0, 0, 8).unwrap_err().kind(), ErrorKind::Revoked);
    }
}
