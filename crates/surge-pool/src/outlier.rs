//! Passive outlier ejection, a circuit breaker per instance: after enough consecutive failures
//! an instance is out of rotation for an ejection time that doubles with each ejection; then a
//! single probe request decides whether it comes back.

use std::time::Duration;

/// How an instance's breaker is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Never eject more than this percentage of the pool (at least one instance may go).
    pub max_ejected_percent: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl From<&surge_config::OutlierConfig> for OutlierPolicy {
    fn from(config: &surge_config::OutlierConfig) -> Self {
        OutlierPolicy {
            consecutive_failures: config.consecutive_failures,
            base_ejection: config.ejection,
            max_ejected_percent: config.max_ejected_percent,
            ..OutlierPolicy::default()
        }
    }
}

impl OutlierPolicy {
    /// How long the `ejections`-th ejection (1 for the first) lasts.
    pub fn ejection_time(&self, ejections: u32) -> Duration {
        let factor = 2u32.saturating_pow(ejections.saturating_sub(1).min(16));
        self.base_ejection.saturating_mul(factor).min(self.max_ejection)
    }

    /// Whether one more instance may be ejected from a pool of `pool` with `ejected` out.
    pub fn may_eject(&self, ejected: usize, pool: usize) -> bool {
        let limit = (pool * self.max_ejected_percent as usize / 100).max(1);
        ejected < limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_time_doubles_up_to_the_cap() {
        let policy = OutlierPolicy::default();
        let times: Vec<u64> = (1..=4).map(|n| policy.ejection_time(n).as_secs()).collect();
        assert_eq!(times, [5, 10, 20, 40]);
        assert_eq!(policy.ejection_time(30), Duration::from_secs(300));
    }

    #[test]
    fn at_most_half_the_pool_but_always_one() {
        let policy = OutlierPolicy::default();
        assert!(policy.may_eject(0, 1));
        assert!(!policy.may_eject(1, 1));
        assert!(policy.may_eject(1, 5) && !policy.may_eject(2, 5));
        assert!(policy.may_eject(4, 10) && !policy.may_eject(5, 10));
    }
}
