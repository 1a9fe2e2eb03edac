//! The perftest-style suite shared by `farbench tcp` and `farbench demo`: for every size, a latency phase
//! and a throughput phase against farpool and each baseline, interleaved (same size, one system after
//! the other) so that drift in the machine's load hits all systems alike.
//!
//! Owns: [`SuiteConfig`] and [`run_suite`]. Invariants: every phase is bounded (see [`crate::driver`]);
//! the baselines' servers (echo thread, redis-server child) live only for the run and are stopped after
//! it, on success or failure, by their `Drop`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cpu::{CpuSource, FARPOOL_IO_THREADS};
use crate::driver::{Endpoint, PhaseSpec, Refill, Sample, run_phase};
use crate::op::{BenchOp, size_label};
use crate::pingpong::{EchoServer, PingPongEndpoint};
use crate::progress::Progress;
use crate::redis::{RedisEndpoint, RedisServer, Unavailable};
use crate::report::{Baseline, MachineNote, Measurement, Phase, RunReport, System};
use crate::target::FarpoolTarget;

/// What to measure.
#[derive(Clone, Debug)]
pub struct SuiteConfig {
    /// Name in the report, e.g. `farbench tcp`.
    pub tool: String,
    /// The operation.
    pub op: BenchOp,
    /// Sizes (ignored for atomics, which move 8 bytes).
    pub sizes: Vec<usize>,
    /// Latency phase: connections (one thread each).
    pub lat_conns: usize,
    /// Latency phase: depth per connection.
    pub lat_depth: usize,
    /// Latency phase: operations per connection, at most.
    pub iters: u64,
    /// Latency phase: time bound.
    pub lat_duration: Duration,
    /// Throughput phase: connections.
    pub tput_conns: usize,
    /// Throughput phase: pipeline depth per connection.
    pub tput_depth: usize,
    /// Throughput phase: how the pipeline is refilled (every system alike).
    pub tput_refill: Refill,
    /// Throughput phase: client threads driving the connections (0: one per connection).
    pub tput_threads: usize,
    /// Throughput phase: duration; zero skips the phase.
    pub tput_duration: Duration,
    /// External farpool server, or `None` for an embedded one.
    pub server: Option<SocketAddr>,
    /// I/O threads of the embedded server (0: its default, one per CPU).
    pub server_workers: usize,
    /// Run the TCP ping-pong baseline.
    pub pingpong: bool,
    /// Run the Redis baseline.
    pub redis: bool,
    /// Each phase is cut into this many rounds, the systems taking turns round by round (in a rotating
    /// order), so that bursts of load from other tenants of the machine hit every system alike.
    pub rounds: u32,
}

impl SuiteConfig {
    /// The sizes actually run (atomics: 8 bytes only).
    pub fn effective_sizes(&self) -> Vec<usize> {
        if self.op.is_atomic() { vec![8] } else { self.sizes.clone() }
    }

    fn phases(&self) -> Vec<(Phase, PhaseSpecFor)> {
        let mut v = vec![(Phase::Latency, PhaseSpecFor::Latency)];
        if !self.tput_duration.is_zero() {
            v.push((Phase::Throughput, PhaseSpecFor::Throughput));
        }
        v
    }

    fn spec(&self, which: PhaseSpecFor) -> PhaseSpec {
        match which {
            PhaseSpecFor::Latency => PhaseSpec::latency(self.lat_conns, self.lat_depth, self.iters, self.lat_duration),
            PhaseSpecFor::Throughput => PhaseSpec::throughput(self.tput_conns, self.tput_depth, self.tput_duration)
                .with_refill(self.tput_refill)
                .with_threads(self.tput_threads),
        }
    }

    /// Upper-bound estimate of the run's length (for the progress display).
    pub fn estimate(&self, systems: usize) -> Duration {
        let per_size = self.lat_duration + self.tput_duration + Duration::from_millis(100) * self.rounds.max(1) * 2;
        per_size * (systems * self.effective_sizes().len()) as u32
    }
}

#[derive(Clone, Copy, Debug)]
enum PhaseSpecFor {
    Latency,
    Throughput,
}

/// The systems of one run.
struct Systems {
    farpool: FarpoolTarget,
    pingpong: Option<EchoServer>,
    redis: Option<RedisServer>,
}

impl Systems {
    fn list(&self) -> Vec<System> {
        let mut v = vec![System::Farpool];
        if self.pingpong.is_some() {
            v.push(System::TcpPingpong);
        }
        if self.redis.is_some() {
            v.push(System::Redis);
        }
        v
    }

    fn cpu(&self, sys: System) -> Option<CpuSource> {
        match sys {
            System::Farpool if self.farpool.is_embedded() => Some(CpuSource::Threads(FARPOOL_IO_THREADS)),
            System::Redis => self.redis.as_ref().map(|r| CpuSource::Process(r.pid())),
            _ => None,
        }
    }

    fn open(&self, sys: System, op: BenchOp, size: usize, conn: usize) -> Result<Box<dyn Endpoint>> {
        Ok(match sys {
            System::Farpool => Box::new(self.farpool.endpoint(op, size, conn)?),
            System::TcpPingpong => {
                Box::new(PingPongEndpoint::connect(self.pingpong.as_ref().expect("listed").addr(), op, size)?)
            }
            System::Redis => Box::new(RedisEndpoint::connect(self.redis.as_ref().expect("listed").addr(), op, size)?),
        })
    }
}

fn start_redis(cfg: &SuiteConfig) -> (Option<RedisServer>, Baseline) {
    if !cfg.redis {
        return (None, Baseline::Skipped { reason: "disabled by --no-redis".into() });
    }
    if cfg.op == BenchOp::Cas {
        return (None, Baseline::Skipped { reason: "Redis has no compare-and-swap command".into() });
    }
    match RedisServer::start() {
        Ok(r) => {
            let detail = format!("redis-server {} on {} (--save \"\" --appendonly no)", r.version(), r.addr());
            (Some(r), Baseline::Ran { detail })
        }
        Err(Unavailable::NotFound) => {
            eprintln!("farbench: redis-server not found: baseline skipped (Debian package redis-server)");
            (None, Baseline::Skipped { reason: "redis-server not found".into() })
        }
        Err(Unavailable::Failed(e)) => {
            eprintln!("farbench: redis-server failed to start: baseline skipped: {e:#}");
            (None, Baseline::Skipped { reason: format!("redis-server failed to start: {e:#}") })
        }
    }
}

/// Run the suite and return its report (ratios and bars derived).
pub fn run_suite(cfg: &SuiteConfig) -> Result<RunReport> {
    let t0 = Instant::now();
    let machine = MachineNote::probe();
    let farpool = FarpoolTarget::start(cfg.server, cfg.server_workers)?;
    eprintln!("farbench: farpool server: {}", farpool.describe());
    let (pingpong, pp_status) = if cfg.pingpong {
        let s = EchoServer::start()?;
        let detail = format!("echo thread on {} (16-byte request, SIZE-byte response for reads)", s.addr());
        (Some(s), Baseline::Ran { detail })
    } else {
        (None, Baseline::Skipped { reason: "disabled by --no-pingpong".into() })
    };
    let (redis, redis_status) = start_redis(cfg);
    let systems = Systems { farpool, pingpong, redis };
    let list = systems.list();
    let sizes = cfg.effective_sizes();
    let phases = cfg.phases();
    let rounds = cfg.rounds.max(1);
    let steps = sizes.len() * list.len() * phases.len() * rounds as usize;
    let mut progress = Progress::new(steps as u64, cfg.estimate(list.len()));
    let mut measurements = Vec::new();
    for &size in &sizes {
        prepare(&systems, cfg.op, size)?;
        for &(phase, which) in &phases {
            let spec = cfg.spec(which);
            let samples = run_rounds(&systems, &list, cfg.op, size, &spec.slice(rounds), rounds, &mut progress)?;
            for (sys, r) in list.iter().zip(samples) {
                let figures = r.sample.figures(cfg.op.payload_len(size) as u64)?;
                let per_op = |s: Option<f64>| s.map(|s| s * 1e6 / r.sample.ops as f64);
                measurements.push(Measurement {
                    system: *sys,
                    phase,
                    size,
                    conns: spec.conns,
                    threads: spec.effective_threads(),
                    depth: spec.depth,
                    refill: spec.refill,
                    figures,
                    server_cpu_us_per_op: per_op(r.server_cpu_s),
                    client_cpu_us_per_op: per_op(r.client_cpu_s),
                });
            }
        }
    }
    drop(progress);
    let mut report = RunReport {
        tool: cfg.tool.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        op: cfg.op,
        server: systems.farpool.describe(),
        machine,
        pingpong: pp_status,
        redis: redis_status,
        measurements,
        ratios: Vec::new(),
        bars: Vec::new(),
        wall_s: 0.0,
    };
    drop(systems);
    report.derive();
    report.wall_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Run `rounds` slices of one phase per system, the systems taking turns in a rotating order; returns
/// one merged sample per system of `list`, in that order, with the server CPU seconds it cost (if known).
fn run_rounds(
    systems: &Systems,
    list: &[System],
    op: BenchOp,
    size: usize,
    slice: &PhaseSpec,
    rounds: u32,
    progress: &mut Progress,
) -> Result<Vec<RoundsResult>> {
    let zero = RoundsResult { sample: Sample::default(), server_cpu_s: Some(0.0), client_cpu_s: Some(0.0) };
    let mut samples = vec![zero; list.len()];
    let me = CpuSource::Process(std::process::id());
    for round in 0..rounds as usize {
        for k in 0..list.len() {
            let i = (round + k) % list.len();
            let sys = list[i];
            let label = format!("{} {op} {} {}", sys.label(), size_label(size), phase_name(slice));
            progress.start_step(&label);
            let cpu = systems.cpu(sys);
            let (srv0, me0) = (cpu.as_ref().and_then(CpuSource::seconds), me.seconds());
            let s = run_phase(slice, |c| systems.open(sys, op, size, c)).with_context(|| label.clone())?;
            let (srv1, me1) = (cpu.as_ref().and_then(CpuSource::seconds), me.seconds());
            let r = &mut samples[i];
            r.sample.merge(&s);
            let srv = delta(srv0, srv1);
            // The process's CPU is the client's, less the server's when the server runs in-process.
            let client = match sys {
                System::Farpool => delta(me0, me1).zip(srv).map(|(m, s)| (m - s).max(0.0)),
                System::Redis => delta(me0, me1),
                System::TcpPingpong => None,
            };
            r.server_cpu_s = r.server_cpu_s.zip(srv).map(|(a, b)| a + b);
            r.client_cpu_s = r.client_cpu_s.zip(client).map(|(a, b)| a + b);
            progress.finish_step();
        }
    }
    Ok(samples)
}

/// The rounds of one phase of one system, merged.
#[derive(Clone, Debug)]
struct RoundsResult {
    sample: Sample,
    server_cpu_s: Option<f64>,
    client_cpu_s: Option<f64>,
}

fn delta(before: Option<f64>, after: Option<f64>) -> Option<f64> {
    Some((after? - before?).max(0.0))
}

fn phase_name(spec: &PhaseSpec) -> &'static str {
    if spec.iters == u64::MAX { "throughput" } else { "latency" }
}

/// Store the values reads will fetch (farpool slots, Redis keys).
fn prepare(systems: &Systems, op: BenchOp, size: usize) -> Result<()> {
    if op != BenchOp::Read {
        return Ok(());
    }
    systems.farpool.populate(size)?;
    if let Some(r) = &systems.redis {
        r.populate(size).context("populating redis")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Verdict;

    /// End to end against a real embedded memory server, ping-pong and redis-server (installed by .ci/run).
    #[test]
    fn small_suite_measures_every_system_and_evaluates_the_bars() {
        let cfg = SuiteConfig {
            tool: "test".into(),
            op: BenchOp::Read,
            sizes: vec![8, 8192],
            lat_conns: 1,
            lat_depth: 1,
            iters: 200,
            lat_duration: Duration::from_millis(300),
            tput_conns: 16,
            tput_depth: 16,
            tput_refill: Refill::Batch,
            tput_threads: 2,
            tput_duration: Duration::from_millis(150),
            server: None,
            server_workers: 1,
            pingpong: true,
            redis: true,
            rounds: 2,
        };
        let t = Instant::now();
        let r = run_suite(&cfg).expect("suite runs");
        assert!(t.elapsed() < Duration::from_secs(30), "took {:?}", t.elapsed());
        assert!(matches!(r.redis, Baseline::Ran { .. }), "redis-server must be installed: {:?}", r.redis);
        assert_eq!(r.measurements.len(), 2 * 2 * 3, "2 sizes x 2 phases x 3 systems");
        for m in &r.measurements {
            assert!(m.figures.ops > 0 && m.figures.p50_us > 0.0, "{m:?}");
            if m.phase == Phase::Latency {
                assert_eq!(m.figures.ops, 200, "latency phases are bounded by --iters: {m:?}");
            }
        }
        let fp = r.find(System::Farpool, Phase::Throughput, 8192).unwrap();
        assert!(fp.server_cpu_us_per_op.is_some() && fp.client_cpu_us_per_op.is_some());
        assert!(r.bars.iter().all(|b| b.verdict != Verdict::NotEvaluated), "{:?}", r.bars);
        assert!(r.server.starts_with("embedded"));
    }

    #[test]
    fn data_written_through_farpool_reads_back() {
        let t = FarpoolTarget::start(None, 1).unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        t.verify_round_trip(&data).unwrap();
        assert!(t.describe().contains("embedded"));
    }
}
