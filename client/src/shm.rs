//! The shared-memory transport inside the client: per server, the grants of shm leases are mapped
//! once ([`ShmMaps`]) and shared by every shm data endpoint to that server ([`ShmEndpoint`]).
//!
//! Owns: the server's shm socket connection (connected on the first attach), the mappings by slab,
//! and a generation counter bumped on every attach/detach. An endpoint keeps its own
//! `farpool_cxl::ShmTransport` (so the data path takes no lock) and re-reads the mappings only when
//! the generation moved: one atomic load per operation.
//!
//! Invariants: a lease granted over shm has every grant mapped before the lease is returned to the
//! user; its mappings are dropped when the lease ends (released, revoked, expired, lost). A mapping
//! that outlives its lease on the server reads zeros (the server punched it out), never another
//! tenant's bytes; the lease checks in [`crate::lease`] refuse it before that anyway.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use farpool_core::{Completion, RemoteAddr, Result, SlabGrant, SlabId, Transport, TransportKind, WorkRequest};
use farpool_cxl::{ShmClient, ShmMapping, ShmOptions, ShmTransport};
use parking_lot::Mutex;

/// The shm mappings of one server. See the module docs.
#[derive(Debug)]
pub(crate) struct ShmMaps {
    path: PathBuf,
    timeout: Duration,
    client: Mutex<Option<ShmClient>>,
    maps: Mutex<HashMap<SlabId, ShmMapping>>,
    generation: AtomicU64,
}

impl ShmMaps {
    /// Mappings of the server whose shm socket is `path`; `timeout` bounds each attach.
    pub(crate) fn new(path: &str, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            path: PathBuf::from(path),
            timeout,
            client: Mutex::new(None),
            maps: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        })
    }

    /// Map every grant (all or nothing).
    pub(crate) fn attach(&self, grants: &[SlabGrant]) -> Result<()> {
        let mut client = self.client.lock();
        if client.is_none() {
            *client = Some(ShmClient::connect(&self.path, self.timeout)?);
        }
        let c = client.as_mut().expect("connected above");
        let mut mapped = Vec::with_capacity(grants.len());
        for g in grants {
            match c.attach(g) {
                Ok(m) => mapped.push(m),
                Err(e) => {
                    // A broken socket is reconnected on the next attach.
                    *client = None;
                    return Err(e);
                }
            }
        }
        let mut maps = self.maps.lock();
        for m in mapped {
            maps.insert(m.grant().slab, m);
        }
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Drop the mappings of these grants (only if they still belong to the same grant).
    pub(crate) fn detach(&self, grants: &[SlabGrant]) {
        let mut maps = self.maps.lock();
        for g in grants {
            if maps.get(&g.slab).is_some_and(|m| m.grant().cred == g.cred) {
                maps.remove(&g.slab);
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Mapped grants.
    pub(crate) fn len(&self) -> usize {
        self.maps.lock().len()
    }

    /// A data endpoint over these mappings.
    pub(crate) fn endpoint(self: &Arc<Self>, inflight_max: usize) -> ShmEndpoint {
        let inner = ShmTransport::new(ShmOptions::default().with_inflight_max(inflight_max));
        let mut e = ShmEndpoint { maps: self.clone(), seen: u64::MAX, inner };
        e.sync();
        e
    }
}

/// A data endpoint over a server's shm mappings. See the module docs.
#[derive(Debug)]
pub(crate) struct ShmEndpoint {
    maps: Arc<ShmMaps>,
    seen: u64,
    inner: ShmTransport,
}

impl ShmEndpoint {
    /// Pick up attaches and detaches made since the last operation.
    fn sync(&mut self) {
        let g = self.maps.generation.load(Ordering::Acquire);
        if g == self.seen {
            return;
        }
        let maps = self.maps.maps.lock();
        let stale: Vec<SlabId> = self.inner.slabs().filter(|s| !maps.contains_key(s)).collect();
        for s in stale {
            self.inner.remove(s);
        }
        for m in maps.values() {
            self.inner.insert(m.clone());
        }
        self.seen = g;
    }
}

impl Transport for ShmEndpoint {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }
    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        self.sync();
        self.inner.post(batch)
    }
    fn poll(&mut self, out: &mut Vec<Completion>, max: usize, timeout: Duration) -> Result<usize> {
        self.inner.poll(out, max, timeout)
    }
    fn inflight(&self) -> usize {
        self.inner.inflight()
    }
    fn inflight_max(&self) -> usize {
        self.inner.inflight_max()
    }
    fn read(&mut self, addr: RemoteAddr, buf: &mut [u8]) -> Result<()> {
        self.sync();
        self.inner.read(addr, buf)
    }
    fn write(&mut self, addr: RemoteAddr, data: &[u8]) -> Result<()> {
        self.sync();
        self.inner.write(addr, data)
    }
}
