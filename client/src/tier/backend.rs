//! `FarBackend`: the narrow interface the tier needs from whatever lends it far memory.
//!
//! The tier asks for slabs, opens endpoints to the servers holding them and listens for revoke notices.
//!
//! Events name grants, not slabs: a slab id is granted again after it was released or revoked, and an
//! event can arrive late (after the tier leased the same slab id anew), so every event about a slab
//! carries the lease of the grant it is about ([`GrantRef`]). A backend never grants the same slab of one
//! server twice under one lease id (real servers pick random lease ids and never reuse one), so a
//! `(server, slab, lease)` names exactly one grant.
//! [`crate::tier::mem::MemBackend`] implements it in memory for tests; the `Pool` adapter
//! ([`crate::tier::pool_backend`]) implements it over real memory servers.

use std::time::Duration;

use crossbeam_channel::Receiver;
use farpool_core::{LeaseId, Result, ServerId, SlabGrant, SlabId, Transport};

/// One leased slab and the server that holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FarSlab {
    /// The server.
    pub server: ServerId,
    /// The grant (slab id, length, credential).
    pub grant: SlabGrant,
}

impl FarSlab {
    /// How events name this grant.
    pub fn grant_ref(&self) -> GrantRef {
        GrantRef::of(&self.grant)
    }
}

/// One grant of a slab, as events name it: the slab and the lease it was granted under (of the server
/// the event is about). See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GrantRef {
    /// The slab.
    pub slab: SlabId,
    /// The lease of the grant (`grant.cred.lease`).
    pub lease: LeaseId,
}

impl GrantRef {
    /// The reference to `grant`.
    pub fn of(grant: &SlabGrant) -> Self {
        Self { slab: grant.slab, lease: grant.cred.lease }
    }
}

/// Something the tier must react to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendEvent {
    /// These grants of `server` will be revoked after `grace`: move what is worth keeping.
    RevokeNotice {
        /// The server.
        server: ServerId,
        /// Its grants being taken back (a grant the tier does not hold, e.g. an older grant of a slab it
        /// leased again since, is ignored).
        grants: Vec<GrantRef>,
        /// Time left before the revocation.
        grace: Duration,
    },
    /// These grants are gone now.
    Revoked {
        /// The server.
        server: ServerId,
        /// The grants (ignored as in `RevokeNotice` when the tier does not hold them).
        grants: Vec<GrantRef>,
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

    /// A new subscription to revoke notices and failures (only events emitted after this call are
    /// delivered on it). The tier subscribes before its first lease, so nothing about its grants is missed.
    fn events(&self) -> Receiver<BackendEvent>;
}
