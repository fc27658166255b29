//! The autoscalers Surge is measured against, each built from its published defaults, as
//! policies over the same signals. Where a default could be read two ways, the comment says
//! which reading is used.

use std::collections::VecDeque;
use std::time::Duration;

use crate::policy::{Decision, Policy, Signals};

/// What a Kubernetes HPA scales on.
#[derive(Debug, Clone, Copy)]
enum HpaMetric {
    /// Mean CPU utilisation per ready pod (1.0 = one core), from metrics-server.
    Cpu { target: f64 },
    /// An external metric with an AverageValue target per pod, refreshed every `poll` (KEDA).
    External { target_per_pod: f64, poll: Duration },
}

/// Kubernetes HPA (autoscaling/v2 defaults): a 15 s sync period, tolerance 0.1, scale-up by
/// at most 100% or 4 pods per 15 s (whichever is more), and a 300 s scale-down stabilisation
/// window. In kubernetes/kubernetes: the usage ratio and tolerance in
/// `pkg/controller/podautoscaler/replica_calculator.go`, the rate limits and the stabilisation
/// (the highest recommendation of the window) in `horizontal.go`
/// (`normalizeDesiredReplicasWithBehaviors`), the defaults in
/// `pkg/apis/autoscaling/v2/defaults.go`. CPU is averaged over the last 30 s (metrics-server's 15 s resolution plus the
/// kubelet's averaging window).
#[derive(Debug, Clone)]
pub struct Hpa {
    name: &'static str,
    metric: HpaMetric,
    min: u32,
    max: u32,
    samples: VecDeque<(Duration, f64)>,
    recommendations: VecDeque<(Duration, u32)>,
    /// KEDA: the value the HPA sees, and when KEDA last polled.
    polled: Option<(Duration, f64)>,
}

const HPA_SYNC: Duration = Duration::from_secs(15);
const HPA_TOLERANCE: f64 = 0.1;
const HPA_STABILISATION: Duration = Duration::from_secs(300);
const CPU_WINDOW: Duration = Duration::from_secs(30);

impl Hpa {
    /// HPA on CPU at `target` utilisation (0.7 is the classic setting).
    pub fn cpu(target: f64, min: u32, max: u32) -> Self {
        Hpa::with(HpaMetric::Cpu { target }, "hpa-cpu", min, max)
    }

    /// KEDA scaling on queue length (requests waiting or in flight), polled every 30 s (the
    /// `pollingInterval` default of kedacore/keda's scale loop, `pkg/scaling/scale_handler.go`),
    /// with an AverageValue target per instance, through the HPA it drives.
    pub fn keda(target_per_pod: f64, min: u32, max: u32) -> Self {
        let poll = Duration::from_secs(30);
        Hpa::with(HpaMetric::External { target_per_pod, poll }, "keda-queue", min, max)
    }

    fn with(metric: HpaMetric, name: &'static str, min: u32, max: u32) -> Self {
        Hpa {
            name,
            metric,
            min,
            max,
            samples: VecDeque::new(),
            recommendations: VecDeque::new(),
            polled: None,
        }
    }
}

impl Policy for Hpa {
    fn name(&self) -> &str {
        self.name
    }

    fn period(&self) -> Duration {
        HPA_SYNC
    }

    fn decide(&mut self, signals: &Signals, current: u32) -> Decision {
        let now = signals.now;
        let ready = signals.ready.max(1);
        // The usage ratio: observed per pod over target per pod.
        let ratio = match self.metric {
            HpaMetric::Cpu { target } => {
                self.samples.push_back((now, signals.cpu / f64::from(ready)));
                while self.samples.front().is_some_and(|(at, _)| now.saturating_sub(*at) >= CPU_WINDOW) {
                    self.samples.pop_front();
                }
                let mean =
                    self.samples.iter().map(|(_, v)| v).sum::<f64>() / self.samples.len().max(1) as f64;
                mean / target
            }
            HpaMetric::External { target_per_pod, poll } => {
                if self.polled.is_none_or(|(at, _)| now.saturating_sub(at) >= poll) {
                    self.polled = Some((now, signals.concurrency));
                }
                let value = self.polled.map_or(0.0, |(_, v)| v);
                value / (target_per_pod * f64::from(ready))
            }
        };
        let mut desired = if (ratio - 1.0).abs() <= HPA_TOLERANCE {
            current
        } else {
            (f64::from(ready) * ratio).ceil() as u32
        };
        let up_limit = (current * 2).max(current + 4);
        desired = desired.min(up_limit);
        self.recommendations.push_back((now, desired));
        while self.recommendations.front().is_some_and(|(at, _)| now.saturating_sub(*at) >= HPA_STABILISATION)
        {
            self.recommendations.pop_front();
        }
        if desired < current {
            desired = self.recommendations.iter().map(|(_, d)| *d).max().unwrap_or(desired).min(current);
        }
        let desired = desired.clamp(self.min, self.max);
        Decision { desired, panic: false, reason: format!("usage ratio {ratio:.2}") }
    }
}

/// Knative's KPA (`pkg/autoscaler/scaling/autoscaler.go` in knative/serving, with the defaults
/// of `config-autoscaler`): every 2 s, the measured concurrency (which counts requests queued at
/// the pod and in the activator) averaged over a 60 s stable and a 6 s panic window; desired
/// pods are `ceil(average / (target × utilisation))`. The panic window asking for 200% of the
/// ready pods starts panic mode, in which the count never decreases; panic ends a stable window
/// after the threshold was last crossed. Scale-up at most 1000x and scale-down at most 2x the
/// ready pods per decision; no scale-down delay; an idle pool goes to zero after the 30 s
/// scale-to-zero grace period.
#[derive(Debug, Clone)]
pub struct Kpa {
    per_pod: f64,
    min: u32,
    max: u32,
    samples: VecDeque<(Duration, f64)>,
    panic_until: Option<Duration>,
    last_request: Option<Duration>,
}

const KPA_TICK: Duration = Duration::from_secs(2);
const KPA_STABLE_WINDOW: Duration = Duration::from_secs(60);
const KPA_PANIC_WINDOW: Duration = Duration::from_secs(6);
const KPA_PANIC_THRESHOLD: f64 = 2.0;
const KPA_MAX_SCALE_UP_RATE: f64 = 1000.0;
const KPA_MAX_SCALE_DOWN_RATE: f64 = 2.0;
const KPA_SCALE_TO_ZERO_GRACE: Duration = Duration::from_secs(30);

impl Kpa {
    pub fn new(target: f64, utilization: f64, min: u32, max: u32) -> Self {
        Kpa {
            per_pod: (target * utilization).max(f64::EPSILON),
            min,
            max,
            samples: VecDeque::new(),
            panic_until: None,
            last_request: None,
        }
    }

    fn average_over(&self, now: Duration, window: Duration) -> f64 {
        let within: Vec<f64> =
            self.samples.iter().filter(|(at, _)| now.saturating_sub(*at) < window).map(|(_, v)| *v).collect();
        within.iter().sum::<f64>() / within.len().max(1) as f64
    }
}

impl Policy for Kpa {
    fn name(&self) -> &str {
        "knative-kpa"
    }

    fn period(&self) -> Duration {
        KPA_TICK
    }

    fn decide(&mut self, signals: &Signals, current: u32) -> Decision {
        let now = signals.now;
        self.samples.push_back((now, signals.concurrency));
        while self.samples.front().is_some_and(|(at, _)| now.saturating_sub(*at) >= KPA_STABLE_WINDOW) {
            self.samples.pop_front();
        }
        if signals.concurrency > 0.0 {
            self.last_request = Some(now);
        }
        let ready = signals.ready;
        let want = |average: f64| (average / self.per_pod).ceil() as u32;
        let stable = want(self.average_over(now, KPA_STABLE_WINDOW));
        let panic_want = want(self.average_over(now, KPA_PANIC_WINDOW));
        // Knative divides by at least one ready pod.
        let over_threshold = f64::from(panic_want) / f64::from(ready.max(1)) >= KPA_PANIC_THRESHOLD;
        if over_threshold {
            self.panic_until = Some(now + KPA_STABLE_WINDOW);
        }
        let panic = self.panic_until.is_some_and(|until| now < until);
        let mut desired = if panic { panic_want.max(current) } else { stable };
        let up_limit = (f64::from(ready.max(1)) * KPA_MAX_SCALE_UP_RATE).ceil() as u32;
        let down_limit = (f64::from(ready) / KPA_MAX_SCALE_DOWN_RATE).floor() as u32;
        desired = desired.min(up_limit.max(current)).max(down_limit.min(current));
        let idle = self.last_request.is_none_or(|last| now.saturating_sub(last) >= KPA_SCALE_TO_ZERO_GRACE);
        if desired == 0 && !idle {
            desired = 1;
        }
        let reason = format!("stable wants {stable}, panic window wants {panic_want}");
        Decision { desired: desired.clamp(self.min, self.max.max(self.min)), panic, reason }
    }
}

/// AWS target tracking on CPU, as the EC2 Auto Scaling user guide's "Target tracking scaling
/// policies" describes the alarms it creates: one datapoint a minute; scale out when three in a row are above
/// the target, scale in when fifteen in a row are below 90% of it (the low alarm), with the
/// default 300 s scale-in cooldown. Capacity moves to `ceil(current × value / target)`.
#[derive(Debug, Clone)]
pub struct AwsTargetTracking {
    target: f64,
    min: u32,
    max: u32,
    datapoints: VecDeque<f64>,
    last_scale_in: Option<Duration>,
}

impl AwsTargetTracking {
    pub fn cpu(target: f64, min: u32, max: u32) -> Self {
        AwsTargetTracking { target, min, max, datapoints: VecDeque::new(), last_scale_in: None }
    }
}

impl Policy for AwsTargetTracking {
    fn name(&self) -> &str {
        "aws-target-tracking"
    }

    fn period(&self) -> Duration {
        Duration::from_secs(60)
    }

    fn decide(&mut self, signals: &Signals, current: u32) -> Decision {
        let ready = signals.ready.max(1);
        let utilisation = signals.cpu / f64::from(ready);
        self.datapoints.push_back(utilisation);
        if self.datapoints.len() > 15 {
            self.datapoints.pop_front();
        }
        let proportional = (f64::from(ready) * utilisation / self.target).ceil() as u32;
        let last = |n: usize| self.datapoints.iter().rev().take(n);
        let (mut desired, mut reason) = (current, format!("utilisation {utilisation:.2}"));
        if self.datapoints.len() >= 3 && last(3).all(|&v| v > self.target) && proportional > current {
            desired = proportional;
            reason.push_str(": 3 of 3 datapoints high");
        } else if self.datapoints.len() >= 15
            && last(15).all(|&v| v < self.target * 0.9)
            && self.last_scale_in.is_none_or(|at| signals.now.saturating_sub(at) >= Duration::from_secs(300))
            && proportional < current
        {
            desired = proportional;
            self.last_scale_in = Some(signals.now);
            reason.push_str(": 15 of 15 datapoints low");
        }
        Decision { desired: desired.clamp(self.min, self.max), panic: false, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64, ready: u32, cpu: f64, concurrency: f64) -> Signals {
        Signals { now: Duration::from_secs(seconds), ready, cpu, concurrency, ..Signals::default() }
    }

    #[test]
    fn hpa_doubles_at_most_per_sync_and_holds_scale_down_for_five_minutes() {
        let mut hpa = Hpa::cpu(0.7, 1, 100);
        // Ten times the load on 2 pods: each pod is pinned at 100% and cannot show more, so
        // each 15 s sync grows the pool by at most 1/0.7: several syncs for a 10x step.
        let mut current = 2;
        let mut steps = Vec::new();
        for sync in 0..5 {
            let decision = hpa.decide(&at(sync * 15, current, f64::from(current), 0.0), current);
            current = decision.desired;
            steps.push(current);
        }
        assert_eq!(steps, [3, 5, 8, 12, 18]);
        // Load gone: the 300 s stabilisation window keeps the highest recent recommendation.
        let decision = hpa.decide(&at(90, 18, 0.0, 0.0), 18);
        assert_eq!(decision.desired, 18);
    }

    #[test]
    fn keda_sees_the_queue_only_every_thirty_seconds() {
        let mut keda = Hpa::keda(10.0, 1, 100);
        assert_eq!(keda.decide(&at(0, 2, 0.0, 20.0), 2).desired, 2);
        // The queue jumps at 15 s, but the HPA still sees the value polled at 0 s.
        assert_eq!(keda.decide(&at(15, 2, 0.0, 200.0), 2).desired, 2);
        assert_eq!(keda.decide(&at(30, 2, 0.0, 200.0), 2).desired, 6, "polled at 30 s: +4 limit");
    }

    #[test]
    fn kpa_panics_at_twice_the_ready_pods_and_does_not_scale_down_until_a_stable_window_passes() {
        // Knative's docs: panic when the panic window (6 s) asks for at least 200% of the ready
        // pods; in panic the pod count never decreases; panic ends once the panic condition has
        // not held for a stable window (60 s).
        let mut kpa = Kpa::new(10.0, 1.0, 1, 100);
        let mut current = 2;
        for second in (0..60).step_by(2) {
            current = kpa.decide(&at(second, current, 0.0, 15.0), current).desired;
        }
        assert_eq!(current, 2, "15 in flight on pods of 10: two pods, no panic");
        let burst = kpa.decide(&at(60, 2, 0.0, 100.0), current);
        assert!(burst.panic, "{}", burst.reason);
        // The panic window's mean (15, 15, 100) asks for 5 pods: at least twice the 2 ready.
        assert_eq!(burst.desired, 5);
        current = burst.desired;
        // Back to 15 in flight: in panic, the count holds for 60 s after the last crossing.
        for second in (62..120).step_by(2) {
            let decision = kpa.decide(&at(second, current, 0.0, 15.0), current);
            assert!(decision.panic && decision.desired == 5, "at {second} s: {decision:?}");
        }
        let calm = kpa.decide(&at(120, 5, 0.0, 15.0), current);
        assert!(!calm.panic && calm.desired < 5, "{calm:?}");
    }

    #[test]
    fn aws_needs_three_high_minutes() {
        let mut aws = AwsTargetTracking::cpu(0.7, 1, 100);
        let decisions: Vec<u32> = (0..3).map(|m| aws.decide(&at(m * 60, 2, 2.0, 0.0), 2).desired).collect();
        assert_eq!(decisions, [2, 2, 3], "scales out only on the third high datapoint");
    }
}
