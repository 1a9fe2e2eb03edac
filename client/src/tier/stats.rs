//! Counters of the tier. Every `get` ends in exactly one hit or one miss reason, every `put` in exactly
//! one outcome (or is still pending), so the snapshot's sums add up; tests assert it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a `get` missed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MissReason {
    /// The page is not in the tier (never put, evicted, invalidated, dropped).
    Absent,
    /// The tier holds an older version than the one asked for.
    Stale,
    /// The far slot's header or checksum did not match (torn or corrupted): dropped.
    Checksum,
    /// The slab holding it was revoked.
    Revoked,
    /// The server holding it is down or failed the read.
    ServerDown,
}

impl MissReason {
    /// All reasons.
    pub const ALL: [MissReason; 5] = [Self::Absent, Self::Stale, Self::Checksum, Self::Revoked, Self::ServerDown];

    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Absent => "absent",
            Self::Stale => "stale",
            Self::Checksum => "checksum",
            Self::Revoked => "revoked",
            Self::ServerDown => "server_down",
        }
    }
}

/// The result of a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The page was copied into the caller's buffer; it has this version (>= the one asked for).
    Hit {
        /// Version of the page returned.
        version: u64,
    },
    /// Nothing was returned.
    Miss(MissReason),
}

impl Lookup {
    /// Whether it is a hit.
    pub fn is_hit(&self) -> bool {
        matches!(self, Self::Hit { .. })
    }
}

macro_rules! counters {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        #[derive(Debug, Default)]
        pub(crate) struct Counters { $(pub(crate) $name: AtomicU64,)* }

        /// A snapshot of the tier's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct TierStats { $($(#[$m])* pub $name: u64,)* }

        impl Counters {
            pub(crate) fn snapshot(&self) -> TierStats {
                TierStats { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    /// `get` calls (each page of a `get_many` counts once).
    gets,
    /// Hits served from far memory.
    hits_far,
    /// Hits served from a page still in the write-behind queue.
    hits_queued,
    /// Hits served from the prefetch staging buffer.
    hits_prefetched,
    /// Misses: not there.
    miss_absent,
    /// Misses: only an older version there.
    miss_stale,
    /// Misses: header or checksum mismatch.
    miss_checksum,
    /// Misses: slab revoked.
    miss_revoked,
    /// Misses: server down or read failed.
    miss_server_down,
    /// `put` calls.
    puts,
    /// Puts of a version the tier already had (or older): nothing to do.
    puts_unchanged,
    /// Puts refused by admission (tier full, page not seen often enough).
    puts_rejected,
    /// Puts dropped: queue full or no slot could be found.
    puts_dropped,
    /// Puts whose far write failed (slot freed).
    puts_failed,
    /// Puts invalidated or superseded before their write completed (slot freed).
    puts_cancelled,
    /// Puts written and published.
    puts_published,
    /// `invalidate` calls that removed a page.
    invalidations,
    /// Published pages evicted to make room.
    evictions,
    /// Pages asked for by `prefetch` or the scan detector.
    prefetch_requested,
    /// Pages loaded into the staging buffer.
    prefetch_loaded,
    /// Sequential scans detected (prefetch windows issued).
    scans_detected,
    /// Slabs leased.
    slabs_leased,
    /// Slabs lost (revoked or server down).
    slabs_lost,
    /// Pages moved off a slab under revoke notice.
    pages_migrated,
    /// Pages dropped because their slab went away.
    pages_dropped,
    /// Batches of far writes posted by the writer threads (`puts_published + puts_failed` over this is
    /// the mean batch size).
    write_batches,
    /// EWMA of the far read round trip, nanoseconds.
    rtt_ewma_ns,
}

impl Counters {
    pub(crate) fn miss(&self, r: MissReason) {
        let c = match r {
            MissReason::Absent => &self.miss_absent,
            MissReason::Stale => &self.miss_stale,
            MissReason::Checksum => &self.miss_checksum,
            MissReason::Revoked => &self.miss_revoked,
            MissReason::ServerDown => &self.miss_server_down,
        };
        c.fetch_add(1, Relaxed);
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}

impl TierStats {
    /// All hits.
    pub fn hits(&self) -> u64 {
        self.hits_far + self.hits_queued + self.hits_prefetched
    }

    /// All misses.
    pub fn misses(&self) -> u64 {
        self.miss_absent + self.miss_stale + self.miss_checksum + self.miss_revoked + self.miss_server_down
    }

    /// Puts that have not reached an outcome yet (queued or being written).
    pub fn puts_pending(&self) -> u64 {
        self.puts.saturating_sub(
            self.puts_unchanged
                + self.puts_rejected
                + self.puts_dropped
                + self.puts_failed
                + self.puts_cancelled
                + self.puts_published,
        )
    }

    /// Hits / gets (0 when there were no gets).
    pub fn hit_rate(&self) -> f64 {
        if self.gets == 0 { 0.0 } else { self.hits() as f64 / self.gets as f64 }
    }

    /// Panics unless `gets == hits + misses` (call when no get is in flight).
    pub fn assert_consistent(&self) {
        assert_eq!(self.gets, self.hits() + self.misses(), "gets must equal hits + misses: {self:?}");
    }
}
