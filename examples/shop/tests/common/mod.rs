//! Runs the shop as its users do: `shop setup`, then the real `surge up` on the shipped
//! examples/shop/surge.toml (its ports, paths and database names changed to the test's own),
//! against the PostgreSQL and Redis on this machine. Each test's databases are its own
//! (`shoptest_PID_N_users`, ...) and are dropped when it ends.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod chaos;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use sqlx::Connection;

pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// A binary built beside this test's (cargo builds every binary of the workspace for
/// `cargo test --workspace`; for one package alone, `cargo build -p surge` first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe.parent().and_then(Path::parent).expect("target/debug");
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built: run `cargo build -p surge -p surge-shop` first", path.display());
    path
}

/// This test's databases: a prefix of its own.
pub struct Databases {
    pub prefix: String,
}

impl Databases {
    pub fn new() -> Databases {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Databases { prefix: format!("shoptest_{}_{n}_", std::process::id()) }
    }

    pub fn url(&self, service: &str) -> String {
        format!("{SERVER}/{}{service}", self.prefix)
    }

    /// `shop COMMAND ARGS` with this test's databases; fails the test if it fails.
    pub fn shop(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let output = Command::new(binary("shop"))
            .args(args)
            .env("SHOP_DATABASE_PREFIX", &self.prefix)
            .envs(env.iter().copied())
            .output()
            .expect("run shop");
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "shop {args:?} failed:\n{text}");
        text
    }

    pub async fn connect(&self, service: &str) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.url(service)).await.expect("connect to the test's database")
    }

    /// One number from a query on a service's database.
    pub async fn number(&self, service: &str, sql: &str) -> i64 {
        let mut connection = self.connect(service).await;
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_one(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for Databases {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        // On a thread of its own: the test's runtime may be the one panicking.
        let dropping = std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let Ok(mut admin) = sqlx::PgConnection::connect(&format!("{SERVER}/postgres")).await else {
                    return;
                };
                for service in ["users", "catalog", "orders", "payments", "provider", "notifications"] {
                    let drop = format!("DROP DATABASE IF EXISTS \"{prefix}{service}\" WITH (FORCE)");
                    let _ = sqlx::query(&drop).execute(&mut admin).await;
                }
            });
        });
        let _ = dropping.join();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// The shop running under surge.
pub struct Shop {
    surge: Child,
    pub gateway: String,
    pub admin: String,
    pub dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    client: Client<HttpConnector, Full<Bytes>>,
    pub databases: Databases,
}

/// One answer, body read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {} {}", self.status, String::from_utf8_lossy(&self.body))
        })
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }
}

impl Shop {
    /// Sets the databases up and starts surge on the shipped configuration, after `tweak` has
    /// changed its text; returns once every pool has its instances ready.
    pub async fn start(tweak: impl FnOnce(String) -> String) -> Shop {
        let databases = Databases::new();
        let dir = tempfile::tempdir().expect("a folder");
        let token = dir.path().join(".surge").join("admin.token");
        databases.shop(&["setup"], &[("SHOP_ADMIN_TOKEN_FILE", &token.display().to_string())]);
        let (gateway, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("surge.toml");
        let config = std::fs::read_to_string(shipped).expect("examples/shop/surge.toml");
        // The gateway's shared cache tier is keyed by host and port: tests one after another on
        // the same port would see each other's pages. Each test's gateway keeps its own.
        let config = tweak(
            config
                .replace("[store]\nredis = \"redis://127.0.0.1:6379\"\n", "")
                .replace("127.0.0.1:8088", &gateway)
                .replace("127.0.0.1:9988", &admin)
                .replace("examples/shop/.surge/admin.token", &token.display().to_string()),
        );
        let path = dir.path().join("surge.toml");
        std::fs::write(&path, config).expect("write the configuration");
        let log = Arc::new(Mutex::new(Vec::new()));
        let surge = spawn_surge(&path, &databases.prefix, &log);
        let shop = Shop {
            surge,
            gateway: format!("http://{gateway}"),
            admin: format!("http://{admin}"),
            dir,
            log,
            client: Client::builder(TokioExecutor::new()).build_http(),
            databases,
        };
        shop.wait_ready().await;
        shop
    }

    /// Kills surge with SIGKILL (its instances die with it) and starts it again on the same
    /// configuration; returns once every pool is ready.
    pub async fn kill_and_restart(&mut self) {
        let _ = self.surge.kill();
        let _ = self.surge.wait();
        self.surge = spawn_surge(&self.dir.path().join("surge.toml"), &self.databases.prefix, &self.log);
        self.wait_ready().await;
    }

    /// The pids of a pool's running instances.
    pub async fn pids(&self, pool: &str) -> Vec<u32> {
        let status = self.status().await;
        let pools = status["services"].as_array().cloned().unwrap_or_default();
        let found = pools.iter().find(|p| p["service"] == pool).cloned().unwrap_or_default();
        let instances = found["instances"].as_array().cloned().unwrap_or_default();
        instances
            .iter()
            .filter(|i| i["state"] == "ready")
            .filter_map(|i| i["pid"].as_u64().and_then(|pid| u32::try_from(pid).ok()))
            .collect()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Answer {
        self.exchange(method, &format!("{}{path}", self.gateway), headers, body).await
    }

    async fn exchange(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                Bytes::from(json.to_string())
            }
            None => Bytes::new(),
        };
        let response = self.client.request(request.body(Full::new(body)).expect("request")).await;
        let response = response.unwrap_or_else(|e| panic!("{url}: {e:?}"));
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        Answer { status: parts.status, headers: parts.headers, body }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, &[], None).await
    }

    /// A product in the category "tea", made through the public API; its id.
    pub async fn product(&self, name: &str, price_cents: i64, stock: i32) -> i64 {
        let made = self
            .post(
                "/products",
                serde_json::json!({ "name": name, "category": "tea", "price_cents": price_cents, "stock": stock }),
            )
            .await;
        assert_eq!(made.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&made.body));
        made.json()["id"].as_i64().expect("an id")
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> Answer {
        self.request(Method::POST, path, &[], Some(body)).await
    }

    /// A request to the shop's internal routes, as its services make them.
    pub async fn internal(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Answer {
        let mut headers = headers.to_vec();
        headers.push(("host", "shop.internal"));
        self.request(method, path, &headers, body).await
    }

    /// `/status` of the admin API.
    pub async fn status(&self) -> serde_json::Value {
        self.exchange(Method::GET, &format!("{}/status", self.admin), &[], None).await.json()
    }

    /// Waits until every pool has as many ready instances as it wants.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.status().await;
            let pools = status["services"].as_array().cloned().unwrap_or_default();
            let ready = |pool: &serde_json::Value| {
                let instances = pool["instances"].as_array().cloned().unwrap_or_default();
                instances.iter().filter(|i| i["state"] == "ready").count() as u64
            };
            if !pools.is_empty()
                && pools.iter().all(|pool| ready(pool) >= pool["desired"].as_u64().unwrap_or(0))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the shop's pools did not become ready:\n{status:#}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        let _ = self.surge.kill();
        let _ = self.surge.wait();
    }
}

fn spawn_surge(config: &Path, prefix: &str, log: &Arc<Mutex<Vec<String>>>) -> Child {
    let mut child = Command::new(binary("surge"))
        .args(["up", "-c"])
        .arg(config)
        .env("SHOP_DATABASE_PREFIX", prefix)
        .env("SURGE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start surge");
    let (ready_tx, ready_rx) = mpsc::channel();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as _),
    ]
    .into_iter()
    .flatten()
    {
        let (lines, ready) = (Arc::clone(log), ready_tx.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if line.contains("surge is up") {
                    let _ = ready.send(());
                }
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
    }
    if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        let _ = child.kill();
        panic!("surge did not come up:\n{}", log.lock().unwrap_or_else(|p| p.into_inner()).join("\n"));
    }
    child
}
