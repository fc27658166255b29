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
/// cost (latency × (in flight + 1)); `None` if neither is available.
pub fn p2c(first: usize, second: usize, load: impl Fn(usize) -> Option<Load>) -> Option<usize> {
    let cost = |load: Load| load.latency.max(1e-6) * (load.in_flight as f64 + 1.0);
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
    /// `load(i)` is endpoint `i`'s load, or `None` if it cannot take a request (a snapshot can
    /// hold an endpoint that stopped since it was taken).
    pub fn pick(&self, count: usize, load: impl Fn(usize) -> Option<Load>) -> Option<usize> {
        // Relaxed: the cursor only spreads ties; no other memory depends on it.
        let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
        let in_flight = |i| load(i).map(|l: Load| l.in_flight);
        match self.policy {
            Policy::LeastConn => least_conn(count, cursor, in_flight),
            Policy::RoundRobin => round_robin(count, cursor, |i| load(i).is_some()),
            Policy::Random | Policy::P2cEwma if count == 0 => None,
            Policy::Random => round_robin(count, fastrand::usize(..count), |i| load(i).is_some()),
            Policy::P2cEwma => {
                let first = fastrand::usize(..count);
                // A second, different endpoint when there is one.
                let second = (first + 1 + fastrand::usize(..count.max(2) - 1)) % count;
                p2c(first, second, &load).or_else(|| least_conn(count, cursor, in_flight))
            }
        }
    }
}

/// The available endpoint with the least load, scanning from `start` so that equal loads
/// take turns.
pub fn least_conn(count: usize, start: usize, load: impl Fn(usize) -> Option<usize>) -> Option<usize> {
    (0..count)
        .map(|offset| (start + offset) % count)
        .filter_map(|i| load(i).map(|load| (i, load)))
        .min_by_key(|&(_, load)| load)
        .map(|(i, _)| i)
}

/// The first available endpoint from `cursor` on, wrapping around.
pub fn round_robin(count: usize, cursor: usize, available: impl Fn(usize) -> bool) -> Option<usize> {
    (0..count).map(|offset| (cursor + offset) % count).find(|&i| available(i))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(p2c(0, 1, |i| Some(loads[i])), Some(1));
        assert_eq!(p2c(0, 1, |i| (i == 0).then_some(loads[0])), Some(0));
        assert_eq!(p2c(0, 1, |_| None), None);
    }

    #[test]
    fn p2c_ewma_avoids_a_slow_endpoint() {
        let balancer = Balancer::new(Policy::P2cEwma);
        let latency = [0.005, 0.005, 0.100];
        let mut counts = [0; 3];
        for _ in 0..3000 {
            let pick = balancer.pick(3, |i| Some(Load { in_flight: 0, latency: latency[i] })).expect("some");
            counts[pick] += 1;
        }
        // Two different endpoints are drawn each time, so the slowest of three never wins.
        assert_eq!(counts[2], 0, "{counts:?}");
        assert_eq!(Balancer::new(Policy::P2cEwma).pick(1, idle), Some(0));
        assert_eq!(Balancer::new(Policy::Random).pick(0, idle), None);
    }

    #[test]
    fn least_conn_picks_the_least_loaded() {
        let loads = [5, 2, 7, 3];
        for start in 0..8 {
            assert_eq!(least_conn(loads.len(), start, |i| Some(loads[i])), Some(1));
        }
    }

    #[test]
    fn least_conn_rotates_among_equals() {
        let loads = [1, 0, 0, 0];
        let picks: Vec<_> = (0..6).map(|start| least_conn(4, start, |i| Some(loads[i]))).collect();
        assert_eq!(picks, [Some(1), Some(1), Some(2), Some(3), Some(1), Some(1)]);
    }

    #[test]
    fn empty_sets_pick_nothing() {
        assert_eq!(least_conn(0, 3, |_| Some(0)), None);
        assert_eq!(round_robin(0, 3, |_| true), None);
        assert_eq!(Balancer::new(Policy::LeastConn).pick(0, idle), None);
    }

    #[test]
    fn unavailable_endpoints_are_never_picked() {
        // Endpoint 0 looks idle but has stopped: least_conn must not keep choosing it.
        let loads = [None, Some(4), Some(2), None];
        let load = |i: usize| loads[i].map(|in_flight| Load { in_flight, latency: 0.01 });
        for policy in [Policy::LeastConn, Policy::RoundRobin, Policy::P2cEwma, Policy::Random] {
            let balancer = Balancer::new(policy);
            for _ in 0..32 {
                let pick = balancer.pick(4, load).expect("two are available");
                assert!(pick == 1 || pick == 2, "{policy:?} picked {pick}");
            }
            assert_eq!(balancer.pick(2, |_| None), None);
        }
    }

    #[test]
    fn round_robin_cycles() {
        let balancer = Balancer::new(Policy::RoundRobin);
        let loads = [9, 0, 0];
        let picks: Vec<_> = (0..6)
            .filter_map(|_| balancer.pick(3, |i| Some(Load { in_flight: loads[i], latency: 0.01 })))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn balancer_spreads_idle_endpoints_evenly() {
        let balancer = Balancer::new(Policy::LeastConn);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[balancer.pick(3, idle).expect("non-empty")] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }
}
