//! A queue as the rest of surge sees it: publish, lease, settle, dead letters and jobs, over
//! one of two backends behind one trait ([`QueueStore`]): the embedded log on this machine's
//! disk, or a RabbitMQ broker. What both share (its name and limits, counters, latencies,
//! and the answers of async requests) lives here, in [`Core`].

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::amqp::Amqp;
use crate::answers::AnswerStore;
use crate::embedded::Embedded;
use crate::job::{job_id, JobAnswer, JobJson};
use crate::log::{OpenError, Recovered};
use crate::state::{Counts, DeadLetter, Delivery, Failed, Settings, Stale};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
    /// The largest payload a publish may carry.
    pub max_payload: u64,
    /// The size at which the log starts a new segment file ([`crate::SEGMENT_SIZE`] unless
    /// tests need small ones).
    pub segment_size: u64,
    /// How long a job's answer is kept for `GET /jobs/ID`.
    pub result_ttl: Duration,
}

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct NewMessage {
    pub payload: Bytes,
    pub content_type: Option<String>,
    pub idempotency_key: Option<String>,
    /// Not delivered before this time.
    pub not_before: Option<SystemTime>,
    /// The W3C `traceparent` of the request that published it; deliveries carry it on.
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub id: u64,
    /// An earlier publish with the same idempotency key made this message.
    pub duplicate: bool,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error("queue {queue} is full: it holds {held} messages and its {limit}")]
    Full { queue: String, held: u64, limit: String },
    #[error("the message is {size} bytes, over queue {queue}'s max_payload of {limit} bytes")]
    TooLarge { queue: String, size: u64, limit: u64 },
    #[error("queue {queue} could not store the message on disk ({cause}); nothing was enqueued")]
    Storage { queue: String, cause: String },
    #[error("queue {queue}'s broker did not take it ({cause})")]
    Unavailable { queue: String, cause: String },
}

/// A random u64 from the system's generator (lease tokens, which authorise a worker).
pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // The system generator does not fail on Linux; a zero token then only matches no lease.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// The queue's job key: read from `job.key` in its folder, made there (mode 0600) the first time.
fn job_key(dir: &Path) -> Result<aws_lc_rs::hmac::Key, OpenError> {
    let path = dir.join("job.key");
    let io = |source| OpenError::Io { path: path.clone(), source };
    let secret = match std::fs::read(&path) {
        Ok(secret) if secret.len() == 32 => secret,
        _ => {
            let mut secret = vec![0u8; 32];
            aws_lc_rs::rand::fill(&mut secret).map_err(|_| io(std::io::Error::other("no random bytes")))?;
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            file.write_all(&secret).and_then(|()| file.sync_all()).map_err(io)?;
            secret
        }
    };
    Ok(aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret))
}

/// How long publishes took to be durable, and messages from publish to ack, in seconds.
#[derive(Debug)]
pub struct Latencies {
    pub publish: prometheus_client::metrics::histogram::Histogram,
    pub end_to_end: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
        // 100 µs to about 6.5 s for a publish; 1 ms to about 18 hours from publish to ack.
        Latencies {
            publish: Histogram::new(exponential_buckets(0.000_1, 2.0, 17)),
            end_to_end: Histogram::new(exponential_buckets(0.001, 4.0, 17)),
        }
    }
}

/// Counts since the queue was opened, for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct Totals {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub redriven: AtomicU64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    millis(SystemTime::now())
}

pub(crate) fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What both backends share.
pub(crate) struct Core {
    pub name: String,
    pub limits: Limits,
    pub totals: Totals,
    pub latencies: Latencies,
    /// Workers' answers to async requests (on disk), and a wake-up for those waiting for one.
    answers: AnswerStore,
    answered: Notify,
    /// The key job ids are tagged with, kept in the queue's folder so ids outlive restarts.
    job_key: aws_lc_rs::hmac::Key,
}

/// Where a job is, as its backend knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobStatus {
    pub state: &'static str,
    pub attempts: u32,
    pub error: Option<String>,
}

/// Waits until `ready` is notified or the time `look` gives comes (milliseconds since the
/// epoch; `None`: no time, only a notification). `look` runs after the wake-up is armed, so a
/// notification between the look and the wait is not lost; it answers `None` when something is
/// ready already.
pub(crate) async fn wait_until_due(ready: &Notify, look: impl FnOnce(u64) -> Option<Option<u64>>) {
    let notified = ready.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    let now = crate::now_ms();
    match look(now) {
        None => {}
        Some(Some(at)) => {
            let _ =
                tokio::time::timeout(Duration::from_millis(at.saturating_sub(now).max(1)), notified).await;
        }
        Some(None) => notified.await,
    }
}

/// What a backend does. Both keep the same promises: a publish answers once the message is
/// durable; a delivery is leased with a token and settled by it; a failure is retried with
/// backoff until its attempts are used up, then dead-lettered.
pub(crate) trait QueueStore {
    /// Payloads are within `max_payload` already.
    async fn publish(self: &Arc<Self>, messages: Vec<NewMessage>) -> Result<Vec<Published>, PublishError>;
    /// Leases up to `max` ready messages (ending expired leases first).
    fn lease(self: &Arc<Self>, max: usize) -> Vec<Delivery>;
    /// Messages ready to lease now (the backlog autoscaling sees).
    fn ready_now(&self) -> usize;
    fn has_ready(self: &Arc<Self>) -> bool;
    /// Waits until a message may be ready: one was published, or a delay, backoff or lease
    /// ends.
    async fn wait_ready(self: &Arc<Self>);
    /// The payload of a leased message.
    fn payload(&self, delivery: &Delivery) -> std::io::Result<Bytes>;
    async fn ack(self: &Arc<Self>, id: u64, token: u64) -> Result<(), Stale>;
    async fn fail(self: &Arc<Self>, id: u64, token: u64, error: &str) -> Result<Failed, Stale>;
    /// Gives a message back, to be delivered again from `at` without counting an attempt.
    async fn defer(self: &Arc<Self>, id: u64, token: u64, at: SystemTime) -> Result<(), Stale>;
    /// Extends a lease; returns its new end.
    fn renew(&self, id: u64, token: u64) -> Result<SystemTime, Stale>;
    fn job_status(&self, id: u64) -> Option<JobStatus>;
    fn counts(&self) -> Counts;
    /// Up to `limit` dead letters, each with its payload when it is at most `body_max` bytes.
    async fn dead_letters(
        self: &Arc<Self>,
        limit: usize,
        body_max: usize,
    ) -> Result<Vec<(DeadLetter, Option<Bytes>)>, PublishError>;
    /// Puts dead letters (`ids`, or all) back in the queue; returns how many.
    async fn redrive(self: &Arc<Self>, ids: Option<&[u64]>) -> Result<usize, PublishError>;
    /// Drops dead letters (`ids`, or all) for good; returns how many.
    async fn purge(self: &Arc<Self>, ids: Option<&[u64]>) -> Result<usize, PublishError>;
    /// Frees disk the backend no longer needs; returns how many messages it moved.
    async fn compact(self: &Arc<Self>) -> std::io::Result<usize>;
    /// How many deliveries the workers take at once: what a backend that fetches ahead
    /// (amqp's prefetch) may hold.
    fn workers_take(&self, _deliveries: usize) {}
    /// Whether this node fires `schedule`'s ticks: with a queue shared by several nodes, one
    /// of them does.
    async fn fires(self: &Arc<Self>, _schedule: &str) -> bool {
        true
    }
}

enum Backend {
    Embedded(Arc<Embedded>),
    Amqp(Arc<Amqp>),
}

pub struct Queue {
    core: Arc<Core>,
    backend: Backend,
}

/// Calls the same [`QueueStore`] method on whichever backend the queue has.
macro_rules! on_backend {
    ($queue:expr, $store:ident => $call:expr) => {
        match &$queue.backend {
            Backend::Embedded($store) => $call,
            Backend::Amqp($store) => $call,
        }
    };
}

impl Core {
    /// The queue's own part, its folder made if missing (the job key lives there).
    fn new(name: &str, dir: &Path, limits: Limits) -> Result<Core, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::Io { path: dir.to_owned(), source })?;
        Ok(Core {
            name: name.to_owned(),
            limits,
            totals: Totals::default(),
            latencies: Latencies::default(),
            answers: AnswerStore::open(dir)?,
            answered: Notify::new(),
            job_key: job_key(dir)?,
        })
    }
}

impl Queue {
    /// Opens (or creates) the embedded queue kept in `dir`, recovering every message its log
    /// holds.
    pub fn open(
        name: &str,
        dir: &Path,
        settings: Settings,
        limits: Limits,
    ) -> Result<(Arc<Queue>, Recovered), OpenError> {
        let core = Arc::new(Core::new(name, dir, limits)?);
        let (embedded, recovered) = Embedded::open(Arc::clone(&core), dir, settings)?;
        Ok((Arc::new(Queue { core, backend: Backend::Embedded(Arc::new(embedded)) }), recovered))
    }

    /// Opens the queue kept by the RabbitMQ broker at `url` as `broker_queue`, declaring what
    /// it needs there; `dir` keeps only its job key.
    pub async fn open_amqp(
        name: &str,
        url: &str,
        broker_queue: &str,
        dir: &Path,
        settings: Settings,
        limits: Limits,
    ) -> Result<Arc<Queue>, OpenError> {
        let core = Arc::new(Core::new(name, dir, limits)?);
        let amqp = Amqp::open(Arc::clone(&core), url, broker_queue, settings).await?;
        Ok(Arc::new(Queue { core, backend: Backend::Amqp(amqp) }))
    }

    pub fn name(&self) -> &str {
        &self.core.name
    }

    pub fn totals(&self) -> &Totals {
        &self.core.totals
    }

    pub fn latencies(&self) -> &Latencies {
        &self.core.latencies
    }

    /// Publishes `messages`, answering once all are durable (or were already there, by
    /// idempotency key).
    pub async fn publish(&self, messages: Vec<NewMessage>) -> Result<Vec<Published>, PublishError> {
        let limit = self.core.limits.max_payload;
        if let Some(size) = messages.iter().map(|m| m.payload.len() as u64).find(|size| *size > limit) {
            return Err(PublishError::TooLarge { queue: self.core.name.clone(), size, limit });
        }
        on_backend!(self, store => store.publish(messages).await)
    }

    pub fn lease(&self, max: usize) -> Vec<Delivery> {
        on_backend!(self, store => store.lease(max))
    }

    pub fn ready_now(&self) -> usize {
        on_backend!(self, store => store.ready_now())
    }

    pub fn has_ready(&self) -> bool {
        on_backend!(self, store => store.has_ready())
    }

    pub async fn wait_ready(&self) {
        on_backend!(self, store => store.wait_ready().await)
    }

    pub fn payload(&self, delivery: &Delivery) -> std::io::Result<Bytes> {
        on_backend!(self, store => store.payload(delivery))
    }

    pub async fn ack(&self, id: u64, token: u64) -> Result<(), Stale> {
        on_backend!(self, store => store.ack(id, token).await)
    }

    pub async fn fail(&self, id: u64, token: u64, error: &str) -> Result<Failed, Stale> {
        on_backend!(self, store => store.fail(id, token, error).await)
    }

    pub async fn defer(&self, id: u64, token: u64, at: SystemTime) -> Result<(), Stale> {
        on_backend!(self, store => store.defer(id, token, at).await)
    }

    pub fn renew(&self, id: u64, token: u64) -> Result<SystemTime, Stale> {
        on_backend!(self, store => store.renew(id, token))
    }

    pub fn counts(&self) -> Counts {
        on_backend!(self, store => store.counts())
    }

    pub async fn dead_letters(
        &self,
        limit: usize,
        body_max: usize,
    ) -> Result<Vec<(DeadLetter, Option<Bytes>)>, PublishError> {
        on_backend!(self, store => store.dead_letters(limit, body_max).await)
    }

    pub async fn redrive(&self, ids: Option<&[u64]>) -> Result<usize, PublishError> {
        on_backend!(self, store => store.redrive(ids).await)
    }

    pub async fn purge(&self, ids: Option<&[u64]>) -> Result<usize, PublishError> {
        on_backend!(self, store => store.purge(ids).await)
    }

    pub async fn compact(&self) -> std::io::Result<usize> {
        on_backend!(self, store => store.compact().await)
    }

    /// Whether this node fires `schedule`'s ticks now.
    pub async fn fires(&self, schedule: &str) -> bool {
        on_backend!(self, store => store.fires(schedule).await)
    }

    /// How many deliveries the workers of this queue take at once.
    pub fn workers_take(&self, deliveries: usize) {
        on_backend!(self, store => store.workers_take(deliveries))
    }

    /// The id a client is given for the job of message `id`.
    pub fn job_name(&self, id: u64) -> String {
        job_id(&self.core.name, id, self.job_tag(id))
    }

    /// Whether `tag` is the one this queue gave the job of message `id`.
    pub fn job_tag_matches(&self, id: u64, tag: u64) -> bool {
        let expected = self.job_tag(id).to_le_bytes();
        aws_lc_rs::constant_time::verify_slices_are_equal(&expected, &tag.to_le_bytes()).is_ok()
    }

    fn job_tag(&self, id: u64) -> u64 {
        let mac = aws_lc_rs::hmac::sign(&self.core.job_key, &id.to_le_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&mac.as_ref()[..8]);
        u64::from_le_bytes(first)
    }

    /// Keeps a worker's answer to an async request, for `GET /jobs/ID`; returns once it is on
    /// disk.
    pub async fn keep_answer(&self, id: u64, answer: JobAnswer) -> std::io::Result<()> {
        self.core.answers.keep(id, answer, self.core.limits.result_ttl).await?;
        self.core.answered.notify_waiters();
        Ok(())
    }

    /// A job's answer, waiting for it up to `wait`; or where the job is.
    pub async fn job(&self, id: u64, wait: Duration) -> Result<JobAnswer, JobJson> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let answered = self.core.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            if let Some(answer) = self.core.answers.get(id) {
                return Ok(answer);
            }
            let status = on_backend!(self, store => store.job_status(id)).unwrap_or(JobStatus {
                state: "unknown",
                attempts: 0,
                error: None,
            });
            let dead_end = matches!(status.state, "dead" | "unknown");
            let pending = JobJson {
                id: self.job_name(id),
                state: status.state.to_owned(),
                attempts: status.attempts,
                error: status.error,
            };
            if dead_end || tokio::time::Instant::now() >= deadline {
                return Err(pending);
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                return Err(pending);
            }
        }
    }
}
