//! HTTP/1.1 on the wire, shared by the gateway's server and its client: body framing and
//! vectored writes.

pub(crate) mod decode;

use std::io::{self, IoSlice};
use std::ops::Range;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
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

/// Where `part`, a slice httparse returned, lies in `buf`, the bytes it parsed.
pub(crate) fn span(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// The names of the header fields httparse found in `buf`, and where their values lie, so the
/// values can share the head's bytes once it is split off.
pub(crate) fn header_spans(
    fields: &[httparse::Header<'_>],
    buf: &[u8],
) -> Result<Vec<(HeaderName, Range<usize>)>, String> {
    fields
        .iter()
        .map(|field| {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| format!("invalid header name {:?}", field.name))?;
            Ok((name, span(buf, field.value)))
        })
        .collect()
}

/// The header map of a head, its values slices of `head` (no copies).
pub(crate) fn header_map(head: &Bytes, spans: Vec<(HeaderName, Range<usize>)>) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, range) in spans {
        let value = HeaderValue::from_maybe_shared(head.slice(range))
            .map_err(|_| format!("invalid value of header {name}"))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// Whether a comma-separated header lists `token`, in any case.
pub(crate) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Whether the last transfer coding is chunked, the one framing a message body can end with.
pub(crate) fn chunked_last(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .next_back()
        .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}
