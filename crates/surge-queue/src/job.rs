//! Async request-reply: a request to an `async` route becomes a message whose payload is the
//! request itself (`message/http`: its head as HTTP/1.1 writes it, then its body). The worker
//! gets that request as it was sent, and its answer is kept for `GET /jobs/ID` for the queue's
//! `result_ttl`, on disk before the message is acked (crate::answers), so a restart loses none.

use std::collections::{BTreeSet, HashMap};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// The media type of a message that is an HTTP request (RFC 9112, section 10.1).
pub const REQUEST_TYPE: &str = "message/http";
/// Fields that belong to one connection, not to the request: not kept.
pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// A request as a message payload.
pub fn encode_request(method: &Method, target: &str, headers: &HeaderMap, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(256 + body.len());
    out.extend_from_slice(format!("{method} {target} HTTP/1.1\r\n").as_bytes());
    for (name, value) in headers.iter().filter(|(name, _)| !HOP_BY_HOP.contains(&name.as_str())) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out.freeze()
}

/// A request read back from its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRequest {
    pub method: Method,
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub fn decode_request(payload: &Bytes) -> Result<StoredRequest, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut head = httparse::Request::new(&mut fields);
    let length = match head.parse(payload) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Err("the stored request's head is cut short".into()),
        Err(err) => return Err(format!("the stored request does not parse: {err}")),
    };
    let method = head.method.and_then(|m| Method::from_bytes(m.as_bytes()).ok()).ok_or("no method")?;
    let target = head.path.ok_or("no target")?.to_owned();
    // Origin form only: the worker's address is the dispatcher's to choose.
    if !target.starts_with('/') {
        return Err(format!("the stored request's target {target:?} is not a path"));
    }
    let mut headers = HeaderMap::new();
    for field in head.headers.iter() {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(field.name.as_bytes()), HeaderValue::from_bytes(field.value))
        {
            headers.append(name, value);
        }
    }
    Ok(StoredRequest { method, target, headers, body: payload.slice(length..) })
}

/// A worker's answer to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobAnswer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Answers kept until they expire (times in ms since the epoch, so that answers read back
/// after a restart keep theirs).
#[derive(Debug, Default)]
pub struct Answers {
    by_id: HashMap<u64, (u64, JobAnswer)>,
    /// (expires at, id), soonest first.
    expiry: BTreeSet<(u64, u64)>,
}

impl Answers {
    /// Keeps `answer` until `expires_at`; a second answer to the same job replaces the first.
    pub fn keep(&mut self, id: u64, answer: JobAnswer, expires_at: u64, now: u64) {
        self.forget_expired(now);
        if expires_at <= now {
            return;
        }
        if let Some((before, _)) = self.by_id.insert(id, (expires_at, answer)) {
            self.expiry.remove(&(before, id));
        }
        self.expiry.insert((expires_at, id));
    }

    pub fn get(&mut self, id: u64, now: u64) -> Option<JobAnswer> {
        self.forget_expired(now);
        self.by_id.get(&id).map(|(_, answer)| answer.clone())
    }

    fn forget_expired(&mut self, now: u64) {
        while let Some(&(expires, id)) = self.expiry.first() {
            if expires > now {
                break;
            }
            self.expiry.pop_first();
            self.by_id.remove(&id);
        }
    }
}

/// Where a job is, as `GET /jobs/ID` says while it has no answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobJson {
    pub id: String,
    /// queued, running, retrying, done, dead, or unknown (never seen, or its answer expired).
    pub state: String,
    pub attempts: u32,
    pub error: Option<String>,
}

/// A job's id as clients see it: its queue, its message id, and a tag only the queue can make
/// (a keyed hash of the id), so that knowing one job's id tells nothing of another's.
pub fn job_id(queue: &str, id: u64, tag: u64) -> String {
    format!("{queue}-{}{tag:016x}", crate::http::id_text(id))
}

/// The queue, message id and tag a job id names.
pub fn parse_job_id(text: &str) -> Option<(&str, u64, u64)> {
    let (queue, rest) = text.rsplit_once('-')?;
    if rest.len() != 32 || !rest.is_ascii() {
        return None;
    }
    let (id, tag) = rest.split_at(16);
    Some((queue, crate::http::parse_id(id)?, u64::from_str_radix(tag, 16).ok()?))
}

/// The largest number of fields a stored request may have.
pub const MAX_FIELDS: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_reads_back_as_it_was_without_its_framing() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("content-length", HeaderValue::from_static("2"));
        headers.insert("x-user", HeaderValue::from_static("ada"));
        let payload = encode_request(&Method::PUT, "/reports/7?format=pdf", &headers, b"{}");
        let request = decode_request(&payload).expect("decodes");
        assert_eq!((request.method, request.target.as_str()), (Method::PUT, "/reports/7?format=pdf"));
        assert_eq!(request.headers.get("x-user").map(|v| v.as_bytes()), Some(&b"ada"[..]));
        assert!(request.headers.get("content-length").is_none());
        assert_eq!(request.body, "{}");
    }

    #[test]
    fn answers_expire_after_their_time() {
        let mut answers = Answers::default();
        let answer =
            JobAnswer { status: StatusCode::OK, headers: HeaderMap::new(), body: Bytes::from("done") };
        answers.keep(7, answer.clone(), 60_000, 0);
        assert_eq!(answers.get(7, 59_999), Some(answer.clone()));
        assert_eq!(answers.get(7, 60_000), None);
        answers.keep(8, answer.clone(), 10, 20);
        assert_eq!(answers.get(8, 20), None, "an answer read back after its time is not kept");
    }

    #[test]
    fn a_later_answer_replaces_the_first_with_its_own_time() {
        let mut answers = Answers::default();
        let first = JobAnswer { status: StatusCode::OK, headers: HeaderMap::new(), body: Bytes::from("one") };
        let second = JobAnswer { body: Bytes::from("two"), ..first.clone() };
        answers.keep(7, first, 100, 0);
        answers.keep(7, second.clone(), 500, 50);
        assert_eq!(answers.get(7, 200), Some(second), "the first's expiry no longer applies");
        assert_eq!(answers.get(7, 500), None);
    }

    #[test]
    fn job_ids_name_queue_and_message() {
        let id = job_id("pdf-reports", 255, 0xabc);
        assert_eq!(id, "pdf-reports-00000000000000ff0000000000000abc");
        assert_eq!(parse_job_id(&id), Some(("pdf-reports", 255, 0xabc)));
        assert_eq!(parse_job_id("pdf-reports-00000000000000ff"), None, "no tag");
        assert_eq!(parse_job_id("nodash"), None);
    }
}
