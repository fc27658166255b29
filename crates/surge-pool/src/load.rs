//! What the data path tells the autoscaler: requests waiting for an instance, and how long
//! finished requests took. Lock-free: recorded on every request, read once a second.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Four buckets per power of two of microseconds, up to about 19 hours: ±12% resolution, which
/// is plenty for a scaling signal.
const BUCKETS: usize = 4 * 36;

#[derive(Debug)]
pub struct PoolLoad {
    waiting: AtomicUsize,
    /// Requests in flight on any instance of the pool.
    active: AtomicUsize,
    latency: [AtomicU64; BUCKETS],
    /// Wakes one waiting request when a request finishes and frees a slot.
    freed: Notify,
    arrivals: AtomicU64,
    /// Time finished requests spent at instances, in microseconds, and how many there were.
    service_micros: AtomicU64,
    services: AtomicU64,
}

impl Default for PoolLoad {
    fn default() -> Self {
        PoolLoad {
            waiting: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            freed: Notify::new(),
            arrivals: AtomicU64::new(0),
            service_micros: AtomicU64::new(0),
            services: AtomicU64::new(0),
        }
    }
}

/// One request waiting in the gateway's buffer, for as long as it lives.
#[derive(Debug)]
pub struct Waiting<'a>(&'a PoolLoad);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PoolLoad {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub(crate) fn started(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn ended(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Counts a waiting request, unless `limit` already wait.
    pub fn wait(&self, limit: usize) -> Option<Waiting<'_>> {
        let before = self.waiting.fetch_add(1, Ordering::Relaxed);
        if before >= limit {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Waiting(self))
    }

    /// A request for the pool arrived at the gateway.
    pub fn arrived(&self) {
        self.arrivals.fetch_add(1, Ordering::Relaxed);
    }

    /// Arrivals since the last call, which resets the count.
    pub(crate) fn take_arrivals(&self) -> u64 {
        self.arrivals.swap(0, Ordering::Relaxed)
    }

    /// The mean time at an instance of requests finished since the last call, which resets it.
    pub(crate) fn take_mean_service(&self) -> Option<Duration> {
        let count = self.services.swap(0, Ordering::Relaxed);
        let micros = self.service_micros.swap(0, Ordering::Relaxed);
        (count > 0).then(|| Duration::from_micros(micros / count))
    }

    /// A request finished: record its latency and hand its slot to a waiting request.
    pub(crate) fn finished(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.service_micros.fetch_add(micros, Ordering::Relaxed);
        self.services.fetch_add(1, Ordering::Relaxed);
        self.latency[bucket(micros)].fetch_add(1, Ordering::Relaxed);
        if self.waiting() > 0 {
            self.freed.notify_one();
        }
    }

    /// Resolves when a request finishes while others wait.
    pub async fn slot_freed(&self) {
        self.freed.notified().await;
    }

    /// The `quantile` of the latencies recorded since the last call, which clears them.
    pub(crate) fn take_quantile(&self, quantile: f64) -> Option<Duration> {
        let counts: Vec<u64> = self.latency.iter().map(|c| c.swap(0, Ordering::Relaxed)).collect();
        quantile_of(&counts, quantile)
    }
}

fn bucket(micros: u64) -> usize {
    let micros = micros.max(1);
    let exponent = 63 - micros.leading_zeros() as usize;
    let sub = if exponent >= 2 { ((micros >> (exponent - 2)) & 3) as usize } else { 0 };
    (exponent * 4 + sub).min(BUCKETS - 1)
}

/// The smallest value a bucket holds.
fn lower_bound(index: usize) -> u64 {
    let (exponent, sub) = (index / 4, (index % 4) as u64);
    if exponent >= 2 {
        (1u64 << exponent) + sub * (1u64 << (exponent - 2))
    } else {
        1u64 << exponent
    }
}

fn quantile_of(counts: &[u64], quantile: f64) -> Option<Duration> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * quantile).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (index, count) in counts.iter().enumerate() {
        seen += count;
        if seen >= rank {
            // The middle of the bucket.
            let (low, high) = (lower_bound(index), lower_bound(index + 1));
            return Some(Duration::from_micros((low + high) / 2));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_and_order_values() {
        let mut last = 0;
        for micros in [1, 2, 3, 4, 5, 7, 8, 100, 1_000, 50_000, 1_000_000, u64::MAX] {
            let index = bucket(micros);
            assert!(index >= last, "{micros}");
            assert!(lower_bound(index) <= micros.max(1) || index == BUCKETS - 1, "{micros}");
            last = index;
        }
    }

    #[test]
    fn p95_is_within_the_bucket_resolution() {
        let load = PoolLoad::default();
        for ms in 1..=100 {
            load.finished(Duration::from_millis(ms));
        }
        let p95 = load.take_quantile(0.95).expect("recorded").as_secs_f64() * 1e3;
        assert!((84.0..=107.0).contains(&p95), "{p95}");
        assert_eq!(load.take_quantile(0.95), None, "taking clears");
    }

    #[test]
    fn the_buffer_is_bounded() {
        let load = PoolLoad::default();
        let first = load.wait(2).expect("room");
        let second = load.wait(2).expect("room");
        assert!(load.wait(2).is_none());
        assert_eq!(load.waiting(), 2);
        drop((first, second));
        assert_eq!(load.waiting(), 0);
    }
}
