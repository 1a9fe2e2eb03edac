//! farpool: the client library of the farpool far-memory pool.
//!
//! A [`Pool`] connects to one or more memory servers (a static list; the embedded default is one server
//! at `127.0.0.1:7070`), leases slabs of their memory ([`Lease`]), keeps the leases alive in the
//! background, and reads, writes and updates leased memory with one-sided operations. What happens to
//! the servers and leases (revoke notices with their deadline, revocations, lost leases, servers going
//! down or saying goodbye) arrives as [`PoolEvent`]s on [`Pool::events`] or a callback.
//!
//! ```no_run
//! use farpool::{PoolBuilder, PoolEvent, Target, TransportChoice};
//!
//! # fn main() -> farpool::Result<()> {
//! let pool = PoolBuilder::new(["127.0.0.1:7070"])
//!     .with_transport(TransportChoice::Auto)
//!     .with_op_timeout_ms(2_000)
//!     .build()?;
//! println!("transport: {:?}", pool.transport_of(0)?);
//! let events = pool.events();
//!
//! let lease = pool.lease(Target::Auto, 2)?; // two slabs
//! lease.write(0, 4096, b"hello far memory")?;
//! let mut buf = [0u8; 16];
//! lease.read(0, 4096, &mut buf)?;
//! assert_eq!(&buf, b"hello far memory");
//! let old = lease.fetch_add(1, 0, 1)?; // u64 counter at the start of the second slab
//!
//! // A dedicated per-thread endpoint pipelines batches.
//! let mut ep = pool.endpoint(lease.server())?;
//! ep.write_many(&lease, &[(0, 0, b"a".as_slice()), (1, 8, b"b".as_slice())])?;
//! let pages = ep.read_many(&lease, &[(0, 0, 8192), (1, 8192, 8192)])?;
//! # let _ = (old, pages);
//!
//! if let Ok(PoolEvent::RevokeNotice { slabs, deadline, .. }) = events.try_recv() {
//!     println!("move {} slabs before {deadline:?}", slabs.len());
//! }
//! lease.release()?;
//! # Ok(())
//! # }
//! ```
//!
//! Modules: [`config`] (builder and defaults), [`negotiate`] (transport choice), [`pool`] (servers,
//! leases registry), [`lease`], [`endpoint`] (data access), [`events`]; internally a control connection
//! per server with a reader thread, and one heartbeat thread. The page tier lives in `tier`.
//!
//! Invariants: every wait is bounded (connect timeout, op timeout): a dead or unreachable server
//! yields `Unreachable`/`Timeout`, never a hang; a forced transport that is unavailable is an
//! `Unsupported` error, never a silent fallback; accesses are checked against the lease client-side
//! before they are sent, and again by the server.
#![forbid(unsafe_code)]

pub mod arena;
pub mod config;
mod control;
pub mod endpoint;
pub mod events;
mod heartbeat;
pub mod lease;
pub mod negotiate;
pub mod pool;
mod rdma;
mod shm;
pub mod tier;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use arena::{Arena, ArenaSlice};
pub use config::{DEFAULT_SERVER, PoolBuilder, PoolConfig, TransportChoice};
pub use endpoint::Endpoint;
pub use events::PoolEvent;
pub use farpool_core::wire::AdminCmd;
pub use farpool_core::{Error, ErrorKind, LeaseId, RemoteAddr, Result, SlabGrant, SlabId, Transport, TransportKind};
pub use farpool_rdma::DeviceSelector;
pub use lease::{Lease, LeaseStatus};
pub use negotiate::{LocalCaps, Negotiated, ServerOffer};
pub use pool::{AdminReply, Pool, Target};
