//! `surge up`: start the pools, the gateway and the admin API; on SIGINT or SIGTERM stop
//! accepting, drain in-flight requests, stop the instances and exit 0.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use surge_config::{Config, Site};
use surge_gateway::{Gateway, GatewayMetrics, LiveGateway};
use surge_metrics::Metrics;
use surge_pool::{PoolMetrics, Pools, ProcessDriver};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::reload::Running;
use crate::Failure;

pub fn run(path: &Path) -> Result<(), Failure> {
    init_logging();
    let config = surge_config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("cannot start the async runtime: {err}"))?;
    runtime.block_on(serve(config, path.to_owned()))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SURGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn bind(addr: SocketAddr, site: &Site) -> Result<TcpListener, Failure> {
    TcpListener::bind(addr).await.map_err(|err| {
        Failure::Config(surge_config::ConfigErrors(vec![
            site.error(format!("cannot listen on {addr}: {err}"))
        ]))
    })
}

async fn serve(config: Config, path: std::path::PathBuf) -> Result<(), Failure> {
    // First, so that no signal finds its default action (SIGXFSZ's would kill surge).
    let mut signals = Signals::new()?;
    let upstream_tls = surge_tls::check_upstreams(&config.services);
    if !upstream_tls.is_empty() {
        return Err(Failure::Config(surge_config::ConfigErrors(upstream_tls)));
    }
    let mut token = crate::admin_client::admin_token(&config.admin)?;
    if token.is_none() && config.admin.listen.ip().is_loopback() {
        // Changes through the admin API always need a token: with none configured, this run
        // makes its own and leaves it where the command line finds it.
        match crate::admin_client::make_run_token(&path) {
            Ok((made, saved)) => {
                token = Some(made);
                if let Err(why) = saved {
                    // Fail closed: changes still need this run's token, which nobody has.
                    tracing::warn!(
                        "{why}; the admin API takes changes only with this run's token, which could not be \
                         saved: set SURGE_ADMIN_TOKEN (for surge up and the command line alike) or \
                         admin.token_file to use surge scale, reload and queues"
                    );
                }
            }
            Err(why) => {
                return Err(Failure::Message(format!(
                    "{why}: no token for the admin API; set SURGE_ADMIN_TOKEN or admin.token_file"
                )))
            }
        }
    }
    let access = surge_admin::Access::new(config.admin.listen, token, config.admin.metrics_public).map_err(
        |message| {
            Failure::Config(surge_config::ConfigErrors::single(config.admin.listen_site.error(message)))
        },
    )?;
    let gateway_listener = bind(config.gateway.listen, &config.gateway.listen_site).await?;
    let admin_listener = bind(config.admin.listen, &config.admin.listen_site).await?;
    let local = |listener: &TcpListener| listener.local_addr().map_err(|err| err.to_string());
    let (gateway_addr, admin_addr) = (local(&gateway_listener)?, local(&admin_listener)?);
    let https = match &config.gateway.tls {
        Some(tls) => {
            let certificates = surge_tls::Certificates::load(&tls.certificates)?;
            let server_config = certificates.server_config()?;
            let listener = bind(tls.listen, &tls.listen_site).await?;
            let addr = local(&listener)?;
            Some((listener, addr, certificates, server_config))
        }
        None => None,
    };

    let metrics = Arc::new(Metrics::new());
    let pool_metrics = PoolMetrics::register(&metrics);
    let gateway_metrics = GatewayMetrics::register(&metrics);
    let queues = Arc::new(surge_queue::Queues::open(&config.queues).await?);
    let queue_metrics = surge_queue::QueueMetrics(Arc::clone(&queues));
    metrics.register(|registry| registry.register_collector(Box::new(queue_metrics)));
    let pools = Arc::new(Pools::start(&config.pools(), Arc::new(ProcessDriver), &pool_metrics));
    let store = surge_gateway::RateStore::connect(config.redis.as_deref()).await?;
    let caches = surge_cache::responses::ResponseCaches::open(config.redis.as_deref()).await;
    metrics.register(|registry| {
        registry
            .register_collector(Box::new(surge_cache::responses::ResponseCacheMetrics(Arc::clone(&caches))))
    });
    let access_log = match &config.gateway.access_log {
        Some(settings) => Some(surge_gateway::AccessLog::open(settings, &metrics)?),
        None => None,
    };
    let shared = surge_gateway::Shared {
        queues: Arc::clone(&queues),
        metrics: gateway_metrics,
        store,
        caches: Arc::clone(&caches),
        access_log: access_log.clone(),
    };
    let gateway: LiveGateway =
        Arc::new(ArcSwap::from_pointee(Gateway::new(&config, &pools.list(), &shared, None)));
    let (stop_delivery, delivery_stopping) = watch::channel(false);
    for worker in &config.workers {
        if let (Some(queue), Some(pool)) = (queues.get(&worker.queue), pools.get(&worker.pool.name)) {
            let stopping = delivery_stopping.clone();
            let leases = Some(format!("http://{admin_addr}"));
            tokio::spawn(surge_queue::deliver::deliver(
                Arc::clone(queue),
                pool,
                worker.clone(),
                leases,
                stopping,
            ));
        }
    }
    let compaction = tokio::spawn(Arc::clone(&queues).compact_forever());
    let schedules: Vec<_> = config
        .schedules
        .iter()
        .filter_map(|schedule| {
            let queue = Arc::clone(queues.get(&schedule.queue)?);
            Some(tokio::spawn(surge_queue::schedule::fire_forever(queue, schedule.clone())))
        })
        .collect();
    let mut certificates_in_use = None;

    let (stop_gateway, gateway_stopping) = watch::channel(false);
    let (stop_admin, admin_stopping) = watch::channel(false);
    let drain = config.gateway.shutdown_timeout;
    let mut gateway_tasks = Vec::new();
    let mut https_note = String::new();
    let mut watcher = None;
    let mut redirect_to = None;
    if let Some((listener, addr, certificates, server_config)) = https {
        https_note = format!(", HTTPS on https://{addr}");
        let tls = config.gateway.tls.as_ref();
        redirect_to = tls.filter(|tls| tls.redirect_to_https).map(|_| addr.port());
        certificates_in_use = Some(Arc::clone(&certificates));
        watcher = Some(tokio::spawn(certificates.watch()));
        gateway_tasks.push(tokio::spawn(surge_gateway::serve_tls(
            Arc::clone(&gateway),
            listener,
            server_config,
            tls.and_then(|tls| tls.hsts.clone()),
            stopped(gateway_stopping.clone()),
            drain,
        )));
    }
    let plain = stopped(gateway_stopping);
    gateway_tasks.push(match redirect_to {
        Some(port) => tokio::spawn(surge_gateway::serve_https_redirect(
            gateway_listener,
            port,
            &config.gateway,
            plain,
            drain,
        )),
        None => tokio::spawn(surge_gateway::serve(Arc::clone(&gateway), gateway_listener, plain, drain)),
    });
    let expiries = certificates_in_use.clone().map(|certificates| {
        let expiries: surge_observe::Expiries = Arc::new(move || certificates.expiries());
        expiries
    });
    let observed = surge_observe::Handles {
        pools: Arc::clone(&pools),
        queues: Arc::clone(&queues),
        caches: Arc::clone(&caches),
        gateway: shared.metrics.clone(),
        certificates: expiries,
    };
    let dashboard = format!("http://{admin_addr}/");
    let observer = surge_observe::Observer::new(observed, &config, dashboard.clone(), &metrics);
    let observing = tokio::spawn(Arc::clone(&observer).run(stopped(admin_stopping.clone())));
    let (reload_requests, mut reloads) = tokio::sync::mpsc::channel(4);
    let handles = surge_admin::Handles {
        pools: Arc::clone(&pools),
        queues: Arc::clone(&queues),
        caches,
        metrics: Arc::clone(&metrics),
        reload: reload_requests,
        observer: Arc::clone(&observer),
        stopping: admin_stopping.clone(),
    };
    let admin = surge_admin::router(handles, access);
    let admin_task = tokio::spawn(surge_admin::serve(admin_listener, admin, stopped(admin_stopping)));
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    let (services, workers) = (config.services.len(), config.workers.len());
    let work =
        if workers > 0 { format!(", {workers} worker pool{}", plural(workers)) } else { String::new() };
    tracing::info!(
        "surge is up: gateway on http://{gateway_addr}{https_note}, admin API on http://{admin_addr}, \
         {services} service{}{work}; dashboard at {dashboard}",
        plural(services)
    );

    let mut running = Running {
        path,
        config,
        gateway,
        pools: Arc::clone(&pools),
        certificates: certificates_in_use,
        shared,
        observer,
    };
    let first = loop {
        let reply = tokio::select! {
            signal = signals.next() => match signal {
                Signal::Stop(name) => break name,
                Signal::Reload => None,
            },
            Some(reply) = reloads.recv() => Some(reply),
        };
        // A stop signal during a reload stops surge; the reload is abandoned.
        let outcome = tokio::select! {
            outcome = running.reload() => outcome,
            name = signals.stop() => break name,
        };
        match &outcome {
            Ok(summary) => tracing::info!("configuration reloaded: {summary}"),
            Err(problem) => tracing::warn!("configuration not reloaded:\n{problem}"),
        }
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    };
    tracing::info!("{first}: draining requests, then stopping instances (send it again to stop at once)");
    let _ = stop_gateway.send(true);
    // No new delivery starts; those under way finish as the worker pools drain.
    let _ = stop_delivery.send(true);
    let graceful = async {
        for task in gateway_tasks {
            let _ = task.await;
        }
        if let Some(log) = access_log {
            // The last requests' lines, before surge exits.
            let _ = tokio::task::spawn_blocking(move || log.flush(std::time::Duration::from_secs(2))).await;
        }
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        schedules.iter().for_each(|schedule| schedule.abort());
        pools.shutdown().await;
        compaction.abort();
        // The admin API stays up until the end so `surge status` can watch the drain.
        let _ = stop_admin.send(true);
        let _ = admin_task.await;
        let _ = observing.await;
    };
    tokio::select! {
        _ = graceful => {
            tracing::info!("surge stopped");
            Ok(())
        }
        second = signals.stop() => {
            // Exiting is enough: every instance has PR_SET_PDEATHSIG and dies with surge.
            Err(Failure::Message(format!("{second} again: stopped at once, without draining")))
        }
    }
}

async fn stopped(mut flag: watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
    /// Taken so that a write past the file-size limit fails with EFBIG (a publish answered
    /// 503) instead of killing surge.
    _file_too_large: tokio::signal::unix::Signal,
}

enum Signal {
    Stop(&'static str),
    /// SIGHUP: read the configuration again.
    Reload,
}

impl Signals {
    fn new() -> Result<Self, Failure> {
        let listen =
            |kind| signal(kind).map_err(|err| Failure::Message(format!("cannot handle signals: {err}")));
        Ok(Signals {
            interrupt: listen(SignalKind::interrupt())?,
            terminate: listen(SignalKind::terminate())?,
            hangup: listen(SignalKind::hangup())?,
            _file_too_large: listen(SignalKind::from_raw(libc::SIGXFSZ))?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::Stop("SIGINT"),
            _ = self.terminate.recv() => Signal::Stop("SIGTERM"),
            _ = self.hangup.recv() => Signal::Reload,
        }
    }

    async fn stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
