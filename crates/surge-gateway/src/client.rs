//! The gateway's own HTTP/1.1 client, for every request to an instance spoken to over
//! HTTP/1.1, in the clear or over TLS (h2c goes through hyper's). Each instance address keeps a stack of idle keep-alive
//! connections. A request takes the most recently used one (or connects) and writes its head,
//! with a whole body in the same `writev`; a streamed body is then pumped onto the connection
//! (chunked, or raw with a known length) while the response is read, and goes on being pumped
//! from the response body if the instance answers before it has all of it. The response body
//! reads straight from the connection, in the task that forwards it, and puts the connection
//! back once both have ended. After a `101` the connection is handed to the upgrade. No
//! connection task, no channel, no lock held across I/O.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::HOST;
use http::request::Parts;
use http::uri::Authority;
use http::StatusCode;
use http::{Method, Response};
use http_body::{Body, Frame, SizeHint};
use surge_tls::UpstreamTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use surge_http1::encode::{is_request_framing, write_request_head};
use surge_http1::head::{parse_response, ResponseHead};
use surge_http1::{ChunkSizeLine, Decoded, Decoder};

use crate::server::ClientBody;
use crate::tls::TlsSocket;
use crate::wire::{write_all, BoxError, Prefixed, Socket};

/// Bounds of the room asked for per read. The slack added to what is expected makes the last
/// read of an answer a short one, after which tokio knows the socket is drained.
const READ_SIZE: std::ops::RangeInclusive<usize> = 16 * 1024..=256 * 1024;
const READ_SLACK: usize = 1024;
/// An idle connection older than this is closed rather than reused: instances commonly close
/// idle connections after a minute or more (hyper-util closes its own after 90 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(55);
/// Idle connections kept per instance (nginx's `keepalive` directive).
const MAX_IDLE_PER_INSTANCE: usize = 1024;

pub(crate) struct Http1Client {
    idle: Mutex<IdleConnections>,
    connect_timeout: Duration,
    transport: Transport,
}

/// What runs over the TCP connections to instances.
pub(crate) enum Transport {
    Plain,
    Tls(Arc<UpstreamTls>),
    /// TLS whose settings could not be read: every connection fails, saying why.
    BrokenTls(String),
}

#[derive(Default)]
struct IdleConnections {
    /// Keyed by instance addresses, which clients do not choose, so a fast hash is safe here
    /// (SipHash was about 1% of a proxied request's instructions).
    by_address: HashMap<SocketAddr, Vec<(Connection, Instant)>, foldhash::fast::RandomState>,
    pruned: Option<Instant>,
}

struct Connection {
    stream: UpstreamStream,
    buf: BytesMut,
    /// Bytes read for the current answer.
    answer_bytes: usize,
    /// Room to read the next answer into: the last answer's size, so that each usually
    /// arrives in one read (hyper's adaptive read buffer does the like).
    read_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// Nothing reached the instance.
    #[error("{0}")]
    Connect(BoxError),
    /// A reused connection was closed by the instance before it answered.
    #[error("the instance closed the kept-alive connection")]
    Stale,
    /// The client's request body failed while it was being sent.
    #[error("{0}")]
    ClientBody(BoxError),
    #[error("{0}")]
    Failed(BoxError),
}

/// How one exchange on a connection failed.
enum Failure {
    /// The connection closed or broke before any byte of an answer: on a reused connection,
    /// the instance closed it while idle.
    Unanswered(BoxError),
    Failed(BoxError),
    ClientBody(BoxError),
}

/// A request body on its way to an instance.
pub(crate) enum Outgoing {
    Whole(Bytes),
    Streamed(ClientBody),
}

/// An instance's connection after its `101 Switching Protocols`, in the response's extensions
/// for the upgrade to take.
#[derive(Clone)]
pub(crate) struct UpstreamUpgrade(Arc<Mutex<Option<Prefixed<UpstreamStream>>>>);

impl UpstreamUpgrade {
    pub(crate) fn new(connection: Prefixed<UpstreamStream>) -> Self {
        UpstreamUpgrade(Arc::new(Mutex::new(Some(connection))))
    }

    pub(crate) fn take(&self) -> Option<Prefixed<UpstreamStream>> {
        self.0.lock().ok()?.take()
    }
}

/// Where a request goes: the instance's address, its authority (the `Host` of a request that
/// has none) and the name its TLS certificate is checked for.
#[derive(Clone, Copy)]
pub(crate) struct Target<'a> {
    pub addr: SocketAddr,
    pub authority: &'a Authority,
    pub name: &'a str,
}

impl Http1Client {
    pub fn new(connect_timeout: Duration, transport: Transport) -> Arc<Self> {
        Arc::new(Http1Client { idle: Mutex::default(), connect_timeout, transport })
    }

    /// Sends the request, with `extra` fields besides its own, to `target`, on an idle
    /// connection if there is one. A reused connection that the instance turns out to have
    /// closed fails as `Stale`, for the retry layer to decide on (and count).
    pub async fn send(
        self: &Arc<Self>,
        Target { addr, authority, name }: Target<'_>,
        parts: &Parts,
        extra: &[(&[u8], &[u8])],
        body: Outgoing,
    ) -> Result<Response<Http1Body>, SendError> {
        let (whole, pump, length) = match body {
            Outgoing::Whole(bytes) => {
                let length = bytes.len() as u64;
                (bytes, None, Some(length))
            }
            Outgoing::Streamed(body) => {
                let length = body.size_hint().exact();
                (Bytes::new(), Some(Box::new(Pump::new(body, length))), length)
            }
        };
        let mut head = Vec::with_capacity(512);
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = (!parts.headers.contains_key(HOST)).then(|| authority.as_str().as_bytes());
        let fields = parts.headers.iter().filter(|(name, _)| !is_request_framing(name));
        write_request_head(&mut head, &parts.method, target, host, fields, extra, length);
        let (connection, reused) = match self.checkout(addr) {
            Some(connection) => (connection, true),
            // Boxed: connecting (a TLS handshake too) is large and rare, and inline it would
            // enlarge every request's future, which is moved and boxed per request.
            None => (Box::pin(self.connect(addr, name)).await?, false),
        };
        match self.exchange(connection, addr, &head, &whole, pump, &parts.method).await {
            Ok(response) => Ok(response),
            Err(Failure::ClientBody(err)) => Err(SendError::ClientBody(err)),
            Err(Failure::Unanswered(_)) if reused => Err(SendError::Stale),
            Err(Failure::Unanswered(err) | Failure::Failed(err)) => Err(SendError::Failed(err)),
        }
    }

    /// A new connection to `addr`, with its TLS handshake done (for `name`) when instances
    /// speak TLS. Nothing of the request is sent yet, so any failure is a `Connect`.
    async fn connect(&self, addr: SocketAddr, name: &str) -> Result<Connection, SendError> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                SendError::Connect(format!("connect timed out after {:?}", self.connect_timeout).into())
            })?
            .map_err(|err| SendError::Connect(err.into()))?;
        let _ = tcp.set_nodelay(true);
        let stream = match &self.transport {
            Transport::Plain => UpstreamStream::Plain(tcp),
            Transport::Tls(tls) => {
                let tls = tls.connect(tcp, name).await.map_err(|err| SendError::Connect(err.into()))?;
                UpstreamStream::Tls(Box::new(TlsSocket::client(tls)))
            }
            Transport::BrokenTls(why) => return Err(SendError::Connect(why.clone().into())),
        };
        Ok(Connection { stream, buf: BytesMut::new(), answer_bytes: 0, read_size: *READ_SIZE.start() })
    }

    async fn exchange(
        self: &Arc<Self>,
        mut connection: Connection,
        addr: SocketAddr,
        head: &[u8],
        whole: &Bytes,
        mut pump: Option<Box<Pump>>,
        method: &Method,
    ) -> Result<Response<Http1Body>, Failure> {
        connection.answer_bytes = 0;
        let mut request = [IoSlice::new(head), IoSlice::new(whole)];
        write_all(&connection.stream, &mut request, None)
            .await
            .map_err(|err| Failure::Unanswered(err.into()))?;
        // A streamed body the instance stopped taking leaves the connection unusable, though
        // its answer may still come.
        let mut reusable = true;
        let (response, decoder, keep_alive) = std::future::poll_fn(|cx| loop {
            if let Some(sending) = &mut pump {
                match sending.poll_send(cx, &mut connection.stream) {
                    Poll::Ready(Ok(())) => pump = None,
                    Poll::Ready(Err(Failure::ClientBody(err))) => {
                        return Poll::Ready(Err(Failure::ClientBody(err)))
                    }
                    Poll::Ready(Err(_)) => (pump, reusable) = (None, false),
                    Poll::Pending => {}
                }
            }
            loop {
                match parse_response(&mut connection.buf, method)
                    .map_err(|err| Failure::Failed(err.into()))?
                {
                    Some(ResponseHead::Final { response, decoder, keep_alive }) => {
                        return Poll::Ready(Ok((response, decoder, keep_alive)))
                    }
                    Some(ResponseHead::Interim) => continue,
                    None => break,
                }
            }
            if connection.buf.capacity() - connection.buf.len() < connection.read_size {
                connection.buf.reserve(connection.read_size);
            }
            let nothing_yet = connection.buf.is_empty();
            match tokio_util::io::poll_read_buf(Pin::new(&mut connection.stream), cx, &mut connection.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if nothing_yet => {
                    return Poll::Ready(Err(Failure::Unanswered("the instance closed the connection".into())))
                }
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Failure::Failed(
                        "the instance closed the connection mid-answer".into(),
                    )))
                }
                Poll::Ready(Ok(n)) => connection.answer_bytes += n,
                Poll::Ready(Err(err)) if nothing_yet => {
                    return Poll::Ready(Err(Failure::Unanswered(err.into())))
                }
                Poll::Ready(Err(err)) => return Poll::Ready(Err(Failure::Failed(err.into()))),
            }
        })
        .await?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The connection now belongs to the upgrade, with what the instance sent after its head.
            let Connection { stream, buf, .. } = connection;
            let upgrade = UpstreamUpgrade::new(Prefixed::new(buf.freeze(), stream));
            let mut response = response.map(|()| Http1Body::empty());
            response.extensions_mut().insert(upgrade);
            return Ok(response);
        }
        let mut body = Http1Body {
            connection: Some(connection),
            decoder,
            pump,
            home: (keep_alive && reusable).then(|| (Arc::clone(self), addr)),
        };
        if body.decoder.is_done() {
            body.finish();
        }
        Ok(response.map(|()| body))
    }

    /// The most recently used idle connection to `addr` that the instance has not closed.
    fn checkout(&self, addr: SocketAddr) -> Option<Connection> {
        let mut idle = self.idle.lock().ok()?;
        let stack = idle.by_address.get_mut(&addr)?;
        while let Some((connection, since)) = stack.pop() {
            if since.elapsed() < IDLE_TIMEOUT && connection.is_quiet() {
                return Some(connection);
            }
        }
        None
    }

    fn checkin(&self, addr: SocketAddr, connection: Connection) {
        let Ok(mut idle) = self.idle.lock() else { return };
        let now = Instant::now();
        // Now and then, close what stayed idle too long, including all connections to instances
        // that are gone.
        if idle.pruned.is_none_or(|at| now.duration_since(at) > Duration::from_secs(1)) {
            idle.pruned = Some(now);
            idle.by_address.retain(|_, stack| {
                stack.retain(|(_, since)| now.duration_since(*since) < IDLE_TIMEOUT);
                !stack.is_empty()
            });
        }
        let stack = idle.by_address.entry(addr).or_default();
        if stack.len() < MAX_IDLE_PER_INSTANCE {
            stack.push((connection, now));
        }
    }
}

impl Connection {
    /// No bytes and no close have arrived since the last answer, so the connection can be
    /// reused.
    fn is_quiet(&self) -> bool {
        self.buf.is_empty() && self.stream.is_quiet()
    }
}

/// A connection to an instance: TCP, or TLS over it.
pub(crate) enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsSocket>),
}

impl UpstreamStream {
    /// Nothing has arrived since the last answer. Tokio clears a socket's read readiness after
    /// a short read, so usually no readiness says it at no cost; readiness left by a read that
    /// filled the buffer is checked with a read that should find nothing.
    fn is_quiet(&self) -> bool {
        match self {
            UpstreamStream::Plain(tcp) => {
                let mut cx = Context::from_waker(Waker::noop());
                tcp.poll_read_ready(&mut cx).is_pending()
                    || matches!(tcp.try_read(&mut [0u8; 1]), Err(err) if err.kind() == std::io::ErrorKind::WouldBlock)
            }
            UpstreamStream::Tls(tls) => tls.is_quiet(),
        }
    }
}

/// Calls `$call` on whichever stream `$self` holds, shared...
macro_rules! either {
    ($self:expr, $stream:ident => $call:expr) => {
        match $self {
            UpstreamStream::Plain($stream) => $call,
            UpstreamStream::Tls(boxed) => {
                let $stream = &**boxed;
                $call
            }
        }
    };
}

/// ...or pinned, for the poll functions.
macro_rules! either_pinned {
    ($self:expr, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            UpstreamStream::Plain($stream) => $call,
            UpstreamStream::Tls($stream) => $call,
        }
    };
}

impl Socket for UpstreamStream {
    async fn readable(&self) -> std::io::Result<()> {
        either!(self, s => s.readable().await)
    }
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        either!(self, s => Socket::poll_read_ready(s, cx))
    }
    async fn writable(&self) -> std::io::Result<()> {
        either!(self, s => s.writable().await)
    }
    async fn flushed(&self) -> std::io::Result<()> {
        either!(self, s => Socket::flushed(s).await)
    }
    async fn close(&self) {
        either!(self, s => Socket::close(s).await)
    }
    fn try_read_buf(&self, buf: &mut BytesMut) -> std::io::Result<usize> {
        either!(self, s => Socket::try_read_buf(s, buf))
    }
    fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize> {
        either!(self, s => Socket::try_write(s, bytes))
    }
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        either!(self, s => Socket::try_write_vectored(s, bufs))
    }
    fn try_read_io<R>(&self, io: impl FnOnce() -> std::io::Result<R>) -> std::io::Result<R> {
        either!(self, s => Socket::try_read_io(s, io))
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        either_pinned!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        either_pinned!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        either_pinned!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        either_pinned!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        either_pinned!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// A response body read straight off its instance connection, which goes back to the idle
/// stack once the body has ended (and is closed if the body is dropped before).
pub struct Http1Body {
    connection: Option<Connection>,
    decoder: Decoder,
    /// The rest of a streamed request body, when the instance answered before it had all of it.
    /// Boxed: most requests have none, and the response body is moved about.
    pump: Option<Box<Pump>>,
    /// Where the connection goes back to, if it may be reused.
    home: Option<(Arc<Http1Client>, SocketAddr)>,
}

impl Http1Body {
    fn empty() -> Self {
        Http1Body { connection: None, decoder: Decoder::length(0), pump: None, home: None }
    }

    fn finish(&mut self) {
        // A request body still being sent: the instance answered early, and the connection is
        // out of step.
        if self.pump.take().is_some() {
            self.home = None;
        }
        if let (Some(mut connection), Some((client, addr))) = (self.connection.take(), self.home.take()) {
            connection.read_size =
                (connection.answer_bytes + READ_SLACK).clamp(*READ_SIZE.start(), *READ_SIZE.end());
            // Bytes past the end of the answer: the connection is out of step, not reusable.
            if connection.buf.is_empty() {
                client.checkin(addr, connection);
            }
        }
    }

    fn fail(&mut self, err: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.connection = None;
        Poll::Ready(Some(Err(err.into())))
    }
}

impl Body for Http1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(connection) = this.connection.as_mut() else { return Poll::Ready(None) };
            if let Some(pump) = &mut this.pump {
                match pump.poll_send(cx, &mut connection.stream) {
                    Poll::Ready(Ok(())) => this.pump = None,
                    Poll::Ready(Err(_)) => (this.pump, this.home) = (None, None),
                    Poll::Pending => {}
                }
            }
            match this.decoder.decode(&mut connection.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::NeedMore) => {}
                Err(err) => return this.fail(err),
            }
            let left = this
                .decoder
                .remaining()
                .map_or(usize::MAX, |left| usize::try_from(left).unwrap_or(usize::MAX));
            let wanted = left.saturating_add(READ_SLACK).clamp(*READ_SIZE.start(), *READ_SIZE.end());
            if connection.buf.capacity() - connection.buf.len() < wanted {
                connection.buf.reserve(wanted);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut connection.stream), cx, &mut connection.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if let Err(err) = this.decoder.closed() {
                        return this.fail(err);
                    }
                }
                Poll::Ready(Ok(n)) => connection.answer_bytes += n,
                Poll::Ready(Err(err)) => return this.fail(err),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.remaining().map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// A streamed request body being written to its connection: chunked, or raw when its length
/// is known, one piece at a time, without waiting (it is polled beside the response).
struct Pump {
    body: ClientBody,
    /// Bytes the body still owes, when it declared its length; `None`: chunked.
    owed: Option<u64>,
    piece: Option<Piece>,
    ended: bool,
}

/// One piece on the wire: a chunk's size line, its data and its CRLF (or the data alone).
struct Piece {
    size_line: Option<ChunkSizeLine>,
    data: Bytes,
    tail: &'static [u8],
    written: usize,
}

impl Piece {
    fn len(&self) -> usize {
        self.size_line.as_ref().map_or(0, |line| line.as_bytes().len()) + self.data.len() + self.tail.len()
    }
}

impl Pump {
    fn new(body: ClientBody, length: Option<u64>) -> Self {
        Pump { body, owed: length, piece: None, ended: false }
    }

    /// Writes what it can; `Ready(Ok)` once the whole body is on the wire. What TLS still
    /// holds is flushed before the body is asked for more, so no piece waits unsent.
    fn poll_send(&mut self, cx: &mut Context<'_>, stream: &mut UpstreamStream) -> Poll<Result<(), Failure>> {
        loop {
            if let Some(piece) = &mut self.piece {
                let size_line = piece.size_line.as_ref().map_or(&[][..], ChunkSizeLine::as_bytes);
                let mut slices =
                    [IoSlice::new(size_line), IoSlice::new(&piece.data), IoSlice::new(piece.tail)];
                let mut unwritten = &mut slices[..];
                IoSlice::advance_slices(&mut unwritten, piece.written);
                match std::task::ready!(Pin::new(&mut *stream).poll_write_vectored(cx, unwritten)) {
                    Ok(0) => {
                        return Poll::Ready(Err(Failure::Failed(
                            "the instance takes no more of the body".into(),
                        )))
                    }
                    Ok(n) => piece.written += n,
                    Err(err) => return Poll::Ready(Err(Failure::Failed(err.into()))),
                }
                if piece.written == piece.len() {
                    self.piece = None;
                }
                continue;
            }
            if let Err(err) = std::task::ready!(Pin::new(&mut *stream).poll_flush(cx)) {
                return Poll::Ready(Err(Failure::Failed(err.into())));
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                None => {
                    self.ended = true;
                    match self.owed {
                        None => {
                            let last =
                                Piece { size_line: None, data: Bytes::new(), tail: b"0\r\n\r\n", written: 0 };
                            self.piece = Some(last);
                        }
                        Some(0) => {}
                        Some(_) => {
                            return Poll::Ready(Err(Failure::ClientBody(
                                "the request body ended before its length".into(),
                            )))
                        }
                    }
                }
                Some(Err(err)) => return Poll::Ready(Err(Failure::ClientBody(err))),
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    if data.is_empty() {
                        continue;
                    }
                    let piece = match &mut self.owed {
                        None => Piece {
                            size_line: Some(ChunkSizeLine::new(data.len())),
                            data,
                            tail: b"\r\n",
                            written: 0,
                        },
                        Some(owed) => {
                            *owed = owed.checked_sub(data.len() as u64).ok_or_else(|| {
                                Failure::ClientBody("the request body is longer than its length".into())
                            })?;
                            Piece { size_line: None, data, tail: b"", written: 0 }
                        }
                    };
                    self.piece = Some(piece);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::server::test_body_of;

    /// An instance that, for each connection in turn, reads until `until` has arrived (or the
    /// peer closed), answers `answer`, and then does what `then` says.
    async fn instance(
        script: Vec<(&'static str, &'static str, Then)>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            let mut heard = Vec::new();
            for (until, answer, then) in script {
                let Ok((mut socket, _)) = listener.accept().await else { break };
                let mut seen = Vec::new();
                while !String::from_utf8_lossy(&seen).contains(until) {
                    let mut buf = [0u8; 4096];
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(answer.as_bytes()).await;
                match then {
                    Then::Close => {}
                    Then::Echo => {
                        let mut buf = [0u8; 64];
                        if let Ok(n @ 1..) = socket.read(&mut buf).await {
                            let _ = socket.write_all(&buf[..n]).await;
                        }
                    }
                    Then::HangUpOnNext => {
                        let mut buf = [0u8; 4096];
                        let _ = socket.read(&mut buf).await;
                    }
                }
                heard.push(String::from_utf8_lossy(&seen).into_owned());
            }
            heard
        });
        (addr, task)
    }

    enum Then {
        Close,
        Echo,
        /// Read the next request on the same connection, then close without an answer.
        HangUpOnNext,
    }

    fn parts(method: Method) -> Parts {
        http::Request::builder()
            .method(method)
            .uri("/up")
            .header(HOST, "x")
            .body(())
            .expect("request")
            .into_parts()
            .0
    }

    #[tokio::test]
    async fn a_streamed_body_goes_chunked_and_the_answer_comes_back() {
        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (addr, heard) = instance(vec![("0\r\n\r\n", answer, Then::Close)]).await;
        let client = Http1Client::new(Duration::from_secs(1), Transport::Plain);
        let body = test_body_of(None, vec![Ok(Bytes::from("hello ")), Ok(Bytes::from("world"))]);
        let authority = Authority::try_from(addr.to_string()).expect("authority");
        let sent = client
            .send(
                Target { addr, authority: &authority, name: "127.0.0.1" },
                &parts(Method::POST),
                &[],
                Outgoing::Streamed(ClientBody::Http1(body)),
            )
            .await;
        let response = sent.expect("answered");
        let body = response.into_body().collect().await.ok().map(|b| b.to_bytes());
        assert_eq!(body.as_deref(), Some(&b"ok"[..]));
        let heard = heard.await.expect("instance");
        assert!(heard[0].contains("transfer-encoding: chunked\r\n"), "{heard:?}");
        assert!(heard[0].ends_with("\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"), "{heard:?}");
    }

    #[tokio::test]
    async fn a_body_that_fails_on_the_clients_side_is_the_clients_error() {
        let (addr, _heard) = instance(vec![("never", "", Then::Close)]).await;
        let client = Http1Client::new(Duration::from_secs(1), Transport::Plain);
        let body = test_body_of(Some(10), vec![Ok(Bytes::from("abc")), Err("the client went away".into())]);
        let authority = Authority::try_from(addr.to_string()).expect("authority");
        let sent = client
            .send(
                Target { addr, authority: &authority, name: "127.0.0.1" },
                &parts(Method::PUT),
                &[],
                Outgoing::Streamed(ClientBody::Http1(body)),
            )
            .await;
        assert!(matches!(sent, Err(SendError::ClientBody(_))), "{:?}", sent.err());
    }

    #[tokio::test]
    async fn a_reused_connection_closed_before_answering_is_stale_and_a_new_one_failed() {
        // One connection answers its first request, then hangs up on the next; a second
        // connection hangs up on its first.
        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let script = vec![("\r\n\r\n", answer, Then::HangUpOnNext), ("\r\n\r\n", "", Then::Close)];
        let (addr, _heard) = instance(script).await;
        let client = Http1Client::new(Duration::from_secs(1), Transport::Plain);
        let authority = Authority::try_from(addr.to_string()).expect("authority");
        let send = |client: Arc<Http1Client>| {
            let authority = authority.clone();
            async move {
                client
                    .send(
                        Target { addr, authority: &authority, name: "127.0.0.1" },
                        &parts(Method::GET),
                        &[],
                        Outgoing::Whole(Bytes::new()),
                    )
                    .await
            }
        };
        let first = send(Arc::clone(&client)).await.expect("answered");
        drop(first.into_body().collect().await);
        assert!(
            matches!(send(Arc::clone(&client)).await, Err(SendError::Stale)),
            "reused, then closed unanswered"
        );
        assert!(
            matches!(send(Arc::clone(&client)).await, Err(SendError::Failed(_))),
            "new, then closed unanswered"
        );
    }

    #[tokio::test]
    async fn after_a_101_the_connection_belongs_to_the_upgrade() {
        let answer = "HTTP/1.1 101 Switching Protocols\r\nupgrade: echo\r\nconnection: upgrade\r\n\r\nhi";
        let (addr, _heard) = instance(vec![("\r\n\r\n", answer, Then::Echo)]).await;
        let client = Http1Client::new(Duration::from_secs(1), Transport::Plain);
        let authority = Authority::try_from(addr.to_string()).expect("authority");
        let mut request = parts(Method::GET);
        request.headers.insert("connection", http::HeaderValue::from_static("upgrade"));
        request.headers.insert("upgrade", http::HeaderValue::from_static("echo"));
        let response = client
            .send(
                Target { addr, authority: &authority, name: "127.0.0.1" },
                &request,
                &[],
                Outgoing::Whole(Bytes::new()),
            )
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let upgrade = response.extensions().get::<UpstreamUpgrade>().and_then(UpstreamUpgrade::take);
        let mut upgraded = upgrade.expect("the connection");
        let mut first = [0u8; 2];
        upgraded.read_exact(&mut first).await.expect("what followed the head");
        assert_eq!(&first, b"hi");
        upgraded.write_all(b"ping").await.expect("write");
        let mut echoed = [0u8; 4];
        upgraded.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"ping");
    }
}
