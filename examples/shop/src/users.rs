//! The users service: sign-up, profile read and update, lookup by email. Profile reads go
//! through the two-tier cache-aside (`surge-cache`: in process, then Redis, then PostgreSQL),
//! and an update invalidates the profile in every instance. Each answer to a profile read says
//! where it came from in `x-shop-cache: hit | miss`.

use std::sync::Arc;
use std::time::Duration;

use crate::app::{body, ApiError, ApiResult};
use crate::aside::Aside;
use crate::settings::Settings;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct User {
    pub id: i64,
    pub email: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The users table.
#[derive(Clone)]
pub struct UserRepo {
    pool: PgPool,
}

impl UserRepo {
    pub fn new(pool: PgPool) -> Self {
        UserRepo { pool }
    }

    pub async fn create(&self, email: &str, name: &str) -> ApiResult<User> {
        let created = sqlx::query_as::<_, User>(
            "INSERT INTO users (email, name) VALUES ($1, $2) RETURNING id, email, name, created_at, updated_at",
        )
        .bind(email)
        .bind(name)
        .fetch_one(&self.pool)
        .await;
        created.map_err(|err| match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                ApiError::Conflict(format!("a user with the email {email} exists already"))
            }
            _ => err.into(),
        })
    }

    pub async fn get(&self, id: i64) -> ApiResult<Option<User>> {
        let query = "SELECT id, email, name, created_at, updated_at FROM users WHERE id = $1";
        Ok(sqlx::query_as(query).bind(id).fetch_optional(&self.pool).await?)
    }

    pub async fn by_email(&self, email: &str) -> ApiResult<Option<User>> {
        let query = "SELECT id, email, name, created_at, updated_at FROM users WHERE email = $1";
        Ok(sqlx::query_as(query).bind(email).fetch_optional(&self.pool).await?)
    }

    pub async fn update(&self, id: i64, change: &Change) -> ApiResult<Option<User>> {
        let updated = sqlx::query_as::<_, User>(
            "UPDATE users SET name = coalesce($2, name), email = coalesce($3, email), updated_at = now() \
             WHERE id = $1 RETURNING id, email, name, created_at, updated_at",
        )
        .bind(id)
        .bind(&change.name)
        .bind(&change.email)
        .fetch_optional(&self.pool)
        .await;
        updated.map_err(|err| match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                ApiError::Conflict("another user has that email".into())
            }
            _ => err.into(),
        })
    }
}

/// The service: its repository and its cache, given to it (tests give a repository on a
/// database of their own).
pub struct Users {
    repo: UserRepo,
    cache: Aside,
}

impl Users {
    pub async fn new(pool: PgPool, settings: &Settings) -> Arc<Users> {
        let cache = Aside::open(settings, crate::Service::Users, Duration::from_secs(60)).await;
        Arc::new(Users { repo: UserRepo::new(pool), cache })
    }
}

pub fn router(users: Arc<Users>) -> Router {
    Router::new()
        .route("/users", post(sign_up).get(find))
        .route("/users/{id}", get(profile).patch(update))
        .with_state(users)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignUp {
    email: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    name: Option<String>,
    email: Option<String>,
}

/// An email as stored: trimmed, lower case, and plausibly an address.
fn checked_email(email: &str) -> ApiResult<String> {
    let email = email.trim().to_lowercase();
    let plausible = email.len() <= 254
        && !email.chars().any(char::is_whitespace)
        && email.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
    if plausible {
        Ok(email)
    } else {
        Err(ApiError::invalid("email", format!("{email:?} is not an email address")))
    }
}

fn checked_name(name: &str) -> ApiResult<String> {
    let name = name.trim();
    match name.chars().count() {
        0 => Err(ApiError::invalid("name", "a name is needed")),
        1..=100 => Ok(name.to_owned()),
        _ => Err(ApiError::invalid("name", "a name has at most 100 characters")),
    }
}

async fn sign_up(State(users): State<Arc<Users>>, bytes: Bytes) -> ApiResult<Response> {
    let request: SignUp = body(&bytes)?;
    let (email, name) = (checked_email(&request.email)?, checked_name(&request.name)?);
    let user = users.repo.create(&email, &name).await?;
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

async fn profile(State(users): State<Arc<Users>>, Path(id): Path<i64>) -> ApiResult<Response> {
    let (found, source) = users.cache.read(&format!("user:{id}"), async || users.repo.get(id).await).await?;
    let Some(json) = found else { return Err(ApiError::NotFound(format!("no user {id}"))) };
    Ok(([("content-type", "application/json"), ("x-shop-cache", source.as_str())], json).into_response())
}

async fn update(State(users): State<Arc<Users>>, Path(id): Path<i64>, bytes: Bytes) -> ApiResult<Response> {
    let mut change: Change = body(&bytes)?;
    change.email = change.email.as_deref().map(checked_email).transpose()?;
    change.name = change.name.as_deref().map(checked_name).transpose()?;
    let Some(user) = users.repo.update(id, &change).await? else {
        return Err(ApiError::NotFound(format!("no user {id}")));
    };
    users.cache.invalidate(&format!("user:{id}")).await;
    Ok(Json(user).into_response())
}

#[derive(Debug, Deserialize)]
struct Lookup {
    email: Option<String>,
}

async fn find(State(users): State<Arc<Users>>, Query(lookup): Query<Lookup>) -> ApiResult<Response> {
    let Some(email) = lookup.email else {
        return Err(ApiError::invalid("email", "look users up by ?email="));
    };
    let email = checked_email(&email)?;
    match users.repo.by_email(&email).await? {
        Some(user) => Ok(Json(user).into_response()),
        None => Err(ApiError::NotFound(format!("no user with the email {email}"))),
    }
}
