//! The loop around a policy, one for the live pool supervisor and the simulator: it samples the
//! pool's load every [`SAMPLE_PERIOD`], builds the policy's [`Signals`] at each decision from
//! those samples and from what the data path recorded in the pool's [`PoolLoad`], and decides
//! once per policy period, or sooner while requests wait for an instance. Time comes in as
//! `now` (since the pool started), so the simulator runs this very code in virtual time.

use std::time::Duration;

use crate::load::PoolLoad;
use crate::policy::{Decision, Policy, Signals};

/// How often the supervisor samples the load (and does its housekeeping).
pub const SAMPLE_PERIOD: Duration = Duration::from_millis(100);

/// Waiting requests trigger a decision at most this often.
pub const EARLIEST_DECISION: Duration = Duration::from_millis(200);

/// What the supervisor knows of its instances at a decision.
#[derive(Debug, Clone, Copy, Default)]
pub struct Instances {
    pub ready: u32,
    pub starting: u32,
    /// CPU time used so far by the instances running now, in seconds.
    pub cpu_seconds: f64,
}

/// What a waiting request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Demand {
    /// The desired count from now on.
    pub desired: u32,
    /// Take a sample now, which decides.
    pub decide: bool,
}

/// A policy, fed the way the supervisor feeds it.
#[derive(Debug, Clone)]
pub struct Autoscaler<P> {
    policy: P,
    last_decision: Duration,
    /// Sums of the samples since the last decision: requests in flight or waiting, and waiting.
    concurrency_sum: f64,
    waiting_sum: f64,
    samples: u32,
    cpu_before: f64,
    /// Launch to ready of the latest instance that became ready.
    last_startup: Option<Duration>,
}

impl<P: Policy> Autoscaler<P> {
    pub fn new(policy: P) -> Self {
        Autoscaler {
            policy,
            last_decision: Duration::ZERO,
            concurrency_sum: 0.0,
            waiting_sum: 0.0,
            samples: 0,
            cpu_before: 0.0,
            last_startup: None,
        }
    }

    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// An instance became ready `startup` after its launch.
    pub fn instance_ready(&mut self, startup: Duration) {
        self.last_startup = Some(startup);
    }

    /// A request began to wait for an instance, with `current` instances desired: a pool at
    /// zero starts one at once, and, for a policy that [decides on
    /// demand](Policy::decides_on_demand), a sample taken now decides (`early`), unless the last
    /// decision is more recent than [`EARLIEST_DECISION`].
    pub fn demand(&self, now: Duration, current: u32) -> Demand {
        let decide =
            self.policy.decides_on_demand() && now.saturating_sub(self.last_decision) >= EARLIEST_DECISION;
        Demand { desired: current.max(1), decide }
    }

    /// Takes one sample of `load`; when a decision is due (the policy's period is over, or
    /// `early`, as a [demand](Self::demand) asks), builds the signals (reading `instances` then)
    /// and decides from the `current` desired count.
    pub fn sample(
        &mut self,
        now: Duration,
        load: &PoolLoad,
        instances: impl FnOnce() -> Instances,
        current: u32,
        early: bool,
    ) -> Option<(Signals, Decision)> {
        // Requests waiting in the gateway, and messages waiting in a worker pool's queue.
        let waiting = load.waiting() + load.backlog();
        self.concurrency_sum += (load.active() + waiting) as f64;
        self.waiting_sum += waiting as f64;
        self.samples += 1;
        let elapsed = now.saturating_sub(self.last_decision);
        if elapsed < self.policy.period() && !early {
            return None;
        }
        let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
        let samples = f64::from(self.samples.max(1));
        let finished = load.take_finished();
        let instances = instances();
        let signals = Signals {
            now,
            ready: instances.ready,
            starting: instances.starting,
            concurrency: self.concurrency_sum / samples,
            rps: finished.count as f64 / seconds,
            arrivals: load.take_arrivals() as f64 / seconds,
            waiting: self.waiting_sum / samples,
            service_time: finished.mean_service.map(|d| d.as_secs_f64()),
            latency_p95: load.take_quantile(0.95).map(|d| d.as_secs_f64()),
            // CPU of the instances that were there both times: a new one counts from its start.
            cpu: (instances.cpu_seconds - self.cpu_before).max(0.0) / seconds,
            startup: self.last_startup,
        };
        self.cpu_before = instances.cpu_seconds;
        self.concurrency_sum = 0.0;
        self.waiting_sum = 0.0;
        self.samples = 0;
        self.last_decision = now;
        let decision = self.policy.decide(&signals, current);
        Some((signals, decision))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::policy::{ScaleConfig, SurgePolicy};

    fn autoscaler() -> Autoscaler<SurgePolicy> {
        Autoscaler::new(SurgePolicy::new(ScaleConfig { min: 0, ..ScaleConfig::default() }))
    }

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn decides_once_a_period_from_the_mean_of_its_samples() {
        let mut autoscaler = autoscaler();
        let load = Arc::new(PoolLoad::default());
        let instances = Instances { ready: 2, ..Instances::default() };
        // Four requests in flight for half the second, none for the other half.
        for _ in 0..4 {
            load.started();
        }
        let mut decisions = Vec::new();
        for tenth in 1..=10 {
            if tenth == 6 {
                for _ in 0..4 {
                    load.ended();
                    load.finished(ms(500));
                }
            }
            decisions.push(autoscaler.sample(ms(tenth * 100), &load, || instances, 2, false));
        }
        assert!(decisions[..9].iter().all(Option::is_none), "only at the end of the 1 s period");
        let (signals, _) = decisions[9].clone().expect("decided at 1 s");
        assert_eq!(signals.concurrency, 2.0, "4 in flight for 5 of the 10 samples");
        assert_eq!(signals.rps, 4.0);
        assert_eq!(signals.service_time, Some(0.5));
    }

    #[test]
    fn waiting_requests_bring_the_decision_forward_at_most_every_200_ms() {
        let mut autoscaler = autoscaler();
        let load = Arc::new(PoolLoad::default());
        let waiting = load.wait(10).expect("room");
        let instances = Instances::default();
        assert_eq!(autoscaler.demand(ms(300), 0), Demand { desired: 1, decide: true }, "from zero at once");
        let (signals, decision) =
            autoscaler.sample(ms(300), &load, || instances, 0, true).expect("decided now");
        assert_eq!(signals.waiting, 1.0);
        assert_eq!(decision.desired, 1, "{}", decision.reason);
        assert!(!autoscaler.demand(ms(400), 1).decide, "100 ms after the last decision");
        assert!(autoscaler.sample(ms(400), &load, || instances, 1, false).is_none());
        // Requests wait, so the policy's own period is 200 ms now too: the decision is due
        // either way, and the next sample still waits its turn.
        assert!(autoscaler.demand(ms(500), 1).decide);
        assert!(autoscaler.sample(ms(500), &load, || instances, 1, true).is_some());
        assert!(!autoscaler.demand(ms(500), 1).decide);
        assert!(autoscaler.sample(ms(600), &load, || instances, 1, false).is_none(), "100 ms later");
        drop(waiting);
    }
}
