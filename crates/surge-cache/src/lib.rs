//! Cache-aside for services (and, later, the gateway): a read goes to an in-process tier,
//! then to Redis, and only then to the loader (the database, say); what the loader gives is
//! kept in both tiers for a TTL with jitter. However many ask for one missing key at once, the
//! loader runs once and they all get its answer (single flight). A key the loader says does
//! not exist can be remembered as missing for a while (negative caching). Invalidating a key
//! deletes it from Redis and tells every process sharing the Redis tier, through pub/sub, to
//! drop it from its own tier.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use surge_cache::{Cache, CacheConfig};
//!
//! let users = Cache::open(CacheConfig {
//!     redis: Some("redis://127.0.0.1:6379".into()),
//!     ..CacheConfig::new("users", Duration::from_secs(60))
//! })
//! .await;
//! let user = users
//!     .get_or_load("user:42", async || -> Result<Option<bytes::Bytes>, std::io::Error> {
//!         Ok(Some(bytes::Bytes::from_static(b"{\"name\": \"Ada\"}"))) // SELECT ... WHERE id = 42
//!     })
//!     .await?;
//! users.invalidate("user:42").await; // after an UPDATE
//! # Ok(()) }
//! ```
//!
//! Redis is optional and never required to answer: when it is down or slow (each call has
//! [`REDIS_TIMEOUT`]), reads fall back to the loader and the local tier, with a warning, and
//! the error is counted. Away at open, it is taken on in the background once it answers.
//!
//! What it does not promise: an invalidation that arrives while a load for the same key is
//! under way can be followed by that load's (older) value, until its TTL ends; and an
//! invalidation published while a process is cut off from Redis is not seen by it (its local
//! entries end with their TTL).

mod metrics;
pub mod responses;
pub mod rules;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;

pub use metrics::{CacheMetrics, CacheStats};

/// How long one Redis call may take before the cache goes on without it.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Names the cache in metrics, in its Redis keys (`surge-cache:NAME:KEY`) and in its
    /// invalidation channel.
    pub name: String,
    /// How long a loaded value is kept.
    pub ttl: Duration,
    /// Up to this fraction of the TTL is taken off at random per entry, so that keys loaded
    /// together do not all expire (and reload) together.
    pub jitter: f64,
    /// How long a key the loader found missing is remembered as missing; `None`: not at all.
    pub negative_ttl: Option<Duration>,
    /// The in-process tier's bound: keys and values, in bytes.
    pub max_bytes: u64,
    /// Values larger than this are not put in Redis (they stay local).
    pub max_redis_value: usize,
    /// The Redis tier, shared by every process that names it; `None`: the local tier only.
    pub redis: Option<String>,
}

impl CacheConfig {
    /// A local-only cache of up to 64 MiB with a 10% jitter and no negative caching.
    pub fn new(name: &str, ttl: Duration) -> CacheConfig {
        CacheConfig {
            name: name.to_owned(),
            ttl,
            jitter: 0.1,
            negative_ttl: None,
            max_bytes: 64 << 20,
            max_redis_value: 1 << 20,
            redis: None,
        }
    }
}

/// What the local tier holds for a key, with how long it lives.
#[derive(Debug, Clone)]
enum Entry {
    Value(Bytes, Duration),
    Missing(Duration),
}

impl Entry {
    fn lifetime(&self) -> Duration {
        match self {
            Entry::Value(_, ttl) | Entry::Missing(ttl) => *ttl,
        }
    }

    fn value(self) -> Option<Bytes> {
        match self {
            Entry::Value(value, _) => Some(value),
            Entry::Missing(_) => None,
        }
    }
}

/// Each entry lives its own jittered TTL.
struct Lifetimes;

impl moka::Expiry<String, Entry> for Lifetimes {
    fn expire_after_create(&self, _key: &String, entry: &Entry, _created_at: Instant) -> Option<Duration> {
        Some(entry.lifetime())
    }
}

/// The TTL less a random part of up to `jitter` of it; `random` is in [0, 1).
pub fn jittered(ttl: Duration, jitter: f64, random: f64) -> Duration {
    ttl.mul_f64(1.0 - jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0))
}

/// Redis's marker for a key known missing; a real value never starts with this byte string.
const MISSING: &[u8] = b"\0surge-cache:missing";

pub struct Cache {
    config: CacheConfig,
    local: moka::future::Cache<String, Entry>,
    /// The Redis tier once connected (at open, or later in the background).
    redis: Arc<std::sync::OnceLock<ConnectionManager>>,
    metrics: Arc<CacheMetrics>,
    /// The task that connects (when Redis was away at open) and then listens for
    /// invalidations; stopped with the cache.
    redis_task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Some(task) = &self.redis_task {
            task.abort();
        }
    }
}

impl Cache {
    /// Opens the cache; with a Redis tier, connects to it and listens for invalidations. Redis
    /// unreachable at start is a warning, not an error: the cache works locally until it is
    /// back.
    pub async fn open(config: CacheConfig) -> Arc<Cache> {
        let local = moka::future::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|key: &String, entry: &Entry| {
                let value = match entry {
                    Entry::Value(value, _) => value.len(),
                    Entry::Missing(_) => 0,
                };
                u32::try_from(key.len() + value + 64).unwrap_or(u32::MAX)
            })
            .expire_after(Lifetimes)
            .build();
        let metrics = Arc::new(CacheMetrics::new(&config.name));
        let redis = Arc::new(std::sync::OnceLock::new());
        let redis_task = match &config.redis {
            Some(url) => {
                let (local, counted) = (local.clone(), Arc::clone(&metrics));
                let listen = Listen {
                    url: url.clone(),
                    name: config.name.clone(),
                    channel: channel(&config.name),
                    redis: Arc::clone(&redis),
                };
                let heard = move |key: String| {
                    let local = local.clone();
                    async move { local.invalidate(&key).await }
                };
                Some(listen.start(move || counted.count_redis_error(), heard).await)
            }
            None => None,
        };
        Arc::new(Cache { config, local, redis, metrics, redis_task })
    }

    pub fn metrics(&self) -> &Arc<CacheMetrics> {
        &self.metrics
    }

    fn redis_key(&self, key: &str) -> String {
        format!("surge-cache:{}:{key}", self.config.name)
    }

    /// The value of `key`: from the local tier, else from Redis, else from `load` (run once
    /// for all concurrent callers of this key), kept in both tiers. `Ok(None)`: the loader
    /// says the key does not exist. A loader's error is given to every caller waiting on it
    /// and is not kept.
    pub async fn get_or_load<F, Fut, E>(&self, key: &str, load: F) -> Result<Option<Bytes>, Arc<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Bytes>, E>>,
        E: Send + Sync + 'static,
    {
        if let Some(entry) = self.local.get(key).await {
            self.metrics.count_local_hit(matches!(entry, Entry::Missing(_)));
            return Ok(entry.value());
        }
        let mut ran = false;
        let entry = self
            .local
            .try_get_with(key.to_owned(), async {
                ran = true;
                self.fill(key, load).await
            })
            .await?;
        if !ran {
            // Another caller's load answered this one.
            self.metrics.count_collapsed();
        }
        if let Entry::Missing(_) = entry {
            if self.config.negative_ttl.is_none() {
                self.local.invalidate(key).await;
            }
        }
        Ok(entry.value())
    }

    /// A miss in the local tier: Redis, then the loader.
    async fn fill<F, Fut, E>(&self, key: &str, load: F) -> Result<Entry, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Bytes>, E>>,
    {
        if let Some(entry) = self.read_redis(key).await {
            self.metrics.count_redis_hit();
            return Ok(entry);
        }
        self.metrics.count_load();
        let loaded = match load().await {
            Ok(loaded) => loaded,
            Err(err) => {
                self.metrics.count_load_error();
                return Err(err);
            }
        };
        let entry = match loaded {
            Some(value) => {
                Entry::Value(value, jittered(self.config.ttl, self.config.jitter, fastrand::f64()))
            }
            // Without negative caching, a moment: the waiting callers still share the answer.
            None => Entry::Missing(self.config.negative_ttl.unwrap_or(Duration::from_millis(1))),
        };
        self.write_redis(key, &entry).await;
        Ok(entry)
    }

    async fn read_redis(&self, key: &str) -> Option<Entry> {
        let mut redis = self.redis.get()?.clone();
        let mut pipe = redis::pipe();
        pipe.get(self.redis_key(key)).pttl(self.redis_key(key));
        let (value, left) =
            self.redis_call("read", pipe.query_async::<(Option<Vec<u8>>, i64)>(&mut redis)).await?;
        let value = value?;
        // What Redis has left of its TTL, so that the local copy does not outlive it.
        let left = Duration::from_millis(u64::try_from(left).ok().filter(|ms| *ms > 0)?);
        if value == MISSING {
            return Some(Entry::Missing(left));
        }
        Some(Entry::Value(Bytes::from(value), left))
    }

    async fn write_redis(&self, key: &str, entry: &Entry) {
        let Some(mut redis) = self.redis.get().cloned() else { return };
        let (value, ttl): (&[u8], Duration) = match entry {
            Entry::Value(value, ttl) if value.len() <= self.config.max_redis_value => (value, *ttl),
            Entry::Value(..) => return,
            Entry::Missing(ttl) if self.config.negative_ttl.is_some() => (MISSING, *ttl),
            Entry::Missing(_) => return,
        };
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut set = redis::cmd("SET");
        set.arg(self.redis_key(key)).arg(value).arg("PX").arg(millis);
        self.redis_call("write", set.query_async::<()>(&mut redis)).await;
    }

    /// One Redis call, within [`REDIS_TIMEOUT`]; a failure is counted and warned of, and the
    /// cache goes on without it.
    async fn redis_call<T>(
        &self,
        what: &str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        redis_call(&self.config.name, what, call, || self.metrics.count_redis_error()).await
    }

    /// Drops `key` here, in Redis, and (through Redis pub/sub) in every process sharing it.
    pub async fn invalidate(&self, key: &str) {
        self.metrics.count_invalidation();
        // Redis first: a read between the two would otherwise fill the local tier again from it.
        self.invalidate_in_redis(key).await;
        self.local.invalidate(key).await;
    }

    async fn invalidate_in_redis(&self, key: &str) {
        let Some(mut redis) = self.redis.get().cloned() else { return };
        let mut pipe = redis::pipe();
        pipe.del(self.redis_key(key)).ignore().publish(channel(&self.config.name), key).ignore();
        self.redis_call("invalidate", pipe.query_async::<()>(&mut redis)).await;
    }

    /// Bytes the local tier holds now (keys, values and a small overhead each), after its
    /// pending evictions ran.
    pub async fn local_bytes(&self) -> u64 {
        self.local.run_pending_tasks().await;
        self.local.weighted_size()
    }
}

/// One Redis call of the cache `name` within [`REDIS_TIMEOUT`]; a failure is told to `failed`
/// and warned of, and the cache goes on without Redis.
pub(crate) async fn redis_call<T>(
    name: &str,
    what: &str,
    call: impl Future<Output = redis::RedisResult<T>>,
    failed: impl FnOnce(),
) -> Option<T> {
    let cause = match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(Ok(answer)) => return Some(answer),
        Ok(Err(err)) => err.to_string(),
        Err(_) => "no answer in time".to_owned(),
    };
    failed();
    tracing::warn!("cache {name}: Redis {what} failed ({cause}); going on without it");
    None
}

fn channel(name: &str) -> String {
    format!("surge-cache:{name}:invalidate")
}

async fn connect(url: &str) -> Result<(redis::Client, ConnectionManager), String> {
    let client = redis::Client::open(url).map_err(|err| err.to_string())?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(REDIS_TIMEOUT))
        .set_connection_timeout(Some(Duration::from_secs(2)));
    let manager =
        tokio::time::timeout(Duration::from_secs(2), client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| "no answer within 2 s".to_owned())?
            .map_err(|err| err.to_string())?;
    Ok((client, manager))
}

/// Where a cache's Redis tier is and the channel it hears on.
pub(crate) struct Listen {
    pub url: String,
    /// The cache's name, for logs.
    pub name: String,
    pub channel: String,
    /// Set once connected.
    pub redis: Arc<std::sync::OnceLock<ConnectionManager>>,
}

impl Listen {
    /// Connects and listens in a task, and waits (up to 2 s) until it listens: messages from
    /// then on reach this process, unless Redis is away or slow; then the cache starts local
    /// and takes Redis on when it answers.
    pub(crate) async fn start<Fut>(
        self,
        failed: impl Fn() + Send + 'static,
        heard: impl FnMut(String) -> Fut + Send + 'static,
    ) -> tokio::task::JoinHandle<()>
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (subscribed, listening) = tokio::sync::oneshot::channel();
        let (name, url) = (self.name.clone(), self.url.clone());
        let task = tokio::spawn(connect_and_listen(self, subscribed, failed, heard));
        if tokio::time::timeout(Duration::from_secs(2), listening).await.is_err() {
            tracing::warn!("cache {name}: Redis at {url} is not answering yet; local tier until it does");
        }
        task
    }
}

/// Connects to Redis (again and again, with backoff, while it is away; each failure told to
/// `failed`), makes it the cache's second tier, then hands every message on the channel to
/// `heard`, subscribing again when Redis goes away.
async fn connect_and_listen<Fut: Future<Output = ()>>(
    listen: Listen,
    subscribed: tokio::sync::oneshot::Sender<()>,
    failed: impl Fn(),
    mut heard: impl FnMut(String) -> Fut,
) {
    let Listen { url, name, channel, redis } = listen;
    let mut wait = Duration::from_millis(100);
    let client = loop {
        match connect(&url).await {
            Ok((client, manager)) => {
                let _ = redis.set(manager);
                break client;
            }
            Err(err) => {
                failed();
                tracing::debug!("cache {name}: Redis at {url} cannot be reached ({err}); again in {wait:?}");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    };
    let mut subscribed = Some(subscribed);
    let mut wait = Duration::from_millis(100);
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(&channel).await.is_ok() {
                    wait = Duration::from_millis(100);
                    if let Some(subscribed) = subscribed.take() {
                        let _ = subscribed.send(());
                    }
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        if let Ok(text) = message.get_payload::<String>() {
                            heard(text).await;
                        }
                    }
                }
            }
            Err(err) => {
                tracing::debug!("cache {name}: cannot subscribe to {channel} ({err}); again in {wait:?}")
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_takes_off_up_to_its_share_of_the_ttl() {
        let ttl = Duration::from_secs(100);
        assert_eq!(jittered(ttl, 0.1, 0.0), ttl);
        assert_eq!(jittered(ttl, 0.1, 0.5), Duration::from_secs(95));
        assert_eq!(jittered(ttl, 0.1, 1.0), Duration::from_secs(90));
        assert_eq!(jittered(ttl, 2.0, 1.0), Duration::ZERO, "a jitter over 1 is 1");
    }
}
