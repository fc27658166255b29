//! One HTTP/1.1 client connection: read a head, run the request through the gateway while its
//! body streams in, write the response, repeat. Between requests the connection holds no
//! buffer and no request state, so an idle keep-alive connection costs a small task and a
//! socket (nginx's design; hyper keeps its buffers for the connection's life).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::io::AsyncReadExt;

use surge_config::ClientTimeouts;
use surge_http1::encode::{response_framing, write_response_head};
use surge_http1::head::parse_request;
use surge_http1::{
    BodyFraming, ChunkSizeLine, Decoded, Decoder, Exchange, HeadError, RequestFraming, RequestHead,
};

use super::drain::Watch;
use super::head;
use super::io::{
    request_body, BodyError, BodySender, ClientAddr, ClientBody, ClientUpgrade, Held, Holding, Upgraded,
};
use super::{HttpService, ResponseBody};
use crate::problem::problem;
use crate::wire::{boxed, read_buf, read_now, write_all, BoxError, Prefixed, Socket};

/// The first read buffer for a request head (nginx: 1 KiB; a malloc of this size is served from
/// its per-thread cache); it grows up to `surge_http1::MAX_HEAD_BYTES`.
const HEAD_BUFFER: usize = 1024;
/// How much room a read for body bytes asks for.
const BODY_BUFFER: usize = 64 * 1024;
/// A body the gateway answered without reading is read and dropped, up to this much, so the
/// connection can be kept; a longer one closes it.
const DRAIN_LIMIT: u64 = 256 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How much earlier than its deadline an idle wait's timer may stay rather than be moved
/// (nginx: 300 ms); at most a quarter of the timeout, so a short one is not cut short.
const IDLE_TIMER_SLACK: Duration = Duration::from_millis(300);

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Serves requests on `socket` until the client closes, an exchange ends the connection, or
/// shutdown begins; a client that opens with the HTTP/2 preface is handed to the HTTP/2
/// server.
///
/// This future is the connection's task, held for as long as the connection is open, so it
/// is kept small: what it is given it owns and uses in place (a plain `fn` returning an
/// `async` block, since an `async fn` keeps its arguments twice, as they came and as the
/// locals they are moved into), it waits for a request with no future for the socket's
/// readiness, and everything from the request's first bytes to its response runs in one
/// boxed future, which exists only while a request does.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice in a future every connection's task keeps"
)]
pub(super) fn serve<S: HttpService<B>, B: ResponseBody, C: Socket>(
    mut service: S,
    socket: C,
    client: ClientAddr,
    timeouts: Arc<ClientTimeouts>,
    mut shutdown: Watch,
    mut held: Option<Held>,
) -> impl Future<Output = ()> {
    async move {
        let mut buf = BytesMut::new();
        let mut first = true;
        // One timer for the connection's idle waits, moved lazily to each wait's deadline
        // (`set_idle_timer`): cheaper than a new one per request.
        let idle = tokio::time::sleep(timeouts.head);
        tokio::pin!(idle);
        let ending = 'serving: loop {
            if buf.is_empty() {
                set_idle_timer(idle.as_mut(), if first { timeouts.head } else { timeouts.keepalive });
                // Waits for the next request's first bytes holding no buffer. A read that
                // drained the socket cleared its readiness, so this waits for the kernel's word;
                // readiness left by a read that filled its buffer costs one read that finds
                // nothing, after which the wait goes on to the same deadline. A buffer is kept
                // only once bytes are really there. The socket's readiness is polled, not
                // awaited as a future the wait would keep.
                loop {
                    buf = BytesMut::new();
                    // One poll over all three, not a `select!`, which would keep its futures.
                    let woke = std::future::poll_fn(|cx| {
                        if let Poll::Ready(ready) = socket.poll_read_ready(cx) {
                            return Poll::Ready(Some(ready));
                        }
                        if shutdown.poll_draining(cx).is_ready() || idle.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(None);
                        }
                        Poll::Pending
                    });
                    match woke.await {
                        Some(Ok(())) => {}
                        Some(Err(_)) => return,
                        None => break 'serving Ending::Close,
                    }
                    buf.reserve(HEAD_BUFFER);
                    match read_now(&socket, &mut buf) {
                        Ok(0) => return,
                        Ok(_) => break,
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
            }
            let outcome =
                boxed(|| request(&mut service, &socket, &mut buf, first, &client, &timeouts, &shutdown))
                    .await;
            first = false;
            break match outcome {
                Outcome::KeepAlive if !shutdown.is_draining() => continue,
                Outcome::KeepAlive | Outcome::Close => Ending::Close,
                Outcome::Gone => return,
                Outcome::CloseUnread => Ending::Linger,
                Outcome::Refused(err) => Ending::Refuse(err),
                Outcome::Http2 => Ending::Http2,
                Outcome::Upgraded(upgrade) => {
                    let tunnel = Prefixed::new(buf.split().freeze(), socket);
                    let _ = upgrade.send(match held.take() {
                        Some(held) => Box::new(Holding::new(tunnel, held)),
                        None => Box::new(tunnel),
                    });
                    return;
                }
            };
        };
        // Every way out is boxed: each is taken once per connection, and inline they would
        // enlarge the future every idle connection keeps.
        match ending {
            Ending::Close => Box::pin(close(socket)).await,
            Ending::Linger => Box::pin(linger(socket)).await,
            Ending::Refuse(err) => Box::pin(refuse(socket, err, timeouts.send)).await,
            Ending::Http2 => {
                let stream = Prefixed::new(buf.freeze(), socket);
                Box::pin(super::serve_h2(service, stream, client, *timeouts, shutdown)).await;
            }
        }
    }
}

/// Sets the idle wait's timer to `timeout` from now: moved if that is earlier than where it is,
/// or more than min(`IDLE_TIMER_SLACK`, timeout / 4) later (nginx's lazy timers), so a wait
/// ends at most that much early, never late. Between back-to-back requests it stays put, as
/// moving it takes the timer wheel's lock. A function, so that none of this is kept in the
/// connection's future.
#[inline]
fn set_idle_timer(idle: Pin<&mut tokio::time::Sleep>, timeout: Duration) {
    let until = tokio::time::Instant::now() + timeout;
    let deadline = idle.deadline();
    if deadline > until || until - deadline > IDLE_TIMER_SLACK.min(timeout / 4) {
        idle.reset(until);
    }
}

/// How a connection that is not simply gone ends.
enum Ending {
    Close,
    /// Close, though the client may still be sending a request body.
    Linger,
    /// Answer a head that cannot be served, then close.
    Refuse(HeadError),
    /// The client opened with the HTTP/2 preface: serve it as h2c from these bytes on.
    Http2,
}

#[expect(
    clippy::large_enum_variant,
    reason = "a return value on the stack; boxing would allocate per request"
)]
enum HeadRead {
    Head(RequestHead),
    Http2,
}

/// Reads until `buf` holds a whole request head (or the HTTP/2 preface, on a connection's
/// first bytes). `Ok(None)`: the client closed.
async fn read_head(
    socket: &impl Socket,
    buf: &mut BytesMut,
    first: bool,
) -> Result<Option<HeadRead>, HeadError> {
    loop {
        if first && !buf.is_empty() && head::may_be_h2_preface(buf) {
            if buf.len() >= head::H2_PREFACE.len() {
                return Ok(Some(HeadRead::Http2));
            }
        } else if let Some(head) = parse_request(buf)? {
            return Ok(Some(HeadRead::Head(head)));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(HEAD_BUFFER.max(buf.len()));
        }
        match read_buf(socket, buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Answers a head that cannot be served (400, 431 or 501), then closes. Boxed by the caller: it is
/// rare, and its state should not enlarge every connection's task.
async fn refuse(socket: impl Socket, err: HeadError, send_timeout: Duration) {
    let exchange = Exchange { head_request: false, version: http::Version::HTTP_11, keep_alive: false };
    let code = match err {
        HeadError::Malformed(_) => "bad_request_head",
        HeadError::TooLarge | HeadError::TooManyHeaders => "request_head_too_large",
        HeadError::UnsupportedCoding => "unsupported_transfer_coding",
    };
    let response = problem(err.status(), code, &err.to_string()).map(http_body_util::Full::new);
    let _ = write_response(&socket, response, &exchange, &Progress::default(), send_timeout).await;
    linger(socket).await;
}

/// What the two halves of an exchange tell each other (one task; atomics only to keep the
/// future `Send`).
#[derive(Default)]
struct Progress {
    /// The response has begun: no `100 Continue` may be written any more.
    head_started: AtomicBool,
    /// The request body could not be read whole.
    body_failed: AtomicBool,
}

/// How a request left the connection.
enum Outcome {
    KeepAlive,
    Close,
    /// The client closed, or its head did not come in time.
    Gone,
    /// The head cannot be served.
    Refused(HeadError),
    /// The client opened with the HTTP/2 preface.
    Http2,
    /// Close, though the client may still be sending the request body.
    CloseUnread,
    /// `101 Switching Protocols` was written: the connection now belongs to the upgrade.
    Upgraded(tokio::sync::oneshot::Sender<Box<dyn Upgraded>>),
}

/// The request body's side of an exchange.
struct Receiving {
    decoder: Decoder,
    /// The body was asked for (so a `100 Continue`, if expected, was sent).
    wanted: bool,
    /// The body could not be read whole: the connection cannot carry another request.
    broken: bool,
}

/// One request, from its first bytes in `buf` to its response. Boxed by the caller, so that a
/// connection between requests holds none of this state; one future from the head's read to
/// the response, so that nothing of it is moved from future to future. `shutdown`, once
/// draining, makes it the connection's last.
async fn request<S: HttpService<B>, B: ResponseBody>(
    service: &mut S,
    socket: &impl Socket,
    buf: &mut BytesMut,
    first: bool,
    client: &ClientAddr,
    timeouts: &ClientTimeouts,
    shutdown: &Watch,
) -> Outcome {
    let head = match crate::wire::bounded(timeouts.head, read_head(socket, buf, first)).await {
        Ok(Ok(Some(HeadRead::Head(head)))) => head,
        Ok(Ok(Some(HeadRead::Http2))) => return Outcome::Http2,
        Ok(Err(err)) => return Outcome::Refused(err),
        Ok(Ok(None)) | Err(_) => return Outcome::Gone,
    };
    let RequestHead { request, framing, keep_alive: client_keeps, expect_continue, upgrade } = head;
    let exchange = Exchange {
        head_request: request.method() == Method::HEAD,
        version: request.version(),
        keep_alive: !shutdown.is_draining() && client_keeps,
    };
    let decoder = framing.decoder();
    let (body, sender) = match framing {
        RequestFraming::Empty => (ClientBody::Empty, None),
        RequestFraming::Length(_) | RequestFraming::Chunked => {
            let (body, sender) = request_body(decoder.remaining());
            (ClientBody::Http1(body), Some(sender))
        }
    };
    let mut request = request.map(|()| body);
    request.extensions_mut().insert(client.clone());
    let upgrade = upgrade.then(|| {
        let (client_side, sender) = ClientUpgrade::new();
        request.extensions_mut().insert(client_side);
        sender
    });
    let mut receiving = Receiving { decoder, wanted: false, broken: false };
    let progress = Progress::default();
    let responded = {
        // Pinned where they are built: `tokio::pin!` on a future already built moved it, and
        // `respond`'s space (the service's future within) is nearly 2 KiB.
        let mut receive = std::pin::pin!(receive_body(
            socket,
            buf,
            &mut receiving,
            sender,
            expect_continue,
            &progress,
            timeouts.body
        ));
        let mut respond = std::pin::pin!(async {
            let Ok(()) = std::future::poll_fn(|cx| service.poll_ready(cx)).await;
            let Ok(response) = service.call(request).await;
            write_response(socket, response, &exchange, &progress, timeouts.send).await
        });
        let mut received = false;
        loop {
            tokio::select! {
                biased;
                responded = &mut respond => break responded,
                () = &mut receive, if !received => received = true,
            }
        }
    };
    let Ok(end) = responded else { return Outcome::Close };
    if let (true, Some(upgrade)) = (end.switched, upgrade) {
        return Outcome::Upgraded(upgrade);
    }
    let unread = !receiving.decoder.is_done();
    if !end.keep_alive || receiving.broken {
        return if unread { Outcome::CloseUnread } else { Outcome::Close };
    }
    if unread {
        // Answered without the whole body: a client waiting for `100 Continue` may never send
        // it; any other's rest is read and dropped, if short, to keep the connection.
        let short = receiving.decoder.remaining().is_some_and(|r| r <= DRAIN_LIMIT);
        if (expect_continue && !receiving.wanted) || !short {
            return Outcome::CloseUnread;
        }
        // Boxed: rare, and inline it would not share its space with the exchange's own.
        let drained =
            Box::pin(tokio::time::timeout(DRAIN_TIMEOUT, drain(socket, buf, &mut receiving.decoder))).await;
        if !matches!(drained, Ok(Ok(()))) {
            return Outcome::CloseUnread;
        }
    }
    Outcome::KeepAlive
}

/// Feeds the request body to its reader, once it is asked for and one piece ahead at most.
async fn receive_body(
    socket: &impl Socket,
    buf: &mut BytesMut,
    receiving: &mut Receiving,
    sender: Option<BodySender>,
    expect_continue: bool,
    progress: &Progress,
    stall: Duration,
) {
    let Some(BodySender { pieces, wanted }) = sender else { return };
    let Ok(limit) = wanted.await else {
        return; // dropped unread
    };
    let mut received = 0u64;
    receiving.wanted = true;
    if expect_continue && !progress.head_started.load(Ordering::Relaxed) {
        // Nothing of the response is written yet, so the socket's empty send buffer takes
        // these few bytes in one write; should it not, the connection is given up.
        if !matches!(socket.try_write(CONTINUE), Ok(n) if n == CONTINUE.len()) {
            receiving.broken = true;
            return;
        }
        // Over TLS the bytes may still sit encrypted in the socket: they must reach the client,
        // which waits for them before it sends the body.
        if !matches!(tokio::time::timeout(stall, socket.flushed()).await, Ok(Ok(()))) {
            receiving.broken = true;
            return;
        }
    }
    loop {
        let failure: BoxError = match receiving.decoder.decode(buf) {
            Ok(Decoded::Data(data)) => {
                received += data.len() as u64;
                if received > limit {
                    Box::new(BodyError::TooLarge(limit))
                } else if pieces.send(Ok(data)).await.is_err() {
                    return; // the reader stopped; what is left is drained or the connection closed
                } else {
                    continue;
                }
            }
            Ok(Decoded::Done) => return,
            Ok(Decoded::NeedMore) => {
                if buf.capacity() - buf.len() < HEAD_BUFFER {
                    buf.reserve(BODY_BUFFER);
                }
                match tokio::time::timeout(stall, read_buf(socket, buf)).await {
                    Ok(Ok(0)) => "the client closed the connection before the end of the body".into(),
                    Ok(Ok(_)) => continue,
                    Ok(Err(err)) => err.into(),
                    Err(_) => Box::new(BodyError::Stalled(stall)),
                }
            }
            Err(err) => err.into(),
        };
        receiving.broken = true;
        progress.body_failed.store(true, Ordering::Relaxed);
        let _ = pieces.send(Err(failure)).await;
        return;
    }
}

/// Ends a connection the gateway is done with: over TLS a close_notify goes first, so the
/// client can tell the end of a response delimited by the close from a cut.
async fn close(socket: impl Socket) {
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, socket.close()).await;
}

/// Closes a connection the client may still be sending on: half-close, then read and drop
/// what comes for a moment, so that unread bytes do not make the kernel answer with a reset
/// that can destroy the response before the client has read it (nginx's lingering close).
async fn linger(mut socket: impl Socket) {
    use tokio::io::AsyncWriteExt;
    // Bounded: over TLS the shutdown sends close_notify, which a client that stopped reading
    // would never take.
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, socket.shutdown()).await;
    let mut scratch = vec![0u8; 16 * 1024];
    let lingering = async {
        let mut dropped = 0;
        while dropped < DRAIN_LIMIT * 4 {
            match socket.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => dropped += n as u64,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT * 2, lingering).await;
}

/// Reads and drops the rest of a body nobody read.
async fn drain(socket: &impl Socket, buf: &mut BytesMut, decoder: &mut Decoder) -> io::Result<()> {
    loop {
        match decoder.decode(buf) {
            Ok(Decoded::Data(_)) => {}
            Ok(Decoded::Done) => return Ok(()),
            Ok(Decoded::NeedMore) => {
                if buf.capacity() == buf.len() {
                    buf.reserve(HEAD_BUFFER);
                }
                if read_buf(socket, buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
            Err(err) => return Err(io::Error::new(io::ErrorKind::InvalidData, err)),
        }
    }
}

struct ResponseEnd {
    keep_alive: bool,
    switched: bool,
}

/// Writes the response: its head with the first piece of body when that is ready at once (one
/// write for most responses), then each piece as it comes.
async fn write_response<B: ResponseBody>(
    socket: &impl Socket,
    response: Response<B>,
    exchange: &Exchange,
    progress: &Progress,
    stall: Duration,
) -> io::Result<ResponseEnd> {
    let (parts, mut body) = response.into_parts();
    // A request body that failed leaves the connection unusable: say so in the head.
    let exchange = &Exchange {
        keep_alive: exchange.keep_alive && !progress.body_failed.load(Ordering::Relaxed),
        ..*exchange
    };
    let framing = response_framing(parts.status, &parts.headers, body.size_hint().exact(), exchange);
    let switched = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    // Room for a typical head: an instance's dozen fields and ours.
    let mut head = Vec::with_capacity(512);
    write_response_head(&mut head, parts.status, &parts.headers, framing, exchange, &head::http_date());
    progress.head_started.store(true, Ordering::Relaxed);
    let end = ResponseEnd { keep_alive: exchange.keep_alive && framing != BodyFraming::Close, switched };
    if framing == BodyFraming::None {
        write_all(socket, &mut [IoSlice::new(&head)], Some(stall)).await?;
        return Ok(end);
    }
    let chunked = framing == BodyFraming::Chunked;
    let mut head = Some(head);
    let mut written = 0u64;
    loop {
        let frame = match &head {
            // Poll once: the head waits for the first piece only if that is ready now.
            Some(_) => tokio::select! {
                biased;
                frame = body.frame() => frame,
                () = std::future::ready(()) => {
                    if let Some(head) = head.take() {
                        write_all(socket, &mut [IoSlice::new(&head)], Some(stall)).await?;
                    }
                    continue;
                }
            },
            None => body.frame().await,
        };
        let data = match frame {
            None => break,
            Some(Err(err)) => return Err(io::Error::other(err.into())),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue, // trailers are not forwarded to HTTP/1.1 clients
            },
        };
        written += data.len() as u64;
        if let BodyFraming::Length(length) = framing {
            if written > length {
                return Err(io::Error::other("the response body is longer than its Content-Length"));
            }
        }
        let last = chunked && body.is_end_stream();
        let size_line = ChunkSizeLine::new(data.len());
        let (size_line, tail): (&[u8], &[u8]) = match (chunked, last) {
            (false, _) => (&[], &[]),
            (true, false) => (size_line.as_bytes(), b"\r\n"),
            (true, true) => (size_line.as_bytes(), b"\r\n0\r\n\r\n"),
        };
        let head_bytes = head.as_deref().unwrap_or_default();
        let mut slices =
            [IoSlice::new(head_bytes), IoSlice::new(size_line), IoSlice::new(&data), IoSlice::new(tail)];
        write_all(socket, &mut slices, Some(stall)).await?;
        head = None;
        if last {
            return Ok(end);
        }
    }
    let head_bytes = head.as_deref().unwrap_or_default();
    let mut slices = [IoSlice::new(head_bytes), IoSlice::new(if chunked { LAST_CHUNK } else { &[] })];
    write_all(socket, &mut slices, Some(stall)).await?;
    match framing {
        BodyFraming::Length(length) if written != length => {
            Err(io::Error::other("the response body ended before its Content-Length"))
        }
        _ => Ok(end),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_is_moved_only_when_it_would_fire_more_than_a_moment_early() {
        let keepalive = Duration::from_secs(5);
        let idle = tokio::time::sleep(keepalive);
        tokio::pin!(idle);
        let set = idle.deadline();
        tokio::time::advance(IDLE_TIMER_SLACK / 2).await;
        set_idle_timer(idle.as_mut(), keepalive);
        assert_eq!(idle.deadline(), set, "kept: it ends the wait at most the slack early");
        tokio::time::advance(IDLE_TIMER_SLACK).await;
        set_idle_timer(idle.as_mut(), keepalive);
        assert_eq!(idle.deadline(), tokio::time::Instant::now() + keepalive, "moved");
        // A shorter timeout than the one set is never waited past.
        set_idle_timer(idle.as_mut(), Duration::from_secs(1));
        assert_eq!(idle.deadline(), tokio::time::Instant::now() + Duration::from_secs(1));
        // A short timeout is cut short by a quarter of itself at most.
        let short = Duration::from_millis(100);
        set_idle_timer(idle.as_mut(), short);
        let set = idle.deadline();
        tokio::time::advance(short / 4).await;
        set_idle_timer(idle.as_mut(), short);
        assert_eq!(idle.deadline(), set, "25 ms early is a quarter: kept");
        tokio::time::advance(Duration::from_millis(1)).await;
        set_idle_timer(idle.as_mut(), short);
        assert_eq!(idle.deadline(), tokio::time::Instant::now() + short, "26 ms early is more: moved");
    }
}
