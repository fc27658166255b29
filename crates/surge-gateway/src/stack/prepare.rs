//! Small request bodies are read whole before the request goes on, so that a failed try can
//! be sent again elsewhere, and an instance never waits on a slow client for them; larger ones,
//! and those of unknown length, stream through and are sent once.
//!
//! This is also where readiness stops: below it, waiting for capacity happens inside the
//! request (so the request timeout above bounds it), once its body is whole.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use std::sync::Arc;

use http::request::Parts;
use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::util::Oneshot;
use tower::{Layer, Service, ServiceExt};

use crate::body::Payload;
use crate::error::GatewayError;
use crate::server::ClientBody;
use crate::wire::BoxFuture;

/// When the request's time is up: set by the request timeout, read here once for the tries.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Instant);

/// A request on its way to an instance, as its tries share it: the head behind a reference
/// count (a retry's copy costs no allocation), the body kept or streamed, and what the tries
/// so far have learnt.
pub struct Outbound {
    pub parts: Arc<Parts>,
    pub body: Payload<ClientBody>,
    /// When the request's time is up (from [`Deadline`]), read once.
    pub deadline: Option<Instant>,
    /// The instances tried so far, so the next try prefers another.
    pub tried: Vec<String>,
}

impl Outbound {
    pub fn new(parts: Parts, body: Payload<ClientBody>) -> Self {
        let deadline = parts.extensions.get::<Deadline>().map(|deadline| deadline.0);
        Outbound { parts: Arc::new(parts), body, deadline, tried: Vec::new() }
    }

    /// A copy for another try; a streamed body can be sent only once.
    pub fn try_clone(&self) -> Option<Self> {
        Some(Outbound {
            parts: Arc::clone(&self.parts),
            body: self.body.try_clone()?,
            deadline: self.deadline,
            tried: self.tried.clone(),
        })
    }
}

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

impl<S, R> Service<Request<ClientBody>> for PrepareBody<S>
where
    S: Service<Outbound, Response = Response<R>, Error = GatewayError> + Clone + Send + 'static,
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
            let outbound = Outbound::new(parts, Payload::passed_on(body));
            return Preparing::Sent { response: inner.oneshot(outbound) };
        }
        Preparing::Reading {
            response: Box::pin(async move {
                let bytes = body.collect().await.map_err(|err| GatewayError::client_body(&*err))?.to_bytes();
                inner.oneshot(Outbound::new(parts, Payload::Kept { bytes: Some(bytes) })).await
            }),
        }
    }
}

pin_project_lite::pin_project! {
    #[project = PreparingProj]
    pub enum Preparing<S: Service<Outbound>> {
        Sent { #[pin] response: Oneshot<S, Outbound> },
        Reading { response: BoxFuture<Result<S::Response, GatewayError>> },
    }
}

impl<S> Future for Preparing<S>
where
    S: Service<Outbound, Error = GatewayError>,
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
    fn describe(request: Outbound) -> std::future::Ready<Result<Response<String>, GatewayError>> {
        let seen = match request.body {
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
