//! The load generator's own HTTP/1.1 exchange: write prepared request bytes, read the answer
//! just far enough to know its status and where it ends. A load generator needs nothing more,
//! and doing only this keeps its cost per request near wrk's, so the target, not the tool, is
//! what gets measured.

use bytes::{Buf, BytesMut};

/// How far a response has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    NeedMore,
    Done { status: u16, keep_alive: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed response: {0}")]
pub struct Malformed(&'static str);

#[derive(Debug, Clone, Copy)]
enum State {
    Head,
    Body { remaining: u64 },
    ChunkSize,
    ChunkData { remaining: u64 },
    ChunkEnd,
    Trailers,
    UntilClose,
}

/// Reads one response from bytes as they arrive. Pure: feed it buffers, it says when the
/// response is complete.
#[derive(Debug)]
pub struct ResponseReader {
    state: State,
    head_request: bool,
    status: u16,
    keep_alive: bool,
}

/// A head larger than this is not a response a load test should wait for.
const MAX_HEAD: usize = 64 * 1024;

impl ResponseReader {
    pub fn new(head_request: bool) -> Self {
        ResponseReader { state: State::Head, head_request, status: 0, keep_alive: true }
    }

    /// Consumes what it can of `buf`.
    pub fn feed(&mut self, buf: &mut BytesMut) -> Result<Progress, Malformed> {
        loop {
            match self.state {
                State::Head => {
                    let mut headers = [httparse::EMPTY_HEADER; 64];
                    let mut response = httparse::Response::new(&mut headers);
                    let length = match response.parse(buf) {
                        Ok(httparse::Status::Complete(length)) => length,
                        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                            return Err(Malformed("response head larger than 64 KiB"))
                        }
                        Ok(httparse::Status::Partial) => return Ok(Progress::NeedMore),
                        Err(_) => return Err(Malformed("invalid response head")),
                    };
                    let status = response.code.unwrap_or(0);
                    let http10 = response.version == Some(0);
                    let (mut chunked, mut content_length, mut close, mut keep_alive) =
                        (false, None, false, false);
                    for header in response.headers.iter() {
                        let value = std::str::from_utf8(header.value).unwrap_or("");
                        if header.name.eq_ignore_ascii_case("content-length") {
                            content_length = Some(
                                value
                                    .trim()
                                    .parse::<u64>()
                                    .map_err(|_| Malformed("invalid content-length"))?,
                            );
                        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked |= value.to_ascii_lowercase().contains("chunked");
                        } else if header.name.eq_ignore_ascii_case("connection") {
                            close |= value.eq_ignore_ascii_case("close");
                            keep_alive |= value.eq_ignore_ascii_case("keep-alive");
                        }
                    }
                    buf.advance(length);
                    if (100..200).contains(&status) && status != 101 {
                        continue; // an interim answer such as 100 Continue: the real one follows
                    }
                    self.status = status;
                    self.keep_alive = if http10 { keep_alive } else { !close };
                    self.state = if self.head_request || status == 204 || status == 304 {
                        return Ok(self.done());
                    } else if chunked {
                        State::ChunkSize
                    } else if let Some(length) = content_length {
                        State::Body { remaining: length }
                    } else {
                        self.keep_alive = false;
                        State::UntilClose
                    };
                }
                State::Body { remaining } => {
                    let take = remaining.min(buf.len() as u64);
                    buf.advance(take as usize);
                    if take == remaining {
                        return Ok(self.done());
                    }
                    self.state = State::Body { remaining: remaining - take };
                    return Ok(Progress::NeedMore);
                }
                State::ChunkSize => {
                    let Some(line) = take_line(buf)? else { return Ok(Progress::NeedMore) };
                    let size = line.split(|&b| b == b';').next().unwrap_or(&[]);
                    let size = std::str::from_utf8(size).ok().map(str::trim).unwrap_or("");
                    let size = u64::from_str_radix(size, 16).map_err(|_| Malformed("invalid chunk size"))?;
                    self.state =
                        if size == 0 { State::Trailers } else { State::ChunkData { remaining: size } };
                }
                State::ChunkData { remaining } => {
                    let take = remaining.min(buf.len() as u64);
                    buf.advance(take as usize);
                    if take < remaining {
                        self.state = State::ChunkData { remaining: remaining - take };
                        return Ok(Progress::NeedMore);
                    }
                    self.state = State::ChunkEnd;
                }
                State::ChunkEnd => {
                    let Some(line) = take_line(buf)? else { return Ok(Progress::NeedMore) };
                    if !line.is_empty() {
                        return Err(Malformed("chunk not followed by CRLF"));
                    }
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let Some(line) = take_line(buf)? else { return Ok(Progress::NeedMore) };
                    if line.is_empty() {
                        return Ok(self.done());
                    }
                }
                State::UntilClose => {
                    buf.clear();
                    return Ok(Progress::NeedMore);
                }
            }
        }
    }

    /// The connection closed: complete if the response was delimited by the close.
    pub fn closed(&self) -> Result<Progress, Malformed> {
        match self.state {
            State::UntilClose => Ok(Progress::Done { status: self.status, keep_alive: false }),
            _ => Err(Malformed("connection closed before the response was complete")),
        }
    }

    fn done(&self) -> Progress {
        Progress::Done { status: self.status, keep_alive: self.keep_alive }
    }
}

/// A CRLF-terminated line, without its CRLF, removed from `buf`; `None` until it is complete.
fn take_line(buf: &mut BytesMut) -> Result<Option<Vec<u8>>, Malformed> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) => {
            let line = buf[..end].to_vec();
            buf.advance(end + 2);
            Ok(Some(line))
        }
        None if buf.len() > 4096 => Err(Malformed("line longer than 4 KiB")),
        None => Ok(None),
    }
}

/// The bytes of one request: `METHOD PATH HTTP/1.1`, the Host header, the kind's headers, a
/// content length when there is a body, and the body.
pub fn encode_request(
    method: &http::Method,
    path: &str,
    host: &http::HeaderValue,
    headers: &[(http::HeaderName, http::HeaderValue)],
    body: &[u8],
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let has_body =
        !body.is_empty() || matches!(*method, http::Method::POST | http::Method::PUT | http::Method::PATCH);
    if has_body {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `response` in pieces of `step` bytes; returns the progress and the leftover.
    fn read(response: &[u8], step: usize, head_request: bool) -> (Result<Progress, Malformed>, usize) {
        let mut reader = ResponseReader::new(head_request);
        let mut buf = BytesMut::new();
        for piece in response.chunks(step) {
            buf.extend_from_slice(piece);
            match reader.feed(&mut buf) {
                Ok(Progress::NeedMore) => continue,
                other => return (other, buf.len()),
            }
        }
        (reader.closed(), buf.len())
    }

    fn done(status: u16, keep_alive: bool) -> Result<Progress, Malformed> {
        Ok(Progress::Done { status, keep_alive })
    }

    #[test]
    fn content_length_in_any_split() {
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        for step in 1..=response.len() {
            assert_eq!(read(response, step, false), (done(200, true), 0), "step {step}");
        }
    }

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..=response.len() {
            assert_eq!(read(response, step, false), (done(200, true), 0), "step {step}");
        }
    }

    #[test]
    fn bodies_without_length() {
        assert_eq!(read(b"HTTP/1.1 200 OK\r\n\r\nuntil close", 4, false).0, done(200, false));
        assert_eq!(read(b"HTTP/1.1 204 No Content\r\n\r\n", 7, false).0, done(204, true));
        assert_eq!(read(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", 100, true).0, done(200, true));
    }

    #[test]
    fn interim_answers_are_skipped_and_close_is_honoured() {
        let response = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(read(response, 3, false).0, done(503, false));
        assert_eq!(read(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", 50, false).0, done(200, false));
        let keep = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(read(keep, 50, false).0, done(200, true));
    }

    #[test]
    fn malformed_answers_are_errors() {
        assert!(read(b"NOT HTTP\r\n\r\n", 50, false).0.is_err());
        assert!(read(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", 50, false).0.is_err());
        assert!(read(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", 50, false).0.is_err());
        assert!(read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 50, false).0.is_err());
    }

    #[test]
    fn requests_are_encoded() {
        let mut out = Vec::new();
        let host = http::HeaderValue::from_static("h:1");
        let headers = [(http::HeaderName::from_static("x-a"), http::HeaderValue::from_static("1"))];
        encode_request(&http::Method::POST, "/o?x=1", &host, &headers, b"{}", &mut out);
        assert_eq!(out, b"POST /o?x=1 HTTP/1.1\r\nhost: h:1\r\nx-a: 1\r\ncontent-length: 2\r\n\r\n{}");
        encode_request(&http::Method::GET, "/", &host, &[], b"", &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\nhost: h:1\r\n\r\n");
    }
}
