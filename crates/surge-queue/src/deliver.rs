//! Push delivery: one dispatcher per worker pool takes ready messages from its queue and POSTs
//! each to an instance with a free slot (at most `prefetch` in flight per instance). The answer
//! settles the message: 2xx acks it; 429 or 503 with `Retry-After` gives it back for later
//! without counting an attempt; any other answer, a broken connection (an instance that died
//! mid-message) or no answer within the worker's `timeout` fails the delivery, which the queue
//! retries with backoff or moves to the dead letters. A message is leased before it is sent,
//! so a surge that dies mid-delivery redelivers it after its restart.

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use surge_config::WorkerConfig;
use surge_pool::{error_chain, InFlight, Pool};
use tokio::sync::watch;

use crate::job::{decode_request, JobAnswer, REQUEST_TYPE};
use crate::state::{Delivery, Failed};
use crate::{http::id_text, Queue};

/// What of a failed answer's body goes into the message's last error.
const ERROR_SNIPPET: usize = 200;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Delivers `queue`'s messages to `pool`'s instances until `stop` says so.
/// `leases`: the admin API's address, where a worker that answered 202 renews, acks or fails
/// its lease itself.
pub async fn deliver(
    queue: Arc<Queue>,
    pool: Arc<Pool>,
    worker: WorkerConfig,
    leases: Option<String>,
    mut stop: watch::Receiver<bool>,
) {
    let leases: Arc<Option<String>> = Arc::new(leases);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(pool.config().timeouts.connect));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let worker = Arc::new(worker);
    // An autoscaled pool sizes itself on the messages waiting for it as on waiting requests.
    let backlog = Arc::clone(&queue);
    pool.load().set_backlog(move || backlog.ready_now());
    queue.workers_take(worker.prefetch as usize * pool.config().instances.max as usize);
    let mut pacer = worker.max_rate.map(Pacer::new);
    loop {
        // A message first, so that no slot is held (and counted as load) while none is ready.
        while !queue.has_ready() {
            tokio::select! {
                biased;
                _ = stop.changed() => return,
                () = queue.wait_ready() => {}
            }
        }
        let slot = tokio::select! {
            biased;
            _ = stop.changed() => return,
            slot = free_slot(&pool, worker.prefetch as usize) => slot,
        };
        if let Some(pacer) = &mut pacer {
            let now = tokio::time::Instant::now();
            let at = pacer.take(now);
            if at > now {
                tokio::select! {
                    biased;
                    _ = stop.changed() => return,
                    () = tokio::time::sleep_until(at) => {}
                }
            }
        }
        let Some(delivery) = queue.lease(1).pop() else {
            // Another dispatcher of the same queue took it.
            slot.cancel();
            continue;
        };
        let (client, queue, pool, worker, leases) =
            (client.clone(), Arc::clone(&queue), Arc::clone(&pool), Arc::clone(&worker), Arc::clone(&leases));
        tokio::spawn(async move {
            send(&client, &queue, &pool, slot, delivery, &worker, leases.as_deref()).await
        });
    }
}

/// Spaces deliveries `1 / max_rate` apart: a worker pool that protects a downstream API. No
/// burst is saved up while idle.
struct Pacer {
    interval: Duration,
    next: Option<tokio::time::Instant>,
}

impl Pacer {
    fn new(per_second: f64) -> Self {
        Pacer { interval: Duration::from_secs_f64(1.0 / per_second), next: None }
    }

    /// When a delivery asked for at `now` may start; it counts as taken.
    fn take(&mut self, now: tokio::time::Instant) -> tokio::time::Instant {
        let at = self.next.map_or(now, |next| next.max(now));
        self.next = Some(at + self.interval);
        at
    }
}

/// Claims a slot on the ready instance with the fewest in flight, below `prefetch`; waits in
/// the pool's queue for one (a pool at zero is asked to start an instance).
async fn free_slot(pool: &Pool, prefetch: usize) -> InFlight {
    let try_claim = || {
        let ready = pool.ready();
        // The least busy, ties broken from a random place: messages arriving one at a time
        // spread over idle instances instead of all going to the first.
        let start = fastrand::usize(..ready.len().max(1));
        let instance = ready[start..]
            .iter()
            .chain(&ready[..start])
            .filter(|i| i.is_available() && i.in_flight() < prefetch)
            .min_by_key(|i| i.in_flight())?;
        instance.begin()
    };
    let mut waiting = Waiting { pool, ticket: None };
    std::future::poll_fn(|cx| {
        if let Some(slot) = try_claim() {
            return Poll::Ready(slot);
        }
        if pool.ready().is_empty() {
            pool.signal_demand();
        }
        pool.load().queue().wait(&mut waiting.ticket, cx.waker());
        // A slot freed between the look and the wait would have woken no one.
        match try_claim() {
            Some(slot) => Poll::Ready(slot),
            None => Poll::Pending,
        }
    })
    .await
}

/// A place in the pool's wait queue, given back however the wait ends.
struct Waiting<'a> {
    pool: &'a Pool,
    ticket: Option<surge_pool::Ticket>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.pool.load().queue().leave(ticket, true);
        }
    }
}

/// How one delivery ended.
enum Answer {
    Status { status: StatusCode, retry_after: Option<SystemTime>, headers: http::HeaderMap, body: Bytes },
    Broken { refused: bool, error: String },
    TimedOut,
}

async fn send(
    client: &HttpClient,
    queue: &Queue,
    pool: &Pool,
    mut slot: InFlight,
    delivery: Delivery,
    worker: &WorkerConfig,
    leases: Option<&str>,
) {
    let payload = match queue.payload(&delivery) {
        Ok(payload) => payload,
        Err(err) => {
            slot.cancel();
            settle_failure(queue, &delivery, &format!("its payload cannot be read: {err}")).await;
            return;
        }
    };
    let instance = Arc::clone(slot.instance());
    let left = Duration::from_millis(delivery.until.saturating_sub(crate::now_ms())).min(worker.timeout);
    let job = delivery.content_type.as_deref() == Some(REQUEST_TYPE);
    let request = match request(&instance.addr.to_string(), queue.name(), worker, &delivery, payload, left) {
        Ok(mut request) => {
            lease_fields(request.headers_mut(), queue.name(), &delivery, leases);
            request
        }
        Err(problem) => {
            slot.cancel();
            settle_failure(queue, &delivery, &problem).await;
            return;
        }
    };
    let answer = match tokio::time::timeout(worker.timeout, exchange(client, request)).await {
        Ok(answer) => answer,
        Err(_) => Answer::TimedOut,
    };
    let id = delivery.id;
    match answer {
        Answer::Status { status: StatusCode::ACCEPTED, .. } if !job => {
            // The worker took it on and settles the lease itself (or lets it run out).
            pool.report(&mut slot, true);
        }
        Answer::Status { status, headers, body, .. } if status.is_success() => {
            pool.report(&mut slot, true);
            // Kept first, so that the job is never gone without its answer.
            if job {
                let answer = JobAnswer { status, headers: end_to_end(headers), body };
                if let Err(err) = queue.keep_answer(id, answer).await {
                    settle_failure(queue, &delivery, &format!("its answer cannot be kept: {err}")).await;
                    return;
                }
            }
            if queue.ack(id, delivery.token).await.is_err() {
                tracing::debug!(
                    "queue {}: message {} answered after its lease ended",
                    queue.name(),
                    id_text(id)
                );
            }
        }
        Answer::Status { status, retry_after: Some(at), .. }
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE =>
        {
            pool.report(&mut slot, true);
            let _ = queue.defer(id, delivery.token, at).await;
        }
        Answer::Status { status, body, .. } => {
            // A 4xx is about the message, not the instance.
            pool.report(&mut slot, status.is_client_error());
            let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_SNIPPET)]).trim().to_owned();
            let snippet = if text.is_empty() { String::new() } else { format!(": {text}") };
            settle_failure(queue, &delivery, &format!("{} answered {status}{snippet}", instance.id)).await;
        }
        Answer::Broken { refused, error } => {
            if refused {
                pool.report_refused(&mut slot, &error);
            } else {
                pool.report(&mut slot, false);
            }
            settle_failure(queue, &delivery, &format!("{}: {error}", instance.id)).await;
        }
        Answer::TimedOut => {
            pool.report(&mut slot, false);
            let error =
                format!("{} did not answer within {:?} (workers' timeout)", instance.id, worker.timeout);
            settle_failure(queue, &delivery, &error).await;
        }
    }
}

/// Where and with what a worker settles the lease itself.
fn lease_fields(headers: &mut http::HeaderMap, queue: &str, delivery: &Delivery, leases: Option<&str>) {
    if let Ok(token) = HeaderValue::from_str(&format!("{:016x}", delivery.token)) {
        headers.insert("x-surge-lease-token", token);
    }
    if let Some(base) = leases {
        let url = format!("{base}/queues/{queue}/leases/{}", id_text(delivery.id));
        if let Ok(url) = HeaderValue::from_str(&url) {
            headers.insert("x-surge-lease-url", url);
        }
    }
}

async fn settle_failure(queue: &Queue, delivery: &Delivery, error: &str) {
    let id = id_text(delivery.id);
    match queue.fail(delivery.id, delivery.token, error).await {
        Ok(Failed::Dead) => tracing::warn!(
            "queue {}: message {id} failed {} times and went to the dead letters; last: {error}",
            queue.name(),
            delivery.attempt
        ),
        Ok(Failed::Dropped) => tracing::warn!(
            "queue {}: message {id} failed {} times and was dropped (dead_letter = false); last: {error}",
            queue.name(),
            delivery.attempt
        ),
        Ok(Failed::RetryAt(_)) => {
            tracing::debug!("queue {}: message {id} failed, retried later: {error}", queue.name())
        }
        Err(_) => tracing::debug!("queue {}: message {id} failed after its lease ended", queue.name()),
    }
}

/// The delivery as a request: a POST of the payload to the worker's path, or, for a job, the
/// request that was enqueued, as it was sent.
fn request(
    addr: &str,
    queue: &str,
    worker: &WorkerConfig,
    delivery: &Delivery,
    payload: Bytes,
    left: Duration,
) -> Result<Request<Full<Bytes>>, String> {
    let (method, target, stored_headers, body) = if delivery.content_type.as_deref() == Some(REQUEST_TYPE) {
        let stored = decode_request(&payload)?;
        (stored.method, stored.target, Some(stored.headers), stored.body)
    } else {
        (http::Method::POST, worker.path.clone(), None, payload)
    };
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = format!("http://{addr}{target}")
        .parse()
        .map_err(|err| format!("the request target does not parse: {err}"))?;
    if let Some(stored) = stored_headers {
        *request.headers_mut() = stored;
    }
    let headers = request.headers_mut();
    let enqueued = SystemTime::UNIX_EPOCH + Duration::from_millis(delivery.enqueued_at);
    let fields = [
        ("x-surge-queue", queue.to_owned()),
        ("x-surge-message-id", id_text(delivery.id)),
        ("x-surge-attempt", delivery.attempt.to_string()),
        ("x-surge-enqueued-at", humantime::format_rfc3339_millis(enqueued).to_string()),
        ("x-surge-deadline-ms", left.as_millis().to_string()),
    ];
    for (name, value) in fields {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    }
    let own_type = delivery.content_type.as_deref().filter(|t| *t != REQUEST_TYPE);
    if let Some(value) = own_type.and_then(|t| HeaderValue::from_str(t).ok()) {
        headers.insert(CONTENT_TYPE, value);
    }
    // The job is part of the trace of the request that published it.
    if let Some(value) = delivery.traceparent.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
        headers.insert("traceparent", value);
    }
    Ok(request)
}

async fn exchange(client: &HttpClient, request: Request<Full<Bytes>>) -> Answer {
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(err) => {
            let refused =
                find_io_error(&err).is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            return Answer::Broken { refused, error: error_chain(&err) };
        }
    };
    let status = response.status();
    let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(retry_after);
    let (parts, body) = response.into_parts();
    // Read to the end, so the connection can be reused.
    match body.collect().await {
        Ok(body) => Answer::Status { status, retry_after, headers: parts.headers, body: body.to_bytes() },
        Err(err) => Answer::Broken {
            refused: false,
            error: format!("answered {status}, then the body broke off: {err}"),
        },
    }
}

/// An answer's fields less those that belonged to the worker's connection.
fn end_to_end(mut headers: http::HeaderMap) -> http::HeaderMap {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    for name in crate::job::HOP_BY_HOP.iter().copied().chain(named.iter().map(String::as_str)) {
        headers.remove(name);
    }
    headers
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(value: &str) -> Option<SystemTime> {
    match value.trim().parse::<u64>() {
        // A day at most: a worker cannot park a message for good.
        Ok(seconds) => Some(SystemTime::now() + Duration::from_secs(seconds.min(86_400))),
        Err(_) => httpdate::parse_http_date(value)
            .ok()
            .map(|at| at.min(SystemTime::now() + Duration::from_secs(86_400))),
    }
}

fn find_io_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cause = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_rate_spaces_starts_without_saving_a_burst() {
        let start = tokio::time::Instant::now();
        let mut pacer = Pacer::new(5.0);
        let gap = Duration::from_millis(200);
        let starts: Vec<_> = (0..4).map(|_| pacer.take(start)).collect();
        assert_eq!(starts, [start, start + gap, start + 2 * gap, start + 3 * gap]);
        let later = start + Duration::from_secs(10);
        assert_eq!((pacer.take(later), pacer.take(later)), (later, later + gap));
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        assert!(retry_after("30").is_some());
        let date = retry_after("Wed, 21 Oct 2015 07:28:00 GMT").expect("date");
        assert_eq!(httpdate::fmt_http_date(date), "Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(retry_after("soon"), None);
    }
}
