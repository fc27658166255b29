//! The outermost layer: requests counted by status class, their latency, and those in flight
//! (until the last byte of the response body). The metric families are registered here too.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use surge_metrics::{
    Counter, Family, Gauge, LatencyCounts, LatencyHistogram, Metrics, ResponseLabels, ServiceLabels,
    StatusClass,
};
use tower::{Layer, Service};

use crate::body::{GatewayBody, GaugeGuard};

/// The gateway's request metric families.
#[derive(Clone)]
pub struct GatewayMetrics {
    requests: Family<ResponseLabels, Counter>,
    duration: Family<ServiceLabels, LatencyHistogram>,
    in_flight: Family<ServiceLabels, Gauge>,
    pub(crate) unrouted: Counter,
    rate_limited: Family<ServiceLabels, Counter>,
    retries: Family<ServiceLabels, Counter>,
    retries_denied: Family<ServiceLabels, Counter>,
}

impl GatewayMetrics {
    pub fn register(metrics: &Metrics) -> Self {
        let this = GatewayMetrics {
            requests: Family::default(),
            duration: Family::default(),
            in_flight: Family::default(),
            unrouted: Counter::default(),
            rate_limited: Family::default(),
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
                "Requests refused with 429 by a route's rate limit, by the route's service",
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
        counter(&self.retries, service)
    }

    pub(crate) fn retries_denied(&self, service: &str) -> Counter {
        counter(&self.retries_denied, service)
    }

    pub(crate) fn rate_limited(&self, service: &str) -> Counter {
        counter(&self.rate_limited, service)
    }

    /// What one service's requests came to so far, for the dashboard and alerts.
    pub fn traffic(&self, service: &str) -> Traffic {
        let handles = self.for_service(service);
        Traffic {
            by_class: handles.by_class.each_ref().map(Counter::get),
            latency: handles.duration.read(),
            in_flight: u64::try_from(handles.in_flight.get()).unwrap_or(0),
            retries: counter(&self.retries, service).get(),
            rate_limited: counter(&self.rate_limited, service).get(),
        }
    }

    /// Requests that matched no route, so far.
    pub fn unrouted(&self) -> u64 {
        self.unrouted.get()
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

fn counter(family: &Family<ServiceLabels, Counter>, service: &str) -> Counter {
    family.get_or_create(&ServiceLabels { service: service.to_owned() }).clone()
}

/// One service's request counters as read at one moment: all cumulative but `in_flight`.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// Answers by status class: 1xx, 2xx, 3xx, 4xx, 5xx.
    pub by_class: [u64; 5],
    /// From a request's arrival to its response head.
    pub latency: LatencyCounts,
    pub in_flight: u64,
    pub retries: u64,
    pub rate_limited: u64,
}

pub struct ServiceMetrics {
    by_class: [Counter; 5],
    duration: LatencyHistogram,
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
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Recorded<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        Recorded {
            in_flight: Some(GaugeGuard::new(&self.metrics.in_flight)),
            metrics: Arc::clone(&self.metrics),
            start: Instant::now(),
            response: self.inner.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Recorded<F> {
        #[pin]
        response: F,
        metrics: Arc<ServiceMetrics>,
        in_flight: Option<GaugeGuard>,
        start: Instant,
    }
}

impl<F: Future<Output = Result<Response<GatewayBody>, Infallible>>> Future for Recorded<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.response.poll(cx));
        this.metrics.duration.record(this.start.elapsed());
        let class = StatusClass::of(response.status().as_u16());
        this.metrics.by_class[class as usize].inc();
        if let Some(in_flight) = this.in_flight.take() {
            response.body_mut().hold(in_flight);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn answers_are_counted_by_class_and_in_flight_until_their_body_ends() {
        let metrics = GatewayMetrics::register(&Metrics::new());
        let layer = RecordMetricsLayer::new(&metrics, "web");
        let service_metrics = Arc::clone(&layer.0);
        let answer = |status: u16| {
            tower::service_fn(move |_: Request<()>| async move {
                let mut response = Response::new(GatewayBody::full(Bytes::from("x")));
                *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
                Ok::<_, Infallible>(response)
            })
        };
        let Ok(ok) = layer.layer(answer(200)).oneshot(Request::new(())).await;
        let Ok(failed) = layer.layer(answer(503)).oneshot(Request::new(())).await;
        assert_eq!(service_metrics.by_class.iter().map(Counter::get).collect::<Vec<_>>(), [0, 1, 0, 0, 1]);
        assert_eq!(service_metrics.in_flight.get(), 2, "bodies not sent yet");
        drop((ok, failed));
        assert_eq!(service_metrics.in_flight.get(), 0);
    }
}
