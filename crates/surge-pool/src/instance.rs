//! One running instance as the data path sees it: an address, a state, and lock-free counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use surge_scale::load::PoolLoad;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Launched; its health check has not answered 2xx yet.
    Starting,
    /// Takes traffic.
    Ready,
    /// Failed consecutive health checks; out of rotation until a check passes.
    Unhealthy,
    /// Out of rotation, finishing its in-flight requests.
    Draining,
    /// Asked to exit (SIGTERM, then SIGKILL).
    Stopping,
    /// The process has exited.
    Exited,
}

impl InstanceState {
    pub const ALL: [InstanceState; 6] = [
        InstanceState::Starting,
        InstanceState::Ready,
        InstanceState::Unhealthy,
        InstanceState::Draining,
        InstanceState::Stopping,
        InstanceState::Exited,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Draining => "draining",
            InstanceState::Stopping => "stopping",
            InstanceState::Exited => "exited",
        }
    }

    /// Counts toward the pool's size: it serves, or is on its way to serving.
    pub fn is_live(&self) -> bool {
        matches!(self, InstanceState::Starting | InstanceState::Ready | InstanceState::Unhealthy)
    }

    fn from_u8(value: u8) -> Self {
        Self::ALL.get(usize::from(value)).copied().unwrap_or(InstanceState::Exited)
    }
}

#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub addr: SocketAddr,
    /// `addr` as a URI authority, made once rather than for every request.
    pub authority: http::uri::Authority,
    /// The name it was found by (an upstream's host), else its IP address: what its TLS
    /// certificate is checked for.
    name: Arc<str>,
    pub pid: Option<u32>,
    /// Its share of the traffic relative to the pool's other instances.
    pub weight: u32,
    pub launched: Instant,
    state: AtomicU8,
    in_flight: AtomicUsize,
    served: AtomicU64,
    exited: watch::Sender<bool>,
    load: Arc<PoolLoad>,
    breaker: Breaker,
    /// Peak-EWMA latency in microseconds (0: no sample yet), and when it was last updated (ms
    /// since launch), for the p2c_ewma balancer.
    latency_estimate_us: AtomicU64,
    latency_updated_ms: AtomicU64,
    /// Its last lines of output, when its driver captures them.
    output: Option<crate::driver::OutputTail>,
}

/// The estimate of an instance without a sample yet (linkerd assumes the same).
const DEFAULT_LATENCY: f64 = 0.030;
/// How fast the estimate forgets a slow period.
const LATENCY_DECAY: f64 = 10.0;
/// What a failed try counts as, so an instance that fails fast never looks fast.
const FAILURE_LATENCY: f64 = 1.0;

/// The passive circuit breaker: closed, open until `ejected_until`, then half-open for one
/// probe request. Times are milliseconds since the instance's launch.
#[derive(Debug, Default)]
struct Breaker {
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// 0 while closed.
    ejected_until: AtomicU64,
    probing: AtomicBool,
}

impl Instance {
    pub(crate) fn new(
        id: String,
        addr: SocketAddr,
        pid: Option<u32>,
        weight: u32,
        load: Arc<PoolLoad>,
    ) -> Self {
        let authority = http::uri::Authority::try_from(addr.to_string())
            .unwrap_or_else(|_| http::uri::Authority::from_static("invalid"));
        Instance {
            id,
            addr,
            authority,
            name: Arc::from(addr.ip().to_string()),
            pid,
            weight,
            launched: Instant::now(),
            state: AtomicU8::new(InstanceState::Starting as u8),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            exited: watch::Sender::new(false),
            load,
            breaker: Breaker::default(),
            latency_estimate_us: AtomicU64::new(0),
            latency_updated_ms: AtomicU64::new(0),
            output: None,
        }
    }

    /// Known by `host` rather than by its address.
    pub(crate) fn found_as(mut self, host: Arc<str>) -> Self {
        self.name = host;
        self
    }

    pub(crate) fn with_output(mut self, output: Option<crate::driver::OutputTail>) -> Self {
        self.output = output;
        self
    }

    /// Its last lines of output, oldest first; `None` when they are not captured.
    pub fn output(&self) -> Option<Vec<String>> {
        self.output.as_ref().map(crate::driver::OutputTail::lines)
    }

    /// What its TLS certificate is checked for.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> InstanceState {
        InstanceState::from_u8(self.state.load(Ordering::SeqCst))
    }

    pub(crate) fn set_state(&self, state: InstanceState) {
        self.state.store(state as u8, Ordering::SeqCst);
    }

    /// Moves from `from` to `to` unless another transition (an exit) came first.
    pub(crate) fn transition(&self, from: InstanceState, to: InstanceState) -> bool {
        self.state.compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Claims a slot for one request, or `None` if the instance no longer takes traffic.
    ///
    /// The count goes up before the state is read, and a drain sets the state before it reads
    /// the count (both SeqCst), so a request either sees the drain and goes elsewhere, or the
    /// drain sees the request and waits for it. No request reaches a stopped instance.
    pub fn begin(self: &Arc<Self>) -> Option<InFlight> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let admitted = if self.state() == InstanceState::Ready { self.admits() } else { None };
        if admitted.is_some() {
            let probe = admitted == Some(true);
            Some(InFlight::new(self, probe))
        } else {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            None
        }
    }

    /// Like [`Instance::begin`], with the circuit breaker ignored: for when every instance of
    /// the pool is ejected.
    pub fn begin_ignoring_breaker(self: &Arc<Self>) -> Option<InFlight> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.state() == InstanceState::Ready {
            Some(InFlight::new(self, false))
        } else {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            None
        }
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at`, as milliseconds since launch (never 0, which means "not set").
    fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.launched).as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Whether the breaker lets traffic through: `None` while ejected, `Some(true)` for the one
    /// probe of a half-open breaker, `Some(false)` when closed.
    fn admits(&self) -> Option<bool> {
        let until = self.breaker.ejected_until.load(Ordering::SeqCst);
        if until == 0 {
            return Some(false);
        }
        if self.now_ms() < until {
            return None;
        }
        let claimed = !self.breaker.probing.swap(true, Ordering::SeqCst);
        claimed.then_some(true)
    }

    /// Whether the balancer should consider this instance: ready, and not ejected (a
    /// half-open breaker is considered only while its probe is free).
    pub fn is_available(&self) -> bool {
        if self.state() != InstanceState::Ready {
            return false;
        }
        let until = self.breaker.ejected_until.load(Ordering::SeqCst);
        until == 0 || (self.now_ms() >= until && !self.breaker.probing.load(Ordering::SeqCst))
    }

    /// Ejected now, or half-open waiting for its probe to pass.
    pub fn is_ejected(&self) -> bool {
        self.breaker.ejected_until.load(Ordering::SeqCst) != 0
    }

    /// The peak-EWMA latency estimate, in seconds.
    pub fn latency_estimate(&self) -> f64 {
        match self.latency_estimate_us.load(Ordering::Relaxed) {
            0 => DEFAULT_LATENCY,
            us => us as f64 / 1e6,
        }
    }

    fn observe_latency(&self, seconds: f64, at: Instant) {
        let now = self.ms_at(at);
        let elapsed = now.saturating_sub(self.latency_updated_ms.swap(now, Ordering::Relaxed)) as f64 / 1e3;
        let estimate = surge_balance::peak_ewma(self.latency_estimate(), elapsed, seconds, LATENCY_DECAY);
        // Concurrent updates may overwrite each other: an estimate tolerates a lost sample.
        self.latency_estimate_us.store((estimate * 1e6).max(1.0) as u64, Ordering::Relaxed);
    }

    pub fn ejections(&self) -> u32 {
        self.breaker.ejections.load(Ordering::Relaxed)
    }

    /// A request succeeded: the failure streak ends, and a passed probe closes the breaker.
    /// Returns whether this closed an open breaker.
    pub(crate) fn record_success(&self, probe: bool) -> bool {
        self.breaker.consecutive_failures.store(0, Ordering::Relaxed);
        if probe {
            self.breaker.ejected_until.store(0, Ordering::SeqCst);
            self.breaker.probing.store(false, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// A request failed; returns the failure streak, counting a failed probe as a full one.
    pub(crate) fn record_failure(&self, probe: bool) -> u32 {
        self.observe_latency(FAILURE_LATENCY, Instant::now());
        let streak = self.breaker.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if probe {
            u32::MAX
        } else {
            streak
        }
    }

    /// Opens the breaker for `duration`; returns how many times it has been opened.
    pub(crate) fn eject(&self, ejection: impl Fn(u32) -> std::time::Duration) -> u32 {
        let ejections = self.breaker.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let until = self.now_ms() + u64::try_from(ejection(ejections).as_millis()).unwrap_or(u64::MAX / 2);
        self.breaker.consecutive_failures.store(0, Ordering::Relaxed);
        self.breaker.ejected_until.store(until, Ordering::SeqCst);
        self.breaker.probing.store(false, Ordering::SeqCst);
        ejections
    }

    pub(crate) fn in_flight_strict(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_exited(&self) {
        self.set_state(InstanceState::Exited);
        self.exited.send_replace(true);
    }

    /// Resolves once the process has exited.
    pub(crate) async fn wait_exited(&self) {
        let mut exited = self.exited.subscribe();
        // An error means the sender is gone, which only happens with the instance itself.
        let _ = exited.wait_for(|exited| *exited).await;
    }
}

/// One request in flight on an instance; dropping it (when the response body is done) ends it.
#[derive(Debug)]
pub struct InFlight {
    instance: Arc<Instance>,
    started: Instant,
    /// The one request a half-open breaker let through.
    probe: bool,
    /// Given back unused: not a served request.
    cancelled: bool,
}

impl InFlight {
    fn new(instance: &Arc<Instance>, probe: bool) -> Self {
        instance.load.started();
        InFlight { instance: Arc::clone(instance), started: Instant::now(), probe, cancelled: false }
    }

    /// Gives the slot back without counting a request (a pool-wide limit was hit meanwhile).
    pub fn cancel(mut self) {
        self.cancelled = true;
    }

    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The outcome was reported: a probe no longer holds the breaker when it ends.
    pub(crate) fn reported(&mut self) {
        self.probe = false;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let instance = &self.instance;
        if self.probe {
            // Ended without a verdict (the client went away): let another request probe.
            instance.breaker.probing.store(false, Ordering::SeqCst);
        }
        instance.in_flight.fetch_sub(1, Ordering::SeqCst);
        instance.load.ended();
        if !self.cancelled {
            // One clock reading for both the latency and the estimate's age.
            let now = Instant::now();
            let latency = now.saturating_duration_since(self.started);
            instance.served.fetch_add(1, Ordering::Relaxed);
            instance.observe_latency(latency.as_secs_f64(), now);
            instance.load.finished(latency);
        }
        // Only once the slot is free, so the request woken for it finds it.
        instance.load.queue().wake_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Arc<Instance> {
        Arc::new(Instance::new(
            "api-1".into(),
            SocketAddr::from(([127, 0, 0, 1], 1)),
            None,
            1,
            Arc::default(),
        ))
    }

    #[test]
    fn only_ready_instances_take_requests() {
        let instance = instance();
        assert!(instance.begin().is_none(), "a starting instance takes no traffic");
        assert_eq!(instance.in_flight(), 0);
        instance.set_state(InstanceState::Ready);
        let request = instance.begin().expect("ready");
        assert_eq!((instance.in_flight(), instance.served()), (1, 0));
        drop(request);
        assert_eq!((instance.in_flight(), instance.served()), (0, 1));
        instance.set_state(InstanceState::Draining);
        assert!(instance.begin().is_none(), "a draining instance takes no new traffic");
    }

    #[test]
    fn an_open_breaker_admits_nothing_then_one_probe() {
        let instance = instance();
        instance.set_state(InstanceState::Ready);
        instance.eject(|_| std::time::Duration::ZERO);
        assert!(instance.is_ejected());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut probe = instance.begin().expect("half-open: one probe");
        assert!(probe.is_probe());
        assert!(instance.begin().is_none(), "only one probe at a time");
        assert!(instance.record_success(probe.is_probe()));
        probe.reported();
        drop(probe);
        assert!(!instance.is_ejected());
        assert!(!instance.begin().expect("closed").is_probe());
    }

    #[test]
    fn an_open_breaker_stays_shut_for_its_ejection_time() {
        let instance = instance();
        instance.set_state(InstanceState::Ready);
        assert_eq!(instance.eject(|n| std::time::Duration::from_secs(u64::from(n) * 60)), 1);
        assert!(instance.begin().is_none());
        assert!(!instance.is_available());
    }

    #[test]
    fn state_round_trips_through_the_atomic() {
        let instance = instance();
        for state in InstanceState::ALL {
            instance.set_state(state);
            assert_eq!(instance.state(), state);
        }
    }
}
