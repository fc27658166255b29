//! The embedded queue on a real folder: what is acknowledged survives reopening, concurrent
//! publishes share syncs, a torn tail is dropped and damage elsewhere is named, idempotency
//! keys hold under concurrency, limits answer clearly, and compaction frees old segments.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use surge_queue::{Limits, NewMessage, OpenError, PublishError, Queue, Settings};

const SETTINGS: Settings = Settings {
    max_attempts: 3,
    lease: 30_000,
    backoff_base: 1,
    backoff_cap: 1,
    dead_letter: true,
    idempotency_window: 60_000,
};

const LIMITS: Limits = Limits {
    max_messages: None,
    max_bytes: None,
    max_payload: 1 << 20,
    segment_size: surge_queue::SEGMENT_SIZE,
    result_ttl: std::time::Duration::from_secs(60),
};

fn open(dir: &Path) -> Arc<Queue> {
    open_with(dir, LIMITS)
}

fn open_with(dir: &Path, limits: Limits) -> Arc<Queue> {
    Queue::open("jobs", dir, SETTINGS, limits).expect("open").0
}

fn message(text: &str) -> NewMessage {
    NewMessage { payload: Bytes::from(text.to_owned()), ..NewMessage::default() }
}

fn keyed(text: &str, key: &str) -> NewMessage {
    NewMessage { idempotency_key: Some(key.to_owned()), ..message(text) }
}

async fn publish(queue: &Arc<Queue>, text: &str) -> u64 {
    queue.publish(vec![message(text)]).await.expect("published")[0].id
}

/// Leases everything ready and returns the payloads, acking those `ack` says.
async fn drain(queue: &Queue, ack: impl Fn(&str) -> bool) -> Vec<String> {
    let mut seen = Vec::new();
    for delivery in queue.lease(usize::MAX) {
        let payload = queue.payload(&delivery).expect("payload");
        let text = String::from_utf8(payload.to_vec()).expect("utf-8");
        if ack(&text) {
            queue.ack(delivery.id, delivery.token).await.expect("held");
        }
        seen.push(text);
    }
    seen.sort();
    seen
}

#[tokio::test]
async fn what_was_acknowledged_survives_reopening() {
    let dir = tempfile::tempdir().expect("dir");
    let queue = open(dir.path());
    for text in ["a", "b", "c"] {
        publish(&queue, text).await;
    }
    assert_eq!(drain(&queue, |text| text == "b").await, ["a", "b", "c"]);
    drop(queue);

    let (queue, recovered) = Queue::open("jobs", dir.path(), SETTINGS, LIMITS).expect("reopen");
    assert_eq!(recovered.records, 4, "three publishes and an ack");
    assert_eq!(recovered.torn_tail, None);
    // Leases do not survive: a and c are ready again; b was acked.
    assert_eq!(drain(&queue, |_| true).await, ["a", "c"]);
    let next = publish(&queue, "d").await;
    assert!(next > 3, "ids keep growing across restarts: {next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_are_all_durable() {
    let dir = tempfile::tempdir().expect("dir");
    let queue = open(dir.path());
    let publishes: Vec<_> = (0..500)
        .map(|i| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { publish(&queue, &format!("m{i:03}")).await })
        })
        .collect();
    let mut ids = Vec::new();
    for publish in publishes {
        ids.push(publish.await.expect("task"));
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 500, "each publish has its own id");
    drop(queue);
    let queue = open(dir.path());
    assert_eq!(queue.counts().ready, 500);
}

#[tokio::test]
async fn a_torn_tail_is_dropped_and_the_rest_kept() {
    let dir = tempfile::tempdir().expect("dir");
    let queue = open(dir.path());
    publish(&queue, "whole").await;
    publish(&queue, "torn").await;
    drop(queue);
    let segment = dir.path().join(format!("{:020}.log", 1));
    let length = std::fs::metadata(&segment).expect("segment").len();
    // A crash mid-write: the last record lost its last 3 bytes.
    std::fs::OpenOptions::new().write(true).open(&segment).expect("open").set_len(length - 3).expect("cut");

    let (queue, recovered) = Queue::open("jobs", dir.path(), SETTINGS, LIMITS).expect("reopen");
    let (path, offset, dropped) = recovered.torn_tail.expect("a torn tail");
    assert_eq!(path, segment);
    assert_eq!(dropped, length - 3 - offset);
    assert_eq!(drain(&queue, |_| true).await, ["whole"]);
    // New records go where the torn one was cut off, and read back.
    publish(&queue, "after").await;
    drop(queue);
    assert_eq!(drain(&open(dir.path()), |_| true).await, ["after"]);
}

/// Publishes "one", "two" and "three" to a queue in `dir` opened with `limits`.
async fn three_published(dir: &Path, limits: Limits) {
    let queue = open_with(dir, limits);
    for text in ["one", "two", "three"] {
        publish(&queue, text).await;
    }
}

/// Flips the first byte of `word` in segment `number`; the file as it is then.
fn damage(dir: &Path, number: u64, word: &str) -> (PathBuf, Vec<u8>) {
    let segment = dir.join(format!("{number:020}.log"));
    let mut bytes = std::fs::read(&segment).expect("read");
    let at = bytes.windows(word.len()).position(|w| w == word.as_bytes()).expect("the payload");
    bytes[at] ^= 0xff;
    std::fs::write(&segment, &bytes).expect("write");
    (segment, bytes)
}

#[tokio::test]
async fn damage_before_the_last_segment_is_named_and_repair_keeps_every_intact_record() {
    let dir = tempfile::tempdir().expect("dir");
    // Each publish goes to a segment of its own; the first is damaged.
    let limits = Limits { segment_size: 1, ..LIMITS };
    three_published(dir.path(), limits).await;
    let (first, bytes) = damage(dir.path(), 1, "one");
    match Queue::open("jobs", dir.path(), SETTINGS, limits) {
        Err(OpenError::Damaged { path, offset, why }) => {
            assert_eq!((path, offset, why), (first, 0, "checksum mismatch"));
        }
        other => panic!("expected damage, got {:?}", other.map(|(_, recovered)| recovered)),
    }
    let repaired = surge_queue::repair(dir.path()).expect("repair");
    assert_eq!(repaired.len(), 1);
    assert_eq!((repaired[0].kept, repaired[0].cut.len()), (0, 1));
    assert_eq!(std::fs::read(&repaired[0].original).expect("kept"), bytes, "the file as it was");
    assert!(surge_queue::repair(dir.path()).expect("again").is_empty(), "nothing left to repair");
    let mut left = drain(&open_with(dir.path(), limits), |_| true).await;
    left.sort_unstable();
    assert_eq!(left, ["three", "two"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_idempotency_keys_make_one_message_each() {
    let dir = tempfile::tempdir().expect("dir");
    let queue = open(dir.path());
    let publishes: Vec<_> = (0..2_000)
        .map(|i| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                let key = format!("key-{}", i % 100);
                queue.publish(vec![keyed(&key, &key)]).await.expect("published")[0]
            })
        })
        .collect();
    let mut by_key = std::collections::HashMap::new();
    let mut fresh = 0;
    for (i, publish) in publishes.into_iter().enumerate() {
        let published = publish.await.expect("task");
        fresh += usize::from(!published.duplicate);
        let id = *by_key.entry(i % 100).or_insert(published.id);
        assert_eq!(id, published.id, "one key, one id");
    }
    assert_eq!(fresh, 100);
    assert_eq!(queue.counts().ready, 100);
    drop(queue);
    // The keys survive a restart within their window.
    let queue = open(dir.path());
    let again = queue.publish(vec![keyed("x", "key-7")]).await.expect("published");
    assert!(again[0].duplicate);
    assert_eq!(Some(&again[0].id), by_key.get(&7));
}

#[tokio::test]
async fn limits_are_named_when_hit() {
    let dir = tempfile::tempdir().expect("dir");
    let queue = open_with(dir.path(), Limits { max_messages: Some(2), max_payload: 8, ..LIMITS });
    publish(&queue, "1").await;
    publish(&queue, "2").await;
    let full = queue.publish(vec![message("3")]).await.expect_err("full");
    assert!(matches!(&full, PublishError::Full { held: 2, .. }), "{full}");
    assert!(full.to_string().contains("max_messages is 2"), "{full}");
    let big = queue.publish(vec![message("123456789")]).await.expect_err("too large");
    assert_eq!(big, PublishError::TooLarge { queue: "jobs".into(), size: 9, limit: 8 });
}

#[tokio::test]
async fn a_second_opener_of_the_folder_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let _queue = open(dir.path());
    assert!(matches!(Queue::open("jobs", dir.path(), SETTINGS, LIMITS), Err(OpenError::Locked { .. })));
}

#[tokio::test]
async fn poison_messages_end_in_the_dead_letters_and_come_back_on_redrive() {
    let dir = tempfile::tempdir().expect("dir");
    let queue = open(dir.path());
    let id = publish(&queue, "poison").await;
    for attempt in 1..=3 {
        let delivery = loop {
            if let Some(delivery) = queue.lease(1).pop() {
                break delivery;
            }
            queue.wait_ready().await;
        };
        assert_eq!((delivery.id, delivery.attempt), (id, attempt));
        queue.fail(id, delivery.token, "answered 500").await.expect("held");
    }
    assert_eq!(queue.counts().dead, 1);
    drop(queue);
    let queue = open(dir.path());
    let dead: Vec<_> =
        queue.dead_letters(10, 0).await.expect("listed").into_iter().map(|(letter, _)| letter).collect();
    assert_eq!((dead[0].id, dead[0].attempts, dead[0].error.as_deref()), (id, 3, Some("answered 500")));
    assert_eq!(queue.redrive(None).await, Ok(1));
    assert_eq!(drain(&queue, |_| true).await, ["poison"]);
}

#[tokio::test]
async fn compaction_copies_what_old_segments_hold_and_deletes_them() {
    let dir = tempfile::tempdir().expect("dir");
    let queue = open_with(dir.path(), Limits { segment_size: 1, ..LIMITS });
    let kept = publish(&queue, "kept").await;
    for i in 0..5 {
        publish(&queue, &format!("done {i}")).await;
    }
    // All done but the first, which failed once and waits for its retry (not leased).
    for delivery in queue.lease(usize::MAX) {
        if delivery.id == kept {
            queue.fail(delivery.id, delivery.token, "not yet").await.expect("held");
        } else {
            queue.ack(delivery.id, delivery.token).await.expect("held");
        }
    }
    let segments = |dir: &Path| {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".log")))
            .count()
    };
    assert!(segments(dir.path()) >= 6, "the unacked first message holds every segment");
    assert_eq!(queue.compact().await.expect("compact"), 1);
    assert!(segments(dir.path()) <= 2, "{} segments left", segments(dir.path()));
    drop(queue);
    let queue = open(dir.path());
    let deliveries = loop {
        let deliveries = queue.lease(10);
        if !deliveries.is_empty() {
            break deliveries;
        }
        queue.wait_ready().await;
    };
    assert_eq!(deliveries.iter().map(|d| (d.id, d.attempt)).collect::<Vec<_>>(), [(kept, 2)]);
    assert_eq!(queue.payload(&deliveries[0]).expect("payload"), "kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_stay_readable_while_tiny_segments_come_and_go() {
    // Every write in a segment of its own, while a consumer acks (and segments are deleted) as
    // fast as it can. (The race it guards against, a segment deleted under a publish that is
    // durable but not yet admitted, is rare enough that this run alone seldom meets it.)
    let dir = tempfile::tempdir().expect("dir");
    let queue = open_with(dir.path(), Limits { segment_size: 1, ..LIMITS });
    let publishers: Vec<_> = (0..8)
        .map(|p| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                for i in 0..100 {
                    publish(&queue, &format!("p{p} m{i}")).await;
                }
            })
        })
        .collect();
    let consumer = {
        let queue = Arc::clone(&queue);
        tokio::spawn(async move {
            let mut read = 0;
            while read < 800 {
                let deliveries = queue.lease(16);
                if deliveries.is_empty() {
                    tokio::task::yield_now().await;
                }
                for delivery in deliveries {
                    queue.payload(&delivery).expect("every payload is still on disk");
                    queue.ack(delivery.id, delivery.token).await.expect("held");
                    read += 1;
                }
            }
        })
    };
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    consumer.await.expect("consumer");
    assert_eq!(queue.counts().ready, 0);
}

#[tokio::test]
async fn damage_in_the_last_segment_with_records_after_it_keeps_them_all() {
    let dir = tempfile::tempdir().expect("dir");
    three_published(dir.path(), LIMITS).await;
    let (_, bytes) = damage(dir.path(), 1, "two");
    // Not cut off as a torn tail (which would take "three" with it): repaired.
    let (queue, recovered) = Queue::open("jobs", dir.path(), SETTINGS, LIMITS).expect("opened");
    let repaired = recovered.repaired.expect("repaired");
    assert_eq!((repaired.kept, repaired.cut.len()), (2, 1));
    assert_eq!(std::fs::read(&repaired.original).expect("kept aside"), bytes, "the file as it was");
    assert_eq!(drain(&queue, |_| true).await, ["one", "three"]);
}
