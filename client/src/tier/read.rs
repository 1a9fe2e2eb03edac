//! The get path: local checks under the shard lock, then one batched far read per server, then the
//! header/checksum check and the slot-word re-check before any byte reaches the caller.
//!
//! A page is returned only if (1) the table's entry has a version >= the one asked for, (2) the bytes
//! read carry that page id and exactly that version and pass their checksum, and (3) the slot word is
//! still `PUBLISHED` in the generation the table named after the read (so the slot was not reused while
//! we read it). Anything else is a miss with its reason.

use std::sync::atomic::Ordering;

use farpool_core::{ErrorKind, RemoteAddr, ServerId};

use super::arena::{SlabState, SlotRef};
use super::inner::Inner;
use super::layout;
use super::stats::{Counters, Lookup, MissReason};
use super::table::Place;

/// A far read to do for request `idx`.
#[derive(Clone, Copy, Debug)]
struct Plan {
    idx: usize,
    page: u64,
    version: u64,
    slot: SlotRef,
    addr: RemoteAddr,
}

/// What the local step decided.
#[derive(Clone, Copy, Debug)]
enum Step {
    Served(u64),
    Read(Plan),
}

/// How a lookup was answered (finer than [`Lookup`], for the counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Far,
    Queued,
    Prefetched,
}

impl Inner {
    /// Look `reqs` (page, min version) up; hits are copied into `out[i*page..(i+1)*page]`.
    /// `count` = false for internal reads (prefetch), which leave the get counters alone.
    pub(crate) fn lookup_many(&self, reqs: &[(u64, u64)], out: &mut [u8], count: bool) -> Vec<Lookup> {
        let ps = self.cfg.page_size;
        assert!(out.len() >= reqs.len() * ps, "get buffer too small: {} for {} pages", out.len(), reqs.len());
        let mut res = vec![Lookup::Miss(MissReason::Absent); reqs.len()];
        let mut src = vec![Source::Far; reqs.len()];
        // Few servers: a short list beats a hash map (no hasher set-up on every get).
        let mut plans: Vec<(ServerId, Vec<Plan>)> = Vec::new();
        for (i, &(page, min)) in reqs.iter().enumerate() {
            let buf = &mut out[i * ps..(i + 1) * ps];
            if count && let Some(v) = self.prefetch.take(self, page, min, buf) {
                res[i] = Lookup::Hit { version: v };
                src[i] = Source::Prefetched;
                continue;
            }
            match self.local_step(i, page, min, buf, count) {
                Ok(Step::Served(v)) => {
                    res[i] = Lookup::Hit { version: v };
                    src[i] = Source::Queued;
                }
                Ok(Step::Read(p)) => {
                    let server = self.arena.slab(p.slot.slab).server();
                    match plans.iter_mut().find(|(s, _)| *s == server) {
                        Some((_, list)) => list.push(p),
                        None => plans.push((server, vec![p])),
                    }
                }
                Err(reason) => res[i] = Lookup::Miss(reason),
            }
        }
        for (server, list) in plans {
            self.read_planned(server, &list, out, &mut res, count);
        }
        if count {
            self.count(reqs, &res, &src);
        }
        res
    }

    /// Under the shard lock: served from a queued image, a far read to do, or a miss decided locally.
    /// Only a counted get consumes the record of a lost page.
    fn local_step(&self, idx: usize, page: u64, min: u64, buf: &mut [u8], count: bool) -> Result<Step, MissReason> {
        let mut shard = self.table.shard(page);
        let Some(e) = shard.get(&page) else {
            let lost = if count { self.lost.take(page) } else { None };
            return Err(lost.unwrap_or(MissReason::Absent));
        };
        if e.version < min {
            return Err(MissReason::Stale);
        }
        if let Some(img) = &e.image {
            buf.copy_from_slice(layout::payload(img));
            return Ok(Step::Served(e.version));
        }
        let Place::Published(slot) = e.place else { return Err(MissReason::Absent) };
        let slab = self.arena.slab(slot.slab);
        match slab.state() {
            SlabState::Active | SlabState::Draining => {
                let addr = self.arena.addr(&slab, slot.slot);
                Ok(Step::Read(Plan { idx, page, version: e.version, slot, addr }))
            }
            lost => {
                let e = shard.remove(&page).expect("entry present");
                let reason = if lost == SlabState::Revoked { MissReason::Revoked } else { MissReason::ServerDown };
                if !count {
                    self.lost.record(page, reason);
                }
                drop(shard);
                self.release_place(e.place);
                Err(reason)
            }
        }
    }

    /// An uncounted read (prefetch) that drops a page records why, for the page's next counted get.
    fn read_planned(&self, server: ServerId, list: &[Plan], out: &mut [u8], res: &mut [Lookup], count: bool) {
        let ps = self.cfg.page_size;
        let addrs: Vec<RemoteAddr> = list.iter().map(|p| p.addr).collect();
        let reads = self.read_slots(server, &addrs);
        for (p, r) in list.iter().zip(reads) {
            let slab = self.arena.slab(p.slot.slab);
            let meta = &slab.slots[p.slot.slot as usize];
            let img = match r {
                Ok(img) => img,
                Err(e) => {
                    res[p.idx] = Lookup::Miss(self.read_failed(p, e.kind(), count));
                    continue;
                }
            };
            if !meta.word.is_published(p.slot.generation) {
                // Evicted, reused or purged with its slab while we read: whatever we got is not this page.
                let lost = if count { self.lost.take(p.page) } else { None };
                res[p.idx] = Lookup::Miss(lost.unwrap_or(MissReason::Absent));
                continue;
            }
            match layout::verify(&img, p.page, p.version, ps) {
                Ok(bytes) => {
                    out[p.idx * ps..(p.idx + 1) * ps].copy_from_slice(bytes);
                    meta.referenced.store(true, Ordering::Relaxed);
                    res[p.idx] = Lookup::Hit { version: p.version };
                }
                Err(why) => {
                    tracing::warn!(page = p.page, version = p.version, ?why, "page tier: far slot failed its check");
                    self.drop_if_current(p.page, p.slot, (!count).then_some(MissReason::Checksum));
                    res[p.idx] = Lookup::Miss(MissReason::Checksum);
                }
            }
        }
    }

    /// Classify a failed read; a revoked slab or a dead server is marked so later gets fail fast.
    fn read_failed(&self, p: &Plan, kind: ErrorKind, count: bool) -> MissReason {
        match kind {
            ErrorKind::Revoked | ErrorKind::Unauthorized | ErrorKind::OutOfRange => {
                self.arena.set_state(p.slot.slab, SlabState::Revoked);
                self.drop_if_current(p.page, p.slot, (!count).then_some(MissReason::Revoked));
                MissReason::Revoked
            }
            ErrorKind::Unreachable | ErrorKind::Closed => {
                self.server_lost(self.arena.slab(p.slot.slab).server());
                self.drop_if_current(p.page, p.slot, (!count).then_some(MissReason::ServerDown));
                MissReason::ServerDown
            }
            _ => MissReason::ServerDown,
        }
    }

    /// Remove the entry of `page` if it still names `slot` (and free the slot); with `lost`, remember why
    /// for the page's next get.
    pub(crate) fn drop_if_current(&self, page: u64, slot: SlotRef, lost: Option<MissReason>) -> bool {
        let mut shard = self.table.shard(page);
        if matches!(shard.get(&page), Some(e) if e.place.slot() == Some(slot)) {
            let e = shard.remove(&page).expect("entry present");
            if let Some(reason) = lost {
                self.lost.record(page, reason);
            }
            drop(shard);
            self.release_place(e.place);
            return true;
        }
        false
    }

    /// Mark every slab of `server` down.
    pub(crate) fn server_lost(&self, server: ServerId) {
        self.note_down(server);
        for (i, slab) in self.arena.all().iter().enumerate() {
            if slab.server() == server && self.arena.set_state(i as u32, SlabState::Down) != SlabState::Down {
                Counters::add(&self.stats.slabs_lost, 1);
            }
        }
        self.endpoints.forget(server);
    }

    fn count(&self, reqs: &[(u64, u64)], res: &[Lookup], src: &[Source]) {
        Counters::add(&self.stats.gets, reqs.len() as u64);
        for ((&(page, _), r), s) in reqs.iter().zip(res).zip(src) {
            match (r, s) {
                (Lookup::Hit { .. }, Source::Far) => Counters::add(&self.stats.hits_far, 1),
                (Lookup::Hit { .. }, Source::Queued) => Counters::add(&self.stats.hits_queued, 1),
                (Lookup::Hit { .. }, Source::Prefetched) => Counters::add(&self.stats.hits_prefetched, 1),
                (Lookup::Miss(m), _) => self.stats.miss(*m),
            }
            self.prefetch.observe(self, page);
        }
    }
}
