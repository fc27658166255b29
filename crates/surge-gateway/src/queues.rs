//! What the gateway does for queues: publishes to queues marked public, enqueues the
//! requests of async routes (answered 202 with where the answer will be), and answers
//! `GET /jobs/ID` with a job's answer or where it is.

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_TYPE, LOCATION, RETRY_AFTER};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use surge_queue::job::{encode_request, parse_job_id, JobJson, MAX_FIELDS, REQUEST_TYPE};
use surge_queue::{NewMessage, Queue};

use crate::body::GatewayBody;
use crate::error::GatewayError;
use crate::server::ClientBody;

/// `Prefer: wait=N` waits at most this long for a job's answer.
const LONGEST_WAIT: Duration = Duration::from_secs(60);

/// The queue a `POST /queues/NAME/messages[:batch]` publishes to, when the queue lets the
/// gateway publish (`publish = "public"`); other queues' paths route as any other.
pub(crate) fn publish_target<B>(
    queues: &surge_queue::Queues,
    request: &Request<B>,
) -> Option<Arc<surge_queue::Queue>> {
    if request.method() != http::Method::POST || queues.is_empty() {
        return None;
    }
    let rest = request.uri().path().strip_prefix("/queues/")?;
    let name = rest.strip_suffix("/messages").or_else(|| rest.strip_suffix("/messages:batch"))?;
    queues.public(name).cloned()
}

pub(crate) async fn publish(
    queue: Arc<surge_queue::Queue>,
    request: Request<ClientBody>,
) -> Response<GatewayBody> {
    use http_body_util::BodyExt;
    let batch = request.uri().path().ends_with(":batch");
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => return GatewayError::client_body(&*err).into_response(),
    };
    let (status, json) = if batch {
        surge_queue::http::publish_batch(&queue, &parts.headers, &body).await
    } else {
        surge_queue::http::publish_one(&queue, &parts.headers, body).await
    };
    let mut response = Response::new(GatewayBody::full(bytes::Bytes::from(json.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn json_response(status: StatusCode, json: &serde_json::Value) -> Response<GatewayBody> {
    let mut response = Response::new(GatewayBody::full(bytes::Bytes::from(json.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An async route's request: enqueued whole, answered 202 with the job's place.
pub(crate) async fn enqueue(queue: Arc<Queue>, mut request: Request<ClientBody>) -> Response<GatewayBody> {
    // What the worker sees is what an instance would: forwarding fields set, a client's claims dropped.
    crate::stack::rewrite_request(&mut request);
    if request.headers().len() > MAX_FIELDS {
        return json_response(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &serde_json::json!({ "error": format!("an async route's request may have {MAX_FIELDS} fields at most") }),
        );
    }
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => return GatewayError::client_body(&*err).into_response(),
    };
    let target = parts.uri.path_and_query().map_or("/", |target| target.as_str());
    let key = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(|k| k.trim().to_owned());
    let key = match surge_queue::http::checked_key(key) {
        Ok(key) => key,
        Err(problem) => {
            return json_response(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": problem }))
        }
    };
    let message = NewMessage {
        payload: encode_request(&parts.method, target, &parts.headers, &body),
        content_type: Some(REQUEST_TYPE.to_owned()),
        idempotency_key: key,
        not_before: None,
        traceparent: surge_queue::http::traceparent(&parts.headers),
    };
    match queue.publish(vec![message]).await {
        Ok(published) => {
            let Some(published) = published.first() else {
                return GatewayError::Internal { what: "the publish answered nothing" }.into_response();
            };
            let id = queue.job_name(published.id);
            let location = format!("/jobs/{id}");
            let json = serde_json::json!({ "id": id, "state": "queued", "location": location });
            let mut response = json_response(StatusCode::ACCEPTED, &json);
            if let Ok(location) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(LOCATION, location);
            }
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        Err(err) => {
            let (status, json) = surge_queue::http::refused(&err);
            json_response(status, &json)
        }
    }
}

/// The queue a `GET /jobs/QUEUE-ID` asks about, among the async routes' queues.
/// The id is `None` when its tag is not the queue's own: a made-up id, answered as unknown.
pub(crate) fn job_target<B>(
    queues: &[Arc<Queue>],
    request: &Request<B>,
) -> Option<(Arc<Queue>, Option<u64>)> {
    if request.method() != http::Method::GET || queues.is_empty() {
        return None;
    }
    let (name, id, tag) = parse_job_id(request.uri().path().strip_prefix("/jobs/")?)?;
    let queue = queues.iter().find(|queue| queue.name() == name)?;
    Some((Arc::clone(queue), queue.job_tag_matches(id, tag).then_some(id)))
}

/// A job's answer as the worker gave it, or where the job is (waiting for the answer up to
/// `Prefer: wait=N` seconds).
pub(crate) async fn job(
    (queue, id): (Arc<Queue>, Option<u64>),
    request: Request<ClientBody>,
) -> Response<GatewayBody> {
    let Some(id) = id else {
        let path = request.uri().path();
        let error = format!("no job {} (or its answer expired)", path.trim_start_matches("/jobs/"));
        return json_response(StatusCode::NOT_FOUND, &serde_json::json!({ "error": error }));
    };
    let wait = request
        .headers()
        .get_all("prefer")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .find_map(|preference| preference.trim().strip_prefix("wait=")?.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, |seconds| Duration::from_secs(seconds).min(LONGEST_WAIT));
    match queue.job(id, wait).await {
        Ok(answer) => {
            let mut response = Response::new(GatewayBody::full(answer.body));
            *response.status_mut() = answer.status;
            *response.headers_mut() = answer.headers;
            response.headers_mut().remove(http::header::CONTENT_LENGTH);
            response.headers_mut().remove(http::header::TRANSFER_ENCODING);
            response.headers_mut().insert("x-surge-job-state", HeaderValue::from_static("done"));
            response
        }
        Err(JobJson { state, .. }) if state == "unknown" => json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({ "error": format!("no job {} (or its answer expired)", queue.job_name(id)) }),
        ),
        Err(pending) => {
            let mut response =
                json_response(StatusCode::OK, &serde_json::to_value(&pending).unwrap_or_default());
            if pending.state != "dead" {
                response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            response
        }
    }
}
