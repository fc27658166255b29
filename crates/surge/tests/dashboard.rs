//! The dashboard in a real browser (headless Chromium): against a surge under load, it goes
//! live, its numbers move and agree with `/status`, and its Scale button scales a service.
//! The screenshot it takes is the one in docs/.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::browser::Browser;
use common::{http_client, send, Surge};
use hyper::Method;

const SHOP: &str = r#"
[services.web]
command = "{echo}"
routes = ["/", { prefix = "/cached", cache = { grace = "30s" } }]
instances = { min = 1, max = 4, initial = 2 }

[services.api]
command = "{echo}"
routes = ["/api"]
instances = { min = 1, max = 4, initial = 1 }
autoscale = { metric = "concurrency", target = 4 }

[queues.emails]
publish = "public"
backoff = { base = "1s", cap = "2s" }
max_attempts = 2

[workers.mailer]
command = "{echo}"
queue = "emails"
path = "/job"
instances = { min = 1, max = 2 }

[alerts.web_slow]
when = "p99"
service = "web"
above = "20ms"
window = "10s"
severity = "warning"
"#;

/// A steady mix: pages, API calls, cached pages, a few errors, and mail (one of it poison).
fn load(surge: &Surge, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    let paths = [
        ("/page?delay=5ms", Method::GET, ""),
        ("/api/orders?delay=30ms", Method::GET, ""),
        ("/cached/home?header=cache-control:max-age%3D60", Method::GET, ""),
        ("/page?status=503&delay=50ms", Method::GET, ""),
        ("/queues/emails/messages", Method::POST, "to=ada@example.com"),
        ("/queues/emails/messages", Method::POST, "status=500"),
    ];
    (0..4)
        .map(|worker| {
            let (client, stop) = (http_client(), Arc::clone(&stop));
            let urls: Vec<(String, Method, &'static str)> =
                paths.iter().map(|(path, method, body)| (surge.url(path), method.clone(), *body)).collect();
            tokio::spawn(async move {
                let mut n = worker;
                while !stop.load(Ordering::SeqCst) {
                    // Errors and mail are the rare ones.
                    let pick = match n % 40 {
                        0 => 3,
                        1 if worker == 0 => 4,
                        2 if worker == 0 && n % 400 == 2 => 5,
                        k => [0, 1, 2][k % 3],
                    };
                    let (url, method, body) = &urls[pick];
                    let _ =
                        send(&client, method.clone(), url, &[], Bytes::from_static(body.as_bytes())).await;
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            })
        })
        .collect()
}

fn number(text: &str) -> f64 {
    text.trim().trim_end_matches('%').parse().unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_live_agrees_with_status_and_scales_a_service() {
    let surge = Surge::start(SHOP).await;
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = load(&surge, Arc::clone(&stop));
    let browser = Browser::start().await;
    browser.goto(&format!("http://{}/#token={}", surge.admin, surge.admin_token())).await;
    browser.wait_text("#connection", "the live state", |text| text == "live").await;

    // The numbers move, a sample a second.
    let first: u64 =
        browser.wait_text("#seq", "a sample number", |t| t.parse::<u64>().is_ok()).await.parse().unwrap_or(0);
    browser.wait_text("#seq", "later samples", |t| t.parse::<u64>().is_ok_and(|seq| seq >= first + 3)).await;
    let rps = r#"tr[data-service="web"] [data-field="rps"]"#;
    browser.wait_text(rps, "web's requests/s", |t| t.parse::<f64>().is_ok_and(|rps| rps > 0.0)).await;

    // What the page shows is what /status says for the same sample.
    let mut agreed = false;
    for _ in 0..20 {
        let seq = browser.text("#seq").await.unwrap_or_default();
        let total =
            browser.text(r#"tr[data-service="web"] [data-field="requests_total"]"#).await.unwrap_or_default();
        let ready = browser.text(r#"tr[data-service="web"] [data-field="ready"]"#).await.unwrap_or_default();
        let page_rps = browser.text(rps).await.unwrap_or_default();
        let again = browser.text("#seq").await.unwrap_or_default();
        let status = surge.sample().await;
        if seq != again || status.seq.to_string() != seq {
            continue; // a new sample came in between: look again
        }
        let web = status.services.iter().find(|s| s.status.service == "web").expect("web");
        assert_eq!(number(&total), web.traffic.requests_total as f64, "requests of sample {seq}");
        assert_eq!(number(&page_rps), (web.traffic.rps * 10.0).round() / 10.0, "requests/s of sample {seq}");
        assert_eq!(number(&ready) as usize, common::ready_count(&web.status));
        agreed = true;
        break;
    }
    assert!(agreed, "the page and /status never showed the same sample");

    // Scale web from the page; the pool and the page follow.
    browser.type_into(r#"input[data-scale-input="web"]"#, "3").await;
    browser.click(r#"button[data-action="scale"][data-service="web"]"#).await;
    surge
        .wait_for("web scaled to 3 from the page", |services| {
            services.iter().any(|s| s.service == "web" && s.desired == 3 && common::ready_count(s) == 3)
        })
        .await;
    browser.wait_text(r#"tr[data-service="web"] [data-field="ready"]"#, "3 ready", |t| t == "3").await;
    browser.wait_text(r#"tr[data-service="web"] [data-field="desired"]"#, "3 desired", |t| t == "3").await;

    // Let the charts gather some history under load, then keep a picture of it.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let shot = browser.screenshot().await;
    assert!(shot.starts_with(b"\x89PNG\r\n\x1a\n") && shot.len() > 20_000, "a PNG of the page");
    let saved = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&saved, &shot).expect("save the screenshot");
    assert_eq!(browser.console_errors().await, Vec::<String>::new(), "script errors on the page");
    browser.quit().await;
    stop.store(true, Ordering::SeqCst);
    for task in traffic {
        let _ = task.await;
    }
}
