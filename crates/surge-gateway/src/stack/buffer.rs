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
