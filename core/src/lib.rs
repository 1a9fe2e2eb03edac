//! farpool-core: the vocabulary every other farpool crate speaks.
//!
//! Owns: identifiers and remote-address descriptors ([`ids`]), the error type ([`Error`], [`ErrorKind`]),
//! the wire protocol of the control plane and the TCP data plane ([`wire`]), the [`Transport`] trait with
//! its blocking and async conveniences ([`transport`]), the TCP transport ([`tcp`]) and the seeded
//! fault-injecting decorator ([`fault`]).
//!
//! Invariants:
//! - Decoding never panics and never allocates more than the bytes actually received: a frame's length
//!   prefix is checked against [`wire::MAX_FRAME_LEN`] before anything else.
//! - A remote address is data, not a pointer: bounds, credential and epoch checks happen on the side that
//!   owns the memory and fail with an [`ErrorKind`].
#![deny(unsafe_code)] // allowed only in `buf` and `pinned`, which document why

pub mod buf;
pub mod error;
pub mod fault;
pub mod ids;
pub mod pinned;
pub mod sample;
pub mod size;
pub mod tcp;
pub mod transport;
pub mod wire;

pub use error::{Error, ErrorKind, Result};
pub use ids::{Credential, Epoch, LeaseId, RemoteAddr, ServerId, SlabGrant, SlabId, Token};
pub use pinned::PinnedMemory;
pub use transport::{Completion, OpKind, OpOutput, Transport, TransportKind, WorkRequest};
