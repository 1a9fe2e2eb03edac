use std::sync::Arc;

use farpool::tier::PageTier;
use farpool::tier::mem::MemBackend;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;

const PS: usize = 4096;

fn temp_file(name: &str, pages: u64) -> (std::path::PathBuf, DataFile) {
    let dir = std::env::temp_dir().join(format!("farpool-bufmgr-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("data");
    let f = DataFile::create(&path, pages, PS).unwrap();
    (dir, f)
}

/// The expected contents: every page's body holds its update count in bytes 0..8 of the body.
fn run(bm: &BufferManager, seed: u64, ops: usize, counts: &[AtomicU64]) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for _ in 0..ops {
        let page = rng.random_range(0..bm.pages());
        let p = bm.pin(page).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        if rng.random_bool(0.2) {
            p.update(|body| {
                let n = u64::from_le_bytes(body[..8].try_into().unwrap()) + 1;
                body[..8].copy_from_slice(&n.to_le_bytes());
                counts[page as usize].fetch_add(1, Ordering::AcqRel);
            });
        } else {
            let g = p.read();
            assert_eq!(page_id_of(g.as_slice()), page, "seed {seed}: wrong page in frame");
        }
    }
}

fn check(bm: &BufferManager, counts: &[AtomicU64]) {
    for page in 0..bm.pages() {
        let p = bm.pin(page).unwrap();
        let g = p.read();
        let body = &g.as_slice()[PAGE_HEADER_LEN..];
        let n = u64::from_le_bytes(body[..8].try_into().unwrap());
        assert_eq!(n, counts[page as usize].load(Ordering::Acquire), "page {page}: lost update");
        assert_eq!(page_lsn(g.as_slice()), n, "page {page}: LSN counts updates");
    }
}

#[test]
fn updates_survive_eviction_and_reach_the_file() {
    let (dir, f) = temp_file("disk", 256);
    let bm = BufferManager::new(f, 16, None).unwrap();
    let counts: Vec<AtomicU64> = (0..256).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (bm, counts) = (&bm, &counts);
            s.spawn(move || run(bm, t, 2000, counts));
        }
    });
    check(&bm, &counts);
    let st = bm.stats();
    assert!(st.disk_writes > 0 && st.disk_reads > 256, "{st:?}");
    bm.flush_all().unwrap();
    drop(bm);
    // Reopen: the file alone holds every update.
    let f = DataFile::open(&dir.join("data"), PS).unwrap();
    let bm = BufferManager::new(f, 8, None).unwrap();
    for (page, c) in counts.iter().enumerate() {
        let p = bm.pin(page as u64).unwrap();
        let n = u64::from_le_bytes(p.read().as_slice()[PAGE_HEADER_LEN..PAGE_HEADER_LEN + 8].try_into().unwrap());
        assert_eq!(n, c.load(Ordering::Acquire));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn far_tier_serves_misses_and_never_an_old_version() {
    let (dir, f) = temp_file("far", 256);
    let backend = Arc::new(MemBackend::new(1, 4, 1 << 20));
    let tier = PageTier::builder(backend).with_page_size(PS).with_capacity_bytes(0, 4 << 20).build().unwrap();
    let bm = BufferManager::new(f, 16, Some(tier)).unwrap();
    let counts: Vec<AtomicU64> = (0..256).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (bm, counts) = (&bm, &counts);
            s.spawn(move || run(bm, 100 + t, 3000, counts));
        }
    });
    check(&bm, &counts);
    let st = bm.stats();
    assert!(st.far_hits > 500, "misses must be served by the far tier: {st:?}");
    assert!(st.far_puts > 0);
    let ts = bm.tier().unwrap().stats();
    ts.assert_consistent();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn scan_hint_prefetches_from_the_far_tier() {
    let (dir, f) = temp_file("scan", 64);
    let backend = Arc::new(MemBackend::new(1, 4, 1 << 20));
    // No scan detector: only the explicit hint may prefetch.
    let tier = PageTier::builder(backend)
        .with_page_size(PS)
        .with_capacity_bytes(0, 4 << 20)
        .with_scan_detect(false)
        .build()
        .unwrap();
    let bm = BufferManager::new(f, 4, Some(tier)).unwrap();
    for page in 0..64 {
        drop(bm.pin(page).unwrap()); // each page passes through the frames and is put into the tier
    }
    let tier = bm.tier().unwrap();
    tier.flush(std::time::Duration::from_secs(10)).unwrap();
    assert_eq!(tier.stats().prefetch_requested, 0);
    assert_eq!(bm.scan_hint(&[]), 0);
    // 10..30 are in the tier only, 62 is in a frame, 1000 is beyond the file: 20 pages are hinted.
    let scan: Vec<u64> = (10..30).chain([62, 1000]).collect();
    assert_eq!(bm.scan_hint(&scan), 20);
    assert_eq!(bm.stats().scan_hinted, 20);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tier.stats().prefetch_loaded < 20 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(tier.stats().prefetch_requested, 20);
    for page in 10..30 {
        let p = bm.pin(page).unwrap();
        assert_eq!(p.source(), Source::Far, "page {page}");
        assert_eq!(page_id_of(p.read().as_slice()), page);
    }
    assert_eq!(tier.stats().hits_prefetched, 20, "every scanned page came from the staging buffer");
    // Not hinted: a far round trip, not a prefetched copy.
    assert_eq!(bm.pin(40).unwrap().source(), Source::Far);
    let ts = tier.stats();
    assert_eq!((ts.hits_prefetched, ts.prefetch_requested), (20, 20), "{ts:?}");
    ts.assert_consistent();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn all_pinned_is_an_error_and_bad_pages_are_refused() {
    let (dir, f) = temp_file("pins", 8);
    println!("O_DIRECT: {}", f.is_direct());
    let bm = BufferManager::new(f, 2, None).unwrap();
    let a = bm.pin(0).unwrap();
    let b = bm.pin(1).unwrap();
    assert!(matches!(bm.pin(2), Err(Error::NoFrame(2))));
    assert_eq!(bm.pin(0).unwrap().source(), Source::Frame);
    drop((a, b));
    assert_eq!(bm.pin(2).unwrap().source(), Source::Disk);
    assert!(matches!(bm.pin(8), Err(Error::OutOfRange(8, 8))));
    std::fs::remove_dir_all(dir).unwrap();
}
