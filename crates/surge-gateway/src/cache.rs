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
    HeaderName, HeaderValue, AGE, CONTENT_ENCODING, CONTENT_LENGTH, ETAG, IF_MATCH, IF_MODIFIED_SINCE,
    IF_NONE_MATCH, IF_RANGE, IF_UNMODIFIED_SINCE, LAST_MODIFIED, RANGE, VARY,
};
use http::request::Parts;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use surge_cache::responses::{Joined, Lookup, PurgeMark, ResponseCache, ResponseMetrics, Stored};
use surge_cache::rules::{self, Handled, Use};
use tower::ServiceExt;

use crate::body::GatewayBody;
use crate::server::ClientBody;
use crate::stack::ServiceStack;
use crate::wire::BoxError;

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
    stack: ServiceStack,
    request: Request<ClientBody>,
    host: String,
) -> Response<GatewayBody> {
    let (parts, body) = request.into_parts();
    let tls = parts.extensions.get::<crate::server::ClientAddr>().is_some_and(|client| client.tls);
    let base = cache.key(if tls { "https" } else { "http" }, &host, &parts.uri, &parts.headers);
    let fetch = Fetch { cache, stack, base };
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return fetch.other_method(parts, body).await;
    }
    let now = SystemTime::now();
    match fetch.cache.lookup(&fetch.base, &parts.headers).await {
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
                Use::Revalidate if parts.method == Method::HEAD => fetch.passed(parts, body, "stale").await,
                Use::Revalidate => fetch.collapsed(parts, body, Some(stored), "stale").await,
            }
        }
        Lookup::Miss | Lookup::Pass if only_if_cached(&parts.headers) => fetch.not_cached(),
        // A HEAD is answered from GET's entry, but does not fill it; a key whose answers lately
        // could not be stored goes upstream as the client sent it.
        Lookup::Pass => fetch.passed(parts, body, "miss").await,
        Lookup::Miss if parts.method == Method::HEAD => fetch.passed(parts, body, "miss").await,
        Lookup::Miss => fetch.collapsed(parts, body, None, "miss").await,
    }
}

fn only_if_cached(request: &HeaderMap) -> bool {
    rules::directives(request).only_if_cached
}

/// One request's business with the cache.
struct Fetch {
    cache: Arc<ResponseCache>,
    stack: ServiceStack,
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
        let Ok(response) = self.stack.clone().oneshot(Request::from_parts(parts, body)).await;
        self.counted_miss(response, why, false, false)
    }

    /// POST, PUT, DELETE and the rest go upstream; one that succeeds makes what is stored for
    /// its URL out of date (RFC 9111 §4.4), so it is dropped here.
    async fn other_method(self, parts: Parts, body: ClientBody) -> Response<GatewayBody> {
        let unsafe_method = !matches!(parts.method, Method::OPTIONS | Method::TRACE);
        let Ok(mut response) = self.stack.clone().oneshot(Request::from_parts(parts, body)).await;
        let status = response.status();
        if unsafe_method && (status.is_success() || status.is_redirection()) {
            self.cache.forget(&self.base);
        }
        set_cache_status(response.headers_mut(), &forwarded("method", status, false, false, None));
        response
    }

    /// A miss (or a stale entry to revalidate): the first request for the key goes upstream,
    /// the others wait for its answer, then are served what it stored.
    async fn collapsed(
        self,
        parts: Parts,
        body: ClientBody,
        stale: Option<Arc<Stored>>,
        why: &'static str,
    ) -> Response<GatewayBody> {
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
                self.upstream(parts, body, stale, why, Some(flight), false).await
            }
            Joined::Follower(mut done) => {
                let waited = self.cache.settings().collapse_timeout;
                let _ = tokio::time::timeout(waited, done.changed()).await;
                let now = SystemTime::now();
                if let Lookup::Found(stored) = self.cache.lookup_local(&self.base, &parts.headers) {
                    let usable = self.usable(&stored, &parts.headers, now);
                    if matches!(usable, Use::Fresh | Use::Stale | Use::StaleWhileRevalidate) {
                        ResponseMetrics::count(&self.metrics().collapsed);
                        let handled = forwarded(why, stored.status, false, true, Some(stored.ttl_left(now)));
                        return answered(&stored, &parts, now, &handled);
                    }
                }
                // Not storable, or too slow: this one goes itself.
                self.upstream(parts, body, stale, why, None, true).await
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
        let Ok(response) = self.stack.clone().oneshot(outgoing).await;
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
                let stored = self.cache.store(&self.base, &parts.headers, refreshed.clone(), began);
                drop(flight);
                ResponseMetrics::count(&self.metrics().hits);
                let handled = forwarded(why, status, stored, collapsed, Some(refreshed.ttl_left(now)));
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
                self.cache.pass(&self.base);
                return self.counted_miss(response, why, false, collapsed);
            }
        };
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
        let length = length.unwrap_or(0);
        let (to_client, frames) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(recorder.store_while_streaming(body, length, to_client));
        let response = if rules::not_modified(&parts.headers, &head.headers) && head.status == StatusCode::OK
        {
            // The client's condition holds for what came: a 304 to it; the body is still read
            // and stored.
            not_modified_by(&head.headers)
        } else {
            Response::from_parts(head, GatewayBody::streaming(Streamed { frames, left: length }))
        };
        self.counted_miss(response, why, true, collapsed)
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

/// [`answer`] with its `Cache-Status`.
fn answered(stored: &Stored, parts: &Parts, now: SystemTime, handled: &Handled) -> Response<GatewayBody> {
    let mut response = answer(stored, parts, now);
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

impl Recorder {
    async fn store_while_streaming(
        self,
        mut body: GatewayBody,
        length: u64,
        to_client: tokio::sync::mpsc::UnboundedSender<Result<Bytes, BoxError>>,
    ) {
        use http_body_util::BodyExt;
        let mut kept = BytesMut::with_capacity(usize::try_from(length).unwrap_or(0));
        // The last piece waits until the response is stored: a client that has it all and
        // asks again finds it there.
        let mut last = None;
        loop {
            let Ok(frame) = tokio::time::timeout(BODY_STALL, body.frame()).await else {
                let _ = to_client
                    .send(Err(format!("no byte of the instance's response for {BODY_STALL:?}").into()));
                return;
            };
            let Some(frame) = frame else { break };
            match frame {
                Ok(frame) => {
                    let Ok(data) = frame.into_data() else { continue };
                    kept.extend_from_slice(&data);
                    if kept.len() as u64 >= length {
                        last = Some(data);
                        break;
                    }
                    // A client gone is no reason to stop: the others wait for this.
                    let _ = to_client.send(Ok(data));
                }
                Err(err) => {
                    let _ = to_client.send(Err(err));
                    return;
                }
            }
        }
        if kept.len() as u64 == length && length <= self.cache.settings().max_object {
            self.store(kept.freeze()).await;
        }
        if let Some(last) = last {
            let _ = to_client.send(Ok(last));
        }
        // To its end, so that the connection it came on can serve again.
        while let Some(Ok(_)) = body.frame().await {}
    }

    async fn store(self, body: Bytes) {
        let Recorder { cache, base, request, status, headers, storable, received, began, flight } = self;
        // Compressing (once per stored response) is CPU work: off the runtime's threads.
        let stored = if rules::compressible(status, &headers, body.len()) {
            let made =
                tokio::task::spawn_blocking(move || Stored::new(status, headers, body, storable, received));
            match made.await {
                Ok(stored) => stored,
                Err(_) => return,
            }
        } else {
            Stored::new(status, headers, body, storable, received)
        };
        cache.store(&base, &request, stored, began);
        drop(flight);
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
