//! Scheduled jobs: a message published to a queue at each tick of a cron expression. Each
//! tick's publish carries the idempotency key `schedule:NAME:TICK`, so a surge restarted
//! within a tick does not publish it twice. Ticks that pass while surge is down are skipped,
//! as cron skips them. With an amqp queue that several nodes share, one node fires a
//! schedule's ticks: the one holding its leader queue at the broker (see `amqp`).

use std::sync::Arc;

use bytes::Bytes;
use surge_config::ScheduleConfig;

use crate::{NewMessage, Queue};

/// The message of one tick (seconds since the epoch).
pub fn tick_message(schedule: &ScheduleConfig, tick: i64) -> NewMessage {
    NewMessage {
        payload: Bytes::from(schedule.body.clone()),
        content_type: schedule.content_type.clone(),
        idempotency_key: Some(format!("schedule:{}:{tick}", schedule.name)),
        not_before: None,
        traceparent: None,
    }
}

/// Publishes at every tick of the schedule, until the task is dropped.
pub async fn fire_forever(queue: Arc<Queue>, schedule: ScheduleConfig) {
    // Checked when the configuration was read.
    let Ok(cron) = croner::Cron::new(&schedule.cron).with_seconds_optional().parse() else { return };
    loop {
        let now = chrono::Utc::now();
        let Ok(next) = cron.find_next_occurrence(&now, false) else {
            tracing::warn!("schedule {}: `{}` has no next time; it stops", schedule.name, schedule.cron);
            return;
        };
        tokio::time::sleep((next - now).to_std().unwrap_or_default()).await;
        if !queue.fires(&schedule.name).await {
            tracing::debug!("schedule {}: another node fires the tick of {next}", schedule.name);
            continue;
        }
        match queue.publish(vec![tick_message(&schedule, next.timestamp())]).await {
            Ok(published) if published.iter().all(|p| p.duplicate) => {
                tracing::debug!(
                    "schedule {}: the tick of {next} was published before a restart",
                    schedule.name
                );
            }
            Ok(_) => tracing::debug!("schedule {}: published for {next}", schedule.name),
            Err(err) => {
                tracing::warn!("schedule {}: the tick of {next} was not published: {err}", schedule.name)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tick_has_a_key_of_its_own() {
        let schedule = ScheduleConfig {
            name: "nightly".into(),
            cron: "0 3 * * *".into(),
            queue: "reports".into(),
            body: "build".into(),
            content_type: Some("text/plain".into()),
        };
        let first = tick_message(&schedule, 1_800_000_000);
        assert_eq!(first.idempotency_key.as_deref(), Some("schedule:nightly:1800000000"));
        assert_eq!(first.payload, "build");
        assert_ne!(tick_message(&schedule, 1_800_086_400).idempotency_key, first.idempotency_key);
    }
}
