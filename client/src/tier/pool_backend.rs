//! `PoolBackend`: the [`FarBackend`] of real memory servers, over a [`crate::Pool`].
//!
//! Each slab is leased as its own one-slab lease, so the tier can give slabs back one by one after a
//! revoke notice; the backend's registry holds those leases by `(server, lease id)`, and a slab's
//! [`GrantRef`] carries that lease id (its credential's). Server ids in the tier are the pool's server
//! indices. Pool events are translated on a small thread per subscriber (it ends when the pool's event
//! stream ends or the tier stops listening): revoke notices (deadline -> grace), revocations, lost leases
//! (their slabs are revoked, or their server is down when the lease was lost to a failed connection),
//! servers down, and goodbyes (every grant held on that server gets a notice). Every event names the
//! lease it is about, so a late event about an old lease never touches a newer lease of the same slab id.
//! A revoked or lost lease leaves the registry when its event is translated, so dead leases are not kept.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use farpool_core::{
    Completion, Error, ErrorKind, LeaseId, OpOutput, Result, ServerId, SlabGrant, SlabId, Transport, TransportKind,
    WorkRequest,
};
use parking_lot::Mutex;

use super::backend::{BackendEvent, FarBackend, FarSlab, GrantRef};
use crate::{Endpoint, Lease, Pool, PoolEvent, Target};

/// The one-slab leases held for the tier, by server and lease id.
type Registry = Mutex<HashMap<(ServerId, LeaseId), Lease>>;

/// See the module docs.
#[derive(Debug)]
pub struct PoolBackend {
    pool: Arc<Pool>,
    leases: Arc<Registry>,
}

impl PoolBackend {
    /// Lend the tier the memory of `pool`'s servers.
    pub fn new(pool: Arc<Pool>) -> Self {
        Self { pool, leases: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Backend events translated from `from` instead of the pool's own stream (a fake one, in tests;
    /// not in the loom build, which runs only the slot's model checks).
    #[cfg(all(test, not(farpool_loom)))]
    pub(super) fn events_from(&self, from: Receiver<PoolEvent>) -> Receiver<BackendEvent> {
        translator(from, Arc::downgrade(&self.leases))
    }
}

fn server_id(index: usize) -> ServerId {
    ServerId(index as u64)
}

/// The one grant of a one-slab lease.
fn grant_of(lease: &Lease) -> Option<SlabGrant> {
    lease.grants().first().copied()
}

impl FarBackend for PoolBackend {
    fn lease(&self, slabs: usize) -> Result<Vec<FarSlab>> {
        let mut out = Vec::new();
        for _ in 0..slabs {
            let lease = match self.pool.lease(Target::Auto, 1) {
                Ok(l) => l,
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            };
            let server = server_id(lease.server());
            let grant = grant_of(&lease).ok_or_else(|| Error::new(ErrorKind::Protocol, "empty lease"))?;
            if grant.cred.lease != lease.id() {
                let m = format!("grant credential names lease {} in lease {}", grant.cred.lease, lease.id());
                return Err(Error::new(ErrorKind::Protocol, m));
            }
            self.leases.lock().insert((server, lease.id()), lease);
            out.push(FarSlab { server, grant });
        }
        Ok(out)
    }

    fn release(&self, slab: &FarSlab) -> Result<()> {
        let key = (slab.server, slab.grant.cred.lease);
        let lease = {
            let mut held = self.leases.lock();
            let current = held.get(&key).and_then(grant_of) == Some(slab.grant);
            if current { held.remove(&key) } else { None }
        };
        lease.map_or(Ok(()), Lease::release)
    }

    fn endpoint(&self, server: ServerId) -> Result<Box<dyn Transport>> {
        let ep = self.pool.endpoint(server.0 as usize)?;
        Ok(Box::new(PoolEndpoint::new(ep, self.pool.clone())))
    }

    fn events(&self) -> Receiver<BackendEvent> {
        translator(self.pool.events(), Arc::downgrade(&self.leases))
    }
}

/// Translate `from` into backend events on a thread of its own, until `from` ends, the registry is gone
/// (the backend, hence the tier, is gone) or the receiver is dropped.
fn translator(from: Receiver<PoolEvent>, leases: Weak<Registry>) -> Receiver<BackendEvent> {
    let (tx, rx) = crossbeam_channel::bounded(1024);
    let spawned = std::thread::Builder::new().name("tier-pool-events".into()).spawn(move || {
        loop {
            let ev = match from.recv_timeout(Duration::from_millis(200)) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let Some(leases) = leases.upgrade() else { return };
            for out in translate(ev, &leases) {
                if tx.send_timeout(out, Duration::from_secs(1)).is_err() {
                    return;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "page tier: cannot start the pool event thread; revoke notices will be missed");
    }
    rx
}

fn refs(lease: LeaseId, slabs: Vec<SlabId>) -> Vec<GrantRef> {
    slabs.into_iter().map(|slab| GrantRef { slab, lease }).collect()
}

fn translate(ev: PoolEvent, leases: &Registry) -> Vec<BackendEvent> {
    let grace = |d: Instant| d.saturating_duration_since(Instant::now());
    match ev {
        PoolEvent::RevokeNotice { server, lease, slabs, deadline } => {
            vec![BackendEvent::RevokeNotice {
                server: server_id(server),
                grants: refs(lease, slabs),
                grace: grace(deadline),
            }]
        }
        PoolEvent::Revoked { server, lease, slabs } => {
            let s = server_id(server);
            let mut held = leases.lock();
            // A one-slab lease: gone once its slab is revoked. Keyed by lease, so a newer lease of the same
            // slab id stays.
            if held.get(&(s, lease)).and_then(grant_of).is_some_and(|g| slabs.contains(&g.slab)) {
                held.remove(&(s, lease));
            }
            vec![BackendEvent::Revoked { server: s, grants: refs(lease, slabs) }]
        }
        PoolEvent::ServerDown { server, .. } => vec![BackendEvent::ServerDown { server: server_id(server) }],
        PoolEvent::ServerGoodbye { server, deadline, .. } => {
            let s = server_id(server);
            let held = leases.lock();
            let grants =
                held.iter().filter(|(k, _)| k.0 == s).filter_map(|(_, l)| grant_of(l).map(|g| GrantRef::of(&g)));
            vec![BackendEvent::RevokeNotice { server: s, grants: grants.collect(), grace: grace(deadline) }]
        }
        PoolEvent::LeaseLost { server, lease, error } => {
            let s = server_id(server);
            let Some(l) = leases.lock().remove(&(s, lease)) else { return vec![] };
            // Lost to a failed connection (the heartbeat may notice before the control reader does):
            // the server is down. Otherwise (renewal refused, expired) the slab was taken back.
            if matches!(error.kind(), ErrorKind::Unreachable | ErrorKind::Closed | ErrorKind::Timeout | ErrorKind::Io) {
                vec![BackendEvent::ServerDown { server: s }]
            } else {
                let grants = grant_of(&l).map(|g| GrantRef::of(&g)).into_iter().collect();
                vec![BackendEvent::Revoked { server: s, grants }]
            }
        }
    }
}

/// A pool [`Endpoint`] as a boxed [`Transport`], tracking its own in-flight count.
///
/// An access denied because the pool dropped the grants of a server that went down (the shm transport
/// fails such reads as `Revoked` once the mappings are detached) completes as `Unreachable`, so the tier
/// counts it as a server-down miss; a denial while the server is up stays as it is.
struct PoolEndpoint {
    ep: Endpoint,
    pool: Arc<Pool>,
    kind: TransportKind,
    inflight: usize,
    inflight_max: usize,
    op_timeout: Duration,
}

impl PoolEndpoint {
    fn new(mut ep: Endpoint, pool: Arc<Pool>) -> Self {
        let kind = ep.kind();
        let (inflight_max, op_timeout) = {
            let t = ep.transport();
            (t.inflight_max(), t.op_timeout())
        };
        Self { ep, pool, kind, inflight: 0, inflight_max, op_timeout }
    }

    /// See the type docs.
    fn reclassify(&self, c: &mut Completion) {
        let denied = matches!(&c.result, Err(e) if matches!(e.kind(), ErrorKind::Revoked | ErrorKind::Unauthorized));
        if denied && !self.pool.is_up(self.ep.server()) {
            let why = c.result.as_ref().err().map(ToString::to_string).unwrap_or_default();
            c.result = Err(Error::new(ErrorKind::Unreachable, format!("server {} is down ({why})", self.ep.server())));
        }
    }
}

impl Transport for PoolEndpoint {
    fn kind(&self) -> TransportKind {
        self.kind
    }

    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        let n = self.ep.transport().post(batch)?;
        self.inflight += n;
        Ok(n)
    }

    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, timeout: Duration) -> Result<usize> {
        let start = out.len();
        let n = self.ep.transport().poll(out, max, timeout)?;
        self.inflight = self.inflight.saturating_sub(n);
        out[start..].iter_mut().for_each(|c| self.reclassify(c));
        Ok(n)
    }

    fn inflight(&self) -> usize {
        self.inflight
    }

    fn inflight_max(&self) -> usize {
        self.inflight_max
    }

    fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// The transport's own blocking call (RDMA runs it on its depth-1 path), reclassified like `poll`.
    fn run_one(&mut self, wr: WorkRequest) -> Result<OpOutput> {
        let wr_id = wr.wr_id;
        let result = self.ep.transport().run_one(wr);
        let mut c = Completion { wr_id, result };
        self.reclassify(&mut c);
        c.result
    }
}
