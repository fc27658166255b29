//! What a run measured: HDR histograms of latency (from the intended send time, so a stalled
//! server cannot hide its stall) and of service time (from the actual send), counts per
//! request kind and status, and a per-second timeline.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Microseconds, from 1 µs to an hour, with `digits` significant digits (2 or 3).
fn histogram(digits: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, digits).expect("constant bounds and 2 or 3 digits are valid")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Status(u16),
    ConnectError,
    Timeout,
    ConnectionError,
    /// The target answered something that is not HTTP/1.1.
    MalformedResponse,
}

impl Outcome {
    /// Transport failures and 5xx answers count as errors.
    pub fn is_error(&self) -> bool {
        !matches!(self, Outcome::Status(status) if *status < 500)
    }

    fn label(&self) -> String {
        match self {
            Outcome::Status(status) => status.to_string(),
            Outcome::ConnectError => "connect error".to_owned(),
            Outcome::Timeout => "timeout".to_owned(),
            Outcome::ConnectionError => "connection error".to_owned(),
            Outcome::MalformedResponse => "malformed response".to_owned(),
        }
    }
}

/// One finished request.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub kind: usize,
    pub intended: Instant,
    pub sent: Instant,
    pub done: Instant,
    pub outcome: Outcome,
}

struct KindStats {
    latency: Histogram<u64>,
    /// Few distinct values: a small map, labelled only in the report.
    outcomes: BTreeMap<Outcome, u64>,
}

#[derive(Default, Clone, Copy)]
struct Second {
    intended: u64,
    answered: u64,
    errors: u64,
    p50_us: u64,
    p99_us: u64,
}

/// Seconds kept for the live view's "recent" percentiles.
const RECENT_SECONDS: usize = 5;

pub struct Collector {
    start: Instant,
    latency: Histogram<u64>,
    service: Histogram<u64>,
    kinds: Vec<KindStats>,
    timeline: Vec<Second>,
    current_second: usize,
    current: Histogram<u64>,
    recent: VecDeque<Histogram<u64>>,
    answered: u64,
    errors: u64,
    last_done: Option<Instant>,
}

/// What the live progress shows.
#[derive(Debug, Clone, Copy)]
pub struct LiveView {
    pub answered: u64,
    pub errors: u64,
    pub recent_p50: Duration,
    pub recent_p99: Duration,
}

impl Collector {
    pub fn new(start: Instant, kinds: usize) -> Self {
        Collector {
            start,
            latency: histogram(3),
            service: histogram(3),
            kinds: (0..kinds)
                .map(|_| KindStats { latency: histogram(3), outcomes: BTreeMap::new() })
                .collect(),
            timeline: Vec::new(),
            current_second: 0,
            current: histogram(2),
            recent: VecDeque::new(),
            answered: 0,
            errors: 0,
            last_done: None,
        }
    }

    pub fn record(&mut self, sample: Sample) {
        // A request released a little before its intended time (timer resolution) counts from
        // its actual send, so latency is never below service time.
        let latency = micros(sample.done.saturating_duration_since(sample.intended.min(sample.sent)));
        let service = micros(sample.done.saturating_duration_since(sample.sent));
        self.latency.saturating_record(latency);
        self.service.saturating_record(service);
        if let Some(kind) = self.kinds.get_mut(sample.kind) {
            kind.latency.saturating_record(latency);
            *kind.outcomes.entry(sample.outcome).or_default() += 1;
        }

        let intended_second = sample.intended.saturating_duration_since(self.start).as_secs() as usize;
        self.second(intended_second).intended += 1;
        let done_second =
            (sample.done.saturating_duration_since(self.start).as_secs() as usize).max(self.current_second);
        self.roll_to(done_second);
        let second = self.second(done_second);
        second.answered += u64::from(!matches!(sample.outcome, Outcome::ConnectError));
        second.errors += u64::from(sample.outcome.is_error());
        self.current.saturating_record(latency);

        self.answered += 1;
        self.errors += u64::from(sample.outcome.is_error());
        self.last_done = self.last_done.max(Some(sample.done));
    }

    fn second(&mut self, index: usize) -> &mut Second {
        if self.timeline.len() <= index {
            self.timeline.resize(index + 1, Second::default());
        }
        &mut self.timeline[index]
    }

    /// Closes the seconds before `second`: their percentiles are final.
    fn roll_to(&mut self, second: usize) {
        while self.current_second < second {
            let closed = std::mem::replace(&mut self.current, histogram(2));
            let (p50, p99) = (closed.value_at_quantile(0.5), closed.value_at_quantile(0.99));
            let index = self.current_second;
            let entry = self.second(index);
            entry.p50_us = p50;
            entry.p99_us = p99;
            self.recent.push_back(closed);
            if self.recent.len() > RECENT_SECONDS {
                self.recent.pop_front();
            }
            self.current_second += 1;
        }
    }

    pub fn live(&mut self, now: Instant) -> LiveView {
        self.roll_to(now.saturating_duration_since(self.start).as_secs() as usize);
        let mut recent = histogram(2);
        for second in &self.recent {
            let _ = recent.add(second);
        }
        let _ = recent.add(&self.current);
        LiveView {
            answered: self.answered,
            errors: self.errors,
            recent_p50: Duration::from_micros(recent.value_at_quantile(0.5)),
            recent_p99: Duration::from_micros(recent.value_at_quantile(0.99)),
        }
    }

    /// The final report. `planned` is the schedule's length; `names` the request kinds.
    pub fn finish(mut self, meta: RunMeta, names: &[String]) -> Report {
        let end = self
            .last_done
            .map_or(0, |done| done.saturating_duration_since(self.start).as_secs() as usize + 1);
        self.roll_to(end);
        let elapsed = self
            .last_done
            .map_or(Duration::ZERO, |done| done.saturating_duration_since(self.start))
            .max(meta.planned);
        let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
        let intended_rate =
            meta.open_loop.then(|| meta.scheduled as f64 / meta.planned.as_secs_f64().max(f64::EPSILON));
        let achieved_rate = self.answered as f64 / seconds;
        let mut warnings = Vec::new();
        if meta.dispatch_lag > Duration::from_millis(20) {
            warnings.push(format!(
                "the generator fell behind its own schedule by up to {:.0} ms: this machine is too busy for the \
                 rate asked; figures understate what the target can do",
                meta.dispatch_lag.as_secs_f64() * 1e3
            ));
        }
        if let Some(intended) = intended_rate {
            if achieved_rate < intended * 0.97 {
                warnings.push(format!(
                    "achieved {achieved_rate:.1}/s of the {intended:.1}/s intended: requests waited for one of the \
                     {} connections (the wait counts in the latency); the target is slower than this rate, or \
                     more connections are needed",
                    meta.connections
                ));
            }
        }
        Report {
            target: meta.target,
            mode: if meta.open_loop { "open" } else { "closed" }.to_owned(),
            connections: meta.connections,
            planned_seconds: meta.planned.as_secs_f64(),
            elapsed_seconds: seconds,
            sent: meta.sent,
            answered: self.answered,
            errors: self.errors,
            intended_rate,
            achieved_rate,
            latency_ms: Percentiles::of(&self.latency),
            service_time_ms: Percentiles::of(&self.service),
            kinds: self
                .kinds
                .iter()
                .zip(names)
                .map(|(kind, name)| KindReport {
                    name: name.clone(),
                    count: kind.latency.len(),
                    outcomes: kind.outcomes.iter().map(|(outcome, n)| (outcome.label(), *n)).collect(),
                    latency_ms: Percentiles::of(&kind.latency),
                })
                .collect(),
            timeline: self
                .timeline
                .iter()
                .enumerate()
                .map(|(second, s)| SecondReport {
                    second,
                    intended: s.intended,
                    answered: s.answered,
                    errors: s.errors,
                    p50_ms: s.p50_us as f64 / 1e3,
                    p99_ms: s.p99_us as f64 / 1e3,
                })
                .collect(),
            warnings,
        }
    }
}

/// Facts about the run that the collector does not see itself.
pub struct RunMeta {
    pub target: String,
    pub open_loop: bool,
    pub connections: usize,
    pub planned: Duration,
    /// Arrivals the schedule held (open loop).
    pub scheduled: u64,
    pub sent: u64,
    /// How late the dispatcher was at worst.
    pub dispatch_lag: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub mode: String,
    pub connections: usize,
    pub planned_seconds: f64,
    pub elapsed_seconds: f64,
    pub sent: u64,
    /// Requests that finished, with an answer or an error.
    pub answered: u64,
    /// Transport failures and 5xx answers.
    pub errors: u64,
    pub intended_rate: Option<f64>,
    pub achieved_rate: f64,
    /// From the intended send time.
    pub latency_ms: Percentiles,
    /// From the actual send time.
    pub service_time_ms: Percentiles,
    pub kinds: Vec<KindReport>,
    pub timeline: Vec<SecondReport>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KindReport {
    pub name: String,
    pub count: u64,
    /// By status code ("200") or failure ("timeout").
    pub outcomes: BTreeMap<String, u64>,
    pub latency_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct SecondReport {
    pub second: usize,
    /// Requests scheduled in this second.
    pub intended: u64,
    /// Requests finished in this second.
    pub answered: u64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| micros as f64 / 1e3;
        Percentiles {
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(open_loop: bool, scheduled: u64) -> RunMeta {
        RunMeta {
            target: "t".into(),
            open_loop,
            connections: 4,
            planned: Duration::from_secs(2),
            scheduled,
            sent: scheduled,
            dispatch_lag: Duration::ZERO,
        }
    }

    #[test]
    fn latency_counts_from_the_intended_time() {
        let start = Instant::now();
        let mut collector = Collector::new(start, 1);
        // Intended at 0, sent 900 ms late (the connection was busy), answered in 1 ms.
        let intended = start;
        let sent = start + Duration::from_millis(900);
        collector.record(Sample {
            kind: 0,
            intended,
            sent,
            done: sent + Duration::from_millis(1),
            outcome: Outcome::Status(200),
        });
        let report = collector.finish(meta(true, 1), &["a".into()]);
        assert!((report.latency_ms.max - 901.0).abs() < 1.0, "{:?}", report.latency_ms);
        assert!((report.service_time_ms.max - 1.0).abs() < 0.01, "{:?}", report.service_time_ms);
    }

    #[test]
    fn timeline_outcomes_and_rates() {
        let start = Instant::now();
        let mut collector = Collector::new(start, 2);
        for i in 0..200u64 {
            let at = start + Duration::from_millis(i * 10);
            let outcome = if i % 50 == 0 { Outcome::Status(503) } else { Outcome::Status(200) };
            collector.record(Sample { kind: (i % 2) as usize, intended: at, sent: at, done: at, outcome });
        }
        collector.record(Sample {
            kind: 1,
            intended: start,
            sent: start,
            done: start + Duration::from_millis(1500),
            outcome: Outcome::Timeout,
        });
        let report = collector.finish(meta(true, 400), &["a".into(), "b".into()]);
        assert_eq!((report.answered, report.errors), (201, 5));
        assert_eq!(report.timeline.len(), 2);
        assert_eq!(report.timeline[0].intended, 101);
        assert_eq!(report.timeline[1].answered, 101);
        assert_eq!(report.kinds[1].outcomes.get("timeout"), Some(&1));
        assert_eq!(report.kinds[0].outcomes.get("503"), Some(&4));
        assert_eq!(report.intended_rate, Some(200.0));
        assert!(
            report.warnings.iter().any(|w| w.contains("achieved 100.5/s of the 200.0/s")),
            "{:?}",
            report.warnings
        );
    }
}
