//! The HTTP server, generic over the service that answers its requests. HTTP/1.1 is served by
//! our own connection loop (`h1`), which frees its buffers between requests; a client that
//! opens with the HTTP/2 preface (h2c with prior knowledge) is handed to hyper's HTTP/2
//! server. Every request carries the client's [`ClientAddr`] in its extensions, and an
//! upgrade request a [`ClientUpgrade`].

mod drain;
mod h1;
mod head;
mod io;
mod proxy_protocol;
mod send_stall;

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

#[cfg(test)]
pub(crate) use io::{test_body, test_body_of};
pub use io::{
    BodyError, ClientAddr, ClientBody, ClientBodyError, ClientUpgrade, Held, RequestBody, Upgraded,
};

use crate::tls::TlsSocket;
use crate::wire::{BoxError, Prefixed, Socket};
use send_stall::Watched;

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

/// How a listener serves its clients.
#[derive(Clone)]
pub struct Listening {
    /// HTTPS, with HTTP/2 by ALPN; else HTTP/1.1 and h2c.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub timeouts: ClientTimeouts,
    /// Past this many open connections the listener stops accepting until one closes: the
    /// kernel's backlog holds the rest, as back-pressure, instead of refusing them.
    pub max_connections: usize,
    /// Past this many from one client a new connection is answered 503 and closed.
    pub max_per_client: Option<u32>,
    /// Load balancers in front of the gateway: their connections carry many clients, so they
    /// are not counted as one unless the PROXY protocol names the client.
    pub trusted_proxies: Arc<Vec<ipnet::IpNet>>,
    /// Each connection opens with a PROXY protocol header, and must come from a trusted proxy.
    pub proxy_protocol: bool,
}

impl Listening {
    pub fn new(config: &surge_config::GatewayConfig) -> Self {
        Listening {
            tls: None,
            timeouts: config.client_timeouts,
            max_connections: config.max_connections,
            max_per_client: config.max_connections_per_client,
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            proxy_protocol: config.proxy_protocol,
        }
    }
}

/// Serves `listener` as `listening` says until `shutdown` resolves, then stops accepting and
/// gives open requests up to `drain_timeout` to finish.
pub async fn serve<S, B>(
    service: S,
    listener: TcpListener,
    listening: Listening,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    // Every connection holds a watch: the drain asks it to finish its request and close, and
    // the signal sees all watches gone once every connection has.
    let (stopping, stop) = drain::Signal::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(listening.max_connections));
    let per_client = listening.max_per_client.map(|max| Arc::new(PerClient::new(max)));
    let Listening { tls, timeouts, trusted_proxies, proxy_protocol, .. } = listening;
    let timeouts = Arc::new(timeouts);
    let accepting = Accepting { service, stop, tls, timeouts, trusted_proxies, proxy_protocol, per_client };
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    accepting.accept(stream, peer, slot);
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
    drop((listener, accepting));
    stopping.drain();
    if tokio::time::timeout(drain_timeout, stopping.drained()).await.is_err() {
        tracing::warn!(
            "requests still open after gateway.shutdown_timeout ({drain_timeout:?}); closing them"
        );
    }
}

/// What each accepted connection needs from its listener.
#[derive(Clone)]
struct Accepting<S> {
    service: S,
    stop: drain::Watch,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Shared: a connection keeps a pointer, not its own copy.
    timeouts: Arc<ClientTimeouts>,
    trusted_proxies: Arc<Vec<ipnet::IpNet>>,
    proxy_protocol: bool,
    per_client: Option<Arc<PerClient>>,
}

impl<S> Accepting<S> {
    /// Takes an accepted connection on: at once, or with the PROXY protocol once its header
    /// names the client.
    fn accept<B>(&self, stream: TcpStream, peer: SocketAddr, slot: tokio::sync::OwnedSemaphorePermit)
    where
        S: HttpService<B>,
        B: ResponseBody,
    {
        // Looked up only where the PROXY protocol or the per-client cap asks.
        let proxy = (self.proxy_protocol || self.per_client.is_some())
            && self.trusted_proxies.iter().any(|net| net.contains(&peer.ip().to_canonical()));
        if !self.proxy_protocol {
            return self.admit(stream, peer, proxy, slot);
        }
        // A task of its own, which ends once the header is read: the PROXY header's buffer
        // takes no room in the connection's task.
        let accepting = self.clone();
        tokio::spawn(async move {
            if let Some(client) = client_of(&stream, peer, proxy, accepting.timeouts.head).await {
                accepting.admit(stream, client, proxy, slot);
            }
        });
    }

    /// Counts a connection from `client` (`proxy`: whose peer is a trusted proxy) against
    /// its client's cap, then starts serving it in a task of its own.
    fn admit<B>(
        &self,
        stream: TcpStream,
        client: SocketAddr,
        proxy: bool,
        slot: tokio::sync::OwnedSemaphorePermit,
    ) where
        S: HttpService<B>,
        B: ResponseBody,
    {
        // Counted by the client it carries; a trusted proxy without the PROXY protocol speaks
        // for many, so it is not counted as one.
        let counted = self.per_client.as_ref().filter(|_| self.proxy_protocol || !proxy);
        let client_slot = match counted.map(|per_client| per_client.admit(client.ip())) {
            None => None,
            Some(Some(client_slot)) => Some(client_slot),
            Some(None) => {
                // Refused: its place under max_connections is free at once.
                drop(slot);
                // Holding a watch, as connections do, so that a drain waits for the answer.
                let (stop, plain) = (self.stop.clone(), self.tls.is_none());
                tokio::spawn(async move {
                    too_many_connections(stream, plain).await;
                    drop(stop);
                });
                return;
            }
        };
        // The slots go with the connection, to an upgrade's tunnel if it has one. Boxed as
        // they are: the listener's slot alone takes 16 bytes, with a client's 48.
        let held: Option<Held> = Some(match client_slot {
            None => Box::new(slot),
            Some(client_slot) => Box::new((slot, client_slot)),
        });
        match &self.tls {
            None => {
                tokio::spawn(self.plain_connection(stream, client, held));
            }
            Some(tls) => {
                let client = ClientAddr::over_tls(client);
                let (service, stop) = (self.service.clone(), self.stop.clone());
                tokio::spawn(tls_connection(
                    service,
                    Arc::clone(tls),
                    stream,
                    client,
                    Arc::clone(&self.timeouts),
                    stop,
                    held,
                ));
            }
        }
    }

    /// A plain connection's task: the future every idle keep-alive connection costs.
    fn plain_connection<B>(
        &self,
        stream: TcpStream,
        client: SocketAddr,
        held: Option<Held>,
    ) -> impl Future<Output = ()> + use<S, B>
    where
        S: HttpService<B>,
        B: ResponseBody,
    {
        let client = ClientAddr::new(client);
        h1::serve(self.service.clone(), stream, client, Arc::clone(&self.timeouts), self.stop.clone(), held)
    }
}

/// The client a connection with the PROXY protocol serves, from a `trusted` peer: the one its
/// header names (`None`: a peer that may not send one, or a header that is not one).
async fn client_of(
    stream: &TcpStream,
    peer: SocketAddr,
    trusted: bool,
    timeout: Duration,
) -> Option<SocketAddr> {
    if !trusted {
        tracing::warn!("{peer} is not in gateway.trusted_proxies, so it may not send PROXY headers: closed");
        return None;
    }
    match proxy_protocol::read(stream, timeout).await {
        Ok(source) => Some(source.unwrap_or(peer)),
        Err(why) => {
            tracing::warn!("connection from {peer} closed: {why} (gateway.proxy_protocol)");
            None
        }
    }
}

/// Open connections per client address, for `gateway.max_connections_per_client`.
struct PerClient {
    max: u32,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>>,
}

/// One connection's place in its client's count, given back when dropped.
struct ClientSlot {
    ip: std::net::IpAddr,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, u32>>>,
}

impl PerClient {
    fn new(max: u32) -> Self {
        PerClient { max, open: Arc::default() }
    }

    fn admit(&self, ip: std::net::IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientSlot { ip, open: Arc::clone(&self.open) })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A client over its connection limit: a plain connection is told so (503) before it is
/// closed; a TLS one, which would need a handshake first, is only closed.
async fn too_many_connections(mut stream: TcpStream, plain: bool) {
    use tokio::io::AsyncWriteExt;
    if plain {
        let body = r#"{"error":"too_many_connections","message":"this client has too many connections open (gateway.max_connections_per_client)"}"#;
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             retry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer.as_bytes())).await;
    }
    let _ = stream.shutdown().await;
}

/// Serves one client connection over TLS, once its handshake is done.
async fn tls_connection<S, B>(
    service: S,
    tls: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    client: ClientAddr,
    timeouts: Arc<ClientTimeouts>,
    stop: drain::Watch,
    held: Option<Held>,
) where
    S: HttpService<B>,
    B: ResponseBody,
{
    let socket = match TlsSocket::accept(tls, stream).await {
        Ok(socket) => socket,
        Err(err) => {
            tracing::debug!("TLS handshake with {}: {err}", client.addr);
            return;
        }
    };
    if socket.negotiated_h2() {
        // Boxed: hyper's HTTP/2 connection is large, and inline it would enlarge the task of
        // every TLS connection, HTTP/1.1 ones too.
        Box::pin(serve_h2(service, Prefixed::new(Bytes::new(), socket), client, *timeouts, stop)).await;
    } else {
        h1::serve(service, socket, client, timeouts, stop, held).await;
    }
}

/// Streams one HTTP/2 connection may have open at once (nginx: `http2_max_concurrent_streams`, 128).
const MAX_STREAMS: u32 = 256;
/// How often an HTTP/2 connection is pinged, and how long an answer may take.
const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Streams a client may reset before the server has taken them up (h2's default, 20).
const MAX_PENDING_RESETS: usize = 20;

/// Serves an HTTP/2 connection until the client closes it, shutdown begins, or it has opened no
/// stream for `gateway.keepalive_timeout`; pings every 20 s find a peer that vanished.
async fn serve_h2<S, B, C>(
    service: S,
    stream: Prefixed<C>,
    client: ClientAddr,
    timeouts: ClientTimeouts,
    mut stop: drain::Watch,
) where
    S: HttpService<B>,
    B: ResponseBody,
    C: Socket,
{
    use std::sync::atomic::{AtomicU64, Ordering};
    let streams = Arc::new(AtomicU64::new(0));
    let opened = Arc::clone(&streams);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        use tower::ServiceExt;
        opened.fetch_add(1, Ordering::Relaxed);
        let mut request = request.map(|body| ClientBody::http2(body, timeouts.body));
        request.extensions_mut().insert(client.clone());
        let answered = service.clone().oneshot(request);
        async move { Ok::<_, S::Error>(answered.await?.map(|body| Watched::new(body, timeouts.send))) }
    });
    let idle = crate::wire::until_unchanged(&streams, timeouts.keepalive);
    // Stated rather than left to hyper's defaults: streams at once per connection, the head
    // size HTTP/1.1 allows, and how many streams a client may reset before they are served
    // (the rapid-reset bound) before the connection is ended with GOAWAY.
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(u32::try_from(surge_http1::MAX_HEAD_BYTES).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .keep_alive_interval(Some(PING_INTERVAL))
        .keep_alive_timeout(PING_INTERVAL)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                tracing::debug!("HTTP/2 connection: {err}");
            }
            return;
        }
        () = stop.draining() => {}
        () = idle => {}
    }
    // GOAWAY; open streams finish first.
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

#[cfg(test)]
mod tests;
