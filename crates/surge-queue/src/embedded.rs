//! The embedded backend: the state machine behind a lock, the log behind it, and a wake-up for
//! whoever waits for messages. Records enter the log's writer under the state lock, so the
//! log holds the changes in the order the state made them: an ack is never written before
//! the copy of its message that compaction wrote.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use crate::log::{Log, OpenError, Recovered};
use crate::queue::{millis, random_u64, wait_until_due, Core, JobStatus, QueueStore};
use crate::record::{Record, Stored};
use crate::state::{Counts, DeadLetter, Delivery, Failed, Location, QueueState, Settings, Stale};
use crate::{now_ms, NewMessage, PublishError, Published};

/// Messages, and payload bytes, copied forward per round of compaction at most: it reads them
/// under the state lock.
const COMPACT_BATCH: usize = 1_000;
const COMPACT_BYTES: u64 = 4 * 1024 * 1024;
/// Compaction copies the oldest segment's messages forward once this many newer segments
/// wait behind it.
const COMPACT_BEHIND: u64 = 2;

pub(crate) struct Embedded {
    core: Arc<Core>,
    inner: Mutex<Inner>,
    log: Log,
    ready: Notify,
}

struct Inner {
    state: QueueState,
    /// Publishes written but not yet durable.
    pending_messages: u64,
    pending_bytes: u64,
    /// Idempotency keys of publishes not yet durable, and the repeats waiting for them.
    pending_keys: HashMap<String, Vec<oneshot::Sender<Result<u64, PublishError>>>>,
    /// The oldest segment still on disk, and the newest written to.
    oldest_segment: u64,
    newest_segment: u64,
    /// Publishes handed to the log and not yet admitted, by the lowest segment each can be in
    /// (the newest known when it was handed over): no segment from there on may be deleted.
    pending_floors: std::collections::BTreeMap<u64, u64>,
}

impl Embedded {
    /// Opens (or creates) the queue kept in `dir`, recovering every message the log holds.
    pub(crate) fn open(
        core: Arc<Core>,
        dir: &Path,
        settings: Settings,
    ) -> Result<(Embedded, Recovered), OpenError> {
        let mut state = QueueState::new(settings, now_ms().saturating_mul(1_000));
        let (log, recovered) =
            Log::open(dir, core.limits.segment_size, |record, _, location| match (record, location) {
                (Record::Publish(stored), Some(location)) => state.admit(stored, location),
                (record, _) => state.replay(record),
            })?;
        // Time-based, in case the records of the newest ids went with their segments.
        state.ids_above(now_ms() << 10);
        let oldest = state.oldest_segment_in_use().unwrap_or(1);
        let inner = Inner {
            state,
            pending_messages: 0,
            pending_bytes: 0,
            pending_keys: HashMap::new(),
            oldest_segment: oldest,
            newest_segment: oldest,
            pending_floors: std::collections::BTreeMap::new(),
        };
        Ok((Embedded { core, inner: Mutex::new(inner), log, ready: Notify::new() }, recovered))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding it; a poisoned lock is taken over.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands the new messages to the log and admits them once durable, in a task of its own.
    fn write_fresh(
        self: &Arc<Self>,
        fresh: Vec<(usize, Stored)>,
        floor: u64,
    ) -> oneshot::Receiver<Result<Vec<(usize, Published)>, PublishError>> {
        let mut bytes = Vec::with_capacity(fresh.iter().map(|(_, s)| s.payload.len() + 64).sum());
        let mut payload_offsets = Vec::with_capacity(fresh.len());
        for (_, stored) in &fresh {
            let start = bytes.len();
            let payload_at = Record::Publish(stored.clone()).encode(&mut bytes).unwrap_or(0);
            payload_offsets.push((start + payload_at) as u64);
        }
        let durable = self.log.submit(bytes);
        let (answer, answered) = oneshot::channel();
        let queue = Arc::clone(self);
        tokio::spawn(async move {
            let appended = durable.await;
            let _ = answer.send(queue.admit_fresh(&fresh, payload_offsets, appended, floor));
        });
        answered
    }

    fn admit_fresh(
        &self,
        fresh: &[(usize, Stored)],
        payload_offsets: Vec<u64>,
        appended: std::io::Result<crate::log::Appended>,
        floor: u64,
    ) -> Result<Vec<(usize, Published)>, PublishError> {
        let mut answers = Vec::with_capacity(fresh.len());
        let mut inner = self.lock();
        if let Some(count) = inner.pending_floors.get_mut(&floor) {
            *count -= 1;
            if *count == 0 {
                inner.pending_floors.remove(&floor);
            }
        }
        inner.pending_messages -= fresh.len() as u64;
        inner.pending_bytes -= fresh.iter().map(|(_, s)| s.payload.len() as u64).sum::<u64>();
        let result = match appended {
            Ok(at) => {
                inner.newest_segment = inner.newest_segment.max(at.segment);
                for ((index, stored), payload_offset) in fresh.iter().zip(payload_offsets) {
                    let len = u32::try_from(stored.payload.len()).unwrap_or(u32::MAX);
                    let location = Location { segment: at.segment, offset: at.offset + payload_offset, len };
                    inner.state.admit(stored, location);
                    answers.push((*index, Published { id: stored.id, duplicate: false }));
                    if let Some(key) = &stored.idempotency_key {
                        Self::settle_key(&mut inner, key, Ok(stored.id));
                    }
                }
                self.core.totals.published.fetch_add(answers.len() as u64, Ordering::Relaxed);
                Ok(answers)
            }
            Err(err) => {
                let error = self.storage_error(&err.to_string());
                for (_, stored) in fresh {
                    if let Some(key) = &stored.idempotency_key {
                        Self::settle_key(&mut inner, key, Err(error.clone()));
                    }
                }
                tracing::error!("{error}");
                Err(error)
            }
        };
        drop(inner);
        self.ready.notify_waiters();
        result
    }

    fn storage_error(&self, cause: &str) -> PublishError {
        PublishError::Storage { queue: self.core.name.clone(), cause: cause.to_owned() }
    }

    fn settle_key(inner: &mut Inner, key: &str, result: Result<u64, PublishError>) {
        for waiting in inner.pending_keys.remove(key).unwrap_or_default() {
            let _ = waiting.send(result.clone());
        }
    }

    fn room_for(&self, inner: &Inner, count: u64, bytes: u64) -> Result<(), PublishError> {
        let held = inner.state.len() + inner.pending_messages;
        let full = |limit: String| PublishError::Full { queue: self.core.name.clone(), held, limit };
        if let Some(max) = self.core.limits.max_messages {
            if held + count > max {
                return Err(full(format!("max_messages is {max}")));
            }
        }
        if let Some(max) = self.core.limits.max_bytes {
            if inner.state.bytes() + inner.pending_bytes + bytes > max {
                return Err(full(format!("max_size is {max} bytes")));
            }
        }
        Ok(())
    }

    /// Ends the leases that ran out by `now`: each is a failed delivery.
    fn expire(&self, inner: &mut Inner, now: u64) {
        for (_, record, failed) in inner.state.expire(now, fastrand::f64) {
            self.log_later(&record);
            self.count(failed);
        }
    }

    fn count(&self, failed: Failed) {
        let total = match failed {
            Failed::RetryAt(_) => &self.core.totals.retried,
            Failed::Dead | Failed::Dropped => &self.core.totals.dead,
        };
        total.fetch_add(1, Ordering::Relaxed);
    }

    fn log_later(&self, record: &Record) {
        let mut bytes = Vec::with_capacity(64);
        record.encode(&mut bytes);
        self.log.append_later(bytes);
    }

    /// Deletes the segments older than every message still held.
    fn delete_unused_segments(&self, inner: &mut Inner) {
        let pending = inner.pending_floors.keys().next().copied().unwrap_or(u64::MAX);
        let in_use =
            inner.state.oldest_segment_in_use().unwrap_or(u64::MAX).min(inner.newest_segment).min(pending);
        if in_use > inner.oldest_segment {
            match self.log.delete_before(in_use) {
                Ok(_) => inner.oldest_segment = in_use,
                Err(err) => tracing::warn!("queue {}: cannot delete old log segments: {err}", self.core.name),
            }
        }
    }
}

impl QueueStore for Embedded {
    /// Publishes `messages`, answering once all are durable (or were already there, by
    /// idempotency key). Either all are enqueued or, on an error, none of the new ones is.
    /// Cancelling it (a client gone) changes nothing: what was handed to the log is admitted
    /// once durable, and the repeats waiting on its keys are answered.
    async fn publish(self: &Arc<Self>, messages: Vec<NewMessage>) -> Result<Vec<Published>, PublishError> {
        let now = now_ms();
        let began = std::time::Instant::now();
        let mut answers: Vec<Option<Published>> = vec![None; messages.len()];
        let mut repeats = Vec::new();
        let mut fresh: Vec<(usize, Stored)> = Vec::new();
        let floor = {
            let mut inner = self.lock();
            let mut new_keys: Vec<String> = Vec::new();
            for (index, message) in messages.into_iter().enumerate() {
                if let Some(key) = &message.idempotency_key {
                    if let Some(id) = inner.state.keyed(key, now) {
                        answers[index] = Some(Published { id, duplicate: true });
                        continue;
                    }
                    if let Some(waiting) = inner.pending_keys.get_mut(key) {
                        let (tell, told) = oneshot::channel();
                        waiting.push(tell);
                        repeats.push((index, told));
                        continue;
                    }
                }
                if let Err(full) = self.room_for(&inner, fresh.len() as u64 + 1, message.payload.len() as u64)
                {
                    for key in new_keys {
                        Self::settle_key(&mut inner, &key, Err(full.clone()));
                    }
                    inner.pending_bytes -= fresh.iter().map(|(_, s)| s.payload.len() as u64).sum::<u64>();
                    return Err(full);
                }
                if let Some(key) = &message.idempotency_key {
                    inner.pending_keys.insert(key.clone(), Vec::new());
                    new_keys.push(key.clone());
                }
                let id = inner.state.take_id();
                let ready_at = message.not_before.map_or(now, millis).max(now);
                let stored = Stored {
                    id,
                    enqueued_at: now,
                    ready_at,
                    attempts: 0,
                    content_type: message.content_type,
                    idempotency_key: message.idempotency_key,
                    traceparent: message.traceparent,
                    payload: message.payload,
                };
                inner.pending_bytes += stored.payload.len() as u64;
                fresh.push((index, stored));
            }
            inner.pending_messages += fresh.len() as u64;
            if !fresh.is_empty() {
                let floor = inner.newest_segment;
                *inner.pending_floors.entry(floor).or_default() += 1;
                floor
            } else {
                0
            }
        };
        if !fresh.is_empty() {
            let written = self.write_fresh(fresh, floor);
            let stored = written.await.map_err(|_| self.storage_error("the queue stopped"))??;
            let took = began.elapsed().as_secs_f64();
            for (index, published) in stored {
                self.core.latencies.publish.observe(took);
                answers[index] = Some(published);
            }
        }
        for (index, told) in repeats {
            let id = match told.await {
                Ok(result) => result?,
                Err(_) => return Err(self.storage_error("the first publish with this key was abandoned")),
            };
            answers[index] = Some(Published { id, duplicate: true });
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Leases up to `max` ready messages (ending expired leases first).
    fn lease(self: &Arc<Self>, max: usize) -> Vec<Delivery> {
        let now = now_ms();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        // Random tokens: a worker settling its lease itself proves it holds it with one.
        let deliveries = inner.state.lease_with(now, max, random_u64);
        self.core.totals.delivered.fetch_add(deliveries.len() as u64, Ordering::Relaxed);
        deliveries
    }

    /// Messages ready to lease now.
    fn ready_now(&self) -> usize {
        self.lock().state.ready_at(now_ms())
    }

    /// Whether a message is ready to lease now.
    fn has_ready(self: &Arc<Self>) -> bool {
        let now = now_ms();
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        inner.state.has_ready(now)
    }

    /// Waits until a message may be ready: one was published, or a delay, backoff or lease
    /// ends.
    async fn wait_ready(self: &Arc<Self>) {
        wait_until_due(&self.ready, |now| {
            let mut inner = self.lock();
            self.expire(&mut inner, now);
            (!inner.state.has_ready(now)).then(|| inner.state.next_due(now))
        })
        .await
    }

    /// The payload of a leased message.
    fn payload(&self, delivery: &Delivery) -> std::io::Result<Bytes> {
        self.log.read(delivery.location)
    }

    async fn ack(self: &Arc<Self>, id: u64, token: u64) -> Result<(), Stale> {
        let mut inner = self.lock();
        let enqueued_at = inner.state.enqueued_at(id);
        let record = inner.state.ack(id, token)?;
        self.log_later(&record);
        self.core.totals.acked.fetch_add(1, Ordering::Relaxed);
        if let Some(at) = enqueued_at {
            self.core.latencies.end_to_end.observe(now_ms().saturating_sub(at) as f64 / 1000.0);
        }
        self.delete_unused_segments(&mut inner);
        Ok(())
    }

    async fn fail(self: &Arc<Self>, id: u64, token: u64, error: &str) -> Result<Failed, Stale> {
        let mut inner = self.lock();
        let (record, failed) = inner.state.fail(id, token, now_ms(), error, fastrand::f64())?;
        self.log_later(&record);
        self.count(failed);
        if failed == Failed::Dropped {
            self.delete_unused_segments(&mut inner);
        }
        drop(inner);
        // Whoever waits for the next due time must hear of the retry's.
        self.ready.notify_waiters();
        Ok(failed)
    }

    /// Gives a message back, to be delivered again from `at` without counting an attempt.
    async fn defer(self: &Arc<Self>, id: u64, token: u64, at: SystemTime) -> Result<(), Stale> {
        let mut inner = self.lock();
        let record = inner.state.defer(id, token, millis(at), now_ms())?;
        self.log_later(&record);
        drop(inner);
        self.ready.notify_waiters();
        Ok(())
    }

    /// Extends a lease; returns its new end.
    fn renew(&self, id: u64, token: u64) -> Result<SystemTime, Stale> {
        let until = self.lock().state.renew(id, token, now_ms())?;
        Ok(UNIX_EPOCH + Duration::from_millis(until))
    }

    fn job_status(&self, id: u64) -> Option<JobStatus> {
        let (state, attempts, error) = self.lock().state.job_status(id)?;
        Some(JobStatus { state, attempts, error: error.map(|e| e.to_string()) })
    }

    fn counts(&self) -> Counts {
        self.lock().state.counts(now_ms())
    }

    async fn dead_letters(
        self: &Arc<Self>,
        limit: usize,
        body_max: usize,
    ) -> Result<Vec<(DeadLetter, Option<Bytes>)>, PublishError> {
        let letters = self.lock().state.dead_letters(limit);
        let listed = letters
            .into_iter()
            .map(|letter| {
                let small = letter.location.len as usize <= body_max;
                let body = small.then(|| self.log.read(letter.location).ok()).flatten();
                (letter, body)
            })
            .collect();
        Ok(listed)
    }

    /// Puts dead letters (`ids`, or all) back in the queue; returns how many.
    async fn redrive(self: &Arc<Self>, ids: Option<&[u64]>) -> Result<usize, PublishError> {
        let mut inner = self.lock();
        let records = inner.state.redrive(ids, now_ms());
        records.iter().for_each(|record| self.log_later(record));
        drop(inner);
        self.ready.notify_waiters();
        self.core.totals.redriven.fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(records.len())
    }

    /// Drops dead letters (`ids`, or all) for good; returns how many.
    async fn purge(self: &Arc<Self>, ids: Option<&[u64]>) -> Result<usize, PublishError> {
        let mut inner = self.lock();
        let records = inner.state.purge(ids);
        records.iter().for_each(|record| self.log_later(record));
        self.delete_unused_segments(&mut inner);
        Ok(records.len())
    }

    /// Copies the messages still held in the oldest segment forward, when newer segments wait
    /// behind it, so it can be deleted: a message left unacked (a dead letter, say) must not
    /// keep everything written after it on disk. Returns how many it copied.
    async fn compact(self: &Arc<Self>) -> std::io::Result<usize> {
        let (copies, ids) = {
            let inner = self.lock();
            let Some(oldest) = inner.state.oldest_segment_in_use() else { return Ok(0) };
            if inner.newest_segment < oldest + COMPACT_BEHIND {
                return Ok(0);
            }
            let mut bytes = Vec::new();
            let mut ids = Vec::new();
            let mut copied_bytes = 0u64;
            for (id, location) in inner.state.held_in(oldest).into_iter().take(COMPACT_BATCH) {
                if copied_bytes >= COMPACT_BYTES {
                    break;
                }
                copied_bytes += u64::from(location.len);
                let Some(mut stored) = inner.state.as_stored(id) else { continue };
                stored.payload = self.log.read(location)?;
                let start = bytes.len();
                let payload_at = Record::Publish(stored).encode(&mut bytes).unwrap_or(0);
                if let Some((attempts, error)) = inner.state.is_dead(id) {
                    let error = error.as_deref().unwrap_or("").to_owned();
                    Record::Dead { id, attempts, error }.encode(&mut bytes);
                }
                ids.push((id, (start + payload_at) as u64, location.len));
            }
            // Sent under the lock: an ack after this point is written after the copy.
            let appended = self.log.submit(bytes);
            (appended, ids)
        };
        let at = copies.await?;
        let mut inner = self.lock();
        inner.newest_segment = inner.newest_segment.max(at.segment);
        for (id, offset, len) in &ids {
            inner
                .state
                .relocate(*id, Location { segment: at.segment, offset: at.offset + offset, len: *len });
        }
        self.delete_unused_segments(&mut inner);
        Ok(ids.len())
    }
}
