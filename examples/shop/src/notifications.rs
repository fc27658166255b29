//! The notifications service: it records and "sends" what an order's customer is told. How a
//! notification leaves is a [`Sender`]; the default writes it to the service's own table and
//! its log (a mail or SMS sender would be another). One notification of a kind per order,
//! however often it is asked for, so a redelivered event notifies once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

use crate::app::{body, ApiError, ApiResult};

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Notification {
    pub order_id: i64,
    pub user_id: i64,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Sent {
    pub id: i64,
    pub order_id: i64,
    pub user_id: i64,
    pub kind: String,
    pub message: String,
    pub created_at: DateTime<Utc>,
}

/// How a notification leaves; `Ok(false)`: it had been sent already.
pub trait Sender: Send + Sync {
    fn send<'a>(
        &'a self,
        notification: &'a Notification,
    ) -> Pin<Box<dyn Future<Output = ApiResult<bool>> + Send + 'a>>;
}

/// Writes each notification to the service's table (once per order and kind) and to the log.
pub struct TableSender {
    pool: PgPool,
}

impl TableSender {
    pub fn new(pool: PgPool) -> Self {
        TableSender { pool }
    }
}

impl Sender for TableSender {
    fn send<'a>(&'a self, n: &'a Notification) -> Pin<Box<dyn Future<Output = ApiResult<bool>> + Send + 'a>> {
        Box::pin(async move {
            let written = sqlx::query(
                "INSERT INTO notifications (order_id, user_id, kind, message) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (order_id, kind) DO NOTHING",
            )
            .bind(n.order_id)
            .bind(n.user_id)
            .bind(&n.kind)
            .bind(&n.message)
            .execute(&self.pool)
            .await?;
            let new = written.rows_affected() == 1;
            if new {
                tracing::info!(
                    "notify user {} of order {} ({}): {}",
                    n.user_id,
                    n.order_id,
                    n.kind,
                    n.message
                );
            }
            Ok(new)
        })
    }
}

pub struct Notifications {
    pool: PgPool,
    sender: Arc<dyn Sender>,
}

impl Notifications {
    pub fn new(pool: PgPool, sender: Arc<dyn Sender>) -> Arc<Notifications> {
        Arc::new(Notifications { pool, sender })
    }
}

pub fn router(notifications: Arc<Notifications>) -> Router {
    Router::new().route("/notifications", post(notify).get(of_order)).with_state(notifications)
}

async fn notify(State(notifications): State<Arc<Notifications>>, bytes: Bytes) -> ApiResult<Response> {
    let notification: Notification = body(&bytes)?;
    if notification.kind.trim().is_empty() || notification.kind.len() > 64 {
        return Err(ApiError::invalid("kind", "a kind such as \"order_paid\", at most 64 characters"));
    }
    let new = notifications.sender.send(&notification).await?;
    let status = if new { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(json!({ "order_id": notification.order_id, "kind": notification.kind, "sent": new })))
        .into_response())
}

#[derive(Debug, Deserialize)]
struct Lookup {
    order_id: i64,
}

async fn of_order(
    State(notifications): State<Arc<Notifications>>,
    Query(lookup): Query<Lookup>,
) -> ApiResult<Response> {
    let sent: Vec<Sent> = sqlx::query_as(
        "SELECT id, order_id, user_id, kind, message, created_at FROM notifications WHERE order_id = $1 ORDER BY id",
    )
    .bind(lookup.order_id)
    .fetch_all(&notifications.pool)
    .await?;
    Ok(Json(json!({ "order_id": lookup.order_id, "notifications": sent })).into_response())
}
