//! Arrivals, counted for the autoscaler when a request comes to its service: before it waits
//! for capacity, as the simulator counts them. Counted later (once a request held a slot), a
//! burst that must queue would read as no more than the pool can already serve.

use std::sync::Arc;
use std::task::{Context, Poll};

use surge_pool::Pool;
use tower::{Layer, Service};

#[derive(Clone)]
pub struct CountArrival<S> {
    inner: S,
    pool: Arc<Pool>,
}

pub struct CountArrivalLayer(pub Arc<Pool>);

impl<S> Layer<S> for CountArrivalLayer {
    type Service = CountArrival<S>;
    fn layer(&self, inner: S) -> CountArrival<S> {
        CountArrival { inner, pool: Arc::clone(&self.0) }
    }
}

impl<S, R> Service<R> for CountArrival<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> S::Future {
        self.pool.load().arrived();
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tower::ServiceExt;

    use super::*;
    use crate::stack::testing::pool;

    #[tokio::test]
    async fn a_request_is_counted_when_it_comes_not_when_it_is_served() {
        let pool = pool(1, "");
        // As below it in the stack: always ready, the wait for capacity inside the request.
        let waits_for_capacity = tower::service_fn(|_: ()| std::future::pending::<Result<(), ()>>());
        let service = CountArrivalLayer(Arc::clone(&pool)).layer(waits_for_capacity);
        let mut waiting = Box::pin(service.clone().oneshot(()));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        let mut second = Box::pin(service.oneshot(()));
        assert!(second.as_mut().poll(&mut cx).is_pending());
        assert_eq!(pool.load().take_arrivals(), 2, "both arrived, though neither is served");
        assert_eq!(pool.load().take_arrivals(), 0, "the reading resets");
    }
}
