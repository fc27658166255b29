//! What every service shares: its HTTP server (axum, on `$PORT`, stopping gracefully on
//! SIGTERM as Surge asks), its health check (the database must answer: Surge sends no traffic
//! to an instance whose database is away), and how an error becomes a JSON answer.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use serde_json::json;
use sqlx::PgPool;

use crate::settings::Settings;
use crate::{catalog, notifications, orders, payments, provider, relay, users, Service};

/// Why a request failed, as the client is told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 422, naming the field.
    #[error("{message}")]
    Invalid { field: &'static str, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// The database (or another service) is away: try again later.
    #[error("{0}")]
    Unavailable(String),
    /// Another service answered something unexpected.
    #[error("{0}")]
    Upstream(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ApiError::Invalid { field, message: message.into() }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Invalid { field, message } => json!({ "error": message, "field": field }),
            other => json!({ "error": other.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => ApiError::Unavailable(format!("the database is unavailable: {err}")),
            sqlx::Error::Database(db)
                if db.code().is_some_and(|code| code.starts_with("57P") || code.starts_with("08")) =>
            {
                // Admin shutdown, crash shutdown, cannot connect now: PostgreSQL is going away.
                ApiError::Unavailable(format!("the database is unavailable: {err}"))
            }
            _ => {
                tracing::error!("database error: {err}");
                ApiError::Internal("the database failed the request".into())
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Serves `service` on `$PORT` until SIGTERM.
pub async fn serve(service: Service, settings: &Settings) -> Result<(), String> {
    let pool = crate::db::pool(settings, service)?;
    tokio::spawn(crate::db::warm(pool.clone(), settings.db_connections));
    let router = match service {
        Service::Users => users::router(users::Users::new(pool.clone(), settings).await),
        Service::Catalog => catalog::router(catalog::Catalog::new(pool.clone(), settings).await),
        Service::Orders => orders::router(orders::Orders::new(pool.clone(), settings)),
        Service::Payments => payments::router(payments::Payments::new(pool.clone(), settings)),
        Service::Provider => provider::router(provider::Provider::new(pool.clone())),
        Service::Relay => relay::router(relay::Relay::new(pool.clone(), settings)?),
        Service::Notifications => {
            let sender = Arc::new(notifications::TableSender::new(pool.clone()));
            notifications::router(notifications::Notifications::new(pool.clone(), sender))
        }
    };
    let router = router.route("/healthz", get(health)).layer(axum::Extension(pool));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", settings.port))
        .await
        .map_err(|err| format!("cannot listen on port {} (PORT): {err}", settings.port))?;
    let local = listener.local_addr().map_err(|err| err.to_string())?;
    tracing::info!("{} listening on {local}", service.name());
    let stop = async {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            term.recv().await;
        }
    };
    axum::serve(listener, router).with_graceful_shutdown(stop).await.map_err(|err| err.to_string())
}

/// Ready when the database answers.
async fn health(axum::Extension(pool): axum::Extension<PgPool>) -> Response {
    if crate::db::ready(&pool).await {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the database does not answer\n").into_response()
    }
}

/// The request's `Idempotency-Key`: 1 to 200 characters of text, trimmed; `None` without one.
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> ApiResult<Option<String>> {
    match headers.get("idempotency-key").map(|value| value.to_str().map(str::trim)) {
        None => Ok(None),
        Some(Ok(key)) if !key.is_empty() && key.len() <= 200 => Ok(Some(key.to_owned())),
        Some(_) => Err(ApiError::BadRequest("Idempotency-Key is 1 to 200 characters of text".into())),
    }
}

/// A JSON body, or a 400 that says what is wrong with it.
pub fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|err| ApiError::BadRequest(format!("the body is not the JSON expected: {err}")))
}
