//! The admin API can scale services, so it guards itself: a token for every change (one made
//! for the run when none is configured), Host names loopback, changes only as JSON; off
//! loopback surge refuses to run without a configured token.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::{http_client, send, write_config, Surge, SURGE};
use hyper::{Method, StatusCode};

const WEB: &str =
    "[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\ninstances = { min = 1, max = 3 }\n";

async fn admin(
    surge: &Surge,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> StatusCode {
    let url = format!("http://{}{path}", surge.admin);
    let answer =
        send(&http_client(), method, &url, headers, Bytes::from(body.to_owned())).await.expect("answer");
    answer.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_token_the_run_makes_one_and_browsers_get_nothing() {
    let surge = Surge::start(WEB).await;
    let scale = "/services/web/scale";
    let body = r#"{"instances": 3}"#;
    // What a cross-site form or fetch can send, and a JSON POST from any local process: none
    // has the run's token.
    let form = [("content-type", "text/plain")];
    assert_eq!(admin(&surge, Method::POST, scale, &form, body).await, StatusCode::UNAUTHORIZED);
    let json = [("content-type", "application/json")];
    assert_eq!(admin(&surge, Method::POST, scale, &json, body).await, StatusCode::UNAUTHORIZED);
    // A page whose name was rebound to 127.0.0.1 cannot even read.
    let rebound = [("host", "evil.example:9900")];
    assert_eq!(admin(&surge, Method::GET, "/status", &rebound, "").await, StatusCode::FORBIDDEN);
    assert_eq!(surge.service("web").await.desired, 1, "nothing was scaled");

    // The token sits beside surge.toml, for its owner only; the command line uses it.
    let token = surge.dir.join(".surge").join("admin.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token).expect("token file").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let output = surge.cli(&["scale", "web", "2"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(surge.service("web").await.desired, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_changes_need_it_and_the_cli_sends_it() {
    // Keys before the first table of the services text land in [admin].
    let services = format!("token_file = \"admin.token\"\n{WEB}");
    let surge = Surge::start_with("", &services, |dir| {
        std::fs::write(dir.join("admin.token"), "s3cret-token\n").expect("write token");
    })
    .await;
    let scale = "/services/web/scale";
    let body = r#"{"instances": 3}"#;
    let json = ("content-type", "application/json");
    assert_eq!(admin(&surge, Method::POST, scale, &[json], body).await, StatusCode::UNAUTHORIZED);
    let wrong = ("authorization", "Bearer s3cret-tokem");
    assert_eq!(admin(&surge, Method::POST, scale, &[json, wrong], body).await, StatusCode::UNAUTHORIZED);
    assert_eq!(surge.service("web").await.desired, 1, "nothing was scaled");
    // Reads stay open on loopback.
    assert_eq!(admin(&surge, Method::GET, "/status", &[], "").await, StatusCode::OK);

    let output = surge.cli(&["scale", "web", "3"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(surge.service("web").await.desired, 3);
}

#[test]
fn off_loopback_without_a_token_surge_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), WEB);
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(
        &config,
        text.replacen("[admin]\nlisten = \"127.0.0.1:0\"", "[admin]\nlisten = \"0.0.0.0:0\"", 1),
    )
    .expect("write");
    let mut child = Command::new(SURGE)
        .args(["up", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start surge");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "surge kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("stderr");
    assert!(!status.success());
    assert!(stderr.contains("`admin.listen`") && stderr.contains("off loopback, with no token"), "{stderr}");
}

/// With nowhere to save its token (`.surge` is a file here), a run still requires one for
/// changes: the admin API fails closed, and the log says how to give it a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_cannot_save_its_token_still_requires_one() {
    let surge = Surge::start_with("", "[services.web]\ncommand = \"{echo}\"\nroutes = [\"/\"]\n", |dir| {
        std::fs::write(dir.join(".surge"), "not a folder").expect("write");
    })
    .await;
    assert!(surge.log().contains("could not be saved"), "{}", surge.log());
    let client = http_client();
    let url = format!("http://{}/services/web/scale", surge.admin);
    let headers = [("content-type", "application/json")];
    let refused = send(&client, Method::POST, &url, &headers, Bytes::from(r#"{"instances": 1}"#))
        .await
        .expect("an answer");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", String::from_utf8_lossy(&refused.body));
    // Reads need no token.
    assert_eq!(surge.status().await.len(), 1);
}
