//! Tests of the page tier against the in-memory backend: unit behaviour here, the model-based
//! concurrency test in [`model`], fault injection in [`faults`], backend events in [`events`].

mod events;
mod faults;
mod model;

use std::sync::Arc;
use std::time::Duration;

use super::mem::MemBackend;
use super::{Lookup, MissReason, PageTier, PutStatus};

pub(super) const PS: usize = 4096;
pub(super) const FLUSH: Duration = Duration::from_secs(10);

/// The bytes of `page` at `version`: any mix-up of pages or versions, or a torn copy, changes them.
pub(super) fn content(page: u64, version: u64) -> Vec<u8> {
    super::page_content(page, version, PS)
}

pub(super) fn tier(b: &Arc<MemBackend>, max_bytes: u64) -> PageTier {
    PageTier::builder(b.clone()).with_page_size(PS).with_capacity_bytes(0, max_bytes).build().unwrap()
}

/// Every live slot is accounted for and the table agrees with the slot words (call when quiet).
pub(super) fn assert_no_leak(t: &PageTier, ctx: &str) {
    let c = t.census();
    assert_eq!(c.writing, 0, "{ctx}: writes still in flight: {c:?}");
    assert_eq!(c.cancelled, 0, "{ctx}: cancelled slots not freed: {c:?}");
    assert_eq!(c.free + c.published, c.slots, "{ctx}: slots lost: {c:?}");
    assert_eq!(c.on_free_lists, c.free, "{ctx}: free list disagrees with slot words: {c:?}");
    let (entries, published) = t.table_len();
    assert_eq!(published, c.published, "{ctx}: table and slots disagree ({entries} entries): {c:?}");
    let s = t.stats();
    s.assert_consistent();
    assert_eq!(s.puts_pending(), 0, "{ctx}: {s:?}");
}

#[test]
fn put_get_versions_and_invalidate() {
    let b = Arc::new(MemBackend::new(2, 4, 1 << 20));
    let t = tier(&b, 4 << 20);
    let mut buf = vec![0; PS];
    assert_eq!(t.get(1, 0, &mut buf), Lookup::Miss(MissReason::Absent));
    assert_eq!(t.put(1, 5, &content(1, 5)), PutStatus::Queued);
    t.flush(FLUSH).unwrap();
    assert_eq!(t.get(1, 5, &mut buf), Lookup::Hit { version: 5 });
    assert_eq!(buf, content(1, 5));
    assert_eq!(t.get(1, 3, &mut buf), Lookup::Hit { version: 5 }, "a newer version satisfies an older minimum");
    assert_eq!(t.get(1, 6, &mut buf), Lookup::Miss(MissReason::Stale));
    assert_eq!(t.put(1, 4, &content(1, 4)), PutStatus::Unchanged, "older versions never replace newer ones");
    assert_eq!(t.put(1, 5, &content(1, 5)), PutStatus::Unchanged);
    assert_eq!(t.put(1, 7, &content(1, 7)), PutStatus::Queued);
    t.flush(FLUSH).unwrap();
    assert_eq!(t.get(1, 6, &mut buf), Lookup::Hit { version: 7 });
    assert_eq!(buf, content(1, 7));
    assert!(t.invalidate(1));
    assert!(!t.invalidate(1));
    assert_eq!(t.get(1, 0, &mut buf), Lookup::Miss(MissReason::Absent));
    assert_no_leak(&t, "basic");
    let s = t.stats();
    assert_eq!((s.gets, s.hits_far, s.miss_absent, s.miss_stale), (6, 3, 2, 1));
    assert_eq!((s.puts, s.puts_published, s.puts_unchanged), (4, 2, 2));
}

#[test]
fn get_many_spans_servers_and_bad_config_is_refused() {
    let b = Arc::new(MemBackend::new(3, 4, 256 << 10));
    let t = tier(&b, 3 << 20);
    for p in 0..100 {
        t.put(p, 1, &content(p, 1));
    }
    t.flush(FLUSH).unwrap();
    let reqs: Vec<(u64, u64)> = (0..104).map(|p| (p, 1)).collect();
    let mut out = vec![0; reqs.len() * PS];
    let res = t.get_many(&reqs, &mut out);
    for (p, r) in res.iter().enumerate() {
        if p < 100 {
            assert_eq!(*r, Lookup::Hit { version: 1 }, "page {p}");
            assert_eq!(&out[p * PS..(p + 1) * PS], &content(p as u64, 1)[..]);
        } else {
            assert_eq!(*r, Lookup::Miss(MissReason::Absent));
        }
    }
    assert!(t.leased_bytes() > 256 << 10, "pages spread over several slabs");
    assert_no_leak(&t, "get_many");
    let bad = PageTier::builder(b.clone()).with_page_size(5000).build();
    assert_eq!(bad.unwrap_err().kind(), farpool_core::ErrorKind::Config);
    let bad = PageTier::builder(b.clone()).with_capacity_bytes(10, 5).build();
    assert_eq!(bad.unwrap_err().kind(), farpool_core::ErrorKind::Config);
}

#[test]
fn corrupted_slot_is_a_checksum_miss_never_data() {
    let b = Arc::new(MemBackend::new(1, 1, 1 << 20));
    let t = tier(&b, 1 << 20);
    t.put(9, 2, &content(9, 2));
    t.flush(FLUSH).unwrap();
    let server = b.server_ids()[0];
    // The only page sits in some slot of slab 0: corrupt a payload byte of every slot.
    for slot in 0..(1 << 20) / super::layout::slot_size(PS) {
        b.corrupt(server, farpool_core::SlabId(0), slot * super::layout::slot_size(PS) + 100);
    }
    let mut buf = vec![7; PS];
    assert_eq!(t.get(9, 2, &mut buf), Lookup::Miss(MissReason::Checksum));
    assert_eq!(buf, vec![7; PS], "nothing copied on a miss");
    assert_eq!(t.get(9, 2, &mut buf), Lookup::Miss(MissReason::Absent), "a bad slot is dropped");
    assert_no_leak(&t, "checksum");
}

#[test]
fn full_tier_evicts_and_keeps_one_hit_wonders_out() {
    let b = Arc::new(MemBackend::new(1, 1, 64 * super::layout::slot_size(PS) as u64));
    let t = tier(&b, 1 << 20);
    // Hot pages, put twice each: admitted and kept warm by gets.
    for round in 0..2 {
        for p in 0..32 {
            t.put(p, 1, &content(p, 1));
        }
        t.flush(FLUSH).unwrap();
        let _ = round;
    }
    let mut buf = vec![0; PS];
    // A scan of one-hit wonders, far more than the capacity.
    for p in 1000..1400 {
        t.put(p, 1, &content(p, 1));
        if p % 16 == 0 {
            t.flush(FLUSH).unwrap();
            for h in 0..32 {
                t.get(h, 1, &mut buf);
            }
        }
    }
    t.flush(FLUSH).unwrap();
    let s = t.stats();
    assert!(s.puts_rejected > 200, "one-hit wonders must be refused once full: {s:?}");
    let hot_hits = (0..32).filter(|&p| t.get(p, 1, &mut buf).is_hit()).count();
    assert!(hot_hits >= 28, "the scan must not flush the hot set: {hot_hits}/32 hits, {s:?}");
    assert_eq!(t.leased_bytes(), 64 * super::layout::slot_size(PS) as u64);
    assert_no_leak(&t, "eviction");
}

#[test]
fn queued_pages_are_served_and_grows_up_to_max_only() {
    let slab = 16 * super::layout::slot_size(PS) as u64;
    let b = Arc::new(MemBackend::new(2, 8, slab));
    let t = PageTier::builder(b.clone())
        .with_page_size(PS)
        .with_capacity_bytes(slab, 3 * slab)
        .with_admit_min_puts(1)
        .build()
        .unwrap();
    assert_eq!(t.leased_bytes(), slab, "leases the minimum at build");
    let mut buf = vec![0; PS];
    for p in 0..200 {
        t.put(p, 3, &content(p, 3));
        if let Lookup::Hit { version } = t.get(p, 3, &mut buf) {
            assert_eq!(version, 3);
            assert_eq!(buf, content(p, 3));
        }
    }
    t.flush(FLUSH).unwrap();
    assert_eq!(t.leased_bytes(), 3 * slab, "grew to the maximum, not beyond");
    assert!(t.stats().evictions > 0);
    assert!(t.stats().hits_queued + t.stats().hits_far > 0);
    assert_no_leak(&t, "growth");
}

#[test]
fn puts_wait_for_a_lease_in_flight_instead_of_evicting_or_dropping() {
    // Leases are slow and four writers race for slots in an empty tier: the writer that finds no free
    // slot while another's lease is in flight waits for it, rather than evicting a page just written or
    // dropping its put because growth was busy.
    let slab = 16 * super::layout::slot_size(PS) as u64;
    let b = Arc::new(MemBackend::new(2, 8, slab));
    b.set_lease_delay(Duration::from_millis(30));
    let t = PageTier::builder(b.clone())
        .with_page_size(PS)
        .with_capacity_bytes(0, 8 * slab)
        .with_writer_threads(4)
        .with_batch_max(4)
        .with_write_linger(Duration::ZERO)
        .build()
        .unwrap();
    for p in 0..100 {
        assert_eq!(t.put(p, 1, &content(p, 1)), PutStatus::Queued);
    }
    t.flush(FLUSH).unwrap();
    let s = t.stats();
    assert_eq!((s.evictions, s.puts_dropped, s.puts_published), (0, 0, 100), "{s:?}");
    let mut buf = vec![0; PS];
    for p in 0..100 {
        assert_eq!(t.get(p, 1, &mut buf), Lookup::Hit { version: 1 }, "page {p}");
        assert_eq!(buf, content(p, 1));
    }
    assert_no_leak(&t, "slow leases");
}

#[test]
fn prefetch_explicit_and_scan_detected() {
    let b = Arc::new(MemBackend::new(1, 4, 1 << 20));
    let t = tier(&b, 4 << 20);
    for p in 0..200 {
        t.put(p, 1, &content(p, 1));
    }
    t.flush(FLUSH).unwrap();
    t.prefetch(&[150, 151, 152]);
    let mut buf = vec![0; PS];
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while t.stats().prefetch_loaded < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    for p in 150..153 {
        assert_eq!(t.get(p, 1, &mut buf), Lookup::Hit { version: 1 });
        assert_eq!(buf, content(p, 1));
    }
    assert_eq!(t.stats().hits_prefetched, 3);
    // A staged page that was replaced since is not served from staging.
    t.prefetch(&[160]);
    while t.stats().prefetch_loaded < 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    t.put(160, 2, &content(160, 2));
    assert_eq!(t.get(160, 1, &mut buf), Lookup::Hit { version: 2 });
    assert_eq!(buf, content(160, 2));
    for p in 0..100 {
        assert!(t.get(p, 1, &mut buf).is_hit());
        assert_eq!(buf, content(p, 1));
        std::thread::sleep(Duration::from_micros(200));
    }
    let s = t.stats();
    assert!(s.scans_detected > 0, "{s:?}");
    assert!(s.hits_prefetched > 3, "a scan should hit prefetched pages: {s:?}");
    t.flush(FLUSH).unwrap();
    assert_no_leak(&t, "prefetch");
}

#[test]
fn async_form_works_from_tokio() {
    let b = Arc::new(MemBackend::new(1, 2, 1 << 20));
    let t = super::AsyncPageTier::new(tier(&b, 2 << 20));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    rt.block_on(async {
        assert_eq!(t.put(3, 1, content(3, 1).into()).await.unwrap(), PutStatus::Queued);
        t.flush(FLUSH).await.unwrap();
        let (r, page) = t.get(3, 1).await.unwrap();
        assert_eq!(r, Lookup::Hit { version: 1 });
        assert_eq!(page, content(3, 1));
        let (rs, _) = t.get_many(vec![(3, 2), (4, 0)]).await.unwrap();
        assert_eq!(rs, vec![Lookup::Miss(MissReason::Stale), Lookup::Miss(MissReason::Absent)]);
        assert!(t.invalidate(3).await.unwrap());
    });
    assert_eq!(t.stats().gets, 3);
}

#[test]
fn a_full_put_queue_drops_puts_cleanly() {
    // Writes take 20 ms each and the queue holds one put: a burst of puts overflows it at once.
    let b = Arc::new(MemBackend::new(1, 4, 1 << 20));
    let slow =
        farpool_core::fault::FaultConfig { delay_prob: 1.0, delay: Duration::from_millis(20), ..Default::default() };
    b.set_faults(Some(slow), 7);
    let t = PageTier::builder(b.clone())
        .with_page_size(PS)
        .with_capacity_bytes(0, 4 << 20)
        .with_queue_depth(1)
        .with_writer_threads(1)
        .build()
        .unwrap();
    let statuses: Vec<PutStatus> = (0..50).map(|p| t.put(p, 1, &content(p, 1))).collect();
    let dropped: Vec<u64> = (0..50).filter(|&p| statuses[p as usize] == PutStatus::Dropped).collect();
    assert!(!dropped.is_empty(), "a one-deep queue behind 20 ms writes must overflow: {statuses:?}");
    assert!(statuses.contains(&PutStatus::Queued), "the first put is queued");
    t.flush(FLUSH).unwrap();
    let mut buf = vec![0; PS];
    for &p in &dropped {
        assert_eq!(t.get(p, 1, &mut buf), Lookup::Miss(MissReason::Absent), "a dropped put leaves nothing behind");
    }
    assert_eq!(t.stats().puts_dropped, dropped.len() as u64);
    assert_no_leak(&t, "full queue");
}
