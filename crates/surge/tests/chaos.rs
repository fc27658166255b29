//! Chaos, bounded and on loopback: instances die, fail fast, fail as a pool, and close
//! keep-alive connections under the gateway's feet. Clients must not notice.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{load, ready_count, Surge};
use hyper::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_one_of_four_every_two_seconds_loses_no_request() {
    let surge = Surge::start(
        r#"
[services.web]
command = "{echo}"
routes = ["/"]
instances = { min = 4, max = 4 }
"#,
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&surge, "/?delay=5ms", 6, usize::MAX, Arc::clone(&stop));
    let chaos = async {
        let mut killed = 0;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let web = surge.service("web").await;
            if let Some(victim) =
                web.instances.iter().find(|i| i.state == surge_admin::api::InstanceState::Ready)
            {
                common::kill(victim.pid.expect("pid"), 9);
                killed += 1;
            }
        }
        stop.store(true, Ordering::SeqCst);
        killed
    };
    let (report, killed) = tokio::join!(traffic, chaos);
    eprintln!("killed {killed} instances in 20 s; {} requests, {} failed", report.ok, report.failures.len());
    assert_eq!(killed, 10);
    assert!(report.failures.is_empty(), "{} failed: {:?}", report.failures.len(), report.failures);
    assert!(report.ok > 500, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pool_gets_at_most_one_fifth_more_attempts() {
    let surge = Surge::start(
        r#"
[services.web]
command = "{echo}"
routes = ["/"]
instances = { min = 2, max = 2 }
"#,
    )
    .await;
    let requests = 8 * 250;
    let report = load(&surge, "/?status=503", 8, 250, Arc::new(AtomicBool::new(false))).await;
    assert_eq!(report.failures.len(), requests, "every answer is the pool's own 503");
    let attempts: u64 = surge.service("web").await.instances.iter().map(|i| i.served).sum();
    let ratio = attempts as f64 / requests as f64;
    eprintln!("{requests} requests, {attempts} upstream attempts: {ratio:.3} per request");
    assert!(ratio <= 1.2, "{ratio}");
    assert!(ratio > 1.0, "some retries were made: {ratio}");
    assert!(surge.metrics().await.contains("surge_retries_denied_total{service=\"web\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_closing_idle_connections_cause_no_gateway_error() {
    let surge = Surge::start(
        r#"
[services.web]
command = "{echo}"
routes = ["/"]
env = { SURGE_ECHO_IDLE_TIMEOUT = "20ms" }
instances = { min = 3, max = 3 }
"#,
    )
    .await;
    // Pauses around the instances' idle timeout make the gateway reuse connections just as
    // the instances close them.
    let mut workers = Vec::new();
    for worker in 0..6u64 {
        let (client, url) = (common::http_client(), surge.url("/"));
        workers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(worker);
            let (mut ok, mut gateway_errors) = (0, Vec::new());
            for _ in 0..250 {
                tokio::time::sleep(Duration::from_millis(rng.u64(10..=30))).await;
                let answer =
                    common::send(&client, Method::GET, &url, &[], Bytes::new()).await.expect("answer");
                if answer.status == StatusCode::OK {
                    ok += 1;
                } else {
                    gateway_errors.push(format!(
                        "{}: {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    ));
                }
            }
            (ok, gateway_errors)
        }));
    }
    let (mut ok, mut errors) = (0, Vec::new());
    for worker in workers {
        let (worker_ok, worker_errors) = worker.await.expect("worker");
        ok += worker_ok;
        errors.extend(worker_errors);
    }
    eprintln!("{ok} requests over connections closed when idle 20 ms; {} errors", errors.len());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(ok, 1500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_answering_fast_503s_is_ejected_and_clients_see_no_error() {
    let surge = Surge::start(
        r#"
[services.web]
command = "{echo}"
routes = ["/"]
env = { SURGE_ECHO_FAULTY = "web-3" }
instances = { min = 5, max = 5 }
"#,
    )
    .await;
    let warm_up = load(&surge, "/", 4, 50, Arc::new(AtomicBool::new(false))).await;
    assert!(warm_up.failures.is_empty(), "retried elsewhere: {:?}", warm_up.failures);
    let served_by_faulty = |status: &[surge_admin::api::PoolStatus]| {
        status[0].instances.iter().find(|i| i.id == "web-3").map_or(0, |i| i.served)
    };
    let before = served_by_faulty(&surge.status().await);
    let status = surge.status().await;
    assert!(status[0].instances.iter().any(|i| i.id == "web-3" && i.ejected), "{status:#?}");

    let report = load(&surge, "/", 8, 250, Arc::new(AtomicBool::new(false))).await;
    let after = served_by_faulty(&surge.status().await);
    let share = (after - before) as f64 / 2000.0;
    eprintln!(
        "after ejection web-3 got {} of 2000 requests ({:.2}%); {} client errors",
        after - before,
        share * 100.0,
        report.failures.len()
    );
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(share <= 0.05, "{share}");
    assert_eq!(ready_count(&status[0]), 5, "active health checks still pass: only the breaker ejects it");
    let metrics = surge.metrics().await;
    assert!(metrics.contains("surge_outlier_ejections_total{service=\"web\"} 1"), "{metrics}");
    assert!(surge.log().contains("web-3 ejected for 5s after 3 failures in a row"), "{}", surge.log());
}
