//! The tier's shared state and the put / invalidate / allocation paths.
//!
//! Locking order: a table shard, then (briefly) a slab's free list. Eviction locks the shard of the victim
//! page while holding no other shard. No lock is held across far I/O.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use farpool_core::ServerId;
use parking_lot::{Mutex, MutexGuard};

use super::arena::{Arena, SlabState, SlotRef};
use super::backend::{FarBackend, FarSlab};
use super::io::Endpoints;
use super::layout;
use super::lost::LostPages;
use super::prefetch::Prefetcher;
use super::slot::Transition;
use super::stats::Counters;
use super::table::{Entry, Place, Sketch, Table};
use super::{PutStatus, TierConfig};

/// A put on its way to far memory.
#[derive(Debug)]
pub(crate) struct PutItem {
    pub(crate) page: u64,
    pub(crate) version: u64,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) cfg: TierConfig,
    pub(crate) backend: Arc<dyn FarBackend>,
    pub(crate) arena: Arena,
    pub(crate) table: Table,
    pub(crate) sketch: Sketch,
    pub(crate) stats: Counters,
    pub(crate) queue_tx: Sender<PutItem>,
    pub(crate) queue_rx: Receiver<PutItem>,
    pub(crate) endpoints: Endpoints,
    pub(crate) prefetch: Prefetcher,
    /// Pages purged with their slab, so their next get is counted with the right reason.
    pub(crate) lost: LostPages,
    pub(crate) shutdown: AtomicBool,
    /// Held across each lease call: one lease in flight at a time. A writer that finds no free slot
    /// while a lease is in flight waits here for it and takes a slot from it, instead of evicting a page
    /// (or dropping the put) because growth happened to be busy.
    leasing: Mutex<()>,
    /// When the last failed lease happened (growth backs off for [`GROW_RETRY`]). Held only briefly, so
    /// that `put` never waits on a lease in flight.
    grow_failed: Mutex<Option<Instant>>,
    /// How many times each server was found down: a lease in flight while its server was lost (the
    /// slab was not in the arena yet, so `server_lost` could not mark it) is detected by the change.
    down_counts: Mutex<Vec<(ServerId, u64)>>,
}

/// Growth is retried at most this often after the backend said no.
const GROW_RETRY: Duration = Duration::from_millis(200);
/// Victims tried per allocation before a put is dropped.
const EVICT_ATTEMPTS: usize = 16;

impl Inner {
    pub(crate) fn new(cfg: TierConfig, backend: Arc<dyn FarBackend>) -> Self {
        let (queue_tx, queue_rx) = crossbeam_channel::bounded(cfg.queue_depth);
        let slot = layout::slot_size(cfg.page_size);
        let est_slots = (cfg.max_bytes / slot as u64) as usize;
        Self {
            arena: Arena::new(slot),
            table: Table::new(),
            sketch: Sketch::new(est_slots),
            stats: Counters::default(),
            queue_tx,
            queue_rx,
            endpoints: Endpoints::new(cfg.endpoints_idle_max),
            prefetch: Prefetcher::new(&cfg),
            lost: LostPages::default(),
            shutdown: AtomicBool::new(false),
            leasing: Mutex::new(()),
            grow_failed: Mutex::new(None),
            down_counts: Mutex::new(Vec::new()),
            cfg,
            backend,
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Cancel whatever slot a removed or replaced entry had.
    pub(crate) fn release_place(&self, place: Place) {
        if let Some(r) = place.slot() {
            let t = self.arena.slab(r.slab).slots[r.slot as usize].word.cancel(r.generation);
            self.arena.settle(r, t);
        }
    }

    fn full(&self) -> bool {
        self.arena.free_slots() == 0 && !self.may_grow()
    }

    fn may_grow(&self) -> bool {
        self.arena.leased_bytes() < self.cfg.max_bytes && !self.backed_off()
    }

    fn backed_off(&self) -> bool {
        matches!(*self.grow_failed.lock(), Some(t) if t.elapsed() < GROW_RETRY)
    }

    pub(crate) fn put(&self, page: u64, version: u64, data: &[u8]) -> PutStatus {
        assert_eq!(data.len(), self.cfg.page_size, "put of page {page}: wrong page length");
        Counters::add(&self.stats.puts, 1);
        self.sketch.record(page);
        let mut shard = self.table.shard(page);
        if let Some(e) = shard.get(&page)
            && e.version >= version
        {
            if let Place::Published(r) = e.place {
                self.arena.slab(r.slab).slots[r.slot as usize].referenced.store(true, Ordering::Relaxed);
            }
            Counters::add(&self.stats.puts_unchanged, 1);
            return PutStatus::Unchanged;
        }
        if self.full() && self.sketch.estimate(page) < self.cfg.admit_min_puts {
            Counters::add(&self.stats.puts_rejected, 1);
            return PutStatus::Rejected;
        }
        let image = layout::encode(page, version, data);
        let entry = Entry { version, place: Place::Queued, image: Some(image) };
        if let Some(old) = shard.insert(page, entry) {
            self.release_place(old.place);
        }
        self.lost.forget(page);
        self.prefetch.forget(page);
        if self.queue_tx.try_send(PutItem { page, version }).is_err() {
            shard.remove(&page);
            Counters::add(&self.stats.puts_dropped, 1);
            return PutStatus::Dropped;
        }
        PutStatus::Queued
    }

    pub(crate) fn invalidate(&self, page: u64) -> bool {
        let removed = {
            let mut shard = self.table.shard(page);
            self.lost.forget(page);
            shard.remove(&page).map(|e| self.release_place(e.place)).is_some()
        };
        self.prefetch.forget(page);
        if removed {
            Counters::add(&self.stats.invalidations, 1);
        }
        removed
    }

    /// A slot to write into: a free one, one from a new slab, or an evicted one.
    pub(crate) fn alloc_slot(&self) -> Option<SlotRef> {
        self.alloc_free_slot().or_else(|| self.evict_one())
    }

    /// A free slot or one from a new slab, never an evicted one.
    ///
    /// With no free slot and room to grow, this waits for a lease in flight (another writer's, or the
    /// maintenance thread's) and takes a slot from what it brought; only if there is still none does it
    /// lease itself. The wait is bounded by the backend's own lease timeout.
    pub(crate) fn alloc_free_slot(&self) -> Option<SlotRef> {
        if let Some(r) = self.arena.claim_free() {
            return Some(r);
        }
        if !self.may_grow() {
            return None;
        }
        let leasing = self.leasing.lock();
        if let Some(r) = self.arena.claim_free() {
            return Some(r);
        }
        if self.grow_locked(&leasing, 1, 0) > 0 {
            return self.arena.claim_free();
        }
        None
    }

    fn evict_one(&self) -> Option<SlotRef> {
        for _ in 0..EVICT_ATTEMPTS {
            let (r, page) = self.arena.clock_candidate()?;
            let mut shard = self.table.shard(page);
            if !matches!(shard.get(&page), Some(e) if e.place == Place::Published(r)) {
                continue;
            }
            let slab = self.arena.slab(r.slab);
            let meta = &slab.slots[r.slot as usize];
            if meta.word.evict(r.generation) != Transition::Freed {
                continue;
            }
            shard.remove(&page);
            drop(shard);
            Counters::add(&self.stats.evictions, 1);
            // The slot is FREE and on no free list: only this thread can claim it.
            let generation = meta.word.try_claim().expect("an evicted slot is ours to claim");
            return Some(SlotRef { slab: r.slab, slot: r.slot, generation });
        }
        None
    }

    /// Lease up to `slabs` more slabs within the maximum (plus `allowance_bytes`); returns how many.
    /// Waits for a lease already in flight first.
    pub(crate) fn try_grow_with(&self, slabs: usize, allowance_bytes: u64) -> usize {
        let leasing = self.leasing.lock();
        self.grow_locked(&leasing, slabs, allowance_bytes)
    }

    /// [`try_grow_with`](Self::try_grow_with) under the lease lock (the guard proves it is held).
    fn grow_locked(&self, _leasing: &MutexGuard<'_, ()>, slabs: usize, allowance_bytes: u64) -> usize {
        if self.backed_off() {
            return 0;
        }
        let limit = self.cfg.max_bytes + allowance_bytes;
        if self.arena.leased_bytes() >= limit {
            return 0;
        }
        let mut added = 0;
        let downs_before = self.down_counts.lock().clone();
        match self.backend.lease(slabs) {
            Ok(got) if !got.is_empty() => {
                for s in got {
                    if self.arena.leased_bytes() + s.grant.len <= limit
                        && let Some(i) = self.arena.add(s)
                    {
                        added += 1;
                        self.drop_if_lost_meanwhile(i, &s, &downs_before);
                    } else if let Err(e) = self.backend.release(&s) {
                        tracing::warn!(error = %e, "page tier: could not return a slab beyond the maximum");
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "page tier: lease refused"),
        }
        if added == 0 {
            *self.grow_failed.lock() = Some(Instant::now());
        }
        Counters::add(&self.stats.slabs_leased, added as u64);
        added
    }

    /// Count a loss of `server` (called before its slabs are marked: see `down_counts`).
    pub(crate) fn note_down(&self, server: ServerId) {
        let mut downs = self.down_counts.lock();
        match downs.iter_mut().find(|d| d.0 == server) {
            Some(d) => d.1 += 1,
            None => downs.push((server, 1)),
        }
    }

    /// A slab just added (index `i`) whose server was found down while its lease was in flight is marked
    /// down and given back. Added first, checked second, and `note_down` counts before `server_lost`
    /// scans the arena: so either that scan saw the slab, or this check sees the count change.
    fn drop_if_lost_meanwhile(&self, i: u32, s: &FarSlab, before: &[(ServerId, u64)]) {
        let count = |v: &[(ServerId, u64)]| v.iter().find(|d| d.0 == s.server).map_or(0, |d| d.1);
        if count(&self.down_counts.lock()) == count(before) {
            return;
        }
        if self.arena.set_state(i, SlabState::Down) != SlabState::Down {
            Counters::add(&self.stats.slabs_lost, 1);
        }
        if let Err(e) = self.backend.release(s) {
            tracing::debug!(error = %e, "page tier: release of a slab leased while its server was lost failed");
        }
    }

    pub(crate) fn try_grow(&self, slabs: usize) -> usize {
        self.try_grow_with(slabs, 0)
    }

    /// Lease until at least `min_bytes` are held (bounded number of lease calls).
    pub(crate) fn top_up(&self) {
        for _ in 0..1024 {
            if self.arena.leased_bytes() >= self.cfg.min_bytes {
                return;
            }
            if self.try_grow(1) == 0 {
                return;
            }
        }
    }
}
