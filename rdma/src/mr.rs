//! Memory registration: local buffers, caller-owned arenas, and the server's pool with one MR per grant.
//!
//! Who may touch registered bytes, and when:
//! - The NIC reads or writes a registered range only while an operation that names it is in flight on
//!   some queue pair (this side's ops), or at any time through an rkey that is still registered
//!   (remote peers, for a grant with remote access).
//! - [`LocalBuffer`] bytes are touched by the CPU only through `&self`/`&mut self`; the safe endpoint
//!   calls that make the NIC write into one borrow it mutably until the operation has completed (or the
//!   queue pair was destroyed). The `unsafe` zero-copy calls hand that duty to their caller.
//! - A [`Registration`] is deregistered before its memory is freed (field order in the structs below),
//!   and in-flight operations hold an `Arc` of it, so the NIC never writes into unregistered memory.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use farpool_core::{Error, ErrorKind, Result};
use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::memory_region::MemoryRegion;

use crate::device::Context;
use crate::error::verbs;

/// Alignment of buffers this crate allocates: the 4 KiB base page, the unit the kernel pins for a
/// registration (x86-64; larger pages are multiples).
pub const PAGE: usize = 4096;

/// Remote rights of a registration (local read/write are always granted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Peers may RDMA READ it.
    pub remote_read: bool,
    /// Peers may RDMA WRITE it.
    pub remote_write: bool,
    /// Peers may run atomics on it.
    pub remote_atomic: bool,
}

impl Access {
    /// Local access only (client buffers and staging).
    pub const LOCAL: Access = Access { remote_read: false, remote_write: false, remote_atomic: false };
    /// READ, WRITE and atomics from peers (a slab grant).
    pub const REMOTE_ALL: Access = Access { remote_read: true, remote_write: true, remote_atomic: true };

    pub(crate) fn flags(self) -> AccessFlags {
        let mut f = AccessFlags::LocalWrite;
        if self.remote_read {
            f |= AccessFlags::RemoteRead;
        }
        if self.remote_write {
            f |= AccessFlags::RemoteWrite;
        }
        if self.remote_atomic {
            f |= AccessFlags::RemoteAtomic;
        }
        f
    }
}

pub use farpool_core::PinnedMemory;

/// A heap buffer allocated and owned by this crate, page-aligned and zeroed.
struct HeapBlock {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl HeapBlock {
    fn new(len: usize) -> Result<Self> {
        let layout = Layout::from_size_align(len.max(1), PAGE)
            .map_err(|e| Error::new(ErrorKind::Config, format!("buffer of {len} bytes")).with_source(e))?;
        // SAFETY: the layout has a non-zero size (len.max(1)).
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw)
            .ok_or_else(|| Error::new(ErrorKind::NoSpace, format!("cannot allocate {len} bytes for RDMA")))?;
        Ok(Self { ptr, layout })
    }
}

impl Drop for HeapBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

// SAFETY: HeapBlock owns its allocation exclusively; the bytes are only reached through the raw pointer
// by code that follows the module's access rules.
unsafe impl Send for HeapBlock {}
// SAFETY: as above; &HeapBlock gives no access to the bytes by itself.
unsafe impl Sync for HeapBlock {}

/// A caller's boxed slice, held as a raw pointer while it is registered (so no `Box` asserts unique
/// access to bytes the NIC and `LocalBuffer`'s slices reach through the registration's pointer), and
/// rebuilt into the same `Box` when it is freed or handed back.
struct BoxBlock {
    ptr: NonNull<[u8]>,
}

impl BoxBlock {
    fn new(b: Box<[u8]>) -> Self {
        // SAFETY: `Box::into_raw` never returns null.
        Self { ptr: unsafe { NonNull::new_unchecked(Box::into_raw(b)) } }
    }

    fn into_box(self) -> Box<[u8]> {
        let ptr = self.ptr;
        std::mem::forget(self);
        // SAFETY: `ptr` came from `Box::into_raw` in `new`, and ownership returns exactly once (here, or
        // in `drop`, which `forget` skipped).
        unsafe { Box::from_raw(ptr.as_ptr()) }
    }
}

impl Drop for BoxBlock {
    fn drop(&mut self) {
        // SAFETY: as in `into_box`: rebuilt once, from the pointer `Box::into_raw` gave.
        drop(unsafe { Box::from_raw(self.ptr.as_ptr()) });
    }
}

// SAFETY: BoxBlock owns its allocation exclusively, as the `Box` it came from did.
unsafe impl Send for BoxBlock {}
// SAFETY: as above; &BoxBlock gives no access to the bytes by itself.
unsafe impl Sync for BoxBlock {}

/// A registered memory range: the MR handle plus what keeps the memory alive.
pub struct Registration {
    // Field order matters: the MR is deregistered before the owner frees the memory.
    mr: Arc<MemoryRegion>,
    _owner: Option<Box<dyn std::any::Any + Send + Sync>>,
    ptr: NonNull<u8>,
    len: usize,
    /// `mr`'s local key, kept here so the depth-1 path reads a field instead of calling into sideway.
    lkey: u32,
    ctx: Arc<Context>,
}

// SAFETY: the pointer is an address of registered memory that is either owned by `owner` or guaranteed
// valid by the `unsafe` registration contract; Registration itself never dereferences it.
unsafe impl Send for Registration {}
// SAFETY: as above; shared access only reads the address, length and keys.
unsafe impl Sync for Registration {}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len)
            .field("lkey", &format_args!("{:#x}", self.lkey()))
            .field("rkey", &format_args!("{:#x}", self.rkey()))
            .finish()
    }
}

impl Registration {
    fn new(
        ctx: &Arc<Context>,
        ptr: NonNull<u8>,
        len: usize,
        access: Access,
        owner: Option<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Result<Self> {
        if len == 0 || len as u64 > ctx.limits().max_mr_size {
            return Err(Error::new(
                ErrorKind::Config,
                format!("cannot register {len} bytes (device max_mr_size {})", ctx.limits().max_mr_size),
            ));
        }
        // SAFETY: every caller guarantees (by ownership through `owner`, or by its own `unsafe`
        // contract) that ptr..ptr+len stays valid and mapped until this Registration is dropped, and the
        // MR is dropped first (field order).
        let mr = unsafe { ctx.pd().reg_mr(ptr.as_ptr() as usize, len, access.flags()) }.map_err(|e| {
            let hint = "ulimit -l too low? (RDMA pins the pages)";
            verbs(ErrorKind::Io, format!("ibv_reg_mr of {len} bytes at {:p} failed; {hint}", ptr.as_ptr()), e)
        })?;
        let lkey = mr.lkey();
        Ok(Self { mr, _owner: owner, ptr, len, lkey, ctx: ctx.clone() })
    }

    /// Address of the first byte (what a peer puts in its work requests for an rkey of this MR).
    #[inline]
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (empty registrations are refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Local key.
    #[inline]
    pub fn lkey(&self) -> u32 {
        self.lkey
    }

    /// Remote key (meaningful only with remote access).
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }

    /// The device it is registered with.
    #[inline]
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    #[inline]
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    /// Whether `offset..offset + len` lies inside.
    #[inline]
    pub fn contains(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len)
    }

    /// Check that `offset..offset + len` lies inside; `OutOfRange` otherwise.
    pub fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!("local range {offset}+{len} outside the registration of {} bytes", self.len),
            )),
        }
    }
}

impl Context {
    /// Register caller-owned memory (e.g. a buffer manager's frame arena, so reads land straight in it).
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be valid for reads and writes and stay mapped at this address until the
    /// returned `Registration` and every clone of the `Arc` (in-flight operations hold one) are dropped.
    /// With remote access, peers holding the rkey may write into it at any time until then.
    pub unsafe fn register(
        self: &Arc<Self>,
        ptr: NonNull<u8>,
        len: usize,
        access: Access,
    ) -> Result<Arc<Registration>> {
        Registration::new(self, ptr, len, access, None).map(Arc::new)
    }

    /// Register memory this call takes ownership of (safe: see [`PinnedMemory`]).
    pub fn register_owned<M: PinnedMemory>(self: &Arc<Self>, mem: M, access: Access) -> Result<Arc<Registration>> {
        let (ptr, len) = mem.as_raw();
        Registration::new(self, ptr, len, access, Some(Box::new(mem))).map(Arc::new)
    }
}

/// A zeroed, page-aligned buffer owned by this crate and registered for local access: the landing
/// place of reads and the source of writes.
pub struct LocalBuffer {
    reg: Arc<Registration>,
}

impl fmt::Debug for LocalBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LocalBuffer").field(&self.reg).finish()
    }
}

impl LocalBuffer {
    /// Allocate and register `len` bytes with `access`.
    pub fn new(ctx: &Arc<Context>, len: usize, access: Access) -> Result<Self> {
        let block = HeapBlock::new(len)?;
        let ptr = block.ptr;
        Ok(Self { reg: Arc::new(Registration::new(ctx, ptr, len, access, Some(Box::new(block)))?) })
    }

    /// Register the caller's memory `b` (e.g. a buffer manager's frames) and own it until
    /// [`into_box`](Self::into_box) hands it back. When registration fails (an empty slice: `Config`;
    /// the device refused it, e.g. `ulimit -l`) the memory comes back with the error, untouched.
    pub fn from_box(ctx: &Arc<Context>, b: Box<[u8]>, access: Access) -> std::result::Result<Self, (Error, Box<[u8]>)> {
        let len = b.len();
        let block = BoxBlock::new(b);
        let ptr = block.ptr.cast::<u8>();
        match Registration::new(ctx, ptr, len, access, None) {
            Ok(mut reg) => {
                reg._owner = Some(Box::new(block));
                Ok(Self { reg: Arc::new(reg) })
            }
            Err(e) => Err((e, block.into_box())),
        }
    }

    /// Deregister and hand back the memory of a buffer made by [`from_box`](Self::from_box), the
    /// same allocation with its bytes. `Err(self)` while something else still holds the registration (an
    /// operation in flight, or a clone of [`registration`](Self::registration)'s `Arc`), or for a buffer
    /// this crate allocated.
    pub fn into_box(self) -> std::result::Result<Box<[u8]>, Self> {
        let reg = match Arc::try_unwrap(self.reg) {
            Ok(r) => r,
            Err(reg) => return Err(Self { reg }),
        };
        let Registration { mr, _owner, ptr, len, lkey, ctx } = reg;
        let _owner = match _owner.map(|o| o.downcast::<BoxBlock>()) {
            Some(Ok(block)) => {
                // The MR first: the NIC loses access before the memory changes hands.
                drop(mr);
                return Ok(block.into_box());
            }
            Some(Err(other)) => Some(other),
            None => None,
        };
        Err(Self { reg: Arc::new(Registration { mr, _owner, ptr, len, lkey, ctx }) })
    }

    /// The registration (for the zero-copy endpoint calls).
    pub fn registration(&self) -> &Arc<Registration> {
        &self.reg
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.reg.len
    }

    /// Always false (empty buffers are refused).
    pub fn is_empty(&self) -> bool {
        self.reg.len == 0
    }

    /// The bytes. Must not be called while a zero-copy operation started with `unsafe` targets them.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the block is owned by the registration and lives as long as `self`; the NIC writes only
        // under `&mut self` (safe calls) or under the caller's `unsafe` promise not to look meanwhile.
        unsafe { std::slice::from_raw_parts(self.reg.ptr.as_ptr(), self.reg.len) }
    }

    /// The bytes, mutably (same rule as [`LocalBuffer::as_slice`]).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only CPU access.
        unsafe { std::slice::from_raw_parts_mut(self.reg.ptr.as_ptr(), self.reg.len) }
    }
}

/// A remote memory region as a peer sees it: where, how long, which key. Serializable for the control
/// plane (20 bytes: addr u64, len u64, rkey u32, little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RemoteRegion {
    /// Virtual address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
}

impl RemoteRegion {
    /// Encoded length.
    pub const WIRE_LEN: usize = 20;

    /// Encode.
    pub fn to_bytes(&self) -> [u8; Self::WIRE_LEN] {
        let mut b = [0u8; Self::WIRE_LEN];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.rkey.to_le_bytes());
        b
    }

    /// Decode (`Protocol` error on a wrong length or an address range that wraps).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let arr: [u8; Self::WIRE_LEN] = b
            .try_into()
            .map_err(|_| Error::new(ErrorKind::Protocol, format!("remote region of {} bytes, expected 20", b.len())))?;
        let u64_at = |i: usize| u64::from_le_bytes(arr[i..i + 8].try_into().unwrap_or_default());
        let r =
            Self { addr: u64_at(0), len: u64_at(8), rkey: u32::from_le_bytes([arr[16], arr[17], arr[18], arr[19]]) };
        if r.addr.checked_add(r.len).is_none() {
            return Err(Error::new(ErrorKind::Protocol, format!("remote region {r:?} wraps around")));
        }
        Ok(r)
    }

    /// The address of byte `offset`, if `offset..offset + len` lies inside; `OutOfRange` otherwise.
    pub fn at(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.addr + offset),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!("remote range {offset}+{len} outside the region of {} bytes (rkey {:#x})", self.len, self.rkey),
            )),
        }
    }
}
