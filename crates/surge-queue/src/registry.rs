//! Every queue of the configuration, opened at start; what the admin API, the gateway and the
//! dispatchers look them up in.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use surge_config::{ConfigErrors, Publish, QueueBackend, QueueConfig};

use crate::http::QueueStatus;
use crate::{now_ms, Limits, Queue, Settings, SEGMENT_SIZE};

/// How often compaction looks for old segments to free.
const COMPACT_EVERY: Duration = Duration::from_secs(5);

pub struct Queues {
    queues: Vec<(QueueConfig, Arc<Queue>)>,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Queues {
    /// Opens every queue, recovering what its log holds; every problem is named with its
    /// queue's key.
    pub async fn open(configs: &[QueueConfig]) -> Result<Queues, ConfigErrors> {
        let mut queues = Vec::new();
        let mut errors = Vec::new();
        for config in configs {
            let settings = Settings {
                max_attempts: config.max_attempts,
                lease: millis(config.lease),
                backoff_base: millis(config.backoff_base),
                backoff_cap: millis(config.backoff_cap),
                dead_letter: config.dead_letter,
                idempotency_window: millis(config.idempotency_window),
            };
            let limits = Limits {
                max_messages: config.max_messages,
                max_bytes: config.max_size,
                max_payload: config.max_payload,
                segment_size: SEGMENT_SIZE,
                result_ttl: config.result_ttl,
            };
            if let QueueBackend::Amqp { url, broker_queue } = &config.backend {
                match Queue::open_amqp(&config.name, url, broker_queue, &config.dir, settings, limits).await {
                    Ok(queue) => {
                        let counts = queue.counts();
                        tracing::info!(
                            "queue {}: {} ready, {} dead, in RabbitMQ",
                            config.name,
                            counts.ready,
                            counts.dead
                        );
                        queues.push((config.clone(), queue));
                    }
                    Err(err) => errors.push(config.site.error(err.to_string())),
                }
                continue;
            }
            match Queue::open(&config.name, &config.dir, settings, limits) {
                Ok((queue, recovered)) => {
                    if let Some((path, offset, dropped)) = &recovered.torn_tail {
                        tracing::warn!(
                            "queue {}: dropped a torn record at the end of {} (offset {offset}, {dropped} bytes): \
                             a write a crash cut short, never acknowledged",
                            config.name,
                            path.display()
                        );
                    }
                    if let Some(repaired) = &recovered.repaired {
                        tracing::warn!(
                            "queue {}: {} had damage with whole records after it: {} bytes cut at offset(s) {:?}, {} records kept; the file as it was is {}",
                            config.name,
                            repaired.path.display(),
                            repaired.cut.iter().map(|(_, bytes)| bytes).sum::<u64>(),
                            repaired.cut.iter().map(|(offset, _)| offset).collect::<Vec<_>>(),
                            repaired.kept,
                            repaired.original.display()
                        );
                    }
                    let counts = queue.counts();
                    tracing::info!(
                        "queue {}: {} ready, {} dead, from {} records in {} segment(s) in {}",
                        config.name,
                        counts.ready,
                        counts.dead,
                        recovered.records,
                        recovered.segments,
                        config.dir.display()
                    );
                    queues.push((config.clone(), queue));
                }
                Err(err) => errors.push(config.site.error(err.to_string())),
            }
        }
        if errors.is_empty() {
            Ok(Queues { queues })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Queue>> {
        self.queues.iter().find(|(config, _)| config.name == name).map(|(_, queue)| queue)
    }

    /// The queue, if the gateway may publish to it.
    pub fn public(&self, name: &str) -> Option<&Arc<Queue>> {
        self.queues
            .iter()
            .find(|(config, _)| config.name == name && config.publish == Publish::Public)
            .map(|(_, queue)| queue)
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    pub fn status(&self) -> Vec<QueueStatus> {
        let now = now_ms();
        self.queues
            .iter()
            .map(|(config, queue)| {
                let counts = queue.counts();
                let totals = queue.totals();
                QueueStatus {
                    queue: config.name.clone(),
                    ready: counts.ready - counts.delayed,
                    delayed: counts.delayed,
                    in_flight: counts.in_flight,
                    dead: counts.dead,
                    bytes: counts.bytes,
                    oldest_age_seconds: counts
                        .oldest_enqueued_at
                        .map(|at| now.saturating_sub(at) as f64 / 1000.0),
                    published: totals.published.load(Ordering::Relaxed),
                    delivered: totals.delivered.load(Ordering::Relaxed),
                    acked: totals.acked.load(Ordering::Relaxed),
                    retried: totals.retried.load(Ordering::Relaxed),
                    dead_lettered: totals.dead.load(Ordering::Relaxed),
                    redriven: totals.redriven.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Frees old log segments now and again, until the process ends.
    pub async fn compact_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(COMPACT_EVERY).await;
            for (config, queue) in &self.queues {
                loop {
                    match queue.compact().await {
                        Ok(0) => break,
                        Ok(copied) => {
                            tracing::debug!("queue {}: copied {copied} messages forward", config.name)
                        }
                        Err(err) => {
                            tracing::warn!("queue {}: compaction failed: {err}", config.name);
                            break;
                        }
                    }
                }
            }
        }
    }
}

impl std::fmt::Debug for Queues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.queues.iter().map(|(config, _)| &config.name)).finish()
    }
}

/// The queues' gauges and counters, read from them at each scrape of `/metrics`.
#[derive(Debug)]
pub struct QueueMetrics(pub Arc<Queues>);

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct QueueLabels {
    queue: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StateLabels {
    queue: String,
    state: &'static str,
}

impl prometheus_client::collector::Collector for QueueMetrics {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        let statuses = self.0.status();
        let mut family = encoder.encode_descriptor(
            "queue_messages",
            "Messages held, by state: ready now, delayed (a delay or a retry's backoff), in flight, dead",
            None,
            MetricType::Gauge,
        )?;
        for status in &statuses {
            for (state, count) in [
                ("ready", status.ready),
                ("delayed", status.delayed),
                ("in_flight", status.in_flight),
                ("dead", status.dead),
            ] {
                let labels = StateLabels { queue: status.queue.clone(), state };
                ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        type Read = fn(&QueueStatus) -> u64;
        let gauges: [(&str, &str, Read); 1] =
            [("queue_bytes", "Payload bytes held, dead letters included", |s| s.bytes)];
        for (name, help, read) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for status in &statuses {
                let value = i64::try_from(read(status)).unwrap_or(i64::MAX);
                ConstGauge::new(value)
                    .encode(family.encode_family(&QueueLabels { queue: status.queue.clone() })?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "queue_oldest_age_seconds",
            "How long the oldest message not yet done with has waited",
            None,
            MetricType::Gauge,
        )?;
        for status in &statuses {
            let age = status.oldest_age_seconds.unwrap_or(0.0);
            ConstGauge::new(age)
                .encode(family.encode_family(&QueueLabels { queue: status.queue.clone() })?)?;
        }
        type Latency = fn(&Queue) -> &prometheus_client::metrics::histogram::Histogram;
        let histograms: [(&str, &str, Latency); 2] = [
            ("queue_publish_seconds", "How long a publish took to be on disk, per message", |q| {
                &q.latencies().publish
            }),
            ("queue_end_to_end_seconds", "From publish to a worker's ack, per message", |q| {
                &q.latencies().end_to_end
            }),
        ];
        for (name, help, read) in histograms {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (config, queue) in &self.0.queues {
                read(queue).encode(family.encode_family(&QueueLabels { queue: config.name.clone() })?)?;
            }
        }
        let counters: [(&str, &str, Read); 6] = [
            ("queue_published", "Messages published and durable", |s| s.published),
            ("queue_delivered", "Deliveries started (leases taken)", |s| s.delivered),
            ("queue_acked", "Messages a worker answered 2xx for", |s| s.acked),
            ("queue_retried", "Failed deliveries that will be retried", |s| s.retried),
            ("queue_dead_lettered", "Messages that used up their attempts", |s| s.dead_lettered),
            ("queue_redriven", "Dead letters put back in their queue", |s| s.redriven),
        ];
        for (name, help, read) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for status in &statuses {
                ConstCounter::new(read(status))
                    .encode(family.encode_family(&QueueLabels { queue: status.queue.clone() })?)?;
            }
        }
        Ok(())
    }
}
