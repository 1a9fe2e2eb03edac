//! farpool-cxl: memory the pool is made of, and how it is found.
//!
//! Owns: [`region::Region`], a mapping with bounds-checked safe accessors (the only place where pool
//! memory is touched through raw pointers), and the backings it is made from ([`backing`]: anon,
//! memfd, [`numa`]-bound, [`dax`]); memory topology discovery ([`topology`]); cache-line coherence
//! for non-coherent shared memory ([`coherence`]); the shared-memory transport ([`shm`]); vectored socket
//! writes straight from pool memory ([`gather`]).
//!
//! Invariant: every access goes through [`region::Region`]'s checked methods: `offset + len <= len()`
//! and atomics 8-byte aligned, checked in safe code before any pointer is formed.

pub mod backing;
pub mod coherence;
pub mod dax;
pub mod gather;
pub mod numa;
pub mod region;
pub mod shm;
pub mod topology;

pub use backing::{Backing, HugePages};
pub use coherence::Coherence;
pub use region::Region;
pub use shm::{ShmClient, ShmGrants, ShmMapping, ShmOptions, ShmServer, ShmTransport};
pub use topology::Topology;
