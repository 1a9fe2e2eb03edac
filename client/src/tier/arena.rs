//! The far slots: every leased slab cut into slots, their state words and the free lists.
//!
//! Ownership: a slab's `slots` and `free` are touched by any thread; the slab list only grows (a lost slab
//! stays in the list, marked `Dead`, so slab indices in the page table stay valid). A slot index is on
//! its slab's free list iff its word is `FREE` and it was freed by the one transition that returned
//! [`Transition::Freed`]; allocation only pops from `Active` slabs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use farpool_core::{RemoteAddr, ServerId};
use parking_lot::{Mutex, RwLock};

use super::backend::FarSlab;
use super::slot::{SlotState, SlotWord, Transition};

/// A slab's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlabState {
    /// Slots are handed out.
    Active = 0,
    /// Under a revoke notice: readable, no new slots.
    Draining = 1,
    /// Revoked: reads would fail; its pages are misses with reason `Revoked`.
    Revoked = 2,
    /// Its server is down: its pages are misses with reason `ServerDown`.
    Down = 3,
}

/// Where a page lives: slab index in the arena, slot in the slab, generation of the claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotRef {
    pub(crate) slab: u32,
    pub(crate) slot: u32,
    pub(crate) generation: u64,
}

#[derive(Debug)]
pub(crate) struct SlotMeta {
    pub(crate) word: SlotWord,
    /// Page id written in the current generation (meaningful while not free).
    pub(crate) page: AtomicU64,
    /// CLOCK reference bit.
    pub(crate) referenced: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct Slab {
    pub(crate) far: FarSlab,
    pub(crate) slots: Box<[SlotMeta]>,
    free: Mutex<Vec<u32>>,
    state: AtomicU8,
    /// Set once the entries of a lost slab have been removed from the page table.
    pub(crate) purged: AtomicBool,
}

impl Slab {
    pub(crate) fn state(&self) -> SlabState {
        match self.state.load(Ordering::Acquire) {
            0 => SlabState::Active,
            1 => SlabState::Draining,
            2 => SlabState::Revoked,
            _ => SlabState::Down,
        }
    }

    pub(crate) fn server(&self) -> ServerId {
        self.far.server
    }
}

/// Counts of slot states over live slabs (for accounting checks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCensus {
    /// Slabs not lost.
    pub live_slabs: usize,
    /// Slots in those slabs.
    pub slots: usize,
    /// Free slots.
    pub free: usize,
    /// Slots with a write in flight.
    pub writing: usize,
    /// Published slots.
    pub published: usize,
    /// Cancelled slots (write still in flight).
    pub cancelled: usize,
    /// Entries on free lists (must equal `free` for active and draining slabs: nothing leaked).
    pub on_free_lists: usize,
}

#[derive(Debug)]
pub(crate) struct Arena {
    slot_size: u64,
    slabs: RwLock<Vec<Arc<Slab>>>,
    rr: AtomicUsize,
    free_total: AtomicUsize,
    leased_bytes: AtomicU64,
    /// CLOCK hand: (slab index, slot index).
    hand: Mutex<(usize, usize)>,
}

impl Arena {
    pub(crate) fn new(slot_size: usize) -> Self {
        Self {
            slot_size: slot_size as u64,
            slabs: RwLock::new(Vec::new()),
            rr: AtomicUsize::new(0),
            free_total: AtomicUsize::new(0),
            leased_bytes: AtomicU64::new(0),
            hand: Mutex::new((0, 0)),
        }
    }

    /// Add a leased slab; returns its index. Slabs too small for one slot are refused (`None`).
    pub(crate) fn add(&self, far: FarSlab) -> Option<u32> {
        let n = (far.grant.len / self.slot_size) as usize;
        if n == 0 {
            return None;
        }
        let slots = (0..n)
            .map(|_| SlotMeta { word: SlotWord::new(), page: AtomicU64::new(0), referenced: AtomicBool::new(false) })
            .collect();
        let free = (0..n as u32).rev().collect();
        let slab = Arc::new(Slab {
            far,
            slots,
            free: Mutex::new(free),
            state: AtomicU8::new(0),
            purged: AtomicBool::new(false),
        });
        let mut list = self.slabs.write();
        list.push(slab);
        self.free_total.fetch_add(n, Ordering::AcqRel);
        self.leased_bytes.fetch_add(far.grant.len, Ordering::AcqRel);
        Some((list.len() - 1) as u32)
    }

    pub(crate) fn slab(&self, i: u32) -> Arc<Slab> {
        self.slabs.read()[i as usize].clone()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Slab>> {
        self.slabs.read().clone()
    }

    pub(crate) fn leased_bytes(&self) -> u64 {
        self.leased_bytes.load(Ordering::Acquire)
    }

    pub(crate) fn free_slots(&self) -> usize {
        self.free_total.load(Ordering::Acquire)
    }

    pub(crate) fn addr(&self, slab: &Slab, slot: u32) -> RemoteAddr {
        RemoteAddr::in_grant(&slab.far.grant, u64::from(slot) * self.slot_size)
    }

    /// Move a slab out of `Active`/`Draining` (returns the previous state). Leaving the live states takes
    /// its free slots out of the totals and its bytes out of the leased amount.
    pub(crate) fn set_state(&self, i: u32, to: SlabState) -> SlabState {
        let slab = self.slab(i);
        // The free-list lock serializes the transitions of one slab: two threads losing the same slab
        // at once (a failed read and a `ServerDown`, say) must not both take its bytes out of the totals.
        let mut free = slab.free.lock();
        let from = slab.state();
        let lost = |s: SlabState| matches!(s, SlabState::Revoked | SlabState::Down);
        if from == to || lost(from) {
            return from;
        }
        slab.state.store(to as u8, Ordering::Release);
        if lost(to) {
            if from == SlabState::Active {
                self.free_total.fetch_sub(free.len(), Ordering::AcqRel);
            }
            free.clear();
            self.leased_bytes.fetch_sub(slab.far.grant.len, Ordering::AcqRel);
        } else if to == SlabState::Draining {
            self.free_total.fetch_sub(free.len(), Ordering::AcqRel);
        }
        from
    }

    /// Claim a free slot, round-robin over active slabs (spreading pages over servers).
    pub(crate) fn claim_free(&self) -> Option<SlotRef> {
        let slabs = self.slabs.read();
        let n = slabs.len();
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let i = (start + k) % n;
            let slab = &slabs[i];
            if slab.state() != SlabState::Active {
                continue;
            }
            let Some(slot) = slab.free.lock().pop() else { continue };
            self.free_total.fetch_sub(1, Ordering::AcqRel);
            let generation = slab.slots[slot as usize].word.try_claim().expect("a slot on the free list is free");
            return Some(SlotRef { slab: i as u32, slot, generation });
        }
        None
    }

    /// Return a slot whose word this thread just moved to `FREE`.
    pub(crate) fn push_free(&self, r: SlotRef) {
        let slab = self.slab(r.slab);
        let mut free = slab.free.lock();
        match slab.state() {
            SlabState::Active => {
                free.push(r.slot);
                self.free_total.fetch_add(1, Ordering::AcqRel);
            }
            // Draining slabs keep their free list for the census but hand nothing out; lost ones forget.
            SlabState::Draining => free.push(r.slot),
            SlabState::Revoked | SlabState::Down => {}
        }
    }

    /// Apply a transition's result: if it freed the slot, put it back.
    pub(crate) fn settle(&self, r: SlotRef, t: Transition) {
        if t == Transition::Freed {
            self.push_free(r);
        }
    }

    /// The next CLOCK candidate: a published, unreferenced slot of an active slab (clearing reference bits
    /// on the way), looking at most `2 * slots + 1` slots.
    pub(crate) fn clock_candidate(&self) -> Option<(SlotRef, u64)> {
        let slabs = self.all();
        let total: usize = slabs.iter().map(|s| s.slots.len()).sum();
        let mut hand = self.hand.lock();
        for _ in 0..=2 * total {
            let (si, sl) = *hand;
            let Some(slab) = slabs.get(si) else {
                *hand = (0, 0);
                continue;
            };
            *hand = if sl + 1 >= slab.slots.len() { ((si + 1) % slabs.len(), 0) } else { (si, sl + 1) };
            if slab.state() != SlabState::Active {
                continue;
            }
            let m = &slab.slots[sl];
            let (state, generation) = m.word.load();
            if state != SlotState::Published {
                continue;
            }
            if m.referenced.swap(false, Ordering::AcqRel) {
                continue;
            }
            let r = SlotRef { slab: si as u32, slot: sl as u32, generation };
            return Some((r, m.page.load(Ordering::Acquire)));
        }
        None
    }

    /// Count slot states over live slabs.
    pub(crate) fn census(&self) -> SlotCensus {
        let mut c = SlotCensus::default();
        for slab in self.all() {
            if matches!(slab.state(), SlabState::Revoked | SlabState::Down) {
                continue;
            }
            c.live_slabs += 1;
            c.slots += slab.slots.len();
            c.on_free_lists += slab.free.lock().len();
            for m in slab.slots.iter() {
                match m.word.load().0 {
                    SlotState::Free => c.free += 1,
                    SlotState::Writing => c.writing += 1,
                    SlotState::Published => c.published += 1,
                    SlotState::Cancelled => c.cancelled += 1,
                }
            }
        }
        c
    }
}
