//! The amqp backend: a queue kept by RabbitMQ, shared by every surge node that names the
//! broker. Publishes are persistent messages on a durable queue, answered only once the
//! broker confirms them. Surge consumes with manual acks and a prefetch window, and leases
//! each delivery to a worker as the embedded backend does; a delivery is acked at the broker
//! only when its worker's answer settles it.
//!
//! Retries and delays use RabbitMQ's own parts: a failed message is published again, with its
//! attempt count, to a delay queue whose messages expire back into the main queue
//! (`NAME.delay.<ms>`, one per power of two of milliseconds so a long delay never holds up a
//! short one by more than twice); then the delivery is acked. Dead letters are published to
//! `NAME.dead`. The copy is confirmed before the ack, so a crash in between gives a duplicate,
//! never a loss; the delay queues dead-letter at least once (quorum queues), so the hop back
//! into the queue is not lost either. When the broker goes away, publishes answer 503 until it is back, and every
//! delivery not yet acked returns to the queue on the broker's side.
//!
//! Schedules: of the nodes sharing the queue, the one that holds the exclusive queue
//! `NAME.schedule.SCHEDULE.leader` fires the ticks. The broker deletes an exclusive queue with
//! the connection that declared it, so when the leader stops (or its connection is seen dead,
//! by heartbeat) another node takes the queue at its next tick.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::{oneshot, Notify};

use crate::log::OpenError;
use crate::queue::{millis, random_u64, wait_until_due, Core, JobStatus, QueueStore};
use crate::state::{backoff, Counts, DeadLetter, Delivery, Failed, Location, Settings, Stale};
use crate::{now_ms, NewMessage, PublishError, Published};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the broker may take to set up a connection's channels, or to confirm a publish,
/// before the publish answers 503.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait a delay queue is given: RabbitMQ's per-message TTL is at most 2^32 - 1 ms.
const LONGEST_WAIT: u64 = u32::MAX as u64;
/// How often the broker's counts are read for `/queues`, `/metrics` and autoscaling.
const COUNTS_EVERY: Duration = Duration::from_secs(1);
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MOST: Duration = Duration::from_secs(5);
/// Jobs whose state this node remembers for `GET /jobs/ID`.
const JOBS_REMEMBERED: usize = 100_000;
/// Deliveries held by surge at once when no worker said how many it takes.
const DEFAULT_WINDOW: u16 = 64;

const ID: &str = "x-surge-id";
const ATTEMPTS: &str = "x-surge-attempts";
const ENQUEUED_AT: &str = "x-surge-enqueued-at";
const KEY: &str = "x-surge-key";
const ERROR: &str = "x-surge-error";
/// The W3C name, as other AMQP clients propagate a trace.
const TRACEPARENT: &str = "traceparent";

pub(crate) struct Amqp {
    core: Arc<Core>,
    settings: Settings,
    url: String,
    /// The URL without its password, for messages.
    shown: String,
    /// The queue's name at the broker, and its dead letters'.
    main_queue: String,
    dead_queue: String,
    /// The publishing connection and its channels, made again when it broke.
    link: tokio::sync::Mutex<LinkSlot>,
    /// Delay queues used since the start, whose messages count as delayed.
    delays_seen: Mutex<BTreeSet<u64>>,
    local: Mutex<Local>,
    ready: Notify,
    consuming: AtomicBool,
    window: AtomicU16,
    broker: Mutex<BrokerCounts>,
    /// The connections holding this node's leader queues, by schedule.
    leads: tokio::sync::Mutex<HashMap<String, Connection>>,
}

/// A connection to the broker and its channels: client publishes on `channel`, the copies
/// surge makes of messages (retries, deferrals, dead letters) and declares on `copies`, so
/// that the broker's answers for one never stand for the other's.
#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    channel: Channel,
    copies: Channel,
    /// Delay queues declared over this connection.
    delays: Arc<Mutex<BTreeSet<u64>>>,
}

#[derive(Default)]
struct LinkSlot {
    link: Option<Link>,
    /// The last failed attempt to connect, and why.
    failed: Option<(std::time::Instant, String)>,
}

#[derive(Default, Clone, Copy)]
struct BrokerCounts {
    ready: u64,
    delayed: u64,
    dead: u64,
}

/// A message the broker delivered to this node.
struct Incoming {
    acker: Acker,
    about: About,
    payload: Bytes,
}

struct Held {
    incoming: Incoming,
    until: u64,
}

#[derive(Default)]
struct Local {
    /// Delivered by the broker (at the time with each), not yet leased to a worker.
    buffered: VecDeque<(u64, Incoming)>,
    /// Leased to a worker, by lease token.
    leased: HashMap<u64, Held>,
    keys: Keys,
    jobs: Jobs,
}

/// Idempotency keys this node published with, while their window lasts, and the repeats
/// waiting for a first publish still under way.
#[derive(Default)]
struct Keys {
    named: HashMap<String, (u64, u64)>,
    pending: HashMap<String, Vec<oneshot::Sender<Result<u64, PublishError>>>>,
}

/// What this node saw of recent jobs, oldest first out.
#[derive(Default)]
struct Jobs {
    states: HashMap<u64, JobStatus>,
    order: VecDeque<u64>,
}

impl Jobs {
    fn set(&mut self, id: u64, state: &'static str, attempts: u32, error: Option<&str>) {
        let status = JobStatus { state, attempts, error: error.map(str::to_owned) };
        if self.states.insert(id, status).is_none() {
            self.order.push_back(id);
            if self.order.len() > JOBS_REMEMBERED {
                if let Some(oldest) = self.order.pop_front() {
                    self.states.remove(&oldest);
                }
            }
        }
    }
}

/// `amqp://user:secret@host/vhost` shown as `amqp://user@host/vhost`.
pub fn without_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let authority = match authority.rsplit_once('@') {
        Some((user, host)) => format!("{}@{host}", user.split(':').next().unwrap_or("")),
        None => authority.to_owned(),
    };
    let slash = if rest.contains('/') { "/" } else { "" };
    format!("{scheme}://{authority}{slash}{path}")
}

/// The delay queue for a wait of `ms`: the next power of two of milliseconds.
fn delay_bucket(ms: u64) -> u64 {
    ms.max(1).next_power_of_two()
}

fn error_text(err: impl std::fmt::Display) -> String {
    err.to_string()
}

fn header<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a AMQPValue> {
    headers?.inner().get(name)
}

fn header_u64(headers: Option<&FieldTable>, name: &str) -> Option<u64> {
    match header(headers, name)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::Timestamp(v) => Some(*v),
        _ => None,
    }
}

fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match header(headers, name)? {
        AMQPValue::LongString(v) => Some(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        AMQPValue::ShortString(v) => Some(v.as_str().to_owned()),
        _ => None,
    }
}

/// What surge keeps with a message, in its headers.
#[derive(Clone)]
struct About {
    id: u64,
    /// Deliveries that failed before.
    attempts: u32,
    enqueued_at: u64,
    content_type: Option<Arc<str>>,
    key: Option<String>,
    /// Why its last delivery failed (dead letters).
    error: Option<String>,
    /// The W3C trace context of the request that published it.
    traceparent: Option<Arc<str>>,
}

impl About {
    fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        // Ids are random u64s; the header carries their bits as a signed value.
        headers.insert(ID.into(), AMQPValue::LongLongInt(self.id as i64));
        headers.insert(ATTEMPTS.into(), AMQPValue::LongUInt(self.attempts));
        headers
            .insert(ENQUEUED_AT.into(), AMQPValue::LongLongInt(i64::try_from(self.enqueued_at).unwrap_or(0)));
        let texts = [
            (KEY, self.key.as_deref()),
            (ERROR, self.error.as_deref()),
            (TRACEPARENT, self.traceparent.as_deref()),
        ];
        for (name, text) in texts {
            if let Some(text) = text {
                headers
                    .insert(name.into(), AMQPValue::LongString(LongString::from(text.as_bytes().to_vec())));
            }
        }
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(ShortString::from(crate::http::id_text(self.id)))
            .with_timestamp(self.enqueued_at / 1000)
            .with_headers(headers);
        if let Some(content_type) = &self.content_type {
            properties = properties.with_content_type(ShortString::from(&**content_type));
        }
        properties
    }

    /// Reads back what [`About::properties`] wrote; a message published by someone else gets
    /// a fresh id.
    fn of(properties: &BasicProperties) -> About {
        let headers = properties.headers().as_ref();
        let id = match header(headers, ID) {
            Some(AMQPValue::LongLongInt(bits)) => *bits as u64,
            _ => random_u64(),
        };
        About {
            id,
            attempts: header_u64(headers, ATTEMPTS).and_then(|a| u32::try_from(a).ok()).unwrap_or(0),
            enqueued_at: header_u64(headers, ENQUEUED_AT).unwrap_or_else(now_ms),
            content_type: properties.content_type().as_ref().map(|t| Arc::from(t.as_str())),
            key: header_text(headers, KEY),
            error: header_text(headers, ERROR),
            traceparent: header_text(headers, TRACEPARENT).map(Arc::from),
        }
    }

    /// The same message after one more failed delivery, or given back without one.
    fn after(&self, attempts: u32, error: Option<&str>) -> About {
        About { attempts, error: error.map(str::to_owned), ..self.clone() }
    }
}

fn incoming(delivery: lapin::message::Delivery) -> Incoming {
    Incoming {
        about: About::of(&delivery.properties),
        payload: Bytes::from(delivery.data),
        acker: delivery.acker,
    }
}

fn durable(arguments: FieldTable) -> (QueueDeclareOptions, FieldTable) {
    (QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() }, arguments)
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() }
}

/// The outcome of one confirmed publish.
async fn confirmed(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<(), String> {
    let published = async {
        let confirm = send(channel, queue, payload, properties).await.map_err(error_text)?;
        took(confirm.await.map_err(error_text)?, queue)
    };
    tokio::time::timeout(BROKER_TIMEOUT, published)
        .await
        .unwrap_or_else(|_| Err(format!("the broker did not confirm within {BROKER_TIMEOUT:?}")))
}

/// Sends a persistent message to `queue`, `mandatory` so that one the broker cannot route
/// comes back rather than vanishing; the confirm is the caller's to wait for.
async fn send(
    channel: &Channel,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
) -> lapin::Result<lapin::PublisherConfirm> {
    let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
    channel.basic_publish("".into(), queue.into(), options, payload, properties).await
}

/// Whether the broker took a message it confirmed.
fn took(confirmation: Confirmation, queue: &str) -> Result<(), String> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(format!("the broker has no queue {queue} to route it to")),
        Confirmation::Nack(_) => Err("the broker refused it (nack)".to_owned()),
        Confirmation::NotRequested => Err("the broker did not confirm it".to_owned()),
    }
}

impl Amqp {
    /// Connects, declares the queue and its dead letters, and starts reading the broker's counts.
    pub(crate) async fn open(
        core: Arc<Core>,
        url: &str,
        main_queue: &str,
        settings: Settings,
    ) -> Result<Arc<Amqp>, OpenError> {
        let amqp = Arc::new(Amqp {
            main_queue: main_queue.to_owned(),
            dead_queue: format!("{main_queue}.dead"),
            core,
            settings,
            url: url.to_owned(),
            shown: without_password(url),
            link: tokio::sync::Mutex::new(LinkSlot::default()),
            delays_seen: Mutex::new(BTreeSet::new()),
            local: Mutex::new(Local::default()),
            ready: Notify::new(),
            consuming: AtomicBool::new(false),
            window: AtomicU16::new(DEFAULT_WINDOW),
            broker: Mutex::new(BrokerCounts::default()),
            leads: tokio::sync::Mutex::new(HashMap::new()),
        });
        amqp.link().await.map_err(|cause| OpenError::Broker { url: amqp.shown.clone(), cause })?;
        amqp.read_counts().await;
        tokio::spawn(Arc::clone(&amqp).count_forever());
        Ok(amqp)
    }

    fn lock(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn connect(&self) -> Result<Connection, String> {
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(&self.url, ConnectionProperties::default()),
        )
        .await
        {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(err)) => Err(format!("cannot connect to {}: {err}", self.shown)),
            Err(_) => Err(format!("{} did not answer within {CONNECT_TIMEOUT:?}", self.shown)),
        }
    }

    /// The link to the broker, connecting (and declaring the queues) again when it broke; for
    /// a second after a failed attempt, publishes fail at once with its error rather than each
    /// waiting for a connect of its own.
    async fn link(&self) -> Result<Link, String> {
        let mut slot = self.link.lock().await;
        if let Some(current) = slot.link.as_ref() {
            let channels = [&current.channel, &current.copies];
            if current.connection.status().connected() && channels.iter().all(|c| c.status().connected()) {
                return Ok(current.clone());
            }
        }
        slot.link = None;
        if let Some((at, cause)) = &slot.failed {
            if at.elapsed() < RECONNECT_MOST.min(Duration::from_secs(1)) {
                return Err(cause.clone());
            }
        }
        match tokio::time::timeout(BROKER_TIMEOUT, self.connect_link()).await {
            Ok(Ok(link)) => {
                slot.failed = None;
                slot.link = Some(link.clone());
                Ok(link)
            }
            Ok(Err(cause)) => {
                slot.failed = Some((std::time::Instant::now(), cause.clone()));
                Err(cause)
            }
            Err(_) => {
                let cause = format!("{} did not set up a channel within {BROKER_TIMEOUT:?}", self.shown);
                slot.failed = Some((std::time::Instant::now(), cause.clone()));
                Err(cause)
            }
        }
    }

    async fn connect_link(&self) -> Result<Link, String> {
        let connection = Arc::new(self.connect().await?);
        let confirming = async || -> Result<Channel, String> {
            let channel = connection.create_channel().await.map_err(error_text)?;
            channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(error_text)?;
            Ok(channel)
        };
        let (channel, copies) = (confirming().await?, confirming().await?);
        let link = Link { connection, channel, copies, delays: Arc::new(Mutex::new(BTreeSet::new())) };
        self.declare_queues(&link).await?;
        Ok(link)
    }

    /// Declares the queue and its dead letters (again: a no-op when they are there).
    async fn declare_queues(&self, link: &Link) -> Result<(), String> {
        for queue in [self.main_queue.as_str(), self.dead_queue.as_str()] {
            let (options, arguments) = durable(FieldTable::default());
            link.copies
                .queue_declare(queue.into(), options, arguments)
                .await
                .map_err(|err| format!("cannot declare queue {queue}: {err}"))?;
        }
        Ok(())
    }

    /// After a copy the broker would not take: the delay queues are declared again on next
    /// use, and the queue and its dead letters now, in case one was deleted under us. The
    /// connection stays (other tasks use it).
    async fn declare_again(&self) {
        let Ok(link) = self.link().await else { return };
        link.delays.lock().unwrap_or_else(|p| p.into_inner()).clear();
        if let Err(cause) = self.declare_queues(&link).await {
            tracing::error!("queue {}: {cause}", self.core.name);
        }
    }

    /// The delay queue for a wait of `ms`, declared on first use over this connection: a quorum
    /// queue whose messages expire back into the queue, dead-lettered at least once (RabbitMQ
    /// keeps an expired message until the queue took it).
    async fn delay_queue(&self, link: &Link, ms: u64) -> Result<String, String> {
        let bucket = delay_bucket(ms);
        let name = format!("{}.delay.{bucket}ms", self.main_queue);
        if link.delays.lock().unwrap_or_else(|p| p.into_inner()).contains(&bucket) {
            return Ok(name);
        }
        let mut arguments = FieldTable::default();
        let text = |value: &str| AMQPValue::LongString(value.into());
        arguments.insert("x-queue-type".into(), text("quorum"));
        arguments.insert("x-dead-letter-exchange".into(), text(""));
        arguments.insert("x-dead-letter-routing-key".into(), text(&self.main_queue));
        arguments.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        arguments.insert("x-overflow".into(), text("reject-publish"));
        let (options, arguments) = durable(arguments);
        link.copies
            .queue_declare(name.as_str().into(), options, arguments)
            .await
            .map_err(|err| format!("cannot declare queue {name}: {err}"))?;
        link.delays.lock().unwrap_or_else(|p| p.into_inner()).insert(bucket);
        self.delays_seen.lock().unwrap_or_else(|p| p.into_inner()).insert(bucket);
        Ok(name)
    }

    /// Publishes a copy of a message (a retry, a deferral, a delayed publish), in `wait`
    /// milliseconds if not at once, on the copies' channel, and waits for the confirm.
    async fn put(&self, about: &About, payload: &[u8], wait: u64) -> Result<(), String> {
        let link = self.link().await?;
        let properties = about.properties();
        let wait = wait.min(LONGEST_WAIT);
        if wait == 0 {
            return confirmed(&link.copies, &self.main_queue, payload, properties).await;
        }
        let queue = self.delay_queue(&link, wait).await?;
        let properties = properties.with_expiration(ShortString::from(wait.to_string()));
        confirmed(&link.copies, &queue, payload, properties).await
    }

    fn unavailable(&self, cause: String) -> PublishError {
        PublishError::Unavailable { queue: self.core.name.clone(), cause }
    }

    async fn count_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(COUNTS_EVERY).await;
            self.read_counts().await;
        }
    }

    /// Reads how many messages wait in the queue, the delay queues this node has used, and its
    /// dead letters, with passive declares on a channel of their own (a missing queue closes
    /// it: a delay queue deleted at the broker is forgotten, and the next count opens another);
    /// a count that cannot be read keeps its last value.
    async fn read_counts(&self) {
        let Ok(link) = self.link().await else { return };
        let delays: Vec<u64> =
            self.delays_seen.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        let mut channel: Option<Channel> = None;
        let mut count = async |queue: String| -> Result<u64, String> {
            let open = match channel.take() {
                Some(open) if open.status().connected() => open,
                _ => link.connection.create_channel().await.map_err(error_text)?,
            };
            let declared = open.queue_declare(queue.as_str().into(), passive(), FieldTable::default());
            let answer = match tokio::time::timeout(BROKER_TIMEOUT, declared).await {
                Ok(Ok(queue)) => Ok(u64::from(queue.message_count())),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err("no answer in time".to_owned()),
            };
            channel = Some(open);
            answer
        };
        let before = self.broker_counts();
        let ready = count(self.main_queue.clone()).await.ok();
        let dead = count(self.dead_queue.clone()).await.ok();
        let mut delayed = Some(0);
        for bucket in delays {
            let held = match count(format!("{}.delay.{bucket}ms", self.main_queue)).await {
                Ok(held) => Some(held),
                Err(cause) if cause.contains("NOT_FOUND") => {
                    self.delays_seen.lock().unwrap_or_else(|p| p.into_inner()).remove(&bucket);
                    Some(0)
                }
                Err(_) => None,
            };
            delayed = delayed.zip(held).map(|(sum, held)| sum + held);
        }
        if let Some(open) = channel {
            let _ = open.close(200, "counted".into()).await;
        }
        let counts = BrokerCounts {
            ready: ready.unwrap_or(before.ready),
            delayed: delayed.unwrap_or(before.delayed),
            dead: dead.unwrap_or(before.dead),
        };
        *self.broker.lock().unwrap_or_else(|p| p.into_inner()) = counts;
    }

    fn broker_counts(&self) -> BrokerCounts {
        *self.broker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts consuming, once: only a node with workers for the queue takes its messages.
    fn start_consuming(self: &Arc<Self>) {
        if !self.consuming.swap(true, Ordering::AcqRel) {
            tokio::spawn(Arc::clone(self).consume_forever());
        }
    }

    async fn consume_forever(self: Arc<Self>) {
        let mut wait = RECONNECT_FIRST;
        loop {
            let began = std::time::Instant::now();
            let cause = match self.consume().await {
                Ok(()) => "the broker cancelled the consumer".to_owned(),
                Err(cause) => cause,
            };
            // What the broker delivered on that connection returns to the queue on its side.
            let lost = {
                let mut local = self.lock();
                let lost = local.buffered.len() + local.leased.len();
                local.buffered.clear();
                local.leased.clear();
                lost
            };
            tracing::warn!(
                "queue {}: consuming from {} stopped ({cause}); {lost} unacked deliveries go back to the \
                 broker; again in {wait:?}",
                self.core.name,
                self.shown
            );
            // A consumer that ran a while starts its backoff over.
            if began.elapsed() > 10 * RECONNECT_MOST {
                wait = RECONNECT_FIRST;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RECONNECT_MOST);
        }
    }

    async fn consume(&self) -> Result<(), String> {
        let connection = self.connect().await?;
        let channel = connection.create_channel().await.map_err(error_text)?;
        channel
            .basic_qos(self.window.load(Ordering::Relaxed), BasicQosOptions::default())
            .await
            .map_err(error_text)?;
        let mut consumer = channel
            .basic_consume(
                self.main_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(error_text)?;
        tracing::info!("queue {}: consuming from {}", self.core.name, self.shown);
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery.map_err(error_text)?;
            self.lock().buffered.push_back((now_ms(), incoming(delivery)));
            self.ready.notify_waiters();
        }
        Ok(())
    }

    /// Ends the leases that ran out by `now`: each is a failed delivery. Deliveries buffered
    /// here for longer than a lease (no worker took them) go back to the broker, for a node
    /// whose workers can.
    fn expire(self: &Arc<Self>, now: u64) {
        let (expired, unclaimed): (Vec<Held>, Vec<Incoming>) = {
            let mut local = self.lock();
            let tokens: Vec<u64> =
                local.leased.iter().filter(|(_, held)| held.until <= now).map(|(token, _)| *token).collect();
            let expired = tokens.iter().filter_map(|token| local.leased.remove(token)).collect();
            let mut unclaimed = Vec::new();
            while local.buffered.front().is_some_and(|(at, _)| at + self.settings.lease <= now) {
                unclaimed.extend(local.buffered.pop_front().map(|(_, message)| message));
            }
            (expired, unclaimed)
        };
        for message in unclaimed {
            tokio::spawn(async move {
                let _ = message
                    .acker
                    .nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() })
                    .await;
            });
        }
        for held in expired {
            let amqp = Arc::clone(self);
            let error = format!("its lease of {:?} ran out", Duration::from_millis(self.settings.lease));
            tokio::spawn(async move { amqp.settle_failed(held.incoming, &error).await });
        }
    }

    fn take_lease(&self, id: u64, token: u64) -> Result<Incoming, Stale> {
        let mut local = self.lock();
        match local.leased.get(&token) {
            Some(held) if held.incoming.about.id == id => {}
            _ => return Err(Stale { id }),
        }
        local.leased.remove(&token).map(|held| held.incoming).ok_or(Stale { id })
    }

    /// Publishes a failed delivery again to be retried after its backoff, or to the dead
    /// letters once its attempts are used up; then acks it.
    async fn settle_failed(&self, message: Incoming, error: &str) -> Failed {
        let attempt = message.about.attempts + 1;
        let now = now_ms();
        let about = message.about.after(attempt, Some(error));
        let (failed, copied) = if attempt >= self.settings.max_attempts {
            if self.settings.dead_letter {
                let copied = match self.link().await {
                    Ok(link) => {
                        confirmed(&link.copies, &self.dead_queue, &message.payload, about.properties()).await
                    }
                    Err(cause) => Err(cause),
                };
                (Failed::Dead, copied)
            } else {
                (Failed::Dropped, Ok(()))
            }
        } else {
            let wait = backoff(&self.settings, attempt, fastrand::f64());
            (Failed::RetryAt(now + wait), self.put(&about, &message.payload, wait).await)
        };
        if let Err(cause) = copied {
            // Given back, a second later so that a broker refusing copies is not hammered, and
            // declared again from scratch in case a queue went missing: delivered again, never
            // lost.
            tracing::warn!(
                "queue {}: message {} failed and could not be kept for a retry ({cause}); it goes back to the queue",
                self.core.name,
                crate::http::id_text(about.id)
            );
            self.declare_again().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ =
                message.acker.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
            return Failed::RetryAt(now);
        }
        if !matches!(message.acker.ack(BasicAckOptions::default()).await, Ok(true)) {
            tracing::debug!(
                "queue {}: message {} was copied but its ack did not reach the broker: it comes again",
                self.core.name,
                crate::http::id_text(about.id)
            );
        }
        let (total, state) = match failed {
            Failed::RetryAt(_) => (&self.core.totals.retried, "retrying"),
            Failed::Dead | Failed::Dropped => (&self.core.totals.dead, "dead"),
        };
        total.fetch_add(1, Ordering::Relaxed);
        self.lock().jobs.set(about.id, state, attempt, Some(error));
        failed
    }

    /// Takes dead letters (`ids`, or all) off their queue one by one to list, redrive or purge
    /// them; what is not acked goes back when the sweep's connection closes.
    async fn sweep_dead(&self, ids: Option<&[u64]>, sweep: Sweep) -> Result<Swept, PublishError> {
        let unavailable = |err: lapin::Error| self.unavailable(err.to_string());
        let connection = self.connect().await.map_err(|cause| self.unavailable(cause))?;
        let channel = connection.create_channel().await.map_err(unavailable)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(unavailable)?;
        let mut swept = Swept::default();
        // Unacked, a letter is not given again on this channel. The sweep takes at most the
        // letters there were when it began: a redriven one that fails again and comes back
        // while it runs is left for the next.
        let mut left: Option<u32> = None;
        while left != Some(0) {
            let got = channel.basic_get(self.dead_queue.as_str().into(), BasicGetOptions::default());
            let got = tokio::time::timeout(BROKER_TIMEOUT, got)
                .await
                .map_err(|_| self.unavailable(format!("no answer within {BROKER_TIMEOUT:?}")))?
                .map_err(unavailable)?;
            let Some(message) = got else { break };
            // The count is of the letters after this one.
            left = Some(left.map_or(message.message_count, |left| left - 1).min(message.message_count));
            let delivery = message.delivery;
            let about = About::of(&delivery.properties);
            if !ids.is_none_or(|ids| ids.contains(&about.id)) {
                continue;
            }
            match sweep {
                Sweep::List { limit, body_max } => {
                    if swept.listed.len() >= limit {
                        break;
                    }
                    let len = delivery.data.len();
                    let body = (len <= body_max).then(|| Bytes::copy_from_slice(&delivery.data));
                    let letter = DeadLetter {
                        id: about.id,
                        attempts: about.attempts,
                        enqueued_at: about.enqueued_at,
                        error: about.error.as_deref().map(Arc::from),
                        location: Location {
                            segment: 0,
                            offset: 0,
                            len: u32::try_from(len).unwrap_or(u32::MAX),
                        },
                        content_type: about.content_type,
                    };
                    swept.listed.push((letter, body));
                    continue;
                }
                Sweep::Redrive => {
                    let again = about.after(0, None);
                    confirmed(&channel, &self.main_queue, &delivery.data, again.properties())
                        .await
                        .map_err(|cause| self.unavailable(cause))?;
                }
                Sweep::Purge => {}
            }
            delivery.acker.ack(BasicAckOptions::default()).await.map_err(unavailable)?;
            swept.taken += 1;
        }
        let _ = connection.close(200, "swept".into()).await;
        Ok(swept)
    }
}

/// What a sweep of the dead letters does with each.
#[derive(Clone, Copy)]
enum Sweep {
    List { limit: usize, body_max: usize },
    Redrive,
    Purge,
}

#[derive(Default)]
struct Swept {
    taken: usize,
    listed: Vec<(DeadLetter, Option<Bytes>)>,
}

impl QueueStore for Amqp {
    async fn publish(self: &Arc<Self>, messages: Vec<NewMessage>) -> Result<Vec<Published>, PublishError> {
        let began = std::time::Instant::now();
        let now = now_ms();
        if let Some(max) = self.core.limits.max_messages {
            let broker = self.broker_counts();
            let held = broker.ready + broker.delayed;
            if held + messages.len() as u64 > max {
                return Err(PublishError::Full {
                    queue: self.core.name.clone(),
                    held,
                    limit: format!("max_messages is {max}"),
                });
            }
        }
        let mut answers: Vec<Option<Published>> = vec![None; messages.len()];
        let mut repeats = Vec::new();
        let mut fresh = Vec::new();
        {
            let mut local = self.lock();
            for (index, message) in messages.into_iter().enumerate() {
                if let Some(key) = &message.idempotency_key {
                    if let Some((id, _)) = local.keys.named.get(key).filter(|(_, until)| *until > now) {
                        answers[index] = Some(Published { id: *id, duplicate: true });
                        continue;
                    }
                    if let Some(waiting) = local.keys.pending.get_mut(key) {
                        let (tell, told) = oneshot::channel();
                        waiting.push(tell);
                        repeats.push((index, told));
                        continue;
                    }
                    local.keys.pending.insert(key.clone(), Vec::new());
                }
                fresh.push((index, random_u64(), message));
            }
        }
        if !fresh.is_empty() {
            // In a task of its own: a client gone mid-publish still settles the keys it holds.
            let keys: Vec<String> = fresh.iter().filter_map(|(_, _, m)| m.idempotency_key.clone()).collect();
            let amqp = Arc::clone(self);
            let written = tokio::spawn(async move { amqp.publish_now(fresh, now).await });
            let stored = match written.await {
                Ok(stored) => stored?,
                Err(_) => {
                    // The task ended without settling its keys: their repeats must not wait forever.
                    let stopped = self.unavailable("the publish stopped".into());
                    let mut local = self.lock();
                    for key in keys {
                        for waiting in local.keys.pending.remove(&key).unwrap_or_default() {
                            let _ = waiting.send(Err(stopped.clone()));
                        }
                    }
                    return Err(stopped);
                }
            };
            let took = began.elapsed().as_secs_f64();
            for (index, id) in stored {
                self.core.latencies.publish.observe(took);
                answers[index] = Some(Published { id, duplicate: false });
            }
        }
        for (index, told) in repeats {
            let id = match told.await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(self.unavailable("the first publish with this key was abandoned".into()))
                }
            };
            answers[index] = Some(Published { id, duplicate: true });
        }
        Ok(answers.into_iter().flatten().collect())
    }

    fn lease(self: &Arc<Self>, max: usize) -> Vec<Delivery> {
        let now = now_ms();
        self.expire(now);
        let mut local = self.lock();
        let mut deliveries = Vec::new();
        while deliveries.len() < max {
            let Some((_, message)) = local.buffered.pop_front() else { break };
            let token = random_u64();
            let until = now + self.settings.lease;
            let about = &message.about;
            deliveries.push(Delivery {
                id: about.id,
                token,
                attempt: about.attempts + 1,
                location: Location {
                    segment: 0,
                    offset: 0,
                    len: u32::try_from(message.payload.len()).unwrap_or(u32::MAX),
                },
                content_type: about.content_type.clone(),
                traceparent: about.traceparent.clone(),
                enqueued_at: about.enqueued_at,
                until,
            });
            local.jobs.set(about.id, "running", about.attempts + 1, None);
            local.leased.insert(token, Held { incoming: message, until });
        }
        self.core.totals.delivered.fetch_add(deliveries.len() as u64, Ordering::Relaxed);
        deliveries
    }

    fn ready_now(&self) -> usize {
        let waiting = self.broker_counts().ready + self.lock().buffered.len() as u64;
        usize::try_from(waiting).unwrap_or(usize::MAX)
    }

    fn has_ready(self: &Arc<Self>) -> bool {
        self.start_consuming();
        self.expire(now_ms());
        !self.lock().buffered.is_empty()
    }

    async fn wait_ready(self: &Arc<Self>) {
        self.start_consuming();
        wait_until_due(&self.ready, |now| {
            self.expire(now);
            let local = self.lock();
            // Nothing buffered: the next lease to run out is when to look again.
            local.buffered.is_empty().then(|| local.leased.values().map(|held| held.until).min())
        })
        .await
    }

    fn payload(&self, delivery: &Delivery) -> std::io::Result<Bytes> {
        let local = self.lock();
        match local.leased.get(&delivery.token) {
            Some(held) if held.incoming.about.id == delivery.id => Ok(held.incoming.payload.clone()),
            _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, "its lease ended")),
        }
    }

    async fn ack(self: &Arc<Self>, id: u64, token: u64) -> Result<(), Stale> {
        let message = self.take_lease(id, token)?;
        // Acked at the broker only over the connection it came on; if that broke, the broker
        // delivers it again.
        if !matches!(message.acker.ack(BasicAckOptions::default()).await, Ok(true)) {
            return Err(Stale { id });
        }
        self.core.totals.acked.fetch_add(1, Ordering::Relaxed);
        self.core
            .latencies
            .end_to_end
            .observe(now_ms().saturating_sub(message.about.enqueued_at) as f64 / 1000.0);
        let mut local = self.lock();
        local.jobs.states.remove(&id);
        Ok(())
    }

    async fn fail(self: &Arc<Self>, id: u64, token: u64, error: &str) -> Result<Failed, Stale> {
        let message = self.take_lease(id, token)?;
        Ok(self.settle_failed(message, error).await)
    }

    async fn defer(self: &Arc<Self>, id: u64, token: u64, at: SystemTime) -> Result<(), Stale> {
        let message = self.take_lease(id, token)?;
        let wait = millis(at).saturating_sub(now_ms());
        let about = message.about.after(message.about.attempts, None);
        match self.put(&about, &message.payload, wait).await {
            Ok(()) => {
                let _ = message.acker.ack(BasicAckOptions::default()).await;
            }
            Err(cause) => {
                tracing::warn!("queue {}: a deferred message goes back at once: {cause}", self.core.name);
                let _ = message
                    .acker
                    .nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() })
                    .await;
            }
        }
        Ok(())
    }

    fn renew(&self, id: u64, token: u64) -> Result<SystemTime, Stale> {
        let mut local = self.lock();
        match local.leased.get_mut(&token) {
            Some(held) if held.incoming.about.id == id => {
                held.until = now_ms() + self.settings.lease;
                Ok(UNIX_EPOCH + Duration::from_millis(held.until))
            }
            _ => Err(Stale { id }),
        }
    }

    fn job_status(&self, id: u64) -> Option<JobStatus> {
        self.lock().jobs.states.get(&id).cloned()
    }

    fn counts(&self) -> Counts {
        let broker = self.broker_counts();
        let local = self.lock();
        let buffered = local.buffered.len() as u64;
        Counts {
            ready: broker.ready + buffered + broker.delayed,
            delayed: broker.delayed,
            in_flight: local.leased.len() as u64,
            dead: broker.dead,
            // The broker does not tell a queue's bytes over AMQP.
            bytes: 0,
            oldest_enqueued_at: local.buffered.iter().map(|(_, m)| m.about.enqueued_at).min(),
        }
    }

    async fn dead_letters(
        self: &Arc<Self>,
        limit: usize,
        body_max: usize,
    ) -> Result<Vec<(DeadLetter, Option<Bytes>)>, PublishError> {
        Ok(self.sweep_dead(None, Sweep::List { limit, body_max }).await?.listed)
    }

    async fn redrive(self: &Arc<Self>, ids: Option<&[u64]>) -> Result<usize, PublishError> {
        let redriven = self.sweep_dead(ids, Sweep::Redrive).await?.taken;
        self.core.totals.redriven.fetch_add(redriven as u64, Ordering::Relaxed);
        Ok(redriven)
    }

    async fn purge(self: &Arc<Self>, ids: Option<&[u64]>) -> Result<usize, PublishError> {
        if ids.is_some() {
            return Ok(self.sweep_dead(ids, Sweep::Purge).await?.taken);
        }
        let link = self.link().await.map_err(|cause| self.unavailable(cause))?;
        let purged = link.copies.queue_purge(self.dead_queue.as_str().into(), QueuePurgeOptions::default());
        let purged = tokio::time::timeout(BROKER_TIMEOUT, purged)
            .await
            .map_err(|_| self.unavailable(format!("no answer within {BROKER_TIMEOUT:?}")))?
            .map_err(|err| self.unavailable(err.to_string()))?;
        Ok(purged as usize)
    }

    async fn compact(self: &Arc<Self>) -> std::io::Result<usize> {
        // The broker keeps its own disk.
        Ok(0)
    }

    async fn fires(self: &Arc<Self>, schedule: &str) -> bool {
        let mut leads = self.leads.lock().await;
        if leads.get(schedule).is_some_and(|connection| connection.status().connected()) {
            return true;
        }
        leads.remove(schedule);
        let leader = format!("{}.schedule.{schedule}.leader", self.main_queue);
        let claim = async {
            let connection = self.connect().await?;
            let channel = connection.create_channel().await.map_err(error_text)?;
            let options =
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
            match channel.queue_declare(leader.as_str().into(), options, FieldTable::default()).await {
                Ok(_) => Ok(Some(connection)),
                Err(err) => {
                    let _ = connection.close(200, "not the leader".into()).await;
                    // Another node holds it; anything else is a problem worth saying.
                    if err.to_string().contains("RESOURCE_LOCKED") {
                        Ok(None)
                    } else {
                        Err(err.to_string())
                    }
                }
            }
        };
        let connection = match tokio::time::timeout(BROKER_TIMEOUT, claim).await {
            Ok(Ok(Some(connection))) => connection,
            Ok(Ok(None)) => return false,
            Ok(Err(cause)) => {
                tracing::warn!(
                    "queue {}: cannot claim schedule {schedule} at the broker: {cause}",
                    self.core.name
                );
                return false;
            }
            Err(_) => {
                tracing::warn!(
                    "queue {}: the broker did not answer the claim of schedule {schedule}",
                    self.core.name
                );
                return false;
            }
        };
        tracing::info!("queue {}: this node fires schedule {schedule}", self.core.name);
        leads.insert(schedule.to_owned(), connection);
        true
    }

    /// The prefetch window: surge holds no more unacked deliveries than its workers take.
    fn workers_take(&self, deliveries: usize) {
        self.window.store(u16::try_from(deliveries).unwrap_or(u16::MAX).max(1), Ordering::Relaxed);
    }
}

impl Amqp {
    /// Publishes `fresh` over the confirming channel and settles each one's idempotency key by
    /// its own outcome: a batch that failed in part still names the messages that were taken.
    async fn publish_now(
        &self,
        fresh: Vec<(usize, u64, NewMessage)>,
        now: u64,
    ) -> Result<Vec<(usize, u64)>, PublishError> {
        let outcomes = self.publish_confirmed(&fresh, now).await;
        let mut local = self.lock();
        for ((_, id, message), outcome) in fresh.iter().zip(&outcomes) {
            let settled = outcome.as_ref().map(|()| *id).map_err(|cause| self.unavailable(cause.clone()));
            if settled.is_ok() {
                local.jobs.set(*id, "queued", 0, None);
            }
            let Some(key) = &message.idempotency_key else { continue };
            if settled.is_ok() {
                local.keys.named.insert(key.clone(), (*id, now + self.settings.idempotency_window));
            }
            for waiting in local.keys.pending.remove(key).unwrap_or_default() {
                let _ = waiting.send(settled.clone());
            }
        }
        if local.keys.named.len() > 4 * 1024 && local.keys.named.len().is_power_of_two() {
            local.keys.named.retain(|_, (_, until)| *until > now);
        }
        drop(local);
        let taken = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
        self.core.totals.published.fetch_add(taken as u64, Ordering::Relaxed);
        if let Some(Err(cause)) = outcomes.into_iter().find(Result::is_err) {
            return Err(self.unavailable(cause));
        }
        Ok(fresh.iter().map(|(index, id, _)| (*index, *id)).collect())
    }

    /// Publishes each message and waits for the broker's confirms, all sent before any is
    /// waited for; the outcome of each, in order.
    async fn publish_confirmed(
        &self,
        fresh: &[(usize, u64, NewMessage)],
        now: u64,
    ) -> Vec<Result<(), String>> {
        let link = match self.link().await {
            Ok(link) => link,
            Err(cause) => return vec![Err(cause); fresh.len()],
        };
        let deadline = tokio::time::Instant::now() + BROKER_TIMEOUT;
        let late = || format!("the broker did not confirm within {BROKER_TIMEOUT:?}");
        let mut outcomes: Vec<Option<Result<(), String>>> = vec![None; fresh.len()];
        let mut confirms = Vec::with_capacity(fresh.len());
        for (index, (_, id, message)) in fresh.iter().enumerate() {
            let about = About {
                id: *id,
                attempts: 0,
                enqueued_at: now,
                content_type: message.content_type.as_deref().map(Arc::from),
                key: message.idempotency_key.clone(),
                error: None,
                traceparent: message.traceparent.as_deref().map(Arc::from),
            };
            let wait = message.not_before.map_or(0, |at| millis(at).saturating_sub(now));
            if wait > 0 {
                // Rare: one at a time through its delay queue.
                outcomes[index] = Some(self.put(&about, &message.payload, wait).await);
                continue;
            }
            let sent = send(&link.channel, &self.main_queue, &message.payload, about.properties());
            match tokio::time::timeout_at(deadline, sent).await {
                Ok(Ok(confirm)) => confirms.push((index, confirm)),
                Ok(Err(err)) => outcomes[index] = Some(Err(err.to_string())),
                Err(_) => outcomes[index] = Some(Err(late())),
            }
        }
        for (index, confirm) in confirms {
            outcomes[index] = Some(match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(confirmation)) => took(confirmation, &self.main_queue),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err(late()),
            });
        }
        outcomes.into_iter().map(|outcome| outcome.unwrap_or_else(|| Err("it was not sent".into()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(without_password("amqp://guest:secret@rabbit:5672/%2f"), "amqp://guest@rabbit:5672/%2f");
        assert_eq!(without_password("amqp://rabbit"), "amqp://rabbit");
        assert_eq!(without_password("amqps://u:p@h/v"), "amqps://u@h/v");
    }

    #[test]
    fn a_delay_waits_in_the_queue_of_its_power_of_two() {
        assert_eq!([0, 1, 3, 1000, 1024, 1025].map(delay_bucket), [1, 1, 4, 1024, 1024, 2048]);
    }
}
