//! A cached route's requests: answered from its [`ResponseCache`] when HTTP's caching rules
//! allow (RFC 9111, decided by `surge_cache::rules`), else sent through the service's stack
//! with the answer stored as it streams to the client. Concurrent misses for one key send one
//! request upstream; the others wait for its answer (up to the route's `collapse_timeout`).
//! Stale responses are served while they are refreshed in the background
//! (`stale-while-revalidate`) and when the instances fail (`stale-if-error`); stale ones with a
//! validator are revalidated, a 304 refreshing what is stored. Every response of the route
//! carries `Cache-Status` (RFC 9211).

use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderName, HeaderValue, ACCEPT_RANGES, AGE, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, ETAG,
    IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE, VARY,
};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use surge_cache::responses::{Joined, Lookup, PurgeMark, ResponseCache, ResponseMetrics, Stored};
use surge_cache::rules::{self, ByteRange, Handled, Use};
use tower::ServiceExt;

use crate::body::GatewayBody;
use crate::server::ClientBody;
use crate::stack::ServiceStack;
use crate::wire::BoxError;
use crate::GatewayError;

/// How long a response being stored may go without a byte before it is given up: the task
/// reading it lives on when its client has gone.
const BODY_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// The cache's name in `Cache-Status`.
const NAME: &str = "surge";

/// Fields of a stored response a 304 sends along (RFC 9110 §15.4.5).
const NOT_MODIFIED_FIELDS: [HeaderName; 7] = [
    http::header::CACHE_CONTROL,
    http::header::CONTENT_LOCATION,
    http::header::DATE,
    ETAG,
    http::header::EXPIRES,
    http::header::VARY,
    LAST_MODIFIED,
];

/// Answers a request to a cached route.
pub(crate) async fn serve(
    cache: Arc<ResponseCache>,
    stack: StackOf,
    request: Request<ClientBody>,
    host: String,
) -> Response<GatewayBody> {
    let (parts, body) = request.into_parts();
    let tls = parts.extensions.get::<crate::server::ClientAddr>().is_some_and(|client| client.tls);
    let base = cache.key(if tls { "https" } else { "http" }, &host, &parts.uri, &parts.headers);
    let fetch = Fetch { cache, stack, base };
    // What goes upstream is boxed: the hit path's future stays small, so the one boxed per
    // request (and moved about) is.
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return Box::pin(fetch.other_method(parts, body)).await;
    }
    let now = SystemTime::now();
    let found = match fetch.cache.lookup_local(&fetch.base, &parts.headers) {
        Lookup::Miss => Box::pin(fetch.cache.lookup(&fetch.base, &parts.headers)).await,
        found => found,
    };
    match found {
        Lookup::Found(stored) => {
            match fetch.usable(&stored, &parts.headers, now) {
                Use::Fresh => fetch.hit(&stored, &parts, now),
                Use::Stale => fetch.stale(&stored, &parts, now),
                Use::StaleWhileRevalidate => {
                    fetch.refresh_in_background(&parts, &stored);
                    fetch.stale(&stored, &parts, now)
                }
                // What must be revalidated may not be served without asking (RFC 9111 §5.2.1.7).
                Use::Revalidate if only_if_cached(&parts.headers) => fetch.not_cached(),
                // A HEAD neither revalidates nor refreshes what GET stored.
                Use::Revalidate if parts.method == Method::HEAD => {
                    Box::pin(fetch.passed(parts, body, "stale")).await
                }
                Use::Revalidate => Box::pin(fetch.collapsed(parts, body, Some(stored), "stale")).await,
            }
        }
        Lookup::Miss | Lookup::Pass if only_if_cached(&parts.headers) => fetch.not_cached(),
        // A HEAD is answered from GET's entry, but does not fill it; a key whose answers lately
        // could not be stored goes upstream as the client sent it.
        Lookup::Pass => Box::pin(fetch.passed(parts, body, "miss")).await,
        Lookup::Miss if parts.method == Method::HEAD => Box::pin(fetch.passed(parts, body, "miss")).await,
        Lookup::Miss => Box::pin(fetch.collapsed(parts, body, None, "miss")).await,
    }
}

fn only_if_cached(request: &HeaderMap) -> bool {
    rules::directives(request).only_if_cached
}

/// A service's stack, taken from the gateway only for a request that goes upstream (a hit
/// needs none), and the service's name, for errors.
#[derive(Clone)]
pub(crate) struct StackOf {
    pub(crate) gateway: Arc<crate::Gateway>,
    pub(crate) index: usize,
    pub(crate) service: Arc<str>,
}

impl StackOf {
    fn get(&self) -> ServiceStack {
        self.gateway.services[self.index].clone()
    }
}

/// One request's business with the cache.
struct Fetch {
    cache: Arc<ResponseCache>,
    stack: StackOf,
    base: String,
}

impl Fetch {
    fn metrics(&self) -> &ResponseMetrics {
        self.cache.metrics()
    }

    fn usable(&self, stored: &Stored, request: &HeaderMap, now: SystemTime) -> Use {
        rules::usable(&stored.storable, stored.stored_at, request, &self.cache.settings().policy, now)
    }

    /// `only-if-cached` with nothing usable: 504, nothing sent upstream (RFC 9111 §5.2.1.7).
    fn not_cached(&self) -> Response<GatewayBody> {
        let mut response = Response::new(GatewayBody::full(Bytes::new()));
        *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
        self.counted_miss(response, "miss", false, false)
    }

    /// The request upstream as the client sent it (its Range and conditions kept), the
    /// answer not stored.
    async fn passed(self, parts: Parts, body: ClientBody, why: &'static str) -> Response<GatewayBody> {
        // An instance that does not take ranges answers 200: the part is cut here.
        let asked = parts.headers.contains_key(RANGE).then(|| (parts.method.clone(), parts.headers.clone()));
        let Ok(response) = self.stack.get().oneshot(Request::from_parts(parts, body)).await;
        let response = self.counted_miss(response, why, false, false);
        match &asked {
            Some((method, headers)) => ranged(response, method, headers),
            None => response,
        }
    }

    /// POST, PUT, DELETE and the rest go upstream; one that succeeds makes what is stored for
    /// its URL out of date (RFC 9111 §4.4), so it is dropped here.
    async fn other_method(self, parts: Parts, body: ClientBody) -> Response<GatewayBody> {
        let unsafe_method = !matches!(parts.method, Method::OPTIONS | Method::TRACE);
        let Ok(mut response) = self.stack.get().oneshot(Request::from_parts(parts, body)).await;
        let status = response.status();
        if unsafe_method && (status.is_success() || status.is_redirection()) {
            self.cache.forget(&self.base);
        }
        set_cache_status(response.headers_mut(), &forwarded("method", status, false, false, None));
        response
    }

    /// A miss (or a stale entry to revalidate): the first request for the key goes upstream,
    /// the others wait for its answer, then are served what it stored. When it stored nothing
    /// because the instance failed, the next in line goes and the rest wait for it in turn (as
    /// nginx's `proxy_cache_lock`), so a failing service is not stormed; when the answer was one
    /// that may not be stored, they all go at once.
    async fn collapsed(
        self,
        parts: Parts,
        body: ClientBody,
        stale: Option<Arc<Stored>>,
        why: &'static str,
    ) -> Response<GatewayBody> {
        let deadline = tokio::time::Instant::now() + self.cache.settings().collapse_timeout;
        let mut waited = false;
        loop {
            match self.cache.join(&self.base) {
                Joined::Leader(flight) => {
                    // Stored while this request looked and joined: no need to go.
                    let now = SystemTime::now();
                    if let Lookup::Found(stored) = self.cache.lookup_local(&self.base, &parts.headers) {
                        if self.usable(&stored, &parts.headers, now) == Use::Fresh {
                            drop(flight);
                            return self.hit(&stored, &parts, now);
                        }
                    }
                    return self.upstream(parts, body, stale, why, Some(flight), waited).await;
                }
                Joined::Follower(mut done) => {
                    let too_long = tokio::time::timeout_at(deadline, done.changed()).await.is_err();
                    waited = true;
                    let now = SystemTime::now();
                    match self.cache.lookup_local(&self.base, &parts.headers) {
                        Lookup::Found(stored) => {
                            let usable = self.usable(&stored, &parts.headers, now);
                            if matches!(usable, Use::Fresh | Use::Stale | Use::StaleWhileRevalidate) {
                                ResponseMetrics::count(&self.metrics().collapsed);
                                let handled =
                                    forwarded(why, stored.status, false, true, Some(stored.ttl_left(now)));
                                return answered(&stored, &parts, now, &handled);
                            }
                        }
                        Lookup::Pass => return self.upstream(parts, body, stale, why, None, true).await,
                        Lookup::Miss => {}
                    }
                    if too_long {
                        return self.upstream(parts, body, stale, why, None, true).await;
                    }
                }
            }
        }
    }

    /// Sends the request upstream (conditionally when `stale` has a validator) and stores
    /// the answer if the rules allow; `flight` ends when the answer is stored or given up.
    async fn upstream(
        self,
        parts: Parts,
        body: ClientBody,
        stale: Option<Arc<Stored>>,
        why: &'static str,
        flight: Option<surge_cache::responses::Flight>,
        collapsed: bool,
    ) -> Response<GatewayBody> {
        let mut outgoing = Request::from_parts(parts.clone(), body);
        // The cache asks for the whole response, and its own validators, whatever the client
        // asked; the client's conditions are answered from what comes back.
        let headers = outgoing.headers_mut();
        for name in [IF_NONE_MATCH, IF_MODIFIED_SINCE, IF_MATCH, IF_UNMODIFIED_SINCE, IF_RANGE, RANGE] {
            headers.remove(name);
        }
        for (have, ask) in [(ETAG, IF_NONE_MATCH), (LAST_MODIFIED, IF_MODIFIED_SINCE)] {
            if let Some(value) = stale.as_ref().and_then(|stale| stale.headers.get(&have)) {
                headers.insert(ask, value.clone());
            }
        }
        let began = self.cache.fetch_began();
        let Ok(response) = self.stack.get().oneshot(outgoing).await;
        let now = SystemTime::now();
        let status = response.status();
        if let Some(stale) = stale {
            if status == StatusCode::NOT_MODIFIED && same_validator(&stale.headers, response.headers()) {
                let Some(refreshed) = refreshed(&stale, response.headers(), &parts, &self.cache, now) else {
                    // Not storable as it now stands: this request still gets the body the 304
                    // confirmed, with the new fields, and nothing is kept.
                    let confirmed = merged(&stale.headers, response.headers());
                    let storable = stale.storable.clone();
                    let once = stale.revalidated(confirmed, storable, now);
                    return answered(&once, &parts, now, &forwarded(why, status, false, collapsed, None));
                };
                let (refreshed, kept) = self.cache.store(&self.base, &parts.headers, refreshed, began);
                drop(flight);
                ResponseMetrics::count(&self.metrics().hits);
                let handled = forwarded(why, status, kept, collapsed, Some(refreshed.ttl_left(now)));
                return answered(&refreshed, &parts, now, &handled);
            }
            if is_failure(status) && rules::usable_on_error(&stale.storable, stale.stored_at, now) {
                ResponseMetrics::count(&self.metrics().stale);
                let handled = Handled::Forward {
                    why: "stale",
                    status: status.as_u16(),
                    stored: false,
                    collapsed,
                    ttl_left: Some(stale.ttl_left(now)),
                    detail: Some("stale-if-error"),
                };
                return answered(&stale, &parts, now, &handled);
            }
        }
        let policy = &self.cache.settings().policy;
        let storable = rules::storable(&Method::GET, &parts.headers, status, response.headers(), policy);
        let length = response.body().size_hint().exact();
        let fits = length.is_some_and(|length| length <= self.cache.settings().max_object);
        let storable = match storable {
            Ok(storable) if fits => storable,
            _ => {
                // A failure is no reason to stop collapsing: the next request tries again.
                if !is_failure(status) {
                    self.cache.pass(&self.base);
                }
                let response = self.counted_miss(response, why, false, collapsed);
                return ranged(response, &parts.method, &parts.headers);
            }
        };
        let length = length.unwrap_or(0);
        let condition_holds =
            rules::not_modified(&parts.headers, response.headers()) && status == StatusCode::OK;
        // A client that takes a compressed body is answered from the stored response, which
        // is compressed once whole: it waits for all of it (at most `max_object`).
        let compressed = !condition_holds
            && rules::preferred_coding(&parts.headers).is_some()
            && rules::compressible(status, response.headers(), usize::try_from(length).unwrap_or(usize::MAX));
        let instance = compressed.then(|| response.body().instance_id().unwrap_or("-").to_owned());
        let (head, body) = response.into_parts();
        let recorder = Recorder {
            cache: Arc::clone(&self.cache),
            base: self.base.clone(),
            request: parts.headers.clone(),
            status: head.status,
            headers: head.headers.clone(),
            storable,
            received: now,
            began,
            flight,
        };
        if compressed {
            let (answer, whole) = tokio::sync::oneshot::channel();
            tokio::spawn(recorder.store_while_reading(body, length, Reader::Whole(answer)));
            ResponseMetrics::count(&self.metrics().misses);
            let outcome = whole.await.unwrap_or_else(|_| Err("the cache's reader stopped".into()));
            let now = SystemTime::now();
            return match outcome {
                Ok((stored, kept)) => {
                    let handled = forwarded(why, status, kept, collapsed, Some(stored.ttl_left(now)));
                    answered(&stored, &parts, now, &handled)
                }
                Err(cause) => {
                    let (service, instance) = (self.stack.service.to_string(), instance.unwrap_or_default());
                    let failed = GatewayError::Upstream { service, instance, cause: cause.to_string() };
                    let mut response = failed.into_response();
                    set_cache_status(response.headers_mut(), &forwarded(why, status, false, collapsed, None));
                    response
                }
            };
        }
        let (to_client, frames) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(recorder.store_while_reading(body, length, Reader::Streaming(to_client)));
        if condition_holds {
            // The client's condition holds for what came: a 304 to it; the body is still read
            // and stored.
            return self.counted_miss(not_modified_by(&head.headers), why, true, collapsed);
        }
        let streamed = Response::from_parts(head, GatewayBody::streaming(Streamed { frames, left: length }));
        ranged(self.counted_miss(streamed, why, true, collapsed), &parts.method, &parts.headers)
    }

    fn counted_miss(
        &self,
        mut response: Response<GatewayBody>,
        why: &'static str,
        stored: bool,
        collapsed: bool,
    ) -> Response<GatewayBody> {
        ResponseMetrics::count(&self.metrics().misses);
        let handled = forwarded(why, response.status(), stored, collapsed, None);
        set_cache_status(response.headers_mut(), &handled);
        response
    }

    fn hit(&self, stored: &Stored, parts: &Parts, now: SystemTime) -> Response<GatewayBody> {
        ResponseMetrics::count(&self.metrics().hits);
        answered(stored, parts, now, &Handled::Hit { ttl_left: stored.ttl_left(now) })
    }

    fn stale(&self, stored: &Stored, parts: &Parts, now: SystemTime) -> Response<GatewayBody> {
        ResponseMetrics::count(&self.metrics().stale);
        self.hit(stored, parts, now)
    }

    /// `stale-while-revalidate`: one request (unless one is under way) refreshes the entry
    /// behind the client's back.
    fn refresh_in_background(&self, parts: &Parts, stale: &Arc<Stored>) {
        let Joined::Leader(flight) = self.cache.join(&self.base) else { return };
        let mut parts = parts.clone();
        parts.method = Method::GET;
        let fetch =
            Fetch { cache: Arc::clone(&self.cache), stack: self.stack.clone(), base: self.base.clone() };
        let stale = Arc::clone(stale);
        // The answer is dropped: what is stored is read and kept without it.
        tokio::spawn(async move {
            fetch.upstream(parts, ClientBody::Empty, Some(stale), "stale", Some(flight), false).await;
        });
    }
}

/// Statuses that count as the instances failing, for `stale-if-error` (RFC 5861 §4).
fn is_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// Sent upstream: why, its status, whether stored, whether it waited for another request, and
/// (when a stored response is what it got) that response's freshness.
fn forwarded(
    why: &'static str,
    status: StatusCode,
    stored: bool,
    collapsed: bool,
    ttl_left: Option<i64>,
) -> Handled {
    Handled::Forward { why, status: status.as_u16(), stored, collapsed, ttl_left, detail: None }
}

fn set_cache_status(headers: &mut HeaderMap, handled: &Handled) {
    if let Ok(value) = HeaderValue::from_str(&rules::cache_status(NAME, handled)) {
        headers.insert("cache-status", value);
    }
}

/// [`answer`], cut to the range asked for, with its `Cache-Status`.
fn answered(stored: &Stored, parts: &Parts, now: SystemTime, handled: &Handled) -> Response<GatewayBody> {
    let mut response = ranged(answer(stored, parts, now), &parts.method, &parts.headers);
    set_cache_status(response.headers_mut(), handled);
    response
}

/// A stored response as the answer to a request: 304 when the request's condition holds,
/// without a body for HEAD, with its `Age`.
fn answer(stored: &Stored, parts: &Parts, now: SystemTime) -> Response<GatewayBody> {
    let coding = rules::preferred_coding(&parts.headers)
        .and_then(|coding| stored.encoded.get(coding).map(|body| (coding, body)));
    let conditional =
        parts.headers.contains_key(IF_NONE_MATCH) || parts.headers.contains_key(IF_MODIFIED_SINCE);
    let mut response = if conditional && rules::not_modified(&parts.headers, &stored.headers) {
        not_modified_by(&stored.headers)
    } else {
        let body = coding.map_or(&stored.body, |(_, compressed)| compressed);
        let length = body.len();
        let body = if parts.method == Method::HEAD { Bytes::new() } else { body.clone() };
        let mut response = Response::new(GatewayBody::full(body));
        *response.status_mut() = stored.status;
        *response.headers_mut() = stored.headers.clone();
        if let Some((coding, _)) = coding {
            let headers = response.headers_mut();
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static(coding.token()));
            headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        let age = rules::current_age(&stored.storable, stored.stored_at, now).as_secs();
        response.headers_mut().insert(AGE, HeaderValue::from(age));
        response
    };
    // A 304 carries the Vary and the tag the 200 it stands for would have.
    if !stored.encoded.is_empty() {
        let headers = response.headers_mut();
        add_vary_accept_encoding(headers);
        if coding.is_some() {
            // Another representation of the same thing: its tag is weak (as nginx's gzip).
            let weakened = headers.get(ETAG).and_then(|tag| tag.to_str().ok()).map(|tag| {
                if tag.starts_with("W/") {
                    tag.to_owned()
                } else {
                    format!("W/{tag}")
                }
            });
            if let Some(tag) = weakened.and_then(|tag| HeaderValue::from_str(&tag).ok()) {
                headers.insert(ETAG, tag);
            }
        }
    }
    response
}

/// A whole 200 to a GET, cut to the part its `Range` asks for (206), or 416 when none of that
/// exists; a whole 200 says that ranges may be asked for.
fn ranged(
    mut response: Response<GatewayBody>,
    method: &Method,
    request: &HeaderMap,
) -> Response<GatewayBody> {
    let length = response.body().size_hint().exact();
    let (Some(length), StatusCode::OK, &Method::GET) = (length, response.status(), method) else {
        return response;
    };
    response.headers_mut().insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let range = rules::byte_range(request, response.headers(), length);
    let (content_range, status) = match range {
        ByteRange::Whole => return response,
        ByteRange::Part { first, last } => {
            (format!("bytes {first}-{last}/{length}"), StatusCode::PARTIAL_CONTENT)
        }
        ByteRange::Unsatisfiable => (format!("bytes */{length}"), StatusCode::RANGE_NOT_SATISFIABLE),
    };
    let (mut head, body) = response.into_parts();
    head.status = status;
    if let Ok(value) = HeaderValue::from_str(&content_range) {
        head.headers.insert(CONTENT_RANGE, value);
    }
    let body = match range {
        ByteRange::Part { first, last } => {
            head.headers.insert(CONTENT_LENGTH, HeaderValue::from(last - first + 1));
            GatewayBody::streaming(Part { body, skip: first, left: last - first + 1 })
        }
        _ => {
            head.headers.remove(CONTENT_LENGTH);
            GatewayBody::full(Bytes::new())
        }
    };
    Response::from_parts(head, body)
}

pin_project_lite::pin_project! {
    /// Bytes `skip..skip + left` of a body.
    struct Part {
        #[pin]
        body: GatewayBody,
        skip: u64,
        left: u64,
    }
}

impl Body for Part {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        while *this.left > 0 {
            let Some(frame) = std::task::ready!(this.body.as_mut().poll_frame(cx)) else {
                return std::task::Poll::Ready(Some(Err("the response ended before the range did".into())));
            };
            let Ok(mut data) = frame?.into_data() else { continue };
            let length = data.len() as u64;
            if *this.skip >= length {
                *this.skip -= length;
                continue;
            }
            data = data.slice(*this.skip as usize..);
            *this.skip = 0;
            data.truncate(usize::try_from(*this.left).unwrap_or(usize::MAX));
            *this.left -= data.len() as u64;
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// `Vary: Accept-Encoding`, unless the response says it already (or `*`).
fn add_vary_accept_encoding(headers: &mut HeaderMap) {
    let listed = headers
        .get_all(VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|name| name.trim().eq_ignore_ascii_case("accept-encoding") || name.trim() == "*");
    if !listed {
        headers.append(VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// A 304 for a response with these fields, carrying those a 304 sends along.
fn not_modified_by(headers: &HeaderMap) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    for name in &NOT_MODIFIED_FIELDS {
        for value in headers.get_all(name) {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    response
}

/// Whether a 304 is about the stored response: it names the same entity tag, or none (RFC
/// 9111 §4.3.4), and the stored one has a validator the cache sent.
fn same_validator(stored: &HeaderMap, not_modified: &HeaderMap) -> bool {
    fn tag(headers: &HeaderMap) -> Option<&str> {
        headers.get(ETAG).and_then(|v| v.to_str().ok())
    }
    let has_validator = stored.contains_key(ETAG) || stored.contains_key(LAST_MODIFIED);
    let same = match (tag(not_modified), tag(stored)) {
        (None, _) => true,
        (Some(new), Some(old)) => rules::same_entity(new, old),
        (Some(_), None) => false,
    };
    has_validator && same
}

/// The stored fields, each that a 304 carries replaced by its (RFC 9111 §4.3.4).
fn merged(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    let mut headers = stored.clone();
    for name in not_modified.keys() {
        if name == CONTENT_LENGTH {
            continue;
        }
        headers.remove(name);
        for value in not_modified.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

/// What is stored after a 304 to a revalidation: the stored response with the 304's fields,
/// fresh from now; `None` if the 304 makes it no longer storable.
fn refreshed(
    stale: &Stored,
    not_modified: &HeaderMap,
    parts: &Parts,
    cache: &ResponseCache,
    now: SystemTime,
) -> Option<Stored> {
    let headers = merged(&stale.headers, not_modified);
    let policy = &cache.settings().policy;
    let storable = rules::storable(&Method::GET, &parts.headers, stale.status, &headers, policy).ok()?;
    Some(stale.revalidated(headers, storable, now))
}

/// Reads an instance's response and stores it when whole, sending each piece to the client as
/// it comes. The instance's pace, not the client's, sets how soon the waiting requests are
/// served: a slow or vanished client holds up nobody.
struct Recorder {
    cache: Arc<ResponseCache>,
    base: String,
    request: HeaderMap,
    status: StatusCode,
    headers: HeaderMap,
    storable: rules::Storable,
    received: SystemTime,
    /// Where the purges stood when the request went upstream.
    began: PurgeMark,
    /// The waiting requests wake when this is dropped: stored or not.
    flight: Option<surge_cache::responses::Flight>,
}

/// Who the body read from the instance is for, besides the cache.
enum Reader {
    /// A client it streams to as it comes.
    Streaming(tokio::sync::mpsc::UnboundedSender<Result<Bytes, BoxError>>),
    /// A client answered from the stored response (compressed) once the body is whole: it
    /// gets that response, and whether the cache kept it.
    Whole(tokio::sync::oneshot::Sender<Result<(Arc<Stored>, bool), BoxError>>),
}

impl Reader {
    fn piece(&self, data: Bytes) {
        // A client gone is no reason to stop: the others wait for this.
        if let Reader::Streaming(to_client) = self {
            let _ = to_client.send(Ok(data));
        }
    }

    fn fail(self, cause: BoxError) {
        match self {
            Reader::Streaming(to_client) => drop(to_client.send(Err(cause))),
            Reader::Whole(answer) => drop(answer.send(Err(cause))),
        }
    }
}

impl Recorder {
    async fn store_while_reading(self, mut body: GatewayBody, length: u64, reader: Reader) {
        use http_body_util::BodyExt;
        let mut kept = BytesMut::with_capacity(usize::try_from(length).unwrap_or(0));
        // The last piece waits until the response is stored: a client that has it all and
        // asks again finds it there.
        let mut last = None;
        loop {
            let frame = match tokio::time::timeout(BODY_STALL, body.frame()).await {
                Err(_) => {
                    return reader
                        .fail(format!("no byte of the instance's response for {BODY_STALL:?}").into())
                }
                Ok(None) => break,
                Ok(Some(Err(err))) => return reader.fail(err),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            kept.extend_from_slice(&data);
            if kept.len() as u64 >= length {
                last = Some(data);
                break;
            }
            reader.piece(data);
        }
        let whole = kept.len() as u64 == length && length <= self.cache.settings().max_object;
        let stored = if whole { self.store(kept.freeze()).await } else { None };
        match reader {
            Reader::Streaming(to_client) => {
                if let Some(last) = last {
                    let _ = to_client.send(Ok(last));
                }
            }
            Reader::Whole(answer) => {
                let _ = answer.send(stored.ok_or_else(|| "the instance's response ended early".into()));
            }
        }
        // To its end, so that the connection it came on can serve again.
        while let Some(Ok(_)) = body.frame().await {}
    }

    /// Stores the response: the response as stored, and whether the cache kept it (a purge
    /// since its fetch began keeps it out).
    async fn store(self, body: Bytes) -> Option<(Arc<Stored>, bool)> {
        let Recorder { cache, base, request, status, headers, storable, received, began, flight } = self;
        // Compressing (once per stored response) is CPU work: off the runtime's threads.
        let stored = if rules::compressible(status, &headers, body.len()) {
            let made =
                tokio::task::spawn_blocking(move || Stored::new(status, headers, body, storable, received));
            made.await.ok()?
        } else {
            Stored::new(status, headers, body, storable, received)
        };
        let stored = cache.store(&base, &request, stored, began);
        drop(flight);
        Some(stored)
    }
}

/// The client's copy of a body being stored: the pieces as they come, its length known.
struct Streamed {
    frames: tokio::sync::mpsc::UnboundedReceiver<Result<Bytes, BoxError>>,
    left: u64,
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let piece = std::task::ready!(self.frames.poll_recv(cx));
        std::task::Poll::Ready(match piece {
            Some(Ok(data)) => {
                self.left = self.left.saturating_sub(data.len() as u64);
                Some(Ok(http_body::Frame::data(data)))
            }
            Some(Err(err)) => Some(Err(err)),
            None if self.left > 0 => Some(Err("the instance's response ended early".into())),
            None => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}
