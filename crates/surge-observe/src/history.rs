//! The last 15 minutes of each pool, a point a second, for the dashboard's charts; and the
//! scaling decisions within them, to mark on the instance line. Bounded: a point is a few
//! numbers, 900 of them a pool.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const SPAN: Duration = Duration::from_secs(15 * 60);
/// Decisions kept at most, however often a pool changes its mind.
const DECISIONS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub t_ms: u64,
    pub rps: f64,
    pub errors_per_s: f64,
    pub p99_ms: Option<f64>,
    pub ready: u32,
    pub desired: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub service: String,
    pub t_ms: u64,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// A pool's points as columns, the shape charts take.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub t_ms: Vec<u64>,
    pub rps: Vec<f64>,
    pub errors_per_s: Vec<f64>,
    pub p99_ms: Vec<Option<f64>>,
    pub ready: Vec<u32>,
    pub desired: Vec<u32>,
}

/// `GET /history`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistoryJson {
    pub interval_ms: u64,
    pub now_ms: u64,
    pub services: BTreeMap<String, Series>,
    pub decisions: Vec<Decision>,
}

#[derive(Debug, Default)]
pub struct History {
    services: BTreeMap<String, VecDeque<Point>>,
    decisions: VecDeque<Decision>,
}

impl History {
    pub fn push(&mut self, service: &str, point: Point) {
        let points = self.services.entry(service.to_owned()).or_default();
        points.push_back(point);
        let cutoff = cutoff(point.t_ms);
        while points.front().is_some_and(|oldest| oldest.t_ms < cutoff) {
            points.pop_front();
        }
    }

    pub fn decided(&mut self, decision: Decision) {
        let cutoff = cutoff(decision.t_ms);
        self.decisions.push_back(decision);
        while self.decisions.len() > DECISIONS || self.decisions.front().is_some_and(|d| d.t_ms < cutoff) {
            self.decisions.pop_front();
        }
    }

    /// Forgets pools that are gone.
    pub fn retain(&mut self, services: &[&str]) {
        self.services.retain(|name, _| services.contains(&name.as_str()));
    }

    pub fn to_json(&self, now_ms: u64) -> HistoryJson {
        let cutoff = cutoff(now_ms);
        let services = self
            .services
            .iter()
            .map(|(name, points)| {
                let mut series = Series::default();
                for point in points.iter().filter(|p| p.t_ms >= cutoff) {
                    series.t_ms.push(point.t_ms);
                    series.rps.push(point.rps);
                    series.errors_per_s.push(point.errors_per_s);
                    series.p99_ms.push(point.p99_ms);
                    series.ready.push(point.ready);
                    series.desired.push(point.desired);
                }
                (name.clone(), series)
            })
            .collect();
        let decisions = self.decisions.iter().filter(|d| d.t_ms >= cutoff).cloned().collect();
        HistoryJson { interval_ms: 1000, now_ms, services, decisions }
    }
}

fn cutoff(now_ms: u64) -> u64 {
    now_ms.saturating_sub(crate::windows::duration_ms(SPAN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(t_ms: u64) -> Point {
        Point { t_ms, rps: 1.0, errors_per_s: 0.0, p99_ms: None, ready: 1, desired: 1 }
    }

    #[test]
    fn fifteen_minutes_are_kept_a_point_a_second() {
        let mut history = History::default();
        for second in 0..2000u64 {
            history.push("api", point(second * 1000));
        }
        let json = history.to_json(1_999_000);
        let series = &json.services["api"];
        assert_eq!(series.t_ms.len(), 901, "15 minutes and the point that starts them");
        assert_eq!(series.t_ms.first(), Some(&1_099_000));
        assert_eq!(history.services["api"].len(), 901, "nothing older is held");
    }

    #[test]
    fn decisions_age_out_and_are_bounded_and_gone_pools_are_forgotten() {
        let decision = |t_ms| Decision { service: "api".into(), t_ms, from: 1, to: 2, reason: "load".into() };
        let mut history = History::default();
        for tenth in 0..1500u64 {
            history.decided(decision(tenth * 100));
        }
        assert_eq!(history.decisions.len(), DECISIONS, "ten a second for 150 s: the bound holds");
        let mut history = History::default();
        for second in 0..1500u64 {
            history.decided(decision(second * 1000));
        }
        assert_eq!(history.to_json(1_499_000).decisions.len(), 901, "one a second: 15 minutes of them");
        history.push("api", point(0));
        history.retain(&["web"]);
        assert!(history.to_json(0).services.is_empty());
    }
}
