//! Prefetch: an explicit "I will read these pages" call and a sequential-scan detector, both feeding a
//! bounded queue that a prefetch thread drains into a bounded staging buffer; `get` consumes from it.
//!
//! The window (pages fetched ahead of a detected scan) adapts to the far round trip: it is the number of
//! pages the scan consumes during one RTT, `ceil(rtt_ewma / gap_ewma) + 1`, clamped to
//! `[2, prefetch_window_max]`. A staged page is handed out only if the page table still holds that very
//! version (a put or invalidate since then discards it) and it is >= the version asked for.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::TierConfig;
use super::inner::Inner;
use super::stats::{Counters, Lookup};

/// Scans tracked at once.
const STREAMS: usize = 8;
/// Consecutive pages before a run counts as a scan.
const SCAN_RUN_MIN: u32 = 4;
/// Pages fetched per prefetch batch.
const PREFETCH_BATCH: usize = 32;

#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    next: u64,
    run: u32,
    last: Option<Instant>,
    gap_ewma_ns: u64,
    /// Pages up to (excluding) this one have been requested.
    ahead: u64,
}

#[derive(Debug, Default)]
struct Staging {
    map: HashMap<u64, (u64, Bytes)>,
    order: VecDeque<u64>,
}

#[derive(Debug)]
pub(crate) struct Prefetcher {
    staged: Mutex<Staging>,
    /// Pages in `staged.map` (kept under its lock): lets `take`/`forget` skip the lock when empty.
    staged_len: AtomicUsize,
    streams: Mutex<([Stream; STREAMS], usize)>,
    pub(crate) tx: Sender<u64>,
    rx: Receiver<u64>,
    window_max: usize,
    staged_max: usize,
    detect: bool,
}

impl Prefetcher {
    pub(crate) fn new(cfg: &TierConfig) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(cfg.prefetch_queue_depth);
        Self {
            staged: Mutex::new(Staging::default()),
            staged_len: AtomicUsize::new(0),
            streams: Mutex::new(([Stream::default(); STREAMS], 0)),
            tx,
            rx,
            window_max: cfg.prefetch_window_max,
            staged_max: cfg.prefetch_staged_max,
            detect: cfg.scan_detect,
        }
    }

    /// Drop any staged copy of `page`.
    pub(crate) fn forget(&self, page: u64) {
        let _ = self.unstage(page);
    }

    fn unstage(&self, page: u64) -> Option<(u64, Bytes)> {
        if self.staged_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut s = self.staged.lock();
        let r = s.map.remove(&page);
        self.staged_len.store(s.map.len(), Ordering::Release);
        r
    }

    fn stage(&self, page: u64, version: u64, bytes: Bytes) {
        let mut s = self.staged.lock();
        if s.map.insert(page, (version, bytes)).is_none() {
            s.order.push_back(page);
        }
        while s.map.len() > self.staged_max || s.order.len() > 2 * self.staged_max.max(1) {
            let Some(old) = s.order.pop_front() else { break };
            if s.map.len() > self.staged_max {
                s.map.remove(&old);
            }
        }
        self.staged_len.store(s.map.len(), Ordering::Release);
    }

    /// Serve `page` from staging if the table still holds that version and it is >= `min`.
    pub(crate) fn take(&self, inner: &Inner, page: u64, min: u64, buf: &mut [u8]) -> Option<u64> {
        let (version, bytes) = self.unstage(page)?;
        let current = inner.table.shard(page).get(&page).map(|e| e.version);
        if version < min || current != Some(version) {
            return None;
        }
        buf.copy_from_slice(&bytes);
        Some(version)
    }

    /// Queue pages for prefetch (ones that do not fit the bounded queue are skipped).
    pub(crate) fn request(&self, inner: &Inner, pages: impl IntoIterator<Item = u64>) {
        for p in pages {
            if self.tx.try_send(p).is_err() {
                break;
            }
            Counters::add(&inner.stats.prefetch_requested, 1);
        }
    }

    /// Feed the scan detector with a get of `page`; may request the next window.
    pub(crate) fn observe(&self, inner: &Inner, page: u64) {
        if !self.detect {
            return;
        }
        let now = Instant::now();
        let rtt = inner.stats.rtt_ewma_ns.load(Ordering::Relaxed);
        let want = {
            let mut g = self.streams.lock();
            let (streams, victim) = &mut *g;
            let Some(s) = streams.iter_mut().find(|s| s.next == page && s.run > 0) else {
                let v = *victim;
                *victim = (v + 1) % STREAMS;
                streams[v] = Stream { next: page + 1, run: 1, last: Some(now), gap_ewma_ns: 0, ahead: page + 1 };
                return;
            };
            let gap = s.last.map_or(0, |t| now.duration_since(t).as_nanos() as u64);
            s.gap_ewma_ns = if s.gap_ewma_ns == 0 { gap } else { s.gap_ewma_ns - s.gap_ewma_ns / 4 + gap / 4 };
            s.last = Some(now);
            s.run += 1;
            s.next = page + 1;
            if s.run < SCAN_RUN_MIN {
                return;
            }
            let window = window_pages(rtt, s.gap_ewma_ns, self.window_max) as u64;
            let from = s.ahead.max(page + 1);
            let to = page + 1 + window;
            if from >= to {
                return;
            }
            s.ahead = to;
            from..to
        };
        Counters::add(&inner.stats.scans_detected, 1);
        self.request(inner, want);
    }
}

/// Pages a scan consumes during one round trip, plus one, clamped to `[2, max]`.
pub(crate) fn window_pages(rtt_ns: u64, gap_ns: u64, max: usize) -> usize {
    let w = if gap_ns == 0 { max as u64 } else { rtt_ns.div_ceil(gap_ns) + 1 };
    (w as usize).clamp(2, max.max(2))
}

/// The prefetch thread body.
pub(crate) fn prefetch_loop(inner: Arc<Inner>) {
    let rx = inner.prefetch.rx.clone();
    let ps = inner.cfg.page_size;
    let mut buf = vec![0u8; ps * PREFETCH_BATCH];
    while !inner.stopping() {
        let Ok(first) = rx.recv_timeout(Duration::from_millis(50)) else { continue };
        let mut pages = vec![first];
        while pages.len() < PREFETCH_BATCH {
            match rx.try_recv() {
                Ok(p) if !pages.contains(&p) => pages.push(p),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        pages.retain(|p| !inner.prefetch.staged.lock().map.contains_key(p));
        let reqs: Vec<(u64, u64)> = pages.iter().map(|&p| (p, 0)).collect();
        let res = inner.lookup_many(&reqs, &mut buf, false);
        for (i, (r, &page)) in res.iter().zip(&pages).enumerate() {
            if let Lookup::Hit { version } = *r {
                let bytes = Bytes::copy_from_slice(&buf[i * ps..(i + 1) * ps]);
                inner.prefetch.stage(page, version, bytes);
                Counters::add(&inner.stats.prefetch_loaded, 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::window_pages;

    #[test]
    fn window_follows_rtt() {
        assert_eq!(window_pages(10_000, 1_000, 64), 11);
        assert_eq!(window_pages(100_000, 1_000, 64), 64, "clamped to the maximum");
        assert_eq!(window_pages(100, 1_000, 64), 2, "at least two pages");
        assert_eq!(window_pages(5_000, 0, 16), 16, "a burst with no gap gets the whole window");
    }
}
