//! Server state shared by all connections: the pool's regions, the slab allocator, the lease table, the
//! grant table of the data plane, the connection registry and the counters.
//!
//! Locking: `control` (a mutex) serializes every control-plane change (grant, renew, release, expiry,
//! shrink, drain, grow). While holding it, the control plane may take the grant table's write lock for
//! a moment; the data plane never takes `control`. Messages for other connections (revoke notices) are
//! collected in an [`Outbox`] under the lock and delivered after it is released.
//!
//! Invariants: a slab is returned to the allocator only after its grant was removed from the grant table
//! and its memory discarded (so free slabs read as zeros); a lease's slab list equals the set of slabs
//! the allocator shows granted to it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use farpool_core::wire::{LEASE_FLAG_RDMA, LEASE_FLAG_SHM, LeaseGrant, MAX_LIST_LEN, Msg};
use farpool_core::{Credential, ErrorKind, LeaseId, Result, ServerId, SlabGrant, SlabId, Token};
use farpool_cxl::Region;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::alloc::{SlabAllocator, SlabState};
use crate::config::ServerConfig;
use crate::grants::{Grant, GrantTable, LeaseClock, SlabMem};
use crate::stats::{Counters, ServerStats};

/// Identifies a connection in the registry.
pub type ConnId = u64;

/// Frames queued per connection for delivery by its task (notices, goodbye). Bounded: when a client
/// does not read, further notices are dropped (and logged); its ops then fail with `Revoked`.
pub const CONN_QUEUE_LEN: usize = 1024;

/// How many ended lease ids are remembered, to answer `Revoked` rather than `Unauthorized` for them.
const ENDED_LEASES_KEPT: usize = 4096;

/// Messages to deliver to other connections once the control lock is released.
pub type Outbox = Vec<(ConnId, Msg)>;

/// An `ErrorReply` frame.
pub fn error_reply(req: u64, kind: ErrorKind, message: impl Into<String>) -> Msg {
    Msg::ErrorReply { req, kind, message: message.into() }
}

#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) slabs: Vec<SlabId>,
    pub(crate) owner: ConnId,
    /// What `Renew` and `Release` must carry (sent once, in `LeaseGranted`).
    pub(crate) secret: u64,
    pub(crate) clock: Arc<LeaseClock>,
}

/// Slabs to revoke at a deadline.
#[derive(Debug)]
pub(crate) struct PendingRevoke {
    pub(crate) deadline_ms: u64,
    pub(crate) slabs: Vec<SlabId>,
}

/// Where a pool slab lives: which region, at which offset.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlabHome {
    region: usize,
    offset: u64,
}

/// Everything behind the control lock.
#[derive(Debug, Default)]
pub(crate) struct Control {
    pub(crate) alloc: SlabAllocator,
    pub(crate) regions: Vec<Arc<Region>>,
    homes: Vec<SlabHome>,
    pub(crate) leases: HashMap<LeaseId, Lease>,
    ended: VecDeque<LeaseId>,
    ended_set: HashSet<LeaseId>,
    pub(crate) pending: Vec<PendingRevoke>,
    pub(crate) draining: bool,
}

impl Control {
    /// The pool region and offset of a slab.
    pub(crate) fn region_of(&self, slab: SlabId) -> (Arc<Region>, u64) {
        let home = self.homes[slab.0 as usize];
        (self.regions[home.region].clone(), home.offset)
    }

    fn remember_ended(&mut self, id: LeaseId) {
        if self.ended.len() == ENDED_LEASES_KEPT
            && let Some(old) = self.ended.pop_front()
        {
            self.ended_set.remove(&old);
        }
        self.ended.push_back(id);
        self.ended_set.insert(id);
    }

    /// The error for a lease id that is not live.
    fn not_live(&self, req: u64, lease: LeaseId) -> Msg {
        if self.ended_set.contains(&lease) {
            error_reply(req, ErrorKind::Revoked, format!("lease {lease} has ended (expired, released or revoked)"))
        } else {
            error_reply(req, ErrorKind::Unauthorized, format!("unknown lease {lease}"))
        }
    }
}

/// State shared by every task of one server. See the module docs.
#[derive(Debug)]
pub struct Shared {
    pub(crate) cfg: ServerConfig,
    pub(crate) server_id: ServerId,
    pub(crate) host_id: String,
    start: Instant,
    pub(crate) grants: GrantTable,
    pub(crate) control: Mutex<Control>,
    conns: Mutex<HashMap<ConnId, mpsc::Sender<Msg>>>,
    next_conn: AtomicU64,
    pub(crate) conn_count: AtomicUsize,
    pub(crate) counters: Counters,
    /// The shm transport, when offered.
    pub(crate) shm: Option<crate::shm::ShmState>,
    /// The RDMA transport (offered or not; see [`crate::rdma`]).
    pub(crate) rdma: crate::rdma::RdmaState,
}

impl Shared {
    /// Reserve the pool and build the state.
    pub(crate) fn new(cfg: ServerConfig) -> Result<Self> {
        let shared = Self {
            server_id: ServerId(rand::random::<u64>() | 1),
            host_id: farpool_core::tcp::local_host_id(),
            start: Instant::now(),
            grants: GrantTable::default(),
            control: Mutex::new(Control::default()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            conn_count: AtomicUsize::new(0),
            counters: Counters::default(),
            shm: crate::shm::ShmState::start(&cfg)?,
            rdma: crate::rdma::RdmaState::start(&cfg),
            cfg,
        };
        let slabs = shared.cfg.slab_count();
        shared.add_region(&mut shared.control.lock(), slabs)?;
        Ok(shared)
    }

    /// Milliseconds since the server started (the clock of lease expiry).
    pub(crate) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Map a region of `slabs` slabs and add them to the free pool.
    pub(crate) fn add_region(&self, ctl: &mut Control, slabs: u64) -> Result<()> {
        let slab = self.cfg.slab_size_bytes;
        let n = u32::try_from(slabs).map_err(|_| farpool_core::Error::new(ErrorKind::Config, "too many slabs"))?;
        let name = format!("farpool-pool-{}", ctl.regions.len());
        let region = Arc::new(self.cfg.backing.map((slabs * slab) as usize, &name)?);
        self.rdma.register_region(&region)?;
        let index = ctl.regions.len();
        ctl.regions.push(region);
        ctl.homes.extend((0..u64::from(n)).map(|i| SlabHome { region: index, offset: i * slab }));
        ctl.alloc.add(n);
        self.grants.ensure_len(ctl.alloc.len());
        Ok(())
    }

    /// The memory behind a new grant of `slab`: a piece of a pool region, or for an shm lease a fresh
    /// memfd of its own (see [`crate::shm`]). For an rdma lease the grant also gets its own memory region,
    /// whose rkey and address go into `cred`.
    fn grant_mem(&self, ctl: &Control, slab: SlabId, flags: u32, cred: &mut Credential) -> Result<SlabMem> {
        if flags & LEASE_FLAG_SHM != 0
            && let Some(shm) = &self.shm
        {
            return shm.grant_mem(cred.lease, slab, cred.epoch, cred.token, self.cfg.slab_size_bytes);
        }
        let home = ctl.homes[slab.0 as usize];
        let mem =
            SlabMem { region: ctl.regions[home.region].clone(), offset: home.offset, len: self.cfg.slab_size_bytes };
        if flags & LEASE_FLAG_RDMA != 0 {
            (cred.rkey, cred.base_addr) = self.rdma.grant(cred.lease, slab, &mem)?;
        }
        Ok(mem)
    }

    // ---- connections ----

    /// Register a connection; returns its id and the receiver of frames queued for it.
    pub(crate) fn register_conn(&self) -> (ConnId, mpsc::Receiver<Msg>) {
        let id = self.next_conn.fetch_add(1, Relaxed);
        let (tx, rx) = mpsc::channel(CONN_QUEUE_LEN);
        self.conns.lock().insert(id, tx);
        (id, rx)
    }

    /// Forget a connection (its leases stay until they expire or are renewed from another connection).
    pub(crate) fn unregister_conn(&self, id: ConnId) {
        self.conns.lock().remove(&id);
        self.rdma.drop_conn(id);
    }

    /// Deliver queued messages (best effort: a full or closed queue drops the message, logged).
    pub(crate) fn deliver(&self, outbox: Outbox) {
        if outbox.is_empty() {
            return;
        }
        let conns = self.conns.lock();
        for (conn, msg) in outbox {
            let Some(tx) = conns.get(&conn) else {
                tracing::debug!(conn, "dropping {msg:?}: connection is gone");
                continue;
            };
            if let Err(e) = tx.try_send(msg) {
                tracing::warn!(conn, "dropping a notice for a connection that does not read: {e}");
            }
        }
    }

    /// Queue `msg` for every connection.
    pub(crate) fn broadcast(&self, msg: &Msg) {
        for tx in self.conns.lock().values() {
            let _ = tx.try_send(msg.clone());
        }
    }

    // ---- leases ----

    /// Handle `LeaseRequest`.
    pub(crate) fn lease_request(&self, conn: ConnId, req: u64, slabs: u32, flags: u32) -> Msg {
        let n = slabs as usize;
        if n == 0 || n > MAX_LIST_LEN {
            return error_reply(req, ErrorKind::Config, format!("a lease takes 1..={MAX_LIST_LEN} slabs, not {n}"));
        }
        let offered =
            if self.shm.is_some() { LEASE_FLAG_SHM } else { 0 } | if self.rdma.offered() { LEASE_FLAG_RDMA } else { 0 };
        if flags & LEASE_FLAG_SHM != 0 && flags & LEASE_FLAG_RDMA != 0 {
            return error_reply(req, ErrorKind::Config, "a lease is for shm or for rdma, not both");
        }
        if flags & !offered != 0 {
            let m = format!("lease flags {flags:#x} are not offered by this server (offered: {offered:#x})");
            return error_reply(req, ErrorKind::Unsupported, m);
        }
        let mut ctl = self.control.lock();
        if ctl.draining {
            self.counters.error(ErrorKind::NoSpace);
            return error_reply(req, ErrorKind::NoSpace, "server is draining: no new leases");
        }
        let id = loop {
            let id = LeaseId(rand::random::<u64>());
            if id.0 != 0 && !ctl.leases.contains_key(&id) && !ctl.ended_set.contains(&id) {
                break id;
            }
        };
        let Some(got) = ctl.alloc.grant(n, id) else {
            self.counters.error(ErrorKind::NoSpace);
            let free = ctl.alloc.counts().free;
            return error_reply(req, ErrorKind::NoSpace, format!("{n} slabs requested, {free} free"));
        };
        let clock = Arc::new(LeaseClock::new(self.now_ms() + self.cfg.lease_ms));
        let mut grants = Vec::with_capacity(n);
        let mut mems = Vec::with_capacity(n);
        for (slab, epoch) in &got {
            let mut cred =
                Credential { lease: id, epoch: *epoch, token: Token(rand::random::<u64>()), rkey: 0, base_addr: 0 };
            match self.grant_mem(&ctl, *slab, flags, &mut cred) {
                Ok(mem) => mems.push(mem),
                Err(e) => {
                    // Undo: nothing was published yet; give every slab back untouched.
                    mems.iter().zip(&got).for_each(|(_, (s, _))| {
                        self.rdma.revoke(id, *s);
                        self.forget_shm(id, *s);
                    });
                    for (s, _) in &got {
                        ctl.alloc.reclaim(*s);
                    }
                    self.counters.error(e.kind());
                    return error_reply(req, e.kind(), format!("cannot create the grant's memory: {e}"));
                }
            }
            grants.push(SlabGrant { slab: *slab, len: self.cfg.slab_size_bytes, cred });
        }
        for (g, mem) in grants.iter().zip(mems) {
            let grant = Grant { lease: id, epoch: g.cred.epoch, token: g.cred.token, mem, clock: clock.clone() };
            self.grants.insert(g.slab, grant);
        }
        let secret = rand::random::<u64>();
        ctl.leases.insert(id, Lease { slabs: got.iter().map(|g| g.0).collect(), owner: conn, secret, clock });
        self.counters.leases_granted.fetch_add(1, Relaxed);
        tracing::debug!(lease = %id, slabs = n, conn, "lease granted");
        Msg::LeaseGranted(LeaseGrant { req, lease: id, expires_in_ms: self.cfg.lease_ms, secret, grants })
    }

    /// Handle `Renew`: extend the lease and make this connection the one that receives its notices.
    pub(crate) fn renew(&self, conn: ConnId, req: u64, lease: LeaseId, secret: u64) -> Msg {
        let now = self.now_ms();
        let mut ctl = self.control.lock();
        let Some(l) = ctl.leases.get_mut(&lease).filter(|l| l.secret == secret) else {
            return self.refuse_lease_call(&ctl, conn, req, lease, "Renew");
        };
        if l.clock.expired(now) {
            let mut outbox = Outbox::new();
            self.end_lease(&mut ctl, lease, &mut outbox);
            self.counters.leases_expired.fetch_add(1, Relaxed);
            drop(ctl);
            self.deliver(outbox);
            return error_reply(req, ErrorKind::Revoked, format!("lease {lease} expired before renewal"));
        }
        l.clock.set(now + self.cfg.lease_ms);
        l.owner = conn;
        Msg::Renewed { req, lease, expires_in_ms: self.cfg.lease_ms }
    }

    /// Handle `Release`.
    pub(crate) fn release(&self, conn: ConnId, req: u64, lease: LeaseId, secret: u64) -> Msg {
        let mut ctl = self.control.lock();
        if ctl.leases.get(&lease).is_none_or(|l| l.secret != secret) {
            return self.refuse_lease_call(&ctl, conn, req, lease, "Release");
        }
        let mut outbox = Outbox::new();
        self.end_lease(&mut ctl, lease, &mut outbox);
        self.counters.leases_released.fetch_add(1, Relaxed);
        // The releasing client asked for it: no Revoked frame.
        Msg::Ack { req }
    }

    /// The answer to a `Renew` or `Release` of a lease that is not live, or with the wrong secret. A
    /// wrong secret is answered exactly like an unknown lease (`Unauthorized`): the reply does not say
    /// whether the lease exists. It is counted and logged.
    fn refuse_lease_call(&self, ctl: &Control, conn: ConnId, req: u64, lease: LeaseId, what: &str) -> Msg {
        if ctl.leases.contains_key(&lease) {
            tracing::info!(conn, %lease, "{what} with a wrong lease secret refused");
            self.counters.error(ErrorKind::Unauthorized);
        }
        ctl.not_live(req, lease)
    }

    /// End a lease: revoke every slab it holds; queues `Revoked` for its owner in `outbox` when given.
    pub(crate) fn end_lease(&self, ctl: &mut Control, lease: LeaseId, outbox: &mut Outbox) {
        let Some(l) = ctl.leases.remove(&lease) else { return };
        self.reclaim(ctl, &l.slabs);
        ctl.remember_ended(lease);
        outbox.push((l.owner, Msg::Revoked { lease, slabs: l.slabs }));
    }

    /// Remove the grants of `slabs`, zero their memory, and give them back to the allocator.
    fn reclaim(&self, ctl: &mut Control, slabs: &[SlabId]) {
        let removed = self.grants.remove(slabs);
        assert_eq!(removed.len(), slabs.len(), "reclaiming slabs that have no grant");
        for (slab, g) in slabs.iter().zip(&removed) {
            // The NIC must refuse the grant's rkey (and its MR unpin the slab) before its bytes are
            // discarded or reused.
            self.rdma.revoke(g.lease, *slab);
            if let Err(e) = g.mem.discard() {
                // Never hand out memory we could not zero: take the slab out of capacity instead.
                tracing::error!(%slab, "cannot zero slab, removing it from capacity: {e}");
                ctl.alloc.retire(*slab);
            }
            self.forget_shm(g.lease, *slab);
            ctl.alloc.reclaim(*slab);
        }
    }

    /// Drop the shm registry entry of a grant, if it had one (its memory is already discarded).
    fn forget_shm(&self, lease: LeaseId, slab: SlabId) {
        if let Some(shm) = &self.shm {
            shm.forget(lease, slab);
        }
    }

    /// Revoke `slabs` now (those still granted), queueing `Revoked` per lease for the owners.
    pub(crate) fn revoke_slabs(&self, ctl: &mut Control, slabs: &[SlabId], outbox: &mut Outbox) {
        let mut by_lease: HashMap<LeaseId, Vec<SlabId>> = HashMap::new();
        for s in slabs {
            if let Some(SlabState::Granted { lease, .. }) = ctl.alloc.state(*s) {
                by_lease.entry(lease).or_default().push(*s);
            }
        }
        for (lease, gone) in by_lease {
            let l = ctl.leases.get_mut(&lease).expect("granted slab belongs to a live lease");
            l.slabs.retain(|s| !gone.contains(s));
            let (owner, empty) = (l.owner, l.slabs.is_empty());
            self.reclaim(ctl, &gone);
            self.counters.slabs_revoked.fetch_add(gone.len() as u64, Relaxed);
            if empty {
                ctl.leases.remove(&lease);
                ctl.remember_ended(lease);
            }
            outbox.push((owner, Msg::Revoked { lease, slabs: gone }));
        }
    }

    /// Reclaim expired leases and carry out revocations whose deadline passed. Called by the
    /// housekeeping tick; returns how many leases expired.
    pub(crate) fn housekeeping(&self) -> usize {
        let now = self.now_ms();
        let mut outbox = Outbox::new();
        let mut ctl = self.control.lock();
        let expired: Vec<LeaseId> =
            ctl.leases.iter().filter(|(_, l)| l.clock.expired(now)).map(|(id, _)| *id).collect();
        for id in &expired {
            tracing::info!(lease = %id, "lease expired; reclaiming its slabs");
            self.end_lease(&mut ctl, *id, &mut outbox);
        }
        self.counters.leases_expired.fetch_add(expired.len() as u64, Relaxed);
        self.run_due_revocations(&mut ctl, now, &mut outbox);
        drop(ctl);
        self.deliver(outbox);
        expired.len()
    }

    /// Carry out the pending revocations due at `now_ms`.
    pub(crate) fn run_due_revocations(&self, ctl: &mut Control, now_ms: u64, outbox: &mut Outbox) {
        let (due, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut ctl.pending).into_iter().partition(|p| p.deadline_ms <= now_ms);
        ctl.pending = later;
        for p in due {
            tracing::info!(slabs = p.slabs.len(), "grace period over: revoking slabs");
            self.revoke_slabs(ctl, &p.slabs, outbox);
        }
    }

    /// Revoke every lease at once (shutdown).
    pub(crate) fn revoke_all(&self) {
        let mut outbox = Outbox::new();
        let mut ctl = self.control.lock();
        let all: Vec<LeaseId> = ctl.leases.keys().copied().collect();
        for id in all {
            let n = ctl.leases[&id].slabs.len() as u64;
            self.end_lease(&mut ctl, id, &mut outbox);
            self.counters.slabs_revoked.fetch_add(n, Relaxed);
        }
        ctl.pending.clear();
        drop(ctl);
        self.deliver(outbox);
    }

    /// A stats snapshot.
    pub(crate) fn stats(&self) -> ServerStats {
        let ctl = self.control.lock();
        let c = ctl.alloc.counts();
        ServerStats {
            slabs_total: c.total(),
            slabs_free: c.free,
            slabs_granted: c.granted,
            slabs_retiring: c.retiring,
            slabs_removed: c.removed,
            slab_size_bytes: self.cfg.slab_size_bytes,
            leases_active: ctl.leases.len() as u64,
            connections: self.conn_count.load(Relaxed) as u64,
            draining: ctl.draining,
            ..ServerStats::default()
        }
        .with_counters(&self.counters)
    }
}
