//! The local page table: page id -> expected version and where the page is. Sharded mutexes; a shard
//! lock is held only for map operations, never across I/O.
//!
//! Invariant: an entry is `Published(r)` only after `r`'s word went `WRITING -> PUBLISHED`; whoever
//! removes or replaces an entry with a slot cancels that slot's word under the same shard lock, so a
//! slot is never referenced by an entry once it may be reused.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU8, AtomicU64};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};

use super::arena::SlotRef;

/// Where an entry's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Place {
    /// In the write-behind queue, no slot yet.
    Queued,
    /// Being written to this slot.
    Writing(SlotRef),
    /// Readable at this slot.
    Published(SlotRef),
}

impl Place {
    pub(crate) fn slot(&self) -> Option<SlotRef> {
        match *self {
            Self::Queued => None,
            Self::Writing(r) | Self::Published(r) => Some(r),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) version: u64,
    pub(crate) place: Place,
    /// The slot image while the page is not published yet (serves gets meanwhile).
    pub(crate) image: Option<Bytes>,
}

const SHARDS: usize = 64;

#[derive(Debug)]
pub(crate) struct Table {
    shards: Box<[Mutex<HashMap<u64, Entry>>]>,
}

impl Table {
    pub(crate) fn new() -> Self {
        Self { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    pub(crate) fn shard(&self, page: u64) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // Fibonacci hashing spreads sequential page ids over the shards.
        let h = page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58;
        self.shards[h as usize % SHARDS].lock()
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Entries with a published slot (for accounting checks).
    pub(crate) fn published(&self) -> usize {
        let count = |m: &HashMap<u64, Entry>| m.values().filter(|e| matches!(e.place, Place::Published(_))).count();
        self.shards.iter().map(|s| count(&s.lock())).sum()
    }
}

/// A count-min sketch of page frequencies (4 rows of counters saturating at 15, kept in `u8`), halved
/// every `reset_after` increments so it tracks recent popularity. Admission uses it to keep one-hit
/// wonders out.
///
/// Lock-free: counters are relaxed atomics, updated with plain load/store (two racing increments of one
/// counter may count once, and a halving pass races with increments): an estimate, as a sketch is
/// anyway, for the price of no lock on the put path. Exactly one thread runs each halving pass (the one
/// whose increment crossed the threshold).
#[derive(Debug)]
pub(crate) struct Sketch {
    counts: Box<[AtomicU8]>,
    width: usize,
    increments: AtomicU64,
    reset_after: u64,
}

const SEEDS: [u64; 4] = [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0x27D4_EB2F_1656_67C5];
const COUNT_MAX: u8 = 15;

impl Sketch {
    /// A sketch sized for about `items` distinct hot pages.
    pub(crate) fn new(items: usize) -> Self {
        let width = items.clamp(64, 1 << 22).next_power_of_two();
        let counts = (0..width * 4).map(|_| AtomicU8::new(0)).collect();
        Self { counts, width, increments: AtomicU64::new(0), reset_after: 10 * width as u64 }
    }

    fn index(&self, row: usize, page: u64) -> usize {
        let h = (page ^ (row as u64)).wrapping_mul(SEEDS[row]);
        row * self.width + ((h >> 32) as usize & (self.width - 1))
    }

    /// Count one occurrence of `page`.
    pub(crate) fn record(&self, page: u64) {
        for row in 0..4 {
            let c = &self.counts[self.index(row, page)];
            let v = c.load(Relaxed);
            if v < COUNT_MAX {
                c.store(v + 1, Relaxed);
            }
        }
        if self.increments.fetch_add(1, Relaxed) + 1 == self.reset_after {
            self.increments.store(0, Relaxed);
            self.counts.iter().for_each(|c| c.store(c.load(Relaxed) / 2, Relaxed));
        }
    }

    /// Estimated recent count of `page`.
    pub(crate) fn estimate(&self, page: u64) -> u8 {
        (0..4).map(|row| self.counts[self.index(row, page)].load(Relaxed)).min().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sketch_counts_and_ages() {
        let s = Sketch::new(64);
        assert_eq!(s.estimate(5), 0);
        s.record(5);
        s.record(5);
        assert!(s.estimate(5) >= 2);
        for _ in 0..10 * 64 {
            s.record(6);
        }
        assert!(s.estimate(5) <= 1, "counts must decay");
    }
}
