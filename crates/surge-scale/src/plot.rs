//! `surge sim --plot FILE.svg`: for each scenario, the instances each policy ran against what
//! the load needed, and each policy's p99 latency against the SLO.

use std::path::Path;

use plotters::prelude::*;

use crate::sim::{Model, Run};

const COLORS: [RGBColor; 6] = [
    RGBColor(0, 90, 200),
    RGBColor(230, 120, 0),
    RGBColor(0, 150, 70),
    RGBColor(200, 0, 120),
    RGBColor(120, 80, 40),
    RGBColor(120, 120, 120),
];

/// At most this many points per line: the largest value of each bucket, so spikes stay visible.
const POINTS: usize = 1500;

fn downsample(values: &[f64]) -> Vec<(f64, f64)> {
    let bucket = values.len().div_ceil(POINTS).max(1);
    values
        .chunks(bucket)
        .enumerate()
        .map(|(i, chunk)| (((i * bucket) as f64) / 60.0, chunk.iter().copied().fold(0.0, f64::max)))
        .collect()
}

pub fn write_svg(model: &Model, scenarios: &[(String, Vec<Run>)], path: &Path) -> Result<(), String> {
    draw(model, scenarios, path).map_err(|err| format!("cannot write the plot {}: {err}", path.display()))
}

fn draw(
    model: &Model,
    scenarios: &[(String, Vec<Run>)],
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let height = 300 * scenarios.len().max(1) as u32;
    let root = SVGBackend::new(path, (1400, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let rows = root.split_evenly((scenarios.len().max(1), 2));
    for (index, (name, runs)) in scenarios.iter().enumerate() {
        let Some(first) = runs.first() else { continue };
        let minutes = first.seconds.len() as f64 / 60.0;
        let needed: Vec<f64> = first
            .seconds
            .iter()
            .map(|s| (f64::from(s.arrivals) / model.capacity()).ceil().max(1.0))
            .collect();
        let top = runs
            .iter()
            .flat_map(|r| r.seconds.iter().map(|s| f64::from(s.instances)))
            .chain(needed.iter().copied())
            .fold(1.0, f64::max)
            * 1.1;

        let mut chart = ChartBuilder::on(&rows[index * 2])
            .caption(format!("{name}: instances"), ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(26)
            .y_label_area_size(46)
            .build_cartesian_2d(0.0..minutes.max(1.0 / 60.0), 0.0..top)?;
        chart.configure_mesh().x_desc("minutes").light_line_style(WHITE).draw()?;
        chart
            .draw_series(LineSeries::new(downsample(&needed), BLACK.stroke_width(1)))?
            .label("needed by the load")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
        for (run, color) in runs.iter().zip(COLORS.iter().cycle()) {
            let instances: Vec<f64> = run.seconds.iter().map(|s| f64::from(s.instances)).collect();
            let color = *color;
            chart
                .draw_series(LineSeries::new(downsample(&instances), color.stroke_width(2)))?
                .label(run.policy.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;

        let ceiling = model.slo_s * 4.0;
        let mut chart = ChartBuilder::on(&rows[index * 2 + 1])
            .caption(format!("{name}: p99 latency (s), SLO {} s", model.slo_s), ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(26)
            .y_label_area_size(46)
            .build_cartesian_2d(0.0..minutes.max(1.0 / 60.0), 0.0..ceiling)?;
        chart.configure_mesh().x_desc("minutes").light_line_style(WHITE).draw()?;
        chart.draw_series(LineSeries::new(
            [(0.0, model.slo_s), (minutes, model.slo_s)],
            RED.stroke_width(1),
        ))?;
        for (run, color) in runs.iter().zip(COLORS.iter().cycle()) {
            let p99: Vec<f64> = run.seconds.iter().map(|s| s.p99_s.min(ceiling)).collect();
            chart.draw_series(LineSeries::new(downsample(&p99), color.stroke_width(1)))?;
        }
    }
    root.present()?;
    Ok(())
}
