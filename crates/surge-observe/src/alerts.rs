//! Alert rules as pure functions: what a rule finds in one look ([`evaluate`]), and how an
//! alert moves between inactive, pending and firing as looks come ([`step`]), the way
//! Prometheus' rules do: a condition must hold for the rule's `for` before the alert fires,
//! and an alert resolves at the first look where it no longer holds.

use std::time::Duration;

use surge_config::AlertRule;

use crate::sample::{AlertState, Sample};
use crate::windows::Windows;

/// What an alert is about: a rule applies to every service (or queue) it names, each an alert
/// of its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subject {
    Service(String),
    Queue(String),
    /// A certificate file of the HTTPS listener.
    Certificate(String),
}

/// One subject as a rule saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub subject: Subject,
    pub holds: bool,
    pub value: f64,
    /// The condition in words, for the log, the dashboard and the webhooks.
    pub text: String,
}

/// What alerts look at, beside the sample: request windows and certificate expiries.
pub struct Look<'a> {
    pub sample: &'a Sample,
    pub windows: &'a Windows,
    /// Each certificate file and the seconds until it expires (negative: expired).
    pub certificates: &'a [(String, i64)],
}

/// Every subject `rule` applies to, and whether its condition holds. Subjects without data
/// (no requests within the window) are left out: an alert on them resolves.
pub fn evaluate(rule: &AlertRule, look: &Look<'_>) -> Vec<Finding> {
    let pools = |service: &Option<String>| named(&look.sample.services, service, |pool| &pool.status.service);
    let queues = |queue: &Option<String>| named(&look.sample.queues, queue, |q| &q.status.queue);
    let finding =
        |subject: Subject, holds: bool, value: f64, text: String| Finding { subject, holds, value, text };
    match rule {
        AlertRule::ErrorRatio { service, above, window } => pools(service)
            .into_iter()
            .filter_map(|pool| {
                let name = &pool.status.service;
                let ratio = look.windows.over(name, *window)?.error_ratio()?;
                let text = format!(
                    "{:.1}% of {name}'s answers were errors over {} (above {:.1}%)",
                    ratio * 100.0,
                    human(*window),
                    above * 100.0
                );
                Some(finding(Subject::Service(name.clone()), ratio > *above, ratio, text))
            })
            .collect(),
        AlertRule::Latency { service, above, window } => pools(service)
            .into_iter()
            .filter_map(|pool| {
                let name = &pool.status.service;
                let p99 = look.windows.over(name, *window)?.counts.latency.quantile(0.99)?;
                let text = format!(
                    "p99 latency of {name} is {} ms over {} (above {} ms)",
                    p99.as_millis(),
                    human(*window),
                    above.as_millis()
                );
                Some(finding(Subject::Service(name.clone()), p99 > *above, p99.as_secs_f64(), text))
            })
            .collect(),
        AlertRule::AtMax { service } => pools(service)
            .into_iter()
            .filter(|pool| pool.status.autoscale.is_some())
            .map(|pool| {
                let (name, desired, max) = (&pool.status.service, pool.status.desired, pool.status.max);
                let text = format!("{name} wants {desired} of its at most {max} instances");
                finding(Subject::Service(name.clone()), desired >= max, f64::from(desired), text)
            })
            .collect(),
        AlertRule::CrashLoop { service } => pools(service)
            .into_iter()
            .map(|pool| {
                let (name, failures) = (&pool.status.service, pool.status.failures);
                let text = format!("{name} is crash-looping: {failures} failed starts in a row");
                finding(Subject::Service(name.clone()), pool.status.crash_looping, f64::from(failures), text)
            })
            .collect(),
        AlertRule::Ejected { service, above } => pools(service)
            .into_iter()
            .map(|pool| {
                let name = &pool.status.service;
                let ejected = pool.status.instances.iter().filter(|instance| instance.ejected).count() as u64;
                let text = format!("{ejected} of {name}'s instances are ejected by their circuit breaker");
                finding(Subject::Service(name.clone()), ejected > *above, ejected as f64, text)
            })
            .collect(),
        AlertRule::RateLimited { service, above, window } => pools(service)
            .into_iter()
            .filter_map(|pool| {
                let name = &pool.status.service;
                let span = look.windows.over(name, *window)?;
                let rate = span.per_second(span.counts.rate_limited);
                let text = format!(
                    "{rate:.1} requests/s to {name} refused by rate limits over {} (above {above})",
                    human(*window)
                );
                Some(finding(Subject::Service(name.clone()), rate > *above, rate, text))
            })
            .collect(),
        AlertRule::QueueAge { queue, above } => queues(queue)
            .into_iter()
            .map(|q| {
                let age = q.status.oldest_age_seconds.unwrap_or(0.0);
                let text = format!(
                    "the oldest message of queue {} has waited {} (above {})",
                    q.status.queue,
                    human(Duration::from_secs_f64(age.max(0.0))),
                    human(*above)
                );
                finding(Subject::Queue(q.status.queue.clone()), age > above.as_secs_f64(), age, text)
            })
            .collect(),
        AlertRule::DeadLetters { queue, above } => queues(queue)
            .into_iter()
            .map(|q| {
                let dead = q.status.dead;
                let text = format!("queue {} holds {dead} dead letters (above {above})", q.status.queue);
                finding(Subject::Queue(q.status.queue.clone()), dead > *above, dead as f64, text)
            })
            .collect(),
        AlertRule::CertificateExpiry { within } => look
            .certificates
            .iter()
            .map(|(file, seconds_left)| {
                let text = if *seconds_left < 0 {
                    format!("the certificate {file} has expired")
                } else {
                    let left = Duration::from_secs(seconds_left.unsigned_abs());
                    format!("the certificate {file} expires in {}", human(left))
                };
                let holds = *seconds_left < i64::try_from(within.as_secs()).unwrap_or(i64::MAX);
                finding(Subject::Certificate(file.clone()), holds, *seconds_left as f64, text)
            })
            .collect(),
    }
}

/// The items called `name`, or all of them.
fn named<'a, T>(items: &'a [T], name: &Option<String>, name_of: fn(&T) -> &String) -> Vec<&'a T> {
    items.iter().filter(|item| name.as_ref().is_none_or(|name| name == name_of(item))).collect()
}

/// Where an alert stands between looks; no phase: inactive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    pub state: AlertState,
    pub since_ms: u64,
}

/// What a look changed, to be told: the log, the webhooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Fired,
    Resolved,
}

/// An alert's next phase after a look at `now_ms` found its condition holding or not.
pub fn step(
    phase: Option<Phase>,
    holds: bool,
    now_ms: u64,
    for_: Duration,
) -> (Option<Phase>, Option<Change>) {
    let for_ms = u64::try_from(for_.as_millis()).unwrap_or(u64::MAX);
    let firing = Some(Phase { state: AlertState::Firing, since_ms: now_ms });
    match (phase, holds) {
        (None, false) => (None, None),
        (None, true) if for_ms == 0 => (firing, Some(Change::Fired)),
        (None, true) => (Some(Phase { state: AlertState::Pending, since_ms: now_ms }), None),
        (Some(Phase { state: AlertState::Pending, since_ms }), true)
            if now_ms.saturating_sub(since_ms) >= for_ms =>
        {
            (firing, Some(Change::Fired))
        }
        (Some(phase), true) => (Some(phase), None),
        (Some(Phase { state: AlertState::Pending, .. }), false) => (None, None),
        (Some(Phase { state: AlertState::Firing, .. }), false) => (None, Some(Change::Resolved)),
    }
}

/// "90s" as "1m 30s".
fn human(duration: Duration) -> String {
    humantime::format_duration(Duration::from_secs(duration.as_secs().max(1))).to_string()
}

#[cfg(test)]
mod tests {
    use surge_config::AlertRule;
    use surge_pool::{InstanceState, InstanceStatus, PoolStatus};

    use super::*;
    use crate::sample::{PoolKind, ServiceSample, TrafficRates};
    use crate::windows::Counts;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn an_alert_fires_after_holding_for_its_for_and_resolves_at_once() {
        let for_ = Duration::from_secs(30);
        let (mut phase, mut changes) = (None, Vec::new());
        // Holds from 10 s to 60 s, with a gap at 20 s that restarts the wait.
        for second in 0..=70u64 {
            let holds = (10..=60).contains(&second) && second != 20;
            let (next, change) = step(phase, holds, second * 1000, for_);
            phase = next;
            changes.extend(change.map(|change| (second, change)));
        }
        assert_eq!(changes, [(51, Change::Fired), (61, Change::Resolved)]);
        assert_eq!(phase, None);
    }

    #[test]
    fn with_no_for_an_alert_fires_on_the_first_look_and_pending_ones_leave_quietly() {
        assert_eq!(
            step(None, true, 5, Duration::ZERO),
            (Some(Phase { state: AlertState::Firing, since_ms: 5 }), Some(Change::Fired))
        );
        let pending = Some(Phase { state: AlertState::Pending, since_ms: 0 });
        assert_eq!(step(pending, false, 1000, MINUTE), (None, None), "never fired, so nothing resolves");
        let firing = Some(Phase { state: AlertState::Firing, since_ms: 7 });
        assert_eq!(step(firing, true, 9000, MINUTE), (firing, None), "keeps the time it began firing");
    }

    fn pool(name: &str, desired: u32, max: u32, autoscaled: bool, ejected: &[bool]) -> ServiceSample {
        let instances = ejected
            .iter()
            .enumerate()
            .map(|(i, &ejected)| InstanceStatus {
                id: format!("{name}-{i}"),
                pid: None,
                port: 1,
                address: ([127, 0, 0, 1], 1).into(),
                weight: 1,
                state: InstanceState::Ready,
                in_flight: 0,
                served: 0,
                ejected,
                ejections: u32::from(ejected),
                uptime_ms: 0,
            })
            .collect();
        let autoscale = autoscaled.then(|| surge_pool::AutoscaleStatus {
            metric: "concurrency".into(),
            target: 10.0,
            panic: false,
            reason: String::new(),
            concurrency: 0.0,
            rps: 0.0,
            latency_p95_ms: None,
            cpu: 0.0,
        });
        ServiceSample {
            kind: PoolKind::Service,
            status: PoolStatus {
                service: name.into(),
                desired,
                min: 1,
                max,
                balance: "least_conn".into(),
                failures: 0,
                crash_looping: false,
                restarts: 0,
                autoscale,
                instances,
            },
            traffic: TrafficRates::default(),
        }
    }

    fn holding(rule: &AlertRule, look: &Look<'_>) -> Vec<(Subject, bool)> {
        evaluate(rule, look).into_iter().map(|f| (f.subject, f.holds)).collect()
    }

    #[test]
    fn service_rules_apply_to_each_named_or_every_pool() {
        let sample = Sample {
            services: vec![pool("api", 8, 8, true, &[true, false]), pool("web", 2, 8, true, &[false])],
            ..Sample::default()
        };
        let mut windows = Windows::new(MINUTE);
        for (second, api_errors, web_errors) in [(0, 0, 0), (30, 50, 1), (60, 80, 2)] {
            let counts = |errors| Counts { requests: second * 10, errors, ..Counts::default() };
            windows.record(second * 1000, "api", counts(api_errors));
            windows.record(second * 1000, "web", counts(web_errors));
        }
        let look = Look { sample: &sample, windows: &windows, certificates: &[] };
        let api = Subject::Service("api".into());
        let web = Subject::Service("web".into());
        let ratio = AlertRule::ErrorRatio { service: None, above: 0.05, window: MINUTE };
        assert_eq!(holding(&ratio, &look), [(api.clone(), true), (web.clone(), false)], "80/600 and 2/600");
        let findings = evaluate(&ratio, &look);
        assert!((findings[0].value - 80.0 / 600.0).abs() < 1e-9);
        assert!(findings[0].text.contains("13.3% of api's answers"), "{}", findings[0].text);
        let named = AlertRule::ErrorRatio { service: Some("web".into()), above: 0.001, window: MINUTE };
        assert_eq!(holding(&named, &look), [(web.clone(), true)]);
        let at_max = AlertRule::AtMax { service: None };
        assert_eq!(holding(&at_max, &look), [(api.clone(), true), (web.clone(), false)]);
        let ejected = AlertRule::Ejected { service: None, above: 0 };
        assert_eq!(holding(&ejected, &look), [(api, true), (web, false)]);
    }

    #[test]
    fn a_window_without_answers_finds_nothing() {
        let sample = Sample { services: vec![pool("api", 1, 2, false, &[])], ..Sample::default() };
        let mut windows = Windows::new(MINUTE);
        windows.record(0, "api", Counts::default());
        windows.record(1000, "api", Counts::default());
        let look = Look { sample: &sample, windows: &windows, certificates: &[] };
        let ratio = AlertRule::ErrorRatio { service: None, above: 0.0, window: MINUTE };
        assert_eq!(evaluate(&ratio, &look), []);
        let p99 = AlertRule::Latency { service: None, above: Duration::from_millis(1), window: MINUTE };
        assert_eq!(evaluate(&p99, &look), []);
        assert_eq!(evaluate(&AlertRule::AtMax { service: None }, &look), [], "not autoscaled");
    }

    #[test]
    fn p99_queue_and_certificate_rules() {
        let sample = Sample { services: vec![pool("api", 1, 2, false, &[])], ..Sample::default() };
        let latency = surge_metrics::LatencyHistogram::default();
        let mut windows = Windows::new(MINUTE);
        windows.record(0, "api", Counts { latency: latency.read(), ..Counts::default() });
        for ms in 1..=100 {
            latency.record(Duration::from_millis(ms * 5));
        }
        windows.record(10_000, "api", Counts { latency: latency.read(), ..Counts::default() });
        let certificates = [("a.pem".to_owned(), 3 * 86_400), ("b.pem".to_owned(), 90 * 86_400)];
        let look = Look { sample: &sample, windows: &windows, certificates: &certificates };
        let slow = AlertRule::Latency { service: None, above: Duration::from_millis(400), window: MINUTE };
        assert_eq!(holding(&slow, &look), [(Subject::Service("api".into()), true)], "p99 is about 500 ms");
        let fine = AlertRule::Latency { service: None, above: Duration::from_secs(1), window: MINUTE };
        assert_eq!(holding(&fine, &look), [(Subject::Service("api".into()), false)]);
        let expiry = AlertRule::CertificateExpiry { within: Duration::from_secs(14 * 86_400) };
        assert_eq!(
            holding(&expiry, &look),
            [(Subject::Certificate("a.pem".into()), true), (Subject::Certificate("b.pem".into()), false)]
        );
        let queues = AlertRule::DeadLetters { queue: None, above: 0 };
        assert_eq!(evaluate(&queues, &look), [], "no queues");
    }
}
