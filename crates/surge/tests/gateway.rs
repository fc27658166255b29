//! The gateway end to end: routing, error bodies, forwarding headers, streaming, metrics.

mod common;

use bytes::Bytes;
use common::{Surge, ECHO};
use hyper::{Method, StatusCode};

const ROUTED: &str = r#"
[services.web]
command = "{echo}"
routes = ["/web", { prefix = "/web/pay", retry = true }]

[services.api]
command = "{echo}"
routes = ["/api", "/api/v2/"]
instances = { min = 1, max = 2, initial = 2 }

[services.shop]
command = "{echo}"
routes = [{ prefix = "/", host = "shop.example" }, { prefix = "/api", host = "shop.example" }]

[services.idle]
command = "{echo}"
routes = ["/idle"]
instances = { min = 0, max = 1, initial = 0 }

[services.slow]
command = "{echo}"
routes = ["/slow"]
timeouts = { request = "300ms" }
"#;

fn service_of(instance: &str) -> &str {
    instance.rsplit_once('-').map_or("", |(service, _)| service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_longest_prefix_and_by_host() {
    let surge = Surge::start(ROUTED).await;
    let cases = [
        ("/web", None, "web"),
        ("/web/index.html", None, "web"),
        ("/api", None, "api"),
        ("/api/users/7", None, "api"),
        ("/api/v2/orders", None, "api"),
        ("/anything", Some("shop.example"), "shop"),
        ("/api/users", Some("SHOP.example:8080"), "shop"),
        ("/api/users", Some("other.example"), "api"),
    ];
    for (path, host, service) in cases {
        let headers: Vec<(&str, &str)> = host.map(|h| ("host", h)).into_iter().collect();
        let answer = surge.request(Method::GET, path, &headers, Bytes::new()).await;
        assert_eq!(answer.status, StatusCode::OK, "{path} {host:?}");
        assert_eq!(service_of(&answer.instance()), service, "{path} with host {host:?}");
        assert_eq!(answer.json()["path"], path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_short_json_bodies_that_say_why() {
    let surge = Surge::start(ROUTED).await;

    let answer = surge.get("/webshop").await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "prefixes match whole segments");
    assert_eq!(answer.json()["error"], "no_route");
    assert!(answer.json()["message"].as_str().unwrap_or_default().contains("/webshop"));

    let answer = surge.get("/idle").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.json()["error"], "no_ready_instance");
    assert_eq!(answer.headers.get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));

    let answer = surge.get("/slow?delay=3s").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.json()["error"], "upstream_timeout");
    assert!(answer.json()["message"].as_str().unwrap_or_default().contains("services.slow.timeouts.request"));

    // The instance's own error statuses pass through untouched.
    let answer = surge.get("/web?status=503").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answer.headers.get("x-surge-error").is_none());
}

/// Sends `method` to a slow path, SIGKILLs the only `web` instance while the request is in
/// flight, and returns the answer.
async fn kill_mid_request(surge: &Surge, method: Method, path: &str) -> common::Answer {
    let pid = surge.service("web").await.instances[0].pid.expect("pid");
    let pending = tokio::spawn({
        let (client, url) = (common::http_client(), surge.url(path));
        async move { common::send(&client, method, &url, &[], Bytes::new()).await }
    });
    surge
        .wait_for("the request to be in flight", |s| {
            s.iter().any(|s| s.service == "web" && s.instances.iter().any(|i| i.in_flight == 1))
        })
        .await;
    common::kill(pid, 9);
    pending.await.expect("task").expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_dying_mid_request_gives_a_502_to_a_post() {
    let surge = Surge::start(ROUTED).await;
    // A POST may have reached the instance: it is not sent again.
    let answer = kill_mid_request(&surge, Method::POST, "/web?delay=5s").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.json()["error"], "upstream_failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_whose_instance_dies_is_retried_on_the_replacement() {
    let surge = Surge::start(ROUTED).await;
    let answer = kill_mid_request(&surge, Method::GET, "/web?delay=5s").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.instance(), "web-2", "served by the replacement");
    assert!(surge.metrics().await.contains(r#"surge_retries_total{service="web"} 1"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_on_a_retry_route_is_retried_on_the_replacement() {
    let surge = Surge::start(ROUTED).await;
    let answer = kill_mid_request(&surge, Method::POST, "/web/pay?delay=5s").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    assert_eq!(answer.instance(), "web-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_concurrency_limit_sheds_the_excess_at_once() {
    let surge = Surge::start(
        r#"
[services.web]
command = "{echo}"
routes = ["/"]
instances = { min = 2, max = 2 }
max_concurrency = 2
buffer = { requests = 0 }
"#,
    )
    .await;
    let requests: Vec<_> = (0..5)
        .map(|_| {
            let (client, url) = (common::http_client(), surge.url("/?delay=500ms"));
            tokio::spawn(async move { common::send(&client, Method::GET, &url, &[], Bytes::new()).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        let answer = request.await.expect("task").expect("answer");
        statuses.push((answer.status, answer.headers.get("x-surge-error").cloned()));
    }
    let served = statuses.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let shed = statuses
        .iter()
        .filter(|(s, e)| {
            *s == StatusCode::SERVICE_UNAVAILABLE && e.as_ref().is_some_and(|e| e == "buffer_full")
        })
        .count();
    assert_eq!((served, shed), (2, 3), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_hop_by_hop_headers_removed() {
    let surge = Surge::start(ROUTED).await;
    let headers = [("connection", "keep-alive, x-private"), ("x-private", "secret"), ("x-custom", "kept")];
    let answer = surge.request(Method::GET, "/web", &headers, Bytes::new()).await;
    let seen = &answer.json()["headers"];
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], surge.gateway.to_string());
    assert_eq!(seen["host"], surge.gateway.to_string(), "the Host header is kept");
    assert_eq!(seen["x-custom"], "kept");
    let deadline: u64 =
        seen["x-surge-deadline-ms"].as_str().and_then(|d| d.parse().ok()).expect("deadline header");
    assert!(deadline > 50_000 && deadline <= 60_000, "the request timeout left: {deadline}");
    assert!(seen.get("x-private").is_none(), "named by Connection, so hop-by-hop: {seen}");
    assert!(answer.headers.get("x-surge-instance").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways() {
    let surge = Surge::start(ROUTED).await;
    let upload = Bytes::from(vec![b'u'; 24 * 1024 * 1024 + 3]);
    let answer = surge.request(Method::POST, "/api/upload", &[], upload.clone()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["body_bytes"], upload.len());

    let size = 32 * 1024 * 1024 + 5;
    let answer = surge.get(&format!("/api/download?bytes={size}")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body.len(), size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_service_and_status_class() {
    let surge = Surge::start(ROUTED).await;
    for _ in 0..3 {
        assert_eq!(surge.get("/web").await.status, StatusCode::OK);
    }
    assert_eq!(surge.get("/web?status=502").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(surge.get("/nowhere").await.status, StatusCode::NOT_FOUND);
    let text = surge.metrics().await;
    for expected in [
        r#"surge_requests_total{service="web",class="2xx"} 3"#,
        r#"surge_requests_total{service="web",class="5xx"} 1"#,
        r#"surge_unrouted_requests_total 1"#,
        r#"surge_request_duration_seconds_count{service="web"} 4"#,
        r#"surge_requests_in_flight{service="web"} 0"#,
        r#"surge_instances{service="api",state="ready"} 2"#,
        r#"surge_instance_restarts_total{service="web"} 0"#,
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
    assert!(ECHO.ends_with("surge-echo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_is_served_through_the_gateway() {
    use http_body_util::{BodyExt, Full};
    let surge = Surge::start(ROUTED).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for path in ["/web/h2", "/api/users/1"] {
        let request = hyper::Request::get(surge.url(path)).body(Full::new(Bytes::new())).expect("request");
        let response = client.request(request).await.expect("an HTTP/2 answer");
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(echo["path"], path);
        assert_eq!(echo["headers"]["host"], surge.gateway.to_string(), "the authority becomes Host");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_may_speak_h2c_to_its_instances() {
    let surge = Surge::start(
        r#"
[services.grpcish]
command = "{echo}"
routes = ["/"]
protocol = "h2c"
"#,
    )
    .await;
    // HTTP/1.1 clients, concurrently; the instance hears HTTP/2.
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (client, url) = (common::http_client(), surge.url(if i == 0 { "/?bytes=300000" } else { "/h2" }));
        requests.spawn(async move { (i, common::send(&client, Method::GET, &url, &[], Bytes::new()).await) });
    }
    let mut answers = Vec::new();
    while let Some(answer) = requests.join_next().await {
        let (i, answer) = answer.expect("request task");
        answers.push((i, answer.expect("an answer")));
    }
    answers.sort_by_key(|(i, _)| *i);
    let answers: Vec<common::Answer> = answers.into_iter().map(|(_, a)| a).collect();
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    assert_eq!(answers[0].body.len(), 300_000, "a streamed body crosses intact");
    let echo = answers[1].json();
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["path"], "/h2");
    assert_eq!(echo["headers"]["host"], surge.gateway.to_string());
    assert!(echo["headers"].get("connection").is_none(), "no HTTP/1 connection headers over HTTP/2");
}

/// One masked client frame (RFC 6455 §5.3), for payloads under 126 bytes.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, byte)| byte ^ mask[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echo_through_the_gateway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let surge = Surge::start(ROUTED).await;
    let mut socket = tokio::net::TcpStream::connect(surge.gateway).await.expect("connect");
    socket
        .write_all(
            b"GET /api/socket HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("handshake");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        socket.read_exact(&mut byte).await.expect("handshake answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");

    for (opcode, message, answer) in
        [(0x1, &b"hello surge"[..], 0x1u8), (0x2, &[0u8, 1, 2, 255][..], 0x2), (0x9, b"ping", 0xA)]
    {
        socket.write_all(&client_frame(opcode, message)).await.expect("send");
        let mut frame_head = [0u8; 2];
        socket.read_exact(&mut frame_head).await.expect("frame");
        assert_eq!(frame_head[0], 0x80 | answer);
        let mut payload = vec![0u8; usize::from(frame_head[1] & 0x7f)];
        socket.read_exact(&mut payload).await.expect("payload");
        assert_eq!(payload, message);
    }
    socket.write_all(&client_frame(0x8, &[0x03, 0xe8])).await.expect("close");
    let mut close = [0u8; 4];
    socket.read_exact(&mut close).await.expect("close answer");
    assert_eq!(close[0], 0x88);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let surge = Surge::start(ROUTED).await;
    for size in [2_000usize, 200_000] {
        let mut socket = tokio::net::TcpStream::connect(surge.gateway).await.expect("connect");
        let head = format!(
            "POST /web/upload HTTP/1.1\r\nHost: gateway\r\nContent-Length: {size}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        );
        socket.write_all(head.as_bytes()).await.expect("head");
        let mut interim = [0u8; 25];
        socket.read_exact(&mut interim).await.expect("an interim answer before the body");
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n", "{}", String::from_utf8_lossy(&interim));
        socket.write_all(&vec![b'b'; size]).await.expect("body");
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.expect("answer");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(&format!("\"body_bytes\":{size}")), "{answer}");
    }
}

/// Writes `bytes` on a new connection and reads everything the gateway sends until it closes.
async fn raw_exchange(surge: &Surge, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(surge.gateway).await.expect("connect");
    socket.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), socket.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_heads_get_a_clear_error_then_a_close() {
    let surge = Surge::start(ROUTED).await;
    let big = format!("GET /web HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(70_000));
    for (request, status, code) in [
        ("GET /web HTTP/1.1\r\nHo st: x\r\n\r\n", "400 Bad Request", "bad_request_head"),
        (
            "POST /web HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc",
            "400 Bad Request",
            "bad_request_head",
        ),
        (
            "POST /web HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
            "400 Bad Request",
            "bad_request_head",
        ),
        (big.as_str(), "431 Request Header Fields Too Large", "request_head_too_large"),
        // Which host a request is for must not be ambiguous, nor its method's case.
        ("GET /web HTTP/1.1\r\n\r\n", "400 Bad Request", "bad_request_head"),
        ("GET /web HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400 Bad Request", "bad_request_head"),
        ("get /web HTTP/1.1\r\nHost: x\r\n\r\n", "400 Bad Request", "bad_request_head"),
        (
            "POST /web HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "501 Not Implemented",
            "unsupported_transfer_coding",
        ),
    ] {
        let answer = raw_exchange(&surge, request.as_bytes()).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        assert!(answer.contains(&format!("\"error\":\"{code}\"")), "{answer}");
    }
    assert_eq!(surge.get("/web").await.status, StatusCode::OK, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_fields_are_believed_only_from_trusted_proxies() {
    let claims = [
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-proto", "https"),
        ("x-real-ip", "203.0.113.9"),
        ("x-surge-deadline-ms", "1"),
    ];
    let direct = Surge::start(ROUTED).await;
    let headers = direct.request(Method::GET, "/web", &claims, Bytes::new()).await.json()["headers"].clone();
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");
    assert!(headers.get("x-real-ip").is_none(), "{headers}");
    assert_ne!(headers["x-surge-deadline-ms"], "1", "the gateway's own deadline, not the client's");

    let behind_proxy = Surge::start_with("trusted_proxies = [\"127.0.0.0/8\"]", ROUTED, |_| {}).await;
    let headers =
        behind_proxy.request(Method::GET, "/web", &claims, Bytes::new()).await.json()["headers"].clone();
    assert_eq!(headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1", "{headers}");
    assert_eq!(headers["x-forwarded-proto"], "https", "{headers}");
    assert_eq!(headers["x-real-ip"], "203.0.113.9", "{headers}");
    assert_ne!(headers["x-surge-deadline-ms"], "1", "{headers}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_broken_body_is_its_own_400_and_never_ejects_an_instance() {
    let surge = Surge::start(
        r#"
[services.web]
command = "{echo}"
routes = ["/"]
instances = { min = 2, max = 2 }
"#,
    )
    .await;
    // More than enough failures in a row to eject both instances, were they blamed.
    for _ in 0..8 {
        let answer = raw_exchange(
            &surge,
            b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2 x\r\nde\r\n0\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
        assert!(answer.contains("\"error\":\"bad_request_body\""), "{answer}");
        assert!(answer.contains("connection: close\r\n"), "{answer}");
    }
    let status = surge.service("web").await;
    assert!(status.instances.iter().all(|i| i.ejections == 0 && !i.ejected), "{status:#?}");
    let metrics = surge.metrics().await;
    assert!(!metrics.contains("surge_outlier_ejections_total{service=\"web\"} 1"), "{metrics}");
    let served: std::collections::HashSet<String> = instances_serving(&surge, 8).await.into_iter().collect();
    assert_eq!(served.len(), 2, "both instances still serve: {served:?}");
}

/// The instances that answer `count` sequential requests.
async fn instances_serving(surge: &Surge, count: usize) -> Vec<String> {
    let mut served = Vec::new();
    for _ in 0..count {
        let answer = surge.get("/").await;
        assert_eq!(answer.status, StatusCode::OK);
        served.push(answer.instance());
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_chunked_and_http10_requests_are_answered_in_order() {
    let surge = Surge::start(ROUTED).await;
    let requests = concat!(
        "POST /web/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        "5;note=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        "GET /web/b HTTP/1.1\r\nHost: x\r\n\r\n",
        "HEAD /web/c HTTP/1.1\r\nHost: x\r\n\r\n",
        "GET /web/d HTTP/1.0\r\n\r\n",
    );
    let answer = raw_exchange(&surge, requests.as_bytes()).await;
    let heads: Vec<&str> = answer.matches("HTTP/1.1 200 OK").collect();
    assert_eq!(heads.len(), 4, "{answer}");
    let a = answer.find("\"path\":\"/web/a\"").expect("a answered");
    let b = answer.find("\"path\":\"/web/b\"").expect("b answered");
    let d = answer.find("\"path\":\"/web/d\"").expect("d answered");
    assert!(a < b && b < d, "in order: {answer}");
    assert!(answer.contains("\"body_bytes\":11"), "the chunked body arrived whole: {answer}");
    assert!(!answer.contains("\"path\":\"/web/c\""), "a HEAD answer has no body: {answer}");
    assert!(answer.ends_with('}') && answer.contains("connection: close\r\n"), "HTTP/1.0 closes: {answer}");
}
