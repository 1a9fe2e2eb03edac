//! Identifiers and remote-address descriptors.
//!
//! A remote address names bytes inside a leased slab: `(slab, offset)` plus the [`Credential`] that
//! proves the right to touch them. Addresses are plain data; the side that owns the memory checks
//! bounds, token and epoch before any byte is touched.

use std::fmt;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub $t);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// A memory server, chosen at random when the server starts.
    ServerId(u64)
);
id_type!(
    /// A lease: a set of slabs granted to one client until expiry or revocation.
    LeaseId(u64)
);
id_type!(
    /// A slab: a fixed-size piece of a server's pool.
    SlabId(u32)
);
id_type!(
    /// Incremented on every grant of a slab, so a stale credential for a re-granted slab is refused.
    Epoch(u64)
);
id_type!(
    /// A random per-grant secret checked on every TCP operation.
    Token(u64)
);

/// The right to access one slab grant, as the client presents it with every operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Credential {
    /// The lease the slab belongs to.
    pub lease: LeaseId,
    /// The epoch of the grant.
    pub epoch: Epoch,
    /// The random token of the grant (TCP and shm).
    pub token: Token,
    /// The RDMA rkey of the grant's memory region (0 when the grant has no RDMA registration).
    pub rkey: u32,
    /// The RDMA virtual address of the slab's first byte (0 without RDMA).
    pub base_addr: u64,
}

/// One slab of a lease, as granted by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlabGrant {
    /// Which slab.
    pub slab: SlabId,
    /// Length of the slab in bytes.
    pub len: u64,
    /// Access credential of this grant.
    pub cred: Credential,
}

/// A byte address inside a granted slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RemoteAddr {
    /// The slab.
    pub slab: SlabId,
    /// Byte offset from the slab's start.
    pub offset: u64,
    /// The right to touch it.
    pub cred: Credential,
}

impl RemoteAddr {
    /// The address of byte `offset` of a grant.
    pub fn in_grant(grant: &SlabGrant, offset: u64) -> Self {
        Self { slab: grant.slab, offset, cred: grant.cred }
    }

    /// The same slab, `delta` bytes further.
    #[must_use]
    pub fn offset_by(self, delta: u64) -> Self {
        Self { offset: self.offset + delta, ..self }
    }
}

impl fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lease {} slab {} +{:#x}", self.cred.lease, self.slab, self.offset)
    }
}
