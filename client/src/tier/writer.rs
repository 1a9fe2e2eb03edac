//! Write-behind: writer threads drain the bounded put queue in batches, place each page in a slot, write
//! the batch per server and publish each slot when (and only when) its own write completed.
//!
//! Completions may arrive in any order; each is matched to its job by `wr_id`. A failed write, or one
//! whose page was invalidated or superseded meanwhile, frees its slot through the slot word (see
//! [`super::slot`]): whatever the interleaving, the slot goes back to the free list exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::RecvTimeoutError;
use farpool_core::{ErrorKind, Result, ServerId};

use super::arena::{SlabState, SlotRef};
use super::inner::{Inner, PutItem};
use super::slot::Transition;
use super::stats::Counters;
use super::table::Place;

/// A page placed in a slot, about to be written.
#[derive(Debug)]
struct Job {
    page: u64,
    version: u64,
    slot: SlotRef,
    image: Bytes,
}

/// The writer thread body: runs until shutdown, then cancels what is left in the queue.
///
/// A batch is whatever is queued, up to `batch_max`; when that is less than a quarter of `batch_max`
/// the writer lingers up to `write_linger` for more, so one round trip (one send, one receive on each
/// side) carries several pages instead of one. Queued pages are served from their image meanwhile.
pub(crate) fn writer_loop(inner: Arc<Inner>) {
    let rx = inner.queue_rx.clone();
    let linger = inner.cfg.write_linger;
    let mut batch = Vec::with_capacity(inner.cfg.batch_max);
    while !inner.stopping() {
        let first = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(it) => it,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        batch.push(first);
        let until = Instant::now() + linger;
        while batch.len() < inner.cfg.batch_max {
            match rx.try_recv() {
                Ok(it) => batch.push(it),
                Err(_) if batch.len() * 4 >= inner.cfg.batch_max || linger.is_zero() => break,
                Err(_) => match rx.recv_deadline(until) {
                    Ok(it) => batch.push(it),
                    Err(_) => break,
                },
            }
        }
        Counters::add(&inner.stats.write_batches, 1);
        inner.write_batch(batch.drain(..));
    }
    while let Ok(it) = rx.try_recv() {
        inner.abandon(&it);
    }
}

impl Inner {
    /// Remove a queued entry that will never be written; counts the put as dropped or cancelled.
    fn abandon(&self, it: &PutItem) {
        let mut shard = self.table.shard(it.page);
        if matches!(shard.get(&it.page), Some(e) if e.version == it.version && e.place == Place::Queued) {
            shard.remove(&it.page);
            Counters::add(&self.stats.puts_dropped, 1);
        } else {
            Counters::add(&self.stats.puts_cancelled, 1);
        }
    }

    /// Give each still-wanted item a slot and mark its entry `Writing`.
    fn place(&self, it: PutItem) -> Option<Job> {
        let still_queued = |e: Option<&super::table::Entry>| matches!(e, Some(e) if e.version == it.version && e.place == Place::Queued);
        if !still_queued(self.table.shard(it.page).get(&it.page)) {
            Counters::add(&self.stats.puts_cancelled, 1);
            return None;
        }
        let Some(slot) = self.alloc_slot() else {
            self.abandon(&it);
            return None;
        };
        let slab = self.arena.slab(slot.slab);
        let meta = &slab.slots[slot.slot as usize];
        meta.page.store(it.page, Ordering::Release);
        meta.referenced.store(false, Ordering::Relaxed);
        let mut shard = self.table.shard(it.page);
        match shard.get_mut(&it.page) {
            Some(e) if e.version == it.version && e.place == Place::Queued => {
                e.place = Place::Writing(slot);
                let image = e.image.clone().expect("a queued entry has its image");
                Some(Job { page: it.page, version: it.version, slot, image })
            }
            _ => {
                drop(shard);
                self.arena.settle(slot, meta.word.fail(slot.generation));
                Counters::add(&self.stats.puts_cancelled, 1);
                None
            }
        }
    }

    pub(crate) fn write_batch(&self, items: impl IntoIterator<Item = PutItem>) {
        let mut by_server: HashMap<ServerId, Vec<Job>> = HashMap::new();
        for it in items {
            if let Some(job) = self.place(it) {
                let server = self.arena.slab(job.slot.slab).server();
                by_server.entry(server).or_default().push(job);
            }
        }
        for (server, jobs) in by_server {
            let writes = jobs
                .iter()
                .map(|j| (self.arena.addr(&self.arena.slab(j.slot.slab), j.slot.slot), j.image.clone()))
                .collect();
            let results = self.write_slots(server, writes);
            for (job, r) in jobs.into_iter().zip(results) {
                self.finish(job, r);
            }
        }
    }

    /// Settle one write: publish it, or free its slot.
    fn finish(&self, job: Job, result: Result<()>) {
        let r = job.slot;
        let slab = self.arena.slab(r.slab);
        let word = &slab.slots[r.slot as usize].word;
        if let Err(e) = result {
            tracing::debug!(page = job.page, error = %e, "page tier: far write failed");
            if matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Closed) {
                // As a failed read does: a server whose writes all fail may never be read from again.
                self.server_lost(slab.server());
            }
            self.arena.settle(r, word.fail(r.generation));
            let mut shard = self.table.shard(job.page);
            if matches!(shard.get(&job.page), Some(e) if e.place == Place::Writing(r)) {
                shard.remove(&job.page);
            }
            Counters::add(&self.stats.puts_failed, 1);
            return;
        }
        match word.complete(r.generation) {
            Transition::Published => {}
            t => {
                self.arena.settle(r, t);
                Counters::add(&self.stats.puts_cancelled, 1);
                return;
            }
        }
        let mut shard = self.table.shard(job.page);
        let ours = matches!(shard.get(&job.page), Some(e) if e.place == Place::Writing(r) && e.version == job.version);
        if !ours {
            // Cancelled after we published: the canceller freed the slot.
            Counters::add(&self.stats.puts_cancelled, 1);
        } else if slab.state() != SlabState::Active && slab.state() != SlabState::Draining {
            shard.remove(&job.page);
            drop(shard);
            self.arena.settle(r, word.evict(r.generation));
            Counters::add(&self.stats.puts_failed, 1);
        } else if let Some(e) = shard.get_mut(&job.page) {
            e.place = Place::Published(r);
            e.image = None;
            Counters::add(&self.stats.puts_published, 1);
        }
    }
}
