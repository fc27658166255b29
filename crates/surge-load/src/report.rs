//! The final report as text for a person.

use std::fmt::Write;

use crate::stats::{Percentiles, Report};

pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let mode = if report.mode == "open" { "open loop" } else { "closed loop" };
    let _ = writeln!(out, "target    {} ({mode}, {} connections)", report.target, report.connections);
    let _ = writeln!(
        out,
        "requests  {} sent, {} finished, {} errors (transport failures and 5xx) in {:.2} s",
        report.sent, report.answered, report.errors, report.elapsed_seconds
    );
    match report.intended_rate {
        Some(intended) => {
            let _ =
                writeln!(out, "rate      {intended:.1}/s intended, {:.1}/s achieved", report.achieved_rate);
        }
        None => {
            let _ = writeln!(out, "rate      {:.1}/s achieved", report.achieved_rate);
        }
    }
    let _ = writeln!(out, "latency   {}  (from the intended send time)", percentiles(&report.latency_ms));
    let _ = writeln!(out, "service   {}  (from the actual send)", percentiles(&report.service_time_ms));

    let mut rows = vec![["KIND", "COUNT", "OUTCOMES", "P50", "P99"].map(String::from)];
    for kind in &report.kinds {
        let outcomes: Vec<String> =
            kind.outcomes.iter().map(|(outcome, n)| format!("{outcome}: {n}")).collect();
        rows.push([
            kind.name.clone(),
            kind.count.to_string(),
            outcomes.join(", "),
            ms(kind.latency_ms.p50),
            ms(kind.latency_ms.p99),
        ]);
    }
    let widths: Vec<usize> =
        (0..5).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    out.push('\n');
    for row in rows {
        let cells: Vec<String> =
            row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    for warning in &report.warnings {
        let _ = write!(out, "\nwarning: {warning}\n");
    }
    out
}

fn percentiles(p: &Percentiles) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.p999),
        ms(p.max)
    )
}

/// Milliseconds with three significant digits, like the histograms keep.
pub fn ms(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}ms")
    } else if value >= 10.0 {
        format!("{value:.1}ms")
    } else {
        format!("{value:.2}ms")
    }
}
