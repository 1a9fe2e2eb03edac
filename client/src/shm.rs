//! The shared-memory transport inside the client: per server, the grants of shm leases are mapped
//! once ([`ShmMaps`]) and shared by every shm data endpoint to that server ([`ShmEndpoint`]).
//!
//! Owns: the server's shm socket connection (connected on the first attach), the mappings by slab,
//! and a generation counter bumped on every attach/detach. As over TCP, a credential is the
//! capability: an operation addressed with a valid credential of a grant this pool did not lease
//! (another client handed it over) maps that grant on first use, the server checking the credential. An endpoint keeps its own
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

use farpool_core::{
    Completion, Error, ErrorKind, RemoteAddr, Result, SlabGrant, SlabId, Transport, TransportKind, WorkRequest,
};
use farpool_cxl::{ShmClient, ShmMapping, ShmOptions, ShmTransport};
use parking_lot::Mutex;

/// Bound on grants mapped per server (leased ones plus ones reached by a handed-over credential).
const MAPPINGS_MAX: usize = 65_536;

/// The shm mappings of one server. See the module docs.
#[derive(Debug)]
pub(crate) struct ShmMaps {
    path: PathBuf,
    slab_len: u64,
    timeout: Duration,
    client: Mutex<Option<ShmClient>>,
    maps: Mutex<HashMap<SlabId, ShmMapping>>,
    generation: AtomicU64,
}

impl ShmMaps {
    /// Mappings of the server whose shm socket is `path` and slabs `slab_len` bytes; `timeout` bounds
    /// each attach.
    pub(crate) fn new(path: &str, slab_len: u64, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            path: PathBuf::from(path),
            slab_len,
            timeout,
            client: Mutex::new(None),
            maps: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
        })
    }

    /// Map the grant named by an address's credential (one this pool did not lease itself).
    fn attach_addr(&self, addr: &RemoteAddr) -> Result<()> {
        if self.maps.lock().len() >= MAPPINGS_MAX {
            return Err(Error::new(ErrorKind::NoSpace, format!("{MAPPINGS_MAX} shm grants are mapped already")));
        }
        self.attach(&[SlabGrant { slab: addr.slab, len: self.slab_len, cred: addr.cred }])
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
    #[cfg(test)]
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

    /// Make sure the grant `addr` names is mapped with `addr`'s credential, attaching it if not.
    fn reach(&mut self, addr: &RemoteAddr) -> Result<()> {
        self.sync();
        if self.inner.mapping(addr.slab).is_some_and(|m| m.grant().cred == addr.cred) {
            return Ok(());
        }
        self.maps.attach_addr(addr)?;
        self.sync();
        Ok(())
    }
}

impl Transport for ShmEndpoint {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }
    fn post(&mut self, batch: &mut Vec<WorkRequest>) -> Result<usize> {
        for wr in batch.iter().take(self.inner.inflight_max()) {
            // A refused attach is reported by the op itself (not mapped / bad token).
            let _ = self.reach(&wr.addr);
        }
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
        self.reach(&addr)?;
        self.inner.read(addr, buf)
    }
    fn write(&mut self, addr: RemoteAddr, data: &[u8]) -> Result<()> {
        self.reach(&addr)?;
        self.inner.write(addr, data)
    }
}

#[cfg(test)]
mod tests {
    use farpool_core::{ErrorKind, TransportKind};
    use farpool_memserver::{Server, ServerConfig, ServerHandle};

    use crate::{PoolBuilder, TransportChoice};

    fn server(shm: bool) -> ServerHandle {
        let cfg = ServerConfig::default()
            .with_listen("127.0.0.1:0".parse().unwrap())
            .with_capacity_bytes(8 << 20)
            .with_slab_size_bytes(1 << 20)
            .with_workers(1)
            .with_shm(shm);
        Server::start(cfg).unwrap()
    }

    #[test]
    fn auto_picks_shm_on_the_same_host_and_the_data_path_works() {
        let s = server(true);
        let pool = PoolBuilder::new([s.local_addr()]).build().unwrap();
        let n = pool.transport_of(0).unwrap();
        assert_eq!(n.kind, TransportKind::Shm, "{}", n.reason);
        assert!(n.reason.contains("same host"), "{}", n.reason);
        let lease = pool.lease(0, 2).unwrap();
        let maps = pool.core().shm_maps(0).unwrap();
        assert_eq!(maps.len(), 2, "every grant is mapped before the lease is returned");
        lease.write(1, 4096, b"over shared memory").unwrap();
        let mut back = [0u8; 18];
        lease.read(1, 4096, &mut back).unwrap();
        assert_eq!(&back, b"over shared memory");
        assert_eq!(lease.fetch_add(0, 64, 7).unwrap(), 0);
        assert_eq!(lease.compare_swap(0, 64, 7, 1).unwrap(), 7);
        let mut ep = pool.endpoint(0).unwrap();
        assert_eq!(ep.kind(), TransportKind::Shm);
        assert_eq!(ep.transport().fetch_add(lease.addr(0, 64, 8).unwrap(), 0).unwrap(), 1);
        lease.release().unwrap();
        assert_eq!(maps.len(), 0, "a released lease is unmapped");
        assert_eq!(s.stats().leases_active, 0);
    }

    #[test]
    fn auto_falls_back_to_tcp_and_forced_shm_is_an_error_when_not_offered() {
        let s = server(false);
        let pool = PoolBuilder::new([s.local_addr()]).build().unwrap();
        let n = pool.transport_of(0).unwrap();
        assert_eq!(n.kind, TransportKind::Tcp);
        assert!(n.reason.contains("does not offer shm"), "{}", n.reason);
        pool.lease(0, 1).unwrap().write(0, 0, b"tcp").unwrap();
        // Refused when the pool connects (at build) or at the latest on first use; never a fallback.
        let e = match PoolBuilder::new([s.local_addr()]).with_transport(TransportChoice::Shm).build() {
            Ok(forced) => forced.lease(0, 1).unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("shm"), "{e}");
    }
}

#[cfg(test)]
mod revoke_tests {
    use std::time::Duration;

    use farpool_core::wire::AdminCmd;
    use farpool_memserver::{Server, ServerConfig};

    use crate::{PoolBuilder, PoolEvent};

    #[test]
    fn a_drained_server_revokes_shm_leases_and_their_mappings_go() {
        let cfg = ServerConfig::default()
            .with_listen("127.0.0.1:0".parse().unwrap())
            .with_capacity_bytes(4 << 20)
            .with_slab_size_bytes(1 << 20)
            .with_workers(1);
        let s = Server::start(cfg).unwrap();
        let pool = PoolBuilder::new([s.local_addr()]).build().unwrap();
        let events = pool.events();
        let lease = pool.lease(0, 2).unwrap();
        lease.write(0, 0, b"before the drain").unwrap();
        let maps = pool.core().shm_maps(0).unwrap();
        assert_eq!(maps.len(), 2);
        pool.admin(0, AdminCmd::Drain { grace_ms: 200 }).unwrap();
        let mut revoked = false;
        for _ in 0..100 {
            match events.recv_timeout(Duration::from_secs(5)) {
                Ok(PoolEvent::Revoked { .. }) => {
                    revoked = true;
                    break;
                }
                Ok(_) => continue,
                Err(e) => panic!("no Revoked event: {e}"),
            }
        }
        assert!(revoked);
        assert!(lease.write(0, 0, b"after").is_err(), "a revoked lease refuses operations");
        assert_eq!(maps.len(), 0, "revoked grants are unmapped");
    }
}
