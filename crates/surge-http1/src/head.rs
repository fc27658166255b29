//! Message heads into http's types: a request head with the facts that frame its body
//! (RFC 9112 §6), and a response head with its body's decoder. The head's bytes become
//! shared, so the URI and header values are slices of them, not copies.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};

use crate::decode::Decoder;
use crate::fields::Fields;
use crate::{FramingError, MAX_HEADERS, MAX_HEAD_BYTES};

/// A parsed request head, its body still on the connection.
#[derive(Debug)]
pub struct RequestHead {
    pub request: Request<()>,
    pub framing: RequestFraming,
    /// The client keeps the connection open after this exchange.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
    /// The client asks to switch protocols (`Connection: upgrade`, `Upgrade: ...`).
    pub upgrade: bool,
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    Empty,
    Length(u64),
    Chunked,
}

impl RequestFraming {
    pub fn decoder(self) -> Decoder {
        match self {
            RequestFraming::Empty => Decoder::length(0),
            RequestFraming::Length(length) => Decoder::length(length),
            RequestFraming::Chunked => Decoder::chunked(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error("the request head has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("the request head is {} KiB or more", MAX_HEAD_BYTES / 1024)]
    TooLarge,
    #[error("transfer coding not implemented: only `Transfer-Encoding: chunked` is understood")]
    UnsupportedCoding,
}

impl HeadError {
    /// The status a server answers with (nginx's and hyper's choices).
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::Malformed(_) => StatusCode::BAD_REQUEST,
            HeadError::TooManyHeaders | HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

impl From<FramingError> for HeadError {
    fn from(err: FramingError) -> Self {
        HeadError::Malformed(err.to_string())
    }
}

fn malformed(what: impl Into<String>) -> HeadError {
    HeadError::Malformed(what.into())
}

/// Parses the request head at the start of `buf`. On success the head's bytes are split off
/// `buf`, which keeps what follows; `Ok(None)` means the head is not complete yet. Connection
/// fields that only say keep-alive or close are left out of the headers (`keep_alive` holds
/// what they say); any other token, an upgrade's included, keeps them all.
pub fn parse_request(buf: &mut BytesMut) -> Result<Option<RequestHead>, HeadError> {
    let mut fields = unfilled_fields();
    let mut parsed = httparse::Request::new(&mut []);
    let parse = parsed.parse_with_uninit_headers(buf, &mut fields);
    let Some(length) = head_length(parse, buf.len())? else {
        return Ok(None);
    };
    let method = parsed.method.map(str::as_bytes).unwrap_or_default();
    // Methods are case-sensitive and every standard one is upper case: `get` is not GET, and
    // an instance may treat it either way (nginx refuses it too).
    if !method.iter().all(|&b| b.is_ascii_uppercase() || b == b'-' || b == b'_') {
        return Err(malformed("a method is upper-case letters, '-' and '_'"));
    }
    let method = Method::from_bytes(method).map_err(|_| malformed("invalid method"))?;
    let target = span(buf, parsed.path.map(str::as_bytes).unwrap_or_default());
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let facts = Fields::scan(parsed.headers)?;
    // One Host, which HTTP/1.1 requires: two could be routed on one and served on the other.
    match (facts.hosts, version) {
        (0, Version::HTTP_11) => return Err(malformed("an HTTP/1.1 request without Host")),
        (0 | 1, _) => {}
        _ => return Err(malformed("more than one Host field")),
    }
    let framing = request_framing(version, &facts)?;
    let spans = Spans::of(parsed.headers, buf);
    let head = buf.split_to(length).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| malformed("invalid request target"))?;
    // As for an answer (`parse_response`); an upgrade's stay.
    let without_connection = facts.connection.only_this_hop() && !facts.connection.upgrade;
    let mut headers = spans.header_map(&head, PROXY_FIELDS, without_connection).map_err(malformed)?;
    if let Some(authority) = uri.authority() {
        // The absolute form's authority is the request's host, whatever Host says (§3.2.2);
        // userinfo has no place in it (RFC 9110 §4.2.4).
        if authority.as_str().contains('@') {
            return Err(malformed("a request target with userinfo"));
        }
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| malformed("invalid authority"))?;
        headers.insert(http::header::HOST, host);
    } else if let Some(index) = facts.host_index {
        // Checked where it lies in the head: parsing a copy cost an allocation per request.
        let [name_start, name_end, start, end] = spans.offsets[index];
        debug_assert!(head[usize::from(name_start)..usize::from(name_end)].eq_ignore_ascii_case(b"host"));
        let host = head.slice(usize::from(start)..usize::from(end));
        if !host.is_empty()
            && (host.contains(&b'@') || http::uri::Authority::from_maybe_shared(host).is_err())
        {
            return Err(malformed("Host is not a host name with an optional port"));
        }
    }
    let keep_alive = match version {
        Version::HTTP_10 => facts.connection.keep_alive,
        _ => !facts.connection.close,
    };
    let http11 = version == Version::HTTP_11;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(RequestHead {
        request,
        framing,
        keep_alive,
        expect_continue: http11 && facts.expect_continue,
        upgrade: http11 && facts.connection.upgrade && facts.upgrade,
    }))
}

/// A request body's framing. Ambiguous framing is refused rather than guessed, since a proxy
/// and the server behind it guessing differently is how requests get smuggled.
pub fn request_framing(version: Version, facts: &Fields) -> Result<RequestFraming, HeadError> {
    if let Some(codings) = facts.transfer_encoding {
        if facts.content_length.is_some() {
            return Err(malformed("both Transfer-Encoding and Content-Length"));
        }
        if version == Version::HTTP_10 {
            return Err(malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !codings.chunked_last || codings.chunked > 1 {
            return Err(malformed("Transfer-Encoding must end with a single chunked"));
        }
        // `gzip, chunked`: a body that would reach the instance still gzip-coded, with no
        // field left to say so once the proxy has removed the chunking (nginx: 501).
        return if codings.is_chunked_only() {
            Ok(RequestFraming::Chunked)
        } else {
            Err(HeadError::UnsupportedCoding)
        };
    }
    Ok(match facts.content_length {
        None | Some(0) => RequestFraming::Empty,
        Some(length) => RequestFraming::Length(length),
    })
}

/// A parsed response head.
#[derive(Debug)]
pub enum ResponseHead {
    /// `100 Continue` and other interim answers, to be skipped.
    Interim,
    /// The answer, how its body is framed, and whether the connection can carry another
    /// exchange after it.
    Final { response: Response<()>, decoder: Decoder, keep_alive: bool },
}

/// Parses the response head at the start of `buf`, splitting it off; `Ok(None)`: incomplete.
/// `request_method` is the method of the request it answers (a HEAD's answer has no body).
/// Connection fields that only say keep-alive or close are left out of the headers
/// (`keep_alive` holds what they say), except a 101's; any other token keeps them all.
pub fn parse_response(
    buf: &mut BytesMut,
    request_method: &Method,
) -> Result<Option<ResponseHead>, FramingError> {
    let mut fields = unfilled_fields();
    let mut parsed = httparse::Response::new(&mut []);
    let parse =
        httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut parsed, buf, &mut fields);
    let Some(length) = head_length(parse, buf.len())? else {
        return Ok(None);
    };
    let status = StatusCode::from_u16(parsed.code.unwrap_or_default())
        .map_err(|_| FramingError::Malformed("invalid status code".into()))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        let _ = buf.split_to(length);
        return Ok(Some(ResponseHead::Interim));
    }
    let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
    let facts = Fields::scan(parsed.headers)?;
    let decoder = response_decoder(status, *request_method == Method::HEAD, &facts);
    let spans = Spans::of(parsed.headers, buf);
    let head = buf.split_to(length).freeze();
    // Connection fields that only say keep-alive or close speak of this hop alone, and what
    // they say is in `keep_alive`: left out here, as nginx's proxy leaves them out, they cost
    // no insert now and no removal when the answer is forwarded. A 101's are left as they
    // came, as the gateway leaves an upgrade's Connection and Upgrade.
    let without_connection = facts.connection.only_this_hop() && status != StatusCode::SWITCHING_PROTOCOLS;
    let headers = spans.header_map(&head, 0, without_connection).map_err(FramingError::Malformed)?;
    let keep_alive = !matches!(decoder, Decoder::UntilClose { .. })
        && match version {
            Version::HTTP_10 => facts.connection.keep_alive,
            _ => !facts.connection.close,
        };
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Some(ResponseHead::Final { response, decoder, keep_alive }))
}

/// The length of the head httparse found in `buffered` bytes, `None` while it is incomplete.
/// A head is refused from `MAX_HEAD_BYTES` on, whether it came whole or in pieces: the one rule
/// of every HTTP/1.1 head reader on this crate (the gateway's server and client, `surge load`).
#[inline(always)]
pub fn head_length(parse: httparse::Result<usize>, buffered: usize) -> Result<Option<usize>, Unreadable> {
    match parse {
        Ok(httparse::Status::Complete(length)) if length < MAX_HEAD_BYTES => Ok(Some(length)),
        Ok(httparse::Status::Partial) if buffered < MAX_HEAD_BYTES => Ok(None),
        Ok(_) => Err(Unreadable::TooLarge),
        Err(err) => Err(Unreadable::Invalid(err)),
    }
}

/// Why a head cannot be read: what `head_length` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// `MAX_HEAD_BYTES` or more.
    TooLarge,
    /// Not HTTP/1.x, as httparse says.
    Invalid(httparse::Error),
}

impl From<Unreadable> for HeadError {
    fn from(unreadable: Unreadable) -> Self {
        match unreadable {
            Unreadable::TooLarge => HeadError::TooLarge,
            Unreadable::Invalid(httparse::Error::TooManyHeaders) => HeadError::TooManyHeaders,
            Unreadable::Invalid(err) => malformed(err.to_string()),
        }
    }
}

impl From<Unreadable> for FramingError {
    fn from(unreadable: Unreadable) -> Self {
        match unreadable {
            Unreadable::TooLarge => FramingError::HeadTooLarge,
            Unreadable::Invalid(err) => FramingError::Malformed(err.to_string()),
        }
    }
}

/// How a response body is delimited (RFC 9112 §6.3): none after HEAD, 1xx, 204 and 304;
/// Transfer-Encoding over Content-Length; a coding that does not end in chunked, or no framing
/// at all, reads until the connection closes.
pub fn response_decoder(status: StatusCode, head_request: bool, facts: &Fields) -> Decoder {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Decoder::length(0);
    }
    match (facts.transfer_encoding, facts.content_length) {
        (Some(codings), _) if codings.chunked_last => Decoder::chunked(),
        (Some(_), _) | (None, None) => Decoder::until_close(),
        (None, Some(length)) => Decoder::length(length),
    }
}

/// Room for a head's fields, left unwritten, for httparse's `*_with_uninit_headers` parses: it
/// fills what it finds, and writing `MAX_HEADERS` empty fields first cost more than parsing a
/// typical head's dozen.
pub fn unfilled_fields<'b>() -> [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Where `part`, a slice httparse returned, lies in `buf`, the bytes it parsed.
fn span(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// Where the fields httparse found in `buf` lie, as name and value offsets, so both can share
/// the head's bytes once it is split off. On the stack: a head has at most `MAX_HEADERS`
/// fields, and is refused from `MAX_HEAD_BYTES` on, so offsets fit in `u16`. Small matters:
/// this is built and moved twice per proxied request (its request and its response).
struct Spans {
    /// Name start and end, value start and end.
    offsets: [[u16; 4]; MAX_HEADERS],
    len: usize,
}

const _: () = assert!(MAX_HEAD_BYTES <= u16::MAX as usize + 1, "a head's offsets must fit in u16");

impl Spans {
    /// `buf`'s fields; the head they are in is shorter than `MAX_HEAD_BYTES`.
    fn of(fields: &[httparse::Header<'_>], buf: &[u8]) -> Self {
        let mut spans = Spans { offsets: [[0; 4]; MAX_HEADERS], len: 0 };
        // Every field lies within the head, which the caller checked is shorter than
        // `MAX_HEAD_BYTES`: no offset is cut short.
        let offset = |range: Range<usize>| [range.start as u16, range.end as u16];
        for (slot, field) in spans.offsets.iter_mut().zip(fields) {
            let ([name_start, name_end], [value_start, value_end]) =
                (offset(span(buf, field.name.as_bytes())), offset(span(buf, field.value)));
            *slot = [name_start, name_end, value_start, value_end];
            spans.len += 1;
        }
        spans
    }

    /// The header map, its values slices of `head` (no copies), with room for `extra` more
    /// fields (a proxy adds its own) so that adding them does not grow it; the Connection
    /// fields left out when `without_connection`.
    fn header_map(&self, head: &Bytes, extra: usize, without_connection: bool) -> Result<HeaderMap, String> {
        let mut headers = HeaderMap::with_capacity(self.len + extra);
        for &[name_start, name_end, value_start, value_end] in &self.offsets[..self.len] {
            let name = &head[name_start as usize..name_end as usize];
            if without_connection && name.eq_ignore_ascii_case(b"connection") {
                continue;
            }
            let name = HeaderName::from_bytes(name)
                .map_err(|_| format!("invalid header name {:?}", String::from_utf8_lossy(name)))?;
            let value = head.slice(value_start as usize..value_end as usize);
            // SAFETY: httparse gave this value, and the bytes httparse accepts in a value (tab,
            // 0x20-0x7E, 0x80-0xFF) are exactly those `HeaderValue` accepts: checking them
            // again was 2% of a proxied request's instructions. The test
            // `httparse_accepts_no_value_byte_a_header_value_refuses` keeps the two in step;
            // debug builds check each value anyway (http does).
            #[allow(unsafe_code)]
            let value = unsafe { HeaderValue::from_maybe_shared_unchecked(value) };
            headers.append(name, value);
        }
        Ok(headers)
    }
}

/// Fields a proxy adds to a request (`X-Forwarded-For/-Proto/-Host`, a Host for HTTP/2, and
/// a request id and `traceparent`), so that adding them does not grow the map.
const PROXY_FIELDS: usize = 6;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(text))
    }

    fn head(text: &str) -> RequestHead {
        parse(text).expect("valid").expect("complete")
    }

    #[test]
    fn a_head_is_parsed_and_split_off_what_follows() {
        let mut buf = BytesMut::from(
            "POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Two: 1\r\nX-Two: 2\r\n\r\nhelloGET",
        );
        let head = parse_request(&mut buf).expect("valid").expect("complete");
        assert_eq!(head.request.method(), Method::POST);
        assert_eq!(head.request.uri(), "/a?b=1");
        assert_eq!(head.request.headers().get_all("x-two").iter().count(), 2);
        assert_eq!(head.framing, RequestFraming::Length(5));
        assert!(head.keep_alive && !head.expect_continue && !head.upgrade);
        assert_eq!(&buf[..], b"helloGET");
    }

    #[test]
    fn an_incomplete_head_waits_for_more_and_a_huge_one_is_refused() {
        assert!(parse("GET / HTTP/1.1\r\nHost: x\r\n").expect("valid").is_none());
        let huge = format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(&huge).err(), Some(HeadError::TooLarge));
        // Whole in one read, it is refused all the same; one byte shorter, it is served.
        let whole =
            |value: usize| format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(value));
        let limit = MAX_HEAD_BYTES - whole(0).len();
        assert_eq!(parse(&whole(limit)).err(), Some(HeadError::TooLarge));
        let largest = head(&whole(limit - 1));
        assert_eq!(largest.request.headers()["x-big"].len(), limit - 1, "its last field's value whole");
        // In pieces: still waiting one byte short of the limit, refused at it.
        let unfinished = |length: usize| format!("GET / HTTP/1.1\r\nX-Big: {}", "a".repeat(length - 23));
        assert_eq!(unfinished(MAX_HEAD_BYTES).len(), MAX_HEAD_BYTES);
        assert!(matches!(parse(&unfinished(MAX_HEAD_BYTES - 1)), Ok(None)), "one byte short, it waits");
        assert_eq!(parse(&unfinished(MAX_HEAD_BYTES)).err(), Some(HeadError::TooLarge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        let err = parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err();
        assert_eq!(err, Some(HeadError::TooManyHeaders));
        assert_eq!(err.map(|e| e.status()), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
    }

    #[test]
    fn a_request_has_one_valid_host_and_an_upper_case_method() {
        let refused = [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            "GET / HTTP/1.1\r\nAccept: */*\r\nHost: a b\r\nX-Other: 1\r\n\r\n",
            "get / HTTP/1.1\r\nHost: a\r\n\r\n",
            "Get / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://user@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ];
        for text in refused {
            assert_eq!(parse(text).err().map(|e| e.status()), Some(StatusCode::BAD_REQUEST), "{text:?}");
        }
        // HTTP/1.0 may leave Host out; a port and an IPv6 literal are hosts too.
        for text in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
            "GET / HTTP/1.1\r\nAccept: */*\r\nHost: a.example\r\n\r\n",
            "GET / HTTP/1.1\r\nHost:\r\n\r\n",
            "M-SEARCH * HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(parse(text).expect("valid").is_some(), "{text:?}");
        }
        // The absolute form's authority is the host, whatever Host says.
        let absolute = head("GET http://a.example:81/x HTTP/1.1\r\nHost: b.example\r\n\r\n");
        assert_eq!(absolute.request.headers()["host"], "a.example:81");
        assert_eq!(absolute.request.headers().get_all("host").iter().count(), 1);
    }

    #[test]
    fn request_framing_follows_rfc_9112_and_refuses_ambiguity() {
        let cases: &[(&str, Result<RequestFraming, StatusCode>)] = &[
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", Ok(RequestFraming::Empty)),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", Ok(RequestFraming::Empty)),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n", Ok(RequestFraming::Length(5))),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n", Ok(RequestFraming::Length(5))),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", Ok(RequestFraming::Chunked)),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n", Ok(RequestFraming::Chunked)),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                Err(StatusCode::BAD_REQUEST),
            ),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", Err(StatusCode::BAD_REQUEST)),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\n",
                Err(StatusCode::BAD_REQUEST),
            ),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", Err(StatusCode::BAD_REQUEST)),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Err(StatusCode::NOT_IMPLEMENTED),
            ),
            (
                "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(StatusCode::NOT_IMPLEMENTED),
            ),
        ];
        for (text, expected) in cases {
            let got = parse(text).map(|head| head.expect("complete").framing).map_err(|err| err.status());
            assert_eq!(got, *expected, "{text:?}");
        }
    }

    #[test]
    fn httparse_accepts_no_value_byte_a_header_value_refuses() {
        let mut accepted = 0;
        for byte in 0..=u8::MAX {
            let mut text = b"GET / HTTP/1.1\r\nHost: x\r\nX-Probe: a".to_vec();
            text.extend([byte, b'a']);
            text.extend(b"\r\n\r\n");
            let mut fields = unfilled_fields();
            let mut parsed = httparse::Request::new(&mut []);
            if let Ok(httparse::Status::Complete(_)) = parsed.parse_with_uninit_headers(&text, &mut fields) {
                let value =
                    parsed.headers.iter().find(|field| field.name == "X-Probe").expect("parsed").value;
                assert!(HeaderValue::from_bytes(value).is_ok(), "byte {byte:#04x}");
                accepted += 1;
            }
        }
        // Tab, 0x20-0x7E and 0x80-0xFF: the probe really reached the value's bytes.
        assert_eq!(accepted, 1 + 95 + 128);
    }

    #[test]
    fn garbage_heads_are_malformed() {
        for bad in
            ["GET / HTTP/1.1\r\nHo st: x\r\n\r\n", "hello\r\n\r\n", "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n"]
        {
            let err = parse(bad).err();
            assert!(matches!(err, Some(HeadError::Malformed(_))), "{bad:?} gave {err:?}");
        }
    }

    #[test]
    fn connection_facts_follow_the_version() {
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").keep_alive);
        let chunked =
            head("PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-Continue\r\n\r\n");
        assert_eq!(chunked.framing, RequestFraming::Chunked);
        assert!(chunked.expect_continue);
        assert!(!head("PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue);
        let upgrade = head(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(upgrade.upgrade);
        assert!(!head("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n").upgrade);
    }

    fn response(text: &str, method: Method) -> ResponseHead {
        parse_response(&mut BytesMut::from(text), &method).expect("valid").expect("complete")
    }

    #[test]
    fn a_connection_field_about_this_hop_alone_is_left_out_of_a_request() {
        let kept_alive = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(!kept_alive.request.headers().contains_key("connection") && kept_alive.keep_alive);
        let closed = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert!(!closed.request.headers().contains_key("connection") && !closed.keep_alive);
        let named = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\n\r\n");
        assert_eq!(named.request.headers()["connection"], "keep-alive, x-hop");
        let upgrade = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(upgrade.request.headers()["connection"], "Upgrade");
        assert!(upgrade.upgrade);
        // Without the upgrade token there is no upgrade: Connection goes, Upgrade stays for
        // the gateway to strip; the token without an Upgrade field keeps Connection.
        let no_token =
            head("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n\r\n");
        assert!(!no_token.request.headers().contains_key("connection") && !no_token.upgrade);
        assert!(no_token.request.headers().contains_key("upgrade"));
        let no_field = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n");
        assert!(no_field.request.headers().contains_key("connection") && !no_field.upgrade);
        // Two fields, one naming a field: both stay.
        let two = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nConnection: x-hop\r\n\r\n");
        assert_eq!(two.request.headers().get_all("connection").iter().count(), 2);
        // No token at all says nothing: kept, for the gateway to strip.
        let empty = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: ,\r\n\r\n");
        assert!(empty.request.headers().contains_key("connection"));
    }

    #[test]
    fn a_connection_field_about_this_hop_alone_is_left_out_of_an_answer() {
        let headers = |text: &str| match response(text, Method::GET) {
            ResponseHead::Final { response, keep_alive, .. } => (response.headers().clone(), keep_alive),
            ResponseHead::Interim => panic!("a final answer"),
        };
        let (kept_alive, keep_alive) =
            headers("HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert!(!kept_alive.contains_key("connection") && keep_alive);
        let (closed, keep_alive) =
            headers("HTTP/1.1 200 OK\r\nconnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!closed.contains_key("connection") && !keep_alive);
        let (mixed, keep_alive) =
            headers("HTTP/1.1 200 OK\r\nConnection: keep-alive, Upgrade\r\nContent-Length: 0\r\n\r\n");
        assert!(!mixed.contains_key("connection") && keep_alive);
        // Naming a field, it stays, so that the field it names goes with it when forwarded.
        let named = "HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: x-hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n";
        let (named, _) = headers(named);
        assert_eq!(named.get_all("connection").iter().count(), 2);
        assert!(named.contains_key("x-hop"));
        // A 101's stays for the upgrade.
        let (switched, _) =
            headers("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(switched["connection"], "Upgrade");
    }

    #[test]
    fn response_framing_and_reuse_follow_the_head() {
        let cases = [
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::GET, Decoder::length(5), true),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", Method::GET, Decoder::chunked(), true),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Method::GET,
                Decoder::chunked(),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Method::GET,
                Decoder::until_close(),
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Method::GET, Decoder::until_close(), false),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
                Method::GET,
                Decoder::length(5),
                false,
            ),
            ("HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\n", Method::GET, Decoder::length(5), false),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n",
                Method::GET,
                Decoder::length(5),
                true,
            ),
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", Method::HEAD, Decoder::length(0), true),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", Method::GET, Decoder::length(0), true),
            ("HTTP/1.1 204 No Content\r\n\r\n", Method::GET, Decoder::length(0), true),
        ];
        for (text, method, decoder, reusable) in cases {
            let ResponseHead::Final { decoder: got, keep_alive, .. } = response(text, method) else {
                panic!("{text:?} is final")
            };
            assert_eq!((got, keep_alive), (decoder, reusable), "{text:?}");
        }
        assert!(matches!(response("HTTP/1.1 100 Continue\r\n\r\n", Method::POST), ResponseHead::Interim));
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert!(parse_response(&mut BytesMut::from(bad), &Method::GET).is_err(), "{bad:?}");
        }
        // Whole in one read, a head is refused at the same size as in pieces.
        let whole = |value: usize| format!("HTTP/1.1 200 OK\r\nX-Big: {}\r\n\r\n", "a".repeat(value));
        let limit = MAX_HEAD_BYTES - whole(0).len();
        let refused = parse_response(&mut BytesMut::from(whole(limit).as_str()), &Method::GET);
        assert_eq!(refused.err(), Some(FramingError::HeadTooLarge));
        let ResponseHead::Final { response: largest, .. } = response(&whole(limit - 1), Method::GET) else {
            panic!("a 200 is final")
        };
        assert_eq!(largest.headers()["x-big"].len(), limit - 1, "its last field's value whole");
        let unfinished = |length: usize| format!("HTTP/1.1 200 OK\r\nX-Big: {}", "a".repeat(length - 24));
        assert_eq!(unfinished(MAX_HEAD_BYTES).len(), MAX_HEAD_BYTES);
        let waiting =
            parse_response(&mut BytesMut::from(unfinished(MAX_HEAD_BYTES - 1).as_str()), &Method::GET);
        assert!(matches!(waiting, Ok(None)), "one byte short of the limit, it waits");
        let refused = parse_response(&mut BytesMut::from(unfinished(MAX_HEAD_BYTES).as_str()), &Method::GET);
        assert_eq!(refused.err(), Some(FramingError::HeadTooLarge));
    }

    #[test]
    fn one_size_rule_for_a_head_whole_or_in_pieces() {
        use httparse::Status::{Complete, Partial};
        let below = MAX_HEAD_BYTES - 1;
        assert_eq!(head_length(Ok(Complete(below)), below), Ok(Some(below)));
        assert_eq!(head_length(Ok(Complete(MAX_HEAD_BYTES)), MAX_HEAD_BYTES), Err(Unreadable::TooLarge));
        assert_eq!(head_length(Ok(Partial), below), Ok(None));
        assert_eq!(head_length(Ok(Partial), MAX_HEAD_BYTES), Err(Unreadable::TooLarge));
        let invalid = Err(httparse::Error::Token);
        assert_eq!(head_length(invalid, 3), Err(Unreadable::Invalid(httparse::Error::Token)));
        assert_eq!(
            HeadError::from(Unreadable::Invalid(httparse::Error::TooManyHeaders)),
            HeadError::TooManyHeaders
        );
    }
}
