//! HTTP caching's rules for a shared cache (RFC 9111), as pure functions over a request's and
//! a response's fields and the time: whether a response may be stored, for how long it is
//! fresh, whether a stored one may answer a request (fresh, stale, or only after asking the
//! instance again), the key it is kept under and its variant, conditional requests answered
//! 304, and the `Cache-Status` field (RFC 9211). The gateway's response cache calls these;
//! they do no I/O.

use std::time::{Duration, SystemTime};

use http::header::{
    HeaderName, ACCEPT_ENCODING, AGE, AUTHORIZATION, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, DATE,
    ETAG, EXPIRES, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, RANGE, SET_COOKIE, VARY,
};
use http::{HeaderMap, Method, StatusCode};

/// A route's caching settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Freshness for a response that says nothing of it (as nginx's `proxy_cache_valid`);
    /// `None`: such responses are not stored.
    pub default_ttl: Option<Duration>,
    /// Store responses that set cookies (off: one user's cookie never goes to another).
    pub store_set_cookie: bool,
    /// How long past its freshness a response may still be served while it is refreshed in
    /// the background, or when the instances fail, unless it says otherwise
    /// (`stale-while-revalidate`, `stale-if-error`).
    pub grace: Duration,
    /// Let a request's `no-cache` and `max-age` send it to the instance. Off, as in nginx and
    /// Varnish: a browser's hard reload sends them, and any client could bypass the cache.
    pub obey_request_no_cache: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            default_ttl: None,
            store_set_cookie: false,
            grace: Duration::ZERO,
            obey_request_no_cache: false,
        }
    }
}

/// The directives of a `Cache-Control` field that a shared cache acts on. Unknown directives
/// are ignored; a directive whose value does not parse counts as the strictest reading (a
/// `max-age` that is not a number makes the response stale, RFC 9111 §4.2.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub immutable: bool,
    pub only_if_cached: bool,
    pub max_age: Option<Duration>,
    pub s_maxage: Option<Duration>,
    /// `max-stale` without a value: any staleness.
    pub max_stale: Option<Duration>,
    pub min_fresh: Option<Duration>,
    pub stale_while_revalidate: Option<Duration>,
    pub stale_if_error: Option<Duration>,
}

/// The largest delta-seconds a cache needs to tell apart (RFC 9111 §1.2.2): anything above
/// is read as this.
const MOST_SECONDS: u64 = 1 << 31;

/// Delta-seconds: digits, capped at 2^31; anything else (or nothing where a value is needed)
/// is zero, the strictest reading.
fn delta_seconds(value: &str) -> Duration {
    let value = value.trim().trim_matches('"');
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Duration::ZERO;
    }
    Duration::from_secs(value.parse::<u64>().unwrap_or(MOST_SECONDS).min(MOST_SECONDS))
}

fn seconds(value: Option<&str>) -> Duration {
    value.map_or(Duration::ZERO, delta_seconds)
}

/// Every `Cache-Control` field of `headers`, read together.
pub fn directives(headers: &HeaderMap) -> Directives {
    let mut found = Directives::default();
    for field in headers.get_all(CACHE_CONTROL) {
        let Ok(text) = field.to_str() else { continue };
        for directive in text.split(',') {
            let (name, value) = match directive.split_once('=') {
                Some((name, value)) => (name.trim(), Some(value)),
                None => (directive.trim(), None),
            };
            match name.to_ascii_lowercase().as_str() {
                "no-store" => found.no_store = true,
                "no-cache" => found.no_cache = true,
                "private" => found.private = true,
                "public" => found.public = true,
                "must-revalidate" => found.must_revalidate = true,
                "proxy-revalidate" => found.proxy_revalidate = true,
                "immutable" => found.immutable = true,
                "only-if-cached" => found.only_if_cached = true,
                // Repeated with different values: the shortest.
                "max-age" => found.max_age = Some(shortest(found.max_age, seconds(value))),
                "s-maxage" => found.s_maxage = Some(shortest(found.s_maxage, seconds(value))),
                "max-stale" => found.max_stale = Some(value.map_or(Duration::MAX, |v| seconds(Some(v)))),
                "min-fresh" => found.min_fresh = Some(seconds(value)),
                "stale-while-revalidate" => found.stale_while_revalidate = Some(seconds(value)),
                "stale-if-error" => found.stale_if_error = Some(seconds(value)),
                _ => {}
            }
        }
    }
    found
}

fn shortest(before: Option<Duration>, now: Duration) -> Duration {
    before.map_or(now, |before| before.min(now))
}

/// Statuses a cache may store without explicit freshness (RFC 9110 §15.1, "heuristically
/// cacheable").
fn cacheable_by_default(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}

/// How a response may be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storable {
    /// Fresh for this long from when it was generated (its `Age` already counted).
    pub lifetime: Duration,
    /// Its age when received.
    pub age: Duration,
    /// May be served stale while it is refreshed, for this long past its freshness.
    pub while_revalidate: Duration,
    /// May be served stale when the instances fail, for this long past its freshness.
    pub if_error: Duration,
    /// Stale, it may not be served without asking the instance (must-revalidate,
    /// proxy-revalidate, s-maxage, or no-cache).
    pub revalidate_when_stale: bool,
    /// Always asked again before it is served (`no-cache`).
    pub revalidate_always: bool,
    /// The request fields its variants differ by (`Vary`), lower case.
    pub vary: Vec<HeaderName>,
}

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Method,
    Status,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    /// Nothing says how long it is fresh, and the route has no default.
    NoFreshness,
}

/// Whether a shared cache may store this response to this request, and how (RFC 9111 §3).
pub fn storable(
    method: &Method,
    request: &HeaderMap,
    status: StatusCode,
    response: &HeaderMap,
    policy: &Policy,
) -> Result<Storable, NotStored> {
    if method != Method::GET {
        return Err(NotStored::Method);
    }
    // Partial content, a 304 (it refreshes a stored response, it is not one), and interim
    // answers are not kept.
    if status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || status.is_informational()
    {
        return Err(NotStored::Status);
    }
    let asked = directives(request);
    let said = directives(response);
    if asked.no_store || said.no_store {
        return Err(NotStored::NoStore);
    }
    if said.private {
        return Err(NotStored::Private);
    }
    // A request with credentials: only when the response says a shared cache may keep it.
    if request.contains_key(AUTHORIZATION)
        && !(said.public || said.s_maxage.is_some() || said.must_revalidate)
    {
        return Err(NotStored::Authorization);
    }
    if response.contains_key(SET_COOKIE) && !policy.store_set_cookie {
        return Err(NotStored::SetCookie);
    }
    let vary = vary_fields(response).ok_or(NotStored::VaryStar)?;
    let explicit = said.s_maxage.or(said.max_age).or_else(|| expires_lifetime(response));
    let lifetime = match explicit {
        Some(lifetime) => lifetime,
        None if said.no_cache => Duration::ZERO,
        None if cacheable_by_default(status) || said.public => {
            policy.default_ttl.ok_or(NotStored::NoFreshness)?
        }
        None => return Err(NotStored::NoFreshness),
    };
    let grace = |directive: Option<Duration>| directive.unwrap_or(policy.grace);
    Ok(Storable {
        lifetime,
        age: header_seconds(response, &AGE),
        while_revalidate: grace(said.stale_while_revalidate),
        if_error: grace(said.stale_if_error),
        // s-maxage implies proxy-revalidate (RFC 9111 §5.2.2.10), unless the response says how
        // stale it may be served (RFC 5861), as CDNs read `s-maxage=1, stale-while-revalidate=59`.
        revalidate_when_stale: said.must_revalidate
            || said.proxy_revalidate
            || said.no_cache
            || (said.s_maxage.is_some()
                && said.stale_while_revalidate.is_none()
                && said.stale_if_error.is_none()),
        revalidate_always: said.no_cache,
        vary,
    })
}

/// `Expires` minus `Date` (or the time now when there is no `Date`); an `Expires` that does
/// not parse means already expired.
fn expires_lifetime(response: &HeaderMap) -> Option<Duration> {
    let expires = response.get(EXPIRES)?.to_str().ok();
    let Some(expires) = expires.and_then(|e| httpdate::parse_http_date(e).ok()) else {
        return Some(Duration::ZERO);
    };
    let date = response
        .get(DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d).ok())
        .unwrap_or_else(SystemTime::now);
    Some(expires.duration_since(date).unwrap_or(Duration::ZERO))
}

fn header_seconds(headers: &HeaderMap, name: &HeaderName) -> Duration {
    headers.get(name).and_then(|v| v.to_str().ok()).map_or(Duration::ZERO, delta_seconds)
}

/// The fields a response varies by, lower case and sorted; `None` for `Vary: *`.
pub fn vary_fields(response: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut fields = Vec::new();
    for value in response.get_all(VARY) {
        let Ok(text) = value.to_str() else { continue };
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            if let Ok(name) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
                fields.push(name);
            }
        }
    }
    fields.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    fields.dedup();
    Some(fields)
}

/// The variant of a request: the values of the fields the response varies by, each
/// normalised (values joined by commas, blanks around them dropped), one line per field.
pub fn variant(request: &HeaderMap, vary: &[HeaderName]) -> String {
    let mut variant = String::new();
    for name in vary {
        variant.push_str(name.as_str());
        variant.push('=');
        if name == ACCEPT_ENCODING {
            // Clients spell it a hundred ways; what matters is which codings they take.
            variant.push_str(&accepted_codings(request));
        } else {
            variant.push_str(&field_values(request, name));
        }
        variant.push('\n');
    }
    variant
}

/// The codings a request accepts (q above 0), lower case, sorted, joined by commas;
/// `identity` when none: the variant of an instance's response that varies by them.
pub fn accepted_codings(request: &HeaderMap) -> String {
    let mut codings: Vec<String> = Vec::new();
    for value in request.get_all(ACCEPT_ENCODING) {
        let text = escaped(value.as_bytes());
        for item in text.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let refused = parts.any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p.strip_prefix("q=").and_then(|q| q.trim().parse::<f32>().ok()).is_some_and(|q| q <= 0.0)
            });
            let coding = if coding == "x-gzip" { "gzip".to_owned() } else { coding };
            if !coding.is_empty() && !refused {
                codings.push(coding);
            }
        }
    }
    codings.sort();
    codings.dedup();
    if codings.is_empty() {
        "identity".to_owned()
    } else {
        codings.join(",")
    }
}

/// A content coding the cache compresses stored responses with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Brotli,
    Gzip,
}

impl Coding {
    pub fn token(self) -> &'static str {
        match self {
            Coding::Brotli => "br",
            Coding::Gzip => "gzip",
        }
    }
}

/// The coding a request's `Accept-Encoding` prefers among brotli and gzip: the higher q-value,
/// brotli on a tie (it is smaller); `q=0` refuses one, `*` stands for any not named.
pub fn preferred_coding(request: &HeaderMap) -> Option<Coding> {
    codings_by_preference(request).into_iter().next()
}

/// The codings among brotli and gzip that a request accepts, the preferred first (see
/// [`preferred_coding`]).
pub fn codings_by_preference(request: &HeaderMap) -> Vec<Coding> {
    let (mut brotli, mut gzip, mut any) = (None::<f32>, None::<f32>, None::<f32>);
    for value in request.get_all(ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q=").or_else(|| p.trim().strip_prefix("Q=")))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match coding.as_str() {
                "br" => brotli = Some(q),
                "gzip" | "x-gzip" => gzip = Some(q),
                "*" => any = Some(q),
                _ => {}
            }
        }
    }
    let brotli = brotli.or(any).unwrap_or(0.0);
    let gzip = gzip.or(any).unwrap_or(0.0);
    let mut accepted: Vec<(f32, Coding)> =
        [(brotli, Coding::Brotli), (gzip, Coding::Gzip)].into_iter().filter(|(q, _)| *q > 0.0).collect();
    // Stable: brotli stays first on a tie.
    accepted.sort_by(|a, b| b.0.total_cmp(&a.0));
    accepted.into_iter().map(|(_, coding)| coding).collect()
}

/// Whether a stored response is worth compressing for clients: a 200 of a textual type, at
/// least 1 KiB, not compressed already, and not `no-transform`.
pub fn compressible(status: StatusCode, response: &HeaderMap, length: usize) -> bool {
    let kind = response.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let kind = kind.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let textual = kind.starts_with("text/")
        || kind.ends_with("+json")
        || kind.ends_with("+xml")
        || matches!(
            kind.as_str(),
            "application/json"
                | "application/javascript"
                | "application/xml"
                | "application/wasm"
                | "image/svg+xml"
                | "application/x-javascript"
        );
    status == StatusCode::OK
        && textual
        && length >= 1024
        && !response.contains_key(CONTENT_ENCODING)
        && !directives_have(response, "no-transform")
}

fn directives_have(headers: &HeaderMap, wanted: &str) -> bool {
    headers
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|directive| directive.trim().eq_ignore_ascii_case(wanted))
}

/// A field's values joined by commas, blanks around them dropped: blanks do not make a
/// variant, case does (a token or a cookie is case-sensitive). Bytes outside visible ASCII,
/// and `%`, are written `%XX`: two values that differ only there are still two variants.
pub fn field_values(request: &HeaderMap, name: &HeaderName) -> String {
    let values: Vec<String> = request
        .get_all(name)
        .iter()
        .map(|v| escaped(v.as_bytes()))
        .flat_map(|v| v.split(',').map(|part| part.trim().to_owned()).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .collect();
    values.join(",")
}

fn escaped(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for &byte in bytes {
        if (byte == b' ' || byte.is_ascii_graphic()) && byte != b'%' {
            text.push(byte as char);
        } else {
            text.push_str(&format!("%{byte:02X}"));
        }
    }
    text
}

/// `host:port` without its port (`[::1]:80` keeps its brackets).
fn without_port(host: &str) -> &str {
    if let Some(end) = host.strip_prefix('[').and_then(|rest| rest.find(']')) {
        return &host[..end + 2];
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The key a response is kept under: the scheme (a redirect to HTTPS kept for HTTP must not
/// answer HTTPS), the host, the path and the query (its parameters sorted when `sort_query`,
/// so `?b=1&a=2` and `?a=2&b=1` share an entry), and the values of the route's key fields.
/// HEAD is answered from GET's entry, so the method is not in it. The host's port is not in
/// it either: routing ignores it, so `shop.example:80` and `shop.example` are one site.
pub fn key(
    scheme: &str,
    host: &str,
    path: &str,
    query: Option<&str>,
    sort_query: bool,
    fields: &[(HeaderName, String)],
) -> String {
    // Built by hand rather than by `format!`, at its final size: it is on every hit's path.
    let host = without_port(host);
    let query = query.filter(|q| !q.is_empty());
    let fields_length: usize = fields.iter().map(|(name, value)| name.as_str().len() + value.len() + 2).sum();
    let length =
        scheme.len() + 3 + host.len() + path.len() + query.map_or(0, |q| q.len() + 1) + fields_length;
    let mut key = String::with_capacity(length);
    key.push_str(scheme);
    key.push_str("://");
    let host_starts = key.len();
    key.push_str(host);
    if let Some(host) = key.get_mut(host_starts..) {
        host.make_ascii_lowercase();
    }
    key.push_str(path);
    if let Some(query) = query {
        key.push('?');
        if sort_query {
            let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
            pairs.sort_unstable();
            key.push_str(&pairs.join("&"));
        } else {
            key.push_str(query);
        }
    }
    for (name, value) in fields {
        key.push('\n');
        key.push_str(name.as_str());
        key.push('=');
        key.push_str(value);
    }
    key
}

/// What a stored response can do for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Serve it.
    Fresh,
    /// Serve it stale (the request accepts staleness, `max-stale`).
    Stale,
    /// Serve it stale and refresh it in the background (`stale-while-revalidate`).
    StaleWhileRevalidate,
    /// Ask the instance first (conditionally, when the response has a validator).
    Revalidate,
}

/// How old a stored response is now: its age when received plus the time since.
pub fn current_age(stored: &Storable, stored_at: SystemTime, now: SystemTime) -> Duration {
    stored.age + now.duration_since(stored_at).unwrap_or(Duration::ZERO)
}

/// Whether a stored response may answer this request now (RFC 9111 §4.2, §4.2.4, RFC 5861).
pub fn usable(
    stored: &Storable,
    stored_at: SystemTime,
    request: &HeaderMap,
    policy: &Policy,
    now: SystemTime,
) -> Use {
    let mut asked = directives(request);
    if !policy.obey_request_no_cache {
        asked.no_cache = false;
        asked.max_age = None;
    }
    if stored.revalidate_always || asked.no_cache {
        return Use::Revalidate;
    }
    let age = current_age(stored, stored_at, now);
    let fresh_left = stored.lifetime.checked_sub(age);
    let fresh_enough = match fresh_left {
        Some(left) if !left.is_zero() => {
            asked.max_age.is_none_or(|max| age <= max) && asked.min_fresh.is_none_or(|min| left >= min)
        }
        _ => false,
    };
    if fresh_enough {
        return Use::Fresh;
    }
    if fresh_left.is_some_and(|left| !left.is_zero()) {
        // Fresh, but not enough for this request's max-age or min-fresh.
        return Use::Revalidate;
    }
    if stored.revalidate_when_stale {
        return Use::Revalidate;
    }
    let stale_for = age.saturating_sub(stored.lifetime);
    if asked.max_stale.is_some_and(|max| stale_for <= max) {
        return Use::Stale;
    }
    if stale_for < stored.while_revalidate {
        return Use::StaleWhileRevalidate;
    }
    Use::Revalidate
}

/// Whether a stale response may be served because the instances failed (`stale-if-error`).
pub fn usable_on_error(stored: &Storable, stored_at: SystemTime, now: SystemTime) -> bool {
    if stored.revalidate_when_stale {
        return false;
    }
    let stale_for = current_age(stored, stored_at, now).saturating_sub(stored.lifetime);
    stale_for <= stored.if_error
}

/// Whether a conditional request is answered 304 by a stored response's validators:
/// `If-None-Match` by weak comparison of entity tags, else `If-Modified-Since` by its
/// `Last-Modified`.
pub fn not_modified(request: &HeaderMap, response: &HeaderMap) -> bool {
    if let Some(wanted) = request.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let Some(tag) = response.get(ETAG).and_then(|v| v.to_str().ok()) else { return false };
        return etag_listed(wanted, tag);
    }
    let since = request
        .get(IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let modified = response
        .get(LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    matches!((since, modified), (Some(since), Some(modified)) if modified <= since)
}

/// Whether an `If-None-Match` list names `tag`, or is `*` (weak comparison).
pub fn etag_listed(wanted: &str, tag: &str) -> bool {
    wanted.trim() == "*" || wanted.split(',').any(|candidate| same_entity(candidate, tag))
}

/// Weak comparison of two entity tags (RFC 9110 §8.8.3.2): equal once `W/` is set aside.
pub fn same_entity(one: &str, other: &str) -> bool {
    let weak = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    weak(one) == weak(other)
}

/// What a request's `Range` asks of a stored representation `length` bytes long (RFC 9110
/// §14.2), given the representation's fields (for `If-Range`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// The whole: no `Range`, one that is ignored (not `bytes`, malformed, several ranges,
    /// which this cache does not answer as multipart), or an `If-Range` that no longer holds.
    Whole,
    /// Bytes `first..=last`, both within the representation.
    Part { first: u64, last: u64 },
    /// No byte asked for exists: 416.
    Unsatisfiable,
}

pub fn byte_range(request: &HeaderMap, response: &HeaderMap, length: u64) -> ByteRange {
    let Some(range) = request.get(RANGE).and_then(|v| v.to_str().ok()) else { return ByteRange::Whole };
    if let Some(condition) = request.get(IF_RANGE).and_then(|v| v.to_str().ok()) {
        if !if_range_holds(condition.trim(), response) {
            return ByteRange::Whole;
        }
    }
    let Some((unit, spec)) = range.split_once('=') else { return ByteRange::Whole };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return ByteRange::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return ByteRange::Whole };
    let number = |text: &str| -> Option<u64> {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok()).flatten()
    };
    match (first, last) {
        ("", suffix) => match number(suffix) {
            Some(0) => ByteRange::Unsatisfiable,
            Some(_) if length == 0 => ByteRange::Unsatisfiable,
            Some(suffix) => ByteRange::Part { first: length.saturating_sub(suffix), last: length - 1 },
            None => ByteRange::Whole,
        },
        (first, "") => match number(first) {
            Some(first) if first >= length => ByteRange::Unsatisfiable,
            Some(first) => ByteRange::Part { first, last: length - 1 },
            None => ByteRange::Whole,
        },
        (first, last) => match (number(first), number(last)) {
            (Some(first), Some(last)) if first > last => ByteRange::Whole,
            (Some(first), Some(_)) if first >= length => ByteRange::Unsatisfiable,
            (Some(first), Some(last)) => ByteRange::Part { first, last: last.min(length - 1) },
            _ => ByteRange::Whole,
        },
    }
}

/// `If-Range` (RFC 9110 §13.1.5): an entity tag that matches the representation's strongly,
/// or exactly its `Last-Modified` date.
fn if_range_holds(condition: &str, response: &HeaderMap) -> bool {
    let field = |name| response.get(name).and_then(|v: &http::HeaderValue| v.to_str().ok());
    if condition.starts_with('"') || condition.starts_with("W/") {
        return field(ETAG)
            .is_some_and(|tag| !tag.starts_with("W/") && !condition.starts_with("W/") && tag == condition);
    }
    field(LAST_MODIFIED).is_some_and(|modified| modified == condition)
}

/// How the cache handled a response, for `Cache-Status` (RFC 9211).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Served from the cache; a negative ttl says how stale it was.
    Hit { ttl_left: i64 },
    /// Forwarded to the instance: why (`miss`, `stale`, `request`, `uri-miss`, `method`), its
    /// status, whether the answer was stored, whether this request waited for another's, the
    /// freshness of what was served, and a detail (`stale-if-error`).
    Forward {
        why: &'static str,
        status: u16,
        stored: bool,
        collapsed: bool,
        ttl_left: Option<i64>,
        detail: Option<&'static str>,
    },
}

/// The `Cache-Status` value, under the cache's name. Written by hand rather than by
/// `format!`: it is on every hit's path.
pub fn cache_status(name: &str, handled: &Handled) -> String {
    let mut numbers = itoa::Buffer::new();
    let mut value = String::with_capacity(64);
    value.push_str(name);
    match handled {
        Handled::Hit { ttl_left } => {
            value.push_str("; hit; ttl=");
            value.push_str(numbers.format(*ttl_left));
        }
        Handled::Forward { why, status, stored, collapsed, ttl_left, detail } => {
            value.push_str("; fwd=");
            value.push_str(why);
            value.push_str("; fwd-status=");
            value.push_str(numbers.format(*status));
            if *stored {
                value.push_str("; stored");
            }
            if *collapsed {
                value.push_str("; collapsed");
            }
            if let Some(ttl) = ttl_left {
                value.push_str("; ttl=");
                value.push_str(numbers.format(*ttl));
            }
            if let Some(detail) = detail {
                value.push_str("; detail=");
                value.push_str(detail);
            }
        }
    }
    value
}

#[cfg(test)]
mod tests;
