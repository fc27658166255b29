//! Instance pools: each service runs as a pool of instances that surge launches, health-checks,
//! drains and replaces, through a [`Driver`] (local processes by default).
//!
//! The data path reads a pool through [`Pool::ready`], a lock-free snapshot of the instances
//! that take traffic; everything that changes a pool goes to its supervisor task as a message.

mod cpu;
mod driver;
mod health;
mod instance;
mod metrics;
mod outlier;
pub mod plan;
mod process;
mod status;
mod supervisor;
mod upstreams;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use surge_config::ServiceConfig;
use tokio::sync::{mpsc, oneshot};

pub use driver::{Driver, Exit, InstanceControl, LaunchError, LaunchSpec, Launched, OutputTail};
pub use health::error_chain;
pub use instance::{InFlight, Instance, InstanceState};
pub use metrics::PoolMetrics;
pub use outlier::OutlierPolicy;
pub use process::ProcessDriver;
pub use status::{AutoscaleStatus, InstanceStatus, PoolStatus};
pub use surge_scale::load::{PoolLoad, Ticket, WaitQueue, Waiting};

use supervisor::{Command, Supervisor};

/// A snapshot of instances, cheap to load on every request.
pub type Snapshot = arc_swap::Guard<Arc<Vec<Arc<Instance>>>>;

pub struct Pool {
    name: String,
    /// Swapped by a reload that rolls the pool onto a new configuration.
    config: ArcSwap<ServiceConfig>,
    ready: ArcSwap<Vec<Arc<Instance>>>,
    all: ArcSwap<Vec<Arc<Instance>>>,
    desired: AtomicU32,
    failures: AtomicU32,
    restarts: AtomicU64,
    commands: mpsc::Sender<Command>,
    load: Arc<PoolLoad>,
    autoscale_status: std::sync::Mutex<Option<AutoscaleStatus>>,
    ejections: surge_metrics::Counter,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    #[error("service `{service}` can run {min} to {max} instances (services.{service}.instances); {requested} is out of bounds")]
    OutOfBounds { service: String, requested: u32, min: u32, max: u32 },
    #[error("service `{service}` is shutting down")]
    ShuttingDown { service: String },
    #[error("service `{service}` lists its upstreams (services.{service}.upstreams): it has one instance per address and cannot be scaled")]
    Upstreams { service: String },
    #[error("service `{service}` is autoscaled (services.{service}.autoscale): its size follows the load; change services.{service}.instances to bound it")]
    Autoscaled { service: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    #[error("service `{service}` has no running instance `{id}`")]
    NoInstance { service: String, id: String },
    #[error("service `{service}` is shutting down")]
    ShuttingDown { service: String },
    #[error("service `{service}` lists its upstreams (services.{service}.upstreams): surge does not run them, so it cannot drain one")]
    Upstreams { service: String },
}

impl Pool {
    /// Starts the pool's supervisor, which launches the initial instances.
    pub fn start(config: ServiceConfig, driver: Arc<dyn Driver>, metrics: PoolMetrics) -> Arc<Pool> {
        let (commands, receiver) = mpsc::channel(64);
        let labels = surge_metrics::ServiceLabels { service: config.name.clone() };
        let ejections = metrics.ejections.get_or_create(&labels).clone();
        let desired = config.instances.initial;
        let pool = Arc::new(Pool::new(config, desired, commands, Arc::default(), ejections));
        tokio::spawn(Supervisor::new(Arc::clone(&pool), driver, metrics, receiver).run());
        pool
    }

    fn new(
        config: ServiceConfig,
        desired: u32,
        commands: mpsc::Sender<Command>,
        load: Arc<PoolLoad>,
        ejections: surge_metrics::Counter,
    ) -> Pool {
        Pool {
            desired: AtomicU32::new(desired),
            name: config.name.clone(),
            config: ArcSwap::from_pointee(config),
            ready: ArcSwap::default(),
            all: ArcSwap::default(),
            failures: AtomicU32::new(0),
            restarts: AtomicU64::new(0),
            commands,
            load,
            autoscale_status: std::sync::Mutex::new(None),
            ejections,
        }
    }

    /// A pool of ready instances at `addrs` with no supervisor: nothing is launched, probed or
    /// replaced. For tests of what reads pools.
    #[cfg(feature = "test-support")]
    pub fn of_ready(config: ServiceConfig, addrs: &[std::net::SocketAddr]) -> Arc<Pool> {
        let (commands, _) = mpsc::channel(1);
        let load: Arc<PoolLoad> = Arc::default();
        let instances: Vec<Arc<Instance>> = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let instance =
                    Instance::new(format!("{}-{}", config.name, i + 1), *addr, None, 1, Arc::clone(&load));
                instance.set_state(InstanceState::Ready);
                Arc::new(instance)
            })
            .collect();
        let desired = u32::try_from(addrs.len()).unwrap_or(u32::MAX);
        let pool = Pool::new(config, desired, commands, load, surge_metrics::Counter::default());
        pool.ready.store(Arc::new(instances.clone()));
        pool.all.store(Arc::new(instances));
        Arc::new(pool)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The configuration the pool runs now (a roll onto a new one swaps it at its start).
    pub fn config(&self) -> arc_swap::Guard<Arc<ServiceConfig>> {
        self.config.load()
    }

    /// The instances that take traffic now.
    pub fn ready(&self) -> Snapshot {
        self.ready.load()
    }

    /// What the data path reports to the autoscaler.
    pub fn load(&self) -> &Arc<PoolLoad> {
        &self.load
    }

    /// Whether an instance is on its way, so that a request may wait for one: the pool is
    /// autoscaled (it scales from zero on demand) or asked to run instances.
    pub fn expects_instances(&self) -> bool {
        self.config.load().autoscale.is_some() || self.desired.load(Ordering::SeqCst) > 0
    }

    /// Tells the supervisor a request is waiting (an autoscaled pool at zero starts one now).
    pub fn signal_demand(&self) {
        // A full channel already carries commands that wake the supervisor.
        let _ = self.commands.try_send(Command::Demand);
    }

    /// Reports a request's outcome for the instance's circuit breaker: a success closes a
    /// half-open breaker, a failure streak of `outlier.consecutive_failures` (or a failed
    /// probe) ejects the instance, unless too much of the pool is ejected already.
    pub fn report(&self, in_flight: &mut InFlight, success: bool) {
        let probe = in_flight.is_probe();
        in_flight.reported();
        let instance = in_flight.instance();
        if success {
            if instance.record_success(probe) {
                tracing::info!("{} passed its probe; back in rotation", instance.id);
            }
            return;
        }
        let streak = instance.record_failure(probe);
        let policy = OutlierPolicy::from(&self.config.load().outlier);
        if streak < policy.consecutive_failures {
            return;
        }
        let ready = self.ready();
        let ejected = ready.iter().filter(|i| i.is_ejected() && i.id != instance.id).count();
        if !probe && !policy.may_eject(ejected, ready.len()) {
            return;
        }
        let ejections = instance.eject(|n| policy.ejection_time(n));
        self.ejections.inc();
        tracing::warn!(
            "{} ejected for {:?} after {} (ejection {ejections})",
            instance.id,
            policy.ejection_time(ejections),
            if probe { "a failed probe".to_owned() } else { format!("{streak} failures in a row") }
        );
    }

    /// An instance refused a connection: nothing listens there (on loopback, the process is
    /// gone). It leaves rotation at once, as if it had failed its health checks, and returns
    /// when they pass; until then requests wait for another instance rather than try it again.
    pub fn report_refused(&self, in_flight: &mut InFlight, cause: &str) {
        self.report(in_flight, false);
        let instance = in_flight.instance();
        if instance.transition(InstanceState::Ready, InstanceState::Unhealthy) {
            let command = Command::Refused { id: instance.id.clone(), cause: cause.to_owned() };
            // A full channel only delays the log line: the instance is out of rotation already.
            let _ = self.commands.try_send(command);
        }
    }

    /// Sets the desired number of instances, within the service's bounds.
    pub async fn scale(&self, count: u32) -> Result<u32, ScaleError> {
        let (reply, answer) = oneshot::channel();
        let shutting_down = || ScaleError::ShuttingDown { service: self.name().to_owned() };
        self.commands.send(Command::Scale { count, reply }).await.map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())?
    }

    /// Rolls the pool onto `config`, one instance at a time: a new instance is launched, and
    /// once it is ready an old one drains, until none is left (a rolling update with one
    /// extra instance and none unavailable). Returns once the first new instance is ready, or
    /// with why it failed, in which case the pool went back to the configuration it had.
    pub async fn roll(&self, config: ServiceConfig) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        let shutting_down = || format!("service `{}` is shutting down", self.name());
        let command = Command::Roll { config: Arc::new(config), reply };
        self.commands.send(command).await.map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())?
    }

    /// Takes instance `id` out of rotation, lets its requests finish and stops it; the pool
    /// launches another in its place.
    pub async fn drain_instance(&self, id: &str) -> Result<(), DrainError> {
        let (reply, answer) = oneshot::channel();
        let shutting_down = || DrainError::ShuttingDown { service: self.name().to_owned() };
        let command = Command::Drain { id: id.to_owned(), reply };
        self.commands.send(command).await.map_err(|_| shutting_down())?;
        answer.await.map_err(|_| shutting_down())?
    }

    /// The last lines instance `id` wrote: `None` for an instance the pool does not have,
    /// `Some(None)` for one whose output is not captured.
    pub fn instance_output(&self, id: &str) -> Option<Option<Vec<String>>> {
        self.all.load().iter().find(|instance| instance.id == id).map(|instance| instance.output())
    }

    /// Drains and stops every instance; returns once all have exited.
    pub async fn shutdown(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Shutdown { reply }).await.is_ok() {
            let _ = done.await;
        }
    }

    pub fn status(&self) -> PoolStatus {
        let failures = self.failures.load(Ordering::Relaxed);
        let instances = self
            .all
            .load()
            .iter()
            .map(|instance| InstanceStatus {
                id: instance.id.clone(),
                pid: instance.pid,
                port: instance.addr.port(),
                address: instance.addr,
                weight: instance.weight,
                state: instance.state(),
                in_flight: instance.in_flight(),
                served: instance.served(),
                ejected: instance.is_ejected(),
                ejections: instance.ejections(),
                uptime_ms: u64::try_from(instance.launched.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
            .collect();
        let config = self.config.load();
        PoolStatus {
            service: self.name.clone(),
            desired: self.desired.load(Ordering::Relaxed),
            min: config.instances.min,
            max: config.instances.max,
            balance: config.balance.as_str().to_owned(),
            failures,
            crash_looping: failures >= plan::CRASH_LOOP_THRESHOLD,
            restarts: self.restarts.load(Ordering::Relaxed),
            autoscale: self.autoscale_status.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            instances,
        }
    }
}

/// Every pool of a deployment, in configuration order. A reload swaps the whole list; each
/// reader works on the list as it was when it looked.
pub struct Pools {
    current: ArcSwap<Vec<Arc<Pool>>>,
    driver: Arc<dyn Driver>,
    metrics: PoolMetrics,
}

/// What a reload changes among the pools: pools started for new services (and changed ones
/// that cannot be rolled), to be put in service once ready; pools kept whose instances are to
/// be replaced one at a time with their new configuration; and the pools replaced or no longer
/// configured.
pub struct Reconfiguration {
    pub pools: Vec<Arc<Pool>>,
    pub started: Vec<Arc<Pool>>,
    pub rolled: Vec<(Arc<Pool>, ServiceConfig)>,
    pub retired: Vec<Arc<Pool>>,
}

impl Pools {
    pub fn start(services: &[ServiceConfig], driver: Arc<dyn Driver>, metrics: &PoolMetrics) -> Self {
        let pools =
            services.iter().map(|s| Pool::start(s.clone(), Arc::clone(&driver), metrics.clone())).collect();
        Pools { current: ArcSwap::from_pointee(pools), driver, metrics: metrics.clone() }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pool>> {
        self.current.load().iter().find(|pool| pool.name() == name).cloned()
    }

    /// The pools as they are now.
    pub fn list(&self) -> Arc<Vec<Arc<Pool>>> {
        self.current.load_full()
    }

    /// Starts a pool for every service of `services` that is new or whose pool settings
    /// changed; unchanged services keep theirs (a change of routes alone keeps the pool).
    /// Nothing is swapped yet: see [`Pools::install`].
    pub fn reconfigure(&self, services: &[ServiceConfig]) -> Reconfiguration {
        let current = self.current.load_full();
        let mut pools = Vec::new();
        let mut started = Vec::new();
        let mut rolled = Vec::new();
        for service in services {
            match current.iter().find(|pool| pool.name() == service.name) {
                Some(pool) if same_pool(&pool.config(), service) => pools.push(Arc::clone(pool)),
                Some(pool) if rollable(&pool.config(), service) => {
                    pools.push(Arc::clone(pool));
                    rolled.push((Arc::clone(pool), service.clone()));
                }
                _ => {
                    let pool = Pool::start(service.clone(), Arc::clone(&self.driver), self.metrics.clone());
                    started.push(Arc::clone(&pool));
                    pools.push(pool);
                }
            }
        }
        let retired = current
            .iter()
            .filter(|pool| !pools.iter().any(|kept| Arc::ptr_eq(kept, pool)))
            .cloned()
            .collect();
        Reconfiguration { pools, started, rolled, retired }
    }

    /// Makes `pools` the deployment's pools.
    pub fn install(&self, pools: Vec<Arc<Pool>>) {
        self.current.store(Arc::new(pools));
    }

    /// Stops every pool at once and waits for all of them.
    pub async fn shutdown(&self) {
        stop_all(&self.current.load_full()).await;
    }
}

/// Stops `pools` at once (each drains its instances first) and waits for all of them.
pub async fn stop_all(pools: &[Arc<Pool>]) {
    let stopping: Vec<_> = pools
        .iter()
        .map(|pool| {
            let pool = Arc::clone(pool);
            tokio::spawn(async move { pool.shutdown().await })
        })
        .collect();
    for pool in stopping {
        let _ = pool.await;
    }
}

/// Whether a pool started for `running` can be rolled onto `wanted` in place: both launch
/// their instances (a pool of upstreams, or one becoming so, is replaced whole).
fn rollable(running: &ServiceConfig, wanted: &ServiceConfig) -> bool {
    use surge_config::Backend;
    matches!((&running.backend, &wanted.backend), (Backend::Command { .. }, Backend::Command { .. }))
}

/// Whether a pool started for `running` serves `wanted` as is: every setting but the routes
/// (which the gateway reads from the configuration, not the pool) is the same. Compared by
/// their debug rendering, which covers every field of the configuration types.
fn same_pool(running: &ServiceConfig, wanted: &ServiceConfig) -> bool {
    let without_routes =
        |config: &ServiceConfig| format!("{:?}", ServiceConfig { routes: Vec::new(), ..config.clone() });
    without_routes(running) == without_routes(wanted)
}
