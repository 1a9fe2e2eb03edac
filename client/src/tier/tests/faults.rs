//! Fault injection (seeded; a failure prints its seed): reordered completions with the last of a batch
//! first, writes failing mid-batch (before and after execution), dropped operations, a revoke with a
//! short grace, a server killed. Each checks: no wrong data, no slot leaked, counters add up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use farpool_core::fault::FaultConfig;

use super::super::mem::MemBackend;
use super::super::{Lookup, MissReason, PageTier};
use super::model::{ModelRun, run, seeds, with_seed};
use super::{FLUSH, PS, assert_no_leak, content};

#[test]
fn last_of_batch_completes_first() {
    for seed in seeds(2) {
        let opts = ModelRun { reverse: true, threads: 3, ops: 2000, ..Default::default() };
        with_seed("reverse completions", seed, || run(seed, &opts));
        let faults = FaultConfig { reorder: true, ..Default::default() };
        let opts = ModelRun { faults: Some(faults), reverse: true, threads: 3, ops: 2000 };
        with_seed("shuffled completions", seed, || run(seed, &opts));
    }
}

#[test]
fn writes_failing_mid_batch_leak_nothing() {
    for seed in seeds(3) {
        let faults = FaultConfig { error: 0.15, error_after: 0.15, reorder: true, ..Default::default() };
        let opts = ModelRun { faults: Some(faults), reverse: seed % 2 == 0, threads: 4, ops: 2500 };
        let s = with_seed("failing writes", seed, || run(seed, &opts));
        assert!(s.puts_failed > 0, "seed {seed}: faults must have hit some writes: {s:?}");
        assert!(s.miss_server_down > 0, "seed {seed}: failed reads are misses: {s:?}");
    }
}

#[test]
fn dropped_and_delayed_ops_time_out_cleanly() {
    for seed in seeds(2) {
        let faults = FaultConfig {
            drop: 0.03,
            delay_prob: 0.1,
            delay: Duration::from_millis(3),
            reorder: true,
            ..Default::default()
        };
        let opts = ModelRun { faults: Some(faults), reverse: false, threads: 3, ops: 800 };
        with_seed("dropped ops", seed, || run(seed, &opts));
    }
}

fn filled(servers: usize, pages: u64) -> (Arc<MemBackend>, PageTier) {
    let slab = 64 * super::super::layout::slot_size(PS) as u64;
    let b = Arc::new(MemBackend::new(servers, 4, slab));
    let t = PageTier::builder(b.clone())
        .with_page_size(PS)
        .with_capacity_bytes(2 * slab * servers as u64, 2 * slab * servers as u64)
        .build()
        .unwrap();
    for p in 0..pages {
        t.put(p, 1, &content(p, 1));
    }
    t.flush(FLUSH).unwrap();
    (b, t)
}

/// A reader thread that checks every hit until stopped; returns (hits, misses).
fn reader(
    t: PageTier,
    pages: u64,
    stop: Arc<AtomicBool>,
    wrong: Arc<AtomicU64>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let mut buf = vec![0; PS];
        let (mut h, mut m) = (0, 0);
        let mut p = 0;
        while !stop.load(Ordering::Acquire) {
            p = (p * 7 + 3) % pages;
            match t.get(p, 1, &mut buf) {
                Lookup::Hit { version } => {
                    h += 1;
                    if buf != content(p, version) {
                        wrong.fetch_add(1, Ordering::AcqRel);
                    }
                }
                Lookup::Miss(_) => m += 1,
            }
        }
        (h, m)
    })
}

#[test]
fn revoke_with_short_grace_moves_hot_pages_and_keeps_serving() {
    with_seed("revoke", 0, || {
        let (b, t) = filled(2, 160);
        let mut buf = vec![0; PS];
        for _ in 0..4 {
            for p in 0..20 {
                assert!(t.get(p, 1, &mut buf).is_hit());
                t.put(p, 1, &content(p, 1)); // raises the frequency estimate, as a re-evicting buffer pool does
            }
        }
        let (stop, wrong) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let r = reader(t.clone(), 160, stop.clone(), wrong.clone());
        let victim = b.server_ids()[0];
        let slabs = b.notice(victim, Duration::from_millis(300));
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.stats().slabs_lost < slabs.len() as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        b.revoke(victim, &slabs);
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Release);
        let (hits, _) = r.join().unwrap();
        assert_eq!(wrong.load(Ordering::Acquire), 0, "wrong data served during the revoke");
        assert!(hits > 0);
        let s = t.stats();
        assert_eq!(s.slabs_lost, slabs.len() as u64, "{s:?}");
        assert!(s.pages_migrated >= 10, "hot pages must move: {s:?}");
        let hot = (0..20).filter(|&p| t.get(p, 1, &mut buf).is_hit()).count();
        assert!(hot >= 18, "the hot pages survive the revoke: {hot}/20, {s:?}");
        for p in 0..160 {
            if let Lookup::Hit { version } = t.get(p, 1, &mut buf) {
                assert_eq!(buf, content(p, version));
            }
        }
        assert!(b.granted(victim).is_empty(), "the drained slabs are given back");
        assert_no_leak(&t, "revoke");
    });
}

#[test]
fn killed_server_pages_become_misses() {
    for announce in [false, true] {
        with_seed("kill", u64::from(announce), || {
            let (b, t) = filled(2, 100);
            let victim = b.server_ids()[0];
            b.kill(victim, announce);
            if announce {
                let deadline = Instant::now() + Duration::from_secs(5);
                while t.stats().slabs_lost == 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            let mut buf = vec![0; PS];
            let mut hits = 0;
            for p in 0..100 {
                match t.get(p, 1, &mut buf) {
                    Lookup::Hit { version } => {
                        assert_eq!(buf, content(p, version));
                        hits += 1;
                    }
                    Lookup::Miss(r) => assert!(matches!(r, MissReason::ServerDown | MissReason::Absent), "{r:?}"),
                }
            }
            let s = t.stats();
            if announce {
                assert!(s.pages_dropped > 0, "announced: its pages are purged: {s:?}");
            } else {
                assert!(s.miss_server_down > 0, "found by failed reads: {s:?}");
            }
            assert!(hits > 20, "pages on the live server still hit: {hits}");
            // The tier keeps working on the live server.
            for p in 200..260 {
                t.put(p, 1, &content(p, 1));
            }
            t.flush(FLUSH).unwrap();
            assert!(t.stats().puts_published > 100, "{:?}", t.stats());
            std::thread::sleep(Duration::from_millis(120)); // let the maintenance thread purge
            assert_no_leak(&t, "kill");
        });
    }
}

#[test]
fn purged_pages_miss_with_their_reason_once() {
    with_seed("lost reasons", 7, || {
        let (b, t) = filled(2, 100);
        let victim = b.server_ids()[0];
        b.kill(victim, true);
        let deadline = Instant::now() + Duration::from_secs(5);
        while t.stats().pages_dropped == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut buf = vec![0; PS];
        let mut down = Vec::new();
        for p in 0..100 {
            match t.get(p, 1, &mut buf) {
                Lookup::Hit { version } => assert_eq!(buf, content(p, version)),
                Lookup::Miss(MissReason::ServerDown) => down.push(p),
                Lookup::Miss(r) => panic!("page {p}: purged with its server, missed as {r:?}"),
            }
        }
        assert!(down.len() >= 30, "the pages of the killed server: {down:?} {:?}", t.stats());
        // The reason is told once; a put of the page forgets it.
        assert_eq!(t.get(down[0], 1, &mut buf), Lookup::Miss(MissReason::Absent));
        t.put(down[1], 2, &content(down[1], 2));
        t.flush(FLUSH).unwrap();
        assert!(t.invalidate(down[1]));
        assert_eq!(t.get(down[1], 1, &mut buf), Lookup::Miss(MissReason::Absent));
        assert_no_leak(&t, "lost reasons");
    });
}
