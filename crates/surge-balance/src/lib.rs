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
    /// `in_flight(i)` is endpoint `i`'s in-flight requests, or `None` if it cannot take one
    /// (a snapshot can hold an endpoint that stopped since it was taken).
    pub fn pick(&self, count: usize, in_flight: impl Fn(usize) -> Option<usize>) -> Option<usize> {
        // Relaxed: the cursor only spreads ties; no other memory depends on it.
        let cursor = self.cursor.fetch_add(1, Ordering::Relaxed);
        match self.policy {
            Policy::LeastConn => least_conn(count, cursor, in_flight),
            Policy::RoundRobin => round_robin(count, cursor, |i| in_flight(i).is_some()),
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
        assert_eq!(Balancer::new(Policy::LeastConn).pick(0, |_| Some(0)), None);
    }

    #[test]
    fn unavailable_endpoints_are_never_picked() {
        // Endpoint 0 looks idle but has stopped: least_conn must not keep choosing it.
        let loads = [None, Some(4), Some(2), None];
        for policy in [Policy::LeastConn, Policy::RoundRobin] {
            let balancer = Balancer::new(policy);
            for _ in 0..8 {
                let pick = balancer.pick(4, |i| loads[i]).expect("two are available");
                assert!(pick == 1 || pick == 2, "{policy:?} picked {pick}");
            }
            assert_eq!(balancer.pick(2, |_| None), None);
        }
    }

    #[test]
    fn round_robin_cycles() {
        let balancer = Balancer::new(Policy::RoundRobin);
        let loads = [9, 0, 0];
        let picks: Vec<_> = (0..6).filter_map(|_| balancer.pick(3, |i| Some(loads[i]))).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn balancer_spreads_idle_endpoints_evenly() {
        let balancer = Balancer::new(Policy::LeastConn);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[balancer.pick(3, |_| Some(0)).expect("non-empty")] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }
}
