//! `[queues.NAME]` and `[workers.NAME]`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use super::Validator;
use crate::model::{Publish, QueueBackend, QueueConfig, ScheduleConfig, ServiceConfig, WorkerConfig};
use crate::raw::{RawQueue, RawSchedule, RawWorker};

/// Where queues keep their logs unless `path` says otherwise, beside the configuration.
const DEFAULT_QUEUE_PATH: &str = ".surge/queues";
/// RabbitMQ's default frame and Sidekiq's advice are both well under this; a job payload is
/// a reference to data, not the data.
const DEFAULT_MAX_PAYLOAD: u64 = 1 << 20;

impl Validator<'_> {
    pub(super) fn queues(&mut self, raw: BTreeMap<String, Spanned<RawQueue>>) -> Vec<QueueConfig> {
        let mut queues: Vec<_> = raw.into_iter().collect();
        queues.sort_by_key(|(_, queue)| queue.span().start);
        queues.into_iter().filter_map(|(name, queue)| self.queue(name, queue)).collect()
    }

    fn queue(&mut self, name: String, raw: Spanned<RawQueue>) -> Option<QueueConfig> {
        let errors_before = self.errors.len();
        let key = format!("queues.{name}");
        let span = raw.span();
        self.name(&name, span.clone(), &key, "queue");
        let raw = raw.into_inner();
        let backend = self.queue_backend(&name, span.clone(), &raw);
        let base = self.file.parent().unwrap_or(Path::new("."));
        let folder = raw.path.as_ref().map_or(DEFAULT_QUEUE_PATH, |path| path.get_ref().as_str());
        let dir = base.join(folder).join(&name);
        let max_attempts = match raw.max_attempts {
            Some(n) if *n.get_ref() == 0 => {
                self.error(n.span(), format!("{key}.max_attempts"), "must be at least 1");
                5
            }
            Some(n) => n.into_inner(),
            None => 5,
        };
        let backoff_base =
            self.duration(raw.backoff.base, format!("{key}.backoff.base"), Duration::from_secs(1));
        let cap_span = raw.backoff.cap.as_ref().map(Spanned::span);
        let backoff_cap =
            self.duration(raw.backoff.cap, format!("{key}.backoff.cap"), Duration::from_secs(300));
        if let Some(span) = cap_span.filter(|_| backoff_cap < backoff_base) {
            self.error(span, format!("{key}.backoff.cap"), "must be at least `backoff.base`");
        }
        let lease = self.duration(raw.lease, format!("{key}.lease"), Duration::from_secs(30));
        let publish = match &raw.publish {
            None => Publish::Admin,
            Some(publish) => match publish.get_ref().as_str() {
                "admin" => Publish::Admin,
                "public" => Publish::Public,
                other => {
                    self.error(
                        publish.span(),
                        format!("{key}.publish"),
                        format!(
                            "\"{other}\" is not a choice: \"admin\" (the admin API only, the default) or \
                             \"public\" (the gateway too, at /queues/{name}/messages)"
                        ),
                    );
                    Publish::Admin
                }
            },
        };
        let result_ttl =
            self.duration(raw.result_ttl, format!("{key}.result_ttl"), Duration::from_secs(3600));
        let idempotency_window = self.duration(
            raw.idempotency_window,
            format!("{key}.idempotency_window"),
            Duration::from_secs(24 * 3600),
        );
        // The log's own bound on a record (surge_queue's MAX_PAYLOAD).
        const LARGEST_PAYLOAD: u64 = 64 << 20;
        if let Some(size) = raw.max_payload.filter(|size| size.0 > LARGEST_PAYLOAD) {
            self.errors.push(self.site(span.clone(), format!("{key}.max_payload")).error(format!(
                "{} bytes is over the largest message the log holds, 64 MiB (keep payloads small: a reference to the data, not the data)",
                size.0
            )));
        }
        let max_messages = match raw.max_messages {
            Some(n) if *n.get_ref() == 0 => {
                self.error(n.span(), format!("{key}.max_messages"), "must be at least 1");
                None
            }
            other => other.map(Spanned::into_inner),
        };
        if self.errors.len() > errors_before {
            return None;
        }
        Some(QueueConfig {
            site: self.site(span, key),
            name,
            backend: backend?,
            dir,
            max_attempts,
            backoff_base,
            backoff_cap,
            lease,
            dead_letter: raw.dead_letter.unwrap_or(true),
            max_messages,
            max_size: raw.max_size.map(|size| size.0),
            max_payload: raw.max_payload.map_or(DEFAULT_MAX_PAYLOAD, |size| size.0),
            result_ttl,
            publish,
            idempotency_window,
        })
    }

    /// `backend` and `url`: the embedded log, or a RabbitMQ broker at an `amqp://` URL.
    fn queue_backend(
        &mut self,
        name: &str,
        span: std::ops::Range<usize>,
        raw: &RawQueue,
    ) -> Option<QueueBackend> {
        let key = format!("queues.{name}");
        let (url, broker_queue) = (raw.url.as_ref(), raw.broker_queue.as_ref());
        match raw.backend.as_ref().map(|b| (b.get_ref().as_str(), b.span())) {
            None | Some(("embedded", _)) => {
                let amqp_only = [("url", url), ("broker_queue", broker_queue)];
                if let Some((field, value)) = amqp_only.into_iter().find_map(|(f, v)| v.map(|v| (f, v))) {
                    self.error(
                        value.span(),
                        format!("{key}.{field}"),
                        format!("only an amqp queue has a {field}; add `backend = \"amqp\"` or remove it"),
                    );
                    return None;
                }
                Some(QueueBackend::Embedded)
            }
            Some(("amqp", _)) => {
                let Some(url) = url else {
                    self.errors.push(self.site(span, format!("{key}.url")).error(
                        "an amqp queue needs the broker's URL, e.g. url = \"amqp://guest:guest@127.0.0.1:5672/%2f\"",
                    ));
                    return None;
                };
                let text = url.get_ref();
                if !(text.starts_with("amqp://") || text.starts_with("amqps://")) {
                    self.error(
                        url.span(),
                        format!("{key}.url"),
                        format!("\"{text}\" is not an amqp:// or amqps:// URL"),
                    );
                    return None;
                }
                if raw.max_size.is_some() {
                    self.errors.push(self.site(span, format!("{key}.max_size")).error(
                        "an amqp queue cannot bound its bytes (the broker does not report them over AMQP); use max_messages, or a max-length policy at the broker",
                    ));
                    return None;
                }
                if let Some(queue) = broker_queue {
                    let text = queue.get_ref();
                    let fits = !text.is_empty()
                        && text.len() <= 160
                        && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c));
                    if !fits {
                        self.error(
                            queue.span(),
                            format!("{key}.broker_queue"),
                            "a broker queue name is 1 to 160 letters, digits, '-', '_', '.' or ':' (surge adds .dead, .delay.N and .schedule.NAME.leader to it)",
                        );
                        return None;
                    }
                }
                let broker_queue = broker_queue.map_or(name, |q| q.get_ref().as_str()).to_owned();
                Some(QueueBackend::Amqp { url: text.clone(), broker_queue })
            }
            Some((other, span)) => {
                self.error(
                    span,
                    format!("{key}.backend"),
                    format!("unknown backend \"{other}\": the choices are \"embedded\" and \"amqp\""),
                );
                None
            }
        }
    }

    pub(super) fn workers(
        &mut self,
        raw: BTreeMap<String, Spanned<RawWorker>>,
        queues: &[QueueConfig],
        services: &[ServiceConfig],
    ) -> Vec<WorkerConfig> {
        let mut workers: Vec<_> = raw.into_iter().collect();
        workers.sort_by_key(|(_, worker)| worker.span().start);
        workers.into_iter().filter_map(|(name, worker)| self.worker(name, worker, queues, services)).collect()
    }

    fn worker(
        &mut self,
        name: String,
        raw: Spanned<RawWorker>,
        queues: &[QueueConfig],
        services: &[ServiceConfig],
    ) -> Option<WorkerConfig> {
        let errors_before = self.errors.len();
        let key = format!("workers.{name}");
        let span = raw.span();
        if services.iter().any(|service| service.name == name) {
            self.error(
                span.clone(),
                &key,
                format!("a service is named \"{name}\" too; workers and services share one namespace"),
            );
        }
        let (service, parts) = raw.into_inner().into_parts();
        let queue = match parts.queue {
            None => {
                self.error(
                    span.clone(),
                    format!("{key}.queue"),
                    "missing `queue`: the queue this pool consumes",
                );
                None
            }
            Some(queue) => self
                .names_a_queue(queue.span(), &format!("{key}.queue"), queue.get_ref())
                .then(|| queue.into_inner()),
        };
        let path = match parts.path {
            Some(path) if !path.get_ref().starts_with('/') => {
                self.error(path.span(), format!("{key}.path"), "a path starts with \"/\", such as \"/jobs\"");
                None
            }
            Some(path) => Some(path.into_inner()),
            None => Some("/".to_owned()),
        };
        let prefetch = match parts.prefetch {
            Some(n) if *n.get_ref() == 0 => {
                self.error(n.span(), format!("{key}.prefetch"), "must be at least 1");
                1
            }
            Some(n) => n.into_inner(),
            None => 1,
        };
        let lease = queue.as_ref().and_then(|q| queues.iter().find(|c| c.name == *q)).map(|q| q.lease);
        let timeout_span = parts.timeout.as_ref().map(Spanned::span);
        let timeout =
            self.duration(parts.timeout, format!("{key}.timeout"), lease.unwrap_or(Duration::from_secs(30)));
        if let (Some(span), Some(lease)) = (timeout_span, lease.filter(|lease| timeout > *lease)) {
            self.error(
                span,
                format!("{key}.timeout"),
                format!("must not be longer than the queue's lease ({lease:?}): a delivery outliving its lease is given to another instance too"),
            );
        }
        let max_rate = match parts.max_rate {
            Some(rate) if !(*rate.get_ref() > 0.0 && rate.get_ref().is_finite()) => {
                self.error(rate.span(), format!("{key}.max_rate"), "messages per second, more than 0");
                None
            }
            other => other.map(Spanned::into_inner),
        };
        let pool = self.service(name, Spanned::new(span, service), None);
        if self.errors.len() > errors_before {
            return None;
        }
        Some(WorkerConfig { pool: pool?, queue: queue?, path: path?, prefetch, timeout, max_rate })
    }

    pub(super) fn schedules(&mut self, raw: BTreeMap<String, Spanned<RawSchedule>>) -> Vec<ScheduleConfig> {
        let mut schedules: Vec<_> = raw.into_iter().collect();
        schedules.sort_by_key(|(_, schedule)| schedule.span().start);
        schedules.into_iter().filter_map(|(name, schedule)| self.schedule(name, schedule)).collect()
    }

    fn schedule(&mut self, name: String, raw: Spanned<RawSchedule>) -> Option<ScheduleConfig> {
        let key = format!("schedules.{name}");
        let span = raw.span();
        self.name(&name, span.clone(), &key, "schedule");
        let raw = raw.into_inner();
        let cron = match raw.cron {
            None => {
                self.error(
                    span.clone(),
                    format!("{key}.cron"),
                    "missing `cron`, such as \"*/5 * * * *\" (every five minutes)",
                );
                None
            }
            Some(cron) => match croner::Cron::new(cron.get_ref()).with_seconds_optional().parse() {
                Ok(_) => Some(cron.into_inner()),
                Err(err) => {
                    self.error(
                        cron.span(),
                        format!("{key}.cron"),
                        format!("not a cron expression ({err}): five fields, minute hour day month weekday, such as \"0 3 * * *\""),
                    );
                    None
                }
            },
        };
        let queue = match raw.queue {
            None => {
                self.error(span, format!("{key}.queue"), "missing `queue`: the queue it publishes to");
                None
            }
            Some(queue) => self
                .names_a_queue(queue.span(), &format!("{key}.queue"), queue.get_ref())
                .then(|| queue.into_inner()),
        };
        Some(ScheduleConfig {
            name,
            cron: cron?,
            queue: queue?,
            body: raw.body,
            content_type: raw.content_type,
        })
    }
}
