//! What a cache counts, for its users' `/metrics` and for tests.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters since the cache was opened.
#[derive(Debug)]
pub struct CacheMetrics {
    name: String,
    local_hits: AtomicU64,
    negative_hits: AtomicU64,
    redis_hits: AtomicU64,
    loads: AtomicU64,
    load_errors: AtomicU64,
    collapsed: AtomicU64,
    invalidations: AtomicU64,
    redis_errors: AtomicU64,
}

/// A snapshot of [`CacheMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Answered by the in-process tier (a key known missing included).
    pub local_hits: u64,
    /// Of those, keys known missing.
    pub negative_hits: u64,
    /// Answered by Redis (and then kept locally).
    pub redis_hits: u64,
    /// Times the loader ran.
    pub loads: u64,
    pub load_errors: u64,
    /// Callers answered by another caller's load of the same key.
    pub collapsed: u64,
    pub invalidations: u64,
    /// Redis calls that failed or timed out (the cache went on without Redis).
    pub redis_errors: u64,
}

impl CacheMetrics {
    pub(crate) fn new(name: &str) -> CacheMetrics {
        CacheMetrics {
            name: name.to_owned(),
            local_hits: AtomicU64::new(0),
            negative_hits: AtomicU64::new(0),
            redis_hits: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            load_errors: AtomicU64::new(0),
            collapsed: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            redis_errors: AtomicU64::new(0),
        }
    }

    pub(crate) fn count_local_hit(&self, missing: bool) {
        self.local_hits.fetch_add(1, Ordering::Relaxed);
        if missing {
            self.negative_hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_redis_hit(&self) {
        self.redis_hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_load(&self) {
        self.loads.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_load_error(&self) {
        self.load_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_collapsed(&self) {
        self.collapsed.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_invalidation(&self) {
        self.invalidations.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> CacheStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        CacheStats {
            local_hits: read(&self.local_hits),
            negative_hits: read(&self.negative_hits),
            redis_hits: read(&self.redis_hits),
            loads: read(&self.loads),
            load_errors: read(&self.load_errors),
            collapsed: read(&self.collapsed),
            invalidations: read(&self.invalidations),
            redis_errors: read(&self.redis_errors),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct CacheLabels {
    cache: String,
}

/// `surge_cache_*_total{cache="NAME"}`, read at each scrape.
impl prometheus_client::collector::Collector for CacheMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::MetricType;
        let stats = self.stats();
        let counters = [
            ("cache_local_hits", "Reads answered by the in-process tier", stats.local_hits),
            ("cache_negative_hits", "Reads answered by a key known missing", stats.negative_hits),
            ("cache_redis_hits", "Reads answered by Redis", stats.redis_hits),
            ("cache_loads", "Times the loader ran", stats.loads),
            ("cache_load_errors", "Loads that failed", stats.load_errors),
            ("cache_collapsed", "Reads answered by another read's load of the same key", stats.collapsed),
            ("cache_invalidations", "Keys invalidated", stats.invalidations),
            ("cache_redis_errors", "Redis calls that failed or timed out", stats.redis_errors),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value)
                .encode(family.encode_family(&CacheLabels { cache: self.name.clone() })?)?;
        }
        Ok(())
    }
}
