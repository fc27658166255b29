//! The layers around the proxy, outermost first: request metrics, turning errors into
//! responses, and the request timeout. Each takes only the parameters it needs.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use surge_metrics::{
    latency_buckets, Counter, Family, Gauge, Histogram, Metrics, ResponseLabels, ServiceLabels, StatusClass,
};
use tower::{Layer, Service};

use crate::body::{GatewayBody, GaugeGuard};
use crate::error::GatewayError;
use crate::BoxFuture;

/// The gateway's request metric families.
#[derive(Clone)]
pub struct GatewayMetrics {
    requests: Family<ResponseLabels, Counter>,
    duration: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<ServiceLabels, Gauge>,
    pub(crate) unrouted: Counter,
    pub(crate) rate_limited: Counter,
    retries: Family<ServiceLabels, Counter>,
    retries_denied: Family<ServiceLabels, Counter>,
}

impl GatewayMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let this = GatewayMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            in_flight: Family::default(),
            unrouted: Counter::default(),
            rate_limited: Counter::default(),
            retries: Family::default(),
            retries_denied: Family::default(),
        };
        metrics.register(|registry| {
            registry.register(
                "requests",
                "Requests answered, by service and status class",
                this.requests.clone(),
            );
            registry.register(
                "request_duration_seconds",
                "Time from a request's arrival to its response headers",
                this.duration.clone(),
            );
            registry.register("requests_in_flight", "Requests being served", this.in_flight.clone());
            registry.register(
                "unrouted_requests",
                "Requests that matched no route (404)",
                this.unrouted.clone(),
            );
            registry.register("retries", "Tries sent again to another instance", this.retries.clone());
            registry.register(
                "rate_limited_requests",
                "Requests refused with 429 by a route's rate limit",
                this.rate_limited.clone(),
            );
            registry.register(
                "retries_denied",
                "Retries the retry budget refused (the pool is failing as a whole)",
                this.retries_denied.clone(),
            );
        });
        this
    }

    pub(crate) fn retries(&self, service: &str) -> Counter {
        self.retries.get_or_create(&ServiceLabels { service: service.to_owned() }).clone()
    }

    pub(crate) fn retries_denied(&self, service: &str) -> Counter {
        self.retries_denied.get_or_create(&ServiceLabels { service: service.to_owned() }).clone()
    }

    /// One service's handles, looked up once so the data path never hashes a label.
    fn for_service(&self, service: &str) -> ServiceMetrics {
        let labels = ServiceLabels { service: service.to_owned() };
        let classes = [
            StatusClass::Informational,
            StatusClass::Success,
            StatusClass::Redirection,
            StatusClass::ClientError,
            StatusClass::ServerError,
        ];
        ServiceMetrics {
            by_class: classes.map(|class| {
                self.requests.get_or_create(&ResponseLabels { service: service.to_owned(), class }).clone()
            }),
            duration: self.duration.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
        }
    }
}

struct ServiceMetrics {
    by_class: [Counter; 5],
    duration: Histogram,
    in_flight: Gauge,
}

/// Counts requests by status class, observes latency and tracks in-flight requests.
#[derive(Clone)]
pub struct RecordMetrics<S> {
    inner: S,
    metrics: Arc<ServiceMetrics>,
}

pub struct RecordMetricsLayer(Arc<ServiceMetrics>);

impl RecordMetricsLayer {
    pub fn new(metrics: &GatewayMetrics, service: &str) -> Self {
        RecordMetricsLayer(Arc::new(metrics.for_service(service)))
    }
}

impl<S> Layer<S> for RecordMetricsLayer {
    type Service = RecordMetrics<S>;
    fn layer(&self, inner: S) -> RecordMetrics<S> {
        RecordMetrics { inner, metrics: Arc::clone(&self.0) }
    }
}

impl<S, B> Service<Request<B>> for RecordMetrics<S>
where
    S: Service<Request<B>, Response = Response<GatewayBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let metrics = Arc::clone(&self.metrics);
        let in_flight = GaugeGuard::new(&metrics.in_flight);
        let start = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let Ok(mut response) = response.await;
            metrics.duration.observe(start.elapsed().as_secs_f64());
            let class = StatusClass::of(response.status().as_u16());
            metrics.by_class[class as usize].inc();
            response.body_mut().hold(in_flight);
            Ok(response)
        })
    }
}

/// Turns a [`GatewayError`] into its response; the one place errors meet statuses.
#[derive(Clone)]
pub struct Respond<S> {
    inner: S,
}

pub struct RespondLayer;

impl<S> Layer<S> for RespondLayer {
    type Service = Respond<S>;
    fn layer(&self, inner: S) -> Respond<S> {
        Respond { inner }
    }
}

impl<S, B> Service<Request<B>> for Respond<S>
where
    S: Service<Request<B>, Response = Response<GatewayBody>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        Box::pin(async move {
            Ok(response.await.unwrap_or_else(|error| {
                // A failing or slow instance is news for the operator; a missing route or an
                // empty pool is the client's or the configuration's, and shows in metrics.
                match error {
                    GatewayError::Connect { .. }
                    | GatewayError::Upstream { .. }
                    | GatewayError::Timeout { .. } => {
                        tracing::warn!("{error}")
                    }
                    _ => tracing::debug!("{error}"),
                }
                error.into_response()
            }))
        })
    }
}

/// Bounds the time until the response headers arrive.
#[derive(Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
    service: Arc<str>,
}

pub struct RequestTimeoutLayer {
    pub timeout: Duration,
    pub service: Arc<str>,
}

impl<S> Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;
    fn layer(&self, inner: S) -> RequestTimeout<S> {
        RequestTimeout { inner, timeout: self.timeout, service: Arc::clone(&self.service) }
    }
}

impl<S, B> Service<Request<B>> for RequestTimeout<S>
where
    S: Service<Request<B>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = GatewayError;
    type Future = BoxFuture<Result<S::Response, GatewayError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let response = self.inner.call(request);
        let (timeout, service) = (self.timeout, Arc::clone(&self.service));
        Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(result) => result,
                Err(_) => Err(GatewayError::Timeout { service: service.to_string(), timeout }),
            }
        })
    }
}
