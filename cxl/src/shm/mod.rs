//! The shared-memory transport: same-host clients map their slab grants and use loads and stores.
//!
//! Flow: the client leases slabs over the control plane with `LEASE_FLAG_SHM`; the server creates one
//! fresh memfd per grant ([`ShmGrants::create`]) and keeps it in its registry. The client connects to
//! the server's Unix socket ([`ShmServer`], path advertised in `HelloOk.shm_path`) and, per grant,
//! sends an attach request carrying the grant's credential; the server checks it and answers with a
//! frame naming (lease, slab, epoch, token, len) and the memfd attached with `SCM_RIGHTS`
//! ([`ShmClient::attach`]). The client maps it and runs one-sided operations as memcpy and atomics on
//! the mapping ([`ShmTransport`]).
//!
//! Revocation: the server punches the grant's pages out of its memfd (`fallocate(PUNCH_HOLE)`), drops
//! the registry entry and never hands that memfd out again. A client mapping that outlives its lease
//! keeps a reference to that memfd only, so it reads zeros, never another tenant's bytes: the slab's
//! next grant is a different memfd.
//!
//! Wire format of the Unix socket (little-endian, fixed size, so nothing is allocated from peer input):
//! - request, [`REQ_LEN`] bytes: `magic u32 = "FPSH" | version u16 | op u16 (1 = attach) | lease u64 |
//!   slab u32 | 0 u32 | epoch u64 | token u64`
//! - reply, [`REP_LEN`] bytes + message: `magic u32 | kind u8 (0 = ok, else an ErrorKind code) | 0 u8 |
//!   msg_len u16 (<= [`MAX_MSG_LEN`]) | lease u64 | slab u32 | 0 u32 | epoch u64 | token u64 | len u64`,
//!   then `msg_len` bytes of UTF-8 error text. An ok reply carries exactly one fd.

mod client;
mod proto;
mod server;
mod transport;

pub use client::{ShmClient, ShmMapping};
pub use proto::{MAGIC, MAX_MSG_LEN, REP_LEN, REQ_LEN, VERSION};
pub use server::{GrantMemory, ShmGrants, ShmServer, ShmServerOptions};
pub use transport::{ShmOptions, ShmTransport};

/// Default socket path for a server on TCP port `port`: `$XDG_RUNTIME_DIR/farpool-<port>.sock`, else
/// `/tmp/farpool-<port>.sock`.
pub fn default_socket_path(port: u16) -> std::path::PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(|| std::path::PathBuf::from("/tmp"));
    dir.join(format!("farpool-{port}.sock"))
}

#[cfg(test)]
mod tests;
