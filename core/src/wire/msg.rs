//! Message types of the wire protocol.

use bytes::Bytes;

use super::MAX_OP_LEN;
use crate::error::{Error, ErrorKind, Result};
use crate::ids::{LeaseId, RemoteAddr, ServerId, SlabGrant, SlabId};

/// Feature bit in [`HelloOk::features`]: the server offers the shared-memory transport.
pub const FEATURE_SHM: u32 = 1;
/// Feature bit: the server offers RDMA.
pub const FEATURE_RDMA: u32 = 2;
/// Feature bit: the server executes one-sided ops over TCP.
pub const FEATURE_TCP: u32 = 4;

/// Lease request flag: the client will access the grant over shared memory (one memfd per grant).
pub const LEASE_FLAG_SHM: u32 = 1;
/// Lease request flag: the client will access the grant over RDMA (register an MR per grant).
pub const LEASE_FLAG_RDMA: u32 = 2;

/// A one-sided operation as carried on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireOp {
    /// Read `len` bytes.
    Read {
        /// Bytes to read.
        len: u32,
    },
    /// Write the bytes.
    Write {
        /// Payload.
        data: Bytes,
    },
    /// Compare-and-swap an 8-byte aligned u64; the completion returns the old value.
    CompareSwap {
        /// Expected value.
        expect: u64,
        /// Value stored when the old one equals `expect`.
        new: u64,
    },
    /// Fetch-and-add on an 8-byte aligned u64; the completion returns the old value.
    FetchAdd {
        /// Addend (wrapping).
        add: u64,
    },
}

impl WireOp {
    /// Bytes the operation touches at the remote address.
    pub fn len(&self) -> u64 {
        match self {
            Self::Read { len } => u64::from(*len),
            Self::Write { data } => data.len() as u64,
            Self::CompareSwap { .. } | Self::FetchAdd { .. } => 8,
        }
    }

    /// Whether it touches no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether it is an atomic (alignment rules apply).
    pub fn is_atomic(&self) -> bool {
        matches!(self, Self::CompareSwap { .. } | Self::FetchAdd { .. })
    }

    /// Validate what can be checked without the remote side: size limit and atomic alignment.
    pub fn check(&self, addr: &RemoteAddr) -> Result<()> {
        if self.len() > u64::from(MAX_OP_LEN) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("operation of {} bytes exceeds the per-op maximum of {MAX_OP_LEN}", self.len()),
            ));
        }
        if self.is_atomic() && !addr.offset.is_multiple_of(8) {
            return Err(Error::new(ErrorKind::Unaligned, format!("atomic at {addr} is not 8-byte aligned")));
        }
        Ok(())
    }
}

/// A data-plane operation request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpReq {
    /// Caller-chosen id echoed in the completion.
    pub id: u64,
    /// Target address and credential.
    pub addr: RemoteAddr,
    /// The operation.
    pub op: WireOp,
}

/// What a successful operation returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// A write completed.
    Done,
    /// Bytes read.
    Data(Bytes),
    /// The old value of an atomic.
    Value(u64),
}

/// A data-plane completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpDone {
    /// The id of the request.
    pub id: u64,
    /// The result or the error kind and message.
    pub result: Result<OpResult, (ErrorKind, String)>,
}

/// First frame from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelloOk {
    /// Protocol version the server speaks.
    pub version: u16,
    /// The server's id.
    pub server_id: ServerId,
    /// Host identity (boot id) used by clients to detect that they share the host.
    pub host_id: String,
    /// `FEATURE_*` bits.
    pub features: u32,
    /// Unix socket path for the shm transport (empty when not offered).
    pub shm_path: String,
    /// Slab size in bytes.
    pub slab_size: u64,
}

/// A lease as granted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    /// Echo of the request id.
    pub req: u64,
    /// The lease.
    pub lease: LeaseId,
    /// Milliseconds until expiry unless renewed.
    pub expires_in_ms: u64,
    /// The lease's secret: `Renew` and `Release` must carry it (the lease id alone, which logs and
    /// events print, proves nothing).
    pub secret: u64,
    /// The slabs.
    pub grants: Vec<SlabGrant>,
}

/// Admin commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminCmd {
    /// Report counters.
    Stats,
    /// Give back `slabs` slabs of capacity, with revoke notices `grace_ms` ahead.
    Shrink {
        /// Number of slabs to remove.
        slabs: u32,
        /// Grace period for holders.
        grace_ms: u64,
    },
    /// Revoke everything and stop granting (spot VM reclaim).
    Drain {
        /// Grace period for holders.
        grace_ms: u64,
    },
    /// Add capacity.
    Grow {
        /// Bytes to add (rounded down to slabs).
        bytes: u64,
    },
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    // ---- client -> server ----
    /// Handshake: must be the first frame of a connection.
    Hello {
        /// Must be [`super::MAGIC`].
        magic: u32,
        /// The client's protocol version.
        version: u16,
        /// The client's host identity.
        host_id: String,
        /// Free-form client name for logs.
        name: String,
    },
    /// Ask for `slabs` slabs.
    LeaseRequest {
        /// Request id echoed in the reply.
        req: u64,
        /// How many slabs.
        slabs: u32,
        /// `LEASE_FLAG_*` bits.
        flags: u32,
    },
    /// Heartbeat: extend the lease.
    Renew {
        /// Request id.
        req: u64,
        /// Which lease.
        lease: LeaseId,
        /// The lease's secret, from its `LeaseGranted`.
        secret: u64,
    },
    /// Give a lease back.
    Release {
        /// Request id.
        req: u64,
        /// Which lease.
        lease: LeaseId,
        /// The lease's secret, from its `LeaseGranted`.
        secret: u64,
    },
    /// A one-sided operation.
    Op(OpReq),
    /// An admin command.
    Admin {
        /// Request id.
        req: u64,
        /// What to do.
        cmd: AdminCmd,
    },
    /// Liveness check.
    Ping {
        /// Request id.
        req: u64,
    },
    /// RDMA connection setup: the client's queue-pair info (opaque to the protocol).
    RdmaConnect {
        /// Request id.
        req: u64,
        /// Serialized QP info.
        info: Bytes,
    },

    // ---- server -> client ----
    /// Handshake accepted.
    HelloOk(HelloOk),
    /// A lease was granted.
    LeaseGranted(LeaseGrant),
    /// A lease was renewed.
    Renewed {
        /// Request id.
        req: u64,
        /// Which lease.
        lease: LeaseId,
        /// New time to expiry.
        expires_in_ms: u64,
    },
    /// Generic success reply.
    Ack {
        /// Request id.
        req: u64,
    },
    /// Completion of an [`Msg::Op`].
    OpDone(OpDone),
    /// The server will revoke these slabs of this lease after `grace_ms`.
    RevokeNotice {
        /// Which lease.
        lease: LeaseId,
        /// Affected slabs.
        slabs: Vec<SlabId>,
        /// Milliseconds until revocation.
        grace_ms: u64,
    },
    /// These slabs of this lease are revoked now.
    Revoked {
        /// Which lease.
        lease: LeaseId,
        /// Revoked slabs.
        slabs: Vec<SlabId>,
    },
    /// Reply to an admin command: counters and a human-readable summary.
    AdminReply {
        /// Request id.
        req: u64,
        /// Named counters.
        stats: Vec<(String, u64)>,
        /// Summary text.
        text: String,
    },
    /// A request failed (or, with `req == 0`, the connection is being closed for a protocol error).
    ErrorReply {
        /// Request id, 0 if not tied to a request.
        req: u64,
        /// Error kind.
        kind: ErrorKind,
        /// What went wrong.
        message: String,
    },
    /// The server is shutting down; leases end after `grace_ms`.
    Goodbye {
        /// Why.
        reason: String,
        /// Milliseconds until the server stops serving.
        grace_ms: u64,
    },
    /// Reply to [`Msg::Ping`].
    Pong {
        /// Request id.
        req: u64,
    },
    /// RDMA connection accepted: the server's queue-pair info.
    RdmaAccepted {
        /// Request id.
        req: u64,
        /// Serialized QP info.
        info: Bytes,
    },
}

impl Msg {
    /// The request id this message answers or carries, if it has one.
    pub fn req_id(&self) -> Option<u64> {
        match self {
            Msg::LeaseRequest { req, .. }
            | Msg::Renew { req, .. }
            | Msg::Release { req, .. }
            | Msg::Admin { req, .. }
            | Msg::Ping { req }
            | Msg::RdmaConnect { req, .. }
            | Msg::Renewed { req, .. }
            | Msg::Ack { req }
            | Msg::AdminReply { req, .. }
            | Msg::ErrorReply { req, .. }
            | Msg::Pong { req }
            | Msg::RdmaAccepted { req, .. } => Some(*req),
            Msg::LeaseGranted(g) => Some(g.req),
            _ => None,
        }
    }
}
