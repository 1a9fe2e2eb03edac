//! `PinnedMemory`: memory that stays at one address for as long as the value lives.
//!
//! Declared here, at the bottom of the crate graph, so that the crate that owns a kind of memory
//! (farpool-cxl's `Region`) can vouch for it and the crate that registers memory with a device
//! (farpool-rdma) can accept it, without either depending on the other. An `unsafe trait`: implementing
//! it is a promise the registration code relies on.
#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::Arc;

/// Memory that stays at one address, mapped and writable, for as long as the value lives: what a
/// pool can be registered from without `unsafe` at the call site.
///
/// # Safety
///
/// `as_raw` must return the same pointer and length on every call, the range must be valid for reads
/// and writes for the whole life of the value, and nothing else may free, unmap or move it meanwhile.
/// A device may write into it at any time, so the implementor must not hand out references to those
/// bytes.
pub unsafe trait PinnedMemory: Send + Sync + 'static {
    /// Start and length of the memory.
    fn as_raw(&self) -> (NonNull<u8>, usize);
}

// SAFETY: the boxed slice is never reallocated (the Box is only held) and lives until it is dropped;
// moving the Box does not move its heap block.
unsafe impl PinnedMemory for Box<[u8]> {
    fn as_raw(&self) -> (NonNull<u8>, usize) {
        (NonNull::from(&**self).cast(), self.len())
    }
}

// SAFETY: an `Arc` keeps its `T` alive and at one heap address until the last clone is dropped, so
// `T`'s own guarantees carry over unchanged.
unsafe impl<T: PinnedMemory> PinnedMemory for Arc<T> {
    fn as_raw(&self) -> (NonNull<u8>, usize) {
        (**self).as_raw()
    }
}
