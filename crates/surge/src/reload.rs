//! Hot reload (`surge reload`, SIGHUP): the configuration file is read again and, if it is
//! valid, applied without dropping a request. An invalid file changes nothing and its errors
//! go back to whoever asked, as `surge check` would print them.
//!
//! Order matters for losing nothing: certificates are checked before anything changes; pools
//! for new services start and become ready while the old ones still serve; a changed service
//! keeps its pool, whose instances are replaced one at a time (a new one ready before an old
//! one drains), and the reload goes on once the first new one is ready; then the gateway is
//! swapped whole (requests in flight finish on the one they began on); only then do the pools
//! no longer wanted drain and stop, once no request that took the old gateway can reach them.
//! A changed service that cannot be rolled (upstreams) gets a whole new pool, made ready before
//! the swap.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use surge_config::{Config, ServiceConfig};
use surge_gateway::{Gateway, LiveGateway, Shared};
use surge_pool::{Pool, Pools};

/// Everything a reload replaces or reads.
pub struct Running {
    pub path: PathBuf,
    pub config: Config,
    pub gateway: LiveGateway,
    pub pools: Arc<Pools>,
    pub certificates: Option<Arc<surge_tls::Certificates>>,
    /// What every gateway shares: queues, metrics, rate-limit store, response caches.
    pub shared: Shared,
    /// Takes the new alert rules and pools.
    pub observer: Arc<surge_observe::Observer>,
}

impl Running {
    /// Applies the file as it is now; `Ok` says what changed, `Err` why nothing did.
    pub async fn reload(&mut self) -> Result<String, String> {
        let config = surge_config::load(&self.path).map_err(|errors| errors.to_string())?;
        let upstream_tls = surge_tls::check_upstreams(&config.services);
        if !upstream_tls.is_empty() {
            return Err(surge_config::ConfigErrors(upstream_tls).to_string());
        }
        let fixed = needs_restart(&self.config, &config);
        if !fixed.is_empty() {
            return Err(format!(
                "{} cannot change while surge runs; restart it to apply them. The configuration in use stays.",
                fixed.join(", ")
            ));
        }
        // Read and checked now, put in use only once nothing else can fail.
        let certificates = match (&self.certificates, &config.gateway.tls) {
            (Some(in_use), Some(tls)) => {
                Some((in_use, in_use.prepare(&tls.certificates).map_err(|errors| errors.to_string())?))
            }
            _ => None,
        };
        let change = self.pools.reconfigure(&config.pools());
        let mut ready = ready_or_not(&change.started).await;
        if ready.is_ok() {
            ready = rolled_or_not(&change.rolled).await;
        }
        if let Err(problem) = ready {
            surge_pool::stop_all(&change.started).await;
            return Err(format!("{problem}; the configuration in use stays"));
        }
        if let Some((in_use, prepared)) = certificates {
            in_use.install(prepared);
        }
        let previous = self.gateway.load();
        let gateway = Gateway::new(&config, &change.pools, &self.shared, Some(&previous));
        self.gateway.store(Arc::new(gateway));
        self.pools.install(change.pools);
        let rolled: Vec<&str> = change.rolled.iter().map(|(pool, _)| pool.name()).collect();
        let summary = summary(&change.started, &rolled, &change.retired, &self.config, &config);
        tokio::spawn(retire(change.retired));
        self.observer.configure(&config);
        // After logrotate moved the file, a reload starts a new one (as nginx -s reopen).
        if let Some(log) = &self.shared.access_log {
            log.reopen();
        }
        self.config = config;
        Ok(summary)
    }
}

/// Stops the pools a reload left behind once nothing can reach them. A request that took the
/// old gateway just before the swap holds a copy of its service's stack, and with it the pool:
/// so a retired pool is stopped only once no one but this task and its supervisor holds it and
/// nothing is in flight or waiting there (or its drain timeout has passed), then it drains.
async fn retire(pools: Vec<Arc<Pool>>) {
    const LOOK: Duration = Duration::from_millis(100);
    /// This task's reference and the pool supervisor's.
    const OWN_REFERENCES: usize = 2;
    let patience = pools.iter().map(|pool| pool.config().lifecycle.drain_timeout).max().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + patience;
    let unreachable = |pool: &Arc<Pool>| {
        Arc::strong_count(pool) <= OWN_REFERENCES && pool.load().active() == 0 && pool.load().waiting() == 0
    };
    while !pools.iter().all(unreachable) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(LOOK).await;
    }
    let names: Vec<&str> = pools.iter().map(|pool| pool.name()).collect();
    if pools.iter().all(unreachable) {
        tracing::info!("retired pools of {}: no request can reach them; stopping", names.join(", "));
    } else {
        tracing::warn!(
            "retired pools of {}: still reachable after their drain timeout {patience:?}; stopping",
            names.join(", ")
        );
    }
    surge_pool::stop_all(&pools).await;
}

/// The settings a running surge holds in its listeners and cannot swap: their keys.
fn needs_restart(running: &Config, wanted: &Config) -> Vec<&'static str> {
    let (now, then) = (&running.gateway, &wanted.gateway);
    let tls_listen = |config: &surge_config::GatewayConfig| config.tls.as_ref().map(|tls| tls.listen);
    let tls_serving = |config: &surge_config::GatewayConfig| {
        config.tls.as_ref().map(|tls| (tls.redirect_to_https, tls.hsts.clone()))
    };
    let mut fixed = Vec::new();
    for (changed, key) in [
        (now.listen != then.listen, "gateway.listen"),
        (tls_listen(now) != tls_listen(then), "gateway.listen_tls"),
        (tls_serving(now) != tls_serving(then), "gateway.redirect_to_https and gateway.hsts"),
        (now.client_timeouts != then.client_timeouts, "gateway's client timeouts"),
        (now.max_connections != then.max_connections, "gateway.max_connections"),
        (
            now.max_connections_per_client != then.max_connections_per_client,
            "gateway.max_connections_per_client",
        ),
        (now.access_log != then.access_log, "gateway.access_log and gateway.access_log_format"),
        (running.admin.listen != wanted.admin.listen, "admin.listen"),
        (running.redis != wanted.redis, "store.redis"),
        (queue_shapes(running) != queue_shapes(wanted), "[queues]"),
        (format!("{:?}", running.workers) != format!("{:?}", wanted.workers), "[workers]"),
        (running.schedules != wanted.schedules, "[schedules]"),
    ] {
        if changed {
            fixed.push(key);
        }
    }
    fixed
}

/// The queues' settings, without where in the file they were written.
fn queue_shapes(config: &Config) -> Vec<String> {
    let nowhere = surge_config::Site::file(&config.file);
    config
        .queues
        .iter()
        .map(|queue| format!("{:?}", surge_config::QueueConfig { site: nowhere.clone(), ..queue.clone() }))
        .collect()
}

/// Rolls each pool in `rolled` onto its new configuration, side by side, until each has its
/// first new instance ready. If one fails, those that got that far are rolled back (in the
/// background: their old instances still serve meanwhile) and the failure is the answer.
async fn rolled_or_not(rolled: &[(Arc<Pool>, ServiceConfig)]) -> Result<(), String> {
    let mut rolling = tokio::task::JoinSet::new();
    for (pool, config) in rolled {
        let (pool, config, previous) =
            (Arc::clone(pool), config.clone(), ServiceConfig::clone(&pool.config()));
        rolling.spawn(async move { (pool.roll(config).await, pool, previous) });
    }
    let (mut failure, mut done) = (None, Vec::new());
    while let Some(outcome) = rolling.join_next().await {
        match outcome {
            Ok((Ok(()), pool, previous)) => done.push((pool, previous)),
            Ok((Err(why), pool, _)) => {
                failure = Some(format!(
                    "service `{}`: the new configuration's first instance failed: {why} \
                     (its old instances keep serving)",
                    pool.name()
                ))
            }
            Err(err) => failure = Some(format!("rolling a service failed: {err}")),
        }
    }
    let Some(failure) = failure else { return Ok(()) };
    for (pool, previous) in done {
        tokio::spawn(async move {
            if let Err(why) = pool.roll(previous).await {
                tracing::error!("service `{}`: rolling back failed too: {why}", pool.name());
            }
        });
    }
    Err(failure)
}

/// Waits until every pool in `started` has its instances ready, each within its start
/// timeout; they start side by side.
async fn ready_or_not(started: &[Arc<Pool>]) -> Result<(), String> {
    let mut waiting = tokio::task::JoinSet::new();
    for pool in started {
        let pool = Arc::clone(pool);
        waiting.spawn(async move {
            let limit = pool.config().lifecycle.start_timeout + Duration::from_secs(1);
            let ready = async {
                while pool.ready().len() < pool.status().desired as usize {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            tokio::time::timeout(limit, ready).await.map_err(|_| {
                format!(
                    "service `{}` did not become ready within {limit:?} (services.{}.lifecycle.start_timeout)",
                    pool.name(),
                    pool.name()
                )
            })
        });
    }
    while let Some(outcome) = waiting.join_next().await {
        outcome.map_err(|err| format!("waiting for a new pool failed: {err}"))??;
    }
    Ok(())
}

fn summary(
    started: &[Arc<Pool>],
    rolled: &[&str],
    retired: &[Arc<Pool>],
    before: &Config,
    after: &Config,
) -> String {
    let names = |pools: &[Arc<Pool>]| pools.iter().map(|p| p.name().to_owned()).collect::<Vec<_>>();
    let (started, retired) = (names(started), names(retired));
    let mut replaced: Vec<String> = started
        .iter()
        .filter(|name| retired.contains(name))
        .map(|name| format!("{name} (whole pool)"))
        .collect();
    replaced.extend(rolled.iter().map(|name| format!("{name} (one instance at a time)")));
    let added: Vec<String> = started.iter().filter(|name| !retired.contains(name)).cloned().collect();
    let removed: Vec<String> = retired.iter().filter(|name| !started.contains(name)).cloned().collect();
    let routes = |config: &Config| config.services.iter().map(|s| s.routes.len()).sum::<usize>();
    let list = |names: &[String]| match names {
        [] => "none".to_owned(),
        names => names.join(", "),
    };
    format!(
        "services added: {}; replaced: {}; removed: {}; routes: {} before, {} now",
        list(&added),
        list(&replaced),
        list(&removed),
        routes(before),
        routes(after)
    )
}
