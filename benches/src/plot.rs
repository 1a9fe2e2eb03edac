//! SVG rendering (plotters, svg backend): p50 latency against size for farpool and its baselines.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::op::size_label;
use crate::report::{Phase, RunReport, System};

const SERIES: [(System, RGBColor); 3] = [
    (System::Farpool, RGBColor(0xD6, 0x27, 0x28)),
    (System::TcpPingpong, BLUE),
    (System::Redis, RGBColor(0x2C, 0xA0, 0x2C)),
];

/// (size, p50 us) points of `system`'s latency phase, ascending by size.
pub fn latency_points(r: &RunReport, system: System) -> Vec<(f64, f64)> {
    r.sizes()
        .into_iter()
        .filter_map(|s| r.find(system, Phase::Latency, s).map(|m| (s as f64, m.figures.p50_us)))
        .collect()
}

/// Write the latency-vs-size plot of `r` to `path`: x is log2 of the size (labelled in bytes, one tick
/// per power of two), y is p50 latency on a log scale.
pub fn render_latency_svg(r: &RunReport, path: &Path) -> Result<()> {
    let all: Vec<(f64, f64)> = SERIES.iter().flat_map(|(s, _)| latency_points(r, *s)).collect();
    if all.is_empty() {
        return Err(anyhow!("no latency measurement to plot"));
    }
    let (xmin, xmax) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0.log2()), b.max(p.0.log2())));
    let (ymin, ymax) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let x_range = (xmin.floor() - 0.5)..(xmax.ceil() + 0.5);
    let y_range = (ymin / 1.5).max(0.01)..(ymax * 1.5);
    let ticks = (x_range.end - x_range.start).round() as usize + 1;

    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("drawing: {e}"))?;
    let shape = r.find_shape(Phase::Latency).map_or_else(String::new, |(c, d)| format!(", {c} conn x qd {d}"));
    let title = format!("{}: {} p50 latency vs size{shape}", r.tool, r.op);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(x_range, y_range.log_scale())
        .map_err(|e| anyhow!("chart: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("operation size (bytes)")
        .y_desc("p50 latency (us)")
        .x_labels(ticks)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 { size_label(1usize << x.round() as u32) } else { String::new() }
        })
        .draw()
        .map_err(|e| anyhow!("mesh: {e}"))?;
    for (system, color) in SERIES {
        let pts: Vec<(f64, f64)> = latency_points(r, system).into_iter().map(|(x, y)| (x.log2(), y)).collect();
        if pts.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("series: {e}"))?
            .label(system.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("legend: {e}"))?;
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
