//! Text rendering of a [`RunReport`]: the tables printed on stdout at the end of a run.

use std::fmt::Write as _;

use crate::driver::Refill;
use crate::op::size_label;
use crate::report::{Baseline, Phase, RunReport, System, Table};

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

fn baseline_line(name: &str, b: &Baseline) -> String {
    match b {
        Baseline::Ran { detail } => format!("{name}: {detail}"),
        Baseline::Skipped { reason } => format!("{name}: SKIPPED ({reason})"),
    }
}

/// The whole summary: header, latency table, throughput table, bars.
pub fn render_text(r: &RunReport) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(out, "{}: op={}  farpool server: {}", r.tool, r.op, r.server);
    let _ = writeln!(out, "{}", baseline_line("baseline tcp-pingpong", &r.pingpong));
    let _ = writeln!(out, "{}", baseline_line("baseline redis", &r.redis));
    let _ = writeln!(
        out,
        "machine: {} CPUs ({}), kernel {}, load at start {} (shared machine: expect noise)",
        m.cpus, m.cpu_model, m.kernel, m.loadavg_at_start
    );
    let _ = writeln!(out, "{}", latency_table(r));
    let _ = writeln!(out, "{}", throughput_table(r));
    let _ = writeln!(out, "Bars (ratios measured in this run):");
    for b in &r.bars {
        let bound = if b.at_most { "<=" } else { ">=" };
        let ratio = opt(b.ratio, 2);
        let _ = writeln!(
            out,
            "  {:<4}  {}  [ratio {ratio} {bound} {:.2}]  {}",
            b.verdict.label(),
            b.name,
            b.threshold,
            b.note
        );
    }
    let _ = writeln!(out, "wall time {:.1}s", r.wall_s);
    out
}

fn shape_of(r: &RunReport, phase: Phase) -> String {
    r.measurements.iter().find(|m| m.phase == phase).map_or_else(String::new, |m| {
        let refill = match m.refill {
            Refill::Batch => "pipelined in batches as redis-benchmark -P",
            Refill::Window => "sliding window",
        };
        format!("{} connection(s) x depth {} ({refill}; {} client thread(s))", m.conns, m.depth, m.threads)
    })
}

fn latency_table(r: &RunReport) -> String {
    let mut t = Table::default();
    let h = ["size", "farpool p50", "p99", "p999", "MB/s", "pingpong p50", "p99", "redis p50", "p99"];
    let mut header: Vec<String> = h.iter().map(|s| (*s).to_owned()).collect();
    header.extend(["fp/redis".into(), "fp/pingpong".into()]);
    t.row(header);
    for size in r.sizes() {
        let get = |s| r.find(s, Phase::Latency, size).map(|m| &m.figures);
        let Some(fp) = get(System::Farpool) else { continue };
        let (pp, rd) = (get(System::TcpPingpong), get(System::Redis));
        let ratios = r.ratios.iter().find(|x| x.phase == Phase::Latency && x.size == size);
        t.row(vec![
            size_label(size),
            format!("{:.1}", fp.p50_us),
            format!("{:.1}", fp.p99_us),
            format!("{:.1}", fp.p999_us),
            format!("{:.1}", fp.mb_s),
            opt(pp.map(|f| f.p50_us), 1),
            opt(pp.map(|f| f.p99_us), 1),
            opt(rd.map(|f| f.p50_us), 1),
            opt(rd.map(|f| f.p99_us), 1),
            opt(ratios.and_then(|x| x.vs_redis), 2),
            opt(ratios.and_then(|x| x.vs_pingpong), 2),
        ]);
    }
    format!(
        "\nLatency, {} (microseconds; ratios are p50 / p50, lower is better)\n{}",
        shape_of(r, Phase::Latency),
        t.render()
    )
}

fn throughput_table(r: &RunReport) -> String {
    if !r.measurements.iter().any(|m| m.phase == Phase::Throughput) {
        return "\nThroughput: not measured (--tput-ms 0)".into();
    }
    let mut t = Table::default();
    let h = [
        "size",
        "farpool Mops",
        "MB/s",
        "p99 us",
        "srv/op",
        "cli/op",
        "pingpong Mops",
        "MB/s",
        "redis Mops",
        "MB/s",
        "srv/op",
        "cli/op",
    ];
    let mut header: Vec<String> = h.iter().map(|s| (*s).to_owned()).collect();
    header.extend(["fp/redis".into(), "fp/pingpong".into()]);
    t.row(header);
    for size in r.sizes() {
        let get = |s| r.find(s, Phase::Throughput, size).map(|m| &m.figures);
        let cpu = |s| r.find(s, Phase::Throughput, size).and_then(|m| m.server_cpu_us_per_op);
        let cli = |s| r.find(s, Phase::Throughput, size).and_then(|m| m.client_cpu_us_per_op);
        let Some(fp) = get(System::Farpool) else { continue };
        let (pp, rd) = (get(System::TcpPingpong), get(System::Redis));
        let ratios = r.ratios.iter().find(|x| x.phase == Phase::Throughput && x.size == size);
        t.row(vec![
            size_label(size),
            format!("{:.3}", fp.mops),
            format!("{:.1}", fp.mb_s),
            format!("{:.1}", fp.p99_us),
            opt(cpu(System::Farpool), 2),
            opt(cli(System::Farpool), 2),
            opt(pp.map(|f| f.mops), 3),
            opt(pp.map(|f| f.mb_s), 1),
            opt(rd.map(|f| f.mops), 3),
            opt(rd.map(|f| f.mb_s), 1),
            opt(cpu(System::Redis), 2),
            opt(cli(System::Redis), 2),
            opt(ratios.and_then(|x| x.vs_redis), 2),
            opt(ratios.and_then(|x| x.vs_pingpong), 2),
        ]);
    }
    format!(
        "\nThroughput, {} (ratios are ops/s / ops/s, higher is better; srv/op, cli/op: server and client CPU us per op)\n{}",
        shape_of(r, Phase::Throughput),
        t.render()
    )
}
