//! The balancer, with readiness as the capacity signal: a request is ready once it holds a
//! slot on an instance (its `instance_concurrency`, and the service's `max_concurrency`), and
//! until then it waits in the pool's queue, first come first served, woken when a slot frees
//! or an instance becomes ready. The pick itself is `surge-balance`'s, over the pool's ready
//! snapshot; a retry prefers instances the request has not tried.

use std::sync::Arc;
use std::task::{Context, Poll};

use surge_balance::{Balancer, Load};
use surge_pool::{InFlight, Instance, InstanceState, Pool, Ticket};
use tokio_util::either::Either;
use tower::{Layer, Service};

use super::prepare::Outbound;
use crate::error::GatewayError;

pub struct Balance<S> {
    inner: S,
    pool: Arc<Pool>,
    balancer: Arc<Balancer>,
    /// The slot this request holds, from readiness to its call.
    claimed: Option<InFlight>,
    ticket: Option<Ticket>,
}

impl<S: Clone> Clone for Balance<S> {
    fn clone(&self) -> Self {
        Balance {
            inner: self.inner.clone(),
            pool: Arc::clone(&self.pool),
            balancer: Arc::clone(&self.balancer),
            claimed: None,
            ticket: None,
        }
    }
}

impl<S> Drop for Balance<S> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.pool.load().queue().leave(ticket, false);
        }
        if let Some(unused) = self.claimed.take() {
            unused.cancel();
        }
    }
}

pub struct BalanceLayer(pub Arc<Pool>);

impl<S> Layer<S> for BalanceLayer {
    type Service = Balance<S>;
    fn layer(&self, inner: S) -> Balance<S> {
        let balancer = Balancer::new(match self.0.config().balance {
            surge_config::Balance::LeastConn => surge_balance::Policy::LeastConn,
            surge_config::Balance::RoundRobin => surge_balance::Policy::RoundRobin,
            surge_config::Balance::P2cEwma => surge_balance::Policy::P2cEwma,
            surge_config::Balance::Random => surge_balance::Policy::Random,
        });
        Balance {
            inner,
            pool: Arc::clone(&self.0),
            balancer: Arc::new(balancer),
            claimed: None,
            ticket: None,
        }
    }
}

impl<S> Service<Outbound> for Balance<S>
where
    S: Service<(InFlight, Outbound), Error = GatewayError>,
{
    type Response = S::Response;
    type Error = GatewayError;
    type Future = Either<S::Future, std::future::Ready<Result<S::Response, GatewayError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        if self.claimed.is_some() {
            return Poll::Ready(Ok(()));
        }
        // First come, first served: while requests wait, a newcomer queues behind them.
        let may_take = self.ticket.is_some() || self.pool.load().queue().is_empty();
        if may_take && self.claim() {
            return Poll::Ready(Ok(()));
        }
        self.pool.load().queue().wait(&mut self.ticket, cx.waker());
        // Queued, so a slot freed from now on wakes this request; one freed just before is
        // looked for here.
        if may_take && self.claim() {
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    fn call(&mut self, request: Outbound) -> Self::Future {
        let Some(mut in_flight) = self.claimed.take() else {
            return Either::Right(std::future::ready(Err(GatewayError::Internal {
                what: "a request was sent before it had an instance",
            })));
        };
        if request.tried.contains(&in_flight.instance().id) {
            if let Some(other) = choose(&self.pool, &self.balancer, &request.tried) {
                in_flight.cancel();
                in_flight = other;
            }
        }
        Either::Left(self.inner.call((in_flight, request)))
    }
}

impl<S> Balance<S> {
    /// Takes a slot if there is one, leaving the queue with it.
    fn claim(&mut self) -> bool {
        let Some(in_flight) = choose(&self.pool, &self.balancer, &[]) else { return false };
        self.claimed = Some(in_flight);
        if let Some(ticket) = self.ticket.take() {
            self.pool.load().queue().leave(ticket, true);
        }
        true
    }
}

/// Claims a slot on the instance the balancer picks, among those not in `avoid` (when
/// `avoid` is empty, among all). The snapshot may hold instances that stopped or were ejected
/// since it was published; the balancer skips them, and a pick that loses a race with a drain
/// or a probe is simply made again.
fn choose(pool: &Pool, balancer: &Balancer, avoid: &[String]) -> Option<InFlight> {
    let config = pool.config();
    let load = pool.load();
    if config.max_concurrency.is_some_and(|limit| load.active() >= limit) {
        return None;
    }
    // The service-wide limit: a slot is claimed first and given back when over, so two
    // requests racing for the last one can both back off but never both get in.
    let within_service_limit = |in_flight: InFlight| match config.max_concurrency {
        Some(limit) if load.active() > limit => {
            in_flight.cancel();
            None
        }
        _ => Some(in_flight),
    };
    let ready = pool.ready();
    let limit = config.instance_concurrency.unwrap_or(usize::MAX);
    let weight = |i: usize| ready[i].weight;
    let usable = |instance: &Instance, in_flight: usize| in_flight < limit && !avoid.contains(&instance.id);
    let load_of = |i: usize| {
        let instance: &Instance = &ready[i];
        let in_flight = instance.in_flight();
        (instance.is_available() && usable(instance, in_flight))
            .then(|| Load { in_flight, latency: instance.latency_estimate() })
    };
    for _ in 0..=ready.len() {
        let Some(index) = balancer.pick(ready.len(), weight, load_of) else { break };
        if let Some(in_flight) = ready[index].begin() {
            return within_service_limit(in_flight);
        }
    }
    // Every ready instance is ejected: ignore the breakers rather than fail everything
    // (Envoy's panic routing); the failures still reach the outlier counts.
    if !ready.is_empty() && ready.iter().all(|i| i.is_ejected()) {
        let index = balancer.pick(ready.len(), weight, |i| {
            let instance: &Instance = &ready[i];
            let in_flight = instance.in_flight();
            (instance.state() == InstanceState::Ready && usable(instance, in_flight))
                .then(|| Load { in_flight, latency: instance.latency_estimate() })
        })?;
        return ready[index].begin_ignoring_breaker().and_then(within_service_limit);
    }
    None
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;
    use crate::stack::testing::{outbound, poll_ready, pool, Holder, Woken};

    fn balance(pool: &Arc<Pool>) -> Balance<Holder> {
        BalanceLayer(Arc::clone(pool)).layer(Holder)
    }

    /// Polls `service` ready with `woken`, then sends a request: the slot it got.
    fn take(service: &mut Balance<Holder>, request: Outbound) -> InFlight {
        let woken = Woken::new();
        assert!(matches!(poll_ready(service, &woken), Poll::Ready(Ok(()))), "ready");
        let mut future = std::pin::pin!(service.call(request));
        match future.as_mut().poll(&mut Context::from_waker(&woken.waker)) {
            Poll::Ready(Ok(in_flight)) => in_flight,
            _ => panic!("the holder answers at once"),
        }
    }

    #[test]
    fn readiness_waits_for_a_free_slot_first_come_first_served() {
        let pool = pool(1, "instance_concurrency = 1");
        let template = balance(&pool);
        let held = take(&mut template.clone(), outbound());
        let (mut second, mut third, mut late) = (template.clone(), template.clone(), template.clone());
        let (second_woken, third_woken, late_woken) = (Woken::new(), Woken::new(), Woken::new());
        assert!(poll_ready(&mut second, &second_woken).is_pending(), "the only slot is taken");
        assert!(poll_ready(&mut third, &third_woken).is_pending());

        drop(held);
        assert_eq!(
            (second_woken.count(), third_woken.count()),
            (1, 0),
            "the freed slot wakes the first in line"
        );
        assert!(poll_ready(&mut late, &late_woken).is_pending(), "a newcomer queues behind the waiting");
        let held = take(&mut second, outbound());
        assert!(poll_ready(&mut third, &third_woken).is_pending());

        drop(held);
        assert_eq!((third_woken.count(), late_woken.count()), (1, 0));
        assert!(poll_ready(&mut third, &third_woken).is_ready());
        drop(third);
        assert_eq!(late_woken.count(), 1, "a slot left unused wakes the next in line");
        assert!(poll_ready(&mut late, &late_woken).is_ready());
    }

    #[test]
    fn a_waiter_that_gives_up_after_its_wake_up_passes_it_on() {
        let pool = pool(1, "instance_concurrency = 1");
        let template = balance(&pool);
        let held = take(&mut template.clone(), outbound());
        let (mut first, mut second) = (template.clone(), template.clone());
        let (first_woken, second_woken) = (Woken::new(), Woken::new());
        assert!(poll_ready(&mut first, &first_woken).is_pending());
        assert!(poll_ready(&mut second, &second_woken).is_pending());
        drop(held);
        assert_eq!(first_woken.count(), 1);
        drop(first); // timed out, say, before it looked
        assert_eq!(second_woken.count(), 1);
        assert!(poll_ready(&mut second, &second_woken).is_ready());
    }

    #[test]
    fn the_service_limit_bounds_all_instances_together() {
        let pool = pool(3, "max_concurrency = 2");
        let template = balance(&pool);
        let held = [take(&mut template.clone(), outbound()), take(&mut template.clone(), outbound())];
        let mut third = template.clone();
        let woken = Woken::new();
        assert!(poll_ready(&mut third, &woken).is_pending(), "two in flight, a third instance idle");
        drop(held);
        assert!(poll_ready(&mut third, &woken).is_ready());
        assert_eq!(pool.load().active(), 1);
    }

    #[test]
    fn a_retry_goes_to_an_instance_it_has_not_tried() {
        let pool = pool(2, "balance = \"round_robin\"");
        let template = balance(&pool);
        for _ in 0..4 {
            let first = take(&mut template.clone(), outbound());
            let tried = first.instance().id.clone();
            drop(first);
            let mut retry = outbound();
            retry.tried.push(tried.clone());
            let second = take(&mut template.clone(), retry);
            assert_ne!(second.instance().id, tried);
        }
    }

    #[test]
    fn a_call_without_readiness_is_an_error_not_a_panic() {
        let pool = pool(1, "");
        let mut service = balance(&pool);
        let woken = Woken::new();
        let mut future = std::pin::pin!(service.call(outbound()));
        let polled = future.as_mut().poll(&mut Context::from_waker(&woken.waker));
        assert!(matches!(polled, Poll::Ready(Err(GatewayError::Internal { .. }))));
    }
}
