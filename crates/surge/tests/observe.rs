//! Surge shows itself: alerts that fire and resolve at real webhooks, metrics that Prometheus'
//! own tools accept, the dashboard's data endpoints, draining one instance, request ids and
//! traces that reach instances and queued jobs, and the access log, also when its pipe stalls.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{send, Surge};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use tokio::sync::mpsc;

const WEB: &str =
    "[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\ninstances = { min = 1, max = 3, initial = 2 }\n";

/// A webhook receiver on loopback: every POST's path and JSON body, as they come.
async fn receiver() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<(String, serde_json::Value)>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (posts, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let posts = posts.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let posts = posts.clone();
                        async move {
                            let path = request.uri().path().to_owned();
                            let body =
                                request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                            let _ = posts.send((path, json));
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"{}")),
                            ))
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    (addr, received)
}

/// Requests to `path` from a task, until `stop`; `failing` picks `?status=500`.
fn traffic(surge: &Surge, failing: Arc<AtomicBool>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let (client, ok, bad) = (common::http_client(), surge.url("/work"), surge.url("/work?status=500"));
    tokio::spawn(async move {
        let mut sent = 0;
        while !stop.load(Ordering::SeqCst) {
            let url = if failing.load(Ordering::SeqCst) { &bad } else { &ok };
            let _ = send(&client, Method::GET, url, &[], Bytes::new()).await;
            sent += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sent
    })
}

async fn next_post(
    received: &mut mpsc::UnboundedReceiver<(String, serde_json::Value)>,
    what: &str,
    surge: &Surge,
) -> (String, serde_json::Value) {
    match tokio::time::timeout(Duration::from_secs(30), received.recv()).await {
        Ok(Some(post)) => post,
        _ => panic!("no webhook post ({what}) within 30 s\n{}", surge.log()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_service_fires_its_alert_and_resolves_at_both_webhooks() {
    let (hooks, mut received) = receiver().await;
    let alerts = format!(
        r#"{WEB}
[alerts.web_errors]
when = "error_ratio"
service = "web"
above = 0.5
window = "3s"
for = "2s"
severity = "critical"
summary = "web is failing"

[alerting]
webhooks = [
  {{ url = "http://{hooks}/api/v2/alerts" }},
  {{ url = "http://{hooks}/plain", format = "json" }},
]
"#
    );
    let surge = Surge::start(&alerts).await;
    let (failing, stop) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(false)));
    let load = traffic(&surge, Arc::clone(&failing), Arc::clone(&stop));

    // Both receivers hear of the firing, each in its own shape.
    let mut firing = Vec::new();
    while firing.len() < 2 {
        firing.push(next_post(&mut received, "firing", &surge).await);
    }
    firing.sort_by(|a, b| a.0.cmp(&b.0));
    let (path, alertmanager) = &firing[0];
    assert_eq!(path, "/api/v2/alerts");
    let alert = &alertmanager[0];
    assert_eq!(alert["labels"]["alertname"], "web_errors");
    assert_eq!(alert["labels"]["service"], "web");
    assert_eq!(alert["labels"]["severity"], "critical");
    assert!(alert["annotations"]["summary"].as_str().unwrap_or_default().starts_with("web is failing: "));
    let time = |value: &serde_json::Value| {
        humantime::parse_rfc3339(value.as_str().unwrap_or_default()).expect("a time")
    };
    assert!(time(&alert["endsAt"]) > SystemTime::now(), "a firing alert has not ended: {alert}");
    assert!(time(&alert["startsAt"]) <= SystemTime::now());
    let (path, plain) = &firing[1];
    assert_eq!(path, "/plain");
    assert_eq!(plain["status"], "firing");
    assert!(plain["value"].as_f64().unwrap_or_default() > 0.5, "{plain}");
    // While it fires, /status, the metrics and `surge status` say so.
    let firing_now = surge.sample().await.alerts;
    assert!(
        firing_now
            .iter()
            .any(|a| a.name == "web_errors" && a.state == surge_observe::sample::AlertState::Firing),
        "{firing_now:?}"
    );
    assert!(surge.metrics().await.contains(r#"surge_alerts_firing{alert="web_errors"} 1"#));
    let printed = surge.cli(&["status"]);
    assert!(String::from_utf8_lossy(&printed.stdout).contains("alert web_errors (critical) FIRING"));

    // Healthy again: it resolves, and says so to both.
    failing.store(false, Ordering::SeqCst);
    let (mut plain_resolved, mut alertmanager_resolved) = (false, false);
    while !(plain_resolved && alertmanager_resolved) {
        let (path, post) = next_post(&mut received, "resolved", &surge).await;
        match path.as_str() {
            "/plain" => {
                assert_eq!(post["status"], "resolved", "the plain hook hears only changes: {post}");
                plain_resolved = true;
            }
            // Alertmanager may hear the firing alert again before it resolves; resolved, it
            // has ended.
            _ => {
                assert_eq!(post[0]["labels"]["alertname"], "web_errors");
                alertmanager_resolved = time(&post[0]["endsAt"]) <= SystemTime::now();
            }
        }
    }
    assert!(surge.sample().await.alerts.is_empty());
    stop.store(true, Ordering::SeqCst);
    assert!(load.await.expect("load") > 0);
    assert!(surge.log().contains("alert web_errors (critical) firing"), "{}", surge.log());
    assert!(surge.log().contains("alert web_errors resolved"));
}

/// A real Alertmanager (Debian's prometheus-alertmanager) on a free port, stopped when dropped.
struct Alertmanager {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    async fn start() -> Alertmanager {
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(&config, "route:\n  receiver: nobody\nreceivers:\n  - name: nobody\n")
            .expect("config");
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.path().display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager runs (Debian's package; .ci/run installs it)");
        let alertmanager = Alertmanager { child, addr, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while alertmanager.alerts().await.is_none() {
            assert!(Instant::now() < deadline, "Alertmanager did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        alertmanager
    }

    /// The alerts it holds, as its API lists them.
    async fn alerts(&self) -> Option<Vec<serde_json::Value>> {
        let url = format!("http://{}/api/v2/alerts", self.addr);
        let answer = send(&common::http_client(), Method::GET, &url, &[], Bytes::new()).await.ok()?;
        (answer.status == StatusCode::OK).then(|| answer.json().as_array().cloned().unwrap_or_default())
    }

    /// Waits until its `web_errors` alert is in `state` ("active"), or gone or resolved.
    async fn wait(&self, active: bool, surge: &Surge) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let alerts = self.alerts().await.unwrap_or_default();
            let held = alerts.iter().any(|alert| {
                alert["labels"]["alertname"] == "web_errors" && alert["status"]["state"] == "active"
            });
            if held == active {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Alertmanager never had it active={active}: {alerts:?}\n{}",
                surge.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alertmanager_itself_takes_the_alerts() {
    let alertmanager = Alertmanager::start().await;
    let alerts = format!(
        "{WEB}\n[alerts.web_errors]\nwhen = \"error_ratio\"\nabove = 0.5\nwindow = \"2s\"\n\n\
         [alerting]\nwebhooks = [{{ url = \"http://{}/api/v2/alerts\" }}]\n",
        alertmanager.addr
    );
    let surge = Surge::start(&alerts).await;
    let (failing, stop) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicBool::new(false)));
    let load = traffic(&surge, Arc::clone(&failing), Arc::clone(&stop));
    alertmanager.wait(true, &surge).await;
    let held = alertmanager.alerts().await.unwrap_or_default();
    let alert = held.iter().find(|a| a["labels"]["alertname"] == "web_errors").expect("the alert");
    assert_eq!(alert["labels"]["service"], "web");
    assert_eq!(alert["labels"]["severity"], "warning");
    failing.store(false, Ordering::SeqCst);
    alertmanager.wait(false, &surge).await;
    stop.store(true, Ordering::SeqCst);
    let _ = load.await;
}

/// The metric names a file mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("surge_") {
        let name: String =
            text[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.clone(), |name, suffix| name.strip_suffix(suffix).map_or(name.clone(), str::to_owned));
        names.insert(family);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_tools_accept_the_metrics_and_the_shipped_rules_name_real_ones() {
    let services = format!(
        "{WEB}\n[queues.jobs]\n\n[workers.jobs]\ncommand = \"{{echo}}\"\nqueue = \"jobs\"\npath = \"/job\"\n\
         instances = {{ min = 1, max = 2 }}\n\n[alerts.slow]\nwhen = \"p99\"\nabove = \"2s\"\n"
    );
    let surge = Surge::start(&services).await;
    for _ in 0..20 {
        assert_eq!(surge.get("/x").await.status, StatusCode::OK);
    }
    let classic = surge.metrics().await;
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) runs");
    std::io::Write::write_all(&mut check.stdin.take().expect("stdin"), classic.as_bytes()).expect("write");
    let checked = check.wait_with_output().expect("promtool");
    assert!(
        checked.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // Prometheus asks for OpenMetrics and gets it.
    let url = format!("http://{}/metrics", surge.admin);
    let accept = [("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")];
    let openmetrics =
        send(&common::http_client(), Method::GET, &url, &accept, Bytes::new()).await.expect("metrics");
    assert!(String::from_utf8_lossy(&openmetrics.body).ends_with("# EOF\n"));

    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib");
    let rules = contrib.join("prometheus/alerts.yml");
    let checked = Command::new("promtool").arg("check").arg("rules").arg(&rules).output().expect("promtool");
    assert!(checked.status.success(), "promtool check rules:\n{}", String::from_utf8_lossy(&checked.stdout));
    // Every metric the rules and the Grafana dashboard use is one surge exposes.
    let exposed = metric_names(&classic);
    for file in [rules, contrib.join("grafana/surge.json")] {
        let text = std::fs::read_to_string(&file).expect("contrib file");
        if file.extension().is_some_and(|e| e == "json") {
            serde_json::from_str::<serde_json::Value>(&text).expect("the dashboard is JSON");
        }
        let unknown: Vec<String> = metric_names(&text).difference(&exposed).cloned().collect();
        assert!(unknown.is_empty(), "{} names metrics surge does not expose: {unknown:?}", file.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_data_and_draining_one_instance() {
    let surge = Surge::start(WEB).await;
    for _ in 0..40 {
        surge.get("/x").await;
    }
    // The page and its files are built in, with a policy that allows only themselves.
    let page = surge.admin(Method::GET, "/", &[], Bytes::new()).await;
    assert_eq!(page.status, StatusCode::OK);
    let policy =
        page.headers.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(policy.contains("default-src 'self'"), "{policy}");
    for asset in ["/dashboard.js", "/dashboard.css"] {
        assert_eq!(
            surge.admin(Method::GET, asset, &[], Bytes::new()).await.status,
            StatusCode::OK,
            "{asset}"
        );
    }
    // Samples come a second apart; the stream starts with the latest.
    let first = surge.admin(Method::GET, "/overview", &[], Bytes::new()).await.json();
    let url = format!("http://{}/events", surge.admin);
    let request = hyper::Request::get(&url)
        .header("host", "127.0.0.1")
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("request");
    let mut events = common::http_client().request(request).await.expect("event stream").into_body();
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while text.matches("event: sample").count() < 2 && Instant::now() < deadline {
        if let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(3), events.frame()).await {
            text.push_str(&String::from_utf8_lossy(frame.data_ref().map_or(&[][..], |d| &d[..])));
        }
    }
    let seqs: Vec<u64> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .filter_map(|sample| sample["seq"].as_u64())
        .collect();
    assert!(seqs.len() >= 2 && seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
    assert!(seqs[0] >= first["seq"].as_u64().unwrap_or(u64::MAX), "{seqs:?} after {}", first["seq"]);
    let sample = surge.sample().await;
    let web = sample.services.iter().find(|s| s.status.service == "web").expect("web");
    assert_eq!(web.traffic.requests_total, 40, "every answer counted");
    let history = surge.admin(Method::GET, "/history", &[], Bytes::new()).await.json();
    assert!(history["services"]["web"]["t_ms"].as_array().is_some_and(|t| !t.is_empty()), "{history}");

    // An instance's last lines of output; then it is drained and another takes its place.
    let victim = surge.service("web").await.instances[0].clone();
    let log = surge
        .admin(Method::GET, &format!("/services/web/instances/{}/log", victim.id), &[], Bytes::new())
        .await;
    assert_eq!(log.status, StatusCode::OK);
    let lines = log.json()["lines"].as_array().cloned().unwrap_or_default();
    assert!(!lines.is_empty(), "surge-echo says it is listening: {lines:?}");
    let drained = surge.cli(&["drain", "web", &victim.id]);
    assert!(drained.status.success(), "{}", String::from_utf8_lossy(&drained.stderr));
    assert!(String::from_utf8_lossy(&drained.stdout).contains("draining"));
    surge
        .wait_for("a replacement, ready", |services| {
            let web = &services[0];
            !web.instances.iter().any(|i| i.id == victim.id) && common::ready_count(web) == 2
        })
        .await;
    let json = [("content-type", "application/json")];
    let drain = format!("/services/web/instances/{}/drain", victim.id);
    let again = surge.admin(Method::POST, &drain, &json, Bytes::from_static(b"{}")).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND, "it is gone");
    let unknown =
        surge.admin(Method::POST, "/services/nope/instances/x/drain", &json, Bytes::from_static(b"{}")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_and_traces_reach_instances_and_queued_jobs() {
    let dir = tempfile::tempdir().expect("dir");
    let journal = dir.path().join("journal");
    let services = format!(
        "{WEB}\n[queues.jobs]\npublish = \"public\"\n\n[workers.jobs]\ncommand = \"{{echo}}\"\nqueue = \"jobs\"\n\
         path = \"/job\"\nenv = {{ SURGE_ECHO_JOURNAL = \"{}\" }}\ninstances = {{ min = 1, max = 1 }}\n",
        journal.display()
    );
    let surge = Surge::start(&services).await;
    // A request without either gets both: the id is its trace's.
    let answer = surge.get("/x").await;
    let id = answer.headers["x-request-id"].to_str().expect("text").to_owned();
    let echoed = answer.json();
    let traceparent = echoed["headers"]["traceparent"].as_str().expect("a traceparent reached the instance");
    assert_eq!(traceparent.split('-').nth(1), Some(id.as_str()));
    assert_eq!(echoed["headers"]["x-request-id"], id.as_str());
    // A caller's own trace and id go on, under the gateway's span.
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let answer = surge
        .request(Method::GET, "/x", &[("traceparent", given), ("x-request-id", "lb-42")], Bytes::new())
        .await;
    assert_eq!(answer.headers["x-request-id"], "lb-42");
    let sent = answer.json()["headers"]["traceparent"].as_str().unwrap_or_default().to_owned();
    assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && sent != given, "{sent}");
    // A job published through the gateway carries the publishing request's trace to its worker.
    let published = surge
        .request(
            Method::POST,
            "/queues/jobs/messages",
            &[("traceparent", given)],
            Bytes::from_static(b"work"),
        )
        .await;
    assert_eq!(published.status, StatusCode::ACCEPTED);
    let deadline = Instant::now() + Duration::from_secs(20);
    let line = loop {
        let text = std::fs::read_to_string(&journal).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            break line.to_owned();
        }
        assert!(Instant::now() < deadline, "the job was not worked\n{}", surge.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let worked_under = line.split(' ').nth(4).unwrap_or_default();
    assert!(worked_under.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{line}");
}

/// The lines of the access log at `path`, once there are `count`.
async fn access_lines(path: &Path, count: usize, surge: &Surge) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() >= count {
            return lines
                .iter()
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
                .collect();
        }
        assert!(Instant::now() < deadline, "{} of {count} lines\n{}", lines.len(), surge.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_complete_and_parseable_under_load() {
    let surge = Surge::start_with("access_log = \"access.log\"", WEB, |_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let report = common::load(&surge, "/load?bytes=300", 8, 400, stop).await;
    assert!(report.failures.is_empty(), "{:?}", &report.failures[..report.failures.len().min(5)]);
    let missing = surge.get("/missing?status=404").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let lines = access_lines(&surge.dir.join("access.log"), 3201, &surge).await;
    assert_eq!(lines.len(), 3201, "one line a request");
    let ids: BTreeSet<&str> = lines.iter().filter_map(|line| line["request_id"].as_str()).collect();
    assert_eq!(ids.len(), 3201, "every request its own id");
    for line in &lines[..3200] {
        assert_eq!(line["method"], "GET");
        assert_eq!(line["path"], "/load?bytes=300");
        assert_eq!(line["status"], 200);
        assert_eq!(line["bytes"], 300);
        assert_eq!(line["completed"], true);
        assert_eq!(line["tries"], 1);
        assert_eq!(line["client"], "127.0.0.1");
        assert!(line["instance"].as_str().is_some_and(|i| i.starts_with("web-")), "{line}");
        assert!(line["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{line}");
        assert_eq!(line["trace_id"], line["request_id"]);
        humantime::parse_rfc3339(line["time"].as_str().unwrap_or_default()).expect("an RFC 3339 time");
    }
    assert_eq!(lines[3200]["status"], 404);
    assert!(surge.metrics().await.contains(r#"surge_access_log_lines_total{outcome="written"} 3201"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_access_log_pipe_drops_lines_not_requests() {
    let dir = tempfile::tempdir().expect("dir");
    let fifo = dir.path().join("access.pipe");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    // A reader that opens the pipe and never reads: once the pipe's 64 KiB are full, every
    // write blocks.
    let mut reader = Command::new("sleep").arg("600").stdin(open_for_reading(&fifo)).spawn().expect("reader");
    let gateway = format!("access_log = \"{}\"", fifo.display());
    let surge = Surge::start_with(&gateway, WEB, |_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let report = common::load(&surge, "/stalled?bytes=64", 8, 2000, stop).await;
    assert!(report.failures.is_empty(), "{:?}", &report.failures[..report.failures.len().min(5)]);
    assert_eq!(report.ok, 16_000, "every request answered");
    let metrics = surge.metrics().await;
    let dropped = metrics
        .lines()
        .find(|line| line.starts_with(r#"surge_access_log_lines_total{outcome="dropped"}"#))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "the writer is stuck, so lines past its backlog are dropped and counted\n{metrics}");
    let _ = reader.kill();
    let _ = reader.wait();
}

/// Opens a FIFO for reading without waiting for a writer.
fn open_for_reading(path: &Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).expect("open the pipe")
}
