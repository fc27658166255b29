//! The load generator's own HTTP/1.1 exchange: write prepared request bytes, read the answer
//! just far enough to know its status and where it ends. A load generator needs nothing more,
//! and doing only this keeps its cost per request near wrk's, so the target, not the tool, is
//! what gets measured.

use bytes::{Buf, BytesMut};
use surge_http1::head::{head_length, response_decoder};
use surge_http1::{Decoder, Fields, FramingError};

/// How far a response has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    NeedMore,
    Done { status: u16, keep_alive: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed response: {0}")]
pub struct Malformed(String);

/// Reads one response from bytes as they arrive. Pure: feed it buffers, it says when the
/// response is complete. The head's fields are read where httparse found them, never copied
/// into a header map, and the body is skipped in place.
#[derive(Debug)]
pub struct ResponseReader {
    /// `None` until the head has been read.
    body: Option<Decoder>,
    head_request: bool,
    status: u16,
    keep_alive: bool,
}

impl ResponseReader {
    pub fn new(head_request: bool) -> Self {
        ResponseReader { body: None, head_request, status: 0, keep_alive: true }
    }

    /// Consumes what it can of `buf`.
    pub fn feed(&mut self, buf: &mut BytesMut) -> Result<Progress, Malformed> {
        loop {
            let Some(body) = &mut self.body else {
                if !self.read_head(buf)? {
                    return Ok(Progress::NeedMore);
                }
                continue;
            };
            return match body.skip(buf) {
                Ok(true) => Ok(self.done()),
                Ok(false) => Ok(Progress::NeedMore),
                Err(err) => Err(Malformed(err.to_string())),
            };
        }
    }

    /// Reads a head off `buf`: `Ok(false)` until one is complete. Interim answers such as
    /// `100 Continue` are skipped: the real one follows.
    fn read_head(&mut self, buf: &mut BytesMut) -> Result<bool, Malformed> {
        let mut fields = surge_http1::head::unfilled_fields();
        let mut response = httparse::Response::new(&mut []);
        let parse = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        );
        let Some(length) =
            head_length(parse, buf.len()).map_err(|err| Malformed(FramingError::from(err).to_string()))?
        else {
            return Ok(false);
        };
        let status = response.code.unwrap_or(0);
        let http10 = response.version == Some(0);
        let facts = Fields::scan(response.headers).map_err(|err| Malformed(err.to_string()))?;
        buf.advance(length);
        if (100..200).contains(&status) && status != 101 {
            return Ok(false);
        }
        let status_code =
            http::StatusCode::from_u16(status).map_err(|_| Malformed("invalid status".into()))?;
        let decoder = response_decoder(status_code, self.head_request, &facts);
        self.status = status;
        self.keep_alive = !matches!(decoder, Decoder::UntilClose { .. })
            && if http10 { facts.connection.keep_alive } else { !facts.connection.close };
        self.body = Some(decoder);
        Ok(true)
    }

    /// The connection closed: complete if the response was delimited by the close.
    pub fn closed(&mut self) -> Result<Progress, Malformed> {
        let incomplete = || Malformed("connection closed before the response was complete".into());
        let body = self.body.as_mut().ok_or_else(incomplete)?;
        body.closed().map_err(|_| incomplete())?;
        Ok(self.done())
    }

    fn done(&self) -> Progress {
        Progress::Done { status: self.status, keep_alive: self.keep_alive }
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
    let fields = headers.iter().map(|(name, value)| (name, value));
    surge_http1::encode::write_request_head(
        out,
        method,
        path,
        Some(host.as_bytes()),
        fields,
        &[],
        Some(body.len() as u64),
    );
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
    fn a_head_is_refused_from_64_kib_on_whole_or_in_pieces() {
        // A head of exactly `length` bytes: one padding field sized to fit.
        let head = |length: usize| {
            let start = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-pad: ";
            let padding = "a".repeat(length - start.len() - "\r\n\r\n".len());
            format!("{start}{padding}\r\n\r\n").into_bytes()
        };
        let limit = surge_http1::MAX_HEAD_BYTES;
        let too_large = Err(Malformed(FramingError::HeadTooLarge.to_string()));
        for step in [limit * 2, 1000] {
            assert_eq!(read(&head(limit - 1), step, false).0, done(200, true), "step {step}");
            assert_eq!(read(&head(limit), step, false).0, too_large, "step {step}");
        }
        // Unfinished: one byte short of the limit it waits for more, at the limit it is refused.
        let unfinished = |length: usize| head(limit * 2)[..length].to_vec();
        let mut reader = ResponseReader::new(false);
        assert_eq!(reader.feed(&mut BytesMut::from(&unfinished(limit - 1)[..])), Ok(Progress::NeedMore));
        assert_eq!(ResponseReader::new(false).feed(&mut BytesMut::from(&unfinished(limit)[..])), too_large);
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
