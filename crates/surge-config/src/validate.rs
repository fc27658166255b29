//! From the raw file to the [`Config`] model: defaults, bounds, routes and commands, with every
//! error collected and reported with its key and line.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use crate::error::{ConfigError, ConfigErrors, Site};
use crate::model::*;
use crate::raw::{self, RawConfig, RawService};
use surge_scale::ScaleConfig;

mod observe;
mod queues;

const DEFAULT_GATEWAY_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9900";
const MAX_INSTANCES: u32 = 1024;
/// nginx's 1 MiB turns away ordinary uploads; this still stops a declared gigabyte at once.
const DEFAULT_MAX_BODY: u64 = 64 << 20;
/// Well past what one process serves on its default file limit, and a bound all the same.
const DEFAULT_MAX_CONNECTIONS: usize = 16 * 1024;
/// HAProxy's bound, and plenty for shares.
const MAX_WEIGHT: u32 = 256;

pub(crate) fn validate(raw: RawConfig, source: &str, file: &Path) -> Result<Config, ConfigErrors> {
    let mut v =
        Validator { source, file, errors: Vec::new(), queue_names: raw.queues.keys().cloned().collect() };
    let gateway = v.gateway(raw.gateway);
    let admin = v.admin(raw.admin);
    // Port 0 asks the kernel for any free port, so two of them never clash.
    if gateway.listen == admin.listen && gateway.listen.port() != 0 {
        v.errors.push(admin.listen_site.error(format!(
            "the admin API and the gateway both listen on {}; give them different addresses",
            admin.listen
        )));
    }

    let mut services: Vec<_> = raw.services.into_iter().collect();
    services.sort_by_key(|(_, service)| service.span().start);
    if services.is_empty() && raw.workers.is_empty() {
        v.errors.push(
            Site::file(file).error(
                "no services are defined; add one, for example [services.web] with a command and routes",
            ),
        );
    }
    let mut routes = RouteTable::default();
    let services: Vec<ServiceConfig> = services
        .into_iter()
        .filter_map(|(name, service)| v.service(name, service, Some(&mut routes)))
        .collect();
    let mut statics: Vec<_> = raw.statics.into_iter().collect();
    statics.sort_by_key(|(_, site)| site.span().start);
    let statics =
        statics.into_iter().filter_map(|(name, site)| v.static_site(name, site, &mut routes)).collect();
    let queues = v.queues(raw.queues);
    let workers = v.workers(raw.workers, &queues, &services);
    let schedules = v.schedules(raw.schedules);
    let subjects = observe::Subjects {
        pools: services
            .iter()
            .map(|s| s.name.as_str())
            .chain(workers.iter().map(|w| w.pool.name.as_str()))
            .collect(),
        queues: queues.iter().map(|q| q.name.as_str()).collect(),
        https: gateway.tls.is_some(),
    };
    let alerts = v.alerts(raw.alerts, &subjects);
    let alerting = v.alerting(raw.alerting);

    let redis = match raw.store.redis {
        Some(url) if !url.get_ref().starts_with("redis://") && !url.get_ref().starts_with("rediss://") => {
            v.error(
                url.span(),
                "store.redis",
                r#"a Redis URL starts with "redis://", such as "redis://127.0.0.1:6379""#,
            );
            None
        }
        other => other.map(Spanned::into_inner),
    };
    if v.errors.is_empty() {
        Ok(Config {
            file: file.to_owned(),
            gateway,
            admin,
            services,
            redis,
            queues,
            workers,
            schedules,
            statics,
            alerts,
            alerting,
        })
    } else {
        v.errors.sort_by_key(|e| (e.site.line, e.site.column));
        Err(ConfigErrors(v.errors))
    }
}

/// Tries to bind every listen address, as `surge up` will: a port already taken is reported
/// with the key that names it.
pub fn check_listeners(config: &Config) -> Vec<ConfigError> {
    let tls = config.gateway.tls.as_ref().map(|tls| (&tls.listen, &tls.listen_site));
    [(&config.gateway.listen, &config.gateway.listen_site), (&config.admin.listen, &config.admin.listen_site)]
        .into_iter()
        .chain(tls)
        .filter(|(addr, _)| addr.port() != 0)
        .filter_map(|(addr, site)| {
            TcpListener::bind(addr).err().map(|err| site.error(format!("cannot listen on {addr}: {err}")))
        })
        .collect()
}

struct Validator<'a> {
    source: &'a str,
    file: &'a Path,
    errors: Vec<ConfigError>,
    /// The queues defined, for routes and workers to name.
    queue_names: Vec<String>,
}

impl Validator<'_> {
    fn site(&self, span: Range<usize>, key: impl Into<String>) -> Site {
        Site::new(self.source, self.file, span, key.into())
    }

    fn error(&mut self, span: Range<usize>, key: impl Into<String>, message: impl Into<String>) {
        let error = self.site(span, key).error(message);
        self.errors.push(error);
    }

    fn listen(&self, listen: Option<Spanned<SocketAddr>>, key: &str, default: &str) -> (SocketAddr, Site) {
        match listen {
            Some(addr) => (*addr.get_ref(), self.site(addr.span(), key)),
            None => {
                let addr = default.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
                (addr, Site { key: key.to_owned(), ..Site::file(self.file) })
            }
        }
    }

    /// A service's, queue's or worker's name: it appears in URLs, file names and metrics.
    fn name(&mut self, name: &str, span: Range<usize>, key: &str, what: &str) {
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            self.error(
                span,
                key,
                format!(
                    "a {what} name is 1 to 64 letters, digits, '-' or '_' (it appears in URLs and metrics)"
                ),
            );
        }
    }

    /// Whether `queue` is defined; if not, says so at `key`, listing the queues there are.
    fn names_a_queue(&mut self, span: Range<usize>, key: &str, queue: &str) -> bool {
        if self.queue_names.iter().any(|known| known == queue) {
            return true;
        }
        let known = if self.queue_names.is_empty() {
            "none is defined".to_owned()
        } else {
            self.queue_names.join(", ")
        };
        self.error(span, key, format!("no queue is named \"{queue}\" (queues: {known})"));
        false
    }

    /// A count that must be at least 1; `None` when absent or refused.
    fn at_least_one<T: Copy + PartialEq + From<u8>>(
        &mut self,
        value: Option<Spanned<T>>,
        key: &str,
    ) -> Option<T> {
        let value = value?;
        if *value.get_ref() == T::from(0) {
            self.error(value.span(), key, "must be at least 1");
            return None;
        }
        Some(value.into_inner())
    }

    /// A duration that must be positive, or the default when absent.
    fn duration(
        &mut self,
        value: Option<Spanned<raw::Duration>>,
        key: String,
        default: Duration,
    ) -> Duration {
        match value {
            Some(d) if d.get_ref().0.is_zero() => {
                self.error(d.span(), key, "must be greater than zero");
                default
            }
            Some(d) => d.get_ref().0,
            None => default,
        }
    }

    fn gateway(&mut self, mut raw: raw::RawGateway) -> GatewayConfig {
        let tls = self.tls(&raw);
        let (listen, listen_site) = self.listen(raw.listen, "gateway.listen", DEFAULT_GATEWAY_LISTEN);
        let shutdown_timeout = self.duration(
            raw.shutdown_timeout.take(),
            "gateway.shutdown_timeout".into(),
            Duration::from_secs(30),
        );
        let trusted_proxies: Vec<ipnet::IpNet> = raw
            .trusted_proxies
            .iter()
            .enumerate()
            .filter_map(|(i, cidr)| match parse_cidr(cidr.get_ref()) {
                Some(net) => Some(net),
                None => {
                    self.error(
                        cidr.span(),
                        format!("gateway.trusted_proxies[{i}]"),
                        "an address or a CIDR block, such as \"10.0.0.0/8\" or \"::1\"",
                    );
                    None
                }
            })
            .collect();
        let defaults = ClientTimeouts::default();
        let client_timeouts = ClientTimeouts {
            head: self.duration(raw.head_timeout.take(), "gateway.head_timeout".into(), defaults.head),
            keepalive: self.duration(
                raw.keepalive_timeout.take(),
                "gateway.keepalive_timeout".into(),
                defaults.keepalive,
            ),
            body: self.duration(raw.body_timeout.take(), "gateway.body_timeout".into(), defaults.body),
            send: self.duration(raw.send_timeout.take(), "gateway.send_timeout".into(), defaults.send),
        };
        let max_body = raw.max_body.map_or(DEFAULT_MAX_BODY, |size| size.0);
        let max_connections = self
            .at_least_one(raw.max_connections.take(), "gateway.max_connections")
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let max_connections_per_client =
            self.at_least_one(raw.max_connections_per_client.take(), "gateway.max_connections_per_client");
        let proxy_protocol = match raw.proxy_protocol.take() {
            Some(on) if *on.get_ref() && trusted_proxies.is_empty() => {
                self.error(
                    on.span(),
                    "gateway.proxy_protocol",
                    "needs `gateway.trusted_proxies`: the load balancers whose PROXY headers are believed",
                );
                false
            }
            other => other.is_some_and(Spanned::into_inner),
        };
        let access_log = self.access_log(raw.access_log.take(), raw.access_log_format.take());
        GatewayConfig {
            access_log,
            request_ids: raw.request_ids.unwrap_or(true),
            proxy_protocol,
            listen,
            listen_site,
            shutdown_timeout,
            tls,
            trusted_proxies,
            max_body,
            client_timeouts,
            max_connections,
            max_connections_per_client,
        }
    }

    fn tls(&mut self, raw: &raw::RawGateway) -> Option<TlsConfig> {
        let Some(listen_tls) = &raw.listen_tls else {
            if let Some(first) = raw.tls.first() {
                self.error(
                    first.cert.span(),
                    "gateway.tls",
                    "certificates need `gateway.listen_tls`, the HTTPS address",
                );
            }
            if let Some(hsts) = &raw.hsts {
                self.error(hsts.span(), "gateway.hsts", "applies only with `gateway.listen_tls`");
            }
            if raw.redirect_to_https {
                let site = Site { key: "gateway.redirect_to_https".into(), ..Site::file(self.file) };
                self.errors.push(site.error("needs `gateway.listen_tls`, the HTTPS address to redirect to"));
            }
            return None;
        };
        if raw.tls.is_empty() {
            self.error(
                listen_tls.span(),
                "gateway.listen_tls",
                "HTTPS needs a certificate: add `tls = { cert = \"cert.pem\", key = \"key.pem\" }` to [gateway]",
            );
        }
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let certificates = raw
            .tls
            .iter()
            .enumerate()
            .map(|(i, files)| {
                let key = |name| format!("gateway.tls[{i}].{name}");
                CertificateFiles {
                    cert: dir.join(files.cert.get_ref()),
                    cert_site: self.site(files.cert.span(), key("cert")),
                    key: dir.join(files.key.get_ref()),
                    key_site: self.site(files.key.span(), key("key")),
                }
            })
            .collect();
        let hsts = raw.hsts.as_ref().and_then(|hsts| match http::HeaderValue::from_str(hsts.get_ref()) {
            Ok(value) if hsts.get_ref().starts_with("max-age=") => Some(value),
            _ => {
                self.error(
                    hsts.span(),
                    "gateway.hsts",
                    "a Strict-Transport-Security value, such as \"max-age=63072000; includeSubDomains\"",
                );
                None
            }
        });
        Some(TlsConfig {
            listen: *listen_tls.get_ref(),
            listen_site: self.site(listen_tls.span(), "gateway.listen_tls"),
            certificates,
            redirect_to_https: raw.redirect_to_https,
            hsts,
        })
    }

    /// `services.NAME.tls`: only for `protocol = "https"`, which without it verifies instances
    /// against the system's roots.
    fn upstream_tls(
        &mut self,
        key: &str,
        service_span: Range<usize>,
        protocol: UpstreamProtocol,
        raw: Option<Spanned<raw::RawUpstreamTls>>,
    ) -> Option<UpstreamTlsConfig> {
        if protocol != UpstreamProtocol::Https {
            if let Some(raw) = raw {
                self.error(raw.span(), format!("{key}.tls"), "applies only with `protocol = \"https\"`");
            }
            return None;
        }
        let (span, raw) = match raw {
            Some(raw) => (raw.span(), raw.into_inner()),
            None => (service_span, raw::RawUpstreamTls::default()),
        };
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let file = |this: &Self, value: &Spanned<String>, name: &str| {
            (dir.join(value.get_ref()), this.site(value.span(), format!("{key}.tls.{name}")))
        };
        let ca = raw.ca.as_ref().map(|ca| file(self, ca, "ca"));
        let server_name = raw.server_name.as_ref().map(|name| {
            (
                name.get_ref().trim().to_ascii_lowercase(),
                self.site(name.span(), format!("{key}.tls.server_name")),
            )
        });
        let client_certificate = match (&raw.cert, &raw.key) {
            (Some(cert), Some(key)) => {
                let (cert, cert_site) = file(self, cert, "cert");
                let (key, key_site) = file(self, key, "key");
                Some(CertificateFiles { cert, cert_site, key, key_site })
            }
            (Some(one), None) | (None, Some(one)) => {
                self.error(
                    one.span(),
                    format!("{key}.tls"),
                    "a client certificate needs both `cert` and `key`",
                );
                None
            }
            (None, None) => None,
        };
        Some(UpstreamTlsConfig {
            ca,
            server_name,
            client_certificate,
            site: self.site(span, format!("{key}.tls")),
        })
    }

    fn admin(&mut self, raw: raw::RawAdmin) -> AdminConfig {
        let (listen, listen_site) = self.listen(raw.listen, "admin.listen", DEFAULT_ADMIN_LISTEN);
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let token_file =
            raw.token_file.map(|file| (dir.join(file.get_ref()), self.site(file.span(), "admin.token_file")));
        AdminConfig { listen, listen_site, token_file, metrics_public: raw.metrics_public }
    }

    /// A service; or, without a route table, a worker's pool (under `workers.NAME`).
    fn service(
        &mut self,
        name: String,
        raw: Spanned<RawService>,
        routes: Option<&mut RouteTable>,
    ) -> Option<ServiceConfig> {
        let errors_before = self.errors.len();
        let table = if routes.is_some() { "services" } else { "workers" };
        let key = format!("{table}.{name}");
        // The table's own span: where problems with the service as a whole are reported.
        let name_span = raw.span();
        self.name(&name, name_span.clone(), &key, if table == "services" { "service" } else { "worker" });
        let mut raw = raw.into_inner();

        let backend = self.backend(&key, name_span.clone(), &mut raw);
        let service_routes = match routes {
            Some(routes) => self.routes(&name, &key, name_span.clone(), raw.routes, routes),
            None => Vec::new(),
        };
        let instances = match &backend {
            Some(Backend::Upstreams { upstreams, .. }) => {
                let count = u32::try_from(upstreams.len()).unwrap_or(u32::MAX);
                InstanceBounds { min: count, max: count, initial: count }
            }
            _ => self.instances(&key, name_span.clone(), raw.instances),
        };
        let health = self.health(&key, raw.health);
        let tls = self.upstream_tls(&key, name_span, raw.protocol, raw.tls.take());
        let timeouts = TimeoutConfig {
            connect: self.duration(
                raw.timeouts.connect,
                format!("{key}.timeouts.connect"),
                Duration::from_secs(2),
            ),
            request: self.duration(
                raw.timeouts.request,
                format!("{key}.timeouts.request"),
                Duration::from_secs(60),
            ),
            per_try: raw
                .timeouts
                .per_try
                .map(|t| self.duration(Some(t), format!("{key}.timeouts.try"), Duration::from_secs(60))),
            tunnel_idle: self.duration(
                raw.timeouts.tunnel_idle,
                format!("{key}.timeouts.tunnel_idle"),
                Duration::from_secs(300),
            ),
        };
        let lifecycle = LifecycleConfig {
            start_timeout: self.duration(
                raw.lifecycle.start_timeout,
                format!("{key}.lifecycle.start_timeout"),
                Duration::from_secs(30),
            ),
            drain_timeout: self.duration(
                raw.lifecycle.drain_timeout,
                format!("{key}.lifecycle.drain_timeout"),
                Duration::from_secs(30),
            ),
            stop_timeout: self.duration(
                raw.lifecycle.stop_timeout,
                format!("{key}.lifecycle.stop_timeout"),
                Duration::from_secs(10),
            ),
        };

        let autoscale = raw.autoscale.map(|raw| self.autoscale(&key, raw, instances));
        let retry = self.retry(&key, raw.retry);
        let outlier = OutlierConfig {
            consecutive_failures: raw.outlier.consecutive_failures.unwrap_or(3).max(1),
            ejection: self.duration(
                raw.outlier.ejection,
                format!("{key}.outlier.ejection"),
                Duration::from_secs(5),
            ),
            max_ejected_percent: match raw.outlier.max_ejected_percent {
                Some(p) if *p.get_ref() > 100 => {
                    self.error(
                        p.span(),
                        format!("{key}.outlier.max_ejected_percent"),
                        "must be from 0 to 100",
                    );
                    50
                }
                Some(p) => *p.get_ref(),
                None => 50,
            },
        };
        let buffer = BufferConfig {
            requests: raw.buffer.requests.unwrap_or(1000),
            timeout: self.duration(
                raw.buffer.timeout,
                format!("{key}.buffer.timeout"),
                Duration::from_secs(30),
            ),
        };

        if self.errors.len() > errors_before {
            return None;
        }
        Some(ServiceConfig {
            name,
            backend: backend?,
            protocol: raw.protocol,
            tls,
            routes: service_routes,
            instances,
            health,
            balance: raw.balance,
            timeouts,
            lifecycle,
            autoscale,
            buffer,
            instance_concurrency: raw.instance_concurrency.filter(|&limit| limit > 0),
            max_concurrency: raw.max_concurrency.filter(|&limit| limit > 0),
            retry,
            outlier,
        })
    }

    fn autoscale(
        &mut self,
        key: &str,
        raw: Spanned<raw::RawAutoscale>,
        bounds: InstanceBounds,
    ) -> surge_scale::ScaleConfig {
        use surge_scale::Metric;
        let key = format!("{key}.autoscale");
        let raw = raw.into_inner();
        let defaults = surge_scale::ScaleConfig::default();
        let metric = match &raw.metric {
            None => Metric::Concurrency,
            Some(metric) => match metric.get_ref().as_str() {
                "concurrency" => Metric::Concurrency,
                "rps" => Metric::Rps,
                "cpu" => Metric::Cpu,
                "latency_p95" => Metric::LatencyP95,
                other => {
                    let message = format!(
                        r#""{other}" is not a metric: use "concurrency", "rps", "cpu" or "latency_p95""#
                    );
                    self.error(metric.span(), format!("{key}.metric"), message);
                    Metric::Concurrency
                }
            },
        };
        // A sensible target per metric: 10 in flight, 100 requests/s, 70% of a core, 500 ms.
        let default_target = match metric {
            Metric::Concurrency => 10.0,
            Metric::Rps => 100.0,
            Metric::Cpu => 0.7,
            Metric::LatencyP95 => 0.5,
        };
        // Rps leaves Knative's 30% headroom for bursts; concurrency gets its headroom from
        // square-root staffing; CPU and latency targets are already the level to hold.
        let default_utilization = match metric {
            Metric::Rps => 0.7,
            Metric::Concurrency | Metric::Cpu | Metric::LatencyP95 => defaults.utilization,
        };
        let mut number =
            |value: Option<Spanned<f64>>, name: &str, default: f64, valid: fn(f64) -> bool, rule: &str| {
                match value {
                    Some(v) if !valid(*v.get_ref()) => {
                        self.error(v.span(), format!("{key}.{name}"), format!("{} {rule}", v.get_ref()));
                        default
                    }
                    Some(v) => *v.get_ref(),
                    None => default,
                }
            };
        let positive = |v: f64| v > 0.0 && v.is_finite();
        let target = number(raw.target, "target", default_target, positive, "must be greater than zero");
        let utilization = number(
            raw.utilization,
            "utilization",
            default_utilization,
            |v| v > 0.0 && v <= 1.0,
            "must be above 0 and at most 1",
        );
        let max_scale_up_rate = number(
            raw.max_scale_up_rate,
            "max_scale_up_rate",
            defaults.max_scale_up_rate,
            |v| v > 1.0,
            "must be above 1",
        );
        let max_scale_down_rate = number(
            raw.max_scale_down_rate,
            "max_scale_down_rate",
            defaults.max_scale_down_rate,
            |v| v > 1.0,
            "must be above 1",
        );
        let tolerance = number(
            raw.tolerance,
            "tolerance",
            defaults.tolerance,
            |v| (0.0..1.0).contains(&v),
            "must be from 0 to below 1",
        );
        // The keys of the panic-mode policy that Surge's policy replaced.
        let removed = [
            ("stable_window", raw.stable_window.as_ref().map(|v| v.span())),
            ("panic_window", raw.panic_window.as_ref().map(|v| v.span())),
            ("panic_threshold", raw.panic_threshold.as_ref().map(|v| v.span())),
        ];
        for (name, span) in removed {
            if let Some(span) = span {
                self.error(
                    span,
                    format!("{key}.{name}"),
                    "is no longer a setting: the policy has no panic mode; a rise in load counts \
                     in full once it has held for `persistence` (default 1s), see docs/autoscaling.md",
                );
            }
        }
        let persistence = self.duration(raw.persistence, format!("{key}.persistence"), defaults.persistence);
        let scale_down_delay = match raw.scale_down_delay {
            Some(d) => d.get_ref().0,
            None => defaults.scale_down_delay,
        };
        ScaleConfig {
            metric,
            target,
            utilization,
            persistence,
            max_scale_up_rate,
            max_scale_down_rate,
            scale_down_delay,
            tolerance,
            idle_window: self.duration(raw.idle_window, format!("{key}.idle_window"), defaults.idle_window),
            tick: defaults.tick,
            min: bounds.min,
            max: bounds.max,
        }
    }

    fn retry(&mut self, key: &str, raw: raw::RawRetry) -> RetryConfig {
        let budget = match raw.budget {
            Some(b) if !(0.0..=10.0).contains(b.get_ref()) => {
                self.error(
                    b.span(),
                    format!("{key}.retry.budget"),
                    "is a fraction of requests, from 0 to 10",
                );
                0.2
            }
            Some(b) => *b.get_ref(),
            None => 0.2,
        };
        RetryConfig {
            attempts: raw.attempts.unwrap_or(3).max(1),
            budget,
            min_per_second: raw.min_per_second.unwrap_or(10.0).max(0.0),
            backoff: self.duration(raw.backoff, format!("{key}.retry.backoff"), Duration::from_millis(25)),
        }
    }

    fn routes(
        &mut self,
        service: &str,
        key: &str,
        name_span: Range<usize>,
        raw: Option<Spanned<Vec<Spanned<raw::RawRoute>>>>,
        table: &mut RouteTable,
    ) -> Vec<Route> {
        let key = format!("{key}.routes");
        let Some(raw) = raw.filter(|r| !r.get_ref().is_empty()) else {
            self.error(
                name_span,
                key,
                r#"missing `routes`: list the path prefixes this service answers, such as ["/api"]"#,
            );
            return Vec::new();
        };
        let mut routes = Vec::new();
        for (index, route) in raw.into_inner().into_iter().enumerate() {
            let span = route.span();
            let route_key = format!("{key}[{index}]");
            let raw::RawRoute { prefix, host, retry, rate_limit, max_body, async_queue, cache } =
                route.into_inner();
            if let Some(queue) = &async_queue {
                if !self.names_a_queue(span.clone(), &format!("{route_key}.async"), queue) {
                    continue;
                }
            }
            let rate_limit = match rate_limit.map(to_rate_limit) {
                Some(Err(message)) => {
                    self.error(span, format!("{route_key}.rate_limit"), message);
                    continue;
                }
                other => other.and_then(Result::ok),
            };
            if !prefix.starts_with('/') {
                self.error(span, route_key, format!(r#"the route prefix "{prefix}" must start with "/""#));
                continue;
            }
            let host = match host {
                Some(host) if host.is_empty() || host.contains([':', '/', ' ']) => {
                    self.error(
                        span,
                        route_key,
                        format!(r#"the route host "{host}" must be a bare host name, without scheme, port or path"#),
                    );
                    continue;
                }
                host => host.map(|h| h.to_ascii_lowercase()),
            };
            let cache = match cache.map(to_route_cache) {
                Some(Err((field, message))) => {
                    self.error(span, format!("{route_key}.cache{field}"), message);
                    continue;
                }
                Some(Ok(_)) if async_queue.is_some() => {
                    let message = "an async route answers 202 with a job's place; it has nothing to cache";
                    self.error(span, format!("{route_key}.cache"), message);
                    continue;
                }
                other => other.and_then(Result::ok),
            };
            let max_body = max_body.map(|size| size.0);
            let normalised = Route {
                prefix: normalise_prefix(&prefix),
                host,
                retry,
                rate_limit,
                max_body,
                async_queue,
                cache,
            };
            let site = self.site(span, route_key);
            if let Some(earlier) = table.insert(&normalised, service, &prefix, site.clone()) {
                self.errors.push(site.error(earlier));
                continue;
            }
            routes.push(normalised);
        }
        routes
    }

    /// `[static.NAME]`: its folder must exist; its routes are checked against every other.
    fn static_site(
        &mut self,
        name: String,
        raw: Spanned<raw::RawStatic>,
        table: &mut RouteTable,
    ) -> Option<StaticConfig> {
        let key = format!("static.{name}");
        let span = raw.span();
        let raw = raw.into_inner();
        let routes = self.routes(&key, &key, span.clone(), raw.routes, table);
        if routes
            .iter()
            .any(|route| route.cache.is_some() || route.async_queue.is_some() || route.rate_limit.is_some())
        {
            let message =
                "a static route takes a prefix and a host only: files carry ETag and Cache-Control already, \
                           and rate limits apply to services";
            self.error(span.clone(), format!("{key}.routes"), message);
        }
        let Some(root) = raw.root else {
            self.error(
                span,
                format!("{key}.root"),
                r#"missing `root`: the folder to serve, such as "./public""#,
            );
            return None;
        };
        let dir = self.file.parent().unwrap_or(Path::new("."));
        let path = dir.join(root.get_ref());
        if !path.is_dir() {
            self.error(root.span(), format!("{key}.root"), format!("{} is not a folder", path.display()));
            return None;
        }
        if let Some(index) =
            raw.index.as_deref().filter(|index| index.is_empty() || index.contains(['/', '\\']))
        {
            self.error(
                span,
                format!("{key}.index"),
                format!(r#""{index}" must be a file name, such as "index.html""#),
            );
            return None;
        }
        let mut cache_control = Vec::new();
        for (i, rule) in raw.cache_control.into_iter().enumerate() {
            if http::HeaderValue::from_str(&rule.value).is_err() {
                self.error(
                    span.clone(),
                    format!("{key}.cache_control[{i}].value"),
                    "not a valid header value",
                );
                continue;
            }
            cache_control.push((rule.pattern, rule.value));
        }
        Some(StaticConfig {
            name,
            root: path,
            routes,
            index: raw.index,
            cache_control,
            fingerprinted: raw.fingerprinted.unwrap_or(true),
        })
    }

    /// The user and group from `/etc/passwd` and `/etc/group`; switching to them needs root.
    fn run_as(
        &mut self,
        key: &str,
        user: Option<Spanned<String>>,
        group: Option<Spanned<String>>,
    ) -> Option<RunAs> {
        let user = user?;
        let Some((uid, primary_gid)) = account("/etc/passwd", user.get_ref()) else {
            let message = format!("no user named `{}` in /etc/passwd", user.get_ref());
            self.error(user.span(), format!("{key}.user"), message);
            return None;
        };
        let gid = match &group {
            None => primary_gid,
            Some(group) => match account("/etc/group", group.get_ref()) {
                Some((gid, _)) => gid,
                None => {
                    let message = format!("no group named `{}` in /etc/group", group.get_ref());
                    self.error(group.span(), format!("{key}.group"), message);
                    return None;
                }
            },
        };
        let root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").ok()?) == 0;
        if !root {
            self.error(
                user.span(),
                format!("{key}.user"),
                "running instances as another user needs surge to run as root",
            );
            return None;
        }
        Some(RunAs { user: user.into_inner(), uid, gid })
    }

    /// `command` (surge runs the instances) or `upstreams` (they run elsewhere), not both.
    fn backend(&mut self, key: &str, name_span: Range<usize>, raw: &mut RawService) -> Option<Backend> {
        let Some(upstreams) = raw.upstreams.take() else {
            if let Some(refresh) = &raw.dns_refresh {
                self.error(
                    refresh.span(),
                    format!("{key}.dns_refresh"),
                    "applies only to a service with `upstreams`",
                );
            }
            return match &raw.command {
                None => {
                    self.error(
                        name_span,
                        key,
                        "missing `command` (the program that runs one instance) or `upstreams` \
                         (the addresses of instances that run elsewhere)",
                    );
                    None
                }
                Some(command) => match resolve_command(command.get_ref(), self.file) {
                    Ok(path) => Some(Backend::Command {
                        command: path,
                        args: std::mem::take(&mut raw.args),
                        env: std::mem::take(&mut raw.env).into_iter().collect(),
                        run_as: self.run_as(key, raw.user.take(), raw.group.take()),
                        limits: raw
                            .limits
                            .take()
                            .map(|limits| process_limits(limits.into_inner()))
                            .unwrap_or_default(),
                    }),
                    Err(message) => {
                        self.error(command.span(), format!("{key}.command"), message);
                        None
                    }
                },
            };
        };
        let conflicts = [
            ("command", raw.command.as_ref().map(Spanned::span)),
            ("user", raw.user.as_ref().map(Spanned::span)),
            ("group", raw.group.as_ref().map(Spanned::span)),
            ("limits", raw.limits.as_ref().map(Spanned::span)),
            ("instances", raw.instances.as_ref().map(Spanned::span)),
            ("autoscale", raw.autoscale.as_ref().map(Spanned::span)),
        ];
        for (conflict, span) in conflicts {
            if let Some(span) = span {
                self.error(
                    span,
                    format!("{key}.{conflict}"),
                    "does not apply to a service with `upstreams`: its instances run elsewhere, \
                     one per address",
                );
            }
        }
        if !raw.args.is_empty() || !raw.env.is_empty() {
            let what = if raw.args.is_empty() { "env" } else { "args" };
            self.error(
                upstreams.span(),
                format!("{key}.{what}"),
                "applies only to a service with a `command`",
            );
        }
        let span = upstreams.span();
        let upstreams = upstreams.into_inner();
        if upstreams.is_empty() {
            self.error(
                span,
                format!("{key}.upstreams"),
                "lists no address; add one such as \"10.0.0.7:8080\"",
            );
        }
        let mut parsed = Vec::with_capacity(upstreams.len());
        for (index, upstream) in upstreams.into_iter().enumerate() {
            let entry_key = format!("{key}.upstreams[{index}]");
            let span = upstream.span();
            let upstream = upstream.into_inner();
            let weight = upstream.weight.unwrap_or(1);
            if !(1..=MAX_WEIGHT).contains(&weight) {
                self.error(
                    span.clone(),
                    format!("{entry_key}.weight"),
                    format!("must be from 1 to {MAX_WEIGHT}"),
                );
            }
            match parse_upstream(&upstream.address) {
                Ok((host, port)) => parsed.push(Upstream { host, port, weight }),
                Err(message) => self.error(span, entry_key, message),
            }
        }
        let dns_refresh =
            self.duration(raw.dns_refresh.take(), format!("{key}.dns_refresh"), Duration::from_secs(5));
        Some(Backend::Upstreams { upstreams: parsed, dns_refresh })
    }

    fn instances(
        &mut self,
        key: &str,
        name_span: Range<usize>,
        raw: Option<Spanned<raw::RawInstances>>,
    ) -> InstanceBounds {
        let key = format!("{key}.instances");
        let (span, raw) = match raw {
            Some(raw) => (raw.span(), raw.into_inner()),
            None => (name_span, raw::RawInstances::default()),
        };
        let min = raw.min.unwrap_or(1);
        let max = raw.max.unwrap_or(min.max(1));
        let initial = raw.initial.unwrap_or(min);
        let bounds = InstanceBounds { min, max, initial };
        if max == 0 {
            self.error(span, key, "max must be at least 1");
        } else if max > MAX_INSTANCES {
            self.error(
                span,
                key,
                format!("max ({max}) is above the limit of {MAX_INSTANCES} instances per service"),
            );
        } else if min > max {
            self.error(span, key, format!("min ({min}) is greater than max ({max})"));
        } else if !bounds.contains(initial) {
            self.error(
                span,
                key,
                format!("initial ({initial}) must lie between min ({min}) and max ({max})"),
            );
        }
        bounds
    }

    fn health(&mut self, key: &str, raw: raw::RawHealth) -> HealthConfig {
        let key = format!("{key}.health");
        let path = match raw.path {
            Some(path) if !path.get_ref().starts_with('/') => {
                let message = format!(r#"the health path "{}" must start with "/""#, path.get_ref());
                self.error(path.span(), format!("{key}.path"), message);
                String::new()
            }
            Some(path) => path.into_inner(),
            None => "/healthz".to_owned(),
        };
        HealthConfig {
            path,
            interval: self.duration(raw.interval, format!("{key}.interval"), Duration::from_secs(2)),
            timeout: self.duration(raw.timeout, format!("{key}.timeout"), Duration::from_secs(1)),
            healthy_threshold: raw.healthy_threshold.unwrap_or(1).max(1),
            unhealthy_threshold: raw.unhealthy_threshold.unwrap_or(3).max(1),
        }
    }
}

fn to_rate_limit(raw: raw::RawRateLimit) -> Result<RateLimit, String> {
    if raw.rate == 0 || raw.per.0.is_zero() {
        return Err("rate and per must be greater than zero".to_owned());
    }
    let key = match raw.key.as_str() {
        "ip" => RateKey::ClientIp,
        other => match other.strip_prefix("header:") {
            Some(name) if !name.is_empty() => RateKey::Header(name.to_ascii_lowercase()),
            _ => return Err(format!(r#"key "{other}" is neither "ip" nor "header:NAME""#)),
        },
    };
    Ok(RateLimit { rate: raw.rate, per: raw.per.0, burst: raw.burst.unwrap_or(raw.rate).max(1), key })
}

/// A route's cache settings with their defaults; an error names the field (".memory", say).
fn to_route_cache(raw: raw::RawRouteCache) -> Result<RouteCache, (&'static str, String)> {
    let mut key_headers = Vec::new();
    for name in raw.key_headers {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err((".key_headers", format!(r#""{name}" is not a header field name"#)));
        }
        key_headers.push(name.to_ascii_lowercase());
    }
    let max_object = raw.max_object.map_or(1 << 20, |size| size.0);
    let memory = raw.memory.map_or(64 << 20, |size| size.0);
    if max_object == 0 {
        return Err((".max_object", "must be more than 0 bytes".to_owned()));
    }
    if memory < max_object {
        return Err((
            ".memory",
            format!("{memory} bytes cannot hold one object of max_object ({max_object} bytes)"),
        ));
    }
    if raw.default_ttl.is_some_and(|ttl| ttl.0.is_zero()) {
        return Err((
            ".default_ttl",
            "must be more than 0; leave it out to store only what says how long it is fresh".to_owned(),
        ));
    }
    Ok(RouteCache {
        default_ttl: raw.default_ttl.map(|ttl| ttl.0),
        grace: raw.grace.map_or(Duration::ZERO, |grace| grace.0),
        store_set_cookie: raw.store_set_cookie,
        obey_request_no_cache: raw.obey_request_no_cache,
        sort_query: raw.sort_query,
        key_headers,
        max_object,
        memory,
        collapse_timeout: raw.collapse_timeout.map_or(Duration::from_secs(5), |wait| wait.0),
        shared: raw.shared.unwrap_or(true),
    })
}

/// "/api/" and "/api" match the same paths on segment boundaries, so they are one prefix.
fn normalise_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// Every route seen so far, to find two that would match the same requests.
#[derive(Default)]
struct RouteTable {
    seen: HashMap<(Option<String>, String), (String, String, Site)>,
}

impl RouteTable {
    /// Records a route; if an earlier one matches the same requests, says which.
    fn insert(&mut self, route: &Route, service: &str, written: &str, site: Site) -> Option<String> {
        let key = (route.host.clone(), route.prefix.clone());
        if let Some((other_service, other_written, other_site)) = self.seen.get(&key) {
            let host = route.host.as_deref().map(|h| format!(" for host {h}")).unwrap_or_default();
            let kind = if other_written == written { "duplicate route" } else { "overlapping route" };
            return Some(format!(
                r#"{kind}: "{written}"{host} matches the same requests as "{other_written}" of service `{other_service}` (line {})"#,
                other_site.line
            ));
        }
        self.seen.insert(key, (service.to_owned(), written.to_owned(), site));
        None
    }
}

/// Finds the executable a service runs: a path with a `/` is taken relative to the config
/// file's folder; a bare name is looked up in PATH, then beside the running surge binary
/// (where `cargo build` puts `surge-echo`).
/// `host:port`, `ip:port` or `[ipv6]:port`.
fn parse_upstream(address: &str) -> Result<(String, u16), String> {
    if address.contains("://") {
        return Err(format!(r#""{address}" has a scheme; write host:port, such as "10.0.0.7:8080""#));
    }
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    let missing_port = || format!(r#""{address}" has no port; write host:port, such as "{address}:8080""#);
    let (host, port) = address.rsplit_once(':').ok_or_else(missing_port)?;
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| format!(r#""{address}": the port must be a number from 1 to 65535"#))?;
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid_name {
        return Err(format!(r#""{address}": "{host}" is neither an IP address nor a DNS name"#));
    }
    Ok((host.to_owned(), port))
}

fn process_limits(raw: raw::RawLimits) -> ProcessLimits {
    ProcessLimits {
        memory: raw.memory.map(|size| size.0),
        open_files: raw.open_files,
        processes: raw.processes,
        cpu_seconds: raw.cpu_seconds,
    }
}

/// The id and primary group of `name` in an `/etc/passwd`-style file (`/etc/group`: the gid).
fn account(file: &str, name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() != Some(&name) {
            return None;
        }
        let id = fields.get(2)?.parse().ok()?;
        let group = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
        Some((id, group))
    })
}

/// `10.0.0.0/8`, or one address as a block of one.
fn parse_cidr(text: &str) -> Option<ipnet::IpNet> {
    text.parse().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

fn resolve_command(command: &str, config_file: &Path) -> Result<PathBuf, String> {
    if command.is_empty() {
        return Err("the command is empty".to_owned());
    }
    if command.contains('/') {
        let base = config_file.parent().unwrap_or(Path::new("."));
        let path = base.join(command);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!("no executable file at {}", path.display()))
        };
    }
    let path_dirs =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    let own_dir = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf));
    path_dirs
        .into_iter()
        .chain(own_dir)
        .map(|dir| dir.join(command))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("`{command}` was not found in PATH nor beside the surge binary"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
