//! The validated configuration: every default applied, every bound checked.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::Site;

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub gateway: GatewayConfig,
    pub admin: AdminConfig,
    /// In the order the file declares them.
    pub services: Vec<ServiceConfig>,
    /// Shared state for several surge nodes; `None`: each node keeps its own.
    pub redis: Option<String>,
    /// In the order the file declares them.
    pub queues: Vec<QueueConfig>,
    pub workers: Vec<WorkerConfig>,
    pub schedules: Vec<ScheduleConfig>,
    /// Folders served as files, in the order the file declares them.
    pub statics: Vec<StaticConfig>,
    /// `[alerts.NAME]`, in the order the file declares them.
    pub alerts: Vec<AlertConfig>,
    /// Where firing and resolved alerts are sent.
    pub alerting: AlertingConfig,
}

/// `[alerts.NAME]`: a condition on a signal Surge has, that fires once it has held for `for_`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertConfig {
    pub name: String,
    pub site: Site,
    pub rule: AlertRule,
    /// How long the condition must hold before the alert fires (Prometheus' `for`).
    pub for_: Duration,
    pub severity: Severity,
    /// Said in the log, the dashboard and the webhooks instead of the generated text.
    pub summary: Option<String>,
}

/// What an alert watches. `service`/`queue` of `None`: every one, each an alert of its own.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertRule {
    /// 5xx answers over all answers within `window`, above `above` (0..1).
    ErrorRatio {
        service: Option<String>,
        above: f64,
        window: Duration,
    },
    /// The p99 of request latency within `window`, above `above`.
    Latency {
        service: Option<String>,
        above: Duration,
        window: Duration,
    },
    /// An autoscaled pool wants its `instances.max`.
    AtMax {
        service: Option<String>,
    },
    CrashLoop {
        service: Option<String>,
    },
    /// More than `above` instances out of rotation by their circuit breaker.
    Ejected {
        service: Option<String>,
        above: u64,
    },
    /// The oldest message not done with has waited longer than `above`.
    QueueAge {
        queue: Option<String>,
        above: Duration,
    },
    /// More than `above` dead letters.
    DeadLetters {
        queue: Option<String>,
        above: u64,
    },
    /// Requests refused by rate limits, per second within `window`, above `above`.
    RateLimited {
        service: Option<String>,
        above: f64,
        window: Duration,
    },
    /// A certificate of the HTTPS listener expires within `within`.
    CertificateExpiry {
        within: Duration,
    },
}

impl AlertRule {
    /// The name of the rule's kind, as `when` says it.
    pub fn kind(&self) -> &'static str {
        match self {
            AlertRule::ErrorRatio { .. } => "error_ratio",
            AlertRule::Latency { .. } => "p99",
            AlertRule::AtMax { .. } => "at_max",
            AlertRule::CrashLoop { .. } => "crash_loop",
            AlertRule::Ejected { .. } => "ejected",
            AlertRule::QueueAge { .. } => "queue_age",
            AlertRule::DeadLetters { .. } => "dead_letters",
            AlertRule::RateLimited { .. } => "rate_limited",
            AlertRule::CertificateExpiry { .. } => "certificate_expiry",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Severity {
    Critical,
    #[default]
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// `[alerting]`: webhooks told of every alert that fires or resolves.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AlertingConfig {
    pub webhooks: Vec<WebhookConfig>,
    /// A firing alert is sent again this often (Alertmanager forgets one not heard of).
    pub repeat: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub url: http::Uri,
    pub format: WebhookFormat,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// Alertmanager's `POST /api/v2/alerts` body: an array of alerts with labels.
    Alertmanager,
    /// One plain JSON object per change.
    Json,
}

/// `[gateway] access_log`: a line per request, written off the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    pub target: AccessLogTarget,
    pub format: AccessLogFormat,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    /// Appended to; relative paths are taken from the configuration file's folder.
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Json,
    /// nginx's `combined`, then Surge's own fields as `key=value`.
    Combined,
}

/// `[static.NAME]`: files under `root` answer the routes, with the route's prefix taken off
/// the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticConfig {
    pub name: String,
    /// A folder, relative paths taken from the configuration file's.
    pub root: PathBuf,
    pub routes: Vec<Route>,
    /// Served for a folder's path (`index.html`, say); `None`: a folder is 404.
    pub index: Option<String>,
    /// `Cache-Control` by file name pattern (`*.css`), the first that matches.
    pub cache_control: Vec<(String, String)>,
    /// Names with a content hash (`app.3f2a9c1b.js`) get `public, max-age=31536000, immutable`
    /// when no pattern matched.
    pub fingerprinted: bool,
}

/// A message published to a queue on a cron schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleConfig {
    pub name: String,
    /// Five fields (minute to weekday), or six with seconds first; checked when read.
    pub cron: String,
    pub queue: String,
    pub body: String,
    pub content_type: Option<String>,
}

impl Config {
    /// Every pool to run: the services', then the workers'.
    pub fn pools(&self) -> Vec<ServiceConfig> {
        self.services.iter().cloned().chain(self.workers.iter().map(|worker| worker.pool.clone())).collect()
    }
}

/// A durable queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub name: String,
    pub site: Site,
    /// Where its messages are kept.
    pub backend: QueueBackend,
    /// The folder its log lives in (`path` joined with its name); an amqp queue keeps only
    /// its job key there.
    pub dir: PathBuf,
    /// Deliveries a message may fail before it is dead.
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// How long a delivery may take before it counts as failed.
    pub lease: Duration,
    pub dead_letter: bool,
    pub max_messages: Option<u64>,
    /// Payload bytes held at most.
    pub max_size: Option<u64>,
    /// The largest payload one message may carry.
    pub max_payload: u64,
    /// How long the answer to an async route's request is kept for `GET /jobs/ID`.
    pub result_ttl: Duration,
    /// Who may publish: the admin API always; the gateway too when public.
    pub publish: Publish,
    /// A repeated `Idempotency-Key` within this window names the first message.
    pub idempotency_window: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueBackend {
    /// The log on this machine's disk.
    Embedded,
    /// A RabbitMQ broker, shared by every surge node that names it; `broker_queue` is the
    /// queue's name there (its own name unless `broker_queue` says otherwise).
    Amqp { url: String, broker_queue: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Only through the admin API.
    Admin,
    /// Also through the gateway, at `/queues/NAME/messages`.
    Public,
}

/// A pool of instances that a queue's messages are pushed to.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The pool: a service without routes, named as the worker.
    pub pool: ServiceConfig,
    pub queue: String,
    /// Where each message is POSTed on an instance.
    pub path: String,
    /// Messages in flight per instance, at most.
    pub prefetch: u32,
    /// How long one message may take; past it the delivery failed.
    pub timeout: Duration,
    /// Messages started per second for the whole pool, at most.
    pub max_rate: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Where `listen` was written, for "port already in use" errors.
    pub listen_site: Site,
    /// How long in-flight requests may take to finish once shutdown begins.
    pub shutdown_timeout: Duration,
    /// The HTTPS listener, when there is one.
    pub tls: Option<TlsConfig>,
    /// Peers whose `X-Forwarded-*` and `Forwarded` fields are believed (and extended); from
    /// anyone else they are replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Request bodies larger than this get a 413, unless their route says otherwise.
    pub max_body: u64,
    pub client_timeouts: ClientTimeouts,
    /// Client connections open at once; past it the gateway stops accepting until one closes.
    pub max_connections: usize,
    /// Client connections open at once from one address; past it a new one gets a 503.
    pub max_connections_per_client: Option<u32>,
    /// Every connection starts with a PROXY protocol header from one of `trusted_proxies`.
    pub proxy_protocol: bool,
    pub access_log: Option<AccessLogConfig>,
    /// Every request gets an `x-request-id` and a W3C `traceparent` (on by default).
    pub request_ids: bool,
}

/// How long the gateway waits on a client (nginx's names in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// For a request head once it has begun, or a new connection's first (`client_header_timeout`).
    pub head: Duration,
    /// For the next request on a kept-alive connection (`keepalive_timeout`).
    pub keepalive: Duration,
    /// Between two reads of a request body (`client_body_timeout`).
    pub body: Duration,
    /// Between two writes of a response a client is not reading (`send_timeout`).
    pub send: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            head: Duration::from_secs(30),
            keepalive: Duration::from_secs(75),
            body: Duration::from_secs(60),
            send: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: SocketAddr,
    pub listen_site: Site,
    /// The first is served to clients whose SNI no certificate names (or who send none).
    pub certificates: Vec<CertificateFiles>,
    /// The plain listener answers every request with a redirect to HTTPS.
    pub redirect_to_https: bool,
    /// A `Strict-Transport-Security` value for HTTPS responses.
    pub hsts: Option<http::HeaderValue>,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub cert_site: Site,
    pub key: PathBuf,
    pub key_site: Site,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub listen_site: Site,
    /// A file holding the bearer token the admin API asks for (`SURGE_ADMIN_TOKEN` overrides).
    pub token_file: Option<(PathBuf, Site)>,
    /// `/metrics` answers without the token even where the rest needs it.
    pub metrics_public: bool,
}

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub name: String,
    /// Where the instances come from.
    pub backend: Backend,
    /// How the gateway talks to instances.
    pub protocol: UpstreamProtocol,
    /// Present when `protocol` is `https`.
    pub tls: Option<UpstreamTlsConfig>,
    pub routes: Vec<Route>,
    pub instances: InstanceBounds,
    pub health: HealthConfig,
    pub balance: Balance,
    pub timeouts: TimeoutConfig,
    pub lifecycle: LifecycleConfig,
    /// Present when the pool follows the load; its `min` and `max` are `instances`'.
    pub autoscale: Option<surge_scale::ScaleConfig>,
    pub buffer: BufferConfig,
    /// At most this many requests in flight per instance; the rest wait in the buffer.
    pub instance_concurrency: Option<usize>,
    /// At most this many requests in flight for the whole service (a bulkhead); the rest wait
    /// in the buffer.
    pub max_concurrency: Option<usize>,
    pub retry: RetryConfig,
    pub outlier: OutlierConfig,
}

/// Where a service's instances come from.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Surge runs the instances, one process each.
    Command {
        /// The resolved path of the executable.
        command: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        /// Another user (and group) to run the instances as; surge must run as root.
        run_as: Option<RunAs>,
        limits: ProcessLimits,
    },
    /// The instances run elsewhere, at fixed addresses (nginx's `upstream` block): each name is
    /// resolved again every `dns_refresh`, and each address it yields is one instance.
    Upstreams { upstreams: Vec<Upstream>, dns_refresh: Duration },
}

/// The user and group an instance runs as, resolved when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// Resource limits set on each instance (setrlimit), so one service cannot take the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessLimits {
    /// Bytes of address space (RLIMIT_AS).
    pub memory: Option<u64>,
    /// Open file descriptors (RLIMIT_NOFILE).
    pub open_files: Option<u64>,
    /// Processes of the instance's user (RLIMIT_NPROC).
    pub processes: Option<u64>,
    /// Seconds of CPU time (RLIMIT_CPU).
    pub cpu_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// An IP address or a DNS name.
    pub host: String,
    pub port: u16,
    /// Its share of the traffic relative to the others (1 to 256).
    pub weight: u32,
}

impl Upstream {
    /// `host:port`, as the resolver takes it (an IPv6 address in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The protocol spoken to instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over a pool of keep-alive connections.
    #[default]
    Http1,
    /// HTTP/2 without TLS (prior knowledge): requests are multiplexed over one connection.
    H2c,
    /// HTTP/1.1 over TLS, the instance's certificate verified (nginx's `proxy_pass https://`).
    Https,
}

/// How instances spoken to over TLS are verified, and what the gateway shows them.
#[derive(Debug, Clone)]
pub struct UpstreamTlsConfig {
    /// A PEM file of the certificate authorities to trust; `None`: the system's roots.
    pub ca: Option<(PathBuf, Site)>,
    /// The name sent by SNI and looked for in the instance's certificate; `None`: the
    /// upstream's host (its name, or its address).
    pub server_name: Option<(String, Site)>,
    /// A client certificate, for instances that ask for one (mutual TLS).
    pub client_certificate: Option<CertificateFiles>,
    /// Where a problem with the whole table is reported (no system roots, say).
    pub site: Site,
}

/// Retries of failed tries on other instances, within a budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    /// Tries per request, the first included (1 turns retries off).
    pub attempts: u32,
    /// Retries may add this fraction of recent requests...
    pub budget: f64,
    /// ...or this many per second, whichever is more.
    pub min_per_second: f64,
    /// Base of the exponential backoff with full jitter between tries.
    pub backoff: Duration,
}

/// Passive outlier ejection: the circuit breaker of each instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub ejection: Duration,
    pub max_ejected_percent: u32,
}

/// Requests that arrive while no instance is ready wait here (scale from zero, restarts).
#[derive(Debug, Clone, Copy)]
pub struct BufferConfig {
    pub requests: usize,
    pub timeout: Duration,
}

/// A path prefix, matched on segment boundaries, optionally for one host only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Normalised: starts with `/`, no trailing `/` unless it is the root.
    pub prefix: String,
    /// Lower case, without a port.
    pub host: Option<String>,
    /// Retry its requests whatever their method (they are safe to repeat).
    pub retry: bool,
    pub rate_limit: Option<RateLimit>,
    /// Overrides `gateway.max_body` for this route.
    pub max_body: Option<u64>,
    /// Its requests go to this queue, answered 202 with where to find the result.
    pub async_queue: Option<String>,
    /// Its responses are cached by the gateway, as HTTP's caching rules allow.
    pub cache: Option<RouteCache>,
}

/// A route's response cache (`cache = { ... }`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCache {
    /// Freshness for responses that say nothing of it; `None`: they are not stored.
    pub default_ttl: Option<Duration>,
    /// How long past its freshness a response may be served while it is refreshed, or when
    /// the instances fail, unless it says so itself (`stale-while-revalidate`, `stale-if-error`).
    pub grace: Duration,
    /// Store responses that set cookies.
    pub store_set_cookie: bool,
    /// A request's `Cache-Control: no-cache` or `max-age` may send it past the cache.
    pub obey_request_no_cache: bool,
    /// `?b=1&a=2` and `?a=2&b=1` are one entry.
    pub sort_query: bool,
    /// Request fields whose values are part of the key, lower case.
    pub key_headers: Vec<String>,
    /// Larger responses are passed through, not stored.
    pub max_object: u64,
    /// The in-process tier's bound, in bytes.
    pub memory: u64,
    /// How long concurrent misses for one key wait for the first one's answer.
    pub collapse_timeout: Duration,
    /// Use the Redis tier (`store.redis`) when there is one.
    pub shared: bool,
}

/// A token bucket per client: `rate` requests per `per`, bursts of up to `burst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub rate: u32,
    pub per: Duration,
    pub burst: u32,
    pub key: RateKey,
}

/// Who a rate limit counts separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    ClientIp,
    /// The value of this header (requests without it count by client IP).
    Header(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceBounds {
    pub min: u32,
    pub max: u32,
    pub initial: u32,
}

impl InstanceBounds {
    pub fn contains(&self, count: u32) -> bool {
        (self.min..=self.max).contains(&count)
    }
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passed checks that put an unhealthy instance back in rotation.
    pub healthy_threshold: u32,
    /// Consecutive failed checks that take a ready instance out of rotation.
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, Copy)]
pub struct TimeoutConfig {
    pub connect: Duration,
    pub request: Duration,
    /// Bounds each try; a try past it is retried elsewhere when the request may be.
    pub per_try: Option<Duration>,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed.
    pub tunnel_idle: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct LifecycleConfig {
    /// How long a new instance may take to pass its first health check.
    pub start_timeout: Duration,
    /// How long a stopping instance's in-flight requests may take to finish.
    pub drain_timeout: Duration,
    /// How long after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The instance with the fewest in-flight requests; ties rotate.
    #[default]
    LeastConn,
    RoundRobin,
    /// Power of two choices over peak-EWMA latency × in-flight requests.
    P2cEwma,
    Random,
}

impl Balance {
    pub fn as_str(&self) -> &'static str {
        match self {
            Balance::LeastConn => "least_conn",
            Balance::RoundRobin => "round_robin",
            Balance::P2cEwma => "p2c_ewma",
            Balance::Random => "random",
        }
    }
}
