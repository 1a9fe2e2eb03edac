//! The VOPR runs: the real page tier over the simulated cluster under seeded faults, plus tests proving
//! that the checks can fail (a checker that cannot fail is not a checker).
//!
//! Reproduce one seed: `FARPOOL_SIM_SEED=17 cargo test -p farpool-sim --test vopr`, or the command a
//! failure prints.

use std::sync::Arc;
use std::time::Duration;

use farpool::tier::{FarBackend, PageTier, TierStats, layout};
use farpool_sim::model::Violation;
use farpool_sim::{ClusterConfig, Corruption, FailureKind, RunConfig, RunReport, SimCluster, SimFaults, Tally};

/// Ops per seed: small, so ~20 seeds take seconds even on a loaded 2-core machine (debug build).
const OPS: u64 = 1200;

/// `FARPOOL_SIM_SEED` alone if set, else `range`.
fn seeds(range: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("FARPOOL_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => vec![s],
        None => range.collect(),
    }
}

fn run_seeds(range: std::ops::Range<u64>) -> Vec<RunReport> {
    seeds(range)
        .into_iter()
        .map(|seed| {
            let cfg = RunConfig { ops: OPS, ..RunConfig::new(seed) };
            farpool_sim::run(&cfg).unwrap_or_else(|f| panic!("{f}"))
        })
        .collect()
}

/// Extra seeds a group may run when its own did not exercise everything (see [`assert_exercised`]).
const EXTRA_SEEDS_MAX: u64 = 10;

/// What a group of runs failed to exercise, if anything.
fn unexercised(reports: &[RunReport]) -> Option<&'static str> {
    let sum = |f: &dyn Fn(&RunReport) -> u64| reports.iter().map(f).sum::<u64>();
    let checks: [(bool, &'static str); 7] = [
        (sum(&|r| r.sim.injected()) > 0, "no data-plane fault injected"),
        (sum(&|r| r.sim.crashes) > 0 && sum(&|r| r.sim.restarts) > 0, "no crash/restart"),
        (sum(&|r| r.sim.notices) > 0 && sum(&|r| r.sim.revoked_slabs) > 0, "no revoke"),
        (sum(&|r| r.tier.hits_far) > 0, "nothing was read from far memory"),
        (sum(&|r| r.tier.evictions + r.tier.puts_rejected) > 0, "the tier never filled up"),
        (sum(&|r| r.tier.puts_failed) > 0, "no far write failed"),
        (sum(&|r| r.tier.slabs_lost) > 0, "no slab lost"),
    ];
    checks.into_iter().find(|(ok, _)| !ok).map(|(_, what)| what)
}

/// The runs of a group must have exercised what they claim to test, or passing proves nothing. How much
/// a run exercises depends on thread timing (on a loaded machine starved writer threads publish fewer
/// pages, so the tier may not fill within a seed's ops); a group that falls short runs further seeds
/// (each checked like the others), at most [`EXTRA_SEEDS_MAX`], before it fails.
fn assert_exercised(reports: &[RunReport]) {
    if reports.len() < 3 {
        return; // a single reproduced seed need not show every fault
    }
    let mut all = reports.to_vec();
    let first = reports.iter().map(|r| r.seed).max().unwrap_or(0) + 1000;
    for extra in first..first + EXTRA_SEEDS_MAX {
        let Some(what) = unexercised(&all) else { return };
        eprintln!("seeds {:?}: {what}; running seed {extra} too", reports.iter().map(|r| r.seed).collect::<Vec<_>>());
        all.extend(run_seeds(extra..extra + 1));
    }
    if let Some(what) = unexercised(&all) {
        panic!("{what} (after {EXTRA_SEEDS_MAX} extra seeds)");
    }
}

#[test]
fn vopr_seeds_0_to_5() {
    assert_exercised(&run_seeds(0..5));
}

#[test]
fn vopr_seeds_5_to_10() {
    assert_exercised(&run_seeds(5..10));
}

#[test]
fn vopr_seeds_10_to_15() {
    assert_exercised(&run_seeds(10..15));
}

#[test]
fn vopr_seeds_15_to_20() {
    let reports = run_seeds(15..20);
    assert_exercised(&reports);
    if reports.len() >= 3 {
        assert!(reports.iter().map(|r| r.tier.pages_migrated).sum::<u64>() > 0, "no page moved under a notice");
    }
}

#[test]
fn same_seed_same_cluster_events() {
    let cfg = RunConfig { ops: 400, threads: 1, ..RunConfig::new(42) };
    let a = farpool_sim::run(&cfg).unwrap_or_else(|f| panic!("{f}"));
    let b = farpool_sim::run(&cfg).unwrap_or_else(|f| panic!("{f}"));
    let decided = |r: &RunReport| r.events.iter().map(|e| (e.op, e.event.clone())).collect::<Vec<_>>();
    assert!(!a.events.is_empty());
    assert_eq!(decided(&a), decided(&b), "the cluster events are decided by the seed");
    let other = farpool_sim::run(&RunConfig { seed: 43, ..cfg }).unwrap_or_else(|f| panic!("{f}"));
    assert_ne!(decided(&a), decided(&other));
}

/// Reads return a slot with a valid header over a torn page: the tier must see it (checksum miss) and
/// never hand it out; the run passes and the misses are counted.
#[test]
fn torn_reads_are_checksum_misses_never_data() {
    for seed in seeds(100..103) {
        let cfg = RunConfig { ops: 800, corruption: Corruption::Torn, corrupt: 0.3, ..RunConfig::new(seed) };
        let r = farpool_sim::run(&cfg).unwrap_or_else(|f| panic!("{f}"));
        assert!(r.sim.corruptions > 0, "seed {seed}: nothing was corrupted: {:?}", r.sim);
        assert!(r.tier.miss_checksum > 0, "seed {seed}: torn pages must be checksum misses: {:?}", r.tier);
    }
}

/// Reads return a page with one byte changed and the checksum recomputed: no check inside the tier can
/// see it, so the reference model must, and the run must fail with the seed and a repro command.
#[test]
fn forged_reads_are_caught_by_the_checker() {
    for seed in seeds(200..203) {
        let cfg = RunConfig { ops: 800, corruption: Corruption::Forged, corrupt: 0.3, ..RunConfig::new(seed) };
        let f = farpool_sim::run(&cfg).expect_err("a forged page went unnoticed: the checker is blind");
        assert!(
            matches!(f.kind, FailureKind::Violation(Violation::WrongBytes { .. })),
            "seed {seed}: expected wrong bytes, got {f}"
        );
        let text = f.to_string();
        assert!(text.contains(&format!("seed {seed}")) && text.contains("--corrupt forged"), "{text}");
    }
}

/// The accounting check sees a slab the tier does not know about (here: leased behind its back).
#[test]
fn accounting_check_catches_a_slab_leak() {
    let slab = 16 * layout::slot_size(4096) as u64;
    let cluster = SimCluster::new(ClusterConfig::new(2, 4, slab), SimFaults::calm(), 3);
    let tier = PageTier::builder(Arc::new(cluster.clone()))
        .with_page_size(4096)
        .with_capacity_bytes(slab, 4 * slab)
        .build()
        .unwrap();
    tier.flush(Duration::from_secs(5)).unwrap();
    farpool_sim::check_accounting(&tier, &cluster).unwrap();
    let leaked = cluster.lease(1).unwrap();
    let e = farpool_sim::check_accounting(&tier, &cluster).unwrap_err();
    assert!(e.to_string().contains("slab leak"), "{e}");
    cluster.release(&leaked[0]).unwrap();
    farpool_sim::check_accounting(&tier, &cluster).unwrap();
}

/// The stats check sees counters that do not add up or disagree with the workload.
#[test]
fn stats_check_catches_disagreement() {
    let t = Tally { gets: 3, hits: 1, misses: [2, 0, 0, 0, 0], ..Tally::default() };
    let mut s = TierStats::default();
    (s.gets, s.hits_far, s.miss_absent) = (3, 1, 2);
    farpool_sim::check_stats(&s, &t).unwrap();
    let mut lost_miss = s;
    lost_miss.miss_absent = 1;
    assert!(farpool_sim::check_stats(&lost_miss, &t).is_err(), "gets != hits + misses");
    let mut other_reason = lost_miss;
    other_reason.miss_stale = 1;
    assert!(farpool_sim::check_stats(&other_reason, &t).is_err(), "reasons disagree");
}
