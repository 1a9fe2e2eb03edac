//! `farbench bufferpool`: the buffer-pool workload. The same buffer manager (`farpool-bufmgr`, data file
//! with O_DIRECT, CLOCK frames) runs with SSD only, then with the far page tier over each transport
//! available (tcp, shm, rdma when built and present), on the same data file, in one run; Zipf (theta
//! 0.99, scrambled) and uniform page accesses, 10% updates, the data file 4x the frames.
//!
//! Reported per run: throughput (page accesses/s), page-miss latency p50/p99 (pins that were not in a
//! frame), far-tier hit rate (misses served by far memory / all misses), and the ratios to SSD-only with
//! PASS/FAIL against the bars (Zipf: shm >= 3x, tcp >= 1x). Every figure is measured in this run.
//!
//! The page cache cannot hide the disk: the data file is opened with O_DIRECT; where the file system
//! refuses it the run says so and falls back to posix_fadvise(DONTNEED) after every access.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args as ClapArgs;
use farpool::tier::{FarBackend, PageTier};
use farpool_bufmgr::{BufferManager, DataFile, Source};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

mod far;

pub use far::{FarSetup, Mode};

/// Arguments of `farbench bufferpool`.
#[derive(Clone, Debug, ClapArgs)]
#[command(after_help = "Examples:
  farbench bufferpool                                  # 256MiB data, 64MiB frames, ssd + tcp + shm, ~1 min
  farbench bufferpool --data 4GiB --frames 1GiB --threads 8 --duration-s 20
  farbench bufferpool --modes ssd,tcp --dist zipf      # just the tcp bar
  farbench bufferpool --server 10.0.0.5:7070 --modes ssd,tcp   # a remote memory server")]
pub struct Args {
    /// Exit with status 2 when a performance bar fails (default: report it and exit 0, like `farbench tcp`).
    #[arg(long)]
    pub fail_on_bar: bool,
    /// Size of the data file (4x the frames by the workload's definition).
    #[arg(long, default_value = "256MiB", value_parser = crate::op::size_arg)]
    pub data: u64,
    /// Local frame pool size.
    #[arg(long, default_value = "64MiB", value_parser = crate::op::size_arg)]
    pub frames: u64,
    /// Page size (4KiB, 8KiB or 16KiB).
    #[arg(long, default_value = "8KiB", value_parser = crate::op::size_arg)]
    pub page_size: u64,
    /// Worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Measured seconds per run (after the warm-up).
    #[arg(long, default_value_t = 4)]
    pub duration_s: u64,
    /// Warm-up seconds per run (fills frames and far tier; not measured).
    #[arg(long, default_value_t = 2)]
    pub warmup_s: u64,
    /// Access distributions to run, comma separated: zipf, uniform.
    #[arg(long, default_value = "zipf,uniform", value_delimiter = ',')]
    pub dist: Vec<String>,
    /// Zipf skew.
    #[arg(long, default_value_t = 0.99)]
    pub theta: f64,
    /// Fraction of accesses that update the page.
    #[arg(long, default_value_t = 0.1)]
    pub update_ratio: f64,
    /// Configurations, comma separated: ssd, tcp, shm, rdma, mem (in-process reference, not a transport).
    #[arg(long, default_value = "ssd,tcp,shm,rdma", value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Far memory the tier may use (default: as much as the data file).
    #[arg(long, value_parser = crate::op::size_arg)]
    pub far_max: Option<u64>,
    /// Directory for the data file (default: the system temp dir). Put it on the SSD you mean to test.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Use this memory server instead of starting an embedded one.
    #[arg(long)]
    pub server: Option<String>,
    /// Seed of the access generators.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Writer threads of the page tier.
    #[arg(long, default_value_t = 2)]
    pub tier_writers: usize,
    /// How long a tier writer waits to fill a small batch, microseconds (0: no wait).
    #[arg(long, default_value_t = 200)]
    pub write_linger_us: u64,
    /// I/O worker threads of the embedded memory server.
    #[arg(long, default_value_t = 2)]
    pub server_workers: usize,
}

/// Scrambled Zipfian over `0..n` (Gray et al., as in YCSB): rank r is drawn with P ~ 1/(r+1)^theta,
/// then hashed so the hot pages are spread over the file.
#[derive(Debug, Clone)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    /// A generator over `0..n`.
    pub fn new(n: u64, theta: f64) -> Self {
        let zeta = |k: u64| (1..=k).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Self { n, theta, alpha, zetan, eta }
    }

    /// The next page.
    pub fn next(&self, rng: &mut SmallRng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        let rank = if uz < 1.0 {
            0
        } else if uz < 1.0 + 0.5f64.powf(self.theta) {
            1
        } else {
            ((self.n as f64) * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64
        };
        // FNV-1a of the rank, to scatter the hot set.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in rank.min(self.n - 1).to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        h % self.n
    }
}

/// One run's figures.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// Configuration.
    pub mode: Mode,
    /// Distribution.
    pub dist: String,
    /// Page accesses per second.
    pub ops_per_s: f64,
    /// Page-miss latency percentiles, microseconds.
    pub miss_p50_us: f64,
    /// 99th percentile.
    pub miss_p99_us: f64,
    /// Misses served by far memory / all misses.
    pub far_hit_rate: f64,
    /// Frame hit rate.
    pub frame_hit_rate: f64,
}

struct Worker {
    ops: u64,
    hist: Histogram<u64>,
}

/// What the workers of one run share.
struct Shared<'a> {
    bm: &'a BufferManager,
    dist: &'a str,
    zipf: &'a Zipf,
    update: f64,
    stop: &'a AtomicBool,
    done: &'a AtomicU64,
    measure: &'a AtomicBool,
}

fn work(sh: &Shared<'_>, seed: u64) -> Result<Worker> {
    let Shared { bm, dist, zipf, update, stop, done, measure } = *sh;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut w = Worker { ops: 0, hist: Histogram::new_with_bounds(1, 60_000_000, 3)? };
    let n = bm.pages();
    let mut sum = 0u64;
    for i in 0u64.. {
        if i % 64 == 0 && stop.load(Ordering::Relaxed) {
            break;
        }
        let page = if dist == "zipf" { zipf.next(&mut rng) } else { rng.random_range(0..n) };
        let t0 = Instant::now();
        let p = bm.pin(page).with_context(|| format!("pin page {page}"))?;
        let missed = p.source() != Source::Frame;
        let dt = t0.elapsed();
        if rng.random_bool(update) {
            p.update(|b| b[0] = b[0].wrapping_add(1));
        } else {
            sum = sum.wrapping_add(u64::from(p.read().as_slice()[100]));
        }
        drop(p);
        if measure.load(Ordering::Relaxed) {
            w.ops += 1;
            done.fetch_add(1, Ordering::Relaxed);
            if missed {
                w.hist.saturating_record(dt.as_micros().max(1) as u64);
            }
        }
    }
    std::hint::black_box(sum);
    Ok(w)
}

fn one_run(
    args: &Args,
    file: DataFile,
    far: Option<PageTier>,
    mode: Mode,
    dist: &str,
) -> Result<(RunResult, DataFile)> {
    let frames = (args.frames / args.page_size) as usize;
    let bm = BufferManager::new(file, frames, far)?;
    let zipf = Zipf::new(bm.pages(), args.theta);
    let (stop, measure, done) = (AtomicBool::new(false), AtomicBool::new(false), AtomicU64::new(0));
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("template"));
    let label = format!("{:<5} {:<7}", mode.name(), dist);
    let shared =
        Shared { bm: &bm, dist, zipf: &zipf, update: args.update_ratio, stop: &stop, done: &done, measure: &measure };
    let results: Vec<Result<Worker>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..args.threads)
            .map(|t| {
                let seed = args.seed * 1000 + t as u64;
                let shared = &shared;
                s.spawn(move || work(shared, seed))
            })
            .collect();
        let start = Instant::now();
        let warm = Duration::from_secs(args.warmup_s);
        let total = warm + Duration::from_secs(args.duration_s);
        while start.elapsed() < total && !hs.iter().any(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
            let el = start.elapsed();
            if el >= warm && !measure.swap(true, Ordering::Relaxed) {
                bar.set_message(format!("{label} measuring"));
            }
            let phase = if el < warm { "warming up" } else { "measuring" };
            let st = bm.stats();
            bar.set_message(format!(
                "{label} {phase} {:>4.1}s  {} ops  far hits {}  disk reads {}",
                el.as_secs_f64(),
                done.load(Ordering::Relaxed),
                st.far_hits,
                st.disk_reads
            ));
            bar.tick();
        }
        stop.store(true, Ordering::Relaxed);
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| bail!("worker panicked"))).collect()
    });
    bar.finish_and_clear();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut ops = 0;
    for r in results {
        let w = r?;
        ops += w.ops;
        hist.add(&w.hist)?;
    }
    let st = bm.stats();
    let misses = st.far_hits + st.disk_reads;
    let res = RunResult {
        mode,
        dist: dist.to_owned(),
        ops_per_s: ops as f64 / args.duration_s.max(1) as f64,
        miss_p50_us: hist.value_at_quantile(0.5) as f64,
        miss_p99_us: hist.value_at_quantile(0.99) as f64,
        far_hit_rate: if misses == 0 { 0.0 } else { st.far_hits as f64 / misses as f64 },
        frame_hit_rate: st.frame_hits as f64 / (st.frame_hits + misses).max(1) as f64,
    };
    if let Some(t) = bm.tier() {
        let ts = t.stats();
        ts.assert_consistent();
        eprintln!(
            "  {label} tier: {} gets, {:.1}% hits, misses absent {} stale {} checksum {} revoked {} down {}, \
             puts {} published {} unchanged {} dropped {} rejected {} in {} write batches, {} evicted, rtt {:.1}us",
            ts.gets,
            100.0 * ts.hit_rate(),
            ts.miss_absent,
            ts.miss_stale,
            ts.miss_checksum,
            ts.miss_revoked,
            ts.miss_server_down,
            ts.puts,
            ts.puts_published,
            ts.puts_unchanged,
            ts.puts_dropped,
            ts.puts_rejected,
            ts.write_batches,
            ts.evictions,
            ts.rtt_ewma_ns as f64 / 1000.0
        );
    }
    bm.flush_all()?;
    Ok((res, bm.into_file()))
}

/// Run the workload; prints progress, then the summary table. Exit code 2 if a bar is not met and
/// `--fail-on-bar` was given, else 0.
pub fn run(args: &Args) -> Result<ExitCode> {
    if ![4096, 8192, 16384].contains(&args.page_size) {
        bail!("--page-size must be 4KiB, 8KiB or 16KiB");
    }
    if args.frames == 0 || args.data < args.frames {
        bail!("--data must be at least --frames (the workload uses 4x)");
    }
    let modes: Vec<Mode> = args.modes.iter().map(|m| m.parse()).collect::<Result<_>>()?;
    let dir =
        args.dir.clone().unwrap_or_else(std::env::temp_dir).join(format!("farbench-bufferpool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("data");
    let pages = args.data / args.page_size;
    eprintln!("creating {} data file ({pages} pages of {}) in {}", fmt(args.data), fmt(args.page_size), dir.display());
    let mut file = DataFile::create(&path, pages, args.page_size as usize)?;
    eprintln!(
        "data file I/O: {}",
        if file.is_direct() {
            "O_DIRECT (page cache bypassed)"
        } else {
            "buffered + posix_fadvise(DONTNEED) (O_DIRECT refused here)"
        }
    );
    let far_max = args.far_max.unwrap_or(args.data);
    let mut setup = FarSetup::new(args.server.clone(), far_max, args.server_workers)?;
    let mut results = Vec::new();
    for dist in &args.dist {
        if dist != "zipf" && dist != "uniform" {
            bail!("unknown distribution {dist:?} (zipf, uniform)");
        }
        for &mode in &modes {
            let far: Option<Arc<dyn FarBackend>> = match setup.backend(mode) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("  {:<5} {dist:<7} skipped: {e:#}", mode.name());
                    continue;
                }
            };
            let tier = match far {
                None => None,
                Some(b) => Some(
                    PageTier::builder(b)
                        .with_page_size(args.page_size as usize)
                        .with_capacity_bytes(0, far_max)
                        .with_writer_threads(args.tier_writers)
                        .with_write_linger(Duration::from_micros(args.write_linger_us))
                        .build()
                        .context("build the page tier")?,
                ),
            };
            let (r, f) = one_run(args, file, tier, mode, dist)?;
            file = f;
            print_row(&r);
            results.push(r);
        }
    }
    drop(setup);
    let _ = std::fs::remove_dir_all(&dir);
    summary(args, &results)
}

fn fmt(n: u64) -> String {
    farpool_core::size::format_bytes(n)
}

fn print_row(r: &RunResult) {
    eprintln!(
        "  {:<5} {:<7} {:>10.0} ops/s  miss p50 {:>7.1}us p99 {:>8.1}us  far hit {:>5.1}%  frame hit {:>5.1}%",
        r.mode.name(),
        r.dist,
        r.ops_per_s,
        r.miss_p50_us,
        r.miss_p99_us,
        100.0 * r.far_hit_rate,
        100.0 * r.frame_hit_rate
    );
}

fn summary(args: &Args, results: &[RunResult]) -> Result<ExitCode> {
    println!();
    println!(
        "bufferpool: data {} frames {} page {} threads {} updates {:.0}% ({}s measured per run)",
        fmt(args.data),
        fmt(args.frames),
        fmt(args.page_size),
        args.threads,
        100.0 * args.update_ratio,
        args.duration_s
    );
    println!("| dist    | config | ops/s      | miss p50 us | miss p99 us | far hit % | vs ssd | bar    | result |");
    println!("|---------|--------|------------|-------------|-------------|-----------|--------|--------|--------|");
    let mut failed = false;
    for r in results {
        let base = results.iter().find(|b| b.dist == r.dist && b.mode == Mode::Ssd).map(|b| b.ops_per_s);
        let ratio = base.filter(|&b| b > 0.0).map(|b| r.ops_per_s / b);
        let bar = if r.dist == "zipf" { r.mode.bar() } else { None };
        let verdict = match (bar, ratio) {
            (Some(b), Some(x)) if x >= b => "PASS",
            (Some(_), Some(_)) => {
                failed = true;
                "FAIL"
            }
            _ => "-",
        };
        println!(
            "| {:<7} | {:<6} | {:>10.0} | {:>11.1} | {:>11.1} | {:>9.1} | {:>6} | {:>6} | {:<6} |",
            r.dist,
            r.mode.name(),
            r.ops_per_s,
            r.miss_p50_us,
            r.miss_p99_us,
            100.0 * r.far_hit_rate,
            ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            bar.map_or("-".into(), |b| format!(">={b:.0}x")),
            verdict
        );
    }
    if failed {
        println!("some bars were not met (see FAIL rows)");
        if args.fail_on_bar {
            return Ok(ExitCode::from(2));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(10_000, 0.99);
        let mut rng = SmallRng::seed_from_u64(3);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..100_000 {
            let p = z.next(&mut rng);
            assert!(p < 10_000);
            *counts.entry(p).or_insert(0u32) += 1;
        }
        let mut v: Vec<u32> = counts.values().copied().collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        let top100: u32 = v.iter().take(100).sum();
        assert!(top100 > 30_000, "the top 1% of pages must take a large share: {top100}");
    }
}
