//! Surge's default policy: target tracking over a stable window, with a panic window that
//! answers a burst at once, rate limits, a tolerance band, scale-down stabilisation and scale
//! to zero after an idle window. The windows follow Knative's KPA; the tick is one second,
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

    /// The pool-wide value of the metric in `signals`.
    pub fn observe(&self, signals: &Signals, littles_law: bool) -> f64 {
        match self {
            Metric::Concurrency if littles_law => concurrency_demand(signals),
            Metric::Concurrency => signals.concurrency,
            Metric::Rps => signals.rps,
            Metric::Cpu => signals.cpu,
            Metric::LatencyP95 => signals.latency_p95.unwrap_or(0.0),
        }
    }
}

const URGENT_TICK: Duration = Duration::from_millis(200);

/// How long a backlog of waiting requests may take to clear: sets how much concurrency the
/// backlog asks for beyond what arrivals need.
const BACKLOG_CLEARANCE: f64 = 1.0;

/// The concurrency the load needs. Measured concurrency counts waiting requests, and a queue
/// that grows while new instances start would ask for ever more of them; by Little's law the
/// arrivals need `arrivals × service time`, plus what clears the backlog within
/// `BACKLOG_CLEARANCE`. Never more than measured; the measurement alone when no request has
/// finished yet (a pool at zero).
fn concurrency_demand(signals: &Signals) -> f64 {
    match signals.service_time {
        Some(service) if signals.arrivals > 0.0 => {
            let needed = signals.arrivals * service + signals.waiting * service / BACKLOG_CLEARANCE;
            needed.min(signals.concurrency)
        }
        _ => signals.concurrency,
    }
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub desired: u32,
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
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScaleConfig {
    pub metric: Metric,
    /// Per instance (for latency: the p95 to stay under, in seconds).
    pub target: f64,
    /// Fraction of `target` to aim at, leaving headroom for bursts (Knative: 0.7).
    pub utilization: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// Panic when the panic window asks for this many times the ready instances (2.0 = 200%).
    pub panic_threshold: f64,
    /// At most this many times the ready instances in one decision (up), and at least the
    /// ready instances divided by `max_scale_down_rate` (down).
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    /// A scale-down takes the highest recommendation of this window.
    pub scale_down_delay: Duration,
    /// No change while the metric is within this fraction of the target.
    pub tolerance: f64,
    /// With `min = 0`, a pool with no request for this long goes to zero.
    pub idle_window: Duration,
    /// How often it decides while no request waits for an instance.
    pub tick: Duration,
    /// Estimate the concurrency the load needs from arrivals and service time (Little's law)
    /// rather than taking the measured concurrency, which a growing queue inflates.
    pub littles_law: bool,
    /// In panic, size for the latest sample when it is above the panic window's average,
    /// rather than wait for a burst to fill the window.
    pub burst_at_once: bool,
    pub min: u32,
    pub max: u32,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            metric: Metric::Concurrency,
            target: 10.0,
            utilization: 0.7,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            max_scale_up_rate: 10.0,
            max_scale_down_rate: 2.0,
            scale_down_delay: Duration::from_secs(10),
            tolerance: 0.1,
            idle_window: Duration::from_secs(30),
            tick: Duration::from_secs(1),
            littles_law: true,
            burst_at_once: true,
            min: 1,
            max: 10,
        }
    }
}

/// Surge's policy. Keeps the samples of its windows; everything else is computed per call.
#[derive(Debug, Clone)]
pub struct SurgePolicy {
    name: String,
    config: ScaleConfig,
    /// (time, pool-wide metric value), oldest first, spanning the stable window.
    samples: VecDeque<(Duration, f64)>,
    /// Recommendations of the scale-down delay window.
    recommendations: VecDeque<(Duration, u32)>,
    panic_until: Option<Duration>,
    last_request: Option<Duration>,
    /// Requests were waiting at the last decision: decide again soon.
    urgent: bool,
}

impl SurgePolicy {
    pub fn new(config: ScaleConfig) -> Self {
        Self::named("surge", config)
    }

    /// The same algorithm under another name (Knative's KPA is this with its own defaults).
    pub fn named(name: &str, config: ScaleConfig) -> Self {
        SurgePolicy {
            name: name.to_owned(),
            config,
            samples: VecDeque::new(),
            recommendations: VecDeque::new(),
            panic_until: None,
            last_request: None,
            urgent: false,
        }
    }

    pub fn config(&self) -> &ScaleConfig {
        &self.config
    }

    /// The mean of the samples taken within `window` of `now`.
    fn average_over(&self, now: Duration, window: Duration) -> f64 {
        let (sum, count) = self
            .samples
            .iter()
            .filter(|(at, _)| now.saturating_sub(*at) < window)
            .fold((0.0, 0usize), |(sum, count), (_, value)| (sum + value, count + 1));
        if count == 0 {
            0.0
        } else {
            sum / count as f64
        }
    }

    /// Instances needed for a pool-wide `value` of the metric.
    fn needed(&self, value: f64, ready: u32) -> u32 {
        let config = &self.config;
        let per_instance = (config.target * config.utilization).max(f64::EPSILON);
        let needed = match config.metric {
            // Latency does not add up over instances: grow in proportion to the excess.
            Metric::LatencyP95 => f64::from(ready.max(1)) * value / per_instance,
            _ => value / per_instance,
        };
        needed.ceil().clamp(0.0, f64::from(u32::MAX)) as u32
    }
}

impl Policy for SurgePolicy {
    fn name(&self) -> &str {
        &self.name
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
        let value = config.metric.observe(signals, config.littles_law);
        self.urgent = signals.waiting > 0.0;
        self.samples.push_back((now, value));
        while self.samples.front().is_some_and(|(at, _)| now.saturating_sub(*at) >= config.stable_window) {
            self.samples.pop_front();
        }
        if signals.concurrency > 0.0 || signals.rps > 0.0 {
            self.last_request = Some(now);
        }

        let stable = self.average_over(now, config.stable_window);
        let recent = self.average_over(now, config.panic_window);
        let ready = signals.ready;
        let want_stable = self.needed(stable, ready);
        // A burst is answered at once: the latest sample counts in full when it is above the
        // panic window's average (the panic threshold still has to be crossed).
        let recent = if config.burst_at_once { recent.max(value) } else { recent };
        let want_panic = self.needed(recent, ready);

        // Panic: the recent window asks for panic_threshold times what is ready (or anything
        // at all when nothing is ready). Stay in panic for a stable window after the last burst.
        let bursting = if ready == 0 {
            want_panic > 0
        } else {
            f64::from(want_panic) / f64::from(ready) >= config.panic_threshold
        };
        if bursting {
            self.panic_until = Some(now + config.stable_window);
        }
        let panic = self.panic_until.is_some_and(|until| now < until);

        let (mut desired, mut reason) = if panic {
            let desired = want_panic.max(current);
            (
                desired,
                format!(
                    "panic: {} {recent:.1} over {:?} wants {want_panic}",
                    config.metric.as_str(),
                    config.panic_window
                ),
            )
        } else {
            (
                want_stable,
                format!(
                    "{} {stable:.1} over {:?} wants {want_stable}",
                    config.metric.as_str(),
                    config.stable_window
                ),
            )
        };

        // Tolerance: close enough to the target, keep the count.
        if !panic && current > 0 && desired != current {
            let load = f64::from(self.needed(stable, ready).max(1));
            let ratio = (stable / (config.target * config.utilization * f64::from(current))).max(0.0);
            if (ratio - 1.0).abs() <= config.tolerance && load > 0.0 && desired > 0 {
                desired = current;
                reason.push_str(", within tolerance");
            }
        }

        // Rate limits, from the instances already serving or on their way (a pool at zero may
        // go to any size), so a burst can be answered in successive decisions while the first
        // new instances still start.
        let base = f64::from((ready + signals.starting).max(1));
        let up_limit = (base * config.max_scale_up_rate).ceil() as u32;
        let down_limit = (f64::from(ready) / config.max_scale_down_rate).floor() as u32;
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
        if self.samples.len() == 1 {
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
        Decision { desired: clamped, panic, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn config() -> ScaleConfig {
        ScaleConfig { target: 10.0, utilization: 1.0, min: 0, max: 100, ..ScaleConfig::default() }
    }

    /// Feeds `series` (concurrency per second) with `ready` following the decisions at once.
    fn run(policy: &mut SurgePolicy, start: u64, series: &[f64], mut current: u32) -> Vec<Decision> {
        series
            .iter()
            .enumerate()
            .map(|(i, &concurrency)| {
                let signals = Signals {
                    now: secs(start + i as u64),
                    ready: current,
                    concurrency,
                    rps: concurrency * 10.0,
                    ..Signals::default()
                };
                let decision = policy.decide(&signals, current);
                current = decision.desired;
                decision
            })
            .collect()
    }

    #[test]
    fn steady_load_settles_and_does_not_flap() {
        let mut policy = SurgePolicy::new(config());
        // 45 in flight, with ±5 of noise: 5 instances of target 10.
        let series: Vec<f64> = (0..600).map(|i| 45.0 + if i % 2 == 0 { 5.0 } else { -5.0 }).collect();
        let decisions = run(&mut policy, 0, &series, 5);
        let counts: Vec<u32> = decisions.iter().map(|d| d.desired).collect();
        assert!(counts.iter().all(|&c| c == 5), "{:?}", &counts[..20]);
    }

    #[test]
    fn a_burst_enters_panic_and_scales_at_once() {
        let mut policy = SurgePolicy::new(config());
        run(&mut policy, 0, &[20.0; 60], 2);
        // Ten times the load: its first second enters panic and asks for the full need.
        let decisions = run(&mut policy, 60, &[200.0; 6], 2);
        assert!(decisions[0].panic, "{:?}", decisions[0]);
        let counts: Vec<u32> = decisions.iter().map(|d| d.desired).collect();
        assert_eq!(counts, [20; 6]);
        assert!(decisions[5].reason.starts_with("panic"), "{}", decisions[5].reason);

        // Knative averages the panic window: the pool grows as the burst fills it.
        let mut averaging = SurgePolicy::new(ScaleConfig { burst_at_once: false, ..config() });
        run(&mut averaging, 0, &[20.0; 60], 2);
        let counts: Vec<u32> = run(&mut averaging, 60, &[200.0; 6], 2).iter().map(|d| d.desired).collect();
        assert_eq!(counts, [5, 8, 11, 14, 17, 20]);
    }

    #[test]
    fn panic_never_scales_down_and_ends_a_stable_window_later() {
        let mut policy = SurgePolicy::new(config());
        run(&mut policy, 0, &[20.0; 60], 2);
        run(&mut policy, 60, &[200.0; 10], 2);
        let after = run(&mut policy, 70, &[20.0; 100], 20);
        // The burst condition held until the pool reached 20 (second 61): panic lasts 60 s
        // from then, and the scale-down delay holds 10 s more.
        assert!(after[..45].iter().all(|d| d.desired == 20 && d.panic), "{:?}", &after[..3]);
        assert!(after[55].desired == 20 && !after[55].panic, "{:?}", after[55]);
        let calm = &after[99];
        assert!(!calm.panic && calm.desired < 20, "{calm:?}");
    }

    #[test]
    fn rate_limits_and_bounds_hold() {
        let mut policy = SurgePolicy::new(ScaleConfig { max_scale_up_rate: 2.0, max: 12, ..config() });
        let decisions = run(&mut policy, 0, &[1000.0; 4], 2);
        let counts: Vec<u32> = decisions.iter().map(|d| d.desired).collect();
        assert_eq!(counts, [4, 8, 12, 12], "doubling each second, then the max");

        let mut policy =
            SurgePolicy::new(ScaleConfig { min: 3, scale_down_delay: Duration::ZERO, ..config() });
        let decisions = run(&mut policy, 0, &[0.1; 200], 40);
        let counts: Vec<u32> = decisions.iter().map(|d| d.desired).collect();
        assert!(counts.windows(2).all(|w| w[1] >= w[0] / 2), "halving at most: {counts:?}");
        assert_eq!(*counts.last().unwrap_or(&0), 3, "never below min");
    }

    #[test]
    fn scale_down_waits_for_the_delay_window() {
        let mut policy = SurgePolicy::new(ScaleConfig { stable_window: secs(6), ..config() });
        run(&mut policy, 0, &[100.0; 10], 10);
        let decisions = run(&mut policy, 10, &[10.0; 60], 10);
        let first_down = decisions.iter().position(|d| d.desired < 10).expect("scales down");
        assert!(first_down >= 9, "held for the 10 s delay: went down after {first_down} s");
    }

    #[test]
    fn a_new_pool_keeps_its_initial_size_for_the_scale_down_delay() {
        let mut policy = SurgePolicy::new(config());
        let decisions = run(&mut policy, 0, &[0.0; 12], 3);
        assert!(decisions[..9].iter().all(|d| d.desired == 3), "{:?}", &decisions[..3]);
        assert!(decisions[11].desired < 3);
    }

    #[test]
    fn an_idle_pool_goes_to_zero_only_after_the_idle_window() {
        let mut policy = SurgePolicy::new(ScaleConfig {
            stable_window: secs(6),
            scale_down_delay: Duration::ZERO,
            ..config()
        });
        run(&mut policy, 0, &[5.0; 10], 1);
        let decisions = run(&mut policy, 10, &[0.0; 40], 1);
        let zero_at = decisions.iter().position(|d| d.desired == 0).expect("reaches zero");
        assert!((29..=31).contains(&zero_at), "after the 30 s idle window: {zero_at}");
        assert!(decisions[zero_at].reason.starts_with("idle"), "{}", decisions[zero_at].reason);
    }

    #[test]
    fn demand_at_zero_scales_from_zero_at_once() {
        let mut policy = SurgePolicy::new(config());
        run(&mut policy, 0, &[0.0; 100], 0);
        let decision = run(&mut policy, 100, &[1.0], 0).remove(0);
        assert_eq!(decision.desired, 1);
        assert!(decision.panic);
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
