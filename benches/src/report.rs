//! Results of a perftest-style run: measurements, ratios, the performance bars, and their rendering as
//! a text table (stdout) and JSON (`--json`).
//!
//! Owns: [`RunReport`] and the pure functions that derive ratios and bar verdicts from measurements.
//! Invariant: a ratio or a verdict is only computed from two measurements of the same run, same op,
//! same size and same shape (connections x depth); a bar that cannot be evaluated says why instead of
//! passing.

use std::fmt::Write as _;

use serde::Serialize;

use crate::driver::Refill;
use crate::op::BenchOp;
use crate::stats::Figures;

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// farpool's TCP transport against a memory server.
    Farpool,
    /// Raw TCP ping-pong of the same sizes (the floor).
    TcpPingpong,
    /// Redis GET/SET/INCRBY.
    Redis,
}

impl System {
    /// Name used in tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            Self::Farpool => "farpool",
            Self::TcpPingpong => "tcp-pingpong",
            Self::Redis => "redis",
        }
    }
}

/// Which kind of phase produced a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Few connections, low depth: latency percentiles are the point.
    Latency,
    /// Many connections, pipelined: operations per second are the point.
    Throughput,
}

/// One measured phase.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// Which system.
    pub system: System,
    /// Which phase.
    pub phase: Phase,
    /// Bytes per operation.
    pub size: usize,
    /// Connections.
    pub conns: usize,
    /// Client threads that drove them.
    pub threads: usize,
    /// Operations in flight per connection.
    pub depth: usize,
    /// How the connections' pipelines were refilled.
    pub refill: Refill,
    /// What was measured.
    pub figures: Figures,
    /// CPU time the server (farpool's embedded I/O threads, the redis-server process) spent per
    /// operation, in microseconds; absent where it cannot be read (external server, ping-pong).
    pub server_cpu_us_per_op: Option<f64>,
    /// CPU time the bench's client side (driver threads, farpool client or RESP client) spent per
    /// operation, in microseconds; absent where the server shares the process and cannot be told apart.
    pub client_cpu_us_per_op: Option<f64>,
}

/// Whether a baseline ran.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Baseline {
    /// It ran; `detail` says against what.
    Ran {
        /// e.g. `redis-server v=7.0.15 on 127.0.0.1:40123`.
        detail: String,
    },
    /// It did not run, and why.
    Skipped {
        /// e.g. `redis-server not found`.
        reason: String,
    },
}

/// Verdict on one bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The bar is met.
    Pass,
    /// The bar is missed.
    Fail,
    /// The run lacks what the bar needs (see the note).
    NotEvaluated,
}

impl Verdict {
    /// `PASS`, `FAIL`, `N/A`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::NotEvaluated => "N/A",
        }
    }
}

/// One performance bar of ARCHITECTURE.md, evaluated on this run.
#[derive(Clone, Debug, Serialize)]
pub struct Bar {
    /// What the bar says.
    pub name: String,
    /// The ratio measured (farpool / redis), when both sides were measured.
    pub ratio: Option<f64>,
    /// The bound the ratio must meet.
    pub threshold: f64,
    /// `true`: ratio <= threshold; `false`: ratio >= threshold.
    pub at_most: bool,
    /// The verdict.
    pub verdict: Verdict,
    /// The figures compared, or why the bar was not evaluated.
    pub note: String,
}

/// Ratios of farpool against the baselines at one size and phase.
#[derive(Clone, Debug, Serialize)]
pub struct RatioRow {
    /// Which phase.
    pub phase: Phase,
    /// Bytes per operation.
    pub size: usize,
    /// Latency: farpool p50 / redis p50. Throughput: farpool ops/s / redis ops/s.
    pub vs_redis: Option<f64>,
    /// The same against TCP ping-pong.
    pub vs_pingpong: Option<f64>,
}

/// The machine the run happened on.
#[derive(Clone, Debug, Serialize)]
pub struct MachineNote {
    /// CPUs available to the process.
    pub cpus: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// /proc/loadavg at the start of the run.
    pub loadavg_at_start: String,
}

impl MachineNote {
    /// Read what the OS tells about this machine (fields it does not tell stay empty).
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned()))
            .unwrap_or_default();
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            kernel: read("/proc/sys/kernel/osrelease"),
            loadavg_at_start: read("/proc/loadavg"),
        }
    }
}

/// Everything a run measured (the `--json` document).
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    /// `farbench <subcommand>`.
    pub tool: String,
    /// The command line.
    pub command: String,
    /// The operation.
    pub op: BenchOp,
    /// Where the farpool server was (embedded or an address).
    pub server: String,
    /// The machine.
    pub machine: MachineNote,
    /// Ping-pong baseline status.
    pub pingpong: Baseline,
    /// Redis baseline status.
    pub redis: Baseline,
    /// Every measured phase.
    pub measurements: Vec<Measurement>,
    /// Ratios derived from them.
    pub ratios: Vec<RatioRow>,
    /// Bars derived from them.
    pub bars: Vec<Bar>,
    /// Seconds the whole run took.
    pub wall_s: f64,
}

impl RunReport {
    /// The measurement of `system` at `size` in `phase`, if any.
    pub fn find(&self, system: System, phase: Phase, size: usize) -> Option<&Measurement> {
        self.measurements.iter().find(|m| m.system == system && m.phase == phase && m.size == size)
    }

    /// (connections, depth) of the first measurement of `phase`.
    pub fn find_shape(&self, phase: Phase) -> Option<(usize, usize)> {
        self.measurements.iter().find(|m| m.phase == phase).map(|m| (m.conns, m.depth))
    }

    /// Sizes measured, ascending.
    pub fn sizes(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self.measurements.iter().map(|m| m.size).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Fill `ratios` and `bars` from `measurements`.
    pub fn derive(&mut self) {
        let mut ratios = Vec::new();
        for phase in [Phase::Latency, Phase::Throughput] {
            for size in self.sizes() {
                let Some(fp) = self.find(System::Farpool, phase, size) else { continue };
                let vs = |sys| self.find(sys, phase, size).map(|b| ratio(phase, fp, b));
                ratios.push(RatioRow {
                    phase,
                    size,
                    vs_redis: vs(System::Redis),
                    vs_pingpong: vs(System::TcpPingpong),
                });
            }
        }
        self.ratios = ratios;
        self.bars = vec![self.latency_bar(), self.throughput_bar()];
    }

    fn latency_bar(&self) -> Bar {
        let name = "tcp 8KiB read p50 <= Redis GET 8KiB p50 (1 connection)";
        let pair = self.bar_pair(Phase::Latency, (1, 1));
        evaluate(name, 1.0, true, pair, |fp, r| {
            format!("farpool p50 {:.1}us vs redis p50 {:.1}us", fp.figures.p50_us, r.figures.p50_us)
        })
    }

    fn throughput_bar(&self) -> Bar {
        let name = "tcp 8KiB read throughput >= 2x Redis GET (16 connections x pipeline 16)";
        let pair = self.bar_pair(Phase::Throughput, (16, 16));
        evaluate(name, 2.0, false, pair, |fp, r| {
            format!("farpool {:.3} Mops vs redis {:.3} Mops", fp.figures.mops, r.figures.mops)
        })
    }

    /// The farpool and redis 8 KiB read measurements of `phase` with shape `(conns, depth)`, or why not.
    fn bar_pair(&self, phase: Phase, shape: (usize, usize)) -> Result<(&Measurement, &Measurement), String> {
        if self.op != BenchOp::Read {
            return Err(format!("the bar is about reads; this run measured {}", self.op));
        }
        if let Baseline::Skipped { reason } = &self.redis {
            return Err(format!("redis baseline skipped: {reason}"));
        }
        let fp = self.find(System::Farpool, phase, 8192).ok_or("no farpool 8KiB measurement in this run")?;
        let r = self.find(System::Redis, phase, 8192).ok_or("no redis 8KiB measurement in this run")?;
        if (fp.conns, fp.depth) != shape || (r.conns, r.depth) != shape {
            return Err(format!("the bar needs {} connections x depth {}", shape.0, shape.1));
        }
        Ok((fp, r))
    }
}

/// farpool relative to a baseline: latency p50 ratio, or throughput ratio.
fn ratio(phase: Phase, fp: &Measurement, base: &Measurement) -> f64 {
    match phase {
        Phase::Latency => fp.figures.p50_us / base.figures.p50_us,
        Phase::Throughput => fp.figures.mops / base.figures.mops,
    }
}

fn evaluate(
    name: &str,
    threshold: f64,
    at_most: bool,
    pair: Result<(&Measurement, &Measurement), String>,
    describe: impl Fn(&Measurement, &Measurement) -> String,
) -> Bar {
    let (ratio, verdict, note) = match pair {
        Err(why) => (None, Verdict::NotEvaluated, why),
        Ok((fp, r)) => {
            let x = ratio(fp.phase, fp, r);
            let ok = if at_most { x <= threshold } else { x >= threshold };
            (Some(x), if ok { Verdict::Pass } else { Verdict::Fail }, describe(fp, r))
        }
    };
    Bar { name: name.into(), ratio, threshold, at_most, verdict, note }
}

/// A right-aligned text table.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Add a row (the first is the header).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Render with two spaces between columns and a rule under the header.
    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let width: Vec<usize> =
            (0..cols).map(|c| self.rows.iter().filter_map(|r| r.get(c)).map(|s| s.len()).max().unwrap_or(0)).collect();
        let mut out = String::new();
        for (i, r) in self.rows.iter().enumerate() {
            let line: Vec<String> = r.iter().enumerate().map(|(c, s)| format!("{s:>w$}", w = width[c])).collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
            if i == 0 {
                let _ = writeln!(out, "{}", "-".repeat(width.iter().sum::<usize>() + 2 * cols.saturating_sub(1)));
            }
        }
        out
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
