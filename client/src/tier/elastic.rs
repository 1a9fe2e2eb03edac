//! Elasticity: the maintenance thread reacts to backend events, keeps at least `min_bytes` leased, and
//! purges the page-table entries of lost slabs.
//!
//! On a revoke notice the affected slabs stop taking new pages (`Draining`); replacement slabs are leased
//! (beyond the maximum by at most the draining amount, as the old ones are about to go); then the
//! published pages of the draining slabs are moved hottest first (sketch frequency, then CLOCK bit), in
//! batches, until 70% of the grace period has passed; the rest are dropped and the slabs given back.
//! Gets keep being served from the old slots until each page's move is published.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use farpool_core::{ServerId, SlabId};

use super::arena::{SlabState, SlotRef};
use super::backend::BackendEvent;
use super::inner::Inner;
use super::layout;
use super::slot::{SlotState, Transition};
use super::stats::Counters;
use super::table::Place;

/// Fraction of a grace period spent moving pages; the rest is margin.
const GRACE_USE: f64 = 0.7;

/// The maintenance thread body.
pub(crate) fn maintenance_loop(inner: Arc<Inner>) {
    let events = inner.backend.events();
    let mut last_top_up = Instant::now();
    while !inner.stopping() {
        if let Ok(ev) = events.recv_timeout(Duration::from_millis(50)) {
            inner.handle_event(ev);
        }
        inner.purge_lost();
        if last_top_up.elapsed() > Duration::from_millis(500) {
            inner.top_up();
            last_top_up = Instant::now();
        }
    }
}

impl Inner {
    pub(crate) fn handle_event(&self, ev: BackendEvent) {
        match ev {
            BackendEvent::RevokeNotice { server, slabs, grace } => self.drain(server, &slabs, grace),
            BackendEvent::Revoked { server, slabs } => {
                for i in self.slab_indices(server, &slabs) {
                    if self.arena.set_state(i, SlabState::Revoked) != SlabState::Revoked {
                        Counters::add(&self.stats.slabs_lost, 1);
                    }
                }
                self.purge_lost();
            }
            BackendEvent::ServerDown { server } => {
                tracing::warn!(%server, "page tier: server down, its pages become misses");
                self.server_lost(server);
                self.purge_lost();
            }
        }
    }

    fn slab_indices(&self, server: ServerId, slabs: &[SlabId]) -> Vec<u32> {
        let all = self.arena.all();
        let hit = |s: &super::arena::Slab| s.server() == server && slabs.contains(&s.far.grant.slab);
        (0..all.len() as u32).filter(|&i| hit(&all[i as usize])).collect()
    }

    /// Handle a revoke notice: move the hottest pages elsewhere within the grace period, drop the rest.
    fn drain(&self, server: ServerId, slabs: &[SlabId], grace: Duration) {
        let deadline = Instant::now() + grace.mul_f64(GRACE_USE);
        let idxs = self.slab_indices(server, slabs);
        let mut bytes = 0;
        for &i in &idxs {
            if self.arena.set_state(i, SlabState::Draining) == SlabState::Active {
                bytes += self.arena.slab(i).far.grant.len;
            }
        }
        tracing::info!(%server, slabs = idxs.len(), grace_ms = grace.as_millis() as u64, "page tier: draining");
        self.try_grow_with(idxs.len(), bytes);
        let mut hot = self.hottest(&idxs);
        let mut moved = 0;
        while !hot.is_empty() && Instant::now() < deadline && !self.stopping() {
            let n = hot.len().min(self.cfg.batch_max);
            let batch: Vec<_> = hot.drain(..n).collect();
            let m = self.migrate(&batch);
            moved += m;
            if m == 0 {
                break; // nowhere to move to
            }
        }
        for &i in &idxs {
            if self.arena.set_state(i, SlabState::Revoked) != SlabState::Revoked {
                Counters::add(&self.stats.slabs_lost, 1);
            }
            if let Err(e) = self.backend.release(&self.arena.slab(i).far) {
                tracing::debug!(error = %e, "page tier: release after drain failed");
            }
        }
        self.purge_lost();
        tracing::info!(%server, moved, "page tier: drained");
    }

    /// Published pages of the slabs, hottest first.
    fn hottest(&self, idxs: &[u32]) -> Vec<(u64, SlotRef)> {
        let mut v = Vec::new();
        for &i in idxs {
            let slab = self.arena.slab(i);
            for (s, m) in slab.slots.iter().enumerate() {
                let (state, generation) = m.word.load();
                if state == SlotState::Published {
                    let page = m.page.load(Ordering::Acquire);
                    let heat =
                        u16::from(self.sketch.estimate(page)) * 2 + u16::from(m.referenced.load(Ordering::Relaxed));
                    v.push((heat, page, SlotRef { slab: i, slot: s as u32, generation }));
                }
            }
        }
        v.sort_by_key(|b| std::cmp::Reverse(b.0));
        v.into_iter().map(|(_, p, r)| (p, r)).collect()
    }

    /// Move a batch of (page, old slot) to new slots; returns how many moved.
    fn migrate(&self, batch: &[(u64, SlotRef)]) -> usize {
        let Some(first) = batch.first() else { return 0 };
        let server = self.arena.slab(first.1.slab).server();
        let mut items = Vec::new();
        for &(page, old) in batch {
            let v = self.table.shard(page).get(&page).filter(|e| e.place == Place::Published(old)).map(|e| e.version);
            if let Some(version) = v {
                items.push((page, version, old));
            }
        }
        let addrs: Vec<_> =
            items.iter().map(|&(_, _, old)| self.arena.addr(&self.arena.slab(old.slab), old.slot)).collect();
        let reads = self.read_slots(server, &addrs);
        let mut moved = 0;
        for (&(page, version, old), r) in items.iter().zip(reads) {
            let Ok(img) = r else { continue };
            if layout::verify(&img, page, version, self.cfg.page_size).is_err() {
                continue;
            }
            let Some(new) = self.alloc_slot() else { return moved };
            if self.move_one(page, old, new, img) {
                moved += 1;
            }
        }
        moved
    }

    fn move_one(&self, page: u64, old: SlotRef, new: SlotRef, img: Bytes) -> bool {
        let nslab = self.arena.slab(new.slab);
        let nmeta = &nslab.slots[new.slot as usize];
        nmeta.page.store(page, Ordering::Release);
        let res = self.write_slots(nslab.server(), vec![(self.arena.addr(&nslab, new.slot), img)]);
        if res.into_iter().next().is_none_or(|r| r.is_err()) {
            self.arena.settle(new, nmeta.word.fail(new.generation));
            return false;
        }
        assert_eq!(nmeta.word.complete(new.generation), Transition::Published, "nobody else knows the new slot");
        let mut shard = self.table.shard(page);
        match shard.get_mut(&page) {
            Some(e) if e.place == Place::Published(old) => {
                e.place = Place::Published(new);
                drop(shard);
                let oslab = self.arena.slab(old.slab);
                nmeta
                    .referenced
                    .store(oslab.slots[old.slot as usize].referenced.load(Ordering::Relaxed), Ordering::Relaxed);
                self.arena.settle(old, oslab.slots[old.slot as usize].word.evict(old.generation));
                Counters::add(&self.stats.pages_migrated, 1);
                true
            }
            _ => {
                drop(shard);
                self.arena.settle(new, nmeta.word.evict(new.generation));
                false
            }
        }
    }

    /// Remove the table entries that point into lost slabs (once per slab).
    pub(crate) fn purge_lost(&self) {
        for slab in self.arena.all() {
            if !matches!(slab.state(), SlabState::Revoked | SlabState::Down) || slab.purged.swap(true, Ordering::AcqRel)
            {
                continue;
            }
            let idx = self.arena.all().iter().position(|s| Arc::ptr_eq(s, &slab)).expect("slab listed") as u32;
            let mut dropped = 0;
            for (s, m) in slab.slots.iter().enumerate() {
                let (state, generation) = m.word.load();
                if state == SlotState::Free {
                    continue;
                }
                let r = SlotRef { slab: idx, slot: s as u32, generation };
                if self.drop_if_current(m.page.load(Ordering::Acquire), r) {
                    dropped += 1;
                }
            }
            Counters::add(&self.stats.pages_dropped, dropped);
        }
    }
}
