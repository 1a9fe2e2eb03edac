//! How verbs failures become [`farpool_core::Error`]s.
//!
//! Work-completion statuses are the stable `enum ibv_wc_status` values of `<infiniband/verbs.h>`;
//! they are repeated here (module [`wc_status`]) so the mapping is compiled and unit-tested without
//! the `rdma` feature and without a device.

use std::fmt;

use farpool_core::{Error, ErrorKind};

/// The error every entry point returns when there is no usable RDMA device (ErrorKind::Unsupported):
/// `"no RDMA device: <reason>"`. Automatic transport negotiation matches on the kind and moves on.
pub fn no_device(reason: impl fmt::Display) -> Error {
    Error::new(ErrorKind::Unsupported, format!("no RDMA device: {reason}"))
}

/// A verbs call failed: `kind`, what we were doing, and the underlying error as the source.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) fn verbs(
    kind: ErrorKind,
    what: impl Into<String>,
    source: impl std::error::Error + Send + Sync + 'static,
) -> Error {
    Error::new(kind, what).with_source(source)
}

/// `enum ibv_wc_status` from `<infiniband/verbs.h>` (stable ABI since libibverbs 1.0).
pub mod wc_status {
    #![allow(missing_docs)]
    pub const SUCCESS: u32 = 0;
    pub const LOC_LEN_ERR: u32 = 1;
    pub const LOC_QP_OP_ERR: u32 = 2;
    pub const LOC_EEC_OP_ERR: u32 = 3;
    pub const LOC_PROT_ERR: u32 = 4;
    pub const WR_FLUSH_ERR: u32 = 5;
    pub const MW_BIND_ERR: u32 = 6;
    pub const BAD_RESP_ERR: u32 = 7;
    pub const LOC_ACCESS_ERR: u32 = 8;
    pub const REM_INV_REQ_ERR: u32 = 9;
    pub const REM_ACCESS_ERR: u32 = 10;
    pub const REM_OP_ERR: u32 = 11;
    pub const RETRY_EXC_ERR: u32 = 12;
    pub const RNR_RETRY_EXC_ERR: u32 = 13;
    pub const LOC_RDD_VIOL_ERR: u32 = 14;
    pub const REM_INV_RD_REQ_ERR: u32 = 15;
    pub const REM_ABORT_ERR: u32 = 16;
    pub const INV_EECN_ERR: u32 = 17;
    pub const INV_EEC_STATE_ERR: u32 = 18;
    pub const FATAL_ERR: u32 = 19;
    pub const RESP_TIMEOUT_ERR: u32 = 20;
    pub const GENERAL_ERR: u32 = 21;
    pub const TM_ERR: u32 = 22;
    pub const TM_RNDV_INCOMPLETE: u32 = 23;

    /// The name `ibv_wc_status_str` would print, without calling into libibverbs.
    pub fn name(status: u32) -> &'static str {
        const NAMES: [&str; 24] = [
            "success",
            "local length error",
            "local QP operation error",
            "local EE context operation error",
            "local protection error",
            "Work Request Flushed Error",
            "memory management operation error",
            "bad response error",
            "local access error",
            "remote invalid request error",
            "remote access error",
            "remote operation error",
            "transport retry counter exceeded",
            "RNR retry counter exceeded",
            "local RDD violation error",
            "remote invalid RD request",
            "aborted error",
            "invalid EE context number",
            "invalid EE context state",
            "fatal error",
            "response timeout error",
            "general error",
            "tag matching error",
            "tag matching rendezvous incomplete",
        ];
        NAMES.get(status as usize).copied().unwrap_or("unknown status")
    }
}

/// The class of a one-sided operation, as far as error mapping cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpClass {
    /// RDMA READ.
    Read,
    /// RDMA WRITE.
    Write,
    /// CMP_SWAP or FETCH_ADD.
    Atomic,
}

impl OpClass {
    fn as_str(self) -> &'static str {
        match self {
            Self::Read => "READ",
            Self::Write => "WRITE",
            Self::Atomic => "atomic",
        }
    }
}

/// What was posted, for the message and kind of a failed completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WcContext {
    /// The operation.
    pub op: OpClass,
    /// Remote virtual address of the first byte.
    pub remote_addr: u64,
    /// Remote key used.
    pub rkey: u32,
    /// Bytes.
    pub len: u32,
    /// The operation had been in flight longer than the endpoint's `op_timeout` when the queue pair
    /// was moved to the error state (its flush then means `Timeout`, not `Cancelled`).
    pub overdue: bool,
}

/// Map a failed work completion to an error kind:
///
/// | status | kind |
/// |---|---|
/// | remote access error (bad rkey, deregistered MR, outside the MR) | `Revoked` |
/// | remote invalid request on a misaligned atomic | `Unaligned` |
/// | remote invalid request / bad response | `Protocol` |
/// | transport or RNR retry exceeded | `Unreachable` |
/// | response timeout | `Timeout` |
/// | flushed (QP went to error before it ran) | `Cancelled` (`Timeout` if overdue) |
/// | remote operation / abort / fatal / general error | `Io` |
/// | local length, protection, access, QP errors (a bug on this side) | `Internal` |
///
/// The NIC reports the same status for a deregistered MR and an access outside a live one, and it
/// cannot tell which: callers that know the grant's length check bounds before posting (see
/// `RdmaTransport::add_grant`), so a rejection of an in-bounds access means the grant is gone.
pub fn map_wc_status(status: u32, vendor_err: u32, ctx: &WcContext) -> Error {
    use wc_status as s;
    let kind = match status {
        s::REM_ACCESS_ERR => ErrorKind::Revoked,
        s::REM_INV_REQ_ERR if ctx.op == OpClass::Atomic && !ctx.remote_addr.is_multiple_of(8) => ErrorKind::Unaligned,
        s::REM_INV_REQ_ERR | s::REM_INV_RD_REQ_ERR | s::BAD_RESP_ERR => ErrorKind::Protocol,
        s::RETRY_EXC_ERR | s::RNR_RETRY_EXC_ERR => ErrorKind::Unreachable,
        s::RESP_TIMEOUT_ERR => ErrorKind::Timeout,
        s::WR_FLUSH_ERR if ctx.overdue => ErrorKind::Timeout,
        s::WR_FLUSH_ERR => ErrorKind::Cancelled,
        s::REM_OP_ERR | s::REM_ABORT_ERR | s::FATAL_ERR | s::GENERAL_ERR => ErrorKind::Io,
        _ => ErrorKind::Internal,
    };
    let why = match kind {
        ErrorKind::Revoked => ": the memory region behind this rkey is gone (revoked) or the access is outside it",
        ErrorKind::Unreachable => ": the peer did not acknowledge (dead server or broken path)",
        ErrorKind::Cancelled => ": flushed because the queue pair went to the error state first",
        ErrorKind::Timeout if status == s::WR_FLUSH_ERR => ": in flight longer than op_timeout",
        _ => "",
    };
    Error::new(
        kind,
        format!(
            "RDMA {} of {} bytes at {:#x} (rkey {:#x}) failed: {} (status {status}, vendor error {vendor_err:#x}){why}",
            ctx.op.as_str(),
            ctx.len,
            ctx.remote_addr,
            ctx.rkey,
            wc_status::name(status),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(op: OpClass, remote_addr: u64) -> WcContext {
        WcContext { op, remote_addr, rkey: 0x1234, len: 8, overdue: false }
    }

    #[test]
    fn completion_statuses_map_to_kinds() {
        use wc_status as s;
        let read = ctx(OpClass::Read, 0x1000);
        let cases = [
            (s::REM_ACCESS_ERR, ErrorKind::Revoked),
            (s::RETRY_EXC_ERR, ErrorKind::Unreachable),
            (s::RNR_RETRY_EXC_ERR, ErrorKind::Unreachable),
            (s::RESP_TIMEOUT_ERR, ErrorKind::Timeout),
            (s::WR_FLUSH_ERR, ErrorKind::Cancelled),
            (s::REM_INV_REQ_ERR, ErrorKind::Protocol),
            (s::BAD_RESP_ERR, ErrorKind::Protocol),
            (s::REM_OP_ERR, ErrorKind::Io),
            (s::FATAL_ERR, ErrorKind::Io),
            (s::LOC_PROT_ERR, ErrorKind::Internal),
            (s::LOC_LEN_ERR, ErrorKind::Internal),
            (s::LOC_ACCESS_ERR, ErrorKind::Internal),
            (999, ErrorKind::Internal),
        ];
        for (status, kind) in cases {
            let e = map_wc_status(status, 0, &read);
            assert_eq!(e.kind(), kind, "status {status} ({})", wc_status::name(status));
            assert!(e.message().contains("READ"), "{e}");
        }
    }

    #[test]
    fn misaligned_atomic_and_overdue_flush() {
        let e = map_wc_status(wc_status::REM_INV_REQ_ERR, 0, &ctx(OpClass::Atomic, 0x1004));
        assert_eq!(e.kind(), ErrorKind::Unaligned);
        let e = map_wc_status(wc_status::REM_INV_REQ_ERR, 0, &ctx(OpClass::Atomic, 0x1008));
        assert_eq!(e.kind(), ErrorKind::Protocol);
        let mut c = ctx(OpClass::Write, 0);
        c.overdue = true;
        assert_eq!(map_wc_status(wc_status::WR_FLUSH_ERR, 0, &c).kind(), ErrorKind::Timeout);
    }

    #[test]
    fn revoked_message_names_the_rkey_and_status() {
        let e = map_wc_status(wc_status::REM_ACCESS_ERR, 0x42, &ctx(OpClass::Read, 0xabc0));
        let m = e.to_string();
        assert!(m.contains("rkey 0x1234") && m.contains("remote access error") && m.contains("0xabc0"), "{m}");
    }

    #[test]
    fn no_device_is_unsupported_with_the_agreed_prefix() {
        let e = no_device("none found");
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("no RDMA device: none found"), "{e}");
        assert!(!e.is_retryable());
    }

    #[test]
    fn every_status_has_a_name() {
        for s in 0..=wc_status::TM_RNDV_INCOMPLETE {
            assert_ne!(wc_status::name(s), "unknown status");
        }
        assert_eq!(wc_status::name(24), "unknown status");
    }
}
