//! Surge's default policy: the offered work of the last second, square-root staffed, counted
//! in full once a rise has held for `persistence`; a backlog asks only for what the ready
//! instances cannot clear within one start-up; scale-down waits for `scale_down_delay`, within
//! rate limits, a tolerance band and the instance bounds, and an idle pool goes to zero after
//! its idle window. The tick is one second (200 ms while requests wait for an instance),
//! because Surge sits in the request path and sees load the moment it arrives.

use std::collections::VecDeque;
use std::time::Duration;

/// One pool's load at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signals {
    /// Time since the pool started (wall clock live, virtual in the simulator).
    pub now: Duration,
    pub ready: u32,
    pub starting: u32,
    /// Mean requests in flight over the last sample period, including requests waiting for an
    /// instance (a pool at zero has demand too).
    pub concurrency: f64,
    /// Requests finished per second over the last sample period.
    pub rps: f64,
    /// Requests that arrived per second over the last sample period.
    pub arrivals: f64,
    /// Mean requests waiting for an instance (part of `concurrency`).
    pub waiting: f64,
    /// Mean time a request spent at an instance, in seconds, if any finished.
    pub service_time: Option<f64>,
    /// 95th percentile latency in seconds, if any request finished.
    pub latency_p95: Option<f64>,
    /// CPU used by all instances, in cores (1.0 = one core busy).
    pub cpu: f64,
    /// How long the pool's latest instance took from launch to ready, once one has.
    pub startup: Option<Duration>,
}

/// What a policy tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Metric {
    /// In-flight requests per instance.
    #[default]
    Concurrency,
    /// Requests per second per instance.
    Rps,
    /// CPU per instance, as a fraction of one core.
    Cpu,
    /// p95 latency in seconds (not per instance: the pool grows while latency is above target).
    LatencyP95,
}

impl Metric {
    pub fn as_str(&self) -> &'static str {
        match self {
            Metric::Concurrency => "concurrency",
            Metric::Rps => "rps",
            Metric::Cpu => "cpu",
            Metric::LatencyP95 => "latency_p95",
        }
    }

    /// The pool-wide value of the metric as measured in `signals`.
    pub fn observe(&self, signals: &Signals) -> f64 {
        match self {
            Metric::Concurrency => signals.concurrency,
            Metric::Rps => signals.rps,
            Metric::Cpu => signals.cpu,
            Metric::LatencyP95 => signals.latency_p95.unwrap_or(0.0),
        }
    }
}

const URGENT_TICK: Duration = Duration::from_millis(200);

/// A decision and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
    /// Sizing for requests that wait beyond what the ready instances clear (for Knative's
    /// KPA: panic mode).
    pub panic: bool,
    pub reason: String,
}

/// Anything that turns signals into a desired instance count: Surge's policy and the
/// baselines it is compared with.
pub trait Policy {
    fn name(&self) -> &str;
    /// How often it decides.
    fn period(&self) -> Duration;
    /// The desired count, given the signals and the count desired so far.
    fn decide(&mut self, signals: &Signals, current: u32) -> Decision;
    /// Whether a request that waits for an instance brings the next decision forward. Surge
    /// sits in the request path and sees it; the classic autoscalers poll on their period.
    fn decides_on_demand(&self) -> bool {
        false
    }
}

/// A policy lent out (the simulator drives one it does not own).
impl<P: Policy + ?Sized> Policy for &mut P {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn period(&self) -> Duration {
        (**self).period()
    }
    fn decide(&mut self, signals: &Signals, current: u32) -> Decision {
        (**self).decide(signals, current)
    }
    fn decides_on_demand(&self) -> bool {
        (**self).decides_on_demand()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    pub metric: Metric,
    /// Per instance (for concurrency: the requests one instance serves at once; for latency:
    /// the p95 to stay under, in seconds).
    pub target: f64,
    /// Fraction of `target` to aim at. For concurrency the default is 1.0, because square-root
    /// staffing already leaves the headroom; for rps, 0.7 (Knative's).
    pub utilization: f64,
    /// A rise in load counts in full once it has held this long (in every decision from one
    /// this long ago on); before that it may at most double the pool.
    pub persistence: Duration,
    /// At most this many times the ready and starting instances in one decision (up), and at
    /// least the ready instances divided by `max_scale_down_rate` (down).
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    /// A scale-down takes the highest recommendation of this window.
    pub scale_down_delay: Duration,
    /// A drop by no more than this fraction of the pool keeps the count.
    pub tolerance: f64,
    /// With `min = 0`, a pool with no request for this long goes to zero.
    pub idle_window: Duration,
    /// How often it decides while no request waits for an instance.
    pub tick: Duration,
    pub min: u32,
    pub max: u32,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            metric: Metric::Concurrency,
            target: 10.0,
            utilization: 1.0,
            persistence: Duration::from_secs(1),
            max_scale_up_rate: 10.0,
            max_scale_down_rate: 2.0,
            scale_down_delay: Duration::from_secs(30),
            tolerance: 0.15,
            idle_window: Duration::from_secs(30),
            tick: Duration::from_secs(1),
            min: 1,
            max: 10,
        }
    }
}

/// Square-root staffing's β: a load of `a` busy slots gets `a + β√a` slots, so big pools run
/// hotter than small ones for the same chance of a request waiting (about one in ten at 1.5,
/// by the Halfin-Whitt approximation of Erlang C).
const STAFFING_BETA: f64 = 1.5;

/// A rise that has not yet held for `persistence` may grow the pool by at most this factor.
const UNCONFIRMED_RISE: f64 = 2.0;

/// Once new instances are up, what the ready ones left of a backlog is cleared within this.
const BACKLOG_CLEARANCE_S: f64 = 1.0;

/// The latest load is the mean over this much time: decisions come every 200 ms while
/// requests wait, and 200 ms of bursty arrivals say little about the next second.
const RECENT: Duration = Duration::from_secs(1);

/// Weight of the newest period in the smoothed service time.
const SERVICE_SMOOTHING: f64 = 0.3;

/// Surge's policy. Sizes the pool for the load it can expect rather than for the last second
/// (the figures that chose each part are in docs/autoscaling.md):
///
/// - load is the offered work of the last second: arrivals × service time (Little's law), for
///   which square-root staffing gives the instances; decisions every 200 ms still look at the
///   whole second, so arrivals bunched within it count as their mean;
/// - a rise counts in full once it has held for `persistence`; before that it may at most
///   double the pool, so a one-second burst does not start instances that come up after it;
/// - requests already waiting ask for the instances that clear what the ready ones cannot
///   clear within one start-up time (a start-up is a cost: an instance that would arrive after
///   the work is done is not started);
/// - the pool shrinks only to the highest recommendation of `scale_down_delay`, so a lull
///   shorter than that keeps the instances the next burst needs.
#[derive(Debug, Clone)]
pub struct SurgePolicy {
    config: ScaleConfig,
    /// (end, pool-wide load in metric units) of each period since the one before the
    /// `persistence` window and the last [`RECENT`], oldest first; a period starts where the
    /// one before it ends.
    periods: VecDeque<(Duration, f64)>,
    /// Recommendations of the scale-down delay window.
    recommendations: VecDeque<(Duration, u32)>,
    /// Mean service time in seconds, smoothed over the periods that finished requests.
    service_time: Option<f64>,
    last_request: Option<Duration>,
    /// The ready and starting instances when the rise not yet held began.
    rise_base: Option<u32>,
    /// Requests were waiting at the last decision: decide again soon.
    urgent: bool,
}

impl SurgePolicy {
    pub fn new(config: ScaleConfig) -> Self {
        SurgePolicy {
            config,
            periods: VecDeque::new(),
            recommendations: VecDeque::new(),
            service_time: None,
            last_request: None,
            rise_base: None,
            urgent: false,
        }
    }

    pub fn config(&self) -> &ScaleConfig {
        &self.config
    }

    /// Instances needed for a pool-wide `value` of the metric.
    fn needed(&self, value: f64, ready: u32) -> u32 {
        let config = &self.config;
        let per_instance = (config.target * config.utilization).max(f64::EPSILON);
        let needed = match config.metric {
            Metric::Concurrency => (value + STAFFING_BETA * value.max(0.0).sqrt()) / per_instance,
            // Latency does not add up over instances: grow in proportion to the excess.
            Metric::LatencyP95 => f64::from(ready.max(1)) * value / per_instance,
            Metric::Rps | Metric::Cpu => value / per_instance,
        };
        needed.ceil().clamp(0.0, f64::from(u32::MAX)) as u32
    }

    /// The pool-wide load of this period, in metric units, without the backlog.
    fn load(&self, signals: &Signals) -> f64 {
        match (self.config.metric, self.service_time) {
            (Metric::Concurrency, Some(service)) if signals.arrivals > 0.0 => signals.arrivals * service,
            // A worker pool has no arrivals (its queue delivers): what it has in flight.
            (Metric::Concurrency, Some(_)) => signals.concurrency - signals.waiting,
            // Nothing has finished yet (a pool at zero): what is in flight or waiting.
            (Metric::Concurrency, None) => signals.concurrency,
            (Metric::Rps, _) if signals.arrivals > 0.0 => signals.arrivals,
            (Metric::Rps, _) => signals.rps,
            (metric, _) => metric.observe(signals),
        }
    }

    /// Records the load of the period ending `now`, keeping the periods the persistence
    /// window and the recent mean need.
    fn record(&mut self, now: Duration, load: f64) {
        self.periods.push_back((now, load));
        let persistence = self.config.persistence;
        // The oldest goes once it is out of the persistence window and the next one no longer
        // reaches into the last second (it needs the oldest's end as its start).
        while self.periods.len() > 1
            && self.periods.front().is_some_and(|(end, _)| now.saturating_sub(*end) > persistence)
            && self.periods.get(1).is_some_and(|(end, _)| now.saturating_sub(*end) >= RECENT)
        {
            self.periods.pop_front();
        }
    }

    /// The lowest load of the periods within `persistence`: what has held.
    fn held_load(&self, now: Duration) -> f64 {
        let persistence = self.config.persistence;
        self.periods
            .iter()
            .filter(|(end, _)| now.saturating_sub(*end) <= persistence)
            .map(|(_, load)| *load)
            .fold(f64::INFINITY, f64::min)
    }

    /// The mean load over the last [`RECENT`], each period weighted by how much of it falls
    /// within (the first period of all counts as a whole [`RECENT`] long).
    fn recent_load(&self, now: Duration) -> f64 {
        let mut start = None;
        let (mut weighted, mut total) = (0.0, 0.0);
        for &(end, load) in &self.periods {
            let length =
                start.map_or(RECENT, |start| end.saturating_sub(start)).max(Duration::from_millis(1));
            start = Some(end);
            let within = length.min(RECENT.saturating_sub(now.saturating_sub(end))).as_secs_f64();
            weighted += within * load;
            total += within;
        }
        match self.periods.back() {
            Some(_) if total > 0.0 => weighted / total,
            Some((_, load)) => *load,
            None => 0.0,
        }
    }

    /// The load, in metric units, that clears what the ready instances will not have cleared
    /// of the waiting requests by the time a new instance is up.
    fn backlog(&self, signals: &Signals, load: f64) -> f64 {
        let work_per_request = match (self.config.metric, self.service_time) {
            (Metric::Concurrency, Some(service)) => service,
            (Metric::Rps, _) => 1.0,
            _ => return 0.0,
        };
        let startup = signals.startup.map_or(0.0, |startup| startup.as_secs_f64());
        let spare = (f64::from(signals.ready) * self.config.target - load).max(0.0);
        let left = (signals.waiting * work_per_request - spare * startup).max(0.0);
        left / BACKLOG_CLEARANCE_S
    }
}

impl Policy for SurgePolicy {
    fn name(&self) -> &str {
        "surge"
    }

    fn decides_on_demand(&self) -> bool {
        true
    }

    /// The tick, or every 200 ms while requests wait for an instance (as the live supervisor
    /// decides whenever a waiting request signals demand).
    fn period(&self) -> Duration {
        if self.urgent {
            URGENT_TICK.min(self.config.tick)
        } else {
            self.config.tick
        }
    }

    fn decide(&mut self, signals: &Signals, current: u32) -> Decision {
        let now = signals.now;
        let config = self.config.clone();
        self.urgent = signals.waiting > 0.0;
        if let Some(service) = signals.service_time {
            self.service_time = Some(match self.service_time {
                Some(smoothed) => smoothed + SERVICE_SMOOTHING * (service - smoothed),
                None => service,
            });
        }
        if signals.concurrency > 0.0 || signals.arrivals > 0.0 || signals.rps > 0.0 {
            self.last_request = Some(now);
        }
        let first_decision = self.periods.is_empty();
        self.record(now, self.load(signals));
        // The load that held over the whole persistence window (reaching back to the decision
        // `persistence` ago, so that at one decision a second the rise must show in two), and
        // what the last second asks.
        let held = self.held_load(now);
        let load = self.recent_load(now);
        let backlog = self.backlog(signals, load);
        let ready = signals.ready;
        let for_held = self.needed(held + backlog, ready);
        let for_latest = self.needed(load + backlog, ready);
        let base = (ready + signals.starting).max(1);
        // The cap counts from the pool as it was when the rise began, so decisions every
        // 200 ms do not compound it, and it never cuts the pool.
        let rise_base = if for_latest > for_held { *self.rise_base.get_or_insert(base) } else { base };
        if for_latest <= for_held {
            self.rise_base = None;
        }
        let rise_cap = ((f64::from(rise_base) * UNCONFIRMED_RISE).ceil() as u32).max(for_held).max(current);
        let mut desired = for_latest.min(rise_cap).max(for_held);
        let mut reason =
            format!("{} {load:.1} ({held:.1} held for {:?})", config.metric.as_str(), config.persistence);
        if backlog > 0.0 {
            reason.push_str(&format!(" and {:.0} waiting", signals.waiting));
        }
        reason.push_str(&format!(" want {desired}"));
        if for_latest > desired {
            reason.push_str(&format!(" (not yet held: at most {UNCONFIRMED_RISE}x)"));
        }
        // Demand at an empty pool is answered at once.
        if desired == 0 && ready + signals.starting == 0 && signals.concurrency > 0.0 {
            desired = 1;
            reason = "demand at zero instances".to_owned();
        }

        // Tolerance: a small drop keeps the count.
        if desired < current && f64::from(current - desired) <= config.tolerance * f64::from(current) {
            desired = current;
            reason.push_str(", within tolerance");
        }

        // Rate limits, from the instances already serving or on their way.
        let up_limit = (f64::from(base) * config.max_scale_up_rate).ceil() as u32;
        let down_limit = ((f64::from(ready) / config.max_scale_down_rate).floor() as u32).min(current);
        if desired > up_limit.max(current) {
            desired = up_limit.max(current);
            reason.push_str(&format!(", up rate limit {up_limit}"));
        }
        if desired < down_limit && desired < current {
            desired = down_limit;
            reason.push_str(&format!(", down rate limit {down_limit}"));
        }

        // Scale-down stabilisation: the highest recommendation of the delay window. The count
        // the pool started with counts as one, so a new pool is not cut at its first decision.
        if first_decision {
            self.recommendations.push_back((now, current));
        }
        self.recommendations.push_back((now, desired));
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) >= config.scale_down_delay)
        {
            self.recommendations.pop_front();
        }
        if desired < current {
            let highest = self.recommendations.iter().map(|(_, d)| *d).max().unwrap_or(desired);
            if highest > desired {
                desired = highest.min(current);
                reason.push_str(&format!(", held by scale_down_delay {:?}", config.scale_down_delay));
            }
        }

        // Scale to zero only after an idle window; otherwise keep one instance warm.
        let idle = self.last_request.is_none_or(|last| now.saturating_sub(last) >= config.idle_window);
        if desired == 0 && !idle {
            desired = 1;
        } else if desired == 0 {
            reason = format!("idle for {:?}", config.idle_window);
        }

        let clamped = desired.clamp(config.min, config.max.max(config.min));
        if clamped != desired {
            reason.push_str(&format!(", bounded to {}..{}", config.min, config.max));
        }
        Decision { desired: clamped, panic: backlog > 0.0, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Instances that serve 10 at once; every request takes 100 ms.
    fn config() -> ScaleConfig {
        ScaleConfig { target: 10.0, min: 0, max: 100, ..ScaleConfig::default() }
    }

    const SERVICE: f64 = 0.1;

    fn signals(now: u64, ready: u32, arrivals: f64, waiting: f64) -> Signals {
        Signals {
            now: secs(now),
            ready,
            arrivals,
            rps: arrivals,
            concurrency: arrivals * SERVICE + waiting,
            waiting,
            service_time: Some(SERVICE),
            startup: Some(secs(5)),
            ..Signals::default()
        }
    }

    /// Feeds one arrival rate per second, with the pool following each decision at once.
    fn run(policy: &mut SurgePolicy, start: u64, arrivals: &[f64], mut current: u32) -> Vec<Decision> {
        arrivals
            .iter()
            .enumerate()
            .map(|(i, &rate)| {
                let decision = policy.decide(&signals(start + i as u64, current, rate, 0.0), current);
                current = decision.desired;
                decision
            })
            .collect()
    }

    fn counts(decisions: &[Decision]) -> Vec<u32> {
        decisions.iter().map(|d| d.desired).collect()
    }

    #[test]
    fn square_root_staffing_runs_big_pools_hotter() {
        let policy = SurgePolicy::new(config());
        // 4 busy slots get 4 + 1.5 × 2 = 7 slots: one instance; 400 get 430: 43 instances.
        assert_eq!(policy.needed(4.0, 1), 1);
        assert_eq!(policy.needed(400.0, 40), 43);
        assert_eq!(policy.needed(0.0, 3), 0);
    }

    #[test]
    fn steady_noisy_load_settles_and_does_not_flap() {
        let mut policy = SurgePolicy::new(config());
        // 400 requests/s of 100 ms, ±10% each second: about 40 busy slots.
        let series: Vec<f64> = (0..600).map(|i| if i % 2 == 0 { 440.0 } else { 360.0 }).collect();
        let decisions = run(&mut policy, 0, &series, 5);
        let counts = counts(&decisions);
        let settled = &counts[60..];
        assert!(settled.iter().all(|&c| c == settled[0]), "{:?}", &counts[..80]);
        assert!((4..=6).contains(&settled[0]), "sized for the load with headroom: {}", settled[0]);
    }

    #[test]
    fn a_one_second_burst_does_not_triple_the_pool() {
        let mut policy = SurgePolicy::new(config());
        run(&mut policy, 0, &[200.0; 60], 4);
        // Ten times the arrivals for one second, then back.
        let decisions = run(&mut policy, 60, &[2000.0, 200.0, 200.0, 200.0], 4);
        let highest = counts(&decisions).into_iter().max().unwrap_or(0);
        assert!(highest < 12, "a one-second burst grew 4 instances to {highest}");
        assert!(decisions[0].reason.contains("not yet held"), "{}", decisions[0].reason);
    }

    #[test]
    fn decisions_every_200_ms_do_not_compound_the_cap_on_a_rise_not_yet_held() {
        // A long persistence, so that the rise stays unconfirmed over many decisions.
        let mut policy = SurgePolicy::new(ScaleConfig { persistence: secs(2), ..config() });
        run(&mut policy, 0, &[200.0; 60], 4);
        let mut current = 4;
        for tenth in (600..610).step_by(2) {
            let at = Signals {
                now: Duration::from_millis(tenth * 100),
                starting: current - 4,
                ..signals(0, 4, 2000.0, 50.0)
            };
            current = policy.decide(&at, current).desired;
            assert!(current <= 8, "at {tenth} tenths the pool went to {current}");
        }
    }

    /// Decisions every 200 ms from `start_ms`, with one arrival rate per period and the
    /// requests waiting at each; the pool follows each decision at once.
    fn run_urgent(
        policy: &mut SurgePolicy,
        start_ms: u64,
        periods: &[(f64, f64)],
        mut current: u32,
    ) -> Vec<u32> {
        let mut counts = Vec::new();
        for (i, &(rate, waiting)) in periods.iter().enumerate() {
            let at = Signals {
                now: Duration::from_millis(start_ms + 200 * i as u64),
                ..signals(0, current, rate, waiting)
            };
            current = policy.decide(&at, current).desired;
            counts.push(current);
        }
        counts
    }

    #[test]
    fn a_sustained_ten_fold_step_is_answered_in_full_once_it_has_held_a_second() {
        let mut policy = SurgePolicy::new(config());
        run(&mut policy, 0, &[200.0; 60], 4);
        // From 59 s, 2000 requests/s; the 3 instances serve 300 a second, so the rest wait
        // (340 more every 200 ms) and the supervisor decides every 200 ms.
        let periods: Vec<(f64, f64)> = (1..=6).map(|i| (2000.0, 340.0 * f64::from(i))).collect();
        let counts = run_urgent(&mut policy, 59_200, &periods, 3);
        // 200 busy slots need 23 instances. Until the rise has held for a second, the pool
        // grows with the requests that wait; then it is sized in full, and for the backlog.
        assert!(counts.windows(2).all(|w| w[1] >= w[0]) && counts[0] < 23, "{counts:?}");
        assert!(counts[5] >= 23, "in full 1.2 s after the step: {counts:?}");
    }

    #[test]
    fn arrivals_bunched_within_a_second_count_as_the_second_s_mean() {
        let mut policy = SurgePolicy::new(config());
        // Every second, all of its 200 requests come in one 200 ms period (1000 a second
        // there), none in the other four; a few wait at each bunch.
        let periods: Vec<(f64, f64)> =
            (0..50).map(|i| if i % 5 == 4 { (1000.0, 5.0) } else { (0.0, 0.0) }).collect();
        let counts = run_urgent(&mut policy, 200, &periods, 3);
        // 200 requests/s of 100 ms need 3 instances; 1000/s would ask for 13.
        assert!(counts.iter().all(|&c| c == 3), "{counts:?}");
    }

    #[test]
    fn a_worker_pool_without_arrivals_is_sized_by_what_it_has_in_flight() {
        let mut policy = SurgePolicy::new(config());
        // A queue delivers: nothing arrives at the gateway, 40 deliveries are in flight.
        let working = Signals { arrivals: 0.0, concurrency: 40.0, ..signals(0, 6, 0.0, 0.0) };
        let decisions: Vec<u32> =
            (0..60).map(|s| policy.decide(&Signals { now: secs(s), ..working }, 6).desired).collect();
        // 40 busy slots, staffed to 40 + 1.5 × √40 = 50: five instances, not one.
        assert!(decisions.iter().all(|&d| d >= 5), "{decisions:?}");
        assert_eq!(decisions.last().copied(), Some(5));
    }

    #[test]
    fn a_sustained_step_is_answered_in_full_once_it_has_held() {
        let mut policy = SurgePolicy::new(config());
        run(&mut policy, 0, &[200.0; 60], 4);
        let decisions = run(&mut policy, 60, &[2000.0; 5], 4);
        // 200 busy slots: 200 + 1.5 × √200 = 222 slots, 23 instances. The first second may
        // double the pool; the second, when the load has held for 2 s, sizes in full.
        assert_eq!(counts(&decisions), [8, 23, 23, 23, 23]);
    }

    #[test]
    fn a_backlog_starts_only_the_instances_that_will_still_have_work() {
        let mut policy = SurgePolicy::new(config());
        let settled = run(&mut policy, 0, &[200.0; 60], 4).last().map_or(0, |d| d.desired);
        // 200 requests/s of 100 ms use 20 slots of the 3 instances' 30: the 10 spare slots
        // clear 50 slot-seconds of waiting work within the 5 s start-up.
        assert_eq!(settled, 3);
        let small = policy.decide(&signals(60, 3, 200.0, 400.0), 3);
        assert_eq!(small.desired, 3, "40 slot-seconds are cleared before a new one is up: {small:?}");
        assert!(!small.panic);
        // 300 slot-seconds waiting, 50 cleared: 250 slots clear the rest within a second.
        let big = policy.decide(&signals(61, 3, 200.0, 3000.0), 3);
        assert!(big.panic && big.desired >= 25, "{big:?}");
        assert!(big.reason.contains("waiting"), "{}", big.reason);
    }

    #[test]
    fn rate_limits_and_bounds_hold() {
        let mut policy = SurgePolicy::new(ScaleConfig { max_scale_up_rate: 2.0, max: 12, ..config() });
        let decisions = run(&mut policy, 0, &[100_000.0; 4], 2);
        assert_eq!(counts(&decisions), [4, 8, 12, 12], "doubling each second, then the max");

        let mut policy =
            SurgePolicy::new(ScaleConfig { min: 3, scale_down_delay: Duration::ZERO, ..config() });
        let counts = counts(&run(&mut policy, 0, &[1.0; 200], 40));
        assert!(counts.windows(2).all(|w| w[1] >= w[0] / 2), "halving at most: {counts:?}");
        assert_eq!(counts.last().copied(), Some(3), "never below min");
    }

    #[test]
    fn scale_down_waits_for_the_delay_window() {
        let mut policy = SurgePolicy::new(config());
        run(&mut policy, 0, &[2000.0; 10], 23);
        let decisions = run(&mut policy, 10, &[200.0; 60], 23);
        let first_down = decisions.iter().position(|d| d.desired < 23).expect("scales down");
        assert!(first_down >= 29, "held for the 30 s delay: went down after {first_down} s");
        assert!(decisions[5].reason.contains("scale_down_delay"), "{}", decisions[5].reason);
    }

    #[test]
    fn a_new_pool_keeps_its_initial_size_for_the_scale_down_delay() {
        let mut policy = SurgePolicy::new(config());
        let decisions = run(&mut policy, 0, &[0.0; 40], 3);
        assert!(decisions[..29].iter().all(|d| d.desired == 3), "{:?}", &decisions[..3]);
        assert!(decisions[39].desired < 3);
    }

    #[test]
    fn an_idle_pool_goes_to_zero_only_after_the_idle_window() {
        let mut policy = SurgePolicy::new(ScaleConfig { scale_down_delay: Duration::ZERO, ..config() });
        run(&mut policy, 0, &[50.0; 10], 1);
        let decisions = run(&mut policy, 10, &[0.0; 40], 1);
        let zero_at = decisions.iter().position(|d| d.desired == 0).expect("reaches zero");
        assert!((29..=31).contains(&zero_at), "after the 30 s idle window: {zero_at}");
        assert!(decisions[zero_at].reason.starts_with("idle"), "{}", decisions[zero_at].reason);
    }

    #[test]
    fn demand_at_zero_scales_from_zero_at_once() {
        let mut policy = SurgePolicy::new(config());
        run(&mut policy, 0, &[0.0; 100], 0);
        // Nothing has ever finished: the waiting request itself is the demand.
        let waiting =
            Signals { now: secs(100), concurrency: 1.0, waiting: 1.0, arrivals: 1.0, ..Signals::default() };
        assert_eq!(policy.decide(&waiting, 0).desired, 1);
    }

    #[test]
    fn latency_grows_the_pool_in_proportion() {
        let mut policy =
            SurgePolicy::new(ScaleConfig { metric: Metric::LatencyP95, target: 0.2, ..config() });
        let signals = Signals {
            now: secs(1),
            ready: 4,
            latency_p95: Some(0.4),
            concurrency: 1.0,
            ..Signals::default()
        };
        assert_eq!(policy.decide(&signals, 4).desired, 8);
    }
}
