//! `[alerts.NAME]`, `[alerting]` and the gateway's access log.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::Validator;
use crate::model::{
    AccessLogConfig, AccessLogFormat, AccessLogTarget, AlertConfig, AlertRule, AlertingConfig, Severity,
    WebhookConfig, WebhookFormat,
};
use crate::raw::{self, RawAlert, RawAlerting};

/// The longest window a rule may average over: what the dashboard keeps in memory.
const LONGEST_WINDOW: Duration = Duration::from_secs(15 * 60);
const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
const KINDS: &str = "\"error_ratio\", \"p99\", \"at_max\", \"crash_loop\", \"ejected\", \"queue_age\", \
                     \"dead_letters\", \"rate_limited\" or \"certificate_expiry\"";

/// What the rules may name.
pub(super) struct Subjects<'a> {
    pub pools: Vec<&'a str>,
    pub queues: Vec<&'a str>,
    pub https: bool,
}

impl Validator<'_> {
    pub(super) fn alerts(
        &mut self,
        raw: BTreeMap<String, Spanned<RawAlert>>,
        subjects: &Subjects<'_>,
    ) -> Vec<AlertConfig> {
        let mut alerts: Vec<_> = raw.into_iter().collect();
        alerts.sort_by_key(|(_, alert)| alert.span().start);
        alerts.into_iter().filter_map(|(name, alert)| self.alert(name, alert, subjects)).collect()
    }

    fn alert(
        &mut self,
        name: String,
        raw: Spanned<RawAlert>,
        subjects: &Subjects<'_>,
    ) -> Option<AlertConfig> {
        let errors_before = self.errors.len();
        let key = format!("alerts.{name}");
        let span = raw.span();
        self.name(&name, span.clone(), &key, "alert");
        let site = self.site(span.clone(), key.clone());
        let raw = raw.into_inner();
        let Some(when) = raw.when.as_ref() else {
            self.error(span, format!("{key}.when"), format!("missing: say what to watch, one of {KINDS}"));
            return None;
        };
        let kind = when.get_ref().as_str();
        let service_rule =
            matches!(kind, "error_ratio" | "p99" | "at_max" | "crash_loop" | "ejected" | "rate_limited");
        let queue_rule = matches!(kind, "queue_age" | "dead_letters");
        if !service_rule && !queue_rule && kind != "certificate_expiry" {
            self.error(
                when.span(),
                format!("{key}.when"),
                format!("\"{kind}\" is not a rule: one of {KINDS}"),
            );
            return None;
        }
        // Keys that mean nothing to this rule are mistakes, not silently ignored settings.
        let windowed = matches!(kind, "error_ratio" | "p99" | "rate_limited");
        let takes_above = !matches!(kind, "at_max" | "crash_loop" | "certificate_expiry");
        let misplaced = [
            ("service", raw.service.as_ref().map(Spanned::span), service_rule),
            ("queue", raw.queue.as_ref().map(Spanned::span), queue_rule),
            ("window", raw.window.as_ref().map(Spanned::span), windowed),
            ("above", raw.above.as_ref().map(Spanned::span), takes_above),
            ("within", raw.within.as_ref().map(Spanned::span), kind == "certificate_expiry"),
        ];
        for (field, span, applies) in misplaced {
            if let (Some(span), false) = (span, applies) {
                self.error(span, format!("{key}.{field}"), format!("does not apply to when = \"{kind}\""));
            }
        }
        let service = raw.service.filter(|_| service_rule).and_then(|service| {
            if subjects.pools.contains(&service.get_ref().as_str()) {
                return Some(service.into_inner());
            }
            let known = subjects.pools.join(", ");
            self.error(
                service.span(),
                format!("{key}.service"),
                format!("no service or worker pool is named `{}` (defined: {known})", service.get_ref()),
            );
            None
        });
        let queue = raw.queue.filter(|_| queue_rule).and_then(|queue| {
            if subjects.queues.contains(&queue.get_ref().as_str()) {
                return Some(queue.into_inner());
            }
            self.error(
                queue.span(),
                format!("{key}.queue"),
                format!("no queue is named `{}`", queue.get_ref()),
            );
            None
        });
        let window = match raw.window {
            Some(window) if window.get_ref().0 > LONGEST_WINDOW => {
                self.error(window.span(), format!("{key}.window"), "can be at most 15m");
                DEFAULT_WINDOW
            }
            window => self.duration(window, format!("{key}.window"), DEFAULT_WINDOW),
        };
        let above = raw.above;
        let above_key = format!("{key}.above");
        let rule = match kind {
            "error_ratio" => {
                let above = self.ratio(above, &above_key, span.clone());
                AlertRule::ErrorRatio { service, above, window }
            }
            "p99" => {
                let above = self.above_duration(above, &above_key, span.clone(), "\"250ms\"");
                AlertRule::Latency { service, above, window }
            }
            "at_max" => AlertRule::AtMax { service },
            "crash_loop" => AlertRule::CrashLoop { service },
            "ejected" => AlertRule::Ejected { service, above: self.count(above, &above_key) },
            "queue_age" => {
                let above = self.above_duration(above, &above_key, span.clone(), "\"5m\"");
                AlertRule::QueueAge { queue, above }
            }
            "dead_letters" => AlertRule::DeadLetters { queue, above: self.count(above, &above_key) },
            "rate_limited" => {
                let above = match above {
                    None => 0.0,
                    Some(value) => match value
                        .get_ref()
                        .as_float()
                        .or(value.get_ref().as_integer().map(|n| n as f64))
                    {
                        Some(rate) if rate >= 0.0 && rate.is_finite() => rate,
                        _ => {
                            self.error(value.span(), above_key, "a number of refusals per second, such as 5");
                            0.0
                        }
                    },
                };
                AlertRule::RateLimited { service, above, window }
            }
            _ => {
                if !subjects.https {
                    self.error(
                        when.span(),
                        format!("{key}.when"),
                        "there is no certificate to watch: the gateway has no `tls` (gateway.listen_tls)",
                    );
                }
                let within =
                    self.duration(raw.within, format!("{key}.within"), Duration::from_secs(14 * 86_400));
                AlertRule::CertificateExpiry { within }
            }
        };
        let for_ = match raw.for_ {
            Some(d) => d.into_inner().0,
            None => Duration::ZERO,
        };
        let severity = match raw.severity {
            None => Severity::default(),
            Some(severity) => match severity.get_ref().as_str() {
                "critical" => Severity::Critical,
                "warning" => Severity::Warning,
                "info" => Severity::Info,
                other => {
                    self.error(
                        severity.span(),
                        format!("{key}.severity"),
                        format!("\"{other}\" is not a severity: \"critical\", \"warning\" (the default) or \"info\""),
                    );
                    Severity::default()
                }
            },
        };
        (self.errors.len() == errors_before).then_some(AlertConfig {
            name,
            site,
            rule,
            for_,
            severity,
            summary: raw.summary,
        })
    }

    fn ratio(&mut self, above: Option<Spanned<toml::Value>>, key: &str, rule: std::ops::Range<usize>) -> f64 {
        let Some(value) = above else {
            self.error(rule, key, "missing: the share of answers that are errors, such as 0.05 for 5%");
            return 0.0;
        };
        match value.get_ref().as_float().or(value.get_ref().as_integer().map(|n| n as f64)) {
            Some(ratio) if (0.0..1.0).contains(&ratio) => ratio,
            _ => {
                self.error(value.span(), key, "a share from 0 up to (not including) 1, such as 0.05 for 5%");
                0.0
            }
        }
    }

    fn above_duration(
        &mut self,
        above: Option<Spanned<toml::Value>>,
        key: &str,
        rule: std::ops::Range<usize>,
        example: &str,
    ) -> Duration {
        let Some(value) = above else {
            self.error(rule, key, format!("missing: a duration such as {example}"));
            return Duration::ZERO;
        };
        match value.get_ref().as_str().map(raw::parse_duration) {
            Some(Ok(duration)) => duration,
            Some(Err(why)) => {
                self.error(value.span(), key, why);
                Duration::ZERO
            }
            None => {
                self.error(value.span(), key, format!("a duration with a unit, such as {example}"));
                Duration::ZERO
            }
        }
    }

    fn count(&mut self, above: Option<Spanned<toml::Value>>, key: &str) -> u64 {
        let Some(value) = above else { return 0 };
        match value.get_ref().as_integer().and_then(|n| u64::try_from(n).ok()) {
            Some(count) => count,
            None => {
                self.error(value.span(), key, "a whole number, 0 or more (the alert fires above it)");
                0
            }
        }
    }

    pub(super) fn alerting(&mut self, raw: RawAlerting) -> AlertingConfig {
        let repeat = self.duration(raw.repeat, "alerting.repeat".into(), Duration::from_secs(60));
        let webhooks = raw
            .webhooks
            .into_iter()
            .enumerate()
            .filter_map(|(i, hook)| {
                let key = format!("alerting.webhooks[{i}]");
                let span = hook.span();
                let hook = hook.into_inner();
                let timeout = self.duration(hook.timeout, format!("{key}.timeout"), Duration::from_secs(5));
                let format = match hook.format {
                    None => WebhookFormat::Alertmanager,
                    Some(format) => match format.get_ref().as_str() {
                        "alertmanager" => WebhookFormat::Alertmanager,
                        "json" => WebhookFormat::Json,
                        other => {
                            self.error(
                                format.span(),
                                format!("{key}.format"),
                                format!("\"{other}\" is not a format: \"alertmanager\" (the default) or \"json\""),
                            );
                            return None;
                        }
                    },
                };
                let Some(url) = hook.url else {
                    self.error(span, format!("{key}.url"), "missing: where to POST, such as \"http://127.0.0.1:9093/api/v2/alerts\"");
                    return None;
                };
                match url.get_ref().parse::<http::Uri>() {
                    Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() => {
                        Some(WebhookConfig { url: uri, format, timeout })
                    }
                    _ => {
                        self.error(
                            url.span(),
                            format!("{key}.url"),
                            "an http:// or https:// URL, such as \"http://127.0.0.1:9093/api/v2/alerts\"",
                        );
                        None
                    }
                }
            })
            .collect();
        AlertingConfig { webhooks, repeat }
    }

    pub(super) fn access_log(
        &mut self,
        target: Option<Spanned<String>>,
        format: Option<Spanned<String>>,
    ) -> Option<AccessLogConfig> {
        let format_span = format.as_ref().map(Spanned::span);
        let format = match &format {
            None => AccessLogFormat::Json,
            Some(format) => match format.get_ref().as_str() {
                "json" => AccessLogFormat::Json,
                "combined" => AccessLogFormat::Combined,
                other => {
                    self.error(
                        format.span(),
                        "gateway.access_log_format",
                        format!("\"{other}\" is not a format: \"json\" (the default) or \"combined\""),
                    );
                    AccessLogFormat::Json
                }
            },
        };
        let Some(target) = target else {
            if let Some(span) = format_span {
                self.error(
                    span,
                    "gateway.access_log_format",
                    "needs `gateway.access_log` (\"stdout\" or a path)",
                );
            }
            return None;
        };
        let target = match target.get_ref().as_str() {
            "" => {
                self.error(target.span(), "gateway.access_log", "\"stdout\", or a file's path");
                return None;
            }
            "off" => return None,
            "stdout" => AccessLogTarget::Stdout,
            path => AccessLogTarget::File(self.file.parent().unwrap_or(Path::new(".")).join(path)),
        };
        Some(AccessLogConfig { target, format })
    }
}
