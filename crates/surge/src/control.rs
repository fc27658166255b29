//! `surge status` and `surge scale`: talk to a running surge through its admin API.

use surge_admin::api::{
    DrainResponse, ReloadResponse, ScaleRequest, ScaleResponse, ServiceSample, StatusResponse,
};

use surge_queue::http::{DeadLettersResponse, DeadRequest, DeadResponse, QueueStatus, QueuesResponse};

use crate::admin_client::AdminClient;
use crate::{AdminArgs, Failure, QueueAction};

fn block_on<T>(future: impl std::future::Future<Output = Result<T, String>>) -> Result<T, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the async runtime: {err}"))?;
    Ok(runtime.block_on(future)?)
}

pub fn status(args: &AdminArgs, json: bool) -> Result<(), Failure> {
    let client = AdminClient::new(args.admin.as_deref(), &args.config)?;
    if json {
        let status: serde_json::Value = block_on(client.get("/status"))?;
        println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
        return Ok(());
    }
    let status: StatusResponse = block_on(client.get("/status"))?;
    print!("{}", render(&status.services));
    for alert in &status.alerts {
        let state = match alert.state {
            surge_observe::sample::AlertState::Firing => "FIRING",
            surge_observe::sample::AlertState::Pending => "pending",
        };
        println!("\nalert {} ({}) {state}: {}", alert.name, alert.severity, alert.summary);
    }
    Ok(())
}

pub fn scale(args: &AdminArgs, service: &str, instances: u32) -> Result<(), Failure> {
    let client = AdminClient::new(args.admin.as_deref(), &args.config)?;
    let path = format!("/services/{service}/scale");
    let answer: ScaleResponse = block_on(client.post(&path, &ScaleRequest { instances }))?;
    println!("{}: desired instances set to {}", answer.service, answer.desired);
    Ok(())
}

pub fn drain(args: &AdminArgs, service: &str, instance: &str) -> Result<(), Failure> {
    let client = AdminClient::new(args.admin.as_deref(), &args.config)?;
    let path = format!("/services/{service}/instances/{instance}/drain");
    let answer: DrainResponse = block_on(client.post(&path, &serde_json::json!({})))?;
    println!("{}: {} draining; another instance takes its place", answer.service, answer.instance);
    Ok(())
}

pub fn dashboard(args: &AdminArgs) -> Result<(), Failure> {
    let client = AdminClient::new(args.admin.as_deref(), &args.config)?;
    // Reachable, or say so now rather than in the browser.
    let _: serde_json::Value = block_on(client.get("/overview"))?;
    println!("{}", client.dashboard_url());
    Ok(())
}

pub fn reload(args: &AdminArgs) -> Result<(), Failure> {
    let client = AdminClient::new(args.admin.as_deref(), &args.config)?;
    let answer: ReloadResponse = block_on(client.post("/reload", &serde_json::json!({})))?;
    println!("reloaded: {}", answer.reloaded);
    Ok(())
}

pub fn queues(args: &AdminArgs, action: Option<QueueAction>) -> Result<(), Failure> {
    if let Some(QueueAction::Repair { queue }) = &action {
        return repair(&args.config, queue);
    }
    let client = AdminClient::new(args.admin.as_deref(), &args.config)?;
    match action {
        None => {
            let answer: QueuesResponse = block_on(client.get("/queues"))?;
            print!("{}", render_queues(&answer.queues));
        }
        Some(QueueAction::Dead { queue }) => {
            let answer: DeadLettersResponse = block_on(client.get(&format!("/queues/{queue}/dead")))?;
            if answer.dead.is_empty() {
                println!("{queue}: no dead letters");
            }
            for letter in answer.dead {
                println!(
                    "{}  {} attempts  enqueued {}  {}",
                    letter.id,
                    letter.attempts,
                    letter.enqueued_at,
                    letter.error.unwrap_or_default()
                );
            }
        }
        Some(QueueAction::Redrive { queue, ids }) => {
            let request = DeadRequest { ids: (!ids.is_empty()).then_some(ids) };
            let answer: DeadResponse =
                block_on(client.post(&format!("/queues/{queue}/dead/redrive"), &request))?;
            let count = answer.redriven.unwrap_or(0);
            println!("{queue}: {count} message{} put back in the queue", if count == 1 { "" } else { "s" });
        }
        Some(QueueAction::Purge { queue, ids }) => {
            let request = DeadRequest { ids: (!ids.is_empty()).then_some(ids) };
            let answer: DeadResponse =
                block_on(client.post(&format!("/queues/{queue}/dead/purge"), &request))?;
            let count = answer.purged.unwrap_or(0);
            println!("{queue}: {count} dead letter{} dropped", if count == 1 { "" } else { "s" });
        }
        Some(QueueAction::Repair { .. }) => {}
    }
    Ok(())
}

/// `surge queues repair NAME`: the queue's folder from the configuration, its damaged segments
/// rewritten with their intact records.
fn repair(config: &std::path::Path, name: &str) -> Result<(), Failure> {
    let config = surge_config::load(config).map_err(Failure::Config)?;
    let Some(queue) = config.queues.iter().find(|queue| queue.name == name) else {
        return Err(Failure::Message(format!("no queue named `{name}` in {}", config.file.display())));
    };
    if queue.backend != surge_config::QueueBackend::Embedded {
        return Err(Failure::Message(format!(
            "queue {name} is kept by RabbitMQ: there is no log here to repair"
        )));
    }
    let repaired = surge_queue::repair(&queue.dir).map_err(|err| Failure::Message(err.to_string()))?;
    if repaired.is_empty() {
        println!("{name}: no damage found in {}", queue.dir.display());
    }
    for segment in repaired {
        let cut: u64 = segment.cut.iter().map(|(_, bytes)| bytes).sum();
        let at: Vec<String> = segment.cut.iter().map(|(offset, _)| offset.to_string()).collect();
        println!(
            "{}: kept {} records, cut {cut} damaged bytes at offset {}; the file as it was is {}",
            segment.path.display(),
            segment.kept,
            at.join(", "),
            segment.original.display()
        );
    }
    Ok(())
}

fn render_queues(queues: &[QueueStatus]) -> String {
    if queues.is_empty() {
        return "no queues are defined\n".to_owned();
    }
    let mut rows =
        vec![["QUEUE", "READY", "DELAYED", "IN-FLIGHT", "DEAD", "OLDEST", "PUBLISHED", "ACKED", "RETRIED"]
            .map(String::from)];
    rows.extend(queues.iter().map(|queue| {
        [
            queue.queue.clone(),
            queue.ready.to_string(),
            queue.delayed.to_string(),
            queue.in_flight.to_string(),
            queue.dead.to_string(),
            queue.oldest_age_seconds.map_or_else(|| "-".to_owned(), |age| format!("{age:.1}s")),
            queue.published.to_string(),
            queue.acked.to_string(),
            queue.retried.to_string(),
        ]
    }));
    table(rows)
}

fn table<const N: usize>(rows: Vec<[String; N]>) -> String {
    let widths: Vec<usize> = (0..N).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> =
            row.iter().zip(&widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        out.push_str(&format!("{}\n", cells.join("  ").trim_end()));
    }
    out
}

/// One block per service: a summary line, then a table of its instances.
fn render(services: &[ServiceSample]) -> String {
    let mut out = String::new();
    for (i, sampled) in services.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let (service, traffic) = (&sampled.status, &sampled.traffic);
        let ready =
            service.instances.iter().filter(|i| i.state == surge_admin::api::InstanceState::Ready).count();
        out.push_str(&format!(
            "{}  {ready}/{} ready (min {}, max {})  {}  restarts {}{}\n",
            service.service,
            service.desired,
            service.min,
            service.max,
            service.balance,
            service.restarts,
            if service.crash_looping { "  CRASH LOOP: restarts backed off" } else { "" }
        ));
        if sampled.kind != surge_observe::sample::PoolKind::Worker {
            let ms = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"));
            out.push_str(&format!(
                "  {:.1} req/s  {:.1} errors/s  p50 {}  p99 {}  in flight {}  waiting {}\n",
                traffic.rps,
                traffic.errors_per_s,
                ms(traffic.p50_ms),
                ms(traffic.p99_ms),
                traffic.in_flight,
                traffic.waiting
            ));
        }
        let mut rows =
            vec![["INSTANCE", "PID", "ADDRESS", "WEIGHT", "STATE", "IN-FLIGHT", "SERVED", "UPTIME"]
                .map(String::from)];
        rows.extend(service.instances.iter().map(|instance| {
            [
                instance.id.clone(),
                instance.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                instance.address.to_string(),
                instance.weight.to_string(),
                instance.state.as_str().to_owned(),
                instance.in_flight.to_string(),
                instance.served.to_string(),
                format!("{}s", instance.uptime_ms / 1000),
            ]
        }));
        if rows.len() == 1 {
            out.push_str("  (no instances)\n");
            continue;
        }
        for line in table(rows).lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}
