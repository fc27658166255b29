//! A queue's state as a pure machine over a clock passed in: which messages are ready, leased
//! or dead, and the record each change must leave in the log. The live queue and recovery run
//! this same code (recovery replays the records into it), and the property tests run it
//! against a model.
//!
//! A delivery is a lease: the message is someone's until the lease ends, and only the holder
//! of that lease (its token) can settle it. Settling it ends the lease: acked, it is gone;
//! failed, it is ready again after a backoff, or dead once it has failed `max_attempts` times.
//! A lease that runs out counts as a failure (a worker that crashes on a message must not
//! retry it forever).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::record::{Record, Stored};

/// The settings the machine needs, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Deliveries a message may fail before it is dead.
    pub max_attempts: u32,
    pub lease: u64,
    pub backoff_base: u64,
    pub backoff_cap: u64,
    /// Failed messages go to the dead letters; without them they are dropped.
    pub dead_letter: bool,
    /// How long an idempotency key names its message.
    pub idempotency_window: u64,
}

/// Where a message's payload is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u64,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ready { at: u64 },
    Leased { until: u64 },
    Dead,
}

#[derive(Debug)]
struct Entry {
    location: Location,
    content_type: Option<Arc<str>>,
    traceparent: Option<Arc<str>>,
    enqueued_at: u64,
    attempts: u32,
    status: Status,
    last_error: Option<Arc<str>>,
    /// The current (or last) lease's token; only it settles the message.
    token: u64,
    /// Its idempotency key, written again when it is copied forward.
    key: Option<Arc<str>>,
}

/// A message handed out under a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: u64,
    pub token: u64,
    /// 1 for the first delivery.
    pub attempt: u32,
    pub location: Location,
    pub content_type: Option<Arc<str>>,
    /// The `traceparent` of the request that published it.
    pub traceparent: Option<Arc<str>>,
    pub enqueued_at: u64,
    /// When the lease ends.
    pub until: u64,
}

/// A dead letter, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: u64,
    pub attempts: u32,
    pub enqueued_at: u64,
    pub error: Option<Arc<str>>,
    pub location: Location,
    pub content_type: Option<Arc<str>>,
}

/// What became of a failed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    RetryAt(u64),
    Dead,
    /// Failed for good with dead letters off.
    Dropped,
}

/// The lease does not hold the message (any more): it ran out, or another lease has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the lease on message {id} is no longer held")]
pub struct Stale {
    pub id: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Ready now or once a delay or backoff passes.
    pub ready: u64,
    /// Of those, waiting for a delay or a backoff.
    pub delayed: u64,
    pub in_flight: u64,
    pub dead: u64,
    /// Payload bytes of every message held, dead ones included.
    pub bytes: u64,
    /// When the oldest message not yet acked (and not dead) was published.
    pub oldest_enqueued_at: Option<u64>,
}

#[derive(Debug)]
pub struct QueueState {
    settings: Settings,
    messages: HashMap<u64, Entry>,
    ready: BTreeSet<(u64, u64)>,
    leased: BTreeSet<(u64, u64)>,
    dead: BTreeSet<u64>,
    next_id: u64,
    next_token: u64,
    bytes: u64,
    /// Idempotency keys and the message each names, until they expire.
    keys: HashMap<Arc<str>, u64>,
    /// When each key stops naming a message, by (time, message): ordered by time even when
    /// replay meets copied-forward messages out of publish order, and tied to the message so
    /// that the expiry of a key's earlier message leaves its newer one named.
    key_expiry: BTreeMap<(u64, u64), Arc<str>>,
    /// Messages held per log segment, so empty segments can be deleted.
    per_segment: BTreeMap<u64, u64>,
}

impl QueueState {
    /// An empty queue. Lease tokens start at `first_token`, which should differ between runs,
    /// so that a token from before a restart never settles a message leased after it.
    pub fn new(settings: Settings, first_token: u64) -> Self {
        QueueState {
            settings,
            messages: HashMap::new(),
            ready: BTreeSet::new(),
            leased: BTreeSet::new(),
            dead: BTreeSet::new(),
            next_id: 1,
            next_token: first_token.max(1),
            bytes: 0,
            keys: HashMap::new(),
            key_expiry: BTreeMap::new(),
            per_segment: BTreeMap::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Ids from here on are above `floor`: ids stay unique across restarts even when the
    /// records of the newest ones were deleted with their segments.
    pub fn ids_above(&mut self, floor: u64) {
        self.next_id = self.next_id.max(floor + 1);
    }

    /// Takes the next message id.
    pub fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The message a live idempotency key names.
    pub fn keyed(&mut self, key: &str, now: u64) -> Option<u64> {
        self.expire_keys(now);
        self.keys.get(key).copied()
    }

    /// When a message held was published.
    pub fn enqueued_at(&self, id: u64) -> Option<u64> {
        self.messages.get(&id).map(|entry| entry.enqueued_at)
    }

    /// Messages held, dead ones included.
    pub fn len(&self) -> u64 {
        self.messages.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Takes in a message whose publish record is durable at `location` (or was replayed from
    /// there). A message already held was copied forward: only its location changes.
    pub fn admit(&mut self, stored: &Stored, location: Location) {
        self.next_id = self.next_id.max(stored.id + 1);
        if let Some(key) = &stored.idempotency_key {
            let key: Arc<str> = Arc::from(key.as_str());
            let expires = stored.enqueued_at.saturating_add(self.settings.idempotency_window);
            self.keys.insert(Arc::clone(&key), stored.id);
            self.key_expiry.insert((expires, stored.id), key);
        }
        if self.messages.contains_key(&stored.id) {
            self.relocate(stored.id, location);
            return;
        }
        let entry = Entry {
            location,
            content_type: stored.content_type.as_deref().map(Arc::from),
            traceparent: stored.traceparent.as_deref().map(Arc::from),
            enqueued_at: stored.enqueued_at,
            attempts: stored.attempts,
            status: Status::Ready { at: stored.ready_at },
            last_error: None,
            token: 0,
            key: stored.idempotency_key.as_deref().map(Arc::from),
        };
        self.ready.insert((stored.ready_at, stored.id));
        self.bytes += u64::from(location.len);
        *self.per_segment.entry(location.segment).or_default() += 1;
        self.messages.insert(stored.id, entry);
    }

    /// The message (if still held) now lives at `location`: it was copied forward.
    pub fn relocate(&mut self, id: u64, location: Location) {
        let Some(entry) = self.messages.get_mut(&id) else { return };
        let old = std::mem::replace(&mut entry.location, location);
        Self::count_out(&mut self.per_segment, old.segment);
        *self.per_segment.entry(location.segment).or_default() += 1;
    }

    /// Leases up to `max` messages that are ready at `now`, oldest first.
    pub fn lease(&mut self, now: u64, max: usize) -> Vec<Delivery> {
        let mut next = self.next_token;
        let deliveries = self.lease_with(now, max, || {
            next += 1;
            next - 1
        });
        self.next_token = next;
        deliveries
    }

    /// As [`QueueState::lease`], each lease's token from `token`: random ones, when a worker
    /// holds its token to renew or settle the lease itself.
    pub fn lease_with(&mut self, now: u64, max: usize, mut token: impl FnMut() -> u64) -> Vec<Delivery> {
        let due: Vec<(u64, u64)> =
            self.ready.iter().take_while(|(at, _)| *at <= now).take(max).copied().collect();
        let mut deliveries = Vec::with_capacity(due.len());
        for (at, id) in due {
            self.ready.remove(&(at, id));
            let until = now.saturating_add(self.settings.lease);
            let token = token();
            let Some(entry) = self.messages.get_mut(&id) else { continue };
            entry.status = Status::Leased { until };
            entry.token = token;
            self.leased.insert((until, id));
            deliveries.push(Delivery {
                id,
                token,
                attempt: entry.attempts + 1,
                location: entry.location,
                content_type: entry.content_type.clone(),
                traceparent: entry.traceparent.clone(),
                enqueued_at: entry.enqueued_at,
                until,
            });
        }
        deliveries
    }

    /// The message is done with: gone for good.
    pub fn ack(&mut self, id: u64, token: u64) -> Result<Record, Stale> {
        match self.messages.get(&id) {
            Some(entry) if entry.token == token && entry.status != Status::Dead => {}
            _ => return Err(Stale { id }),
        }
        self.remove(id);
        Ok(Record::Ack { id })
    }

    /// The delivery failed: ready again after a backoff (`jitter` in [0, 1) spreads it), or
    /// dead once the attempts are used up.
    pub fn fail(
        &mut self,
        id: u64,
        token: u64,
        now: u64,
        error: &str,
        jitter: f64,
    ) -> Result<(Record, Failed), Stale> {
        let until = self.leased_by(id, token)?;
        self.leased.remove(&(until, id));
        Ok(self.failed(id, now, error, jitter))
    }

    /// Gives the message back without counting an attempt, to be delivered from `at` (a
    /// worker's `Retry-After`).
    pub fn defer(&mut self, id: u64, token: u64, at: u64, now: u64) -> Result<Record, Stale> {
        let until = self.leased_by(id, token)?;
        self.leased.remove(&(until, id));
        let Some(entry) = self.messages.get_mut(&id) else { return Err(Stale { id }) };
        // A second at least: a worker answering "later" at once must not spin the message.
        let at = at.max(now.saturating_add(1_000));
        entry.status = Status::Ready { at };
        self.ready.insert((at, id));
        let error = "deferred by the worker".to_owned();
        Ok(Record::Retry { id, attempts: entry.attempts, ready_at: at, error })
    }

    /// Extends a lease to `now` plus the lease time; returns its new end.
    pub fn renew(&mut self, id: u64, token: u64, now: u64) -> Result<u64, Stale> {
        let until = self.leased_by(id, token)?;
        let renewed = now.saturating_add(self.settings.lease).max(until);
        self.leased.remove(&(until, id));
        self.leased.insert((renewed, id));
        if let Some(entry) = self.messages.get_mut(&id) {
            entry.status = Status::Leased { until: renewed };
        }
        Ok(renewed)
    }

    /// Every lease that ended by `now` fails its delivery.
    pub fn expire(&mut self, now: u64, mut jitter: impl FnMut() -> f64) -> Vec<(u64, Record, Failed)> {
        let ended: Vec<(u64, u64)> =
            self.leased.iter().take_while(|(until, _)| *until <= now).copied().collect();
        ended
            .into_iter()
            .map(|(until, id)| {
                self.leased.remove(&(until, id));
                let (record, failed) = self.failed(id, now, "the lease ran out before an answer", jitter());
                (id, record, failed)
            })
            .collect()
    }

    /// When something next becomes due after `now`: a delayed message, or the end of a lease.
    pub fn next_due(&self, now: u64) -> Option<u64> {
        let ready = self.ready.iter().next().map(|(at, _)| *at).filter(|at| *at > now);
        let lease = self.leased.iter().next().map(|(until, _)| *until);
        ready.into_iter().chain(lease).min()
    }

    /// Messages ready to lease at `now` (delayed ones and those backing off not counted).
    pub fn ready_at(&self, now: u64) -> usize {
        self.ready.len() - self.ready.range((now.saturating_add(1), 0)..).count()
    }

    /// Whether a message is ready to lease at `now`.
    pub fn has_ready(&self, now: u64) -> bool {
        self.ready.iter().next().is_some_and(|(at, _)| *at <= now)
    }

    /// Where a message is, as a job: queued, retrying (failed before), running or dead, with
    /// its failed attempts and last error; `None` once it is gone.
    pub fn job_status(&self, id: u64) -> Option<(&'static str, u32, Option<Arc<str>>)> {
        let entry = self.messages.get(&id)?;
        let state = match entry.status {
            Status::Ready { .. } if entry.attempts > 0 => "retrying",
            Status::Ready { .. } => "queued",
            Status::Leased { .. } => "running",
            Status::Dead => "dead",
        };
        Some((state, entry.attempts, entry.last_error.clone()))
    }

    pub fn dead_letters(&self, limit: usize) -> Vec<DeadLetter> {
        self.dead
            .iter()
            .take(limit)
            .filter_map(|id| {
                let entry = self.messages.get(id)?;
                Some(DeadLetter {
                    id: *id,
                    attempts: entry.attempts,
                    enqueued_at: entry.enqueued_at,
                    error: entry.last_error.clone(),
                    location: entry.location,
                    content_type: entry.content_type.clone(),
                })
            })
            .collect()
    }

    /// Dead letters back to ready, attempts cleared: `ids`, or all of them.
    pub fn redrive(&mut self, ids: Option<&[u64]>, now: u64) -> Vec<Record> {
        let chosen = self.chosen_dead(ids);
        for id in &chosen {
            self.dead.remove(id);
            if let Some(entry) = self.messages.get_mut(id) {
                entry.attempts = 0;
                entry.status = Status::Ready { at: now };
                self.ready.insert((now, *id));
            }
        }
        chosen.into_iter().map(|id| Record::Redrive { id }).collect()
    }

    /// Dead letters dropped for good: `ids`, or all of them.
    pub fn purge(&mut self, ids: Option<&[u64]>) -> Vec<Record> {
        let chosen = self.chosen_dead(ids);
        for id in &chosen {
            self.remove(*id);
        }
        chosen.into_iter().map(|id| Record::Ack { id }).collect()
    }

    /// Applies a record read back from the log (publishes go through [`QueueState::admit`]).
    pub fn replay(&mut self, record: &Record) {
        let id = match record {
            Record::Publish(stored) => stored.id,
            Record::Ack { id }
            | Record::Retry { id, .. }
            | Record::Dead { id, .. }
            | Record::Redrive { id } => *id,
            // Answers have a log of their own; one here changes no message.
            Record::Answer { .. } => return,
        };
        self.next_id = self.next_id.max(id + 1);
        match record {
            Record::Publish(_) | Record::Answer { .. } => {}
            Record::Ack { id } => self.remove(*id),
            Record::Retry { id, attempts, ready_at, error } => {
                if let Some(entry) = self.messages.get_mut(id) {
                    entry.attempts = *attempts;
                    entry.last_error = Some(Arc::from(error.as_str()));
                    let at = *ready_at;
                    self.set_status(*id, Status::Ready { at });
                }
            }
            Record::Dead { id, attempts, error } => {
                if let Some(entry) = self.messages.get_mut(id) {
                    entry.attempts = *attempts;
                    entry.last_error = Some(Arc::from(error.as_str()));
                    self.set_status(*id, Status::Dead);
                }
            }
            Record::Redrive { id } => {
                if let Some(entry) = self.messages.get_mut(id) {
                    entry.attempts = 0;
                    self.set_status(*id, Status::Ready { at: 0 });
                }
            }
        }
    }

    pub fn counts(&self, now: u64) -> Counts {
        let delayed = (self.ready.len() - self.ready_at(now)) as u64;
        let oldest = self
            .messages
            .values()
            .filter(|entry| entry.status != Status::Dead)
            .map(|entry| entry.enqueued_at)
            .min();
        Counts {
            ready: self.ready.len() as u64,
            delayed,
            in_flight: self.leased.len() as u64,
            dead: self.dead.len() as u64,
            bytes: self.bytes,
            oldest_enqueued_at: oldest,
        }
    }

    /// The oldest segment that still holds a message, if any.
    pub fn oldest_segment_in_use(&self) -> Option<u64> {
        self.per_segment.keys().next().copied()
    }

    /// The messages (not leased: a delivery may be reading its payload) held in `segment`, to
    /// be copied forward so it can go.
    pub fn held_in(&self, segment: u64) -> Vec<(u64, Location)> {
        let mut held: Vec<(u64, Location)> = self
            .messages
            .iter()
            .filter(|(_, entry)| entry.location.segment == segment)
            .filter(|(_, entry)| !matches!(entry.status, Status::Leased { .. }))
            .map(|(id, entry)| (*id, entry.location))
            .collect();
        held.sort_unstable_by_key(|(id, _)| *id);
        held
    }

    /// The message as a publish record would now say it (for a copy forward), payload left out.
    pub fn as_stored(&self, id: u64) -> Option<Stored> {
        let entry = self.messages.get(&id)?;
        let ready_at = match entry.status {
            Status::Ready { at } => at,
            Status::Leased { .. } | Status::Dead => 0,
        };
        Some(Stored {
            id,
            enqueued_at: entry.enqueued_at,
            ready_at,
            attempts: entry.attempts,
            content_type: entry.content_type.as_deref().map(str::to_owned),
            idempotency_key: entry.key.as_deref().map(str::to_owned),
            traceparent: entry.traceparent.as_deref().map(str::to_owned),
            payload: bytes::Bytes::new(),
        })
    }

    /// Whether the message is dead (a copy forward must then say so again after its publish).
    pub fn is_dead(&self, id: u64) -> Option<(u32, Option<Arc<str>>)> {
        let entry = self.messages.get(&id)?;
        (entry.status == Status::Dead).then(|| (entry.attempts, entry.last_error.clone()))
    }

    fn leased_by(&self, id: u64, token: u64) -> Result<u64, Stale> {
        match self.messages.get(&id) {
            Some(Entry { status: Status::Leased { until }, token: held, .. }) if *held == token => Ok(*until),
            _ => Err(Stale { id }),
        }
    }

    /// Counts a failed delivery of a message no longer leased.
    fn failed(&mut self, id: u64, now: u64, error: &str, jitter: f64) -> (Record, Failed) {
        let settings = self.settings;
        let Some(entry) = self.messages.get_mut(&id) else {
            return (Record::Ack { id }, Failed::Dropped);
        };
        entry.attempts += 1;
        entry.last_error = Some(Arc::from(error));
        let attempts = entry.attempts;
        if attempts >= settings.max_attempts {
            if settings.dead_letter {
                entry.status = Status::Dead;
                self.dead.insert(id);
                return (Record::Dead { id, attempts, error: error.to_owned() }, Failed::Dead);
            }
            self.remove(id);
            return (Record::Ack { id }, Failed::Dropped);
        }
        let at = now.saturating_add(backoff(&settings, attempts, jitter));
        entry.status = Status::Ready { at };
        self.ready.insert((at, id));
        (Record::Retry { id, attempts, ready_at: at, error: error.to_owned() }, Failed::RetryAt(at))
    }

    fn set_status(&mut self, id: u64, status: Status) {
        let Some(entry) = self.messages.get_mut(&id) else { return };
        let old = std::mem::replace(&mut entry.status, status);
        self.unindex(id, old);
        match status {
            Status::Ready { at } => self.ready.insert((at, id)),
            Status::Leased { until } => self.leased.insert((until, id)),
            Status::Dead => self.dead.insert(id),
        };
    }

    /// Takes the message out of the index its status keeps it in.
    fn unindex(&mut self, id: u64, status: Status) {
        match status {
            Status::Ready { at } => self.ready.remove(&(at, id)),
            Status::Leased { until } => self.leased.remove(&(until, id)),
            Status::Dead => self.dead.remove(&id),
        };
    }

    fn remove(&mut self, id: u64) {
        let Some(entry) = self.messages.remove(&id) else { return };
        self.unindex(id, entry.status);
        self.bytes -= u64::from(entry.location.len);
        Self::count_out(&mut self.per_segment, entry.location.segment);
    }

    fn count_out(per_segment: &mut BTreeMap<u64, u64>, segment: u64) {
        if let Some(count) = per_segment.get_mut(&segment) {
            *count -= 1;
            if *count == 0 {
                per_segment.remove(&segment);
            }
        }
    }

    fn chosen_dead(&self, ids: Option<&[u64]>) -> Vec<u64> {
        match ids {
            Some(ids) => ids.iter().copied().filter(|id| self.dead.contains(id)).collect(),
            None => self.dead.iter().copied().collect(),
        }
    }

    fn expire_keys(&mut self, now: u64) {
        while let Some(entry) = self.key_expiry.first_entry() {
            let (expires, id) = *entry.key();
            if expires > now {
                break;
            }
            let key = entry.remove();
            if self.keys.get(&key) == Some(&id) {
                self.keys.remove(&key);
            }
        }
    }
}

/// Exponential, capped, with half of it jittered ("equal jitter"): attempt 1 waits between
/// base/2 and base, attempt 2 between base and 2 base, and so on up to the cap.
pub fn backoff(settings: &Settings, attempts: u32, jitter: f64) -> u64 {
    let exponent = attempts.saturating_sub(1).min(32);
    let full = settings.backoff_base.saturating_mul(1u64 << exponent).min(settings.backoff_cap);
    let half = full / 2;
    half + (half as f64 * jitter.clamp(0.0, 1.0)) as u64
}

#[cfg(test)]
mod tests;
