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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UnixStream};
    use tower::ServiceExt;

    use super::*;
    use crate::wire::Prefixed;

    #[tokio::test]
    async fn after_a_101_the_client_and_the_instance_are_spliced() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let to_instance = TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (mut instance, _) = listener.accept().await.expect("accept");
        // What the instance sent right after its head arrives first.
        let upstream = UpstreamUpgrade::new(Prefixed::new(Bytes::from_static(b"early "), to_instance));
        let switch = tower::service_fn(move |_: Request<()>| {
            let upstream = upstream.clone();
            async move {
                let mut response = Response::new(GatewayBody::full(Bytes::new()));
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                response.extensions_mut().insert(upstream);
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let (client_upgrade, hand_over) = ClientUpgrade::new();
        let mut request = Request::builder().header("upgrade", "echo").body(()).expect("request");
        request.extensions_mut().insert(client_upgrade);
        let Ok(response) = UpgradeLayer.layer(switch).oneshot(request).await;
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

        let (mut client, gateway_side) = UnixStream::pair().expect("pair");
        assert!(hand_over.send(Box::new(gateway_side)).is_ok(), "the server hands the connection over");
        let mut early = [0u8; 6];
        client.read_exact(&mut early).await.expect("read");
        assert_eq!(&early, b"early ");
        client.write_all(b"ping").await.expect("write");
        let mut ping = [0u8; 4];
        instance.read_exact(&mut ping).await.expect("read");
        assert_eq!(&ping, b"ping");
        instance.write_all(b"pong").await.expect("write");
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.expect("read");
        assert_eq!(&pong, b"pong");
    }
}
