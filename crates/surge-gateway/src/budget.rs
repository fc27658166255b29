//! The retry budget: retries may add at most a fraction of recent requests, so that when a
//! whole pool fails, retries cannot multiply the load on it (Finagle's and linkerd's idea).
//! A small floor per second lets a quiet service still retry a rare failure.

use std::sync::Mutex;
use std::time::Duration;

/// Seconds of history, in one-second buckets.
const WINDOW: usize = 10;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// (second, requests, retries), one per second of the window.
    slots: [(u64, u64, u64); WINDOW],
}

impl Buckets {
    fn slot(&mut self, second: u64) -> &mut (u64, u64, u64) {
        let slot = &mut self.slots[(second % WINDOW as u64) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    fn totals(&self, second: u64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|(at, _, _)| second.saturating_sub(*at) < WINDOW as u64)
            .fold((0, 0), |(requests, retries), (_, q, r)| (requests + q, retries + r))
    }
}

impl RetryBudget {
    /// Retries may be `ratio` of the requests of the last ten seconds, or `min_per_second`
    /// each second of it, whichever allows more.
    pub fn new(ratio: f64, min_per_second: f64) -> Self {
        RetryBudget { ratio, min_per_second, buckets: Mutex::new(Buckets::default()) }
    }

    /// Counts a client request, at `now` (time since any fixed start).
    pub fn request(&self, now: Duration) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets.slot(now.as_secs()).1 += 1;
    }

    /// Takes one retry from the budget if there is one.
    pub fn try_retry(&self, now: Duration) -> bool {
        let second = now.as_secs();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, retries) = buckets.totals(second);
        let allowed = (self.ratio * requests as f64).max(self.min_per_second * WINDOW as f64);
        if (retries as f64) < allowed.floor() {
            buckets.slot(second).2 += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn retries_are_a_fifth_of_busy_traffic() {
        let budget = RetryBudget::new(0.2, 1.0);
        let mut retried = 0;
        for i in 0..5000u64 {
            budget.request(at(i));
            if budget.try_retry(at(i)) {
                retried += 1;
            }
        }
        // Five seconds of 1000 requests/s: a fifth of them, whatever the floor.
        assert!((995..=1001).contains(&retried), "{retried}");
    }

    #[test]
    fn a_quiet_service_still_gets_the_floor() {
        let budget = RetryBudget::new(0.2, 1.0);
        budget.request(at(0));
        let retried = (0..20).filter(|_| budget.try_retry(at(0))).count();
        assert_eq!(retried, 10, "one a second over the ten-second window");
    }

    #[test]
    fn old_traffic_leaves_the_window() {
        let budget = RetryBudget::new(0.5, 0.0);
        for _ in 0..100 {
            budget.request(at(0));
        }
        assert!(budget.try_retry(at(1000)));
        assert!(!budget.try_retry(at(12_000)), "the requests of second 0 are out of the window");
    }
}
