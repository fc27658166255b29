//! The innermost service: pick a ready instance, rewrite the request for it, send it over a
//! pooled keep-alive connection, and stream the response back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use surge_balance::Balancer;
use surge_pool::{InFlight, Instance, InstanceState, Pool};

use crate::body::GatewayBody;
use crate::error::{root_cause, GatewayError};
use crate::BoxFuture;

/// The client's address, put in the request's extensions by the server.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

#[derive(Clone)]
pub struct Proxy {
    inner: Arc<ProxyInner>,
}

struct ProxyInner {
    pool: Arc<Pool>,
    balancer: Balancer,
    client: Client<HttpConnector, Incoming>,
}

impl Proxy {
    pub fn new(pool: Arc<Pool>) -> Self {
        let config = pool.config();
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeouts.connect));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .build(connector);
        let balancer = Balancer::new(match config.balance {
            surge_config::Balance::LeastConn => surge_balance::Policy::LeastConn,
            surge_config::Balance::RoundRobin => surge_balance::Policy::RoundRobin,
        });
        Proxy { inner: Arc::new(ProxyInner { pool, balancer, client }) }
    }
}

impl tower::Service<Request<Incoming>> for Proxy {
    type Response = Response<GatewayBody>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Self::Response, GatewayError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move { inner.forward(request).await })
    }
}

impl ProxyInner {
    async fn forward(&self, mut request: Request<Incoming>) -> Result<Response<GatewayBody>, GatewayError> {
        let service = self.pool.name();
        self.pool.load().arrived();
        let in_flight = match self.choose() {
            Some(in_flight) => in_flight,
            None => self.wait_for_instance().await?,
        };
        let instance = in_flight.instance();
        rewrite_request(&mut request, instance.addr);
        let mut response = self.client.request(request).await.map_err(|err| {
            let cause = root_cause(&err);
            let (service, instance) = (service.to_owned(), instance.id.clone());
            if err.is_connect() {
                GatewayError::Connect { service, instance, cause }
            } else {
                GatewayError::Upstream { service, instance, cause }
            }
        })?;
        strip_hop_by_hop(response.headers_mut());
        Ok(response.map(|body| GatewayBody::upstream(body, in_flight)))
    }

    /// No instance can take the request: none is ready (scale from zero, a replacement after a
    /// crash) or all are at `instance_concurrency`. Wait in the pool's bounded buffer for a
    /// slot or a new instance, up to the buffer timeout. A pool that expects no instance
    /// answers at once.
    async fn wait_for_instance(&self) -> Result<InFlight, GatewayError> {
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
        loop {
            if let Some(in_flight) = self.choose() {
                return Ok(in_flight);
            }
            tokio::select! {
                changed = ready.changed() => if changed.is_err() {
                    return Err(GatewayError::NoReadyInstance { service: service() });
                },
                _ = self.pool.load().slot_freed() => {}
                _ = &mut deadline => {
                    return Err(GatewayError::NoInstanceInTime { service: service(), timeout: buffer.timeout });
                }
            }
        }
    }

    /// Claims a slot on the instance the balancer picks. The snapshot may hold instances that
    /// stopped since it was published; the balancer skips them, and a pick that loses a race
    /// with a drain starting this very moment is simply made again.
    fn choose(&self) -> Option<InFlight> {
        let ready = self.pool.ready();
        let limit = self.pool.config().instance_concurrency.unwrap_or(usize::MAX);
        let load = |i: usize| {
            let instance: &Instance = &ready[i];
            let in_flight = instance.in_flight();
            (instance.state() == InstanceState::Ready && in_flight < limit).then_some(in_flight)
        };
        for _ in 0..=ready.len() {
            let index = self.balancer.pick(ready.len(), load)?;
            if let Some(in_flight) = ready[index].begin() {
                return Some(in_flight);
            }
        }
        None
    }
}

/// Points the request at `upstream` and sets the forwarding headers. The Host header is kept,
/// so instances see the name the client asked for.
fn rewrite_request(request: &mut Request<Incoming>, upstream: SocketAddr) {
    let client = request.extensions().get::<ClientAddr>().map(|c| c.0.ip());
    let original_host = request
        .headers()
        .get(HOST)
        .cloned()
        .or_else(|| request.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
    if let Ok(uri) = Uri::try_from(format!("http://{upstream}{path}")) {
        *request.uri_mut() = uri;
    }

    let headers = request.headers_mut();
    strip_hop_by_hop(headers);
    if let Some(ip) = client {
        let forwarded_for = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = original_host {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1),
/// including any the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, KEEP_ALIVE, PROXY_CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
