//! `farbench`: perftest-style benchmarks of farpool against raw TCP and Redis, and workload drivers.
//!
//! One module per subcommand (`farpool_bench::tcp`, `farpool_bench::demo`, ...), each with an `Args`
//! struct (clap derive) and a `run(&Args) -> Result<ExitCode>`; adding a workload is one module and one
//! variant of [`Command`].
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use farpool_bench::{bufferpool, demo, rdma, shm, tcp};

const EXAMPLES: &str = "\
Examples:
  farbench demo
      embedded server, ~15 s: data check, then 64B/8KiB/64KiB reads vs tcp ping-pong and Redis
  farbench tcp
      all sizes (8B..1MiB), reads, latency (1 conn x qd 1) and throughput (16 conns x 16), ~60 s
  farbench tcp --op write --sizes 4K,8K --json out/write.json --svg out/write.svg
  farbench tcp --op faa --iters 20000
  farbench tcp --server 127.0.0.1:7070 --qd 4 --threads 2 --tput-ms 0 --no-redis
  farbench rdma --device rxe_lo --gid-index 1 --rounds 7 --lat-rounds 27 --json boot1.json
      (Soft-RoCE guest) 7 full rounds beside perftest, 20 more READ latency pairs among them
  farbench rdma-report boot1.json boot2.json boot3.json
      the rdma ratios and bars over every round of several boots";

/// perftest-style benchmarks of farpool's transports against raw TCP and Redis.
#[derive(Parser, Debug)]
#[command(name = "farbench", version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// TCP transport: latency percentiles and bandwidth per size, against TCP ping-pong and Redis.
    #[command(after_help = EXAMPLES)]
    Tcp(tcp::TcpArgs),
    /// Short end-to-end run (~15 s) on an embedded server with a summary table (the README's main job).
    #[command(visible_alias = "quick")]
    Demo(demo::DemoArgs),
    /// Buffer-pool workload: SSD only vs the far page tier over tcp/shm/rdma, Zipf and uniform, ~1 min.
    Bufferpool(bufferpool::Args),
    /// Shared-memory transport: 8 KiB read/write latency and bandwidth beside a raw random memcpy.
    Shm(shm::ShmArgs),
    /// RDMA transport: READ/WRITE/FETCH_ADD latency and READ bandwidth beside perftest, interleaved.
    Rdma(rdma::RdmaArgs),
    /// The rdma bars over the rounds of several `farbench rdma --json` runs (boots) pooled.
    RdmaReport(rdma::ReportArgs),
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Tcp(a) => tcp::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Bufferpool(a) => bufferpool::run(a),
        Command::Shm(a) => shm::run(a),
        Command::Rdma(a) => rdma::run(a),
        Command::RdmaReport(a) => rdma::report(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("farbench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
