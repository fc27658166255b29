//! Each try's outcome feeds its instance's circuit breaker (`Pool::report`): failures in a row
//! eject the instance, a refused connection takes it out of rotation at once. What fails on the
//! client's side (a broken request body) or on a connection the instance had closed while idle
//! says nothing about the instance and is not reported. The response body then holds the
//! request's slot, so the instance counts it in flight until the last byte has left.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use surge_pool::{InFlight, Instance, Pool};
use tower::{Layer, Service};

use crate::body::{GatewayBody, UpstreamBody};
use crate::error::GatewayError;

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

impl<S, B> Service<(InFlight, Request<B>)> for Breaker<S>
where
    S: Service<(Arc<Instance>, Request<B>), Response = Response<UpstreamBody>, Error = GatewayError>,
{
    type Response = Response<GatewayBody>;
    type Error = GatewayError;
    type Future = Reported<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, (in_flight, request): (InFlight, Request<B>)) -> Self::Future {
        let instance = Arc::clone(in_flight.instance());
        Reported {
            response: self.inner.call((instance, request)),
            in_flight: Some(in_flight),
            pool: Arc::clone(&self.pool),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Reported<F> {
        #[pin]
        response: F,
        in_flight: Option<InFlight>,
        pool: Arc<Pool>,
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
        Poll::Ready(result.map(|response| response.map(|body| GatewayBody::upstream(body, in_flight))))
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
