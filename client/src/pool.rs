//! The pool: servers, their control connections, the lease registry, and the user-facing [`Pool`].
//!
//! Owns: one `ServerSlot` per configured server (its control connection, negotiated transport, last
//! error, idle data endpoints), the registry of active leases (what the heartbeat renews), and the
//! event bus. `Core` is shared with the background threads and with every [`Lease`]; [`Pool`] is the
//! owner handle whose drop shuts everything down.
//!
//! Locking: a slot's `connecting` mutex serialises (re)connects and may be held across a connect; its
//! `state` mutex is only held briefly and never across I/O or a join. A control connection is never
//! closed under `state` (its reader may be waiting for that lock to report the connection down).
//!
//! Invariants: a server that is down fails calls at once with its last error until `reconnect_backoff`
//! has passed; a reconnect is bounded by `connect_timeout`; a server that goes down loses its leases
//! (reported as [`PoolEvent::LeaseLost`]) and its idle endpoints.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use farpool_core::wire::{AdminCmd, HelloOk, LEASE_FLAG_RDMA, LEASE_FLAG_SHM, Msg};
use farpool_core::{Error, ErrorKind, LeaseId, Result, TransportKind};
use parking_lot::Mutex;

use crate::arena::{Arena, Source};
use crate::config::PoolConfig;
use crate::control::{ConnEvent, ControlConn};
use crate::endpoint::{Endpoint, connect_transport};
use crate::events::{EventBus, PoolEvent};
use crate::lease::{Lease, LeaseState, LeaseStatus};
use crate::negotiate::{LocalCaps, Negotiated, ServerOffer, negotiate};

/// Which server a lease request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Round-robin over the servers, skipping ones that are down or full.
    Auto,
    /// Server `i` (index into the builder's list).
    Server(usize),
}

impl From<usize> for Target {
    fn from(i: usize) -> Self {
        Self::Server(i)
    }
}

/// The answer to an admin command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminReply {
    /// Named counters.
    pub stats: Vec<(String, u64)>,
    /// Human-readable summary.
    pub text: String,
}

impl AdminReply {
    /// The counter called `name`, if reported.
    pub fn stat(&self, name: &str) -> Option<u64> {
        self.stats.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

#[derive(Default)]
struct SlotState {
    conn: Option<Arc<ControlConn>>,
    negotiated: Option<Negotiated>,
    hello: Option<HelloOk>,
    last_error: Option<Arc<Error>>,
    last_attempt: Option<Instant>,
    generation: u64,
    /// The server's shm mappings, when shm was negotiated.
    shm: Option<Arc<crate::shm::ShmMaps>>,
}

struct ServerSlot {
    addr: String,
    connecting: Mutex<()>,
    state: Mutex<SlotState>,
    idle: Mutex<Vec<Endpoint>>,
    /// The server's RDMA grants, for the bounds checks of its RDMA endpoints.
    rdma_grants: Arc<crate::rdma::GrantBook>,
}

/// State shared by the pool handle, its threads and its leases. See the module docs.
pub(crate) struct Core {
    pub(crate) cfg: PoolConfig,
    servers: Vec<ServerSlot>,
    leases: Mutex<HashMap<(usize, LeaseId), Arc<LeaseState>>>,
    pub(crate) events: EventBus,
    closed: AtomicBool,
    next_server: AtomicUsize,
    local: LocalCaps,
    me: Weak<Core>,
}

fn closed_error() -> Error {
    Error::new(ErrorKind::Closed, "the pool has been shut down")
}

impl Core {
    fn slot(&self, server: usize) -> Result<&ServerSlot> {
        self.servers.get(server).ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                format!("server index {server} out of range (pool has {})", self.servers.len()),
            )
        })
    }

    /// The live control connection of `server`, reconnecting (bounded) if it is down.
    pub(crate) fn conn(&self, server: usize) -> Result<Arc<ControlConn>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(closed_error());
        }
        let slot = self.slot(server)?;
        let _connecting = slot.connecting.lock();
        let generation = {
            let st = slot.state.lock();
            if let Some(c) = st.conn.as_ref().filter(|c| !c.is_down()) {
                return Ok(c.clone());
            }
            if let (Some(at), Some(e)) = (st.last_attempt, &st.last_error)
                && at.elapsed() < self.cfg.reconnect_backoff
            {
                return Err(Error::new(e.kind(), format!("server {server} ({}) is down: {e}", slot.addr)));
            }
            st.generation + 1
        };
        let r = self.connect(server, generation);
        let mut st = slot.state.lock();
        st.last_attempt = Some(Instant::now());
        match r {
            Ok((conn, negotiated)) => {
                st.hello = Some(conn.hello().clone());
                st.shm = (negotiated.kind == TransportKind::Shm).then(|| {
                    crate::shm::ShmMaps::new(&conn.hello().shm_path, conn.hello().slab_size, self.cfg.op_timeout)
                });
                st.negotiated = Some(negotiated);
                st.last_error = None;
                st.generation = generation;
                let old = st.conn.replace(conn.clone());
                drop(st);
                drop(old); // closes outside the state lock
                Ok(conn)
            }
            Err(e) => {
                st.last_error = Some(Arc::new(e.duplicate()));
                Err(e)
            }
        }
    }

    /// The current control connection of `server` without reconnecting.
    pub(crate) fn current_conn(&self, server: usize) -> Result<Arc<ControlConn>> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(closed_error());
        }
        let st = self.slot(server)?.state.lock();
        match &st.conn {
            Some(c) if !c.is_down() => Ok(c.clone()),
            _ => Err(match &st.last_error {
                Some(e) => Error::new(e.kind(), format!("server {server} is down: {e}")),
                None => Error::new(ErrorKind::Unreachable, format!("server {server} is not connected")),
            }),
        }
    }

    fn connect(&self, server: usize, generation: u64) -> Result<(Arc<ControlConn>, Negotiated)> {
        let addr = &self.servers[server].addr;
        let me = self.me.clone();
        let sink = Box::new(move |ev: ConnEvent| {
            if let Some(core) = me.upgrade() {
                core.on_conn_event(server, generation, ev);
            }
        });
        let conn = ControlConn::connect(addr, &self.cfg.name, self.cfg.connect_timeout, self.cfg.op_timeout, sink)?;
        let negotiated = negotiate(self.cfg.transport, &ServerOffer::from(conn.hello()), &self.local)
            .map_err(|e| Error::new(e.kind(), format!("server {server} ({addr}): {}", e.message())))?;
        tracing::info!(server, addr = %addr, transport = %negotiated.kind, reason = %negotiated.reason, "transport negotiated");
        Ok((Arc::new(conn), negotiated))
    }

    fn on_conn_event(&self, server: usize, generation: u64, ev: ConnEvent) {
        match ev {
            ConnEvent::Notice(m) => self.on_notice(server, m),
            ConnEvent::Down(e) => self.on_down(server, generation, e),
        }
    }

    fn on_notice(&self, server: usize, m: Msg) {
        let lease_of = |id: LeaseId| self.leases.lock().get(&(server, id)).cloned();
        match m {
            Msg::RevokeNotice { lease, slabs, grace_ms } => {
                let deadline = Instant::now() + Duration::from_millis(grace_ms);
                if let Some(l) = lease_of(lease) {
                    l.mark_revoking(&slabs, deadline);
                }
                tracing::info!(server, %lease, slabs = slabs.len(), grace_ms, "revoke notice");
                self.events.emit(PoolEvent::RevokeNotice { server, lease, slabs, deadline });
            }
            Msg::Revoked { lease, slabs } => {
                if let Some(l) = lease_of(lease) {
                    self.detach_shm(&l, |s| slabs.contains(s));
                    let gone: Vec<_> = l.grants.iter().filter(|g| slabs.contains(&g.slab)).copied().collect();
                    self.servers[server].rdma_grants.remove(&gone);
                }
                if let Some(l) = lease_of(lease)
                    && l.mark_revoked(&slabs)
                    && l.finish(LeaseStatus::Revoked)
                {
                    self.forget_lease(&l);
                }
                tracing::info!(server, %lease, slabs = slabs.len(), "slabs revoked");
                self.events.emit(PoolEvent::Revoked { server, lease, slabs });
            }
            Msg::Goodbye { reason, grace_ms } => {
                tracing::info!(server, grace_ms, "server says goodbye: {reason}");
                let deadline = Instant::now() + Duration::from_millis(grace_ms);
                self.events.emit(PoolEvent::ServerGoodbye { server, reason, deadline });
            }
            Msg::ErrorReply { kind, message, .. } => {
                tracing::warn!(server, %kind, "server closes the connection: {message}")
            }
            other => tracing::warn!(server, ?other, "unexpected frame on the control connection; ignored"),
        }
    }

    fn on_down(&self, server: usize, generation: u64, e: Error) {
        let slot = &self.servers[server];
        {
            let mut st = slot.state.lock();
            if st.generation != generation {
                return; // an older connection; already replaced
            }
            st.last_error = Some(Arc::new(e.duplicate()));
        }
        tracing::warn!(server, addr = %slot.addr, "server down: {e}");
        slot.idle.lock().clear();
        let error = Arc::new(e);
        self.events.emit(PoolEvent::ServerDown { server, error: error.clone() });
        let lost: Vec<_> = self.leases.lock().values().filter(|l| l.server == server).cloned().collect();
        for l in lost {
            self.lose_lease(&l, error.clone());
        }
    }

    /// Mark a lease lost, drop it from the registry and report it.
    pub(crate) fn lose_lease(&self, l: &LeaseState, error: Arc<Error>) {
        if l.finish(LeaseStatus::Lost(error.clone())) {
            self.forget_lease(l);
            tracing::warn!(server = l.server, lease = %l.id, "lease lost: {error}");
            self.events.emit(PoolEvent::LeaseLost { server: l.server, lease: l.id, error });
        }
    }

    pub(crate) fn forget_lease(&self, l: &LeaseState) {
        self.leases.lock().remove(&(l.server, l.id));
        self.detach_shm(l, |_| true);
        if let Some(slot) = self.servers.get(l.server) {
            slot.rdma_grants.remove(&l.grants);
        }
    }

    /// The shm mappings of `server` (connecting first if needed); `Unsupported` unless shm was negotiated.
    pub(crate) fn shm_maps(&self, server: usize) -> Result<Arc<crate::shm::ShmMaps>> {
        self.conn(server)?;
        self.slot(server)?
            .state
            .lock()
            .shm
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Unsupported, format!("shm was not negotiated with server {server}")))
    }

    /// Unmap the shm grants of `l` whose slab matches `which` (nothing when shm is not in use).
    fn detach_shm(&self, l: &LeaseState, which: impl Fn(&farpool_core::SlabId) -> bool) {
        let maps = self.servers.get(l.server).and_then(|s| s.state.lock().shm.clone());
        if let Some(maps) = maps {
            let gone: Vec<_> = l.grants.iter().filter(|g| which(&g.slab)).copied().collect();
            maps.detach(&gone);
        }
    }

    /// The registered active leases (for the heartbeat).
    pub(crate) fn active_leases(&self) -> Vec<Arc<LeaseState>> {
        self.leases.lock().values().cloned().collect()
    }

    /// Send `Release` without waiting for the answer (a dropped [`Lease`]).
    pub(crate) fn release_oneway(&self, l: &LeaseState) {
        if let Ok(conn) = self.current_conn(l.server) {
            let req = conn.next_req();
            if let Err(e) = conn.send_oneway(&Msg::Release { req, lease: l.id, secret: l.secret }) {
                tracing::debug!(lease = %l.id, "release of a dropped lease not sent: {e}");
            }
        }
    }

    fn negotiated(&self, server: usize) -> Result<Negotiated> {
        self.conn(server)?;
        self.slot(server)?.state.lock().negotiated.clone().ok_or_else(closed_error)
    }

    /// A new data endpoint to `server` over the negotiated transport.
    pub(crate) fn new_endpoint(&self, server: usize) -> Result<Endpoint> {
        let kind = self.negotiated(server)?.kind;
        let c = &self.cfg;
        if kind == TransportKind::Shm {
            let t = self.shm_maps(server)?.endpoint(c.inflight_max);
            return Ok(Endpoint::new(server, Box::new(t)));
        }
        if kind == TransportKind::Rdma {
            let slot = &self.servers[server];
            let link = crate::rdma::connect(&slot.addr, c, slot.rdma_grants.clone())?;
            return Ok(Endpoint::rdma(server, link));
        }
        let t = connect_transport(
            kind,
            &self.servers[server].addr,
            &c.name,
            c.connect_timeout,
            c.op_timeout,
            c.inflight_max,
        )?;
        Ok(Endpoint::new(server, t))
    }

    /// Run `f` with an idle endpoint of `server` (or a new one), returning it to the cache if healthy.
    pub(crate) fn with_endpoint<T>(&self, server: usize, f: impl FnOnce(&mut Endpoint) -> Result<T>) -> Result<T> {
        let slot = self.slot(server)?;
        let cached = slot.idle.lock().pop();
        let mut ep = match cached {
            Some(ep) => ep,
            None => self.new_endpoint(server)?,
        };
        let r = f(&mut ep);
        if ep.is_healthy() && !self.closed.load(Ordering::SeqCst) {
            let mut idle = slot.idle.lock();
            if idle.len() < self.cfg.idle_endpoints_max {
                idle.push(ep);
            }
        }
        r
    }

    fn lease_on(&self, server: usize, slabs: u32) -> Result<Lease> {
        let conn = self.conn(server)?;
        let flags = match self.negotiated(server)?.kind {
            TransportKind::Shm => LEASE_FLAG_SHM,
            TransportKind::Rdma => LEASE_FLAG_RDMA,
            _ => 0,
        };
        let pending = conn.send("lease", |req| Msg::LeaseRequest { req, slabs, flags })?;
        let sent_at = pending.sent_at();
        let g = match pending.wait(self.cfg.op_timeout)? {
            Msg::LeaseGranted(g) => g,
            other => return Err(Error::new(ErrorKind::Protocol, format!("lease request answered with {other:?}"))),
        };
        let duration = Duration::from_millis(g.expires_in_ms);
        let state =
            Arc::new(LeaseState::new(g.lease, g.secret, server, g.grants, sent_at, duration, self.cfg.renew_interval));
        if flags == LEASE_FLAG_SHM
            && let Err(e) = self.shm_maps(server).and_then(|m| m.attach(&state.grants))
        {
            self.release_oneway(&state);
            return Err(Error::new(e.kind(), format!("mapping the shm grants of lease {}: {}", g.lease, e.message())));
        }
        if flags == LEASE_FLAG_RDMA {
            self.servers[server].rdma_grants.add(&state.grants);
        }
        self.leases.lock().insert((server, g.lease), state.clone());
        tracing::debug!(server, lease = %g.lease, slabs = state.grants.len(), expires_in_ms = g.expires_in_ms, "lease granted");
        let core = self.me.upgrade().ok_or_else(closed_error)?;
        Ok(Lease { core, state })
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        for l in self.active_leases() {
            if l.finish(LeaseStatus::Released) {
                self.forget_lease(&l);
                let st = self.servers[l.server].state.lock().conn.clone();
                if let Some(c) = st {
                    let _ = c.send_oneway(&Msg::Release { req: c.next_req(), lease: l.id, secret: l.secret });
                }
            }
        }
        for slot in &self.servers {
            let conn = slot.state.lock().conn.take();
            if let Some(c) = conn {
                c.close();
            }
            slot.idle.lock().clear();
        }
        self.events.close();
    }
}

/// A pool of far memory over one or more memory servers. Build it with [`crate::PoolBuilder`].
///
/// `Pool` is `Send + Sync`: share it with `Arc`. Dropping it releases every lease still held, closes
/// the connections and stops the background threads; [`Lease`] handles that outlive it fail with
/// `Closed`/`Revoked`.
pub struct Pool {
    core: Arc<Core>,
    heartbeat: Option<(Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<_> = self.core.servers.iter().map(|s| s.addr.as_str()).collect();
        f.debug_struct("Pool").field("servers", &addrs).field("events", &self.core.events).finish_non_exhaustive()
    }
}

impl Pool {
    pub(crate) fn start(cfg: PoolConfig) -> Result<Self> {
        let servers = cfg
            .servers
            .iter()
            .map(|a| ServerSlot {
                addr: a.clone(),
                connecting: Mutex::new(()),
                state: Mutex::default(),
                idle: Mutex::default(),
                rdma_grants: Arc::default(),
            })
            .collect();
        let events = EventBus::start(cfg.event_capacity);
        let local = LocalCaps::detect_for(&cfg.rdma);
        let core = Arc::new_cyclic(|me| Core {
            cfg,
            servers,
            leases: Mutex::default(),
            events,
            closed: AtomicBool::new(false),
            next_server: AtomicUsize::new(0),
            local,
            me: me.clone(),
        });
        let mut pool = Self { core, heartbeat: None };
        pool.connect_all()?;
        if pool.core.cfg.heartbeat {
            pool.heartbeat = Some(crate::heartbeat::start(Arc::downgrade(&pool.core))?);
        }
        Ok(pool)
    }

    fn connect_all(&self) -> Result<()> {
        let mut last = None;
        let mut up = 0;
        for i in 0..self.core.servers.len() {
            match self.core.conn(i) {
                Ok(_) => up += 1,
                Err(e) if e.kind() == ErrorKind::Unsupported => return Err(e),
                Err(e) => {
                    tracing::warn!(server = i, "server unreachable at start: {e}");
                    let error = Arc::new(e.duplicate());
                    self.core.events.emit(PoolEvent::ServerDown { server: i, error });
                    last = Some(e);
                }
            }
        }
        match (up, last) {
            (0, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// The shared core (tests inside the crate).
    #[cfg(test)]
    pub(crate) fn core(&self) -> &Core {
        &self.core
    }

    /// Number of configured servers.
    pub fn server_count(&self) -> usize {
        self.core.servers.len()
    }

    /// Address of server `server` as configured.
    pub fn server_addr(&self, server: usize) -> Option<&str> {
        self.core.servers.get(server).map(|s| s.addr.as_str())
    }

    /// The transport negotiated with `server` and why it was chosen (connecting first if needed).
    pub fn transport_of(&self, server: usize) -> Result<Negotiated> {
        self.core.negotiated(server)
    }

    /// The server's handshake (id, host, features, slab size), connecting first if needed.
    pub fn server_hello(&self, server: usize) -> Result<HelloOk> {
        self.core.conn(server).map(|c| c.hello().clone())
    }

    /// Lease `slabs` slabs from `target` (`Target::Auto` or a server index). With `Auto`, servers are
    /// tried round-robin; one that is unreachable, closed, times out or has no space is skipped, and the
    /// last such error is returned when every server was skipped.
    pub fn lease(&self, target: impl Into<Target>, slabs: u32) -> Result<Lease> {
        if slabs == 0 {
            return Err(Error::new(ErrorKind::Config, "a lease needs at least one slab"));
        }
        match target.into() {
            Target::Server(i) => self.core.lease_on(i, slabs),
            Target::Auto => {
                let n = self.core.servers.len();
                let start = self.core.next_server.fetch_add(1, Ordering::Relaxed);
                let mut last = None;
                for k in 0..n {
                    match self.core.lease_on((start + k) % n, slabs) {
                        Ok(l) => return Ok(l),
                        Err(e) if e.is_retryable() || e.kind() == ErrorKind::Closed => last = Some(e),
                        Err(e) => return Err(e),
                    }
                }
                Err(last.unwrap_or_else(|| Error::new(ErrorKind::Internal, "no server tried")))
            }
        }
    }

    /// Whether the control connection to `server` is up right now (no reconnect is attempted).
    pub fn is_up(&self, server: usize) -> bool {
        self.core.current_conn(server).is_ok()
    }

    /// Leases currently active (granted, not released, revoked or lost).
    pub fn active_lease_count(&self) -> usize {
        self.core.leases.lock().len()
    }

    /// A new stream of [`PoolEvent`]s (each call gets its own bounded channel; see
    /// [`crate::PoolBuilder::with_event_capacity`]).
    pub fn events(&self) -> Receiver<PoolEvent> {
        self.core.events.subscribe()
    }

    /// Run `f` for every later event, on the pool's event thread (it may call the pool, but should
    /// not block for long: it delays the events behind it).
    pub fn on_event(&self, f: impl Fn(&PoolEvent) + Send + Sync + 'static) {
        self.core.events.on_event(Arc::new(f));
    }

    /// Events dropped because a subscriber or the dispatcher queue was full.
    pub fn dropped_events(&self) -> u64 {
        self.core.events.dropped()
    }

    /// A new data endpoint to `server`, for one thread (one connection per endpoint).
    pub fn endpoint(&self, server: usize) -> Result<Endpoint> {
        self.core.new_endpoint(server)
    }

    /// Round trip of a `Ping` on the control connection.
    pub fn ping(&self, server: usize) -> Result<Duration> {
        let t = Instant::now();
        match self.core.conn(server)?.call("ping", |req| Msg::Ping { req })? {
            Msg::Pong { .. } => Ok(t.elapsed()),
            other => Err(Error::new(ErrorKind::Protocol, format!("ping answered with {other:?}"))),
        }
    }

    /// Run an admin command (stats, shrink, drain, grow) on `server`.
    pub fn admin(&self, server: usize, cmd: AdminCmd) -> Result<AdminReply> {
        match self.core.conn(server)?.call("admin", |req| Msg::Admin { req, cmd })? {
            Msg::AdminReply { stats, text, .. } => Ok(AdminReply { stats, text }),
            other => Err(Error::new(ErrorKind::Protocol, format!("admin answered with {other:?}"))),
        }
    }

    /// A zeroed, page-aligned [`Arena`] of `len` bytes for zero-copy reads and writes: registered with
    /// the client's RDMA device when the pool may use rdma and the device opens, plain memory otherwise
    /// (see [`crate::arena`]). `Config` for 0 bytes; a failed allocation or registration is an error
    /// with its reason (e.g. `ulimit -l` too low).
    pub fn arena(&self, len: usize) -> Result<Arena> {
        Arena::new(self.config(), Source::Zeroed(len))
    }

    /// [`arena`](Self::arena) over the caller's memory (e.g. a buffer manager's frames); the memory comes
    /// back, deregistered, with [`Arena::into_box`]. `Config` for an empty slice. If the device refuses
    /// to register it, the memory is not lost: the arena is plain memory (a warning says why, and
    /// [`Arena::device`] is `None`).
    pub fn arena_from(&self, mem: Box<[u8]>) -> Result<Arena> {
        Arena::new(self.config(), Source::Caller(mem))
    }

    /// The configuration the pool was built with.
    pub fn config(&self) -> &PoolConfig {
        &self.core.cfg
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.heartbeat.take() {
            drop(stop);
            let _ = thread.join();
        }
        self.core.shutdown();
    }
}
