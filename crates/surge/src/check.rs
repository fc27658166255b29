//! `surge check`: validate a configuration and summarise it.

use std::path::Path;

use surge_config::{check_listeners, Backend, ConfigErrors};

use crate::Failure;

pub fn run(path: &Path) -> Result<(), Failure> {
    let config = surge_config::load(path)?;
    let mut errors = check_listeners(&config);
    if let Some(tls) = &config.gateway.tls {
        if let Err(certificates) = surge_tls::Certificates::load(&tls.certificates) {
            errors.extend(certificates.0);
        }
    }
    errors.extend(surge_tls::check_upstreams(&config.services));
    if !errors.is_empty() {
        errors.sort_by_key(|e| (e.site.line, e.site.column));
        return Err(ConfigErrors(errors).into());
    }
    let count = config.services.len();
    let https = match &config.gateway.tls {
        Some(tls) => format!(
            ", HTTPS on {} ({} certificate{})",
            tls.listen,
            tls.certificates.len(),
            plural(tls.certificates.len())
        ),
        None => String::new(),
    };
    println!(
        "{} is valid: {count} service{}, gateway on {}{https}, admin API on {}",
        path.display(),
        plural(count),
        config.gateway.listen,
        config.admin.listen
    );
    for service in &config.services {
        let routes = route_list(&service.routes);
        let bounds = service.instances;
        let instances = match &service.backend {
            Backend::Command { command, .. } => format!(
                "instances {}..{} starting at {}, runs {}",
                bounds.min,
                bounds.max,
                bounds.initial,
                command.display()
            ),
            Backend::Upstreams { upstreams, .. } => {
                let addresses: Vec<String> = upstreams
                    .iter()
                    .map(|u| match u.weight {
                        1 => u.authority(),
                        weight => format!("{} (weight {weight})", u.authority()),
                    })
                    .collect();
                format!("upstreams {}", addresses.join(", "))
            }
        };
        println!("  {}: {} ({}), {instances}", service.name, routes.join(" "), service.balance.as_str());
    }
    for queue in &config.queues {
        let publish = match queue.publish {
            surge_config::Publish::Admin => "published through the admin API",
            surge_config::Publish::Public => "published through the admin API and the gateway",
        };
        let kept = match &queue.backend {
            surge_config::QueueBackend::Embedded => format!("kept in {}", queue.dir.display()),
            surge_config::QueueBackend::Amqp { url, broker_queue } => {
                format!("kept by RabbitMQ at {} as {broker_queue}", surge_queue::without_password(url))
            }
        };
        println!("  queue {}: {kept}, {publish}, {} attempts", queue.name, queue.max_attempts);
    }
    for worker in &config.workers {
        let bounds = worker.pool.instances;
        println!(
            "  worker {}: consumes {} at {}, instances {}..{}{}, prefetch {}",
            worker.pool.name,
            worker.queue,
            worker.path,
            bounds.min,
            bounds.max,
            if worker.pool.autoscale.is_some() { " (autoscaled)" } else { "" },
            worker.prefetch
        );
    }
    for schedule in &config.schedules {
        println!("  schedule {}: \"{}\" to {}", schedule.name, schedule.cron, schedule.queue);
    }
    for site in &config.statics {
        println!(
            "  static {}: {} from {}",
            site.name,
            route_list(&site.routes).join(" "),
            site.root.display()
        );
    }
    Ok(())
}

/// Each route as `host/prefix`, marked `(cached)` when it has a response cache.
fn route_list(routes: &[surge_config::Route]) -> Vec<String> {
    routes
        .iter()
        .map(|r| {
            let cached = if r.cache.is_some() { " (cached)" } else { "" };
            format!("{}{}{cached}", r.host.as_deref().unwrap_or(""), r.prefix)
        })
        .collect()
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}
