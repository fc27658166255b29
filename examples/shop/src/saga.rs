//! The checkout saga as a pure function: an order's state is the fold of its events
//! ([`fold`]), and what happens next is decided from the state and the outcome of the last
//! step ([`decide`]): the events to append and the step to run after. No I/O here; the saga
//! worker (`checkout.rs`) runs the steps against the other services and stores what this
//! decides, in one transaction with the message it answers.
//!
//! The happy path: placed → stock reserved → paid → notified (terminal: paid). Short stock
//! rejects the order without charging (terminal: rejected). A declined charge releases the
//! stock and cancels the order (terminal: cancelled). A charge that fails without an answer is
//! never decided here: the payments service resolves it with the processor, and the step runs
//! again (with the same idempotency key) until it has an outcome.

use serde::{Deserialize, Serialize};

/// What happened to an order, appended to `order_events` in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Placed { user_id: i64, amount_cents: i64, card: String },
    StockReserved,
    Rejected { reason: String },
    Paid { charge_id: i64 },
    PaymentDeclined { reason: String },
    StockReleased,
    Cancelled,
    Notified { kind: String },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Placed { .. } => "placed",
            Event::StockReserved => "stock_reserved",
            Event::Rejected { .. } => "rejected",
            Event::Paid { .. } => "paid",
            Event::PaymentDeclined { .. } => "payment_declined",
            Event::StockReleased => "stock_released",
            Event::Cancelled => "cancelled",
            Event::Notified { .. } => "notified",
        }
    }
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Nothing yet: no event.
    New,
    Placed,
    StockReserved,
    Paid,
    /// Declined: its stock is to be released.
    Declined,
    Rejected,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::New => "new",
            Status::Placed => "placed",
            Status::StockReserved => "stock_reserved",
            Status::Paid => "paid",
            Status::Declined => "declined",
            Status::Rejected => "rejected",
            Status::Cancelled => "cancelled",
        }
    }
}

/// An order as its events tell it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct State {
    pub status: Option<Status>,
    pub user_id: i64,
    pub amount_cents: i64,
    /// The card the order is to be charged on (a test card of the processor stand-in).
    pub card: String,
    pub charge_id: Option<i64>,
    pub notified: bool,
    /// Events folded so far: the next one's sequence number is this plus one.
    pub events: i32,
}

impl State {
    pub fn status(&self) -> Status {
        self.status.unwrap_or(Status::New)
    }
}

/// One event applied to a state; events that do not fit the state change nothing but the
/// count (the fold never fails: the log is the truth).
pub fn apply(mut state: State, event: &Event) -> State {
    state.events += 1;
    let next = match (state.status(), event) {
        (Status::New, Event::Placed { user_id, amount_cents, card }) => {
            state.user_id = *user_id;
            state.amount_cents = *amount_cents;
            state.card = card.clone();
            Status::Placed
        }
        (Status::Placed, Event::StockReserved) => Status::StockReserved,
        (Status::Placed, Event::Rejected { .. }) => Status::Rejected,
        (Status::StockReserved, Event::Paid { charge_id }) => {
            state.charge_id = Some(*charge_id);
            Status::Paid
        }
        (Status::StockReserved, Event::PaymentDeclined { .. }) => Status::Declined,
        (Status::Declined, Event::StockReleased) => Status::Declined,
        (Status::Declined, Event::Cancelled) => Status::Cancelled,
        (status, Event::Notified { .. }) => {
            state.notified = true;
            status
        }
        (status, _) => status,
    };
    state.status = Some(next);
    state
}

pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> State {
    events.into_iter().fold(State::default(), apply)
}

/// The saga's steps, each one message on the saga's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Reserve,
    Charge,
    Release,
    Notify,
}

/// How a step ended, as the worker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Reserved,
    ShortStock { product_id: i64 },
    Charged { charge_id: i64 },
    Declined { reason: String },
    Released,
    Notified,
}

/// What to append and what to run next.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Decision {
    pub events: Vec<Event>,
    pub next: Option<Step>,
}

/// The step an order in `state` waits for; `None`: nothing (done, or not placed).
pub fn pending(state: &State) -> Option<Step> {
    match state.status() {
        Status::Placed => Some(Step::Reserve),
        Status::StockReserved => Some(Step::Charge),
        Status::Declined => Some(Step::Release),
        Status::Paid if !state.notified => Some(Step::Notify),
        _ => None,
    }
}

/// What an outcome means for an order in `state`. An outcome for a step the order no longer
/// waits for (a redelivered message whose work was recorded already) decides nothing.
pub fn decide(state: &State, outcome: &Outcome) -> Decision {
    let decision = |events: Vec<Event>, next| Decision { events, next };
    match (pending(state), outcome) {
        (Some(Step::Reserve), Outcome::Reserved) => decision(vec![Event::StockReserved], Some(Step::Charge)),
        (Some(Step::Reserve), Outcome::ShortStock { product_id }) => {
            let reason = format!("not enough stock of product {product_id}");
            decision(vec![Event::Rejected { reason }], None)
        }
        (Some(Step::Charge), Outcome::Charged { charge_id }) => {
            decision(vec![Event::Paid { charge_id: *charge_id }], Some(Step::Notify))
        }
        (Some(Step::Charge), Outcome::Declined { reason }) => {
            decision(vec![Event::PaymentDeclined { reason: reason.clone() }], Some(Step::Release))
        }
        (Some(Step::Release), Outcome::Released) => {
            decision(vec![Event::StockReleased, Event::Cancelled], None)
        }
        (Some(Step::Notify), Outcome::Notified) => {
            decision(vec![Event::Notified { kind: "order_paid".into() }], None)
        }
        _ => Decision::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed() -> Event {
        Event::Placed { user_id: 7, amount_cents: 1200, card: "4242424242424242".into() }
    }

    /// Runs outcomes through decide and fold, as the worker does; the state at the end.
    fn run(outcomes: &[Outcome]) -> (State, Vec<Event>) {
        let mut log = vec![placed()];
        for outcome in outcomes {
            let state = fold(&log);
            log.extend(decide(&state, outcome).events);
        }
        (fold(&log), log)
    }

    #[test]
    fn the_happy_path_reserves_charges_and_notifies() {
        let state = fold(&[placed()]);
        assert_eq!((state.status(), pending(&state)), (Status::Placed, Some(Step::Reserve)));
        let (state, log) = run(&[Outcome::Reserved, Outcome::Charged { charge_id: 3 }, Outcome::Notified]);
        assert_eq!(state.status(), Status::Paid);
        assert!(state.notified);
        assert_eq!(state.charge_id, Some(3));
        assert_eq!(pending(&state), None);
        let kinds: Vec<&str> = log.iter().map(Event::kind).collect();
        assert_eq!(kinds, ["placed", "stock_reserved", "paid", "notified"]);
        assert_eq!(state.events, 4);
    }

    #[test]
    fn short_stock_rejects_without_charging() {
        let (state, log) = run(&[Outcome::ShortStock { product_id: 9 }]);
        assert_eq!(state.status(), Status::Rejected);
        assert_eq!(pending(&state), None, "nothing to charge, release or notify");
        assert!(matches!(&log[1], Event::Rejected { reason } if reason.contains("product 9")));
    }

    #[test]
    fn a_declined_charge_releases_the_stock_and_cancels() {
        let state = run(&[Outcome::Reserved]).0;
        let decision = decide(&state, &Outcome::Declined { reason: "card_declined".into() });
        assert_eq!(decision.next, Some(Step::Release));
        let (state, log) = run(&[
            Outcome::Reserved,
            Outcome::Declined { reason: "card_declined".into() },
            Outcome::Released,
        ]);
        assert_eq!(state.status(), Status::Cancelled);
        assert_eq!(state.charge_id, None, "never charged");
        let kinds: Vec<&str> = log.iter().map(Event::kind).collect();
        assert_eq!(kinds, ["placed", "stock_reserved", "payment_declined", "stock_released", "cancelled"]);
    }

    #[test]
    fn a_redelivered_outcome_decides_nothing_twice() {
        let (state, _) = run(&[Outcome::Reserved, Outcome::Charged { charge_id: 3 }]);
        assert_eq!(decide(&state, &Outcome::Reserved), Decision::default(), "reserved again after paying");
        assert_eq!(decide(&state, &Outcome::Charged { charge_id: 3 }), Decision::default(), "charged again");
        let (done, _) = run(&[Outcome::Reserved, Outcome::Charged { charge_id: 3 }, Outcome::Notified]);
        assert_eq!(decide(&done, &Outcome::Notified), Decision::default(), "notified once");
        let rejected = run(&[Outcome::ShortStock { product_id: 1 }]).0;
        assert_eq!(decide(&rejected, &Outcome::Charged { charge_id: 4 }), Decision::default());
    }

    #[test]
    fn every_outcome_in_every_status_leads_somewhere_known() {
        let outcomes = [
            Outcome::Reserved,
            Outcome::ShortStock { product_id: 1 },
            Outcome::Charged { charge_id: 1 },
            Outcome::Declined { reason: "x".into() },
            Outcome::Released,
            Outcome::Notified,
        ];
        // Every prefix of every path the saga can take, and every outcome after it.
        let paths: [&[Outcome]; 4] = [
            &[Outcome::Reserved, Outcome::Charged { charge_id: 1 }, Outcome::Notified],
            &[Outcome::ShortStock { product_id: 1 }],
            &[Outcome::Reserved, Outcome::Declined { reason: "x".into() }, Outcome::Released],
            &[],
        ];
        for path in paths {
            for cut in 0..=path.len() {
                let (state, _) = run(&path[..cut]);
                for outcome in &outcomes {
                    let decision = decide(&state, outcome);
                    let after = decision.events.iter().fold(state.clone(), apply);
                    if decision.events.is_empty() {
                        assert_eq!(decision.next, None, "{state:?} {outcome:?}");
                    } else {
                        assert_eq!(
                            pending(&after),
                            decision.next,
                            "the next step is what the new state waits for"
                        );
                    }
                }
            }
        }
    }
}
