//! The chaos test: a checkout load (some cards declined, some products short), and meanwhile
//! SIGKILL at random: shop service instances, checkout and projection workers, the relay, the
//! card processor, and surge itself (started again). Then the system settles, and the books are
//! checked from the databases: every order in exactly one terminal state, stock conserved,
//! exactly one successful charge per paid order and none for the others, exactly one
//! notification per paid order, the read model equal to the fold of the events, the sales view
//! equal to the paid orders, and no dead letter.
//!
//! It stops processes on this machine and runs for about a minute on each backend; each backend
//! has a test file of its own (`chaos.rs`, `chaos_rabbitmq.rs`), since cargo runs test files one
//! after another and nothing else may run meanwhile.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Databases, Shop};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

/// Orders the load places in all.
const ORDERS: u64 = 300;
const PRODUCTS: usize = 8;
/// Each product's stock at the start: less than the orders will ask for, so some are short.
const STOCK: i64 = 120;
/// How long processes are killed for.
const CHAOS: Duration = Duration::from_secs(60);

/// One POST /orders with its key, tried again (same key) until it is answered 201 or 422.
async fn place(gateway: &str, key: &str, order: &serde_json::Value) -> Option<i64> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = String::new();
    while Instant::now() < deadline {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{gateway}/orders"))
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from(order.to_string())))
            .expect("request");
        let answer = tokio::time::timeout(Duration::from_secs(10), client.request(request)).await;
        if let Ok(Ok(response)) = answer {
            let status = response.status();
            let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            if status == StatusCode::CREATED {
                let order: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                return order["id"].as_i64();
            }
            if status == StatusCode::UNPROCESSABLE_ENTITY {
                return None;
            }
            assert!(
                !status.is_client_error() || status == StatusCode::TOO_MANY_REQUESTS,
                "{status}: {}",
                String::from_utf8_lossy(&body)
            );
            last = format!("{status}: {}", String::from_utf8_lossy(&body));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("order {key} was never placed; the last answer: {last}");
}

/// Where the shop's queues are kept, and what the chaos stops besides the shop's processes.
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    /// Surge's own log; surge itself is killed and started again.
    Embedded,
    /// RabbitMQ on this machine; the broker is restarted (once) instead of surge.
    Amqp(&'a BrokerQueues),
}

/// The RabbitMQ queues a test made (its queues, their dead letters and delay queues), deleted
/// when it ends, passed or not.
pub struct BrokerQueues(pub String);

impl Drop for BrokerQueues {
    fn drop(&mut self) {
        let listed = std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "-q", "--no-table-headers", "name"])
            .output();
        let names = listed.map(|out| String::from_utf8_lossy(&out.stdout).into_owned()).unwrap_or_default();
        for name in names.lines().map(str::trim).filter(|name| name.starts_with(&self.0)) {
            let _ = std::process::Command::new("rabbitmqctl").args(["delete_queue", name]).output();
        }
    }
}

/// The shop's queues on RabbitMQ, each under a name of this test's.
fn on_broker(config: String, prefix: &str) -> String {
    ["shop-reports", "shop-checkout", "shop-order-changes"].iter().fold(config, |config, queue| {
        config.replace(
            &format!("[queues.{queue}]\n"),
            &format!(
                "[queues.{queue}]\nbackend = \"amqp\"\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nbroker_queue = \"{prefix}-{queue}\"\n"
            ),
        )
    })
}

/// Restarts the machine's RabbitMQ application (the node stays), bounded.
fn restart_broker() {
    for action in ["stop_app", "start_app"] {
        let done = std::process::Command::new("timeout").args(["60", "rabbitmqctl", action]).status();
        assert!(done.is_ok_and(|status| status.success()), "rabbitmqctl {action} failed");
    }
}

pub async fn chaos(backend: Backend<'_>) {
    // One good card in five is declined at random by the processor, which takes 150 ms a call:
    // a charge is in flight long enough for kills to land in the middle of one.
    let mut shop = Shop::start(|config| {
        let config = config.replace(
            "SHOP_PROVIDER_LATENCY = \"20ms\"",
            "SHOP_PROVIDER_LATENCY = \"150ms\", SHOP_PROVIDER_DECLINE_RATE = \"0.2\"",
        );
        match backend {
            Backend::Embedded => config,
            Backend::Amqp(broker) => on_broker(config, &broker.0),
        }
    })
    .await;
    let mut users = Vec::new();
    for n in 0..10 {
        let made =
            shop.post("/users", json!({ "email": format!("chaos{n}@example.com"), "name": "Chaos" })).await;
        users.push(made.json()["id"].as_i64().expect("a user"));
    }
    let mut products = Vec::new();
    for n in 0..PRODUCTS {
        let made = shop
            .post("/products", json!({ "name": format!("Thing {n}"), "category": "chaos", "price_cents": 100 + n as i64, "stock": STOCK }))
            .await;
        products.push(made.json()["id"].as_i64().expect("a product"));
    }

    // The load: ORDERS orders of one to three products, placed by four clients.
    let placed = Arc::new(AtomicU64::new(0));
    let gateway = shop.gateway.clone();
    let mut clients = Vec::new();
    for client in 0..4u64 {
        let (gateway, users, products, placed) =
            (gateway.clone(), users.clone(), products.clone(), Arc::clone(&placed));
        clients.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(client);
            let mut ids = Vec::new();
            for n in (client..ORDERS).step_by(4) {
                let lines = 1 + rng.usize(..3);
                let mut items: Vec<serde_json::Value> = Vec::new();
                for product in rng.choose_multiple(products.iter(), lines) {
                    items.push(json!({ "product_id": product, "quantity": 1 + rng.i64(0..3) }));
                }
                let order = json!({ "user_id": users[rng.usize(..users.len())], "items": items });
                if let Some(id) = place(&gateway, &format!("chaos-{n}"), &order).await {
                    ids.push(id);
                }
                placed.fetch_add(1, Ordering::Relaxed);
                // Spread over the chaos: about 75 orders a client in a minute.
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            ids
        }));
    }

    // Meanwhile: a kill every second or two, of a random kind.
    let mut kills: BTreeMap<&str, u32> = BTreeMap::new();
    let mut rng = fastrand::Rng::with_seed(7);
    let started = Instant::now();
    while started.elapsed() < CHAOS && placed.load(Ordering::Relaxed) < ORDERS {
        tokio::time::sleep(Duration::from_millis(1000 + rng.u64(..1000))).await;
        let victim = [
            "users",
            "catalog",
            "orders",
            "payments",
            "notifications",
            "checkout",
            "projector",
            "relay",
            "provider",
            "surge",
        ][rng.usize(..10)];
        if victim == "surge" {
            match backend {
                Backend::Embedded => shop.kill_and_restart().await,
                Backend::Amqp(_) if !kills.contains_key("broker") => {
                    restart_broker();
                    *kills.entry("broker").or_default() += 1;
                    continue;
                }
                Backend::Amqp(_) => continue,
            }
        } else if let Some(pid) = rng.choice(shop.pids(victim).await) {
            let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
        } else {
            continue;
        }
        *kills.entry(victim).or_default() += 1;
    }
    let mut orders = Vec::new();
    for client in clients {
        orders.extend(client.await.expect("a client"));
    }

    // Settle: every order at a terminal state, every paid one notified, the outbox empty.
    let db = &shop.databases;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let open = db
            .number(
                "orders",
                "SELECT count(*) FROM orders WHERE status NOT IN ('paid', 'cancelled', 'rejected')",
            )
            .await;
        let unsent = db.number("orders", "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await;
        let paid = db.number("orders", "SELECT count(*) FROM orders WHERE status = 'paid'").await;
        let notified = db.number("notifications", "SELECT count(*) FROM notifications").await;
        let projected = db
            .number("orders", "SELECT count(*) FROM orders o JOIN order_summaries s ON s.order_id = o.id AND s.status = o.status")
            .await;
        let total = db.number("orders", "SELECT count(*) FROM orders").await;
        if open == 0 && unsent == 0 && notified == paid && projected == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled: {open} orders open, {unsent} unsent, {paid} paid, {notified} notified, {projected} of {total} projected\n{}",
            shop.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Every order placed is there once, in one terminal state.
    let total = db.number("orders", "SELECT count(*) FROM orders").await;
    assert_eq!(total as usize, orders.len(), "one order a key");
    let by_status = |status: &'static str| async move {
        db.number("orders", &format!("SELECT count(*) FROM orders WHERE status = '{status}'")).await
    };
    let (paid, cancelled, rejected) =
        (by_status("paid").await, by_status("cancelled").await, by_status("rejected").await);
    assert_eq!(paid + cancelled + rejected, total);

    // Stock: what is left is the start less what paid orders took; never negative (a CHECK).
    for product in &products {
        let taken = db
            .number(
                "orders",
                &format!(
                    "SELECT coalesce(sum(i.quantity), 0)::BIGINT FROM order_items i JOIN orders o ON o.id = i.order_id \
                     WHERE o.status = 'paid' AND i.product_id = {product}"
                ),
            )
            .await;
        let left =
            db.number("catalog", &format!("SELECT stock::BIGINT FROM products WHERE id = {product}")).await;
        assert_eq!(left, STOCK - taken, "product {product}: {STOCK} at the start, {taken} paid for");
    }
    // Charges: exactly one success per paid order, none for the others, at payments and at the
    // processor alike.
    let paid_ids = id_list(db, "SELECT string_agg(id::TEXT, ',') FROM orders WHERE status = 'paid'").await;
    let succeeded = db.number("payments", "SELECT count(*) FROM charges WHERE status = 'succeeded'").await;
    assert_eq!(succeeded, paid, "one successful charge per paid order");
    let distinct = db
        .number("payments", "SELECT count(DISTINCT order_id) FROM charges WHERE status = 'succeeded'")
        .await;
    assert_eq!(distinct, paid);
    if !paid_ids.is_empty() {
        let of_paid = db
            .number(
                "payments",
                &format!(
                    "SELECT count(*) FROM charges WHERE status = 'succeeded' AND order_id IN ({paid_ids})"
                ),
            )
            .await;
        assert_eq!(of_paid, paid, "the successful charges are the paid orders'");
    }
    let at_processor = db
        .number("provider", "SELECT count(*) FROM charges WHERE status = 'succeeded' AND NOT refunded")
        .await;
    assert_eq!(at_processor, paid, "the processor holds as many successful charges");
    // Notifications: exactly one per paid order.
    assert_eq!(db.number("notifications", "SELECT count(*) FROM notifications").await, paid);
    assert_eq!(db.number("notifications", "SELECT count(DISTINCT order_id) FROM notifications").await, paid);
    // The read model is the fold of the events: rebuilding it changes nothing.
    let digest = "SELECT coalesce(hashtext(string_agg(order_id || status || amount_cents || events, ',' ORDER BY order_id)), 0)::BIGINT FROM order_summaries";
    let live = db.number("orders", digest).await;
    db.shop(&["rebuild-read-model"], &[]);
    assert_eq!(db.number("orders", digest).await, live, "the read model equals the fold of the events");
    // The sales view, refreshed, is the paid orders.
    let refreshed = shop.request(Method::POST, "/reports/monthly-sales/refresh", &[], None).await;
    assert_eq!(refreshed.status, StatusCode::OK);
    let viewed =
        db.number("orders", "SELECT coalesce(sum(amount_cents), 0)::BIGINT FROM monthly_sales").await;
    let summed = db
        .number("orders", "SELECT coalesce(sum(amount_cents), 0)::BIGINT FROM orders WHERE status = 'paid'")
        .await;
    assert_eq!(viewed, summed);
    // No dead letters.
    let status = shop.status().await;
    for queue in status["queues"].as_array().cloned().unwrap_or_default() {
        assert_eq!(queue["dead"], 0, "{queue}");
    }

    let log = shop.log();
    let absorbed = log.matches("duplicate absorbed").count();
    let redelivered = log.matches("redelivery: attempt").count();
    eprintln!(
        "chaos: {total} orders ({paid} paid, {cancelled} cancelled, {rejected} rejected); kills {kills:?}; \
         {redelivered} redeliveries; {absorbed} duplicate deliveries absorbed; \
         {cancelled} compensations (stock released)"
    );
}

/// A comma-separated list from one query.
async fn id_list(db: &Databases, sql: &str) -> String {
    let mut connection = db.connect("orders").await;
    let list: Option<String> = sqlx::query_scalar(sql).fetch_one(&mut connection).await.expect("ids");
    list.unwrap_or_default()
}
