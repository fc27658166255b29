//! The gateway's HTTP server. HTTP/1.1 is served by our own connection loop (`h1`), which
//! frees its buffers between requests; a client that opens with the HTTP/2 preface (h2c with
//! prior knowledge) is handed to hyper's HTTP/2 server.

mod h1;
mod head;
mod io;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use io::ClientStream;
pub(crate) use io::ClientUpgrade;
pub use io::RequestBody;

use crate::body::ClientBody;
use crate::{ClientAddr, Gateway};

/// Serves HTTP/1.1 and h2c on `listener` until `shutdown` resolves, then stops accepting and gives
/// open requests up to `drain_timeout` to finish.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    // Every connection holds a receiver: `true` asks it to finish its request and close, and
    // the sender sees all receivers gone once every connection has.
    let (stopping, stop) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = connection(Arc::clone(&gateway), stream, ClientAddr::new(client), stop.clone());
                    tokio::spawn(connection);
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

async fn connection(
    gateway: Arc<Gateway>,
    stream: TcpStream,
    client: ClientAddr,
    mut stop: watch::Receiver<bool>,
) {
    let h1::Handoff::Http2(stream) = h1::serve(&gateway, stream, &client, &mut stop).await else { return };
    // Boxed: hyper's HTTP/2 connection is large, and most connections never need it.
    Box::pin(serve_h2(gateway, stream, client, stop)).await;
}

async fn serve_h2(
    gateway: Arc<Gateway>,
    stream: ClientStream,
    client: ClientAddr,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (gateway, client) = (Arc::clone(&gateway), client.clone());
        async move { Ok::<_, Infallible>(gateway.handle(request.map(ClientBody::Http2), client).await) }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
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
