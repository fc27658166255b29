//! Each try's outcome feeds its instance's circuit breaker (`Pool::report`): failures in a row
//! eject the instance, a refused connection takes it out of rotation at once. What fails on the
//! client's side (a broken request body) or on a connection the instance had closed while idle
//! says nothing about the instance and is not reported. A try cut short by the request's
//! timeout is the instance's failure too; one cut short because the client left is not. The
//! response body then holds the request's slot, so the instance counts it in flight until the
//! last byte has left.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::Response;
use surge_pool::{InFlight, Instance, Pool};
use tower::{Layer, Service};

use tokio::time::Instant;

use super::prepare::Outbound;
use crate::body::{GatewayBody, UpstreamBody};
use crate::error::GatewayError;

/// How many tries a retried request's answer took; absent: one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tries(pub u32);

/// What a try says about its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    Failing,
    /// Nothing listens there.
    Refused,
    /// Not the instance's doing.
    Silent,
}

/// An answer is healthy unless it is a 5xx; of the gateway's own errors, only those the
/// instance caused count.
pub fn verdict<B>(result: &Result<Response<B>, GatewayError>) -> Verdict {
    match result {
        Ok(response) if response.status().is_server_error() => Verdict::Failing,
        Ok(_) => Verdict::Healthy,
        Err(GatewayError::Connect { .. }) => Verdict::Refused,
        Err(
            GatewayError::Upstream { .. } | GatewayError::TryTimeout { .. } | GatewayError::Timeout { .. },
        ) => Verdict::Failing,
        Err(_) => Verdict::Silent,
    }
}

#[derive(Clone)]
pub struct Breaker<S> {
    inner: S,
    pool: Arc<Pool>,
}

pub struct BreakerLayer(pub Arc<Pool>);

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;
    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker { inner, pool: Arc::clone(&self.0) }
    }
}

impl<S> Service<(InFlight, Outbound)> for Breaker<S>
where
    S: Service<(Arc<Instance>, Outbound), Response = Response<UpstreamBody>, Error = GatewayError>,
{
    type Response = Response<GatewayBody>;
    type Error = GatewayError;
    type Future = Reported<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, (in_flight, request): (InFlight, Outbound)) -> Self::Future {
        let instance = Arc::clone(in_flight.instance());
        let deadline = request.deadline;
        let earlier_tries = request.tried.len();
        Reported {
            response: self.inner.call((instance, request)),
            in_flight: Some(in_flight),
            pool: Arc::clone(&self.pool),
            deadline,
            earlier_tries,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Reported<F> {
        #[pin]
        response: F,
        in_flight: Option<InFlight>,
        pool: Arc<Pool>,
        deadline: Option<Instant>,
        earlier_tries: usize,
    }

    impl<F> PinnedDrop for Reported<F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // Dropped unfinished: the request's timeout ran out on this instance, or the
            // client went away (not the instance's doing).
            if let (Some(mut in_flight), Some(deadline)) = (this.in_flight.take(), *this.deadline) {
                if Instant::now() >= deadline {
                    this.pool.report(&mut in_flight, false);
                }
            }
        }
    }
}

impl<F: Future<Output = Result<Response<UpstreamBody>, GatewayError>>> Future for Reported<F> {
    type Output = Result<Response<GatewayBody>, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.response.poll(cx));
        let Some(mut in_flight) = this.in_flight.take() else {
            return Poll::Ready(Err(GatewayError::Internal { what: "a try polled after it ended" }));
        };
        match (verdict(&result), &result) {
            (Verdict::Healthy, _) => this.pool.report(&mut in_flight, true),
            (Verdict::Failing, _) => this.pool.report(&mut in_flight, false),
            (Verdict::Refused, Err(error)) => this.pool.report_refused(&mut in_flight, &error.to_string()),
            (Verdict::Refused, Ok(_)) | (Verdict::Silent, _) => {}
        }
        let earlier_tries = *this.earlier_tries;
        Poll::Ready(result.map(|response| {
            let mut response = response.map(|body| GatewayBody::upstream(body, in_flight));
            // Only a retried request pays for the extension (the access log reads it).
            if earlier_tries > 0 {
                let tries = u32::try_from(earlier_tries + 1).unwrap_or(u32::MAX);
                response.extensions_mut().insert(Tries(tries));
            }
            response
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn answer(status: StatusCode) -> Result<Response<()>, GatewayError> {
        let mut response = Response::new(());
        *response.status_mut() = status;
        Ok(response)
    }

    #[test]
    fn only_what_the_instance_did_reaches_its_breaker() {
        let (service, instance) = ("s".to_owned(), "s-1".to_owned());
        let failed = |error| -> Result<Response<()>, GatewayError> { Err(error) };
        let cases = [
            (answer(StatusCode::OK), Verdict::Healthy),
            (answer(StatusCode::NOT_FOUND), Verdict::Healthy),
            (answer(StatusCode::SERVICE_UNAVAILABLE), Verdict::Failing),
            (
                failed(GatewayError::Connect {
                    service: service.clone(),
                    instance: instance.clone(),
                    cause: "refused".into(),
                }),
                Verdict::Refused,
            ),
            (
                failed(GatewayError::Upstream {
                    service: service.clone(),
                    instance: instance.clone(),
                    cause: "reset".into(),
                }),
                Verdict::Failing,
            ),
            (
                failed(GatewayError::TryTimeout {
                    service: service.clone(),
                    instance: instance.clone(),
                    timeout: Default::default(),
                }),
                Verdict::Failing,
            ),
            (
                failed(GatewayError::Stale { service: service.clone(), instance: instance.clone() }),
                Verdict::Silent,
            ),
            (
                failed(GatewayError::BadRequestBody { cause: "the client closed the connection".into() }),
                Verdict::Silent,
            ),
        ];
        for (result, expected) in cases {
            assert_eq!(verdict(&result), expected, "{result:?}");
        }
    }
}

#[cfg(test)]
mod drop_tests {
    use std::time::Duration;

    use super::*;
    use crate::stack::testing::{outbound, pool};

    /// A try to the first instance that never ends, dropped after `after` of a request with one
    /// second left: whether the instance was ejected for it.
    async fn dropped_after(after: Duration) -> bool {
        let pool = pool(2, "outlier = { consecutive_failures = 1 }");
        let hang = tower::service_fn(|_: (Arc<Instance>, Outbound)| {
            std::future::pending::<Result<Response<UpstreamBody>, GatewayError>>()
        });
        let mut breaker = BreakerLayer(Arc::clone(&pool)).layer(hang);
        let instance = Arc::clone(&pool.ready()[0]);
        let in_flight = instance.begin().expect("ready");
        let mut request = outbound();
        request.deadline = Some(Instant::now() + Duration::from_secs(1));
        let tried = breaker.call((in_flight, request));
        let _ = tokio::time::timeout(after, tried).await;
        instance.is_ejected()
    }

    #[tokio::test(start_paused = true)]
    async fn a_try_the_request_timeout_cut_short_counts_against_its_instance() {
        assert!(dropped_after(Duration::from_secs(1)).await, "timed out on the instance");
        assert!(
            !dropped_after(Duration::from_millis(500)).await,
            "the client left: not the instance's doing"
        );
    }
}
