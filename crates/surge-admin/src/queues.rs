//! The queue endpoints: depth and counters, publishing, and the dead letters.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use surge_queue::http::{
    self as wire, DeadLetterJson, DeadLettersResponse, DeadRequest, DeadResponse, QueuesResponse,
};

use crate::{error, AdminState};

/// Dead letters listed at most.
const DEAD_LISTED: usize = 100;
/// Payloads shown in the list up to this size.
const BODY_SHOWN: u32 = 4096;

pub(crate) async fn list(State(state): State<AdminState>) -> Json<QueuesResponse> {
    Json(QueuesResponse { queues: state.queues.status() })
}

fn answer((status, body): wire::Answer) -> Response {
    (status, Json(body)).into_response()
}

pub(crate) async fn publish(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match state.queues.get(&name) {
        Some(queue) => answer(wire::publish_one(queue, &headers, body).await),
        None => answer(wire::unknown_queue(&name)),
    }
}

pub(crate) async fn publish_batch(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match state.queues.get(&name) {
        Some(queue) => answer(wire::publish_batch(queue, &headers, &body).await),
        None => answer(wire::unknown_queue(&name)),
    }
}

pub(crate) async fn dead(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    let Some(queue) = state.queues.get(&name) else { return answer(wire::unknown_queue(&name)) };
    let letters = match queue.dead_letters(DEAD_LISTED, BODY_SHOWN as usize).await {
        Ok(letters) => letters,
        Err(err) => return answer(wire::refused(&err)),
    };
    let dead = letters
        .into_iter()
        .map(|(letter, payload)| {
            let body = payload.and_then(|payload| String::from_utf8(payload.to_vec()).ok());
            let enqueued = std::time::UNIX_EPOCH + std::time::Duration::from_millis(letter.enqueued_at);
            DeadLetterJson {
                id: wire::id_text(letter.id),
                attempts: letter.attempts,
                enqueued_at: humantime::format_rfc3339_millis(enqueued).to_string(),
                error: letter.error.as_deref().map(str::to_owned),
                content_type: letter.content_type.as_deref().map(str::to_owned),
                body,
            }
        })
        .collect();
    Json(DeadLettersResponse { queue: name, dead }).into_response()
}

/// The ids a redrive or purge names; `None`: all of them.
fn ids(body: &[u8]) -> Result<Option<Vec<u64>>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let request: DeadRequest = serde_json::from_slice(body)
        .map_err(|err| format!(r#"expected {{"ids": ["..."]}} or an empty body for all: {err}"#))?;
    let Some(ids) = request.ids else { return Ok(None) };
    ids.iter()
        .map(|id| wire::parse_id(id).ok_or_else(|| format!("`{id}` is not a message id")))
        .collect::<Result<_, _>>()
        .map(Some)
}

#[derive(Clone, Copy)]
enum Settle {
    Redrive,
    Purge,
}

async fn settle(state: AdminState, name: String, body: Bytes, settle: Settle) -> Response {
    let Some(queue) = state.queues.get(&name) else { return answer(wire::unknown_queue(&name)) };
    let ids = match ids(&body) {
        Ok(ids) => ids,
        Err(problem) => return error(StatusCode::BAD_REQUEST, problem),
    };
    let settled = match settle {
        Settle::Redrive => queue.redrive(ids.as_deref()).await,
        Settle::Purge => queue.purge(ids.as_deref()).await,
    };
    let count = match settled {
        Ok(count) => Some(count),
        Err(err) => return answer(wire::refused(&err)),
    };
    let answer = match settle {
        Settle::Redrive => DeadResponse { redriven: count, purged: None, queue: name },
        Settle::Purge => DeadResponse { redriven: None, purged: count, queue: name },
    };
    Json(answer).into_response()
}

pub(crate) async fn redrive(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    settle(state, name, body, Settle::Redrive).await
}

pub(crate) async fn purge(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    settle(state, name, body, Settle::Purge).await
}

/// What a worker does with a lease it holds.
#[derive(Clone, Copy)]
enum LeaseAction {
    Renew,
    Ack,
    Fail,
}

/// A lease a worker settles itself, proving it holds it with the token it was given.
async fn on_lease(
    state: AdminState,
    name: String,
    id: String,
    headers: HeaderMap,
    body: Bytes,
    action: LeaseAction,
) -> Response {
    let Some(queue) = state.queues.get(&name) else { return answer(wire::unknown_queue(&name)) };
    let Some(id) = wire::parse_id(&id) else {
        return error(StatusCode::BAD_REQUEST, format!("`{id}` is not a message id"));
    };
    let token = headers
        .get("x-surge-lease-token")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| u64::from_str_radix(t.trim(), 16).ok());
    let Some(token) = token else {
        return error(StatusCode::BAD_REQUEST, "x-surge-lease-token is missing or not a token".into());
    };
    let settled = match action {
        LeaseAction::Renew => queue
            .renew(id, token)
            .map(|until| serde_json::json!({ "until": humantime::format_rfc3339_millis(until).to_string() })),
        LeaseAction::Ack => {
            queue.ack(id, token).await.map(|()| serde_json::json!({ "acked": wire::id_text(id) }))
        }
        LeaseAction::Fail => {
            let reason = String::from_utf8_lossy(&body[..body.len().min(1024)]).trim().to_owned();
            let reason = if reason.is_empty() { "the worker reported a failure".to_owned() } else { reason };
            queue.fail(id, token, &reason).await.map(|failed| {
                let outcome = match failed {
                    surge_queue::Failed::RetryAt(_) => "retried",
                    surge_queue::Failed::Dead => "dead",
                    surge_queue::Failed::Dropped => "dropped",
                };
                serde_json::json!({ "outcome": outcome })
            })
        }
    };
    match settled {
        Ok(json) => Json(json).into_response(),
        Err(_) => error(
            StatusCode::CONFLICT,
            format!(
                "the lease on message {} is not held: it ran out, was settled, or the token is not its own",
                wire::id_text(id)
            ),
        ),
    }
}

/// `POST /queues/NAME/leases/ID`: the lease goes on for the queue's lease time from now.
pub(crate) async fn renew(
    State(state): State<AdminState>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    on_lease(state, name, id, headers, Bytes::new(), LeaseAction::Renew).await
}

/// `POST /queues/NAME/leases/ID/ack`: done.
pub(crate) async fn ack(
    State(state): State<AdminState>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    on_lease(state, name, id, headers, Bytes::new(), LeaseAction::Ack).await
}

/// `POST /queues/NAME/leases/ID/fail`, the body the error: retried after the backoff, or dead.
pub(crate) async fn fail(
    State(state): State<AdminState>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    on_lease(state, name, id, headers, body, LeaseAction::Fail).await
}
