//! A TLS connection as a [`Socket`]: rustls' connection state driven over the TCP stream with
//! the same non-blocking reads, writes and readiness as plain TCP, so that the HTTP/1.1 loop,
//! upgrades and hyper's HTTP/2 all run over it unchanged. tokio-rustls does the handshake;
//! after it the connection is ours. Clients' connections are its server side; instances'
//! (`protocol = "https"`) its client side, under the gateway's own HTTP/1.1 client.
//!
//! Plaintext is read straight out of rustls; encrypted bytes go to the kernel as soon as
//! they are made, and whatever the kernel does not take yet waits inside rustls until
//! [`Socket::flushed`] (which every whole write ends with) or the next write sends it.

use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use rustls::Connection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::wire::{read_clearing, Socket};

/// A client gets this long to finish its handshake (nginx: `ssl_handshake_timeout`, 60 s).
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pieces of one write up to this size are encrypted as one record, not one record each.
const COALESCE: usize = 16 * 1024;

pub struct TlsSocket {
    tcp: TcpStream,
    state: Mutex<State>,
}

struct State {
    tls: Connection,
    /// The peer closed its side of the TCP connection.
    eof: bool,
    close_notify_sent: bool,
    /// Where small pieces of one write are joined.
    joined: Vec<u8>,
}

impl TlsSocket {
    /// Runs the server side of a handshake on `tcp`, within [`HANDSHAKE_TIMEOUT`].
    pub(crate) async fn accept(config: Arc<rustls::ServerConfig>, tcp: TcpStream) -> io::Result<Self> {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let (tcp, tls) = stream.into_inner();
        let socket = TlsSocket::new(tcp, Connection::Server(tls));
        // Session tickets may still wait to be sent; the handshake's time bounds them too.
        tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.flushed())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(socket)
    }

    /// The gateway's side of a connection to an instance, once its handshake is done.
    pub(crate) fn client(stream: tokio_rustls::client::TlsStream<TcpStream>) -> Self {
        let (tcp, tls) = stream.into_inner();
        TlsSocket::new(tcp, Connection::Client(tls))
    }

    fn new(tcp: TcpStream, tls: Connection) -> Self {
        let state = State { tls, eof: false, close_notify_sent: false, joined: Vec::new() };
        TlsSocket { tcp, state: Mutex::new(state) }
    }

    /// No plaintext, alert or close has arrived, so a kept-alive connection can be reused.
    /// Handshake messages that come late (TLS 1.3 session tickets) are taken in on the way.
    pub(crate) fn is_quiet(&self) -> bool {
        matches!(self.lock().fill(&self.tcp), Err(err) if err.kind() == io::ErrorKind::WouldBlock)
    }

    /// Whether the client chose HTTP/2 by ALPN.
    pub(crate) fn negotiated_h2(&self) -> bool {
        self.lock().tls.alpn_protocol() == Some(b"h2")
    }

    /// Readiness as far as the bytes already received tell: `None` when the kernel must be
    /// waited for (its readiness then cleared).
    fn filled(&self) -> Option<io::Result<()>> {
        match self.lock().fill(&self.tcp) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => None,
            result => Some(result.map(drop)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is only ever used by the connection's own task; a panic there ends the
        // connection, so a poisoned lock is simply taken over.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Makes plaintext ready to read: `Ok(n)` bytes are, `Ok(0)` the peer closed, `WouldBlock`
    /// the kernel has nothing more yet (and its readiness is cleared).
    fn fill(&mut self, tcp: &TcpStream) -> io::Result<usize> {
        loop {
            let state = match self.tls.process_new_packets() {
                Ok(state) => state,
                Err(err) => {
                    // rustls queued an alert saying why; send it if the kernel takes it.
                    let _ = self.flush(tcp);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, err));
                }
            };
            if self.tls.wants_write() {
                // A key update or alert to answer: best effort, writes finish the rest.
                match self.flush(tcp) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Err(err),
                }
            }
            if state.plaintext_bytes_to_read() > 0 {
                return Ok(state.plaintext_bytes_to_read());
            }
            if state.peer_has_closed() {
                return Ok(0);
            }
            if self.eof {
                // An instance's answer cut off by a bare TCP end is not one that ended: only
                // close_notify ends a TLS stream. Clients closing without it just close.
                if matches!(self.tls, Connection::Client(_)) {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the instance closed TLS without close_notify",
                    ));
                }
                return Ok(0);
            }
            if self.tls.read_tls(&mut Kernel(tcp))? == 0 {
                self.eof = true;
            }
        }
    }

    /// Reads the `ready` bytes of plaintext, or as many as fit, into `dst`'s spare room.
    fn read_into(&mut self, dst: &mut BytesMut, ready: usize) -> io::Result<usize> {
        let start = dst.len();
        // Zeroed first, as safe code must; only as much as there is to read.
        dst.resize(start + ready.min(dst.capacity() - start), 0);
        let read = self.tls.reader().read(&mut dst[start..]);
        dst.truncate(start + *read.as_ref().unwrap_or(&0));
        read
    }

    /// Queues close_notify, once.
    fn say_goodbye(&mut self) {
        if !self.close_notify_sent {
            self.close_notify_sent = true;
            self.tls.send_close_notify();
        }
    }

    /// Hands every encrypted byte to the kernel; `WouldBlock` when it takes no more yet.
    fn flush(&mut self, tcp: &TcpStream) -> io::Result<()> {
        while self.tls.wants_write() {
            if self.tls.write_tls(&mut Kernel(tcp))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Encrypts what `bufs` holds once the earlier bytes are sent, and sends what it can.
    fn write(&mut self, tcp: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.flush(tcp)?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let written = if bufs.len() > 1 && total <= COALESCE {
            self.joined.clear();
            bufs.iter().for_each(|b| self.joined.extend_from_slice(b));
            self.tls.writer().write(&self.joined)?
        } else {
            self.tls.writer().write_vectored(bufs)?
        };
        match self.flush(tcp) {
            Err(err) if err.kind() != io::ErrorKind::WouldBlock => Err(err),
            _ => Ok(written),
        }
    }
}

/// The TCP stream as rustls' `Read` and `Write`, never waiting.
struct Kernel<'a>(&'a TcpStream);

impl Read for Kernel<'_> {
    /// A short read clears the stream's readiness, as for plain sockets (`wire::read_now`).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let tcp = self.0;
        let room = buf.len();
        read_clearing(room, |read| tcp.try_io(tokio::io::Interest::READABLE, read), || tcp.try_read(buf))
    }
}

impl Write for Kernel<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Socket for TlsSocket {
    async fn readable(&self) -> io::Result<()> {
        loop {
            if let Some(filled) = self.filled() {
                return filled;
            }
            self.tcp.readable().await?;
        }
    }

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(filled) = self.filled() {
                return Poll::Ready(filled);
            }
            ready!(self.tcp.poll_read_ready(cx))?;
        }
    }

    async fn writable(&self) -> io::Result<()> {
        self.flushed().await
    }

    async fn flushed(&self) -> io::Result<()> {
        loop {
            match self.lock().flush(&self.tcp) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return result,
            }
            self.tcp.writable().await?;
        }
    }

    async fn close(&self) {
        self.lock().say_goodbye();
        let _ = self.flushed().await;
    }

    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let mut state = self.lock();
        match state.fill(&self.tcp)? {
            0 => Ok(0),
            ready => state.read_into(buf, ready),
        }
    }

    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        self.lock().write(&self.tcp, &[IoSlice::new(bytes)])
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.lock().write(&self.tcp, bufs)
    }

    fn try_read_io<R>(&self, io: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        // The TCP reads inside clear the kernel's readiness themselves when they find nothing.
        io()
    }
}

impl AsyncRead for TlsSocket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            {
                let mut state = self.lock();
                match state.fill(&self.tcp) {
                    Ok(0) => return Poll::Ready(Ok(())),
                    Ok(ready) => {
                        let n = state
                            .tls
                            .reader()
                            .read(buf.initialize_unfilled_to(ready.min(buf.remaining())))?;
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Poll::Ready(Err(err)),
                }
            }
            ready!(self.tcp.poll_read_ready(cx))?;
        }
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.lock().write(&self.tcp, bufs) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.lock().flush(&self.tcp) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.lock().say_goodbye();
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
