//! [`Staging`]: an endpoint's registered staging buffer with its [`Ring`], shared (behind an `Arc`)
//! with the `Bytes` of staged READs that were *lent* to the caller instead of copied out.
//!
//! Why: a staged READ lands in the staging buffer by DMA; copying it into a fresh buffer for the
//! completion costs one more pass over the data in user space (under software RDMA, whose kernel side
//! already copies twice, that alone cost a third of the READ bandwidth). Lending hands the span itself
//! out as `Bytes::from_owner(Lent)`; dropping the last clone of those `Bytes` returns the span.
//!
//! Ownership and invariants:
//! - A span is owned by exactly one of: the ring (free), an in-flight record of the endpoint (the NIC
//!   may write it), or one [`Lent`] (read-only for the CPU, never touched by the NIC again: its record
//!   completed). [`Ring::free`] panics on a second free, so two owners cannot both return it.
//! - The registration lives as long as the `Arc<Staging>`: an endpoint that is dropped or replaces its
//!   staging leaves the buffer registered and mapped until the last lent `Bytes` is gone.
//! - The ring sits behind a `Mutex` because `Bytes` may be dropped on any thread; the endpoint takes it
//!   once per allocation and once per return (uncontended in the common case).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use farpool_core::Result;

use crate::device::Context;
use crate::mr::{Access, LocalBuffer};
use crate::staging::{Ring, Span};

/// One registered staging buffer and its allocator.
#[derive(Debug)]
pub(crate) struct Staging {
    buf: LocalBuffer,
    ring: Mutex<Ring>,
    cap: usize,
}

impl Staging {
    /// Allocate and register `cap` bytes (a multiple of `SPAN_ALIGN`, checked by the endpoint config).
    pub(crate) fn new(ctx: &Arc<Context>, cap: usize) -> Result<Arc<Self>> {
        let buf = LocalBuffer::new(ctx, cap, Access::LOCAL)?;
        Ok(Arc::new(Self { buf, ring: Mutex::new(Ring::new(cap)), cap }))
    }

    fn ring(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock can only come from the ring's own invariant checks; the state
        // is still consistent (they panic before changing anything).
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Capacity in bytes.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Take a span of `len` bytes; `None` when it does not fit now.
    pub(crate) fn alloc(&self, len: usize) -> Option<Span> {
        self.ring().alloc(len)
    }

    /// Return a span (see [`Ring::free`]).
    pub(crate) fn free(&self, span: Span) {
        self.ring().free(span);
    }

    /// Bytes charged in the ring right now.
    pub(crate) fn used(&self) -> usize {
        self.ring().used()
    }

    /// Local key of the registration.
    pub(crate) fn lkey(&self) -> u32 {
        self.buf.registration().lkey()
    }

    /// Address of the first byte.
    pub(crate) fn addr(&self) -> u64 {
        self.buf.registration().addr()
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.buf.registration().ptr().as_ptr()
    }

    /// Hand `span` (whose first `len` bytes hold a completed READ's data) to the caller as `Bytes`.
    /// The span returns to the ring when the last clone of those `Bytes` is dropped.
    pub(crate) fn lend(self: &Arc<Self>, span: Span, len: usize) -> Bytes {
        assert!(len <= span.charged && span.offset + len <= self.cap, "lend of {len} bytes from {span:?}");
        Bytes::from_owner(Lent { staging: self.clone(), span, len })
    }
}

/// The owner behind a lent READ's `Bytes`: one span of a staging buffer.
struct Lent {
    staging: Arc<Staging>,
    span: Span,
    len: usize,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the span lies inside the registered buffer (checked in `lend`), which the Arc keeps
        // mapped; it belongs to this Lent alone until drop (the ring will not hand it out again, and its
        // record completed, so the NIC no longer writes it): nothing mutates these bytes meanwhile.
        unsafe { std::slice::from_raw_parts(self.staging.ptr().add(self.span.offset), self.len) }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.staging.free(self.span);
    }
}
