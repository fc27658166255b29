//! The HTTP server, generic over the service that answers its requests. HTTP/1.1 is served by
//! our own connection loop (`h1`), which frees its buffers between requests; a client that
//! opens with the HTTP/2 preface (h2c with prior knowledge) is handed to hyper's HTTP/2
//! server. Every request carries the client's [`ClientAddr`] in its extensions, and an
//! upgrade request a [`ClientUpgrade`].

mod h1;
mod head;
mod io;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use surge_config::ClientTimeouts;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[cfg(test)]
pub(crate) use io::{test_body, test_body_of};
pub use io::{BodyError, ClientAddr, ClientBody, ClientBodyError, ClientUpgrade, RequestBody, Upgraded};

use crate::tls::TlsSocket;
use crate::wire::{BoxError, Prefixed, Socket};

/// What the server needs of the service behind it: one is cloned per connection and called
/// for one request at a time on it.
pub trait HttpService<B>:
    tower::Service<Request<ClientBody>, Response = Response<B>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: tower::Service<Request<ClientBody>, Response = Response<B>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static
{
}

/// What the server needs of a response body.
pub trait ResponseBody: Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + Unpin + 'static {}

impl<B> ResponseBody for B where B: Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + Unpin + 'static {}

/// Serves HTTP/1.1 and h2c on `listener` (or, given a TLS configuration, HTTPS with HTTP/2 by
/// ALPN) until `shutdown` resolves, then stops accepting and gives open requests up to
/// `drain_timeout` to finish.
pub async fn serve<S, B>(
    service: S,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    timeouts: ClientTimeouts,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    // Every connection holds a receiver: `true` asks it to finish its request and close, and
    // the sender sees all receivers gone once every connection has.
    let (stopping, stop) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let _ = stream.set_nodelay(true);
                    let (service, stop) = (service.clone(), stop.clone());
                    match &tls {
                        None => tokio::spawn(connection(service, stream, ClientAddr::new(client), timeouts, stop)),
                        Some(tls) => {
                            tokio::spawn(tls_connection(service, Arc::clone(tls), stream, client, timeouts, stop))
                        }
                    };
                }
                Err(err) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!("gateway cannot accept a connection: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = &mut shutdown => break,
        }
    }
    drop((listener, stop));
    let _ = stopping.send(true);
    if tokio::time::timeout(drain_timeout, stopping.closed()).await.is_err() {
        tracing::warn!(
            "requests still open after gateway.shutdown_timeout ({drain_timeout:?}); closing them"
        );
    }
}

/// Serves one client connection until it closes or `stop` turns true.
pub async fn connection<S, B, C>(
    mut service: S,
    socket: C,
    client: ClientAddr,
    timeouts: ClientTimeouts,
    mut stop: watch::Receiver<bool>,
) where
    S: HttpService<B>,
    B: ResponseBody,
    C: Socket,
{
    let h1::Handoff::Http2(stream) = h1::serve(&mut service, socket, &client, &timeouts, &mut stop).await
    else {
        return;
    };
    // Boxed: hyper's HTTP/2 connection is large, and most connections never need it.
    Box::pin(serve_h2(service, stream, client, stop)).await;
}

/// Serves one client connection over TLS, once its handshake is done.
async fn tls_connection<S, B>(
    service: S,
    tls: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    client: SocketAddr,
    timeouts: ClientTimeouts,
    stop: watch::Receiver<bool>,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    let socket = match TlsSocket::accept(tls, stream).await {
        Ok(socket) => socket,
        Err(err) => {
            tracing::debug!("TLS handshake with {client}: {err}");
            return;
        }
    };
    let client = ClientAddr::over_tls(client);
    if socket.negotiated_h2() {
        Box::pin(serve_h2(service, Prefixed::new(Bytes::new(), socket), client, stop)).await;
    } else {
        connection(service, socket, client, timeouts, stop).await;
    }
}

/// Streams one HTTP/2 connection may have open at once (nginx: `http2_max_concurrent_streams`, 128).
const MAX_STREAMS: u32 = 256;
/// Streams a client may reset before the server has taken them up (h2's default, 20).
const MAX_PENDING_RESETS: usize = 20;

async fn serve_h2<S, B, C>(
    service: S,
    stream: Prefixed<C>,
    client: ClientAddr,
    mut stop: watch::Receiver<bool>,
) where
    S: HttpService<B>,
    B: ResponseBody,
    C: Socket,
{
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        use tower::ServiceExt;
        let mut request = request.map(ClientBody::http2);
        request.extensions_mut().insert(client.clone());
        service.clone().oneshot(request)
    });
    // Stated rather than left to hyper's defaults: streams at once per connection, the head
    // size HTTP/1.1 allows, and how many streams a client may reset before they are served
    // (the rapid-reset bound) before the connection is ended with GOAWAY.
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(surge_http1::MAX_HEAD_BYTES).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                tracing::debug!("HTTP/2 connection: {err}");
            }
        }
        () = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

#[cfg(test)]
mod tests;
