//! The event-driven checkout through the real surge: an order is recorded with its first event
//! and an outbox row, the relay publishes it, the checkout workers run the saga (reserve stock,
//! charge, notify; or release and cancel; or reject), and the projector keeps the read model,
//! which `shop rebuild-read-model` makes again identically.

mod common;

use std::time::{Duration, Instant};

use common::Shop;
use hyper::StatusCode;
use serde_json::json;

/// Waits until order `id`'s status is one of `done`; returns it.
async fn settled(shop: &Shop, id: i64, done: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let order = shop.get(&format!("/orders/{id}")).await.json();
        let status = order["status"].as_str().unwrap_or_default().to_owned();
        if done.contains(&status.as_str()) {
            return status;
        }
        assert!(Instant::now() < deadline, "order {id} stuck at {status}\n{}", shop.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_paid_cancelled_or_rejected_and_the_books_agree() {
    let shop = Shop::start(|config| config).await;
    let user = shop.post("/users", json!({ "email": "buyer@example.com", "name": "Buyer" })).await.json()
        ["id"]
        .as_i64()
        .expect("a user");
    let tea = shop.product("Green tea", 500, 10).await;
    let pot = shop.product("Teapot", 2500, 1).await;
    let place = |items: serde_json::Value, card: &str| {
        shop.post("/orders", json!({ "user_id": user, "items": items, "card": card }))
    };

    let paid = place(json!([{ "product_id": tea, "quantity": 3 }]), "4242424242424242").await;
    assert_eq!(paid.status, StatusCode::CREATED);
    assert_eq!(paid.json()["status"], "placed", "answered before payment, stock and notification");
    let paid = paid.json()["id"].as_i64().expect("an id");
    let declined = place(json!([{ "product_id": tea, "quantity": 2 }]), "4000000000000002").await.json()
        ["id"]
        .as_i64()
        .expect("an id");
    let short = place(json!([{ "product_id": pot, "quantity": 2 }]), "4242424242424242").await.json()["id"]
        .as_i64()
        .expect("an id");
    assert_eq!(settled(&shop, paid, &["paid", "cancelled", "rejected"]).await, "paid");
    assert_eq!(settled(&shop, declined, &["paid", "cancelled", "rejected"]).await, "cancelled");
    assert_eq!(settled(&shop, short, &["paid", "cancelled", "rejected"]).await, "rejected");

    // Stock: the paid order's 3 teas are gone; the declined order's 2 came back; the pot stays.
    let stock = |id: i64| {
        let shop = &shop;
        async move {
            shop.databases
                .number("catalog", &format!("SELECT stock::BIGINT FROM products WHERE id = {id}"))
                .await
        }
    };
    assert_eq!(stock(tea).await, 10 - 3);
    assert_eq!(stock(pot).await, 1);
    // Charges: one success for the paid order, one decline, none for the rejected one.
    assert_eq!(
        shop.databases
            .number(
                "payments",
                &format!("SELECT count(*) FROM charges WHERE order_id = {paid} AND status = 'succeeded'")
            )
            .await,
        1
    );
    assert_eq!(
        shop.databases
            .number(
                "payments",
                &format!("SELECT count(*) FROM charges WHERE order_id = {declined} AND status = 'declined'")
            )
            .await,
        1
    );
    assert_eq!(
        shop.databases
            .number("payments", &format!("SELECT count(*) FROM charges WHERE order_id = {short}"))
            .await,
        0
    );
    // One notification, for the paid order, once it is recorded.
    let deadline = Instant::now() + Duration::from_secs(30);
    while shop.databases.number("notifications", "SELECT count(*) FROM notifications").await < 1 {
        assert!(Instant::now() < deadline, "no notification\n{}", shop.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let notified = shop
        .databases
        .number("notifications", &format!("SELECT count(*) FROM notifications WHERE order_id = {paid}"))
        .await;
    assert_eq!(notified, 1);
    assert_eq!(shop.databases.number("notifications", "SELECT count(*) FROM notifications").await, 1);

    // The read model catches up with the events, and a rebuild from the events equals it.
    let summaries =
        "SELECT count(*) FROM order_summaries s JOIN orders o ON o.id = s.order_id WHERE s.status = o.status";
    let deadline = Instant::now() + Duration::from_secs(30);
    while shop.databases.number("orders", summaries).await < 3 {
        assert!(Instant::now() < deadline, "the read model lags\n{}", shop.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The user's order list is read from it.
    let history = shop.get(&format!("/orders/history?user_id={user}")).await.json();
    let listed: Vec<(i64, &str)> = history["orders"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|order| (order["order_id"].as_i64().unwrap_or(0), order["status"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(listed, [(short, "rejected"), (declined, "cancelled"), (paid, "paid")], "{history}");
    let live = shop.databases.number("orders", "SELECT hashtext(string_agg(order_id || status || amount_cents || events, ',' ORDER BY order_id))::BIGINT FROM order_summaries").await;
    let rebuilt = shop.databases.shop(&["rebuild-read-model"], &[]);
    assert!(rebuilt.contains("3 orders"), "{rebuilt}");
    let again = shop.databases.number("orders", "SELECT hashtext(string_agg(order_id || status || amount_cents || events, ',' ORDER BY order_id))::BIGINT FROM order_summaries").await;
    assert_eq!(live, again, "the rebuilt read model equals the live one");
    // Every message was published and applied; none is dead.
    assert_eq!(shop.databases.number("orders", "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await, 0);
    let status = shop.status().await;
    for queue in status["queues"].as_array().cloned().unwrap_or_default() {
        assert_eq!(queue["dead"], 0, "{queue}");
    }
}
