//! `PoolBackend`: the [`FarBackend`] of real memory servers, over a [`crate::Pool`].
//!
//! Each slab is leased as its own one-slab lease, so the tier can give slabs back one by one after a
//! revoke notice. Server ids in the tier are the pool's server indices. Pool events are translated on a
//! small thread per subscriber (it ends when the pool's event stream ends or the tier stops listening):
//! revoke notices (deadline -> grace), revocations, lost leases (their slabs are revoked, or their server is
//! down when the lease was lost to a failed connection), servers down,
//! and goodbyes (every slab on that server gets a notice). A revoked or lost lease leaves the backend's
//! registry when its event is translated, so dead leases are not kept.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use farpool_core::{
    Completion, Error, ErrorKind, LeaseId, Result, ServerId, SlabId, Transport, TransportKind, WorkRequest,
};
use parking_lot::Mutex;

use super::backend::{BackendEvent, FarBackend, FarSlab};
use crate::{Endpoint, Lease, Pool, PoolEvent, Target};

/// See the module docs.
#[derive(Debug)]
pub struct PoolBackend {
    pool: Arc<Pool>,
    leases: Arc<Mutex<HashMap<(ServerId, SlabId), Lease>>>,
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
}

fn server_id(index: usize) -> ServerId {
    ServerId(index as u64)
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
            let grant = *lease.grants().first().ok_or_else(|| Error::new(ErrorKind::Protocol, "empty lease"))?;
            self.leases.lock().insert((server, grant.slab), lease);
            out.push(FarSlab { server, grant });
        }
        Ok(out)
    }

    fn release(&self, slab: &FarSlab) -> Result<()> {
        let lease = self.leases.lock().remove(&(slab.server, slab.grant.slab));
        match lease {
            Some(l) if l.grants().first().map(|g| g.cred) == Some(slab.grant.cred) => l.release(),
            Some(l) => {
                self.leases.lock().insert((slab.server, slab.grant.slab), l);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn endpoint(&self, server: ServerId) -> Result<Box<dyn Transport>> {
        let ep = self.pool.endpoint(server.0 as usize)?;
        Ok(Box::new(PoolEndpoint::new(ep)))
    }

    fn events(&self) -> Receiver<BackendEvent> {
        let (tx, rx) = crossbeam_channel::bounded(1024);
        let from = self.pool.events();
        let leases = Arc::downgrade(&self.leases);
        let spawned = std::thread::Builder::new().name("tier-pool-events".into()).spawn(move || {
            loop {
                let ev = match from.recv_timeout(Duration::from_millis(200)) {
                    Ok(ev) => ev,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                // The tier holds the leases; once it is gone there is nobody to tell.
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
}

fn slabs_of_lease(leases: &Mutex<HashMap<(ServerId, SlabId), Lease>>, lease: LeaseId) -> Option<(ServerId, SlabId)> {
    leases.lock().iter().find(|(_, l)| l.id() == lease).map(|(k, _)| *k)
}

fn translate(ev: PoolEvent, leases: &Mutex<HashMap<(ServerId, SlabId), Lease>>) -> Vec<BackendEvent> {
    let grace = |d: Instant| d.saturating_duration_since(Instant::now());
    match ev {
        PoolEvent::RevokeNotice { server, slabs, deadline, .. } => {
            vec![BackendEvent::RevokeNotice { server: server_id(server), slabs, grace: grace(deadline) }]
        }
        PoolEvent::Revoked { server, slabs, .. } => {
            let s = server_id(server);
            let mut held = leases.lock();
            slabs.iter().for_each(|slab| drop(held.remove(&(s, *slab))));
            vec![BackendEvent::Revoked { server: s, slabs }]
        }
        PoolEvent::ServerDown { server, .. } => vec![BackendEvent::ServerDown { server: server_id(server) }],
        PoolEvent::ServerGoodbye { server, deadline, .. } => {
            let s = server_id(server);
            let slabs: Vec<SlabId> = leases.lock().keys().filter(|k| k.0 == s).map(|k| k.1).collect();
            vec![BackendEvent::RevokeNotice { server: s, slabs, grace: grace(deadline) }]
        }
        PoolEvent::LeaseLost { server, lease, error } => match slabs_of_lease(leases, lease) {
            Some(key) => {
                leases.lock().remove(&key);
                // Lost to a failed connection (the heartbeat may notice before the control reader does):
                // the server is down. Otherwise (renewal refused, expired) the slab was taken back.
                if matches!(
                    error.kind(),
                    ErrorKind::Unreachable | ErrorKind::Closed | ErrorKind::Timeout | ErrorKind::Io
                ) {
                    vec![BackendEvent::ServerDown { server: server_id(server) }]
                } else {
                    vec![BackendEvent::Revoked { server: server_id(server), slabs: vec![key.1] }]
                }
            }
            None => vec![],
        },
    }
}

/// A pool [`Endpoint`] as a boxed [`Transport`], tracking its own in-flight count.
struct PoolEndpoint {
    ep: Endpoint,
    kind: TransportKind,
    inflight: usize,
    inflight_max: usize,
    op_timeout: Duration,
}

impl PoolEndpoint {
    fn new(mut ep: Endpoint) -> Self {
        let kind = ep.kind();
        let (inflight_max, op_timeout) = {
            let t = ep.transport();
            (t.inflight_max(), t.op_timeout())
        };
        Self { ep, kind, inflight: 0, inflight_max, op_timeout }
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
        let n = self.ep.transport().poll(out, max, timeout)?;
        self.inflight = self.inflight.saturating_sub(n);
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
}
