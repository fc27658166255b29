//! The retry budget: retries may add at most a fraction of recent requests, so that when a
//! whole pool fails, retries cannot multiply the load on it (Finagle's and linkerd's idea).
//! A small floor per second lets a quiet service still retry a rare failure.
//!
//! Lock-free, since every request counts itself: a slot that rolls over to a new second is
//! claimed by one thread and cleared; a count made by another thread during that moment may be
//! lost, which a budget can afford. (tower's `TpsBudget` takes a mutex for every request.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Seconds of history, in one-second buckets.
const WINDOW: usize = 10;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: f64,
    slots: [Slot; WINDOW],
}

#[derive(Debug, Default)]
struct Slot {
    /// The second this slot counts; `u64::MAX` before its first.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    /// Retries may be `ratio` of the requests of the last ten seconds, or `min_per_second`
    /// each second of it, whichever allows more.
    pub fn new(ratio: f64, min_per_second: f64) -> Self {
        let slots = std::array::from_fn(|_| Slot { second: AtomicU64::new(u64::MAX), ..Slot::default() });
        RetryBudget { ratio, min_per_second, slots }
    }

    /// The slot for `second`, cleared if it last counted an older one.
    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % WINDOW as u64) as usize];
        let seen = slot.second.load(Ordering::Acquire);
        if seen != second
            && slot.second.compare_exchange(seen, second, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    fn totals(&self, second: u64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|slot| {
                second.checked_sub(slot.second.load(Ordering::Acquire)).is_some_and(|age| age < WINDOW as u64)
            })
            .fold((0, 0), |(requests, retries), slot| {
                (
                    requests + slot.requests.load(Ordering::Relaxed),
                    retries + slot.retries.load(Ordering::Relaxed),
                )
            })
    }

    /// Counts a client request, at `now` (time since any fixed start).
    pub fn request(&self, now: Duration) {
        self.slot(now.as_secs()).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is one.
    pub fn try_retry(&self, now: Duration) -> bool {
        let second = now.as_secs();
        let (requests, retries) = self.totals(second);
        let allowed = (self.ratio * requests as f64).max(self.min_per_second * WINDOW as f64);
        if (retries as f64) < allowed.floor() {
            self.slot(second).retries.fetch_add(1, Ordering::Relaxed);
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
