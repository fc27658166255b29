//! The balancer, with readiness as the capacity signal: a request is ready once it holds a
//! slot on an instance (its `instance_concurrency`, and the service's `max_concurrency`), and
//! until then it waits in the pool's queue, first come first served, woken when a slot frees
//! or an instance becomes ready. The pick itself is `surge-balance`'s, over the pool's ready
//! snapshot; a retry prefers instances the request has not tried.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use surge_balance::{Balancer, Load};
use surge_pool::{InFlight, Instance, InstanceState, Pool, Ticket};
use tokio_util::either::Either;
use tower::{Layer, Service};

use super::retry::Tried;
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

impl<S, B> Service<Request<B>> for Balance<S>
where
    S: Service<(InFlight, Request<B>), Error = GatewayError>,
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

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(mut in_flight) = self.claimed.take() else {
            return Either::Right(std::future::ready(Err(GatewayError::Internal {
                what: "a request was sent before it had an instance",
            })));
        };
        match request.extensions().get::<Tried>() {
            None => self.pool.load().arrived(),
            Some(Tried(tried)) if tried.contains(&in_flight.instance().id) => {
                if let Some(other) = choose(&self.pool, &self.balancer, tried) {
                    in_flight.cancel();
                    in_flight = other;
                }
            }
            Some(_) => {}
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
    let usable = |instance: &Instance, in_flight: usize| {
        in_flight < limit && !avoid.contains(&instance.id)
    };
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
