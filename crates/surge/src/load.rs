//! `surge load`: runs a load test and reports it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use http::{HeaderName, HeaderValue, Method};
use surge_load::progress::Progress;
use surge_load::{Mode, Settings};

use crate::Failure;

#[derive(Args)]
pub struct LoadArgs {
    /// The URL to load, such as http://127.0.0.1:8080/api; overrides a scenario's target
    url: Option<String>,
    /// A scenario file: target, request mix and load shape
    #[arg(short, long)]
    scenario: Option<PathBuf>,
    /// Open loop at this many requests per second, such as 500/s or 30/m
    #[arg(short, long, value_parser = surge_load::scenario::parse_rate)]
    rate: Option<f64>,
    /// How long to send, such as 30s or 2m [default: the shape's own length, else 10s]
    #[arg(short, long, value_parser = surge_config::parse_duration)]
    duration: Option<Duration>,
    /// Keep-alive connections to the target [default: 64]
    #[arg(short, long)]
    connections: Option<usize>,
    /// Closed loop: each connection sends, waits for the answer, thinks, and sends again
    #[arg(long)]
    closed: bool,
    /// Think time between requests of a connection, in a closed loop
    #[arg(long, value_parser = surge_config::parse_duration)]
    think: Option<Duration>,
    /// Give up on a request after this long [default: 10s]
    #[arg(long, value_parser = surge_config::parse_duration)]
    timeout: Option<Duration>,
    /// The method of the URL's requests [default: GET]
    #[arg(short = 'X', long)]
    method: Option<String>,
    /// A header for the URL's requests, "name: value" (repeatable)
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// A body for the URL's requests
    #[arg(long)]
    body: Option<String>,
    /// Seed for random ids and request choice
    #[arg(long)]
    seed: Option<u64>,
    /// Also write the report as JSON to this file
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw rate, errors and latency over time to this SVG file
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn run(args: LoadArgs) -> Result<(), Failure> {
    let scenario = match &args.scenario {
        Some(path) => surge_load::scenario::load(path)?,
        None => Settings::default(),
    };
    let method = args
        .method
        .as_deref()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("{m:?} is not an HTTP method"))
        })
        .transpose()?;
    let headers = args.headers.iter().map(|h| parse_header(h)).collect::<Result<Vec<_>, String>>()?;
    let flags = Settings {
        target: args.url,
        rate: args.rate,
        shape: None,
        closed: args.closed,
        think: args.think,
        duration: args.duration,
        connections: args.connections,
        timeout: args.timeout,
        seed: args.seed,
        requests: Vec::new(),
        method,
        headers,
        body: args.body.map(Into::into),
    };
    let plan = scenario.overridden_by(flags).into_plan()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the async runtime: {err}"))?;
    let report = runtime.block_on(async {
        surge_load::preflight(&plan.target).await?;
        let what = match &plan.mode {
            Mode::Open(shape) => match shape {
                surge_load::shape::Shape::Constant { rate } => format!("{rate}/s open loop"),
                _ => "open loop, shaped".to_owned(),
            },
            Mode::Closed { think } => format!("closed loop, think {think:?}"),
        };
        eprintln!(
            "surge load: {} for {:?} on {} connections, {what}",
            plan.target.url, plan.duration, plan.connections
        );
        let planned = plan.duration;
        let mut progress = None;
        let report = surge_load::run(plan, |run| progress = Some(Progress::start(run, planned))).await;
        if let Some(progress) = progress {
            progress.finish().await;
        }
        Ok::<_, String>(report)
    })?;

    print!("{}", surge_load::report::render(&report));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|err| err.to_string())?;
        std::fs::write(path, json).map_err(|err| format!("cannot write {}: {err}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        surge_load::plot::write_svg(&report, path)?;
    }
    Ok(())
}

fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) =
        text.split_once(':').ok_or_else(|| format!("{text:?}: a header is written \"name: value\""))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    let value =
        HeaderValue::from_str(value.trim()).map_err(|_| format!("{value:?} is not a header value"))?;
    Ok((name, value))
}
