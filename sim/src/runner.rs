//! One simulated run (VOPR style): build the cluster and a tier over it, run the checked workload from a
//! few threads while the schedule injects cluster events, then quiesce and check the accounting.
//!
//! After the workload: flush the tier; finish pending revokes and announce unannounced crashes (what
//! failure detection does eventually); wait (bounded) for the tier to settle; then require that no slot
//! leaked (census: nothing writing or cancelled, free + published = slots, free lists agree with slot
//! words, table agrees with slots), no slab leaked (bytes the tier holds = bytes live servers granted
//! it), every page reads back correctly, and the counters add up and agree with what the workload saw.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use farpool::tier::{MissReason, PageTier, TierStats, layout};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::clock::mix;
use crate::cluster::{ClusterConfig, SimCluster};
use crate::faults::{Corruption, SimFaults};
use crate::model::{Model, Owned, Violation};
use crate::schedule::{Applied, Schedule};
use crate::stats::SimStats;
use crate::workload::{Ctx, OpFailure, Tally, Worker, reason_index};

/// Slots per simulated slab.
const SLOTS_PER_SLAB: u64 = 16;
/// Slabs per simulated server.
const SLABS_PER_SERVER: usize = 8;
/// Slabs the tier may hold (fewer than the pages need: it must evict and reject).
const TIER_SLABS: u64 = 10;
/// Bound on the tier's put queue in a run (each queued put holds one 4 KiB page: 16 MiB at most).
const PUT_QUEUE_MAX: usize = 4096;
/// Bound of every wait for the tier after the workload.
const SETTLE_MAX: Duration = Duration::from_secs(10);

/// What to run. Everything random derives from `seed`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The seed.
    pub seed: u64,
    /// Workload ops (over all threads). Default 2000.
    pub ops: u64,
    /// Server slots. Default 3.
    pub servers: usize,
    /// Workload threads. Default 3.
    pub threads: usize,
    /// Distinct pages. Default 480 (the tier holds 160).
    pub pages: u64,
    /// About one cluster event per this many ops; 0 for none. Default 60.
    pub event_every: u64,
    /// Data-plane faults; `None` (default) draws a mix from the seed.
    pub faults: Option<SimFaults>,
    /// Corruption of successful reads (checker tests). Default none.
    pub corruption: Corruption,
    /// Probability of corrupting a read when `corruption` is set. Default 0.2.
    pub corrupt: f64,
    /// Let growth re-grant revoked slab ids (late events about old grants of a slab id, finding 3 of the
    /// crate docs). Default false.
    pub regrant_revoked: bool,
    /// Print a progress line to stderr about once a second. Default false.
    pub progress: bool,
}

impl RunConfig {
    /// The defaults above with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ops: 2000,
            servers: 3,
            threads: 3,
            pages: 480,
            event_every: 60,
            faults: None,
            corruption: Corruption::None,
            corrupt: 0.2,
            regrant_revoked: false,
            progress: false,
        }
    }

    /// The command that reruns this configuration.
    pub fn repro(&self) -> String {
        let mut s = format!(
            "cargo run -p farpool-sim --release -- --seed {} --ops {} --servers {} --threads {}",
            self.seed, self.ops, self.servers, self.threads
        );
        if self.regrant_revoked {
            s += " --regrant-revoked";
        }
        if self.corruption != Corruption::None {
            s += &format!(" --corrupt {:?}", self.corruption).to_lowercase();
        }
        s
    }

    fn faults(&self) -> SimFaults {
        let mut f = self
            .faults
            .clone()
            .unwrap_or_else(|| SimFaults::random(&mut SmallRng::seed_from_u64(mix(self.seed, 0xFA17))));
        f.corruption = self.corruption;
        f.corrupt = if self.corruption == Corruption::None { 0.0 } else { self.corrupt };
        f
    }
}

/// What a passing run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Virtual time the data plane spent.
    pub virtual_ns: u64,
    /// The tier's counters at the end.
    pub tier: TierStats,
    /// The cluster's counters at the end.
    pub sim: SimStats,
    /// What the workload saw.
    pub tally: Tally,
    /// Cluster events applied, in order.
    pub events: Vec<Applied>,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FailureKind {
    /// An invariant broke.
    #[error(transparent)]
    Violation(#[from] Violation),
    /// Something panicked (the tier's own assertions included).
    #[error("panic: {0}")]
    Panic(String),
    /// The tier refused to start.
    #[error("tier error: {0}")]
    Tier(#[from] farpool_core::Error),
}

/// A failed run: the seed, where, what, and the command that reproduces it.
#[derive(Debug, thiserror::Error)]
#[error("seed {seed} FAILED (op {op:?}, thread {thread:?}): {kind}\n  reproduce with: {repro}")]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// Workload op index, if the failure happened during the workload.
    pub op: Option<u64>,
    /// Workload thread, if any.
    pub thread: Option<usize>,
    /// What went wrong.
    pub kind: FailureKind,
    /// Command that reruns the same configuration.
    pub repro: String,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default()
}

/// Run one seed. See the module docs.
pub fn run(cfg: &RunConfig) -> Result<RunReport, Failure> {
    let fail = |op, thread, kind| Failure { seed: cfg.seed, op, thread, kind, repro: cfg.repro() };
    match catch_unwind(AssertUnwindSafe(|| run_inner(cfg))) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err((op, thread, kind))) => Err(fail(op, thread, kind)),
        Err(p) => Err(fail(None, None, FailureKind::Panic(panic_text(&*p)))),
    }
}

type Inner = (Option<u64>, Option<usize>, FailureKind);

fn run_inner(cfg: &RunConfig) -> Result<RunReport, Inner> {
    let t0 = Instant::now();
    let ps = 4096;
    let slab_bytes = SLOTS_PER_SLAB * layout::slot_size(ps) as u64;
    let shape = ClusterConfig {
        regrant_revoked: cfg.regrant_revoked,
        ..ClusterConfig::new(cfg.servers, SLABS_PER_SERVER, slab_bytes)
    };
    let cluster = SimCluster::new(shape, cfg.faults(), cfg.seed);
    let tier = PageTier::builder(Arc::new(cluster.clone()))
        .with_page_size(ps)
        .with_capacity_bytes(2 * slab_bytes, TIER_SLABS * slab_bytes)
        // Deep enough for every put of a run: on a loaded machine starved writer threads would otherwise
        // drop puts on a full queue (by design: far memory is a cache) until the tier never fills and the
        // run exercises no eviction. Queue-full drops have their own tier test.
        .with_queue_depth(usize::try_from(cfg.ops).unwrap_or(usize::MAX).clamp(48, PUT_QUEUE_MAX))
        .with_batch_max(8)
        .with_write_linger(Duration::from_micros(50))
        .build()
        .map_err(|e| (None, None, FailureKind::Tier(e)))?;
    let threads = cfg.threads.max(1);
    let model = Model::new(cfg.pages.max(threads as u64), ps, threads);
    let schedule = Schedule::generate(cfg.seed, cfg.ops, cfg.servers, cfg.event_every);
    let (stop, next_op) = (AtomicBool::new(false), AtomicU64::new(0));
    let ctx = Ctx {
        tier: &tier,
        model: &model,
        schedule: &schedule,
        cluster: &cluster,
        stop: &stop,
        next_op: &next_op,
        ops: cfg.ops,
    };
    let mut workers: Vec<Worker> =
        (0..threads).map(|i| Worker::new(i, mix(cfg.seed, 0x7A5C_0000 + i as u64), &model, ps, threads)).collect();
    run_workers(cfg, &ctx, &mut workers)?;
    let as_violation = |v: Violation| (None, None, FailureKind::Violation(v));
    quiesce(&tier, &cluster, &schedule).map_err(as_violation)?;
    let mut tally = Tally::default();
    let mut owned = std::collections::HashMap::new();
    for w in &workers {
        tally.merge(&w.tally);
        owned.extend(w.owned.iter().map(|(&p, &o)| (p, o)));
    }
    read_back(&tier, &model, &owned, &mut tally).map_err(as_violation)?;
    let stats = tier.stats();
    check_stats(&stats, &tally).map_err(as_violation)?;
    let report = RunReport {
        seed: cfg.seed,
        elapsed: t0.elapsed(),
        virtual_ns: cluster.clock().now_ns(),
        tier: stats,
        sim: cluster.stats(),
        tally,
        events: schedule.log(),
    };
    Ok(report)
}

/// Run the workers (and the progress line) to completion; the first violation stops them all.
fn run_workers(cfg: &RunConfig, ctx: &Ctx<'_>, workers: &mut [Worker]) -> Result<(), Inner> {
    let done = AtomicBool::new(false);
    let results: Vec<std::thread::Result<Result<(), OpFailure>>> = std::thread::scope(|s| {
        let handles: Vec<_> = workers.iter_mut().map(|w| s.spawn(|| w.run(ctx))).collect();
        if cfg.progress {
            s.spawn(|| progress(cfg, ctx, &done));
        }
        let r = handles.into_iter().map(|h| h.join()).collect();
        done.store(true, Ordering::Release);
        r
    });
    for r in results {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(f)) => return Err((Some(f.op), Some(f.thread), FailureKind::Violation(f.violation))),
            Err(p) => return Err((None, None, FailureKind::Panic(panic_text(&*p)))),
        }
    }
    Ok(())
}

fn progress(cfg: &RunConfig, ctx: &Ctx<'_>, done: &AtomicBool) {
    let mut last = Instant::now();
    while !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
        if last.elapsed() < Duration::from_secs(1) {
            continue;
        }
        last = Instant::now();
        let op = ctx.next_op.load(Ordering::Acquire).min(cfg.ops);
        let (t, s) = (ctx.tier.stats(), ctx.cluster.stats());
        eprintln!(
            "seed {}: {op}/{} ops ({:.0}%), hits {}/{} gets, injected {}, crashes {}, revoked slabs {}, virtual {} ms",
            cfg.seed,
            cfg.ops,
            op as f64 * 100.0 / cfg.ops.max(1) as f64,
            t.hits(),
            t.gets,
            s.injected(),
            s.crashes,
            s.revoked_slabs,
            ctx.cluster.clock().now_ns() / 1_000_000
        );
    }
}

/// Flush, finish notices, announce crashes, and wait (bounded) until the accounting holds.
fn quiesce(tier: &PageTier, cluster: &SimCluster, schedule: &Schedule) -> Result<(), Violation> {
    let deadline = Instant::now() + SETTLE_MAX;
    tier.flush(SETTLE_MAX).map_err(|e| Violation::Accounting(format!("flush after the workload: {e}")))?;
    schedule.revoke_pending(cluster);
    cluster.announce_down();
    loop {
        let r = tier
            .flush(deadline.saturating_duration_since(Instant::now()))
            .map_err(|e| Violation::Accounting(format!("flush while settling: {e}")))
            .and_then(|()| check_accounting(tier, cluster));
        match r {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The no-leak conditions (only meaningful when the tier is quiet).
pub fn check_accounting(tier: &PageTier, cluster: &SimCluster) -> Result<(), Violation> {
    let c = tier.census();
    let (entries, published) = tier.table_len();
    let leased = tier.leased_bytes();
    let granted = cluster.granted_bytes_alive();
    let bad = |m: String| Err(Violation::Accounting(format!("{m}; census {c:?}, table {entries}/{published}")));
    if c.writing != 0 || c.cancelled != 0 {
        return bad(format!("{} slots writing, {} cancelled after the flush", c.writing, c.cancelled));
    }
    if c.free + c.published != c.slots {
        return bad(format!("slots lost: {} free + {} published != {} slots", c.free, c.published, c.slots));
    }
    if c.on_free_lists != c.free {
        return bad(format!("free lists hold {} but {} slot words are free", c.on_free_lists, c.free));
    }
    if published != c.published || entries != published {
        return bad(format!("table {entries} entries / {published} published vs {} published slots", c.published));
    }
    if leased != granted {
        return bad(format!("slab leak: the tier holds {leased} bytes, live servers granted it {granted}"));
    }
    Ok(())
}

/// Read every page back (strong owner check) after quiescence.
fn read_back(
    tier: &PageTier,
    model: &Model,
    owned: &std::collections::HashMap<u64, Owned>,
    tally: &mut Tally,
) -> Result<(), Violation> {
    let mut buf = vec![0; tier.page_size()];
    for page in 0..model.pages() {
        let o = owned.get(&page).copied().unwrap_or_default();
        let r = tier.get(page, 0, &mut buf);
        tally.gets += 1;
        match r {
            farpool::tier::Lookup::Hit { version } => {
                tally.hits += 1;
                model.check_hit(page, 0, version, &buf, Some(o))?;
            }
            farpool::tier::Lookup::Miss(reason) => {
                tally.misses[reason_index(reason)] += 1;
                model.check_owner_miss(page, 0, reason, o)?;
            }
        }
    }
    Ok(())
}

/// The tier's counters add up and agree with what the workload saw.
pub fn check_stats(s: &TierStats, t: &Tally) -> Result<(), Violation> {
    let bad = |m: String| Err(Violation::Stats(format!("{m}; tier {s:?}; workload {t:?}")));
    if s.gets != s.hits() + s.misses() {
        return bad(format!("gets {} != hits {} + misses {}", s.gets, s.hits(), s.misses()));
    }
    if (s.gets, s.hits()) != (t.gets, t.hits) {
        return bad(format!(
            "tier counted {} gets / {} hits, the workload saw {} / {}",
            s.gets,
            s.hits(),
            t.gets,
            t.hits
        ));
    }
    let tier_misses = MissReason::ALL.map(|r| match r {
        MissReason::Absent => s.miss_absent,
        MissReason::Stale => s.miss_stale,
        MissReason::Checksum => s.miss_checksum,
        MissReason::Revoked => s.miss_revoked,
        MissReason::ServerDown => s.miss_server_down,
    });
    if tier_misses != t.misses {
        return bad(format!("misses by reason: tier {tier_misses:?}, workload {:?}", t.misses));
    }
    let outcomes =
        s.puts_unchanged + s.puts_rejected + s.puts_dropped + s.puts_failed + s.puts_cancelled + s.puts_published;
    if s.puts != t.puts || outcomes != s.puts {
        return bad(format!("puts {} (workload {}), outcomes {outcomes}", s.puts, t.puts));
    }
    if (s.puts_unchanged, s.puts_rejected) != (t.unchanged, t.rejected) || s.puts_dropped < t.dropped {
        return bad("put statuses disagree with the counters".into());
    }
    if s.invalidations != t.invalidated {
        return bad(format!("invalidations {} vs {} removals seen", s.invalidations, t.invalidated));
    }
    Ok(())
}
