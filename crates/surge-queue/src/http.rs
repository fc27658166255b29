//! What a publish over HTTP means, for the admin API and the gateway alike: the request's
//! headers and body as messages, and the JSON answers. No serving here, only the reading.
//!
//! - `POST /queues/NAME/messages`: the body is the payload and its `Content-Type` is kept;
//!   `Idempotency-Key` names the message, `Delay: 30s` or `Not-Before: <RFC 3339>` holds it.
//! - `POST /queues/NAME/messages:batch`: a JSON array, or JSON lines, of
//!   `{"body": "...", "content_type": "...", "idempotency_key": "...", "delay": "30s"}`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderMap, CONTENT_TYPE};
use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::{NewMessage, PublishError, Published, Queue};

/// The answer to a publish: 202 with the message's id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedJson {
    pub queue: String,
    pub id: String,
    /// An earlier publish with the same `Idempotency-Key` made it.
    pub duplicate: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchJson {
    pub queue: String,
    pub messages: Vec<PublishedJson>,
}

/// A queue as `/queues` and `surge queues` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueStatus {
    pub queue: String,
    /// Ready to deliver now.
    pub ready: u64,
    /// Waiting for a delay or a retry's backoff.
    pub delayed: u64,
    pub in_flight: u64,
    pub dead: u64,
    /// Payload bytes held, dead letters included.
    pub bytes: u64,
    /// How long the oldest message not yet done with has waited.
    pub oldest_age_seconds: Option<f64>,
    /// Since surge started:
    pub published: u64,
    pub delivered: u64,
    pub acked: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub redriven: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuesResponse {
    pub queues: Vec<QueueStatus>,
}

/// A dead letter as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeadLetterJson {
    pub id: String,
    pub attempts: u32,
    pub enqueued_at: String,
    pub error: Option<String>,
    pub content_type: Option<String>,
    /// The payload as text, when it is UTF-8.
    pub body: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLettersResponse {
    pub queue: String,
    pub dead: Vec<DeadLetterJson>,
}

/// `POST /queues/NAME/dead/redrive` and `.../dead/purge`: `{"ids": [...]}`, or all without.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeadRequest {
    pub ids: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadResponse {
    pub queue: String,
    pub redriven: Option<usize>,
    pub purged: Option<usize>,
}

/// A message id as clients see it.
pub fn id_text(id: u64) -> String {
    format!("{id:016x}")
}

/// The id back from its text.
pub fn parse_id(text: &str) -> Option<u64> {
    u64::from_str_radix(text, 16).ok()
}

pub fn published_json(queue: &str, published: &Published) -> PublishedJson {
    PublishedJson { queue: queue.to_owned(), id: id_text(published.id), duplicate: published.duplicate }
}

/// One message from a request's headers and body.
pub fn message_from(headers: &HeaderMap, body: Bytes) -> Result<NewMessage, String> {
    let text = |name: &str| -> Result<Option<String>, String> {
        match headers.get(name) {
            None => Ok(None),
            Some(value) => value
                .to_str()
                .map(|v| Some(v.trim().to_owned()))
                .map_err(|_| format!("the {name} header is not text")),
        }
    };
    checked_type(headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()))?;
    let delay = text("delay")?;
    let not_before = text("not-before")?;
    let key = text("idempotency-key")?;
    Ok(NewMessage {
        payload: body,
        content_type: text(CONTENT_TYPE.as_str())?,
        idempotency_key: checked_key(key)?,
        not_before: when(delay.as_deref(), not_before.as_deref())?,
        traceparent: traceparent(headers),
    })
}

/// The request's W3C `traceparent`, when it has one of the right shape (version, trace id,
/// parent id and flags in lower-case hex); anything else is not kept.
pub fn traceparent(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let fields: Vec<&str> = value.split('-').collect();
    let hex = |field: &str, len: usize| {
        field.len() == len && field.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let shaped =
        matches!(fields.as_slice(), [v, t, p, f] if hex(v, 2) && hex(t, 32) && hex(p, 16) && hex(f, 2));
    shaped.then(|| value.to_owned())
}

/// One entry of a batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchEntry {
    body: String,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    delay: Option<String>,
    not_before: Option<String>,
}

/// The messages of a batch: a JSON array, or one JSON object per line; each carries the
/// request's `traceparent`.
pub fn batch_from(body: &[u8], traceparent: Option<&str>) -> Result<Vec<NewMessage>, String> {
    let trimmed = body.trim_ascii_start();
    let entries: Vec<BatchEntry> = if trimmed.starts_with(b"[") {
        serde_json::from_slice(trimmed)
            .map_err(|err| format!("the batch is not a JSON array of messages: {err}"))?
    } else {
        trimmed
            .split(|b| *b == b'\n')
            .enumerate()
            .filter(|(_, line)| !line.trim_ascii().is_empty())
            .map(|(i, line)| {
                serde_json::from_slice(line).map_err(|err| format!("line {} of the batch: {err}", i + 1))
            })
            .collect::<Result<_, _>>()?
    };
    if entries.is_empty() {
        return Err("the batch holds no message".into());
    }
    entries
        .into_iter()
        .map(|entry| {
            checked_type(entry.content_type.as_deref())?;
            Ok(NewMessage {
                payload: Bytes::from(entry.body),
                content_type: entry.content_type,
                idempotency_key: checked_key(entry.idempotency_key)?,
                not_before: when(entry.delay.as_deref(), entry.not_before.as_deref())?,
                traceparent: traceparent.map(str::to_owned),
            })
        })
        .collect()
}

/// A publish's answer: the status and the JSON body.
pub type Answer = (StatusCode, serde_json::Value);

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    (status, serde_json::json!({ "error": message.into() }))
}

/// The status a failed publish gets: 413 too large, 507 full, 503 not stored or no broker.
pub fn refused(err: &PublishError) -> Answer {
    let status = match err {
        PublishError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        PublishError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
        PublishError::Storage { .. } | PublishError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, err.to_string())
}

/// `POST /queues/NAME/messages`: 202 once durable.
pub async fn publish_one(queue: &Arc<Queue>, headers: &HeaderMap, body: Bytes) -> Answer {
    let message = match message_from(headers, body) {
        Ok(message) => message,
        Err(problem) => return error(StatusCode::BAD_REQUEST, problem),
    };
    match queue.publish(vec![message]).await {
        Ok(published) => match published.first() {
            Some(published) => (StatusCode::ACCEPTED, json(&published_json(queue.name(), published))),
            None => error(StatusCode::INTERNAL_SERVER_ERROR, "the publish answered nothing"),
        },
        Err(err) => refused(&err),
    }
}

/// `POST /queues/NAME/messages:batch`: 202 once all are durable; none is enqueued on an error.
pub async fn publish_batch(queue: &Arc<Queue>, headers: &HeaderMap, body: &[u8]) -> Answer {
    let messages = match batch_from(body, traceparent(headers).as_deref()) {
        Ok(messages) => messages,
        Err(problem) => return error(StatusCode::BAD_REQUEST, problem),
    };
    match queue.publish(messages).await {
        Ok(published) => {
            let messages = published.iter().map(|p| published_json(queue.name(), p)).collect();
            (StatusCode::ACCEPTED, json(&BatchJson { queue: queue.name().to_owned(), messages }))
        }
        Err(err) => refused(&err),
    }
}

/// The answer for a queue nobody defined.
pub fn unknown_queue(name: &str) -> Answer {
    error(StatusCode::NOT_FOUND, format!("no queue named `{name}` (see [queues] in surge.toml)"))
}

fn json(value: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// The longest delay a message may be given: 30 days (RabbitMQ's per-message TTL ends at
/// about 49).
pub const LONGEST_DELAY: Duration = Duration::from_secs(30 * 24 * 3600);

/// A Content-Type a publisher may give: up to 255 bytes (AMQP's limit for it), and not
/// `message/http`, the type of the requests async routes enqueue, which the dispatcher replays
/// to workers as requests.
fn checked_type(content_type: Option<&str>) -> Result<(), String> {
    if content_type.is_some_and(|t| t.len() > 255) {
        return Err("a Content-Type is at most 255 bytes".into());
    }
    let essence = content_type.and_then(|t| t.split(';').next()).map(str::trim);
    if essence.is_some_and(|t| t.eq_ignore_ascii_case(crate::job::REQUEST_TYPE)) {
        return Err(format!(
            "Content-Type {} is kept for the requests of async routes",
            crate::job::REQUEST_TYPE
        ));
    }
    Ok(())
}

/// An `Idempotency-Key` as given, or why it cannot be one.
pub fn checked_key(key: Option<String>) -> Result<Option<String>, String> {
    match key {
        Some(key) if key.is_empty() || key.len() > 255 => {
            Err("an Idempotency-Key is 1 to 255 characters".into())
        }
        other => Ok(other),
    }
}

/// When a message may first be delivered: after a delay, or at a time.
fn when(delay: Option<&str>, not_before: Option<&str>) -> Result<Option<SystemTime>, String> {
    let at = given_time(delay, not_before)?;
    let latest = SystemTime::now() + LONGEST_DELAY;
    if at.is_some_and(|at| at > latest) {
        return Err("a message can be delayed 30 days at most".into());
    }
    Ok(at)
}

fn given_time(delay: Option<&str>, not_before: Option<&str>) -> Result<Option<SystemTime>, String> {
    match (delay, not_before) {
        (Some(_), Some(_)) => Err("give Delay or Not-Before, not both".into()),
        (Some(delay), None) => {
            let delay: Duration = humantime::parse_duration(delay)
                .map_err(|err| format!("Delay: \"{delay}\" is not a duration like 30s: {err}"))?;
            SystemTime::now()
                .checked_add(delay)
                .map(Some)
                .ok_or_else(|| format!("Delay: \"{delay:?}\" is too far off"))
        }
        (None, Some(at)) => humantime::parse_rfc3339_weak(at).map(Some).map_err(|err| {
            format!("Not-Before: \"{at}\" is not an RFC 3339 time like 2026-12-01T12:00:00Z: {err}")
        }),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_say_type_key_and_time() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, "application/json".parse().expect("value"));
        headers.insert("idempotency-key", "order-7".parse().expect("value"));
        let tomorrow =
            humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(86_400)).to_string();
        headers.insert("not-before", tomorrow.parse().expect("value"));
        let message = message_from(&headers, Bytes::from_static(b"{}")).expect("valid");
        assert_eq!(message.content_type.as_deref(), Some("application/json"));
        assert_eq!(message.idempotency_key.as_deref(), Some("order-7"));
        let at = humantime::parse_rfc3339(&tomorrow).expect("time");
        assert_eq!(message.not_before, Some(at));

        headers.insert("not-before", "2099-01-01T00:00:00Z".parse().expect("value"));
        assert!(message_from(&headers, Bytes::new()).expect_err("far").contains("30 days at most"));
        headers.insert("not-before", tomorrow.parse().expect("value"));
        headers.insert(CONTENT_TYPE, "x".repeat(256).parse().expect("value"));
        assert!(message_from(&headers, Bytes::new()).expect_err("long").contains("at most 255 bytes"));
        headers.insert(CONTENT_TYPE, "application/json".parse().expect("value"));

        headers.insert("delay", "5s".parse().expect("value"));
        assert!(message_from(&headers, Bytes::new()).expect_err("both").contains("not both"));
        headers.remove("not-before");
        headers.insert("delay", "soon".parse().expect("value"));
        assert!(message_from(&headers, Bytes::new()).expect_err("bad").contains("Delay: \"soon\""));
    }

    #[test]
    fn batches_are_arrays_or_lines() {
        let array =
            br#"[{"body": "a"}, {"body": "b", "idempotency_key": "k", "content_type": "text/plain"}]"#;
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let messages = batch_from(array, Some(traceparent)).expect("array");
        assert_eq!(messages.len(), 2);
        assert!(
            messages.iter().all(|m| m.traceparent.as_deref() == Some(traceparent)),
            "the request's trace"
        );
        assert_eq!(messages[1].idempotency_key.as_deref(), Some("k"));
        let lines = b"{\"body\": \"a\"}\n\n{\"body\": \"b\", \"delay\": \"1m\"}\n";
        let messages = batch_from(lines, None).expect("lines");
        assert_eq!((messages[0].payload.as_ref(), messages[1].not_before.is_some()), (&b"a"[..], true));
        assert!(batch_from(b"{\"body\": 1}", None).expect_err("bad").starts_with("line 1"));
        assert!(batch_from(b"[]", None).is_err());
    }

    #[test]
    fn only_a_well_shaped_traceparent_is_kept() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", value.parse().expect("value"));
            traceparent(&headers)
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(with(good).as_deref(), Some(good));
        assert_eq!(with("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"), None);
        assert_eq!(with("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"), None);
        assert_eq!(traceparent(&HeaderMap::new()), None);
    }

    #[test]
    fn ids_read_back() {
        assert_eq!(id_text(255), "00000000000000ff");
        assert_eq!(parse_id(&id_text(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_id("zz"), None);
    }
}
