//! The comparison `surge sim` prints: standard scenarios, scaled to the model's capacity, run
//! under Surge's default policy and each baseline, and measured against an oracle.

use std::time::Duration;

use serde::Serialize;
use surge_shape::Shape;

use crate::baselines::{AwsTargetTracking, Hpa, Kpa};
use crate::policy::{Policy, ScaleConfig, SurgePolicy};
use crate::sim::{self, Model, Run};

/// A load to simulate.
pub struct Scenario {
    pub name: String,
    pub shape: Shape,
    pub length: Duration,
    /// The second a step in load happens, for "time to SLO".
    pub step_at: Option<usize>,
    /// Stationary load: where flapping (reversals) is judged.
    pub stationary: bool,
}

impl Scenario {
    /// The model with a warm pool sized for the load at the start (at 70% utilisation), the
    /// same for every policy, so no run begins with a cold-start burst.
    pub fn model(&self, model: &Model) -> Model {
        let first = match &self.shape {
            Shape::Trace(arrivals) => arrivals.iter().take_while(|at| at.as_secs() < 1).count() as f64,
            shape => shape.rate_at(0.0),
        };
        let initial = ((first / (model.capacity() * 0.7)).ceil() as u32).clamp(model.min.max(1), model.max);
        Model { initial, ..model.clone() }
    }
}

const MINUTE: u64 = 60;

fn minutes(m: u64) -> Duration {
    Duration::from_secs(m * MINUTE)
}

/// Step 1x to 10x, ramp, sine with noise, spike, on-off, stationary noise and a 24-hour day,
/// in multiples of one instance's capacity.
pub fn standard(model: &Model, seed: u64) -> Vec<Scenario> {
    let c = model.capacity();
    let scenario = |name: &str, shape, length, step_at, stationary| Scenario {
        name: name.to_owned(),
        shape,
        length,
        step_at,
        stationary,
    };
    vec![
        scenario(
            "step",
            Shape::Steps(vec![(2.0 * c, minutes(10)), (20.0 * c, minutes(20))]),
            minutes(30),
            Some(600),
            false,
        ),
        scenario("ramp", Shape::Ramp { from: c, to: 20.0 * c, over: minutes(30) }, minutes(30), None, false),
        scenario(
            "sine",
            Shape::Sine { mean: 10.0 * c, amplitude: 8.0 * c, period: minutes(30), noise: 0.1, seed },
            minutes(120),
            None,
            false,
        ),
        scenario(
            "spike",
            Shape::Spike { base: 3.0 * c, peak: 30.0 * c, at: minutes(10), length: Duration::from_secs(60) },
            minutes(30),
            Some(600),
            false,
        ),
        scenario(
            "on-off",
            Shape::OnOff { rate: 10.0 * c, on: minutes(5), off: minutes(5) },
            minutes(60),
            Some(600),
            false,
        ),
        scenario(
            "stationary",
            Shape::Sine { mean: 10.0 * c, amplitude: 0.0, period: minutes(60), noise: 0.2, seed },
            minutes(120),
            None,
            true,
        ),
        scenario(
            "day",
            Shape::Sine { mean: 5.0 * c, amplitude: 4.0 * c, period: minutes(24 * 60), noise: 0.1, seed },
            minutes(24 * 60),
            None,
            false,
        ),
    ]
}

/// A recorded trace as a scenario.
pub fn trace(name: &str, arrivals: Vec<Duration>) -> Scenario {
    let length = arrivals.last().map_or(Duration::from_secs(1), |last| *last + Duration::from_secs(1));
    Scenario {
        name: name.to_owned(),
        shape: Shape::Trace(arrivals),
        length,
        step_at: None,
        stationary: false,
    }
}

/// Surge's default and every baseline, with the same per-instance target where they take one.
pub fn policies(model: &Model) -> Vec<Box<dyn Policy + Send>> {
    let slots = f64::from(model.slots);
    let (min, max) = (model.min, model.max);
    let surge = ScaleConfig { target: slots, min, max, ..ScaleConfig::default() };
    vec![
        Box::new(SurgePolicy::new(surge)),
        Box::new(Kpa::new(slots, 0.7, min, max)),
        Box::new(Hpa::cpu(0.7, min, max)),
        Box::new(Hpa::keda(slots * 0.7, min, max)),
        Box::new(AwsTargetTracking::cpu(0.7, min, max)),
    ]
}

/// One policy on one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub policy: String,
    /// After the scenario's step: seconds until p99 is back under the SLO for 30 s; `None`
    /// when the scenario has no step or p99 never settles.
    pub time_to_slo_s: Option<usize>,
    pub slo_violation_s: usize,
    pub instance_seconds: f64,
    pub oracle_instance_seconds: f64,
    pub cost_vs_oracle: f64,
    pub reversals_per_hour: f64,
    pub requests: u64,
    pub dropped: u64,
}

/// `model` is the scenario's own ([`Scenario::model`]).
pub fn evaluate(model: &Model, scenario: &Scenario, run: &Run) -> Row {
    let oracle = sim::oracle_instance_seconds(model, &run.seconds);
    let hours = scenario.length.as_secs_f64() / 3600.0;
    Row {
        scenario: scenario.name.clone(),
        policy: run.policy.clone(),
        time_to_slo_s: scenario.step_at.and_then(|step| sim::time_to_slo(model, &run.seconds, step, 30)),
        slo_violation_s: sim::violation_seconds(model, &run.seconds),
        instance_seconds: run.instance_seconds,
        oracle_instance_seconds: oracle,
        cost_vs_oracle: run.instance_seconds / oracle.max(f64::EPSILON),
        reversals_per_hour: f64::from(run.reversals) / hours.max(f64::EPSILON),
        requests: run.requests,
        dropped: run.dropped,
    }
}

/// The goals Surge's default policy is held to (issue 15), judged on the rows of `scenarios`:
/// no more SLO-violation seconds than the best baseline; at most 1.3x the oracle's
/// instance-seconds on a synthetic scenario and 1.5x on a trace, and never more than the
/// cheapest baseline whose violation seconds are within 2x of Surge's; at most 10 reversals an
/// hour on a trace and 2 under stationary load; time to SLO after a step no worse than 8 s.
pub fn goals(rows: &[Row], scenarios: &[Scenario]) -> Vec<String> {
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let mut verdicts = Vec::new();
    for scenario in scenarios {
        let name = scenario.name.as_str();
        let of_scenario = || rows.iter().filter(move |r| r.scenario == name);
        let Some(surge) = of_scenario().find(|r| r.policy == "surge") else { continue };
        let baselines: Vec<&Row> = of_scenario().filter(|r| r.policy != "surge").collect();
        let trace = matches!(scenario.shape, Shape::Trace(_));
        let mut line = Vec::new();
        if let Some(best) = baselines.iter().min_by_key(|r| r.slo_violation_s) {
            let met = surge.slo_violation_s <= best.slo_violation_s;
            line.push(format!(
                "SLO-violation {} s vs best baseline {} {} s ({})",
                surge.slo_violation_s,
                best.policy,
                best.slo_violation_s,
                verdict(met)
            ));
        }
        let bound = if trace { 1.5 } else { 1.3 };
        line.push(format!(
            "cost {:.2}x oracle, goal {bound}x ({})",
            surge.cost_vs_oracle,
            verdict(surge.cost_vs_oracle <= bound)
        ));
        let comparable = baselines
            .iter()
            .filter(|r| r.slo_violation_s <= 2 * surge.slo_violation_s)
            .min_by(|a, b| a.instance_seconds.total_cmp(&b.instance_seconds));
        if let Some(cheapest) = comparable {
            line.push(format!(
                "vs {} within 2x the violations: {:.2}x its cost ({})",
                cheapest.policy,
                surge.instance_seconds / cheapest.instance_seconds.max(f64::EPSILON),
                verdict(surge.instance_seconds <= cheapest.instance_seconds)
            ));
        }
        let reversal_bound = if trace {
            Some(10.0)
        } else if scenario.stationary {
            Some(2.0)
        } else {
            None
        };
        if let Some(bound) = reversal_bound {
            line.push(format!(
                "{:.1} reversals/h, goal {bound} ({})",
                surge.reversals_per_hour,
                verdict(surge.reversals_per_hour <= bound)
            ));
        }
        if scenario.step_at.is_some() {
            let time = surge.time_to_slo_s;
            line.push(format!(
                "time to SLO {}, goal 8 s ({})",
                time.map_or_else(|| "never".to_owned(), |t| format!("{t} s")),
                verdict(time.is_some_and(|t| t <= 8))
            ));
        }
        verdicts.push(format!("{name}: {}", line.join("; ")));
    }
    verdicts
}

/// The comparison as a table.
pub fn render(rows: &[Row]) -> String {
    let mut table = vec![[
        "SCENARIO",
        "POLICY",
        "TIME TO SLO",
        "SLO-VIOLATION S",
        "INSTANCE-S",
        "VS ORACLE",
        "REVERSALS/H",
        "DROPPED",
    ]
    .map(String::from)];
    for row in rows {
        table.push([
            row.scenario.clone(),
            row.policy.clone(),
            row.time_to_slo_s.map_or_else(|| "-".to_owned(), |t| format!("{t} s")),
            row.slo_violation_s.to_string(),
            format!("{:.0}", row.instance_seconds),
            format!("{:.2}x", row.cost_vs_oracle),
            format!("{:.1}", row.reversals_per_hour),
            row.dropped.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..8).map(|c| table.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    let mut last_scenario = String::new();
    for (i, row) in table.iter().enumerate() {
        if i > 1 && row[0] != last_scenario {
            out.push('\n');
        }
        last_scenario = row[0].clone();
        let cells: Vec<String> =
            row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
