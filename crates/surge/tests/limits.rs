//! Clients that send too much, too slowly, or read nothing: 413 at once, 408, and a cut-off
//! connection, none of them held against the instance.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::Surge;
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GATEWAY: &str = "max_body = \"1KiB\"\nbody_timeout = \"1s\"\nsend_timeout = \"1s\"\n";
const SERVICES: &str = r#"
[services.web]
command = "{echo}"
routes = ["/", { prefix = "/upload", max_body = "1MiB" }]
instances = { min = 2, max = 2 }
"#;

async fn exchange(surge: &Surge, request: &[u8]) -> String {
    let mut socket = TcpStream::connect(surge.gateway).await.expect("connect");
    socket.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the head and the JSON error are in; the connection may stay open after them.
    while !String::from_utf8_lossy(&answer).contains('}') {
        match tokio::time::timeout(Duration::from_secs(20), socket.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => answer.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413_and_slow_ones_408() {
    let surge = Surge::start_with(GATEWAY, SERVICES, |_| {}).await;

    // Declared too large: refused before a byte of it is read.
    let declared =
        exchange(&surge, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000000\r\n\r\n").await;
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    assert!(declared.contains(r#""error":"body_too_large""#), "{declared}");

    // Found too large as it streams.
    let chunk = "x".repeat(800);
    let chunked = format!(
        "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n"
    );
    let streamed = exchange(&surge, chunked.as_bytes()).await;
    assert!(streamed.starts_with("HTTP/1.1 413"), "{streamed}");

    // A route may allow more.
    let upload = surge.request(Method::POST, "/upload", &[], Bytes::from(vec![b'u'; 100_000])).await;
    assert_eq!(upload.status, StatusCode::OK);
    assert_eq!(upload.json()["body_bytes"], 100_000);

    // Three bytes of ten, then nothing; more of them at once than it takes to eject both
    // instances, were the timeouts blamed on them.
    let surge = std::sync::Arc::new(surge);
    let mut stalls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let surge = std::sync::Arc::clone(&surge);
        stalls.spawn(async move {
            exchange(&surge, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc").await
        });
    }
    while let Some(stalled) = stalls.join_next().await {
        let stalled = stalled.expect("task");
        assert!(stalled.starts_with("HTTP/1.1 408"), "{stalled}");
        assert!(stalled.contains(r#""error":"body_timeout""#), "{stalled}");
    }
    let status = surge.service("web").await;
    assert!(status.instances.iter().all(|i| i.ejections == 0 && !i.ejected), "{status:#?}");
    assert_eq!(surge.get("/x").await.status, StatusCode::OK, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    let surge = Surge::start_with(GATEWAY, SERVICES, |_| {}).await;
    let mut socket = TcpStream::connect(surge.gateway).await.expect("connect");
    let size = 200_000_000u64;
    socket
        .write_all(format!("GET /x?bytes={size} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .expect("write");
    // Read nothing for a while: the gateway's writes stall, and after send_timeout it gives up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received += n as u64,
            Err(_) => panic!("the gateway kept the connection open after {received} bytes"),
        }
    }
    assert!(received < size, "the whole body arrived: the client was never cut off");
    assert_eq!(surge.get("/x").await.status, StatusCode::OK, "still serving");
}

/// A connection that has had one request answered, so the gateway surely holds it.
async fn held_connection(surge: &Surge) -> TcpStream {
    let (socket, answer) = opened(surge, "").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "held connection served");
    socket
}

/// A connection with `GET /held` sent on it (after `preamble`, such as a PROXY header): the
/// connection, and the first bytes of its answer.
async fn opened(surge: &Surge, preamble: &str) -> (TcpStream, String) {
    let mut socket = TcpStream::connect(surge.gateway).await.expect("connect");
    let request = format!("{preamble}GET /held HTTP/1.1\r\nHost: a\r\n\r\n");
    socket.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(20), socket.read(&mut buf))
        .await
        .expect("answered")
        .unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    (socket, answer)
}

const ONE: &str = "[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_client_waits_for_a_free_one() {
    let surge = Surge::start_with("max_connections = 2\n", ONE, |_| {}).await;
    let first = held_connection(&surge).await;
    let _second = held_connection(&surge).await;
    let mut third = TcpStream::connect(surge.gateway).await.expect("the kernel's backlog takes it");
    third.write_all(b"GET /third HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
    let mut buf = vec![0u8; 64 * 1024];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf)).await;
    assert!(early.is_err(), "answered while both connections were held");
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(20), third.read(&mut buf))
        .await
        .expect("served once a connection closed")
        .expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_per_client_limit_a_new_connection_gets_503() {
    let surge = Surge::start_with("max_connections_per_client = 1\n", ONE, |_| {}).await;
    let first = held_connection(&surge).await;
    let refused = exchange(&surge, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains(r#""error":"too_many_connections""#), "{refused}");
    drop(first);
    // The count is given back when the connection ends; the close takes a moment to be seen.
    let mut served = false;
    for _ in 0..100 {
        if exchange(&surge, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the client's connection count was never given back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_balancer_names_the_client_with_the_proxy_protocol() {
    let gateway = "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n";
    let surge = Surge::start_with(gateway, ONE, |_| {}).await;
    let v1 =
        exchange(&surge, b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await;
    assert!(v1.contains(r#""x-forwarded-for":"203.0.113.7""#), "{v1}");

    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[0x21, 0x11, 0, 12, 198, 51, 100, 9, 127, 0, 0, 1, 0x15, 0xb3, 0, 80]);
    v2.extend_from_slice(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    let v2 = exchange(&surge, &v2).await;
    assert!(v2.contains(r#""x-forwarded-for":"198.51.100.9""#), "{v2}");

    // Without a header the connection is closed unanswered.
    let bare = exchange(&surge, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(bare, "", "answered a connection without a PROXY header");
}

/// A connection through a load balancer speaking the PROXY protocol for `client`, with one
/// request sent: the connection, and the first bytes of its answer.
async fn proxied(surge: &Surge, client: &str) -> (TcpStream, String) {
    opened(surge, &format!("PROXY TCP4 {client} 127.0.0.1 40000 80\r\n")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_limit_counts_its_clients_not_the_proxy() {
    // Without the PROXY protocol a trusted proxy's connections carry many clients: not capped.
    let trusted = "max_connections_per_client = 1\ntrusted_proxies = [\"127.0.0.1\"]\n";
    let surge = Surge::start_with(trusted, ONE, |_| {}).await;
    let _first = held_connection(&surge).await;
    let _second = held_connection(&surge).await;

    // With it, each connection counts for the client its header names.
    let surge = Surge::start_with(&format!("{trusted}proxy_protocol = true\n"), ONE, |_| {}).await;
    let (_ada, answer) = proxied(&surge, "203.0.113.7").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (_bob, answer) = proxied(&surge, "203.0.113.8").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "another client through the same proxy: {answer}");
    let (_again, answer) = proxied(&surge, "203.0.113.7").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "the first client's second connection: {answer}");
    assert!(answer.contains(r#""error":"too_many_connections""#), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_websocket_counts_against_the_per_client_limit() {
    let surge = Surge::start_with("max_connections_per_client = 1\n", ONE, |_| {}).await;
    let mut socket = TcpStream::connect(surge.gateway).await.expect("connect");
    socket
        .write_all(
            b"GET /socket HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .expect("handshake");
    let mut buf = vec![0u8; 4096];
    let n = socket.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 101"), "switched");
    // The tunnel is open: the client's one connection is still in use.
    let refused = exchange(&surge, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
}

fn http2_client<B>(
) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// HTTP/2 streams are bounded as HTTP/1.1 requests are: a body that stops coming gets 408, not
/// held against the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_body_that_stops_coming_gets_408() {
    let surge = Surge::start_with(GATEWAY, SERVICES, |_| {}).await;
    let request = hyper::Request::post(surge.url("/upload")).body(Stalling(false)).expect("request");
    let response = tokio::time::timeout(Duration::from_secs(20), http2_client().request(request))
        .await
        .expect("answered while the body was still open")
        .expect("an HTTP/2 answer");
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::REQUEST_TIMEOUT);
    let status = surge.service("web").await;
    assert!(status.instances.iter().all(|i| i.ejections == 0 && i.in_flight == 0), "{status:#?}");
}

/// Three bytes of a request body, then nothing, ever.
struct Stalling(bool);

impl http_body::Body for Stalling {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        if std::mem::replace(&mut self.0, true) {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(b"abc")))))
        }
    }
}

/// An HTTP/2 client that grants no window for a large answer holds no instance: after
/// send_timeout the response is given up and the instance's slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_frees_the_instance() {
    let surge = Surge::start_with(GATEWAY, SERVICES, |_| {}).await;
    let request = hyper::Request::get(surge.url("/x?bytes=200000000"))
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let response = http2_client().request(request).await.expect("an HTTP/2 answer");
    assert_eq!(response.status(), StatusCode::OK);
    // Its body is never read, so the client never opens its window again.
    surge
        .wait_for("the answer under way", |pools| {
            pools.iter().any(|p| p.instances.iter().any(|i| i.in_flight == 1))
        })
        .await;
    surge
        .wait_for("the instance's slot freed", |pools| {
            pools.iter().all(|p| p.instances.iter().all(|i| i.in_flight == 0))
        })
        .await;
    drop(response);
    assert_eq!(surge.get("/x").await.status, StatusCode::OK, "still serving");
}
