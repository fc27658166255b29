//! The chaos test with the shop's queues on the RabbitMQ of this machine: the broker is
//! restarted once instead of surge (tests/common/chaos.rs says what runs and what is checked).

mod common;

use common::chaos::{chaos, Backend, BrokerQueues};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_rabbitmq_kill_everything_and_restart_the_broker_and_the_books_still_balance() {
    let broker = BrokerQueues(format!("shoptest-{}", std::process::id()));
    chaos(Backend::Amqp(&broker)).await;
}
