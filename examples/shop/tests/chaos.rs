//! The chaos test on Surge's embedded queues: surge itself is among what is killed
//! (tests/common/chaos.rs says what runs and what is checked).

mod common;

use common::chaos::{chaos, Backend};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_embedded_queues_kill_everything_under_checkout_load_and_the_books_still_balance() {
    chaos(Backend::Embedded).await;
}
