//! What the gateway's HTTP/1.1 server and client need of a connection: readiness, and reads
//! and writes that never wait. Waiting for readiness without a buffer is what lets an idle
//! keep-alive connection hold none. TCP connections serve clients and instances; Unix socket
//! pairs serve the unit tests, which so run the real loops on in-memory connections.

use std::future::Future;
use std::io::{self, IoSlice};

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `make`'s future in a box allocated first, so that the future is built where it stays:
/// `Box::pin(make())` builds it on the stack and copies it into the box, which for a request's
/// future (3.7 KiB) was 1% of a proxied request's instructions.
#[inline(always)]
pub(crate) fn boxed<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Readiness without a future to keep: the socket holds the waker itself, one for reads,
    /// so it serves only a socket one task reads (an idle connection's wait).
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Waits until every byte written is in the kernel's hands: at once for a plain socket,
    /// after the encrypted bytes still held for a TLS one.
    fn flushed(&self) -> impl Future<Output = io::Result<()>> + Send {
        std::future::ready(Ok(()))
    }
    /// Says goodbye before the socket is dropped: nothing for a plain socket (dropping it
    /// sends the FIN), close_notify for a TLS one.
    fn close(&self) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Runs `io` against the socket's read readiness, which a `WouldBlock` from it clears.
    fn try_read_io<R>(&self, io: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! socket {
    ($type:ty) => {
        impl Socket for $type {
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$type>::readable(self)
            }
            fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                <$type>::poll_read_ready(self, cx)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$type>::writable(self)
            }
            fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
                <$type>::try_read_buf(self, buf)
            }
            fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
                <$type>::try_write(self, bytes)
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                <$type>::try_write_vectored(self, bufs)
            }
            fn try_read_io<R>(&self, io: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
                <$type>::try_io(self, tokio::io::Interest::READABLE, io)
            }
        }
    };
}

socket!(tokio::net::TcpStream);
socket!(tokio::net::UnixStream);

/// Reads what is there into `buf` once the socket is readable; `Ok(0)`: the peer closed.
pub async fn read_buf(socket: &impl Socket, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        socket.readable().await?;
        match read_now(socket, buf) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

/// Reads what is there into `buf` without waiting. A read shorter than the room it had drained
/// the socket, so its readiness is cleared (as tokio's own reads do): the next wait for bytes
/// then waits for the kernel's word instead of costing a read that finds nothing. The
/// readiness cleared is the one seen before the read, so bytes that arrive meanwhile are not
/// missed.
pub fn read_now(socket: &impl Socket, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    read_clearing(room, |read| socket.try_read_io(read), || socket.try_read_buf(buf))
}

/// Runs `read` (into `room` bytes) under `under_readiness`, which clears the readiness it saw
/// when the read reports `WouldBlock`: a short read is reported so, then given back as read.
/// Shared by plain sockets and the TCP stream under TLS.
pub(crate) fn read_clearing(
    room: usize,
    under_readiness: impl FnOnce(&mut dyn FnMut() -> io::Result<usize>) -> io::Result<usize>,
    mut read: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut got = None;
    let drained = under_readiness(&mut || {
        let n = read()?;
        got = Some(n);
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (drained, got) {
        (Err(err), Some(n)) if err.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (result, _) => result,
    }
}

/// Waits until `counter` stays the same over a whole `interval`: nothing happened for that
/// long. It counts from zero, so what happened before the first look counts too.
pub(crate) async fn until_unchanged(counter: &std::sync::atomic::AtomicU64, interval: std::time::Duration) {
    let mut seen = 0;
    loop {
        tokio::time::sleep(interval).await;
        let now = counter.load(std::sync::atomic::Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}

/// Writes all of `bufs`. It takes the socket shared, so that two parts of one task (a response
/// and a `100 Continue`) can both write without owning it. With a `stall` bound, a peer that
/// takes no byte for that long fails the write (`TimedOut`); the bound costs a timer only
/// when the socket's buffer is full.
pub async fn write_all(
    socket: &impl Socket,
    mut bufs: &mut [IoSlice<'_>],
    stall: Option<std::time::Duration>,
) -> io::Result<()> {
    let stalled = || io::Error::new(io::ErrorKind::TimedOut, "the peer stopped reading");
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match socket.try_write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => match stall {
                None => socket.writable().await?,
                Some(stall) => {
                    tokio::time::timeout(stall, socket.writable()).await.map_err(|_| stalled())??
                }
            },
            Err(err) => return Err(err),
        }
    }
    match stall {
        None => socket.flushed().await,
        Some(stall) => bounded(stall, socket.flushed()).await.map_err(|_| stalled())?,
    }
}

/// `future` within `limit`. The timer is set up only when `future` first has to wait: what is
/// ready at once (most writes and flushes, a request head already in the buffer) costs none.
/// A future of its own rather than an `async fn` around `tokio::time::timeout`, whose state
/// held `future` twice: this one sits in every request's future while it reads a head.
pub(crate) fn bounded<F: Future>(limit: std::time::Duration, future: F) -> Bounded<F> {
    Bounded { future, timer: None, limit }
}

/// `future` took longer than its limit.
#[derive(Debug)]
pub(crate) struct Elapsed;

pin_project_lite::pin_project! {
    pub(crate) struct Bounded<F> {
        #[pin]
        future: F,
        #[pin]
        timer: Option<tokio::time::Sleep>,
        limit: std::time::Duration,
    }
}

impl<F: Future> Future for Bounded<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if this.timer.is_none() {
            this.timer.set(Some(tokio::time::sleep(*this.limit)));
        }
        match this.timer.as_pin_mut().map(|timer| timer.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(Elapsed)),
            _ => Poll::Pending,
        }
    }
}

/// A connection handed on with bytes already read from it, which it yields first: a client's
/// after `101 Switching Protocols` or once the HTTP/2 preface was seen, an instance's after its
/// `101`.
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    stream: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Bytes, stream: S) -> Self {
        Prefixed { prefix, stream }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::bounded;

    #[tokio::test(start_paused = true)]
    async fn bounded_runs_what_is_ready_at_once_and_times_out_what_waits_too_long() {
        assert_eq!(bounded(Duration::from_secs(1), async { 7 }).await.ok(), Some(7));
        // Pending at the first poll, which sets the timer, then woken within the limit.
        let within = bounded(Duration::from_secs(2), tokio::time::sleep(Duration::from_secs(1))).await;
        assert!(within.is_ok(), "a wait shorter than the limit is not lost");
        let too_long = bounded(Duration::from_secs(1), std::future::pending::<()>()).await;
        assert!(too_long.is_err());
    }
}
