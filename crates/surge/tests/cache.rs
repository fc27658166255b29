//! The gateway's response cache end to end: the real binary, real `surge-echo` instances that
//! write down every request they get, and the real Redis for the shared tier.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Answer, Echo, Surge};
use hyper::{Method, StatusCode};

/// `surge-echo`'s knob for a response field: `header=NAME:VALUE`, the value percent-encoded.
fn header_knob(name: &str, value: &str) -> String {
    let mut encoded = String::new();
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("header={name}:{encoded}")
}

/// How many requests for `target` (path and query) reached the instances.
fn upstream_count(log: &Path, target: &str) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().filter(|line| line.split(' ').nth(1) == Some(target)).count()
}

fn cache_status(answer: &Answer) -> String {
    answer.headers.get("cache-status").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

/// One service whose instances log every request to `log`, its routes `routes`.
fn service(log: &Path, routes: &str, extra: &str) -> String {
    format!(
        r#"
[services.web]
command = "{{echo}}"
routes = {routes}
env = {{ SURGE_ECHO_REQUEST_LOG = "{}" }}
{extra}
"#,
        log.display()
    )
}

fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_nanos();
    format!("{name}-{nanos}-{}", std::process::id())
}

/// `count` GETs of `target` sent at once, each on its own task; their answers.
async fn all_at_once(surge: &Surge, target: &str, count: usize) -> Vec<Answer> {
    let url = surge.url(target);
    let client = common::http_client();
    let requests: Vec<_> = (0..count)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { common::send(&client, Method::GET, &url, &[], Bytes::new()).await })
        })
        .collect();
    let mut answers = Vec::new();
    for request in requests {
        answers.push(request.await.expect("task").expect("answer"));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_for_one_key_make_one_upstream_request() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let surge =
        Surge::start(&service(&log, r#"[{ prefix = "/", cache = { collapse_timeout = "20s" } }]"#, "")).await;
    // The instance takes a while, so that every request arrives while the first is upstream.
    let target = format!("/hot?delay=500ms&{}", header_knob("cache-control", "max-age=60"));
    let mut statuses = std::collections::BTreeMap::new();
    for answer in all_at_once(&surge, &target, 1000).await {
        assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
        let status = cache_status(&answer);
        let kind = if status.contains("collapsed") {
            "collapsed"
        } else if status.contains("; hit") {
            "hit"
        } else {
            "forwarded"
        };
        *statuses.entry(kind).or_insert(0) += 1;
    }
    assert_eq!(upstream_count(&log, &target), 1, "answers by how the cache handled them: {statuses:?}");
    assert_eq!(statuses.get("forwarded"), Some(&1), "{statuses:?}");
    assert!(statuses.get("collapsed").copied().unwrap_or(0) > 0, "{statuses:?}");
    let metrics = surge.metrics().await;
    assert!(metrics.contains("surge_http_cache_collapsed_total{route=\"web:/\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_follows_http_rules_end_to_end() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let surge = Surge::start(&service(&log, r#"[{ prefix = "/", cache = {} }]"#, "")).await;

    // Stored, then a hit with its age; a HEAD is answered from GET's entry.
    let target =
        format!("/item?{}&{}", header_knob("cache-control", "max-age=60"), header_knob("etag", "\"v1\""));
    let first = surge.get(&target).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(cache_status(&first), "surge; fwd=miss; fwd-status=200; stored");
    let second = surge.get(&target).await;
    assert!(cache_status(&second).starts_with("surge; hit; ttl="), "{}", cache_status(&second));
    assert_eq!(second.body, first.body, "the stored body");
    assert!(second.headers.contains_key("age"));
    let head = surge.request(Method::HEAD, &target, &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(cache_status(&head).contains("hit"), "{}", cache_status(&head));
    assert!(head.body.is_empty());
    // A client's validator matching what is stored: 304 from the cache.
    let conditional = surge.request(Method::GET, &target, &[("if-none-match", "\"v1\"")], Bytes::new()).await;
    assert_eq!(conditional.status, StatusCode::NOT_MODIFIED);
    assert_eq!(conditional.headers["etag"], "\"v1\"");
    assert_eq!(upstream_count(&log, &target), 1, "one trip upstream for all of them");

    // A successful POST to the URL drops what is stored for it, every variant.
    let post = surge.request(Method::POST, &target, &[], Bytes::from_static(b"x")).await;
    assert_eq!(cache_status(&post), "surge; fwd=method; fwd-status=200");
    let after_post = surge.get(&target).await;
    assert!(cache_status(&after_post).starts_with("surge; fwd=miss"), "{}", cache_status(&after_post));
    let languages = format!(
        "/languages?{}&{}",
        header_knob("cache-control", "max-age=60"),
        header_knob("vary", "accept-language")
    );
    let in_language = async |language: &str| {
        surge.request(Method::GET, &languages, &[("accept-language", language)], Bytes::new()).await
    };
    in_language("en").await;
    in_language("fr").await;
    assert!(cache_status(&in_language("fr").await).contains("hit"));
    surge.request(Method::PUT, &languages, &[], Bytes::from_static(b"x")).await;
    assert!(cache_status(&in_language("en").await).contains("stored"), "stored anew after the PUT");
    let french = in_language("fr").await;
    assert!(
        cache_status(&french).contains("fwd=miss"),
        "the variant stored before the PUT: {}",
        cache_status(&french)
    );

    // A response with a validator and no freshness left is revalidated: the instance's 304
    // refreshes what is stored.
    let stale =
        format!("/stale?{}&{}", header_knob("cache-control", "max-age=0"), header_knob("etag", "\"e7\""));
    let stored = surge.get(&stale).await;
    assert_eq!(cache_status(&stored), "surge; fwd=miss; fwd-status=200; stored");
    let revalidated = surge.get(&stale).await;
    assert_eq!(revalidated.status, StatusCode::OK, "the stored body, after the instance's 304");
    assert!(
        cache_status(&revalidated).starts_with("surge; fwd=stale; fwd-status=304; stored"),
        "{}",
        cache_status(&revalidated)
    );
    assert_eq!(revalidated.body, stored.body);

    // Vary: one variant per normalised value of the fields it names; Vary: * is not stored.
    let varying = format!(
        "/vary?{}&{}",
        header_knob("cache-control", "max-age=60"),
        header_knob("vary", "accept-language")
    );
    let english = surge.request(Method::GET, &varying, &[("accept-language", "en")], Bytes::new()).await;
    let french = surge.request(Method::GET, &varying, &[("accept-language", "fr")], Bytes::new()).await;
    let english_again =
        surge.request(Method::GET, &varying, &[("accept-language", " en ")], Bytes::new()).await;
    assert!(cache_status(&english).contains("fwd=miss"));
    assert!(cache_status(&french).contains("fwd=miss"), "another variant: {}", cache_status(&french));
    assert!(cache_status(&english_again).contains("hit"), "{}", cache_status(&english_again));
    assert_eq!(english_again.json()["headers"]["accept-language"], "en");
    let star = format!("/star?{}&{}", header_knob("cache-control", "max-age=60"), header_knob("vary", "*"));
    surge.get(&star).await;
    assert!(cache_status(&surge.get(&star).await).contains("fwd=miss"));
    assert_eq!(upstream_count(&log, &star), 2);

    // No freshness information and no default TTL: not stored (as nginx).
    let bare = "/bare";
    surge.get(bare).await;
    surge.get(bare).await;
    assert_eq!(upstream_count(&log, bare), 2);

    // stale-while-revalidate: once stale, served at once and refreshed behind the client.
    let swr = format!("/swr?{}", header_knob("cache-control", "max-age=1, stale-while-revalidate=60"));
    surge.get(&swr).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = surge.get(&swr).await;
    assert!(cache_status(&stale).starts_with("surge; hit; ttl=-"), "{}", cache_status(&stale));
    // Until the refresh is stored, each request gets the stale copy and sends nothing more.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = cache_status(&surge.get(&swr).await);
        if !status.contains("ttl=-") {
            assert!(status.starts_with("surge; hit; ttl="), "fresh again: {status}");
            break;
        }
        assert!(Instant::now() < deadline, "the background refresh never landed: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream_count(&log, &swr), 2, "one refresh however many asked meanwhile");

    // only-if-cached on a miss: 504, nothing sent upstream.
    let cold = format!("/cold?{}", header_knob("cache-control", "max-age=60"));
    let refused =
        surge.request(Method::GET, &cold, &[("cache-control", "only-if-cached")], Bytes::new()).await;
    assert_eq!(refused.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(upstream_count(&log, &cold), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_answer_is_never_served_to_another_client() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let surge =
        Surge::start(&service(&log, r#"[{ prefix = "/", cache = { default_ttl = "60s" } }]"#, "")).await;
    let fresh = header_knob("cache-control", "max-age=60");

    // An answer to a request with credentials, which does not say a shared cache may keep it.
    let me = format!("/me?{fresh}");
    let alice = surge.request(Method::GET, &me, &[("authorization", "Bearer alice")], Bytes::new()).await;
    assert_eq!(alice.json()["headers"]["authorization"], "Bearer alice");
    let bob = surge.get(&me).await;
    assert!(
        bob.json()["headers"].get("authorization").is_none(),
        "bob got alice's answer: {}",
        String::from_utf8_lossy(&bob.body)
    );
    assert!(cache_status(&bob).contains("fwd=miss"), "{}", cache_status(&bob));

    // An answer that sets a cookie, or says it is private.
    for knob in
        [header_knob("set-cookie", "session=alice"), header_knob("cache-control", "private, max-age=60")]
    {
        let target = format!("/login?{fresh}&{knob}");
        let first = surge.get(&target).await;
        assert!(!cache_status(&first).contains("stored"), "{}", cache_status(&first));
        let second = surge.get(&target).await;
        assert!(cache_status(&second).contains("fwd=miss"), "{}", cache_status(&second));
        assert_eq!(upstream_count(&log, &target), 2, "{target}: both went to the instance");
    }
    // Public says a shared cache may keep an answer to credentials.
    let public = format!("/catalog?{}", header_knob("cache-control", "public, max-age=60"));
    surge.request(Method::GET, &public, &[("authorization", "Bearer alice")], Bytes::new()).await;
    assert!(cache_status(&surge.get(&public).await).contains("hit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_keeps_answering_when_the_instances_are_gone() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let echo = Echo::start_on(port, "only");
    let surge = Surge::start(&format!(
        r#"
[services.web]
upstreams = ["127.0.0.1:{port}"]
routes = [{{ prefix = "/", cache = {{ grace = "5m" }} }}]
health = {{ interval = "100ms", unhealthy_threshold = 1 }}
buffer = {{ timeout = "200ms" }}
"#
    ))
    .await;
    // One stale within the route's grace; one whose response says how long it may be served
    // on error, and that it may not be served stale otherwise.
    let graced = format!("/page?{}", header_knob("cache-control", "max-age=1"));
    let on_error = format!(
        "/report?{}",
        header_knob("cache-control", "max-age=1, stale-while-revalidate=0, stale-if-error=300")
    );
    let mut stored = Vec::new();
    for target in [&graced, &on_error] {
        let answer = surge.get(target).await;
        assert_eq!(cache_status(&answer), "surge; fwd=miss; fwd-status=200; stored");
        stored.push(answer.body);
    }
    drop(echo);
    // Stale from now on (max-age=1): the instance cannot answer, the cache does.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..5 {
        for (target, body) in [&graced, &on_error].into_iter().zip(&stored) {
            let answer = surge.get(target).await;
            assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
            assert_eq!(&answer.body, body);
            let status = cache_status(&answer);
            assert!(status.contains("ttl=-"), "served stale: {status}");
            if target == &on_error {
                assert!(status.contains("fwd=stale") && status.contains("detail=stale-if-error"), "{status}");
            }
        }
    }
    // Something never stored has nothing to fall back on.
    let other = surge.get("/never").await;
    assert!(other.status.is_server_error(), "{}", other.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_within_its_bound_under_many_distinct_keys() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let routes = r#"[{ prefix = "/", cache = { memory = "256KiB", max_object = "16KiB" } }]"#;
    let surge = Surge::start(&service(&log, routes, "")).await;
    let fresh = header_knob("cache-control", "max-age=300");
    for key in 0..200 {
        let answer = surge.get(&format!("/object-{key}?bytes=8000&{fresh}")).await;
        assert_eq!(answer.body.len(), 8000);
    }
    // One larger than max_object is passed through.
    let large = format!("/large?bytes=20000&{fresh}");
    surge.get(&large).await;
    assert!(cache_status(&surge.get(&large).await).contains("fwd=miss"));
    let metrics = surge.metrics().await;
    let value = |name: &str| -> f64 {
        let line = metrics
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("{name} in {metrics}"));
        line.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("a number")
    };
    let held = value("surge_http_cache_bytes{route=\"web:/\"}");
    assert!(held > 0.0 && held <= 256.0 * 1024.0, "{held} bytes held");
    assert!(value("surge_http_cache_evictions_total{route=\"web:/\"}") > 0.0);
    assert_eq!(value("surge_http_cache_stores_total{route=\"web:/\"}"), 200.0);
}

/// The cached service, its shared tier in this machine's Redis.
fn shared_through_redis(log: &Path) -> String {
    format!(
        "{}\n[store]\nredis = \"redis://127.0.0.1:6379\"\n",
        service(log, r#"[{ prefix = "/", cache = {} }]"#, "")
    )
}

/// Waits until a node has written its response for `target` (of `shop.test`) to Redis, which
/// it does in the background after answering.
async fn until_in_redis(target: &str) {
    let redis = redis::Client::open("redis://127.0.0.1:6379").expect("redis url");
    let mut redis = redis.get_multiplexed_async_connection().await.expect("redis");
    let pattern = format!("surge-http-cache:web:/:o\0http://shop.test{}*", target.replace('?', "\\?"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query_async(&mut redis).await.expect("KEYS");
        if !keys.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "no node wrote {pattern} to Redis");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_responses_and_purges_through_redis() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let shared = shared_through_redis(&log);
    let (one, two) = (Surge::start(&shared).await, Surge::start(&shared).await);
    let tag = unique("tag");
    let target = format!(
        "/{}?{}&{}",
        unique("product"),
        header_knob("cache-control", "max-age=300"),
        header_knob("cache-tag", &format!("{tag}, products"))
    );
    async fn get(surge: &Surge, target: &str) -> Answer {
        surge.request(Method::GET, target, &[("host", "shop.test")], Bytes::new()).await
    }
    assert_eq!(cache_status(&get(&one, &target).await), "surge; fwd=miss; fwd-status=200; stored");
    // Node one writes Redis in the background; once it is there, node two finds it.
    until_in_redis(&target).await;
    // The tag names the object in Redis for as long as the object lives (300 s fresh), no longer.
    let redis = redis::Client::open("redis://127.0.0.1:6379").expect("redis url");
    let mut redis = redis.get_multiplexed_async_connection().await.expect("redis");
    let tag_set = format!("surge-http-cache:web:/:T\0{tag}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (named, lifetime) = loop {
        let named: usize = redis::cmd("ZCARD").arg(&tag_set).query_async(&mut redis).await.expect("ZCARD");
        let lifetime: i64 = redis::cmd("PTTL").arg(&tag_set).query_async(&mut redis).await.expect("PTTL");
        if named > 0 || Instant::now() > deadline {
            break (named, lifetime);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(named, 1, "the tag names the one object");
    assert!((290_000..=300_000).contains(&lifetime), "the tag's set lives {lifetime} ms");
    let status = cache_status(&get(&two, &target).await);
    assert!(status.starts_with("surge; hit"), "node two: {status}");
    assert_eq!(upstream_count(&log, &target), 1, "node two answered from node one's response");
    let upstream_before_purge = 1;

    let purge = |body: String| {
        one.admin(Method::POST, "/cache/purge", &[("content-type", "application/json")], Bytes::from(body))
    };
    let purged = purge(format!(r#"{{"tag": "{tag}"}}"#)).await;
    assert_eq!(purged.status, StatusCode::OK, "{}", String::from_utf8_lossy(&purged.body));
    // Both nodes drop it: the purge reaches node two through pub/sub.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = cache_status(&get(&two, &target).await);
        if status.contains("fwd=miss") {
            break;
        }
        assert!(Instant::now() < deadline, "node two still serves a purged response: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(upstream_count(&log, &target) > upstream_before_purge);
    let unknown = purge(format!(r#"{{"url": "http://shop.test/{}"}}"#, unique("nothing"))).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let malformed = purge(r#"{"url": "a", "tag": "b"}"#.to_owned()).await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
}

/// A soft purge marks stale, in Redis too: a node that never held the response serves it stale
/// while it is refreshed, rather than fetching anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_purge_leaves_a_stale_copy_in_redis_for_every_node() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let shared = shared_through_redis(&log);
    let one = Surge::start(&shared).await;
    let tag = unique("tag");
    let target = format!(
        "/{}?{}&{}",
        unique("page"),
        header_knob("cache-control", "max-age=300, stale-while-revalidate=120"),
        header_knob("cache-tag", &tag)
    );
    let headers = [("host", "shop.test")];
    let first = one.request(Method::GET, &target, &headers, Bytes::new()).await;
    assert_eq!(cache_status(&first), "surge; fwd=miss; fwd-status=200; stored");
    until_in_redis(&target).await;
    let body = Bytes::from(format!(r#"{{"tag": "{tag}", "soft": true}}"#));
    let purged = one.admin(Method::POST, "/cache/purge", &[("content-type", "application/json")], body).await;
    assert_eq!(purged.status, StatusCode::OK, "{}", String::from_utf8_lossy(&purged.body));

    // Node two starts after the purge: all it can know of the response is Redis's copy.
    let two = Surge::start(&shared).await;
    let stale = two.request(Method::GET, &target, &headers, Bytes::new()).await;
    assert_eq!(stale.status, StatusCode::OK);
    let status = cache_status(&stale);
    assert!(status.starts_with("surge; hit; ttl=-") || status.ends_with("ttl=0"), "node two: {status}");
    // Served stale, it is refreshed upstream behind the client's back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream_count(&log, &target) < 2 {
        assert!(Instant::now() < deadline, "the stale copy was never refreshed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A purge that lands while the key's answer is on its way must not be undone by that answer:
/// the request that went gets it, but it is not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_during_a_fetch_keeps_that_answer_from_being_stored() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let surge = Surge::start(&service(&log, r#"[{ prefix = "/", cache = {} }]"#, "")).await;
    let tag = unique("tag");
    let target = format!(
        "/{}?delay=1s&{}&{}",
        unique("slow"),
        header_knob("cache-control", "max-age=300"),
        header_knob("cache-tag", &tag)
    );
    let headers = [("host", "shop.test")];
    let purge_meanwhile = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while upstream_count(&log, &target) == 0 {
            assert!(Instant::now() < deadline, "the request never reached the instance");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let body = Bytes::from(format!(r#"{{"tag": "{tag}"}}"#));
        surge.admin(Method::POST, "/cache/purge", &[("content-type", "application/json")], body).await
    };
    let (first, purged) =
        tokio::join!(surge.request(Method::GET, &target, &headers, Bytes::new()), purge_meanwhile);
    assert_eq!(first.status, StatusCode::OK);
    // Nothing was stored yet when it came: nothing found.
    assert_eq!(purged.status, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&purged.body));
    let second = surge.request(Method::GET, &target, &headers, Bytes::new()).await;
    assert!(
        cache_status(&second).contains("fwd=miss"),
        "served what came before the purge: {}",
        cache_status(&second)
    );
    assert_eq!(upstream_count(&log, &target), 2);
    // The answer fetched after the purge is stored as usual.
    let third = surge.request(Method::GET, &target, &headers, Bytes::new()).await;
    assert!(cache_status(&third).starts_with("surge; hit"), "{}", cache_status(&third));
    assert_eq!(upstream_count(&log, &target), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn textual_responses_are_served_compressed_to_clients_that_accept_it() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let surge = Surge::start(&service(&log, r#"[{ prefix = "/", cache = {} }]"#, "")).await;
    let target = format!(
        "/page?bytes=20000&{}&{}&{}",
        header_knob("content-type", "text/html; charset=utf-8"),
        header_knob("cache-control", "max-age=60"),
        header_knob("etag", "\"p1\"")
    );
    // A miss is compressed too: the client is answered from what is stored once it is whole.
    let cold = target.replace("/page?", "/cold-page?");
    let first = surge.request(Method::GET, &cold, &[("accept-encoding", "gzip")], Bytes::new()).await;
    assert!(
        cache_status(&first).starts_with("surge; fwd=miss; fwd-status=200; stored"),
        "{}",
        cache_status(&first)
    );
    assert_eq!(first.headers["content-encoding"], "gzip");
    let mut unzipped = Vec::new();
    flate2::read::GzDecoder::new(&first.body[..]).read_to_end(&mut unzipped).expect("gunzip");
    assert_eq!(unzipped.len(), 20000);
    assert_eq!(upstream_count(&log, &cold), 1);

    let identity = surge.get(&target).await;
    assert_eq!(identity.body.len(), 20000);
    assert_eq!(unzipped, identity.body, "the same body, compressed");
    let gzip = surge.request(Method::GET, &target, &[("accept-encoding", "gzip")], Bytes::new()).await;
    assert!(cache_status(&gzip).contains("hit"), "{}", cache_status(&gzip));
    assert_eq!(gzip.headers["content-encoding"], "gzip");
    assert_eq!(gzip.headers["etag"], "W/\"p1\"", "another representation: a weak tag");
    assert!(gzip.headers["vary"].to_str().expect("ascii").contains("accept-encoding"));
    assert!(gzip.body.len() < identity.body.len() / 10, "{} bytes", gzip.body.len());
    unzipped.clear();
    flate2::read::GzDecoder::new(&gzip.body[..]).read_to_end(&mut unzipped).expect("gunzip");
    assert_eq!(unzipped, identity.body);

    let again = [("accept-encoding", "gzip"), ("if-none-match", "W/\"p1\"")];
    let not_modified = surge.request(Method::GET, &target, &again, Bytes::new()).await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert_eq!(not_modified.headers["etag"], "W/\"p1\"", "the tag of the 200 it stands for");
    assert!(not_modified.headers["vary"].to_str().expect("ascii").contains("accept-encoding"));
    let brotli =
        surge.request(Method::GET, &target, &[("accept-encoding", "gzip, deflate, br")], Bytes::new()).await;
    assert_eq!(brotli.headers["content-encoding"], "br");
    let mut unbrotlied = Vec::new();
    brotli::Decompressor::new(&brotli.body[..], 4096).read_to_end(&mut unbrotlied).expect("unbrotli");
    assert_eq!(unbrotlied, identity.body);

    let plain = surge.request(Method::GET, &target, &[("accept-encoding", "identity")], Bytes::new()).await;
    assert!(!plain.headers.contains_key("content-encoding"));
    assert_eq!(plain.body, identity.body);
    // Binary types are sent as they are.
    let binary = format!("/blob?bytes=20000&{}", header_knob("cache-control", "max-age=60"));
    surge.get(&binary).await;
    let blob = surge.request(Method::GET, &binary, &[("accept-encoding", "gzip")], Bytes::new()).await;
    assert!(!blob.headers.contains_key("content-encoding"));
    assert_eq!(upstream_count(&log, &target), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_cut_from_stored_and_passed_through_responses() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let routes = r#"[{ prefix = "/", cache = { max_object = "16KiB" } }]"#;
    let surge = Surge::start(&service(&log, routes, "")).await;
    let target = format!(
        "/blob?bytes=10000&{}&{}",
        header_knob("cache-control", "max-age=60"),
        header_knob("etag", "\"b1\"")
    );
    let range = async |target: &str, fields: &[(&str, &str)]| {
        surge.request(Method::GET, target, fields, Bytes::new()).await
    };
    // A cold key: the whole response is fetched and stored, the client gets its part.
    let cold = range(&target, &[("range", "bytes=100-199")]).await;
    assert_eq!(cold.status, StatusCode::PARTIAL_CONTENT);
    assert!(
        cache_status(&cold).starts_with("surge; fwd=miss; fwd-status=200; stored"),
        "{}",
        cache_status(&cold)
    );
    assert_eq!(cold.headers["content-range"], "bytes 100-199/10000");
    let whole = surge.get(&target).await;
    assert!(cache_status(&whole).contains("hit"), "{}", cache_status(&whole));
    assert_eq!(whole.headers["accept-ranges"], "bytes");
    assert_eq!(cold.body, whole.body.slice(100..200));
    // Hits: a suffix, a range past the end (416), an If-Range that no longer holds (200).
    let suffix = range(&target, &[("range", "bytes=-10")]).await;
    assert_eq!((suffix.status, suffix.body.clone()), (StatusCode::PARTIAL_CONTENT, whole.body.slice(9990..)));
    let past = range(&target, &[("range", "bytes=20000-")]).await;
    assert_eq!(past.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(past.headers["content-range"], "bytes */10000");
    assert!(past.body.is_empty());
    let changed = range(&target, &[("range", "bytes=0-9"), ("if-range", "\"b0\"")]).await;
    assert_eq!((changed.status, changed.body.len()), (StatusCode::OK, 10000));
    let same = range(&target, &[("range", "bytes=0-9"), ("if-range", "\"b1\"")]).await;
    assert_eq!((same.status, same.body.clone()), (StatusCode::PARTIAL_CONTENT, whole.body.slice(..10)));
    assert_eq!(upstream_count(&log, &target), 1, "every range from the one stored response");

    // Larger than max_object: passed through, still cut to the range asked for (the instance
    // does not take ranges), the first time and after.
    let large = format!("/large?bytes=1000000&{}", header_knob("cache-control", "max-age=60"));
    for _ in 0..2 {
        let part = range(&large, &[("range", "bytes=500000-500099")]).await;
        assert_eq!(part.status, StatusCode::PARTIAL_CONTENT, "{}", cache_status(&part));
        assert_eq!(part.headers["content-range"], "bytes 500000-500099/1000000");
        assert_eq!(part.body.len(), 100);
        assert!(cache_status(&part).starts_with("surge; fwd=miss"), "{}", cache_status(&part));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_fetch_the_waiting_requests_go_one_at_a_time() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let routes = r#"[{ prefix = "/", cache = { collapse_timeout = "20s" } }]"#;
    let surge = Surge::start(&service(&log, routes, "")).await;
    // The first request to reach the instance fails; every later one would succeed.
    let marker = dir.path().join("failed-once");
    let target = format!(
        "/flaky?delay=300ms&fail_once={}&{}",
        marker.display(),
        header_knob("cache-control", "max-age=60")
    );
    let mut statuses = std::collections::BTreeMap::new();
    for answer in all_at_once(&surge, &target, 20).await {
        *statuses.entry(answer.status.as_u16()).or_insert(0) += 1;
    }
    // The failure sent the next waiting request, whose answer was stored for all the others;
    // had they all gone at once, each would have reached the instance.
    assert_eq!(statuses.get(&500), Some(&1), "{statuses:?}");
    assert_eq!(statuses.get(&200), Some(&19), "{statuses:?}");
    assert_eq!(upstream_count(&log, &target), 2, "{statuses:?}");
}

/// A Redis of the test's own, on a free port, that it can stop.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis { child, port }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_the_cache_goes_on_with_its_local_tier() {
    let redis = OwnRedis::start();
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("requests.log");
    let config = format!(
        "{}\n[store]\nredis = \"redis://127.0.0.1:{}\"\n",
        service(&log, r#"[{ prefix = "/", cache = {} }]"#, ""),
        redis.port
    );
    let surge = Surge::start(&config).await;
    let fresh = header_knob("cache-control", "max-age=300");
    let kept = format!("/kept?{fresh}");
    assert!(cache_status(&surge.get(&kept).await).contains("stored"));
    drop(redis);
    // What is stored here is still served; what is not is fetched and stored here.
    for _ in 0..3 {
        let answer = surge.get(&kept).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(cache_status(&answer).contains("hit"), "{}", cache_status(&answer));
    }
    let new = format!("/new?{fresh}");
    let first = surge.get(&new).await;
    assert_eq!(first.status, StatusCode::OK, "{}", String::from_utf8_lossy(&first.body));
    assert!(cache_status(&first).contains("stored"), "{}", cache_status(&first));
    assert!(cache_status(&surge.get(&new).await).contains("hit"));
    assert_eq!(upstream_count(&log, &new), 1);
    let metrics = surge.metrics().await;
    let errors = metrics
        .lines()
        .find(|line| line.starts_with("surge_http_cache_redis_errors_total{route=\"web:/\"}"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("the counter in {metrics}"));
    assert!(errors > 0.0, "the failed Redis calls are counted");
    assert!(surge.log().contains("Redis"), "and warned of: {}", surge.log());
}
