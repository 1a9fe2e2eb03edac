//! The farpool wire protocol: control plane and TCP data plane share one framing.
//!
//! A frame is `u32 little-endian body length | body`; the body is a one-byte tag and the message's
//! fields, integers little-endian, strings and byte strings length-prefixed. The length prefix is checked
//! against [`MAX_FRAME_LEN`] before anything is buffered, and every count inside a frame is checked
//! against the bytes actually present, so a peer can make us neither panic nor allocate what it claims.
//!
//! A connection opens with [`Msg::Hello`] (magic + version); the server answers [`Msg::HelloOk`] or an
//! [`Msg::ErrorReply`] of kind `Protocol` and closes. Data-plane operations are [`Msg::Op`] frames
//! answered by [`Msg::OpDone`] frames carrying the same id; many may be in flight per connection
//! (pipelining), and the server answers them in order per connection.

mod codec;
mod msg;

pub use codec::{FrameReader, decode, encode, encode_op, encode_op_done_read, encode_op_done_read_head};
pub use msg::*;

/// Protocol magic, first field of [`Msg::Hello`]: ASCII `FRPL`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRPL");
/// The protocol version this build speaks.
pub const VERSION: u16 = 2;
/// Largest payload of one READ or WRITE operation. Larger transfers are split by the client.
pub const MAX_OP_LEN: u32 = 1 << 20;
/// Largest frame body accepted: one maximal WRITE plus headroom for its header.
pub const MAX_FRAME_LEN: u32 = MAX_OP_LEN + 4096;
/// Largest string field (names, messages, paths).
pub const MAX_STR_LEN: usize = 4096;
/// Largest number of slabs in one lease grant, notice or stats reply.
pub const MAX_LIST_LEN: usize = 65_536;
