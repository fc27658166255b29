//! The server on its own: the real connection loop on in-memory socket pairs, in front of a
//! small service, so framing, pipelining, timeouts and upgrades are tested without the gateway.
//! Timeouts run in virtual time.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use surge_config::ClientTimeouts;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{ClientAddr, ClientBody, ClientUpgrade, HttpService};

/// Answers `METHOD TARGET from CLIENT: BODY`, reading the whole body first. A request that
/// asks to upgrade is switched to a protocol that echoes what it is sent.
fn echo() -> impl HttpService<Full<Bytes>> {
    tower::service_fn(|request: Request<ClientBody>| async move {
        let (mut parts, body) = request.into_parts();
        if let Some(upgrade) = parts.extensions.remove::<ClientUpgrade>() {
            tokio::spawn(async move {
                let Some(mut upgraded) = upgrade.upgraded().await else { return };
                let mut buf = [0u8; 64];
                while let Ok(n @ 1..) = upgraded.read(&mut buf).await {
                    let _ = upgraded.write_all(&buf[..n]).await;
                }
            });
            let response = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("upgrade", "echo")
                .body(Full::new(Bytes::new()));
            return Ok::<_, Infallible>(response.unwrap_or_default());
        }
        let client = parts.extensions.get::<ClientAddr>().map(|c| c.addr.to_string()).unwrap_or_default();
        let body = match body.collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            Err(err) => format!("<{err}>"),
        };
        let text = format!("{} {} from {client}: {body}", parts.method, parts.uri);
        Ok(Response::new(Full::new(Bytes::from(text))))
    })
}

/// Answers at once, never reading the body.
fn hasty() -> impl HttpService<Full<Bytes>> {
    tower::service_fn(|_: Request<ClientBody>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("no"))))
    })
}

struct Client {
    socket: UnixStream,
    stop: super::drain::Signal,
}

fn connect<B: super::ResponseBody>(service: impl HttpService<B>) -> Client {
    let (socket, server_side) = UnixStream::pair().expect("socket pair");
    let (stop, stopping) = super::drain::Signal::new();
    tokio::spawn(serve(service, server_side, stopping));
    Client { socket, stop }
}

/// The server's side of a connection from 192.0.2.7:4321, with the default timeouts.
async fn serve<B: super::ResponseBody>(
    service: impl HttpService<B>,
    socket: UnixStream,
    stopping: super::drain::Watch,
) {
    let client = ClientAddr::new("192.0.2.7:4321".parse().expect("address"));
    let timeouts = std::sync::Arc::new(ClientTimeouts::default());
    super::h1::serve(service, socket, client, timeouts, stopping, None).await;
}

impl Client {
    async fn send(&mut self, bytes: &str) {
        self.socket.write_all(bytes.as_bytes()).await.expect("write");
    }

    /// Everything until the server closes; a guard, not a measurement, bounds the wait.
    async fn read_to_close(&mut self) -> String {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(600), self.socket.read_to_end(&mut answer)).await;
        assert!(matches!(read, Ok(Ok(_))), "the server closes the connection");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Whether the server neither sends nor closes for `quiet` (in virtual time, in these tests).
    async fn silent_for(&mut self, quiet: Duration) -> bool {
        let mut buf = [0u8; 64];
        tokio::time::timeout(quiet, self.socket.read(&mut buf)).await.is_err()
    }

    /// Reads until the answer so far contains `wanted`.
    async fn read_until(&mut self, wanted: &str) -> String {
        let mut answer = Vec::new();
        while !String::from_utf8_lossy(&answer).contains(wanted) {
            let mut buf = [0u8; 4096];
            let n = self.socket.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before {wanted:?}; got {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_with_their_bodies() {
    let mut client = connect(echo());
    client
        .send(concat!(
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "5;note=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
            "PUT /b?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            "HEAD /c HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /d HTTP/1.0\r\n\r\n",
            "GET /never HTTP/1.1\r\nHost: x\r\n\r\n",
        ))
        .await;
    let answer = client.read_to_close().await;
    let bodies: Vec<&str> = answer.split("\r\n\r\n").skip(1).collect();
    assert_eq!(answer.matches("HTTP/1.1 200 OK\r\n").count(), 4, "{answer}");
    assert!(bodies[0].starts_with("POST /a from 192.0.2.7:4321: hello world"), "{answer}");
    assert!(bodies[1].starts_with("PUT /b?q=1 from 192.0.2.7:4321: abc"), "{answer}");
    assert!(
        bodies[2].is_empty() || bodies[2].starts_with("HTTP/1.1"),
        "a HEAD's answer has no body: {answer}"
    );
    assert!(answer.ends_with("GET /d from 192.0.2.7:4321: "), "HTTP/1.0 closes after its answer: {answer}");
    assert!(!answer.contains("/never"), "{answer}");
}

#[tokio::test]
async fn a_malformed_head_gets_a_json_400_then_a_close() {
    for (request, status, code) in [
        ("GET / HTTP/1.1\r\nHo st: x\r\n\r\n", "400 Bad Request", "bad_request_head"),
        (
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "400 Bad Request",
            "bad_request_head",
        ),
        (
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "501 Not Implemented",
            "unsupported_transfer_coding",
        ),
    ] {
        let mut client = connect(echo());
        client.send(request).await;
        let answer = client.read_to_close().await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}\r\n")), "{answer}");
        assert!(answer.contains("connection: close\r\n") && answer.contains("x-surge-error: "), "{answer}");
        assert!(answer.contains(&format!("\"error\":\"{code}\"")), "{answer}");
    }
}

#[tokio::test]
async fn a_malformed_chunked_body_reaches_the_service_as_an_error_and_ends_the_connection() {
    let mut client = connect(echo());
    client
        .send("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3 x\r\nabc\r\n0\r\n\r\n")
        .await;
    let answer = client.read_to_close().await;
    assert!(answer.contains("POST /a from 192.0.2.7:4321: <malformed body: "), "{answer}");
    assert!(answer.contains("connection: close\r\n"), "{answer}");
}

#[tokio::test]
async fn continue_is_sent_only_when_the_body_is_wanted() {
    let mut client = connect(echo());
    client.send("PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").await;
    let interim = client.read_until("\r\n\r\n").await;
    assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
    client.send("hello").await;
    let answer = client.read_until("hello").await;
    assert!(
        answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("PUT /up from 192.0.2.7:4321: hello")
    );

    // Answered without the body: no 100, and the connection closes rather than wait for it.
    let mut client = connect(hasty());
    client.send("PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").await;
    let answer = client.read_to_close().await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && !answer.contains("100 Continue"), "{answer}");
}

#[tokio::test]
async fn an_upgrade_hands_the_connection_to_the_service() {
    let mut client = connect(echo());
    client.send("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").await;
    let head = client.read_until("\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{head}");
    assert!(head.contains("connection: upgrade\r\n") && head.contains("upgrade: echo\r\n"), "{head}");
    client.send("ping").await;
    assert_eq!(client.read_until("ping").await, "ping");
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let mut client = connect(echo());
    client.send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    client.read_until("GET /a from").await;
    let just_before = ClientTimeouts::default().keepalive - Duration::from_secs(1);
    assert!(client.silent_for(just_before).await, "kept open until the idle timeout");
    assert_eq!(client.read_to_close().await, "", "then closed without a word");
}

#[tokio::test(start_paused = true)]
async fn a_head_that_never_ends_is_cut_off() {
    let mut client = connect(echo());
    client.send("GET /slow HTTP/1.1\r\nHost: x\r\n").await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.send("X-Drip: 1\r\n").await;
    }
    // Ten seconds of drips so far: the head timeout counts from the head's first byte.
    let just_before = ClientTimeouts::default().head - Duration::from_secs(11);
    assert!(client.silent_for(just_before).await, "kept open until the head timeout");
    assert_eq!(client.read_to_close().await, "", "then closed without an answer");
}

#[tokio::test]
async fn shutdown_closes_an_idle_connection() {
    let mut client = connect(echo());
    client.send("GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    client.read_until("GET /a from").await;
    client.stop.drain();
    assert_eq!(client.read_to_close().await, "");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stops_coming_fails_after_the_body_timeout() {
    let mut client = connect(echo());
    client.send("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc").await;
    let just_before = ClientTimeouts::default().body - Duration::from_secs(1);
    assert!(client.silent_for(just_before).await, "waits for the rest until the body timeout");
    let answer = client.read_to_close().await;
    assert!(answer.contains("<no byte of the request body came for 60s"), "{answer}");
}

#[tokio::test]
async fn a_body_over_its_limit_fails_as_it_arrives() {
    let limited = tower::service_fn(|mut request: Request<ClientBody>| async move {
        let refused = request.body_mut().limit(5).is_err();
        let read = request.into_body().collect().await.map(|_| ()).map_err(|err| err.to_string());
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
            "refused at once: {refused}, read: {read:?}"
        )))))
    });
    let mut client = connect(limited);
    client.send("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n").await;
    let answer = client.read_until("read:").await;
    assert!(answer.contains("refused at once: false") && answer.contains("larger than 5 bytes"), "{answer}");

    let mut client = connect(tower::service_fn(|mut request: Request<ClientBody>| async move {
        let refused = request.body_mut().limit(5).is_err();
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("refused at once: {refused}")))))
    }));
    client.send("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n").await;
    assert!(client.read_until("refused at once:").await.contains("refused at once: true"));
}

/// A response body that never ends, and says when it is dropped.
struct Endless(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![b'x'; 64 * 1024])))))
    }
}

impl Drop for Endless {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cut_off_after_the_send_timeout() {
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&dropped);
    let endless = tower::service_fn(move |_: Request<ClientBody>| {
        let flag = std::sync::Arc::clone(&flag);
        async move { Ok::<_, Infallible>(Response::new(Endless(flag))) }
    });
    let client = connect(endless);
    let mut socket = client.socket;
    socket.write_all(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    // The client reads nothing: the socket's buffers fill, and the server's writes wait.
    tokio::time::sleep(ClientTimeouts::default().send - Duration::from_secs(1)).await;
    assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst), "still waiting for the client");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst), "the response was given up");
}

#[tokio::test(start_paused = true)]
async fn an_idle_http2_connection_is_closed_after_the_keepalive_timeout() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (socket, server_side) = UnixStream::pair().expect("socket pair");
    let (_stop, stopping) = super::drain::Signal::new();
    tokio::spawn(serve(echo(), server_side, stopping));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(socket)).await.expect("h2");
    let connection = tokio::spawn(connection);
    let request = Request::get("http://x/a").body(http_body_util::Empty::<Bytes>::new()).expect("request");
    let response = sender.send_request(request).await.expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    let keepalive = ClientTimeouts::default().keepalive;
    tokio::time::sleep(keepalive + Duration::from_secs(1)).await;
    assert!(!connection.is_finished(), "a stream was opened in the first interval");
    // A whole interval without a stream: GOAWAY, and the connection ends.
    tokio::time::sleep(keepalive + Duration::from_secs(1)).await;
    assert!(connection.is_finished(), "the idle connection is still open");
}

/// A connection's task holds its connection's future for as long as it stays open, so that
/// future's size is what every idle keep-alive connection costs (10,000 idle connections
/// took 124 MiB while a TLS session sat inline in it).
#[tokio::test]
async fn a_connection_s_future_holds_no_request_state_inline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let dialed = tokio::net::TcpStream::connect(address).await.expect("connect");
    let (stream, peer) = listener.accept().await.expect("accept");
    let accepting = super::Accepting {
        service: echo(),
        stop: super::drain::Signal::new().1,
        tls: None,
        timeouts: Default::default(),
        trusted_proxies: Default::default(),
        proxy_protocol: false,
        per_client: None,
    };
    let serving = accepting.plain_connection(stream, peer, None);
    let size = std::mem::size_of_val(&serving);
    // A TLS session inline made it about 10 KiB; a request head's read and a refused head's
    // error kept beside the idle wait, 1,136 bytes; a `select!` over the shutdown watch's
    // `changed()`, 504. Now it is the connection's own parts, the idle wait and its timer. At
    // most 408 bytes, tokio's task around it (its header, trailer and 128-byte alignment)
    // takes 512.
    assert!(size <= 408, "a connection's future takes {size} bytes");
    drop((serving, dialed));
}
