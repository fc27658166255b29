//! Endpoint selection: which ready instance gets the next request.
//!
//! The policies are pure functions over a snapshot of per-endpoint load, so they are tested
//! directly and run unchanged in simulations. [`Balancer`] adds the one piece of state they
//! need between calls, a rotating cursor, kept in an atomic so the data path never locks.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Fewest in-flight requests; ties are broken in rotation, as nginx's `least_conn` does.
    #[default]
    LeastConn,
    /// Each endpoint in turn.
    RoundRobin,
    /// Two endpoints at random, the cheaper by peak-EWMA latency × (in flight + 1), as
    /// linkerd2-proxy and Finagle do.
    P2cEwma,
    /// Any endpoint, uniformly.
    Random,
}

/// What a policy may know of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    pub in_flight: usize,
    /// Peak-EWMA latency, in seconds.
    pub latency: f64,
}

/// Peak-EWMA: a latency above the estimate replaces it at once (so a slowdown is seen
/// immediately); below it, the estimate decays towards it with time constant `tau`.
pub fn peak_ewma(estimate: f64, elapsed: f64, sample: f64, tau: f64) -> f64 {
    if sample > estimate {
        return sample;
    }
    let weight = (-elapsed / tau.max(f64::EPSILON)).exp();
    estimate * weight + sample * (1.0 - weight)
}

/// Power of two choices: of the endpoints at `first` and `second`, the one with the lower
/// cost (latency × (in flight + 1) ÷ weight); `None` if neither is available.
pub fn p2c(first: usize, second: usize, load: impl Fn(usize) -> Option<(Load, u32)>) -> Option<usize> {
    let cost = |(load, weight): (Load, u32)| {
        load.latency.max(1e-6) * (load.in_flight as f64 + 1.0) / f64::from(weight.max(1))
    };
    match (load(first), load(second)) {
        (Some(a), Some(b)) => Some(if cost(b) < cost(a) { second } else { first }),
        (Some(_), None) => Some(first),
        (None, Some(_)) => Some(second),
        (None, None) => None,
    }
}

/// A policy plus its rotating cursor. Shared by all requests to one service.
#[derive(Debug, Default)]
pub struct Balancer {
    policy: Policy,
    cursor: AtomicUsize,
}

impl Balancer {
    pub fn new(policy: Policy) -> Self {
        Balancer { policy, cursor: AtomicUsize::new(0) }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The index of the endpoint to use among `count`, or `None` when none is available.
    /// `weight(i)` is endpoint `i`'s share of the traffic (1 when all are equal); `load(i)` is
    /// its load, or `None` if it cannot take a request (a snapshot can hold an endpoint that
    /// stopped since it was taken).
    pub fn pick(
        &self,
        count: usize,
        weight: impl Fn(usize) -> u32,
        load: impl Fn(usize) -> Option<Load>,
    ) -> Option<usize> {
        if count == 0 {
            return None;
        }
        // Relaxed: the cursor only spreads ties; no other memory depends on it.
        let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
        let weights = Weights::new(count, &weight);
        let weighted_in_flight = |i| load(i).map(|l: Load| (l.in_flight, weight(i)));
        match self.policy {
            Policy::LeastConn => least_conn(count, weights.rotation(cursor), weighted_in_flight),
            Policy::RoundRobin => round_robin(count, weights.rotation(cursor), |i| load(i).is_some()),
            Policy::Random => round_robin(count, weights.draw(), |i| load(i).is_some()),
            Policy::P2cEwma => {
                // Uniform draws: the weights already scale the cost.
                let first = fastrand::usize(..count);
                let second = (first + 1 + fastrand::usize(..count.max(2) - 1)) % count;
                p2c(first, second, |i| load(i).map(|l| (l, weight(i))))
                    .or_else(|| least_conn(count, cursor, weighted_in_flight))
            }
        }
    }
}

/// The endpoints' weights, summed once per pick.
struct Weights<F> {
    count: usize,
    weight: F,
    total: u64,
    max: u32,
}

impl<F: Fn(usize) -> u32> Weights<F> {
    fn new(count: usize, weight: F) -> Self {
        let (mut total, mut max) = (0u64, 0u32);
        for i in 0..count {
            let w = weight(i).max(1);
            total += u64::from(w);
            max = max.max(w);
        }
        Weights { count, weight, total, max }
    }

    fn of(&self, i: usize) -> u32 {
        (self.weight)(i).max(1)
    }

    fn uniform(&self) -> bool {
        self.total == self.count as u64 * u64::from(self.max)
    }

    /// The `cursor`-th endpoint of an interleaved weighted rotation: in round r every endpoint
    /// weighing more than r takes one turn, so weights 3 and 1 give A B A A (spread out, not
    /// A A A B, as nginx's smooth weighted round robin also avoids).
    fn rotation(&self, cursor: usize) -> usize {
        if self.uniform() {
            return cursor % self.count;
        }
        let mut turn = cursor as u64 % self.total;
        for round in 0..self.max {
            let mut taking = (0..self.count).filter(|&i| self.of(i) > round);
            let takers = taking.clone().count() as u64;
            if turn < takers {
                return taking.nth(turn as usize).unwrap_or(0);
            }
            turn -= takers;
        }
        0
    }

    /// An endpoint at random, in proportion to its weight.
    fn draw(&self) -> usize {
        if self.uniform() {
            return fastrand::usize(..self.count);
        }
        let mut ticket = fastrand::u64(..self.total);
        for i in 0..self.count {
            let w = u64::from(self.of(i));
            if ticket < w {
                return i;
            }
            ticket -= w;
        }
        self.count - 1
    }
}

/// The available endpoint with the least in-flight requests per unit of weight, scanning from
/// `start` so that equal loads take turns (nginx's weighted `least_conn`).
pub fn least_conn(count: usize, start: usize, load: impl Fn(usize) -> Option<(usize, u32)>) -> Option<usize> {
    (0..count)
        .map(|offset| (start + offset) % count)
        .filter_map(|i| load(i).map(|(in_flight, weight)| (i, in_flight as u64, u64::from(weight.max(1)))))
        // Compares in_flight ÷ weight without division; the first of equals wins.
        .reduce(|best, next| if next.1 * best.2 < best.1 * next.2 { next } else { best })
        .map(|(i, _, _)| i)
}

/// The first available endpoint from `cursor` on, wrapping around.
pub fn round_robin(count: usize, cursor: usize, available: impl Fn(usize) -> bool) -> Option<usize> {
    (0..count).map(|offset| (cursor + offset) % count).find(|&i| available(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(_: usize) -> u32 {
        1
    }

    fn idle(i: usize) -> Option<Load> {
        let _ = i;
        Some(Load { in_flight: 0, latency: 0.01 })
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        assert_eq!(peak_ewma(0.01, 1.0, 0.5, 10.0), 0.5, "a slow sample replaces the estimate");
        let decayed = peak_ewma(0.5, 10.0, 0.01, 10.0);
        assert!((decayed - (0.5 * (-1.0f64).exp() + 0.01 * (1.0 - (-1.0f64).exp()))).abs() < 1e-12);
        assert!((peak_ewma(0.5, 0.0, 0.01, 10.0) - 0.5).abs() < 1e-12, "no time, no decay");
    }

    #[test]
    fn p2c_prefers_the_cheaper_of_two() {
        let loads = [Load { in_flight: 0, latency: 0.100 }, Load { in_flight: 3, latency: 0.010 }];
        // 0.1 × 1 against 0.01 × 4: the second.
        assert_eq!(p2c(0, 1, |i| Some((loads[i], 1))), Some(1));
        assert_eq!(p2c(0, 1, |i| (i == 0).then_some((loads[0], 1))), Some(0));
        assert_eq!(p2c(0, 1, |_| None), None);
    }

    #[test]
    fn p2c_ewma_avoids_a_slow_endpoint() {
        let balancer = Balancer::new(Policy::P2cEwma);
        let latency = [0.005, 0.005, 0.100];
        let mut counts = [0; 3];
        for _ in 0..3000 {
            let pick =
                balancer.pick(3, one, |i| Some(Load { in_flight: 0, latency: latency[i] })).expect("some");
            counts[pick] += 1;
        }
        // Two different endpoints are drawn each time, so the slowest of three never wins.
        assert_eq!(counts[2], 0, "{counts:?}");
        assert_eq!(Balancer::new(Policy::P2cEwma).pick(1, one, idle), Some(0));
        assert_eq!(Balancer::new(Policy::Random).pick(0, one, idle), None);
    }

    #[test]
    fn least_conn_picks_the_least_loaded() {
        let loads = [5, 2, 7, 3];
        for start in 0..8 {
            assert_eq!(least_conn(loads.len(), start, |i| Some((loads[i], 1))), Some(1));
        }
    }

    #[test]
    fn least_conn_rotates_among_equals() {
        let loads = [1, 0, 0, 0];
        let picks: Vec<_> = (0..6).map(|start| least_conn(4, start, |i| Some((loads[i], 1)))).collect();
        assert_eq!(picks, [Some(1), Some(1), Some(2), Some(3), Some(1), Some(1)]);
    }

    #[test]
    fn empty_sets_pick_nothing() {
        assert_eq!(least_conn(0, 3, |_| Some((0, 1))), None);
        assert_eq!(round_robin(0, 3, |_| true), None);
        assert_eq!(Balancer::new(Policy::LeastConn).pick(0, one, idle), None);
    }

    #[test]
    fn unavailable_endpoints_are_never_picked() {
        // Endpoint 0 looks idle but has stopped: least_conn must not keep choosing it.
        let loads = [None, Some(4), Some(2), None];
        let load = |i: usize| loads[i].map(|in_flight| Load { in_flight, latency: 0.01 });
        for policy in [Policy::LeastConn, Policy::RoundRobin, Policy::P2cEwma, Policy::Random] {
            let balancer = Balancer::new(policy);
            for _ in 0..32 {
                let pick = balancer.pick(4, one, load).expect("two are available");
                assert!(pick == 1 || pick == 2, "{policy:?} picked {pick}");
            }
            assert_eq!(balancer.pick(2, one, |_| None), None);
        }
    }

    #[test]
    fn round_robin_cycles() {
        let balancer = Balancer::new(Policy::RoundRobin);
        let loads = [9, 0, 0];
        let picks: Vec<_> = (0..6)
            .filter_map(|_| balancer.pick(3, one, |i| Some(Load { in_flight: loads[i], latency: 0.01 })))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn balancer_spreads_idle_endpoints_evenly() {
        let balancer = Balancer::new(Policy::LeastConn);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[balancer.pick(3, one, idle).expect("non-empty")] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn weighted_rotation_interleaves_in_proportion() {
        let weights = [3, 1, 2];
        let balancer = Balancer::new(Policy::RoundRobin);
        let picks: Vec<_> = (0..12).filter_map(|_| balancer.pick(3, |i| weights[i], idle)).collect();
        // Round 0: all three; round 1: those weighing over 1; round 2: over 2.
        assert_eq!(picks, [0, 1, 2, 0, 2, 0, 0, 1, 2, 0, 2, 0]);
    }

    #[test]
    fn every_policy_follows_the_weights() {
        let weights = [1, 3];
        for policy in [Policy::LeastConn, Policy::RoundRobin, Policy::Random] {
            let balancer = Balancer::new(policy);
            let mut counts = [0u32; 2];
            for _ in 0..4000 {
                counts[balancer.pick(2, |i| weights[i], idle).expect("some")] += 1;
            }
            let share = f64::from(counts[1]) / 4000.0;
            assert!((0.70..=0.80).contains(&share), "{policy:?} gave the weight-3 endpoint {share:.3}");
        }
    }

    #[test]
    fn p2c_divides_the_cost_by_the_weight() {
        let load = |in_flight: [usize; 2]| {
            move |i: usize| Some((Load { in_flight: in_flight[i], latency: 0.01 }, [1, 3][i]))
        };
        // Weight 3 carries three times the requests at the same cost: 1 ÷ 1 against (n + 1) ÷ 3.
        assert_eq!(p2c(0, 1, load([0, 1])), Some(1));
        assert_eq!(p2c(0, 1, load([0, 2])), Some(0), "a tie goes to the first");
        assert_eq!(p2c(0, 1, load([0, 3])), Some(0));
    }

    #[test]
    fn weighted_least_conn_counts_requests_per_unit_of_weight() {
        // 4 in flight at weight 4 is lighter than 2 at weight 1.
        let loads = [(2, 1), (4, 4)];
        assert_eq!(least_conn(2, 0, |i| Some(loads[i])), Some(1));
        // 2 at weight 1 against 8 at weight 4: equal, so the rotation decides.
        let loads = [(2, 1), (8, 4)];
        assert_eq!(least_conn(2, 0, |i| Some(loads[i])), Some(0));
        assert_eq!(least_conn(2, 1, |i| Some(loads[i])), Some(1));
    }
}
