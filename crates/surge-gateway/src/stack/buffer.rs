//! The wait buffer: a request that finds no capacity (no instance ready, or all at their
//! limits) waits for it, in a bounded buffer and for a bounded time; past either bound it is
//! answered 503 at once (load shedding). A pool that expects no instance answers at once, and
//! one that may scale from zero is told a request waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use surge_pool::{Pool, Waiting};
use tokio::time::Sleep;
use tower::{Layer, Service};

use crate::error::GatewayError;

pub struct WaitBuffer<S> {
    inner: S,
    pool: Arc<Pool>,
    /// While this request waits: its place in the count, and its deadline.
    waiting: Option<(Waiting, Pin<Box<Sleep>>)>,
}

impl<S: Clone> Clone for WaitBuffer<S> {
    fn clone(&self) -> Self {
        WaitBuffer { inner: self.inner.clone(), pool: Arc::clone(&self.pool), waiting: None }
    }
}

pub struct WaitBufferLayer(pub Arc<Pool>);

impl<S> Layer<S> for WaitBufferLayer {
    type Service = WaitBuffer<S>;
    fn layer(&self, inner: S) -> WaitBuffer<S> {
        WaitBuffer { inner, pool: Arc::clone(&self.0), waiting: None }
    }
}

impl<S, R> Service<R> for WaitBuffer<S>
where
    S: Service<R, Error = GatewayError>,
{
    type Response = S::Response;
    type Error = GatewayError;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        if let Poll::Ready(ready) = self.inner.poll_ready(cx) {
            self.waiting = None;
            return Poll::Ready(ready);
        }
        let service = || self.pool.name().to_owned();
        if self.waiting.is_none() {
            if !self.pool.expects_instances() {
                return Poll::Ready(Err(GatewayError::NoReadyInstance { service: service() }));
            }
            let buffer = self.pool.config().buffer;
            let Some(waiting) = self.pool.load().wait(buffer.requests) else {
                return Poll::Ready(Err(GatewayError::BufferFull {
                    service: service(),
                    limit: buffer.requests,
                }));
            };
            self.pool.signal_demand();
            self.waiting = Some((waiting, Box::pin(tokio::time::sleep(buffer.timeout))));
        }
        let Some((_, deadline)) = &mut self.waiting else { return Poll::Pending };
        if deadline.as_mut().poll(cx).is_ready() {
            self.waiting = None;
            let timeout = self.pool.config().buffer.timeout;
            return Poll::Ready(Err(GatewayError::NoInstanceInTime { service: service(), timeout }));
        }
        Poll::Pending
    }

    fn call(&mut self, request: R) -> Self::Future {
        self.waiting = None;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stack::balance::BalanceLayer;
    use crate::stack::testing::{outbound, poll_ready, pool, Holder, Woken};

    type Stack = WaitBuffer<crate::stack::balance::Balance<Holder>>;

    fn stack(pool: &Arc<Pool>) -> Stack {
        WaitBufferLayer(Arc::clone(pool)).layer(BalanceLayer(Arc::clone(pool)).layer(Holder))
    }

    fn error(polled: Poll<Result<(), GatewayError>>) -> Option<&'static str> {
        match polled {
            Poll::Ready(Err(error)) => Some(error.code()),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded_in_count_and_in_time() {
        let pool = pool(1, "instance_concurrency = 1\nbuffer = { requests = 1, timeout = \"100ms\" }");
        let template = stack(&pool);
        let mut first = template.clone();
        let woken = Woken::new();
        assert!(poll_ready(&mut first, &woken).is_ready());
        let _held = first.call(outbound()).await;

        let (mut waiting, mut turned_away) = (template.clone(), template.clone());
        assert!(poll_ready(&mut waiting, &woken).is_pending());
        assert_eq!(pool.load().waiting(), 1, "the autoscaler sees it wait");
        assert_eq!(error(poll_ready(&mut turned_away, &woken)), Some("buffer_full"));

        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(poll_ready(&mut waiting, &woken).is_pending());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(error(poll_ready(&mut waiting, &woken)), Some("no_instance_in_time"));
        assert_eq!(pool.load().waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_gets_a_slot_leaves_the_buffer() {
        let pool = pool(1, "instance_concurrency = 1\nbuffer = { requests = 1 }");
        let template = stack(&pool);
        let (mut first, mut second) = (template.clone(), template.clone());
        let woken = Woken::new();
        assert!(poll_ready(&mut first, &woken).is_ready());
        let held = first.call(outbound()).await;
        assert!(poll_ready(&mut second, &woken).is_pending());
        drop(held);
        assert!(poll_ready(&mut second, &woken).is_ready());
        assert_eq!(pool.load().waiting(), 0, "room for the next one");
    }

    #[tokio::test]
    async fn a_pool_that_expects_no_instance_answers_at_once() {
        let pool = pool(0, "");
        let woken = Woken::new();
        assert_eq!(error(poll_ready(&mut stack(&pool), &woken)), Some("no_ready_instance"));
    }
}
