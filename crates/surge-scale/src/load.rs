//! What the data path tells the autoscaler: requests that arrived, are in flight or wait for an
//! instance (and the queue they wait in), and how long finished requests took. Lock-free:
//! recorded on every request, read at each decision. The simulator records into the same type.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::Duration;

use surge_metrics::LatencyHistogram;

#[derive(Debug)]
pub struct PoolLoad {
    waiting: AtomicUsize,
    /// Requests in flight on any instance of the pool.
    active: AtomicUsize,
    latency: LatencyHistogram,
    /// Requests waiting for a slot, first come first served.
    queue: WaitQueue,
    arrivals: AtomicU64,
    /// Time finished requests spent at instances, in microseconds, and how many there were.
    service_micros: AtomicU64,
    services: AtomicU64,
    /// Work waiting for the pool outside it: a worker pool's queue of ready messages.
    backlog: Mutex<Option<Backlog>>,
}

/// Counts work waiting for the pool elsewhere, when the autoscaler samples.
#[derive(Clone)]
struct Backlog(Arc<dyn Fn() -> usize + Send + Sync>);

impl std::fmt::Debug for Backlog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backlog")
    }
}

impl Default for PoolLoad {
    fn default() -> Self {
        PoolLoad {
            waiting: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            latency: LatencyHistogram::default(),
            queue: WaitQueue::default(),
            arrivals: AtomicU64::new(0),
            service_micros: AtomicU64::new(0),
            services: AtomicU64::new(0),
            backlog: Mutex::new(None),
        }
    }
}

/// Requests finished in a period, and the mean time they spent at an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub count: u64,
    pub mean_service: Option<Duration>,
}

/// One request waiting in the gateway's buffer, for as long as it lives.
#[derive(Debug)]
pub struct Waiting(Arc<PoolLoad>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PoolLoad {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn started(&self) {
        self.active.fetch_add(1, Ordering::SeqCst);
    }

    pub fn ended(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Has the autoscaler count `backlog` as waiting work too (a queue's ready messages).
    pub fn set_backlog(&self, backlog: impl Fn() -> usize + Send + Sync + 'static) {
        *self.backlog.lock().unwrap_or_else(|p| p.into_inner()) = Some(Backlog(Arc::new(backlog)));
    }

    /// Work waiting for the pool outside it, now.
    pub fn backlog(&self) -> usize {
        let backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner()).clone();
        backlog.map_or(0, |Backlog(count)| count())
    }

    /// Counts a waiting request, unless `limit` already wait.
    pub fn wait(self: &Arc<Self>, limit: usize) -> Option<Waiting> {
        let before = self.waiting.fetch_add(1, Ordering::Relaxed);
        if before >= limit {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Waiting(Arc::clone(self)))
    }

    /// A request for the pool arrived at the gateway.
    pub fn arrived(&self) {
        self.arrivals.fetch_add(1, Ordering::Relaxed);
    }

    /// Arrivals since the last call, which resets the count: the autoscaler's reading.
    pub fn take_arrivals(&self) -> u64 {
        self.arrivals.swap(0, Ordering::Relaxed)
    }

    /// The requests finished since the last call, which resets the count.
    pub fn take_finished(&self) -> Finished {
        let count = self.services.swap(0, Ordering::Relaxed);
        let micros = self.service_micros.swap(0, Ordering::Relaxed);
        Finished { count, mean_service: (count > 0).then(|| Duration::from_micros(micros / count)) }
    }

    /// A request finished: record its latency.
    pub fn finished(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.service_micros.fetch_add(micros, Ordering::Relaxed);
        self.services.fetch_add(1, Ordering::Relaxed);
        self.latency.record(latency);
    }

    /// The requests waiting for a slot.
    pub fn queue(&self) -> &WaitQueue {
        &self.queue
    }

    /// The `quantile` of the latencies recorded since the last call, which clears them.
    pub fn take_quantile(&self, quantile: f64) -> Option<Duration> {
        self.latency.take().quantile(quantile)
    }
}

/// Requests waiting for capacity (a free slot on a ready instance), in arrival order. A freed
/// slot wakes the first; new instances wake all. A woken request that finds no slot after all
/// goes back to its place in line (ahead of those that came after it), and one that leaves after it was woken passes the wake-up on, so no
/// wake-up is lost to a request that could not use it.
#[derive(Debug, Default)]
pub struct WaitQueue {
    /// How many are queued, read without the lock on every freed slot.
    len: AtomicUsize,
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    queue: VecDeque<(u64, Waker)>,
    next_ticket: u64,
}

/// A request's place in the [`WaitQueue`]: queued, or woken and yet to look for a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u64);

impl WaitQueue {
    /// Whether requests are queued, so that a newcomer must queue behind them.
    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::SeqCst) == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a request that found no slot, or updates its waker if it is queued already. A
    /// request that was woken and still found no slot goes back to its place in line.
    pub fn wait(&self, ticket: &mut Option<Ticket>, waker: &Waker) {
        let mut waiters = self.lock();
        match *ticket {
            Some(Ticket(id)) => match waiters.queue.iter_mut().find(|(queued, _)| *queued == id) {
                Some((_, queued)) => queued.clone_from(waker),
                None => {
                    // Back to its place: the queue is in ticket order, which is arrival order.
                    let place = waiters.queue.partition_point(|(queued, _)| *queued < id);
                    waiters.queue.insert(place, (id, waker.clone()));
                }
            },
            None => {
                let id = waiters.next_ticket;
                waiters.next_ticket += 1;
                waiters.queue.push_back((id, waker.clone()));
                *ticket = Some(Ticket(id));
            }
        }
        self.len.store(waiters.queue.len(), Ordering::SeqCst);
    }

    /// The request got a slot, or gave up: it leaves the queue. One that gave up after it was
    /// woken wakes the next, since the slot it was woken for is still free.
    pub fn leave(&self, ticket: Ticket, got_slot: bool) {
        let mut waiters = self.lock();
        let before = waiters.queue.len();
        waiters.queue.retain(|(queued, _)| *queued != ticket.0);
        let was_woken = waiters.queue.len() == before;
        if was_woken && !got_slot {
            if let Some((_, next)) = waiters.queue.pop_front() {
                next.wake();
            }
        }
        self.len.store(waiters.queue.len(), Ordering::SeqCst);
    }

    /// A slot was freed: the first request in line looks for it.
    pub fn wake_one(&self) {
        if self.is_empty() {
            return;
        }
        let mut waiters = self.lock();
        if let Some((_, waker)) = waiters.queue.pop_front() {
            waker.wake();
        }
        self.len.store(waiters.queue.len(), Ordering::SeqCst);
    }

    /// Capacity came that may serve many (an instance became ready): everyone looks.
    pub fn wake_all(&self) {
        if self.is_empty() {
            return;
        }
        let mut waiters = self.lock();
        for (_, waker) in waiters.queue.drain(..) {
            waker.wake();
        }
        self.len.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A waker that counts its wake-ups.
    struct Counting(AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Counting>, Waker) {
        let counter = Arc::new(Counting(AtomicUsize::new(0)));
        (Arc::clone(&counter), Waker::from(counter))
    }

    fn wakes(counter: &Counting) -> usize {
        counter.0.load(Ordering::SeqCst)
    }

    #[test]
    fn freed_slots_wake_waiters_in_arrival_order() {
        let queue = WaitQueue::default();
        let (first, second, third) = (counting(), counting(), counting());
        let mut tickets = [None, None, None];
        for (ticket, (_, waker)) in tickets.iter_mut().zip([&first, &second, &third]) {
            queue.wait(ticket, waker);
        }
        assert!(!queue.is_empty());
        queue.wake_one();
        assert_eq!([wakes(&first.0), wakes(&second.0), wakes(&third.0)], [1, 0, 0]);
        // Woken but beaten to the slot: back to the front, ahead of the others.
        queue.wait(&mut tickets[0], &first.1);
        queue.wake_one();
        assert_eq!([wakes(&first.0), wakes(&second.0), wakes(&third.0)], [2, 0, 0]);
        queue.leave(tickets[0].expect("queued"), true);
        queue.wake_one();
        assert_eq!([wakes(&first.0), wakes(&second.0), wakes(&third.0)], [2, 1, 0]);
    }

    #[test]
    fn requests_woken_together_go_back_to_their_places() {
        let queue = WaitQueue::default();
        let waiters = [counting(), counting(), counting(), counting()];
        let mut tickets = [None; 4];
        for (ticket, (_, waker)) in tickets.iter_mut().zip(&waiters) {
            queue.wait(ticket, waker);
        }
        // An instance came up: all four look; the first takes the only slot, and the other
        // three come back in whatever order they were polled, the last first.
        queue.wake_all();
        queue.leave(tickets[0].expect("queued"), true);
        for i in [3, 1, 2] {
            queue.wait(&mut tickets[i], &waiters[i].1);
        }
        queue.wake_one();
        let wakes_now: Vec<usize> = waiters.iter().map(|(counter, _)| wakes(counter)).collect();
        assert_eq!(wakes_now, [1, 2, 1, 1], "the second in line, not the last to come back, goes next");
    }

    #[test]
    fn a_woken_waiter_that_leaves_passes_the_wake_up_on() {
        let queue = WaitQueue::default();
        let (first, second) = (counting(), counting());
        let (mut one, mut two) = (None, None);
        queue.wait(&mut one, &first.1);
        queue.wait(&mut two, &second.1);
        queue.wake_one();
        queue.leave(one.expect("queued"), false);
        assert_eq!((wakes(&first.0), wakes(&second.0)), (1, 1), "the slot goes to the next in line");
        // One that leaves while still queued wakes nobody.
        let (third, mut three) = (counting(), None);
        queue.wait(&mut three, &third.1);
        queue.leave(three.expect("queued"), false);
        assert_eq!((wakes(&second.0), wakes(&third.0)), (1, 0));
        queue.wake_all();
        assert!(queue.is_empty());
    }

    #[test]
    fn the_buffer_is_bounded() {
        let load = Arc::new(PoolLoad::default());
        let first = load.wait(2).expect("room");
        let second = load.wait(2).expect("room");
        assert!(load.wait(2).is_none());
        assert_eq!(load.waiting(), 2);
        drop((first, second));
        assert_eq!(load.waiting(), 0);
    }
}
