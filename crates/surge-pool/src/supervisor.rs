//! One task per pool owns its instances: it launches, health-checks, drains and replaces them
//! so that the number of live instances follows the desired count. Everything reaches it as a
//! message (commands from the admin API, events from probes and exit watchers), so its state
//! needs no lock; the data path reads only what it publishes.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use surge_config::{Backend, HealthConfig, LifecycleConfig, ServiceConfig};
use surge_metrics::ServiceLabels;
use tokio::sync::{mpsc, oneshot};

use crate::driver::{Driver, Exit, InstanceControl, LaunchSpec};
use crate::health::Prober;
use crate::instance::{Instance, InstanceState};
use crate::metrics::{PoolMetrics, StateLabels};
use crate::plan::{self, CRASH_LOOP_THRESHOLD, STABLE_AFTER};
use crate::status::AutoscaleStatus;
use crate::upstreams::{self, Endpoint};
use crate::{DrainError, Pool, ScaleError};
use surge_scale::autoscaler::{self, Autoscaler, Instances};
use surge_scale::scale_in::{self, Candidate, Standing};
use surge_scale::SurgePolicy;

/// How often a starting instance is probed: fast, so new capacity serves as soon as it can.
const STARTUP_PROBE_PERIOD: Duration = Duration::from_millis(50);
/// Housekeeping cadence: start timeouts, restart backoff, crash-loop recovery, and the
/// autoscaler's samples.
const TICK: Duration = autoscaler::SAMPLE_PERIOD;

pub(crate) enum Command {
    Scale {
        count: u32,
        reply: oneshot::Sender<Result<u32, ScaleError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    /// A request is waiting and nothing is ready: an autoscaled pool at zero starts one now.
    Demand,
    /// Stop one instance gracefully; the pool launches another in its place.
    Drain {
        id: String,
        reply: oneshot::Sender<Result<(), DrainError>>,
    },
    /// An instance refused a connection: the data path took it out of rotation already.
    Refused {
        id: String,
        cause: String,
    },
    /// Replace the instances one at a time with ones of this configuration; the reply comes
    /// once the first new one is ready, or failed (and the pool went back).
    Roll {
        config: Arc<ServiceConfig>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// A roll onto a new configuration whose first instance is not ready yet: what to go back
/// to should it fail, and who waits to hear.
struct Roll {
    previous: Arc<ServiceConfig>,
    previous_generation: u64,
    previous_desired: u32,
    reply: oneshot::Sender<Result<(), String>>,
}

enum Event {
    Probe {
        key: u64,
        result: Result<(), String>,
    },
    Exited {
        key: u64,
        exit: Exit,
    },
    /// The service's upstream names resolve to these addresses now.
    Resolved(Vec<Endpoint>),
}

/// Where the pool's instances come from.
enum Source {
    /// Surge launches them through the driver, as many as desired.
    Launched(Arc<dyn Driver>),
    /// They run elsewhere: the pool holds one member per resolved address.
    Upstreams { wanted: Vec<Endpoint> },
}

struct Member {
    key: u64,
    /// The configuration it was launched with: older than the pool's means it is to be
    /// replaced.
    generation: u64,
    instance: Arc<Instance>,
    control: Arc<dyn InstanceControl>,
    /// Set once surge decided to stop it, so its exit is expected.
    stopping: bool,
    ready_since: Option<Instant>,
    failed_checks: u32,
    passed_checks: u32,
    last_check_error: Option<String>,
}

pub(crate) struct Supervisor {
    pool: Arc<Pool>,
    config: Arc<ServiceConfig>,
    source: Source,
    prober: Prober,
    metrics: PoolMetrics,
    labels: ServiceLabels,
    members: Vec<Member>,
    next_key: u64,
    failures: u32,
    restart_at: Option<Instant>,
    /// Set by a shutdown command: who to tell once every instance has stopped.
    shutdown_waiters: Option<Vec<oneshot::Sender<()>>>,
    autoscaler: Option<Autoscaling>,
    /// Counts the configurations the pool was rolled onto.
    generation: u64,
    roll: Option<Roll>,
    events_tx: mpsc::UnboundedSender<Event>,
    events_rx: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::Receiver<Command>,
}

impl Supervisor {
    pub fn new(
        pool: Arc<Pool>,
        driver: Arc<dyn Driver>,
        metrics: PoolMetrics,
        commands: mpsc::Receiver<Command>,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let config = pool.config.load_full();
        let autoscaler = config.autoscale.clone().map(Autoscaling::new);
        let labels = ServiceLabels { service: config.name.clone() };
        // Expose the counter at zero from the start, so rate() works from the first scrape.
        let _ = metrics.restarts.get_or_create(&labels);
        let source = match &config.backend {
            Backend::Command { .. } => Source::Launched(driver),
            Backend::Upstreams { upstreams, dns_refresh } => {
                let events = events_tx.clone();
                let send = move |endpoints| events.send(Event::Resolved(endpoints)).is_ok();
                let resolving =
                    upstreams::resolve_forever(config.name.clone(), upstreams.clone(), *dns_refresh, send);
                tokio::spawn(resolving);
                Source::Upstreams { wanted: Vec::new() }
            }
        };
        let prober = Prober::new(&config);
        Supervisor {
            pool,
            config,
            source,
            prober,
            metrics,
            labels,
            members: Vec::new(),
            next_key: 1,
            failures: 0,
            restart_at: None,
            shutdown_waiters: None,
            autoscaler,
            generation: 0,
            roll: None,
            events_tx,
            events_rx,
            commands,
        }
    }

    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.reconcile();
            if self.shutdown_waiters.is_some() && self.members.is_empty() {
                for waiter in self.shutdown_waiters.take().unwrap_or_default() {
                    let _ = waiter.send(());
                }
                return;
            }
            tokio::select! {
                Some(command) = self.commands.recv() => self.command(command),
                Some(event) = self.events_rx.recv() => self.event(event),
                _ = tick.tick() => self.housekeeping(),
            }
        }
    }

    fn service(&self) -> &str {
        &self.config.name
    }

    fn shutting_down(&self) -> String {
        format!("service `{}` is shutting down", self.service())
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Refused { id, cause } => {
                let threshold = self.config.health.unhealthy_threshold;
                if let Some(member) = self.members.iter_mut().find(|m| m.instance.id == id && !m.stopping) {
                    // As if it had failed its health checks: it comes back once they pass.
                    member.passed_checks = 0;
                    member.failed_checks = member.failed_checks.max(threshold);
                    member.ready_since = None;
                    tracing::warn!(
                        "{id} refused a connection ({cause}); out of rotation until its health check passes"
                    );
                }
            }
            Command::Demand => {
                if self.shutdown_waiters.is_some() {
                    return;
                }
                let Some(autoscaling) = &self.autoscaler else { return };
                let current = self.pool.desired.load(Ordering::SeqCst);
                let demand = autoscaling.autoscaler.demand(autoscaling.started.elapsed(), current);
                if demand.desired != current {
                    tracing::info!("{}: scaling from zero: a request is waiting", self.service());
                    self.pool.desired.store(demand.desired, Ordering::SeqCst);
                }
                // Requests are waiting: decide now rather than at the next tick, so a burst is
                // answered the moment it arrives.
                if demand.decide {
                    self.autoscale(true);
                }
            }
            Command::Scale { count, reply } => {
                let result = if self.shutdown_waiters.is_some() {
                    Err(ScaleError::ShuttingDown { service: self.service().to_owned() })
                } else if self.autoscaler.is_some() {
                    Err(ScaleError::Autoscaled { service: self.service().to_owned() })
                } else if matches!(self.source, Source::Upstreams { .. }) {
                    Err(ScaleError::Upstreams { service: self.service().to_owned() })
                } else if !self.config.instances.contains(count) {
                    let bounds = self.config.instances;
                    Err(ScaleError::OutOfBounds {
                        service: self.service().to_owned(),
                        requested: count,
                        min: bounds.min,
                        max: bounds.max,
                    })
                } else {
                    let before = self.pool.desired.swap(count, Ordering::SeqCst);
                    if before != count {
                        tracing::info!("{}: scaling from {before} to {count} instances", self.service());
                    }
                    Ok(count)
                };
                let _ = reply.send(result);
            }
            Command::Drain { id, reply } => {
                let service = || self.service().to_owned();
                let found = self.members.iter().position(|m| m.instance.id == id && !m.stopping);
                let result = if self.shutdown_waiters.is_some() {
                    Err(DrainError::ShuttingDown { service: service() })
                } else if matches!(self.source, Source::Upstreams { .. }) {
                    Err(DrainError::Upstreams { service: service() })
                } else if let Some(index) = found {
                    tracing::info!("{id}: drain asked through the admin API; a new instance takes its place");
                    self.drain(index);
                    Ok(())
                } else {
                    Err(DrainError::NoInstance { service: service(), id })
                };
                let _ = reply.send(result);
            }
            Command::Roll { config, reply } => self.roll_onto(config, reply),
            Command::Shutdown { reply } => {
                if let Some(roll) = self.roll.take() {
                    let _ = roll.reply.send(Err(self.shutting_down()));
                }
                self.shutdown_waiters.get_or_insert_with(Vec::new).push(reply);
                for index in 0..self.members.len() {
                    self.drain(index);
                }
            }
        }
    }

    /// Starts replacing the instances with ones of `config`, one at a time (see `reconcile`).
    fn roll_onto(&mut self, config: Arc<ServiceConfig>, reply: oneshot::Sender<Result<(), String>>) {
        if self.shutdown_waiters.is_some() {
            let _ = reply.send(Err(self.shutting_down()));
            return;
        }
        if let Some(overtaken) = self.roll.take() {
            let _ = overtaken.reply.send(Err("overtaken by a newer configuration".to_owned()));
        }
        let previous_desired = self.pool.desired.load(Ordering::SeqCst);
        let previous = self.configure(config);
        let previous_generation = self.generation;
        self.generation += 1;
        tracing::info!("{}: rolling onto the new configuration, one instance at a time", self.service());
        self.roll = Some(Roll { previous, previous_generation, previous_desired, reply });
    }

    /// Makes `config` the pool's, with what is built from it; returns the one it replaces.
    fn configure(&mut self, config: Arc<ServiceConfig>) -> Arc<ServiceConfig> {
        let previous = std::mem::replace(&mut self.config, Arc::clone(&config));
        self.pool.config.store(Arc::clone(&config));
        self.prober = Prober::new(&config);
        if previous.autoscale != config.autoscale {
            self.autoscaler = config.autoscale.clone().map(Autoscaling::new);
        }
        // A pool not autoscaled runs its new initial count; any pool stays within its bounds.
        let desired = match &config.autoscale {
            None if previous.instances != config.instances => config.instances.initial,
            _ => self.pool.desired.load(Ordering::SeqCst).clamp(config.instances.min, config.instances.max),
        };
        self.pool.desired.store(desired, Ordering::SeqCst);
        // Failures of the old configuration say nothing of the new one.
        self.failures = 0;
        self.restart_at = None;
        previous
    }

    /// The first instance of a roll failed: back to the configuration before it, whose
    /// instances still serve; the new ones go.
    fn roll_failed(&mut self, why: String) {
        let Some(roll) = self.roll.take() else { return };
        tracing::error!(
            "{}: the new configuration's first instance failed ({why}); back to the configuration in use",
            self.service()
        );
        self.configure(roll.previous);
        self.pool.desired.store(roll.previous_desired, Ordering::SeqCst);
        self.generation = roll.previous_generation;
        for index in 0..self.members.len() {
            if self.members[index].generation > self.generation {
                self.drain(index);
            }
        }
        let _ = roll.reply.send(Err(why));
    }

    /// Whether a failed instance was the first of a roll onto a new configuration.
    fn is_canary(&self, generation: u64) -> bool {
        self.roll.is_some() && generation == self.generation
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Probe { key, result } => self.probe_result(key, result),
            Event::Exited { key, exit } => self.exited(key, exit),
            Event::Resolved(endpoints) => {
                if let Source::Upstreams { wanted } = &mut self.source {
                    let count = u32::try_from(endpoints.len()).unwrap_or(u32::MAX);
                    self.pool.desired.store(count, Ordering::SeqCst);
                    *wanted = endpoints;
                }
            }
        }
    }

    fn probe_result(&mut self, key: u64, result: Result<(), String>) {
        let service = self.config.name.clone();
        let (healthy_threshold, unhealthy_threshold) =
            (self.config.health.healthy_threshold, self.config.health.unhealthy_threshold);
        // Nothing replaces an upstream that never passes, so why it fails is said at once.
        let upstream = matches!(self.source, Source::Upstreams { .. });
        let Some(member) = self.members.iter_mut().find(|m| m.key == key && !m.stopping) else {
            return;
        };
        let instance = &member.instance;
        match result {
            Ok(()) => {
                member.failed_checks = 0;
                member.passed_checks += 1;
                if instance.transition(InstanceState::Starting, InstanceState::Ready) {
                    member.ready_since = Some(Instant::now());
                    let startup = instance.launched.elapsed();
                    tracing::info!("{} is ready after {startup:?}", instance.id);
                    if let Some(autoscaling) = &mut self.autoscaler {
                        autoscaling.autoscaler.instance_ready(startup);
                    }
                } else if member.passed_checks >= healthy_threshold
                    && instance.transition(InstanceState::Unhealthy, InstanceState::Ready)
                {
                    member.ready_since = Some(Instant::now());
                    tracing::info!("{} passes its health check again; back in rotation", instance.id);
                    // It may never have left the published snapshot (the data path took it out
                    // of rotation), so requests waiting for capacity are told here.
                    self.pool.load.queue().wake_all();
                }
            }
            Err(error) => match instance.state() {
                InstanceState::Starting => {
                    if upstream && member.last_check_error.as_ref() != Some(&error) {
                        tracing::warn!("{service}: {} fails its health check: {error}", instance.id);
                    }
                    member.last_check_error = Some(error);
                }
                InstanceState::Ready | InstanceState::Unhealthy => {
                    member.passed_checks = 0;
                    member.failed_checks += 1;
                    if member.failed_checks >= unhealthy_threshold
                        && instance.transition(InstanceState::Ready, InstanceState::Unhealthy)
                    {
                        member.ready_since = None;
                        tracing::warn!(
                            "{service}: {} failed {unhealthy_threshold} health checks in a row ({error}); \
                             out of rotation",
                            instance.id
                        );
                    }
                }
                _ => {}
            },
        }
    }

    fn exited(&mut self, key: u64, exit: Exit) {
        let Some(position) = self.members.iter().position(|m| m.key == key) else {
            return;
        };
        let member = self.members.remove(position);
        let id = &member.instance.id;
        if member.stopping {
            tracing::info!("{id} stopped ({})", exit.description);
            return;
        }
        if self.is_canary(member.generation) {
            return self.roll_failed(format!("{id} {}", exit.description));
        }
        tracing::warn!("{id} {} unexpectedly; replacing it", exit.description);
        if member.ready_since.is_some_and(|since| since.elapsed() >= STABLE_AFTER) {
            self.failures = 0;
        }
        self.record_failure();
    }

    /// Start timeouts, clearing the failure count once an instance has proved stable, and
    /// the autoscaler's sampling and decisions.
    fn housekeeping(&mut self) {
        self.autoscale(false);
        if let Source::Upstreams { .. } = self.source {
            // An upstream cannot be replaced: it stays out of rotation until it passes a check.
            return;
        }
        let start_timeout = self.config.lifecycle.start_timeout;
        let health_path = self.config.health.path.clone();
        let mut timed_out = 0;
        let mut canary_failed = None;
        let canary_generation = self.roll.as_ref().map(|_| self.generation);
        for member in &mut self.members {
            let instance = &member.instance;
            if member.stopping
                || instance.state() != InstanceState::Starting
                || instance.launched.elapsed() < start_timeout
            {
                continue;
            }
            let last = member.last_check_error.as_deref().unwrap_or("no answer");
            tracing::error!(
                "{} did not pass its health check (GET {health_path}) within start_timeout \
                 {start_timeout:?}; last attempt: {last}; replacing it",
                instance.id
            );
            member.stopping = true;
            instance.set_state(InstanceState::Stopping);
            member.control.kill();
            timed_out += 1;
            if canary_generation == Some(member.generation) {
                canary_failed = Some(format!(
                    "{} did not pass its health check (GET {health_path}) within start_timeout \
                     {start_timeout:?}; last attempt: {last}",
                    instance.id
                ));
            }
        }
        for _ in 0..timed_out {
            self.record_failure();
        }
        if let Some(why) = canary_failed {
            self.roll_failed(why);
        }

        let stable = self.members.iter().any(|m| {
            m.instance.state() == InstanceState::Ready
                && m.ready_since.is_some_and(|s| s.elapsed() >= STABLE_AFTER)
        });
        if self.failures > 0 && stable {
            if self.failures >= CRASH_LOOP_THRESHOLD {
                tracing::info!("{}: instances are stable again; crash loop over", self.service());
            }
            self.failures = 0;
            self.restart_at = None;
        }
    }

    /// Samples the load every tick and decides once per policy period, or now (`early`) when a
    /// waiting request asked for it.
    fn autoscale(&mut self, early: bool) {
        let Some(autoscaling) = &mut self.autoscaler else { return };
        if self.shutdown_waiters.is_some() {
            return;
        }
        let members = &self.members;
        // Read when a decision is due: the CPU time comes from /proc.
        let instances = || {
            let count =
                |state| members.iter().filter(|m| !m.stopping && m.instance.state() == state).count() as u32;
            let pids: Vec<u32> = members.iter().filter_map(|m| m.instance.pid).collect();
            Instances {
                ready: count(InstanceState::Ready),
                starting: count(InstanceState::Starting),
                cpu_seconds: crate::cpu::process_tree_seconds(&pids),
            }
        };
        let current = self.pool.desired.load(Ordering::SeqCst);
        let now = autoscaling.started.elapsed();
        let autoscaler = &mut autoscaling.autoscaler;
        let Some((signals, decision)) = autoscaler.sample(now, &self.pool.load, instances, current, early)
        else {
            return;
        };
        if decision.desired != current {
            tracing::info!(
                "{}: autoscale {current} → {} ({})",
                self.config.name,
                decision.desired,
                decision.reason
            );
            self.pool.desired.store(decision.desired, Ordering::SeqCst);
        }
        self.metrics.panic.get_or_create(&self.labels).set(i64::from(decision.panic));
        *self.pool.autoscale_status.lock().unwrap_or_else(|p| p.into_inner()) = Some(AutoscaleStatus {
            metric: autoscaler.policy().config().metric.as_str().to_owned(),
            target: autoscaler.policy().config().target,
            panic: decision.panic,
            reason: decision.reason,
            concurrency: signals.concurrency,
            rps: signals.rps,
            latency_p95_ms: signals.latency_p95.map(|s| s * 1e3),
            cpu: signals.cpu,
        });
    }

    fn record_failure(&mut self) {
        self.failures = self.failures.saturating_add(1);
        self.metrics.restarts.get_or_create(&self.labels).inc();
        self.pool.restarts.fetch_add(1, Ordering::Relaxed);
        let delay = plan::restart_delay(self.failures);
        self.restart_at = Some(Instant::now() + delay);
        if self.failures == CRASH_LOOP_THRESHOLD {
            tracing::error!(
                "{}: crash loop: {} consecutive instance failures; restarts are backed off (now {delay:?}, \
                 up to 30s). Check the instance's log lines above.",
                self.service(),
                self.failures
            );
        }
    }

    /// Launches or drains instances until the live count matches the desired count.
    fn reconcile(&mut self) {
        if let Source::Upstreams { wanted } = &self.source {
            if self.shutdown_waiters.is_none() {
                let live: Vec<(usize, SocketAddr)> = (0..self.members.len())
                    .filter(|&i| !self.members[i].stopping)
                    .map(|i| (i, self.members[i].instance.addr))
                    .collect();
                let live_addrs: Vec<SocketAddr> = live.iter().map(|&(_, addr)| addr).collect();
                let wanted_addrs: Vec<SocketAddr> = wanted.iter().map(|e| e.addr).collect();
                let (add, remove) = plan::membership_changes(&live_addrs, &wanted_addrs);
                let adding: Vec<Endpoint> = add.iter().map(|&i| wanted[i].clone()).collect();
                for endpoint in adding {
                    let id = format!("{}@{}", self.config.name, endpoint.addr);
                    self.admit(id, upstreams::attach(endpoint.addr), endpoint.weight, Some(endpoint.host));
                }
                for index in remove {
                    self.drain(live[index].0);
                }
            }
            self.publish();
            return;
        }
        if self.shutdown_waiters.is_none() {
            self.answer_roll();
            let desired = self.pool.desired.load(Ordering::SeqCst) as usize;
            let live: Vec<usize> = (0..self.members.len())
                .filter(|&i| !self.members[i].stopping && self.members[i].instance.state().is_live())
                .collect();
            let old: Vec<usize> =
                live.iter().copied().filter(|&i| self.members[i].generation < self.generation).collect();
            let backoff_over = self.restart_at.is_none_or(|at| Instant::now() >= at);
            if live.len() < desired && backoff_over {
                for _ in live.len()..desired {
                    self.launch();
                }
            } else if !old.is_empty() {
                // A roll: one new instance at a time, and an old one goes only once it is ready.
                let new_starting = live.iter().any(|&i| {
                    let member = &self.members[i];
                    member.generation == self.generation && member.instance.state() == InstanceState::Starting
                });
                if !new_starting && live.len() > desired {
                    let candidates = self.candidates(&old);
                    for victim in scale_in::choose_victims(&candidates, 1) {
                        self.drain(old[victim]);
                    }
                } else if !new_starting && backoff_over {
                    self.launch();
                }
            } else if live.len() > desired {
                let candidates = self.candidates(&live);
                for victim in scale_in::choose_victims(&candidates, live.len() - desired) {
                    self.drain(live[victim]);
                }
            }
        }
        self.publish();
    }

    /// Tells whoever started a roll that its first instance is ready (or that there is none
    /// to wait for: a pool at zero).
    fn answer_roll(&mut self) {
        if self.roll.is_none() {
            return;
        }
        let generation = self.generation;
        let ready = self
            .members
            .iter()
            .any(|m| !m.stopping && m.generation == generation && m.instance.state() == InstanceState::Ready);
        let nothing_to_replace = self.pool.desired.load(Ordering::SeqCst) == 0
            && self.members.iter().all(|m| m.stopping || m.generation == generation);
        if ready || nothing_to_replace {
            if let Some(roll) = self.roll.take() {
                tracing::info!("{}: the new configuration's first instance is ready", self.service());
                let _ = roll.reply.send(Ok(()));
            }
        }
    }

    /// The members at `indices` as scale-in sees them.
    fn candidates(&self, indices: &[usize]) -> Vec<Candidate> {
        indices
            .iter()
            .map(|&i| {
                let instance = &self.members[i].instance;
                let standing = match instance.state() {
                    InstanceState::Starting => Standing::Starting,
                    InstanceState::Ready => Standing::Ready,
                    _ => Standing::Unhealthy,
                };
                Candidate { standing, in_flight: instance.in_flight() }
            })
            .collect()
    }

    fn launch(&mut self) {
        let (Source::Launched(driver), Backend::Command { command, args, env, run_as, limits }) =
            (&self.source, &self.config.backend)
        else {
            return;
        };
        let spec = LaunchSpec {
            service: self.config.name.clone(),
            instance_id: format!("{}-{}", self.config.name, self.next_key),
            command: command.clone(),
            args: args.clone(),
            env: env.clone(),
            run_as: run_as.clone(),
            limits: *limits,
        };
        match driver.launch(&spec) {
            Ok(launched) => {
                tracing::info!(
                    "{} launched (pid {}, port {})",
                    spec.instance_id,
                    launched.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
                    launched.addr.port()
                );
                self.admit(spec.instance_id, launched, 1, None);
            }
            Err(err) => {
                tracing::error!("{}: {err}", spec.instance_id);
                self.record_failure();
                if self.roll.is_some() {
                    self.roll_failed(format!("{}: {err}", spec.instance_id));
                }
            }
        }
    }

    /// Makes a launched or attached instance a member: watched for its exit, health-checked,
    /// and in rotation once a check passes. `host`: the name an upstream was found by.
    fn admit(&mut self, id: String, launched: crate::driver::Launched, weight: u32, host: Option<Arc<str>>) {
        let key = self.next_key;
        self.next_key += 1;
        let mut instance =
            Instance::new(id, launched.addr, launched.pid, weight, Arc::clone(&self.pool.load))
                .with_output(launched.output);
        if let Some(host) = host {
            instance = instance.found_as(host);
        }
        let instance = Arc::new(instance);

        let exit_events = self.events_tx.clone();
        let exited = launched.exited;
        let watched = Arc::clone(&instance);
        tokio::spawn(async move {
            let exit = exited.await;
            watched.mark_exited();
            let _ = exit_events.send(Event::Exited { key, exit });
        });
        tokio::spawn(check_health(
            key,
            Arc::clone(&instance),
            self.prober.clone(),
            self.config.health.clone(),
            self.events_tx.clone(),
        ));

        self.members.push(Member {
            key,
            generation: self.generation,
            instance,
            control: Arc::from(launched.control),
            stopping: false,
            ready_since: None,
            failed_checks: 0,
            passed_checks: 0,
            last_check_error: None,
        });
    }

    /// Takes an instance out of rotation and stops it once its requests have finished.
    fn drain(&mut self, index: usize) {
        let member = &mut self.members[index];
        if member.stopping {
            return;
        }
        member.stopping = true;
        let instance = Arc::clone(&member.instance);
        for state in [InstanceState::Ready, InstanceState::Starting, InstanceState::Unhealthy] {
            if instance.transition(state, InstanceState::Draining) {
                break;
            }
        }
        tracing::info!("{} draining ({} in flight)", instance.id, instance.in_flight());
        tokio::spawn(stop(instance, Arc::clone(&member.control), self.config.lifecycle));
    }

    /// Makes the current instances visible to the data path, the admin API and the metrics.
    fn publish(&self) {
        let all: Vec<Arc<Instance>> = self.members.iter().map(|m| Arc::clone(&m.instance)).collect();
        let ready: Vec<Arc<Instance>> =
            all.iter().filter(|i| i.state() == InstanceState::Ready).cloned().collect();
        let mut counts = [0i64; InstanceState::ALL.len()];
        for instance in &all {
            counts[instance.state() as usize] += 1;
        }
        let changed = {
            let before = self.pool.ready.load();
            before.len() != ready.len() || before.iter().zip(&ready).any(|(a, b)| !Arc::ptr_eq(a, b))
        };
        self.pool.ready.store(Arc::new(ready));
        self.pool.all.store(Arc::new(all));
        if changed {
            // New capacity, or less: every waiting request looks again.
            self.pool.load.queue().wake_all();
        }
        self.pool.failures.store(self.failures, Ordering::Relaxed);

        for (state, count) in InstanceState::ALL.into_iter().zip(counts) {
            let labels = StateLabels { service: self.labels.service.clone(), state };
            self.metrics.instances.get_or_create(&labels).set(count);
        }
        let desired = self.pool.desired.load(Ordering::Relaxed);
        self.metrics.desired.get_or_create(&self.labels).set(i64::from(desired));
        self.metrics.max.get_or_create(&self.labels).set(i64::from(self.config.instances.max));
        let looping = self.failures >= CRASH_LOOP_THRESHOLD;
        self.metrics.crash_looping.get_or_create(&self.labels).set(i64::from(looping));
    }
}

/// The live side of autoscaling: the shared sampling loop and the clock it runs on.
struct Autoscaling {
    started: tokio::time::Instant,
    autoscaler: Autoscaler<SurgePolicy>,
}

impl Autoscaling {
    fn new(config: surge_scale::ScaleConfig) -> Self {
        Autoscaling {
            started: tokio::time::Instant::now(),
            autoscaler: Autoscaler::new(SurgePolicy::new(config)),
        }
    }
}

/// Probes an instance until it stops: fast while it starts, every `interval` once it serves.
async fn check_health(
    key: u64,
    instance: Arc<Instance>,
    prober: Prober,
    health: HealthConfig,
    events: mpsc::UnboundedSender<Event>,
) {
    loop {
        let period = match instance.state() {
            InstanceState::Starting => STARTUP_PROBE_PERIOD.min(health.interval),
            InstanceState::Ready | InstanceState::Unhealthy => health.interval,
            _ => return,
        };
        tokio::time::sleep(period).await;
        if !instance.state().is_live() {
            return;
        }
        let result = prober.probe(&instance, &health.path, health.timeout).await;
        if events.send(Event::Probe { key, result }).is_err() {
            return;
        }
    }
}

/// Waits for in-flight requests (up to the drain timeout), then SIGTERM, then SIGKILL.
async fn stop(instance: Arc<Instance>, control: Arc<dyn InstanceControl>, lifecycle: LifecycleConfig) {
    let deadline = Instant::now() + lifecycle.drain_timeout;
    while instance.in_flight_strict() > 0 {
        if Instant::now() >= deadline {
            tracing::warn!(
                "{}: drain_timeout {:?} passed with {} requests in flight; stopping it anyway",
                instance.id,
                lifecycle.drain_timeout,
                instance.in_flight()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !instance.transition(InstanceState::Draining, InstanceState::Stopping) {
        return; // it exited by itself meanwhile
    }
    control.terminate();
    if tokio::time::timeout(lifecycle.stop_timeout, instance.wait_exited()).await.is_err() {
        tracing::warn!(
            "{} still running {:?} after SIGTERM (stop_timeout); sending SIGKILL",
            instance.id,
            lifecycle.stop_timeout
        );
        control.kill();
    }
}
