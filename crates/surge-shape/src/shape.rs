//! Load shapes and the arrival schedule they make: pure functions of time (and a seed), so the
//! same shape drives a live run and a simulation identically.

use std::time::Duration;

/// How the request rate varies over a run. Rates are requests per second.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Constant {
        rate: f64,
    },
    /// Each step holds its rate for its duration, in order.
    Steps(Vec<(f64, Duration)>),
    /// From one rate to another, linearly.
    Ramp {
        from: f64,
        to: f64,
        over: Duration,
    },
    /// `mean + amplitude·sin(2πt/period)`, each second scaled by up to ±`noise` (a fraction).
    Sine {
        mean: f64,
        amplitude: f64,
        period: Duration,
        noise: f64,
        seed: u64,
    },
    /// `base`, and `peak` from `at` for `length`.
    Spike {
        base: f64,
        peak: f64,
        at: Duration,
        length: Duration,
    },
    /// `rate` for `on`, then nothing for `off`, repeating.
    OnOff {
        rate: f64,
        on: Duration,
        off: Duration,
    },
    /// Recorded arrival times, relative to the first.
    Trace(Vec<Duration>),
}

impl Shape {
    /// The rate at `t` seconds into the run (a trace has no rate function; it yields 0).
    pub fn rate_at(&self, t: f64) -> f64 {
        let rate = match self {
            Shape::Constant { rate } => *rate,
            Shape::Steps(steps) => {
                let mut start = 0.0;
                let mut current = 0.0;
                for (rate, length) in steps {
                    current = *rate;
                    start += length.as_secs_f64();
                    if t < start {
                        break;
                    }
                }
                current
            }
            Shape::Ramp { from, to, over } => {
                let progress = (t / over.as_secs_f64().max(f64::EPSILON)).clamp(0.0, 1.0);
                from + (to - from) * progress
            }
            Shape::Sine { mean, amplitude, period, noise, seed } => {
                let phase = std::f64::consts::TAU * t / period.as_secs_f64().max(f64::EPSILON);
                let second = t.max(0.0) as u64;
                let jitter = fastrand::Rng::with_seed(seed.wrapping_add(second)).f64() * 2.0 - 1.0;
                (mean + amplitude * phase.sin()) * (1.0 + noise * jitter)
            }
            Shape::Spike { base, peak, at, length } => {
                let at = at.as_secs_f64();
                if t >= at && t < at + length.as_secs_f64() {
                    *peak
                } else {
                    *base
                }
            }
            Shape::OnOff { rate, on, off } => {
                let cycle = (on.as_secs_f64() + off.as_secs_f64()).max(f64::EPSILON);
                if t % cycle < on.as_secs_f64() {
                    *rate
                } else {
                    0.0
                }
            }
            Shape::Trace(_) => 0.0,
        };
        rate.max(0.0)
    }

    /// How long the shape lasts by itself, if it has an end.
    pub fn natural_duration(&self) -> Option<Duration> {
        match self {
            Shape::Steps(steps) => Some(steps.iter().map(|(_, length)| *length).sum()),
            Shape::Ramp { over, .. } => Some(*over),
            Shape::Trace(arrivals) => arrivals.last().map(|last| *last + Duration::from_millis(1)),
            _ => None,
        }
    }

    /// The intended send times of a run of `length`.
    pub fn schedule(&self, length: Duration) -> Schedule<'_> {
        Schedule {
            shape: self,
            end: length.as_secs_f64(),
            step_start: 0.0,
            expected: 0.0,
            emitted: 0,
            index: 0,
        }
    }
}

/// Arrival times: arrival `k` comes when the expected count, the integral of the rate, reaches
/// `k`. At a constant rate that spaces arrivals evenly (as wrk2 does); at a changing rate it
/// follows the shape exactly, however low or high the rate.
pub struct Schedule<'a> {
    shape: &'a Shape,
    end: f64,
    /// Start of the current integration step, and the expected count there.
    step_start: f64,
    expected: f64,
    emitted: u64,
    /// Next arrival of a trace.
    index: usize,
}

/// Integration step: rates change at most this often.
const STEP: f64 = 0.001;
/// Absorbs floating-point drift, so that 300/s for 5 s is 1500 arrivals, not 1501.
const SLACK: f64 = 1e-6;

impl Iterator for Schedule<'_> {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if let Shape::Trace(arrivals) = self.shape {
            let at = *arrivals.get(self.index)?;
            self.index += 1;
            return (at.as_secs_f64() < self.end).then_some(at);
        }
        loop {
            if self.step_start >= self.end - SLACK {
                return None;
            }
            let step = STEP.min(self.end - self.step_start);
            let rate = self.shape.rate_at(self.step_start + step / 2.0);
            let expected_at_end = self.expected + rate * step;
            let next = self.emitted as f64;
            if rate > 0.0 && next < expected_at_end - SLACK {
                self.emitted += 1;
                let at = self.step_start + (next - self.expected).max(0.0) / rate;
                return Some(Duration::from_secs_f64(at));
            }
            self.step_start += step;
            self.expected = expected_at_end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    fn per_second(shape: &Shape, length: f64) -> Vec<usize> {
        let mut counts = vec![0; length.ceil() as usize];
        for at in shape.schedule(secs(length)) {
            counts[at.as_secs() as usize] += 1;
        }
        counts
    }

    #[test]
    fn constant_rate_is_exact() {
        let shape = Shape::Constant { rate: 300.0 };
        assert_eq!(shape.schedule(secs(5.0)).count(), 1500);
        assert_eq!(per_second(&shape, 5.0), [300; 5]);
    }

    #[test]
    fn steps_change_the_rate_in_order() {
        let shape = Shape::Steps(vec![(100.0, secs(2.0)), (1000.0, secs(2.0))]);
        assert_eq!(shape.natural_duration(), Some(secs(4.0)));
        let counts = per_second(&shape, 4.0);
        assert_eq!(&counts[..2], [100, 100]);
        assert!((999..=1001).contains(&counts[2]) && (999..=1001).contains(&counts[3]), "{counts:?}");
    }

    #[test]
    fn ramp_rises_linearly() {
        let shape = Shape::Ramp { from: 0.0, to: 200.0, over: secs(4.0) };
        let counts = per_second(&shape, 4.0);
        // Average rates 25, 75, 125, 175.
        for (count, expected) in counts.iter().zip([25, 75, 125, 175]) {
            assert!(count.abs_diff(expected) <= 3, "{counts:?}");
        }
    }

    #[test]
    fn spike_and_on_off() {
        let spike = Shape::Spike { base: 10.0, peak: 100.0, at: secs(1.0), length: secs(1.0) };
        assert_eq!(per_second(&spike, 3.0), [10, 100, 10]);
        let on_off = Shape::OnOff { rate: 50.0, on: secs(1.0), off: secs(1.0) };
        assert_eq!(per_second(&on_off, 4.0), [50, 0, 50, 0]);
    }

    #[test]
    fn sine_is_deterministic_for_a_seed_and_stays_near_its_mean() {
        let shape = |seed| Shape::Sine { mean: 100.0, amplitude: 50.0, period: secs(10.0), noise: 0.2, seed };
        let first: Vec<_> = shape(7).schedule(secs(10.0)).collect();
        assert_eq!(first, shape(7).schedule(secs(10.0)).collect::<Vec<_>>());
        assert_ne!(first, shape(8).schedule(secs(10.0)).collect::<Vec<_>>());
        let total = first.len() as f64;
        assert!((800.0..1200.0).contains(&total), "{total}");
        let counts = per_second(&shape(7), 10.0);
        assert!(counts[2] > counts[7], "peak near 2.5 s, trough near 7.5 s: {counts:?}");
    }

    #[test]
    fn trace_replays_its_arrivals_within_the_length() {
        let shape = Shape::Trace(vec![secs(0.0), secs(0.5), secs(0.5), secs(2.0)]);
        assert_eq!(shape.schedule(secs(10.0)).count(), 4);
        assert_eq!(shape.schedule(secs(1.0)).count(), 3);
    }
}
