//! The simulated cluster: N memory servers lending slabs, implementing the page tier's [`FarBackend`].
//!
//! Each server slot holds one incarnation at a time: an id, a liveness flag and its slabs. A slab grant
//! carries a lease id, a random token and an epoch bumped on every grant; memory is zeroed when a slab is
//! granted again (no tenant sees another's bytes) and dropped when it is released, revoked or its server
//! crashes. Every operation is checked the way a real server checks it: server alive, slab exists, grant
//! current (stale epoch -> `Revoked`, wrong token or lease -> `Unauthorized`), bounds, atomic alignment.
//!
//! Controls (driven by the run's schedule): crash (memory gone, every op `Unreachable`, optionally
//! announced with `ServerDown`), restart (a new incarnation with a new id, as a real server picks a new
//! id at start), a whole-server revoke notice (drain) or a partial one (shrink) with a grace, the revoke
//! itself, and growth (retired slabs come back).
//!
//! Notices and revocations name grants ([`GrantRef`]: slab and lease), as a real server's frames name
//! the lease: lease ids are never reused, so an event about an old grant never names a newer grant of the
//! same slab id, and a revoke takes only the grants its notice named (not a newer grant of the slab).
//!
//! Locking: one mutex over all server state; operations are short memcpys, so it is never held long and
//! never across a call into the tier. Events are sent after the lock is released.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use farpool::tier::{BackendEvent, FarBackend, FarSlab, GrantRef};
use farpool_core::transport::apply_to_bytes;
use farpool_core::{
    Credential, Epoch, Error, ErrorKind, LeaseId, OpKind, OpOutput, Result, ServerId, SlabGrant, SlabId, Token,
    Transport, WorkRequest,
};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::clock::{SimClock, mix};
use crate::endpoint::SimEndpoint;
use crate::faults::SimFaults;
use crate::stats::{SimCounters, SimStats};

/// Shape of the simulated cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Server slots.
    pub servers: usize,
    /// Slabs per server.
    pub slabs_per_server: usize,
    /// Bytes per slab.
    pub slab_bytes: u64,
    /// Operations in flight per endpoint at most.
    pub inflight_max: usize,
    /// The endpoints' op timeout (wall-time bound of the tier's waits; virtual time of a dropped op).
    pub op_timeout: Duration,
    /// Whether growth may bring back slabs that were revoked from a tenant (re-granting a slab id whose
    /// `Revoked` event may still be on its way: see the crate docs, finding 3).
    pub regrant_revoked: bool,
}

impl ClusterConfig {
    /// `servers` servers of `slabs_per_server` slabs of `slab_bytes`; 16 ops in flight per endpoint,
    /// op timeout 2 s, revoked slabs never granted again.
    pub fn new(servers: usize, slabs_per_server: usize, slab_bytes: u64) -> Self {
        let op_timeout = Duration::from_secs(2);
        Self { servers, slabs_per_server, slab_bytes, inflight_max: 16, op_timeout, regrant_revoked: false }
    }
}

#[derive(Debug)]
struct SlabMem {
    data: Vec<u8>,
    grant: Option<Credential>,
    epoch: u64,
    /// Taken away by a shrink: granted to nobody until grown back.
    retired: bool,
    /// Retired while granted (so revoked from a tenant).
    revoked_away: bool,
}

#[derive(Debug)]
struct ServerMem {
    id: ServerId,
    incarnation: u64,
    alive: bool,
    /// Under a whole-server notice: grants nothing.
    draining: bool,
    slabs: Vec<SlabMem>,
}

impl ServerMem {
    fn new(seed: u64, slot: usize, incarnation: u64, slabs: usize) -> Self {
        let id = ServerId(mix(mix(seed, 0x5E4E_0000 + slot as u64), incarnation) >> 16);
        let slabs = (0..slabs)
            .map(|_| SlabMem { data: Vec::new(), grant: None, epoch: 0, retired: false, revoked_away: false })
            .collect();
        Self { id, incarnation, alive: true, draining: false, slabs }
    }

    fn granted(&self) -> Vec<GrantRef> {
        let grant = |(i, m): (usize, &SlabMem)| m.grant.map(|c| GrantRef { slab: SlabId(i as u32), lease: c.lease });
        self.slabs.iter().enumerate().filter_map(grant).collect()
    }
}

#[derive(Debug)]
struct State {
    servers: Vec<ServerMem>,
    /// Crashed incarnations and whether their crash was announced.
    crashed: Vec<(ServerId, bool)>,
    tokens: SmallRng,
    next_lease: u64,
    rr: usize,
}

/// A write that was reported failed but lands at `due_ns` of virtual time.
#[derive(Debug)]
pub(crate) struct Late {
    pub(crate) due_ns: u64,
    pub(crate) server: ServerId,
    pub(crate) wr: WorkRequest,
}

/// Shared by the cluster handle and its endpoints.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) cfg: ClusterConfig,
    pub(crate) seed: u64,
    pub(crate) clock: SimClock,
    pub(crate) faults: SimFaults,
    pub(crate) counters: SimCounters,
    state: Mutex<State>,
    limbo: Mutex<Vec<Late>>,
    subscribers: Mutex<Vec<Sender<BackendEvent>>>,
    endpoint_seq: AtomicU64,
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> Error {
    Error::new(kind, msg)
}

impl Core {
    pub(crate) fn is_alive(&self, server: ServerId) -> bool {
        self.state.lock().servers.iter().any(|s| s.id == server && s.alive)
    }

    /// Execute `wr` on `server` as a real server would; `prefix` limits a write to its first bytes.
    pub(crate) fn exec(&self, server: ServerId, wr: &WorkRequest, prefix: Option<usize>) -> Result<OpOutput> {
        let mut st = self.state.lock();
        let Some(s) = st.servers.iter_mut().find(|s| s.id == server && s.alive) else {
            SimCounters::add(&self.counters.unreachable, 1);
            return Err(err(ErrorKind::Unreachable, format!("server {server} is down")));
        };
        wr.op.check(&wr.addr)?;
        let m = s.slabs.get_mut(wr.addr.slab.0 as usize).ok_or_else(|| err(ErrorKind::OutOfRange, "no such slab"))?;
        let cred = &wr.addr.cred;
        let refused = match m.grant {
            None => Some(err(ErrorKind::Revoked, "slab not granted (revoked or released)")),
            Some(g) if g.epoch != cred.epoch => Some(err(ErrorKind::Revoked, "stale epoch: slab re-granted")),
            Some(g) if g.token != cred.token || g.lease != cred.lease => {
                Some(err(ErrorKind::Unauthorized, "wrong token or lease"))
            }
            Some(_) => None,
        };
        if let Some(e) = refused {
            SimCounters::add(&self.counters.refused_credential, 1);
            return Err(e);
        }
        let at = wr.addr.offset as usize;
        if at.checked_add(wr.op.len() as usize).is_none_or(|end| end > m.data.len()) {
            return Err(err(ErrorKind::OutOfRange, "beyond the slab"));
        }
        SimCounters::add(&self.counters.executed, 1);
        match (&wr.op, prefix) {
            // A torn write: only its first `n` bytes land.
            (OpKind::Write { data }, Some(n)) => {
                let torn = OpKind::Write { data: data.slice(..n.min(data.len())) };
                apply_to_bytes(&mut m.data, wr.addr.offset, &torn)
            }
            (op, _) => apply_to_bytes(&mut m.data, wr.addr.offset, op),
        }
    }

    pub(crate) fn defer(&self, late: Late) {
        self.limbo.lock().push(late);
    }

    /// Execute the late writes due by `now_ns` (their results go nowhere: the client gave up on them).
    pub(crate) fn land_late(&self, now_ns: u64) {
        let due: Vec<Late> = {
            let mut l = self.limbo.lock();
            if l.is_empty() {
                return;
            }
            let (due, keep) = l.drain(..).partition(|x| x.due_ns <= now_ns);
            *l = keep;
            due
        };
        for x in due {
            let _ = self.exec(x.server, &x.wr, None);
        }
    }

    fn emit(&self, ev: BackendEvent) {
        self.subscribers.lock().retain(|tx| tx.try_send(ev.clone()).is_ok());
    }
}

/// The simulated cluster. Cheap to clone (shared state). See the module docs.
#[derive(Clone, Debug)]
pub struct SimCluster {
    core: Arc<Core>,
}

impl SimCluster {
    /// A cluster shaped by `cfg` whose every random decision derives from `seed`.
    pub fn new(cfg: ClusterConfig, faults: SimFaults, seed: u64) -> Self {
        let servers = (0..cfg.servers).map(|i| ServerMem::new(seed, i, 0, cfg.slabs_per_server)).collect();
        let state = State {
            servers,
            crashed: Vec::new(),
            tokens: SmallRng::seed_from_u64(mix(seed, 0x70CE)),
            next_lease: 1,
            rr: 0,
        };
        let core = Core {
            cfg,
            seed,
            clock: SimClock::new(),
            faults,
            counters: SimCounters::default(),
            state: Mutex::new(state),
            limbo: Mutex::new(Vec::new()),
            subscribers: Mutex::new(Vec::new()),
            endpoint_seq: AtomicU64::new(0),
        };
        Self { core: Arc::new(core) }
    }

    /// The virtual clock.
    pub fn clock(&self) -> &SimClock {
        &self.core.clock
    }

    /// Counters so far.
    pub fn stats(&self) -> SimStats {
        self.core.counters.snapshot()
    }

    /// The id of the current incarnation of each server slot.
    pub fn server_ids(&self) -> Vec<ServerId> {
        self.core.state.lock().servers.iter().map(|s| s.id).collect()
    }

    /// Server slots alive now.
    pub fn alive(&self) -> usize {
        self.core.state.lock().servers.iter().filter(|s| s.alive).count()
    }

    /// Bytes granted on live servers (what a leak-free client holds, once it has heard of every loss).
    pub fn granted_bytes_alive(&self) -> u64 {
        let st = self.core.state.lock();
        let n: usize = st.servers.iter().filter(|s| s.alive).map(|s| s.granted().len()).sum();
        n as u64 * self.core.cfg.slab_bytes
    }

    /// Crash slot `slot`: its memory is gone and every operation on it fails with `Unreachable`. With
    /// `announce`, send `ServerDown`. Returns the crashed id (`None` if it was down already).
    pub fn crash(&self, slot: usize, announce: bool) -> Option<ServerId> {
        let id = {
            let mut st = self.core.state.lock();
            let s = st.servers.get_mut(slot).filter(|s| s.alive)?;
            s.alive = false;
            s.slabs.iter_mut().for_each(|m| (m.data, m.grant) = (Vec::new(), None));
            let id = s.id;
            st.crashed.push((id, announce));
            id
        };
        SimCounters::add(&self.core.counters.crashes, 1);
        if announce {
            self.core.emit(BackendEvent::ServerDown { server: id });
        }
        Some(id)
    }

    /// Start a new incarnation in slot `slot` (new id, empty memory) if it is down or drained.
    pub fn restart(&self, slot: usize) -> Option<ServerId> {
        let mut st = self.core.state.lock();
        let cur = st.servers.get(slot)?;
        if cur.alive && !cur.draining {
            return None;
        }
        let (incarnation, n) = (cur.incarnation + 1, cur.slabs.len());
        if cur.alive {
            // A drained server leaves for good; whatever it still granted is gone with it.
            let id = cur.id;
            st.crashed.push((id, false));
        }
        st.servers[slot] = ServerMem::new(self.core.seed, slot, incarnation, n);
        SimCounters::add(&self.core.counters.restarts, 1);
        Some(st.servers[slot].id)
    }

    /// Revoke notice for every grant of slot `slot`, which grants nothing from now on (a drain); returns
    /// the server and the grants noticed.
    pub fn drain(&self, slot: usize, grace: Duration) -> Option<(ServerId, Vec<GrantRef>)> {
        let (id, slabs) = {
            let mut st = self.core.state.lock();
            let s = st.servers.get_mut(slot).filter(|s| s.alive && !s.draining)?;
            s.draining = true;
            (s.id, s.granted())
        };
        self.notice(id, slabs, grace)
    }

    /// Retire `count` slabs of slot `slot` (granted ones first); their grants get a revoke notice (returned).
    pub fn shrink(&self, slot: usize, count: usize, grace: Duration) -> Option<(ServerId, Vec<GrantRef>)> {
        let (id, slabs) = {
            let mut st = self.core.state.lock();
            let s = st.servers.get_mut(slot).filter(|s| s.alive)?;
            let mut noticed = Vec::new();
            // Slabs in use first: taking back memory a tenant holds is the case worth simulating.
            let live: Vec<usize> = (0..s.slabs.len()).rev().filter(|&i| !s.slabs[i].retired).collect();
            let (used, idle): (Vec<usize>, Vec<usize>) = live.into_iter().partition(|&i| s.slabs[i].grant.is_some());
            let picked: Vec<usize> = used.into_iter().chain(idle).take(count).collect();
            for i in picked {
                s.slabs[i].retired = true;
                SimCounters::add(&self.core.counters.shrunk_slabs, 1);
                if let Some(c) = s.slabs[i].grant {
                    s.slabs[i].revoked_away = true;
                    noticed.push(GrantRef { slab: SlabId(i as u32), lease: c.lease });
                }
            }
            (s.id, noticed)
        };
        self.notice(id, slabs, grace)
    }

    fn notice(&self, server: ServerId, grants: Vec<GrantRef>, grace: Duration) -> Option<(ServerId, Vec<GrantRef>)> {
        if !grants.is_empty() {
            SimCounters::add(&self.core.counters.notices, 1);
            self.core.emit(BackendEvent::RevokeNotice { server, grants: grants.clone(), grace });
        }
        Some((server, grants))
    }

    /// Revoke `grants` of incarnation `server` now (those still current: a grant released meanwhile, or
    /// replaced by a newer grant of its slab, is left alone); sends `Revoked` for them. Returns how many.
    pub fn revoke(&self, server: ServerId, grants: &[GrantRef]) -> usize {
        let done: Vec<GrantRef> = {
            let mut st = self.core.state.lock();
            let Some(s) = st.servers.iter_mut().find(|s| s.id == server && s.alive) else { return 0 };
            grants
                .iter()
                .copied()
                .filter(|g| {
                    let Some(m) = s.slabs.get_mut(g.slab.0 as usize) else { return false };
                    if m.grant.is_none_or(|c| c.lease != g.lease) {
                        return false;
                    }
                    (m.grant, m.data) = (None, Vec::new());
                    true
                })
                .collect()
        };
        if !done.is_empty() {
            SimCounters::add(&self.core.counters.revoked_slabs, done.len() as u64);
            self.core.emit(BackendEvent::Revoked { server, grants: done.clone() });
        }
        done.len()
    }

    /// Bring back up to `count` retired, ungranted slabs of slot `slot` (revoked ones only with
    /// `regrant_revoked`); returns how many.
    pub fn grow(&self, slot: usize, count: usize) -> usize {
        let regrant = self.core.cfg.regrant_revoked;
        let mut st = self.core.state.lock();
        let Some(s) = st.servers.get_mut(slot).filter(|s| s.alive) else { return 0 };
        let back: Vec<&mut SlabMem> = s
            .slabs
            .iter_mut()
            .filter(|m| m.retired && m.grant.is_none() && (regrant || !m.revoked_away))
            .take(count)
            .collect();
        let n = back.len();
        back.into_iter().for_each(|m| (m.retired, m.revoked_away) = (false, false));
        SimCounters::add(&self.core.counters.grown_slabs, n as u64);
        n
    }

    /// Send `ServerDown` for every crashed incarnation not announced yet (what failure detection would
    /// eventually do); returns how many.
    pub fn announce_down(&self) -> usize {
        let ids: Vec<ServerId> = {
            let mut st = self.core.state.lock();
            st.crashed.iter_mut().filter(|c| !c.1).map(|c| (c.1 = true, c.0).1).collect()
        };
        for &server in &ids {
            self.core.emit(BackendEvent::ServerDown { server });
        }
        ids.len()
    }

    fn grant_one(&self, st: &mut State, i: usize, lease: LeaseId) -> Option<FarSlab> {
        let State { servers, tokens, .. } = st;
        let s = &mut servers[i];
        if !s.alive || s.draining {
            return None;
        }
        let (idx, m) = s.slabs.iter_mut().enumerate().find(|(_, m)| m.grant.is_none() && !m.retired)?;
        m.epoch += 1;
        let cred = Credential {
            lease,
            epoch: Epoch(m.epoch),
            token: Token(tokens.random::<u64>() | 1),
            rkey: 0,
            base_addr: 0,
        };
        m.grant = Some(cred);
        m.data = vec![0; self.core.cfg.slab_bytes as usize];
        SimCounters::add(&self.core.counters.grants, 1);
        let grant = SlabGrant { slab: SlabId(idx as u32), len: self.core.cfg.slab_bytes, cred };
        Some(FarSlab { server: s.id, grant })
    }
}

impl FarBackend for SimCluster {
    fn lease(&self, slabs: usize) -> Result<Vec<FarSlab>> {
        let mut st = self.core.state.lock();
        let n = st.servers.len();
        let lease = LeaseId(st.next_lease);
        st.next_lease += 1;
        let mut out = Vec::new();
        for _ in 0..slabs {
            let start = st.rr;
            let got = (0..n).find_map(|k| self.grant_one(&mut st, (start + k) % n, lease).map(|g| (g, start + k + 1)));
            let Some((g, next)) = got else { break };
            st.rr = next % n.max(1);
            out.push(g);
        }
        if out.is_empty() && slabs > 0 {
            return Err(err(ErrorKind::NoSpace, "no grantable slab on any live server"));
        }
        Ok(out)
    }

    fn release(&self, slab: &FarSlab) -> Result<()> {
        let mut st = self.core.state.lock();
        let Some(s) = st.servers.iter_mut().find(|s| s.id == slab.server && s.alive) else {
            return Err(err(ErrorKind::Unreachable, format!("server {} is down", slab.server)));
        };
        let m =
            s.slabs.get_mut(slab.grant.slab.0 as usize).ok_or_else(|| err(ErrorKind::OutOfRange, "no such slab"))?;
        if m.grant != Some(slab.grant.cred) {
            return Err(err(ErrorKind::Revoked, "release of a grant that is not current"));
        }
        (m.grant, m.data) = (None, Vec::new());
        SimCounters::add(&self.core.counters.releases, 1);
        Ok(())
    }

    fn endpoint(&self, server: ServerId) -> Result<Box<dyn Transport>> {
        if !self.core.is_alive(server) {
            SimCounters::add(&self.core.counters.unreachable, 1);
            return Err(err(ErrorKind::Unreachable, format!("server {server} is down")));
        }
        let n = self.core.endpoint_seq.fetch_add(1, Ordering::Relaxed);
        let seed = mix(self.core.seed, 0xE9D0_0000 + n);
        Ok(Box::new(SimEndpoint::new(self.core.clone(), server, seed)))
    }

    fn events(&self) -> Receiver<BackendEvent> {
        let (tx, rx) = crossbeam_channel::bounded(1024);
        self.core.subscribers.lock().push(tx);
        rx
    }
}
