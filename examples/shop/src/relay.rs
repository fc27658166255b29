//! The outbox relay (`shop serve relay`): it publishes the orders database's outbox to Surge's
//! queues and marks each row sent. Rows are taken `FOR UPDATE SKIP LOCKED`, so several relays
//! share the work without publishing a row twice at once; each goes out with `outbox-ID` as its
//! idempotency key, so a row published again after a crash (published, not yet marked) makes no
//! second message within the queue's idempotency window, and the consumers absorb one that does.
//!
//! It publishes through the admin API (with the token `shop setup` wrote), in one batch per
//! queue, and answers `GET /relay/status` (internal) with the rows not yet sent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyper::{Method, StatusCode};
use serde_json::json;
use sqlx::PgPool;

use crate::app::{ApiError, ApiResult};
use crate::client::Gateway;
use crate::settings::Settings;

/// Rows taken at once.
const BATCH: i64 = 200;

pub struct Relay {
    pool: PgPool,
    admin: Gateway,
    token: String,
}

impl Relay {
    pub fn new(pool: PgPool, settings: &Settings) -> Result<Arc<Relay>, String> {
        let url = settings.admin_url.as_deref().ok_or("the relay needs SHOP_ADMIN_URL: Surge's admin API")?;
        let file = settings
            .admin_token_file
            .as_ref()
            .ok_or("the relay needs SHOP_ADMIN_TOKEN_FILE: the admin token `shop setup` wrote")?;
        let token = std::fs::read_to_string(file)
            .map_err(|err| format!("cannot read {} (SHOP_ADMIN_TOKEN_FILE): {err}", file.display()))?;
        Ok(Arc::new(Relay {
            pool,
            admin: Gateway::new(url, settings.call_timeout),
            token: token.trim().to_owned(),
        }))
    }

    /// Publishes until the process ends; a failure is retried a second later.
    pub async fn run(self: Arc<Self>) {
        loop {
            match self.relay_once().await {
                Ok(0) => tokio::time::sleep(Duration::from_millis(100)).await,
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!("outbox not relayed: {err}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// One batch: published, then marked sent, in one transaction that holds the rows.
    async fn relay_once(&self) -> ApiResult<usize> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, String, serde_json::Value)> = sqlx::query_as(
            "SELECT id, queue, payload FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut by_queue: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
        for (id, queue, payload) in &rows {
            by_queue.entry(queue).or_default().push(json!({
                "body": payload.to_string(),
                "content_type": "application/json",
                "idempotency_key": format!("outbox-{id}"),
            }));
        }
        let bearer = format!("Bearer {}", self.token);
        for (queue, messages) in by_queue {
            let path = format!("/queues/{queue}/messages:batch");
            let answer = self
                .admin
                .call(
                    Method::POST,
                    &path,
                    &[("authorization", &bearer)],
                    Some(serde_json::Value::Array(messages)),
                )
                .await?;
            if answer.status != StatusCode::ACCEPTED {
                let why = String::from_utf8_lossy(&answer.body).into_owned();
                return Err(ApiError::Unavailable(format!(
                    "publishing to {queue} was answered {}: {why}",
                    answer.status
                )));
            }
        }
        let ids: Vec<i64> = rows.iter().map(|(id, _, _)| *id).collect();
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows.len())
    }
}

pub fn router(relay: Arc<Relay>) -> Router {
    tokio::spawn(Arc::clone(&relay).run());
    Router::new().route("/relay/status", get(status)).with_state(relay)
}

async fn status(State(relay): State<Arc<Relay>>) -> ApiResult<Response> {
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(&relay.pool)
        .await?;
    Ok(Json(json!({ "unsent": unsent })).into_response())
}
