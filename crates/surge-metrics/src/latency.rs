//! A lock-free latency histogram: one atomic add per observation, read without stopping
//! writers. Its buckets are a decimal 1–1.25–1.5–2–2.5–3–4–5–6–7.5 series from 100 µs to
//! 100 s, fine enough for quantiles within about 14%, and containing every boundary of
//! [`latency_buckets`](crate::latency_buckets), so the Prometheus exposition is exact.
//!
//! The same counts serve three readers: Prometheus (cumulative, at each scrape), the dashboard
//! and alerts (the difference of two reads: what happened in between), and the autoscaler
//! (`take`, which reads and clears).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds of the buckets, in microseconds; one more bucket holds everything above.
const BOUNDS: [u64; 61] = {
    const STEPS: [u64; 10] = [100, 125, 150, 200, 250, 300, 400, 500, 600, 750];
    let mut bounds = [0u64; 61];
    let mut scale = 1;
    let mut decade = 0;
    while decade < 6 {
        let mut step = 0;
        while step < 10 {
            bounds[decade * 10 + step] = STEPS[step] * scale;
            step += 1;
        }
        scale *= 10;
        decade += 1;
    }
    bounds[60] = 100_000_000;
    bounds
};

const BUCKETS: usize = BOUNDS.len() + 1;

/// Counts of observations per bucket and their sum: cumulative since start, or the difference
/// of two reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyCounts {
    counts: [u64; BUCKETS],
    sum_micros: u64,
}

impl Default for LatencyCounts {
    fn default() -> Self {
        LatencyCounts { counts: [0; BUCKETS], sum_micros: 0 }
    }
}

impl LatencyCounts {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was observed after `earlier` (a previous read of the same histogram) up to this read.
    pub fn since(&self, earlier: &LatencyCounts) -> LatencyCounts {
        LatencyCounts {
            counts: std::array::from_fn(|i| self.counts[i].saturating_sub(earlier.counts[i])),
            sum_micros: self.sum_micros.saturating_sub(earlier.sum_micros),
        }
    }

    /// The `quantile` (0..=1), as the middle of the bucket it falls in; `None` with no data.
    pub fn quantile(&self, quantile: f64) -> Option<Duration> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * quantile.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                let low = if index == 0 { 0 } else { BOUNDS[index - 1] };
                let high = BOUNDS.get(index).copied().unwrap_or(low * 2);
                return Some(Duration::from_micros((low + high) / 2));
            }
        }
        None
    }

    pub fn mean(&self) -> Option<Duration> {
        let total = self.total();
        (total > 0).then(|| Duration::from_micros(self.sum_micros / total))
    }
}

/// A handle: clones count into the same histogram.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram(Arc<Atomics>);

#[derive(Debug)]
struct Atomics {
    counts: [AtomicU64; BUCKETS],
    sum_micros: AtomicU64,
}

impl Default for Atomics {
    fn default() -> Self {
        Atomics { counts: std::array::from_fn(|_| AtomicU64::new(0)), sum_micros: AtomicU64::new(0) }
    }
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.counts[bucket(micros)].fetch_add(1, Ordering::Relaxed);
        self.0.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Everything observed so far.
    pub fn read(&self) -> LatencyCounts {
        LatencyCounts {
            counts: std::array::from_fn(|i| self.0.counts[i].load(Ordering::Relaxed)),
            sum_micros: self.0.sum_micros.load(Ordering::Relaxed),
        }
    }

    /// Everything observed since the last `take`, which clears the counts.
    pub fn take(&self) -> LatencyCounts {
        LatencyCounts {
            counts: std::array::from_fn(|i| self.0.counts[i].swap(0, Ordering::Relaxed)),
            sum_micros: self.0.sum_micros.swap(0, Ordering::Relaxed),
        }
    }
}

fn bucket(micros: u64) -> usize {
    BOUNDS.partition_point(|&bound| bound < micros)
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

/// Exposed with [`latency_buckets`](crate::latency_buckets)' boundaries, each one of ours.
impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // Per exposed bucket (the encoder sums them up): ours that end within it; +Inf takes
        // the rest.
        let read = self.read();
        let mut ours = read.counts.iter().zip(BOUNDS.iter().map(Some).chain([None])).peekable();
        let mut buckets: Vec<(f64, u64)> = crate::latency_buckets()
            .map(|bound| {
                let micros = (bound * 1e6).round() as u64;
                let mut count = 0;
                while let Some((n, _)) = ours.next_if(|(_, end)| end.is_some_and(|&end| end <= micros)) {
                    count += n;
                }
                (bound, count)
            })
            .collect();
        buckets.push((f64::MAX, ours.map(|(n, _)| n).sum()));
        encoder.encode_histogram::<NoLabelSet>(read.sum_micros as f64 / 1e6, read.total(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_rise_and_hold_every_exposed_boundary() {
        assert!(BOUNDS.windows(2).all(|pair| pair[0] < pair[1]));
        for bound in crate::latency_buckets() {
            let micros = (bound * 1e6).round() as u64;
            assert!(BOUNDS.contains(&micros), "{bound} s is not a bucket boundary");
        }
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(100), 0, "a boundary belongs to the bucket it ends");
        assert_eq!(bucket(101), 1);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_within_the_bucket_resolution() {
        let histogram = LatencyHistogram::default();
        for ms in 1..=100 {
            histogram.record(Duration::from_millis(ms));
        }
        let counts = histogram.read();
        let ms = |d: Option<Duration>| d.expect("data").as_secs_f64() * 1e3;
        let (p50, p99) = (ms(counts.quantile(0.5)), ms(counts.quantile(0.99)));
        assert!((43.0..=58.0).contains(&p50), "{p50}");
        assert!((86.0..=114.0).contains(&p99), "{p99}");
        assert_eq!(counts.mean(), Some(Duration::from_micros(50_500)));
        assert_eq!(LatencyCounts::default().quantile(0.5), None);
    }

    #[test]
    fn a_difference_of_reads_is_what_happened_between_them() {
        let histogram = LatencyHistogram::default();
        histogram.record(Duration::from_millis(1));
        let before = histogram.read();
        histogram.record(Duration::from_millis(200));
        histogram.record(Duration::from_millis(200));
        let between = histogram.read().since(&before);
        assert_eq!(between.total(), 2);
        assert_eq!(between.mean(), Some(Duration::from_millis(200)));
        assert_eq!(histogram.take().total(), 3);
        assert_eq!(histogram.read().total(), 0, "take clears");
    }

    #[test]
    fn the_exposition_is_cumulative_at_the_standard_boundaries() {
        let metrics = crate::Metrics::new();
        let histogram = LatencyHistogram::default();
        metrics.register(|registry| registry.register("latency", "test", histogram.clone()));
        histogram.record(Duration::from_micros(400));
        histogram.record(Duration::from_micros(500));
        histogram.record(Duration::from_millis(3));
        histogram.record(Duration::from_secs(60));
        let text = metrics.encode();
        assert!(text.contains(r#"surge_latency_bucket{le="0.0005"} 2"#), "{text}");
        assert!(text.contains(r#"surge_latency_bucket{le="0.0025"} 2"#), "{text}");
        assert!(text.contains(r#"surge_latency_bucket{le="0.005"} 3"#), "{text}");
        assert!(text.contains(r#"surge_latency_bucket{le="30.0"} 3"#), "{text}");
        assert!(text.contains(r#"surge_latency_bucket{le="+Inf"} 4"#), "{text}");
        assert!(text.contains("surge_latency_count 4"), "{text}");
    }
}
