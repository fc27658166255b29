//! Protocol switches (WebSocket): once the instance answers `101 Switching Protocols`, bytes
//! are copied both ways between the client's connection and the instance's until either side
//! closes. The response body, which holds the request's slot on the instance, goes with the
//! copy, so the instance counts the connection in flight for as long (and a drain waits for it,
//! up to its timeout). A tunnel with no byte either way for `timeouts.tunnel_idle` is closed,
//! so an abandoned one cannot hold its slot and connection forever.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::{Layer, Service};

use crate::body::GatewayBody;
use crate::client::UpstreamUpgrade;
use crate::server::ClientUpgrade;

#[derive(Clone)]
pub struct Upgrade<S> {
    inner: S,
    idle: Duration,
}

pub struct UpgradeLayer {
    pub idle: Duration,
}

impl<S> Layer<S> for UpgradeLayer {
    type Service = Upgrade<S>;
    fn layer(&self, inner: S) -> Upgrade<S> {
        Upgrade { inner, idle: self.idle }
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
        Upgrading { response: self.inner.call(request), client, idle: self.idle }
    }
}

pin_project_lite::pin_project! {
    pub struct Upgrading<F> {
        #[pin]
        response: F,
        client: Option<ClientUpgrade>,
        idle: Duration,
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
        let idle = *this.idle;
        tokio::spawn(async move {
            let _slot = holds_slot;
            if let (Some(client), Some(instance)) = (client.upgraded().await, instance) {
                splice(client, instance, idle).await;
            }
        });
        Poll::Ready(Ok(Response::from_parts(parts, GatewayBody::full(Bytes::new()))))
    }
}

/// Copies both ways until either side closes, or nothing has moved for `idle`.
async fn splice(
    client: impl AsyncRead + AsyncWrite + Unpin,
    instance: impl AsyncRead + AsyncWrite + Unpin,
    idle: Duration,
) {
    let activity = Arc::new(Activity::default());
    let (mut client, mut instance) = (Watched::new(client, &activity), Watched::new(instance, &activity));
    let copy = tokio::io::copy_bidirectional(&mut client, &mut instance);
    let watch = crate::wire::until_unchanged(&activity.moved, idle);
    tokio::select! {
        _ = copy => {}
        () = watch => tracing::debug!("closing a tunnel idle for {idle:?}"),
    }
}

/// Counts the reads that moved bytes, on both sides of a tunnel.
#[derive(Default)]
struct Activity {
    moved: AtomicU64,
}

pin_project_lite::pin_project! {
    /// One side of a tunnel, counting its reads into the shared [`Activity`].
    struct Watched<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T> Watched<T> {
    fn new(inner: T, activity: &Arc<Activity>) -> Self {
        Watched { inner, activity: Arc::clone(activity) }
    }
}

impl<T: AsyncRead> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = ready!(this.inner.poll_read(cx, buf));
        if buf.filled().len() > before {
            this.activity.moved.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(result)
    }
}

impl<T: AsyncWrite> AsyncWrite for Watched<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UnixStream};
    use tower::ServiceExt;

    use super::*;
    use crate::client::UpstreamStream;
    use crate::wire::Prefixed;

    #[tokio::test]
    async fn after_a_101_the_client_and_the_instance_are_spliced() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let to_instance = TcpStream::connect(listener.local_addr().expect("address")).await.expect("connect");
        let (mut instance, _) = listener.accept().await.expect("accept");
        // What the instance sent right after its head arrives first.
        let upstream = UpstreamUpgrade::new(Prefixed::new(
            Bytes::from_static(b"early "),
            UpstreamStream::Plain(to_instance),
        ));
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
        let Ok(response) =
            UpgradeLayer { idle: Duration::from_secs(300) }.layer(switch).oneshot(request).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_with_nothing_moving_is_closed_after_its_idle_timeout() {
        let (mut client, client_side) = UnixStream::pair().expect("pair");
        let (mut instance, instance_side) = UnixStream::pair().expect("pair");
        let idle = Duration::from_secs(300);
        let tunnel = tokio::spawn(splice(client_side, instance_side, idle));
        // Traffic every half timeout keeps it open well past one.
        for _ in 0..3 {
            tokio::time::sleep(idle / 2).await;
            client.write_all(b"hi").await.expect("write");
            let mut hi = [0u8; 2];
            instance.read_exact(&mut hi).await.expect("read");
        }
        assert!(!tunnel.is_finished(), "closed while bytes were moving");
        // Then nothing, for two timeouts: the watch sees a whole interval without a byte.
        tokio::time::sleep(idle * 2 + Duration::from_secs(1)).await;
        assert!(tunnel.is_finished(), "the idle tunnel is still open");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty(), "the client's side was closed");
    }
}
