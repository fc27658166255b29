//! What the server hands the service with each request: the client's address, the request
//! body as the connection reads it, and, for an upgrade, the raw connection once the `101` is
//! written.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderValue;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use crate::wire::BoxError;

/// The client's address, in every request's extensions; its IP is rendered once per
/// connection, for `X-Forwarded-For`.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    pub addr: SocketAddr,
    pub forwarded_for: Option<HeaderValue>,
    /// The client came over TLS.
    pub tls: bool,
    /// The client is a proxy in `gateway.trusted_proxies`: its forwarding fields are believed.
    pub trusted: bool,
}

impl ClientAddr {
    pub fn new(addr: SocketAddr) -> Self {
        ClientAddr {
            addr,
            forwarded_for: HeaderValue::from_str(&addr.ip().to_string()).ok(),
            tls: false,
            trusted: false,
        }
    }

    pub fn over_tls(addr: SocketAddr) -> Self {
        ClientAddr { tls: true, ..ClientAddr::new(addr) }
    }
}

/// A request body that failed on the client's side (malformed framing, an aborted upload): so
/// that whoever sees it fail, even through another client's error, can tell it from an
/// instance's failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBodyError(#[from] BoxError);

/// Why the gateway gave up on a request body the client was sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is larger than {0} bytes (gateway.max_body, or the route's max_body)")]
    TooLarge(u64),
    #[error("no byte of the request body came for {0:?} (gateway.body_timeout)")]
    Stalled(std::time::Duration),
}

/// A client's request body, as the connection it came on reads it.
pub enum ClientBody {
    Empty,
    Http1(RequestBody),
    /// hyper's HTTP/2 body, and how much of it may still come.
    Http2 {
        body: Incoming,
        limit: u64,
        read: u64,
        /// How long the client may send nothing (`gateway.body_timeout`), and since when it
        /// has been waited for.
        stall: std::time::Duration,
        waiting: Option<Pin<Box<tokio::time::Sleep>>>,
    },
}

impl ClientBody {
    pub(crate) fn http2(body: Incoming, stall: std::time::Duration) -> Self {
        ClientBody::Http2 { body, limit: u64::MAX, read: 0, stall, waiting: None }
    }

    /// Refuses a body that says it is longer than `max`, and fails one that turns out so.
    pub fn limit(&mut self, max: u64) -> Result<(), BodyError> {
        if self.size_hint().lower() > max {
            return Err(BodyError::TooLarge(max));
        }
        match self {
            ClientBody::Empty => {}
            ClientBody::Http1(body) => body.limit = max,
            ClientBody::Http2 { limit, .. } => *limit = max,
        }
        Ok(())
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match self.get_mut() {
            ClientBody::Empty => return Poll::Ready(None),
            ClientBody::Http1(body) => Pin::new(body).poll_frame(cx),
            ClientBody::Http2 { body, limit, read, stall, waiting } => match Pin::new(body).poll_frame(cx) {
                // Nothing came: the stream's wait is bounded as an HTTP/1.1 body's is.
                Poll::Pending => {
                    let timer = waiting.get_or_insert_with(|| Box::pin(tokio::time::sleep(*stall)));
                    timer
                        .as_mut()
                        .poll(cx)
                        .map(|()| Some(Err(Box::new(BodyError::Stalled(*stall)) as BoxError)))
                }
                polled => {
                    *waiting = None;
                    polled.map(|frame| match frame {
                        Some(Ok(frame)) => {
                            *read += frame.data_ref().map_or(0, |data| data.len() as u64);
                            if *read > *limit {
                                Some(Err(Box::new(BodyError::TooLarge(*limit)) as BoxError))
                            } else {
                                Some(Ok(frame))
                            }
                        }
                        other => other.map(|frame| frame.map_err(Into::into)),
                    })
                }
            },
        };
        frame.map_err(|err| Box::new(ClientBodyError(err)) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Http1(body) => body.is_end_stream(),
            ClientBody::Http2 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Http1(body) => body.size_hint(),
            ClientBody::Http2 { body, .. } => body.size_hint(),
        }
    }
}

/// A request body read off an HTTP/1.1 connection. The connection reads it only once the body
/// is first polled (so `Expect: 100-continue` is answered only when the body is wanted) and at
/// most one piece ahead of the reader.
pub struct RequestBody {
    pieces: mpsc::Receiver<Result<Bytes, BoxError>>,
    /// Tells the connection the body is wanted, and how much of it may come.
    wanted: Option<oneshot::Sender<u64>>,
    /// Bytes still to come, when the length is known.
    remaining: Option<u64>,
    limit: u64,
}

/// The connection's side of a [`RequestBody`].
pub(super) struct BodySender {
    pub pieces: mpsc::Sender<Result<Bytes, BoxError>>,
    /// The body is wanted, and at most this many bytes of it.
    pub wanted: oneshot::Receiver<u64>,
}

pub(super) fn request_body(length: Option<u64>) -> (RequestBody, BodySender) {
    let (pieces_tx, pieces) = mpsc::channel(1);
    let (wanted, wanted_rx) = oneshot::channel();
    let body = RequestBody { pieces, wanted: Some(wanted), remaining: length, limit: u64::MAX };
    (body, BodySender { pieces: pieces_tx, wanted: wanted_rx })
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(wanted) = self.wanted.take() {
            let _ = wanted.send(self.limit);
        }
        match self.pieces.poll_recv(cx) {
            Poll::Ready(Some(Ok(data))) => {
                if let Some(remaining) = &mut self.remaining {
                    *remaining = remaining.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Some(Err(err))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// What a connection holds while it is open (its places under the connection limits), kept by
/// its tunnel after an upgrade.
pub type Held = Box<dyn std::any::Any + Send + Sync>;

/// An upgraded connection that keeps what its connection held until it closes.
pub(super) struct Holding<T> {
    io: T,
    _held: Held,
}

impl<T> Holding<T> {
    pub(super) fn new(io: T, held: Held) -> Self {
        Holding { io, _held: held }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Holding<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Holding<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A connection after an upgrade, whatever it runs on.
pub trait Upgraded: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Upgraded for T {}

/// Put in an upgrade request's extensions: resolves to the client's connection once the
/// `101` has been written to it.
#[derive(Clone)]
pub struct ClientUpgrade(Arc<Mutex<Option<UpgradeReceiver>>>);

type UpgradeReceiver = oneshot::Receiver<Box<dyn Upgraded>>;

impl ClientUpgrade {
    pub(crate) fn new() -> (Self, oneshot::Sender<Box<dyn Upgraded>>) {
        let (tx, rx) = oneshot::channel();
        (ClientUpgrade(Arc::new(Mutex::new(Some(rx)))), tx)
    }

    /// The upgraded connection, or `None` if the connection closed instead.
    pub async fn upgraded(self) -> Option<Box<dyn Upgraded>> {
        let receiver = self.0.lock().ok()?.take()?;
        receiver.await.ok()
    }
}

/// A request body with nothing behind it, for tests of what carries one.
#[cfg(test)]
pub(crate) fn test_body() -> RequestBody {
    request_body(None).0
}

/// A request body of `length` (if known) that yields `pieces` once it is read, as a
/// connection would feed it.
#[cfg(test)]
pub(crate) fn test_body_of(length: Option<u64>, pieces: Vec<Result<Bytes, BoxError>>) -> RequestBody {
    let (body, BodySender { pieces: sender, wanted }) = request_body(length);
    tokio::spawn(async move {
        if wanted.await.is_ok() {
            for piece in pieces {
                if sender.send(piece).await.is_err() {
                    return;
                }
            }
        }
    });
    body
}
