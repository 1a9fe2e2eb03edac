//! Elasticity: the maintenance thread reacts to backend events, keeps at least `min_bytes` leased, and
//! purges the page-table entries of lost slabs.
//!
//! On a revoke notice (the notices of one burst are gathered first, see [`NOTICE_GATHER`]) the affected
//! slabs stop taking new pages (`Draining`); replacement slabs are leased (beyond the maximum by at most
//! the draining amount, as the old ones are about to go); then the published pages of the draining slabs
//! are moved hottest first (sketch frequency, then CLOCK bit), in batches (one read per source server, one
//! write per target server), until 70% of the grace period has passed; the rest are dropped (their next
//! get is a `Revoked` miss) and the slabs given back. Only pages hot enough for admission may evict
//! another page to get a new slot; cold ones take free slots only. Gets keep being served from the old
//! slots until each page's move is published.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use farpool_core::ServerId;

use super::arena::{SlabState, SlotRef};
use super::backend::{BackendEvent, GrantRef};
use super::inner::Inner;
use super::layout;
use super::slot::{SlotState, Transition};
use super::stats::{Counters, MissReason};
use super::table::Place;

/// Fraction of a grace period spent moving pages; the rest is margin.
const GRACE_USE: f64 = 0.7;

/// A page to move off a draining slab.
#[derive(Clone, Copy, Debug)]
struct Move {
    page: u64,
    old: SlotRef,
    /// Hot enough to evict another page for its new slot.
    hot: bool,
}

/// How long to keep gathering the notices of one burst before acting: a drain sends one notice per
/// lease, and the tier holds one lease per slab. Gathering them first marks every doomed slab draining
/// before any page is moved, so no page is moved onto a slab whose own notice is still queued.
const NOTICE_GATHER: Duration = Duration::from_millis(20);
/// Quiet gap that ends a burst early.
const NOTICE_GAP: Duration = Duration::from_millis(5);
/// Notices merged into one drain at most.
const NOTICE_BATCH_MAX: usize = 4096;

/// A revoke notice as received: the server, its grants, and the deadline by the local clock.
type Notice = (ServerId, Vec<GrantRef>, Instant);

/// The maintenance thread body; `events` is the subscription the builder made before the first lease.
pub(crate) fn maintenance_loop(inner: Arc<Inner>, events: Receiver<BackendEvent>) {
    let mut last_top_up = Instant::now();
    while !inner.stopping() {
        if let Ok(ev) = events.recv_timeout(Duration::from_millis(50)) {
            inner.handle_burst(ev, &events);
        }
        inner.purge_lost();
        if last_top_up.elapsed() > Duration::from_millis(500) {
            inner.top_up();
            last_top_up = Instant::now();
        }
    }
}

impl Inner {
    /// Handle `first` and, if it is a revoke notice, the rest of its burst as one drain.
    fn handle_burst(&self, first: BackendEvent, events: &Receiver<BackendEvent>) {
        let until = Instant::now() + NOTICE_GATHER;
        let mut notices: Vec<Notice> = Vec::new();
        let mut next = Some(first);
        while let Some(ev) = next.take() {
            match ev {
                BackendEvent::RevokeNotice { server, grants, grace } => {
                    notices.push((server, grants, Instant::now() + grace));
                }
                other => self.handle_event(other),
            }
            let left = until.saturating_duration_since(Instant::now());
            if notices.is_empty() || notices.len() >= NOTICE_BATCH_MAX || left.is_zero() {
                break;
            }
            next = events.recv_timeout(left.min(NOTICE_GAP)).ok();
        }
        if !notices.is_empty() {
            self.drain(&notices);
        }
    }

    pub(crate) fn handle_event(&self, ev: BackendEvent) {
        match ev {
            BackendEvent::RevokeNotice { server, grants, grace } => {
                self.drain(&[(server, grants, Instant::now() + grace)]);
            }
            BackendEvent::Revoked { server, grants } => {
                for i in self.slab_indices(server, &grants) {
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

    /// Arena indices of the slabs holding these grants of `server`. Matched by grant (slab and lease), so
    /// an event about an older grant of a slab id leased again since touches nothing.
    fn slab_indices(&self, server: ServerId, grants: &[GrantRef]) -> Vec<u32> {
        let all = self.arena.all();
        let hit = |s: &super::arena::Slab| s.server() == server && grants.contains(&s.far.grant_ref());
        (0..all.len() as u32).filter(|&i| hit(&all[i as usize])).collect()
    }

    /// Handle revoke notices: move the hottest pages elsewhere within the grace period, drop the rest.
    /// Moving stops at [`GRACE_USE`] of the shortest remaining grace.
    fn drain(&self, notices: &[Notice]) {
        let now = Instant::now();
        let grace = notices.iter().map(|n| n.2.saturating_duration_since(now)).min().unwrap_or_default();
        let deadline = now + grace.mul_f64(GRACE_USE);
        let mut idxs: Vec<u32> =
            notices.iter().flat_map(|(server, grants, _)| self.slab_indices(*server, grants)).collect();
        idxs.sort_unstable();
        idxs.dedup();
        let mut bytes = 0;
        for &i in &idxs {
            if self.arena.set_state(i, SlabState::Draining) == SlabState::Active {
                bytes += self.arena.slab(i).far.grant.len;
            }
        }
        tracing::info!(
            notices = notices.len(),
            slabs = idxs.len(),
            grace_ms = grace.as_millis() as u64,
            "page tier: draining"
        );
        self.try_grow_with(idxs.len(), bytes);
        let mut hot = self.hottest(&idxs);
        let mut moved = 0;
        while !hot.is_empty() && Instant::now() < deadline && !self.stopping() {
            let n = hot.len().min(self.cfg.batch_max);
            let batch: Vec<_> = hot.drain(..n).collect();
            let m = self.migrate(&batch);
            moved += m;
            if m == 0 {
                break; // nowhere to move to (the rest is colder still)
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
        tracing::info!(moved, left = hot.len(), "page tier: drained");
    }

    /// Published pages of the slabs, hottest first (sketch frequency, then CLOCK bit), each with whether it
    /// is hot enough to displace another page (the admission threshold, or referenced since its write).
    fn hottest(&self, idxs: &[u32]) -> Vec<Move> {
        let mut v = Vec::new();
        for &i in idxs {
            let slab = self.arena.slab(i);
            for (s, m) in slab.slots.iter().enumerate() {
                let (state, generation) = m.word.load();
                if state == SlotState::Published {
                    let page = m.page.load(Ordering::Acquire);
                    let freq = self.sketch.estimate(page);
                    let referenced = m.referenced.load(Ordering::Relaxed);
                    let heat = u16::from(freq) * 2 + u16::from(referenced);
                    let hot = freq >= self.cfg.admit_min_puts || referenced;
                    v.push((heat, Move { page, old: SlotRef { slab: i, slot: s as u32, generation }, hot }));
                }
            }
        }
        v.sort_by_key(|b| std::cmp::Reverse(b.0));
        v.into_iter().map(|(_, m)| m).collect()
    }

    /// Move a batch to new slots: one batched read per source server, one batched write per target
    /// server; returns how many moved. Cold pages only take free slots; hot ones may evict.
    fn migrate(&self, batch: &[Move]) -> usize {
        let mut by_source: HashMap<ServerId, Vec<(Move, u64)>> = HashMap::new();
        for &mv in batch {
            let v = self
                .table
                .shard(mv.page)
                .get(&mv.page)
                .filter(|e| e.place == Place::Published(mv.old))
                .map(|e| e.version);
            if let Some(version) = v {
                by_source.entry(self.arena.slab(mv.old.slab).server()).or_default().push((mv, version));
            }
        }
        let mut by_target: HashMap<ServerId, Vec<(Move, SlotRef, Bytes)>> = HashMap::new();
        for (server, items) in by_source {
            let addrs: Vec<_> =
                items.iter().map(|(mv, _)| self.arena.addr(&self.arena.slab(mv.old.slab), mv.old.slot)).collect();
            for ((mv, version), r) in items.into_iter().zip(self.read_slots(server, &addrs)) {
                let Ok(img) = r else { continue };
                if layout::verify(&img, mv.page, version, self.cfg.page_size).is_err() {
                    continue;
                }
                let new = if mv.hot { self.alloc_slot() } else { self.alloc_free_slot() };
                let Some(new) = new else { continue };
                let nslab = self.arena.slab(new.slab);
                nslab.slots[new.slot as usize].page.store(mv.page, Ordering::Release);
                by_target.entry(nslab.server()).or_default().push((mv, new, img));
            }
        }
        let mut moved = 0;
        for (server, items) in by_target {
            let writes = items
                .iter()
                .map(|(_, new, img)| (self.arena.addr(&self.arena.slab(new.slab), new.slot), img.clone()))
                .collect();
            for ((mv, new, _), r) in items.into_iter().zip(self.write_slots(server, writes)) {
                moved += usize::from(self.finish_move(mv, new, r.is_ok()));
            }
        }
        moved
    }

    /// Publish a moved page at `new` once its write completed (or free `new` if it failed or the page
    /// changed meanwhile); the old slot is freed when the move is published.
    fn finish_move(&self, mv: Move, new: SlotRef, written: bool) -> bool {
        let nslab = self.arena.slab(new.slab);
        let nmeta = &nslab.slots[new.slot as usize];
        if !written {
            self.arena.settle(new, nmeta.word.fail(new.generation));
            return false;
        }
        assert_eq!(nmeta.word.complete(new.generation), Transition::Published, "nobody else knows the new slot");
        let mut shard = self.table.shard(mv.page);
        match shard.get_mut(&mv.page) {
            Some(e) if e.place == Place::Published(mv.old) => {
                e.place = Place::Published(new);
                drop(shard);
                let old = mv.old;
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
            let reason = if slab.state() == SlabState::Revoked { MissReason::Revoked } else { MissReason::ServerDown };
            let mut dropped = 0;
            for (s, m) in slab.slots.iter().enumerate() {
                let (state, generation) = m.word.load();
                if state == SlotState::Free {
                    continue;
                }
                let r = SlotRef { slab: idx, slot: s as u32, generation };
                if self.drop_if_current(m.page.load(Ordering::Acquire), r, Some(reason)) {
                    dropped += 1;
                }
            }
            Counters::add(&self.stats.pages_dropped, dropped);
        }
    }
}
