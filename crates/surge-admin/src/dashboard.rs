//! The dashboard: a page, its script and its style, built into the binary (no CDN, no build
//! step, works offline), and what it reads: the latest sample, a live stream of them, the
//! last 15 minutes, an instance's last lines of output; and the one action only it needs,
//! draining an instance. Its other actions (scale, redrive, purge) are the API's own.

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use surge_observe::sample::{Sample, ServiceSample};
use surge_pool::DrainError;

use crate::api::{DrainResponse, LogResponse};
use crate::{error, AdminState};

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

/// The page may load only its own script and style, and talk only to this API.
const POLICY: &str = "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
                      connect-src 'self'; frame-ancestors 'none'";

/// What needs no token even off loopback: the page's own files, which hold no data.
pub(crate) fn is_asset(path: &str) -> bool {
    matches!(path, "/" | "/dashboard.js" | "/dashboard.css")
}

pub(crate) async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

pub(crate) async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub(crate) async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// The latest sample, with each pool's instances read now.
pub(crate) fn status(state: &AdminState) -> Sample {
    let mut sample = (*state.observer.latest()).clone();
    let sampled = std::mem::take(&mut sample.services);
    sample.services = state
        .pools
        .list()
        .iter()
        .map(|pool| {
            let status = pool.status();
            match sampled.iter().find(|s| s.status.service == status.service) {
                Some(seen) => ServiceSample { status, kind: seen.kind, traffic: seen.traffic.clone() },
                None => ServiceSample {
                    status,
                    kind: surge_observe::sample::PoolKind::Service,
                    traffic: Default::default(),
                },
            }
        })
        .collect();
    sample
}

pub(crate) async fn overview(State(state): State<AdminState>) -> Json<Sample> {
    Json((*state.observer.latest()).clone())
}

pub(crate) async fn history(State(state): State<AdminState>) -> Json<surge_observe::history::HistoryJson> {
    Json(state.observer.history())
}

/// `GET /events`: the latest sample at once, then each new one, until surge stops.
pub(crate) async fn events(
    State(state): State<AdminState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut samples = state.observer.subscribe();
    samples.mark_changed();
    let stopping = state.stopping.clone();
    let stream =
        futures_util::stream::unfold((samples, stopping), |(mut samples, mut stopping)| async move {
            tokio::select! {
                changed = samples.changed() => changed.ok()?,
                _ = stopping.wait_for(|stop| *stop) => return None,
            }
            let sample = samples.borrow_and_update().clone();
            let event =
                Event::default().event("sample").json_data(&*sample).unwrap_or_else(|_| Event::default());
            Some((Ok(event), (samples, stopping)))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

pub(crate) async fn instance_log(
    State(state): State<AdminState>,
    Path((service, id)): Path<(String, String)>,
) -> Response {
    let Some(pool) = state.pools.get(&service) else {
        return error(StatusCode::NOT_FOUND, format!("no service named `{service}`"));
    };
    match pool.instance_output(&id) {
        None => error(StatusCode::NOT_FOUND, format!("service `{service}` has no instance `{id}`")),
        Some(None) => error(
            StatusCode::NOT_FOUND,
            format!("`{id}` runs outside surge (services.{service}.upstreams): its output is not here"),
        ),
        Some(Some(lines)) => Json(LogResponse { service, instance: id, lines }).into_response(),
    }
}

pub(crate) async fn drain(
    State(state): State<AdminState>,
    Path((service, id)): Path<(String, String)>,
) -> Response {
    let Some(pool) = state.pools.get(&service) else {
        return error(StatusCode::NOT_FOUND, format!("no service named `{service}`"));
    };
    match pool.drain_instance(&id).await {
        Ok(()) => {
            let answer = DrainResponse { service, instance: id, draining: true };
            (StatusCode::ACCEPTED, Json(answer)).into_response()
        }
        Err(err @ DrainError::NoInstance { .. }) => error(StatusCode::NOT_FOUND, err.to_string()),
        Err(err @ DrainError::Upstreams { .. }) => error(StatusCode::CONFLICT, err.to_string()),
        Err(err @ DrainError::ShuttingDown { .. }) => error(StatusCode::SERVICE_UNAVAILABLE, err.to_string()),
    }
}
