//! The gateway: an HTTP server that routes each request to a service and proxies it to one
//! of the service's ready instances.
//!
//! Per service the data path is a stack of tower layers, outermost first:
//! [`RecordMetrics`](layers::RecordMetrics) → [`Respond`](layers::Respond) →
//! [`RequestTimeout`](layers::RequestTimeout) → [`Proxy`](proxy::Proxy).
//! Resilience layers (retries, budgets, load shedding) slot into the same stack.

mod access_log;
mod body;
mod cache;
mod client;
mod error;
mod files;
mod path;
mod problem;
mod queues;
mod ratelimit;
mod router;
pub mod server;
mod stack;
mod tls;
mod trace;
mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{HOST, STRICT_TRANSPORT_SECURITY};
use http::{HeaderValue, Request, Response};
use surge_cache::responses::{ResponseCache, ResponseCaches, ResponseSettings};
use surge_config::Config;
use surge_pool::Pool;
use tokio::net::TcpListener;
use tower::ServiceExt;

pub use access_log::AccessLog;
pub use body::GatewayBody;
pub use error::GatewayError;
pub use problem::ERROR_HEADER;
pub use ratelimit::{gcra, RateLimiter, RateStore, Verdict};
pub use router::Router;
use server::{ClientAddr, ClientBody};
pub use stack::{GatewayMetrics, Traffic};
use wire::BoxFuture;

pub struct Gateway {
    router: Router<RouteTarget>,
    services: Vec<stack::ServiceStack>,
    /// Queues the gateway may publish to (`publish = "public"`).
    queues: Arc<surge_queue::Queues>,
    /// Queues of async routes, whose jobs `GET /jobs/ID` reports on.
    job_queues: Vec<Arc<surge_queue::Queue>>,
    max_body: u64,
    metrics: GatewayMetrics,
    trusted_proxies: Vec<ipnet::IpNet>,
    listening: server::Listening,
    /// Every route's rate limiter, for the next gateway a reload builds to carry over.
    limiters: Vec<Arc<RateLimiter>>,
    /// Give requests an `x-request-id` and a `traceparent`.
    request_ids: bool,
    access_log: Option<AccessLog>,
}

/// Who answers a route.
enum Serves {
    /// A service, through its stack (its index in `Gateway::services`), and its name.
    Service(usize, Arc<str>),
    /// A static folder; the route's prefix comes off the path.
    Files { site: Arc<files::StaticSite>, prefix: String },
}

/// A route's rate limit, and the count of requests it refused (by the route's service).
#[derive(Clone)]
struct RouteLimit {
    limiter: Arc<RateLimiter>,
    refused: surge_metrics::Counter,
}

/// What a matched route leads to.
struct RouteTarget {
    serves: Serves,
    retry: bool,
    limit: Option<RouteLimit>,
    max_body: u64,
    /// An async route: its requests are enqueued here and answered 202.
    async_queue: Option<Arc<surge_queue::Queue>>,
    cache: Option<Arc<ResponseCache>>,
}

impl Gateway {
    /// Builds the route table and one layer stack per service of `config`. A route whose rate
    /// limit `previous` (the gateway a reload replaces) had unchanged keeps its limiter, and
    /// so its clients' buckets: a reload gives nobody a fresh burst. A cached route whose
    /// cache settings did not change keeps what it stored.
    pub fn new(config: &Config, pools: &[Arc<Pool>], shared: &Shared, previous: Option<&Gateway>) -> Self {
        let Shared { queues, metrics, store, caches, access_log } = shared.clone();
        let mut cached_routes = Vec::new();
        let kept = previous.map_or(&[][..], |gateway| gateway.limiters.as_slice());
        let mut limiters: Vec<Arc<RateLimiter>> = Vec::new();
        let mut routes = Vec::new();
        let mut services = Vec::new();
        let mut job_queues = Vec::new();
        for service in &config.services {
            let Some(pool) = pools.iter().find(|pool| pool.name() == service.name) else { continue };
            let index = services.len();
            routes.extend(service.routes.iter().map(|route| {
                let name =
                    format!("{}:{}{}", service.name, route.host.as_deref().unwrap_or(""), route.prefix);
                let cache = route.cache.as_ref().map(|settings| {
                    cached_routes.push(name.clone());
                    caches.for_route(response_settings(&name, settings))
                });
                let limit = route.rate_limit.clone().map(|limit| {
                    let same = kept.iter().find(|old| old.name() == name && *old.limit() == limit);
                    let limiter = same
                        .cloned()
                        .unwrap_or_else(|| Arc::new(RateLimiter::new(limit, name, store.clone())));
                    limiters.push(Arc::clone(&limiter));
                    RouteLimit { limiter, refused: metrics.rate_limited(&service.name) }
                });
                let max_body = route.max_body.unwrap_or(config.gateway.max_body);
                let async_queue = route.async_queue.as_deref().and_then(|name| queues.get(name)).cloned();
                if let Some(queue) = &async_queue {
                    if !job_queues.iter().any(|known: &Arc<surge_queue::Queue>| known.name() == queue.name())
                    {
                        job_queues.push(Arc::clone(queue));
                    }
                }
                (
                    route.clone(),
                    RouteTarget {
                        serves: Serves::Service(index, service.name.as_str().into()),
                        retry: route.retry,
                        limit,
                        max_body,
                        async_queue,
                        cache,
                    },
                )
            }));
            let stack = stack::build(pool, &metrics);
            services.push(stack);
        }
        caches.keep_only(&cached_routes.iter().map(String::as_str).collect::<Vec<_>>());
        for site in &config.statics {
            let files = Arc::new(files::StaticSite::new(site));
            routes.extend(site.routes.iter().map(|route| {
                let target = RouteTarget {
                    serves: Serves::Files { site: Arc::clone(&files), prefix: route.prefix.clone() },
                    retry: false,
                    limit: None,
                    max_body: config.gateway.max_body,
                    async_queue: None,
                    cache: None,
                };
                (route.clone(), target)
            }));
        }
        let trusted_proxies = config.gateway.trusted_proxies.clone();
        let listening = server::Listening::new(&config.gateway);
        let max_body = config.gateway.max_body;
        Gateway {
            router: Router::new(routes),
            services,
            queues,
            job_queues,
            max_body,
            metrics,
            trusted_proxies,
            listening,
            limiters,
            request_ids: config.gateway.request_ids,
            access_log,
        }
    }

    /// Routes a request, and answers it when routing decides (404); else it goes through its
    /// service's stack, after the route's rate limit if it has one.
    fn handle(gateway: &Arc<Gateway>, mut request: Request<ClientBody>) -> Handled {
        if let std::borrow::Cow::Owned(normal) = path::normalize(request.uri().path()) {
            match with_path(request.uri(), &normal) {
                Some(uri) => *request.uri_mut() = uri,
                None => {
                    let err = GatewayError::BadRequest { what: "the request target cannot be normalised" };
                    return Handled::Answered { response: Some(err.into_response()) };
                }
            }
        }
        let host = match request_host(&request) {
            Ok(host) => host,
            Err(err) => return Handled::Answered { response: Some(err.into_response()) },
        };
        if let Some(queue) = queues::publish_target(&gateway.queues, &request) {
            if let Err(err) = request.body_mut().limit(gateway.max_body) {
                return Handled::Answered { response: Some(GatewayError::client_body(&err).into_response()) };
            }
            return Handled::Limited { response: Box::pin(queues::publish(queue, request)) };
        }
        if let Some(queue) = queues::job_target(&gateway.job_queues, &request) {
            return Handled::Limited { response: Box::pin(queues::job(queue, request)) };
        }
        let Some(target) = gateway.router.route(host, request.uri().path()) else {
            gateway.metrics.unrouted.inc();
            let host = host.unwrap_or_default().to_owned();
            let path = request.uri().path().to_owned();
            return Handled::Answered {
                response: Some(GatewayError::NoRoute { host, path }.into_response()),
            };
        };
        // The key of a cached response holds the host as the client wrote it.
        let cache_host = target.cache.as_ref().map(|_| host.unwrap_or_default().to_owned());
        if let Err(err) = request.body_mut().limit(target.max_body) {
            let err = GatewayError::client_body(&err);
            return Handled::Answered { response: Some(err.into_response()) };
        }
        if target.retry {
            request.extensions_mut().insert(stack::RetryRoute);
        }
        if !gateway.trusted_proxies.is_empty() {
            if let Some(client) = request.extensions_mut().get_mut::<ClientAddr>() {
                let ip = client.addr.ip().to_canonical();
                client.trusted = gateway.trusted_proxies.iter().any(|net| net.contains(&ip));
            }
        }
        if let Some(queue) = &target.async_queue {
            let (gateway, queue, limit) = (Arc::clone(gateway), Arc::clone(queue), target.limit.clone());
            return Handled::Limited {
                response: Box::pin(async move {
                    if let Some(refused) = gateway.over_limit(limit.as_ref(), &request).await {
                        return refused;
                    }
                    queues::enqueue(queue, request).await
                }),
            };
        }
        let (service, service_name) = match &target.serves {
            Serves::Service(index, name) => (*index, name),
            Serves::Files { site, prefix } => {
                let (site, prefix) = (Arc::clone(site), prefix.clone());
                return Handled::Limited {
                    response: Box::pin(async move { files::serve(site, request, &prefix).await }),
                };
            }
        };
        if let (Some(cache), Some(host)) = (&target.cache, cache_host) {
            let (gateway, cache, limit) = (Arc::clone(gateway), Arc::clone(cache), target.limit.clone());
            let name = Arc::clone(service_name);
            return Handled::Limited {
                response: Box::pin(async move {
                    if let Some(refused) = gateway.over_limit(limit.as_ref(), &request).await {
                        return refused;
                    }
                    let stack = cache::StackOf { gateway, index: service, service: name };
                    cache::serve(cache, stack, request, host).await
                }),
            };
        }
        let stack = gateway.services[service].clone();
        let Some(limit) = &target.limit else {
            return Handled::Stack { response: stack.oneshot(request) };
        };
        let (gateway, limit) = (Arc::clone(gateway), limit.clone());
        Handled::Limited {
            response: Box::pin(async move {
                if let Some(refused) = gateway.over_limit(Some(&limit), &request).await {
                    return refused;
                }
                let Ok(response) = stack.oneshot(request).await;
                response
            }),
        }
    }

    /// The 429 for a request past its route's rate limit.
    async fn over_limit(
        &self,
        limit: Option<&RouteLimit>,
        request: &Request<ClientBody>,
    ) -> Option<Response<GatewayBody>> {
        let RouteLimit { limiter, refused } = limit?;
        let client_ip = match request.extensions().get::<ClientAddr>() {
            Some(client) if client.trusted => {
                forwarded_client(request.headers(), client.addr.ip(), &self.trusted_proxies)
            }
            Some(client) => client.addr.ip(),
            None => std::net::Ipv4Addr::UNSPECIFIED.into(),
        };
        let verdict = limiter.check(&limiter.key(request.headers(), client_ip)).await;
        if verdict.allowed {
            return None;
        }
        refused.inc();
        Some(GatewayError::RateLimited { limit: limiter.limit().rate, verdict }.into_response())
    }
}

/// What every gateway a run builds shares, reloads included.
#[derive(Clone)]
pub struct Shared {
    pub queues: Arc<surge_queue::Queues>,
    pub metrics: GatewayMetrics,
    pub store: RateStore,
    pub caches: Arc<ResponseCaches>,
    /// Kept across reloads, which reopen its file.
    pub access_log: Option<AccessLog>,
}

fn response_settings(name: &str, route: &surge_config::RouteCache) -> ResponseSettings {
    ResponseSettings {
        name: name.to_owned(),
        policy: surge_cache::rules::Policy {
            default_ttl: route.default_ttl,
            store_set_cookie: route.store_set_cookie,
            grace: route.grace,
            obey_request_no_cache: route.obey_request_no_cache,
        },
        sort_query: route.sort_query,
        key_headers: route
            .key_headers
            .iter()
            .filter_map(|name| http::HeaderName::from_bytes(name.as_bytes()).ok())
            .collect(),
        max_object: route.max_object,
        memory: route.memory,
        collapse_timeout: route.collapse_timeout,
        shared: route.shared,
    }
}

/// The client behind trusted proxies: the last address in `X-Forwarded-For` that is not one
/// of them (each proxy appends the peer it saw, so what lies left of an untrusted hop could be
/// made up), else `peer`.
fn forwarded_client(
    headers: &http::HeaderMap,
    peer: std::net::IpAddr,
    trusted: &[ipnet::IpNet],
) -> std::net::IpAddr {
    let hops =
        headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    let hops: Vec<std::net::IpAddr> = hops.filter_map(|hop| hop.trim().parse().ok()).collect();
    hops.into_iter()
        .rev()
        .find(|ip| !trusted.iter().any(|net| net.contains(&ip.to_canonical())))
        .unwrap_or(peer)
}

/// `uri` with its path replaced by `path`, its query kept.
fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let path_and_query = match uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// The host a request is for: its URI's authority (HTTP/2's `:authority`, or HTTP/1.1's
/// absolute form, which the server already made its Host) or its Host field. Two that differ,
/// or two Host fields, are refused: a route could be chosen on one and served on the other.
fn request_host<B>(request: &Request<B>) -> Result<Option<&str>, GatewayError> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(GatewayError::BadRequest { what: "more than one Host field" }),
        (Some(host), None) => {
            Some(host.to_str().map_err(|_| GatewayError::BadRequest { what: "Host is not ASCII" })?)
        }
        (None, None) => None,
    };
    match (request.uri().authority(), host) {
        (Some(authority), Some(host)) if !authority.as_str().eq_ignore_ascii_case(host) => {
            Err(GatewayError::BadRequest { what: "the request's authority and its Host field differ" })
        }
        (Some(authority), _) => Ok(Some(authority.as_str())),
        (None, host) => Ok(host),
    }
}

pin_project_lite::pin_project! {
    /// How a request is being answered: by routing itself, by its service's stack, or by the
    /// stack after a rate limit (whose check may ask Redis, so that path alone is boxed).
    #[project = HandledProj]
    enum Handled {
        Answered { response: Option<Response<GatewayBody>> },
        Stack { #[pin] response: tower::util::Oneshot<stack::ServiceStack, Request<ClientBody>> },
        Limited { response: BoxFuture<Response<GatewayBody>> },
    }
}

impl Future for Handled {
    type Output = Result<Response<GatewayBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            HandledProj::Answered { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                None => {
                    Poll::Ready(Ok(GatewayError::Internal { what: "an answer polled after it was given" }
                        .into_response()))
                }
            },
            HandledProj::Stack { response } => response.poll(cx),
            HandledProj::Limited { response } => response.as_mut().poll(cx).map(Ok),
        }
    }
}

/// The gateway in service, swapped whole by a reload: each request is handled by the gateway
/// as it was when the request came.
pub type LiveGateway = Arc<ArcSwap<Gateway>>;

/// The gateway as the server's service: cloned per connection, an `Arc` each.
#[derive(Clone)]
struct GatewayService(LiveGateway);

impl tower::Service<Request<ClientBody>> for GatewayService {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Identified;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<ClientBody>) -> Self::Future {
        let gateway = self.0.load();
        let ids = gateway.request_ids.then(|| trace::identify(request.headers_mut()));
        let log =
            gateway.access_log.as_ref().map(|log| Box::new(Unfinished::of(log, &request, ids.as_ref())));
        Identified {
            response: Gateway::handle(&gateway, request),
            request_id: ids.map(|ids| ids.request_id),
            log,
        }
    }
}

/// What the access log knows of a request before its answer.
struct Unfinished {
    entry: access_log::Entry,
    log: AccessLog,
    start: std::time::Instant,
}

impl Unfinished {
    fn of(log: &AccessLog, request: &Request<ClientBody>, ids: Option<&trace::RequestIds>) -> Self {
        let field = |name: http::header::HeaderName| {
            request.headers().get(name).and_then(|value| value.to_str().ok()).map(str::to_owned)
        };
        let entry = access_log::Entry {
            started: std::time::SystemTime::now(),
            client: request
                .extensions()
                .get::<ClientAddr>()
                .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |client| client.addr.ip().to_canonical()),
            method: request.method().clone(),
            target: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |target| target.to_string()),
            host: request.uri().host().map(str::to_owned).or_else(|| field(HOST)),
            version: request.version(),
            request_id: ids
                .map_or_else(String::new, |ids| ids.request_id.to_str().unwrap_or_default().to_owned()),
            trace_id: ids.map_or_else(String::new, |ids| ids.trace.trace_id_hex()),
            user_agent: field(http::header::USER_AGENT),
            referer: field(http::header::REFERER),
            ..access_log::Entry::placeholder()
        };
        Unfinished { entry, log: log.clone(), start: std::time::Instant::now() }
    }
}

pin_project_lite::pin_project! {
    /// A request being answered, whose answer gets its id and, once its body is done, an
    /// access log line.
    struct Identified {
        #[pin]
        response: Handled,
        request_id: Option<HeaderValue>,
        log: Option<Box<Unfinished>>,
    }
}

impl Future for Identified {
    type Output = Result<Response<GatewayBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = std::task::ready!(this.response.poll(cx));
        if let Some(id) = this.request_id.take() {
            response.headers_mut().insert(trace::REQUEST_ID.clone(), id);
        }
        if let Some(unfinished) = this.log.take() {
            let Unfinished { mut entry, log, start } = *unfinished;
            entry.status = response.status().as_u16();
            entry.tries = response.extensions().get::<stack::Tries>().map(|tries| tries.0);
            entry.cache = response
                .headers()
                .get("cache-status")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            response.body_mut().log(entry, log, start);
        }
        Poll::Ready(Ok(response))
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves, then gives open requests up to
/// `drain_timeout` to finish.
pub async fn serve(
    gateway: LiveGateway,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let listening = gateway.load().listening.clone();
    server::serve(GatewayService(gateway), listener, listening, shutdown, drain_timeout).await;
}

/// Serves the gateway over HTTPS on `listener`, each response with `hsts` as its
/// `Strict-Transport-Security` when given.
pub async fn serve_tls(
    gateway: LiveGateway,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    hsts: Option<HeaderValue>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let listening = server::Listening { tls: Some(tls), ..gateway.load().listening.clone() };
    let service = GatewayService(gateway).map_response(move |mut response: Response<GatewayBody>| {
        if let Some(hsts) = &hsts {
            response.headers_mut().insert(STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        response
    });
    server::serve(service, listener, listening, shutdown, drain_timeout).await;
}

/// Serves the plain listener as a redirect to the HTTPS one on `https_port`: 308 keeps the
/// method and body, as a client needs for anything but GET.
pub fn serve_https_redirect(
    listener: TcpListener,
    https_port: u16,
    config: &surge_config::GatewayConfig,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) -> impl Future<Output = ()> {
    let service = tower::service_fn(move |request: Request<ClientBody>| {
        std::future::ready(Ok::<_, Infallible>(redirect_to_https(&request, https_port)))
    });
    server::serve(service, listener, server::Listening::new(config), shutdown, drain_timeout)
}

fn redirect_to_https<B>(request: &Request<B>, https_port: u16) -> Response<GatewayBody> {
    let host = request.headers().get(HOST).and_then(|h| h.to_str().ok()).or(request.uri().host());
    let Some(host) = host.map(router::strip_port).filter(|h| !h.is_empty()) else {
        return GatewayError::NoRoute { host: String::new(), path: request.uri().path().to_owned() }
            .into_response();
    };
    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{target}");
    let mut response = Response::new(GatewayBody::full(bytes::Bytes::new()));
    *response.status_mut() = http::StatusCode::PERMANENT_REDIRECT;
    match HeaderValue::from_str(&location) {
        Ok(location) => {
            response.headers_mut().insert(http::header::LOCATION, location);
            response
        }
        Err(_) => GatewayError::NoRoute { host: host.to_owned(), path: target.to_owned() }.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_of(uri: &str, hosts: &[&str]) -> Result<Option<String>, &'static str> {
        let mut request = Request::get(uri);
        for host in hosts {
            request = request.header(HOST, *host);
        }
        let request = request.body(()).expect("request");
        request_host(&request).map(|h| h.map(str::to_owned)).map_err(|err| err.code())
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_last_untrusted_hop() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().expect("cidr")];
        let peer: std::net::IpAddr = "10.0.0.2".parse().expect("ip");
        let headers = |xff: &[&str]| {
            let mut headers = http::HeaderMap::new();
            for value in xff {
                headers.append("x-forwarded-for", value.parse().expect("value"));
            }
            headers
        };
        let client = |xff: &[&str]| forwarded_client(&headers(xff), peer, &trusted).to_string();
        assert_eq!(client(&["203.0.113.9"]), "203.0.113.9");
        assert_eq!(
            client(&["198.51.100.1, 203.0.113.9, 10.0.0.7"]),
            "203.0.113.9",
            "made-up hops left of it"
        );
        assert_eq!(client(&["198.51.100.1", "203.0.113.9"]), "203.0.113.9", "several fields");
        assert_eq!(client(&["10.0.0.7"]), "10.0.0.2", "only proxies: the peer");
        assert_eq!(client(&[]), "10.0.0.2");
    }

    #[test]
    fn the_host_is_the_authority_or_the_host_field_and_never_two_of_them() {
        assert_eq!(host_of("/a", &["shop.example"]), Ok(Some("shop.example".into())));
        assert_eq!(host_of("http://shop.example/a", &[]), Ok(Some("shop.example".into())));
        assert_eq!(host_of("http://shop.example/a", &["Shop.Example"]), Ok(Some("shop.example".into())));
        assert_eq!(host_of("/a", &[]), Ok(None));
        assert_eq!(host_of("http://shop.example/a", &["admin.example"]), Err("bad_request"));
        assert_eq!(host_of("/a", &["a.example", "b.example"]), Err("bad_request"));
    }
}
