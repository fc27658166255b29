//! Instances spoken to over TLS (`protocol = "https"`). A TLS server in the test (hyper over
//! rustls, not surge's own server) stands for an HTTPS service elsewhere: surge checks its
//! certificate for the configured name, keeps connections alive, streams bodies and upgrades
//! over them, shows a client certificate when asked, and refuses a certificate that does not
//! match, saying why.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::pem::Pem;
use common::Surge;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use surge_admin::api::InstanceState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the upstream saw of one TLS connection.
struct Seen {
    sni: Option<String>,
    client_certificate: bool,
    requests: Arc<AtomicUsize>,
}

struct Upstream {
    port: u16,
    connections: Arc<Mutex<Vec<Seen>>>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl Upstream {
    fn seen<T>(&self, look: impl FnOnce(&[Seen]) -> T) -> T {
        look(&self.connections.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// An HTTPS server with `pem`'s certificate that answers `PATH BODY-LENGTH`, and echoes bytes
/// after an `Upgrade: echo`; with `client_roots`, it asks for a client certificate they sign.
async fn upstream(pem: &Pem, client_roots: Option<&Pem>) -> Upstream {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_roots {
        Some(roots) => {
            let mut store = rustls::RootCertStore::empty();
            store.add(CertificateDer::from_pem_slice(roots.cert.as_bytes()).expect("PEM")).expect("root");
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
                    .build()
                    .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = vec![CertificateDer::from_pem_slice(pem.cert.as_bytes()).expect("PEM")];
    let key = PrivateKeyDer::from_pem_slice(pem.key.as_bytes()).expect("key");
    let config = builder.with_single_cert(chain, key).expect("certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let connections: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let seen = Arc::clone(&connections);
    let accepting = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let requests: Arc<AtomicUsize> = Arc::default();
                let (_, connection) = tls.get_ref();
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(Seen {
                    sni: connection.server_name().map(str::to_owned),
                    client_certificate: connection.peer_certificates().is_some(),
                    requests: Arc::clone(&requests),
                });
                let service = hyper::service::service_fn(move |request| {
                    requests.fetch_add(1, Ordering::SeqCst);
                    answer(request)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Upstream { port, connections, accepting }
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.headers().get("upgrade").is_some_and(|u| u == "echo") {
        let upgrading = hyper::upgrade::on(request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrading.await else { return };
            let mut upgraded = TokioIo::new(upgraded);
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = upgraded.read(&mut buf).await {
                if upgraded.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::default());
        return Ok(response.unwrap_or_default());
    }
    let path = request.uri().path().to_owned();
    let length = match request.into_body().collect().await {
        Ok(body) => body.to_bytes().len().to_string(),
        Err(err) => format!("body failed: {err}"),
    };
    Ok(Response::new(Full::new(Bytes::from(format!("{path} {length}")))))
}

fn service(name: &str, port: u16, tls: &str) -> String {
    format!(
        r#"
[services.{name}]
upstreams = ["127.0.0.1:{port}"]
protocol = "https"
tls = {{ {tls} }}
routes = ["/{name}"]
health = {{ interval = "100ms" }}
buffer = {{ timeout = "200ms" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_are_verified_kept_alive_and_streamed_to() {
    let backend = Pem::for_names(&["backend.test"]);
    let upstream = upstream(&backend, None).await;
    let services = service("api", upstream.port, r#"ca = "backend.pem", server_name = "backend.test""#);
    let surge = Surge::start_with("", &services, |dir| backend.write(dir, "backend")).await;

    for i in 0..20 {
        let answer = surge.get(&format!("/api/{i}")).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
        assert_eq!(answer.body, format!("/api/{i} 0"));
    }
    // Health checks connect anew each time; requests reuse their kept-alive connection.
    let most = upstream.seen(|seen| seen.iter().map(|s| s.requests.load(Ordering::SeqCst)).max());
    assert!(most >= Some(20), "20 requests over one connection: {most:?}");
    let names: Vec<Option<String>> = upstream.seen(|seen| seen.iter().map(|s| s.sni.clone()).collect());
    assert!(names.iter().all(|name| name.as_deref() == Some("backend.test")), "{names:?}");

    // A large body is streamed through.
    let big = Bytes::from(vec![b'x'; 3 << 20]);
    let answer = surge.request(Method::POST, "/api/upload", &[], big).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, format!("/api/upload {}", 3 << 20));

    // An upgrade runs over the TLS connection.
    let mut client = tokio::net::TcpStream::connect(surge.gateway).await.expect("connect");
    client
        .write_all(b"GET /api/ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        client.read_exact(&mut byte).await.expect("the answer's head");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    client.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    client.read_exact(&mut echoed).await.expect("echo");
    assert_eq!(&echoed, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_shown_to_upstreams_that_ask() {
    let (backend, client) = (Pem::for_names(&["127.0.0.1"]), Pem::for_names(&["surge.client"]));
    let upstream = upstream(&backend, Some(&client)).await;
    // No server_name: the certificate is checked for the upstream's own host, an address here.
    let services =
        service("api", upstream.port, r#"ca = "backend.pem", cert = "client.pem", key = "client.key""#);
    let surge = Surge::start_with("", &services, |dir| {
        backend.write(dir, "backend");
        client.write(dir, "client");
    })
    .await;
    let answer = surge.get("/api/x").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
    assert!(upstream.seen(|seen| !seen.is_empty() && seen.iter().all(|s| s.client_certificate)));
    assert!(upstream.seen(|seen| seen.iter().all(|s| s.sni.is_none())), "no SNI for an address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_whose_certificate_does_not_match_is_never_used() {
    let backend = Pem::for_names(&["backend.test"]);
    let upstream = upstream(&backend, None).await;
    let services = service("api", upstream.port, r#"ca = "backend.pem", server_name = "other.test""#);
    let surge = Surge::launch("", &services, |dir| backend.write(dir, "backend"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !surge.log().contains("fails its health check") {
        assert!(std::time::Instant::now() < deadline, "no word of the failing check:\n{}", surge.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let log = surge.log();
    assert!(log.contains("certificate not valid for name \"other.test\""), "{log}");
    let status = surge.service("api").await;
    assert!(status.instances.iter().all(|i| i.state == InstanceState::Starting), "{status:?}");
    let answer = surge.get("/api/x").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(upstream.seen(|seen| seen.len()), 0, "no handshake completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_off_without_close_notify_is_not_taken_as_whole() {
    // An upstream whose answer ends with the connection, then a bare TCP end: someone on the
    // path can cut a TLS stream so, and only close_notify says the answer is whole.
    let backend = Pem::for_names(&["backend.test"]);
    let chain = vec![CertificateDer::from_pem_slice(backend.cert.as_bytes()).expect("PEM")];
    let key = PrivateKeyDer::from_pem_slice(backend.key.as_bytes()).expect("key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let accepting = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let health = head.starts_with(b"GET /healthz");
                let answer: &[u8] = if health {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\npartial"
                };
                let _ = tls.write_all(answer).await;
                let _ = tls.flush().await;
                // Dropped without shutdown: no close_notify, a bare TCP end.
                let (tcp, _) = tls.into_inner();
                drop(tcp);
            });
        }
    });
    let services = service("api", port, r#"ca = "backend.pem", server_name = "backend.test""#);
    let surge = Surge::start_with("", &services, |dir| backend.write(dir, "backend")).await;
    let client = common::http_client();
    let answer = common::send(&client, Method::GET, &surge.url("/api/x"), &[], Bytes::new()).await;
    accepting.abort();
    // The head went out before the cut, so the client sees its body broken off, not whole.
    let whole = answer.as_ref().is_ok_and(|a| a.status == StatusCode::OK && a.body == "partial");
    assert!(!whole, "a cut-off answer was passed on as whole: {:?}", answer.map(|a| a.body));
}
