//! `farpool-sim`: run the page tier over the simulated cluster for one seed or a range of seeds, with
//! fault injection, checking the invariants after every op (see the `farpool_sim` crate docs).
//!
//! ```text
//! farpool-sim --seed 42                # one seed
//! farpool-sim --seeds 0..100 --ops 5000 # a range (end exclusive)
//! farpool-sim                          # a random seed, printed
//! ```
//! A failure prints the seed and the command that reproduces it, and exits with status 1.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use farpool_sim::{Corruption, RunConfig, RunReport, run};

#[derive(Debug, Parser)]
#[command(name = "farpool-sim", about = "VOPR-style simulation of the farpool page tier under faults")]
struct Args {
    /// Run this one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Run seeds A..B (end exclusive).
    #[arg(long, value_name = "A..B")]
    seeds: Option<String>,
    /// Workload ops per seed (over all threads).
    #[arg(long, default_value_t = 2000)]
    ops: u64,
    /// Simulated memory servers.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Workload threads.
    #[arg(long, default_value_t = 3)]
    threads: usize,
    /// About one cluster event (crash, drain, shrink, grow) per this many ops; 0 for none.
    #[arg(long, default_value_t = 60)]
    event_every: u64,
    /// Corrupt successful reads (to see the checks fire): none, torn, forged.
    #[arg(long, default_value = "none")]
    corrupt: Corruption,
    /// Let growth re-grant revoked slab ids (late events about old grants; see the crate docs, finding 3).
    #[arg(long)]
    regrant_revoked: bool,
    /// Keep going after a failing seed (report all failures at the end).
    #[arg(long)]
    keep_going: bool,
    /// Print every seed's summary and the cluster events it applied.
    #[arg(long)]
    verbose: bool,
}

fn parse_range(s: &str) -> anyhow::Result<std::ops::Range<u64>> {
    let (a, b) = s.split_once("..").context("--seeds wants A..B")?;
    let (a, b): (u64, u64) =
        (a.trim().parse().context("seed range start")?, b.trim().parse().context("seed range end")?);
    if a >= b {
        bail!("empty seed range {a}..{b}");
    }
    Ok(a..b)
}

fn summary(r: &RunReport) -> String {
    let (t, s) = (&r.tier, &r.sim);
    format!(
        "seed {} ok in {:.2?} (virtual {} ms): gets {} hits {} | puts {} published {} failed {} evicted {} | injected {} \
         (err {}+{}, torn {}, drop {}, late {}) | crashes {} restarts {} notices {} revoked {} | slabs lost {} migrated pages {}",
        r.seed,
        r.elapsed,
        r.virtual_ns / 1_000_000,
        t.gets,
        t.hits(),
        t.puts,
        t.puts_published,
        t.puts_failed,
        t.evictions,
        s.injected(),
        s.error_before,
        s.error_after,
        s.torn_writes,
        s.drops,
        s.late_landings,
        s.crashes,
        s.restarts,
        s.notices,
        s.revoked_slabs,
        t.slabs_lost,
        t.pages_migrated
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seeds = match (&args.seeds, args.seed) {
        (Some(r), _) => parse_range(r)?,
        (None, Some(s)) => s..s + 1,
        (None, None) => {
            let s =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64 % 1_000_000_007;
            eprintln!("no seed given: using random seed {s}");
            s..s + 1
        }
    };
    let total = seeds.end - seeds.start;
    let (t0, mut last) = (Instant::now(), Instant::now());
    let mut failures = Vec::new();
    for (i, seed) in seeds.enumerate() {
        let cfg = RunConfig {
            ops: args.ops,
            servers: args.servers,
            threads: args.threads,
            event_every: args.event_every,
            corruption: args.corrupt,
            regrant_revoked: args.regrant_revoked,
            progress: true,
            ..RunConfig::new(seed)
        };
        match run(&cfg) {
            Ok(r) if args.verbose || total == 1 => {
                println!("{}", summary(&r));
                r.events.iter().filter(|_| args.verbose).for_each(|a| println!("  op {}: {}", a.op, a.effect));
            }
            Ok(_) => {}
            Err(f) => {
                eprintln!("{f}");
                failures.push(f.seed);
                if !args.keep_going {
                    break;
                }
            }
        }
        if total > 1 && (last.elapsed() > Duration::from_secs(1) || i as u64 + 1 == total) {
            last = Instant::now();
            eprintln!("{}/{total} seeds done, {} failed, {:.1?} elapsed", i + 1, failures.len(), t0.elapsed());
        }
    }
    if !failures.is_empty() {
        eprintln!("FAILED seeds: {failures:?}");
        std::process::exit(1);
    }
    Ok(())
}
