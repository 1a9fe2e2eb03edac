use super::*;

fn figs(p50_us: f64, mops: f64) -> Figures {
    Figures {
        ops: 1000,
        bytes: 8_192_000,
        elapsed_s: 1.0,
        p50_us,
        p99_us: p50_us * 2.0,
        p999_us: p50_us * 3.0,
        mean_us: p50_us,
        mops,
        mb_s: mops * 8192.0,
    }
}

fn m(system: System, phase: Phase, size: usize, shape: usize, p50: f64, mops: f64) -> Measurement {
    let (conns, depth) = if phase == Phase::Latency { (1, 1) } else { (shape, shape) };
    Measurement {
        system,
        phase,
        size,
        conns,
        threads: 2,
        depth,
        refill: crate::driver::Refill::Batch,
        figures: figs(p50, mops),
        server_cpu_us_per_op: None,
        client_cpu_us_per_op: None,
    }
}

fn report(measurements: Vec<Measurement>) -> RunReport {
    let mut r = RunReport {
        tool: "farbench tcp".into(),
        command: "farbench tcp".into(),
        op: BenchOp::Read,
        server: "embedded".into(),
        machine: MachineNote::probe(),
        pingpong: Baseline::Ran { detail: "echo".into() },
        redis: Baseline::Ran { detail: "redis".into() },
        measurements,
        ratios: vec![],
        bars: vec![],
        wall_s: 1.0,
    };
    r.derive();
    r
}

#[test]
fn bars_pass_and_fail_on_the_ratios() {
    let r = report(vec![
        m(System::Farpool, Phase::Latency, 8192, 16, 20.0, 0.05),
        m(System::Redis, Phase::Latency, 8192, 16, 25.0, 0.04),
        m(System::TcpPingpong, Phase::Latency, 8192, 16, 10.0, 0.1),
        m(System::Farpool, Phase::Throughput, 8192, 16, 100.0, 0.3),
        m(System::Redis, Phase::Throughput, 8192, 16, 100.0, 0.2),
    ]);
    assert_eq!(r.bars[0].verdict, Verdict::Pass);
    assert!((r.bars[0].ratio.unwrap() - 0.8).abs() < 1e-9);
    assert_eq!(r.bars[1].verdict, Verdict::Fail, "1.5x is below the 2x bar");
    let lat = r.ratios.iter().find(|x| x.phase == Phase::Latency).unwrap();
    assert!((lat.vs_pingpong.unwrap() - 2.0).abs() < 1e-9);
    let text = crate::render::render_text(&r);
    assert!(text.contains("PASS") && text.contains("FAIL"), "{text}");
    assert!(text.contains("8KiB"));
}

#[test]
fn bars_need_the_right_shape_size_and_baseline() {
    // Wrong throughput shape (8x8): not evaluated rather than compared.
    let r = report(vec![
        m(System::Farpool, Phase::Throughput, 8192, 8, 1.0, 0.5),
        m(System::Redis, Phase::Throughput, 8192, 8, 1.0, 0.1),
    ]);
    assert_eq!(r.bars[1].verdict, Verdict::NotEvaluated);
    assert!(r.bars[1].note.contains("16 connections"));
    assert_eq!(r.bars[0].verdict, Verdict::NotEvaluated, "no latency measurement");

    let mut r = report(vec![m(System::Farpool, Phase::Latency, 8192, 1, 1.0, 1.0)]);
    r.redis = Baseline::Skipped { reason: "redis-server not found".into() };
    r.derive();
    assert_eq!(r.bars[0].verdict, Verdict::NotEvaluated);
    assert!(r.bars[0].note.contains("not found"));
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"status\":\"skipped\""), "{json}");
    assert!(json.contains("\"verdict\":\"not-evaluated\""));
}

#[test]
fn table_aligns_columns() {
    let mut t = Table::default();
    t.row(vec!["a".into(), "bb".into()]);
    t.row(vec!["ccc".into(), "d".into()]);
    assert_eq!(t.render(), "  a  bb\n-------\nccc   d\n");
}
