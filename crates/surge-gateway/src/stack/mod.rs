//! The request path of one service, as a stack of tower layers, each owning one concern and
//! taking only the settings it needs. Outermost first:
//!
//! | layer | concern |
//! |---|---|
//! | [`metrics::RecordMetrics`] | requests by status class, latency, in flight |
//! | [`respond::Respond`] | a [`GatewayError`](crate::GatewayError) becomes its JSON response |
//! | [`timeout::RequestTimeout`] | `timeouts.request` (504), waiting included; the deadline for the tries |
//! | [`forward::Forward`] | hop-by-hop headers out, `X-Forwarded-*` in |
//! | [`upgrade::Upgrade`] | after a `101`, the two connections spliced |
//! | [`arrival::CountArrival`] | the request's arrival, counted for the autoscaler before it waits |
//! | [`prepare::PrepareBody`] | small bodies read whole (replayable), the rest streamed; readiness stops here |
//! | `tower::retry::Retry` with [`retry::RetryPolicy`] | another try elsewhere, within the budget, with backoff |
//! | [`buffer::WaitBuffer`] | waiting for capacity, bounded in count and time (503) |
//! | [`balance::Balance`] | the pick, readiness = a claimed slot, first come first served |
//! | [`breaker::Breaker`] | each try's outcome to its instance's circuit breaker |
//! | [`timeout::TryTimeout`] | `timeouts.try`, and the deadline told to the instance |
//! | [`endpoint::Endpoint`] | the HTTP/1.1 or hyper client, one error classification |
//!
//! Each layer's future is a plain state machine; only the endpoint's try and the reading of a
//! small body are boxed.

mod arrival;
mod balance;
mod breaker;
mod budget;
mod buffer;
mod endpoint;
mod forward;
pub(crate) use forward::rewrite_request;
mod metrics;
mod prepare;
mod respond;
mod retry;
mod timeout;
mod upgrade;

use std::sync::Arc;
use std::time::Instant;

use surge_pool::Pool;
use tower::retry::{Retry, RetryLayer};
use tower::ServiceBuilder;

pub use breaker::Tries;
pub use metrics::{GatewayMetrics, Traffic};
pub use retry::RetryRoute;

/// One service's stack, as `build` makes it.
pub type ServiceStack = metrics::RecordMetrics<
    respond::Respond<
        timeout::RequestTimeout<
            forward::Forward<
                upgrade::Upgrade<
                    arrival::CountArrival<
                        prepare::PrepareBody<
                            Retry<
                                retry::RetryPolicy,
                                buffer::WaitBuffer<
                                    balance::Balance<
                                        breaker::Breaker<timeout::TryTimeout<endpoint::Endpoint>>,
                                    >,
                                >,
                            >,
                        >,
                    >,
                >,
            >,
        >,
    >,
>;

/// The stack in front of `pool`.
pub fn build(pool: &Arc<Pool>, metrics: &GatewayMetrics) -> ServiceStack {
    let config = pool.config();
    let service: Arc<str> = config.name.as_str().into();
    let retries = retry::Retries {
        budget: budget::RetryBudget::new(config.retry.budget, config.retry.min_per_second),
        attempts: config.retry.attempts,
        backoff: config.retry.backoff,
        epoch: Instant::now(),
        retried: metrics.retries(&config.name),
        denied: metrics.retries_denied(&config.name),
    };
    ServiceBuilder::new()
        .layer(metrics::RecordMetricsLayer::new(metrics, &config.name))
        .layer(respond::RespondLayer)
        .layer(timeout::RequestTimeoutLayer {
            timeout: config.timeouts.request,
            service: Arc::clone(&service),
        })
        .layer(forward::ForwardLayer)
        .layer(upgrade::UpgradeLayer { idle: config.timeouts.tunnel_idle })
        .layer(arrival::CountArrivalLayer(Arc::clone(pool)))
        .layer(prepare::PrepareBodyLayer)
        .layer(RetryLayer::new(retry::RetryPolicy::new(retries)))
        .layer(buffer::WaitBufferLayer(Arc::clone(pool)))
        .layer(balance::BalanceLayer(Arc::clone(pool)))
        .layer(breaker::BreakerLayer(Arc::clone(pool)))
        .layer(timeout::TryTimeoutLayer { per_try: config.timeouts.per_try, service })
        .service(endpoint::Endpoint::new(&config))
}

#[cfg(test)]
mod testing;
