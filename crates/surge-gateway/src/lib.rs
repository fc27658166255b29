//! The gateway: an HTTP server that routes each request to a service and proxies it to one
//! of the service's ready instances.
//!
//! Per service the data path is a stack of tower layers, outermost first:
//! [`RecordMetrics`](layers::RecordMetrics) → [`Respond`](layers::Respond) →
//! [`RequestTimeout`](layers::RequestTimeout) → [`Proxy`](proxy::Proxy).
//! Resilience layers (retries, budgets, load shedding) slot into the same stack.

mod body;
mod client;
mod error;
mod problem;
mod ratelimit;
mod router;
pub mod server;
mod stack;
mod tls;
mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HOST, STRICT_TRANSPORT_SECURITY};
use http::{HeaderValue, Request, Response};
use surge_config::Config;
use surge_pool::Pools;
use tokio::net::TcpListener;
use tower::ServiceExt;

pub use body::GatewayBody;
pub use error::GatewayError;
pub use problem::ERROR_HEADER;
pub use ratelimit::{gcra, RateLimiter, RateStore, Verdict};
pub use router::Router;
use server::{ClientAddr, ClientBody};
pub use stack::GatewayMetrics;
use wire::BoxFuture;

pub struct Gateway {
    router: Router<RouteTarget>,
    services: Vec<stack::ServiceStack>,
    metrics: GatewayMetrics,
}

/// What a matched route leads to.
struct RouteTarget {
    service: usize,
    retry: bool,
    limiter: Option<Arc<RateLimiter>>,
}

impl Gateway {
    /// Builds the route table and one layer stack per service of `config`.
    pub fn new(config: &Config, pools: &Pools, metrics: GatewayMetrics, store: RateStore) -> Self {
        let mut routes = Vec::new();
        let mut services = Vec::new();
        for service in &config.services {
            let Some(pool) = pools.get(&service.name) else { continue };
            let index = services.len();
            routes.extend(service.routes.iter().map(|route| {
                let limiter = route.rate_limit.clone().map(|limit| {
                    let name =
                        format!("{}:{}{}", service.name, route.host.as_deref().unwrap_or(""), route.prefix);
                    Arc::new(RateLimiter::new(limit, name, store.clone()))
                });
                (route.clone(), RouteTarget { service: index, retry: route.retry, limiter })
            }));
            let stack = stack::build(pool, &metrics);
            services.push(stack);
        }
        Gateway { router: Router::new(routes), services, metrics }
    }

    /// Routes a request, and answers it when routing decides (404); else it goes through its
    /// service's stack, after the route's rate limit if it has one.
    fn handle(gateway: &Arc<Gateway>, mut request: Request<ClientBody>) -> Handled {
        let host = request.headers().get(HOST).and_then(|h| h.to_str().ok()).or(request.uri().host());
        let Some(target) = gateway.router.route(host, request.uri().path()) else {
            gateway.metrics.unrouted.inc();
            let host = host.unwrap_or_default().to_owned();
            let path = request.uri().path().to_owned();
            return Handled::Answered {
                response: Some(GatewayError::NoRoute { host, path }.into_response()),
            };
        };
        if target.retry {
            request.extensions_mut().insert(stack::RetryRoute);
        }
        let stack = gateway.services[target.service].clone();
        let Some(limiter) = &target.limiter else {
            return Handled::Stack { response: stack.oneshot(request) };
        };
        let (gateway, limiter) = (Arc::clone(gateway), Arc::clone(limiter));
        Handled::Limited {
            response: Box::pin(async move {
                let client_ip = match request.extensions().get::<ClientAddr>() {
                    Some(client) => client.addr.ip(),
                    None => std::net::Ipv4Addr::UNSPECIFIED.into(),
                };
                let verdict = limiter.check(&limiter.key(request.headers(), client_ip)).await;
                if !verdict.allowed {
                    gateway.metrics.rate_limited.inc();
                    return GatewayError::RateLimited { limit: limiter.limit().rate, verdict }
                        .into_response();
                }
                let Ok(response) = stack.oneshot(request).await;
                response
            }),
        }
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

/// The gateway as the server's service: cloned per connection, an `Arc` each.
#[derive(Clone)]
struct GatewayService(Arc<Gateway>);

impl tower::Service<Request<ClientBody>> for GatewayService {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Handled;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ClientBody>) -> Self::Future {
        Gateway::handle(&self.0, request)
    }
}

/// Serves the gateway on `listener` until `shutdown` resolves, then gives open requests up to
/// `drain_timeout` to finish.
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    server::serve(GatewayService(gateway), listener, None, shutdown, drain_timeout).await;
}

/// Serves the gateway over HTTPS on `listener`, each response with `hsts` as its
/// `Strict-Transport-Security` when given.
pub async fn serve_tls(
    gateway: Arc<Gateway>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    hsts: Option<HeaderValue>,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let service = GatewayService(gateway).map_response(move |mut response: Response<GatewayBody>| {
        if let Some(hsts) = &hsts {
            response.headers_mut().insert(STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
        response
    });
    server::serve(service, listener, Some(tls), shutdown, drain_timeout).await;
}

/// Serves the plain listener as a redirect to the HTTPS one on `https_port`: 308 keeps the
/// method and body, as a client needs for anything but GET.
pub async fn serve_https_redirect(
    listener: TcpListener,
    https_port: u16,
    shutdown: impl Future<Output = ()>,
    drain_timeout: Duration,
) {
    let service = tower::service_fn(move |request: Request<ClientBody>| {
        std::future::ready(Ok::<_, Infallible>(redirect_to_https(&request, https_port)))
    });
    server::serve(service, listener, None, shutdown, drain_timeout).await;
}

fn redirect_to_https<B>(request: &Request<B>, https_port: u16) -> Response<GatewayBody> {
    let host = request.headers().get(HOST).and_then(|h| h.to_str().ok()).or(request.uri().host());
    let Some(host) = host.map(host_without_port).filter(|h| !h.is_empty()) else {
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

/// `example.com` of `example.com:8080`, and `[::1]` of `[::1]:8080`.
fn host_without_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(colon) if !host[colon..].contains(']') => &host[..colon],
        _ => host,
    }
}
