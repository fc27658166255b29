//! Hot reload: `surge reload` and SIGHUP apply a changed surge.toml without losing a request;
//! a broken one changes nothing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{http_client, send, Surge, ECHO};
use hyper::{Method, StatusCode};
use surge_admin::api::InstanceState;

/// The services of the `round`th configuration: `web` changes its environment every round (so
/// its pool is replaced), `extra` comes and goes, and the routes change with it.
fn services(round: usize) -> String {
    let extra = if round % 2 == 1 {
        // A drain timeout well within the tests' waits, so a pool stopped by it is seen too.
        format!(
            "\n[services.extra]\ncommand = \"{ECHO}\"\nroutes = [\"/extra\"]\nlifecycle = {{ drain_timeout = \"5s\" }}\n"
        )
    } else {
        String::new()
    };
    format!(
        "[services.web]\ncommand = \"{ECHO}\"\nroutes = [\"/\", \"/web{round}\"]\ninstances = {{ min = 2, max = 2 }}\n\
         env = {{ ROUND = \"{round}\" }}\n{extra}"
    )
}

/// Rewrites the running surge's configuration with `services`, keeping its listeners.
fn rewrite(surge: &Surge, services: &str) {
    let text = std::fs::read_to_string(&surge.config).expect("read config");
    let head = &text[..text.find("[services.").expect("services")];
    std::fs::write(&surge.config, format!("{head}{services}")).expect("write config");
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

/// Requests to `/` until `stop`: kept-alive ones, and one new connection each.
fn load(
    surge: &Surge,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Tally>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    (0..4)
        .map(|worker| {
            let (stop, tally) = (Arc::clone(stop), Arc::clone(tally));
            let url = surge.url("/");
            tokio::spawn(async move {
                let mut failures = Vec::new();
                let client = http_client();
                while !stop.load(Ordering::Relaxed) {
                    let close = [("connection", "close")];
                    let headers: &[(&str, &str)] = if worker == 0 { &close } else { &[] };
                    match send(&client, Method::GET, &url, headers, Bytes::new()).await {
                        Ok(answer) if answer.status == StatusCode::OK => {
                            tally.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(answer) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            failures.push(format!(
                                "{}: {}",
                                answer.status,
                                String::from_utf8_lossy(&answer.body)
                            ));
                        }
                        Err(err) => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            failures.push(err);
                        }
                    }
                }
                failures
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_load_lose_no_request() {
    let surge = Surge::start(&services(0).replace(ECHO, "{echo}")).await;
    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let workers = load(&surge, &stop, &tally);
    for round in 1..=10 {
        rewrite(&surge, &services(round));
        let output = surge.cli(&["reload"]);
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "round {round}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(said.contains("replaced: web"), "round {round}: {said}");
        // `/extra` goes to its own service while it exists, else to `/`.
        let extra = surge.get("/extra").await.instance();
        assert_eq!(extra.starts_with("extra-"), round % 2 == 1, "round {round}: /extra went to {extra}");
        assert_eq!(surge.get(&format!("/web{round}")).await.status, StatusCode::OK, "round {round}");
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.expect("worker"));
    }
    let ok = tally.ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok > 100, "the load ran: {ok} requests");
    // Replaced and removed pools were stopped: only the last configuration's instances run.
    let status = surge.status().await;
    let names: Vec<&str> = status.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(names, ["web"], "{status:?}");
    // Each removed `extra` pool was stopped because nothing could reach it any more, not because
    // its drain timeout ran out with requests still able to.
    let log = surge
        .wait_for_log("the five removed pools stopped", |log| {
            log.matches("retired pools of extra").count() == 5
        })
        .await;
    assert_eq!(log.matches("retired pools of extra: no request can reach them").count(), 5, "{log}");
}

/// A changed service keeps its pool: its instances are replaced one at a time, a new one
/// ready before an old one drains, so the pool never has fewer ready instances than it should
/// nor more than one extra.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_service_is_replaced_one_instance_at_a_time() {
    let web = |round: usize| {
        format!(
            "[services.web]\ncommand = \"{{echo}}\"\nroutes = [\"/\"]\ninstances = {{ min = 3, max = 3 }}\n\
             env = {{ ROUND = \"{round}\", SURGE_ECHO_STARTUP = \"300ms\" }}\n"
        )
    };
    let surge = Surge::start(&web(0)).await;
    let first: Vec<String> = surge.service("web").await.instances.iter().map(|i| i.id.clone()).collect();
    assert_eq!(first.len(), 3);

    rewrite(&surge, &web(1).replace("{echo}", ECHO));
    let output = surge.cli(&["reload"]);
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(said.contains("replaced: web (one instance at a time)"), "{said}");
    // Watched until no instance of the first configuration is left.
    let (mut most_live, mut fewest_ready, mut looks, mut mixed) = (0, usize::MAX, 0, false);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let last = loop {
        let web = surge.service("web").await;
        let live = web.instances.iter().filter(|i| i.state.is_live()).count();
        let ready = web.instances.iter().filter(|i| i.state == InstanceState::Ready).count();
        (most_live, fewest_ready, looks) = (most_live.max(live), fewest_ready.min(ready), looks + 1);
        let old_left = web.instances.iter().any(|i| first.contains(&i.id));
        let serving = |old: bool| {
            web.instances.iter().any(|i| i.state == InstanceState::Ready && first.contains(&i.id) == old)
        };
        mixed |= serving(true) && serving(false);
        if !old_left && ready == 3 {
            break web;
        }
        assert!(std::time::Instant::now() < deadline, "the roll did not end: {web:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(most_live <= 4, "at most one extra instance at a time: {most_live} live at once");
    assert_eq!(fewest_ready, 3, "never fewer ready instances than the pool runs ({looks} looks)");
    assert!(mixed, "old and new instances served side by side in one pool ({looks} looks)");
    assert_eq!(last.instances.len(), 3, "{last:?}");
}

/// A change whose new instance cannot start is refused: the old instances keep serving, and
/// the pool is back on the configuration in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_first_new_instance_fails_is_rolled_back() {
    let surge = Surge::start(&services(0).replace(ECHO, "{echo}")).await;
    let first: Vec<String> = surge.service("web").await.instances.iter().map(|i| i.id.clone()).collect();
    rewrite(
        &surge,
        "[services.web]\ncommand = \"false\"\nroutes = [\"/\"]\ninstances = { min = 2, max = 2 }\n",
    );
    let output = surge.cli(&["reload"]);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    assert!(said.contains("service `web`: the new configuration's first instance failed"), "{said}");
    assert!(said.contains("the configuration in use stays"), "{said}");
    assert_eq!(surge.get("/").await.status, StatusCode::OK);
    let web = surge
        .wait_for("the failed instance gone", |status| {
            status[0].instances.iter().all(|i| first.contains(&i.id) || !i.state.is_live())
        })
        .await;
    let serving: Vec<&str> =
        web[0].instances.iter().filter(|i| i.state == InstanceState::Ready).map(|i| i.id.as_str()).collect();
    assert_eq!(serving.len(), 2, "{web:?}");
    assert!(serving.iter().all(|id| first.iter().any(|f| f == id)), "{web:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_configuration_is_refused_and_the_running_one_stays() {
    let surge = Surge::start(&services(0).replace(ECHO, "{echo}")).await;
    rewrite(&surge, "[services.web]\ncommand = \"nonexistent-program\"\nroutes = [\"/\"]\nreplicas = 3\n");
    let output = surge.cli(&["reload"]);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(said.contains("services.web.replicas"), "{said}");
    assert_eq!(surge.get("/").await.status, StatusCode::OK, "still serving the configuration in use");

    // A change of what the listeners hold needs a restart, and says so.
    let text = std::fs::read_to_string(&surge.config).expect("read");
    std::fs::write(&surge.config, text.replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"", 1))
        .expect("write");
    rewrite(&surge, &services(1));
    let output = surge.cli(&["reload"]);
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(said.contains("gateway.listen cannot change while surge runs"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_too() {
    let surge = Surge::start(&services(0).replace(ECHO, "{echo}")).await;
    assert!(surge.get("/extra").await.instance().starts_with("web-"));
    rewrite(&surge, &services(1));
    surge.signal(1);
    let mut routed = false;
    for _ in 0..200 {
        if surge.get("/extra").await.instance().starts_with("extra-") {
            routed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(routed, "SIGHUP did not apply the new route:\n{}", surge.log());
    // The new routes serve before the reload is over: it ends once the changed service's first
    // new instance is ready, and says so then.
    surge.wait_for_log("the reload to finish", |log| log.contains("configuration reloaded")).await;
}
