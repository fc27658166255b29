//! Retries, as a policy for tower's `Retry`: a failed try goes again to another instance while
//! the request may be repeated, tries are left, and the retry budget allows. Whether an outcome
//! may be repeated is a pure function of the outcome and the request ([`decide`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Method, Response, StatusCode};
use surge_metrics::Counter;
use tower::retry::Policy;

use super::budget::RetryBudget;
use super::prepare::Outbound;
use crate::body::GatewayBody;
use crate::error::GatewayError;

/// Set by the router when the matching route allows retrying any method.
#[derive(Debug, Clone, Copy)]
pub struct RetryRoute;

/// What to do after a try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Final,
    Retry { backoff: bool },
}

/// How a try ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    Answered(StatusCode),
    Failed(&'a GatewayError),
}

/// A try that never reached the instance may go again whatever the method; one that may have
/// (an instance's 502, 503 or 504, a broken connection, a try timeout) only if the request may
/// be repeated. An instance that closed a kept-alive connection goes again at once; the rest
/// after a backoff. Everything else (answers, the client's errors, the request's own timeout,
/// an empty pool) is final.
pub fn decide(outcome: Outcome<'_>, repeatable: bool) -> Decision {
    let again = |backoff| if repeatable { Decision::Retry { backoff } } else { Decision::Final };
    match outcome {
        Outcome::Answered(status) if is_unavailable(status) => again(true),
        Outcome::Answered(_) => Decision::Final,
        Outcome::Failed(GatewayError::Connect { .. }) => Decision::Retry { backoff: false },
        Outcome::Failed(GatewayError::Stale { .. }) => again(false),
        Outcome::Failed(GatewayError::Upstream { .. } | GatewayError::TryTimeout { .. }) => again(true),
        Outcome::Failed(_) => Decision::Final,
    }
}

fn is_unavailable(status: StatusCode) -> bool {
    matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT)
}

pub fn is_idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE)
}

/// Exponential backoff with full jitter: up to `base`, doubling per retry, at most 1 s.
pub fn jittered_backoff(base: Duration, retry: u32) -> Duration {
    let ceiling =
        base.saturating_mul(2u32.saturating_pow(retry.saturating_sub(1))).min(Duration::from_secs(1));
    ceiling.mul_f64(fastrand::f64())
}

/// A service's retry settings and counters, shared by all its requests.
pub struct Retries {
    pub budget: RetryBudget,
    pub attempts: u32,
    pub backoff: Duration,
    pub epoch: Instant,
    pub retried: Counter,
    pub denied: Counter,
}

/// The policy of one request: `tries` so far. The service's copy has none, and every request
/// starts from a copy of it.
#[derive(Clone)]
pub struct RetryPolicy {
    retries: Arc<Retries>,
    tries: u32,
}

impl RetryPolicy {
    pub fn new(retries: Retries) -> Self {
        RetryPolicy { retries: Arc::new(retries), tries: 0 }
    }
}

impl Policy<Outbound, Response<GatewayBody>, GatewayError> for RetryPolicy {
    type Future = Backoff;

    fn retry(
        &mut self,
        request: &mut Outbound,
        result: &mut Result<Response<GatewayBody>, GatewayError>,
    ) -> Option<Backoff> {
        let repeatable =
            is_idempotent(&request.parts.method) || request.parts.extensions.get::<RetryRoute>().is_some();
        let (outcome, instance) = match result {
            Ok(response) => (Outcome::Answered(response.status()), response.body().instance_id()),
            Err(error) => (Outcome::Failed(error), error.instance()),
        };
        let Decision::Retry { backoff } = decide(outcome, repeatable) else { return None };
        let instance = instance.map(str::to_owned);
        self.tries += 1;
        if !self.retries.budget.try_retry(self.retries.epoch.elapsed()) {
            self.retries.denied.inc();
            return None;
        }
        self.retries.retried.inc();
        if let Some(instance) = instance {
            request.tried.push(instance);
        }
        Some(if backoff {
            Backoff::Sleep { sleep: tokio::time::sleep(jittered_backoff(self.retries.backoff, self.tries)) }
        } else {
            Backoff::Now
        })
    }

    /// Keeps a copy of the request for another try while one may follow. The service's own
    /// copy of the policy is asked first, once per request: that is where requests are counted
    /// for the budget.
    fn clone_request(&mut self, request: &Outbound) -> Option<Outbound> {
        if self.tries == 0 {
            self.retries.budget.request(self.retries.epoch.elapsed());
        }
        if self.tries + 1 >= self.retries.attempts {
            return None;
        }
        request.try_clone()
    }
}

pin_project_lite::pin_project! {
    #[project = BackoffProj]
    pub enum Backoff {
        Now,
        Sleep { #[pin] sleep: tokio::time::Sleep },
    }
}

impl Future for Backoff {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.project() {
            BackoffProj::Now => Poll::Ready(()),
            BackoffProj::Sleep { sleep } => sleep.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::Payload;

    fn connect() -> GatewayError {
        GatewayError::Connect { service: "s".into(), instance: "s-1".into(), cause: "refused".into() }
    }

    #[test]
    fn what_may_be_tried_again() {
        let upstream =
            GatewayError::Upstream { service: "s".into(), instance: "s-1".into(), cause: "reset".into() };
        let stale = GatewayError::Stale { service: "s".into(), instance: "s-1".into() };
        let try_timeout = GatewayError::TryTimeout {
            service: "s".into(),
            instance: "s-1".into(),
            timeout: Duration::from_secs(1),
        };
        let request_timeout = GatewayError::Timeout { service: "s".into(), timeout: Duration::from_secs(1) };
        let client = GatewayError::BadRequestBody { cause: "aborted".into() };
        let full = GatewayError::BufferFull { service: "s".into(), limit: 1 };
        let retry = |backoff| Decision::Retry { backoff };
        let cases = [
            (Outcome::Answered(StatusCode::OK), Decision::Final, Decision::Final),
            (Outcome::Answered(StatusCode::INTERNAL_SERVER_ERROR), Decision::Final, Decision::Final),
            (Outcome::Answered(StatusCode::SERVICE_UNAVAILABLE), retry(true), Decision::Final),
            (Outcome::Answered(StatusCode::BAD_GATEWAY), retry(true), Decision::Final),
            (Outcome::Failed(&connect()), retry(false), retry(false)),
            (Outcome::Failed(&stale), retry(false), Decision::Final),
            (Outcome::Failed(&upstream), retry(true), Decision::Final),
            (Outcome::Failed(&try_timeout), retry(true), Decision::Final),
            (Outcome::Failed(&request_timeout), Decision::Final, Decision::Final),
            (Outcome::Failed(&client), Decision::Final, Decision::Final),
            (Outcome::Failed(&full), Decision::Final, Decision::Final),
        ];
        for (outcome, repeatable, not_repeatable) in cases {
            assert_eq!(decide(outcome, true), repeatable, "{outcome:?}, repeatable");
            assert_eq!(decide(outcome, false), not_repeatable, "{outcome:?}, not repeatable");
        }
    }

    #[test]
    fn backoff_is_jittered_under_a_doubling_ceiling() {
        let base = Duration::from_millis(25);
        for retry in 1..=6 {
            let ceiling = (base * 2u32.pow(retry - 1)).min(Duration::from_secs(1));
            for _ in 0..50 {
                assert!(jittered_backoff(base, retry) <= ceiling);
            }
        }
    }

    #[test]
    fn only_safe_methods_are_retried_by_default() {
        assert!(is_idempotent(&Method::GET) && is_idempotent(&Method::PUT) && is_idempotent(&Method::DELETE));
        assert!(!is_idempotent(&Method::POST) && !is_idempotent(&Method::PATCH));
    }

    fn policy(attempts: u32, ratio: f64, per_second: f64) -> RetryPolicy {
        RetryPolicy::new(Retries {
            budget: RetryBudget::new(ratio, per_second),
            attempts,
            backoff: Duration::ZERO,
            epoch: Instant::now(),
            retried: Counter::default(),
            denied: Counter::default(),
        })
    }

    fn get() -> Outbound {
        let (parts, ()) = http::Request::get("/a").body(()).expect("request").into_parts();
        Outbound::new(parts, Payload::Kept { bytes: None })
    }

    #[tokio::test]
    async fn a_request_is_tried_at_most_attempts_times_and_remembers_where() {
        let mut template = policy(3, 0.2, 1.0);
        let request = get();
        let mut policy = template.clone();
        let mut kept = template.clone_request(&request).expect("a copy for a second try");
        let mut failed: Result<Response<GatewayBody>, GatewayError> = Err(connect());
        assert!(policy.retry(&mut kept, &mut failed).is_some());
        assert_eq!(kept.tried, ["s-1"]);
        let mut kept = policy.clone_request(&kept).expect("a copy for a third try");
        assert!(policy.retry(&mut kept, &mut failed).is_some());
        assert!(policy.clone_request(&kept).is_none(), "three tries in all");
        assert!(policy.retries.retried.get() == 2 && policy.retries.denied.get() == 0);
    }

    #[tokio::test]
    async fn the_budget_denies_retries_past_its_share() {
        // A budget of 0 with no floor: every retry denied, and counted as such.
        let mut template = policy(3, 0.0, 0.0);
        let request = get();
        let mut kept = template.clone_request(&request).expect("copy");
        let mut policy = template.clone();
        assert!(policy.retry(&mut kept, &mut Err(connect())).is_none());
        assert_eq!((policy.retries.retried.get(), policy.retries.denied.get()), (0, 1));
    }

    #[test]
    fn a_streamed_body_is_never_copied() {
        let mut template = policy(3, 0.2, 1.0);
        let (streamed, ()) = http::Request::post("/up").body(()).expect("request").into_parts();
        let body = crate::server::ClientBody::Http1(crate::server::test_body());
        assert!(template.clone_request(&Outbound::new(streamed, Payload::Streaming { body })).is_none());
    }
}
