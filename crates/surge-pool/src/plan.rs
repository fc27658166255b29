//! Pure decisions of the supervisor: how long to wait before a restart, whether a pool is
//! crash-looping, how a pool of fixed addresses follows its resolution. Which instances a
//! scale-in stops is `surge_scale::scale_in`, shared with the simulator.

use std::time::Duration;

/// Consecutive unexpected exits after which a pool is reported as crash-looping.
pub const CRASH_LOOP_THRESHOLD: u32 = 5;

/// An instance that has stayed ready this long clears the pool's failure count.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How long to wait before replacing an instance after `failures` consecutive failures.
/// The first is replaced at once (traffic keeps flowing); then 100 ms, doubling up to 30 s,
/// so a crash loop is reported rather than spun.
pub fn restart_delay(failures: u32) -> Duration {
    match failures {
        0 | 1 => Duration::ZERO,
        n => FIRST_BACKOFF.saturating_mul(2u32.saturating_pow(n - 2)).min(MAX_BACKOFF),
    }
}

/// How a pool of fixed addresses follows a new resolution: the indices in `wanted` to add (not
/// live yet) and the indices in `live` to drain (no longer wanted).
pub fn membership_changes<T: PartialEq>(live: &[T], wanted: &[T]) -> (Vec<usize>, Vec<usize>) {
    let add = (0..wanted.len()).filter(|&i| !live.contains(&wanted[i])).collect();
    let remove = (0..live.len()).filter(|&i| !wanted.contains(&live[i])).collect();
    (add, remove)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_follows_the_resolution() {
        assert_eq!(membership_changes(&["a", "b", "c"], &["b", "d", "a"]), (vec![1], vec![2]));
        assert_eq!(membership_changes::<&str>(&[], &["a"]), (vec![0], vec![]));
        assert_eq!(membership_changes::<&str>(&["a"], &[]), (vec![], vec![0]));
        assert_eq!(membership_changes(&["a"], &["a"]), (vec![], vec![]));
    }

    #[test]
    fn backoff_starts_at_zero_and_doubles_to_a_cap() {
        let delays: Vec<_> = (0..=5).map(restart_delay).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(delays, [ms(0), ms(0), ms(100), ms(200), ms(400), ms(800)]);
        assert_eq!(restart_delay(20), MAX_BACKOFF);
        assert_eq!(restart_delay(u32::MAX), MAX_BACKOFF);
    }
}
