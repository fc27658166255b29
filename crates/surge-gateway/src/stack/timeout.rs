//! The request timeout: the response head must arrive within `timeouts.request`, else 504,
//! counted from the first time the request asks for capacity, so waiting for an instance
//! counts too. The deadline also goes into the request's extensions, so that each try can be
//! given no more time than the request has left.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::Request;
use surge_pool::Instance;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::endpoint::Try;
use super::prepare::{Deadline, Outbound};
use crate::error::GatewayError;

pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
    service: Arc<str>,
    /// This request's deadline, from its first readiness poll.
    deadline: Option<Instant>,
    /// Made only when readiness has to wait.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S: Clone> Clone for RequestTimeout<S> {
    fn clone(&self) -> Self {
        RequestTimeout {
            inner: self.inner.clone(),
            timeout: self.timeout,
            service: Arc::clone(&self.service),
            deadline: None,
            waiting: None,
        }
    }
}

impl<S> RequestTimeout<S> {
    fn elapsed(&self) -> GatewayError {
        GatewayError::Timeout { service: self.service.to_string(), timeout: self.timeout }
    }
}

pub struct RequestTimeoutLayer {
    pub timeout: Duration,
    pub service: Arc<str>,
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;
    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout {
            inner,
            timeout: self.timeout,
            service: Arc::clone(&self.service),
            deadline: None,
            waiting: None,
        }
    }
}

impl<S, B> Service<Request<B>> for RequestTimeout<S>
where
    S: Service<Request<B>, Error = GatewayError>,
{
    type Response = S::Response;
    type Error = GatewayError;
    type Future = TimedOut<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        let timeout = self.timeout;
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + timeout);
        if let Poll::Ready(ready) = self.inner.poll_ready(cx) {
            return Poll::Ready(ready);
        }
        let waiting = self.waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        ready!(waiting.as_mut().poll(cx));
        Poll::Ready(Err(self.elapsed()))
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        self.waiting = None;
        let deadline = self.deadline.take().unwrap_or_else(|| Instant::now() + self.timeout);
        request.extensions_mut().insert(Deadline(deadline));
        TimedOut {
            response: tokio::time::timeout_at(deadline, self.inner.call(request)),
            elapsed: Elapsed::Request { service: Arc::clone(&self.service), timeout: self.timeout },
        }
    }
}

/// Bounds each try by `timeouts.try` when that is shorter than what the request has left,
/// and tells the instance how long it has in `x-surge-deadline-ms`. A try that runs out fails
/// as the instance's failure (so it feeds its breaker and may be retried elsewhere). Without a
/// shorter `per_try` the request's timeout is the try's, and no second timer is set.
#[derive(Clone)]
pub struct TryTimeout<S> {
    inner: S,
    per_try: Option<Duration>,
    service: Arc<str>,
}

pub struct TryTimeoutLayer {
    pub per_try: Option<Duration>,
    pub service: Arc<str>,
}

impl<S> Layer<S> for TryTimeoutLayer {
    type Service = TryTimeout<S>;
    fn layer(&self, inner: S) -> TryTimeout<S> {
        TryTimeout { inner, per_try: self.per_try, service: Arc::clone(&self.service) }
    }
}

impl<S> Service<(Arc<Instance>, Outbound)> for TryTimeout<S>
where
    S: Service<Try, Error = GatewayError>,
{
    type Response = S::Response;
    type Error = GatewayError;
    type Future = Tried<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, (instance, outbound): (Arc<Instance>, Outbound)) -> Self::Future {
        let left = outbound.deadline.map(|deadline| deadline.saturating_duration_since(Instant::now()));
        match self.per_try {
            Some(per_try) if left.is_none_or(|left| per_try < left) => {
                let elapsed = Elapsed::Try {
                    service: Arc::clone(&self.service),
                    instance: Arc::clone(&instance),
                    timeout: per_try,
                };
                let until = Instant::now().checked_add(per_try).unwrap_or_else(far_future);
                let response = self.inner.call(Try { instance, outbound, deadline: Some(per_try) });
                Tried::Timed {
                    response: TimedOut { response: tokio::time::timeout_at(until, response), elapsed },
                }
            }
            // The request's own timeout, above, ends this try with it; no second timer.
            _ => Tried::Untimed { response: self.inner.call(Try { instance, outbound, deadline: left }) },
        }
    }
}

/// About thirty years from now: tokio's own stand-in for "never".
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

/// What ran out, to say so.
enum Elapsed {
    Request { service: Arc<str>, timeout: Duration },
    Try { service: Arc<str>, instance: Arc<Instance>, timeout: Duration },
}

impl Elapsed {
    fn error(&self) -> GatewayError {
        match self {
            Elapsed::Request { service, timeout } => {
                GatewayError::Timeout { service: service.to_string(), timeout: *timeout }
            }
            Elapsed::Try { service, instance, timeout } => GatewayError::TryTimeout {
                service: service.to_string(),
                instance: instance.id.clone(),
                timeout: *timeout,
            },
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TimedOut<F> {
        #[pin]
        response: tokio::time::Timeout<F>,
        elapsed: Elapsed,
    }
}

pin_project_lite::pin_project! {
    #[project = TriedProj]
    pub enum Tried<F> {
        Timed { #[pin] response: TimedOut<F> },
        Untimed { #[pin] response: F },
    }
}

impl<F: Future<Output = Result<T, GatewayError>>, T> Future for Tried<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            TriedProj::Timed { response } => response.poll(cx),
            TriedProj::Untimed { response } => response.poll(cx),
        }
    }
}

impl<F: Future<Output = Result<T, GatewayError>>, T> Future for TimedOut<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        Poll::Ready(ready!(this.response.poll(cx)).unwrap_or_else(|_| Err(this.elapsed.error())))
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;
    use crate::stack::testing::{outbound, pool};

    /// Never answers; tells what the request carried.
    async fn hang<B>(
        request: Request<B>,
        seen: Arc<std::sync::Mutex<Option<Request<B>>>>,
    ) -> Result<(), GatewayError> {
        if let Ok(mut seen) = seen.lock() {
            *seen = Some(request);
        }
        std::future::pending().await
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_runs_out_of_time_gets_a_504_naming_the_setting() {
        let seen = Arc::new(std::sync::Mutex::new(None));
        let inner = {
            let seen = Arc::clone(&seen);
            tower::service_fn(move |request: Request<()>| hang(request, Arc::clone(&seen)))
        };
        let layer = RequestTimeoutLayer { timeout: Duration::from_secs(2), service: "web".into() };
        let start = Instant::now();
        let mut answer = std::pin::pin!(layer.layer(inner).oneshot(Request::new(())));
        let early = tokio::time::timeout(Duration::from_millis(1999), answer.as_mut()).await;
        assert!(early.is_err(), "still waiting just before the timeout");
        let error = answer.await.err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("services.web.timeouts.request"), "{message}");
        let deadline =
            seen.lock().ok().and_then(|seen| seen.as_ref()?.extensions().get::<Deadline>().copied());
        assert_eq!(deadline.map(|d| d.0), Some(start + Duration::from_secs(2)), "the tries are told");
    }

    /// Never ready.
    #[derive(Clone)]
    struct Busy;

    impl Service<Request<()>> for Busy {
        type Response = ();
        type Error = GatewayError;
        type Future = std::future::Ready<Result<(), GatewayError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
            Poll::Pending
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            std::future::ready(Ok(()))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_readiness_counts_against_the_request() {
        let layer = RequestTimeoutLayer { timeout: Duration::from_secs(2), service: "web".into() };
        let error = layer.layer(Busy).oneshot(Request::new(())).await.err();
        assert!(matches!(error, Some(GatewayError::Timeout { .. })), "{error:?}");
    }

    /// A try of a request with `left` to go and `per_try` configured, against an instance that
    /// never answers, watched for twice `left`: its error if it ended, and the deadline it was
    /// given for the instance.
    async fn try_with(left: Duration, per_try: Duration) -> (Option<GatewayError>, Option<Duration>) {
        let pool = pool(1, "");
        let instance = Arc::clone(&pool.ready()[0]);
        let seen = Arc::new(std::sync::Mutex::new(None));
        let inner = {
            let seen = Arc::clone(&seen);
            tower::service_fn(move |attempt: Try| {
                if let Ok(mut seen) = seen.lock() {
                    *seen = Some(attempt.deadline);
                }
                std::future::pending::<Result<(), GatewayError>>()
            })
        };
        let layer = TryTimeoutLayer { per_try: Some(per_try), service: "web".into() };
        let mut request = outbound();
        request.deadline = Some(Instant::now() + left);
        let tried = layer.layer(inner).oneshot((instance, request));
        let error =
            tokio::time::timeout(left * 2, tried).await.ok().map(|result| result.expect_err("never answers"));
        let told = seen.lock().ok().and_then(|seen| *seen).flatten();
        (error, told)
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_gets_its_own_timeout_only_when_it_is_shorter_than_what_is_left() {
        let (error, header) = try_with(Duration::from_secs(1), Duration::from_millis(100)).await;
        assert!(
            matches!(&error, Some(GatewayError::TryTimeout { instance, .. }) if instance == "web-1"),
            "{error:?}"
        );
        assert!(error.is_some_and(|e| e.to_string().contains("services.web.timeouts.try")));
        assert_eq!(header, Some(Duration::from_millis(100)));

        // Less left than per_try: the request's own timeout ends the try, not a second timer.
        let (error, header) = try_with(Duration::from_millis(50), Duration::from_millis(100)).await;
        assert!(error.is_none(), "{error:?}");
        assert_eq!(header, Some(Duration::from_millis(50)));
    }
}
