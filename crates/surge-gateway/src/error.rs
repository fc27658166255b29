//! Every way the gateway itself can fail a request, mapped to a status in one place.

use std::time::Duration;

use http::header::{HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::GatewayBody;
use crate::problem::problem;
use crate::server::BodyError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route matches host {host:?} and path {path:?}")]
    NoRoute { host: String, path: String },
    #[error("no file for {path:?}")]
    NoFile { path: String },
    #[error("files are served to GET and HEAD only")]
    MethodNotAllowed,
    #[error("bad request: {what}")]
    BadRequest { what: &'static str },
    #[error("the request body could not be read: {cause}")]
    BadRequestBody { cause: String },
    #[error("the request body is larger than {limit} bytes (gateway.max_body, or the route's max_body)")]
    BodyTooLarge { limit: u64 },
    #[error("no byte of the request body came for {after:?} (gateway.body_timeout)")]
    BodyTimeout { after: Duration },
    #[error("rate limit of {limit} requests exceeded; retry in {:.3} s", verdict.retry_after.as_secs_f64())]
    RateLimited { limit: u32, verdict: crate::ratelimit::Verdict },
    #[error("service `{service}` has no ready instance")]
    NoReadyInstance { service: String },
    #[error("service `{service}` has no ready instance and {limit} requests already wait for one (services.{service}.buffer.requests)")]
    BufferFull { service: String, limit: usize },
    #[error("no instance of service `{service}` became ready within {timeout:?} (services.{service}.buffer.timeout)")]
    NoInstanceInTime { service: String, timeout: Duration },
    #[error("cannot connect to instance {instance} of service `{service}`: {cause}")]
    Connect { service: String, instance: String, cause: String },
    #[error("instance {instance} of service `{service}` failed: {cause}")]
    Upstream { service: String, instance: String, cause: String },
    #[error("instance {instance} of service `{service}` closed a kept-alive connection before answering")]
    Stale { service: String, instance: String },
    #[error("instance {instance} of service `{service}` did not answer within {timeout:?} (services.{service}.timeouts.try)")]
    TryTimeout { service: String, instance: String, timeout: Duration },
    #[error("service `{service}` did not answer within {timeout:?} (services.{service}.timeouts.request)")]
    Timeout { service: String, timeout: Duration },
    #[error("internal error: {what}")]
    Internal { what: &'static str },
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute { .. } | GatewayError::NoFile { .. } => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BadRequest { .. } | GatewayError::BadRequestBody { .. } => StatusCode::BAD_REQUEST,
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::NoReadyInstance { .. }
            | GatewayError::BufferFull { .. }
            | GatewayError::NoInstanceInTime { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Connect { .. } | GatewayError::Upstream { .. } | GatewayError::Stale { .. } => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::TryTimeout { .. } | GatewayError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The instance a try failed on, for the errors that are an instance's.
    pub fn instance(&self) -> Option<&str> {
        match self {
            GatewayError::Connect { instance, .. }
            | GatewayError::Upstream { instance, .. }
            | GatewayError::Stale { instance, .. }
            | GatewayError::TryTimeout { instance, .. } => Some(instance),
            _ => None,
        }
    }

    /// A failing or slow instance: news for the operator, where the others are the client's
    /// or the configuration's and show in metrics.
    pub fn is_instance_failure(&self) -> bool {
        matches!(
            self,
            GatewayError::Connect { .. }
                | GatewayError::Upstream { .. }
                | GatewayError::TryTimeout { .. }
                | GatewayError::Timeout { .. }
                | GatewayError::Internal { .. }
        )
    }

    /// A stable, machine-readable name for the error.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::NoRoute { .. } => "no_route",
            GatewayError::NoFile { .. } => "no_file",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::BadRequest { .. } => "bad_request",
            GatewayError::BadRequestBody { .. } => "bad_request_body",
            GatewayError::BodyTooLarge { .. } => "body_too_large",
            GatewayError::BodyTimeout { .. } => "body_timeout",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::NoReadyInstance { .. } => "no_ready_instance",
            GatewayError::BufferFull { .. } => "buffer_full",
            GatewayError::NoInstanceInTime { .. } => "no_instance_in_time",
            GatewayError::Connect { .. } => "connect_failed",
            GatewayError::Upstream { .. } | GatewayError::Stale { .. } => "upstream_failed",
            GatewayError::TryTimeout { .. } | GatewayError::Timeout { .. } => "upstream_timeout",
            GatewayError::Internal { .. } => "internal",
        }
    }

    /// A short JSON body that says why.
    pub fn into_response(self) -> Response<GatewayBody> {
        let status = self.status();
        let rate_headers = match &self {
            GatewayError::RateLimited { limit, verdict } => Some((*limit, *verdict)),
            _ => None,
        };
        let mut response = problem(status, self.code(), &self.to_string()).map(GatewayBody::full);
        let headers = response.headers_mut();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some((limit, verdict)) = rate_headers {
            // Retry-After in whole seconds (rounded up); the RateLimit fields of the IETF draft.
            let seconds = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
            for (name, value) in [
                (RETRY_AFTER.as_str(), seconds(verdict.retry_after).to_string()),
                ("ratelimit-limit", limit.to_string()),
                ("ratelimit-remaining", verdict.remaining.to_string()),
                ("ratelimit-reset", seconds(verdict.reset).to_string()),
            ] {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(name, value);
                }
            }
        }
        response
    }
}

impl GatewayError {
    /// A request body that failed on the client's side: too large (413), too slow (408), or
    /// malformed or cut short (400). Never an instance's failure.
    pub(crate) fn client_body(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut cause = Some(err);
        while let Some(err) = cause {
            match err.downcast_ref::<BodyError>() {
                Some(BodyError::TooLarge(limit)) => return GatewayError::BodyTooLarge { limit: *limit },
                Some(BodyError::Stalled(after)) => return GatewayError::BodyTimeout { after: *after },
                None => cause = err.source(),
            }
        }
        GatewayError::BadRequestBody { cause: root_cause(err) }
    }
}

/// "connection refused" rather than "client error (Connect)": the deepest cause says most.
pub(crate) fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
