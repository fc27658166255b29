//! The payments service: charges and refunds against the card processor (the `provider`
//! service, reached through the gateway). A charge is written down as `unknown` before the
//! processor is asked, with the idempotency key the processor will see, so a charge can never
//! be made twice (the processor makes one per key) nor lost: a question that times out is
//! answered by asking the processor what became of that key before deciding anything.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

use crate::app::{body, idempotency_key, ApiError, ApiResult};
use crate::client::Gateway;
use crate::settings::Settings;

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Charge {
    pub id: i64,
    pub order_id: i64,
    pub amount_cents: i64,
    /// succeeded, declined, or unknown (the processor has not said yet)
    pub status: String,
    pub provider_charge_id: Option<String>,
    pub decline_reason: Option<String>,
    pub idempotency_key: String,
    pub created_at: DateTime<Utc>,
}

const CHARGE: &str = "SELECT id, order_id, amount_cents, status, provider_charge_id, decline_reason, \
                      idempotency_key, created_at FROM charges";

/// What the processor said of a charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded { provider_id: String },
    Declined { provider_id: String, reason: String },
}

/// The processor's answer to a charge or a question about one, as read from its JSON.
#[derive(Debug, Deserialize)]
struct ProviderCharge {
    id: String,
    status: String,
}

impl ProviderCharge {
    fn outcome(self) -> Outcome {
        match self.status.strip_prefix("declined: ") {
            Some(reason) => Outcome::Declined { provider_id: self.id, reason: reason.to_owned() },
            None => Outcome::Succeeded { provider_id: self.id },
        }
    }
}

#[derive(Clone)]
pub struct ChargeRepo {
    pool: PgPool,
}

impl ChargeRepo {
    pub fn new(pool: PgPool) -> Self {
        ChargeRepo { pool }
    }

    pub async fn get(&self, id: i64) -> ApiResult<Option<Charge>> {
        Ok(sqlx::query_as(&format!("{CHARGE} WHERE id = $1")).bind(id).fetch_optional(&self.pool).await?)
    }

    /// The charge under `key`, written down as unknown if it is new.
    pub async fn intend(&self, order_id: i64, amount_cents: i64, key: &str) -> ApiResult<Charge> {
        sqlx::query(
            "INSERT INTO charges (order_id, amount_cents, status, idempotency_key) VALUES ($1, $2, 'unknown', $3) \
             ON CONFLICT (idempotency_key) DO NOTHING",
        )
        .bind(order_id)
        .bind(amount_cents)
        .bind(key)
        .execute(&self.pool)
        .await?;
        let charge: Charge = sqlx::query_as(&format!("{CHARGE} WHERE idempotency_key = $1"))
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        if (charge.order_id, charge.amount_cents) != (order_id, amount_cents) {
            return Err(ApiError::Conflict(format!("the key {key} was used for another charge")));
        }
        Ok(charge)
    }

    pub async fn settle(&self, id: i64, outcome: &Outcome) -> ApiResult<Charge> {
        let (status, provider_id, reason) = match outcome {
            Outcome::Succeeded { provider_id } => ("succeeded", provider_id, None),
            Outcome::Declined { provider_id, reason } => ("declined", provider_id, Some(reason)),
        };
        let query = "UPDATE charges SET status = $2, provider_charge_id = $3, decline_reason = $4 WHERE id = $1 \
                     RETURNING id, order_id, amount_cents, status, provider_charge_id, decline_reason, idempotency_key, created_at";
        Ok(sqlx::query_as(query)
            .bind(id)
            .bind(status)
            .bind(provider_id)
            .bind(reason)
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn refund(&self, charge_id: i64, provider_refund_id: &str) -> ApiResult<()> {
        sqlx::query("INSERT INTO refunds (charge_id, provider_refund_id) VALUES ($1, $2) ON CONFLICT (charge_id) DO NOTHING")
            .bind(charge_id)
            .bind(provider_refund_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

pub struct Payments {
    repo: ChargeRepo,
    processor: Gateway,
}

impl Payments {
    pub fn new(pool: PgPool, settings: &Settings) -> Arc<Payments> {
        Arc::new(Payments {
            repo: ChargeRepo::new(pool),
            processor: Gateway::internal(&settings.gateway, settings.call_timeout),
        })
    }

    /// Asks the processor for the charge; when the question gets no answer, asks what became
    /// of the key, and only if nothing was made asks again (with the same key: never twice).
    async fn charge_at_processor(&self, charge: &Charge, card: &str) -> ApiResult<Outcome> {
        let key = charge.idempotency_key.as_str();
        let request = json!({ "amount_cents": charge.amount_cents, "card": card });
        for _ in 0..3 {
            match self
                .processor
                .call(Method::POST, "/v1/charges", &[("idempotency-key", key)], Some(request.clone()))
                .await
            {
                Ok(answer)
                    if answer.status == StatusCode::CREATED
                        || answer.status == StatusCode::PAYMENT_REQUIRED =>
                {
                    return Ok(answer.json::<ProviderCharge>()?.outcome());
                }
                Ok(answer) if answer.status.is_client_error() => {
                    return Err(ApiError::Upstream(format!(
                        "the processor refused the charge ({}): {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    )))
                }
                Ok(_) | Err(ApiError::Unavailable(_)) => {}
                Err(other) => return Err(other),
            }
            if let Some(outcome) = self.find_at_processor(key).await? {
                return Ok(outcome);
            }
        }
        Err(ApiError::Unavailable(format!(
            "the processor did not settle charge {}; ask again later",
            charge.id
        )))
    }

    /// What the processor made under `key`: `None` when it made nothing.
    async fn find_at_processor(&self, key: &str) -> ApiResult<Option<Outcome>> {
        let path = format!("/v1/charges?idempotency_key={}", percent(key));
        let answer = self.processor.call(Method::GET, &path, &[], None).await?;
        match answer.status {
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::CREATED | StatusCode::PAYMENT_REQUIRED => {
                Ok(Some(answer.json::<ProviderCharge>()?.outcome()))
            }
            status => {
                Err(ApiError::Unavailable(format!("the processor answered {status} about charge {key}")))
            }
        }
    }
}

/// Percent-encodes a query value (keys are short and mostly alphanumeric).
fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn router(payments: Arc<Payments>) -> Router {
    Router::new()
        .route("/payments/charges", post(charge))
        .route("/payments/charges/{id}", get(find))
        .route("/payments/charges/{id}/refund", post(refund))
        .with_state(payments)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeRequest {
    order_id: i64,
    amount_cents: i64,
    card: String,
}

async fn charge(
    State(payments): State<Arc<Payments>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    let request: ChargeRequest = body(&bytes)?;
    if request.amount_cents <= 0 {
        return Err(ApiError::invalid("amount_cents", "a charge is for more than nothing"));
    }
    // One charge per order unless the caller says otherwise.
    let key = idempotency_key(&headers)?.unwrap_or_else(|| format!("order-{}", request.order_id));
    let mut charge = payments.repo.intend(request.order_id, request.amount_cents, &key).await?;
    if charge.status == "unknown" {
        let outcome = payments.charge_at_processor(&charge, &request.card).await?;
        charge = payments.repo.settle(charge.id, &outcome).await?;
    }
    let status =
        if charge.status == "succeeded" { StatusCode::CREATED } else { StatusCode::PAYMENT_REQUIRED };
    Ok((status, Json(charge)).into_response())
}

async fn find(State(payments): State<Arc<Payments>>, Path(id): Path<i64>) -> ApiResult<Response> {
    match payments.repo.get(id).await? {
        Some(charge) => Ok(Json(charge).into_response()),
        None => Err(ApiError::NotFound(format!("no charge {id}"))),
    }
}

#[derive(Debug, Deserialize)]
struct ProviderRefund {
    id: String,
}

async fn refund(State(payments): State<Arc<Payments>>, Path(id): Path<i64>) -> ApiResult<Response> {
    let Some(charge) = payments.repo.get(id).await? else {
        return Err(ApiError::NotFound(format!("no charge {id}")));
    };
    let Some(provider_id) = charge.provider_charge_id.filter(|_| charge.status == "succeeded") else {
        return Err(ApiError::Conflict(format!("charge {id} did not succeed: there is nothing to refund")));
    };
    let answer = payments
        .processor
        .call(Method::POST, "/v1/refunds", &[], Some(json!({ "charge_id": provider_id })))
        .await?;
    if answer.status != StatusCode::CREATED {
        return Err(ApiError::Unavailable(format!("the processor answered the refund {}", answer.status)));
    }
    let refund: ProviderRefund = answer.json()?;
    payments.repo.refund(id, &refund.id).await?;
    Ok((StatusCode::CREATED, Json(json!({ "charge_id": id, "refund_id": refund.id }))).into_response())
}
