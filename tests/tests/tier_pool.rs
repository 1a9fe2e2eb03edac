//! The page tier over real memory servers (`PoolBackend` over a `Pool` of `farpool-memserver` processes):
//! round trips and versions from many threads, a drain with a short grace while a second server has some
//! room (hottest pages move, the rest become misses), and a server killed with SIGKILL (its pages become
//! `ServerDown` misses, the tier keeps serving from the other one). Every check that could hang runs under
//! a bound ([`within`]); every hit is compared byte for byte with the page that was put.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use farpool::tier::{Lookup, MissReason, PageTier, PoolBackend, PutStatus, TierStats};
use farpool::{AdminCmd, Pool, PoolBuilder, TransportChoice};
use farpool_tests::{MemServer, within};

const PS: usize = 4096;
const MIB: u64 = 1 << 20;
const FLUSH: Duration = Duration::from_secs(20);
const BOUND: Duration = Duration::from_secs(60);

/// The bytes of `page` at `version`: a mix-up of pages or versions, or a torn copy, changes them.
fn content(page: u64, version: u64) -> Vec<u8> {
    farpool::tier::page_content(page, version, PS)
}

fn pool_of(servers: &[&MemServer]) -> Result<Arc<Pool>> {
    pool_with(servers, TransportChoice::Tcp)
}

fn pool_with(servers: &[&MemServer], transport: TransportChoice) -> Result<Arc<Pool>> {
    let addrs: Vec<String> = servers.iter().map(|s| s.addr().to_string()).collect();
    let pool = PoolBuilder::new(addrs)
        .with_transport(transport)
        .with_connect_timeout_ms(1000)
        .with_op_timeout_ms(2000)
        .with_reconnect_backoff_ms(500)
        .build()?;
    Ok(Arc::new(pool))
}

fn tier_over(pool: &Arc<Pool>, min_bytes: u64, max_bytes: u64) -> Result<PageTier> {
    let backend = Arc::new(PoolBackend::new(pool.clone()));
    Ok(PageTier::builder(backend).with_page_size(PS).with_capacity_bytes(min_bytes, max_bytes).build()?)
}

/// Nothing leaked: no write in flight, every live slot free or published, the free lists agree with the
/// slot words, the page table agrees with the published slots, the counters add up.
fn assert_accounted(t: &PageTier, ctx: &str) -> Result<TierStats> {
    let c = t.census();
    ensure!(c.writing == 0 && c.cancelled == 0, "{ctx}: writes still in flight: {c:?}");
    ensure!(c.free + c.published == c.slots, "{ctx}: slots lost: {c:?}");
    ensure!(c.on_free_lists == c.free, "{ctx}: free lists disagree with slot words: {c:?}");
    let (entries, published) = t.table_len();
    ensure!(published == c.published, "{ctx}: table ({entries} entries, {published} published) vs {c:?}");
    let s = t.stats();
    ensure!(s.gets == s.hits() + s.misses(), "{ctx}: gets != hits + misses: {s:?}");
    ensure!(s.puts_pending() == 0, "{ctx}: puts pending: {s:?}");
    Ok(s)
}

fn granted(pool: &Pool, server: usize) -> Result<u64> {
    Ok(pool.admin(server, AdminCmd::Stats)?.stat("slabs_granted").unwrap_or(u64::MAX))
}

/// Put pages `0..n` at version 1 and wait until all are written.
fn fill(t: &PageTier, n: u64) -> Result<()> {
    for p in 0..n {
        ensure!(t.put(p, 1, &content(p, 1)) == PutStatus::Queued, "put of page {p} not queued");
        if p % 256 == 255 {
            t.flush(FLUSH)?;
        }
    }
    t.flush(FLUSH)?;
    let s = t.stats();
    ensure!(s.puts_published == n, "every page must be published: {s:?}");
    Ok(())
}

#[test]
fn round_trips_and_versions_across_threads() -> Result<()> {
    let (a, b) = (MemServer::start(&["--capacity", "16MiB"])?, MemServer::start(&["--capacity", "16MiB"])?);
    let pool = pool_of(&[&a, &b])?;
    let t = tier_over(&pool, 4 * MIB, 12 * MIB)?;
    const THREADS: u64 = 4;
    const PAGES: u64 = 200; // per thread
    let wrong = Arc::new(AtomicU64::new(0));
    let hits = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..THREADS)
        .map(|k| {
            let (t, wrong, hits) = (t.clone(), wrong.clone(), hits.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0; PS];
                let mine = k * PAGES..(k + 1) * PAGES;
                // Pages whose last put was dropped (the write-behind queue was full: the writers fell
                // behind, which a loaded machine can cause); such a page is legitimately absent.
                let mut dropped = Vec::new();
                for round in 1..=4u64 {
                    for p in mine.clone() {
                        if t.put(p, round, &content(p, round)) == PutStatus::Dropped && round == 4 {
                            dropped.push(p);
                        }
                    }
                    for p in mine.clone() {
                        // Our own page: never older than the version just put.
                        match t.get(p, round, &mut buf) {
                            Lookup::Hit { version } if version >= round && buf == content(p, version) => {
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                            Lookup::Hit { .. } => {
                                wrong.fetch_add(1, Ordering::Relaxed);
                            }
                            Lookup::Miss(_) => {}
                        }
                        // Someone else's page, any version: must be exactly what they put.
                        let q = (p + PAGES) % (THREADS * PAGES);
                        if let Lookup::Hit { version } = t.get(q, 0, &mut buf)
                            && buf != content(q, version)
                        {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                dropped
            })
        })
        .collect();
    let dropped: Vec<u64> =
        within(BOUND, move || handles.into_iter().flat_map(|h| h.join().expect("worker")).collect())?;
    t.flush(FLUSH)?;
    ensure!(wrong.load(Ordering::Relaxed) == 0, "wrong or stale data served");
    ensure!(hits.load(Ordering::Relaxed) > THREADS * PAGES, "own pages should mostly hit");
    // After the writes settle, every page is there at its last version (unless that put was dropped),
    // batched across both servers.
    let reqs: Vec<(u64, u64)> = (0..THREADS * PAGES).map(|p| (p, 4)).collect();
    let mut out = vec![0; reqs.len() * PS];
    let res = t.get_many(&reqs, &mut out);
    for (i, r) in res.iter().enumerate() {
        if *r == Lookup::Miss(MissReason::Absent) && dropped.contains(&(i as u64)) {
            continue;
        }
        ensure!(*r == Lookup::Hit { version: 4 }, "page {i}: {r:?} {:?}", t.stats());
        ensure!(out[i * PS..(i + 1) * PS] == content(i as u64, 4)[..], "page {i}: wrong bytes");
    }
    eprintln!("{} of the last {} puts were dropped on a full queue", dropped.len(), THREADS * PAGES);
    let mut buf = vec![0; PS];
    let held = (0..THREADS * PAGES).find(|p| !dropped.contains(p)).expect("some last put was queued");
    ensure!(t.get(held, 5, &mut buf) == Lookup::Miss(MissReason::Stale), "a newer minimum than held is stale");
    let s = assert_accounted(&t, "threads")?;
    ensure!(s.puts_published >= THREADS * PAGES, "{s:?}");
    ensure!(granted(&pool, 0)? > 0 && granted(&pool, 1)? > 0, "slabs spread over both servers");
    ensure!(s.rtt_ewma_ns > 0, "far reads were timed: {s:?}");
    Ok(())
}

/// Reads random pages until stopped; counts hits and wrong bytes.
fn reader(t: PageTier, pages: u64, stop: Arc<AtomicBool>, wrong: Arc<AtomicU64>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut buf = vec![0; PS];
        let (mut hits, mut p) = (0, 0);
        while !stop.load(Ordering::Acquire) {
            p = (p * 7 + 3) % pages;
            if let Lookup::Hit { version } = t.get(p, 1, &mut buf) {
                hits += 1;
                if buf != content(p, version) {
                    wrong.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        hits
    })
}

#[test]
fn drain_with_short_grace_moves_the_hottest_and_drops_the_rest() -> Result<()> {
    // Server 1 can take one slab more than the tier holds there: room for the hot pages, not for all.
    let a = MemServer::start(&["--capacity", "8MiB"])?;
    let b = MemServer::start(&["--capacity", "4MiB"])?;
    let pool = pool_of(&[&a, &b])?;
    let t = tier_over(&pool, 6 * MIB, 6 * MIB)?;
    ensure!(granted(&pool, 0)? == 3 && granted(&pool, 1)? == 3, "six slabs, round-robin over the servers");
    const PAGES: u64 = 1400;
    const HOT: u64 = 60;
    fill(&t, PAGES)?;
    let mut buf = vec![0; PS];
    for _ in 0..4 {
        for p in 0..HOT {
            ensure!(t.get(p, 1, &mut buf).is_hit(), "hot page {p} before the drain");
            t.put(p, 1, &content(p, 1)); // raises its frequency, as a re-evicting buffer pool does
        }
    }
    let before = t.stats();
    let (stop, wrong) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let r = reader(t.clone(), PAGES, stop.clone(), wrong.clone());
    let sent = Instant::now();
    pool.admin(0, AdminCmd::Drain { grace_ms: 1000 })?;
    // The tier gives the slabs back itself once it has moved what it could (before the server's deadline).
    let t2 = t.clone();
    let drained = within(Duration::from_secs(10), move || {
        while t2.stats().slabs_lost < 3 {
            std::thread::sleep(Duration::from_millis(5));
        }
        sent.elapsed()
    });
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    let hits_during = r.join().expect("reader");
    let drained = drained?;
    let s = t.stats();
    eprintln!(
        "drained in {drained:?}: migrated {}, dropped {}, reader hits {hits_during}",
        s.pages_migrated, s.pages_dropped
    );
    ensure!(wrong.load(Ordering::Acquire) == 0, "wrong data served during the drain");
    ensure!(hits_during > 0, "served throughout");
    ensure!(drained < Duration::from_millis(1500), "the drain took {drained:?} for a grace of 1 s");
    ensure!(s.slabs_lost == 3, "the three slabs of server 0 are gone: {s:?}");
    ensure!(s.pages_migrated >= HOT / 4, "hot pages moved: {s:?}");
    ensure!(s.pages_dropped > 0, "server 1 had no room for everything: {s:?}");
    // The hottest pages survived; every hit is right; the rest are misses (revoked, or absent once told).
    let hot_hits = (0..HOT).filter(|&p| t.get(p, 1, &mut buf).is_hit() && buf == content(p, 1)).count() as u64;
    ensure!(hot_hits >= HOT - 2, "the hot pages survive the drain: {hot_hits}/{HOT}, {s:?}");
    let mut cold = (0, 0);
    for p in HOT..PAGES {
        match t.get(p, 1, &mut buf) {
            Lookup::Hit { version } => {
                ensure!(version == 1 && buf == content(p, 1), "page {p}: wrong bytes");
                cold.0 += 1;
            }
            Lookup::Miss(MissReason::Revoked | MissReason::Absent) => cold.1 += 1,
            Lookup::Miss(m) => anyhow::bail!("page {p}: unexpected miss {m:?}"),
        }
    }
    ensure!(cold.1 > 0 && cold.0 > 0, "cold pages: some kept (server 1), some dropped: {cold:?}");
    let s = assert_accounted(&t, "drain")?;
    ensure!(s.miss_revoked > 0, "dropped pages are misses with reason revoked: {s:?}");
    ensure!(
        s.pages_migrated + s.pages_dropped >= before.puts_published / 3,
        "every page of server 0 was moved or dropped: {s:?}"
    );
    ensure!(granted(&pool, 0)? == 0, "server 0 holds no grant of ours any more");
    ensure!(granted(&pool, 1)? == 4, "server 1 gave its last slab to the move: {}", granted(&pool, 1)?);
    // The tier keeps working on what is left.
    for p in 5000..5100 {
        t.put(p, 1, &content(p, 1));
        t.put(p, 1, &content(p, 1));
    }
    t.flush(FLUSH)?;
    ensure!(t.get(5050, 1, &mut buf).is_hit() || t.stats().puts_rejected > 0, "{:?}", t.stats());
    assert_accounted(&t, "after drain")?;
    Ok(())
}

#[test]
fn killed_server_pages_are_server_down_misses_and_the_other_keeps_serving() -> Result<()> {
    kill_one(TransportChoice::Tcp)
}

/// The same over whatever `auto` negotiates (shm between processes of one host, when offered).
#[test]
fn killed_server_over_auto_transport() -> Result<()> {
    kill_one(TransportChoice::Auto)
}

fn kill_one(transport: TransportChoice) -> Result<()> {
    let mut a = MemServer::start(&["--capacity", "8MiB"])?;
    let b = MemServer::start(&["--capacity", "8MiB"])?;
    let pool = pool_with(&[&a, &b], transport)?;
    eprintln!("{transport:?}: negotiated {}", pool.transport_of(0)?.kind);
    let t = tier_over(&pool, 4 * MIB, 4 * MIB)?;
    const PAGES: u64 = 800;
    fill(&t, PAGES)?;
    a.kill9()?;
    let t2 = t.clone();
    let (hits, down) = within(Duration::from_secs(20), move || {
        let mut buf = vec![0; PS];
        let (mut hits, mut down) = (0u64, 0u64);
        for p in 0..PAGES {
            match t2.get(p, 1, &mut buf) {
                Lookup::Hit { version } => {
                    assert!(version == 1 && buf == content(p, 1), "page {p}: wrong bytes");
                    hits += 1;
                }
                Lookup::Miss(MissReason::ServerDown) => down += 1,
                Lookup::Miss(m) => panic!("page {p}: miss {m:?}, want a hit or server down"),
            }
        }
        (hits, down)
    })?;
    eprintln!("after kill -9: {hits} hits, {down} server-down misses");
    ensure!(hits >= PAGES / 3 && down >= PAGES / 3, "about half on each server: {hits} hits, {down} down");
    // The tier keeps serving and writing through the live server, without waiting on the dead one.
    let t3 = t.clone();
    within(Duration::from_secs(30), move || -> Result<()> {
        for p in PAGES..PAGES + 200 {
            t3.put(p, 1, &content(p, 1));
            t3.put(p, 1, &content(p, 1));
        }
        t3.flush(FLUSH)?;
        let mut buf = vec![0; PS];
        let again = (PAGES..PAGES + 200).filter(|&p| t3.get(p, 1, &mut buf).is_hit()).count();
        ensure!(again >= 150, "new pages land on the live server: {again}/200 {:?}", t3.stats());
        Ok(())
    })??;
    std::thread::sleep(Duration::from_millis(300)); // the maintenance thread purges the dead slabs
    let s = assert_accounted(&t, "kill")?;
    ensure!(s.miss_server_down == down && s.miss_revoked == 0, "{s:?}");
    ensure!(s.slabs_lost >= 1, "{s:?}");
    Ok(())
}
