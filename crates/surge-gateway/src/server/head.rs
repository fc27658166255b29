//! HTTP/1.1 message heads as pure functions: parsing a request head into http's types with
//! the facts that frame its body (RFC 9112 §6), and writing a response head.

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Method, Request, StatusCode, Uri, Version};

use crate::wire::{chunked_last, has_token, header_map, header_spans, span};

/// The most header fields one request may carry (hyper's limit too).
pub(super) const MAX_HEADERS: usize = 100;
/// The most bytes a request head may take (nginx allows 4 × 8 KiB).
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A parsed request head, its body still on the connection.
pub(super) struct Head {
    pub request: Request<()>,
    pub framing: Framing,
    /// The client keeps the connection open after this exchange.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
    /// The client asks to switch protocols (`Connection: upgrade`, `Upgrade: ...`).
    pub upgrade: bool,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    Empty,
    Length(u64),
    Chunked,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum HeadError {
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error("the request head has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("the request head is larger than {} KiB", MAX_HEAD_BYTES / 1024)]
    TooLarge,
}

impl HeadError {
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::Malformed(_) => StatusCode::BAD_REQUEST,
            HeadError::TooManyHeaders | HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }
}

fn malformed(what: impl Into<String>) -> HeadError {
    HeadError::Malformed(what.into())
}

/// Parses the head at the start of `buf`. On success the head's bytes are split off `buf`
/// (header values share them, uncopied) and `buf` keeps what follows; `Ok(None)` means the
/// head is not complete yet.
pub(super) fn parse(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let length = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(err) => return Err(malformed(err.to_string())),
    };
    let method = parsed.method.map(str::as_bytes).unwrap_or_default();
    let method = Method::from_bytes(method).map_err(|_| malformed("invalid method"))?;
    let target = span(buf, parsed.path.map(str::as_bytes).unwrap_or_default());
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let spans = header_spans(parsed.headers, buf).map_err(malformed)?;
    // The head's bytes become shared: the URI and header values are slices of them.
    let head = buf.split_to(length).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| malformed("invalid request target"))?;
    let headers = header_map(&head, spans).map_err(malformed)?;
    let framing = framing(version, &headers)?;
    let connection = |token: &str| has_token(&headers, CONNECTION, token);
    let keep_alive = match version {
        Version::HTTP_10 => connection("keep-alive"),
        _ => !connection("close"),
    };
    let expect_continue = version == Version::HTTP_11
        && headers.get(EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade = version == Version::HTTP_11 && connection("upgrade") && headers.contains_key(UPGRADE);

    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head { request, framing, keep_alive, expect_continue, upgrade }))
}

/// The body's framing. Ambiguous framing is refused rather than guessed, since a proxy and the
/// server behind it guessing differently is how requests get smuggled.
fn framing(version: Version, headers: &HeaderMap) -> Result<Framing, HeadError> {
    if headers.contains_key(TRANSFER_ENCODING) {
        if headers.contains_key(CONTENT_LENGTH) {
            return Err(malformed("both Transfer-Encoding and Content-Length"));
        }
        if version == Version::HTTP_10 {
            return Err(malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        return if chunked_last(headers) {
            Ok(Framing::Chunked)
        } else {
            Err(malformed("Transfer-Encoding must end with chunked"))
        };
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            let parsed = (!part.is_empty() && part.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| malformed("invalid Content-Length"))?;
            if length.is_some_and(|seen| seen != parsed) {
                return Err(malformed("conflicting Content-Length values"));
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        None | Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

/// How a response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BodyFraming {
    /// No body may follow (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes: HTTP/1.0 clients and bodies of unknown length.
    Close,
}

/// What the response head depends on besides the response itself.
pub(super) struct Exchange {
    pub head_request: bool,
    pub version: Version,
    pub keep_alive: bool,
}

/// The framing of a response: the Content-Length it carries, else the body's known size, else
/// chunked to HTTP/1.1 clients.
pub(super) fn response_framing(
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
    let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.trim().parse().ok());
    match declared.or(known_length) {
        Some(length) => BodyFraming::Length(length),
        None if exchange.version == Version::HTTP_11 => BodyFraming::Chunked,
        None => BodyFraming::Close,
    }
}

/// Writes the status line and headers. Framing and connection headers are the server's to
/// set; `date` is the current HTTP date, added when the response has none.
pub(super) fn write_response_head(
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
    let mut has_length = false;
    for (name, value) in headers {
        if name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        if name == CONTENT_LENGTH {
            // No body at all after 1xx and 204, whatever the instance said.
            if status.is_informational() || status == StatusCode::NO_CONTENT {
                continue;
            }
            has_length = true;
        }
        dst.extend_from_slice(name.as_str().as_bytes());
        dst.extend_from_slice(b": ");
        dst.extend_from_slice(value.as_bytes());
        dst.extend_from_slice(b"\r\n");
    }
    match framing {
        BodyFraming::Length(length) if !has_length => {
            dst.extend_from_slice(b"content-length: ");
            dst.extend_from_slice(length.to_string().as_bytes());
            dst.extend_from_slice(b"\r\n");
        }
        BodyFraming::Chunked => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        dst.extend_from_slice(b"connection: upgrade\r\n");
    } else if !exchange.keep_alive || framing == BodyFraming::Close {
        dst.extend_from_slice(b"connection: close\r\n");
    } else if exchange.version == Version::HTTP_10 {
        dst.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !headers.contains_key(DATE) {
        dst.extend_from_slice(b"date: ");
        dst.extend_from_slice(date);
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
}

/// The line that opens a chunk: its size in hex, then CRLF, without allocating.
pub(super) struct ChunkSizeLine {
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

/// The preface an HTTP/2 client with prior knowledge opens with (RFC 9113 §3.4).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether `bytes` could still be, or is, the HTTP/2 preface.
pub(super) fn may_be_h2_preface(bytes: &[u8]) -> bool {
    let n = bytes.len().min(H2_PREFACE.len());
    bytes[..n] == H2_PREFACE[..n]
}

/// The cached `Date` value, rendered at most once a second.
pub(super) fn http_date() -> Bytes {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, Bytes)> = const { RefCell::new((0, Bytes::new())) };
    }
    let now = SystemTime::now();
    let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(cached_second, value)| {
        if *cached_second != second || value.is_empty() {
            *cached_second = second;
            *value = Bytes::from(httpdate::fmt_http_date(now));
        }
        value.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    fn parse_all(text: &str) -> Result<Option<Head>, HeadError> {
        parse(&mut BytesMut::from(text))
    }

    #[test]
    fn a_head_is_parsed_and_split_off_what_follows() {
        let mut buf = BytesMut::from(
            "POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Two: 1\r\nX-Two: 2\r\n\r\nhelloGET",
        );
        let head = parse(&mut buf).expect("valid").expect("complete");
        assert_eq!(head.request.method(), Method::POST);
        assert_eq!(head.request.uri(), "/a?b=1");
        assert_eq!(head.request.headers().get_all("x-two").iter().count(), 2);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive && !head.expect_continue && !head.upgrade);
        assert_eq!(&buf[..], b"helloGET");
    }

    #[test]
    fn an_incomplete_head_waits_for_more_and_a_huge_one_is_refused() {
        assert!(parse_all("GET / HTTP/1.1\r\nHost: x\r\n").expect("valid").is_none());
        let huge = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse_all(&huge).err(), Some(HeadError::TooLarge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let err = parse_all(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err();
        assert_eq!(err, Some(HeadError::TooManyHeaders));
        assert_eq!(err.map(|e| e.status()), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    }

    #[test]
    fn garbage_and_ambiguous_framing_are_malformed() {
        for bad in [
            "GET / HTTP/1.1\r\nHo st: x\r\n\r\n",
            "hello\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let err = parse_all(bad).err();
            assert!(matches!(err, Some(HeadError::Malformed(_))), "{bad:?} gave {err:?}");
        }
        let same_twice = parse_all("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n");
        assert_eq!(same_twice.expect("valid").expect("complete").framing, Framing::Length(5));
    }

    #[test]
    fn connection_facts_follow_the_version() {
        let head = |text: &str| parse_all(text).expect("valid").expect("complete");
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        let chunked = head("PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-Continue\r\n\r\n");
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(chunked.expect_continue);
        let upgrade = head("GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(upgrade.upgrade);
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
        assert_eq!(response_framing(StatusCode::OK, &headers, None, &exchange), BodyFraming::Length(10));
        assert_eq!(response_framing(StatusCode::NO_CONTENT, &headers, None, &exchange), BodyFraming::None);
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        assert_eq!(ChunkSizeLine::new(0).as_bytes(), b"0\r\n");
        assert_eq!(ChunkSizeLine::new(65536).as_bytes(), b"10000\r\n");
        assert_eq!(ChunkSizeLine::new(usize::MAX).as_bytes(), b"ffffffffffffffff\r\n");
    }

    #[test]
    fn the_h2_preface_is_recognised_from_its_first_bytes() {
        assert!(may_be_h2_preface(b"PRI * HT"));
        assert!(may_be_h2_preface(H2_PREFACE));
        assert!(!may_be_h2_preface(b"GET / HTTP/1.1\r\n"));
    }
}
