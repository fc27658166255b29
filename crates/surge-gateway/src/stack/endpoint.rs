//! The innermost service: one try to one instance. Every request to an HTTP/1.1 instance, whole
//! or streamed or an upgrade, goes through the gateway's own client (`client.rs`); h2c through
//! hyper's HTTP/2 client. Both clients' failures come out as the same errors: never sent
//! (`Connect`), a kept-alive connection the instance had closed (`Stale`), the client's own
//! body failing (`BadRequestBody`), or the instance failing (`Upstream`).

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Either;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use surge_config::{ServiceConfig, UpstreamProtocol};
use surge_pool::Instance;
use tower::Service;

use super::prepare::Outbound;
use crate::body::{Payload, UpstreamBody};
use crate::client::{Http1Client, Outgoing, SendError, Target, Transport};
use crate::error::{root_cause, GatewayError};
use crate::server::{ClientBody, ClientBodyError};
use crate::wire::BoxFuture;

/// One try: the request, the instance it goes to, and how long the instance has (told in
/// `x-surge-deadline-ms`).
pub struct Try {
    pub instance: Arc<Instance>,
    pub outbound: Outbound,
    pub deadline: Option<Duration>,
}

/// The header that tells an instance how long the gateway will wait for it.
const DEADLINE_HEADER: HeaderName = HeaderName::from_static("x-surge-deadline-ms");

#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Clients>,
}

struct Clients {
    service: String,
    /// hyper's client, for instances spoken to over h2c.
    hyper: Client<HttpConnector, Payload<ClientBody>>,
    /// The gateway's own client, for instances spoken to over HTTP/1.1.
    http1: Option<Arc<Http1Client>>,
    /// The HTTP version spoken to instances.
    version: http::Version,
}

impl Endpoint {
    pub fn new(config: &ServiceConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeouts.connect));
        let mut hyper = Client::builder(TokioExecutor::new());
        hyper.pool_timer(TokioTimer::new()).pool_idle_timeout(Duration::from_secs(60));
        let (http1, version) = match config.protocol {
            UpstreamProtocol::Http1 => {
                (Some(Http1Client::new(config.timeouts.connect, Transport::Plain)), http::Version::HTTP_11)
            }
            UpstreamProtocol::Https => {
                let transport = match surge_tls::UpstreamTls::for_service(config) {
                    Ok(tls) => Transport::Tls(tls),
                    Err(why) => Transport::BrokenTls(why),
                };
                (Some(Http1Client::new(config.timeouts.connect, transport)), http::Version::HTTP_11)
            }
            UpstreamProtocol::H2c => {
                // One multiplexed connection per instance; pings find a dead peer between requests.
                hyper
                    .http2_only(true)
                    .timer(TokioTimer::new())
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .http2_keep_alive_while_idle(true);
                (None, http::Version::HTTP_2)
            }
        };
        let clients = Clients { service: config.name.clone(), hyper: hyper.build(connector), http1, version };
        Endpoint { inner: Arc::new(clients) }
    }
}

impl Service<Try> for Endpoint {
    type Response = Response<UpstreamBody>;
    type Error = GatewayError;
    type Future = BoxFuture<Result<Response<UpstreamBody>, GatewayError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Try) -> Self::Future {
        let clients = Arc::clone(&self.inner);
        crate::wire::boxed(|| async move { clients.send(attempt).await })
    }
}

impl Clients {
    async fn send(
        &self,
        Try { instance, outbound, deadline }: Try,
    ) -> Result<Response<UpstreamBody>, GatewayError> {
        let Outbound { parts, body, .. } = outbound;
        let deadline = deadline
            .map(|left| surge_http1::Decimal::new(u64::try_from(left.as_millis()).unwrap_or(u64::MAX)));
        let failed = |error: SendError| {
            let (service, instance) = (self.service.clone(), instance.id.clone());
            match error {
                SendError::Connect(cause) => {
                    GatewayError::Connect { service, instance, cause: root_cause(&*cause) }
                }
                SendError::Stale => GatewayError::Stale { service, instance },
                SendError::Failed(cause) => {
                    GatewayError::Upstream { service, instance, cause: root_cause(&*cause) }
                }
                SendError::ClientBody(cause) => GatewayError::client_body(&*cause),
            }
        };
        match (&self.http1, body) {
            (Some(http1), body) => {
                let body = match body {
                    Payload::Kept { bytes } => Outgoing::Whole(bytes.unwrap_or_default()),
                    Payload::Streaming { body } => Outgoing::Streamed(body),
                };
                let extra =
                    deadline.as_ref().map(|millis| (b"x-surge-deadline-ms".as_slice(), millis.as_bytes()));
                let target =
                    Target { addr: instance.addr, authority: &instance.authority, name: instance.name() };
                match http1.send(target, &parts, extra.as_slice(), body).await {
                    Ok(response) => Ok(response.map(Either::Left)),
                    Err(error) => Err(failed(error)),
                }
            }
            (_, body) => {
                // This client needs the head to own: the first try has it alone, a retry copies it.
                let mut parts = Arc::try_unwrap(parts).unwrap_or_else(|shared| (*shared).clone());
                // Instances speak their service's protocol, whatever the client spoke.
                parts.version = self.version;
                parts.uri = instance_uri(&parts.uri, &instance);
                if let Some(millis) =
                    deadline.as_ref().and_then(|m| HeaderValue::from_bytes(m.as_bytes()).ok())
                {
                    parts.headers.insert(DEADLINE_HEADER, millis);
                }
                match self.hyper.request(Request::from_parts(parts, body)).await {
                    Ok(response) => Ok(response.map(Either::Right)),
                    Err(error) if find_cause::<ClientBodyError>(&error).is_some() => {
                        Err(GatewayError::client_body(&error))
                    }
                    Err(error) if error.is_connect() => Err(failed(SendError::Connect(error.into()))),
                    Err(error) => Err(failed(SendError::Failed(error.into()))),
                }
            }
        }
    }
}

/// The request's path and query at `instance`.
fn instance_uri(uri: &Uri, instance: &Instance) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(instance.authority.clone());
    parts.path_and_query =
        Some(uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// The first error of type `E` in `error`'s chain of causes.
fn find_cause<'a, E: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(found) = error.downcast_ref::<E>() {
            return Some(found);
        }
        cause = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::testing::pool;

    #[test]
    fn a_clients_body_error_is_found_however_deep_it_is_wrapped() {
        #[derive(Debug, thiserror::Error)]
        #[error("sending failed")]
        struct Wrapper(#[source] Box<dyn std::error::Error + Send + Sync>);
        let body: crate::wire::BoxError = "the client went away".into();
        let deep = Wrapper(Box::new(Wrapper(Box::new(ClientBodyError::from(body)))));
        assert!(find_cause::<ClientBodyError>(&deep).is_some());
        assert!(find_cause::<ClientBodyError>(&Wrapper("instance reset".into())).is_none());
    }

    #[test]
    fn requests_are_pointed_at_the_instance() {
        let pool = pool(1, "");
        let instance = &pool.ready()[0];
        let uri: Uri = "http://shop.example/a/b?c=1".parse().expect("uri");
        assert_eq!(instance_uri(&uri, instance), "http://127.0.0.1:9000/a/b?c=1");
        let origin_form: Uri = "/x".parse().expect("uri");
        assert_eq!(instance_uri(&origin_form, instance), "http://127.0.0.1:9000/x");
    }
}
