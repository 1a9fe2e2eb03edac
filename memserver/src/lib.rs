//! farpool-memserver: the memory server of farpool.
//!
//! Owns the pool (one or more `farpool_cxl::Region`s reserved up front and cut into fixed slabs), the
//! slab allocator, leases (id, epoch, expiry, renewal by heartbeat, reclaim on expiry), the control plane
//! (handshake, lease requests, admin commands: stats, shrink, drain, grow) and the TCP data plane (one-sided
//! READ, WRITE, CAS, FETCH_ADD executed on the client's behalf, pipelined and batched per connection), plus
//! Prometheus metrics and graceful shutdown.
//!
//! # Embedding
//! ```no_run
//! use farpool_memserver::{Server, ServerConfig};
//! let cfg = ServerConfig::default()
//!     .with_listen("127.0.0.1:0".parse().unwrap())
//!     .with_capacity_bytes(256 << 20)
//!     .with_slab_size_bytes(16 << 20);
//! let server = Server::start(cfg).unwrap();
//! println!("listening on {}", server.local_addr());
//! // ... clients connect with farpool_core::tcp::TcpTransport or the farpool client ...
//! server.shutdown(std::time::Duration::from_millis(100));
//! ```
//!
//! # Invariants
//! - A slab is granted to at most one lease at a time, and every grant has a fresh epoch and random token.
//! - Every data-plane operation is checked (slab, lease, epoch, token, expiry, bounds, alignment) before
//!   any byte of the pool is touched; a refused operation is answered with its error kind and the
//!   connection keeps working.
//! - No tenant sees another's bytes: a slab's memory is discarded (reads as zeros) after its grant was
//!   removed from the grant table and before it is granted again.
//! - `Renew` and `Release` carry the lease's secret (sent once, in `LeaseGranted`); with a wrong one they
//!   are answered like an unknown lease (`Unauthorized`) and change nothing, so knowing a lease id (logs
//!   and events print it) is not enough to end or take over someone else's lease.
//! - Revocation (shrink, drain) is announced with `RevokeNotice { grace_ms }` to the connection that last
//!   requested or renewed the lease, and carried out when the grace is over (`Revoked`).
//! - Every buffer and queue is bounded: frames by `MAX_FRAME_LEN`, per-connection output by a high-water
//!   mark (no reads while it is written), notices per connection by `CONN_QUEUE_LEN`, connections by
//!   `max_connections`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod alloc;
pub mod cli;
pub mod config;
mod conn;
mod dataplane;
pub mod grants;
mod metrics;
pub mod rdma;
mod server;
mod shm;
mod state;
pub mod stats;

pub use admin::{AdminOutcome, admin_request, format_outcome};
pub use config::ServerConfig;
pub use conn::{OUT_HIGH_WATER_BYTES, WRITE_STALL};
pub use server::{Server, ServerHandle, ShutdownTrigger};
pub use state::CONN_QUEUE_LEN;
pub use stats::ServerStats;
