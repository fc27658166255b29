//! Surge's own life: graceful shutdown on SIGTERM, and no orphans even after SIGKILL.

mod common;

use std::time::Duration;

use common::{pids, survivors, Surge};
use hyper::StatusCode;

const TWO_SERVICES: &str = r#"
[services.web]
command = "{echo}"
routes = ["/"]
instances = { min = 2, max = 2 }

[services.api]
command = "sh"
# The usual shell wrapper, which execs the server.
args = ["-c", "exec {echo}"]
routes = ["/api"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_outlives_a_sigkilled_surge() {
    let mut surge = Surge::start(TWO_SERVICES).await;
    let instances = pids(&surge.status().await);
    assert_eq!(instances.len(), 3);
    surge.signal(9);
    surge.wait_exit(Duration::from_secs(5));
    let left = survivors(&instances, Duration::from_secs(5));
    assert!(left.is_empty(), "instances outlived surge: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_stops_everything() {
    let mut surge = Surge::start(TWO_SERVICES).await;
    let instances = pids(&surge.status().await);
    let slow = tokio::spawn({
        let (client, url) = (common::http_client(), surge.url("/?delay=1500ms"));
        async move { common::send(&client, hyper::Method::GET, &url, &[], bytes::Bytes::new()).await }
    });
    surge.wait_for("the request to be in flight", |s| s[0].instances.iter().any(|i| i.in_flight == 1)).await;
    surge.signal(15);
    let answer = slow.await.expect("task").expect("the in-flight request is answered");
    assert_eq!(answer.status, StatusCode::OK);
    let status = surge.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "surge exits 0 after SIGTERM: {status:?}\n{}", surge.log());
    assert!(survivors(&instances, Duration::from_secs(2)).is_empty());
    let log = surge.log();
    assert!(log.contains("SIGTERM: draining requests"), "{log}");
    assert!(log.contains("surge stopped"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_ignores_sigterm_is_killed_after_stop_timeout() {
    // An ignored SIGTERM survives exec, and Python's http.server installs no handler of its
    // own: this instance never stops by itself. It answers GET / with a directory listing.
    let surge = Surge::start(
        r#"
[services.stubborn]
command = "sh"
args = ["-c", "trap '' TERM; exec python3 -m http.server --bind 127.0.0.1 $PORT"]
routes = ["/"]
instances = { min = 0, max = 1, initial = 1 }
health = { path = "/" }
lifecycle = { stop_timeout = "300ms" }
"#,
    )
    .await;
    let pid = pids(&surge.status().await)[0];
    let output = surge.cli(&["scale", "stubborn", "0"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    surge.wait_for("the instance to be gone", |s| s[0].instances.is_empty()).await;
    assert!(survivors(&[pid], Duration::from_secs(2)).is_empty());
    let log = surge.log();
    assert!(log.contains("after SIGTERM (stop_timeout); sending SIGKILL"), "{log}");
    assert!(log.contains("stubborn-1 stopped (killed by signal 9 (SIGKILL))"), "{log}");
}
