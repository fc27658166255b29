//! Durable queues, embedded or in RabbitMQ (`amqp`). The embedded backend keeps each queue in a segmented append-only log on
//! disk: a publish is acknowledged only once its record is synced, and concurrent publishes
//! share one sync (group commit). The queue's state (ready, leased, dead) is a pure machine
//! (`state`) that recovery rebuilds by replaying the log (`log`).

mod amqp;
mod answers;
pub mod deliver;
mod embedded;
pub mod http;
pub mod job;
mod log;
mod queue;
pub mod record;
mod registry;
pub mod schedule;
pub mod state;

pub use amqp::without_password;
pub use log::{repair, OpenError, Recovered, Repaired, SEGMENT_SIZE};
pub use queue::{now_ms, Latencies, Limits, NewMessage, PublishError, Published, Queue, Totals};
pub use registry::{QueueMetrics, Queues};
pub use state::{Counts, DeadLetter, Delivery, Failed, Location, Settings, Stale};
