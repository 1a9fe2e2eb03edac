//! `farbench rdma`: farpool's RDMA transport beside perftest (`ib_read_lat`, `ib_read_bw`) on the same
//! device, interleaved round by round in one run.
//!
//! Setup: a memory server in this process (`farpool_memserver::Server` with `--rdma-device`, or an
//! external one with `--server`), a `farpool::Pool` forcing the rdma transport, one lease, and a fresh
//! data endpoint (a new queue pair) for each phase, as each perftest run sets up its own: the exact client path (`RdmaTransport` behind `Pool::endpoint`, staged reads, bounds
//! checks, selective signaling). A staged READ lands by DMA in the endpoint's registered staging ring;
//! reads of at least 1 KiB complete with that staging span lent as their `Bytes` (zero copy, returned
//! to the ring when the `Bytes` are dropped), smaller ones with a copy (`farpool_rdma::EndpointConfig::
//! with_lend_min_bytes`). So the 64 KiB bandwidth phase does no user-space copy of the data, like
//! perftest, but still goes through the whole client path; each completion's `Bytes` is dropped at
//! once. Latency phases make one blocking call at a time, on the transport's depth-1 path (one post,
//! then busy-poll its completion, as perftest's `_lat` tests do). The barred READ is
//! `Endpoint::read_into` a registered `farpool::Arena` (what a buffer manager calls on a page fault,
//! and what `ib_read_lat` does: READ straight into registered memory); `read-copy` is
//! `Transport::run_one`, as the page tier calls it for a one-page batch, whose bytes come back as
//! `Bytes` (a copy below 1 KiB): reported beside it without a bar. The bandwidth phase keeps `--depth`
//! READs in flight (perftest's `_bw` default is 128; we use the same `--depth` for both sides).
//!
//! Each round runs perftest's `ib_read_lat` (server and client processes on 127.0.0.1), then ours,
//! then `ib_read_bw`, then ours, so slow drift of an emulated machine hits both sides alike. Bars
//! (ARCHITECTURE.md): READ p50 <= 1.2x `ib_read_lat`'s t_typical, judged on the median over rounds of
//! each round's ratio (the "paired" line: drift over seconds cancels within a round); READ bandwidth at
//! least 0.8x `ib_read_bw`'s average, on the medians over rounds. The ratio of the latency medians and of
//! each side's best round are printed too. Under emulation (Soft-RoCE in qemu TCG) only the ratios
//! mean anything. The paired line also gives a distribution-free 95% confidence interval of that
//! median (from 6 rounds on): a round's ratio swings 0.4-2.4 on Soft-RoCE because each run falls into
//! one of rxe's latency modes by a race, so with few rounds the interval shows how little one boot's
//! median can tell about a bar of 1.2.
//!
//! Invariants: every loop is bounded in operations and time; perftest processes are killed after
//! `PERFTEST_TIMEOUT`; figures come from completed, successful operations.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Args;
use farpool::{Arena, Endpoint, Lease, Pool, PoolBuilder, TransportChoice, TransportKind};
use farpool_core::{Completion, OpKind, Transport, WorkRequest};
use farpool_rdma::CycleClock;
use serde::{Deserialize, Serialize};

use crate::stats::LatencyHist;

/// Bar: our READ p50 at most this multiple of `ib_read_lat`'s t_typical.
pub const READ_LAT_RATIO_MAX: f64 = 1.2;
/// Bar: our READ bandwidth at least this fraction of `ib_read_bw`'s average.
pub const READ_BW_RATIO_MIN: f64 = 0.8;
/// Bound on one perftest process.
const PERFTEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on waiting for one completion.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);
/// perftest's default TCP port 18515, as `/proc/net/tcp` prints it.
const PERFTEST_PORT_HEX: &str = ":4853 ";

/// Arguments of `farbench rdma`.
#[derive(Args, Debug, Clone)]
pub struct RdmaArgs {
    /// RDMA device (for the embedded server, our client and perftest), e.g. rxe_lo.
    #[arg(long, default_value = "rxe_lo")]
    pub device: String,
    /// GID index (for the embedded server, our client and perftest's -x).
    #[arg(long)]
    pub gid_index: Option<u32>,
    /// Use this running memory server instead of an embedded one.
    #[arg(long)]
    pub server: Option<String>,
    /// READ latency sizes (perftest runs each too).
    #[arg(long, value_delimiter = ',', default_value = "8,8KiB", value_parser = crate::op::size_arg)]
    pub lat_sizes: Vec<u64>,
    /// Timed operations per latency phase (perftest -n).
    #[arg(long, default_value_t = 1000)]
    pub iters: u64,
    /// Bandwidth message size.
    #[arg(long, default_value = "64KiB", value_parser = crate::op::size_arg)]
    pub bw_size: u64,
    /// Operations per bandwidth phase (perftest -n).
    #[arg(long, default_value_t = 2000)]
    pub bw_iters: u64,
    /// READs in flight in the bandwidth phase (perftest -t).
    #[arg(long, default_value_t = 16)]
    pub depth: usize,
    /// Interleaved rounds (perftest, ours, perftest, ours...); per-round ratios and medians are compared.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Rounds of the barred READ latency pairs (`ib_read_lat`, then our arena READ, at each of
    /// `--lat-sizes`), counting the full rounds; the extra ones run only that pair and are spread
    /// among the full rounds. A pair takes a few seconds, a full round with its bandwidth phases
    /// several times that, so this is the cheap way to narrow the paired median's 95% interval.
    /// Default: `--rounds`.
    #[arg(long)]
    pub lat_rounds: Option<u32>,
    /// Pause after each perftest run before timing ours (its killed server's queue pair is torn down by
    /// the kernel meanwhile; without the pause whichever of our phases runs first pays for it).
    #[arg(long, default_value_t = 200)]
    pub settle_ms: u64,
    /// Create our queue pairs and completion queues with the legacy verbs API (default: extended).
    #[arg(long)]
    pub legacy_verbs: bool,
    /// Time every phase of every round on one data endpoint (one queue pair) instead of a fresh one per
    /// phase. perftest sets up a new queue pair for each run, and on Soft-RoCE a run tends to stay in
    /// the latency mode it fell into at the start, so one endpoint for the whole run is one draw
    /// against perftest's one per round.
    #[arg(long)]
    pub keep_endpoint: bool,
    /// Do not run perftest (our figures only, no ratios).
    #[arg(long)]
    pub no_perftest: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Report bars but exit 0 even when one fails.
    #[arg(long)]
    pub no_check: bool,
}

/// One of our latency phases.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LatPhase {
    /// read, write, faa or cas.
    pub op: String,
    /// Bytes per operation.
    pub size: u64,
    /// Minimum, p50 and p99 in microseconds.
    pub min_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Median user time from a completion to the next post (built with `farpool-rdma/probe` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub post_gap_p50_us: Option<f64>,
}

/// One round's figures.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Round {
    /// Our latency phases.
    pub ours_lat: Vec<LatPhase>,
    /// `ib_read_lat` t_typical per size (microseconds), in `lat_sizes` order.
    pub perftest_lat_typical_us: Vec<Option<f64>>,
    /// `ib_read_lat` t_min per size (microseconds).
    pub perftest_lat_min_us: Vec<Option<f64>>,
    /// Our READ bandwidth, MiB/s (`None` in a latency-pair round, see `--lat-rounds`).
    pub ours_bw_mib_s: Option<f64>,
    /// `ib_read_bw` average (perftest's MB/sec, 2^20 bytes).
    pub perftest_bw_mib_s: Option<f64>,
}

impl Round {
    /// `ib_read_lat`'s t_typical at latency size `i`, if this round ran it and it parsed.
    fn perftest_typical(&self, i: usize) -> Option<f64> {
        self.perftest_lat_typical_us.get(i).copied().flatten()
    }

    /// `ib_read_lat`'s t_min at latency size `i`.
    fn perftest_min(&self, i: usize) -> Option<f64> {
        self.perftest_lat_min_us.get(i).copied().flatten()
    }

    /// Run `ib_read_lat` at `size` (unless `--no-perftest`) and record its t_typical and t_min.
    fn run_perftest_lat(&mut self, a: &RdmaArgs, size: u64) -> Result<()> {
        let out = if a.no_perftest { String::new() } else { perftest(a, "ib_read_lat", size, a.iters)? };
        self.perftest_lat_typical_us.push(parse_perftest(&out, size, 4));
        self.perftest_lat_min_us.push(parse_perftest(&out, size, 2));
        Ok(())
    }
}

/// A ratio against perftest with its bar.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    /// What is compared.
    pub what: String,
    /// Ours (median over rounds, or best round).
    pub ours: f64,
    /// perftest (median over rounds, or best round).
    pub perftest: f64,
    /// ours / perftest; for a "paired" line, the median over rounds of each round's ours / perftest.
    pub ratio: f64,
    /// perftest's largest median over its smallest across rounds: how steady the reference was.
    pub perftest_spread: f64,
    /// For a "paired" line: a distribution-free 95% confidence interval of the median per-round ratio
    /// (order statistics of the rounds' ratios, see [`median_ci95`]); `None` below 6 rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ci95: Option<[f64; 2]>,
    /// How many rounds the figure is taken over.
    pub rounds: usize,
    /// The bar ("<= 1.2" or ">= 0.8"), if this comparison has one.
    pub bar: Option<String>,
    /// Whether the bar holds.
    pub pass: Option<bool>,
}

/// Everything one run produced (and what `farbench rdma-report` reads back).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// Device.
    pub device: String,
    /// READ latency sizes, in the order of each round's `perftest_lat_*` entries (older files lack
    /// it: [`Report::from_json`] then takes them from the first round's READ phases).
    #[serde(default)]
    pub lat_sizes: Vec<u64>,
    /// Bandwidth message size (0 in older files: 64 KiB was the only size they used).
    #[serde(default)]
    pub bw_size: u64,
    /// Rounds, in run order.
    pub rounds: Vec<Round>,
    /// Ratios of the medians (not read back: [`Report::from_json`] computes them from the rounds).
    #[serde(skip_deserializing)]
    pub ratios: Vec<Ratio>,
}

/// `farbench rdma`.
pub fn run(a: &RdmaArgs) -> Result<ExitCode> {
    ensure!(a.iters > 0 && a.bw_iters > 0 && a.depth > 0 && a.rounds > 0, "iters, depth and rounds must be positive");
    let (_server, addr) = match &a.server {
        Some(s) => (None, s.clone()),
        None => {
            let cfg = farpool_memserver::ServerConfig::default()
                .with_listen("127.0.0.1:0".parse()?)
                .with_capacity_bytes(64 << 20)
                .with_slab_size_bytes(16 << 20)
                .with_workers(1)
                .with_shm(false)
                .with_rdma_device(Some(a.device.clone()))
                .with_rdma_gid_index(a.gid_index);
            let s = farpool_memserver::Server::start(cfg).context("starting the embedded memory server")?;
            let addr = s.local_addr().to_string();
            (Some(s), addr)
        }
    };
    // The client side uses the same device and GID as the server and perftest.
    let mut pool = PoolBuilder::new([addr.as_str()])
        .with_transport(TransportChoice::Rdma)
        .with_inflight_max(a.depth.max(1))
        .with_rdma_device(a.device.clone())
        .with_rdma_extended_verbs(!a.legacy_verbs);
    if let Some(g) = a.gid_index {
        pool = pool.with_rdma_gid_index(g);
    }
    let pool = pool.build().context("pool forcing rdma")?;
    let lease = pool.lease(0, 1)?;
    ensure!(lease.grants()[0].len >= a.bw_size.max(*a.lat_sizes.iter().max().unwrap_or(&8)), "slab too small");
    let kept = if a.keep_endpoint { Some(rdma_endpoint(&pool)?) } else { None };
    let mut eps = Endpoints { pool: &pool, kept, settle: Duration::from_millis(a.settle_ms) };
    let max_lat = a.lat_sizes.iter().copied().max().unwrap_or(8);
    let mut arena = pool.arena(usize::try_from(max_lat)?).context("arena for the READ latency phases")?;
    ensure!(arena.device().is_some(), "the arena is not registered with an RDMA device");
    let total = a.lat_rounds.unwrap_or(a.rounds);
    ensure!(
        total >= a.rounds,
        "--lat-rounds ({total}) counts the full rounds: it cannot be below --rounds ({})",
        a.rounds
    );
    let mut rounds = Vec::new();
    let (mut full, mut pairs) = (0u32, 0u32);
    for r in 0..total {
        let is_full = is_full_round(r, a.rounds, total);
        let round = if is_full {
            full += 1;
            one_round(a, full - 1, &lease, &mut eps, &mut arena)
        } else {
            pairs += 1;
            pair_round(a, pairs - 1, &lease, &mut eps, &mut arena)
        }
        .with_context(|| format!("round {}", r + 1))?;
        let kind = if is_full { "full" } else { "latency pair" };
        eprintln!("round {}/{total} ({kind}): {}", r + 1, serde_json::to_string(&round)?);
        rounds.push(round);
    }
    let report = Report::new(a.device.clone(), a.lat_sizes.clone(), a.bw_size, rounds);
    print_ratios(&report.ratios, None);
    finish(&report, a.json.as_deref(), a.no_check)
}

/// Write `report` as JSON if asked; failure when a bar is missed, unless `no_check`.
fn finish(report: &Report, json: Option<&std::path::Path>, no_check: bool) -> Result<ExitCode> {
    if let Some(p) = json {
        crate::output::write_json(report, p)?;
    }
    let missed = report.ratios.iter().any(|x| x.pass == Some(false));
    Ok(if missed && !no_check { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Whether round `r` of `total` is one of the `full` full rounds: they are spread evenly, the first
/// round always full (so a short run still has its bandwidth figure).
fn is_full_round(r: u32, full: u32, total: u32) -> bool {
    let (r, full, total) = (u64::from(r), u64::from(full), u64::from(total));
    // Round r is full when the count of full rounds up to and including it steps up.
    (r * full).div_ceil(total) < ((r + 1) * full).div_ceil(total)
}

/// Print one `rdma ...` line per ratio (the suite's bar lines grep these); `runs` names how many
/// runs a pooled report draws on.
fn print_ratios(ratios: &[Ratio], runs: Option<usize>) {
    let from = runs.map(|n| format!(" from {n} run{}", if n == 1 { "" } else { "s" })).unwrap_or_default();
    for x in ratios {
        println!(
            "rdma {}: ours {:.2} vs perftest {:.2}: ratio {:.2} spread {:.2}{}{}",
            x.what,
            x.ours,
            x.perftest,
            x.ratio,
            x.perftest_spread,
            x.ci95
                .map(|[lo, hi]| format!(" 95% CI {lo:.2}..{hi:.2} over {} rounds{from}", x.rounds))
                .unwrap_or_default(),
            x.bar
                .as_ref()
                .map(|b| format!(" (bar {b}: {})", if x.pass == Some(true) { "ok" } else { "MISSED" }))
                .unwrap_or_default()
        );
    }
}

impl Report {
    /// A report over `rounds`, with its ratios computed.
    pub fn new(device: String, lat_sizes: Vec<u64>, bw_size: u64, rounds: Vec<Round>) -> Self {
        let ratios = ratios(&lat_sizes, bw_size, &rounds);
        Report { device, lat_sizes, bw_size, rounds, ratios }
    }

    /// A report read back from `farbench rdma --json` text, with its ratios computed. Files of older
    /// builds lack `lat_sizes` (taken from the first round's READ phases, in order) and `bw_size`
    /// (64 KiB, the only size they used).
    pub fn from_json(text: &str) -> Result<Self> {
        let mut r: Report = serde_json::from_str(text)?;
        if r.lat_sizes.is_empty() {
            let first = r.rounds.first().map(|x| x.ours_lat.as_slice()).unwrap_or_default();
            r.lat_sizes = first.iter().filter(|p| p.op == "read").map(|p| p.size).collect();
        }
        if r.bw_size == 0 {
            r.bw_size = 64 << 10;
        }
        Ok(Report::new(r.device, r.lat_sizes, r.bw_size, r.rounds))
    }

    /// All rounds of `runs` as one report, with the ratios computed over all of them. Each round is
    /// paired within itself (perftest and ours back to back in one boot), so rounds of different
    /// boots pool: the paired median and its interval are then over every round. The runs must agree
    /// on the device, the latency sizes and the bandwidth size.
    pub fn pooled(runs: &[Report]) -> Result<Report> {
        let first = runs.first().ok_or_else(|| anyhow!("no runs to pool"))?;
        let mut rounds = Vec::new();
        for (i, r) in runs.iter().enumerate() {
            ensure!(
                r.device == first.device && r.lat_sizes == first.lat_sizes && r.bw_size == first.bw_size,
                "run {} measured {} at sizes {:?} / {} B, the first {} at {:?} / {} B: not comparable",
                i + 1,
                r.device,
                r.lat_sizes,
                r.bw_size,
                first.device,
                first.lat_sizes,
                first.bw_size
            );
            rounds.extend(r.rounds.iter().cloned());
        }
        Ok(Report::new(first.device.clone(), first.lat_sizes.clone(), first.bw_size, rounds))
    }
}

/// Arguments of `farbench rdma-report`.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// `farbench rdma --json` files (from one boot or several) whose rounds are pooled.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Write the pooled report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Report bars but exit 0 even when one fails.
    #[arg(long)]
    pub no_check: bool,
}

/// One line per paired ratio of `pooled`: each run's own median of it, in run order.
fn per_run_medians(pooled: &Report, runs: &[Report]) -> Vec<String> {
    pooled
        .ratios
        .iter()
        .filter(|x| x.what.contains(" paired"))
        .map(|x| {
            let medians: Vec<String> = runs
                .iter()
                .map(|r| {
                    r.ratios.iter().find(|y| y.what == x.what).map_or("-".to_string(), |y| format!("{:.2}", y.ratio))
                })
                .collect();
            format!("rdma {}: per run {}", x.what, medians.join(" "))
        })
        .collect()
}

/// `farbench rdma-report`: the ratios and bars over the rounds of several `farbench rdma` runs.
pub fn report(a: &ReportArgs) -> Result<ExitCode> {
    let mut runs = Vec::new();
    for f in &a.files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let run = Report::from_json(&text)
            .with_context(|| format!("{}: not a `farbench rdma --json` report", f.display()))?;
        eprintln!("{}: {} rounds on {}", f.display(), run.rounds.len(), run.device);
        runs.push(run);
    }
    let pooled = Report::pooled(&runs)?;
    print_ratios(&pooled.ratios, Some(runs.len()));
    // Rounds of one boot share that boot's state, so the pooled interval assumes more independence
    // than there is; each run's own paired medians, beside it, show how far the boots differ.
    for line in per_run_medians(&pooled, &runs) {
        println!("{line}");
    }
    finish(&pooled, a.json.as_deref(), a.no_check)
}

/// A data endpoint to server 0 that is known to run over rdma.
fn rdma_endpoint(pool: &Pool) -> Result<Endpoint> {
    let ep = pool.endpoint(0)?;
    ensure!(ep.kind() == TransportKind::Rdma, "endpoint is {}", ep.kind());
    Ok(ep)
}

/// Where each phase gets its data endpoint: a fresh one (a new queue pair, as each perftest run sets
/// up its own), or the one kept for the whole run (`--keep-endpoint`).
struct Endpoints<'a> {
    pool: &'a Pool,
    kept: Option<Endpoint>,
    /// Pause after closing a fresh endpoint (both sides tear their queue pair down meanwhile).
    settle: Duration,
}

impl Endpoints<'_> {
    /// Run `phase` on the kept endpoint, or on a fresh one that is closed afterwards.
    fn with<T>(&mut self, phase: impl FnOnce(&mut Endpoint) -> Result<T>) -> Result<T> {
        match &mut self.kept {
            Some(ep) => phase(ep),
            None => {
                let mut ep = rdma_endpoint(self.pool)?;
                let r = phase(&mut ep);
                drop(ep);
                std::thread::sleep(self.settle);
                r
            }
        }
    }
}

fn one_round(a: &RdmaArgs, r: u32, lease: &Lease, eps: &mut Endpoints<'_>, arena: &mut Arena) -> Result<Round> {
    let mut round = Round::default();
    // Our two READ paths alternate which goes first from round to round, so neither always follows
    // perftest directly.
    let reads = if r.is_multiple_of(2) { ["read", "read-copy"] } else { ["read-copy", "read"] };
    for &size in &a.lat_sizes {
        round.run_perftest_lat(a, size)?;
        for op in reads {
            round.ours_lat.push(eps.with(|ep| latency(ep, lease, arena, op, size, a.iters))?);
        }
    }
    round.ours_lat.push(eps.with(|ep| latency(ep, lease, arena, "write", 8, a.iters))?);
    round.ours_lat.push(eps.with(|ep| latency(ep, lease, arena, "faa", 8, a.iters))?);
    if !a.no_perftest {
        let out = perftest(a, "ib_read_bw", a.bw_size, a.bw_iters)?;
        round.perftest_bw_mib_s = parse_perftest(&out, a.bw_size, 3);
    }
    round.ours_bw_mib_s = Some(eps.with(|ep| bandwidth(ep, lease, a.bw_size, a.bw_iters, a.depth))?);
    Ok(round)
}

/// A latency-pair round (`--lat-rounds`): at each latency size, `ib_read_lat` and our arena READ, in
/// an order that alternates from pair to pair (perftest first in even ones).
fn pair_round(a: &RdmaArgs, p: u32, lease: &Lease, eps: &mut Endpoints<'_>, arena: &mut Arena) -> Result<Round> {
    let mut round = Round::default();
    let ours_first = !p.is_multiple_of(2);
    for &size in &a.lat_sizes {
        if ours_first {
            round.ours_lat.push(eps.with(|ep| latency(ep, lease, arena, "read", size, a.iters))?);
        }
        round.run_perftest_lat(a, size)?;
        if !ours_first {
            round.ours_lat.push(eps.with(|ep| latency(ep, lease, arena, "read", size, a.iters))?);
        }
    }
    Ok(round)
}

/// Wait for `want` completions (bounded), failing on the first error.
fn reap(t: &mut dyn Transport, done: &mut Vec<Completion>, want: usize) -> Result<usize> {
    done.clear();
    let n = t.poll(done, want, POLL_TIMEOUT)?;
    ensure!(n > 0, "no completion within {POLL_TIMEOUT:?}");
    for c in done.drain(..) {
        c.result.map_err(|e| anyhow!("operation {} failed: {e}", c.wr_id))?;
    }
    Ok(n)
}

/// Depth-1 latency: one blocking operation at a time, `iters` times after a warm-up. `read`: the
/// buffer manager's page-fault call, [`Endpoint::read_into`] a slice of a registered [`Arena`] (lease
/// checks, then the transport's depth-1 path: one post straight into the arena, busy-poll its
/// completion; what perftest's `ib_read_lat` does with its registered buffer). `read-copy`:
/// `Transport::run_one` (the call the page tier makes for a one-page batch), whose bytes come back as
/// `Bytes`: the staging span itself from 1 KiB on, a copy below. `write` and `faa`: `run_one`.
fn latency(ep: &mut Endpoint, lease: &Lease, arena: &mut Arena, op: &str, size: u64, iters: u64) -> Result<LatPhase> {
    let warmup = (iters / 10).clamp(10, 1000);
    // As perftest does: one cycle-counter read per iteration (`CycleClock`), taken before the post; a
    // sample is the distance between two consecutive readings (the whole post + poll loop). Readings
    // go to a vector and into the histogram after the loop, so nothing but the operation runs between
    // two posts.
    let clock = CycleClock::start(true);
    let mut stamps = Vec::with_capacity(iters as usize + 1);
    if op == "read" {
        let mut dst = arena.slice_mut(0..size as usize)?;
        timed(&clock, &mut stamps, warmup + iters, warmup, op, |_| ep.read_into(lease, 0, 0, &mut dst))?;
    } else {
        let addr = lease.addr(0, 0, size)?;
        let kind = match op {
            "read-copy" => OpKind::Read { len: size as u32 },
            "write" => OpKind::Write { data: bytes::Bytes::from(vec![7u8; size as usize]) },
            _ => OpKind::FetchAdd { add: 1 },
        };
        let t = ep.transport();
        timed(&clock, &mut stamps, warmup + iters, warmup, op, |i| {
            t.run_one(WorkRequest { wr_id: i, addr, op: kind.clone() }).map(drop)
        })?;
    }
    let post_gap_p50_us = post_gap_p50_us(&clock);
    clock.to_ns(&mut stamps);
    let mut hist = LatencyHist::new();
    for w in stamps.windows(2) {
        hist.record(Duration::from_nanos(w[1].saturating_sub(w[0])));
    }
    let phase = LatPhase {
        op: op.into(),
        size,
        min_us: hist.quantile_us(0.0),
        p50_us: hist.quantile_us(0.5),
        p99_us: hist.quantile_us(0.99),
        post_gap_p50_us,
    };
    Ok(phase)
}

/// The median of the depth-1 path's post gaps since the last call (`farpool_rdma::probe`), in
/// microseconds; `None` unless built with `farpool-rdma/probe` (and on the cycle counter).
fn post_gap_p50_us(clock: &CycleClock) -> Option<f64> {
    farpool_rdma::probe::take_p50_us(clock.mhz()?)
}

/// Run `one` `total` times; from iteration `skip` on, read the cycle counter before each call and once
/// after the last (the samples are the distances between consecutive readings).
fn timed(
    clock: &CycleClock,
    stamps: &mut Vec<u64>,
    total: u64,
    skip: u64,
    op: &str,
    mut one: impl FnMut(u64) -> farpool::Result<()>,
) -> Result<()> {
    for i in 0..=total {
        if i >= skip {
            stamps.push(clock.now());
        }
        if i == total {
            break;
        }
        one(i).map_err(|e| anyhow!("{op} {i} failed: {e}"))?;
    }
    Ok(())
}

/// `depth` READs of `size` kept in flight until `iters` completed; MiB/s.
fn bandwidth(ep: &mut Endpoint, lease: &Lease, size: u64, iters: u64, depth: usize) -> Result<f64> {
    let addr = lease.addr(0, 0, size)?;
    let t = ep.transport();
    let mut batch = Vec::with_capacity(depth);
    let mut done = Vec::with_capacity(depth);
    let (mut posted, mut completed) = (0u64, 0u64);
    let t0 = Instant::now();
    while completed < iters {
        while posted < iters && batch.len() + t.inflight() < depth {
            batch.push(WorkRequest { wr_id: posted, addr, op: OpKind::Read { len: size as u32 } });
            posted += 1;
        }
        t.post(&mut batch)?;
        completed += reap(t, &mut done, depth)? as u64;
    }
    Ok((size * iters) as f64 / t0.elapsed().as_secs_f64() / f64::from(1 << 20))
}

/// Run one perftest test (server + client on 127.0.0.1); the client's output.
fn perftest(a: &RdmaArgs, test: &str, size: u64, iters: u64) -> Result<String> {
    let mut args =
        vec!["-d".to_string(), a.device.clone(), "-s".into(), size.to_string(), "-n".into(), iters.to_string()];
    if let Some(g) = a.gid_index {
        args.extend(["-x".into(), g.to_string()]);
    }
    if test.ends_with("_bw") {
        args.extend(["-t".into(), a.depth.to_string()]);
    }
    let mut server = Command::new(test)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {test} (perftest installed?)"))?;
    let deadline = Instant::now() + PERFTEST_TIMEOUT;
    while !perftest_listening() {
        if server.try_wait()?.is_some() || Instant::now() >= deadline {
            let _ = server.kill();
            bail!("{test} server did not start listening");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = Command::new(test).args(&args).arg("127.0.0.1").stderr(Stdio::null()).output();
    let _ = server.kill();
    let _ = server.wait();
    std::thread::sleep(Duration::from_millis(a.settle_ms));
    let out = String::from_utf8_lossy(&client?.stdout).into_owned();
    let row = out.lines().find(|l| l.split_whitespace().next() == Some(size.to_string().as_str()));
    eprintln!("{test} -s {size} -n {iters}: {}", row.map(str::trim).unwrap_or("(no result row)"));
    Ok(out)
}

fn perftest_listening() -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|p| {
        std::fs::read_to_string(p).unwrap_or_default().lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(PERFTEST_PORT_HEX.trim()) && f[3] == "0A"
        })
    })
}

/// The `col`-th field of perftest's result row for `size` (lat: 2 = t_min, 4 = t_typical; bw: 3 = BW
/// average).
pub fn parse_perftest(out: &str, size: u64, col: usize) -> Option<f64> {
    out.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&size.to_string().as_str()) && f.len() > col).then(|| f[col].parse().ok()).flatten()
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// A distribution-free 95% confidence interval for the median of `v`: the order statistics
/// `x(k)` and `x(n+1-k)` (1-based, sorted) for the largest `k` with `P(Bin(n, 1/2) < k) <= 0.025`.
/// It assumes only that the values are independent draws of one distribution, which is what the
/// rounds are: on Soft-RoCE each run falls into one of rxe's latency modes by a race (BENCHMARKS.md,
/// rdma, session 6), so a round's ratio is a draw of a wide, lumpy distribution and a few rounds
/// cannot pin its median down. `None` below 6 values (no such `k` exists).
pub fn median_ci95(v: &[f64]) -> Option<[f64; 2]> {
    let n = v.len();
    // P(Bin(n, 1/2) <= j) for j = 0, 1, ... until it passes 0.025; k is the count that stayed under.
    let mut k = 0usize;
    let (mut term, mut cdf) = (0.5f64.powi(i32::try_from(n).ok()?), 0.0);
    while k < n {
        cdf += term;
        if cdf > 0.025 {
            break;
        }
        // C(n, k+1) / C(n, k) = (n - k) / (k + 1)
        term *= (n - k) as f64 / (k + 1) as f64;
        k += 1;
    }
    if k == 0 {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some([s[k - 1], s[n - k]])
}

/// Largest over smallest (1.0 for fewer than two values).
fn spread(v: &[f64]) -> f64 {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    if v.len() < 2 || lo <= 0.0 { 1.0 } else { hi / lo }
}

fn ratio(what: String, ours: Option<f64>, pts: Vec<f64>, le: Option<f64>, ge: Option<f64>) -> Option<Ratio> {
    let (o, p) = (ours?, median(pts.clone())?);
    let r = o / p;
    let (bar, pass) = match (le, ge) {
        (Some(m), _) => (Some(format!("<= {m}")), Some(r <= m)),
        (_, Some(m)) => (Some(format!(">= {m}")), Some(r >= m)),
        _ => (None, None),
    };
    Some(Ratio {
        what,
        ours: o,
        perftest: p,
        ratio: r,
        perftest_spread: spread(&pts),
        ci95: None,
        rounds: pts.len(),
        bar,
        pass,
    })
}

fn ratios(lat_sizes: &[u64], bw_size: u64, rounds: &[Round]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for (i, &size) in lat_sizes.iter().enumerate() {
        // The bar is on `read` (into a registered arena, as ib_read_lat reads into its registered
        // buffer); `read-copy` (run_one, bytes returned as `Bytes`) is reported beside it, unbarred.
        for (op, label, barred) in [("read", "", true), ("read-copy", " read-copy (run_one)", false)] {
            let p50 = |r: &Round| r.ours_lat.iter().find(|p| p.op == op && p.size == size).map(|p| p.p50_us);
            let min = |r: &Round| r.ours_lat.iter().find(|p| p.op == op && p.size == size).map(|p| p.min_us);
            // The median over rounds of each round's ratio. Each round runs ib_read_lat and then ours
            // back to back, so a slow drift of the emulated machine (its host's other load comes and
            // goes over seconds) hits both sides of a round alike and cancels in its ratio.
            let pairs: Vec<(f64, f64)> = rounds
                .iter()
                .filter_map(|r| Some((p50(r)?, r.perftest_typical(i)?)))
                .filter(|&(_, p)| p > 0.0)
                .collect();
            let pts: Vec<f64> = pairs.iter().map(|&(_, p)| p).collect();
            let per_round: Vec<f64> = pairs.iter().map(|&(o, p)| o / p).collect();
            if let (Some(o), Some(p), Some(r)) =
                (median(pairs.iter().map(|&(o, _)| o).collect()), median(pts.clone()), median(per_round.clone()))
            {
                out.push(Ratio {
                    what: format!("READ {size} B p50 us paired{label}"),
                    ours: o,
                    perftest: p,
                    ratio: r,
                    perftest_spread: spread(&pts),
                    ci95: median_ci95(&per_round),
                    rounds: per_round.len(),
                    bar: barred.then(|| format!("<= {READ_LAT_RATIO_MAX}")),
                    pass: barred.then_some(r <= READ_LAT_RATIO_MAX),
                });
            }
            if !barred {
                continue;
            }
            // For reference: the ratio of the medians, of each side's best round, and of the minimums.
            let ours = median(rounds.iter().filter_map(p50).collect());
            let pts = rounds.iter().filter_map(|r| r.perftest_typical(i)).collect();
            out.extend(ratio(format!("READ {size} B p50 us"), ours, pts, None, None));
            let best = |v: Vec<f64>| v.into_iter().reduce(f64::min);
            let ours_best = best(rounds.iter().filter_map(p50).collect());
            let pt_best: Vec<f64> =
                best(rounds.iter().filter_map(|r| r.perftest_typical(i)).collect()).into_iter().collect();
            out.extend(ratio(format!("READ {size} B p50 us best round"), ours_best, pt_best, None, None));
            let ours_min = median(rounds.iter().filter_map(min).collect());
            let pt_min = rounds.iter().filter_map(|r| r.perftest_min(i)).collect();
            out.extend(ratio(format!("READ {size} B min us"), ours_min, pt_min, None, None));
        }
    }
    let ours = median(rounds.iter().filter_map(|r| r.ours_bw_mib_s).collect());
    let pts = rounds.iter().filter_map(|r| r.perftest_bw_mib_s).collect();
    out.extend(ratio(format!("READ {bw_size} B bandwidth MiB/s"), ours, pts, None, Some(READ_BW_RATIO_MIN)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perftest_rows() {
        let lat = " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]\n \
                   8       1000          22.59          18356.19      38.31   \t       761.77\n";
        assert_eq!(parse_perftest(lat, 8, 4), Some(38.31));
        assert_eq!(parse_perftest(lat, 16, 4), None);
        let bw = " #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n \
                  65536      2000             512.10             498.55  \t\t   0.007977\n";
        assert_eq!(parse_perftest(bw, 65536, 3), Some(498.55));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn median_ci95_uses_the_binomial_order_statistics() {
        let v = |n: usize| (1..=n).map(|i| i as f64).rev().collect::<Vec<_>>();
        // Too few rounds for any 95% interval.
        assert_eq!(median_ci95(&v(5)), None);
        assert_eq!(median_ci95(&[]), None);
        // n = 6, 7, 8: P(B <= 0) <= 0.025 < P(B <= 1): the extremes.
        assert_eq!(median_ci95(&v(6)), Some([1.0, 6.0]));
        assert_eq!(median_ci95(&v(8)), Some([1.0, 8.0]));
        // n = 9: P(B <= 1) = 10/512 = 0.0195: the 2nd smallest and largest.
        assert_eq!(median_ci95(&v(9)), Some([2.0, 8.0]));
        // n = 11: P(B <= 2) = 67/2048 = 0.033 > 0.025: still the 2nd.
        assert_eq!(median_ci95(&v(11)), Some([2.0, 10.0]));
        // n = 20: the 6th and 15th (the textbook table).
        assert_eq!(median_ci95(&v(20)), Some([6.0, 15.0]));
    }

    fn round(ours_p50: f64, pt_typical: f64) -> Round {
        let lat = LatPhase {
            op: "read".into(),
            size: 8,
            min_us: 1.0,
            p50_us: ours_p50,
            p99_us: ours_p50,
            post_gap_p50_us: None,
        };
        // The copying path at twice the time, listed first: lines are found by op, not position.
        let copy = LatPhase { op: "read-copy".into(), p50_us: 2.0 * ours_p50, ..lat.clone() };
        Round {
            ours_lat: vec![copy, lat],
            perftest_lat_typical_us: vec![Some(pt_typical)],
            perftest_lat_min_us: vec![Some(1.0)],
            ours_bw_mib_s: Some(90.0),
            perftest_bw_mib_s: Some(100.0),
        }
    }

    /// A latency-pair round (`--lat-rounds`): the barred READ only, no bandwidth.
    fn pair(ours_p50: f64, pt_typical: f64) -> Round {
        let mut r = round(ours_p50, pt_typical);
        r.ours_lat.retain(|p| p.op == "read");
        r.ours_bw_mib_s = None;
        r.perftest_bw_mib_s = None;
        r
    }

    #[test]
    fn paired_ratio_cancels_drift_between_rounds() {
        // The machine slows down 4x between rounds; ours is 1.1x perftest within every round.
        let rounds =
            vec![round(22.0, 20.0), round(88.0, 80.0), round(44.0, 40.0), round(88.0, 80.0), round(22.0, 20.0)];
        let r = ratios(&[8], 64 << 10, &rounds);
        let paired = r.iter().find(|x| x.what == "READ 8 B p50 us paired").expect("paired line");
        assert!((paired.ratio - 1.1).abs() < 1e-9, "{paired:?}");
        assert_eq!(paired.pass, Some(true));
        assert!((paired.perftest_spread - 4.0).abs() < 1e-9);
        assert_eq!(paired.rounds, 5);
        assert_eq!(paired.ci95, None, "5 rounds give no 95% interval");
        let copy = r.iter().find(|x| x.what == "READ 8 B p50 us paired read-copy (run_one)").expect("read-copy line");
        assert!((copy.ratio - 2.2).abs() < 1e-9 && copy.bar.is_none() && copy.pass.is_none(), "{copy:?}");
        // Ours 1.5x in three rounds of five: the bar is missed.
        let rounds =
            vec![round(30.0, 20.0), round(88.0, 80.0), round(60.0, 40.0), round(120.0, 80.0), round(22.0, 20.0)];
        let paired = ratios(&[8], 64 << 10, &rounds).into_iter().find(|x| x.what == "READ 8 B p50 us paired").unwrap();
        assert!((paired.ratio - 1.5).abs() < 1e-9 && paired.pass == Some(false), "{paired:?}");
        let bw = ratios(&[8], 64 << 10, &rounds).into_iter().find(|x| x.what.contains("bandwidth")).unwrap();
        assert!((bw.ratio - 0.9).abs() < 1e-9 && bw.pass == Some(true));
    }

    #[test]
    fn full_rounds_are_spread_among_the_latency_pairs() {
        for (full, total) in [(11u32, 33u32), (11, 11), (3, 10), (1, 7), (5, 6)] {
            let marks: Vec<bool> = (0..total).map(|r| is_full_round(r, full, total)).collect();
            assert_eq!(marks.iter().filter(|&&m| m).count(), full as usize, "{full} of {total}: {marks:?}");
            assert!(marks[0], "the first round is full ({full} of {total})");
            // Evenly: between two full rounds at most ceil(total / full) - 1 pairs.
            let idx: Vec<usize> = (0..marks.len()).filter(|&i| marks[i]).collect();
            let widest = idx.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(1) as u32;
            assert!(widest <= total.div_ceil(full), "{full} of {total}: {marks:?}");
        }
    }

    #[test]
    fn latency_pairs_count_in_the_latency_ratio_only() {
        // Two full rounds at 1.1 and five pairs at 0.9: the paired median is over all seven rounds, the
        // bandwidth over the two full ones; pairs lack the read-copy phase and the 8 KiB size is absent
        // from every round here without a panic.
        let mut rounds = vec![round(22.0, 20.0), round(44.0, 40.0)];
        rounds.extend((0..5).map(|_| pair(18.0, 20.0)));
        let r = ratios(&[8, 8192], 64 << 10, &rounds);
        let paired = r.iter().find(|x| x.what == "READ 8 B p50 us paired").unwrap();
        assert_eq!(paired.rounds, 7);
        assert!((paired.ratio - 0.9).abs() < 1e-9, "{paired:?}");
        assert!(paired.ci95.is_some(), "7 rounds give an interval");
        let copy = r.iter().find(|x| x.what == "READ 8 B p50 us paired read-copy (run_one)").unwrap();
        assert_eq!(copy.rounds, 2);
        let bw = r.iter().find(|x| x.what.contains("bandwidth")).unwrap();
        assert_eq!(bw.rounds, 2);
        assert!(!r.iter().any(|x| x.what.contains("8192")), "no 8 KiB figures without 8 KiB phases");
    }

    #[test]
    fn reports_pool_across_runs_and_refuse_mismatches() {
        let a = Report::new("rxe_lo".into(), vec![8], 64 << 10, (0..4).map(|_| round(30.0, 20.0)).collect());
        let b = Report::new("rxe_lo".into(), vec![8], 64 << 10, (0..4).map(|_| round(20.0, 20.0)).collect());
        assert_eq!(a.ratios.iter().find(|x| x.what == "READ 8 B p50 us paired").unwrap().pass, Some(false));
        // Through JSON, as `rdma-report` reads them.
        let back: Vec<Report> =
            [&a, &b].iter().map(|r| Report::from_json(&serde_json::to_string(r).unwrap()).unwrap()).collect();
        let pooled = Report::pooled(&back).unwrap();
        assert_eq!(pooled.rounds.len(), 8);
        let paired = pooled.ratios.iter().find(|x| x.what == "READ 8 B p50 us paired").unwrap();
        assert_eq!(paired.rounds, 8);
        // Upper median of four 1.0 and four 1.5.
        assert!((paired.ratio - 1.5).abs() < 1e-9, "{paired:?}");
        assert_eq!(paired.ci95, Some([1.0, 1.5]));
        let lines = per_run_medians(&pooled, &back);
        assert!(lines.contains(&"rdma READ 8 B p50 us paired: per run 1.50 1.00".to_string()), "{lines:?}");
        let other = Report::new("rxe_lo".into(), vec![8, 8192], 64 << 10, vec![round(20.0, 20.0)]);
        let e = Report::pooled(&[a.clone(), other]).unwrap_err().to_string();
        assert!(e.contains("not comparable"), "{e}");
        assert!(Report::pooled(&[]).is_err());
    }

    #[test]
    fn older_reports_without_sizes_still_pool() {
        // A file written before `lat_sizes` and `bw_size` were recorded (and with a bare bandwidth).
        let old = r#"{"device":"rxe_lo","rounds":[{"ours_lat":[{"op":"read","size":8,"min_us":20.0,
            "p50_us":22.0,"p99_us":30.0},{"op":"read","size":8192,"min_us":90.0,"p50_us":100.0,"p99_us":120.0}],
            "perftest_lat_typical_us":[20.0,100.0],"perftest_lat_min_us":[19.0,90.0],"ours_bw_mib_s":40.0,
            "perftest_bw_mib_s":50.0}],"ratios":[]}"#;
        let r = Report::from_json(old).unwrap();
        assert_eq!(r.lat_sizes, vec![8, 8192]);
        assert_eq!(r.bw_size, 64 << 10);
        let pooled = Report::pooled(&[r.clone(), r]).unwrap();
        let paired = pooled.ratios.iter().find(|x| x.what == "READ 8 B p50 us paired").unwrap();
        assert!((paired.ratio - 1.1).abs() < 1e-9 && paired.rounds == 2, "{paired:?}");
        let bw = pooled.ratios.iter().find(|x| x.what == "READ 65536 B bandwidth MiB/s").unwrap();
        assert!((bw.ratio - 0.8).abs() < 1e-9, "{bw:?}");
    }
}
