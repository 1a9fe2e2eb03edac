//! farpool-rdma: the RDMA verbs layer of farpool (through [sideway], which loads libibverbs at run time).
//!
//! Owns: device discovery and selection ([`discover`], [`Context::open`], RoCE v2 GID choice), memory
//! registration (client buffers and arenas, the server's pool with one MR per slab grant), RC queue
//! pairs with their [`QpInfo`] exchange format, one-sided READ / WRITE / CMP_SWAP / FETCH_ADD with
//! batched posting and selective signaling (`Endpoint`), the mapping of every work-completion status to
//! a [`farpool_core::ErrorKind`] ([`map_wc_status`]), and the `Transport` implementation
//! (`RdmaTransport`). Without the `rdma` feature only the data types, the codecs and the error mapping
//! exist, and [`discover`] / [`Context::open`] fail with `Unsupported`.
//!
//! Both sides of a connection:
//!
//! ```text
//! server (memserver)                          client
//! ctx = Context::open(&sel)?                  ctx = Context::open(&sel)?
//! pool = ctx.register_pool(ptr, len)?  (once)
//! grant = pool.grant(off, len)? -> rkey/addr  ep = Endpoint::new(&ctx, EndpointConfig::new())?
//!                     <--- control plane: client's ep.local_info().to_bytes() ---
//! sep = Endpoint::new(&ctx, passive())?
//! sep.connect(&QpInfo::from_bytes(..)?)?
//!                     --- server's sep.local_info().to_bytes() --->
//!                                             ep.connect(&server_info)?
//! grant.deregister()  (revoke: rkey dead)     RdmaTransport::new(ep): post / poll
//! ```
//!
//! Invariants:
//! - No panic on a machine without RDMA: every entry point returns `Unsupported` ("no RDMA device: ...")
//!   when libibverbs is missing, the kernel has no RDMA, no device is configured, or this crate was
//!   built without the `rdma` feature.
//! - Memory the NIC may touch is never freed or reused while an operation on it is in flight: queue
//!   pairs are destroyed before the buffers they use, in-flight records hold their registrations (see
//!   `endpoint.rs` and `mr.rs` for which field may be touched when).
//! - Every accepted operation completes exactly once; after an error completion the queue pair is in the
//!   error state, later operations are flushed (`Cancelled`), and the endpoint must be reconnected.
//!
//! [sideway]: https://github.com/RDMA-Rust/sideway
#![cfg_attr(not(feature = "rdma"), forbid(unsafe_code))]

mod clock;
pub mod error;
pub mod info;
pub mod qp_info;
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
mod staging;

#[cfg(feature = "rdma")]
mod alone;
#[cfg(feature = "rdma")]
mod device;
#[cfg(feature = "rdma")]
mod endpoint;
#[cfg(feature = "rdma")]
mod lend;
#[cfg(feature = "rdma")]
mod mr;
#[cfg(feature = "rdma")]
mod ops;
#[cfg(feature = "rdma")]
mod pool;
#[cfg(feature = "rdma")]
mod qp;
#[cfg(feature = "rdma")]
mod sync;
#[cfg(feature = "rdma")]
mod transport;

#[cfg(not(feature = "rdma"))]
mod stub;

pub use clock::{CycleClock, probe};
#[cfg(feature = "rdma")]
pub use device::{Context, Limits, discover};
#[cfg(feature = "rdma")]
pub use endpoint::{Endpoint, EndpointConfig, EndpointState, Op, Output, QpExchange, RdmaCompletion, Remote};
#[cfg(feature = "rdma")]
pub use mr::{Access, LocalBuffer, PAGE, PinnedMemory, Registration, RemoteRegion};
#[cfg(feature = "rdma")]
pub use ops::{DirectOp, Direction};
#[cfg(feature = "rdma")]
pub use pool::{PoolRegistration, SlabMr};
#[cfg(feature = "rdma")]
pub use transport::RdmaTransport;

#[cfg(not(feature = "rdma"))]
pub use stub::{Context, discover};

pub use error::{OpClass, WcContext, map_wc_status, no_device, wc_status};
pub use info::{DeviceInfo, DeviceSelector, GidInfo, GidKind, LinkLayer, PortInfo, PortState};
pub use qp_info::QpInfo;

/// Whether this build has the verbs backend (the `rdma` feature).
pub const ENABLED: bool = cfg!(feature = "rdma");

/// Open an RDMA device (shorthand for [`Context::open`]). `Unsupported` ("no RDMA device: ...") when
/// there is none or the crate was built without the `rdma` feature.
pub fn open(sel: &DeviceSelector) -> farpool_core::Result<std::sync::Arc<Context>> {
    Context::open(sel)
}

#[cfg(test)]
mod tests {
    use farpool_core::ErrorKind;

    use super::*;

    /// On the build host (no RDMA in the kernel) and in a build without the feature, discovery and
    /// open fail with Unsupported and the agreed message, never a panic. Where a device exists (the VM)
    /// the test says so instead of claiming the no-device path.
    #[test]
    fn no_device_path_returns_unsupported() {
        match discover() {
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
                assert!(e.to_string().contains("no RDMA device: "), "{e}");
                let o = open(&DeviceSelector::new()).unwrap_err();
                assert_eq!(o.kind(), ErrorKind::Unsupported, "{o}");
                assert!(o.to_string().contains("no RDMA device: "), "{o}");
            }
            Ok(devs) => {
                println!(
                    "SKIPPED: an RDMA device is present ({} found), the no-device path is not reachable",
                    devs.len()
                );
            }
        }
    }

    #[test]
    fn a_missing_named_device_is_unsupported() {
        let e = open(&DeviceSelector::new().with_device("no-such-rdma-device")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    }
}
