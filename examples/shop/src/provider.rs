//! A stand-in for a card processor, with the behaviours a real one has and tests need: it
//! keeps its own books (a charge, once made, is there after a restart), makes one charge per
//! `Idempotency-Key` however often it is asked, declines some cards, and can be slow or take
//! a charge and then never answer (the case that loses money in real systems).
//!
//! Knobs, from the environment: `SHOP_PROVIDER_LATENCY` ("20ms") before each answer;
//! `SHOP_PROVIDER_DECLINE_RATE` (0 to 1) declines that share of good cards at random;
//! `SHOP_PROVIDER_TIMEOUT_RATE` (0 to 1) makes that share of charges and then hangs for a
//! minute instead of answering. The card `4000000000000002` is always declined
//! (`card_declined`), `4000000000009995` too (`insufficient_funds`); any other 16 digits pass.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

use crate::app::{body, idempotency_key, ApiError, ApiResult};

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Charge {
    pub id: String,
    pub idempotency_key: String,
    pub amount_cents: i64,
    pub card_last4: String,
    /// succeeded, or declined: REASON
    pub status: String,
    pub refunded: bool,
}

/// How the stand-in misbehaves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Knobs {
    pub latency: Duration,
    pub decline_rate: f64,
    pub timeout_rate: f64,
}

impl Knobs {
    fn from_env() -> Knobs {
        let rate = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map_or(0.0, |r| r.clamp(0.0, 1.0))
        };
        let latency = std::env::var("SHOP_PROVIDER_LATENCY")
            .ok()
            .and_then(|v| humantime::parse_duration(v.trim()).ok())
            .unwrap_or_default();
        Knobs {
            latency,
            decline_rate: rate("SHOP_PROVIDER_DECLINE_RATE"),
            timeout_rate: rate("SHOP_PROVIDER_TIMEOUT_RATE"),
        }
    }
}

pub struct Provider {
    pool: PgPool,
    knobs: Knobs,
}

impl Provider {
    pub fn new(pool: PgPool) -> Arc<Provider> {
        Arc::new(Provider { pool, knobs: Knobs::from_env() })
    }
}

pub fn router(provider: Arc<Provider>) -> Router {
    Router::new()
        .route("/v1/charges", post(charge).get(find))
        .route("/v1/refunds", post(refund))
        .with_state(provider)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeRequest {
    amount_cents: i64,
    card: String,
}

/// How a card fares: `None` passes.
fn decline(card: &str, decline_rate: f64) -> Option<&'static str> {
    match card {
        "4000000000000002" => Some("card_declined"),
        "4000000000009995" => Some("insufficient_funds"),
        _ if fastrand::f64() < decline_rate => Some("card_declined"),
        _ => None,
    }
}

fn answer(charge: &Charge) -> Response {
    let status =
        if charge.status == "succeeded" { StatusCode::CREATED } else { StatusCode::PAYMENT_REQUIRED };
    (status, Json(charge)).into_response()
}

async fn charge(
    State(provider): State<Arc<Provider>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    tokio::time::sleep(provider.knobs.latency).await;
    let key = idempotency_key(&headers)?
        .ok_or_else(|| ApiError::BadRequest("every charge needs an Idempotency-Key".into()))?;
    let request: ChargeRequest = body(&bytes)?;
    if request.amount_cents <= 0 {
        return Err(ApiError::invalid("amount_cents", "a charge is for more than nothing"));
    }
    if request.card.len() != 16 || !request.card.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid("card", "a card number is 16 digits"));
    }
    let status = match decline(&request.card, provider.knobs.decline_rate) {
        Some(reason) => format!("declined: {reason}"),
        None => "succeeded".to_owned(),
    };
    let id = format!("ch_{:016x}", fastrand::u64(..));
    // One charge per key: a repeat finds the first and answers as it did.
    sqlx::query(
        "INSERT INTO charges (id, idempotency_key, amount_cents, card_last4, status) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(&id)
    .bind(&key)
    .bind(request.amount_cents)
    .bind(&request.card[12..])
    .bind(&status)
    .execute(&provider.pool)
    .await?;
    let charge: Charge = sqlx::query_as("SELECT * FROM charges WHERE idempotency_key = $1")
        .bind(&key)
        .fetch_one(&provider.pool)
        .await?;
    if charge.amount_cents != request.amount_cents {
        return Err(ApiError::Conflict(format!(
            "the key {key} was used for a charge of {} cents",
            charge.amount_cents
        )));
    }
    if fastrand::f64() < provider.knobs.timeout_rate {
        // The charge is made; the answer never comes.
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    Ok(answer(&charge))
}

#[derive(Debug, Deserialize)]
struct Lookup {
    idempotency_key: String,
}

/// What became of a charge asked for with this key: how a client that got no answer finds out.
async fn find(State(provider): State<Arc<Provider>>, Query(lookup): Query<Lookup>) -> ApiResult<Response> {
    let charge: Option<Charge> = sqlx::query_as("SELECT * FROM charges WHERE idempotency_key = $1")
        .bind(&lookup.idempotency_key)
        .fetch_optional(&provider.pool)
        .await?;
    match charge {
        Some(charge) => Ok(answer(&charge)),
        None => {
            Err(ApiError::NotFound(format!("no charge was made with the key {}", lookup.idempotency_key)))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundRequest {
    charge_id: String,
}

/// Refunds a charge in full, once; asking again answers the same.
async fn refund(State(provider): State<Arc<Provider>>, bytes: Bytes) -> ApiResult<Response> {
    tokio::time::sleep(provider.knobs.latency).await;
    let request: RefundRequest = body(&bytes)?;
    let charge: Option<Charge> = sqlx::query_as(
        "UPDATE charges SET refunded = true WHERE id = $1 AND status = 'succeeded' RETURNING *",
    )
    .bind(&request.charge_id)
    .fetch_optional(&provider.pool)
    .await?;
    match charge {
        Some(charge) => {
            let refund = json!({ "id": format!("re_{}", &charge.id[3..]), "charge_id": charge.id, "amount_cents": charge.amount_cents });
            Ok((StatusCode::CREATED, Json(refund)).into_response())
        }
        None => Err(ApiError::NotFound(format!("no succeeded charge {}", request.charge_id))),
    }
}
