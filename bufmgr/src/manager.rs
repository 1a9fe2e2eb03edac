//! `BufferManager`: fixed frames, CLOCK replacement, pin/unpin, write-back before eviction, and the far
//! tier between the frames and the disk.
//!
//! Locking: the frame table (`map`, page -> frame) is one mutex, held only to find or claim a frame and
//! never across I/O. A frame's bytes are behind its own `RwLock`; the thread that claims a frame for a
//! new page takes its write lock *before* releasing the table lock (possible because an unpinned frame
//! has no guard outstanding), so no other thread can read the frame before it is loaded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use farpool::tier::{Lookup, PageTier};
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::aligned::AlignedBuf;
use crate::file::DataFile;
use crate::{Error, PAGE_HEADER_LEN, Result};

const EMPTY: u64 = u64::MAX;
/// Retries of a disk read that found an LSN older than the newest (its write-back is in flight).
const STALE_RETRIES: usize = 2000;
const STALE_BACKOFF: Duration = Duration::from_micros(50);

#[derive(Debug)]
struct Frame {
    data: RwLock<AlignedBuf>,
    page: AtomicU64,
    pins: AtomicU32,
    dirty: AtomicBool,
    referenced: AtomicBool,
}

/// Where a pinned page came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// It was in a frame.
    Frame,
    /// Loaded from the far tier.
    Far,
    /// Loaded from the data file.
    Disk,
}

/// Counters of the buffer manager.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BufferStats {
    /// Pins served from a frame.
    pub frame_hits: u64,
    /// Misses served by the far tier.
    pub far_hits: u64,
    /// Misses served by the disk.
    pub disk_reads: u64,
    /// Dirty pages written to the disk.
    pub disk_writes: u64,
    /// Clean pages offered to the far tier on eviction.
    pub far_puts: u64,
    /// Disk reads retried because a write-back of the page was in flight.
    pub stale_retries: u64,
    /// Pages handed to the far tier's prefetch by [`BufferManager::scan_hint`].
    pub scan_hinted: u64,
}

#[derive(Debug, Default)]
struct Counters {
    frame_hits: AtomicU64,
    far_hits: AtomicU64,
    disk_reads: AtomicU64,
    disk_writes: AtomicU64,
    far_puts: AtomicU64,
    stale_retries: AtomicU64,
    scan_hinted: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The LSN in a page's header.
pub(crate) fn page_lsn(page: &[u8]) -> u64 {
    u64::from_le_bytes(page[..8].try_into().expect("page header"))
}

fn page_id_of(page: &[u8]) -> u64 {
    u64::from_le_bytes(page[8..16].try_into().expect("page header"))
}

/// See the module docs.
#[derive(Debug)]
pub struct BufferManager {
    frames: Box<[Frame]>,
    map: Mutex<(HashMap<u64, usize>, usize)>,
    file: DataFile,
    tier: Option<PageTier>,
    newest: Box<[AtomicU64]>,
    stats: Counters,
}

/// A pinned page: its frame cannot be reused until this is dropped.
#[derive(Debug)]
pub struct PinnedPage<'a> {
    bm: &'a BufferManager,
    frame: usize,
    page: u64,
    source: Source,
}

impl BufferManager {
    /// A manager of `frames` frames over `file`, with an optional far tier (its page size must match).
    pub fn new(file: DataFile, frames: usize, tier: Option<PageTier>) -> Result<Self> {
        let ps = file.page_size();
        if frames == 0 {
            return Err(Error::Config("at least one frame is needed".into()));
        }
        if let Some(t) = &tier
            && t.page_size() != ps
        {
            return Err(Error::Config(format!("tier page size {} != file page size {ps}", t.page_size())));
        }
        let frames = (0..frames)
            .map(|_| Frame {
                data: RwLock::new(AlignedBuf::new(ps)),
                page: AtomicU64::new(EMPTY),
                pins: AtomicU32::new(0),
                dirty: AtomicBool::new(false),
                referenced: AtomicBool::new(false),
            })
            .collect();
        let newest = (0..file.pages()).map(|_| AtomicU64::new(0)).collect();
        Ok(Self { frames, map: Mutex::new((HashMap::new(), 0)), file, tier, newest, stats: Counters::default() })
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> usize {
        self.file.page_size()
    }

    /// Pages in the data file.
    pub fn pages(&self) -> u64 {
        self.file.pages()
    }

    /// The data file.
    pub fn file(&self) -> &DataFile {
        &self.file
    }

    /// The far tier, if any.
    pub fn tier(&self) -> Option<&PageTier> {
        self.tier.as_ref()
    }

    /// Counters so far.
    pub fn stats(&self) -> BufferStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        BufferStats {
            frame_hits: l(&s.frame_hits),
            far_hits: l(&s.far_hits),
            disk_reads: l(&s.disk_reads),
            disk_writes: l(&s.disk_writes),
            far_puts: l(&s.far_puts),
            stale_retries: l(&s.stale_retries),
            scan_hinted: l(&s.scan_hinted),
        }
    }

    /// Declare a range scan (or any set of pages about to be pinned): the pages not in a frame are handed
    /// to the far tier's [`PageTier::prefetch`], which fetches them into its staging buffer in the
    /// background, so their pins are served without waiting for a far round trip. Pages beyond the file
    /// are ignored. Returns how many pages were hinted (0 without a far tier). The hint never changes
    /// what a pin returns: a staged copy is used only if it is still the tier's current version and at
    /// least the page's newest LSN.
    pub fn scan_hint(&self, pages: &[u64]) -> usize {
        let Some(t) = &self.tier else { return 0 };
        let want: Vec<u64> = {
            let map = self.map.lock();
            pages.iter().copied().filter(|&p| p < self.pages() && !map.0.contains_key(&p)).collect()
        };
        if !want.is_empty() {
            t.prefetch(&want);
            self.stats.scan_hinted.fetch_add(want.len() as u64, Ordering::Relaxed);
        }
        want.len()
    }

    /// Pin `page`, loading it (far tier first, then disk) if it is not in a frame.
    pub fn pin(&self, page: u64) -> Result<PinnedPage<'_>> {
        if page >= self.pages() {
            return Err(Error::OutOfRange(page, self.pages()));
        }
        let mut map = self.map.lock();
        if let Some(&i) = map.0.get(&page) {
            self.frames[i].pins.fetch_add(1, Ordering::AcqRel);
            self.frames[i].referenced.store(true, Ordering::Relaxed);
            drop(map);
            bump(&self.stats.frame_hits);
            return Ok(PinnedPage { bm: self, frame: i, page, source: Source::Frame });
        }
        let i = self.victim(&mut map.1)?;
        let f = &self.frames[i];
        let old = f.page.swap(page, Ordering::AcqRel);
        if old != EMPTY {
            map.0.remove(&old);
        }
        map.0.insert(page, i);
        f.pins.store(1, Ordering::Release);
        f.referenced.store(true, Ordering::Relaxed);
        let mut guard = f.data.try_write().expect("an unpinned frame has no guard outstanding");
        drop(map);
        let loaded = self.evict_old(f, old, &guard).and_then(|_| self.load(page, &mut guard));
        match loaded {
            Ok(source) => {
                f.dirty.store(false, Ordering::Release);
                Ok(PinnedPage { bm: self, frame: i, page, source })
            }
            Err(e) => {
                drop(guard);
                let mut map = self.map.lock();
                map.0.remove(&page);
                f.page.store(EMPTY, Ordering::Release);
                f.pins.store(0, Ordering::Release);
                Err(e)
            }
        }
    }

    /// CLOCK over unpinned frames (under the table lock), at most two sweeps.
    fn victim(&self, hand: &mut usize) -> Result<usize> {
        let n = self.frames.len();
        for _ in 0..2 * n + 1 {
            let i = *hand;
            *hand = (i + 1) % n;
            let f = &self.frames[i];
            if f.pins.load(Ordering::Acquire) != 0 {
                continue;
            }
            if f.referenced.swap(false, Ordering::AcqRel) {
                continue;
            }
            return Ok(i);
        }
        Err(Error::NoFrame(n))
    }

    /// Write the old page back if dirty; offer it to the far tier (it is clean after that).
    fn evict_old(&self, f: &Frame, old: u64, data: &AlignedBuf) -> Result<()> {
        if old == EMPTY {
            return Ok(());
        }
        if f.dirty.load(Ordering::Acquire) {
            self.file.write_page(old, data.as_slice())?;
            bump(&self.stats.disk_writes);
        }
        if let Some(t) = &self.tier {
            t.put(old, page_lsn(data.as_slice()), data.as_slice());
            bump(&self.stats.far_puts);
        }
        Ok(())
    }

    fn load(&self, page: u64, buf: &mut AlignedBuf) -> Result<Source> {
        let newest = self.newest[page as usize].load(Ordering::Acquire);
        for _ in 0..STALE_RETRIES {
            if let Some(t) = &self.tier
                && let Lookup::Hit { .. } = t.get(page, newest, buf.as_mut_slice())
            {
                bump(&self.stats.far_hits);
                return self.checked(page, newest, buf, Source::Far);
            }
            self.file.read_page(page, buf.as_mut_slice())?;
            bump(&self.stats.disk_reads);
            if page_lsn(buf.as_slice()) >= newest {
                return self.checked(page, newest, buf, Source::Disk);
            }
            bump(&self.stats.stale_retries);
            std::thread::sleep(STALE_BACKOFF);
        }
        Err(Error::Corrupt { page, what: format!("disk still older than LSN {newest} after {STALE_RETRIES} retries") })
    }

    fn checked(&self, page: u64, newest: u64, buf: &AlignedBuf, source: Source) -> Result<Source> {
        let (lsn, id) = (page_lsn(buf.as_slice()), page_id_of(buf.as_slice()));
        if id != page || lsn < newest {
            return Err(Error::Corrupt {
                page,
                what: format!("{source:?} gave page {id} LSN {lsn}, want LSN >= {newest}"),
            });
        }
        Ok(source)
    }

    /// Give the data file back (call [`flush_all`](Self::flush_all) first to keep dirty pages).
    pub fn into_file(self) -> DataFile {
        self.file
    }

    /// Write every dirty page to the file (frames stay resident).
    pub fn flush_all(&self) -> Result<()> {
        for f in self.frames.iter() {
            let g = f.data.read();
            let page = f.page.load(Ordering::Acquire);
            if page != EMPTY && f.dirty.swap(false, Ordering::AcqRel) {
                self.file.write_page(page, g.as_slice())?;
                bump(&self.stats.disk_writes);
            }
        }
        Ok(())
    }
}

impl PinnedPage<'_> {
    /// The page id.
    pub fn page_id(&self) -> u64 {
        self.page
    }

    /// Where the page came from when it was pinned.
    pub fn source(&self) -> Source {
        self.source
    }

    /// Shared access to the page bytes (header included).
    pub fn read(&self) -> RwLockReadGuard<'_, AlignedBuf> {
        self.bm.frames[self.frame].data.read()
    }

    /// Modify the page: `f` gets the bytes after the header; the LSN is bumped and the page is dirty.
    /// Returns the new LSN.
    pub fn update(&self, f: impl FnOnce(&mut [u8])) -> u64 {
        let fr = &self.bm.frames[self.frame];
        let mut g: RwLockWriteGuard<'_, AlignedBuf> = fr.data.write();
        let lsn = page_lsn(g.as_slice()) + 1;
        let bytes = g.as_mut_slice();
        bytes[..8].copy_from_slice(&lsn.to_le_bytes());
        f(&mut bytes[PAGE_HEADER_LEN..]);
        self.bm.newest[self.page as usize].fetch_max(lsn, Ordering::AcqRel);
        if !fr.dirty.swap(true, Ordering::AcqRel)
            && let Some(t) = &self.bm.tier
        {
            t.invalidate(self.page);
        }
        lsn
    }
}

impl Drop for PinnedPage<'_> {
    fn drop(&mut self) {
        let prev = self.bm.frames[self.frame].pins.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev > 0, "unpin of an unpinned frame");
    }
}

#[cfg(test)]
mod tests;
