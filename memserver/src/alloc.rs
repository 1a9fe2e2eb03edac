//! The slab allocator: which slab is free, granted (to which lease) or removed from capacity.
//!
//! Pure bookkeeping, no memory: the caller (`state`) zeroes a slab's memory before handing it back
//! with [`SlabAllocator::reclaim`], so the free list only ever holds zeroed slabs.
//!
//! Invariants (checked by assertions and the property test below):
//! - a slab is in the free list iff its state is `Free`; it is granted to at most one lease at a time;
//! - every grant of a slab gets a strictly larger epoch than the one before;
//! - `free + granted + removed == slab count`; removed slabs never come back;
//! - a retiring slab (scheduled for removal by shrink/drain) is granted, and becomes removed, not free,
//!   when it is reclaimed.

use std::collections::VecDeque;

use farpool_core::{Epoch, LeaseId, SlabId};

/// State of one slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlabState {
    /// In the free list, memory zeroed.
    Free,
    /// Granted to a lease.
    Granted {
        /// The holder.
        lease: LeaseId,
        /// Scheduled for removal (shrink/drain): reclaiming it removes it from capacity.
        retiring: bool,
    },
    /// Removed from capacity for good.
    Removed,
}

/// Slab counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlabCounts {
    /// Free slabs.
    pub free: u64,
    /// Granted slabs (including retiring ones).
    pub granted: u64,
    /// Granted slabs scheduled for removal.
    pub retiring: u64,
    /// Slabs removed from capacity.
    pub removed: u64,
}

impl SlabCounts {
    /// Slabs that are part of the capacity: free + granted.
    pub fn total(&self) -> u64 {
        self.free + self.granted
    }
}

/// What happened to a reclaimed slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reclaimed {
    /// Back in the free list.
    Freed,
    /// It was retiring: removed from capacity.
    Removed,
}

/// Free list and per-slab state. See the module docs.
#[derive(Debug, Default)]
pub struct SlabAllocator {
    states: Vec<SlabState>,
    epochs: Vec<u64>,
    free: VecDeque<SlabId>,
    counts: SlabCounts,
}

impl SlabAllocator {
    /// An allocator with no slabs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `n` free slabs (zeroed memory); returns the id of the first. Ids are never reused.
    pub fn add(&mut self, n: u32) -> SlabId {
        let first = u32::try_from(self.states.len()).expect("slab ids fit u32 (validated by config)");
        for i in 0..n {
            self.states.push(SlabState::Free);
            self.epochs.push(0);
            self.free.push_back(SlabId(first + i));
        }
        self.counts.free += u64::from(n);
        SlabId(first)
    }

    /// Number of slab ids ever created.
    pub fn len(&self) -> usize {
        self.states.len()
    }

    /// Whether no slab was ever created.
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    /// Current counts.
    pub fn counts(&self) -> SlabCounts {
        self.counts
    }

    /// The state of a slab, `None` for an id never created.
    pub fn state(&self, slab: SlabId) -> Option<SlabState> {
        self.states.get(slab.0 as usize).copied()
    }

    /// The epoch of the latest grant of a slab (0: never granted).
    pub fn epoch(&self, slab: SlabId) -> Epoch {
        Epoch(self.epochs.get(slab.0 as usize).copied().unwrap_or(0))
    }

    /// Grant `n` free slabs to `lease`, each with a new epoch; `None` (and no change) if fewer are free.
    pub fn grant(&mut self, n: usize, lease: LeaseId) -> Option<Vec<(SlabId, Epoch)>> {
        if n == 0 || self.free.len() < n {
            return None;
        }
        let out: Vec<(SlabId, Epoch)> = self
            .free
            .drain(..n)
            .map(|s| {
                let i = s.0 as usize;
                assert_eq!(self.states[i], SlabState::Free, "slab {s} in the free list is not free");
                self.states[i] = SlabState::Granted { lease, retiring: false };
                self.epochs[i] += 1;
                (s, Epoch(self.epochs[i]))
            })
            .collect();
        self.counts.free -= n as u64;
        self.counts.granted += n as u64;
        Some(out)
    }

    /// Take a granted slab back (its memory must already be zeroed). Panics if it is not granted.
    pub fn reclaim(&mut self, slab: SlabId) -> Reclaimed {
        let i = slab.0 as usize;
        let SlabState::Granted { retiring, .. } = self.states[i] else {
            panic!("reclaim of slab {slab} in state {:?}", self.states[i]);
        };
        self.counts.granted -= 1;
        if retiring {
            self.counts.retiring -= 1;
            self.counts.removed += 1;
            self.states[i] = SlabState::Removed;
            Reclaimed::Removed
        } else {
            self.counts.free += 1;
            self.states[i] = SlabState::Free;
            self.free.push_back(slab);
            Reclaimed::Freed
        }
    }

    /// Mark a granted slab for removal on reclaim; false if it is not granted or already retiring.
    pub fn retire(&mut self, slab: SlabId) -> bool {
        match self.states.get_mut(slab.0 as usize) {
            Some(SlabState::Granted { retiring: r @ false, .. }) => {
                *r = true;
                self.counts.retiring += 1;
                true
            }
            _ => false,
        }
    }

    /// Remove up to `n` free slabs from capacity; returns them.
    pub fn remove_free(&mut self, n: usize) -> Vec<SlabId> {
        let take = n.min(self.free.len());
        let out: Vec<SlabId> = self.free.drain(..take).collect();
        for s in &out {
            self.states[s.0 as usize] = SlabState::Removed;
        }
        self.counts.free -= take as u64;
        self.counts.removed += take as u64;
        out
    }

    /// Granted slabs not yet retiring, in id order.
    pub fn granted_not_retiring(&self) -> Vec<(SlabId, LeaseId)> {
        (0..self.states.len())
            .filter_map(|i| match self.states[i] {
                SlabState::Granted { lease, retiring: false } => Some((SlabId(i as u32), lease)),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Step {
        Grant(usize),
        ReleaseOldest,
        Add(u32),
        RemoveFree(usize),
        RetireOne,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1usize..5).prop_map(Step::Grant),
            3 => Just(Step::ReleaseOldest),
            1 => (1u32..4).prop_map(Step::Add),
            1 => (1usize..3).prop_map(Step::RemoveFree),
            1 => Just(Step::RetireOne),
        ]
    }

    fn check_counts(a: &SlabAllocator) {
        let c = a.counts();
        let mut real = SlabCounts::default();
        for (i, st) in a.states.iter().enumerate() {
            match st {
                SlabState::Free => {
                    real.free += 1;
                    assert!(a.free.contains(&SlabId(i as u32)));
                }
                SlabState::Granted { retiring, .. } => {
                    real.granted += 1;
                    real.retiring += u64::from(*retiring);
                }
                SlabState::Removed => real.removed += 1,
            }
        }
        assert_eq!(c, real);
        assert_eq!(a.free.len() as u64, c.free);
        assert_eq!(c.free + c.granted + c.removed, a.len() as u64);
    }

    proptest! {
        #[test]
        fn never_double_grants(steps in proptest::collection::vec(step(), 1..200)) {
            let mut a = SlabAllocator::new();
            a.add(8);
            let mut holder: HashMap<SlabId, LeaseId> = HashMap::new();
            let mut leases: VecDeque<(LeaseId, Vec<SlabId>)> = VecDeque::new();
            let mut last_epoch: HashMap<SlabId, u64> = HashMap::new();
            let mut next = 1u64;
            for s in steps {
                match s {
                    Step::Grant(n) => {
                        let lease = LeaseId(next);
                        next += 1;
                        let free_before = a.counts().free;
                        match a.grant(n, lease) {
                            Some(got) => {
                                prop_assert_eq!(got.len(), n);
                                for (slab, ep) in &got {
                                    prop_assert!(holder.insert(*slab, lease).is_none(), "slab {} double-granted", slab);
                                    let prev = last_epoch.insert(*slab, ep.0).unwrap_or(0);
                                    prop_assert!(ep.0 > prev);
                                }
                                leases.push_back((lease, got.into_iter().map(|g| g.0).collect()));
                            }
                            None => prop_assert!((free_before as usize) < n),
                        }
                    }
                    Step::ReleaseOldest => {
                        if let Some((_, slabs)) = leases.pop_front() {
                            for s in slabs {
                                holder.remove(&s);
                                a.reclaim(s);
                            }
                        }
                    }
                    Step::Add(n) => { a.add(n); }
                    Step::RemoveFree(n) => {
                        for s in a.remove_free(n) {
                            prop_assert!(!holder.contains_key(&s));
                        }
                    }
                    Step::RetireOne => {
                        if let Some((s, _)) = a.granted_not_retiring().first() {
                            prop_assert!(a.retire(*s));
                            prop_assert!(!a.retire(*s));
                        }
                    }
                }
                check_counts(&a);
            }
        }
    }

    #[test]
    fn retiring_slab_is_removed_on_reclaim() {
        let mut a = SlabAllocator::new();
        a.add(2);
        let g = a.grant(2, LeaseId(7)).unwrap();
        assert!(a.grant(1, LeaseId(8)).is_none());
        assert!(a.retire(g[0].0));
        assert_eq!(a.reclaim(g[0].0), Reclaimed::Removed);
        assert_eq!(a.reclaim(g[1].0), Reclaimed::Freed);
        assert_eq!(a.counts(), SlabCounts { free: 1, granted: 0, retiring: 0, removed: 1 });
        assert_eq!(a.state(g[0].0), Some(SlabState::Removed));
        let again = a.grant(1, LeaseId(9)).unwrap();
        assert_eq!(again[0], (g[1].0, Epoch(2)), "re-grant bumps the epoch");
    }
}
