//! Turns a [`GatewayError`] into its response: the one place errors meet statuses, and where
//! the ones an operator should see are logged. An error the inner stack reports through
//! readiness (a full buffer) is answered for the request it was polled for.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::Response;
use tower::{Layer, Service};

use crate::body::GatewayBody;
use crate::error::GatewayError;

pub struct Respond<S> {
    inner: S,
    /// What readiness failed with, for the next call.
    refused: Option<GatewayError>,
}

impl<S: Clone> Clone for Respond<S> {
    fn clone(&self) -> Self {
        Respond { inner: self.inner.clone(), refused: None }
    }
}

pub struct RespondLayer;

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Respond<S> {
        Respond { inner, refused: None }
    }
}

impl<S, R> Service<R> for Respond<S>
where
    S: Service<R, Response = Response<GatewayBody>, Error = GatewayError>,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Responded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.refused.is_none() {
            if let Err(error) = ready!(self.inner.poll_ready(cx)) {
                self.refused = Some(error);
            }
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Self::Future {
        match self.refused.take() {
            Some(error) => Responded::Refused { error: Some(error) },
            None => Responded::Called { response: self.inner.call(request) },
        }
    }
}

pin_project_lite::pin_project! {
    #[project = RespondedProj]
    pub enum Responded<F> {
        Called { #[pin] response: F },
        Refused { error: Option<GatewayError> },
    }
}

impl<F: Future<Output = Result<Response<GatewayBody>, GatewayError>>> Future for Responded<F> {
    type Output = Result<Response<GatewayBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let error = match self.project() {
            RespondedProj::Called { response } => match ready!(response.poll(cx)) {
                Ok(response) => return Poll::Ready(Ok(response)),
                Err(error) => error,
            },
            RespondedProj::Refused { error } => match error.take() {
                Some(error) => error,
                None => GatewayError::Internal { what: "a response polled after it was given" },
            },
        };
        // A failing or slow instance is news for the operator; a missing route, a full
        // buffer or a bad request is the client's or the configuration's, and shows in metrics.
        if error.is_instance_failure() {
            tracing::warn!("{error}");
        } else {
            tracing::debug!("{error}");
        }
        Poll::Ready(Ok(error.into_response()))
    }
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    /// Never ready: its readiness fails with a full buffer.
    #[derive(Clone)]
    struct Full;

    impl Service<()> for Full {
        type Response = Response<GatewayBody>;
        type Error = GatewayError;
        type Future = std::future::Ready<Result<Response<GatewayBody>, GatewayError>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
            Poll::Ready(Err(GatewayError::BufferFull { service: "web".into(), limit: 3 }))
        }

        fn call(&mut self, (): ()) -> Self::Future {
            unreachable!("never ready")
        }
    }

    #[tokio::test]
    async fn errors_become_their_answers_including_those_of_readiness() {
        let failing = tower::service_fn(|(): ()| async {
            Err::<Response<GatewayBody>, _>(GatewayError::BadRequestBody { cause: "aborted".into() })
        });
        let Ok(answer) = RespondLayer.layer(failing).oneshot(()).await;
        assert_eq!(answer.status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(answer.headers()[crate::problem::ERROR_HEADER], "bad_request_body");

        let Ok(answer) = RespondLayer.layer(Full).oneshot(()).await;
        assert_eq!(answer.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers()[crate::problem::ERROR_HEADER], "buffer_full");
        assert_eq!(answer.headers()[http::header::RETRY_AFTER], "1");
    }
}
