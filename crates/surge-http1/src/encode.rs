//! Writing heads: a request's (the gateway's client and `surge load`) and a response's (the
//! gateway's server), with the framing fields the writer, not the message, decides.

use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, StatusCode, Version};

/// The request line, `host` first when given, the fields, any `extra` fields (name and value
/// bytes the writer makes itself), then the body's framing: `Some(length)` for a whole body (a
/// length is written when there is a body, or when the method expects one), `None` for a
/// chunked one. The fields must not carry framing of their own (Content-Length,
/// Transfer-Encoding, Expect).
pub fn write_request_head<'a>(
    dst: &mut Vec<u8>,
    method: &Method,
    target: &str,
    host: Option<&[u8]>,
    fields: impl IntoIterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    extra: &[(&[u8], &[u8])],
    body_length: Option<u64>,
) {
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(target.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        dst.extend_from_slice(b"host: ");
        dst.extend_from_slice(host);
        dst.extend_from_slice(b"\r\n");
    }
    for (name, value) in fields {
        write_field(dst, name.as_str().as_bytes(), value.as_bytes());
    }
    for (name, value) in extra {
        write_field(dst, name, value);
    }
    match body_length {
        Some(length) if length > 0 || matches!(*method, Method::POST | Method::PUT | Method::PATCH) => {
            write_length(dst, length)
        }
        Some(_) => {}
        None => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    dst.extend_from_slice(b"\r\n");
}

/// Whether a field is framing that a head's writer sets itself.
pub fn is_request_framing(name: &HeaderName) -> bool {
    name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == http::header::EXPECT
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body may follow (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes: HTTP/1.0 clients and bodies of unknown length.
    Close,
}

/// What a response head depends on besides the response itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    pub head_request: bool,
    pub version: Version,
    pub keep_alive: bool,
}

/// The framing of a response: the Content-Length it carries, else the body's known size, else
/// chunked to HTTP/1.1 clients.
pub fn response_framing(
    status: StatusCode,
    headers: &HeaderMap,
    known_length: Option<u64>,
    exchange: &Exchange,
) -> BodyFraming {
    if exchange.head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return BodyFraming::None;
    }
    let declared =
        headers.get(CONTENT_LENGTH).and_then(|v| crate::fields::parse_length(v.as_bytes().trim_ascii()).ok());
    match declared.or(known_length) {
        Some(length) => BodyFraming::Length(length),
        None if exchange.version == Version::HTTP_11 => BodyFraming::Chunked,
        None => BodyFraming::Close,
    }
}

/// Writes the status line and headers. Framing and connection headers are the server's to
/// set; `date` is the current HTTP date, added when the response has none.
pub fn write_response_head(
    dst: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    framing: BodyFraming,
    exchange: &Exchange,
    date: &[u8],
) {
    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    dst.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        // The length is written from the framing, so it can never disagree with it, nor stand
        // beside Transfer-Encoding.
        if name == TRANSFER_ENCODING || name == CONNECTION || name == CONTENT_LENGTH {
            continue;
        }
        write_field(dst, name.as_str().as_bytes(), value.as_bytes());
    }
    match framing {
        BodyFraming::Length(length) => write_length(dst, length),
        BodyFraming::Chunked => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // A HEAD's or 304's answer may say how long the body would be.
        BodyFraming::None if status != StatusCode::NO_CONTENT && !status.is_informational() => {
            if let Some(length) = headers.get(CONTENT_LENGTH) {
                write_field(dst, b"content-length", length.as_bytes());
            }
        }
        BodyFraming::None | BodyFraming::Close => {}
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        dst.extend_from_slice(b"connection: upgrade\r\n");
    } else if !exchange.keep_alive || framing == BodyFraming::Close {
        dst.extend_from_slice(b"connection: close\r\n");
    } else if exchange.version == Version::HTTP_10 {
        dst.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !headers.contains_key(DATE) {
        write_field(dst, b"date", date);
    }
    dst.extend_from_slice(b"\r\n");
}

fn write_field(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

fn write_length(dst: &mut Vec<u8>, length: u64) {
    write_field(dst, b"content-length", Decimal::new(length).as_bytes());
}

/// A number in decimal, without allocating.
pub struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub fn new(value: u64) -> Self {
        let mut digits = [0u8; 20];
        let (mut start, mut rest) = (digits.len(), value);
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        Decimal { digits, start }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

/// The line that opens a chunk: its size in hex, then CRLF, without allocating.
pub struct ChunkSizeLine {
    bytes: [u8; 18],
    start: usize,
}

impl ChunkSizeLine {
    pub fn new(len: usize) -> Self {
        let mut bytes = [0u8; 18];
        bytes[16..].copy_from_slice(b"\r\n");
        let (mut start, mut rest) = (16, len);
        loop {
            start -= 1;
            bytes[start] = b"0123456789abcdef"[rest % 16];
            rest /= 16;
            if rest == 0 {
                break;
            }
        }
        ChunkSizeLine { bytes, start }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: Method, host: Option<&[u8]>, fields: &HeaderMap, body: Option<u64>) -> String {
        let mut out = Vec::new();
        write_request_head(&mut out, &method, "/a?b=1", host, fields, &[(b"x-extra", b"7")], body);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn request_heads_carry_the_framing_of_their_body() {
        let mut fields = HeaderMap::new();
        fields.insert("x-one", HeaderValue::from_static("1"));
        assert_eq!(
            head(Method::POST, Some(b"10.0.0.1:80"), &fields, Some(3)),
            "POST /a?b=1 HTTP/1.1\r\nhost: 10.0.0.1:80\r\nx-one: 1\r\nx-extra: 7\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(
            head(Method::POST, None, &fields, Some(0)),
            "POST /a?b=1 HTTP/1.1\r\nx-one: 1\r\nx-extra: 7\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(
            head(Method::GET, None, &fields, Some(0)),
            "GET /a?b=1 HTTP/1.1\r\nx-one: 1\r\nx-extra: 7\r\n\r\n"
        );
        assert_eq!(
            head(Method::PUT, None, &HeaderMap::new(), None),
            "PUT /a?b=1 HTTP/1.1\r\nx-extra: 7\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert!(is_request_framing(&CONTENT_LENGTH) && is_request_framing(&http::header::EXPECT));
        assert!(!is_request_framing(&http::header::HOST));
    }

    #[test]
    fn response_heads_carry_their_framing() {
        let exchange = Exchange { head_request: false, version: Version::HTTP_11, keep_alive: true };
        let mut headers = HeaderMap::new();
        headers.insert("x-a", HeaderValue::from_static("1"));
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        let framing = response_framing(StatusCode::OK, &headers, None, &exchange);
        assert_eq!(framing, BodyFraming::Chunked);
        let mut out = Vec::new();
        write_response_head(&mut out, StatusCode::OK, &headers, framing, &exchange, b"D");
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\ndate: D\r\n\r\n");

        let closing = Exchange { head_request: false, version: Version::HTTP_10, keep_alive: true };
        assert_eq!(response_framing(StatusCode::OK, &headers, None, &closing), BodyFraming::Close);
        let framing = response_framing(StatusCode::OK, &headers, Some(3), &closing);
        out.clear();
        write_response_head(&mut out, StatusCode::NOT_FOUND, &headers, framing, &closing, b"D");
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nx-a: 1\r\ncontent-length: 3\r\nconnection: keep-alive\r\ndate: D\r\n\r\n"
        );

        let head = Exchange { head_request: true, version: Version::HTTP_11, keep_alive: false };
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("10"));
        assert_eq!(response_framing(StatusCode::OK, &headers, None, &head), BodyFraming::None);
        out.clear();
        write_response_head(&mut out, StatusCode::OK, &headers, BodyFraming::None, &head, b"D");
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 10\r\nconnection: close\r\ndate: D\r\n\r\n"
        );
        assert_eq!(response_framing(StatusCode::OK, &headers, None, &exchange), BodyFraming::Length(10));
        assert_eq!(response_framing(StatusCode::NO_CONTENT, &headers, None, &exchange), BodyFraming::None);
        out.clear();
        write_response_head(&mut out, StatusCode::NO_CONTENT, &headers, BodyFraming::None, &exchange, b"D");
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\nx-a: 1\r\ndate: D\r\n\r\n");
    }

    #[test]
    fn a_content_length_that_disagrees_with_the_body_framing_is_never_written() {
        // An instance that sends both framings: the length goes, chunked stays.
        let exchange = Exchange { head_request: false, version: Version::HTTP_11, keep_alive: true };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("10"));
        let mut out = Vec::new();
        write_response_head(&mut out, StatusCode::OK, &headers, BodyFraming::Chunked, &exchange, b"D");
        assert_eq!(out, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: D\r\n\r\n");
    }

    #[test]
    fn chunk_size_lines_are_hex_and_lengths_decimal() {
        assert_eq!(ChunkSizeLine::new(0).as_bytes(), b"0\r\n");
        assert_eq!(ChunkSizeLine::new(65536).as_bytes(), b"10000\r\n");
        assert_eq!(ChunkSizeLine::new(usize::MAX).as_bytes(), b"ffffffffffffffff\r\n");
        for length in [0, 7, 10, 65536, u64::MAX] {
            let mut out = Vec::new();
            write_length(&mut out, length);
            assert_eq!(out, format!("content-length: {length}\r\n").as_bytes());
        }
    }
}
