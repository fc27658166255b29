//! Queues end to end: messages published through the admin API or the gateway are pushed to a
//! pool of real worker processes (`surge-echo`, which writes every message it answers to a
//! journal), retried, dead-lettered and redriven; an instance killed mid-message and a surge
//! killed with SIGKILL lose nothing that was acknowledged.
//!
//! The suite runs on both backends: `embedded::` tests keep the queue on disk, `amqp::` tests
//! in the RabbitMQ on this machine (127.0.0.1:5672, guest), each under a queue name of its own
//! that is deleted afterwards. Killing surge and filling its disk are the embedded backend's
//! own tests.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::queues::{journal, Store, Worked};
use common::Surge;
use hyper::{Method, StatusCode};
use surge_queue::http::{DeadLettersResponse, PublishedJson, QueueStatus, QueuesResponse};

/// A queue `jobs` and a worker pool `workers` on it (two instances unless `worker` says
/// otherwise); `queue` and `worker` add keys.
fn config(store: &Store, journal: &Path, queue: &str, worker: &str) -> String {
    let instances = if worker.contains("instances") { "" } else { "instances = { min = 2 }" };
    let backend = store.keys();
    format!(
        r#"
[queues.jobs]
backoff = {{ base = "20ms", cap = "50ms" }}
{backend}
{queue}

[workers.workers]
command = "{{echo}}"
queue = "jobs"
path = "/job"
{instances}
env = {{ SURGE_ECHO_JOURNAL = "{}" }}
{worker}
"#,
        journal.display()
    )
}

async fn publish(surge: &Surge, body: &str) -> PublishedJson {
    let answer = surge.admin(Method::POST, "/queues/jobs/messages", &[], Bytes::from(body.to_owned())).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&answer.body));
    serde_json::from_slice(&answer.body).expect("publish JSON")
}

async fn queue_status(surge: &Surge) -> QueueStatus {
    let answer = surge.admin(Method::GET, "/queues", &[], Bytes::new()).await;
    let queues: QueuesResponse = serde_json::from_slice(&answer.body).expect("queues JSON");
    queues.queues.into_iter().find(|q| q.queue == "jobs").expect("the jobs queue")
}

/// Waits until `done` holds of the journal; fails the test after 30 s.
async fn wait_for_journal(path: &Path, what: &str, done: impl Fn(&[Worked]) -> bool) -> Vec<Worked> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let worked = journal(path);
        if done(&worked) {
            return worked;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {worked:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the queue's status is what `done` wants (an amqp queue's counts are read from
/// the broker each second); fails the test after 20 s.
async fn wait_for_status(surge: &Surge, done: impl Fn(&QueueStatus) -> bool) -> QueueStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = queue_status(surge).await;
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "the queue never got there: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until a delivery is under way; fails the test after 20 s.
async fn wait_until_in_flight(surge: &Surge) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while queue_status(surge).await.in_flight == 0 {
        assert!(Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn temp_file(surge: &Surge, name: &str) -> PathBuf {
    surge.dir.join(name)
}

/// Each test of the suite, on the embedded backend and on RabbitMQ.
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Store::Embedded).await
                }
            )*
        }
        mod amqp {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Store::amqp()).await
                }
            )*
        }
    };
}

on_both_backends!(
    published_messages_are_pushed_to_workers_and_acked,
    a_poison_message_is_dead_lettered_and_redrive_brings_it_back,
    a_worker_killed_mid_message_has_it_redelivered,
    concurrent_publishes_with_repeated_keys_make_one_message_per_key,
    a_worker_pool_at_zero_scales_out_for_its_backlog_and_back_to_zero,
    an_async_route_answers_202_and_the_job_result_is_fetched,
    a_schedule_publishes_at_each_tick,
    a_worker_that_answers_202_settles_its_lease_itself,
);

async fn published_messages_are_pushed_to_workers_and_acked(store: Store) {
    let dir = tempfile::tempdir().expect("dir");
    let journal_path = dir.path().join("journal");
    let surge = Surge::start(&config(&store, &journal_path, "", "prefetch = 4")).await;
    let mut ids = BTreeSet::new();
    for i in 0..100 {
        ids.insert(publish(&surge, &format!("job {i}")).await.id);
    }
    let batch = "{\"body\": \"a\"}\n{\"body\": \"b\"}\n";
    let answer = surge.admin(Method::POST, "/queues/jobs/messages:batch", &[], Bytes::from(batch)).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    let batch: surge_queue::http::BatchJson = serde_json::from_slice(&answer.body).expect("batch JSON");
    ids.extend(batch.messages.into_iter().map(|m| m.id));
    assert_eq!(ids.len(), 102);

    let worked = wait_for_journal(&journal_path, "every message worked", |worked| {
        worked.iter().filter(|w| w.status == 200).map(|w| &w.id).collect::<BTreeSet<_>>().len() == 102
    })
    .await;
    let worked_ids: BTreeSet<String> = worked.iter().map(|w| w.id.clone()).collect();
    assert_eq!(worked_ids, ids);
    let text = std::fs::read_to_string(&journal_path).expect("journal");
    let instances: BTreeSet<&str> = text.lines().filter_map(|line| line.split(' ').nth(3)).collect();
    assert_eq!(instances.len(), 2, "both instances took messages: {instances:?}");
    let status =
        wait_for_status(&surge, |status| (status.ready, status.in_flight, status.acked) == (0, 0, 102)).await;
    assert_eq!(status.published, 102, "{status:?}");
    let metrics = surge.metrics().await;
    assert!(metrics.contains("surge_queue_acked_total{queue=\"jobs\"} 102"), "{metrics}");
    assert!(metrics.contains("surge_queue_messages{queue=\"jobs\",state=\"ready\"} 0"), "{metrics}");
    assert!(metrics.contains("surge_queue_publish_seconds_count{queue=\"jobs\"} 102"), "{metrics}");
    assert!(metrics.contains("surge_queue_end_to_end_seconds_count{queue=\"jobs\"} 102"), "{metrics}");

    // The gateway does not publish to a queue that did not opt in.
    let answer = surge.request(Method::POST, "/queues/jobs/messages", &[], Bytes::from("x")).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    // Unknown queues and bad input are named.
    let answer = surge.admin(Method::POST, "/queues/nope/messages", &[], Bytes::from("x")).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert!(String::from_utf8_lossy(&answer.body).contains("no queue named `nope`"));
    let answer = surge.admin(Method::POST, "/queues/jobs/messages", &[("delay", "soon")], Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
}

async fn a_poison_message_is_dead_lettered_and_redrive_brings_it_back(store: Store) {
    let dir = tempfile::tempdir().expect("dir");
    let journal_path = dir.path().join("journal");
    let surge = Surge::start(&config(&store, &journal_path, "max_attempts = 3", "")).await;
    let poison = temp_file(&surge, "poisoned");
    std::fs::write(&poison, "").expect("write");
    let id = publish(&surge, &format!("fail_while={}", poison.display())).await.id;

    let worked = wait_for_journal(&journal_path, "three failed attempts", |worked| worked.len() >= 3).await;
    let attempts: Vec<(u32, u16)> = worked.iter().map(|w| (w.attempt, w.status)).collect();
    assert_eq!(attempts, [(1, 500), (2, 500), (3, 500)]);
    let mut dead = DeadLettersResponse { queue: String::new(), dead: Vec::new() };
    for _ in 0..100 {
        let answer = surge.admin(Method::GET, "/queues/jobs/dead", &[], Bytes::new()).await;
        dead = serde_json::from_slice(&answer.body).expect("dead JSON");
        if !dead.dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dead.dead.len(), 1);
    assert_eq!((dead.dead[0].id.as_str(), dead.dead[0].attempts), (id.as_str(), 3));
    let error = dead.dead[0].error.clone().unwrap_or_default();
    assert!(error.contains("answered 500"), "{error}");
    assert!(surge.log().contains("went to the dead letters"), "{}", surge.log());
    assert_eq!(journal(&journal_path).len(), 3, "a dead letter is not delivered");

    // Fixed, and redriven by the command line: it is processed.
    std::fs::remove_file(&poison).expect("remove");
    let redrive = surge.cli(&["queues", "redrive", "jobs"]);
    assert!(redrive.status.success(), "{}", String::from_utf8_lossy(&redrive.stderr));
    assert!(String::from_utf8_lossy(&redrive.stdout).contains("1 message"), "{redrive:?}");
    let worked = wait_for_journal(&journal_path, "the redriven message worked", |worked| {
        worked.iter().any(|w| w.status == 200)
    })
    .await;
    assert_eq!(worked.last().map(|w| (w.id.as_str(), w.attempt)), Some((id.as_str(), 1)));
    let listed = surge.cli(&["queues"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("jobs"), "{listed:?}");
}

async fn a_worker_killed_mid_message_has_it_redelivered(store: Store) {
    let dir = tempfile::tempdir().expect("dir");
    let journal_path = dir.path().join("journal");
    let surge = Surge::start(&config(&store, &journal_path, "", "")).await;
    let id = publish(&surge, "delay=1s").await.id;
    wait_until_in_flight(&surge).await;
    // The instance holding it: the one with a request in flight.
    let pool = surge.service("workers").await;
    let busy = pool.instances.iter().find(|i| i.in_flight > 0).expect("an instance at work");
    common::kill(busy.pid.expect("a pid"), libc::SIGKILL);

    let worked = wait_for_journal(&journal_path, "the message worked", |worked| {
        worked.iter().any(|w| w.status == 200)
    })
    .await;
    assert_eq!(worked.len(), 1, "the killed instance never answered");
    assert_eq!((worked[0].id.as_str(), worked[0].attempt), (id.as_str(), 2));
}

async fn concurrent_publishes_with_repeated_keys_make_one_message_per_key(store: Store) {
    let dir = tempfile::tempdir().expect("dir");
    let journal_path = dir.path().join("journal");
    // Published through the gateway this time; no instance consumes, so the queue is counted.
    let surge = Arc::new(
        Surge::start(&config(&store, &journal_path, "publish = \"public\"", "instances = { min = 0 }")).await,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..50 {
        let surge = Arc::clone(&surge);
        tasks.spawn(async move {
            let mut ids = Vec::new();
            for i in 0..200 {
                let key = format!("key-{}", (worker * 200 + i) % 1_000);
                let headers = [("idempotency-key", key.as_str())];
                let answer = surge
                    .request(Method::POST, "/queues/jobs/messages", &headers, Bytes::from(key.clone()))
                    .await;
                assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&answer.body));
                let published: PublishedJson = serde_json::from_slice(&answer.body).expect("publish JSON");
                ids.push((key, published.id));
            }
            ids
        });
    }
    let mut by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while let Some(ids) = tasks.join_next().await {
        for (key, id) in ids.expect("task") {
            by_key.entry(key).or_default().insert(id);
        }
    }
    assert_eq!(by_key.len(), 1_000);
    assert!(by_key.values().all(|ids| ids.len() == 1), "a key named two messages");
    wait_for_status(&surge, |status| (status.ready, status.published) == (1_000, 1_000)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_publish_and_consume_loses_no_acknowledged_message() {
    let store = Store::Embedded;
    let dir = tempfile::tempdir().expect("dir");
    let journal_path = dir.path().join("journal");
    let mut surge = Surge::start(&config(&store, &journal_path, "", "prefetch = 8")).await;
    let mut acknowledged = BTreeSet::new();
    let mut refused = 0;
    // At least 20 kills, and as many more as it takes (on a slow machine) for 1,000
    // acknowledged publishes: enough to prove something.
    let mut round = 0;
    while round < 20 || acknowledged.len() < 1_000 {
        assert!(round < 200, "only {} publishes acknowledged in {round} rounds", acknowledged.len());
        round += 1;
        // Publishes race the kill: some are answered, some are cut off unanswered.
        let publishing = {
            let (admin, token) = (surge.admin, surge.admin_token());
            tokio::spawn(async move {
                let client = common::http_client();
                let mut ids = Vec::new();
                let mut failed = 0;
                for i in 0..200 {
                    let url = format!("http://{admin}/queues/jobs/messages");
                    let bearer = format!("Bearer {token}");
                    let headers = [("authorization", bearer.as_str())];
                    match common::send(
                        &client,
                        Method::POST,
                        &url,
                        &headers,
                        Bytes::from(format!("r{round} m{i}")),
                    )
                    .await
                    {
                        Ok(answer) if answer.status == StatusCode::ACCEPTED => {
                            let published: PublishedJson =
                                serde_json::from_slice(&answer.body).expect("JSON");
                            ids.push(published.id);
                        }
                        _ => failed += 1,
                    }
                }
                (ids, failed)
            })
        };
        tokio::time::sleep(Duration::from_millis(20 + 10 * (round % 5))).await;
        surge.kill_and_restart(&[]);
        let (ids, failed) = publishing.await.expect("publisher");
        acknowledged.extend(ids);
        refused += failed;
    }
    let worked = wait_for_journal(&journal_path, "every acknowledged message worked", |worked| {
        let done: BTreeSet<&String> = worked.iter().filter(|w| w.status == 200).map(|w| &w.id).collect();
        acknowledged.iter().all(|id| done.contains(id))
    })
    .await;
    let mut times: BTreeMap<&String, usize> = BTreeMap::new();
    for line in worked.iter().filter(|w| w.status == 200) {
        *times.entry(&line.id).or_default() += 1;
    }
    let duplicates: usize = times.values().map(|n| n - 1).sum();
    eprintln!(
        "{round} kills: {} publishes acknowledged, {refused} cut off unanswered, all {} worked, {duplicates} duplicate deliveries",
        acknowledged.len(),
        acknowledged.len()
    );
}

async fn a_worker_pool_at_zero_scales_out_for_its_backlog_and_back_to_zero(store: Store) {
    let dir = tempfile::tempdir().expect("dir");
    let journal_path = dir.path().join("journal");
    let worker = "prefetch = 2\ninstances = { min = 0, max = 3, initial = 0 }\n\
                  autoscale = { target = 2, scale_down_delay = \"0s\", idle_window = \"2s\" }";
    let surge = Surge::start(&config(&store, &journal_path, "", worker)).await;
    assert!(surge.service("workers").await.instances.is_empty());

    let mut ids = BTreeSet::new();
    for _ in 0..30 {
        ids.insert(publish(&surge, "delay=100ms").await.id);
    }
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        peak = peak.max(surge.service("workers").await.instances.len());
        let done: BTreeSet<String> = journal(&journal_path).into_iter().map(|w| w.id).collect();
        if done == ids {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all worked: {} of {}\n{}",
            done.len(),
            ids.len(),
            surge.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(surge.log().contains("workers: scaling from zero"), "{}", surge.log());
    // 30 messages of 100 ms, two at a time per instance: the backlog asks for more than one.
    assert!(peak >= 2, "peak of {peak} instances\n{}", surge.log());
    surge
        .wait_for("the idle worker pool back at zero", |s| {
            s.iter().any(|p| p.service == "workers" && p.desired == 0 && p.instances.is_empty())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_publishes_cleanly_and_loses_nothing_acknowledged() {
    let mut surge =
        Surge::start("[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\n\n[queues.jobs]\n").await;
    // The queue's log may grow to 64 KiB: a disk that fills up.
    surge.kill_and_restart(&["prlimit", "--fsize=65536"]);
    let payload = Bytes::from(vec![b'x'; 1000]);
    let mut acknowledged = BTreeSet::new();
    let refusal = loop {
        let answer = surge.admin(Method::POST, "/queues/jobs/messages", &[], payload.clone()).await;
        if answer.status != StatusCode::ACCEPTED {
            break answer;
        }
        let published: PublishedJson = serde_json::from_slice(&answer.body).expect("JSON");
        acknowledged.insert(published.id);
        assert!(acknowledged.len() < 1_000, "the file-size limit never hit");
    };
    assert_eq!(refusal.status, StatusCode::SERVICE_UNAVAILABLE);
    let error = String::from_utf8_lossy(&refusal.body).into_owned();
    assert!(
        error.contains("could not store the message on disk") && error.contains("nothing was enqueued"),
        "{error}"
    );
    assert!(acknowledged.len() > 10, "{}", acknowledged.len());
    // Surge goes on serving the rest, and the queue what it holds.
    assert_eq!(surge.get("/").await.status, StatusCode::OK);
    assert_eq!(queue_status(&surge).await.ready, acknowledged.len() as u64);

    // With room again, every acknowledged message is there, and publishing works.
    surge.kill_and_restart(&[]);
    assert_eq!(queue_status(&surge).await.ready, acknowledged.len() as u64);
    publish(&surge, "after").await;
}

async fn an_async_route_answers_202_and_the_job_result_is_fetched(store: Store) {
    let mut surge = Surge::start(&format!(
        r#"
[queues.reports]
max_attempts = 2
backoff = {{ base = "20ms", cap = "20ms" }}
{}

[services.web]
command = "{{echo}}"
routes = ["/", {{ prefix = "/reports", async = "reports" }}]

[workers.reporters]
command = "{{echo}}"
queue = "reports"
"#,
        store.keys()
    ))
    .await;
    let headers = [("x-user", "ada"), ("content-type", "text/plain"), ("x-forwarded-for", "6.6.6.6")];
    let accepted = surge.request(Method::POST, "/reports/7?format=pdf", &headers, Bytes::from("hello")).await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&accepted.body));
    let location =
        accepted.headers.get("location").and_then(|v| v.to_str().ok()).expect("Location").to_owned();
    assert!(location.starts_with("/jobs/reports-"), "{location}");
    assert!(accepted.headers.contains_key("retry-after"));

    // The worker got the request as it was sent; its answer is the job's.
    let done = surge.request(Method::GET, &location, &[("prefer", "wait=10")], Bytes::new()).await;
    assert_eq!(done.status, StatusCode::OK, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(done.headers.get("x-surge-job-state").map(|v| v.as_bytes()), Some(&b"done"[..]));
    let echoed = done.json();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["path"], "/reports/7");
    assert_eq!(echoed["query"], "format=pdf");
    assert_eq!(echoed["headers"]["x-user"], "ada");
    // Forwarded as an instance's request is: the client's own claim replaced.
    assert_eq!(echoed["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(echoed["body_bytes"], 5);

    // The answer outlives a crash of surge: it was on disk before its message was acked.
    surge.kill_and_restart(&[]);
    let again = surge.request(Method::GET, &location, &[], Bytes::new()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", String::from_utf8_lossy(&again.body));
    assert_eq!(again.headers.get("x-surge-job-state").map(|v| v.as_bytes()), Some(&b"done"[..]));
    assert_eq!(again.json()["path"], "/reports/7");

    // A job the worker keeps failing ends dead, and says why.
    let accepted = surge.request(Method::POST, "/reports/x?status=500", &[], Bytes::new()).await;
    let location =
        accepted.headers.get("location").and_then(|v| v.to_str().ok()).expect("Location").to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let answer = surge.request(Method::GET, &location, &[], Bytes::new()).await;
        let state = answer.json();
        if state["state"] == "dead" {
            break state;
        }
        assert!(Instant::now() < deadline, "never dead: {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dead["attempts"], 2);
    assert!(dead["error"].as_str().is_some_and(|e| e.contains("answered 500")), "{dead}");

    // Another job's id cannot be guessed from this one's: the tag is the queue's own.
    let mut forged = location.clone();
    let last = forged.pop().map_or('0', |c| if c == '0' { '1' } else { '0' });
    forged.push(last);
    let unknown = surge.request(Method::GET, &forged, &[], Bytes::new()).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&unknown.body));
    // A publisher cannot pass a message off as a request for the workers.
    let headers = [("content-type", "message/http")];
    let refused = surge
        .admin(Method::POST, "/queues/reports/messages", &headers, Bytes::from("GET / HTTP/1.1\r\n\r\n"))
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
}

async fn a_schedule_publishes_at_each_tick(store: Store) {
    let dir = tempfile::tempdir().expect("dir");
    let journal_path = dir.path().join("journal");
    let schedule = "\n[schedules.every-second]\ncron = \"* * * * * *\"\nqueue = \"jobs\"\nbody = \"tick\"\n";
    let surge = Surge::start(&(config(&store, &journal_path, "", "") + schedule)).await;
    let worked = wait_for_journal(&journal_path, "three ticks worked", |worked| {
        worked.iter().filter(|w| w.status == 200).map(|w| &w.id).collect::<BTreeSet<_>>().len() >= 3
    })
    .await;
    assert!(worked.iter().all(|w| w.attempt == 1 && w.status == 200), "{worked:?}");
    // A broker may deliver a message before it confirms the publish to surge, so the count of
    // publishes can trail the deliveries for a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = queue_status(&surge).await;
        if status.published >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_worker_that_answers_202_settles_its_lease_itself(store: Store) {
    let dir = tempfile::tempdir().expect("dir");
    let journal_path = dir.path().join("journal");
    let surge = Surge::start(&config(&store, &journal_path, "lease = \"10s\"", "")).await;
    let id = publish(&surge, "settle=later&delay=1s").await.id;
    wait_until_in_flight(&surge).await;
    // Without its token, nobody settles it: not even with the admin token.
    let url = format!("/queues/jobs/leases/{id}/ack");
    let forged =
        surge.admin(Method::POST, &url, &[("x-surge-lease-token", "0000000000000001")], Bytes::new()).await;
    assert_eq!(forged.status, StatusCode::CONFLICT, "{}", String::from_utf8_lossy(&forged.body));

    // The worker renews and acks with its own token.
    wait_for_journal(&journal_path, "the worker's own ack", |worked| worked.iter().any(|w| w.id == id)).await;
    let text = std::fs::read_to_string(&journal_path).expect("journal");
    assert!(text.contains(&format!("{id} 1 200 ")) && text.contains("renew=200"), "{text}");
    wait_for_status(&surge, |status| (status.acked, status.retried, status.in_flight) == (1, 0, 0)).await;
}

#[test]
fn surge_up_names_the_queue_and_the_broker_it_cannot_reach() {
    let dir = tempfile::tempdir().expect("dir");
    // Port 1 on loopback: nothing listens there.
    let config = common::write_config(
        dir.path(),
        "[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\n\n\
         [queues.jobs]\nbackend = \"amqp\"\nurl = \"amqp://guest:secret@127.0.0.1:1/%2f\"\n",
    );
    let output = std::process::Command::new(common::SURGE)
        .args(["up", "-c"])
        .arg(&config)
        .output()
        .expect("run surge up");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("queues.jobs"), "{stderr}");
    assert!(stderr.contains("amqp://guest@127.0.0.1:1/%2f"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
}

/// Two nodes share an amqp queue with a schedule: one fires each tick, and when it is killed
/// the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_nodes_sharing_an_amqp_queue_one_fires_a_schedule() {
    let store = Store::amqp();
    let config = format!(
        "[services.web]\ncommand = \"{{echo}}\"\nroutes = [\"/\"]\n\n[queues.jobs]\n{}\n\n\
         [schedules.every-second]\ncron = \"* * * * * *\"\nqueue = \"jobs\"\nbody = \"tick\"\n",
        store.keys()
    );
    let mut first = Surge::start(&config).await;
    let second = Surge::start(&config).await;
    let published = |status: &QueueStatus| status.published;
    // Counted from when both are up: the first may have fired alone before the second started.
    let (from_a, from_b) = (published(&queue_status(&first).await), published(&queue_status(&second).await));
    let deadline = Instant::now() + Duration::from_secs(20);
    let (leader, follower) = loop {
        let a = published(&queue_status(&first).await) - from_a;
        let b = published(&queue_status(&second).await) - from_b;
        if a + b >= 3 {
            break (a, b);
        }
        assert!(Instant::now() < deadline, "no ticks: {a} and {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(leader == 0 || follower == 0, "both nodes fired: {leader} and {follower}");
    // Whichever fired is killed; the other fires from then on.
    let (survivor, fired_before) = if leader > 0 {
        first.signal(libc::SIGKILL);
        let _ = first.wait_exit(Duration::from_secs(10));
        (&second, from_b + follower)
    } else {
        drop(second);
        (&first, from_a + leader)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while published(&queue_status(survivor).await) < fired_before + 2 {
        assert!(Instant::now() < deadline, "the survivor never took the schedule over\n{}", survivor.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(survivor.log().contains("this node fires schedule every-second"), "{}", survivor.log());
}

/// Damage in an older segment of a queue's log stops `surge up` with the file and the offset;
/// `surge queues repair` keeps every intact record, and the queue opens again without the
/// damaged one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_is_named_at_start_and_repaired_keeping_every_intact_record() {
    let mut surge =
        Surge::start("[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\n\n[queues.jobs]\n").await;
    for body in ["first message", "second message", "third message"] {
        publish(&surge, body).await;
    }
    surge.signal(libc::SIGKILL);
    let _ = surge.wait_exit(Duration::from_secs(10));
    let segment = surge.dir.join(".surge/queues/jobs").join(format!("{:020}.log", 1));
    let mut bytes = std::fs::read(&segment).expect("the log");
    let second = bytes.windows(14).position(|w| w == b"second message").expect("the second payload");
    bytes[second] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("damage it");
    // A newer segment after it: damage there is not a write a crash cut short.
    std::fs::write(surge.dir.join(".surge/queues/jobs").join(format!("{:020}.log", 2)), b"")
        .expect("segment 2");

    let up = std::process::Command::new(common::SURGE)
        .args(["up", "-c"])
        .arg(&surge.config)
        .output()
        .expect("run surge up");
    assert!(!up.status.success());
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(stderr.contains("damaged at offset") && stderr.contains("00000000000000000001.log"), "{stderr}");
    assert!(stderr.contains("surge queues repair"), "{stderr}");

    let repair = surge.cli(&["queues", "repair", "jobs"]);
    let stdout = String::from_utf8_lossy(&repair.stdout);
    assert!(repair.status.success(), "{stdout}{}", String::from_utf8_lossy(&repair.stderr));
    assert!(stdout.contains("kept 2 records"), "{stdout}");
    assert!(segment.with_extension("log.damaged").exists(), "the file as it was is kept");

    surge.kill_and_restart(&[]);
    let status = queue_status(&surge).await;
    assert_eq!((status.ready, status.dead), (2, 0), "{status:?}");
}
