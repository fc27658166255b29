//! Every broken configuration is reported with its key and line.

use std::path::Path;

fn errors(source: &str) -> Vec<surge_config::ConfigError> {
    match surge_config::parse(source, Path::new("surge.toml")) {
        Ok(_) => panic!("expected the configuration to be rejected:\n{source}"),
        Err(errors) => errors.0,
    }
}

/// Asserts that exactly one error names `key` at `line` and says `words`.
fn assert_single(source: &str, key: &str, line: usize, words: &str) {
    let errors = errors(source);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    let error = &errors[0];
    assert_eq!(error.site.key, key, "{error}");
    assert_eq!(error.site.line, line, "{error}");
    assert!(error.message.contains(words), "`{words}` not in: {error}");
    let shown = error.to_string();
    assert!(shown.contains(&format!("surge.toml:{line}:")), "{shown}");
}

const GOOD_SERVICE: &str = r#"
[services.api]
command = "sh"
routes = ["/api"]
"#;

#[test]
fn valid_config_gets_defaults() {
    let config = surge_config::parse(GOOD_SERVICE, Path::new("surge.toml")).expect("valid");
    let api = &config.services[0];
    assert_eq!(api.name, "api");
    assert_eq!(api.instances, surge_config::InstanceBounds { min: 1, max: 1, initial: 1 });
    assert_eq!(api.health.path, "/healthz");
    assert_eq!(config.admin.listen.port(), 9900);
    assert!(
        matches!(&api.backend, surge_config::Backend::Command { command, .. } if command.ends_with("sh"))
    );
}

#[test]
fn unknown_key() {
    let source = format!("{GOOD_SERVICE}colour = \"red\"\n");
    assert_single(&source, "services.api.colour", 5, "unknown field `colour`");
}

#[test]
fn unknown_top_level_table() {
    assert_single(
        &format!("[gatway]\nlisten = \"127.0.0.1:1\"\n{GOOD_SERVICE}"),
        "gatway",
        1,
        "unknown field",
    );
}

#[test]
fn bad_duration() {
    let source = format!("{GOOD_SERVICE}health = {{ interval = \"2 parsecs\" }}\n");
    assert_single(&source, "services.api.health.interval", 5, "invalid duration");
}

#[test]
fn duration_without_unit() {
    let source = format!("{GOOD_SERVICE}timeouts = {{ request = 5 }}\n");
    assert_single(&source, "services.api.timeouts.request", 5, "such as \"250ms\"");
}

#[test]
fn min_greater_than_max() {
    let source = format!("{GOOD_SERVICE}instances = {{ min = 5, max = 2 }}\n");
    assert_single(&source, "services.api.instances", 5, "min (5) is greater than max (2)");
}

#[test]
fn initial_out_of_bounds() {
    let source = format!("{GOOD_SERVICE}instances = {{ min = 1, max = 3, initial = 9 }}\n");
    assert_single(&source, "services.api.instances", 5, "initial (9)");
}

#[test]
fn duplicate_route() {
    let source = format!("{GOOD_SERVICE}\n[services.web]\ncommand = \"sh\"\nroutes = [\"/\", \"/api\"]\n");
    assert_single(&source, "services.web.routes[1]", 8, "duplicate route");
}

#[test]
fn overlapping_route() {
    let source = format!("{GOOD_SERVICE}\n[services.web]\ncommand = \"sh\"\nroutes = [\"/api/\"]\n");
    assert_single(&source, "services.web.routes[0]", 8, "overlapping route");
}

#[test]
fn same_prefix_on_another_host_is_fine() {
    let source = format!("{GOOD_SERVICE}\n[services.web]\ncommand = \"sh\"\nroutes = [{{ prefix = \"/api\", host = \"Shop.Example\" }}]\n");
    let config = surge_config::parse(&source, Path::new("surge.toml")).expect("valid");
    assert_eq!(config.services[1].routes[0].host.as_deref(), Some("shop.example"));
}

#[test]
fn missing_command() {
    assert_single("[services.api]\nroutes = [\"/\"]\n", "services.api", 1, "missing `command`");
}

#[test]
fn command_not_found() {
    let source = "[services.api]\ncommand = \"no-such-program-surge\"\nroutes = [\"/\"]\n";
    assert_single(source, "services.api.command", 2, "was not found in PATH");
}

#[test]
fn bad_balance() {
    let source = format!("{GOOD_SERVICE}balance = \"fastest\"\n");
    assert_single(&source, "services.api.balance", 5, "unknown variant `fastest`");
}

#[test]
fn route_without_slash() {
    let source = "[services.api]\ncommand = \"sh\"\nroutes = [\"api\"]\n";
    assert_single(source, "services.api.routes[0]", 3, "must start with \"/\"");
}

#[test]
fn bad_listen_address() {
    let source = format!("[gateway]\nlisten = \"localhost\"\n{GOOD_SERVICE}");
    assert_single(&source, "gateway.listen", 2, "invalid socket address");
}

#[test]
fn toml_syntax_error() {
    let errors = errors("[services.api\ncommand = 1\n");
    assert_eq!(errors[0].site.line, 1, "{}", errors[0]);
}

#[test]
fn every_semantic_error_is_reported_at_once() {
    let source = r#"
[services.api]
command = "sh"
routes = ["/api"]
instances = { min = 3, max = 1 }

[services.web]
routes = ["/api"]
health = { path = "healthz" }
"#;
    let errors = errors(source);
    let keys: Vec<_> = errors.iter().map(|e| (e.site.line, e.site.key.as_str())).collect();
    assert_eq!(
        keys,
        [
            (5, "services.api.instances"),
            (7, "services.web"),
            (8, "services.web.routes[0]"),
            (9, "services.web.health.path"),
        ]
    );
}

#[test]
fn port_in_use_names_the_listen_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let source = format!("[gateway]\nlisten = \"127.0.0.1:{port}\"\n{GOOD_SERVICE}");
    let config = surge_config::parse(&source, Path::new("surge.toml")).expect("valid");
    let errors = surge_config::check_listeners(&config);
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].site.key.as_str(), errors[0].site.line), ("gateway.listen", 2));
    assert!(errors[0].message.contains("cannot listen"), "{}", errors[0]);
}

#[test]
fn autoscale_takes_its_bounds_from_instances() {
    let source = format!(
        "{GOOD_SERVICE}instances = {{ min = 0, max = 6 }}\nautoscale = {{ metric = \"rps\", target = 50, persistence = \"3s\" }}\n"
    );
    let config = surge_config::parse(&source, Path::new("surge.toml")).expect("valid");
    let scale = config.services[0].autoscale.clone().expect("autoscaled");
    assert_eq!((scale.min, scale.max, scale.target), (0, 6, 50.0));
    assert_eq!(scale.metric, surge_scale::Metric::Rps);
    assert_eq!(Ok(scale.persistence), surge_config::parse_duration("3s"), "persistence as written");
    assert_eq!(scale.utilization, 0.7, "rps keeps headroom");
    assert_eq!(config.services[0].buffer.requests, 1000);
}

#[test]
fn bad_autoscale_values() {
    let source = format!("{GOOD_SERVICE}autoscale = {{ metric = \"vibes\" }}\n");
    assert_single(&source, "services.api.autoscale.metric", 5, "not a metric");
    let source = format!("{GOOD_SERVICE}autoscale = {{ utilization = 1.5 }}\n");
    assert_single(&source, "services.api.autoscale.utilization", 5, "at most 1");
    let source = format!("{GOOD_SERVICE}autoscale = {{ panic_window = \"6s\" }}\n");
    assert_single(&source, "services.api.autoscale.panic_window", 5, "held for `persistence`");
}

#[test]
fn upstreams_take_addresses_names_and_weights() {
    let source = r#"
[services.api]
upstreams = ["10.0.0.7:8080", { address = "app.internal:9000", weight = 3 }, "[::1]:7000"]
dns_refresh = "30s"
protocol = "h2c"
routes = ["/api"]
"#;
    let config = surge_config::parse(source, Path::new("surge.toml")).expect("valid");
    let api = &config.services[0];
    let surge_config::Backend::Upstreams { upstreams, dns_refresh } = &api.backend else {
        panic!("expected upstreams: {:?}", api.backend);
    };
    let listed: Vec<(String, u32)> = upstreams.iter().map(|u| (u.authority(), u.weight)).collect();
    assert_eq!(
        listed,
        [("10.0.0.7:8080".into(), 1), ("app.internal:9000".into(), 3), ("[::1]:7000".into(), 1)]
    );
    assert_eq!(*dns_refresh, std::time::Duration::from_secs(30));
    assert_eq!(api.protocol, surge_config::UpstreamProtocol::H2c);
    assert_eq!(api.instances, surge_config::InstanceBounds { min: 3, max: 3, initial: 3 });
}

#[test]
fn upstream_mistakes_name_the_entry() {
    let service = |line: &str| format!("[services.api]\nroutes = [\"/\"]\n{line}\n");
    assert_single(&service(r#"upstreams = ["10.0.0.7"]"#), "services.api.upstreams[0]", 3, "has no port");
    assert_single(
        &service(r#"upstreams = ["10.0.0.7:80", "http://app:80"]"#),
        "services.api.upstreams[1]",
        3,
        "has a scheme",
    );
    assert_single(&service(r#"upstreams = ["app:0"]"#), "services.api.upstreams[0]", 3, "from 1 to 65535");
    assert_single(
        &service(r#"upstreams = ["bad host:80"]"#),
        "services.api.upstreams[0]",
        3,
        "neither an IP",
    );
    assert_single(
        &service(r#"upstreams = [{ address = "app:80", weight = 0 }]"#),
        "services.api.upstreams[0].weight",
        3,
        "from 1 to 256",
    );
    assert_single(&service("upstreams = []"), "services.api.upstreams", 3, "lists no address");
    assert_single(&service(r#"protocol = "h3""#), "services.api.protocol", 3, "unknown variant");
}

#[test]
fn upstreams_exclude_what_only_launched_instances_have() {
    let source = "[services.api]\nroutes = [\"/\"]\nupstreams = [\"10.0.0.7:80\"]\ncommand = \"sh\"\n";
    assert_single(source, "services.api.command", 4, "does not apply to a service with `upstreams`");
    let source =
        "[services.api]\nroutes = [\"/\"]\nupstreams = [\"10.0.0.7:80\"]\n[services.api.autoscale]\n";
    assert_single(source, "services.api.autoscale", 4, "does not apply");
    let source = "[services.api]\nroutes = [\"/\"]\ncommand = \"sh\"\ndns_refresh = \"1s\"\n";
    assert_single(source, "services.api.dns_refresh", 4, "applies only to a service with `upstreams`");
    let source = "[services.api]\nroutes = [\"/\"]\n";
    assert_single(source, "services.api", 1, "missing `command`");
}

#[test]
fn client_limits_have_nginx_like_defaults_and_sizes_take_units() {
    let config = surge_config::parse(GOOD_SERVICE, Path::new("surge.toml")).expect("valid");
    assert_eq!(config.gateway.max_body, 64 << 20);
    assert_eq!(config.gateway.client_timeouts, surge_config::ClientTimeouts::default());
    // Configuration values read from the file, compared with how the parser reads the same text.
    assert_eq!(Ok(config.gateway.client_timeouts.send), surge_config::parse_duration("60s"));

    let source = r#"
[gateway]
max_body = "10MB"
send_timeout = "5s"
trusted_proxies = ["10.0.0.0/8", "::1"]

[services.api]
command = "sh"
routes = [{ prefix = "/upload", max_body = "1GiB" }, { prefix = "/small", max_body = 512 }]
"#;
    let config = surge_config::parse(source, Path::new("surge.toml")).expect("valid");
    assert_eq!(config.gateway.max_body, 10_000_000);
    assert_eq!(Ok(config.gateway.client_timeouts.send), surge_config::parse_duration("5s"));
    assert_eq!(config.gateway.trusted_proxies.len(), 2);
    let routes = &config.services[0].routes;
    assert_eq!((routes[0].max_body, routes[1].max_body), (Some(1 << 30), Some(512)));

    for (size, bytes) in [("64MiB", Some(64 << 20)), ("2kb", Some(2000)), ("7", Some(7)), ("5 parsecs", None)]
    {
        assert_eq!(surge_config::parse_size(size).ok(), bytes, "{size}");
    }
    assert_single(
        &format!("[gateway]\nmax_body = \"lots\"\n{GOOD_SERVICE}"),
        "gateway.max_body",
        2,
        "invalid size",
    );
    assert_single(
        &format!("[gateway]\ntrusted_proxies = [\"10.0.0.0/33\"]\n{GOOD_SERVICE}"),
        "gateway.trusted_proxies[0]",
        2,
        "CIDR",
    );
}

#[test]
fn alerts_alerting_and_the_access_log_are_read_with_their_defaults() {
    let source = format!(
        r#"[gateway]
access_log = "logs/access.log"
access_log_format = "combined"
{GOOD_SERVICE}
[alerts.api_errors]
when = "error_ratio"
service = "api"
above = 0.05
for = "30s"
severity = "critical"

[alerts.slow]
when = "p99"
above = "250ms"
window = "5m"

[alerts.dead]
when = "dead_letters"

[alerting]
webhooks = [{{ url = "http://127.0.0.1:9093/api/v2/alerts" }}, {{ url = "https://hooks.example/x", format = "json" }}]
"#
    );
    let config = surge_config::parse(&source, Path::new("/etc/surge/surge.toml")).expect("valid");
    use std::time::Duration;
    use surge_config::{AlertRule, Severity, WebhookFormat};
    let log = config.gateway.access_log.as_ref().expect("an access log");
    assert_eq!(log.target, surge_config::AccessLogTarget::File("/etc/surge/logs/access.log".into()));
    assert_eq!(log.format, surge_config::AccessLogFormat::Combined);
    assert!(config.gateway.request_ids, "on by default");
    let [errors, slow, dead] = &config.alerts[..] else { panic!("three alerts: {:?}", config.alerts) };
    assert_eq!(
        errors.rule,
        AlertRule::ErrorRatio { service: Some("api".into()), above: 0.05, window: Duration::from_secs(60) }
    );
    assert_eq!((errors.for_, errors.severity), (Duration::from_secs(30), Severity::Critical));
    assert_eq!(
        slow.rule,
        AlertRule::Latency {
            service: None,
            above: Duration::from_millis(250),
            window: Duration::from_secs(300)
        }
    );
    assert_eq!((slow.for_, slow.severity), (Duration::ZERO, Severity::Warning));
    assert_eq!(dead.rule, AlertRule::DeadLetters { queue: None, above: 0 });
    let formats: Vec<WebhookFormat> = config.alerting.webhooks.iter().map(|hook| hook.format).collect();
    assert_eq!(formats, [WebhookFormat::Alertmanager, WebhookFormat::Json]);
    assert_eq!(config.alerting.repeat, Duration::from_secs(60));
}

#[test]
fn alert_mistakes_name_their_key() {
    let alert = |body: &str| format!("{GOOD_SERVICE}\n[alerts.x]\n{body}\n");
    // GOOD_SERVICE is four lines (with its leading newline); the table is on line 6.
    let cases = [
        (alert("for = \"1m\""), "alerts.x.when", 6, "missing: say what to watch"),
        (alert("when = \"cpu\""), "alerts.x.when", 7, "\"cpu\" is not a rule"),
        (
            alert("when = \"error_ratio\"\nabove = 0.1\nqueue = \"jobs\""),
            "alerts.x.queue",
            9,
            "does not apply",
        ),
        (
            alert("when = \"error_ratio\"\nabove = 0.1\nservice = \"web\""),
            "alerts.x.service",
            9,
            "no service or worker pool is named `web`",
        ),
        (alert("when = \"error_ratio\"\nabove = 5"), "alerts.x.above", 8, "a share from 0"),
        (alert("when = \"error_ratio\""), "alerts.x.above", 6, "missing: the share of answers"),
        (alert("when = \"p99\"\nabove = 250"), "alerts.x.above", 8, "a duration with a unit"),
        (alert("when = \"p99\"\nabove = \"1s\"\nwindow = \"1h\""), "alerts.x.window", 9, "at most 15m"),
        (alert("when = \"at_max\"\nabove = 1"), "alerts.x.above", 8, "does not apply"),
        (alert("when = \"crash_loop\"\nseverity = \"page\""), "alerts.x.severity", 8, "not a severity"),
        (alert("when = \"certificate_expiry\""), "alerts.x.when", 7, "no `tls`"),
        (alert("when = \"dead_letters\"\nabove = -1"), "alerts.x.above", 8, "a whole number"),
        (
            format!("{GOOD_SERVICE}\n[alerting]\nwebhooks = [{{ url = \"ftp://x\" }}]\n"),
            "alerting.webhooks[0].url",
            7,
            "an http:// or https:// URL",
        ),
        (
            format!(
                "{GOOD_SERVICE}\n[alerting]\nwebhooks = [{{ url = \"http://x\", format = \"slack\" }}]\n"
            ),
            "alerting.webhooks[0].format",
            7,
            "not a format",
        ),
        (
            format!("[gateway]\naccess_log_format = \"json\"\n{GOOD_SERVICE}"),
            "gateway.access_log_format",
            2,
            "needs `gateway.access_log`",
        ),
        (
            format!("[gateway]\naccess_log = \"stdout\"\naccess_log_format = \"apache\"\n{GOOD_SERVICE}"),
            "gateway.access_log_format",
            3,
            "not a format",
        ),
    ];
    for (source, key, line, words) in cases {
        assert_single(&source, key, line, words);
    }
}
