//! `--plot FILE.svg`: the request rate, the error rate and p50/p99 latency over time, one
//! above the other, so a load step and the system's answer show at a glance.

use std::path::Path;

use plotters::prelude::*;

use crate::stats::Report;

pub fn write_svg(report: &Report, path: &Path) -> Result<(), String> {
    draw(report, path).map_err(|err| format!("cannot write the plot {}: {err}", path.display()))
}

/// A panel: its axis label, the top of its axis, and its named lines.
type Panel<'a> = (&'a str, f64, Vec<Line<'a>>);
type Line<'a> = (&'a str, &'a [(f64, f64)], RGBColor);

fn draw(report: &Report, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1000, 780)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!("surge load: {} ({} loop)", report.target, report.mode);
    let root = root.titled(&title, ("sans-serif", 20))?;
    let panels = root.split_evenly((3, 1));
    let seconds = report.timeline.len().max(1) as f64;
    let series = |f: &dyn Fn(usize) -> f64| -> Vec<(f64, f64)> {
        report.timeline.iter().map(|s| (s.second as f64 + 0.5, f(s.second))).collect()
    };
    let timeline = &report.timeline;

    let answered = series(&|i| timeline[i].answered as f64);
    let intended = series(&|i| timeline[i].intended as f64);
    let errors = series(&|i| timeline[i].errors as f64);
    let p50 = series(&|i| timeline[i].p50_ms);
    let p99 = series(&|i| timeline[i].p99_ms);

    let top = |points: &[&[(f64, f64)]]| {
        points.iter().flat_map(|p| p.iter().map(|(_, y)| *y)).fold(1.0_f64, f64::max) * 1.1
    };
    let panels_spec: [Panel; 3] = [
        (
            "requests/s",
            top(&[&answered, &intended]),
            vec![("intended", &intended, RGBColor(150, 150, 150)), ("finished", &answered, BLUE)],
        ),
        ("errors/s", top(&[&errors]), vec![("errors", &errors, RED)]),
        ("latency (ms)", top(&[&p50, &p99]), vec![("p50", &p50, GREEN), ("p99", &p99, MAGENTA)]),
    ];
    for (panel, (label, y_max, lines)) in panels.iter().zip(panels_spec) {
        let mut chart = ChartBuilder::on(panel)
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..seconds, 0.0..y_max)?;
        chart.configure_mesh().x_desc("seconds").y_desc(label).light_line_style(WHITE).draw()?;
        for (name, points, color) in lines {
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    }
    root.present()?;
    Ok(())
}
