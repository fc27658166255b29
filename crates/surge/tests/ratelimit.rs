//! Rate limits: per route and client, answered with 429 and the RateLimit headers; shared by
//! several surge nodes through the Redis on this machine.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Surge;
use hyper::{Method, StatusCode};

const LIMITED: &str = r#"
[services.web]
command = "{echo}"
routes = [{ prefix = "/", rate_limit = { rate = 10, per = "1s", burst = 5, key = "header:x-client" } }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_passes_then_429_with_rate_limit_headers() {
    let surge = Surge::start(LIMITED).await;
    let mut statuses = Vec::new();
    let mut refused = None;
    for _ in 0..12 {
        let answer = surge.request(Method::GET, "/", &[("x-client", "alice")], Bytes::new()).await;
        statuses.push(answer.status);
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(answer);
        }
    }
    let allowed = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert!((5..=6).contains(&allowed), "the burst of 5 (and perhaps one refilled): {statuses:?}");
    let refused = refused.expect("some were refused");
    assert_eq!(refused.json()["error"], "rate_limited");
    for header in ["retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert!(refused.headers.contains_key(header), "{header} missing: {:?}", refused.headers);
    }
    assert_eq!(refused.headers["ratelimit-limit"], "10");
    assert_eq!(refused.headers["ratelimit-remaining"], "0");

    // Another client has a bucket of its own.
    let bob = surge.request(Method::GET, "/", &[("x-client", "bob")], Bytes::new()).await;
    assert_eq!(bob.status, StatusCode::OK);
    assert!(surge.metrics().await.contains("surge_rate_limited_requests_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sharing_redis_enforce_one_limit() {
    let config = r#"
[store]
redis = "redis://127.0.0.1:6379"

[services.web]
command = "{echo}"
routes = [{ prefix = "/", rate_limit = { rate = 100, per = "1s", burst = 10, key = "header:x-client" } }]
"#;
    let (first, second) = (Surge::start(config).await, Surge::start(config).await);
    // A client of its own, so earlier runs leave nothing in Redis for it.
    let client_key = format!("run-{}-{}", std::process::id(), fastrand::u64(..));

    // 400 requests a second for 3 s, each to a node picked at random, open loop. (Strict
    // alternation would hand every refill to the same node: the bucket refills every 4th.)
    let seconds = 3.0;
    let client = common::http_client();
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    let mut rng = fastrand::Rng::with_seed(5);
    let mut nodes = Vec::new();
    for i in 0..(400.0 * seconds) as u32 {
        let at = start + Duration::from_secs_f64(f64::from(i) / 400.0);
        let node = rng.usize(0..2);
        nodes.push(node);
        let url = if node == 0 { first.url("/") } else { second.url("/") };
        let (client, key) = (client.clone(), client_key.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let headers = [("x-client", key.as_str())];
            common::send(&client, Method::GET, &url, &headers, Bytes::new()).await.expect("answer").status
        }));
    }
    let mut allowed = [0u32; 2];
    for (node, task) in nodes.into_iter().zip(tasks) {
        if task.await.expect("request") == StatusCode::OK {
            allowed[node] += 1;
        }
    }
    let total = f64::from(allowed[0] + allowed[1]);
    // The burst, then 100 a second; alone, each node would have allowed about this many itself.
    let expected = 10.0 + 100.0 * seconds;
    eprintln!(
        "two nodes allowed {} + {} = {total} of 1200 requests; one shared limit allows {expected}",
        allowed[0], allowed[1]
    );
    assert!((total - expected).abs() <= expected * 0.05, "{total} vs {expected}");
    assert!(allowed[0] > 50 && allowed[1] > 50, "both nodes served: {allowed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_spellings_of_a_limited_path_count_against_its_limit() {
    let config = r#"
[services.api]
command = "{echo}"
routes = [{ prefix = "/api", rate_limit = { rate = 1, per = "1h", burst = 1, key = "header:x-client" } }]

[services.web]
command = "{echo}"
routes = ["/"]
"#;
    let surge = Surge::start(config).await;
    let first = surge.request(Method::GET, "/api/x", &[("x-client", "eve")], Bytes::new()).await;
    assert_eq!(first.status, StatusCode::OK);
    for spelling in ["/z/../api/x", "/%61pi/x", "//api/x", "/./api/x", "/api/%2e/x"] {
        let answer = surge.request(Method::GET, spelling, &[("x-client", "eve")], Bytes::new()).await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS, "{spelling} slipped past the limit");
    }
    // What is forwarded is the path that was routed.
    let other = surge.request(Method::GET, "/z/../api/y?q=1", &[("x-client", "mallory")], Bytes::new()).await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.json()["path"], "/api/y");
    assert_eq!(other.json()["query"], "q=1");
}

/// A reload keeps the buckets of routes whose limit did not change: nobody gets a fresh burst
/// by waiting for one. A route whose limit changed starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_gives_no_client_a_fresh_burst() {
    let limited = |burst: u32| {
        format!(
            "[services.web]\ncommand = \"{{echo}}\"\n\
             routes = [{{ prefix = \"/\", rate_limit = {{ rate = 1, per = \"1h\", burst = {burst}, key = \"header:x-client\" }} }}]\n"
        )
    };
    let surge = Surge::start(&limited(2)).await;
    let client = [("x-client", "alice")];
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(surge.request(Method::GET, "/", &client, Bytes::new()).await.status);
    }
    assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);

    let reloaded = surge.cli(&["reload"]);
    assert!(reloaded.status.success(), "{}", String::from_utf8_lossy(&reloaded.stderr));
    let after = surge.request(Method::GET, "/", &client, Bytes::new()).await;
    assert_eq!(after.status, StatusCode::TOO_MANY_REQUESTS, "the bucket outlived the reload");

    // The limit changed: its buckets are new.
    let text = std::fs::read_to_string(&surge.config).expect("config");
    std::fs::write(&surge.config, text.replace("burst = 2", "burst = 3")).expect("config");
    let reloaded = surge.cli(&["reload"]);
    assert!(reloaded.status.success(), "{}", String::from_utf8_lossy(&reloaded.stderr));
    let changed = surge.request(Method::GET, "/", &client, Bytes::new()).await;
    assert_eq!(changed.status, StatusCode::OK);
}
