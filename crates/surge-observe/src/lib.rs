//! What Surge shows of itself. Once a second the [`Observer`] looks at every pool, queue and
//! cached route through their read-only handles and the gateway's counters, and makes a
//! [`Sample`]: instances, rates over the last second, latency quantiles, alerts. The sample goes
//! to whoever watches (the dashboard's event stream), a point of it to the 15 minutes of
//! [`history`], and the alert rules look at it ([`alerts`]), their changes told to the log and
//! to webhooks ([`webhook`]).
//!
//! Nothing here is on a request's path: the data path only counts, lock-free, and this reads
//! the counts.

pub mod alerts;
pub mod history;
pub mod sample;
pub mod webhook;
pub mod windows;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use surge_cache::responses::ResponseCaches;
use surge_config::{AlertConfig, Config};
use surge_gateway::GatewayMetrics;
use surge_metrics::{Family, Gauge, Metrics};
use surge_pool::{InstanceState, Pools};
use surge_queue::Queues;
use tokio::sync::watch;

use alerts::{Change, Finding, Look, Phase, Subject};
use history::{Decision, History, HistoryJson, Point};
use sample::{
    AlertState, AlertStatus, CacheSample, GatewaySample, PoolKind, QueueSample, Sample, ServiceSample,
    TrafficRates,
};
use webhook::{now_ms, Notice, Notifier};
use windows::{Counts, Windows};

/// How often the observer looks.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Each certificate file the HTTPS listener serves and when it expires.
pub type Expiries = Arc<dyn Fn() -> Vec<(PathBuf, SystemTime)> + Send + Sync>;

/// What the observer reads.
pub struct Handles {
    pub pools: Arc<Pools>,
    pub queues: Arc<Queues>,
    pub caches: Arc<ResponseCaches>,
    pub gateway: GatewayMetrics,
    pub certificates: Option<Expiries>,
}

pub struct Observer {
    handles: Handles,
    started: Instant,
    latest: watch::Sender<Arc<Sample>>,
    state: Mutex<State>,
    notifier: Notifier,
    firing: Family<AlertLabels, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct AlertLabels {
    alert: String,
}

/// What one look leaves for the next.
struct State {
    seq: u64,
    rules: Vec<AlertConfig>,
    kinds: HashMap<String, PoolKind>,
    windows: Windows,
    history: History,
    /// Each alert not inactive, with what its rule last found.
    alerts: BTreeMap<(String, Subject), (Phase, Finding)>,
    /// The last look's totals of queues and caches, for their rates.
    previous: Totals,
    desired: HashMap<String, u32>,
}

#[derive(Default)]
struct Totals {
    at_ms: u64,
    queues: HashMap<String, (u64, u64)>,
    caches: HashMap<String, (u64, u64)>,
}

impl Observer {
    /// `source`: the dashboard's URL, that alerts link back to.
    pub fn new(handles: Handles, config: &Config, source: String, metrics: &Metrics) -> Arc<Observer> {
        let firing = Family::<AlertLabels, Gauge>::default();
        metrics.register(|registry| {
            registry.register("alerts_firing", "Subjects each alert rule is firing for", firing.clone())
        });
        let notifier = Notifier::spawn(config.alerting.clone(), source, metrics);
        let state = State {
            seq: 0,
            rules: Vec::new(),
            kinds: HashMap::new(),
            windows: Windows::default(),
            history: History::default(),
            alerts: BTreeMap::new(),
            previous: Totals::default(),
            desired: HashMap::new(),
        };
        let observer = Arc::new(Observer {
            handles,
            started: Instant::now(),
            latest: watch::Sender::new(Arc::new(Sample::default())),
            state: Mutex::new(state),
            notifier,
            firing,
        });
        observer.configure(config);
        observer
    }

    /// Takes the rules and pools of a (re)loaded configuration. Alerts of rules that are gone
    /// resolve.
    pub fn configure(&self, config: &Config) {
        let mut state = self.lock();
        let longest = config.alerts.iter().filter_map(|alert| window(&alert.rule)).max();
        state.windows.set_keep(longest.unwrap_or(INTERVAL));
        state.kinds = config
            .services
            .iter()
            .map(|service| {
                let kind = match service.backend {
                    surge_config::Backend::Upstreams { .. } => PoolKind::Upstreams,
                    surge_config::Backend::Command { .. } => PoolKind::Service,
                };
                (service.name.clone(), kind)
            })
            .chain(config.workers.iter().map(|worker| (worker.pool.name.clone(), PoolKind::Worker)))
            .collect();
        let names: Vec<&str> = config.alerts.iter().map(|alert| alert.name.as_str()).collect();
        let gone: Vec<(String, Subject)> =
            state.alerts.keys().filter(|(name, _)| !names.contains(&name.as_str())).cloned().collect();
        let now = now_ms();
        for key in gone {
            if let Some((phase, finding)) = state.alerts.remove(&key) {
                if phase.state == AlertState::Firing {
                    let severity = state
                        .rules
                        .iter()
                        .find(|r| r.name == key.0)
                        .map_or("warning", |r| r.severity.as_str());
                    self.tell(&key.0, severity, Change::Resolved, &finding, phase.since_ms, now);
                }
            }
        }
        state.rules = config.alerts.clone();
        self.notifier.configure(config.alerting.clone());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The latest sample.
    pub fn latest(&self) -> Arc<Sample> {
        self.latest.borrow().clone()
    }

    /// Every new sample, as it is made.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Sample>> {
        self.latest.subscribe()
    }

    pub fn history(&self) -> HistoryJson {
        self.lock().history.to_json(now_ms())
    }

    /// Looks once a second until `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let sample = self.look(now_ms());
                    self.latest.send_replace(Arc::new(sample));
                }
                _ = &mut stop => return,
            }
        }
    }

    /// One look, at `now_ms`.
    pub fn look(&self, now_ms: u64) -> Sample {
        let mut state = self.lock();
        state.seq += 1;
        let state = &mut *state;
        let services = self.pools(state, now_ms);
        let names: Vec<&str> = services.iter().map(|s| s.status.service.as_str()).collect();
        state.windows.retain(&names);
        state.history.retain(&names);
        let elapsed = |previous: &Totals| (now_ms.saturating_sub(previous.at_ms) as f64 / 1000.0).max(1e-3);
        let seconds = elapsed(&state.previous);
        let first = state.previous.at_ms == 0;
        let rate = |now: u64, before: Option<u64>| match before {
            Some(before) if !first => now.saturating_sub(before) as f64 / seconds,
            _ => 0.0,
        };
        let mut totals = Totals { at_ms: now_ms, ..Totals::default() };
        let queues = self
            .handles
            .queues
            .status()
            .into_iter()
            .map(|status| {
                let before = state.previous.queues.get(&status.queue).copied();
                let sample = QueueSample {
                    publish_per_s: rate(status.published, before.map(|b| b.0)),
                    ack_per_s: rate(status.acked, before.map(|b| b.1)),
                    status,
                };
                totals
                    .queues
                    .insert(sample.status.queue.clone(), (sample.status.published, sample.status.acked));
                sample
            })
            .collect();
        let caches = self
            .handles
            .caches
            .list()
            .iter()
            .map(|cache| {
                let read = |counter: &std::sync::atomic::AtomicU64| {
                    counter.load(std::sync::atomic::Ordering::Relaxed)
                };
                let metrics = cache.metrics();
                let (hits, misses) = (read(&metrics.hits), read(&metrics.misses));
                let route = cache.settings().name.clone();
                let before = state.previous.caches.get(&route).copied();
                totals.caches.insert(route.clone(), (hits, misses));
                CacheSample {
                    hits_per_s: rate(hits, before.map(|b| b.0)),
                    misses_per_s: rate(misses, before.map(|b| b.1)),
                    hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
                    stale: read(&metrics.stale),
                    stored_bytes: cache.stored_bytes(),
                    route,
                    hits,
                    misses,
                }
            })
            .collect();
        let gateway = GatewaySample {
            rate_limited_per_s: services.iter().map(|s| s.traffic.rate_limited_per_s).sum(),
            rate_limited_total: services.iter().map(|s| s.traffic.rate_limited_total).sum(),
            unrouted_total: self.handles.gateway.unrouted(),
        };
        state.previous = totals;
        let mut sample = Sample {
            seq: state.seq,
            time_ms: now_ms,
            uptime_s: self.started.elapsed().as_secs(),
            services,
            queues,
            caches,
            gateway,
            alerts: Vec::new(),
        };
        sample.alerts = self.judge(state, &sample, now_ms);
        sample
    }

    /// Every pool with its traffic; records its counts in the windows and its point in history.
    fn pools(&self, state: &mut State, now_ms: u64) -> Vec<ServiceSample> {
        self.handles
            .pools
            .list()
            .iter()
            .map(|pool| {
                let status = pool.status();
                let name = status.service.clone();
                let kind = state.kinds.get(&name).copied().unwrap_or(PoolKind::Service);
                let mut traffic =
                    TrafficRates { waiting: pool.load().waiting() as u64, ..TrafficRates::default() };
                // Worker pools get no requests through the gateway: no counters made for them.
                if kind != PoolKind::Worker {
                    let read = self.handles.gateway.traffic(&name);
                    let counts = Counts {
                        requests: read.by_class.iter().sum(),
                        errors: read.by_class[4],
                        latency: read.latency,
                        rate_limited: read.rate_limited,
                        retries: read.retries,
                    };
                    traffic.in_flight = read.in_flight;
                    traffic.requests_total = counts.requests;
                    traffic.errors_total = counts.errors;
                    traffic.rate_limited_total = counts.rate_limited;
                    state.windows.record(now_ms, &name, counts);
                    if let Some(span) = state.windows.over(&name, INTERVAL) {
                        let ms = |q: f64| span.counts.latency.quantile(q).map(|d| d.as_secs_f64() * 1e3);
                        traffic.rps = span.per_second(span.counts.requests);
                        traffic.errors_per_s = span.per_second(span.counts.errors);
                        traffic.error_ratio = span.error_ratio();
                        traffic.p50_ms = ms(0.5);
                        traffic.p99_ms = ms(0.99);
                        traffic.retries_per_s = span.per_second(span.counts.retries);
                        traffic.rate_limited_per_s = span.per_second(span.counts.rate_limited);
                    }
                } else {
                    traffic.in_flight = status.instances.iter().map(|i| i.in_flight as u64).sum();
                }
                let ready = status.instances.iter().filter(|i| i.state == InstanceState::Ready).count();
                let point = Point {
                    t_ms: now_ms,
                    rps: traffic.rps,
                    errors_per_s: traffic.errors_per_s,
                    p99_ms: traffic.p99_ms,
                    ready: u32::try_from(ready).unwrap_or(u32::MAX),
                    desired: status.desired,
                };
                state.history.push(&name, point);
                if let Some(before) = state.desired.insert(name.clone(), status.desired) {
                    if before != status.desired {
                        let reason = status
                            .autoscale
                            .as_ref()
                            .map_or_else(|| "set through the admin API".to_owned(), |a| a.reason.clone());
                        let decision = Decision {
                            service: name,
                            t_ms: now_ms,
                            from: before,
                            to: status.desired,
                            reason,
                        };
                        state.history.decided(decision);
                    }
                }
                ServiceSample { kind, status, traffic }
            })
            .collect()
    }

    /// Runs every rule over the sample; tells what fired and resolved; returns the alerts
    /// pending or firing now.
    fn judge(&self, state: &mut State, sample: &Sample, now_ms: u64) -> Vec<AlertStatus> {
        let now = SystemTime::now();
        let certificates: Vec<(String, i64)> =
            self.handles.certificates.as_ref().map_or_else(Vec::new, |expiries| {
                expiries()
                    .into_iter()
                    .map(|(file, not_after)| {
                        let left = match not_after.duration_since(now) {
                            Ok(left) => i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                            Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
                        };
                        (file.display().to_string(), left)
                    })
                    .collect()
            });
        let look = Look { sample, windows: &state.windows, certificates: &certificates };
        let mut changes = Vec::new();
        for rule in &state.rules {
            let findings = alerts::evaluate(&rule.rule, &look);
            let quiet: Vec<(String, Subject)> = state
                .alerts
                .keys()
                .filter(|(name, subject)| {
                    *name == rule.name && !findings.iter().any(|f| f.subject == *subject)
                })
                .cloned()
                .collect();
            let unheard = quiet.into_iter().filter_map(|key| {
                let (_, last) = state.alerts.get(&key)?;
                Some(Finding { holds: false, ..last.clone() })
            });
            for finding in findings.into_iter().chain(unheard.collect::<Vec<_>>()) {
                let key = (rule.name.clone(), finding.subject.clone());
                let phase = state.alerts.get(&key).map(|(phase, _)| *phase);
                let (next, change) = alerts::step(phase, finding.holds, now_ms, rule.for_);
                if let Some(change) = change {
                    let since = phase.map_or(now_ms, |p| p.since_ms);
                    changes.push((
                        rule.name.clone(),
                        rule.severity.as_str(),
                        change,
                        finding.clone(),
                        since,
                        rule.summary.clone(),
                    ));
                }
                match next {
                    Some(next) => state.alerts.insert(key, (next, finding)),
                    None => state.alerts.remove(&key),
                };
            }
        }
        for (name, severity, change, mut finding, since, summary) in changes {
            if let Some(summary) = summary {
                finding.text = format!("{summary}: {}", finding.text);
            }
            let starts = if change == Change::Fired { now_ms } else { since };
            self.tell(&name, severity, change, &finding, starts, now_ms);
        }
        for rule in &state.rules {
            let count = state
                .alerts
                .iter()
                .filter(|((name, _), (phase, _))| *name == rule.name && phase.state == AlertState::Firing)
                .count();
            self.firing.get_or_create(&AlertLabels { alert: rule.name.clone() }).set(count as i64);
        }
        state
            .alerts
            .iter()
            .map(|((name, subject), (phase, finding))| {
                let rule = state.rules.iter().find(|rule| rule.name == *name);
                let summary = match rule.and_then(|rule| rule.summary.as_ref()) {
                    Some(summary) => format!("{summary}: {}", finding.text),
                    None => finding.text.clone(),
                };
                let (mut service, mut queue, mut certificate) = (None, None, None);
                match subject {
                    Subject::Service(name) => service = Some(name.clone()),
                    Subject::Queue(name) => queue = Some(name.clone()),
                    Subject::Certificate(file) => certificate = Some(file.clone()),
                }
                AlertStatus {
                    name: name.clone(),
                    severity: rule.map_or("warning", |rule| rule.severity.as_str()).to_owned(),
                    state: phase.state,
                    since_ms: phase.since_ms,
                    summary,
                    value: finding.value,
                    service,
                    queue,
                    certificate,
                }
            })
            .collect()
    }

    /// Says that an alert fired or resolved: in the log and to the webhooks.
    fn tell(
        &self,
        name: &str,
        severity: &'static str,
        change: Change,
        finding: &Finding,
        starts_ms: u64,
        now_ms: u64,
    ) {
        match change {
            Change::Fired => tracing::warn!("alert {name} ({severity}) firing: {}", finding.text),
            Change::Resolved => tracing::info!("alert {name} resolved: {}", finding.text),
        }
        self.notifier.notify(Notice {
            alert: name.to_owned(),
            severity,
            subject: finding.subject.clone(),
            change,
            summary: finding.text.clone(),
            value: finding.value,
            starts_ms,
            ends_ms: (change == Change::Resolved).then_some(now_ms),
        });
    }
}

/// The window a rule averages over, if it has one.
fn window(rule: &surge_config::AlertRule) -> Option<Duration> {
    use surge_config::AlertRule::*;
    match rule {
        ErrorRatio { window, .. } | Latency { window, .. } | RateLimited { window, .. } => Some(*window),
        _ => None,
    }
}
