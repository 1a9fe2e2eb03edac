//! `FarBackend`: the narrow interface the tier needs from whatever lends it far memory.
//!
//! The tier asks for slabs, opens endpoints to the servers holding them and listens for revoke notices.
//! [`crate::tier::mem::MemBackend`] implements it in memory for tests; the `Pool` adapter
//! ([`crate::tier::pool_backend`]) implements it over real memory servers.

use std::time::Duration;

use crossbeam_channel::Receiver;
use farpool_core::{Result, ServerId, SlabGrant, SlabId, Transport};

/// One leased slab and the server that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FarSlab {
    /// The server.
    pub server: ServerId,
    /// The grant (slab id, length, credential).
    pub grant: SlabGrant,
}

/// Something the tier must react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendEvent {
    /// These slabs of `server` will be revoked after `grace`: move what is worth keeping.
    RevokeNotice {
        /// The server.
        server: ServerId,
        /// Its slabs being taken back.
        slabs: Vec<SlabId>,
        /// Time left before the revocation.
        grace: Duration,
    },
    /// These slabs are gone now.
    Revoked {
        /// The server.
        server: ServerId,
        /// The slabs.
        slabs: Vec<SlabId>,
    },
    /// The server is unreachable: everything it held is lost.
    ServerDown {
        /// The server.
        server: ServerId,
    },
}

/// What lends the tier far memory. Implementations are shared by all threads of the tier.
pub trait FarBackend: Send + Sync + std::fmt::Debug + 'static {
    /// Lease up to `slabs` more slabs (possibly fewer, spread over servers as the backend sees fit).
    /// `Err(NoSpace)` or an empty vector when nothing is available.
    fn lease(&self, slabs: usize) -> Result<Vec<FarSlab>>;

    /// Give a slab back early (after a revoke notice has been handled). Errors are logged, not fatal.
    fn release(&self, slab: &FarSlab) -> Result<()>;

    /// A new endpoint to `server`, used by one thread at a time.
    fn endpoint(&self, server: ServerId) -> Result<Box<dyn Transport>>;

    /// A channel of revoke notices and failures, for the tier's maintenance thread.
    fn events(&self) -> Receiver<BackendEvent>;
}
