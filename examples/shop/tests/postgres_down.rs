//! PostgreSQL stops for a few seconds under load: the shop answers 503 meanwhile (its health
//! checks fail, so Surge stops sending traffic and answers for it), and recovers on its own
//! when PostgreSQL is back, with no instance crashed or replaced.
//!
//! This stops the machine's PostgreSQL, so it is the only test in its file: cargo runs test
//! files one after another, and nothing else runs while it is down.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Shop;
use hyper::StatusCode;
use serde_json::json;

/// The machine's cluster, started again however the test ends.
struct Cluster {
    version: String,
}

impl Cluster {
    fn find() -> Cluster {
        let versions = std::fs::read_dir("/etc/postgresql").expect("a PostgreSQL cluster in /etc/postgresql");
        let version =
            versions.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).max();
        Cluster { version: version.expect("a cluster version") }
    }

    fn ctl(&self, action: &str) {
        let mut command = Command::new("pg_ctlcluster");
        command.args(["--skip-systemctl-redirect", &self.version, "main", action]);
        if action == "stop" {
            command.args(["-m", "fast"]);
        }
        let status = command.status().expect("pg_ctlcluster");
        assert!(status.success(), "pg_ctlcluster {action} failed");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("pg_ctlcluster")
            .args(["--skip-systemctl-redirect", &self.version, "main", "start"])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_for_seconds_gives_503s_then_the_shop_recovers() {
    let shop = Arc::new(Shop::start(|config| config).await);
    let user = shop.post("/users", json!({ "email": "grace@example.com", "name": "Grace" })).await;
    let user = user.json()["id"].as_i64().expect("a user");

    // Readers of profiles (cached, then not: each asks for another user too) and sign-ups.
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Arc<Mutex<BTreeMap<u16, u64>>> = Arc::default();
    let mut load = Vec::new();
    for worker in 0..4u64 {
        let (shop, stop, counts) = (Arc::clone(&shop), Arc::clone(&stop), Arc::clone(&counts));
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let answer = if n.is_multiple_of(2) {
                    shop.get(&format!("/users/{user}")).await
                } else {
                    let email = format!("load-{worker}-{n}@example.com");
                    shop.post("/users", json!({ "email": email, "name": "Load" })).await
                };
                *counts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(answer.status.as_u16())
                    .or_default() += 1;
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let tally =
        |counts: &Arc<Mutex<BTreeMap<u16, u64>>>| counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = tally(&counts);
    assert!(before.keys().all(|status| *status < 500), "errors before anything happened: {before:?}");

    let cluster = Cluster::find();
    cluster.ctl("stop");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally(&counts).get(&503).copied().unwrap_or(0) < 20 {
        assert!(
            Instant::now() < deadline,
            "no 503s while PostgreSQL is down: {:?}\n{}",
            tally(&counts),
            shop.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = tally(&counts);
    cluster.ctl("start");

    // Recovered: every pool ready again, and requests answered as before.
    shop.wait_ready().await;
    let recovered_at = tally(&counts);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = tally(&counts);
        let good = |counts: &BTreeMap<u16, u64>| {
            counts.get(&200).copied().unwrap_or(0) + counts.get(&201).copied().unwrap_or(0)
        };
        let errors = |counts: &BTreeMap<u16, u64>| {
            counts.iter().filter(|(s, _)| **s >= 500).map(|(_, n)| n).sum::<u64>()
        };
        if good(&now) >= good(&recovered_at) + 50 && errors(&now) == errors(&recovered_at) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not recovered: {now:?} (at recovery {recovered_at:?})\n{}",
            shop.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for task in load {
        let _ = task.await;
    }
    let errors: Vec<u16> = during.keys().copied().filter(|status| *status >= 500).collect();
    assert_eq!(errors, [503], "while PostgreSQL was down, only 503s: {during:?}");
    let status = shop.status().await;
    for pool in status["services"].as_array().cloned().unwrap_or_default() {
        assert_eq!(pool["restarts"], 0, "{} replaced an instance:\n{pool:#}", pool["service"]);
        assert_eq!(pool["crash_looping"], false);
    }
    assert_eq!(shop.get(&format!("/users/{user}")).await.status, StatusCode::OK);
}
