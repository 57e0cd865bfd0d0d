//! `fleet-bench locks --plot FILE.png`: throughput and p50/p99 latency
//! against the number of clients, one line per system, side by side.
//!
//! Labels are drawn with a TrueType font read from the system (Debian's
//! `fonts-dejavu-core`, which `cargo xtask bench` installs when missing).

use std::path::Path;

use anyhow::{anyhow, Context};
use plotters::prelude::*;

use crate::locks::RunResult;

/// Where the label font is looked for, first found wins.
const FONTS: &[&str] = &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];
const COLORS: &[RGBColor] = &[RGBColor(31, 119, 180), RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(148, 103, 189)];

/// One system's measurements, by client count.
struct Series {
    system: String,
    /// (clients, ops/s, p50 ms, p99 ms), by clients.
    points: Vec<(u32, f64, f64, f64)>,
}

fn series(rows: &[RunResult]) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for r in rows {
        let point = (r.clients as u32, r.ops as f64 / r.secs, r.q(0.5), r.q(0.99));
        match out.iter_mut().find(|s| s.system == r.system) {
            Some(s) => s.points.push(point),
            None => out.push(Series { system: r.system.to_string(), points: vec![point] }),
        }
    }
    for s in &mut out {
        s.points.sort_by_key(|p| p.0);
    }
    out
}

fn load_font() -> anyhow::Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .with_context(|| format!("no font for the plot's labels at {}: install fonts-dejavu-core", FONTS.join(" or ")))?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| anyhow!("{path} is not a font plotters can read"))
}

fn drawing<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// Draw `rows` (one per system and client count) to the PNG at `path`.
pub fn draw(path: &Path, rows: &[RunResult]) -> anyhow::Result<()> {
    let all = series(rows);
    anyhow::ensure!(!all.is_empty(), "nothing to plot");
    load_font()?;
    let max_clients = all.iter().flat_map(|s| s.points.iter().map(|p| p.0)).max().unwrap_or(1).max(2);
    let max_ops = all.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(1.0, f64::max);
    let lat = all.iter().flat_map(|s| s.points.iter().flat_map(|p| [p.2, p.3])).filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = lat.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 { (lo / 1.5, hi * 1.5) } else { (0.1, 10.0) };

    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let (left, right) = root.split_horizontally(700);
    let x_range = || (1u32..max_clients * 2).log_scale();

    let mut ops = ChartBuilder::on(&left)
        .caption("Replicated writes: throughput", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range(), 0f64..max_ops * 1.15)
        .map_err(drawing)?;
    ops.configure_mesh().x_desc("clients").y_desc("acknowledged writes / s").draw().map_err(drawing)?;
    for (i, s) in all.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(u32, f64)> = s.points.iter().map(|p| (p.0, p.1)).collect();
        ops.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(drawing)?
            .label(s.system.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
        ops.draw_series(points.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(drawing)?;
    }
    ops.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(drawing)?;

    let mut latency = ChartBuilder::on(&right)
        .caption("Latency (solid p50, dashed p99)", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range(), (lo..hi).log_scale())
        .map_err(drawing)?;
    latency.configure_mesh().x_desc("clients").y_desc("ms (log scale)").draw().map_err(drawing)?;
    for (i, s) in all.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let p50: Vec<(u32, f64)> = s.points.iter().map(|p| (p.0, p.2)).collect();
        let p99: Vec<(u32, f64)> = s.points.iter().map(|p| (p.0, p.3)).collect();
        latency
            .draw_series(LineSeries::new(p50.clone(), color.stroke_width(2)))
            .map_err(drawing)?
            .label(format!("{} p50", s.system))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
        latency.draw_series(p50.into_iter().map(|p| Circle::new(p, 4, color.filled()))).map_err(drawing)?;
        latency
            .draw_series(DashedLineSeries::new(p99.clone(), 6, 4, color.stroke_width(2)))
            .map_err(drawing)?
            .label(format!("{} p99", s.system))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 8, y)], color.stroke_width(2)));
        latency.draw_series(p99.into_iter().map(|p| TriangleMarker::new(p, 5, color.filled()))).map_err(drawing)?;
    }
    latency
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()
        .map_err(drawing)?;
    root.present().map_err(drawing)?;
    Ok(())
}
