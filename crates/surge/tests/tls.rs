//! HTTPS with real clients: curl over HTTP/1.1 and HTTP/2 (ALPN), h2load, openssl s_client
//! for versions and resumption, a rustls client across a certificate reload, and a testssl.sh
//! scan.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::pem::Pem;
use common::Surge;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

const WEB: &str = "[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\n";

fn tls_keys(files: &[&str]) -> String {
    let certs: Vec<String> =
        files.iter().map(|f| format!("{{ cert = \"{f}.pem\", key = \"{f}.key\" }}")).collect();
    format!("listen_tls = \"127.0.0.1:0\"\ntls = [{}]\n", certs.join(", "))
}

fn https(surge: &Surge) -> SocketAddr {
    surge.https.expect("an HTTPS listener")
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().expect("run curl")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_speaks_http1_and_http2_over_tls() {
    let pem = Pem::for_names(&["localhost"]);
    let gateway = format!("{}hsts = \"max-age=600\"\n", tls_keys(&["web"]));
    let surge = Surge::start_with(&gateway, WEB, |dir| pem.write(dir, "web")).await;
    let ca = surge.dir.join("web.pem");
    let ca = ca.to_str().expect("path");
    let base = format!("https://localhost:{}", https(&surge).port());
    let upload = surge.dir.join("upload.bin");
    std::fs::write(&upload, vec![b'u'; 5_000_000]).expect("write upload");
    let upload = format!("@{}", upload.display());

    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out =
            curl(&["--cacert", ca, flag, "-i", "-w", "\n%{http_version}", &format!("{base}/hello?x=1")]);
        let answer = text(&out);
        assert!(out.status.success(), "{answer}");
        assert!(answer.ends_with(&format!("\n{version}")), "not HTTP/{version}: {answer}");
        assert!(answer.contains("strict-transport-security: max-age=600"), "{answer}");
        assert!(answer.contains(r#""x-forwarded-proto":"https""#), "{answer}");

        let out = curl(&[
            "--cacert",
            ca,
            flag,
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            &format!("{base}/x?bytes=3000000"),
        ]);
        assert_eq!(text(&out), "3000000", "download over HTTP/{version}");

        let out = curl(&["--cacert", ca, flag, "--data-binary", &upload, &format!("{base}/echo")]);
        let echo: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out)));
        assert_eq!(echo["body_bytes"], 5_000_000, "upload over HTTP/{version}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_over_tls_gets_every_answer() {
    let pem = Pem::for_names(&["localhost"]);
    let surge = Surge::start_with(&tls_keys(&["web"]), WEB, |dir| pem.write(dir, "web")).await;
    let url = format!("https://localhost:{}/x", https(&surge).port());
    let out = Command::new("h2load")
        .args(["-n", "2000", "-c", "8", "-m", "10", &url])
        .output()
        .expect("run h2load (apt-get install nghttp2-client)");
    let report = text(&out);
    assert!(report.contains("Application protocol: h2"), "{report}");
    assert!(report.contains("2000 succeeded, 0 failed, 0 errored, 0 timeout"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_chooses_the_certificate() {
    let (a, b) = (Pem::for_names(&["a.test"]), Pem::for_names(&["*.b.test"]));
    let surge = Surge::start_with(&tls_keys(&["a", "b"]), WEB, |dir| {
        a.write(dir, "a");
        b.write(dir, "b");
    })
    .await;
    let port = https(&surge).port();
    let get = |host: &str, ca: &str| {
        let ca = surge.dir.join(format!("{ca}.pem"));
        curl(&[
            "--resolve",
            &format!("{host}:{port}:127.0.0.1"),
            "--cacert",
            ca.to_str().expect("path"),
            &format!("https://{host}:{port}/"),
        ])
    };
    assert!(get("a.test", "a").status.success(), "{}", text(&get("a.test", "a")));
    assert!(get("www.b.test", "b").status.success(), "{}", text(&get("www.b.test", "b")));
    // Served b's certificate, which a's CA file does not vouch for.
    assert!(!get("www.b.test", "a").status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_resumes_sessions_on_tls13_and_tls12() {
    let pem = Pem::for_names(&["localhost"]);
    let surge = Surge::start_with(&tls_keys(&["web"]), WEB, |dir| pem.write(dir, "web")).await;
    let addr = https(&surge).to_string();
    for version in ["-tls1_3", "-tls1_2"] {
        let session = surge.dir.join(format!("session{version}"));
        let session = session.to_str().expect("path");
        let first = s_client(&addr, &[version, "-sess_out", session]);
        assert!(first.contains("New, TLSv1."), "{first}");
        assert!(first.contains("HTTP/1.1 200 OK"), "{first}");
        let second = s_client(&addr, &[version, "-sess_in", session]);
        assert!(second.contains("Reused, TLSv1."), "not resumed with {version}:\n{second}");
    }
}

/// One request through `openssl s_client`, with its report.
fn s_client(addr: &str, args: &[&str]) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", addr, "-servername", "localhost", "-alpn", "http/1.1", "-ign_eof"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run openssl");
    let mut stdin = child.stdin.take().expect("stdin");
    let _ = stdin.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    drop(stdin);
    text(&child.wait_with_output().expect("openssl output"))
}

/// A TLS connection to `addr` that trusts `roots`.
async fn tls_stream(
    addr: SocketAddr,
    roots: &[&Pem],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut store = rustls::RootCertStore::empty();
    for pem in roots {
        store.add(CertificateDer::from_pem_slice(pem.cert.as_bytes()).expect("PEM")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("handshake")
}

/// An HTTP/1.1 connection over TLS that trusts `roots`, and the leaf certificate it was shown.
async fn connect(addr: SocketAddr, roots: &[&Pem]) -> (SendRequest<Empty<Bytes>>, Vec<u8>) {
    let tls = tls_stream(addr, roots).await;
    let leaf = tls.get_ref().1.peer_certificates().expect("certificates")[0].as_ref().to_vec();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("HTTP/1.1");
    tokio::spawn(connection);
    (sender, leaf)
}

async fn get(sender: &mut SendRequest<Empty<Bytes>>) -> StatusCode {
    let request = Request::get("/").header("host", "localhost").body(Empty::new()).expect("request");
    let response = sender.send_request(request).await.expect("an answer");
    let status = response.status();
    response.into_body().collect().await.expect("body");
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_certificates_are_served_without_dropping_open_connections() {
    let (old, new) = (Pem::for_names(&["localhost"]), Pem::for_names(&["localhost"]));
    let surge = Surge::start_with(&tls_keys(&["web"]), WEB, |dir| old.write(dir, "web")).await;
    let addr = https(&surge);
    let (mut open, leaf) = connect(addr, &[&old, &new]).await;
    assert_eq!(leaf, old.leaf());
    assert_eq!(get(&mut open).await, StatusCode::OK);

    new.write(&surge.dir, "web");
    let mut served_new = false;
    for _ in 0..200 {
        let (mut fresh, leaf) = connect(addr, &[&old, &new]).await;
        assert_eq!(get(&mut fresh).await, StatusCode::OK);
        if leaf == new.leaf() {
            served_new = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served_new, "the new certificate was never served:\n{}", surge.log());
    assert!(surge.log().contains("TLS certificates reloaded"), "{}", surge.log());
    // The connection opened before the reload still works.
    assert_eq!(get(&mut open).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_gateway_closes_ends_with_close_notify() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pem = Pem::for_names(&["localhost"]);
    let surge = Surge::start_with(&tls_keys(&["web"]), WEB, |dir| pem.write(dir, "web")).await;
    let mut tls = tls_stream(https(&surge), &[&pem]).await;
    tls.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut answer = Vec::new();
    // Without close_notify, rustls reports the end of the connection as an unexpected EOF.
    tls.read_to_end(&mut answer).await.expect("a clean end, with close_notify");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plain_listener_can_redirect_to_https() {
    let pem = Pem::for_names(&["localhost"]);
    let gateway = format!("{}redirect_to_https = true\n", tls_keys(&["web"]));
    let surge = Surge::start_with(&gateway, WEB, |dir| pem.write(dir, "web")).await;
    let plain = format!("http://localhost:{}/a/b?c=1", surge.gateway.port());
    let out = curl(&["-i", "-X", "POST", &plain]);
    let answer = text(&out);
    assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
    let location = format!("location: https://localhost:{}/a/b?c=1", https(&surge).port());
    assert!(answer.to_ascii_lowercase().contains(&location), "{answer}");
}

/// testssl.sh (Debian's `testssl.sh`) finds no weak protocol, cipher or known vulnerability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_finds_nothing_weak() {
    let pem = Pem::for_names(&["localhost"]);
    let surge = Surge::start_with(&tls_keys(&["web"]), WEB, |dir| pem.write(dir, "web")).await;
    let report = surge.dir.join("testssl.json");
    let scan = Command::new("testssl")
        .args(["--quiet", "--color", "0", "--warnings", "batch", "--jsonfile"])
        .arg(&report)
        .args(["--protocols", "--std", "--fs", "--vulnerable"])
        .arg(https(&surge).to_string())
        .output()
        .expect("run testssl (apt-get install testssl.sh)");
    let findings: Vec<serde_json::Value> = std::fs::read(&report)
        .ok()
        .and_then(|json| serde_json::from_slice(&json).ok())
        .unwrap_or_else(|| panic!("no testssl report:\n{}", text(&scan)));
    let finding = |id: &str| {
        let found = findings.iter().find(|f| f["id"] == id);
        found.and_then(|f| f["finding"].as_str()).unwrap_or_default().to_owned()
    };
    for old in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert_eq!(finding(old), "not offered", "{old}");
    }
    assert!(finding("TLS1_3").starts_with("offered"), "TLS 1.3: {}", finding("TLS1_3"));
    let weak: Vec<String> = findings
        .iter()
        .filter(|f| !matches!(f["severity"].as_str(), Some("OK" | "INFO" | "LOW")))
        .map(|f| format!("{} {}: {}", f["id"], f["severity"], f["finding"]))
        .collect();
    assert!(findings.len() > 20, "too few findings to be a scan: {findings:?}");
    assert!(weak.is_empty(), "testssl found:\n{}", weak.join("\n"));
}
