//! `MemBackend`: an in-memory [`FarBackend`] for tests and examples: "servers" holding slabs of plain
//! memory, endpoints that execute one-sided operations on them with the same checks a real server makes
//! (token and epoch of the grant, bounds, server alive), optionally wrapped in
//! [`farpool_core::fault::Faulty`]; plus controls to revoke, kill and corrupt, as a test needs.
//!
//! Every grant gets a fresh token and epoch and zeroed memory, so an old credential fails with `Revoked`;
//! every `lease` call gets a new lease id, so events name grants unambiguously ([`GrantRef`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use farpool_core::fault::{FaultConfig, Faulty};
use farpool_core::{
    Completion, Credential, Epoch, Error, ErrorKind, LeaseId, OpOutput, Result, ServerId, SlabGrant, SlabId, Token,
    Transport, TransportKind, WorkRequest,
};
use parking_lot::Mutex;

use super::backend::{BackendEvent, FarBackend, FarSlab, GrantRef};

#[derive(Debug)]
struct SlabMem {
    data: Vec<u8>,
    /// Credential of the current grant; `None` when not granted.
    grant: Option<Credential>,
    epoch: u64,
}

#[derive(Debug)]
struct ServerMem {
    id: ServerId,
    alive: AtomicBool,
    /// Under a notice: grants nothing new.
    draining: AtomicBool,
    slabs: Vec<Mutex<SlabMem>>,
}

/// See the module docs.
#[derive(Debug)]
pub struct MemBackend {
    servers: Vec<Arc<ServerMem>>,
    slab_bytes: u64,
    rr: AtomicU64,
    next_token: AtomicU64,
    next_lease: AtomicU64,
    subscribers: Mutex<Vec<Sender<BackendEvent>>>,
    faults: Mutex<Option<(FaultConfig, u64)>>,
    endpoint_seq: AtomicU64,
    reverse: AtomicBool,
    /// Every lease call takes this long (a remote control round trip, in tests).
    lease_delay: Mutex<Duration>,
}

impl MemBackend {
    /// `servers` servers of `slabs_per_server` slabs of `slab_bytes` each.
    pub fn new(servers: usize, slabs_per_server: usize, slab_bytes: u64) -> Self {
        let servers = (0..servers)
            .map(|i| {
                let slabs = (0..slabs_per_server)
                    .map(|_| Mutex::new(SlabMem { data: Vec::new(), grant: None, epoch: 0 }))
                    .collect();
                Arc::new(ServerMem {
                    id: ServerId(100 + i as u64),
                    alive: AtomicBool::new(true),
                    draining: AtomicBool::new(false),
                    slabs,
                })
            })
            .collect();
        Self {
            servers,
            slab_bytes,
            rr: AtomicU64::new(0),
            next_token: AtomicU64::new(0x5eed),
            next_lease: AtomicU64::new(1),
            subscribers: Mutex::new(Vec::new()),
            faults: Mutex::new(None),
            endpoint_seq: AtomicU64::new(0),
            reverse: AtomicBool::new(false),
            lease_delay: Mutex::new(Duration::ZERO),
        }
    }

    /// Wrap every endpoint opened from now on in `Faulty` with `cfg`; endpoint `n` uses seed `seed + n`.
    pub fn set_faults(&self, cfg: Option<FaultConfig>, seed: u64) {
        *self.faults.lock() = cfg.map(|c| (c, seed));
    }

    /// Complete each posted batch in reverse order (the last operation first).
    pub fn set_reverse_completions(&self, on: bool) {
        self.reverse.store(on, Ordering::Release);
    }

    /// Make every lease call take `delay` (as a control round trip to a remote server does).
    pub fn set_lease_delay(&self, delay: Duration) {
        *self.lease_delay.lock() = delay;
    }

    /// Ids of the servers.
    pub fn server_ids(&self) -> Vec<ServerId> {
        self.servers.iter().map(|s| s.id).collect()
    }

    fn server(&self, id: ServerId) -> Option<&Arc<ServerMem>> {
        self.servers.iter().find(|s| s.id == id)
    }

    fn emit(&self, ev: BackendEvent) {
        self.subscribers.lock().retain(|tx| tx.try_send(ev.clone()).is_ok());
    }

    /// Granted slabs of `server`.
    pub fn granted(&self, server: ServerId) -> Vec<SlabId> {
        self.grants(server).into_iter().map(|g| g.slab).collect()
    }

    /// Current grants of `server`.
    pub fn grants(&self, server: ServerId) -> Vec<GrantRef> {
        let Some(s) = self.server(server) else { return Vec::new() };
        let grant = |i: usize| s.slabs[i].lock().grant.map(|c| GrantRef { slab: SlabId(i as u32), lease: c.lease });
        (0..s.slabs.len()).filter_map(grant).collect()
    }

    /// Send a revoke notice for every current grant of `server` (which grants nothing from now on); returns
    /// them.
    pub fn notice(&self, server: ServerId, grace: Duration) -> Vec<GrantRef> {
        if let Some(s) = self.server(server) {
            s.draining.store(true, Ordering::Release);
        }
        let grants = self.grants(server);
        self.emit(BackendEvent::RevokeNotice { server, grants: grants.clone(), grace });
        grants
    }

    /// Revoke these grants now (those still current: a grant released or replaced by a newer grant of its
    /// slab is left alone): their credentials stop working; sends `Revoked` for them. Returns how many.
    pub fn revoke(&self, server: ServerId, grants: &[GrantRef]) -> usize {
        let Some(s) = self.server(server) else { return 0 };
        let done: Vec<GrantRef> = grants
            .iter()
            .copied()
            .filter(|g| {
                let Some(m) = s.slabs.get(g.slab.0 as usize) else { return false };
                let mut m = m.lock();
                if m.grant.is_none_or(|c| c.lease != g.lease) {
                    return false;
                }
                m.grant = None;
                m.data.fill(0);
                true
            })
            .collect();
        if !done.is_empty() {
            self.emit(BackendEvent::Revoked { server, grants: done.clone() });
        }
        done.len()
    }

    /// Deliver `ev` to every subscriber as it is, whatever the servers hold (a late, duplicated or
    /// made-up event, as a test needs).
    pub fn send_event(&self, ev: BackendEvent) {
        self.emit(ev);
    }

    /// Crash a server: every operation on it fails with `Unreachable`. With `announce`, also send
    /// `ServerDown` (otherwise the tier finds out from failed operations).
    pub fn kill(&self, server: ServerId, announce: bool) {
        if let Some(s) = self.server(server) {
            s.alive.store(false, Ordering::Release);
        }
        if announce {
            self.emit(BackendEvent::ServerDown { server });
        }
    }

    /// Flip one byte of a slab (to test checksum detection).
    pub fn corrupt(&self, server: ServerId, slab: SlabId, offset: usize) {
        if let Some(s) = self.server(server)
            && let Some(m) = s.slabs.get(slab.0 as usize)
        {
            let mut m = m.lock();
            if let Some(b) = m.data.get_mut(offset) {
                *b ^= 0x5A;
            }
        }
    }
}

impl FarBackend for MemBackend {
    fn lease(&self, slabs: usize) -> Result<Vec<FarSlab>> {
        let delay = *self.lease_delay.lock();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut out = Vec::new();
        let n = self.servers.len() as u64;
        // One lease id per call: a slab is granted at most once per call, so (slab, lease) names a grant.
        let lease = LeaseId(self.next_lease.fetch_add(1, Ordering::Relaxed));
        for _ in 0..slabs {
            let granted = (0..n).find_map(|k| {
                let s = &self.servers[((self.rr.fetch_add(1, Ordering::Relaxed) + k) % n) as usize];
                if !s.alive.load(Ordering::Acquire) || s.draining.load(Ordering::Acquire) {
                    return None;
                }
                s.slabs.iter().enumerate().find_map(|(i, m)| {
                    let mut m = m.lock();
                    if m.grant.is_some() {
                        return None;
                    }
                    m.epoch += 1;
                    let token = Token(self.next_token.fetch_add(0x9E37, Ordering::Relaxed));
                    let cred = Credential { lease, epoch: Epoch(m.epoch), token, rkey: 0, base_addr: 0 };
                    m.grant = Some(cred);
                    m.data = vec![0; self.slab_bytes as usize];
                    let grant = SlabGrant { slab: SlabId(i as u32), len: self.slab_bytes, cred };
                    Some(FarSlab { server: s.id, grant })
                })
            });
            match granted {
                Some(g) => out.push(g),
                None => break,
            }
        }
        if out.is_empty() && slabs > 0 {
            return Err(Error::new(ErrorKind::NoSpace, "no free slab on any live server"));
        }
        Ok(out)
    }

    fn release(&self, slab: &FarSlab) -> Result<()> {
        let s = self.server(slab.server).ok_or_else(|| Error::new(ErrorKind::Config, "unknown server"))?;
        let mut m = s.slabs[slab.grant.slab.0 as usize].lock();
        if m.grant == Some(slab.grant.cred) {
            m.grant = None;
        }
        Ok(())
    }

    fn endpoint(&self, server: ServerId) -> Result<Box<dyn Transport>> {
        let s = self.server(server).ok_or_else(|| Error::new(ErrorKind::Config, "unknown server"))?.clone();
        if !s.alive.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Unreachable, format!("server {server} is down")));
        }
        let ep = MemEndpoint { server: s, done: VecDeque::new(), reverse: self.reverse.load(Ordering::Acquire) };
        match self.faults.lock().clone() {
            None => Ok(Box::new(ep)),
            Some((cfg, seed)) => {
                Ok(Box::new(Faulty::new(ep, cfg, seed + self.endpoint_seq.fetch_add(1, Ordering::Relaxed))))
            }
        }
    }

    fn events(&self) -> Receiver<BackendEvent> {
        let (tx, rx) = crossbeam_channel::bounded(1024);
        self.subscribers.lock().push(tx);
        rx
    }
}

/// An endpoint of [`MemBackend`]: executes at post, completes at poll.
#[derive(Debug)]
struct MemEndpoint {
    server: Arc<ServerMem>,
    done: VecDeque<Completion>,
    reverse: bool,
}

const MEM_INFLIGHT_MAX: usize = 64;

impl MemEndpoint {
    fn exec(&self, wr: &WorkRequest) -> Result<OpOutput> {
        if !self.server.alive.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Unreachable, "server is down"));
        }
        wr.op.check(&wr.addr)?;
        let slab = self
            .server
            .slabs
            .get(wr.addr.slab.0 as usize)
            .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "no such slab"))?;
        let mut m = slab.lock();
        let c = &wr.addr.cred;
        if m.grant.is_none_or(|g| (g.lease, g.epoch, g.token) != (c.lease, c.epoch, c.token)) {
            return Err(Error::new(ErrorKind::Revoked, "grant revoked or credential stale"));
        }
        farpool_core::transport::apply_to_bytes(&mut m.data, wr.addr.offset, &wr.op)
    }
}

impl Transport for MemEndpoint {
    fn kind(&self) -> TransportKind {
        TransportKind::Sim
    }

    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        let n = batch.len().min(MEM_INFLIGHT_MAX - self.done.len());
        let mut done: Vec<Completion> =
            batch.drain(..n).map(|wr| Completion { wr_id: wr.wr_id, result: self.exec(&wr) }).collect();
        if self.reverse {
            done.reverse();
        }
        self.done.extend(done);
        Ok(n)
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, _timeout: Duration) -> Result<usize> {
        let n = max.min(self.done.len());
        out.extend(self.done.drain(..n));
        Ok(n)
    }

    fn inflight(&self) -> usize {
        self.done.len()
    }

    fn inflight_max(&self) -> usize {
        MEM_INFLIGHT_MAX
    }

    fn op_timeout(&self) -> Duration {
        Duration::from_secs(2)
    }
}
