//! `farbench demo`: the README's main job. Starts an embedded memory server, checks that bytes written
//! through farpool read back intact, then runs a short perftest-style workload (~15 s: reads of 64 B,
//! 8 KiB and 64 KiB, 1 connection and 16 connections x 16, with the ping-pong and Redis baselines) and
//! prints the summary table with the bars.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::op::BenchOp;
use crate::suite::{SuiteConfig, run_suite};

/// Flags of `farbench demo`.
#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// farpool memory server to use; default: an embedded server started in-process on 127.0.0.1:0.
    #[arg(long)]
    pub server: Option<SocketAddr>,
    /// Skip the Redis baseline.
    #[arg(long)]
    pub no_redis: bool,
    /// Write every figure as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Render p50 latency vs size as SVG to this file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
}

impl DemoArgs {
    /// The short suite the demo runs.
    pub fn suite(&self) -> SuiteConfig {
        SuiteConfig {
            tool: "farbench demo".into(),
            op: BenchOp::Read,
            sizes: vec![64, 8 << 10, 64 << 10],
            lat_conns: 1,
            lat_depth: 1,
            iters: 10_000,
            lat_duration: Duration::from_millis(600),
            tput_conns: 16,
            tput_depth: 16,
            tput_refill: crate::driver::Refill::Batch,
            tput_threads: crate::tcp::default_client_threads(),
            tput_duration: Duration::from_millis(900),
            server: self.server,
            server_workers: 0,
            pingpong: true,
            redis: !self.no_redis,
            rounds: 6,
        }
    }
}

/// Run `farbench demo`.
pub fn run(args: &DemoArgs) -> Result<ExitCode> {
    let suite = args.suite();
    smoke(args.server)?;
    let report = run_suite(&suite)?;
    crate::tcp::finish(&report, args.json.as_deref(), args.svg.as_deref(), false)
}

/// Write patterned buffers of 8 B, 8 KiB and 1 MiB through farpool and read them back.
fn smoke(server: Option<SocketAddr>) -> Result<()> {
    let target = crate::target::FarpoolTarget::start(server, 0)?;
    for len in [8usize, 8 << 10, 1 << 20] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
        target.verify_round_trip(&data)?;
    }
    println!("farbench demo: {}: wrote and read back 8B, 8KiB and 1MiB intact", target.describe());
    Ok(())
}
