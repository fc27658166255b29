//! `surge sim`: Surge's autoscaling policy against the classic autoscalers, in virtual time.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use surge_scale::sim::{self, Model};
use surge_scale::suite::{self, Row, Scenario};

use crate::Failure;

#[derive(Args)]
pub struct SimArgs {
    /// Run only these scenarios (step, ramp, sine, spike, on-off, stationary, day)
    #[arg(short, long = "scenario")]
    scenarios: Vec<String>,
    /// Replay this CSV instead (first column: arrival time)
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Time compression of the trace (60 plays an hour in a minute)
    #[arg(long, default_value_t = 1.0)]
    speedup: f64,
    /// Requests per recorded arrival of the trace
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Seed for service times and noise; the same seed gives the same results
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Instance start-up time
    #[arg(long, default_value = "5s", value_parser = surge_config::parse_duration)]
    startup: Duration,
    /// The latency objective: p99 of every second at or under this
    #[arg(long, default_value = "1s", value_parser = surge_config::parse_duration)]
    slo: Duration,
    /// Requests one instance serves at once (the policy's concurrency target)
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    slots: u32,
    /// Service time: this fixed part ...
    #[arg(long, default_value = "100ms", value_parser = surge_config::parse_duration)]
    service: Duration,
    /// ... plus an exponential part of this mean
    #[arg(long, default_value = "100ms", value_parser = surge_config::parse_duration)]
    service_extra: Duration,
    /// Requests that may wait for an instance at once (the gateway's `buffer.requests`); more
    /// are turned away
    #[arg(long, default_value_t = 1000)]
    buffer: usize,
    /// Fewest instances
    #[arg(long, default_value_t = 1)]
    min: u32,
    /// Most instances
    #[arg(long, default_value_t = 100)]
    max: u32,
    /// Instances at the start (default: enough for the first second's load at 70%)
    #[arg(long)]
    initial: Option<u32>,
    /// With --trace: the second a step in load happens, to report the time to SLO after it
    #[arg(long)]
    step_at: Option<usize>,
    /// Also write the results as JSON to this file
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw instances and p99 over time to this SVG file
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn run(args: SimArgs) -> Result<(), Failure> {
    if args.min > args.max || args.initial.is_some_and(|initial| initial > args.max) {
        return Err("--min and --initial must not be above --max".to_owned().into());
    }
    let model = Model {
        startup_s: args.startup.as_secs_f64(),
        slo_s: args.slo.as_secs_f64(),
        slots: args.slots,
        service_base_s: args.service.as_secs_f64(),
        service_extra_s: args.service_extra.as_secs_f64(),
        buffer: args.buffer,
        min: args.min,
        max: args.max,
        ..Model::default()
    };
    if model.capacity() <= 0.0 || !model.capacity().is_finite() {
        return Err("--service and --service-extra must not both be zero".to_owned().into());
    }
    let scenarios = scenarios(&args, &model)?;
    eprintln!(
        "surge sim: {} scenario{} x {} policies; instances serve {} at once, {:.0} ms each on average \
         ({:.0} req/s), start in {:?}; at most {} wait, {:?} each; SLO p99 <= {:?}",
        scenarios.len(),
        if scenarios.len() == 1 { "" } else { "s" },
        suite::policies(&model).len(),
        model.slots,
        (model.service_base_s + model.service_extra_s) * 1e3,
        model.capacity(),
        args.startup,
        model.buffer,
        Duration::from_secs_f64(model.max_wait_s),
        args.slo
    );

    let started = std::time::Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut runs = Vec::new();
    for scenario in &scenarios {
        let mut model = scenario.model(&model);
        if let Some(initial) = args.initial {
            model.initial = initial;
        }
        // The policies of one scenario run side by side, one thread each.
        let scenario_runs: Vec<sim::Run> = std::thread::scope(|scope| {
            let handles: Vec<_> = suite::policies(&model)
                .into_iter()
                .map(|mut policy| {
                    let (model, scenario, seed) = (&model, scenario, args.seed);
                    scope.spawn(move || {
                        let arrivals = scenario.shape.schedule(scenario.length);
                        sim::simulate(policy.as_mut(), model, arrivals, scenario.length, seed)
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        rows.extend(scenario_runs.iter().map(|run| suite::evaluate(&model, scenario, run)));
        runs.push((scenario.name.clone(), scenario_runs));
    }
    let simulated: f64 = scenarios.iter().map(|s| s.length.as_secs_f64()).sum();

    print!("{}", suite::render(&rows));
    println!();
    for verdict in suite::goals(&rows, &scenarios) {
        println!("{verdict}");
    }
    eprintln!(
        "simulated {:.1} hours per policy in {:.1} s",
        simulated / 3600.0,
        started.elapsed().as_secs_f64()
    );

    if let Some(path) = &args.json {
        let json = serde_json::json!({ "model": model, "seed": args.seed, "rows": rows });
        // `model.initial` differs per scenario: each starts warm for its own first load.
        let text = serde_json::to_string_pretty(&json).map_err(|err| err.to_string())?;
        std::fs::write(path, text).map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        surge_scale::plot::write_svg(&model, &runs, path)?;
    }
    Ok(())
}

fn scenarios(args: &SimArgs, model: &Model) -> Result<Vec<Scenario>, String> {
    if let Some(path) = &args.trace {
        if !(args.speedup > 0.0 && args.scale > 0.0) {
            return Err("--speedup and --scale must be greater than zero".to_owned());
        }
        let text =
            std::fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let arrivals =
            surge_shape::trace::parse(&text).map_err(|err| format!("{}: {err}", path.display()))?;
        let name = path.file_stem().map_or("trace".into(), |s| s.to_string_lossy().into_owned());
        let mut scenario =
            suite::trace(&name, surge_shape::trace::replay(&arrivals, args.speedup, args.scale));
        scenario.step_at = args.step_at;
        return Ok(vec![scenario]);
    }
    let all = suite::standard(model, args.seed);
    if args.scenarios.is_empty() {
        return Ok(all);
    }
    let known: Vec<String> = all.iter().map(|s| s.name.clone()).collect();
    if let Some(unknown) = args.scenarios.iter().find(|name| !known.contains(name)) {
        return Err(format!("no scenario named {unknown:?}; the scenarios are {}", known.join(", ")));
    }
    Ok(all.into_iter().filter(|s| args.scenarios.contains(&s.name)).collect())
}
