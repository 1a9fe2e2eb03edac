//! `farbench tcp`: perftest-style latency and bandwidth of farpool's TCP transport against raw TCP
//! ping-pong and Redis, measured side by side in one run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;

use crate::driver::Refill;
use crate::op::{BenchOp, parse_sizes};
use crate::report::{RunReport, Verdict};
use crate::suite::{SuiteConfig, run_suite};

/// A parsed `--sizes` list.
#[derive(Clone, Debug)]
pub struct SizeList(pub Vec<usize>);

fn size_list(s: &str) -> Result<SizeList> {
    parse_sizes(s).map(SizeList)
}

/// Flags of `farbench tcp`.
#[derive(Args, Clone, Debug)]
pub struct TcpArgs {
    /// Operation: read (Redis GET), write (Redis SET), cas (no Redis equivalent), faa (Redis INCRBY).
    #[arg(long, value_enum, default_value_t = BenchOp::Read)]
    pub op: BenchOp,
    /// Comma-separated operation sizes, 1 byte to 1M (atomics ignore this: 8 bytes).
    #[arg(long, default_value = "8,64,512,4K,8K,64K,1M", value_parser = size_list)]
    pub sizes: SizeList,
    /// Latency phase: operations in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub qd: usize,
    /// Latency phase: connections, one thread each.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Latency phase: operations per connection at most (after a warm-up of a tenth of it).
    #[arg(long, default_value_t = 20000)]
    pub iters: u64,
    /// Latency phase: milliseconds at most per size and system.
    #[arg(long, default_value_t = 600)]
    pub duration_ms: u64,
    /// Throughput phase: connections.
    #[arg(long, default_value_t = 16)]
    pub tput_conns: usize,
    /// Throughput phase: client threads driving the connections, each waiting on its share of them
    /// with poll(2) as redis-benchmark and memtier do (0: one thread per connection, blocking reads).
    /// Default: one per CPU. Every system is driven the same way.
    #[arg(long)]
    pub tput_threads: Option<usize>,
    /// Throughput phase: pipeline depth per connection.
    #[arg(long, default_value_t = 16)]
    pub tput_depth: usize,
    /// Throughput phase: `batch` sends DEPTH operations, waits for all of them, sends DEPTH more (as
    /// `redis-benchmark -P DEPTH`); `window` replaces each completion at once (a sliding window, as fio's
    /// iodepth). Every system is driven the same way.
    #[arg(long, value_enum, default_value_t = Refill::Batch)]
    pub tput_refill: Refill,
    /// Throughput phase: milliseconds per size and system (0 skips the phase).
    #[arg(long, default_value_t = 1000)]
    pub tput_ms: u64,
    /// Rounds per phase: each phase's operations and time are cut into this many slices and the systems
    /// take turns slice by slice, so bursts of load from other tenants of the machine hit all alike.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// farpool memory server to measure; default: an embedded server started in-process on 127.0.0.1:0.
    #[arg(long)]
    pub server: Option<SocketAddr>,
    /// I/O threads of the embedded server (0: its default, one per CPU; ignored with --server).
    #[arg(long, default_value_t = 0)]
    pub server_workers: usize,
    /// Skip the Redis baseline.
    #[arg(long)]
    pub no_redis: bool,
    /// Skip the raw TCP ping-pong baseline.
    #[arg(long)]
    pub no_pingpong: bool,
    /// Write every figure, ratio and bar verdict as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Render p50 latency vs size (farpool, tcp ping-pong, Redis) as SVG to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Exit with status 2 when a performance bar fails.
    #[arg(long)]
    pub fail_on_bar: bool,
}

/// Client threads of the throughput phase by default: one per CPU.
pub fn default_client_threads() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

/// Largest `--qd`, `--tput-depth`: the pool's in-flight bound per endpoint.
const DEPTH_MAX: usize = crate::target::INFLIGHT_MAX;
/// Largest `--threads`, `--tput-conns`.
const CONNS_MAX: usize = 256;

impl TcpArgs {
    /// Validate the flags and turn them into a suite.
    pub fn suite(&self, tool: &str) -> Result<SuiteConfig> {
        for (name, v, max) in [
            ("--qd", self.qd, DEPTH_MAX),
            ("--tput-depth", self.tput_depth, DEPTH_MAX),
            ("--threads", self.threads, CONNS_MAX),
            ("--tput-conns", self.tput_conns, CONNS_MAX),
        ] {
            if v == 0 || v > max {
                bail!("{name} must be between 1 and {max}, got {v}");
            }
        }
        if self.tput_threads.is_some_and(|t| t > CONNS_MAX) {
            bail!("--tput-threads must be at most {CONNS_MAX}");
        }
        if self.iters == 0 || self.duration_ms == 0 {
            bail!("--iters and --duration-ms must be positive");
        }
        if self.server_workers > 64 {
            bail!("--server-workers is bounded to 64");
        }
        if self.rounds == 0 || self.rounds > 20 {
            bail!("--rounds must be between 1 and 20, got {}", self.rounds);
        }
        if self.duration_ms > 60_000 || self.tput_ms > 60_000 {
            bail!("--duration-ms and --tput-ms are bounded to 60000 per phase");
        }
        Ok(SuiteConfig {
            tool: tool.into(),
            op: self.op,
            sizes: self.sizes.0.clone(),
            lat_conns: self.threads,
            lat_depth: self.qd,
            iters: self.iters,
            lat_duration: Duration::from_millis(self.duration_ms),
            tput_conns: self.tput_conns,
            tput_depth: self.tput_depth,
            tput_refill: self.tput_refill,
            tput_threads: self.tput_threads.unwrap_or_else(default_client_threads),
            tput_duration: Duration::from_millis(self.tput_ms),
            server: self.server,
            server_workers: self.server_workers,
            pingpong: !self.no_pingpong,
            redis: !self.no_redis,
            rounds: self.rounds,
        })
    }
}

/// Run `farbench tcp`.
pub fn run(args: &TcpArgs) -> Result<ExitCode> {
    let suite = args.suite("farbench tcp")?;
    let report = run_suite(&suite)?;
    finish(&report, args.json.as_deref(), args.svg.as_deref(), args.fail_on_bar)
}

/// Print the summary, write the optional files, and pick the exit code.
pub fn finish(
    report: &RunReport,
    json: Option<&std::path::Path>,
    svg: Option<&std::path::Path>,
    fail_on_bar: bool,
) -> Result<ExitCode> {
    print!("{}", crate::render::render_text(report));
    if let Some(p) = json {
        crate::output::write_json(report, p)?;
        println!("figures written to {}", p.display());
    }
    if let Some(p) = svg {
        crate::output::create_parent(p)?;
        crate::plot::render_latency_svg(report, p)?;
        println!("latency plot written to {}", p.display());
    }
    let failed = report.bars.iter().any(|b| b.verdict == Verdict::Fail);
    Ok(if failed && fail_on_bar { ExitCode::from(2) } else { ExitCode::SUCCESS })
}
