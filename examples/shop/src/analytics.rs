//! Sales by category, counted the way a batch engine would (`groupBy("category").count()`),
//! over Surge's worker pools: the job splits the orders table into ranges of ids, puts one
//! message per range in a queue (through the outbox), a pool of workers counts the paid order
//! lines of each range by category, and reading the job merges the partial counts. A range
//! counted twice (a redelivery) adds nothing: its counts are keyed by job, range and category.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use crate::app::{body, ApiError, ApiResult};
use crate::events;
use crate::orders::Orders;

/// The queue the ranges travel on.
pub const ANALYTICS_QUEUE: &str = "shop-analytics";

#[derive(Debug, Deserialize)]
pub struct Split {
    partitions: Option<i32>,
}

/// `POST /reports/sales-by-category?partitions=N`: 202 with the job's id.
pub async fn start(State(orders): State<Arc<Orders>>, Query(split): Query<Split>) -> ApiResult<Response> {
    let partitions = split.partitions.unwrap_or(16);
    if !(1..=1024).contains(&partitions) {
        return Err(ApiError::invalid("partitions", "from 1 to 1024 ranges"));
    }
    let mut tx = orders.pool().begin().await?;
    let (low, high): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT min(id), max(id) FROM orders").fetch_one(&mut *tx).await?;
    let (low, high) = (low.unwrap_or(1), high.unwrap_or(0));
    let job: i64 = sqlx::query_scalar("INSERT INTO analytics_jobs (partitions) VALUES ($1) RETURNING id")
        .bind(partitions)
        .fetch_one(&mut *tx)
        .await?;
    let width = ((high - low + 1).max(0) + i64::from(partitions) - 1) / i64::from(partitions);
    for part in 0..partitions {
        let from = low + i64::from(part) * width;
        let payload = json!({ "job_id": job, "part": part, "from_id": from, "to_id": from + width - 1 });
        events::enqueue(&mut tx, ANALYTICS_QUEUE, payload).await?;
    }
    tx.commit().await?;
    let location = format!("/reports/sales-by-category/{job}");
    Ok((
        StatusCode::ACCEPTED,
        [("location", location)],
        Json(json!({ "job_id": job, "partitions": partitions })),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct Range {
    job_id: i64,
    part: i32,
    from_id: i64,
    to_id: i64,
}

/// The worker's path: one range counted, its counts and its done mark in one transaction.
pub async fn count(
    State(orders): State<Arc<Orders>>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult<Response> {
    let message = crate::checkout::message_id(&headers)?;
    let range: Range = body(&bytes)?;
    let mut tx = orders.pool().begin().await?;
    if !events::first_time(&mut tx, &message).await? {
        return Ok(Json(json!({ "counted": range.part, "again": true })).into_response());
    }
    sqlx::query(
        "INSERT INTO analytics_partials (job_id, part, category, sales) \
         SELECT $1, $2, i.category, count(*) FROM order_items i JOIN orders o ON o.id = i.order_id \
         WHERE o.status = 'paid' AND o.id BETWEEN $3 AND $4 GROUP BY i.category \
         ON CONFLICT (job_id, part, category) DO NOTHING",
    )
    .bind(range.job_id)
    .bind(range.part)
    .bind(range.from_id)
    .bind(range.to_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO analytics_done (job_id, part) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(range.job_id)
        .bind(range.part)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Json(json!({ "counted": range.part })).into_response())
}

/// `GET /reports/sales-by-category/ID`: 202 while ranges are left, else the merged counts and
/// how long the job took (from its start to its last range counted).
pub async fn result(State(orders): State<Arc<Orders>>, Path(job): Path<i64>) -> ApiResult<Response> {
    let pool = orders.pool();
    let partitions: Option<i32> = sqlx::query_scalar("SELECT partitions FROM analytics_jobs WHERE id = $1")
        .bind(job)
        .fetch_optional(pool)
        .await?;
    let Some(partitions) = partitions else { return Err(ApiError::NotFound(format!("no job {job}"))) };
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM analytics_done WHERE job_id = $1")
        .bind(job)
        .fetch_one(pool)
        .await?;
    if done < i64::from(partitions) {
        let progress = json!({ "job_id": job, "partitions": partitions, "counted": done });
        return Ok((StatusCode::ACCEPTED, Json(progress)).into_response());
    }
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT category, sum(sales)::BIGINT FROM analytics_partials WHERE job_id = $1 GROUP BY category ORDER BY category",
    )
    .bind(job)
    .fetch_all(pool)
    .await?;
    let seconds: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM (SELECT max(done_at) FROM analytics_done WHERE job_id = $1) - created_at)::FLOAT8 \
         FROM analytics_jobs WHERE id = $1",
    )
    .bind(job)
    .fetch_one(pool)
    .await?;
    let categories: serde_json::Map<String, serde_json::Value> =
        counts.into_iter().map(|(category, sales)| (category, json!(sales))).collect();
    Ok(Json(json!({ "job_id": job, "partitions": partitions, "seconds": seconds, "sales": categories }))
        .into_response())
}
