//! Cumulative request counts of each service, kept for as long as the longest window that
//! anything asks about (an alert's `window`, or one second for the dashboard's rates). What
//! happened within a window is the difference between the newest reading and the one taken
//! a window earlier, so a window costs one subtraction, not a sum over its seconds.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use surge_metrics::LatencyCounts;

/// One service's counters at one reading, all cumulative.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    /// 5xx answers, the gateway's own and the instances'.
    pub errors: u64,
    pub latency: LatencyCounts,
    pub rate_limited: u64,
    pub retries: u64,
}

impl Counts {
    pub fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self.latency.since(&earlier.latency),
            rate_limited: self.rate_limited.saturating_sub(earlier.rate_limited),
            retries: self.retries.saturating_sub(earlier.retries),
        }
    }
}

/// What happened within a window, and how long the window really was (shorter than asked while
/// surge has not run that long).
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub seconds: f64,
    pub counts: Counts,
}

impl Span {
    pub fn per_second(&self, count: u64) -> f64 {
        if self.seconds > 0.0 {
            count as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// 5xx answers over all answers; `None` with no answers.
    pub fn error_ratio(&self) -> Option<f64> {
        (self.counts.requests > 0).then(|| self.counts.errors as f64 / self.counts.requests as f64)
    }
}

#[derive(Debug, Default)]
pub struct Windows {
    keep_ms: u64,
    services: HashMap<String, VecDeque<(u64, Counts)>>,
}

impl Windows {
    /// Keeps readings for `keep` (at least a second).
    pub fn new(keep: Duration) -> Self {
        Windows { keep_ms: duration_ms(keep).max(1000), services: HashMap::new() }
    }

    pub fn set_keep(&mut self, keep: Duration) {
        self.keep_ms = duration_ms(keep).max(1000);
    }

    pub fn record(&mut self, now_ms: u64, service: &str, counts: Counts) {
        let readings = self.services.entry(service.to_owned()).or_default();
        readings.push_back((now_ms, counts));
        // Keep one reading at or before the cutoff: it starts the longest window.
        let cutoff = now_ms.saturating_sub(self.keep_ms);
        while readings.len() > 2 && readings[1].0 <= cutoff {
            readings.pop_front();
        }
    }

    /// What happened to `service` within the last `window`: from the newest reading at least
    /// that old (or the oldest there is) to the newest. `None` before two readings.
    pub fn over(&self, service: &str, window: Duration) -> Option<Span> {
        let readings = self.services.get(service)?;
        let (now_ms, newest) = readings.back()?;
        let start = now_ms.saturating_sub(duration_ms(window));
        let (then_ms, earlier) =
            readings.iter().rev().find(|(at, _)| *at <= start).or_else(|| readings.front())?;
        if then_ms == now_ms {
            return None;
        }
        Some(Span { seconds: (now_ms - then_ms) as f64 / 1000.0, counts: newest.since(earlier) })
    }

    /// Forgets services that are gone.
    pub fn retain(&mut self, services: &[&str]) {
        self.services.retain(|name, _| services.contains(&name.as_str()));
    }
}

pub(crate) fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, errors: u64) -> Counts {
        Counts { requests, errors, ..Counts::default() }
    }

    #[test]
    fn a_window_is_the_difference_from_the_reading_a_window_ago() {
        let mut windows = Windows::new(Duration::from_secs(10));
        assert_eq!(windows.over("api", Duration::from_secs(1)), None);
        for second in 0..=20u64 {
            windows.record(second * 1000, "api", counts(second * 10, second));
        }
        let last = windows.over("api", Duration::from_secs(1)).expect("readings");
        assert_eq!((last.seconds, last.counts.requests, last.counts.errors), (1.0, 10, 1));
        assert_eq!(last.per_second(last.counts.requests), 10.0);
        let ten = windows.over("api", Duration::from_secs(10)).expect("readings");
        assert_eq!((ten.seconds, ten.counts.requests), (10.0, 100));
        assert_eq!(ten.error_ratio(), Some(0.1));
        let longer = windows.over("api", Duration::from_secs(60)).expect("readings");
        assert_eq!(longer.seconds, 10.0, "only what is kept: the window was shortened");
        assert_eq!(windows.services["api"].len(), 11);
    }

    #[test]
    fn a_young_window_covers_what_there_is_and_no_answers_have_no_ratio() {
        let mut windows = Windows::new(Duration::from_secs(60));
        windows.record(0, "api", counts(0, 0));
        windows.record(1000, "api", counts(0, 0));
        let span = windows.over("api", Duration::from_secs(60)).expect("two readings");
        assert_eq!(span.seconds, 1.0);
        assert_eq!(span.error_ratio(), None);
        windows.retain(&[]);
        assert_eq!(windows.over("api", Duration::from_secs(1)), None);
    }
}
