//! Telling webhooks about alerts: each firing and each resolution is POSTed to every
//! `[alerting] webhooks` entry, as Alertmanager's `POST /api/v2/alerts` takes it (an array of
//! alerts with labels, annotations, `startsAt` and `endsAt`) or as one plain JSON object.
//! Alertmanager forgets an alert it has not heard of for a while, so firing alerts go to it
//! again every `alerting.repeat`, as Prometheus resends them.
//!
//! Sending happens in a task of its own, off the observer's tick: a slow or dead receiver
//! delays only other notices, each try bounded by the webhook's timeout, three tries each.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Uri};
use http_body_util::Full;
use serde_json::{json, Value};
use surge_config::{AlertingConfig, WebhookConfig, WebhookFormat};
use surge_metrics::{Counter, Family, Metrics};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::alerts::{Change, Subject};

/// Notices waiting to be sent at most; past it they are dropped (and counted), never piled up.
const BACKLOG: usize = 1024;
const TRIES: u32 = 3;

/// An alert that fired or resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub alert: String,
    pub severity: &'static str,
    pub subject: Subject,
    pub change: Change,
    pub summary: String,
    pub value: f64,
    pub starts_ms: u64,
    /// When it resolved.
    pub ends_ms: Option<u64>,
}

enum Message {
    Notice(Notice),
    Configure(AlertingConfig),
}

/// The sending task's mailbox.
#[derive(Clone)]
pub struct Notifier {
    messages: mpsc::Sender<Message>,
    dropped: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

impl Notifier {
    /// Starts the task; `source` is the URL alerts link back to (the dashboard).
    pub fn spawn(alerting: AlertingConfig, source: String, metrics: &Metrics) -> Notifier {
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        metrics.register(|registry| {
            registry.register(
                "alert_notifications",
                "Alert notices for webhooks: sent, failed (after every try) or dropped (too many waiting)",
                outcomes.clone(),
            )
        });
        let count = |outcome| outcomes.get_or_create(&OutcomeLabels { outcome }).clone();
        let (messages, inbox) = mpsc::channel(BACKLOG);
        let sender = Sender { alerting, source, tls: None, sent: count("sent"), failed: count("failed") };
        tokio::spawn(sender.run(inbox));
        Notifier { messages, dropped: count("dropped") }
    }

    pub fn notify(&self, notice: Notice) {
        if self.messages.try_send(Message::Notice(notice)).is_err() {
            self.dropped.inc();
        }
    }

    pub fn configure(&self, alerting: AlertingConfig) {
        if self.messages.try_send(Message::Configure(alerting)).is_err() {
            tracing::warn!("alerting settings not taken: too many alert notices are waiting");
        }
    }
}

struct Sender {
    alerting: AlertingConfig,
    source: String,
    /// For https webhooks: the system's roots, read at the first.
    tls: Option<Arc<surge_tls::UpstreamTls>>,
    sent: Counter,
    failed: Counter,
}

impl Sender {
    async fn run(mut self, mut inbox: mpsc::Receiver<Message>) {
        let mut firing: BTreeMap<(String, Subject), Notice> = BTreeMap::new();
        let mut repeat = tokio::time::interval(self.alerting.repeat);
        repeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        repeat.tick().await;
        loop {
            tokio::select! {
                message = inbox.recv() => match message {
                    None => return,
                    Some(Message::Configure(alerting)) => {
                        if alerting.repeat != self.alerting.repeat {
                            repeat = tokio::time::interval(alerting.repeat);
                            repeat.tick().await;
                        }
                        self.alerting = alerting;
                    }
                    Some(Message::Notice(notice)) => {
                        let key = (notice.alert.clone(), notice.subject.clone());
                        match notice.change {
                            Change::Fired => firing.insert(key, notice.clone()),
                            Change::Resolved => firing.remove(&key),
                        };
                        self.send(std::slice::from_ref(&notice), true).await;
                    }
                },
                _ = repeat.tick(), if !firing.is_empty() => {
                    let again: Vec<Notice> = firing.values().cloned().collect();
                    self.send(&again, false).await;
                }
            }
        }
    }

    /// Sends `notices` to every webhook; plain JSON ones only hear of changes, not repeats.
    async fn send(&mut self, notices: &[Notice], change: bool) {
        for webhook in self.alerting.webhooks.clone() {
            let body = match webhook.format {
                WebhookFormat::Alertmanager => {
                    let alerts: Vec<Value> =
                        notices.iter().map(|n| alertmanager(n, self.alerting.repeat, &self.source)).collect();
                    vec![Value::Array(alerts)]
                }
                WebhookFormat::Json if change => notices.iter().map(|n| plain(n, &self.source)).collect(),
                WebhookFormat::Json => continue,
            };
            for body in body {
                let body = Bytes::from(body.to_string());
                match self.post(&webhook, body).await {
                    Ok(()) => {
                        self.sent.inc();
                    }
                    Err(why) => {
                        self.failed.inc();
                        tracing::warn!("alert notice not delivered to {}: {why}", webhook.url);
                    }
                }
            }
        }
    }

    async fn post(&mut self, webhook: &WebhookConfig, body: Bytes) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
            }
            match tokio::time::timeout(webhook.timeout, self.post_once(&webhook.url, body.clone())).await {
                Ok(Ok(status)) if status.is_success() => return Ok(()),
                // A receiver that refuses the notice will refuse it again.
                Ok(Ok(status)) if status.is_client_error() => return Err(format!("answered {status}")),
                Ok(Ok(status)) => last = format!("answered {status}"),
                Ok(Err(why)) => last = why,
                Err(_) => last = format!("no answer within {}", humantime::format_duration(webhook.timeout)),
            }
        }
        Err(format!("{last} ({TRIES} tries)"))
    }

    async fn post_once(&mut self, url: &Uri, body: Bytes) -> Result<http::StatusCode, String> {
        let host = url.host().ok_or("the URL has no host")?;
        let https = url.scheme_str() == Some("https");
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let target = url.path_and_query().map_or("/", |p| p.as_str());
        let authority = url.authority().map_or(host, |a| a.as_str());
        let request = Request::builder()
            .method(Method::POST)
            .uri(target)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, concat!("surge/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|err| err.to_string())?;
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|err| format!("cannot connect: {err}"))?;
        if !https {
            return exchange(tcp, request).await;
        }
        let tls = match &self.tls {
            Some(tls) => Arc::clone(tls),
            None => {
                let settings = surge_config::UpstreamTlsConfig {
                    ca: None,
                    server_name: None,
                    client_certificate: None,
                    site: surge_config::Site {
                        key: "alerting.webhooks".into(),
                        ..surge_config::Site::file(std::path::Path::new("surge.toml"))
                    },
                };
                let tls = surge_tls::UpstreamTls::load(&settings).map_err(|errors| errors.to_string())?;
                self.tls = Some(Arc::clone(&tls));
                tls
            }
        };
        let stream = tls.connect(tcp, host).await.map_err(|err| err.to_string())?;
        exchange(stream, request).await
    }
}

/// One request on a new HTTP/1.1 connection; its answer's status.
async fn exchange<S>(stream: S, request: Request<Full<Bytes>>) -> Result<http::StatusCode, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(io).await.map_err(|err| format!("HTTP handshake: {err}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(request).await.map_err(|err| format!("no answer: {err}"))?;
    Ok(response.status())
}

fn labels(notice: &Notice) -> serde_json::Map<String, Value> {
    let mut labels = serde_json::Map::new();
    labels.insert("alertname".into(), notice.alert.clone().into());
    labels.insert("severity".into(), notice.severity.into());
    labels.insert("source".into(), "surge".into());
    let (key, value) = match &notice.subject {
        Subject::Service(name) => ("service", name),
        Subject::Queue(name) => ("queue", name),
        Subject::Certificate(file) => ("certificate", file),
    };
    labels.insert(key.into(), value.clone().into());
    labels
}

/// One alert as Alertmanager's API v2 takes it. A firing one ends, unless heard of again,
/// four repeats from now (Prometheus' rule); a resolved one ended when it resolved.
fn alertmanager(notice: &Notice, repeat: Duration, source: &str) -> Value {
    let ends_ms = notice.ends_ms.unwrap_or_else(|| now_ms() + 4 * crate::windows::duration_ms(repeat));
    json!({
        "labels": labels(notice),
        "annotations": { "summary": notice.summary, "value": notice.value.to_string() },
        "startsAt": rfc3339(notice.starts_ms),
        "endsAt": rfc3339(ends_ms),
        "generatorURL": source,
    })
}

fn plain(notice: &Notice, source: &str) -> Value {
    json!({
        "alert": notice.alert,
        "status": match notice.change { Change::Fired => "firing", Change::Resolved => "resolved" },
        "severity": notice.severity,
        "labels": labels(notice),
        "summary": notice.summary,
        "value": notice.value,
        "starts_at": rfc3339(notice.starts_ms),
        "ends_at": notice.ends_ms.map(rfc3339),
        "source": source,
    })
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, crate::windows::duration_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alertmanager_alerts_carry_labels_and_their_times() {
        let notice = Notice {
            alert: "api_errors".into(),
            severity: "critical",
            subject: Subject::Service("api".into()),
            change: Change::Resolved,
            summary: "50.0% of api's answers were errors".into(),
            value: 0.5,
            starts_ms: 1_000,
            ends_ms: Some(61_000),
        };
        let alert = alertmanager(&notice, Duration::from_secs(60), "http://127.0.0.1:9900/");
        assert_eq!(alert["labels"]["alertname"], "api_errors");
        assert_eq!(alert["labels"]["service"], "api");
        assert_eq!(alert["labels"]["severity"], "critical");
        assert_eq!(alert["startsAt"], "1970-01-01T00:00:01.000Z");
        assert_eq!(alert["endsAt"], "1970-01-01T00:01:01.000Z");
        assert_eq!(alert["annotations"]["summary"], notice.summary);
        let firing = Notice { change: Change::Fired, ends_ms: None, ..notice };
        let ends = alertmanager(&firing, Duration::from_secs(60), "")["endsAt"].as_str().map(str::to_owned);
        let ends = humantime::parse_rfc3339(&ends.unwrap_or_default()).expect("a time");
        let ahead = ends.duration_since(SystemTime::now()).unwrap_or_default();
        assert!(ahead > Duration::from_secs(200), "a firing alert stays active for four repeats");
        assert_eq!(plain(&firing, "")["status"], "firing");
    }
}
