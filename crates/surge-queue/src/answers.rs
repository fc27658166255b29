//! Workers' answers to jobs, kept for the queue's `result_ttl` in a log of their own
//! (`answers/` in the queue's folder, the same segmented log as the messages'): an answer is on
//! disk before its message is acked, so a restart never leaves a done job without its answer.
//! Memory holds them as well, for `GET /jobs/ID`; a segment is deleted once every answer in it
//! has expired.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use crate::job::{Answers, JobAnswer};
use crate::log::{Log, OpenError};
use crate::now_ms;
use crate::record::{Record, MAX_PAYLOAD};

/// Answers are short-lived: small segments let expired ones leave the disk soon.
const SEGMENT_SIZE: u64 = 8 * 1024 * 1024;

pub(crate) struct AnswerStore {
    log: Log,
    kept: Mutex<Kept>,
}

struct Kept {
    answers: Answers,
    /// Each segment's latest expiry (ms since the epoch). By segment, not by arrival: two
    /// answers either side of a new segment may be noted in either order.
    segments: BTreeMap<u64, u64>,
}

impl Kept {
    fn note(&mut self, segment: u64, expires_at: u64) {
        let latest = self.segments.entry(segment).or_insert(expires_at);
        *latest = (*latest).max(expires_at);
    }

    /// The segment before which every answer has expired, when that frees one (the segment
    /// being written is never deleted).
    fn expired_before(&mut self, now: u64) -> Option<u64> {
        let mut cut = None;
        while self.segments.len() > 1
            && self.segments.first_key_value().is_some_and(|(_, latest)| *latest <= now)
        {
            self.segments.pop_first();
            cut = self.segments.first_key_value().map(|(segment, _)| *segment);
        }
        cut
    }
}

impl AnswerStore {
    /// Opens the answers kept in `dir`/answers, reading back those not yet expired.
    pub fn open(dir: &Path) -> Result<AnswerStore, OpenError> {
        let now = now_ms();
        let mut kept = Kept { answers: Answers::default(), segments: BTreeMap::new() };
        let folder = dir.join("answers");
        let (log, recovered) = Log::open(&folder, SEGMENT_SIZE, |record, segment, _| {
            if let Record::Answer { id, expires_at, status, fields, body } = record {
                kept.note(segment, *expires_at);
                if let Some(answer) = from_record(*status, fields, body) {
                    kept.answers.keep(*id, answer, *expires_at, now);
                }
            }
        })?;
        if let Some((path, at, dropped)) = &recovered.torn_tail {
            tracing::warn!(
                "{}: dropped {dropped} bytes of a job answer cut short at offset {at}",
                path.display()
            );
        }
        if let Some(repaired) = &recovered.repaired {
            tracing::warn!(
                "{}: damaged; kept its whole answers, the file as it was is {}",
                repaired.path.display(),
                repaired.original.display()
            );
        }
        let store = AnswerStore { log, kept: Mutex::new(kept) };
        store.delete_expired(now);
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps `answer` for `ttl`; returns once it is on disk. An answer larger than a message
    /// may be is refused: the log could not read it back.
    pub async fn keep(&self, id: u64, answer: JobAnswer, ttl: Duration) -> io::Result<()> {
        if answer.body.len() as u64 > MAX_PAYLOAD {
            return Err(io::Error::other(format!(
                "the answer's body is {} bytes, more than the {MAX_PAYLOAD} an answer may have",
                answer.body.len()
            )));
        }
        let expires_at = now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut bytes = Vec::with_capacity(answer.body.len() + 256);
        to_record(id, expires_at, &answer).encode(&mut bytes);
        let at = self.log.submit(bytes).await?;
        let now = now_ms();
        {
            let mut kept = self.lock();
            kept.note(at.segment, expires_at);
            kept.answers.keep(id, answer, expires_at, now);
        }
        self.delete_expired(now);
        Ok(())
    }

    pub fn get(&self, id: u64) -> Option<JobAnswer> {
        self.lock().answers.get(id, now_ms())
    }

    fn delete_expired(&self, now: u64) {
        let cut = self.lock().expired_before(now);
        if let Some(segment) = cut {
            if let Err(err) = self.log.delete_before(segment) {
                tracing::warn!("cannot delete expired job answers: {err}");
            }
        }
    }
}

fn to_record(id: u64, expires_at: u64, answer: &JobAnswer) -> Record {
    let fields = answer
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), Bytes::copy_from_slice(value.as_bytes())))
        .collect();
    Record::Answer { id, expires_at, status: answer.status.as_u16(), fields, body: answer.body.clone() }
}

/// The answer a record holds; fields that are no longer valid are left out.
fn from_record(status: u16, fields: &[(String, Bytes)], body: &Bytes) -> Option<JobAnswer> {
    let status = StatusCode::from_u16(status).ok()?;
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, value) in fields {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_maybe_shared(value.clone()))
        {
            headers.append(name, value);
        }
    }
    Some(JobAnswer { status, headers, body: body.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(body: &'static str) -> JobAnswer {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/csv"));
        headers.append("set-cookie", HeaderValue::from_static("a=1"));
        headers.append("set-cookie", HeaderValue::from_static("b=2"));
        JobAnswer { status: StatusCode::CREATED, headers, body: Bytes::from(body) }
    }

    #[tokio::test]
    async fn answers_outlive_a_restart_with_their_fields_and_time() {
        let dir = tempfile::tempdir().expect("folder");
        {
            let store = AnswerStore::open(dir.path()).expect("open");
            store.keep(7, answer("a,b\n1,2\n"), Duration::from_secs(3600)).await.expect("kept");
            store.keep(8, answer("gone"), Duration::ZERO).await.expect("kept");
        }
        let store = AnswerStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get(7), Some(answer("a,b\n1,2\n")));
        assert_eq!(store.get(8), None, "an expired answer is not read back");
        assert_eq!(store.get(9), None);
    }

    #[tokio::test]
    async fn an_answer_too_large_to_read_back_is_refused() {
        let dir = tempfile::tempdir().expect("folder");
        let store = AnswerStore::open(dir.path()).expect("open");
        let huge = JobAnswer { body: Bytes::from(vec![b'x'; MAX_PAYLOAD as usize + 1]), ..answer("") };
        let refused = store.keep(7, huge, Duration::from_secs(60)).await.expect_err("refused");
        assert!(refused.to_string().contains("more than"), "{refused}");
        assert_eq!(store.get(7), None);
    }

    #[test]
    fn a_segment_goes_once_every_answer_in_it_has_expired() {
        let mut kept = Kept { answers: Answers::default(), segments: BTreeMap::new() };
        kept.note(1, 100);
        kept.note(2, 400);
        // Noted after segment 2's, though written before it.
        kept.note(1, 300);
        kept.note(3, 500);
        assert_eq!(kept.expired_before(299), None, "segment 1 holds an answer until 300");
        assert_eq!(kept.expired_before(300), Some(2));
        assert_eq!(kept.expired_before(450), Some(3), "segment 2's answers are all gone at 450");
        assert_eq!(kept.expired_before(1_000), None, "the segment being written stays");
        assert_eq!(kept.segments, BTreeMap::from([(3, 500)]));
    }

    #[tokio::test]
    async fn expired_segments_leave_the_disk() {
        let dir = tempfile::tempdir().expect("folder");
        let store = AnswerStore::open(dir.path()).expect("open");
        let body: &'static str = Box::leak("x".repeat(1024 * 1024).into_boxed_str());
        // Past one segment of answers that expire at once, then one more.
        for id in 0..9 {
            store.keep(id, answer(body), Duration::ZERO).await.expect("kept");
        }
        store.keep(100, answer("last"), Duration::from_secs(60)).await.expect("kept");
        let segments = std::fs::read_dir(dir.path().join("answers"))
            .expect("answers folder")
            .filter_map(Result::ok)
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "log"))
            .count();
        assert_eq!(segments, 1, "only the segment being written is left");
        assert_eq!(store.get(100), Some(answer("last")));
    }
}
