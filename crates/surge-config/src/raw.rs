//! The file as serde reads it: every field optional where a default exists, every value that a
//! later check may report on wrapped in `Spanned` so the error can point at it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

use crate::error::{ConfigError, Site};
use crate::model::{Balance, UpstreamProtocol};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub services: BTreeMap<String, Spanned<RawService>>,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub queues: BTreeMap<String, Spanned<RawQueue>>,
    #[serde(default)]
    pub workers: BTreeMap<String, Spanned<RawWorker>>,
    #[serde(default)]
    pub schedules: BTreeMap<String, Spanned<RawSchedule>>,
    #[serde(default, rename = "static")]
    pub statics: BTreeMap<String, Spanned<RawStatic>>,
    #[serde(default)]
    pub alerts: BTreeMap<String, Spanned<RawAlert>>,
    #[serde(default)]
    pub alerting: RawAlerting,
}

/// `[alerts.NAME]`: `when` names the rule; which other keys it takes depends on it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlert {
    pub when: Option<Spanned<String>>,
    pub service: Option<Spanned<String>>,
    pub queue: Option<Spanned<String>>,
    /// A number, or a duration for `p99` and `queue_age`.
    pub above: Option<Spanned<toml::Value>>,
    pub window: Option<Spanned<Duration>>,
    pub within: Option<Spanned<Duration>>,
    #[serde(rename = "for")]
    pub for_: Option<Spanned<Duration>>,
    pub severity: Option<Spanned<String>>,
    pub summary: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlerting {
    #[serde(default)]
    pub webhooks: Vec<Spanned<RawWebhook>>,
    pub repeat: Option<Spanned<Duration>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWebhook {
    pub url: Option<Spanned<String>>,
    pub format: Option<Spanned<String>>,
    pub timeout: Option<Spanned<Duration>>,
}

/// `[static.NAME]`: a folder served as files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStatic {
    pub root: Option<Spanned<String>>,
    pub routes: Option<Spanned<Vec<Spanned<RawRoute>>>>,
    pub index: Option<String>,
    #[serde(default)]
    pub cache_control: Vec<RawCacheControl>,
    pub fingerprinted: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCacheControl {
    #[serde(rename = "match")]
    pub pattern: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSchedule {
    pub cron: Option<Spanned<String>>,
    pub queue: Option<Spanned<String>>,
    #[serde(default)]
    pub body: String,
    pub content_type: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQueue {
    pub backend: Option<Spanned<String>>,
    pub url: Option<Spanned<String>>,
    pub broker_queue: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub max_attempts: Option<Spanned<u32>>,
    #[serde(default)]
    pub backoff: RawBackoff,
    pub lease: Option<Spanned<Duration>>,
    pub dead_letter: Option<bool>,
    pub max_messages: Option<Spanned<u64>>,
    pub max_size: Option<ByteSize>,
    pub max_payload: Option<ByteSize>,
    pub result_ttl: Option<Spanned<Duration>>,
    pub publish: Option<Spanned<String>>,
    pub idempotency_window: Option<Spanned<Duration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBackoff {
    pub base: Option<Spanned<Duration>>,
    pub cap: Option<Spanned<Duration>>,
}

/// A worker pool: the instance settings of a service, less routing, plus what it consumes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWorker {
    pub command: Option<Spanned<String>>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub queue: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub prefetch: Option<Spanned<u32>>,
    pub timeout: Option<Spanned<Duration>>,
    pub max_rate: Option<Spanned<f64>>,
    pub instances: Option<Spanned<RawInstances>>,
    pub autoscale: Option<Spanned<RawAutoscale>>,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub lifecycle: RawLifecycle,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub limits: Option<Spanned<RawLimits>>,
}

impl RawWorker {
    /// The pool part, as a service without routes reads it.
    pub fn into_parts(self) -> (RawService, WorkerParts) {
        let service = RawService {
            command: self.command,
            upstreams: None,
            dns_refresh: None,
            protocol: UpstreamProtocol::Http1,
            tls: None,
            args: self.args,
            env: self.env,
            routes: None,
            instances: self.instances,
            health: self.health,
            balance: Balance::default(),
            timeouts: RawTimeouts::default(),
            lifecycle: self.lifecycle,
            autoscale: self.autoscale,
            buffer: RawBuffer::default(),
            instance_concurrency: None,
            max_concurrency: None,
            retry: RawRetry::default(),
            outlier: RawOutlier::default(),
            user: self.user,
            group: self.group,
            limits: self.limits,
        };
        let parts = WorkerParts {
            queue: self.queue,
            path: self.path,
            prefetch: self.prefetch,
            timeout: self.timeout,
            max_rate: self.max_rate,
        };
        (service, parts)
    }
}

/// What a worker has that a service has not.
#[derive(Debug)]
pub(crate) struct WorkerParts {
    pub queue: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub prefetch: Option<Spanned<u32>>,
    pub timeout: Option<Spanned<Duration>>,
    pub max_rate: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub redis: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGateway {
    pub listen: Option<Spanned<SocketAddr>>,
    pub shutdown_timeout: Option<Spanned<Duration>>,
    pub listen_tls: Option<Spanned<SocketAddr>>,
    /// One certificate (`tls = { cert, key }`) or several chosen by SNI (`[[gateway.tls]]`).
    #[serde(default, deserialize_with = "one_or_many")]
    pub tls: Vec<RawCertificate>,
    #[serde(default)]
    pub redirect_to_https: bool,
    pub hsts: Option<Spanned<String>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    pub max_body: Option<ByteSize>,
    pub head_timeout: Option<Spanned<Duration>>,
    pub keepalive_timeout: Option<Spanned<Duration>>,
    pub body_timeout: Option<Spanned<Duration>>,
    pub send_timeout: Option<Spanned<Duration>>,
    pub max_connections: Option<Spanned<usize>>,
    pub max_connections_per_client: Option<Spanned<u32>>,
    pub proxy_protocol: Option<Spanned<bool>>,
    pub access_log: Option<Spanned<String>>,
    pub access_log_format: Option<Spanned<String>>,
    pub request_ids: Option<bool>,
}

/// How the gateway checks (and answers) instances spoken to over TLS.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    pub ca: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub cert: Option<Spanned<String>>,
    pub key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// A table, or an array of tables, as a list.
fn one_or_many<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    struct OneOrMany<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for OneOrMany<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a table or an array of tables")
        }
        fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<Vec<T>, M::Error> {
            T::deserialize(de::value::MapAccessDeserializer::new(map)).map(|one| vec![one])
        }
        fn visit_seq<S: de::SeqAccess<'de>>(self, seq: S) -> Result<Vec<T>, S::Error> {
            Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))
        }
    }
    deserializer.deserialize_any(OneOrMany(std::marker::PhantomData))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub listen: Option<Spanned<SocketAddr>>,
    pub token_file: Option<Spanned<String>>,
    #[serde(default)]
    pub metrics_public: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawService {
    pub command: Option<Spanned<String>>,
    pub upstreams: Option<Spanned<Vec<Spanned<RawUpstream>>>>,
    pub dns_refresh: Option<Spanned<Duration>>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    pub tls: Option<Spanned<RawUpstreamTls>>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub routes: Option<Spanned<Vec<Spanned<RawRoute>>>>,
    pub instances: Option<Spanned<RawInstances>>,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub balance: Balance,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub lifecycle: RawLifecycle,
    pub autoscale: Option<Spanned<RawAutoscale>>,
    #[serde(default)]
    pub buffer: RawBuffer,
    pub instance_concurrency: Option<usize>,
    pub max_concurrency: Option<usize>,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub outlier: RawOutlier,
    pub user: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
    pub limits: Option<Spanned<RawLimits>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    pub memory: Option<ByteSize>,
    pub open_files: Option<u64>,
    pub processes: Option<u64>,
    pub cpu_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub attempts: Option<u32>,
    pub budget: Option<Spanned<f64>>,
    pub min_per_second: Option<f64>,
    pub backoff: Option<Spanned<Duration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutlier {
    pub consecutive_failures: Option<u32>,
    pub ejection: Option<Spanned<Duration>>,
    pub max_ejected_percent: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAutoscale {
    pub metric: Option<Spanned<String>>,
    pub target: Option<Spanned<f64>>,
    pub utilization: Option<Spanned<f64>>,
    pub persistence: Option<Spanned<Duration>>,
    // Removed keys, kept to say so by name.
    pub stable_window: Option<Spanned<toml::Value>>,
    pub panic_window: Option<Spanned<toml::Value>>,
    pub panic_threshold: Option<Spanned<toml::Value>>,
    pub max_scale_up_rate: Option<Spanned<f64>>,
    pub max_scale_down_rate: Option<Spanned<f64>>,
    pub scale_down_delay: Option<Spanned<Duration>>,
    pub tolerance: Option<Spanned<f64>>,
    pub idle_window: Option<Spanned<Duration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBuffer {
    pub requests: Option<usize>,
    pub timeout: Option<Spanned<Duration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInstances {
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub initial: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<Duration>>,
    pub timeout: Option<Spanned<Duration>>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTimeouts {
    pub connect: Option<Spanned<Duration>>,
    pub request: Option<Spanned<Duration>>,
    #[serde(rename = "try")]
    pub per_try: Option<Spanned<Duration>>,
    pub tunnel_idle: Option<Spanned<Duration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLifecycle {
    pub start_timeout: Option<Spanned<Duration>>,
    pub drain_timeout: Option<Spanned<Duration>>,
    pub stop_timeout: Option<Spanned<Duration>>,
}

/// A route is written either as a bare prefix, `"/api"`, or as a table,
/// `{ prefix = "/api", host = "shop.example" }`.
#[derive(Debug)]
pub(crate) struct RawRoute {
    pub prefix: String,
    pub host: Option<String>,
    pub retry: bool,
    pub rate_limit: Option<RawRateLimit>,
    pub max_body: Option<ByteSize>,
    /// The queue its requests are enqueued to, answered 202 (an async request-reply route).
    pub async_queue: Option<String>,
    pub cache: Option<RawRouteCache>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawRouteCache {
    pub default_ttl: Option<Duration>,
    pub grace: Option<Duration>,
    pub store_set_cookie: bool,
    pub obey_request_no_cache: bool,
    pub sort_query: bool,
    pub key_headers: Vec<String>,
    pub max_object: Option<ByteSize>,
    pub memory: Option<ByteSize>,
    pub collapse_timeout: Option<Duration>,
    pub shared: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub rate: u32,
    #[serde(default = "one_second")]
    pub per: Duration,
    pub burst: Option<u32>,
    #[serde(default = "by_ip")]
    pub key: String,
}

fn one_second() -> Duration {
    Duration(std::time::Duration::from_secs(1))
}

fn by_ip() -> String {
    "ip".to_owned()
}

impl<'de> Deserialize<'de> for RawRoute {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            #[serde(default = "root")]
            prefix: String,
            host: Option<String>,
            #[serde(default)]
            retry: bool,
            rate_limit: Option<RawRateLimit>,
            max_body: Option<ByteSize>,
            #[serde(rename = "async")]
            async_queue: Option<String>,
            cache: Option<RawRouteCache>,
        }
        fn root() -> String {
            "/".to_owned()
        }

        struct RouteVisitor;
        impl<'de> Visitor<'de> for RouteVisitor {
            type Value = RawRoute;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a path prefix such as "/api", or a table such as { prefix = "/api", host = "shop.example" }"#)
            }
            fn visit_str<E: de::Error>(self, prefix: &str) -> Result<RawRoute, E> {
                Ok(RawRoute {
                    prefix: prefix.to_owned(),
                    host: None,
                    retry: false,
                    rate_limit: None,
                    max_body: None,
                    async_queue: None,
                    cache: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawRoute, A::Error> {
                let table = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawRoute {
                    prefix: table.prefix,
                    host: table.host,
                    retry: table.retry,
                    rate_limit: table.rate_limit,
                    max_body: table.max_body,
                    async_queue: table.async_queue,
                    cache: table.cache,
                })
            }
        }
        deserializer.deserialize_any(RouteVisitor)
    }
}

/// An upstream is written either as `"host:port"` or as a table,
/// `{ address = "host:port", weight = 3 }`.
#[derive(Debug)]
pub(crate) struct RawUpstream {
    pub address: String,
    pub weight: Option<u32>,
}

impl<'de> Deserialize<'de> for RawUpstream {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: String,
            weight: Option<u32>,
        }

        struct UpstreamVisitor;
        impl<'de> Visitor<'de> for UpstreamVisitor {
            type Value = RawUpstream;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"an address such as "10.0.0.7:8080", or a table such as { address = "app.internal:8080", weight = 3 }"#)
            }
            fn visit_str<E: de::Error>(self, address: &str) -> Result<RawUpstream, E> {
                Ok(RawUpstream { address: address.to_owned(), weight: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawUpstream, A::Error> {
                let table = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawUpstream { address: table.address, weight: table.weight })
            }
        }
        deserializer.deserialize_any(UpstreamVisitor)
    }
}

/// A duration written the human way: "250ms", "2s", "1m", "1h 30m".
#[derive(Debug, Clone, Copy)]
pub struct Duration(pub std::time::Duration);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration with a unit, such as "250ms", "2s" or "1m""#)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
                parse_duration(text).map(Duration).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(DurationVisitor)
    }
}

/// A size in bytes: a number, or a string with a unit such as "512KiB", "64MiB" or "1GB".
#[derive(Debug, Clone, Copy)]
pub struct ByteSize(pub u64);

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a size such as "512KiB", "64MiB" or "1GB", or a number of bytes"#)
            }
            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
                u64::try_from(bytes).map(ByteSize).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
                parse_size(text).map(ByteSize).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Parses "64MiB", "10MB", "512KiB", "1GiB", "100" (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        _ => {
            return Err(format!(
                r#"invalid size "{text}"; write a number and a unit, such as "64MiB" or "1GB""#
            ))
        }
    };
    let number: u64 =
        number.parse().map_err(|_| format!(r#"invalid size "{text}": it starts with a number"#))?;
    number.checked_mul(scale).ok_or_else(|| format!(r#"the size "{text}" is too large"#))
}

/// Parses "250ms", "2s", "1m", "1h 30m"; the error says how to write one.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|err| {
        format!(
            r#"invalid duration "{text}" ({err}); write a number and a unit, such as "250ms", "2s" or "1m""#
        )
    })
}

/// A serde or TOML syntax error, with the key path serde was reading when it failed.
pub(crate) struct ParseError {
    key: String,
    message: String,
    span: Option<Range<usize>>,
}

impl ParseError {
    pub fn locate(self, source: &str, file: &Path) -> ConfigError {
        match self.span {
            Some(span) => Site::new(source, file, span, self.key).error(self.message),
            None => Site { key: self.key, ..Site::file(file) }.error(self.message),
        }
    }
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(source: &str) -> Result<T, ParseError> {
    let syntax_error = |err: toml::de::Error| ParseError {
        key: String::new(),
        message: err.message().to_owned(),
        span: err.span(),
    };
    let deserializer = toml::Deserializer::parse(source).map_err(syntax_error)?;
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = dotted_key(err.path());
        let inner = err.into_inner();
        ParseError { key, message: inner.message().to_owned(), span: inner.span() }
    })
}

/// `services.api.instances.min`, leaving out the private segments `Spanned` reads through.
fn dotted_key(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if name.starts_with("$__") {
                    continue;
                }
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(name);
            }
            Segment::Seq { index } => key.push_str(&format!("[{index}]")),
            Segment::Unknown => {}
        }
    }
    key
}
