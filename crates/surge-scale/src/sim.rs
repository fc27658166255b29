//! The simulator: a pool under a policy, in virtual time, deterministic from a seed.
//!
//! It runs the live code for everything but time and processes. Requests arrive on a shape's
//! schedule and are recorded in the pool's [`PoolLoad`], as the gateway records them. Each
//! takes a slot on the ready instance the gateway's balancer picks (`surge-balance`, least in
//! flight), or waits in the pool's [`WaitQueue`](crate::load::WaitQueue), first come first
//! served and woken as the gateway's requests are, within the buffer's bounds (`buffer`
//! requests, `max_wait_s`), past which it is dropped. The [`Autoscaler`] samples the load every
//! [`SAMPLE_PERIOD`] and decides as the pool supervisor does, a waiting request bringing the
//! decision forward; a scale-in stops the instances the supervisor would
//! ([`scale_in::choose_victims`]), which finish their requests first. Service times are a fixed
//! part plus an exponential part; new instances serve after `startup`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use serde::Serialize;

use surge_balance::{Balancer, Load};

use crate::autoscaler::{Autoscaler, Instances, SAMPLE_PERIOD};
use crate::load::{PoolLoad, Ticket, Waiting};
use crate::policy::Policy;
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
    /// The gateway's buffer: at most `buffer` requests wait for an instance, each at most
    /// `max_wait_s` (`buffer.requests` and `buffer.timeout`); the others are dropped.
    pub buffer: usize,
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
            buffer: 1000,
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
    /// The supervisor's tick: the autoscaler samples the load.
    Sample,
    /// A waiting request's buffer timeout.
    GiveUp {
        request: u64,
    },
}

/// A request waiting for an instance: its place in the queue and in the buffer's count.
struct Pending {
    arrival: u64,
    ticket: Option<Ticket>,
    waiting: Option<Waiting>,
}

/// Wakes a simulated request: puts it on the list the simulator polls next.
struct Wake {
    request: u64,
    woken: Arc<Mutex<Vec<u64>>>,
}

impl std::task::Wake for Wake {
    fn wake(self: Arc<Self>) {
        self.woken.lock().unwrap_or_else(|p| p.into_inner()).push(self.request);
    }
}

const NS: f64 = 1e9;

fn ns(seconds: f64) -> u64 {
    (seconds * NS).max(0.0) as u64
}

struct Sim<'a, 'p> {
    model: &'a Model,
    rng: fastrand::Rng,
    now: u64,
    instances: Vec<Instance>,
    /// Ready instances, oldest first.
    ready: Vec<usize>,
    balancer: Balancer,
    load: Arc<PoolLoad>,
    autoscaler: Autoscaler<&'p mut dyn Policy>,
    pending: HashMap<u64, Pending>,
    woken: Arc<Mutex<Vec<u64>>>,
    next_request: u64,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    sequence: u64,
    /// Slot-seconds of service so far: the instances' CPU time, in slots.
    busy_integral: f64,
    // Per second.
    seconds: Vec<Second>,
    latencies_this_second: Vec<f32>,
    instance_integral: f64,
    dropped: u64,
    requests: u64,
    desired: u32,
}

impl Sim<'_, '_> {
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

    fn count(&self, state: State) -> u32 {
        self.instances.iter().filter(|i| i.state == state).count() as u32
    }

    /// Moves the clock, integrating what the CPU reading and the bill need.
    fn advance(&mut self, to: u64) {
        while self.now < to {
            let second_end = (self.now / 1_000_000_000 + 1) * 1_000_000_000;
            let step_end = to.min(second_end);
            let dt = (step_end - self.now) as f64 / NS;
            self.busy_integral += f64::from(self.in_service()) * dt;
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
        self.load.started();
        let service = self.service_time();
        self.schedule(self.now + service, Event::Completion { instance: index, arrival, service });
        true
    }

    fn drop_request(&mut self) {
        self.dropped += 1;
        self.current_second().dropped += 1;
    }

    /// What the gateway's wait buffer and balancer do when a request is polled for readiness:
    /// take a slot if no one waits ahead (or it was woken), else queue (first come, first
    /// served) and count in the buffer, or be turned away when the buffer is full.
    fn poll(&mut self, id: u64) {
        let Some(mut request) = self.pending.remove(&id) else { return };
        let load = Arc::clone(&self.load);
        let queue = load.queue();
        let may_take = request.ticket.is_some() || queue.is_empty();
        let mut started = may_take && self.start_on_free_slot(request.arrival);
        if !started {
            let waker = Waker::from(Arc::new(Wake { request: id, woken: Arc::clone(&self.woken) }));
            queue.wait(&mut request.ticket, &waker);
            // A slot freed between the look and the queueing.
            started = may_take && self.start_on_free_slot(request.arrival);
        }
        if started {
            if let Some(ticket) = request.ticket {
                queue.leave(ticket, true);
            }
            return;
        }
        if request.waiting.is_none() {
            let Some(waiting) = load.wait(self.model.buffer) else {
                if let Some(ticket) = request.ticket {
                    queue.leave(ticket, false);
                }
                return self.drop_request();
            };
            request.waiting = Some(waiting);
            self.schedule(self.now + ns(self.model.max_wait_s), Event::GiveUp { request: id });
            self.pending.insert(id, request);
            let now = Duration::from_nanos(self.now);
            let demand = self.autoscaler.demand(now, self.desired);
            if demand.desired != self.desired {
                self.desired = demand.desired;
                self.resize(demand.desired);
            }
            if demand.decide {
                self.sample(true);
            }
            return;
        }
        self.pending.insert(id, request);
    }

    /// Polls the requests woken since the last look, in the order they were woken.
    fn poll_woken(&mut self) {
        loop {
            let woken = std::mem::take(&mut *self.woken.lock().unwrap_or_else(|p| p.into_inner()));
            if woken.is_empty() {
                return;
            }
            for id in woken {
                self.poll(id);
            }
        }
    }

    fn arrive(&mut self) {
        self.requests += 1;
        self.load.arrived();
        self.current_second().arrivals += 1;
        let id = self.next_request;
        self.next_request += 1;
        self.pending.insert(id, Pending { arrival: self.now, ticket: None, waiting: None });
        self.poll(id);
    }

    fn give_up(&mut self, id: u64) {
        let Some(request) = self.pending.remove(&id) else { return };
        if let Some(ticket) = request.ticket {
            self.load.queue().leave(ticket, false);
        }
        self.drop_request();
    }

    fn complete(&mut self, index: usize, arrival: u64, service: u64) {
        let latency = ((self.now - arrival) as f64 / NS) as f32;
        self.latencies_this_second.push(latency);
        self.current_second().completed += 1;
        let instance = &mut self.instances[index];
        instance.busy -= 1;
        if instance.state == State::Draining && instance.busy == 0 {
            instance.state = State::Gone;
        }
        self.load.ended();
        self.load.finished(Duration::from_nanos(service));
        self.load.queue().wake_one();
    }

    fn launch(&mut self) {
        self.instances.push(Instance { state: State::Starting, busy: 0 });
        let index = self.instances.len() - 1;
        let at = self.now + ns(self.model.startup_s);
        self.schedule(at, Event::Ready { instance: index });
    }

    fn became_ready(&mut self, index: usize) {
        if self.instances[index].state == State::Starting {
            self.instances[index].state = State::Ready;
            self.ready.push(index);
            self.autoscaler.instance_ready(Duration::from_secs_f64(self.model.startup_s));
            self.load.queue().wake_all();
        }
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

    /// The supervisor's tick (or a demand, `early`): one sample, and a decision when one is due.
    fn sample(&mut self, early: bool) {
        let instances = Instances {
            ready: self.count(State::Ready),
            starting: self.count(State::Starting),
            cpu_seconds: self.busy_integral / f64::from(self.model.slots),
        };
        let now = Duration::from_nanos(self.now);
        let Some((_, decision)) = self.autoscaler.sample(now, &self.load, || instances, self.desired, early)
        else {
            return;
        };
        self.desired = decision.desired.clamp(self.model.min, self.model.max);
        self.resize(self.desired);
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
    let name = policy.name().to_owned();
    let mut sim = Sim {
        model,
        rng: fastrand::Rng::with_seed(seed),
        now: 0,
        instances: Vec::new(),
        ready: Vec::new(),
        balancer: Balancer::default(),
        load: Arc::default(),
        autoscaler: Autoscaler::new(policy),
        pending: HashMap::new(),
        woken: Arc::default(),
        next_request: 0,
        events: BinaryHeap::new(),
        sequence: 0,
        busy_integral: 0.0,
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
    let sample_period = SAMPLE_PERIOD.as_nanos() as u64;
    sim.schedule(0, Event::Sample);
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
        } else {
            let Some(Reverse((_, _, event))) = sim.events.pop() else { break };
            match event {
                Event::Completion { instance, arrival, service } => sim.complete(instance, arrival, service),
                Event::Ready { instance } => sim.became_ready(instance),
                Event::Sample => {
                    sim.sample(false);
                    sim.schedule(sim.now + sample_period, Event::Sample);
                }
                Event::GiveUp { request } => sim.give_up(request),
            }
        }
        sim.poll_woken();
    }
    sim.advance(end);

    let desired: Vec<u32> = sim.seconds.iter().map(|s| s.desired).collect();
    Run {
        policy: name,
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
        fn decide(&mut self, _: &crate::Signals, _: u32) -> crate::Decision {
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
