//! What the gateway's server and client share on the wire beyond the framing in
//! `surge_http1`: vectored writes to a socket.

use std::io::{self, IoSlice};

use tokio::net::TcpStream;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Writes all of `bufs`. It takes the stream shared, so that two parts of one task (a response
/// and a `100 Continue`) can both write without owning it.
pub(crate) async fn write_all(stream: &TcpStream, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
