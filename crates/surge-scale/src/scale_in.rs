//! Which instances a scale-in stops: one choice for the live pool supervisor and the simulator.

/// Where a live instance stands, as far as the choice is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Starting,
    /// Out of rotation after failed health checks.
    Unhealthy,
    Ready,
}

/// What the scale-in choice looks at for one live instance.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub standing: Standing,
    pub in_flight: usize,
}

/// Indices of the `count` instances to stop: first those not serving (starting, unhealthy),
/// then the least loaded, so that draining finishes soonest. `candidates` come oldest first.
pub fn choose_victims(candidates: &[Candidate], count: usize) -> Vec<usize> {
    let rank = |standing: Standing| match standing {
        Standing::Starting => 0,
        Standing::Unhealthy => 1,
        Standing::Ready => 2,
    };
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // Among equals, stop the newest (it has warmed up least). The sort is stable, so reverse
    // before sorting.
    order.reverse();
    order.sort_by_key(|&i| (rank(candidates[i].standing), candidates[i].in_flight));
    order.truncate(count);
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn victims_are_idle_or_not_serving_first() {
        use Standing::*;
        let candidates = [
            Candidate { standing: Ready, in_flight: 3 },
            Candidate { standing: Ready, in_flight: 0 },
            Candidate { standing: Starting, in_flight: 0 },
            Candidate { standing: Ready, in_flight: 1 },
            Candidate { standing: Unhealthy, in_flight: 5 },
        ];
        assert_eq!(choose_victims(&candidates, 3), [2, 4, 1]);
        assert_eq!(choose_victims(&candidates, 0), Vec::<usize>::new());
        assert_eq!(choose_victims(&candidates, 9).len(), 5);
    }

    #[test]
    fn among_equals_the_newest_goes_first() {
        let idle = Candidate { standing: Standing::Ready, in_flight: 0 };
        assert_eq!(choose_victims(&[idle, idle, idle], 2), [2, 1]);
    }
}
