//! The server's side of the RDMA transport (feature `rdma`): the device, the pool regions known to it, one
//! memory region per RDMA grant, and the passive queue pairs of connected clients.
//!
//! Owns: [`RdmaState`], created at start from `--rdma-device` / `--rdma-gid-index`. When the device
//! opens and the first pool region registers, the server advertises `FEATURE_RDMA`; otherwise it logs
//! `rdma not offered: <reason>` and serves tcp (and shm) only.
//!
//! - **Pool**: every region (the initial one and each one added by `grow`) is made known to the device
//!   once (`register_pool_owned`), without pinning it: only granted slabs are registered.
//! - **Grants**: a lease with `LEASE_FLAG_RDMA` gets one MR per slab ([`RdmaState::grant`]), which pins
//!   that slab (faulting in pages a discard gave back); its rkey and address are the credential's
//!   `rkey` / `base_addr`. Revoke, expiry, release and shrink call [`RdmaState::revoke`] *before* the
//!   slab is wiped, so the NIC refuses the old rkey before any byte is zeroed or handed to another
//!   tenant.
//! - **Wiping**: once its MR is gone a slab is plain memory, discarded like any other by the caller
//!   (`MADV_DONTNEED` or a punched hole: it reads as zeros and its pages go back to the OS), so a
//!   shrink returns memory with rdma on too. An MR over the whole pool would keep every page pinned for
//!   the server's life: a discard would then show the CPU fresh pages while the NIC kept the old ones,
//!   and a shrink would release nothing.
//! - **Queue pairs**: `RdmaConnect { info }` creates a passive endpoint connected to the client's queue
//!   pair; it lives as long as the TCP connection that asked for it, at most [`QPS_PER_CONN`] per
//!   connection (a reconnect replaces the oldest). Passive queue pairs never post: they only answer the
//!   peer's one-sided operations in the kernel/NIC.
//!
//! Locking: one mutex around the whole state; it is taken under the server's control lock (grant,
//! revoke) but never takes that lock itself. Queue pairs are created and connected outside it.

use std::sync::Arc;

use bytes::Bytes;
use farpool_core::{LeaseId, Result, SlabId};
use farpool_cxl::Region;

use crate::config::ServerConfig;
use crate::grants::SlabMem;
use crate::state::ConnId;

/// Passive queue pairs kept per connection; a further `RdmaConnect` drops the oldest (a client that
/// reconnects its endpoint after an error does not leak queue pairs on the server).
pub const QPS_PER_CONN: usize = 4;

pub(crate) use imp::RdmaState;

#[cfg(feature = "rdma")]
mod imp {
    use std::collections::{HashMap, VecDeque};

    use farpool_core::{Error, ErrorKind};
    use farpool_rdma::{Context, DeviceSelector, Endpoint, EndpointConfig, PoolRegistration, QpInfo, SlabMr};
    use parking_lot::Mutex;

    use super::*;

    /// The RDMA state of a server. See the module docs.
    #[derive(Debug)]
    pub(crate) struct RdmaState {
        inner: Mutex<Option<Active>>,
        /// Why RDMA is not offered (when it is not).
        why_not: Mutex<String>,
    }

    #[derive(Debug)]
    struct Active {
        // Field order is drop order: queue pairs, then grant MRs, then the pool, then the device.
        qps: HashMap<ConnId, VecDeque<Endpoint>>,
        grants: HashMap<(LeaseId, SlabId), SlabMr>,
        pools: Vec<(Arc<Region>, PoolRegistration)>,
        ctx: Arc<Context>,
    }

    impl RdmaState {
        /// Open the configured device (or the first active port); never fails the server start.
        pub(crate) fn start(cfg: &ServerConfig) -> Self {
            let off = |why: String| {
                tracing::info!("rdma not offered: {why}");
                Self { inner: Mutex::new(None), why_not: Mutex::new(why) }
            };
            if !cfg.rdma_enabled {
                return off("disabled by configuration".into());
            }
            let mut sel = DeviceSelector::new();
            if let Some(d) = &cfg.rdma_device {
                sel = sel.with_device(d.clone());
            }
            if let Some(g) = cfg.rdma_gid_index {
                sel = sel.with_gid_index(g);
            }
            match Context::open(&sel) {
                Ok(ctx) => {
                    let gid = ctx.gid().map(|g| g.addr().to_string()).unwrap_or_else(|| "none".into());
                    tracing::info!(device = ctx.name(), port = ctx.port(), %gid, "rdma device opened");
                    let active = Active { qps: HashMap::new(), grants: HashMap::new(), pools: Vec::new(), ctx };
                    Self { inner: Mutex::new(Some(active)), why_not: Mutex::new(String::new()) }
                }
                Err(e) => off(e.to_string()),
            }
        }

        /// Whether the server advertises RDMA.
        pub(crate) fn offered(&self) -> bool {
            self.inner.lock().is_some()
        }

        /// Register a new pool region. A failure on the first region turns RDMA off (logged); on a later
        /// one (grow) it is returned, and the region is not added.
        pub(crate) fn register_region(&self, region: &Arc<Region>) -> Result<()> {
            let mut g = self.inner.lock();
            let Some(a) = g.as_mut() else { return Ok(()) };
            match a.ctx.register_pool_owned(region.clone()) {
                Ok(reg) => {
                    tracing::info!(bytes = region.len(), device = a.ctx.name(), "pool region registered for rdma");
                    a.pools.push((region.clone(), reg));
                    Ok(())
                }
                Err(e) if a.pools.is_empty() => {
                    let why = format!("registering the pool with {} failed: {e}", a.ctx.name());
                    tracing::warn!("rdma not offered: {why}");
                    *g = None;
                    *self.why_not.lock() = why;
                    Ok(())
                }
                Err(e) => Err(Error::new(e.kind(), format!("cannot register the new region for rdma: {e}"))),
            }
        }

        /// Register `mem` (a piece of a pool region) for remote access as the grant of `slab` to
        /// `lease`; returns `(rkey, address)` for the credential.
        pub(crate) fn grant(&self, lease: LeaseId, slab: SlabId, mem: &SlabMem) -> Result<(u32, u64)> {
            let mut g = self.inner.lock();
            let a = g.as_mut().ok_or_else(|| Error::new(ErrorKind::Unsupported, "this server does not offer rdma"))?;
            let pool = a.pools.iter().find(|(r, _)| Arc::ptr_eq(r, &mem.region)).map(|(_, p)| p).ok_or_else(|| {
                Error::new(ErrorKind::Internal, format!("slab {slab} does not lie in a registered pool region"))
            })?;
            let mr = pool.grant(mem.offset, mem.len)?;
            let out = (mr.rkey(), mr.addr());
            if let Some(old) = a.grants.insert((lease, slab), mr) {
                old.deregister(); // cannot happen (fresh lease ids), but never leave an MR behind
            }
            Ok(out)
        }

        /// Deregister the grant's MR, if it has one: from here on the NIC refuses its rkey.
        pub(crate) fn revoke(&self, lease: LeaseId, slab: SlabId) {
            if let Some(a) = self.inner.lock().as_mut()
                && let Some(mr) = a.grants.remove(&(lease, slab))
            {
                mr.deregister();
            }
        }

        /// `RdmaConnect { info }` on connection `conn`: a passive queue pair connected to the client's;
        /// returns ours, serialized.
        pub(crate) fn connect(&self, conn: ConnId, info: &[u8]) -> Result<Bytes> {
            let ctx = match self.inner.lock().as_ref() {
                Some(a) => a.ctx.clone(),
                None => {
                    let why = self.why_not.lock().clone();
                    return Err(Error::new(ErrorKind::Unsupported, format!("this server does not offer rdma: {why}")));
                }
            };
            let remote = QpInfo::from_bytes(info)?;
            let mut ep = Endpoint::new(&ctx, EndpointConfig::passive())?;
            ep.connect(&remote)?;
            let local = ep.local_info()?;
            let mut g = self.inner.lock();
            let a = g.as_mut().ok_or_else(|| Error::new(ErrorKind::Unsupported, "rdma was turned off"))?;
            let list = a.qps.entry(conn).or_default();
            if list.len() == QPS_PER_CONN {
                list.pop_front();
                tracing::debug!(conn, "dropping the oldest queue pair of this connection");
            }
            list.push_back(ep);
            tracing::debug!(conn, local = %local, %remote, "rdma queue pair connected");
            Ok(Bytes::copy_from_slice(&local.to_bytes()))
        }

        /// The connection is gone: destroy its queue pairs.
        pub(crate) fn drop_conn(&self, conn: ConnId) {
            let gone = self.inner.lock().as_mut().and_then(|a| a.qps.remove(&conn));
            drop(gone); // destroyed outside the lock
        }
    }
}

#[cfg(not(feature = "rdma"))]
mod imp {
    use farpool_core::{Error, ErrorKind};

    use super::*;

    /// Without the `rdma` feature: never offered; every entry point is a no-op or `Unsupported`.
    #[derive(Debug)]
    pub(crate) struct RdmaState;

    impl RdmaState {
        pub(crate) fn start(cfg: &ServerConfig) -> Self {
            if cfg.rdma_enabled && (cfg.rdma_device.is_some() || cfg.rdma_gid_index.is_some()) {
                tracing::warn!("rdma not offered: farpool-memserver was built without the `rdma` feature");
            }
            Self
        }
        pub(crate) fn offered(&self) -> bool {
            false
        }
        pub(crate) fn register_region(&self, _region: &Arc<Region>) -> Result<()> {
            Ok(())
        }
        pub(crate) fn grant(&self, _lease: LeaseId, _slab: SlabId, _mem: &SlabMem) -> Result<(u32, u64)> {
            Err(not_built())
        }
        pub(crate) fn revoke(&self, _lease: LeaseId, _slab: SlabId) {}
        pub(crate) fn connect(&self, _conn: ConnId, _info: &[u8]) -> Result<Bytes> {
            Err(not_built())
        }
        pub(crate) fn drop_conn(&self, _conn: ConnId) {}
    }

    fn not_built() -> Error {
        Error::new(ErrorKind::Unsupported, "this server does not offer rdma: built without the `rdma` feature")
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use bytes::BytesMut;
    use clap::Parser;
    use farpool_core::ErrorKind;
    use farpool_core::wire::{self, FEATURE_RDMA, FrameReader, LEASE_FLAG_RDMA, Msg};

    use crate::cli::Cli;
    use crate::{Server, ServerConfig};

    fn call(stream: &mut std::net::TcpStream, reader: &mut FrameReader, m: &Msg) -> Msg {
        let mut out = BytesMut::new();
        wire::encode(m, &mut out);
        stream.write_all(&out).unwrap();
        reader.next(stream).unwrap()
    }

    /// On a host without RDMA (or a build without the feature) the server starts, does not advertise
    /// rdma, refuses rdma leases and `RdmaConnect` with `Unsupported`, and keeps serving the connection.
    #[test]
    fn without_a_device_rdma_is_not_offered_and_refusals_keep_the_connection() {
        if farpool_rdma::discover().is_ok() {
            println!("SKIPPED: an RDMA device is present; the no-device path is not reachable");
            return;
        }
        let cfg = ServerConfig::default()
            .with_listen("127.0.0.1:0".parse().unwrap())
            .with_capacity_bytes(4 << 20)
            .with_slab_size_bytes(1 << 20)
            .with_workers(1)
            .with_shm(false)
            .with_rdma_device(Some("rxe_lo".into()));
        let server = Server::start(cfg).unwrap();
        let t = Duration::from_secs(5);
        let mut s = farpool_core::tcp::connect_bounded(server.local_addr(), t).unwrap();
        let mut r = FrameReader::new();
        let hello = farpool_core::tcp::client_handshake(&mut s, &mut r, "t", t).unwrap();
        assert_eq!(hello.features & FEATURE_RDMA, 0);
        match call(&mut s, &mut r, &Msg::LeaseRequest { req: 1, slabs: 1, flags: LEASE_FLAG_RDMA }) {
            Msg::ErrorReply { req: 1, kind, .. } => assert_eq!(kind, ErrorKind::Unsupported),
            other => panic!("{other:?}"),
        }
        match call(&mut s, &mut r, &Msg::RdmaConnect { req: 2, info: bytes::Bytes::from_static(&[0; 8]) }) {
            Msg::ErrorReply { req: 2, kind, message } => {
                assert_eq!(kind, ErrorKind::Unsupported);
                assert!(message.contains("rdma"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(call(&mut s, &mut r, &Msg::Ping { req: 3 }), Msg::Pong { req: 3 }));
        server.shutdown(Duration::ZERO);
    }

    #[test]
    fn rdma_flags_parse() {
        let cli =
            Cli::try_parse_from(["farpool-memserver", "--rdma-device", "rxe_lo", "--rdma-gid-index", "1"]).unwrap();
        let (cfg, _) = cli.serve.resolve().unwrap();
        assert_eq!((cfg.rdma_device.as_deref(), cfg.rdma_gid_index, cfg.rdma_enabled), (Some("rxe_lo"), Some(1), true));
        let (cfg, _) = Cli::try_parse_from(["farpool-memserver", "--no-rdma"]).unwrap().serve.resolve().unwrap();
        assert!(!cfg.rdma_enabled);
        assert!(Cli::try_parse_from(["farpool-memserver", "--no-rdma", "--rdma-device", "x"]).is_err());
    }
}
