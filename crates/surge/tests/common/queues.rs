//! What the queue tests share: the worker's journal, and where a test's queue is kept.

use std::path::Path;

/// One line of the worker's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worked {
    pub id: String,
    pub attempt: u32,
    pub status: u16,
}

pub fn journal(path: &Path) -> Vec<Worked> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            Some(Worked {
                id: fields.next()?.to_owned(),
                attempt: fields.next()?.parse().ok()?,
                status: fields.next()?.parse().ok()?,
            })
        })
        .collect()
}

pub const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Where a test's queue is kept. An amqp queue has a name of its own at the broker, deleted
/// (with its dead letters and delay queues) when the test ends, passed or not.
pub enum Store {
    Embedded,
    Amqp { broker_queue: String },
}

impl Store {
    pub fn amqp() -> Store {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Store::Amqp { broker_queue: format!("surge-test-{}-{n}-{}", std::process::id(), fastrand::u32(..)) }
    }

    /// The queue's keys for this backend.
    pub fn keys(&self) -> String {
        match self {
            Store::Embedded => String::new(),
            Store::Amqp { broker_queue } => {
                format!("backend = \"amqp\"\nurl = \"{BROKER}\"\nbroker_queue = \"{broker_queue}\"")
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let Store::Amqp { broker_queue } = self else { return };
        let main = broker_queue.clone();
        // On a thread of its own: a test's runtime may be the one panicking.
        let cleanup = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let connection = lapin::Connection::connect(BROKER, lapin::ConnectionProperties::default())
                    .await
                    .expect("the broker, to clean up");
                let channel = connection.create_channel().await.expect("channel");
                let delays = (0..=32).map(|k| format!("{main}.delay.{}ms", 1u64 << k));
                for queue in [main.clone(), format!("{main}.dead")].into_iter().chain(delays) {
                    let options = lapin::options::QueueDeleteOptions::default();
                    let _ = channel.queue_delete(queue.as_str().into(), options).await;
                }
                let _ = connection.close(200, "cleaned".into()).await;
            });
        });
        let _ = cleanup.join();
    }
}
