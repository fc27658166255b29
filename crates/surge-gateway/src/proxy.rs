//! The innermost service: pick a ready instance, rewrite the request for it, send it over a
//! pooled keep-alive connection, and stream the response back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::Either;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::time::{Duration, Instant};
use surge_balance::{Balancer, Load};

use http::{Method, StatusCode};
use surge_config::UpstreamProtocol;
use surge_metrics::Counter;
use surge_pool::{InFlight, Instance, Pool};

use crate::body::{GatewayBody, Payload, UpstreamBody};
use crate::budget::RetryBudget;
use crate::client::{Http1Client, SendError};
use crate::error::{root_cause, GatewayError};
use crate::server::{ClientAddr, ClientBody, ClientUpgrade};
use crate::BoxFuture;

/// Set by the router when the matching route allows retrying any method.
#[derive(Debug, Clone, Copy)]
pub struct RetryRoute;

/// How often a waiting request looks for a slot even without a wake-up.
const RECHECK: Duration = Duration::from_millis(50);

/// The header that tells an instance how long the gateway will wait for it.
const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-surge-deadline-ms");

#[derive(Clone)]
pub struct Proxy {
    inner: Arc<ProxyInner>,
}

struct ProxyInner {
    pool: Arc<Pool>,
    balancer: Balancer,
    client: Client<HttpConnector, Payload<ClientBody>>,
    /// The gateway's own client, for whole bodies to HTTP/1.1 instances.
    http1: Option<Arc<Http1Client>>,
    /// The HTTP version spoken to instances.
    version: http::Version,
    budget: RetryBudget,
    epoch: Instant,
    retries: Counter,
    retries_denied: Counter,
}

impl Proxy {
    pub fn new(pool: Arc<Pool>, retries: Counter, retries_denied: Counter) -> Self {
        let config = pool.config();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeouts.connect));
        let mut client = Client::builder(TokioExecutor::new());
        client.pool_timer(TokioTimer::new()).pool_idle_timeout(Duration::from_secs(60));
        let mut http1 = None;
        let version = match config.protocol {
            UpstreamProtocol::Http1 => {
                http1 = Some(Http1Client::new(config.timeouts.connect));
                http::Version::HTTP_11
            }
            UpstreamProtocol::H2c => {
                // One multiplexed connection per instance; pings find a dead peer between requests.
                client
                    .http2_only(true)
                    .timer(TokioTimer::new())
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .http2_keep_alive_while_idle(true);
                http::Version::HTTP_2
            }
        };
        let client = client.build(connector);
        let balancer = Balancer::new(match config.balance {
            surge_config::Balance::LeastConn => surge_balance::Policy::LeastConn,
            surge_config::Balance::RoundRobin => surge_balance::Policy::RoundRobin,
            surge_config::Balance::P2cEwma => surge_balance::Policy::P2cEwma,
            surge_config::Balance::Random => surge_balance::Policy::Random,
        });
        let budget = RetryBudget::new(config.retry.budget, config.retry.min_per_second);
        let inner = ProxyInner {
            pool,
            balancer,
            client,
            http1,
            version,
            budget,
            epoch: Instant::now(),
            retries,
            retries_denied,
        };
        Proxy { inner: Arc::new(inner) }
    }
}

impl tower::Service<Request<ClientBody>> for Proxy {
    type Response = Response<GatewayBody>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Self::Response, GatewayError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ClientBody>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.forward(request).await })
    }
}

/// The instances a request has tried. Others are preferred for the next try, and one that
/// refused the connection is not tried again: it is down, whatever the ready snapshot says
/// until its exit is seen, so the request waits for another instance instead.
#[derive(Default)]
struct Tried {
    all: Vec<SocketAddr>,
    refused: Vec<SocketAddr>,
}

/// How one try ended, and whether it may be tried again elsewhere.
enum Try {
    Answered(Response<UpstreamBody>),
    /// An answer of 502, 503 or 504: tried again for requests that may be repeated.
    Unavailable(Response<UpstreamBody>),
    /// Never written to the instance: safe to try again whatever the method.
    NotSent(GatewayError),
    /// Failed after the request may have reached the instance.
    Failed(GatewayError),
}

impl ProxyInner {
    async fn forward(&self, mut request: Request<ClientBody>) -> Result<Response<GatewayBody>, GatewayError> {
        if let Some(protocol) = upgrade_protocol(request.headers()) {
            // Only an HTTP/1.1 connection can switch protocols.
            if let Some(client_side) = request.extensions_mut().remove::<ClientUpgrade>() {
                return self.forward_upgrade(request, protocol, client_side).await;
            }
        }
        let started = Instant::now();
        let service = self.pool.name();
        let config = self.pool.config();
        self.pool.load().arrived();
        self.budget.request(self.epoch.elapsed());
        let repeatable =
            is_idempotent(request.method()) || request.extensions().get::<RetryRoute>().is_some();
        let (parts, body) = request.into_parts();
        let mut body = Payload::prepare(body)
            .await
            .map_err(|err| GatewayError::BadRequestBody { cause: root_cause(&*err) })?;
        let mut tried = Tried::default();

        for attempt in 1..=config.retry.attempts {
            // First come, first served: while requests wait for a slot, a new one waits behind
            // them instead of taking the next free slot.
            let behind_others = self.pool.load().waiting() > 0;
            let chosen = if behind_others { None } else { self.choose(&tried) };
            let mut in_flight = match chosen {
                Some(in_flight) => in_flight,
                None => self.wait_for_instance(&tried, behind_others).await?,
            };
            let instance = in_flight.instance();
            tried.all.push(instance.addr);
            let Some(this_body) = body.for_try() else { break };
            let mut request = Request::from_parts(parts.clone(), this_body);
            rewrite_request(&mut request, instance, self.version);
            let remaining = config.timeouts.request.saturating_sub(started.elapsed());
            let try_timeout = config.timeouts.per_try.map_or(remaining, |t| t.min(remaining));
            let millis = u64::try_from(try_timeout.as_millis()).unwrap_or(u64::MAX);
            request.headers_mut().insert(DEADLINE_HEADER, HeaderValue::from(millis));

            let outcome = self.try_once(request, &in_flight, try_timeout, repeatable).await;
            if matches!(outcome, Try::NotSent(_)) {
                tried.refused.push(instance.addr);
            }
            let succeeded =
                matches!(&outcome, Try::Answered(response) if !response.status().is_server_error());
            self.pool.report(&mut in_flight, succeeded);
            let last = attempt == config.retry.attempts;
            let (retry, backoff) = match &outcome {
                Try::Answered(_) => (false, false),
                Try::NotSent(_) => (body.replayable(), false),
                Try::Unavailable(_) | Try::Failed(_) => (repeatable && body.replayable(), true),
            };
            if !last && retry && self.budget.try_retry(self.epoch.elapsed()) {
                self.retries.inc();
                drop((outcome, in_flight));
                if backoff {
                    tokio::time::sleep(jittered_backoff(config.retry.backoff, attempt)).await;
                }
                continue;
            }
            if !last && retry {
                self.retries_denied.inc();
            }
            return match outcome {
                Try::Answered(mut response) | Try::Unavailable(mut response) => {
                    strip_hop_by_hop(response.headers_mut());
                    Ok(response.map(|body| GatewayBody::upstream(body, in_flight)))
                }
                Try::NotSent(error) | Try::Failed(error) => Err(error),
            };
        }
        Err(GatewayError::NoReadyInstance { service: service.to_owned() })
    }

    /// An upgrade (WebSocket): one try, the upgrade headers kept; once the instance switches
    /// protocols, bytes are copied both ways until either side closes. The instance counts the
    /// connection in flight for as long, so a drain waits for it (up to its timeout).
    async fn forward_upgrade(
        &self,
        request: Request<ClientBody>,
        protocol: HeaderValue,
        client_side: ClientUpgrade,
    ) -> Result<Response<GatewayBody>, GatewayError> {
        self.pool.load().arrived();
        let mut in_flight = match self.choose(&Tried::default()) {
            Some(in_flight) => in_flight,
            None => self.wait_for_instance(&Tried::default(), false).await?,
        };
        let (parts, body) = request.into_parts();
        let mut upstream = Request::from_parts(parts, Payload::Streaming { body });
        rewrite_request(&mut upstream, in_flight.instance(), self.version);
        upstream.headers_mut().insert(CONNECTION, HeaderValue::from_static("upgrade"));
        upstream.headers_mut().insert(UPGRADE, protocol);
        let timeout = self.pool.config().timeouts.request;
        let outcome = self.try_once(upstream, &in_flight, timeout, false).await;
        let succeeded = matches!(&outcome, Try::Answered(response) if !response.status().is_server_error());
        self.pool.report(&mut in_flight, succeeded);
        let mut response = match outcome {
            Try::Answered(response) | Try::Unavailable(response) => response,
            Try::NotSent(error) | Try::Failed(error) => return Err(error),
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(response.headers_mut());
            return Ok(response.map(|body| GatewayBody::upstream(body, in_flight)));
        }
        let instance_side = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let _in_flight = in_flight;
            if let (Some(mut client), Ok(instance)) = (client_side.upgraded().await, instance_side.await) {
                let mut instance = TokioIo::new(instance);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut instance).await;
            }
        });
        let (parts, _) = response.into_parts();
        Ok(Response::from_parts(parts, GatewayBody::full(bytes::Bytes::new())))
    }

    /// Sends one try. A whole body to an HTTP/1.1 instance goes through the gateway's own
    /// client; a streamed body, an upgrade or h2c through hyper's.
    async fn try_once(
        &self,
        request: Request<Payload<ClientBody>>,
        in_flight: &InFlight,
        timeout: Duration,
        repeatable: bool,
    ) -> Try {
        let instance = in_flight.instance();
        let service = self.pool.name();
        let (parts, body) = request.into_parts();
        // Err((never sent, cause))
        let sent = async {
            match (&self.http1, body) {
                (Some(http1), Payload::Kept { bytes }) => {
                    let bytes = bytes.unwrap_or_default();
                    match http1.send(instance.addr, &instance.authority, &parts, &bytes, repeatable).await {
                        Ok(response) => Ok(response.map(Either::Left)),
                        Err(SendError::Connect(cause)) => Err((true, cause)),
                        Err(SendError::Failed(cause)) => Err((false, cause)),
                    }
                }
                (_, body) => match self.client.request(Request::from_parts(parts, body)).await {
                    Ok(response) => Ok(response.map(Either::Right)),
                    Err(err) => Err((err.is_connect(), err.into())),
                },
            }
        };
        match tokio::time::timeout(timeout, sent).await {
            Err(_) => Try::Failed(GatewayError::Timeout { service: service.to_owned(), timeout }),
            Ok(Ok(response)) if is_unavailable(response.status()) => Try::Unavailable(response),
            Ok(Ok(response)) => Try::Answered(response),
            Ok(Err((never_sent, err))) => {
                let cause = root_cause(&*err);
                let (service, instance) = (service.to_owned(), instance.id.clone());
                if never_sent {
                    Try::NotSent(GatewayError::Connect { service, instance, cause })
                } else {
                    Try::Failed(GatewayError::Upstream { service, instance, cause })
                }
            }
        }
    }

    /// No instance can take the request: none is ready (scale from zero, a replacement after a
    /// crash) or all are at `instance_concurrency`. Wait in the pool's bounded buffer for a
    /// slot or a new instance, up to the buffer timeout. A pool that expects no instance
    /// answers at once.
    async fn wait_for_instance(&self, tried: &Tried, behind_others: bool) -> Result<InFlight, GatewayError> {
        let service = || self.pool.name().to_owned();
        if !self.pool.expects_instances() {
            return Err(GatewayError::NoReadyInstance { service: service() });
        }
        let buffer = self.pool.config().buffer;
        let Some(_waiting) = self.pool.load().wait(buffer.requests) else {
            return Err(GatewayError::BufferFull { service: service(), limit: buffer.requests });
        };
        let mut ready = self.pool.watch_ready();
        self.pool.signal_demand();
        let deadline = tokio::time::sleep(buffer.timeout);
        tokio::pin!(deadline);
        let mut look = !behind_others;
        loop {
            if look {
                if let Some(in_flight) = self.choose(tried) {
                    return Ok(in_flight);
                }
            }
            look = true;
            tokio::select! {
                changed = ready.changed() => if changed.is_err() {
                    return Err(GatewayError::NoReadyInstance { service: service() });
                },
                _ = self.pool.load().slot_freed() => {}
                // A safety net should a wake-up go to a request that has just left.
                _ = tokio::time::sleep(RECHECK) => {}
                _ = &mut deadline => {
                    return Err(GatewayError::NoInstanceInTime { service: service(), timeout: buffer.timeout });
                }
            }
        }
    }

    /// Claims a slot on the instance the balancer picks. The snapshot may hold instances that
    /// stopped or were ejected since it was published; the balancer skips them, and a pick
    /// that loses a race with a drain or a probe is simply made again. Instances in `tried`
    /// are skipped while another one is available.
    fn choose(&self, tried: &Tried) -> Option<InFlight> {
        let ready = self.pool.ready();
        let config = self.pool.config();
        // The pool-wide limit: a slot is claimed first and given back when over, so two requests
        // racing for the last slot can both back off but never both get in.
        let within_service_limit = |in_flight: InFlight| match config.max_concurrency {
            Some(limit) if self.pool.load().active() > limit => {
                in_flight.cancel();
                None
            }
            _ => Some(in_flight),
        };
        if config.max_concurrency.is_some_and(|limit| self.pool.load().active() >= limit) {
            return None;
        }
        let limit = config.instance_concurrency.unwrap_or(usize::MAX);
        let weight = |i: usize| ready[i].weight;
        let load = |i: usize, skip_tried: bool| {
            let instance: &Instance = &ready[i];
            let in_flight = instance.in_flight();
            let usable = instance.is_available() && in_flight < limit;
            let excluded =
                tried.refused.contains(&instance.addr) || (skip_tried && tried.all.contains(&instance.addr));
            (usable && !excluded).then(|| Load { in_flight, latency: instance.latency_estimate() })
        };
        for skip_tried in [true, false] {
            if !skip_tried && tried.all.is_empty() {
                break;
            }
            for _ in 0..=ready.len() {
                let Some(index) = self.balancer.pick(ready.len(), weight, |i| load(i, skip_tried)) else {
                    break;
                };
                if let Some(in_flight) = ready[index].begin() {
                    return within_service_limit(in_flight);
                }
            }
        }
        // Every ready instance is ejected: ignore the breakers rather than fail everything
        // (Envoy's panic routing); the failures still reach the outlier counts.
        if !ready.is_empty() && ready.iter().all(|i| i.is_ejected()) {
            let index = self.balancer.pick(ready.len(), weight, |i| {
                let instance: &Instance = &ready[i];
                let usable =
                    instance.state() == surge_pool::InstanceState::Ready && instance.in_flight() < limit;
                (usable && !tried.refused.contains(&instance.addr))
                    .then(|| Load { in_flight: instance.in_flight(), latency: instance.latency_estimate() })
            })?;
            return ready[index].begin_ignoring_breaker().and_then(within_service_limit);
        }
        None
    }
}

/// Points the request at `instance` and sets the forwarding headers. The Host header is kept,
/// so instances see the name the client asked for.
fn rewrite_request<B>(request: &mut Request<B>, instance: &Instance, version: http::Version) {
    let forwarded_for = request.extensions().get::<ClientAddr>().and_then(|c| c.forwarded_for.clone());
    let original_host = request
        .headers()
        .get(HOST)
        .cloned()
        .or_else(|| request.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(instance.authority.clone());
    uri.path_and_query =
        Some(request.uri().path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    if let Ok(uri) = Uri::from_parts(uri) {
        *request.uri_mut() = uri;
    }

    // Instances speak their service's protocol, whatever the client spoke.
    *request.version_mut() = version;
    let headers = request.headers_mut();
    strip_hop_by_hop(headers);
    if let Some(ip) = forwarded_for {
        let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(earlier) => {
                HeaderValue::from_str(&format!("{earlier}, {}", ip.to_str().unwrap_or_default())).ok()
            }
            None => Some(ip),
        };
        if let Some(value) = value {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = original_host {
        // An HTTP/2 request names its host in the URI only: instances get it as Host.
        if !headers.contains_key(HOST) {
            headers.insert(HOST, host.clone());
        }
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// The protocol a request asks to switch to (`Connection: upgrade` with `Upgrade: ...`).
fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(UPGRADE).cloned()
    } else {
        None
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

fn is_unavailable(status: StatusCode) -> bool {
    matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT)
}

/// Exponential backoff with full jitter: up to `base`, doubling per retry, at most 1 s.
fn jittered_backoff(base: Duration, attempt: u32) -> Duration {
    let ceiling =
        base.saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1))).min(Duration::from_secs(1));
    ceiling.mul_f64(fastrand::f64())
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] =
    [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE];

/// Removes the hop-by-hop headers, including any the Connection header names. One pass over
/// the names (cheap comparisons of standard headers) finds which are present; most messages
/// carry none, or only `Connection: keep-alive`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; 7];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present[i] = true;
        }
    }
    if present[0] {
        // Connection's own tokens: those that are not hop-by-hop already name extra headers.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|token| !["close", "keep-alive", "upgrade"].iter().any(|t| token.eq_ignore_ascii_case(t)))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_under_a_doubling_ceiling() {
        let base = Duration::from_millis(25);
        for attempt in 1..=6 {
            let ceiling = (base * 2u32.pow(attempt - 1)).min(Duration::from_secs(1));
            for _ in 0..50 {
                assert!(jittered_backoff(base, attempt) <= ceiling);
            }
        }
    }

    #[test]
    fn only_safe_methods_are_retried_by_default() {
        assert!(is_idempotent(&Method::GET) && is_idempotent(&Method::PUT) && is_idempotent(&Method::DELETE));
        assert!(!is_idempotent(&Method::POST) && !is_idempotent(&Method::PATCH));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
            ("host", "shop.example"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "x-kept"]);
    }
}
