//! The catalog and inventory service: products in categories with their stock, and stock held
//! for orders. Product reads are cached twice: by the service (cache-aside, in process and in
//! Redis) and by Surge's gateway (`Cache-Control` and `Cache-Tag` on the answer). A change
//! invalidates the first and purges the second by tag through the admin API.
//!
//! A reservation takes every item's stock at once or none (one transaction, each row updated
//! only while its stock covers the quantity), is keyed by the order, so asking twice holds
//! once, and is released at most once.

use std::sync::Arc;
use std::time::Duration;

use crate::app::{body, ApiError, ApiResult};
use crate::aside::Aside;
use crate::client::Gateway;
use crate::settings::Settings;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

/// How long the gateway may serve a product page without asking (a change purges it sooner).
const PRODUCT_MAX_AGE: &str = "public, max-age=30";
const LIST_MAX_AGE: &str = "public, max-age=10";

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub category: String,
    pub price_cents: i64,
    pub stock: i32,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Item {
    pub product_id: i64,
    pub quantity: i32,
}

const PRODUCT: &str = "SELECT p.id, p.name, c.name AS category, p.price_cents, p.stock, p.updated_at \
                       FROM products p JOIN categories c ON c.id = p.category_id";

#[derive(Clone)]
pub struct CatalogRepo {
    pool: PgPool,
}

/// What a reservation came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Reserved {
    Now,
    Already,
    /// Not enough of this product: nothing was taken.
    Short {
        product_id: i64,
    },
}

impl CatalogRepo {
    pub fn new(pool: PgPool) -> Self {
        CatalogRepo { pool }
    }

    pub async fn create(&self, new: &NewProduct) -> ApiResult<Product> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO categories (name) VALUES ($1) ON CONFLICT (name) DO NOTHING")
            .bind(&new.category)
            .execute(&mut *tx)
            .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO products (name, category_id, price_cents, stock) \
             SELECT $1, id, $3, $4 FROM categories WHERE name = $2 RETURNING id",
        )
        .bind(&new.name)
        .bind(&new.category)
        .bind(new.price_cents)
        .bind(new.stock)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        self.get(id).await?.ok_or_else(|| ApiError::Internal("the product vanished".into()))
    }

    pub async fn get(&self, id: i64) -> ApiResult<Option<Product>> {
        Ok(sqlx::query_as(&format!("{PRODUCT} WHERE p.id = $1")).bind(id).fetch_optional(&self.pool).await?)
    }

    pub async fn list(&self, category: Option<&str>, after: i64, limit: i64) -> ApiResult<Vec<Product>> {
        let query =
            format!("{PRODUCT} WHERE ($1::TEXT IS NULL OR c.name = $1) AND p.id > $2 ORDER BY p.id LIMIT $3");
        Ok(sqlx::query_as(&query).bind(category).bind(after).bind(limit).fetch_all(&self.pool).await?)
    }

    pub async fn update(&self, id: i64, change: &ProductChange) -> ApiResult<Option<Product>> {
        let updated = sqlx::query(
            "UPDATE products SET name = coalesce($2, name), price_cents = coalesce($3, price_cents), \
             stock = coalesce($4, stock), updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(&change.name)
        .bind(change.price_cents)
        .bind(change.stock)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Ok(None);
        }
        self.get(id).await
    }

    pub async fn reserve(&self, order_id: i64, items: &[Item]) -> ApiResult<Reserved> {
        let mut tx = self.pool.begin().await?;
        let inserted =
            sqlx::query("INSERT INTO reservations (order_id, items) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(order_id)
                .bind(sqlx::types::Json(items))
                .execute(&mut *tx)
                .await?;
        if inserted.rows_affected() == 0 {
            return Ok(Reserved::Already);
        }
        // In product order, so two reservations never wait on each other's rows crosswise.
        let mut sorted = items.to_vec();
        sorted.sort_by_key(|item| item.product_id);
        for item in &sorted {
            let taken = sqlx::query("UPDATE products SET stock = stock - $2 WHERE id = $1 AND stock >= $2")
                .bind(item.product_id)
                .bind(item.quantity)
                .execute(&mut *tx)
                .await?;
            if taken.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(Reserved::Short { product_id: item.product_id });
            }
        }
        tx.commit().await?;
        Ok(Reserved::Now)
    }

    /// Gives a reservation's stock back; `None`: there was none; `Some(false)`: given back before.
    pub async fn release(&self, order_id: i64) -> ApiResult<Option<bool>> {
        let mut tx = self.pool.begin().await?;
        let held: Option<(sqlx::types::Json<Vec<Item>>, bool)> =
            sqlx::query_as("SELECT items, released FROM reservations WHERE order_id = $1 FOR UPDATE")
                .bind(order_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((items, released)) = held else { return Ok(None) };
        if released {
            return Ok(Some(false));
        }
        for item in items.0 {
            sqlx::query("UPDATE products SET stock = stock + $2 WHERE id = $1")
                .bind(item.product_id)
                .bind(item.quantity)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE reservations SET released = true WHERE order_id = $1")
            .bind(order_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(true))
    }
}

/// Purges the gateway's cached product pages by tag, through Surge's admin API.
#[derive(Clone)]
pub struct Purger {
    admin: Gateway,
    token: String,
}

impl Purger {
    fn from_settings(settings: &Settings) -> Option<Purger> {
        let url = settings.admin_url.as_ref()?;
        let Some(file) = &settings.admin_token_file else {
            tracing::warn!(
                "SHOP_ADMIN_URL without SHOP_ADMIN_TOKEN_FILE: cached product pages expire on their own"
            );
            return None;
        };
        match std::fs::read_to_string(file) {
            Ok(token) => Some(Purger {
                admin: Gateway::new(url, Duration::from_secs(2)),
                token: token.trim().to_owned(),
            }),
            Err(err) => {
                tracing::warn!(
                    "cannot read {} (SHOP_ADMIN_TOKEN_FILE): {err}; cached product pages expire on their own",
                    file.display()
                );
                None
            }
        }
    }

    async fn purge(&self, tag: &str) {
        let bearer = format!("Bearer {}", self.token);
        let answer = self
            .admin
            .call(
                hyper::Method::POST,
                "/cache/purge",
                &[("authorization", &bearer)],
                Some(json!({ "tag": tag })),
            )
            .await;
        match answer {
            // 404: nothing was cached under the tag.
            Ok(answer) if answer.status.is_success() || answer.status == StatusCode::NOT_FOUND => {}
            Ok(answer) => tracing::warn!("purging {tag} was answered {}", answer.status),
            Err(err) => tracing::warn!("purging {tag}: {err}"),
        }
    }
}

pub struct Catalog {
    repo: CatalogRepo,
    cache: Aside,
    purger: Option<Purger>,
}

impl Catalog {
    pub async fn new(pool: PgPool, settings: &Settings) -> Arc<Catalog> {
        let cache = Aside::open(settings, crate::Service::Catalog, Duration::from_secs(60)).await;
        Arc::new(Catalog { repo: CatalogRepo::new(pool), cache, purger: Purger::from_settings(settings) })
    }

    async fn changed(&self, id: i64) {
        self.cache.invalidate(&format!("product:{id}")).await;
        if let Some(purger) = &self.purger {
            purger.purge(&format!("product-{id}")).await;
            purger.purge("products").await;
        }
    }
}

pub fn router(catalog: Arc<Catalog>) -> Router {
    Router::new()
        .route("/products", post(create).get(list))
        .route("/products/{id}", get(product).patch(update))
        .route("/stock/reservations", post(reserve))
        .route("/stock/reservations/{order_id}", delete(release))
        .with_state(catalog)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    name: String,
    category: String,
    price_cents: i64,
    stock: i32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductChange {
    name: Option<String>,
    price_cents: Option<i64>,
    stock: Option<i32>,
}

fn checked_text(field: &'static str, text: &str) -> ApiResult<String> {
    let text = text.trim();
    match text.chars().count() {
        0 => Err(ApiError::invalid(field, format!("a {field} is needed"))),
        1..=200 => Ok(text.to_owned()),
        _ => Err(ApiError::invalid(field, format!("a {field} has at most 200 characters"))),
    }
}

fn checked_amounts(price_cents: Option<i64>, stock: Option<i32>) -> ApiResult<()> {
    if price_cents.is_some_and(|price| price < 0) {
        return Err(ApiError::invalid("price_cents", "a price cannot be negative"));
    }
    if stock.is_some_and(|stock| stock < 0) {
        return Err(ApiError::invalid("stock", "stock cannot be negative"));
    }
    Ok(())
}

async fn create(State(catalog): State<Arc<Catalog>>, bytes: Bytes) -> ApiResult<Response> {
    let mut new: NewProduct = body(&bytes)?;
    new.name = checked_text("name", &new.name)?;
    new.category = checked_text("category", &new.category)?;
    checked_amounts(Some(new.price_cents), Some(new.stock))?;
    let product = catalog.repo.create(&new).await?;
    if let Some(purger) = &catalog.purger {
        purger.purge("products").await;
    }
    Ok((StatusCode::CREATED, Json(product)).into_response())
}

async fn product(State(catalog): State<Arc<Catalog>>, Path(id): Path<i64>) -> ApiResult<Response> {
    let (found, source) =
        catalog.cache.read(&format!("product:{id}"), async || catalog.repo.get(id).await).await?;
    let Some(json) = found else { return Err(ApiError::NotFound(format!("no product {id}"))) };
    let tags = format!("product-{id} products");
    let headers = [
        ("content-type", "application/json".to_owned()),
        ("cache-control", PRODUCT_MAX_AGE.to_owned()),
        ("cache-tag", tags),
        ("x-shop-cache", source.as_str().to_owned()),
    ];
    Ok((headers, json).into_response())
}

#[derive(Debug, Deserialize)]
struct Listing {
    category: Option<String>,
    after: Option<i64>,
    limit: Option<i64>,
}

async fn list(State(catalog): State<Arc<Catalog>>, Query(listing): Query<Listing>) -> ApiResult<Response> {
    let limit = listing.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::invalid("limit", "from 1 to 100 products a page"));
    }
    let products = catalog.repo.list(listing.category.as_deref(), listing.after.unwrap_or(0), limit).await?;
    let headers = [("cache-control", LIST_MAX_AGE), ("cache-tag", "products")];
    Ok((headers, Json(json!({ "products": products }))).into_response())
}

async fn update(
    State(catalog): State<Arc<Catalog>>,
    Path(id): Path<i64>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let mut change: ProductChange = body(&bytes)?;
    change.name = change.name.as_deref().map(|name| checked_text("name", name)).transpose()?;
    checked_amounts(change.price_cents, change.stock)?;
    let Some(product) = catalog.repo.update(id, &change).await? else {
        return Err(ApiError::NotFound(format!("no product {id}")));
    };
    catalog.changed(id).await;
    Ok(Json(product).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    pub order_id: i64,
    pub items: Vec<Item>,
}

async fn reserve(State(catalog): State<Arc<Catalog>>, bytes: Bytes) -> ApiResult<Response> {
    let reservation: Reservation = body(&bytes)?;
    if reservation.items.is_empty() {
        return Err(ApiError::invalid("items", "a reservation holds at least one item"));
    }
    if reservation.items.iter().any(|item| item.quantity <= 0) {
        return Err(ApiError::invalid("items", "every quantity is at least 1"));
    }
    match catalog.repo.reserve(reservation.order_id, &reservation.items).await? {
        Reserved::Now => {
            for item in &reservation.items {
                catalog.changed(item.product_id).await;
            }
            Ok((StatusCode::CREATED, Json(json!({ "order_id": reservation.order_id, "reserved": true })))
                .into_response())
        }
        Reserved::Already => {
            Ok(Json(json!({ "order_id": reservation.order_id, "reserved": true })).into_response())
        }
        Reserved::Short { product_id } => {
            Err(ApiError::Conflict(format!("not enough stock of product {product_id}")))
        }
    }
}

async fn release(State(catalog): State<Arc<Catalog>>, Path(order_id): Path<i64>) -> ApiResult<Response> {
    match catalog.repo.release(order_id).await? {
        None => Err(ApiError::NotFound(format!("no stock is held for order {order_id}"))),
        Some(now) => {
            Ok(Json(json!({ "order_id": order_id, "released": true, "just_now": now })).into_response())
        }
    }
}
