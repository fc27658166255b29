//! Protocol switches (WebSocket): once the instance answers `101 Switching Protocols`, bytes
//! are copied both ways between the client's connection and the instance's until either side
//! closes. The response body, which holds the request's slot on the instance, goes with the
//! copy, so the instance counts the connection in flight for as long (and a drain waits for it,
//! up to its timeout).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::body::GatewayBody;
use crate::client::UpstreamUpgrade;
use crate::server::ClientUpgrade;

#[derive(Clone)]
pub struct Upgrade<S> {
    inner: S,
}

pub struct UpgradeLayer;

impl<S> Layer<S> for UpgradeLayer {
    type Service = Upgrade<S>;
    fn layer(&self, inner: S) -> Upgrade<S> {
        Upgrade { inner }
    }
}

impl<S, B> Service<Request<B>> for Upgrade<S>
where
    S: Service<Request<B>, Response = Response<GatewayBody>>,
{
    type Response = Response<GatewayBody>;
    type Error = S::Error;
    type Future = Upgrading<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // Only a request that asks to switch keeps the client's side (see `forward`).
        let client = if request.headers().contains_key(http::header::UPGRADE) {
            request.extensions().get::<ClientUpgrade>().cloned()
        } else {
            request.extensions_mut().remove::<ClientUpgrade>();
            None
        };
        Upgrading { response: self.inner.call(request), client }
    }
}

pin_project_lite::pin_project! {
    pub struct Upgrading<F> {
        #[pin]
        response: F,
        client: Option<ClientUpgrade>,
    }
}

impl<F: Future<Output = Result<Response<GatewayBody>, E>>, E> Future for Upgrading<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut response = ready!(this.response.poll(cx))?;
        let Some(client) = this.client.take() else { return Poll::Ready(Ok(response)) };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Poll::Ready(Ok(response));
        }
        let instance =
            response.extensions_mut().remove::<UpstreamUpgrade>().and_then(|upgrade| upgrade.take());
        let (parts, holds_slot) = response.into_parts();
        tokio::spawn(async move {
            let _slot = holds_slot;
            if let (Some(mut client), Some(mut instance)) = (client.upgraded().await, instance) {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut instance).await;
            }
        });
        Poll::Ready(Ok(Response::from_parts(parts, GatewayBody::full(Bytes::new()))))
    }
}
