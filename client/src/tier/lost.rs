//! Why pages vanished: when a slab is lost (revoked, or its server went down) its page-table entries are
//! purged, and each purged page is remembered here with the reason, so the next `get` of it is a miss
//! counted as `Revoked` / `ServerDown` rather than `Absent`. A record is consumed by that `get`, and
//! forgotten on a `put` or `invalidate` of the page.
//!
//! Bounded: at most [`LOST_MAX`] records, the oldest forgotten first (such a page then misses as
//! `Absent`). The common case (nothing lost) costs one atomic load on the miss path, no lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use super::stats::MissReason;

/// Records kept at most (a few MiB of memory at worst).
pub(crate) const LOST_MAX: usize = 1 << 18;

#[derive(Debug, Default)]
struct Records {
    map: HashMap<u64, MissReason>,
    /// Insertion order, for the bound; may hold pages already consumed (skipped when popped).
    order: VecDeque<u64>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct LostPages {
    records: Mutex<Records>,
    len: AtomicUsize,
}

impl LostPages {
    /// Remember that `page` was lost for `reason`.
    pub(crate) fn record(&self, page: u64, reason: MissReason) {
        let mut r = self.records.lock();
        if r.map.insert(page, reason).is_none() {
            r.order.push_back(page);
        }
        while r.map.len() > LOST_MAX || r.order.len() > 2 * LOST_MAX {
            let Some(old) = r.order.pop_front() else { break };
            if r.map.len() > LOST_MAX {
                r.map.remove(&old);
            }
        }
        if r.map.is_empty() {
            r.order.clear();
        }
        self.len.store(r.map.len(), Ordering::Release);
    }

    /// Consume the record of `page`, if any.
    pub(crate) fn take(&self, page: u64) -> Option<MissReason> {
        if self.len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut r = self.records.lock();
        let reason = r.map.remove(&page);
        if r.map.is_empty() {
            r.order.clear();
        }
        self.len.store(r.map.len(), Ordering::Release);
        reason
    }

    /// Forget `page` (it was put again or invalidated).
    pub(crate) fn forget(&self, page: u64) {
        let _ = self.take(page);
    }

    /// Records held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_consumed_once_and_bounded() {
        let l = LostPages::default();
        assert_eq!(l.take(1), None);
        l.record(1, MissReason::ServerDown);
        l.record(2, MissReason::Revoked);
        assert_eq!(l.take(1), Some(MissReason::ServerDown));
        assert_eq!(l.take(1), None, "consumed");
        l.forget(2);
        assert_eq!(l.take(2), None);
        for p in 0..(LOST_MAX as u64 + 10) {
            l.record(p, MissReason::Revoked);
        }
        assert_eq!(l.len(), LOST_MAX);
        assert_eq!(l.take(0), None, "the oldest are forgotten first");
        assert_eq!(l.take(LOST_MAX as u64 + 9), Some(MissReason::Revoked));
    }
}
