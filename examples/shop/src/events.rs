//! The orders database's event log and what is written with it: an order's events
//! (append-only, numbered per order), the outbox of messages to publish, the ids of messages
//! already applied, and the read model the events project to. Everything that changes an
//! order goes through one transaction that appends its events, writes the messages they
//! announce to the outbox, and (for a delivered message) records the message's id: a crash
//! anywhere leaves all or nothing, and a redelivery finds its id and does nothing twice.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{PgConnection, PgPool};

use crate::app::ApiResult;
use crate::saga::{self, Event, State, Step};

/// The queue the checkout saga's steps travel on.
pub const CHECKOUT_QUEUE: &str = "shop-checkout";
/// The queue that tells the projection an order changed.
pub const CHANGES_QUEUE: &str = "shop-order-changes";

/// An order's events, in order.
pub async fn load(connection: &mut PgConnection, order_id: i64) -> ApiResult<Vec<Event>> {
    let rows: Vec<sqlx::types::Json<Event>> =
        sqlx::query_scalar("SELECT data FROM order_events WHERE order_id = $1 ORDER BY seq")
            .bind(order_id)
            .fetch_all(connection)
            .await?;
    Ok(rows.into_iter().map(|row| row.0).collect())
}

/// Appends `events` after the `state.events` the order has; announces the order's change to
/// the projection and, when there is one, the saga's next step. Fails (on the order's unique
/// sequence) if another transaction appended first.
pub async fn append(
    connection: &mut PgConnection,
    order_id: i64,
    state: &State,
    events: &[Event],
    next: Option<Step>,
) -> Result<(), sqlx::Error> {
    let mut after = state.clone();
    for (offset, event) in (1..).zip(events) {
        sqlx::query("INSERT INTO order_events (order_id, seq, kind, data) VALUES ($1, $2, $3, $4)")
            .bind(order_id)
            .bind(state.events + offset)
            .bind(event.kind())
            .bind(sqlx::types::Json(event))
            .execute(&mut *connection)
            .await?;
        after = saga::apply(after, event);
    }
    sqlx::query("UPDATE orders SET status = $2 WHERE id = $1")
        .bind(order_id)
        .bind(after.status().as_str())
        .execute(&mut *connection)
        .await?;
    if let Some(step) = next {
        enqueue(connection, CHECKOUT_QUEUE, json!({ "order_id": order_id, "step": step })).await?;
    }
    enqueue(connection, CHANGES_QUEUE, json!({ "order_id": order_id })).await
}

pub async fn enqueue(
    connection: &mut PgConnection,
    queue: &str,
    payload: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO outbox (queue, payload) VALUES ($1, $2)")
        .bind(queue)
        .bind(payload)
        .execute(connection)
        .await?;
    Ok(())
}

/// Records that message `id` is applied; `false`: it was already.
pub async fn first_time(connection: &mut PgConnection, id: &str) -> Result<bool, sqlx::Error> {
    let inserted =
        sqlx::query("INSERT INTO processed_messages (message_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(id)
            .execute(connection)
            .await?;
    Ok(inserted.rows_affected() == 1)
}

/// The read model's row for `order_id`, made again from its events: the same however often,
/// and in whatever order, changes are announced.
pub async fn project(connection: &mut PgConnection, order_id: i64) -> ApiResult<()> {
    let events = load(&mut *connection, order_id).await?;
    if events.is_empty() {
        return Ok(());
    }
    let state = saga::fold(&events);
    sqlx::query(
        "INSERT INTO order_summaries (order_id, user_id, status, amount_cents, events) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (order_id) DO UPDATE SET user_id = $2, status = $3, amount_cents = $4, events = $5, updated_at = now()",
    )
    .bind(order_id)
    .bind(state.user_id)
    .bind(state.status().as_str())
    .bind(state.amount_cents)
    .bind(state.events)
    .execute(connection)
    .await?;
    Ok(())
}

/// One order as the read model has it.
#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct Summary {
    pub order_id: i64,
    pub status: String,
    pub amount_cents: i64,
    /// How many events it was folded from.
    pub events: i32,
    pub updated_at: DateTime<Utc>,
}

/// A user's orders from the read model, newest first (on `idx_summary_user`).
pub async fn history(pool: &PgPool, user_id: i64, limit: i64) -> ApiResult<Vec<Summary>> {
    let query = "SELECT order_id, status, amount_cents, events, updated_at FROM order_summaries \
                 WHERE user_id = $1 ORDER BY order_id DESC LIMIT $2";
    Ok(sqlx::query_as(query).bind(user_id).bind(limit).fetch_all(pool).await?)
}

/// `shop rebuild-read-model`: the read model dropped and made again from every order's events.
pub async fn rebuild(pool: &PgPool) -> ApiResult<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query("TRUNCATE order_summaries").execute(&mut *tx).await?;
    let orders: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT order_id FROM order_events ORDER BY order_id")
        .fetch_all(&mut *tx)
        .await?;
    for order_id in &orders {
        project(&mut tx, *order_id).await?;
    }
    tx.commit().await?;
    Ok(orders.len() as u64)
}
