//! RabbitMQ restarted under load (`rabbitmqctl stop_app`, then `start_app`): publishes while
//! it is away answer 503, and every publish that was confirmed (202) is delivered to a worker
//! once it is back. A file of its own: it stops the broker every other amqp test uses, and
//! cargo runs test files one after another.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::queues::{journal, Store};
use common::Surge;
use hyper::{Method, StatusCode};
use surge_queue::http::PublishedJson;

fn rabbitmqctl(action: &str) {
    let status = Command::new("rabbitmqctl").arg(action).output().expect("rabbitmqctl runs");
    assert!(status.status.success(), "rabbitmqctl {action}: {}", String::from_utf8_lossy(&status.stderr));
}

/// Starts the broker's app again when dropped, so that a failing test leaves it running.
struct StartAgain;

impl Drop for StartAgain {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_confirmed_publish() {
    let store = Store::amqp();
    let dir = tempfile::tempdir().expect("dir");
    let journal_path = dir.path().join("journal");
    let config = format!(
        r#"
[queues.jobs]
backoff = {{ base = "20ms", cap = "50ms" }}
{}

[workers.workers]
command = "{{echo}}"
queue = "jobs"
path = "/job"
prefetch = 4
instances = {{ min = 2 }}
env = {{ SURGE_ECHO_JOURNAL = "{}" }}
"#,
        store.keys(),
        journal_path.display()
    );
    let surge = Arc::new(Surge::start(&config).await);

    // Four publishers until told to stop; each keeps the ids it was given (202) and counts 503s.
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = tokio::task::JoinSet::new();
    for publisher in 0..4 {
        let (surge, stop) = (Arc::clone(&surge), Arc::clone(&stop));
        publishers.spawn(async move {
            let (mut confirmed, mut refused) = (Vec::new(), 0u32);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = Bytes::from(format!("publisher {publisher} message {n}"));
                let answer = surge.admin(Method::POST, "/queues/jobs/messages", &[], body).await;
                match answer.status {
                    StatusCode::ACCEPTED => {
                        let published: PublishedJson = serde_json::from_slice(&answer.body).expect("JSON");
                        confirmed.push(published.id);
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("a publish answered {other}: {}", String::from_utf8_lossy(&answer.body)),
                }
            }
            (confirmed, refused)
        });
    }
    // Some messages through first, then the broker goes away and comes back.
    let before = Instant::now() + Duration::from_secs(20);
    while journal(&journal_path).len() < 50 {
        assert!(Instant::now() < before, "nothing worked before the restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start_again = StartAgain;
    tokio::task::spawn_blocking(|| rabbitmqctl("stop_app")).await.expect("stop_app");
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(|| rabbitmqctl("start_app")).await.expect("start_app");
    drop(start_again);
    // Publishes go through again.
    let published_before = surge_status_published(&surge).await;
    let back = Instant::now() + Duration::from_secs(30);
    while surge_status_published(&surge).await < published_before + 50 {
        assert!(Instant::now() < back, "publishes never came back after the restart\n{}", surge.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut confirmed, mut refused) = (BTreeSet::new(), 0);
    while let Some(done) = publishers.join_next().await {
        let (ids, failures) = done.expect("publisher");
        confirmed.extend(ids);
        refused += failures;
    }
    assert!(refused > 0, "no publish met the broker away: the restart was not under load");

    // Every confirmed publish is worked, however often it came back.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let worked: BTreeSet<String> =
            journal(&journal_path).into_iter().filter(|w| w.status == 200).map(|w| w.id).collect();
        let lost: Vec<&String> = confirmed.difference(&worked).collect();
        if lost.is_empty() {
            let duplicates = journal(&journal_path).len() - worked.len();
            eprintln!(
                "{} confirmed, {refused} refused while the broker was away, {duplicates} duplicates",
                confirmed.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} confirmed publishes never worked, e.g. {:?}\n{}",
            lost.len(),
            confirmed.len(),
            lost.first(),
            surge.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(surge.log().contains("consuming from"), "{}", surge.log());
}

async fn surge_status_published(surge: &Surge) -> u64 {
    let answer = surge.admin(Method::GET, "/queues", &[], Bytes::new()).await;
    let queues: surge_queue::http::QueuesResponse = serde_json::from_slice(&answer.body).expect("JSON");
    queues.queues.first().map_or(0, |queue| queue.published)
}
