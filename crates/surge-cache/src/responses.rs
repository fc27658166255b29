//! The gateway's response cache: what one route stored, in an in-process tier bounded in bytes
//! (moka, TinyLFU admission) and optionally in Redis, shared by every node naming it; request
//! collapsing (one request upstream per missing key); and purges by URL, prefix or tag, hard
//! or soft, which reach every node through Redis pub/sub. What may be stored and served is
//! decided by [`rules`](crate::rules); this module keeps it.
//!
//! Local keys: `v\0BASE` holds the request fields BASE's responses vary by, `o\0BASE\0VARIANT`
//! one response, `p\0BASE` marks BASE as recently not storable (its requests go upstream at
//! once, without waiting for each other). BASE is [`rules::key`](crate::rules::key); neither it
//! nor a variant can hold a NUL byte, since header values cannot.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, ETAG, LAST_MODIFIED};
use http::{HeaderMap, Method, StatusCode};
use redis::aio::ConnectionManager;
use tokio::sync::watch;

use crate::rules::{self, Policy, Storable};
use crate::Listen;

/// One route's cache settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseSettings {
    /// The route, in metrics, in Redis keys and in purge messages: the same on every node.
    pub name: String,
    pub policy: Policy,
    pub sort_query: bool,
    /// Request fields whose values are part of the key, lower case.
    pub key_headers: Vec<HeaderName>,
    /// Larger responses are passed through.
    pub max_object: u64,
    /// The in-process tier's bound, in bytes.
    pub memory: u64,
    pub collapse_timeout: Duration,
    /// Use the Redis tier when the gateway has one.
    pub shared: bool,
}

/// A stored response.
#[derive(Debug, Clone)]
pub struct Stored {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub storable: Storable,
    pub stored_at: SystemTime,
    /// From `Cache-Tag` and `Surrogate-Key`, for purges by tag.
    pub tags: Vec<String>,
    /// The body compressed, for clients that accept it (textual responses only).
    pub encoded: Encoded,
    /// Which storing of its key it belongs to: a response of an older one (before a POST
    /// made the key's responses out of date) is never served.
    pub generation: u64,
}

/// A stored body in the codings clients ask for, each kept only if smaller.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    pub brotli: Option<Bytes>,
    pub gzip: Option<Bytes>,
}

impl Encoded {
    /// `body` compressed both ways, when the rules say it is worth it.
    fn of(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> Encoded {
        if !rules::compressible(status, headers, body.len()) {
            return Encoded::default();
        }
        let smaller =
            |compressed: Option<Vec<u8>>| compressed.filter(|c| c.len() < body.len()).map(Bytes::from);
        Encoded { brotli: smaller(brotli_of(body)), gzip: smaller(gzip_of(body)) }
    }

    pub fn get(&self, coding: rules::Coding) -> Option<&Bytes> {
        match coding {
            rules::Coding::Brotli => self.brotli.as_ref(),
            rules::Coding::Gzip => self.gzip.as_ref(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.brotli.is_none() && self.gzip.is_none()
    }

    fn len(&self) -> usize {
        self.brotli.as_ref().map_or(0, Bytes::len) + self.gzip.as_ref().map_or(0, Bytes::len)
    }
}

fn gzip_of(body: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    encoder.write_all(body).ok()?;
    encoder.finish().ok()
}

/// Quality 5: most of brotli's gain at a fraction of its top settings' cost; done once per
/// stored response.
fn brotli_of(body: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let mut out = Vec::new();
    {
        let mut encoder = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
        encoder.write_all(body).ok()?;
        encoder.flush().ok()?;
    }
    Some(out)
}

/// How long past its freshness a response with a validator is kept, to be revalidated (a 304
/// costs the instance less than a 200).
const KEEP_TO_REVALIDATE: Duration = Duration::from_secs(60);
/// How long a key whose response was not storable sends its requests upstream at once.
const PASS_FOR: Duration = Duration::from_secs(30);
/// How long the list of fields a key varies by is kept.
const VARY_FOR: Duration = Duration::from_secs(24 * 3600);
/// Objects to read, rewrite or delete in Redis per round trip of a purge, so that a purge of
/// many large objects holds a bounded number of them at once.
const PURGE_BATCH: usize = 64;

/// Names an object under a tag in Redis: a sorted set of object keys, each scored with the time
/// (ms since the epoch) its object expires. Members whose objects are gone are dropped, and the
/// set expires with its last object, so it neither grows without end nor outlives what it names.
const TAG_OBJECT: &str = r"
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then redis.call('PEXPIREAT', KEYS[1], last[2]) end
";

impl Stored {
    /// A response as received `now`, when the rules let it be stored.
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        storable: Storable,
        now: SystemTime,
    ) -> Stored {
        let mut headers = headers;
        // Read back later (from Redis, say), its age must count from when it came.
        if !headers.contains_key(http::header::DATE) {
            if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
                headers.insert(http::header::DATE, date);
            }
        }
        let tags = tags(&headers);
        let encoded = Encoded::of(status, &headers, &body);
        Stored { status, headers, body, storable, stored_at: now, tags, encoded, generation: 0 }
    }

    /// The same body (and its compressed forms) under the fields and freshness a
    /// revalidation gave it, as of `now`.
    pub fn revalidated(&self, headers: HeaderMap, storable: Storable, now: SystemTime) -> Stored {
        let tags = tags(&headers);
        Stored { headers, storable, stored_at: now, tags, ..self.clone() }
    }

    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(ETAG) || self.headers.contains_key(LAST_MODIFIED)
    }

    /// Seconds of freshness left `now`; negative once stale.
    pub fn ttl_left(&self, now: SystemTime) -> i64 {
        let age = rules::current_age(&self.storable, self.stored_at, now).as_secs_f64();
        (self.storable.lifetime.as_secs_f64() - age).floor() as i64
    }

    /// How long to keep it from `now`: while fresh, then while it may be served stale, then
    /// (with a validator) a while to be revalidated.
    fn keep_for(&self, now: SystemTime) -> Duration {
        let age = rules::current_age(&self.storable, self.stored_at, now);
        let fresh = self.storable.lifetime.saturating_sub(age);
        let stale = self.storable.while_revalidate.max(self.storable.if_error);
        let revalidate = if self.has_validator() { KEEP_TO_REVALIDATE } else { Duration::ZERO };
        let keep = fresh.saturating_add(stale).saturating_add(revalidate);
        keep.clamp(Duration::from_secs(1), Duration::from_secs(365 * 24 * 3600))
    }

    /// The same response, stale from now on (a soft purge).
    fn made_stale(&self, now: SystemTime) -> Stored {
        let mut stale = self.clone();
        stale.storable.lifetime = rules::current_age(&self.storable, self.stored_at, now);
        stale
    }

    /// What it weighs in the local tier.
    fn weight(&self, key: &str) -> u32 {
        let headers: usize =
            self.headers.iter().map(|(name, value)| name.as_str().len() + value.len() + 8).sum();
        u32::try_from(key.len() + headers + self.body.len() + self.encoded.len() + 256).unwrap_or(u32::MAX)
    }

    /// Its Redis form: a version byte, its generation, when it was stored, its freshness
    /// lifetime (a soft purge shortens it), the status, the fields and the body.
    fn encode(&self) -> Vec<u8> {
        let mut out = BytesMut::with_capacity(self.body.len() + 512);
        out.put_u8(3);
        out.put_u64(self.generation);
        out.put_u64(self.stored_at.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64));
        out.put_u64(u64::try_from(self.storable.lifetime.as_millis()).unwrap_or(u64::MAX));
        out.put_u16(self.status.as_u16());
        out.put_u32(self.headers.len() as u32);
        for (name, value) in &self.headers {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out.put_slice(&self.body);
        out.to_vec()
    }

    /// Read back from Redis; `None` for anything that does not decode or may no longer be
    /// stored under `policy`.
    fn decode(bytes: &[u8], policy: &Policy) -> Option<Stored> {
        let mut input = bytes;
        let need = |input: &[u8], n: usize| (input.remaining() >= n).then_some(());
        need(input, 1 + 8 + 8 + 2 + 4)?;
        // Version 2 had no lifetime: the fields' is the whole of it.
        let version = input.get_u8();
        if !matches!(version, 2 | 3) {
            return None;
        }
        let generation = input.get_u64();
        let stored_at = UNIX_EPOCH + Duration::from_millis(input.get_u64());
        let lifetime = if version == 3 {
            need(input, 8 + 2 + 4)?;
            Duration::from_millis(input.get_u64())
        } else {
            Duration::MAX
        };
        let status = StatusCode::from_u16(input.get_u16()).ok()?;
        let fields = input.get_u32();
        let mut headers = HeaderMap::new();
        for _ in 0..fields {
            need(input, 2)?;
            let len = usize::from(input.get_u16());
            need(input, len)?;
            let name = HeaderName::from_bytes(&input[..len]).ok()?;
            input.advance(len);
            need(input, 4)?;
            let len = input.get_u32() as usize;
            need(input, len)?;
            let value = HeaderValue::from_bytes(&input[..len]).ok()?;
            input.advance(len);
            headers.append(name, value);
        }
        let body = Bytes::copy_from_slice(input);
        let mut storable = rules::storable(&Method::GET, &HeaderMap::new(), status, &headers, policy).ok()?;
        storable.lifetime = storable.lifetime.min(lifetime);
        let tags = tags(&headers);
        let encoded = Encoded::of(status, &headers, &body);
        Some(Stored { status, headers, body, storable, stored_at, tags, encoded, generation })
    }
}

/// The tags of a response: `Cache-Tag` (comma-separated) and `Surrogate-Key` (space-separated).
fn tags(headers: &HeaderMap) -> Vec<String> {
    let values =
        |name: &str| headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    let mut tags: Vec<String> = values("cache-tag")
        .into_iter()
        .flat_map(|v| v.split(','))
        .chain(values("surrogate-key").into_iter().flat_map(|v| v.split(' ')))
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

/// What a key's responses vary by, and the generation of its storing.
#[derive(Debug)]
struct Varying {
    fields: Arc<[HeaderName]>,
    generation: u64,
}

impl Varying {
    /// Its Redis form: the generation, then one field per line.
    fn encode(&self) -> String {
        let mut text = self.generation.to_string();
        for field in self.fields.iter() {
            text.push('\n');
            text.push_str(field.as_str());
        }
        text
    }

    fn decode(text: &str) -> Option<Varying> {
        let mut lines = text.split('\n');
        let generation = lines.next()?.parse().ok()?;
        let fields = lines.filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok()).collect();
        Some(Varying { fields, generation })
    }
}

#[derive(Debug, Clone)]
enum Slot {
    Vary(Arc<Varying>),
    Object(Arc<Stored>),
    Pass,
}

/// Each slot lives as long as it is useful.
struct Keep;

impl moka::Expiry<String, Slot> for Keep {
    fn expire_after_create(&self, _key: &String, slot: &Slot, _created_at: Instant) -> Option<Duration> {
        Some(match slot {
            Slot::Object(stored) => stored.keep_for(SystemTime::now()),
            Slot::Vary(_) => VARY_FOR,
            Slot::Pass => PASS_FOR,
        })
    }

    fn expire_after_update(
        &self,
        key: &String,
        slot: &Slot,
        updated_at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, slot, updated_at)
    }
}

/// What the cache has for a request.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Arc<Stored>),
    /// Not storable lately: go upstream at once.
    Pass,
    Miss,
}

/// What to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// Every variant of this URL (`http://host/path?query`).
    Url(String),
    /// Every URL starting with this (`http://host/products/`).
    Prefix(String),
    /// Every response tagged so.
    Tag(String),
}

/// Counters of one route's cache.
#[derive(Debug, Default)]
pub struct ResponseMetrics {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Stale responses served (while revalidating, on error, or as the request allowed).
    pub stale: AtomicU64,
    /// Requests answered by another request's trip upstream.
    pub collapsed: AtomicU64,
    pub stored: AtomicU64,
    /// Responses dropped to stay within the memory bound.
    pub evictions: AtomicU64,
    pub purged: AtomicU64,
    pub redis_hits: AtomicU64,
    pub redis_errors: AtomicU64,
}

impl ResponseMetrics {
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct ResponseCache {
    settings: ResponseSettings,
    local: moka::sync::Cache<String, Slot>,
    /// Keys being fetched, each with a channel closed when its fetch ends.
    flights: Mutex<HashMap<String, watch::Receiver<()>>>,
    /// The shared tier, for a route that uses it.
    redis: Option<Arc<OnceLock<ConnectionManager>>>,
    /// Where purges are told to the other nodes, whether or not the route uses the shared
    /// tier: their local tiers hold copies too.
    bus: Option<Arc<OnceLock<ConnectionManager>>>,
    metrics: Arc<ResponseMetrics>,
    /// Purges and forgets so far, here or told by another node. A fetch that began before one
    /// does not store its answer: it may be what was purged. A store checks it and inserts
    /// under the read lock, so a store either lands before a purge's count (and its scan,
    /// which comes after, finds it) or sees the new count and keeps nothing.
    purges: RwLock<u64>,
}

/// Where the purges stood when a fetch began (see [`ResponseCache::fetch_began`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeMark(u64);

/// Whether a request fetches its key for the others, or waits for whoever does.
pub enum Joined {
    Leader(Flight),
    /// Closes when the leader's fetch ends, stored or not.
    Follower(watch::Receiver<()>),
}

/// A fetch under way for a key; the requests waiting on it wake when it is dropped.
pub struct Flight {
    cache: Arc<ResponseCache>,
    key: String,
    _done: watch::Sender<()>,
}

impl Drop for Flight {
    fn drop(&mut self) {
        if let Ok(mut flights) = self.cache.flights.lock() {
            flights.remove(&self.key);
        }
    }
}

impl ResponseCache {
    fn new(settings: ResponseSettings, bus: Option<Arc<OnceLock<ConnectionManager>>>) -> Arc<ResponseCache> {
        let redis = bus.clone().filter(|_| settings.shared);
        let metrics = Arc::new(ResponseMetrics::default());
        let evicted = Arc::clone(&metrics);
        let local = moka::sync::Cache::builder()
            .max_capacity(settings.memory)
            .weigher(|key: &String, slot: &Slot| match slot {
                Slot::Object(stored) => stored.weight(key),
                Slot::Vary(varying) => {
                    u32::try_from(key.len() + varying.fields.len() * 32 + 64).unwrap_or(u32::MAX)
                }
                Slot::Pass => u32::try_from(key.len() + 64).unwrap_or(u32::MAX),
            })
            .expire_after(Keep)
            .eviction_listener(move |_key, _slot, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    ResponseMetrics::count(&evicted.evictions);
                }
            })
            .build();
        Arc::new(ResponseCache {
            settings,
            local,
            flights: Mutex::new(HashMap::new()),
            redis,
            bus,
            metrics,
            purges: RwLock::new(0),
        })
    }

    pub fn settings(&self) -> &ResponseSettings {
        &self.settings
    }

    /// Bytes the in-process tier holds.
    pub fn stored_bytes(&self) -> u64 {
        self.local.weighted_size()
    }

    pub fn metrics(&self) -> &ResponseMetrics {
        &self.metrics
    }

    /// The key of a request (see [`rules::key`]).
    pub fn key(&self, scheme: &str, host: &str, uri: &http::Uri, request: &HeaderMap) -> String {
        let fields: Vec<(HeaderName, String)> = self
            .settings
            .key_headers
            .iter()
            .map(|name| (name.clone(), rules::field_values(request, name)))
            .collect();
        rules::key(scheme, host, uri.path(), uri.query(), self.settings.sort_query, &fields)
    }

    /// What the local tier has for a request to `base`.
    pub fn lookup_local(&self, base: &str, request: &HeaderMap) -> Lookup {
        match self.local.get(&local_key("v", base)) {
            Some(Slot::Vary(varying)) => match self.local.get(&object_key(base, request, &varying.fields)) {
                Some(Slot::Object(stored)) if stored.generation == varying.generation => {
                    Lookup::Found(stored)
                }
                _ => Lookup::Miss,
            },
            _ if self.local.contains_key(&local_key("p", base)) => Lookup::Pass,
            _ => Lookup::Miss,
        }
    }

    /// The local tier, then Redis (whose answer fills the local tier).
    pub async fn lookup(&self, base: &str, request: &HeaderMap) -> Lookup {
        let local = self.lookup_local(base, request);
        if !matches!(local, Lookup::Miss) {
            return local;
        }
        let Some(mut redis) = self.redis() else { return local };
        let began = self.fetch_began();
        // Most responses vary by nothing: ask for the list and that object at once.
        let no_variant = object_key(base, request, &[]);
        let mut pipe = redis::pipe();
        pipe.get(self.redis_key(&local_key("v", base))).get(self.redis_key(&no_variant));
        let asked = pipe.query_async::<(Option<String>, Option<Vec<u8>>)>(&mut redis);
        let Some((varying, mut object)) = self.redis_call("read", asked).await else { return local };
        let Some(varying) = varying.as_deref().and_then(Varying::decode) else { return Lookup::Miss };
        let key = object_key(base, request, &varying.fields);
        if key != no_variant {
            let mut get = redis::cmd("GET");
            get.arg(self.redis_key(&key));
            object = self.redis_call("read", get.query_async::<Option<Vec<u8>>>(&mut redis)).await.flatten();
        }
        let Some(bytes) = object else { return Lookup::Miss };
        // Decoding compresses a textual body: CPU work, off the runtime's threads.
        let policy = self.settings.policy.clone();
        let decoded = tokio::task::spawn_blocking(move || Stored::decode(&bytes, &policy)).await;
        let Some(stored) = decoded.ok().flatten().filter(|stored| stored.generation == varying.generation)
        else {
            return Lookup::Miss;
        };
        ResponseMetrics::count(&self.metrics.redis_hits);
        let stored = Arc::new(stored);
        // Read before a purge that came meanwhile: served to this request, not kept.
        if let Some(_unpurged) = self.unpurged_since(began) {
            self.local.insert(local_key("v", base), Slot::Vary(Arc::new(varying)));
            self.local.insert(key, Slot::Object(Arc::clone(&stored)));
        }
        Lookup::Found(stored)
    }

    /// Fetches `base` for the others, or waits for whoever does.
    pub fn join(self: &Arc<Self>, base: &str) -> Joined {
        let Ok(mut flights) = self.flights.lock() else {
            // A panic elsewhere poisoned the map: fetch without collapsing.
            let (done, _) = watch::channel(());
            return Joined::Leader(Flight { cache: Arc::clone(self), key: String::new(), _done: done });
        };
        if let Some(done) = flights.get(base) {
            return Joined::Follower(done.clone());
        }
        let (done, waiting) = watch::channel(());
        flights.insert(base.to_owned(), waiting);
        Joined::Leader(Flight { cache: Arc::clone(self), key: base.to_owned(), _done: done })
    }

    /// Marks the start of a fetch upstream, for [`ResponseCache::store`].
    pub fn fetch_began(&self) -> PurgeMark {
        PurgeMark(*self.purges.read().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The purge count, held still, if no purge came since `began`: what is inserted while it
    /// is held cannot fall between a purge's count and its scan.
    fn unpurged_since(&self, began: PurgeMark) -> Option<RwLockReadGuard<'_, u64>> {
        let purges = self.purges.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        (*purges == began.0).then_some(purges)
    }

    /// Keeps a response to a request for `base`, here and (in the background) in Redis,
    /// unless a purge came after its fetch `began`; returns it, shared, and whether it was
    /// kept. It joins the key's generation if the key has one varying by the same fields, else
    /// starts one.
    pub fn store(
        self: &Arc<Self>,
        base: &str,
        request: &HeaderMap,
        mut stored: Stored,
        began: PurgeMark,
    ) -> (Arc<Stored>, bool) {
        let Some(unpurged) = self.unpurged_since(began) else { return (Arc::new(stored), false) };
        let fields: Arc<[HeaderName]> = stored.storable.vary.iter().cloned().collect();
        let vary_key = local_key("v", base);
        let varying = match self.local.get(&vary_key) {
            Some(Slot::Vary(varying)) if varying.fields == fields => varying,
            _ => Arc::new(Varying { fields, generation: fastrand::u64(..) }),
        };
        stored.generation = varying.generation;
        let key = object_key(base, request, &varying.fields);
        let stored = Arc::new(stored);
        ResponseMetrics::count(&self.metrics.stored);
        self.local.invalidate(&local_key("p", base));
        self.local.insert(vary_key, Slot::Vary(Arc::clone(&varying)));
        self.local.insert(key.clone(), Slot::Object(Arc::clone(&stored)));
        drop(unpurged);
        if self.redis().is_some() && stored.body.len() as u64 <= self.settings.max_object {
            let (cache, base, written) = (Arc::clone(self), base.to_owned(), Arc::clone(&stored));
            tokio::spawn(async move { cache.write_redis(&base, &key, &varying, &written, began).await });
        }
        (stored, true)
    }

    async fn write_redis(&self, base: &str, key: &str, varying: &Varying, stored: &Stored, began: PurgeMark) {
        let Some(mut redis) = self.redis() else { return };
        // A purge since the local store: not written (one racing this very write can still
        // miss it, within one Redis round trip).
        if self.unpurged_since(began).is_none() {
            return;
        }
        let keep = stored.keep_for(SystemTime::now());
        let millis = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = redis::pipe();
        let vary_key = self.redis_key(&local_key("v", base));
        pipe.cmd("SET").arg(&vary_key).arg(varying.encode()).arg("PX").arg(millis).ignore();
        pipe.cmd("SET").arg(self.redis_key(key)).arg(stored.encode()).arg("PX").arg(millis).ignore();
        self.tag_in_redis(&mut pipe, &self.redis_key(key), stored, keep);
        self.redis_call("write", pipe.query_async::<()>(&mut redis)).await;
    }

    /// Adds to `pipe` the naming of the Redis object `key` under each of its tags, for `keep`.
    fn tag_in_redis(&self, pipe: &mut redis::Pipeline, key: &str, stored: &Stored, keep: Duration) {
        let now = SystemTime::now();
        let (expires, now) = (epoch_millis(now + keep), epoch_millis(now));
        for tag in &stored.tags {
            let set = self.tag_key(tag);
            pipe.cmd("EVAL").arg(TAG_OBJECT).arg(1).arg(set).arg(key).arg(expires).arg(now).ignore();
        }
    }

    fn tag_key(&self, tag: &str) -> String {
        self.redis_key(&local_key("T", tag))
    }

    /// Forgets what is stored for `base` (after a request that changed it): at once here, and
    /// in the background in Redis and on the other nodes. The next response stored for it
    /// starts a new generation, so no variant stored before is served again.
    pub fn forget(self: &Arc<Self>, base: &str) {
        let vary = local_key("v", base);
        self.forget_local(&vary);
        let (cache, base) = (Arc::clone(self), base.to_owned());
        tokio::spawn(async move {
            if let Some(mut redis) = cache.redis() {
                let mut delete = redis::cmd("DEL");
                delete.arg(cache.redis_key(&vary));
                cache.redis_call("forget", delete.query_async::<()>(&mut redis)).await;
                // As after a purge: a Redis read from before the DEL is not kept.
                cache.count_purge();
            }
            cache.tell_others(&Heard::Forget(base)).await;
        });
    }

    async fn tell_others(&self, heard: &Heard) {
        let Some(mut bus) = self.bus.as_ref().and_then(|bus| bus.get().cloned()) else { return };
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(PURGE_CHANNEL).arg(message(&self.settings.name, heard));
        self.redis_call("publish a purge", publish.query_async::<()>(&mut bus)).await;
    }

    /// What another node told: done here.
    fn heard(&self, heard: &Heard) {
        match heard {
            Heard::Purge(what, soft) => {
                self.purge_local(what, *soft);
            }
            Heard::Forget(base) => self.forget_local(&local_key("v", base)),
        }
    }

    fn forget_local(&self, vary: &str) {
        self.count_purge();
        self.local.invalidate(vary);
    }

    /// One more purge: fetches begun before it keep nothing.
    fn count_purge(&self) {
        *self.purges.write().unwrap_or_else(|poisoned| poisoned.into_inner()) += 1;
    }

    /// Remembers that `base`'s response could not be stored: its requests go upstream at once
    /// for a while, rather than each waiting for the one before.
    pub fn pass(&self, base: &str) {
        self.local.insert(local_key("p", base), Slot::Pass);
    }

    /// Purges what matches here, in Redis, and on every node sharing it. Returns how many
    /// responses this node found (here or in Redis).
    pub async fn purge(&self, what: &Purge, soft: bool) -> usize {
        let mut purged = self.purge_local(what, soft);
        if let Some(mut redis) = self.redis() {
            purged += self.purge_redis(&mut redis, what, soft).await;
            // A Redis read that began before the purge reached Redis (after the local one)
            // may have the old copy: counted again, so it is not kept here.
            self.count_purge();
        }
        self.tell_others(&Heard::Purge(what.clone(), soft)).await;
        purged
    }

    /// Purges what matches in the local tier: drops it, or (soft) makes it stale.
    pub fn purge_local(&self, what: &Purge, soft: bool) -> usize {
        self.count_purge();
        let now = SystemTime::now();
        let matching: Vec<(String, Arc<Stored>)> = self
            .local
            .iter()
            .filter_map(|(key, slot)| match slot {
                Slot::Object(stored) if self.matches(&key, &stored, what) => Some(((*key).clone(), stored)),
                _ => None,
            })
            .collect();
        for (key, stored) in &matching {
            if soft {
                self.local.insert(key.clone(), Slot::Object(Arc::new(stored.made_stale(now))));
            } else {
                self.local.invalidate(key);
            }
        }
        self.metrics.purged.fetch_add(matching.len() as u64, Ordering::Relaxed);
        matching.len()
    }

    fn matches(&self, key: &str, stored: &Stored, what: &Purge) -> bool {
        let Some(base) = key.strip_prefix("o\0").and_then(|rest| rest.split('\0').next()) else {
            return false;
        };
        match what {
            Purge::Url(url) => match self.url_key(url) {
                Some(url) => {
                    base == url || base.strip_prefix(url.as_str()).is_some_and(|rest| rest.starts_with('\n'))
                }
                None => false,
            },
            Purge::Prefix(prefix) => {
                self.url_key(prefix).is_some_and(|prefix| base.starts_with(prefix.as_str()))
            }
            Purge::Tag(tag) => stored.tags.iter().any(|t| t == tag),
        }
    }

    /// A URL as this cache writes it in its keys (host in lower case, query sorted if so set).
    fn url_key(&self, url: &str) -> Option<String> {
        let uri: http::Uri = url.parse().ok()?;
        let (scheme, host) = (uri.scheme_str()?, uri.authority()?.as_str());
        let path = if uri.path().is_empty() { "/" } else { uri.path() };
        Some(rules::key(scheme, host, path, uri.query(), self.settings.sort_query, &[]))
    }

    async fn purge_redis(&self, redis: &mut ConnectionManager, what: &Purge, soft: bool) -> usize {
        let keys: Vec<String> = match what {
            Purge::Tag(tag) => {
                let set = self.tag_key(tag);
                let mut members = redis::cmd("ZRANGE");
                members.arg(&set).arg(epoch_millis(SystemTime::now())).arg("+inf").arg("BYSCORE");
                let found = self.redis_call("purge", members.query_async::<Vec<String>>(redis)).await;
                // A soft purge leaves the objects, so their tag still names them.
                if !soft {
                    let mut delete = redis::cmd("DEL");
                    delete.arg(&set);
                    self.redis_call("purge", delete.query_async::<()>(redis)).await;
                }
                found.unwrap_or_default()
            }
            Purge::Url(url) | Purge::Prefix(url) => {
                let Some(base) = self.url_key(url) else { return 0 };
                let exact = matches!(what, Purge::Url(_));
                self.scan_objects(redis, &base, exact).await
            }
        };
        if keys.is_empty() {
            return 0;
        }
        let mut purged = 0;
        for batch in keys.chunks(PURGE_BATCH) {
            purged += if soft {
                self.make_stale_in_redis(redis, batch.to_vec()).await
            } else {
                let mut delete = redis::cmd("DEL");
                delete.arg(batch);
                self.redis_call("purge", delete.query_async::<usize>(redis)).await.unwrap_or(0)
            };
        }
        purged
    }

    /// A soft purge in Redis: each object written back stale (`XX`: not brought back should
    /// it have gone meanwhile), kept as long as a stale copy may serve, and named by its tags
    /// for as long. Returns how many.
    async fn make_stale_in_redis(&self, redis: &mut ConnectionManager, keys: Vec<String>) -> usize {
        let mut read = redis::pipe();
        for key in &keys {
            read.get(key);
        }
        let Some(objects) = self.redis_call("purge", read.query_async::<Vec<Option<Vec<u8>>>>(redis)).await
        else {
            return 0;
        };
        let policy = self.settings.policy.clone();
        // Decoding compresses textual bodies: CPU work, off the runtime's threads.
        let rewritten = tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            keys.into_iter()
                .zip(objects)
                .filter_map(|(key, bytes)| {
                    let stale = Stored::decode(&bytes?, &policy)?.made_stale(now);
                    let keep = stale.keep_for(now).max(Duration::from_millis(1));
                    Some((key, stale, keep))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut write = redis::pipe();
        for (key, stale, keep) in &rewritten {
            let millis = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
            write.cmd("SET").arg(key).arg(stale.encode()).arg("XX").arg("PX").arg(millis).ignore();
            self.tag_in_redis(&mut write, key, stale, *keep);
        }
        self.redis_call("purge", write.query_async::<()>(redis)).await;
        rewritten.len()
    }

    /// Redis's objects under `base` (exactly it, with any key fields and variants, when
    /// `exact`; else anything starting with it).
    async fn scan_objects(&self, redis: &mut ConnectionManager, base: &str, exact: bool) -> Vec<String> {
        let pattern = format!("{}*", glob_escape(&self.redis_key(&local_key("o", base))));
        let exact_base = self.redis_key(&local_key("o", base));
        let (mut cursor, mut found) = (0u64, Vec::new());
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000);
            let Some((next, keys)) =
                self.redis_call("purge", scan.query_async::<(u64, Vec<String>)>(redis)).await
            else {
                return found;
            };
            found.extend(keys.into_iter().filter(|key| {
                !exact
                    || key
                        .strip_prefix(exact_base.as_str())
                        .is_some_and(|rest| rest.starts_with(['\0', '\n']))
            }));
            if next == 0 {
                return found;
            }
            cursor = next;
        }
    }

    fn redis(&self) -> Option<ConnectionManager> {
        self.redis.as_ref()?.get().cloned()
    }

    fn redis_key(&self, key: &str) -> String {
        format!("surge-http-cache:{}:{key}", self.settings.name)
    }

    /// One Redis call (see [`crate::redis_call`]), its failures counted.
    async fn redis_call<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let failed = || ResponseMetrics::count(&self.metrics.redis_errors);
        crate::redis_call(&self.settings.name, what, call, failed).await
    }
}

/// Milliseconds since the epoch, as Redis scores and expiry times take them.
fn epoch_millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

/// The key of `kind` for `name`, in the local tier and (under the route's prefix) in Redis:
/// `v` the fields a URL varies by, `p` a URL whose answers pass, `o` an object, `T` a tag's
/// set (Redis only). Built by hand rather than by `format!`: it is on every hit's path.
fn local_key(kind: &str, name: &str) -> String {
    let mut key = String::with_capacity(kind.len() + 1 + name.len() + 1);
    key.push_str(kind);
    key.push('\0');
    key.push_str(name);
    key
}

fn object_key(base: &str, request: &HeaderMap, vary: &[HeaderName]) -> String {
    let variant = rules::variant(request, vary);
    let mut key = local_key("o", base);
    key.reserve(1 + variant.len());
    key.push('\0');
    key.push_str(&variant);
    key
}

/// `text` matched literally by a Redis glob pattern.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// Every node's purges go out on this channel.
const PURGE_CHANNEL: &str = "surge-http-cache:purge";

/// What one node tells the others.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    /// Purge this, soft or not.
    Purge(Purge, bool),
    /// Forget what is stored under this key (an unsafe request changed it).
    Forget(String),
}

/// `NAME\nsoft|hard|forget\nurl|prefix|tag|key\nVALUE`.
fn message(name: &str, heard: &Heard) -> String {
    let (mode, kind, value) = match heard {
        Heard::Purge(what, soft) => {
            let mode = if *soft { "soft" } else { "hard" };
            match what {
                Purge::Url(value) => (mode, "url", value),
                Purge::Prefix(value) => (mode, "prefix", value),
                Purge::Tag(value) => (mode, "tag", value),
            }
        }
        Heard::Forget(base) => ("forget", "key", base),
    };
    format!("{name}\n{mode}\n{kind}\n{value}")
}

fn read_message(text: &str) -> Option<(&str, Heard)> {
    let mut lines = text.splitn(4, '\n');
    let (name, mode, kind, value) = (lines.next()?, lines.next()?, lines.next()?, lines.next()?.to_owned());
    let soft = mode == "soft";
    let heard = match (mode, kind) {
        ("forget", "key") => Heard::Forget(value),
        ("soft" | "hard", "url") => Heard::Purge(Purge::Url(value), soft),
        ("soft" | "hard", "prefix") => Heard::Purge(Purge::Prefix(value), soft),
        ("soft" | "hard", "tag") => Heard::Purge(Purge::Tag(value), soft),
        _ => return None,
    };
    Some((name, heard))
}

/// Every route's response cache, kept across reloads, and the Redis tier they share.
#[derive(Debug)]
pub struct ResponseCaches {
    caches: Arc<Mutex<Vec<Arc<ResponseCache>>>>,
    redis: Option<Arc<OnceLock<ConnectionManager>>>,
    listener: Option<tokio::task::JoinHandle<()>>,
    redis_errors: Arc<AtomicU64>,
}

impl Drop for ResponseCaches {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

impl ResponseCaches {
    /// With `redis`, connects to it (in the background when it is away) and hears other
    /// nodes' purges.
    pub async fn open(redis: Option<&str>) -> Arc<ResponseCaches> {
        let caches: Arc<Mutex<Vec<Arc<ResponseCache>>>> = Arc::default();
        let redis_errors = Arc::new(AtomicU64::new(0));
        let (shared, listener) = match redis {
            Some(url) => {
                let shared = Arc::new(OnceLock::new());
                let listen = Listen {
                    url: url.to_owned(),
                    name: "responses".to_owned(),
                    channel: PURGE_CHANNEL.to_owned(),
                    redis: Arc::clone(&shared),
                };
                let heard_by = Arc::clone(&caches);
                let heard = move |text: String| {
                    if let Some((name, heard)) = read_message(&text) {
                        let found = heard_by.lock().ok().and_then(|caches| {
                            caches.iter().find(|cache| cache.settings.name == name).cloned()
                        });
                        if let Some(cache) = found {
                            cache.heard(&heard);
                        }
                    }
                    std::future::ready(())
                };
                let errors = Arc::clone(&redis_errors);
                let failed = move || {
                    errors.fetch_add(1, Ordering::Relaxed);
                };
                (Some(shared), Some(listen.start(failed, heard).await))
            }
            None => (None, None),
        };
        Arc::new(ResponseCaches { caches, redis: shared, listener, redis_errors })
    }

    /// The cache of a route: the one it had if its settings did not change, else a new one.
    pub fn for_route(&self, settings: ResponseSettings) -> Arc<ResponseCache> {
        let Ok(mut caches) = self.caches.lock() else {
            return ResponseCache::new(settings, None);
        };
        if let Some(same) = caches.iter().find(|cache| cache.settings == settings) {
            return Arc::clone(same);
        }
        let cache = ResponseCache::new(settings, self.redis.clone());
        caches.retain(|old| old.settings.name != cache.settings.name);
        caches.push(Arc::clone(&cache));
        cache
    }

    /// Forgets the caches of routes no longer configured.
    pub fn keep_only(&self, names: &[&str]) {
        if let Ok(mut caches) = self.caches.lock() {
            caches.retain(|cache| names.contains(&cache.settings.name.as_str()));
        }
    }

    pub fn list(&self) -> Vec<Arc<ResponseCache>> {
        self.caches.lock().map(|caches| caches.clone()).unwrap_or_default()
    }

    /// Purges every route's cache; how many responses were found.
    pub async fn purge(&self, what: &Purge, soft: bool) -> usize {
        let mut purged = 0;
        for cache in self.list() {
            purged += cache.purge(what, soft).await;
        }
        purged
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

/// `surge_http_cache_*{route="NAME"}`, read at each scrape.
#[derive(Debug)]
pub struct ResponseCacheMetrics(pub Arc<ResponseCaches>);

impl prometheus_client::collector::Collector for ResponseCacheMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        let caches = self.0.list();
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        type Counter = fn(&ResponseMetrics) -> &AtomicU64;
        let counters: [(&str, &str, Counter); 9] = [
            ("http_cache_hits", "Requests answered from the cache", |m| &m.hits),
            ("http_cache_misses", "Requests the cache sent upstream", |m| &m.misses),
            ("http_cache_stale", "Stale responses served", |m| &m.stale),
            ("http_cache_collapsed", "Requests answered by another request's trip upstream", |m| {
                &m.collapsed
            }),
            ("http_cache_stores", "Responses stored", |m| &m.stored),
            ("http_cache_evictions", "Responses dropped to stay within the memory bound", |m| &m.evictions),
            ("http_cache_purged", "Responses purged", |m| &m.purged),
            ("http_cache_redis_hits", "Responses found in Redis", |m| &m.redis_hits),
            ("http_cache_redis_errors", "Redis calls that failed or timed out", |m| &m.redis_errors),
        ];
        for (name, help, counter) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for cache in &caches {
                let labels = RouteLabels { route: cache.settings.name.clone() };
                ConstCounter::new(read(counter(&cache.metrics))).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "http_cache_bytes",
            "Bytes the in-process tier holds",
            None,
            MetricType::Gauge,
        )?;
        for cache in &caches {
            let labels = RouteLabels { route: cache.settings.name.clone() };
            let bytes = i64::try_from(cache.local.weighted_size()).unwrap_or(i64::MAX);
            ConstGauge::new(bytes).encode(family.encode_family(&labels)?)?;
        }
        let connect_errors = read(&self.0.redis_errors);
        let mut family = encoder.encode_descriptor(
            "http_cache_redis_connect_errors",
            "Failed attempts to reach the shared tier",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(connect_errors)
            .encode(family.encode_family(&RouteLabels { route: String::new() })?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(headers: &[(&str, &str)], body: &'static [u8]) -> Stored {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(HeaderName::from_bytes(name.as_bytes()).expect("name"), value.parse().expect("value"));
        }
        let storable =
            rules::storable(&Method::GET, &HeaderMap::new(), StatusCode::OK, &map, &Policy::default())
                .expect("storable");
        Stored::new(
            StatusCode::OK,
            map,
            Bytes::from_static(body),
            storable,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )
    }

    #[test]
    fn a_stored_response_comes_back_from_its_redis_form_whole() {
        let original = stored(
            &[("cache-control", "max-age=60"), ("cache-tag", "a, b"), ("x-two", "1"), ("x-two", "2")],
            b"hello",
        );
        let back = Stored::decode(&original.encode(), &Policy::default()).expect("decodes");
        assert_eq!(back.status, original.status);
        assert_eq!(back.headers, original.headers);
        assert_eq!(back.body, original.body);
        assert_eq!(back.stored_at, original.stored_at);
        assert_eq!(back.storable, original.storable);
        assert_eq!(back.tags, vec!["a".to_owned(), "b".to_owned()]);
        let encoded = original.encode();
        for cut in 0..encoded.len() - original.body.len() {
            assert!(Stored::decode(&encoded[..cut], &Policy::default()).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn a_soft_purged_response_stays_stale_in_its_redis_form() {
        let original = stored(&[("cache-control", "max-age=60, stale-while-revalidate=30")], b"hello");
        let now = original.stored_at + Duration::from_secs(10);
        assert!(original.ttl_left(now) > 0);
        let stale = original.made_stale(now);
        let back = Stored::decode(&stale.encode(), &Policy::default()).expect("decodes");
        assert!(back.ttl_left(now) <= 0, "fresh again after Redis: {}", back.ttl_left(now));
        assert_eq!(back.body, original.body);
        assert!(stale.keep_for(now) >= Duration::from_secs(30), "kept while it may serve stale");
    }

    #[test]
    fn tags_come_from_cache_tag_and_surrogate_key() {
        let response = stored(
            &[("cache-control", "max-age=1"), ("cache-tag", "p1,p2"), ("surrogate-key", "p2 shop  all")],
            b"",
        );
        assert_eq!(response.tags, ["all", "p1", "p2", "shop"]);
    }

    #[test]
    fn a_response_is_kept_while_fresh_then_while_it_may_be_served_stale() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let plain = stored(&[("cache-control", "max-age=60")], b"");
        assert_eq!(plain.keep_for(now), Duration::from_secs(60));
        assert_eq!(plain.keep_for(now + Duration::from_secs(50)), Duration::from_secs(10));
        let graced = stored(&[("cache-control", "max-age=60, stale-if-error=300")], b"");
        assert_eq!(graced.keep_for(now), Duration::from_secs(360));
        let validated = stored(&[("cache-control", "max-age=60"), ("etag", "\"v1\"")], b"");
        assert_eq!(validated.keep_for(now), Duration::from_secs(60) + KEEP_TO_REVALIDATE);
        let soft = plain.made_stale(now + Duration::from_secs(5));
        assert!(soft.ttl_left(now + Duration::from_secs(5)) <= 0, "a soft purge makes it stale");
    }

    #[test]
    fn messages_to_other_nodes_read_back() {
        let purges =
            [Purge::Url("http://a/b?c".into()), Purge::Prefix("http://a/".into()), Purge::Tag("t 1".into())];
        for what in purges {
            for soft in [true, false] {
                let heard = Heard::Purge(what.clone(), soft);
                assert_eq!(read_message(&message("shop:/api", &heard)), Some(("shop:/api", heard)));
            }
        }
        let forget = Heard::Forget("http://a/b\nx-tenant=1".into());
        assert_eq!(read_message(&message("web:/", &forget)), Some(("web:/", forget)));
        assert_eq!(read_message("x\nhard\nother\nv"), None);
        assert_eq!(read_message("x\nforget\nurl\nv"), None);
    }

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape(r"a*b?[c]\"), r"a\*b\?\[c\]\\");
    }
}
