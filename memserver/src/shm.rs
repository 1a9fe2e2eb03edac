//! The server's side of the shared-memory transport: the per-grant memfd registry and its Unix socket
//! (`farpool_cxl::shm`), wired into leases.
//!
//! Owns: [`ShmState`], created at start when shm is enabled and the backing allows it (`anon`, `memfd`,
//! `numa:N`; not `dax`, where one fd would reach the whole device). A lease with `LEASE_FLAG_SHM` gets
//! one fresh memfd per slab ([`ShmState::grant_mem`]); the grant's `SlabMem` is that memfd's region,
//! so the TCP data path of the grant touches the very same memory. Reclaiming the grant discards
//! (punches) the region and [`ShmState::forget`] drops the registry entry: the memfd is never handed
//! out again, and a mapping a client kept reads zeros.

use std::path::PathBuf;
use std::sync::Arc;

use farpool_core::{Epoch, LeaseId, Result, SlabId, Token};
use farpool_cxl::shm::{GrantMemory, ShmGrants, ShmServer, ShmServerOptions, default_socket_path};

use crate::config::ServerConfig;
use crate::grants::SlabMem;

/// The shm transport of a running server.
#[derive(Debug)]
pub(crate) struct ShmState {
    grants: Arc<ShmGrants>,
    server: ShmServer,
}

impl ShmState {
    /// Start serving shm for `cfg` (its `listen` port names the default socket path), or `None` when
    /// shm is disabled or the backing cannot isolate grants (logged). Binding the socket failing is an
    /// error.
    pub(crate) fn start(cfg: &ServerConfig) -> Result<Option<Self>> {
        if !cfg.shm_enabled {
            tracing::info!("shm transport disabled by configuration");
            return Ok(None);
        }
        let memory = match GrantMemory::for_backing(&cfg.backing) {
            Ok(m) => m,
            Err(e) => {
                tracing::info!("shm transport not offered: {e}");
                return Ok(None);
            }
        };
        let path: PathBuf = cfg.shm_socket.clone().unwrap_or_else(|| default_socket_path(cfg.listen.port()));
        let grants = ShmGrants::new(memory);
        let server = ShmServer::bind(&path, grants.clone(), ShmServerOptions::default())?;
        Ok(Some(Self { grants, server }))
    }

    /// The socket path advertised in `HelloOk.shm_path`.
    pub(crate) fn path(&self) -> String {
        self.server.path().display().to_string()
    }

    /// A fresh memfd-backed slab for one grant.
    pub(crate) fn grant_mem(
        &self,
        lease: LeaseId,
        slab: SlabId,
        epoch: Epoch,
        token: Token,
        len: u64,
    ) -> Result<SlabMem> {
        let region = self.grants.create(lease, slab, epoch, token, len)?;
        Ok(SlabMem { region, offset: 0, len })
    }

    /// Drop a grant's registry entry (after its memory was discarded); its memfd is never used again.
    pub(crate) fn forget(&self, lease: LeaseId, slab: SlabId) {
        self.grants.revoke(lease, slab);
    }
}
