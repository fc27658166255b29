use bytes::Bytes;
use proptest::prelude::*;

use super::*;

const SETTINGS: Settings = Settings {
    max_attempts: 3,
    lease: 1_000,
    backoff_base: 100,
    backoff_cap: 1_000,
    dead_letter: true,
    idempotency_window: 10_000,
};

fn stored(id: u64, at: u64, key: Option<&str>) -> Stored {
    Stored {
        id,
        enqueued_at: at,
        ready_at: at,
        attempts: 0,
        content_type: None,
        idempotency_key: key.map(str::to_owned),
        traceparent: None,
        payload: Bytes::new(),
    }
}

fn location(id: u64) -> Location {
    Location { segment: id / 4, offset: id * 100, len: 10 }
}

/// A queue holding messages 1 to `count`, published at 0.
fn queue_of(count: u64) -> QueueState {
    let mut state = QueueState::new(SETTINGS, 1);
    for _ in 0..count {
        let id = state.take_id();
        state.admit(&stored(id, 0, None), location(id));
    }
    state
}

#[test]
fn messages_are_leased_oldest_first_and_acked_once() {
    let mut state = queue_of(3);
    let first = state.lease(0, 2);
    assert_eq!(first.iter().map(|d| d.id).collect::<Vec<_>>(), [1, 2]);
    assert!(first.iter().all(|d| d.attempt == 1 && d.until == 1_000));
    assert_eq!(state.counts(0).in_flight, 2);
    assert_eq!(state.ack(1, first[0].token), Ok(Record::Ack { id: 1 }));
    assert_eq!(state.ack(1, first[0].token), Err(Stale { id: 1 }), "acked twice");
    assert_eq!(state.ack(2, first[0].token), Err(Stale { id: 2 }), "another lease's token");
    assert_eq!(state.len(), 2);
}

#[test]
fn a_failure_backs_off_and_the_last_one_is_dead() {
    let mut state = queue_of(1);
    let mut now = 0;
    for attempt in 1..=3 {
        let delivery = state.lease(now, 1).pop().expect("ready");
        assert_eq!(delivery.attempt, attempt);
        let (record, failed) = state.fail(1, delivery.token, now, "answered 500", 0.0).expect("held");
        if attempt < 3 {
            let wait = 100 * (1 << (attempt - 1)) / 2;
            assert_eq!(failed, Failed::RetryAt(now + wait));
            assert!(state.lease(now + wait - 1, 1).is_empty(), "not before its backoff");
            now += wait;
        } else {
            assert_eq!(failed, Failed::Dead);
            assert_eq!(record, Record::Dead { id: 1, attempts: 3, error: "answered 500".into() });
        }
    }
    assert!(state.lease(u64::MAX, 1).is_empty(), "dead letters are not delivered");
    let dead = state.dead_letters(10);
    assert_eq!((dead[0].id, dead[0].attempts, dead[0].error.as_deref()), (1, 3, Some("answered 500")));

    assert_eq!(state.redrive(None, now), [Record::Redrive { id: 1 }]);
    assert_eq!(state.lease(now, 1).pop().map(|d| d.attempt), Some(1), "redriven with its attempts cleared");
}

#[test]
fn a_lease_that_runs_out_counts_as_a_failure() {
    let mut state = queue_of(1);
    let delivery = state.lease(0, 1).pop().expect("ready");
    assert!(state.expire(999, || 0.0).is_empty());
    let renewed = state.renew(1, delivery.token, 500).expect("held");
    assert_eq!(renewed, 1_500);
    assert!(state.expire(1_000, || 0.0).is_empty(), "renewed");
    let expired = state.expire(1_500, || 0.0);
    assert_eq!(expired.len(), 1);
    assert!(matches!(expired[0].2, Failed::RetryAt(1_550)));
    assert_eq!(state.ack(1, delivery.token), Ok(Record::Ack { id: 1 }), "a late answer still counts");
}

#[test]
fn a_late_answer_after_a_new_lease_is_stale() {
    let mut state = queue_of(1);
    let old = state.lease(0, 1).pop().expect("ready");
    state.expire(1_000, || 0.0);
    let new = state.lease(2_000, 1).pop().expect("ready again");
    assert_eq!(new.attempt, 2);
    assert_eq!(state.ack(1, old.token), Err(Stale { id: 1 }));
    assert!(state.ack(1, new.token).is_ok());
}

#[test]
fn deferring_counts_no_attempt() {
    let mut state = queue_of(1);
    let delivery = state.lease(0, 1).pop().expect("ready");
    state.defer(1, delivery.token, 5_000, 0).expect("held");
    assert!(state.lease(4_999, 1).is_empty());
    assert_eq!(state.next_due(0), Some(5_000));
    assert_eq!(state.lease(5_000, 1).pop().map(|d| d.attempt), Some(1));
}

#[test]
fn idempotency_keys_name_their_message_until_the_window_passes() {
    let mut state = QueueState::new(SETTINGS, 1);
    let id = state.take_id();
    state.admit(&stored(id, 100, Some("order-1")), location(id));
    assert_eq!(state.keyed("order-1", 5_000), Some(id));
    let delivery = state.lease(5_000, 1).pop().expect("ready");
    state.ack(id, delivery.token).expect("held");
    assert_eq!(state.keyed("order-1", 10_099), Some(id), "acked, the key still names it");
    assert_eq!(state.keyed("order-1", 10_100), None);
}

#[test]
fn a_key_reused_after_its_window_names_the_new_message_after_a_replay() {
    let first = stored(1, 0, Some("order-1"));
    let second = stored(2, 20_000, Some("order-1"));
    let mut state = QueueState::new(SETTINGS, 1);
    // Replay admits both without asking for the key in between, as recovery does.
    state.admit(&first, location(1));
    state.admit(&second, location(2));
    assert_eq!(state.keyed("order-1", 20_001), Some(2), "the first message's expiry left the second named");
    assert_eq!(state.keyed("order-1", 30_000), None);
}

#[test]
fn segments_empty_as_their_messages_go() {
    let mut state = queue_of(8);
    assert_eq!(state.oldest_segment_in_use(), Some(0));
    // Messages 1 to 3 are in segment 0.
    for delivery in state.lease(0, 3) {
        assert_eq!(delivery.location.segment, 0);
        state.ack(delivery.id, delivery.token).expect("held");
    }
    assert_eq!(state.oldest_segment_in_use(), Some(1));
    // A leased message is not copied: its delivery may be reading it.
    let leased = state.lease(0, 1).pop().expect("message 4");
    assert!(!state.held_in(1).iter().any(|(id, _)| *id == leased.id));
    state.defer(leased.id, leased.token, 0, 0).expect("held");
    // Copied forward, a message moves to its new segment.
    let (id, _) = state.held_in(1)[0];
    state.admit(&stored(id, 0, None), Location { segment: 9, offset: 0, len: 10 });
    assert_eq!((state.held_in(1).len(), state.held_in(9).len()), (3, 1));
    assert_eq!(state.bytes(), 5 * 10, "a copy adds no bytes");
}

#[test]
fn backoff_doubles_up_to_its_cap() {
    let waits: Vec<u64> = (1..=6).map(|attempt| backoff(&SETTINGS, attempt, 1.0)).collect();
    assert_eq!(waits, [100, 200, 400, 800, 1_000, 1_000]);
    assert_eq!(backoff(&SETTINGS, 1, 0.0), 50);
}

/// One step of a property run.
#[derive(Debug, Clone)]
enum Step {
    Publish { key: Option<u8>, delay: u64 },
    Lease(usize),
    Ack(usize),
    Fail(usize),
    Defer(usize, u64),
    Renew(usize),
    Advance(u64),
    Redrive,
    Purge,
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (proptest::option::weighted(0.3, 0u8..4), prop_oneof![Just(0u64), 0u64..3_000])
            .prop_map(|(key, delay)| Step::Publish { key, delay }),
        3 => (1usize..4).prop_map(Step::Lease),
        3 => any::<usize>().prop_map(Step::Ack),
        2 => any::<usize>().prop_map(Step::Fail),
        1 => (any::<usize>(), 0u64..2_000).prop_map(|(i, d)| Step::Defer(i, d)),
        1 => any::<usize>().prop_map(Step::Renew),
        2 => (0u64..1_500).prop_map(Step::Advance),
        1 => Just(Step::Redrive),
        1 => Just(Step::Purge),
        1 => Just(Step::Restart),
    ]
}

/// What must survive a restart of each message: its attempts and whether it is dead.
fn durable_view(state: &QueueState) -> Vec<(u64, u32, bool)> {
    let mut view: Vec<(u64, u32, bool)> = state
        .messages
        .iter()
        .map(|(id, entry)| (*id, entry.attempts, entry.status == Status::Dead))
        .collect();
    view.sort_unstable();
    view
}

/// Rebuilds a queue from the log, as recovery does.
fn replayed(log: &[Record], first_token: u64) -> QueueState {
    let mut state = QueueState::new(SETTINGS, first_token);
    for record in log {
        match record {
            Record::Publish(stored) => state.admit(stored, location(stored.id)),
            other => state.replay(other),
        }
    }
    state
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Against a model of which messages exist: a message is acked at most once and only
    /// by its current lease, is never lost, never exceeds its attempts, and a restart from the
    /// log gives back every message with its attempts and dead-or-not.
    #[test]
    fn the_state_matches_its_model_and_its_log(steps in proptest::collection::vec(step(), 1..80)) {
        let mut state = QueueState::new(SETTINGS, 1);
        let mut log: Vec<Record> = Vec::new();
        let mut now = 1_000u64;
        // The model: every message published and not yet gone, and the one key each names.
        let mut alive: BTreeSet<u64> = BTreeSet::new();
        let mut keys: HashMap<u8, (u64, u64)> = HashMap::new();
        let mut held: Vec<Delivery> = Vec::new();
        let mut restarts = 0u64;
        for step in steps {
            match step {
                Step::Publish { key, delay } => {
                    let named = key.and_then(|k| keys.get(&k).filter(|(_, at)| now < at + SETTINGS.idempotency_window));
                    let text = key.map(|k| format!("key-{k}"));
                    let found = text.as_deref().and_then(|k| state.keyed(k, now));
                    prop_assert_eq!(found, named.map(|(id, _)| *id));
                    if found.is_some() {
                        continue;
                    }
                    let id = state.take_id();
                    let mut message = stored(id, now, text.as_deref());
                    message.ready_at = now + delay;
                    state.admit(&message, location(id));
                    log.push(Record::Publish(message));
                    alive.insert(id);
                    if let Some(k) = key {
                        keys.insert(k, (id, now));
                    }
                }
                Step::Lease(n) => {
                    let leased = state.lease(now, n);
                    for delivery in &leased {
                        prop_assert!(alive.contains(&delivery.id));
                        prop_assert!(delivery.attempt <= SETTINGS.max_attempts);
                        prop_assert!(!held.iter().any(|h| h.id == delivery.id && state.leased_by(h.id, h.token).is_ok()));
                    }
                    held.extend(leased);
                }
                Step::Ack(i) if !held.is_empty() => {
                    let delivery = held.remove(i % held.len());
                    let holds = state.leased_by(delivery.id, delivery.token).is_ok();
                    match state.ack(delivery.id, delivery.token) {
                        Ok(record) => {
                            prop_assert!(alive.remove(&delivery.id), "acked a message that was gone");
                            log.push(record);
                        }
                        Err(_) => prop_assert!(!holds, "a held lease could not ack"),
                    }
                }
                Step::Fail(i) if !held.is_empty() => {
                    let delivery = held.remove(i % held.len());
                    if let Ok((record, failed)) = state.fail(delivery.id, delivery.token, now, "failed", 0.5) {
                        if failed == Failed::Dead {
                            prop_assert_eq!(delivery.attempt, SETTINGS.max_attempts);
                        }
                        log.push(record);
                    }
                }
                Step::Defer(i, by) if !held.is_empty() => {
                    let delivery = held.remove(i % held.len());
                    if let Ok(record) = state.defer(delivery.id, delivery.token, now + by, now) {
                        log.push(record);
                    }
                }
                Step::Renew(i) if !held.is_empty() => {
                    let delivery = &held[i % held.len()];
                    let _ = state.renew(delivery.id, delivery.token, now);
                }
                Step::Advance(by) => {
                    now += by;
                    for (_, record, _) in state.expire(now, || 0.5) {
                        log.push(record);
                    }
                }
                Step::Redrive => log.extend(state.redrive(None, now)),
                Step::Purge => {
                    let records = state.purge(None);
                    for record in &records {
                        if let Record::Ack { id } = record {
                            alive.remove(id);
                        }
                    }
                    log.extend(records);
                }
                Step::Restart => {
                    restarts += 1;
                    let before = durable_view(&state);
                    state = replayed(&log, 1 + restarts * 1_000_000);
                    prop_assert_eq!(durable_view(&state), before);
                    prop_assert_eq!(state.counts(now).in_flight, 0);
                    // Leases from before the restart settle nothing.
                    for delivery in held.drain(..) {
                        prop_assert!(state.ack(delivery.id, delivery.token).is_err());
                    }
                }
                _ => {}
            }
            let ids: BTreeSet<u64> = state.messages.keys().copied().collect();
            prop_assert_eq!(&ids, &alive, "messages lost or invented");
            let counts = state.counts(now);
            prop_assert_eq!(counts.ready + counts.in_flight + counts.dead, alive.len() as u64);
            prop_assert_eq!(counts.bytes, alive.len() as u64 * 10);
        }
    }
}
