//! [`Arena`]: local memory that far-memory reads land in and writes leave from, registered with the
//! client's RDMA device when it has one, so that those bytes move with no copy: a buffer manager's
//! frames, read straight into on a page fault as perftest reads into its registered buffer.
//!
//! An arena is made by the pool ([`Pool::arena`](crate::Pool::arena) allocates page-aligned zeroed
//! memory; [`Pool::arena_from`](crate::Pool::arena_from) takes the caller's own and hands it back with
//! [`Arena::into_box`]). It is registered when the pool may use rdma (`Auto` or `Rdma`) and the
//! client's device opened; otherwise it is plain memory and every transport copies as it would for a
//! `&mut [u8]` (the log and [`Arena::device`] say which). Either way the calls are the same:
//! [`Endpoint::read_into`](crate::Endpoint::read_into) / [`write_from`](crate::Endpoint::write_from)
//! (and the [`Lease`](crate::Lease) forms) with an [`ArenaSlice`] of it.
//!
//! ```no_run
//! # fn main() -> farpool::Result<()> {
//! let pool = farpool::PoolBuilder::new(["127.0.0.1:7070"]).build()?;
//! let lease = pool.lease(farpool::Target::Auto, 1)?;
//! let mut ep = pool.endpoint(lease.server())?;
//! let mut frames = pool.arena(64 * 8192)?; // or pool.arena_from(the_callers_box)
//! println!("registered with {:?}", frames.device());
//! for (i, mut frame) in frames.chunks_mut(8192)?.enumerate().take(4) {
//!     ep.read_into(&lease, 0, i as u64 * 8192, &mut frame)?; // page i into frame i
//! }
//! let mut frame = frames.slice_mut(0..8192)?;
//! frame[..4].copy_from_slice(b"page");
//! ep.write_from(&lease, 0, 0, &frame)?;
//! # Ok(())
//! # }
//! ```
//!
//! Safety argument (no `unsafe` here): the NIC writes only into the range a blocking call names, and
//! that range is an `&mut [u8]` the call borrows until the NIC is done with it (on a timeout the rdma
//! endpoint destroys its queue pair before returning). The registration is local-only: no peer can
//! write into an arena. An [`ArenaSlice`] carries the registration next to its bytes, so a call cannot
//! pair bytes with a registration that does not contain them (the rdma transport checks it anyway).

use std::any::Any;
use std::fmt;
use std::ops::{Deref, DerefMut, Range};

use farpool_core::{Error, ErrorKind, Result};

use crate::config::{PoolConfig, TransportChoice};

/// Alignment of arenas the pool allocates: the 4 KiB page (what `O_DIRECT` and registration want).
pub const ARENA_ALIGN: usize = 4096;

/// Memory for zero-copy far-memory reads and writes. See the module docs.
pub struct Arena {
    mem: Mem,
}

enum Mem {
    /// Not registered: `buf[start..start + len]` (the offset page-aligns a pool-allocated arena).
    Plain { buf: Box<[u8]>, start: usize, len: usize, caller: bool },
    /// Registered with the client's RDMA device; `reg` is the buffer's registration, held apart from
    /// it so that a slice can borrow the bytes mutably and the registration shared at once.
    #[cfg(feature = "rdma")]
    Registered { buf: farpool_rdma::LocalBuffer, reg: std::sync::Arc<farpool_rdma::Registration>, caller: bool },
}

/// Where an arena's bytes come from.
pub(crate) enum Source {
    /// `len` zeroed bytes the pool allocates.
    Zeroed(usize),
    /// The caller's memory.
    Caller(Box<[u8]>),
}

impl Source {
    fn len(&self) -> usize {
        match self {
            Source::Zeroed(n) => *n,
            Source::Caller(b) => b.len(),
        }
    }
}

impl fmt::Debug for Arena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arena").field("len", &self.len()).field("device", &self.device()).finish()
    }
}

impl Arena {
    /// An arena for a pool configured as `cfg`: registered when rdma may be used and the device opens.
    pub(crate) fn new(cfg: &PoolConfig, src: Source) -> Result<Self> {
        let len = src.len();
        if len == 0 {
            return Err(Error::new(ErrorKind::Config, "an arena of 0 bytes"));
        }
        let why_plain = match cfg.transport {
            TransportChoice::Tcp | TransportChoice::Shm => {
                Some(format!("the pool's transport is {:?}, not rdma", cfg.transport))
            }
            TransportChoice::Auto | TransportChoice::Rdma => crate::rdma::unavailable(&cfg.rdma),
        };
        if let Some(why) = why_plain {
            tracing::debug!(bytes = len, "arena is plain memory (copies on every transport): {why}");
            return Ok(Self::plain(src));
        }
        Self::registered(cfg, src)
    }

    fn plain(src: Source) -> Self {
        match src {
            Source::Caller(buf) => {
                let len = buf.len();
                Self { mem: Mem::Plain { buf, start: 0, len, caller: true } }
            }
            Source::Zeroed(len) => {
                let buf = vec![0u8; len + ARENA_ALIGN - 1].into_boxed_slice();
                let start = buf.as_ptr().align_offset(ARENA_ALIGN);
                Self { mem: Mem::Plain { buf, start, len, caller: false } }
            }
        }
    }

    #[cfg(feature = "rdma")]
    fn registered(cfg: &PoolConfig, src: Source) -> Result<Self> {
        use farpool_rdma::{Access, LocalBuffer};
        let ctx = crate::rdma::device(&cfg.rdma).map_err(|why| Error::new(ErrorKind::Unsupported, why))?;
        let len = src.len();
        let (buf, caller) = match src {
            Source::Zeroed(len) => (LocalBuffer::new(&ctx, len, Access::LOCAL)?, false),
            Source::Caller(b) => match LocalBuffer::from_box(&ctx, b, Access::LOCAL) {
                Ok(buf) => (buf, true),
                Err((e, b)) => {
                    // The caller's memory is not lost with the registration: used as plain memory.
                    tracing::warn!(bytes = len, device = ctx.name(), "arena not registered, plain memory: {e}");
                    return Ok(Self::plain(Source::Caller(b)));
                }
            },
        };
        tracing::info!(bytes = len, device = ctx.name(), "arena registered for zero-copy rdma reads and writes");
        let reg = buf.registration().clone();
        Ok(Self { mem: Mem::Registered { buf, reg, caller } })
    }

    #[cfg(not(feature = "rdma"))]
    fn registered(_cfg: &PoolConfig, src: Source) -> Result<Self> {
        Ok(Self::plain(src))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match &self.mem {
            Mem::Plain { len, .. } => *len,
            #[cfg(feature = "rdma")]
            Mem::Registered { buf, .. } => buf.len(),
        }
    }

    /// Always false (empty arenas are refused).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The RDMA device the arena is registered with, or `None` for plain memory.
    pub fn device(&self) -> Option<&str> {
        match &self.mem {
            Mem::Plain { .. } => None,
            #[cfg(feature = "rdma")]
            Mem::Registered { reg, .. } => Some(reg.context().name()),
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.mem {
            Mem::Plain { buf, start, len, .. } => &buf[*start..*start + *len],
            #[cfg(feature = "rdma")]
            Mem::Registered { buf, .. } => buf.as_slice(),
        }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.all().buf
    }

    /// The whole arena as one [`ArenaSlice`].
    pub fn all(&mut self) -> ArenaSlice<'_> {
        match &mut self.mem {
            Mem::Plain { buf, start, len, .. } => ArenaSlice { buf: &mut buf[*start..*start + *len], reg: None },
            #[cfg(feature = "rdma")]
            Mem::Registered { buf, reg, .. } => ArenaSlice { buf: buf.as_mut_slice(), reg: Some(&*reg) },
        }
    }

    /// `range` of the arena as an [`ArenaSlice`]; `OutOfRange` when it does not lie inside.
    pub fn slice_mut(&mut self, range: Range<usize>) -> Result<ArenaSlice<'_>> {
        let len = self.len();
        if range.start > range.end || range.end > len {
            return Err(Error::new(ErrorKind::OutOfRange, format!("range {range:?} of an arena of {len} bytes")));
        }
        let all = self.all();
        Ok(ArenaSlice { buf: &mut all.buf[range], reg: all.reg })
    }

    /// The arena cut into consecutive slices of `size` bytes (the last may be shorter), e.g. a buffer
    /// manager's frames. `Config` error for a size of 0.
    pub fn chunks_mut(&mut self, size: usize) -> Result<impl Iterator<Item = ArenaSlice<'_>>> {
        if size == 0 {
            return Err(Error::new(ErrorKind::Config, "arena chunks of 0 bytes"));
        }
        Ok(self.all().into_chunks(size))
    }

    /// The caller's memory back (deregistered first), for an arena made by
    /// [`Pool::arena_from`](crate::Pool::arena_from); `Err(self)` for one the pool allocated.
    pub fn into_box(self) -> std::result::Result<Box<[u8]>, Self> {
        match self.mem {
            Mem::Plain { buf, caller: true, .. } => Ok(buf),
            #[cfg(feature = "rdma")]
            Mem::Registered { buf, reg, caller: true } => {
                // Only the buffer may hold the registration for it to be released.
                drop(reg);
                buf.into_box().map_err(|buf| {
                    let reg = buf.registration().clone();
                    Self { mem: Mem::Registered { buf, reg, caller: true } }
                })
            }
            mem => Err(Self { mem }),
        }
    }
}

/// What an [`ArenaSlice`] carries of its arena's registration: the registration itself with rdma built
/// in; nothing can be registered without it.
#[cfg(feature = "rdma")]
pub(crate) type Reg = std::sync::Arc<farpool_rdma::Registration>;
#[cfg(not(feature = "rdma"))]
pub(crate) type Reg = std::convert::Infallible;

/// A mutable range of an [`Arena`] together with the arena's registration: what
/// [`Endpoint::read_into`](crate::Endpoint::read_into) reads into and
/// [`Endpoint::write_from`](crate::Endpoint::write_from) writes from. Derefs to `[u8]`.
pub struct ArenaSlice<'a> {
    buf: &'a mut [u8],
    reg: Option<&'a Reg>,
}

impl fmt::Debug for ArenaSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArenaSlice")
            .field("at", &self.buf.as_ptr())
            .field("len", &self.buf.len())
            .field("registered", &self.is_registered())
            .finish()
    }
}

impl<'a> ArenaSlice<'a> {
    /// Whether the bytes are registered with an RDMA device (zero copy over rdma).
    pub fn is_registered(&self) -> bool {
        self.reg.is_some()
    }

    /// A shorter-lived slice of the same bytes (to pass one slice to several calls).
    pub fn reborrow(&mut self) -> ArenaSlice<'_> {
        ArenaSlice { buf: &mut *self.buf, reg: self.reg }
    }

    /// Split at `mid` (panics when `mid > len`, as `<[u8]>::split_at_mut` does).
    pub fn split_at_mut(self, mid: usize) -> (ArenaSlice<'a>, ArenaSlice<'a>) {
        let (a, b) = self.buf.split_at_mut(mid);
        (ArenaSlice { buf: a, reg: self.reg }, ArenaSlice { buf: b, reg: self.reg })
    }

    /// Consecutive slices of `size` bytes (the last may be shorter; panics for 0, as
    /// `<[u8]>::chunks_mut` does).
    pub fn into_chunks(self, size: usize) -> impl Iterator<Item = ArenaSlice<'a>> {
        let reg = self.reg;
        self.buf.chunks_mut(size).map(move |buf| ArenaSlice { buf, reg })
    }

    /// The bytes and the registration (the token of [`farpool_core::Transport::read_registered`]).
    #[inline]
    pub(crate) fn parts(&mut self) -> (&mut [u8], Option<&'a Reg>) {
        (&mut *self.buf, self.reg)
    }

    /// The bytes and the token, shared (for writes).
    pub(crate) fn shared_parts(&self) -> (&[u8], Option<&dyn Any>) {
        (&*self.buf, self.reg.map(|r| r as &dyn Any))
    }
}

impl Deref for ArenaSlice<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf
    }
}

impl DerefMut for ArenaSlice<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PoolBuilder, Target, TransportKind};

    fn server() -> farpool_memserver::ServerHandle {
        let cfg = farpool_memserver::ServerConfig::default()
            .with_listen("127.0.0.1:0".parse().unwrap())
            .with_capacity_bytes(4 << 20)
            .with_slab_size_bytes(1 << 20)
            .with_workers(1);
        farpool_memserver::Server::start(cfg).unwrap()
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    /// Frames out and back through every host transport: the same calls whatever the arena is.
    #[test]
    fn frames_round_trip_through_each_transport() {
        let s = server();
        let addr = s.local_addr().to_string();
        for (choice, kind) in [
            (TransportChoice::Tcp, TransportKind::Tcp),
            (TransportChoice::Shm, TransportKind::Shm),
            (TransportChoice::Auto, TransportKind::Shm),
        ] {
            let pool = PoolBuilder::new([addr.as_str()]).with_transport(choice).build().unwrap();
            let lease = pool.lease(Target::Auto, 1).unwrap();
            let mut ep = pool.endpoint(lease.server()).unwrap();
            assert_eq!(ep.kind(), kind);
            let mut arena = pool.arena(4 * 8192).unwrap();
            assert_eq!(arena.as_slice().as_ptr().align_offset(ARENA_ALIGN), 0, "page-aligned");
            if matches!(choice, TransportChoice::Tcp | TransportChoice::Shm)
                || crate::rdma::unavailable(&pool.config().rdma).is_some()
            {
                assert_eq!(arena.device(), None, "{choice:?}: plain memory");
            }
            for (i, mut frame) in arena.chunks_mut(8192).unwrap().enumerate() {
                frame.copy_from_slice(&pattern(8192, i as u8));
                ep.write_from(&lease, 0, (i * 8192) as u64, &frame).unwrap();
            }
            arena.as_mut_slice().fill(0);
            // Frame i back from page 3 - i, half of them through the lease's own endpoint.
            for (i, mut frame) in arena.chunks_mut(8192).unwrap().enumerate() {
                let from = ((3 - i) * 8192) as u64;
                if i % 2 == 0 {
                    ep.read_into(&lease, 0, from, &mut frame).unwrap();
                } else {
                    lease.read_into(0, from, &mut frame).unwrap();
                }
            }
            for i in 0..4 {
                assert_eq!(
                    &arena.as_slice()[i * 8192..(i + 1) * 8192],
                    &pattern(8192, (3 - i) as u8)[..],
                    "{choice:?}"
                );
            }
            let mut part = arena.slice_mut(100..108).unwrap();
            lease.write_from(0, 65536, &part).unwrap();
            part.fill(0);
            ep.read_into(&lease, 0, 65536, &mut part.reborrow()).unwrap();
            assert_eq!(&part[..], &pattern(8192, 3)[100..108]);
        }
    }

    /// Bad input is an error with nothing changed: an empty arena, a range outside it, a read outside
    /// the grant (the arena keeps its bytes), a lease of another server.
    #[test]
    fn bad_ranges_are_errors_and_leave_the_arena_alone() {
        let s = server();
        let addr = s.local_addr().to_string();
        let pool = PoolBuilder::new([addr.as_str()]).build().unwrap();
        assert_eq!(pool.arena(0).unwrap_err().kind(), ErrorKind::Config);
        assert_eq!(pool.arena_from(Box::new([])).unwrap_err().kind(), ErrorKind::Config);
        let mut arena = pool.arena(8192).unwrap();
        assert_eq!(arena.slice_mut(8000..8200).unwrap_err().kind(), ErrorKind::OutOfRange);
        #[allow(clippy::reversed_empty_ranges)]
        let e = arena.slice_mut(10..5).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        assert_eq!(arena.chunks_mut(0).err().map(|e| e.kind()), Some(ErrorKind::Config));
        arena.as_mut_slice().fill(7);
        let lease = pool.lease(Target::Auto, 1).unwrap();
        let mut all = arena.all();
        let e = lease.read_into(0, (1 << 20) - 4096, &mut all).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
        let e = lease.read_into(1, 0, &mut all).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange, "{e}");
        assert!(arena.as_slice().iter().all(|&b| b == 7), "a refused read changes nothing");
        let other = server();
        let other_addr = other.local_addr().to_string();
        let two = PoolBuilder::new([addr.as_str(), other_addr.as_str()]).build().unwrap();
        let mut ep1 = two.endpoint(1).unwrap();
        let lease0 = two.lease(0usize, 1).unwrap();
        let e = ep1.read_into(&lease0, 0, 0, &mut arena.all()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        lease.read_into(0, 0, &mut arena.all()).unwrap();
    }

    /// The caller's memory is used in place and handed back; a pool-allocated arena has none to give.
    #[test]
    fn caller_memory_comes_back() {
        let s = server();
        let addr = s.local_addr().to_string();
        let pool = PoolBuilder::new([addr.as_str()]).with_transport(TransportChoice::Tcp).build().unwrap();
        let lease = pool.lease(Target::Auto, 1).unwrap();
        let mem: Box<[u8]> = pattern(10_000, 1).into_boxed_slice();
        let start = mem.as_ptr();
        let mut arena = pool.arena_from(mem).unwrap();
        assert_eq!(arena.len(), 10_000);
        assert_eq!(arena.as_slice().as_ptr(), start, "used in place");
        lease.write_from(0, 0, &arena.all()).unwrap();
        let mut back = vec![0u8; 10_000];
        lease.read(0, 0, &mut back).unwrap();
        assert_eq!(back, pattern(10_000, 1));
        let mem = arena.into_box().unwrap();
        assert_eq!((mem.as_ptr(), mem.len()), (start, 10_000));
        assert!(pool.arena(4096).unwrap().into_box().is_err());
    }
}
