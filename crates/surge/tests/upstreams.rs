//! Static upstreams end to end: instances surge does not run, listed by address with weights,
//! balanced and health-checked like launched ones.

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;

use common::{ready_count, Echo, Surge};
use hyper::StatusCode;
use surge_admin::api::InstanceState;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Sends `count` GETs one after another; returns how many each instance answered.
async fn spread(surge: &Surge, count: usize) -> BTreeMap<String, usize> {
    let mut by_instance = BTreeMap::new();
    for _ in 0..count {
        let answer = surge.get("/").await;
        assert_eq!(answer.status, StatusCode::OK, "{}", String::from_utf8_lossy(&answer.body));
        *by_instance.entry(answer.instance()).or_default() += 1;
    }
    by_instance
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_upstreams_are_weighted_and_health_checked() {
    let (light_port, heavy_port) = (free_port(), free_port());
    let _light = Echo::start_on(light_port, "light");
    let heavy = Echo::start_on(heavy_port, "heavy");
    let surge = Surge::start(&format!(
        r#"
[services.web]
upstreams = ["127.0.0.1:{light_port}", {{ address = "127.0.0.1:{heavy_port}", weight = 3 }}]
routes = ["/"]
balance = "round_robin"
health = {{ interval = "100ms", unhealthy_threshold = 2, healthy_threshold = 1 }}
"#
    ))
    .await;

    let status = surge.service("web").await;
    assert_eq!(status.instances.len(), 2);
    assert!(status.instances.iter().all(|i| i.pid.is_none()), "surge runs none of them");
    let weights: Vec<u32> = status.instances.iter().map(|i| i.weight).collect();
    assert_eq!(weights, [1, 3]);

    let shares = spread(&surge, 400).await;
    assert_eq!(shares.get("light"), Some(&100), "{shares:?}");
    assert_eq!(shares.get("heavy"), Some(&300), "{shares:?}");

    // The heavy upstream dies: its health checks take it out, and the light one takes it all.
    drop(heavy);
    surge
        .wait_for("the dead upstream out of rotation", |services| {
            services[0].instances.iter().any(|i| i.port == heavy_port && i.state == InstanceState::Unhealthy)
        })
        .await;
    let shares = spread(&surge, 100).await;
    assert_eq!(shares.get("light"), Some(&100), "{shares:?}");

    // Back on the same address, it passes a check and takes its share again.
    let _heavy = Echo::start_on(heavy_port, "heavy");
    surge.wait_for("the upstream back", |services| ready_count(&services[0]) == 2).await;
    let shares = spread(&surge, 40).await;
    assert_eq!(shares.get("heavy"), Some(&30), "{shares:?}");

    let scaled = surge.cli(&["scale", "web", "5"]);
    assert!(!scaled.status.success());
    let message = String::from_utf8_lossy(&scaled.stderr);
    assert!(message.contains("services.web.upstreams"), "{message}");
    assert!(surge.log().contains("web@127.0.0.1"), "instances are named by address:\n{}", surge.log());
}

/// An upstream that answers each connection's first request as keep-alive, then closes the
/// connection 20 ms later, as servers with a short idle timeout do.
async fn closing_upstream() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Instance: closing\r\n\r\nok";
                let _ = socket.write_all(answer.as_bytes()).await;
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_an_upstream_closed_while_idle_are_not_reused() {
    let port = closing_upstream().await;
    let surge = Surge::start(&format!(
        "[services.web]\nupstreams = [\"127.0.0.1:{port}\"]\nroutes = [\"/\"]\nhealth = {{ interval = \"1s\" }}\n"
    ))
    .await;
    for method in [hyper::Method::GET, hyper::Method::POST].into_iter().cycle().take(20) {
        let answer = surge.request(method.clone(), "/", &[], bytes::Bytes::from_static(b"body")).await;
        assert_eq!(answer.status, StatusCode::OK, "{method}: {}", String::from_utf8_lossy(&answer.body));
        assert_eq!(&answer.body[..], b"ok");
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    }
}
