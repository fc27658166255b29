//! The admin API, on its own listener (loopback by default): status, scaling commands and
//! Prometheus metrics. It reads pools through their public handles only.
//!
//! - `GET /status`: every service, its instances and counters ([`StatusResponse`]).
//! - `POST /services/{name}/scale` with `{"instances": N}`: sets the desired count.
//! - `GET /metrics`: the Prometheus (OpenMetrics) text exposition.
//! - `POST /reload`: re-reads the configuration file and applies it (`surge reload`).
//! - `GET /queues`: every queue's depth, in flight, dead letters and counters.
//! - `POST /queues/{name}/messages` (the body is the payload) and `.../messages:batch`:
//!   publish, answered 202 once durable.
//! - `GET /queues/{name}/dead`, `POST /queues/{name}/dead/redrive`, `.../dead/purge`.
//! - `POST /queues/{name}/leases/{id}` (renew), `.../ack`, `.../fail`: a worker that answered a
//!   delivery 202 settles it itself, with the lease's token in `x-surge-lease-token`.
//!
//! - `POST /cache/purge` with `{"url": "http://host/path"}`, `{"prefix": "http://host/a/"}` or
//!   `{"tag": "product-42"}`, and `"soft": true` to mark stale rather than drop: purges every
//!   cached route, on every node sharing Redis; 404 when nothing matched.
//!
//! - `GET /` (and `/dashboard.js`, `/dashboard.css`): the dashboard.
//! - `GET /overview`: the latest sample; `GET /events`: each new one, as server-sent events;
//!   `GET /history`: the last 15 minutes of every pool, for charts.
//! - `GET /services/{name}/instances/{id}/log`: an instance's last lines of output.
//! - `POST /services/{name}/instances/{id}/drain`: stop one instance gracefully; the pool
//!   launches another in its place.
//!
//! Every request passes [`Access`] first: a bearer token, a loopback Host, JSON for changes.

mod access;
pub mod api;
mod dashboard;
mod queues;

pub use access::{Access, Refusal};

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use surge_cache::responses::{Purge, ResponseCaches};
use surge_metrics::Metrics;
use surge_observe::Observer;
use surge_pool::{Pools, ScaleError};
use surge_queue::Queues;
use tokio::net::TcpListener;

use api::{ErrorResponse, ScaleRequest, ScaleResponse, StatusResponse};

/// Asks the running surge to reload its configuration; it answers what changed, or why the
/// configuration in use stays.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<String, String>>;

#[derive(Clone)]
struct AdminState {
    pools: Arc<Pools>,
    queues: Arc<Queues>,
    caches: Arc<ResponseCaches>,
    metrics: Arc<Metrics>,
    reload: tokio::sync::mpsc::Sender<ReloadRequest>,
    observer: Arc<Observer>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

/// What the admin API serves from.
pub struct Handles {
    pub pools: Arc<Pools>,
    pub queues: Arc<Queues>,
    pub caches: Arc<ResponseCaches>,
    pub metrics: Arc<Metrics>,
    pub reload: tokio::sync::mpsc::Sender<ReloadRequest>,
    pub observer: Arc<Observer>,
    /// Turns true when surge stops: the dashboard's event streams end, so the API can close.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

pub fn router(handles: Handles, access: Access) -> axum::Router {
    let Handles { pools, queues, caches, metrics, reload, observer, stopping } = handles;
    axum::Router::new()
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .route("/dashboard.css", get(dashboard::style))
        .route("/overview", get(dashboard::overview))
        .route("/events", get(dashboard::events))
        .route("/history", get(dashboard::history))
        .route("/services/{name}/instances/{id}/log", get(dashboard::instance_log))
        .route("/services/{name}/instances/{id}/drain", post(dashboard::drain))
        .route("/status", get(status))
        .route("/services/{name}/scale", post(scale))
        .route("/reload", post(reload_config))
        .route("/metrics", get(metrics_text))
        .route("/queues", get(queues::list))
        .route("/queues/{name}/messages", post(queues::publish))
        .route("/queues/{name}/messages:batch", post(queues::publish_batch))
        .route("/queues/{name}/dead", get(queues::dead))
        .route("/queues/{name}/dead/redrive", post(queues::redrive))
        .route("/queues/{name}/dead/purge", post(queues::purge))
        .route("/queues/{name}/leases/{id}", post(queues::renew))
        .route("/queues/{name}/leases/{id}/ack", post(queues::ack))
        .route("/queues/{name}/leases/{id}/fail", post(queues::fail))
        .route("/cache/purge", post(purge_cache))
        .layer(axum::middleware::from_fn_with_state(Arc::new(access), guard))
        .with_state(AdminState { pools, queues, caches, metrics, reload, observer, stopping })
}

async fn reload_config(State(state): State<AdminState>) -> Response {
    let (reply, answer) = tokio::sync::oneshot::channel();
    if state.reload.send(reply).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "surge is shutting down".into());
    }
    match answer.await {
        Ok(Ok(summary)) => Json(api::ReloadResponse { reloaded: summary }).into_response(),
        Ok(Err(problem)) => error(StatusCode::UNPROCESSABLE_ENTITY, problem),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "surge is shutting down".into()),
    }
}

async fn guard(
    State(access): State<Arc<Access>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match access.check(request.method(), request.uri().path(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            let mut response = error(refusal.status(), refusal.to_string());
            if refusal.status() == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer realm=\"surge\""),
                );
            }
            response
        }
    }
}

/// Serves the admin API until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(err) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
        tracing::error!("admin API stopped: {err}");
    }
}

async fn status(State(state): State<AdminState>) -> Json<StatusResponse> {
    Json(dashboard::status(&state))
}

async fn scale(State(state): State<AdminState>, Path(name): Path<String>, body: Bytes) -> Response {
    let Some(pool) = state.pools.get(&name) else {
        return error(StatusCode::NOT_FOUND, format!("no service named `{name}`"));
    };
    let request: ScaleRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(r#"expected a body like {{"instances": 3}}: {err}"#),
            )
        }
    };
    match pool.scale(request.instances).await {
        Ok(desired) => Json(ScaleResponse { service: name, desired }).into_response(),
        Err(err @ ScaleError::OutOfBounds { .. }) => error(StatusCode::UNPROCESSABLE_ENTITY, err.to_string()),
        Err(err @ ScaleError::ShuttingDown { .. }) => error(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
        Err(err @ (ScaleError::Autoscaled { .. } | ScaleError::Upstreams { .. })) => {
            error(StatusCode::CONFLICT, err.to_string())
        }
    }
}

async fn purge_cache(State(state): State<AdminState>, body: Bytes) -> Response {
    let request: api::PurgeRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(r#"expected a body like {{"url": "http://shop.example/products/1"}}: {err}"#),
            )
        }
    };
    let what = match (request.url, request.prefix, request.tag) {
        (Some(url), None, None) => Purge::Url(url),
        (None, Some(prefix), None) => Purge::Prefix(prefix),
        (None, None, Some(tag)) => Purge::Tag(tag),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give exactly one of `url`, `prefix` and `tag`".to_owned(),
            );
        }
    };
    let purged = state.caches.purge(&what, request.soft).await;
    if purged == 0 {
        return error(StatusCode::NOT_FOUND, format!("nothing cached matches {what:?}"));
    }
    Json(api::PurgeResponse { purged, soft: request.soft }).into_response()
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text otherwise.
async fn metrics_text(State(state): State<AdminState>, headers: axum::http::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|value| value.to_str().ok());
    if surge_metrics::wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, surge_metrics::CONTENT_TYPE)], state.metrics.encode()).into_response()
    } else {
        ([(header::CONTENT_TYPE, surge_metrics::CLASSIC_CONTENT_TYPE)], state.metrics.encode_classic())
            .into_response()
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(ErrorResponse { error: message })).into_response()
}
