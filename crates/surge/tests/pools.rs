//! Instance pools end to end: balancing, replacement, scaling under load, crash loops.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{load, ready_count, Surge};
use hyper::StatusCode;

/// One service, `web`, of the test backend, with the given instance bounds.
fn web(instances: &str) -> String {
    format!("[services.web]\ncommand = \"{{echo}}\"\nroutes = [\"/\"]\ninstances = {instances}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_spreads_concurrent_load_fairly() {
    let surge = Surge::start(&web("{ min = 3, max = 3 }")).await;
    let report = load(&surge, "/?delay=20ms", 12, 30, Arc::new(AtomicBool::new(false))).await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.ok, 360);
    assert_eq!(report.by_instance.len(), 3, "{:?}", report.by_instance);
    for (instance, count) in &report.by_instance {
        let share = *count as f64 / report.ok as f64;
        assert!(
            (0.25..=0.42).contains(&share),
            "{instance} got {share:.2} of the requests: {:?}",
            report.by_instance
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_sends_most_requests_to_the_fast_instances() {
    let surge = Surge::start(
        r#"
[services.web]
command = "{echo}"
routes = ["/"]
env = { SURGE_ECHO_FAULTY = "web-2:slow" }
instances = { min = 3, max = 3 }
balance = "p2c_ewma"
"#,
    )
    .await;
    let report = load(&surge, "/?delay=5ms", 8, 75, Arc::new(AtomicBool::new(false))).await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let slow = report.by_instance.get("web-2").copied().unwrap_or(0);
    let fast_share = 1.0 - slow as f64 / report.ok as f64;
    eprintln!(
        "p2c_ewma with web-2 50 ms slower: {:?}, {:.1}% to the fast instances",
        report.by_instance,
        fast_share * 100.0
    );
    assert!(fast_share >= 0.8, "{:?}", report.by_instance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_replaced_and_traffic_keeps_flowing() {
    let surge = Surge::start(&web("{ min = 3, max = 3 }")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let stop = Arc::clone(&stop);
        let surge = &surge;
        async move { load(surge, "/?delay=5ms", 4, usize::MAX, stop).await }
    };
    let kill_and_wait = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = surge.service("web").await;
        let victim = before.instances[0].clone();
        common::kill(victim.pid.expect("pid"), 9);
        surge
            .wait_for("a replacement", |s| {
                let web = &s[0];
                ready_count(web) == 3 && web.restarts == 1 && web.instances.iter().all(|i| i.id != victim.id)
            })
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
    };
    let (report, ()) = tokio::join!(background, kill_and_wait);
    // Requests in flight on the killed instance fail (retries come with the resilience
    // layers); at most one per client.
    assert!(report.failures.len() <= 4, "{:?}", report.failures);
    assert!(report.ok > 100, "traffic flowed: {report:?}");

    let after = load(&surge, "/", 4, 25, Arc::new(AtomicBool::new(false))).await;
    assert!(after.failures.is_empty(), "{:?}", after.failures);
    assert_eq!(after.by_instance.len(), 3, "the replacement serves: {:?}", after.by_instance);
    assert!(surge.metrics().await.contains(r#"surge_instance_restarts_total{service="web"} 1"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_up_and_down_under_load_loses_no_request() {
    let surge = Surge::start(&web("{ min = 1, max = 5, initial = 1 }")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let background = load(&surge, "/?delay=20ms", 8, usize::MAX, Arc::clone(&stop));
    let scaling = async {
        for count in [4, 1, 5, 2, 1] {
            let output = surge.cli(&["scale", "web", &count.to_string()]);
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            let said = String::from_utf8_lossy(&output.stdout).into_owned();
            assert!(said.contains(&format!("web: desired instances set to {count}")), "{said}");
            surge
                .wait_for("the pool to reach its new size", |s| {
                    ready_count(&s[0]) == count && s[0].instances.len() == count
                })
                .await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        stop.store(true, Ordering::SeqCst);
    };
    let (report, ()) = tokio::join!(background, scaling);
    assert!(report.failures.is_empty(), "{} failed: {:?}", report.failures.len(), report.failures);
    assert!(report.by_instance.len() >= 5, "new instances served: {:?}", report.by_instance);
    assert!(surge.log().contains("draining"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_outside_the_bounds_is_refused_clearly() {
    let surge = Surge::start(&web("{ min = 1, max = 3 }")).await;
    let output = surge.cli(&["scale", "web", "9"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("can run 1 to 3 instances (services.web.instances)"), "{stderr}");

    let output = surge.cli(&["scale", "nope", "1"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no service named `nope`"));
    assert_eq!(surge.service("web").await.desired, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_prints_a_table_of_services_and_instances() {
    let surge = Surge::start(&web("{ min = 2, max = 3 }")).await;
    assert_eq!(surge.get("/").await.status, StatusCode::OK);
    let output = surge.cli(&["status"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("web  2/2 ready (min 2, max 3)  least_conn"), "{table}");
    assert!(table.contains("INSTANCE  PID"), "{table}");
    for instance in surge.service("web").await.instances {
        let pid = instance.pid.expect("pid").to_string();
        let row =
            table.lines().find(|l| l.trim_start().starts_with(&instance.id)).expect("a row per instance");
        assert!(
            row.contains(&pid) && row.contains(&instance.port.to_string()) && row.contains("ready"),
            "{row}"
        );
    }

    let unreachable = std::process::Command::new(common::SURGE)
        .args(["status", "--admin", "127.0.0.1:1"])
        .output()
        .expect("run");
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the admin API"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_is_reported_and_backed_off() {
    let surge = Surge::start(
        r#"
[services.web]
command = "{echo}"
routes = ["/"]

[services.broken]
command = "sh"
args = ["-c", "echo 'cannot open database' >&2; exit 3"]
routes = ["/broken"]
instances = { min = 0, max = 1, initial = 0 }
"#,
    )
    .await;
    let output = surge.cli(&["scale", "broken", "1"]);
    assert!(output.status.success());
    surge.wait_for("a crash loop", |s| s[1].crash_looping).await;
    // Backed off, not spun: 100 ms doubling reaches 6.4 s by the tenth failure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let broken = surge.service("broken").await;
    assert!(broken.restarts <= 9, "restarts are backed off: {}", broken.restarts);
    let log = surge.log();
    assert!(log.contains("[broken-1] cannot open database"), "instance output is in the log:\n{log}");
    assert!(log.contains("exited with status 3 unexpectedly"), "{log}");
    assert!(log.contains("crash loop"), "{log}");
    assert!(surge.metrics().await.contains(r#"surge_crash_looping{service="broken"} 1"#));
    assert!(surge.cli(&["status"]).stdout.windows(10).any(|w| w == b"CRASH LOOP"));
    assert_eq!(surge.get("/").await.status, StatusCode::OK, "other services are unaffected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_run_as_another_user_within_their_limits() {
    let surge = Surge::start(
        r#"
[services.web]
command = "{echo}"
routes = ["/"]
user = "nobody"
group = "nogroup"
limits = { open_files = 256, memory = "2GiB", cpu_seconds = 600, processes = 4096 }
"#,
    )
    .await;
    assert_eq!(surge.get("/").await.status, StatusCode::OK);
    let pid = common::pids(&surge.status().await)[0];
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let ids = |field: &str| {
        let line = status.lines().find(|l| l.starts_with(field)).expect("field");
        line.split_whitespace().nth(1).unwrap_or_default().to_owned()
    };
    assert_eq!((ids("Uid:"), ids("Gid:")), ("65534".to_owned(), "65534".to_owned()), "{status}");
    let groups = status.lines().find(|l| l.starts_with("Groups:")).unwrap_or_default();
    assert!(!groups.split_whitespace().any(|g| g == "0"), "root's groups were dropped: {groups}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("proc limits");
    for (name, value) in [
        ("Max open files", "256"),
        ("Max address space", "2147483648"),
        ("Max cpu time", "600"),
        ("Max processes", "4096"),
    ] {
        let line = limits.lines().find(|l| l.starts_with(name)).unwrap_or_default();
        assert!(line.split_whitespace().any(|word| word == value), "{name}: {line}");
    }
}
