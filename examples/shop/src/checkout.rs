//! The checkout saga's worker and the read model's projection, both Surge workers of the
//! orders service (push delivery: Surge POSTs each message to `/jobs/checkout` or
//! `/jobs/project` and retries what is not answered 2xx).
//!
//! A checkout message names an order and a step. The worker folds the order's events, and if
//! the order still waits for that step, runs it against the service that owns it (through the
//! gateway, with keys that make every call safe to repeat: a reservation and a charge per
//! order, one notification per order and kind), then stores what [`saga::decide`] makes of the
//! outcome: the events, the next step in the outbox, the message's id, in one transaction. A
//! step that fails (a service away, the processor undecided) is answered 503 and Surge
//! delivers it again later; a redelivered step the order no longer waits for changes nothing.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper::Method;
use serde::Deserialize;
use serde_json::json;

use crate::app::{body, ApiError, ApiResult};
use crate::events;
use crate::orders::Orders;
use crate::saga::{self, Outcome, Step};

#[derive(Debug, Deserialize)]
pub struct CheckoutJob {
    pub order_id: i64,
    pub step: Step,
}

#[derive(Debug, Deserialize)]
pub struct ProjectJob {
    pub order_id: i64,
}

/// The delivery's message id: what makes applying it once checkable.
/// A redelivery is logged on the way (the chaos test counts them).
pub(crate) fn message_id(headers: &HeaderMap) -> ApiResult<String> {
    let message = headers
        .get("x-surge-message-id")
        .and_then(|value| value.to_str().ok())
        .map(|id| {
            format!("{}:{id}", headers.get("x-surge-queue").and_then(|q| q.to_str().ok()).unwrap_or(""))
        })
        .ok_or_else(|| ApiError::BadRequest("a job is delivered by Surge, with x-surge-message-id".into()))?;
    log_redelivery(headers, &message);
    Ok(message)
}

fn log_redelivery(headers: &HeaderMap, message: &str) {
    let attempt =
        headers.get("x-surge-attempt").and_then(|v| v.to_str().ok()).and_then(|a| a.parse::<u32>().ok());
    if let Some(attempt) = attempt.filter(|attempt| *attempt > 1) {
        tracing::info!("redelivery: attempt {attempt} of message {message}");
    }
}

fn done(what: &str) -> Response {
    (StatusCode::OK, Json(json!({ "done": what }))).into_response()
}

pub async fn checkout(
    State(orders): State<Arc<Orders>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    let message = message_id(&headers)?;
    let job: CheckoutJob = body(&bytes)?;
    let pool = orders.pool();
    let state = saga::fold(&events::load(&mut *pool.acquire().await?, job.order_id).await?);
    if saga::pending(&state) != Some(job.step) {
        tracing::info!("duplicate absorbed: order {} no longer waits for {:?}", job.order_id, job.step);
        return Ok(done("nothing: the order does not wait for this step"));
    }
    let outcome = orders.run(job.step, job.order_id, &state).await?;
    let decision = saga::decide(&state, &outcome);
    let mut tx = pool.begin().await?;
    if !events::first_time(&mut tx, &message).await? {
        tracing::info!("duplicate absorbed: message {message} was applied");
        return Ok(done("nothing: this message was applied"));
    }
    match events::append(&mut tx, job.order_id, &state, &decision.events, decision.next).await {
        Ok(()) => tx.commit().await?,
        // Another delivery of this step decided first: its events stand.
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
            return Ok(done("nothing: decided already"))
        }
        Err(err) => return Err(err.into()),
    }
    Ok(done("step applied"))
}

pub async fn project(
    State(orders): State<Arc<Orders>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    let message = message_id(&headers)?;
    let job: ProjectJob = body(&bytes)?;
    let mut tx = orders.pool().begin().await?;
    if events::first_time(&mut tx, &message).await? {
        events::project(&mut tx, job.order_id).await?;
        tx.commit().await?;
    }
    Ok(done("projected"))
}

impl Orders {
    /// Runs one step against the service that owns it; an error is for Surge to retry.
    pub async fn run(&self, step: Step, order_id: i64, state: &saga::State) -> ApiResult<Outcome> {
        let internal = self.internal();
        match step {
            Step::Reserve => {
                let items = self.items(order_id).await?;
                let answer = internal.call(
                    Method::POST,
                    "/stock/reservations",
                    &[],
                    Some(json!({ "order_id": order_id, "items": items })),
                );
                let answer = answer.await?;
                match answer.status {
                    StatusCode::CREATED | StatusCode::OK => Ok(Outcome::Reserved),
                    StatusCode::CONFLICT => {
                        let short: serde_json::Value = answer.json()?;
                        Ok(Outcome::ShortStock { product_id: short["product_id"].as_i64().unwrap_or(0) })
                    }
                    status => {
                        Err(ApiError::Unavailable(format!("the catalog answered the reservation {status}")))
                    }
                }
            }
            Step::Charge => {
                let charge =
                    json!({ "order_id": order_id, "amount_cents": state.amount_cents, "card": state.card });
                let answer = internal.call(Method::POST, "/payments/charges", &[], Some(charge)).await?;
                let charge: serde_json::Value = match answer.status {
                    StatusCode::CREATED | StatusCode::PAYMENT_REQUIRED => answer.json()?,
                    status => {
                        return Err(ApiError::Unavailable(format!("payments answered the charge {status}")))
                    }
                };
                match charge["status"].as_str() {
                    Some("succeeded") => {
                        Ok(Outcome::Charged { charge_id: charge["id"].as_i64().unwrap_or(0) })
                    }
                    Some("declined") => {
                        let reason = charge["decline_reason"].as_str().unwrap_or("declined").to_owned();
                        Ok(Outcome::Declined { reason })
                    }
                    _ => Err(ApiError::Unavailable(format!(
                        "the charge of order {order_id} is not decided yet"
                    ))),
                }
            }
            Step::Release => {
                let answer = internal
                    .call(Method::DELETE, &format!("/stock/reservations/{order_id}"), &[], None)
                    .await?;
                match answer.status {
                    // Nothing held is nothing to give back.
                    StatusCode::OK | StatusCode::NOT_FOUND => Ok(Outcome::Released),
                    status => {
                        Err(ApiError::Unavailable(format!("the catalog answered the release {status}")))
                    }
                }
            }
            Step::Notify => {
                let amount = format!("{}.{:02}", state.amount_cents / 100, state.amount_cents % 100);
                let notification = json!({
                    "order_id": order_id,
                    "user_id": state.user_id,
                    "kind": "order_paid",
                    "message": format!("Your order {order_id} is paid: {amount}"),
                });
                let answer = internal.call(Method::POST, "/notifications", &[], Some(notification)).await?;
                match answer.status {
                    StatusCode::CREATED | StatusCode::OK => Ok(Outcome::Notified),
                    status => Err(ApiError::Unavailable(format!("notifications answered {status}"))),
                }
            }
        }
    }
}
