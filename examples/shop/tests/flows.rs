//! The shop through Surge's gateway, end to end: sign-up, cached profile reads and their
//! invalidation, products cached at the gateway and purged by tag, orders placed once per key,
//! a user's orders by date, the monthly sales report against the SQL, payments that are made
//! once even when the processor never answers, and bad input named by its field.

mod common;

use common::Shop;
use hyper::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_up_read_update_order_and_report() {
    let shop = Shop::start(|config| config).await;

    // Sign-up, then the profile: the first read loads it, the second is a cache hit.
    let signed = shop.post("/users", json!({ "email": "Ada@Example.com ", "name": "Ada" })).await;
    assert_eq!(signed.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&signed.body));
    let user = signed.json();
    assert_eq!(user["email"], "ada@example.com", "stored trimmed and lower case");
    let id = user["id"].as_i64().expect("an id");
    let first = shop.get(&format!("/users/{id}")).await;
    assert_eq!((first.status, first.header("x-shop-cache")), (StatusCode::OK, "miss"));
    let second = shop.get(&format!("/users/{id}")).await;
    assert_eq!((second.status, second.header("x-shop-cache")), (StatusCode::OK, "hit"));
    assert_eq!(second.json()["name"], "Ada");
    // An update invalidates it: the next read loads the new name.
    let updated = shop
        .request(Method::PATCH, &format!("/users/{id}"), &[], Some(json!({ "name": "Ada Lovelace" })))
        .await;
    assert_eq!(updated.status, StatusCode::OK);
    let third = shop.get(&format!("/users/{id}")).await;
    assert_eq!((third.header("x-shop-cache"), &third.json()["name"]), ("miss", &json!("Ada Lovelace")));
    let found = shop.get("/users?email=ADA@example.com").await;
    assert_eq!(found.json()["id"], id);

    // Products: cached by the gateway, purged by tag when one changes.
    let tea = shop.product("Green tea", 450, 100).await;
    let pot = shop.product("Teapot", 2500, 10).await;
    let page = shop.get(&format!("/products/{tea}")).await;
    assert_eq!(page.header("cache-tag"), format!("product-{tea} products"));
    let again = shop.get(&format!("/products/{tea}")).await;
    assert!(again.header("cache-status").contains("hit"), "the gateway kept it: {:?}", again.headers);
    let repriced = shop
        .request(Method::PATCH, &format!("/products/{tea}"), &[], Some(json!({ "price_cents": 500 })))
        .await;
    assert_eq!(repriced.status, StatusCode::OK);
    let after = shop.get(&format!("/products/{tea}")).await;
    assert_eq!(after.json()["price_cents"], 500, "purged at the gateway: {:?}", after.headers);

    // An order, placed once however often it is sent with its key, at the catalog's prices.
    let key = [("idempotency-key", "checkout-1")];
    let items = json!({ "user_id": id, "items": [{ "product_id": tea, "quantity": 2 }, { "product_id": pot, "quantity": 1 }] });
    let placed = shop.request(Method::POST, "/orders", &key, Some(items.clone())).await;
    assert_eq!(placed.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&placed.body));
    let order = placed.json();
    assert_eq!(order["amount_cents"], 2 * 500 + 2500);
    let repeated = shop.request(Method::POST, "/orders", &key, Some(items)).await;
    assert_eq!(
        (repeated.status, repeated.json()),
        (StatusCode::CREATED, order.clone()),
        "the first answer again"
    );
    let other = json!({ "user_id": id, "items": [{ "product_id": pot, "quantity": 3 }] });
    assert_eq!(shop.post("/orders", other).await.status, StatusCode::CREATED);
    assert_eq!(shop.databases.number("orders", "SELECT count(*) FROM orders").await, 2);
    let listed = shop.get(&format!("/orders?user_id={id}")).await.json();
    assert_eq!(listed["orders"].as_array().map(Vec::len), Some(2));
    let fetched = shop.get(&format!("/orders/{}", order["id"])).await.json();
    assert_eq!(fetched["items"].as_array().map(Vec::len), Some(2));

    // Once both are paid (the checkout runs behind the answers), the report, refreshed, is the
    // SQL's sum of paid orders per month.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while shop.databases.number("orders", "SELECT count(*) FROM orders WHERE status = 'paid'").await < 2 {
        assert!(std::time::Instant::now() < deadline, "the orders were not paid\n{}", shop.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let refreshed = shop.request(Method::POST, "/reports/monthly-sales/refresh", &[], None).await;
    assert_eq!(refreshed.status, StatusCode::OK);
    let report = shop.get("/reports/monthly-sales").await.json();
    let months = report["months"].as_array().cloned().unwrap_or_default();
    let reported: i64 = months.iter().filter_map(|month| month["amount_cents"].as_i64()).sum();
    let summed = shop
        .databases
        .number("orders", "SELECT sum(amount_cents)::BIGINT FROM orders WHERE status = 'paid'")
        .await;
    assert_eq!(reported, summed);
    assert_eq!(summed, 3500 + 7500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_named_and_unknown_things_are_404() {
    let shop = Shop::start(|config| config).await;
    let named = |answer: common::Answer, field: &str| {
        assert_eq!(
            answer.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.json()["field"], field);
    };
    named(shop.post("/users", json!({ "email": "not an address", "name": "x" })).await, "email");
    named(shop.post("/users", json!({ "email": "a@b.example", "name": "" })).await, "name");
    let first = shop.post("/users", json!({ "email": "a@b.example", "name": "A" })).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        shop.post("/users", json!({ "email": "A@b.example", "name": "B" })).await.status,
        StatusCode::CONFLICT
    );
    assert_eq!(shop.get("/users/999999").await.status, StatusCode::NOT_FOUND);
    assert_eq!(shop.get("/products/999999").await.status, StatusCode::NOT_FOUND);
    assert_eq!(shop.get("/orders/999999").await.status, StatusCode::NOT_FOUND);
    let broken = shop.request(Method::POST, "/users", &[("content-type", "application/json")], None).await;
    assert_eq!(broken.status, StatusCode::BAD_REQUEST);
    let user = first.json()["id"].as_i64().expect("id");
    named(
        shop.post("/orders", json!({ "user_id": 424242, "items": [{ "product_id": 1, "quantity": 1 }] }))
            .await,
        "user_id",
    );
    named(shop.post("/orders", json!({ "user_id": user, "items": [] })).await, "items");
    named(
        shop.post("/orders", json!({ "user_id": user, "items": [{ "product_id": 777, "quantity": 1 }] }))
            .await,
        "items",
    );
    named(
        shop.post("/products", json!({ "name": "x", "category": "y", "price_cents": -1, "stock": 1 })).await,
        "price_cents",
    );
    // The services' own routes are not the public's.
    assert_eq!(shop.get("/v1/charges?idempotency_key=x").await.status, StatusCode::NOT_FOUND);
    assert_eq!(shop.post("/stock/reservations", json!({})).await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_is_made_once_even_when_the_processor_never_answers() {
    // The processor makes every charge and then hangs: payments must find out what happened.
    let shop = Shop::start(|config| {
        config.replace(
            "SHOP_PROVIDER_LATENCY = \"20ms\"",
            "SHOP_PROVIDER_LATENCY = \"20ms\", SHOP_PROVIDER_TIMEOUT_RATE = \"1\"",
        )
    })
    .await;
    let charge = json!({ "order_id": 41, "amount_cents": 1999, "card": "4242424242424242" });
    let made = shop.internal(Method::POST, "/payments/charges", &[], Some(charge.clone())).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}\n{}", String::from_utf8_lossy(&made.body), shop.log());
    let made = made.json();
    assert_eq!(made["status"], "succeeded");
    assert!(made["provider_charge_id"].as_str().is_some_and(|id| id.starts_with("ch_")));
    let again = shop.internal(Method::POST, "/payments/charges", &[], Some(charge)).await.json();
    assert_eq!(again["id"], made["id"], "the same charge");
    let at_processor = shop.databases.number("provider", "SELECT count(*) FROM charges").await;
    assert_eq!(at_processor, 1, "one charge at the processor, though it never answered");

    let declined = json!({ "order_id": 42, "amount_cents": 500, "card": "4000000000000002" });
    let answer = shop.internal(Method::POST, "/payments/charges", &[], Some(declined)).await;
    assert_eq!(answer.status, StatusCode::PAYMENT_REQUIRED);
    assert_eq!(answer.json()["decline_reason"], "card_declined");
    let refund =
        shop.internal(Method::POST, &format!("/payments/charges/{}/refund", made["id"]), &[], None).await;
    assert_eq!(refund.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&refund.body));
    assert_eq!(shop.databases.number("provider", "SELECT count(*) FROM charges WHERE refunded").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_away_reads_fall_through_to_the_database() {
    // The users service's cache tier points at a port where nothing answers.
    let shop = Shop::start(|config| {
        config.replacen("SHOP_REDIS = \"redis://127.0.0.1:6379\"", "SHOP_REDIS = \"redis://127.0.0.1:1\"", 1)
    })
    .await;
    let signed = shop.post("/users", json!({ "email": "kay@example.com", "name": "Kay" })).await;
    let id = signed.json()["id"].as_i64().expect("an id");
    let first = shop.get(&format!("/users/{id}")).await;
    assert_eq!((first.status, first.header("x-shop-cache")), (StatusCode::OK, "miss"));
    let second = shop.get(&format!("/users/{id}")).await;
    assert_eq!(
        (second.status, second.header("x-shop-cache")),
        (StatusCode::OK, "hit"),
        "the in-process tier"
    );
    let updated =
        shop.request(Method::PATCH, &format!("/users/{id}"), &[], Some(json!({ "name": "Alan Kay" }))).await;
    assert_eq!(updated.status, StatusCode::OK);
    let third = shop.get(&format!("/users/{id}")).await;
    assert_eq!(third.json()["name"], "Alan Kay", "invalidated locally without Redis");
}
