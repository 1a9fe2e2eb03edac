//! A ring allocator over the endpoint's registered staging buffer that tolerates out-of-order frees.
//!
//! Spans are taken at the head, in order. Completions on one RC send queue arrive in posting order, so
//! most spans are also returned in order; but a staged READ's span may be *lent* to the caller as the
//! completion's `Bytes` (zero copy, see `lend.rs`) and come back whenever the caller drops it. So a free
//! only marks its span done, and the tail advances over the run of done spans at the front: space is
//! reclaimed in allocation order, a span returned early waits (charged) until every older span is back.
//!
//! Invariants (checked by the unit and property tests below):
//! - live spans never overlap and lie inside `0..cap`;
//! - `used` is the sum of `charged` over the entries still queued (done or not), and `used <= cap`;
//! - every span is freed exactly once (a second free, or a free of an unknown span, panics: it would
//!   mean two owners of the same bytes);
//! - a span that does not fit before the end of the ring wraps to offset 0 and the skipped tail is
//!   charged to it, so reclaiming stays a plain subtraction.
//!
//! Bound: at most `cap / SPAN_ALIGN` entries are queued (each charges at least `SPAN_ALIGN` bytes).

use std::collections::VecDeque;

/// Alignment of every span: a cache line, which also satisfies the 8-byte alignment atomics need for
/// their local result (x86-64 cache lines are 64 bytes; Intel SDM vol. 3, 11.5.3).
pub const SPAN_ALIGN: usize = 64;

/// A piece of the ring handed out by [`Ring::alloc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// Offset of the first usable byte.
    pub offset: usize,
    /// Bytes charged to the ring (aligned length plus any skipped tail), returned when it is reclaimed.
    pub charged: usize,
    /// Allocation number (identifies the span's entry in the ring).
    pub id: u64,
}

/// One allocation, oldest first.
#[derive(Debug)]
struct Entry {
    charged: usize,
    done: bool,
}

/// The allocator state (no memory of its own).
#[derive(Debug)]
pub struct Ring {
    cap: usize,
    head: usize,
    used: usize,
    /// Allocations not yet reclaimed, in allocation order; `entries[i]` has id `first_id + i`.
    entries: VecDeque<Entry>,
    first_id: u64,
}

impl Ring {
    /// A ring of `cap` bytes (a multiple of [`SPAN_ALIGN`]).
    pub fn new(cap: usize) -> Self {
        assert!(
            cap > 0 && cap.is_multiple_of(SPAN_ALIGN),
            "ring capacity {cap} must be a positive multiple of {SPAN_ALIGN}"
        );
        Self { cap, head: 0, used: 0, entries: VecDeque::new(), first_id: 0 }
    }

    /// Bytes currently charged (live spans, plus returned ones still behind an older live span).
    pub fn used(&self) -> usize {
        self.used
    }

    /// Spans not yet reclaimed (live, or returned behind an older live span).
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.entries.len()
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
        let id = self.first_id + self.entries.len() as u64;
        self.entries.push_back(Entry { charged, done: false });
        Some(Span { offset, charged, id })
    }

    /// Return a span (in any order); its bytes are reclaimed once every older span is back too.
    pub fn free(&mut self, span: Span) {
        let idx = span.id.checked_sub(self.first_id).map(|i| i as usize).filter(|&i| i < self.entries.len());
        let Some(idx) = idx else {
            panic!("ring free of {span:?}: not live (first live id {})", self.first_id);
        };
        let e = &mut self.entries[idx];
        assert!(!e.done && e.charged == span.charged, "ring free of {span:?}: entry {e:?} already freed or differs");
        e.done = true;
        while self.entries.front().is_some_and(|e| e.done) {
            let e = self.entries.pop_front().expect("front checked above");
            self.used -= e.charged;
            self.first_id += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

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
        assert_eq!((c.offset, c.charged), (0, 192));
        assert_eq!(r.used(), 256);
        r.free(b);
        r.free(c);
        assert_eq!(r.used(), 0);
        assert_eq!(r.alloc(256).unwrap().offset, 0);
        assert!(Ring::new(64).alloc(65).is_none());
    }

    #[test]
    fn an_early_free_waits_for_the_older_spans() {
        let mut r = Ring::new(256);
        let a = r.alloc(64).unwrap();
        let b = r.alloc(64).unwrap();
        let c = r.alloc(64).unwrap();
        r.free(b);
        assert_eq!((r.used(), r.queued()), (192, 3), "b is behind a: not reclaimed yet");
        r.free(a);
        assert_eq!((r.used(), r.queued()), (64, 1), "a and b reclaimed together");
        let d = r.alloc(64).unwrap();
        assert_eq!(d.offset, 192, "the head keeps going round");
        let e = r.alloc(128).unwrap();
        assert_eq!((e.offset, e.charged), (0, 128), "reclaimed front space is reused");
        assert!(r.alloc(64).is_none(), "c holds 128..192, d 192..256, e 0..128");
        r.free(d);
        r.free(c);
        r.free(e);
        assert_eq!((r.used(), r.queued()), (0, 0));
    }

    #[test]
    #[should_panic(expected = "already freed")]
    fn a_double_free_panics() {
        let mut r = Ring::new(256);
        let _a = r.alloc(64).unwrap();
        let b = r.alloc(64).unwrap();
        r.free(b); // behind a: still queued, marked done
        r.free(b);
    }

    #[test]
    #[should_panic(expected = "not live")]
    fn freeing_a_reclaimed_span_panics() {
        let mut r = Ring::new(256);
        let a = r.alloc(64).unwrap();
        r.free(a);
        r.free(a);
    }

    /// Model check: random allocations, frees in random order (some in FIFO order, some "lent" and
    /// returned late); live spans never overlap or leave the ring, `used` matches the model, and after
    /// every span is freed (each exactly once) the whole ring is free again.
    fn check(cap_units: usize, script: &[(bool, usize, usize)]) {
        let cap = cap_units * SPAN_ALIGN;
        let mut r = Ring::new(cap);
        let mut live: VecDeque<(Span, usize)> = VecDeque::new();
        for &(alloc, len, pick) in script {
            if alloc || live.is_empty() {
                if let Some(s) = r.alloc(len) {
                    let l = len.max(1).next_multiple_of(SPAN_ALIGN);
                    assert!(s.offset + l <= cap, "{s:?} leaves the ring of {cap}");
                    assert!(s.offset.is_multiple_of(SPAN_ALIGN));
                    assert!(s.charged == l || (s.offset == 0 && s.charged > l), "only a wrap charges extra");
                    for (o, ol) in &live {
                        assert!(s.offset + l <= o.offset || o.offset + ol <= s.offset, "{s:?} overlaps {o:?}");
                    }
                    live.push_back((s, l));
                }
            } else {
                let (s, _) = live.remove(pick % live.len()).unwrap();
                r.free(s);
            }
            let live_charged: usize = live.iter().map(|(s, _)| s.charged).sum();
            assert!(r.used() >= live_charged && r.used() <= cap, "used {} vs live {live_charged}", r.used());
            assert!(r.queued() <= cap / SPAN_ALIGN);
        }
        while let Some((s, _)) = live.pop_back() {
            r.free(s);
        }
        assert_eq!((r.used(), r.queued()), (0, 0));
        assert_eq!(r.alloc(cap).map(|s| s.offset), Some(0), "all of it is free again");
    }

    proptest! {
        #[test]
        fn out_of_order_frees_keep_the_invariants(
            cap_units in 1usize..128,
            script in proptest::collection::vec((any::<bool>(), 0usize..3000, any::<usize>()), 0..400),
        ) {
            check(cap_units, &script);
        }
    }

    #[test]
    fn a_long_fifo_run_wraps_many_times() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut script = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly FIFO frees (pick 0), sometimes a random one.
            let pick = if x.is_multiple_of(5) { (x >> 20) as usize } else { 0 };
            script.push((!x.is_multiple_of(3), (x >> 8) as usize % 1500, pick));
        }
        check(64, &script);
    }
}
