//! Small request bodies are read whole before the request goes on, so that a failed try can
//! be sent again elsewhere, and an instance never waits on a slow client for them; larger ones,
//! and those of unknown length, stream through and are sent once.
//!
//! This is also where readiness stops: below it, waiting for capacity happens inside the
//! request (so the request timeout above bounds it), once its body is whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use http_body_util::BodyExt;
use tower::util::Oneshot;
use tower::{Layer, Service, ServiceExt};

use crate::body::Payload;
use crate::error::{root_cause, GatewayError};
use crate::server::ClientBody;
use crate::BoxFuture;

#[derive(Clone)]
pub struct PrepareBody<S> {
    inner: S,
}

pub struct PrepareBodyLayer;

impl<S> Layer<S> for PrepareBodyLayer {
    type Service = PrepareBody<S>;
    fn layer(&self, inner: S) -> PrepareBody<S> {
        PrepareBody { inner }
    }
}

type Prepared = Request<Payload<ClientBody>>;

impl<S, R> Service<Request<ClientBody>> for PrepareBody<S>
where
    S: Service<Prepared, Response = Response<R>, Error = GatewayError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<R>;
    type Error = GatewayError;
    type Future = Preparing<S>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ClientBody>) -> Self::Future {
        let inner = self.inner.clone();
        let (parts, body) = request.into_parts();
        if !Payload::worth_keeping(&body) {
            let request = Request::from_parts(parts, Payload::passed_on(body));
            return Preparing::Sent { response: inner.oneshot(request) };
        }
        Preparing::Reading {
            response: Box::pin(async move {
                let bytes = body
                    .collect()
                    .await
                    .map_err(|err| GatewayError::BadRequestBody { cause: root_cause(&*err) })?
                    .to_bytes();
                let request = Request::from_parts(parts, Payload::Kept { bytes: Some(bytes) });
                inner.oneshot(request).await
            }),
        }
    }
}

pin_project_lite::pin_project! {
    #[project = PreparingProj]
    pub enum Preparing<S: Service<Prepared>> {
        Sent { #[pin] response: Oneshot<S, Prepared> },
        Reading { response: BoxFuture<Result<S::Response, GatewayError>> },
    }
}

impl<S> Future for Preparing<S>
where
    S: Service<Prepared, Error = GatewayError>,
{
    type Output = Result<S::Response, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(match self.project() {
            PreparingProj::Sent { response } => ready!(response.poll(cx)),
            PreparingProj::Reading { response } => ready!(response.as_mut().poll(cx)),
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::server::test_body_of;

    /// What reached the next layer: kept bytes, or a stream.
    fn describe(request: Prepared) -> std::future::Ready<Result<Response<String>, GatewayError>> {
        let seen = match request.into_body() {
            Payload::Kept { bytes } => format!("kept {:?}", bytes.unwrap_or_default()),
            Payload::Streaming { .. } => "streamed".to_owned(),
        };
        std::future::ready(Ok(Response::new(seen)))
    }

    async fn prepare(body: ClientBody) -> Result<String, GatewayError> {
        let mut layer = PrepareBodyLayer.layer(tower::service_fn(describe));
        let response = layer.ready().await?.call(Request::new(body)).await?;
        Ok(response.into_body())
    }

    #[tokio::test]
    async fn small_bodies_are_kept_and_the_rest_streamed() {
        assert_eq!(prepare(ClientBody::Empty).await.ok().as_deref(), Some("kept b\"\""));
        let small = test_body_of(Some(5), vec![Ok(Bytes::from("he")), Ok(Bytes::from("llo"))]);
        assert_eq!(prepare(ClientBody::Http1(small)).await.ok().as_deref(), Some("kept b\"hello\""));
        let unknown = test_body_of(None, vec![Ok(Bytes::from("chunk"))]);
        assert_eq!(prepare(ClientBody::Http1(unknown)).await.ok().as_deref(), Some("streamed"));
        let large = test_body_of(Some(1 << 20), vec![]);
        assert_eq!(prepare(ClientBody::Http1(large)).await.ok().as_deref(), Some("streamed"));
    }

    #[tokio::test]
    async fn a_body_that_fails_while_kept_is_the_clients_error() {
        let broken = test_body_of(Some(5), vec![Ok(Bytes::from("he")), Err("the client went away".into())]);
        let error = prepare(ClientBody::Http1(broken)).await.err();
        assert!(
            matches!(&error, Some(GatewayError::BadRequestBody { cause }) if cause == "the client went away"),
            "{error:?}"
        );
    }
}
