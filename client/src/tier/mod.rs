//! The page tier: an elastic far-memory extension of a buffer manager's page cache.
//!
//! Owns: the local page table (page id -> expected version and far slot), the far slots of every leased
//! slab (header + page, see [`layout`]), the write-behind queue and its writer threads, the prefetch
//! thread and the maintenance thread (revoke notices, growth, purging lost slabs).
//!
//! Invariants:
//! - **Never a stale or torn page.** `get(page, min_version)` returns bytes only if the table holds a
//!   version >= `min_version` and the far slot read back carries that page id and exactly that version,
//!   passes its CRC, and its slot word is still published in the same generation after the read.
//! - **Publish after completion.** A slot becomes readable only after its own write completed; a failed
//!   or cancelled write frees its slot exactly once (the lock-free [`slot`] word; loom-tested).
//! - **Bounded.** The put queue (`queue_depth`), batches (`batch_max`), prefetch queue and staging buffer,
//!   idle endpoints, eviction scans and every far wait have explicit bounds.
//! - **Far memory is a cache.** Losing a slab or a server costs misses (counted by reason), never
//!   correctness; counters add up (`gets == hits + misses`, every put reaches one outcome).
//!
//! Threads: `writer_threads` writers, one prefetcher, one maintenance thread; all stop when the last
//! [`PageTier`] handle is dropped.
//!
//! ```
//! use std::sync::Arc;
//! use farpool::tier::{Lookup, PageTier, mem::MemBackend};
//! let backend = Arc::new(MemBackend::new(1, 4, 1 << 20));
//! let tier = PageTier::builder(backend).with_page_size(4096).with_capacity_bytes(0, 4 << 20).build().unwrap();
//! tier.put(7, 1, &[0xAB; 4096]);
//! tier.flush(std::time::Duration::from_secs(5)).unwrap();
//! let mut buf = vec![0; 4096];
//! assert_eq!(tier.get(7, 1, &mut buf), Lookup::Hit { version: 1 });
//! assert_eq!(buf, vec![0xAB; 4096]);
//! ```

mod arena;
mod async_tier;
pub mod backend;
mod elastic;
mod inner;
mod io;
pub mod layout;
mod lost;
pub mod mem;
mod pool_backend;
mod prefetch;
mod read;
mod slot;
mod stats;
mod sync;
mod table;
mod writer;

#[cfg(all(test, not(farpool_loom)))]
mod tests;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use farpool_core::{Error, ErrorKind, Result};

pub use arena::SlotCensus;
pub use async_tier::AsyncPageTier;
pub use backend::{BackendEvent, FarBackend, FarSlab, GrantRef};
pub use farpool_core::sample::page_content;
pub use pool_backend::PoolBackend;
pub use stats::{Lookup, MissReason, TierStats};

use inner::Inner;

/// What became of a `put`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutStatus {
    /// Queued for write-behind (served from the queue until written).
    Queued,
    /// The tier already holds this version or a newer one.
    Unchanged,
    /// The tier is full and admission refused the page (not seen often enough).
    Rejected,
    /// The write-behind queue was full.
    Dropped,
}

/// The tier's settings (see the builder for defaults).
#[derive(Clone, Debug)]
pub(crate) struct TierConfig {
    pub(crate) page_size: usize,
    pub(crate) min_bytes: u64,
    pub(crate) max_bytes: u64,
    pub(crate) queue_depth: usize,
    pub(crate) writer_threads: usize,
    pub(crate) batch_max: usize,
    pub(crate) write_linger: Duration,
    pub(crate) admit_min_puts: u8,
    pub(crate) prefetch_window_max: usize,
    pub(crate) prefetch_queue_depth: usize,
    pub(crate) prefetch_staged_max: usize,
    pub(crate) scan_detect: bool,
    pub(crate) endpoints_idle_max: usize,
}

/// Builds a [`PageTier`].
#[derive(Debug)]
pub struct PageTierBuilder {
    cfg: TierConfig,
    backend: Arc<dyn FarBackend>,
}

impl PageTierBuilder {
    /// Page size in bytes: 4096, 8192 or 16384. Default 8192.
    pub fn with_page_size(mut self, bytes: usize) -> Self {
        self.cfg.page_size = bytes;
        self
    }

    /// Far memory to hold: lease `min_bytes` at build time, grow up to `max_bytes` (whole slabs).
    /// Default 0 to 256 MiB.
    pub fn with_capacity_bytes(mut self, min_bytes: u64, max_bytes: u64) -> Self {
        self.cfg.min_bytes = min_bytes;
        self.cfg.max_bytes = max_bytes;
        self
    }

    /// Bound of the write-behind queue (puts beyond it are dropped). Default 1024.
    pub fn with_queue_depth(mut self, puts: usize) -> Self {
        self.cfg.queue_depth = puts;
        self
    }

    /// Writer threads draining the queue. Default 2.
    pub fn with_writer_threads(mut self, n: usize) -> Self {
        self.cfg.writer_threads = n;
        self
    }

    /// Largest batch of far operations posted at once. Default 32.
    pub fn with_batch_max(mut self, ops: usize) -> Self {
        self.cfg.batch_max = ops;
        self
    }

    /// How long a writer waits for more puts when its batch is small (under a quarter of `batch_max`),
    /// so that one round trip carries several pages; zero writes each page as soon as it is queued.
    /// Default 200 us.
    pub fn with_write_linger(mut self, linger: Duration) -> Self {
        self.cfg.write_linger = linger;
        self
    }

    /// When the tier is full, a page is admitted only after this many recent puts of it. Default 2.
    pub fn with_admit_min_puts(mut self, puts: u8) -> Self {
        self.cfg.admit_min_puts = puts;
        self
    }

    /// Largest prefetch window in pages. Default 32.
    pub fn with_prefetch_window_max(mut self, pages: usize) -> Self {
        self.cfg.prefetch_window_max = pages;
        self
    }

    /// Pages held in the prefetch staging buffer at most. Default 256.
    pub fn with_prefetch_staged_max(mut self, pages: usize) -> Self {
        self.cfg.prefetch_staged_max = pages;
        self
    }

    /// Detect sequential scans among gets and prefetch ahead of them. Default true.
    pub fn with_scan_detect(mut self, on: bool) -> Self {
        self.cfg.scan_detect = on;
        self
    }

    /// Validate, subscribe to the backend's events, lease `min_bytes`, start the threads.
    pub fn build(self) -> Result<PageTier> {
        let c = &self.cfg;
        let bad = |m: String| Err(Error::new(ErrorKind::Config, m));
        if ![4096, 8192, 16384].contains(&c.page_size) {
            return bad(format!("page size {} is not 4096, 8192 or 16384", c.page_size));
        }
        if c.min_bytes > c.max_bytes {
            return bad(format!("capacity minimum {} exceeds maximum {}", c.min_bytes, c.max_bytes));
        }
        let zero = [("queue depth", c.queue_depth), ("writer threads", c.writer_threads), ("batch max", c.batch_max)];
        if let Some((name, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be at least 1"));
        }
        // Subscribe before the first lease: an event about a grant made during the build (a notice, a
        // revocation, a server lost) waits in the channel for the maintenance thread.
        let events = self.backend.events();
        let inner = Arc::new(Inner::new(self.cfg, self.backend));
        inner.top_up();
        if inner.arena.leased_bytes() < inner.cfg.min_bytes {
            let got = inner.arena.leased_bytes();
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("leased {got} of the {} bytes asked", inner.cfg.min_bytes),
            ));
        }
        let mut threads = Vec::new();
        let spawn = |name: String, f: fn(Arc<Inner>), inner: Arc<Inner>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(move || f(inner))
                .map_err(|e| Error::io("spawn tier thread", e))
        };
        for i in 0..inner.cfg.writer_threads {
            threads.push(spawn(format!("tier-writer-{i}"), writer::writer_loop, inner.clone())?);
        }
        threads.push(spawn("tier-prefetch".into(), prefetch::prefetch_loop, inner.clone())?);
        let maint = inner.clone();
        let handle = std::thread::Builder::new()
            .name("tier-maint".into())
            .spawn(move || elastic::maintenance_loop(maint, events))
            .map_err(|e| Error::io("spawn tier thread", e))?;
        threads.push(handle);
        let guard = Arc::new(Threads { inner: inner.clone(), handles: parking_lot::Mutex::new(threads) });
        Ok(PageTier { inner, _threads: guard })
    }
}

#[derive(Debug)]
struct Threads {
    inner: Arc<Inner>,
    handles: parking_lot::Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        self.inner.shutdown.store(true, std::sync::atomic::Ordering::Release);
        for h in self.handles.lock().drain(..) {
            let _ = h.join();
        }
    }
}

/// The far-memory page tier. Cheap to clone; usable from any number of threads.
#[derive(Clone, Debug)]
pub struct PageTier {
    inner: Arc<Inner>,
    _threads: Arc<Threads>,
}

impl PageTier {
    /// Start building a tier over `backend`.
    pub fn builder(backend: Arc<dyn FarBackend>) -> PageTierBuilder {
        let cfg = TierConfig {
            page_size: 8192,
            min_bytes: 0,
            max_bytes: 256 << 20,
            queue_depth: 1024,
            writer_threads: 2,
            batch_max: 32,
            write_linger: Duration::from_micros(200),
            admit_min_puts: 2,
            prefetch_window_max: 32,
            prefetch_queue_depth: 1024,
            prefetch_staged_max: 256,
            scan_detect: true,
            endpoints_idle_max: 64,
        };
        PageTierBuilder { cfg, backend }
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.inner.cfg.page_size
    }

    /// Offer a clean page (`page.len()` must be the page size) for write-behind.
    pub fn put(&self, page_id: u64, version: u64, page: &[u8]) -> PutStatus {
        self.inner.put(page_id, version, page)
    }

    /// [`put`](Self::put) several pages.
    pub fn put_many(&self, pages: &[(u64, u64, &[u8])]) -> Vec<PutStatus> {
        pages.iter().map(|&(p, v, d)| self.inner.put(p, v, d)).collect()
    }

    /// Copy page `page_id` at a version >= `min_version` into `buf` (one page long).
    pub fn get(&self, page_id: u64, min_version: u64, buf: &mut [u8]) -> Lookup {
        assert_eq!(buf.len(), self.page_size(), "get buffer must be one page");
        self.inner.lookup_many(&[(page_id, min_version)], buf, true)[0]
    }

    /// Look many `(page id, min version)` up in one batch per server; hit `i` lands in
    /// `out[i * page_size..(i + 1) * page_size]`.
    pub fn get_many(&self, reqs: &[(u64, u64)], out: &mut [u8]) -> Vec<Lookup> {
        self.inner.lookup_many(reqs, out, true)
    }

    /// Forget a page (it was modified, or dropped by the caller). Returns whether it was held.
    pub fn invalidate(&self, page_id: u64) -> bool {
        self.inner.invalidate(page_id)
    }

    /// Hint that these pages will be read soon: they are fetched into a staging buffer in the background.
    pub fn prefetch(&self, pages: &[u64]) {
        self.inner.prefetch.request(&self.inner, pages.iter().copied());
    }

    /// Counters so far.
    pub fn stats(&self) -> TierStats {
        self.inner.stats.snapshot()
    }

    /// Far bytes currently leased.
    pub fn leased_bytes(&self) -> u64 {
        self.inner.arena.leased_bytes()
    }

    /// Slot states over live slabs (scans every slot: for tests and diagnostics).
    pub fn census(&self) -> SlotCensus {
        self.inner.arena.census()
    }

    /// Pages in the local page table, and how many of them are published.
    pub fn table_len(&self) -> (usize, usize) {
        (self.inner.table.len(), self.inner.table.published())
    }

    /// Wait until every queued put reached an outcome, at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.stats().puts_pending() > 0 {
            if Instant::now() >= deadline {
                let n = self.stats().puts_pending();
                return Err(Error::new(ErrorKind::Timeout, format!("{n} puts still pending")));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}
