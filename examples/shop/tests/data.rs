//! The shop's data at scale: on seeded tables the hot lookups use their indexes, and with every
//! pool at its `instances.max` the shop's connections to PostgreSQL stay within the budget
//! docs/shop.md adds up, under `max_connections`.

mod common;

use std::time::{Duration, Instant};

use common::{Databases, Shop};

/// The plan PostgreSQL chooses for `sql`, as text.
async fn plan(databases: &Databases, service: &str, sql: &str) -> String {
    let mut connection = databases.connect(service).await;
    let rows: Vec<String> =
        sqlx::query_scalar(&format!("EXPLAIN {sql}")).fetch_all(&mut connection).await.expect("EXPLAIN");
    rows.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_lookups_use_their_indexes_on_seeded_tables() {
    let databases = Databases::new();
    databases.shop(&["setup"], &[]);
    let seeded =
        databases.shop(&["seed", "--users", "50000", "--products", "500", "--orders", "200000"], &[]);
    assert!(seeded.contains("orders: 200000 made"), "{seeded}");
    assert_eq!(databases.number("users", "SELECT count(*) FROM users").await, 50_000);

    let by_email =
        plan(&databases, "users", "SELECT id, name FROM users WHERE email = 'user4242@example.com'").await;
    assert!(by_email.contains("idx_user_email"), "the email lookup does not use idx_user_email:\n{by_email}");
    let by_date = plan(
        &databases,
        "orders",
        "SELECT id, amount_cents, created_at FROM orders WHERE user_id = 4242 \
         AND created_at >= now() - interval '90 days' ORDER BY created_at DESC LIMIT 50",
    )
    .await;
    assert!(
        by_date.contains("idx_order_user_date"),
        "a user's orders by date do not use idx_order_user_date:\n{by_date}"
    );

    // The report's view after a refresh is the sum of the orders per month.
    let mismatched = databases
        .number(
            "orders",
            "SELECT count(*) FROM monthly_sales m FULL JOIN \
             (SELECT date_trunc('month', created_at) AS month, sum(amount_cents)::BIGINT AS amount_cents \
              FROM orders WHERE status = 'paid' GROUP BY 1) o USING (month) \
             WHERE m.amount_cents IS DISTINCT FROM o.amount_cents",
        )
        .await;
    assert_eq!(mismatched, 0);
}

/// `instances = { min = M, max = N }` becomes `{ min = N, max = N }`: every pool at its max.
fn every_pool_at_max(config: String) -> String {
    config
        .lines()
        .map(|line| {
            let Some(start) = line.find("instances = {") else { return line.to_owned() };
            let max = line[start..]
                .split("max = ")
                .nth(1)
                .and_then(|rest| rest.split([' ', ',', '}']).next())
                .unwrap_or("1");
            format!("{}instances = {{ min = {max}, max = {max} }}", &line[..start])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_pool_at_its_max_the_connections_stay_within_the_budget() {
    let shop = Shop::start(every_pool_at_max).await;
    // Pools open their connections in the background: wait until they are all there.
    let ours = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname LIKE '{}%'",
        shop.databases.prefix.replace('_', "\\_")
    );
    let budget = 80; // docs/shop.md: 4×4 + 4×4 + 4×4 + 1×1 + 3×3 + 2×3 + 2×2 + 1×2 + 2×2 + 1×2 + 4×1
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while Instant::now() < deadline {
        seen = shop.databases.number("users", &ours).await - 1; // less this query's own
        if seen >= budget {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen, budget, "every instance holds its SHOP_DB_CONNECTIONS\n{}", shop.log());
    let max: i64 = shop.databases.number("users", "SELECT current_setting('max_connections')::BIGINT").await;
    let reserved: i64 = shop
        .databases
        .number("users", "SELECT current_setting('superuser_reserved_connections')::BIGINT")
        .await;
    assert!(seen < max - reserved, "{seen} connections against {max} (less {reserved} for superusers)");
    let status = shop.status().await;
    let instances: usize = status["services"]
        .as_array()
        .map_or(0, |pools| pools.iter().map(|pool| pool["instances"].as_array().map_or(0, Vec::len)).sum());
    assert_eq!(instances, 4 + 4 + 4 + 3 + 2 + 2 + 1 + 1 + 2 + 1 + 4, "every pool at its max");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_by_category_over_the_worker_pool_equal_the_sql_group_by() {
    let shop = Shop::start(|config| config).await;
    shop.databases.shop(&["seed", "--users", "2000", "--products", "200", "--orders", "30000"], &[]);
    let started =
        shop.request(hyper::Method::POST, "/reports/sales-by-category?partitions=12", &[], None).await;
    assert_eq!(started.status, hyper::StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&started.body));
    let job = started.json()["job_id"].as_i64().expect("a job");
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let answer = shop.get(&format!("/reports/sales-by-category/{job}")).await;
        if answer.status == hyper::StatusCode::OK {
            break answer.json();
        }
        assert!(Instant::now() < deadline, "the job did not finish: {}\n{}", answer.json(), shop.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut connection = shop.databases.connect("orders").await;
    let expected: Vec<(String, i64)> = sqlx::query_as(
        "SELECT i.category, count(*) FROM order_items i JOIN orders o ON o.id = i.order_id \
         WHERE o.status = 'paid' GROUP BY i.category ORDER BY i.category",
    )
    .fetch_all(&mut connection)
    .await
    .expect("GROUP BY");
    let counted: Vec<(String, i64)> = result["sales"]
        .as_object()
        .map(|sales| sales.iter().map(|(category, n)| (category.clone(), n.as_i64().unwrap_or(-1))).collect())
        .unwrap_or_default();
    assert_eq!(counted, expected);
    assert_eq!(expected.iter().map(|(_, n)| n).sum::<i64>(), 30_000);
}
