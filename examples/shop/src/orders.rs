//! The orders service: an order is placed once per `Idempotency-Key` (a repeat gets the first
//! answer), for a user the users service knows, at the prices the catalog gives now; a user's
//! orders are listed by date (`idx_order_user_date`); the monthly sales report reads the
//! `monthly_sales` materialized view, which a Surge schedule refreshes (concurrently, so the
//! report is never blocked) through a worker pool of this same service.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
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
use crate::catalog::Item;
use crate::client::Gateway;
use crate::events;
use crate::saga::{self, Event};
use crate::settings::Settings;

/// The most items one order may hold.
const MAX_ITEMS: usize = 50;

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Order {
    pub id: i64,
    pub user_id: i64,
    pub amount_cents: i64,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Line {
    pub product_id: i64,
    pub quantity: i32,
    pub price_cents: i64,
    /// The product's category when the order was placed.
    pub category: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderJson {
    #[serde(flatten)]
    pub order: Order,
    pub items: Vec<Line>,
}

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct MonthlySales {
    pub month: DateTime<Utc>,
    pub amount_cents: i64,
    pub orders: i64,
}

const ORDER: &str = "SELECT id, user_id, amount_cents, status, created_at FROM orders";

#[derive(Clone)]
pub struct OrderRepo {
    pool: PgPool,
}

impl OrderRepo {
    pub fn new(pool: PgPool) -> Self {
        OrderRepo { pool }
    }

    pub async fn get(&self, id: i64) -> ApiResult<Option<OrderJson>> {
        let Some(order) = sqlx::query_as::<_, Order>(&format!("{ORDER} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let items = sqlx::query_as(
            "SELECT product_id, quantity, price_cents, category FROM order_items WHERE order_id = $1 ORDER BY product_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(OrderJson { order, items }))
    }

    /// The answer the order placed with `key` was given.
    pub async fn by_key(&self, key: &str) -> ApiResult<Option<serde_json::Value>> {
        let answer: Option<Option<serde_json::Value>> =
            sqlx::query_scalar("SELECT first_answer FROM orders WHERE idempotency_key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(answer.flatten())
    }

    /// Records the order, its lines, its first event and the answer it is given (which a repeat
    /// with the same key gets again), and asks for the saga's first step (through the outbox),
    /// all in one transaction. A key already used by a concurrent request gets that one's answer.
    pub async fn place(
        &self,
        user_id: i64,
        lines: &[Line],
        card: &str,
        key: Option<&str>,
    ) -> ApiResult<serde_json::Value> {
        let amount: i64 = lines.iter().map(|line| line.price_cents * i64::from(line.quantity)).sum();
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query_scalar::<_, i64>(
            "INSERT INTO orders (user_id, amount_cents, idempotency_key) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(user_id)
        .bind(amount)
        .bind(key)
        .fetch_one(&mut *tx)
        .await;
        let id = match inserted {
            Ok(id) => id,
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                drop(tx);
                let key = key.unwrap_or_default();
                return self.by_key(key).await?.ok_or_else(|| ApiError::Internal("an order vanished".into()));
            }
            Err(err) => return Err(err.into()),
        };
        for line in lines {
            sqlx::query(
                "INSERT INTO order_items (order_id, product_id, quantity, price_cents, category) VALUES ($1, $2, $3, $4, $5)",
            )
                .bind(id)
                .bind(line.product_id)
                .bind(line.quantity)
                .bind(line.price_cents)
                .bind(&line.category)
                .execute(&mut *tx)
                .await?;
        }
        let placed = Event::Placed { user_id, amount_cents: amount, card: card.to_owned() };
        events::append(&mut tx, id, &saga::State::default(), &[placed], Some(saga::Step::Reserve)).await?;
        let order: Order =
            sqlx::query_as(&format!("{ORDER} WHERE id = $1")).bind(id).fetch_one(&mut *tx).await?;
        let answer = serde_json::to_value(OrderJson { order, items: lines.to_vec() })
            .map_err(|err| ApiError::Internal(err.to_string()))?;
        sqlx::query("UPDATE orders SET first_answer = $2 WHERE id = $1")
            .bind(id)
            .bind(&answer)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(answer)
    }

    pub async fn of_user(
        &self,
        user_id: i64,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        limit: i64,
    ) -> ApiResult<Vec<Order>> {
        let query = format!(
            "{ORDER} WHERE user_id = $1 AND created_at >= coalesce($2, '-infinity') \
             AND created_at < coalesce($3, 'infinity') ORDER BY created_at DESC LIMIT $4"
        );
        Ok(sqlx::query_as(&query).bind(user_id).bind(from).bind(to).bind(limit).fetch_all(&self.pool).await?)
    }

    pub async fn monthly_sales(&self) -> ApiResult<Vec<MonthlySales>> {
        let query = "SELECT month, amount_cents, orders FROM monthly_sales ORDER BY month";
        Ok(sqlx::query_as(query).fetch_all(&self.pool).await?)
    }

    pub async fn refresh_monthly_sales(&self) -> ApiResult<()> {
        sqlx::query("REFRESH MATERIALIZED VIEW CONCURRENTLY monthly_sales").execute(&self.pool).await?;
        Ok(())
    }
}

pub struct Orders {
    repo: OrderRepo,
    services: Gateway,
    /// For the checkout's steps, on the services' internal routes.
    internal: Gateway,
}

impl Orders {
    pub fn new(pool: PgPool, settings: &Settings) -> Arc<Orders> {
        Arc::new(Orders {
            repo: OrderRepo::new(pool),
            services: Gateway::new(&settings.gateway, settings.call_timeout),
            internal: Gateway::internal(&settings.gateway, settings.call_timeout),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.repo.pool
    }

    pub fn internal(&self) -> &Gateway {
        &self.internal
    }

    /// An order's items, as the catalog's reservation takes them.
    pub async fn items(&self, order_id: i64) -> ApiResult<Vec<Item>> {
        let rows: Vec<(i64, i32)> = sqlx::query_as(
            "SELECT product_id, quantity FROM order_items WHERE order_id = $1 ORDER BY product_id",
        )
        .bind(order_id)
        .fetch_all(&self.repo.pool)
        .await?;
        Ok(rows.into_iter().map(|(product_id, quantity)| Item { product_id, quantity }).collect())
    }

    /// The user must exist: a 404 from the users service is the client's mistake.
    async fn check_user(&self, user_id: i64) -> ApiResult<()> {
        let answer = self.services.call(Method::GET, &format!("/users/{user_id}"), &[], None).await?;
        match answer.status {
            status if status.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(ApiError::invalid("user_id", format!("there is no user {user_id}"))),
            status if status.is_server_error() => {
                Err(ApiError::Unavailable(format!("the users service answered {status}")))
            }
            status => Err(ApiError::Upstream(format!("the users service answered {status}"))),
        }
    }

    /// Each item at the catalog's price now.
    async fn price(&self, items: &[Item]) -> ApiResult<Vec<Line>> {
        let mut lines = Vec::with_capacity(items.len());
        for item in items {
            let answer =
                self.services.call(Method::GET, &format!("/products/{}", item.product_id), &[], None).await?;
            match answer.status {
                status if status.is_success() => {
                    let product: crate::catalog::Product = answer.json()?;
                    lines.push(Line {
                        product_id: item.product_id,
                        quantity: item.quantity,
                        price_cents: product.price_cents,
                        category: product.category,
                    });
                }
                StatusCode::NOT_FOUND => {
                    return Err(ApiError::invalid(
                        "items",
                        format!("there is no product {}", item.product_id),
                    ))
                }
                status => return Err(ApiError::Unavailable(format!("the catalog answered {status}"))),
            }
        }
        Ok(lines)
    }
}

pub fn router(orders: Arc<Orders>) -> Router {
    Router::new()
        .route("/orders", post(place).get(of_user))
        .route("/orders/{id}", get(order))
        .route("/orders/history", get(history))
        .route("/reports/monthly-sales", get(monthly_sales))
        .route("/reports/monthly-sales/refresh", post(refresh))
        // The worker pools' delivery paths: a schedule's message asks for a refresh; the
        // checkout saga's steps; the read model's projection.
        .route("/jobs/refresh-sales", post(refresh))
        .route("/jobs/checkout", post(crate::checkout::checkout))
        .route("/jobs/project", post(crate::checkout::project))
        .route("/jobs/count-sales", post(crate::analytics::count))
        .route("/reports/sales-by-category", post(crate::analytics::start))
        .route("/reports/sales-by-category/{job}", get(crate::analytics::result))
        .with_state(orders)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Placing {
    user_id: i64,
    items: Vec<Item>,
    /// The card to charge (the processor stand-in's test cards); a good one by default.
    #[serde(default = "good_card")]
    card: String,
}

fn good_card() -> String {
    "4242424242424242".to_owned()
}

fn checked_items(items: &[Item]) -> ApiResult<()> {
    if items.is_empty() || items.len() > MAX_ITEMS {
        return Err(ApiError::invalid("items", format!("an order holds 1 to {MAX_ITEMS} items")));
    }
    if items.iter().any(|item| !(1..=100).contains(&item.quantity)) {
        return Err(ApiError::invalid("items", "each quantity is from 1 to 100"));
    }
    let mut products: Vec<i64> = items.iter().map(|item| item.product_id).collect();
    products.sort_unstable();
    products.dedup();
    if products.len() != items.len() {
        return Err(ApiError::invalid("items", "each product once, with its quantity"));
    }
    Ok(())
}

async fn place(State(orders): State<Arc<Orders>>, headers: HeaderMap, bytes: Bytes) -> ApiResult<Response> {
    let key = idempotency_key(&headers)?;
    if let Some(key) = &key {
        if let Some(first) = orders.repo.by_key(key).await? {
            return Ok((StatusCode::CREATED, Json(first)).into_response());
        }
    }
    let placing: Placing = body(&bytes)?;
    checked_items(&placing.items)?;
    if placing.card.len() != 16 || !placing.card.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid("card", "a card number is 16 digits"));
    }
    orders.check_user(placing.user_id).await?;
    let lines = orders.price(&placing.items).await?;
    let order = orders.repo.place(placing.user_id, &lines, &placing.card, key.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(order)).into_response())
}

async fn order(State(orders): State<Arc<Orders>>, Path(id): Path<i64>) -> ApiResult<Response> {
    match orders.repo.get(id).await? {
        Some(order) => Ok(Json(order).into_response()),
        None => Err(ApiError::NotFound(format!("no order {id}"))),
    }
}

#[derive(Debug, Deserialize)]
struct Listing {
    user_id: Option<i64>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    limit: Option<i64>,
}

impl Listing {
    /// Whose orders, and how many at most.
    fn user_and_limit(&self) -> ApiResult<(i64, i64)> {
        let Some(user_id) = self.user_id else {
            return Err(ApiError::invalid("user_id", "list a user's orders with ?user_id="));
        };
        let limit = self.limit.unwrap_or(50);
        if !(1..=500).contains(&limit) {
            return Err(ApiError::invalid("limit", "from 1 to 500 orders a page"));
        }
        Ok((user_id, limit))
    }
}

async fn of_user(State(orders): State<Arc<Orders>>, Query(listing): Query<Listing>) -> ApiResult<Response> {
    let (user_id, limit) = listing.user_and_limit()?;
    let list = orders.repo.of_user(user_id, listing.from, listing.to, limit).await?;
    Ok(Json(json!({ "user_id": user_id, "orders": list })).into_response())
}

/// A user's orders as the read model has them (kept by the projection from the events), newest
/// first: what a "my orders" page reads, without touching the order log.
async fn history(State(orders): State<Arc<Orders>>, Query(listing): Query<Listing>) -> ApiResult<Response> {
    let (user_id, limit) = listing.user_and_limit()?;
    let list = events::history(orders.pool(), user_id, limit).await?;
    Ok(Json(json!({ "user_id": user_id, "orders": list })).into_response())
}

async fn monthly_sales(State(orders): State<Arc<Orders>>) -> ApiResult<Response> {
    Ok(Json(json!({ "months": orders.repo.monthly_sales().await? })).into_response())
}

async fn refresh(State(orders): State<Arc<Orders>>) -> ApiResult<Response> {
    orders.repo.refresh_monthly_sales().await?;
    Ok(Json(json!({ "refreshed": "monthly_sales" })).into_response())
}
