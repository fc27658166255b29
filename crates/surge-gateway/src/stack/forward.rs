//! What a proxy changes in the messages it forwards, once per request: the hop-by-hop headers
//! go both ways (RFC 9110 §7.6.1), the request gains `X-Forwarded-For/-Proto/-Host`, and an
//! HTTP/2 request's authority becomes a Host header. An upgrade keeps the two headers that ask
//! for it.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode};
use tower::{Layer, Service};

use crate::server::{ClientAddr, ClientUpgrade};

#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
}

pub struct ForwardLayer;

impl<S> Layer<S> for ForwardLayer {
    type Service = Forward<S>;
    fn layer(&self, inner: S) -> Forward<S> {
        Forward { inner }
    }
}

impl<S, B, R> Service<Request<B>> for Forward<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Forwarded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        rewrite_request(&mut request);
        Forwarded { response: self.inner.call(request) }
    }
}

pin_project_lite::pin_project! {
    pub struct Forwarded<F> {
        #[pin]
        response: F,
    }
}

impl<F: Future<Output = Result<Response<R>, E>>, R, E> Future for Forwarded<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let mut response = ready!(self.project().response.poll(cx))?;
        // A 101 keeps its Upgrade and Connection: the switch is what it says.
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(response.headers_mut());
        }
        Poll::Ready(Ok(response))
    }
}

/// Sets the forwarding headers and strips the hop-by-hop ones. The Host header is kept, so
/// instances see the name the client asked for. Forwarding fields from a client that is not a
/// trusted proxy are replaced, never passed on: they would let anyone claim any address.
/// Fields named `x-surge-*` are the gateway's to set, so a client's are dropped.
pub(crate) fn rewrite_request<B>(request: &mut Request<B>) {
    let upgrade = upgrade_protocol(request);
    let client = request.extensions().get::<ClientAddr>();
    let forwarded_for = client.and_then(|c| c.forwarded_for.clone());
    let trusted = client.is_some_and(|c| c.trusted);
    let proto = HeaderValue::from_static(if client.is_some_and(|c| c.tls) { "https" } else { "http" });
    let original_host = request
        .headers()
        .get(HOST)
        .cloned()
        .or_else(|| request.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let headers = request.headers_mut();
    let mut names = PresentFields::scan(headers, trusted);
    if remove_hop_by_hop(headers, names.hop_by_hop) {
        // The Connection header named fields of its own, which may have been any of these.
        names = PresentFields::scan(headers, trusted);
    }
    if names.claimed {
        strip_claims(headers, trusted);
    }
    if let Some(protocol) = upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol);
    }
    if let Some(ip) = forwarded_for {
        // Every field of the chain, in order (a proxy may have sent several).
        let earlier: Vec<&str> = if names.forwarded_for {
            headers.get_all(X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect()
        } else {
            Vec::new()
        };
        let value = match earlier.as_slice() {
            [] => Some(ip),
            earlier => {
                HeaderValue::from_str(&format!("{}, {}", earlier.join(", "), ip.to_str().unwrap_or_default()))
                    .ok()
            }
        };
        if let Some(value) = value {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    if !names.forwarded_proto {
        headers.insert(X_FORWARDED_PROTO, proto);
    }
    if let Some(host) = original_host {
        // An HTTP/2 request names its host in the URI only: instances get it as Host.
        if !names.host {
            headers.insert(HOST, host.clone());
        }
        if !names.forwarded_host {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }
}

/// What one pass over a request's field names finds, so that the rewrite looks none of them
/// up by hashing (each lookup was a few hundred instructions of a proxied request). The
/// forwarding fields count only where they stay: a client's claim to them is dropped.
#[derive(Default)]
struct PresentFields {
    hop_by_hop: [bool; HOP_BY_HOP_COUNT],
    /// A field the client may not set (see `strip_claims`).
    claimed: bool,
    forwarded_for: bool,
    forwarded_proto: bool,
    forwarded_host: bool,
    host: bool,
}

impl PresentFields {
    fn scan(headers: &HeaderMap, trusted: bool) -> Self {
        let mut names = PresentFields::default();
        for name in headers.keys() {
            if let Some(i) = hop_by_hop_index(name) {
                names.hop_by_hop[i] = true;
                continue;
            }
            if name == HOST {
                names.host = true;
                continue;
            }
            if is_claimed(name, trusted) {
                names.claimed = true;
                continue;
            }
            names.forwarded_for |= name == X_FORWARDED_FOR;
            names.forwarded_proto |= name == X_FORWARDED_PROTO;
            names.forwarded_host |= name == X_FORWARDED_HOST;
        }
        names
    }
}

/// Whether this field is one a client may not set: `x-surge-*` always, and the proxies' own
/// unless the client is a trusted proxy.
fn is_claimed(name: &HeaderName, trusted: bool) -> bool {
    let name = name.as_str();
    name.starts_with("x-surge-") || (!trusted && SET_BY_PROXIES.contains(&name))
}

/// Drops the fields a client may not set (`is_claimed`).
fn strip_claims(headers: &mut HeaderMap, trusted: bool) {
    let names: Vec<HeaderName> = headers.keys().filter(|name| is_claimed(name, trusted)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// The protocol a request asks to switch to. The server gives a request a [`ClientUpgrade`]
/// only when it asks (`Connection: upgrade` with `Upgrade: ...`) on a connection that can
/// switch, so that is what is looked for.
pub fn upgrade_protocol<B>(request: &Request<B>) -> Option<HeaderValue> {
    request.extensions().get::<ClientUpgrade>()?;
    request.headers().get(UPGRADE).cloned()
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Fields only a proxy may set, which a client could use to claim another address, scheme,
/// port or URL.
const SET_BY_PROXIES: &[&str] = &[
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "forwarded",
    "x-real-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    "x-original-url",
    "x-rewrite-url",
    "true-client-ip",
    "x-client-ip",
];
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// `HOP_BY_HOP.len()`, which an array's length cannot name (`HeaderName` has a destructor).
const HOP_BY_HOP_COUNT: usize = 7;
/// The headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] =
    [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE];

/// Whether a name this long could be one of `HOP_BY_HOP` (2, 7, 10, 16 or 17 bytes; a test
/// keeps the two in step).
fn is_hop_by_hop_length(length: usize) -> bool {
    matches!(length, 2 | 7 | 10 | 16 | 17)
}

/// Which of `HOP_BY_HOP` `name` is. Most names are passed over on their length alone; the
/// rest are cheap comparisons of standard headers.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    if !is_hop_by_hop_length(name.as_str().len()) {
        return None;
    }
    HOP_BY_HOP.iter().position(|hop| hop == name)
}

/// Removes the hop-by-hop headers, including any the Connection header names. One pass over
/// the names finds which are present; most messages carry none: an HTTP/1 message's
/// Connection that only said keep-alive or close was left out as it was read.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP_COUNT];
    for i in headers.keys().filter_map(hop_by_hop_index) {
        present[i] = true;
    }
    remove_hop_by_hop(headers, present);
}

/// Removes the hop-by-hop headers that are `present`, and those the Connection header names;
/// returns whether it removed one the Connection header named (a scan of the names made
/// before is then stale).
fn remove_hop_by_hop(headers: &mut HeaderMap, present: [bool; HOP_BY_HOP_COUNT]) -> bool {
    let mut removed_named = false;
    if present[0] {
        // Connection's own tokens: those that are not hop-by-hop already name extra headers.
        // Read as bytes, without a UTF-8 check. A value with bytes beyond ASCII still names
        // the fields its valid tokens name.
        let mut named = Vec::new();
        for value in headers.get_all(CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if [&b"close"[..], b"keep-alive", b"upgrade"].iter().any(|t| token.eq_ignore_ascii_case(t)) {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token) {
                    named.push(name);
                }
            }
        }
        for name in named {
            removed_named |= headers.remove(name).is_some();
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
    removed_named
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaving_a_connection_field_out_as_it_is_read_changes_nothing_forwarded() {
        use surge_http1::head::{parse_response, ResponseHead};
        let values: [&[u8]; 9] = [
            b"keep-alive",
            b"close",
            b"Keep-Alive, Upgrade",
            b" , close ,",
            b",",
            b"keep-alive, x-a",
            b"close, \xff",
            b"upgrade",
            b"KEEP-ALIVE, Close",
        ];
        let mut left_out = 0;
        for value in values {
            let mut text = b"HTTP/1.1 200 OK\r\nConnection: ".to_vec();
            text.extend_from_slice(value);
            text.extend_from_slice(
                b"\r\nX-A: 1\r\nClose: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
            );
            let parsed = parse_response(&mut bytes::BytesMut::from(&text[..]), &http::Method::GET);
            let Ok(Some(ResponseHead::Final { response, .. })) = parsed else { panic!("a final answer") };
            // What the gateway forwards from the map as read, and from the whole map.
            let mut read = response.headers().clone();
            let mut whole = read.clone();
            if !whole.contains_key(CONNECTION) {
                left_out += 1;
                whole.append(CONNECTION, HeaderValue::from_bytes(value).expect("a field value"));
            }
            strip_hop_by_hop(&mut read);
            strip_hop_by_hop(&mut whole);
            assert_eq!(read, whole, "{:?}", String::from_utf8_lossy(value));
        }
        assert_eq!(left_out, 5, "all but those with another token or none");
    }

    #[test]
    fn every_hop_by_hop_name_passes_the_length_filter() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop_length(name.as_str().len()), "{name}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("connection", " Upgrade ,X-Other,, "),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("x-other", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
            ("host", "shop.example"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        // A value with a byte beyond ASCII still names what its valid tokens name.
        headers
            .append("connection", HeaderValue::from_bytes(b"x-secret, \xff").expect("obs-text is a value"));
        headers.append("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "x-kept"]);
    }

    fn request(headers: &[(&str, &str)], upgradable: bool) -> Request<()> {
        let mut request = Request::builder().uri("http://shop.example/a");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(()).expect("request");
        request.extensions_mut().insert(ClientAddr::new("192.0.2.1:5000".parse().expect("address")));
        if upgradable {
            request.extensions_mut().insert(ClientUpgrade::new().0);
        }
        request
    }

    const CLAIMS: [(&str, &str); 8] = [
        ("x-forwarded-for", "10.1.1.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "other.example"),
        ("forwarded", "for=10.1.1.1"),
        ("x-real-ip", "10.1.1.1"),
        ("x-surge-deadline-ms", "1"),
        ("connection", "close"),
        ("x-original-url", "/admin"),
    ];

    #[test]
    fn forwarding_fields_from_a_client_are_replaced() {
        let mut direct = request(&CLAIMS, false);
        rewrite_request(&mut direct);
        let headers = direct.headers();
        assert_eq!(headers["x-forwarded-for"], "192.0.2.1");
        assert_eq!(headers["x-forwarded-proto"], "http");
        assert_eq!(headers["host"], "shop.example", "from the authority of an HTTP/2 request");
        assert_eq!(headers["x-forwarded-host"], "shop.example");
        for gone in ["forwarded", "x-real-ip", "x-surge-deadline-ms", "connection", "x-original-url"] {
            assert!(!headers.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn forwarding_fields_from_a_trusted_proxy_are_extended() {
        let mut proxied = request(&CLAIMS, false);
        if let Some(client) = proxied.extensions_mut().get_mut::<ClientAddr>() {
            client.trusted = true;
        }
        rewrite_request(&mut proxied);
        let headers = proxied.headers();
        assert_eq!(headers["x-forwarded-for"], "10.1.1.1, 192.0.2.1");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "other.example");
        assert_eq!(headers["forwarded"], "for=10.1.1.1");
        assert!(
            !headers.contains_key("x-surge-deadline-ms"),
            "a trusted proxy cannot set the gateway's own fields"
        );
    }

    #[test]
    fn fields_the_connection_header_names_are_gone_before_the_forwarding_ones_are_set() {
        let named = [
            ("connection", "x-forwarded-proto, host"),
            ("host", "front.example"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "other.example"),
        ];
        let mut proxied = request(&named, false);
        if let Some(client) = proxied.extensions_mut().get_mut::<ClientAddr>() {
            client.trusted = true;
        }
        rewrite_request(&mut proxied);
        let headers = proxied.headers();
        assert_eq!(headers["x-forwarded-proto"], "http", "the proxy's own, named hop-by-hop, replaced");
        assert_eq!(headers["host"], "front.example", "the client's Host put back: instances route on it");
        assert_eq!(headers["x-forwarded-host"], "other.example", "a trusted proxy's, kept");
        assert!(!headers.contains_key("connection"));

        let named = [
            ("connection", "x-surge-deadline-ms"),
            ("x-surge-deadline-ms", "1"),
            ("x-forwarded-proto", "https"),
        ];
        let mut direct = request(&named, false);
        rewrite_request(&mut direct);
        let headers = direct.headers();
        assert!(!headers.contains_key("x-surge-deadline-ms"));
        assert_eq!(headers["x-forwarded-proto"], "http", "a client's claim, replaced");
    }

    #[test]
    fn an_upgrade_keeps_what_asks_for_it_only_where_the_connection_can_switch() {
        let asks = [("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")];
        let mut upgrading = request(&asks, true);
        rewrite_request(&mut upgrading);
        assert_eq!(upgrading.headers()["connection"], "upgrade");
        assert_eq!(upgrading.headers()["upgrade"], "websocket");
        let mut http2 = request(&asks, false);
        rewrite_request(&mut http2);
        assert!(!http2.headers().contains_key("upgrade") && !http2.headers().contains_key("connection"));
    }
}
