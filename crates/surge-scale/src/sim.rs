//! The simulator: a pool under a policy, in virtual time, deterministic from a seed.
//!
//! Requests arrive on a shape's schedule and go to a ready instance with a free slot, picked by
//! the gateway's balancer (`surge-balance`, least in flight), or wait in the gateway's queue
//! (first come, first served), as in Surge. A request that waited longer than `max_wait` is
//! dropped. Service times are a fixed part plus an exponential part. New instances serve after
//! `startup`; a scale-in stops the instances the live supervisor would
//! ([`crate::scale_in::choose_victims`]), which finish their requests first. The policy sees
//! exact time-weighted signals every period and its answer is applied at once.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use surge_balance::{Balancer, Load};

use crate::policy::{Policy, Signals};
use crate::scale_in::{self, Candidate, Standing};

/// The pool being simulated.
#[derive(Debug, Clone, Serialize)]
pub struct Model {
    /// From launch to serving.
    pub startup_s: f64,
    /// Requests one instance serves at once.
    pub slots: u32,
    /// Service time: this much, plus an exponential part of mean `service_extra_s`.
    pub service_base_s: f64,
    pub service_extra_s: f64,
    /// A request waiting longer than this is dropped.
    pub max_wait_s: f64,
    pub initial: u32,
    pub min: u32,
    pub max: u32,
    /// The latency objective: p99 of each second at or under this.
    pub slo_s: f64,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            startup_s: 5.0,
            slots: 4,
            service_base_s: 0.1,
            service_extra_s: 0.1,
            max_wait_s: 30.0,
            initial: 2,
            min: 1,
            max: 100,
            slo_s: 1.0,
        }
    }
}

impl Model {
    /// Requests per second one instance serves when every slot is busy.
    pub fn capacity(&self) -> f64 {
        f64::from(self.slots) / (self.service_base_s + self.service_extra_s)
    }
}

/// One simulated second.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Second {
    pub arrivals: u32,
    pub completed: u32,
    pub dropped: u32,
    /// p99 latency of the requests completed in this second, in seconds (0 when none).
    pub p99_s: f64,
    /// Instances paid for at the end of the second: starting, ready and draining.
    pub instances: u32,
    pub desired: u32,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub policy: String,
    pub seconds: Vec<Second>,
    pub requests: u64,
    pub dropped: u64,
    pub instance_seconds: f64,
    /// Changes of scaling direction (up after down, or down after up).
    pub reversals: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Ready,
    Draining,
    Gone,
}

struct Instance {
    state: State,
    busy: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A request (arrived at `arrival` ns, served for `service` ns) finishes on an instance.
    Completion {
        instance: usize,
        arrival: u64,
        service: u64,
    },
    Ready {
        instance: usize,
    },
    Tick,
}

const NS: f64 = 1e9;

fn ns(seconds: f64) -> u64 {
    (seconds * NS).max(0.0) as u64
}

struct Sim<'a> {
    model: &'a Model,
    rng: fastrand::Rng,
    now: u64,
    instances: Vec<Instance>,
    /// Ready instances, oldest first.
    ready: Vec<usize>,
    balancer: Balancer,
    queue: VecDeque<u64>,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    sequence: u64,
    // Integrals since the last tick, for the policy's signals.
    demand_integral: f64,
    busy_integral: f64,
    completed_since_tick: u32,
    latencies_since_tick: Vec<f32>,
    arrivals_since_tick: u32,
    waiting_integral: f64,
    service_since_tick: f64,
    // Per second.
    seconds: Vec<Second>,
    latencies_this_second: Vec<f32>,
    instance_integral: f64,
    dropped: u64,
    requests: u64,
    desired: u32,
}

impl Sim<'_> {
    fn schedule(&mut self, at: u64, event: Event) {
        self.sequence += 1;
        self.events.push(Reverse((at, self.sequence, event)));
    }

    fn in_service(&self) -> u32 {
        self.instances.iter().map(|i| i.busy).sum()
    }

    fn paid(&self) -> u32 {
        self.instances.iter().filter(|i| i.state != State::Gone).count() as u32
    }

    /// Moves the clock, integrating what the signals and the bill need.
    fn advance(&mut self, to: u64) {
        while self.now < to {
            let second_end = (self.now / 1_000_000_000 + 1) * 1_000_000_000;
            let step_end = to.min(second_end);
            let dt = (step_end - self.now) as f64 / NS;
            let busy = f64::from(self.in_service());
            self.demand_integral += (busy + self.queue.len() as f64) * dt;
            self.waiting_integral += self.queue.len() as f64 * dt;
            self.busy_integral += busy * dt;
            self.instance_integral += f64::from(self.paid()) * dt;
            self.now = step_end;
            if self.now == second_end {
                self.close_second();
            }
        }
    }

    fn current_second(&mut self) -> &mut Second {
        let index = (self.now / 1_000_000_000) as usize;
        if self.seconds.len() <= index {
            self.seconds.resize(index + 1, Second::default());
        }
        &mut self.seconds[index]
    }

    fn close_second(&mut self) {
        let index = (self.now / 1_000_000_000) as usize - 1;
        if self.seconds.len() <= index {
            self.seconds.resize(index + 1, Second::default());
        }
        let p99 = percentile(&mut self.latencies_this_second, 0.99);
        self.latencies_this_second.clear();
        let (paid, desired) = (self.paid(), self.desired);
        let second = &mut self.seconds[index];
        second.p99_s = p99;
        second.instances = paid;
        second.desired = desired;
    }

    fn service_time(&mut self) -> u64 {
        let extra = -self.model.service_extra_s * (1.0 - self.rng.f64()).ln();
        ns(self.model.service_base_s + extra)
    }

    /// Starts `arrival` on the ready instance the balancer picks, if one has a free slot.
    fn start_on_free_slot(&mut self, arrival: u64) -> bool {
        let (instances, ready, slots) = (&self.instances, &self.ready, self.model.slots);
        let picked = self.balancer.pick(
            ready.len(),
            |_| 1,
            |i| {
                let busy = instances[ready[i]].busy;
                (busy < slots).then_some(Load { in_flight: busy as usize, latency: 0.0 })
            },
        );
        let Some(index) = picked.map(|i| ready[i]) else { return false };
        self.instances[index].busy += 1;
        let service = self.service_time();
        self.schedule(self.now + service, Event::Completion { instance: index, arrival, service });
        true
    }

    /// Serves waiting requests while slots are free; drops those that waited too long.
    fn drain_queue(&mut self) {
        let max_wait = ns(self.model.max_wait_s);
        while let Some(&arrival) = self.queue.front() {
            if self.now.saturating_sub(arrival) > max_wait {
                self.queue.pop_front();
                self.dropped += 1;
                self.current_second().dropped += 1;
                continue;
            }
            if !self.start_on_free_slot(arrival) {
                break;
            }
            self.queue.pop_front();
        }
    }

    fn arrive(&mut self) {
        self.requests += 1;
        self.arrivals_since_tick += 1;
        self.current_second().arrivals += 1;
        let now = self.now;
        if self.queue.is_empty() && self.start_on_free_slot(now) {
            return;
        }
        self.queue.push_back(now);
        self.drain_queue();
    }

    fn complete(&mut self, index: usize, arrival: u64, service: u64) {
        self.service_since_tick += service as f64 / NS;
        let latency = ((self.now - arrival) as f64 / NS) as f32;
        self.latencies_this_second.push(latency);
        self.latencies_since_tick.push(latency);
        self.completed_since_tick += 1;
        self.current_second().completed += 1;
        let instance = &mut self.instances[index];
        instance.busy -= 1;
        if instance.state == State::Draining && instance.busy == 0 {
            instance.state = State::Gone;
        }
        self.drain_queue();
    }

    fn launch(&mut self) {
        self.instances.push(Instance { state: State::Starting, busy: 0 });
        let index = self.instances.len() - 1;
        let at = self.now + ns(self.model.startup_s);
        self.schedule(at, Event::Ready { instance: index });
    }

    /// Applies a desired count: launches, or stops the instances the live supervisor would
    /// (which finish their requests first).
    fn resize(&mut self, desired: u32) {
        let live: Vec<usize> = (0..self.instances.len())
            .filter(|&i| matches!(self.instances[i].state, State::Starting | State::Ready))
            .collect();
        let live_count = live.len() as u32;
        if desired > live_count {
            for _ in live_count..desired {
                self.launch();
            }
            return;
        }
        let candidates: Vec<Candidate> = live
            .iter()
            .map(|&i| {
                let instance = &self.instances[i];
                let standing =
                    if instance.state == State::Starting { Standing::Starting } else { Standing::Ready };
                Candidate { standing, in_flight: instance.busy as usize }
            })
            .collect();
        for victim in scale_in::choose_victims(&candidates, (live_count - desired) as usize) {
            let instance = &mut self.instances[live[victim]];
            instance.state = if instance.busy == 0 { State::Gone } else { State::Draining };
        }
        let instances = &self.instances;
        self.ready.retain(|&i| instances[i].state == State::Ready);
    }

    fn tick(&mut self, policy: &mut dyn Policy, last_tick: &mut u64) {
        let dt = ((self.now - *last_tick) as f64 / NS).max(1e-9);
        *last_tick = self.now;
        let count = |state| self.instances.iter().filter(|i| i.state == state).count() as u32;
        let signals = Signals {
            now: Duration::from_nanos(self.now),
            ready: count(State::Ready),
            starting: count(State::Starting),
            concurrency: self.demand_integral / dt,
            rps: f64::from(self.completed_since_tick) / dt,
            arrivals: f64::from(self.arrivals_since_tick) / dt,
            waiting: self.waiting_integral / dt,
            service_time: (self.completed_since_tick > 0)
                .then(|| self.service_since_tick / f64::from(self.completed_since_tick)),
            latency_p95: (!self.latencies_since_tick.is_empty())
                .then(|| percentile(&mut self.latencies_since_tick, 0.95)),
            cpu: self.busy_integral / dt / f64::from(self.model.slots),
            // Every instance takes the model's start-up time, the initial ones included.
            startup: Some(Duration::from_secs_f64(self.model.startup_s)),
        };
        self.demand_integral = 0.0;
        self.busy_integral = 0.0;
        self.completed_since_tick = 0;
        self.latencies_since_tick.clear();
        self.arrivals_since_tick = 0;
        self.waiting_integral = 0.0;
        self.service_since_tick = 0.0;
        let desired = policy.decide(&signals, self.desired).desired.clamp(self.model.min, self.model.max);
        self.desired = desired;
        self.resize(desired);
        self.drain_queue();
    }
}

fn percentile(values: &mut [f32], quantile: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let rank = ((values.len() as f64 * quantile).ceil() as usize).clamp(1, values.len()) - 1;
    let (_, value, _) = values.select_nth_unstable_by(rank, f32::total_cmp);
    f64::from(*value)
}

/// Runs `policy` over `arrivals` (offsets from the start, in order) for `length`.
pub fn simulate(
    policy: &mut dyn Policy,
    model: &Model,
    arrivals: impl Iterator<Item = Duration>,
    length: Duration,
    seed: u64,
) -> Run {
    let mut sim = Sim {
        model,
        rng: fastrand::Rng::with_seed(seed),
        now: 0,
        instances: Vec::new(),
        ready: Vec::new(),
        balancer: Balancer::default(),
        queue: VecDeque::new(),
        events: BinaryHeap::new(),
        sequence: 0,
        demand_integral: 0.0,
        busy_integral: 0.0,
        completed_since_tick: 0,
        latencies_since_tick: Vec::new(),
        arrivals_since_tick: 0,
        waiting_integral: 0.0,
        service_since_tick: 0.0,
        seconds: Vec::new(),
        latencies_this_second: Vec::new(),
        instance_integral: 0.0,
        dropped: 0,
        requests: 0,
        desired: model.initial,
    };
    // The initial instances are ready at the start.
    for index in 0..model.initial as usize {
        sim.instances.push(Instance { state: State::Ready, busy: 0 });
        sim.ready.push(index);
    }
    let end = length.as_nanos() as u64;
    let period = |policy: &dyn Policy| policy.period().as_nanos().max(1) as u64;
    sim.schedule(period(policy), Event::Tick);
    let mut last_tick = 0;
    let mut arrivals = arrivals.map(|at| at.as_nanos() as u64).take_while(|&at| at < end).peekable();

    loop {
        let next_event = sim.events.peek().map(|Reverse((at, _, _))| *at);
        let next_arrival = arrivals.peek().copied();
        let at = match (next_event, next_arrival) {
            (Some(event), Some(arrival)) => event.min(arrival),
            (Some(event), None) => event,
            (None, Some(arrival)) => arrival,
            (None, None) => break,
        };
        if at >= end {
            break;
        }
        sim.advance(at);
        if next_arrival == Some(at) && next_event.is_none_or(|event| at <= event) {
            arrivals.next();
            sim.arrive();
            continue;
        }
        let Some(Reverse((_, _, event))) = sim.events.pop() else { break };
        match event {
            Event::Completion { instance, arrival, service } => sim.complete(instance, arrival, service),
            Event::Ready { instance } => {
                if sim.instances[instance].state == State::Starting {
                    sim.instances[instance].state = State::Ready;
                    sim.ready.push(instance);
                    sim.drain_queue();
                }
            }
            Event::Tick => {
                sim.tick(policy, &mut last_tick);
                let next = sim.now + period(policy);
                sim.schedule(next, Event::Tick);
            }
        }
    }
    sim.advance(end);
    // Whatever still waits at the end never got served in time.
    let max_wait = ns(model.max_wait_s);
    let late = sim.queue.iter().filter(|&&arrival| end.saturating_sub(arrival) > max_wait).count() as u64;
    sim.dropped += late;

    let desired: Vec<u32> = sim.seconds.iter().map(|s| s.desired).collect();
    Run {
        policy: policy.name().to_owned(),
        reversals: reversals(&desired),
        requests: sim.requests,
        dropped: sim.dropped,
        instance_seconds: sim.instance_integral,
        seconds: sim.seconds,
    }
}

/// Direction changes in a series of desired counts.
pub fn reversals(desired: &[u32]) -> u32 {
    let mut last_direction = 0i8;
    let mut count = 0;
    for pair in desired.windows(2) {
        let direction = match pair[1].cmp(&pair[0]) {
            std::cmp::Ordering::Greater => 1,
            std::cmp::Ordering::Less => -1,
            std::cmp::Ordering::Equal => continue,
        };
        if last_direction != 0 && direction != last_direction {
            count += 1;
        }
        last_direction = direction;
    }
    count
}

/// The oracle: each second exactly `ceil(arrivals / capacity)` instances (at least `min`),
/// launched `startup` ahead, so each added instance also pays for its start-up.
pub fn oracle_instance_seconds(model: &Model, seconds: &[Second]) -> f64 {
    let capacity = model.capacity();
    let mut total = 0.0;
    let mut previous = 0u32;
    for (index, second) in seconds.iter().enumerate() {
        let needed = ((f64::from(second.arrivals) / capacity).ceil() as u32).max(model.min);
        if needed > previous && index > 0 {
            total += f64::from(needed - previous) * model.startup_s;
        }
        total += f64::from(needed);
        previous = needed;
    }
    total
}

/// Seconds from `step` until p99 is back under the SLO and stays there for `hold` seconds
/// (0 if it never left).
pub fn time_to_slo(model: &Model, seconds: &[Second], step: usize, hold: usize) -> Option<usize> {
    let within = |s: &Second| s.p99_s <= model.slo_s && s.dropped == 0;
    (step..seconds.len()).find(|&start| seconds[start..].iter().take(hold).all(within)).map(|s| s - step)
}

/// Seconds whose p99 broke the SLO or that dropped a request.
pub fn violation_seconds(model: &Model, seconds: &[Second]) -> usize {
    seconds.iter().filter(|s| s.p99_s > model.slo_s || s.dropped > 0).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::baselines::Hpa;
    use crate::policy::{ScaleConfig, SurgePolicy};
    use surge_shape::Shape;

    fn step_run(policy: &mut dyn Policy, model: &Model) -> Run {
        // 1x then 10x of what the two initial instances serve at 50%.
        let base = model.capacity();
        let shape =
            Shape::Steps(vec![(base, Duration::from_secs(120)), (base * 10.0, Duration::from_secs(240))]);
        simulate(policy, model, shape.schedule(Duration::from_secs(360)), Duration::from_secs(360), 7)
    }

    fn surge(model: &Model) -> SurgePolicy {
        let config = ScaleConfig {
            target: f64::from(model.slots),
            min: model.min,
            max: model.max,
            ..ScaleConfig::default()
        };
        SurgePolicy::new(config)
    }

    #[test]
    fn deterministic_for_a_seed() {
        let model = Model::default();
        let first = step_run(&mut surge(&model), &model);
        let again = step_run(&mut surge(&model), &model);
        assert_eq!(first.instance_seconds, again.instance_seconds);
        assert_eq!(first.requests, again.requests);
    }

    #[test]
    fn the_bill_and_the_requests_add_up() {
        let model = Model::default();
        let run = step_run(&mut surge(&model), &model);
        let base = model.capacity();
        assert_eq!(run.requests, (base * 120.0 + base * 10.0 * 240.0).round() as u64);
        let completed: u64 = run.seconds.iter().map(|s| u64::from(s.completed)).sum();
        assert!(completed + run.dropped <= run.requests && completed + run.dropped + 100 >= run.requests);
        let per_second: u32 = run.seconds.iter().map(|s| s.instances).sum();
        assert!((run.instance_seconds - f64::from(per_second)).abs() / run.instance_seconds < 0.05);
    }

    #[test]
    fn surge_recovers_from_a_step_well_before_cpu_hpa() {
        let model = Model::default();
        let surge_run = step_run(&mut surge(&model), &model);
        let hpa_run = step_run(&mut Hpa::cpu(0.7, model.min, model.max), &model);
        let surge_time = time_to_slo(&model, &surge_run.seconds, 120, 30).expect("surge recovers");
        let hpa_time = time_to_slo(&model, &hpa_run.seconds, 120, 30).expect("hpa recovers");
        // HPA on CPU grows at most 1/0.7 per 15 s sync: several cycles for 10x.
        assert!(hpa_time >= 45, "hpa {hpa_time} s");
        assert!(surge_time + 20 <= hpa_time, "surge {surge_time} s, hpa {hpa_time} s");
        assert!(surge_run.dropped <= hpa_run.dropped);
    }

    /// Asks for the counts of `script`, one per second, then keeps the last.
    struct Scripted(Vec<u32>, usize);

    impl Policy for Scripted {
        fn name(&self) -> &str {
            "scripted"
        }
        fn period(&self) -> Duration {
            Duration::from_secs(1)
        }
        fn decide(&mut self, _: &Signals, _: u32) -> crate::Decision {
            let desired = self.0[self.1.min(self.0.len() - 1)];
            self.1 += 1;
            crate::Decision { desired, panic: false, reason: String::new() }
        }
    }

    #[test]
    fn scale_in_stops_starting_instances_before_serving_ones() {
        // Two ready instances at half load; two more are launched at 1 s, then the count goes
        // back to two at 2 s. The live choice stops the two still starting, so the ready ones
        // keep serving and no second breaks the SLO while the others would still be starting.
        let model = Model { initial: 2, min: 1, ..Model::default() };
        let rate = model.capacity();
        let shape = Shape::Steps(vec![(rate, Duration::from_secs(10))]);
        let length = Duration::from_secs(10);
        let run = simulate(&mut Scripted(vec![4, 2], 0), &model, shape.schedule(length), length, 3);
        let instances: Vec<u32> = run.seconds.iter().map(|s| s.instances).collect();
        assert_eq!(&instances[..4], [2, 4, 2, 2], "{instances:?}");
        // Had the ready ones been stopped, requests would wait until 6 s for the others.
        assert_eq!(violation_seconds(&model, &run.seconds), 0, "{:?}", run.seconds);
    }

    #[test]
    fn reversals_count_direction_changes() {
        assert_eq!(reversals(&[1, 2, 2, 3, 2, 2, 1, 4]), 2);
        assert_eq!(reversals(&[5, 5, 5]), 0);
    }
}
