//! A FIFO ring allocator over the endpoint's registered staging buffer.
//!
//! Completions on one RC send queue arrive in posting order, so staging space is freed in the order it
//! was taken: a ring with a head (next allocation) and a used count is enough, no free lists. A span
//! that does not fit before the end of the ring wraps to offset 0 and the skipped tail is charged to it,
//! so `free` stays a plain subtraction.

/// Alignment of every span: a cache line, which also satisfies the 8-byte alignment atomics need for
/// their local result (x86-64 cache lines are 64 bytes; Intel SDM vol. 3, 11.5.3).
pub const SPAN_ALIGN: usize = 64;

/// A piece of the ring handed out by [`Ring::alloc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Offset of the first usable byte.
    pub offset: usize,
    /// Bytes charged to the ring (aligned length plus any skipped tail), returned by [`Ring::free`].
    pub charged: usize,
}

/// The allocator state (no memory of its own).
#[derive(Debug)]
pub struct Ring {
    cap: usize,
    head: usize,
    used: usize,
}

impl Ring {
    /// A ring of `cap` bytes (a multiple of [`SPAN_ALIGN`]).
    pub fn new(cap: usize) -> Self {
        assert!(
            cap > 0 && cap.is_multiple_of(SPAN_ALIGN),
            "ring capacity {cap} must be a positive multiple of {SPAN_ALIGN}"
        );
        Self { cap, head: 0, used: 0 }
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes currently charged.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used
    }

    /// Take `len` bytes (rounded up to [`SPAN_ALIGN`]); `None` if they don't fit right now.
    pub fn alloc(&mut self, len: usize) -> Option<Span> {
        let len = len.max(1).checked_next_multiple_of(SPAN_ALIGN)?;
        if len > self.cap {
            return None;
        }
        if self.used == 0 {
            self.head = 0;
        }
        let tail_room = self.cap - self.head;
        let (offset, charged) = if len <= tail_room { (self.head, len) } else { (0, tail_room + len) };
        if self.used + charged > self.cap {
            return None;
        }
        self.used += charged;
        self.head = (offset + len) % self.cap;
        Some(Span { offset, charged })
    }

    /// Return the oldest outstanding span (spans must be freed in allocation order).
    pub fn free(&mut self, span: Span) {
        assert!(span.charged <= self.used, "ring free of {span:?} with only {} bytes used", self.used);
        self.used -= span.charged;
    }

    /// Forget every allocation (after the queue pair was destroyed).
    pub fn reset(&mut self) {
        self.head = 0;
        self.used = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    #[test]
    fn wraps_and_frees_in_order() {
        let mut r = Ring::new(256);
        let a = r.alloc(100).unwrap(); // 128
        let b = r.alloc(64).unwrap(); // 64
        assert_eq!((a.offset, b.offset), (0, 128));
        assert!(r.alloc(128).is_none(), "only 64 left at the end and 0 at the front");
        r.free(a);
        let c = r.alloc(128).unwrap(); // skips the 64-byte tail, lands at 0
        assert_eq!(c, Span { offset: 0, charged: 192 });
        assert_eq!(r.used(), 256);
        r.free(b);
        r.free(c);
        assert_eq!(r.used(), 0);
        assert_eq!(r.alloc(256).unwrap().offset, 0);
        assert!(Ring::new(64).alloc(65).is_none());
    }

    /// A randomized model check: live spans never overlap and never leave the ring.
    #[test]
    fn live_spans_never_overlap() {
        let mut r = Ring::new(4096);
        let mut live: VecDeque<(Span, usize)> = VecDeque::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if !x.is_multiple_of(3) || live.is_empty() {
                let len = (x >> 8) as usize % 1500;
                if let Some(s) = r.alloc(len) {
                    let l = len.max(1).next_multiple_of(SPAN_ALIGN);
                    assert!(s.offset + l <= 4096);
                    for (o, ol) in &live {
                        assert!(s.offset + l <= o.offset || o.offset + ol <= s.offset, "{s:?} overlaps {o:?}");
                    }
                    live.push_back((s, l));
                }
            } else {
                r.free(live.pop_front().unwrap().0);
            }
        }
        while let Some((s, _)) = live.pop_front() {
            r.free(s);
        }
        assert_eq!(r.used(), 0);
    }
}
