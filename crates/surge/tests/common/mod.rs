//! Launches the real `surge` binary with real `surge-echo` instances on loopback.
#![allow(dead_code)] // each test file uses a different part of the harness

pub mod browser;
pub mod pem;
pub mod queues;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use surge_admin::api::{InstanceState, PoolStatus, StatusResponse};

pub const SURGE: &str = env!("CARGO_BIN_EXE_surge");
pub const ECHO: &str = env!("CARGO_BIN_EXE_surge-echo");

pub struct Surge {
    child: Option<Child>,
    pub gateway: SocketAddr,
    /// The HTTPS listener, when the configuration has one.
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    client: HttpClient,
    _dir: tempfile::TempDir,
}

/// One HTTP answer, body read whole.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn instance(&self) -> String {
        self.headers.get("x-surge-instance").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Writes a configuration whose services are `services` (TOML), with the gateway and the admin
/// API on ports the kernel picks. `{echo}` in `services` stands for the test backend's path.
pub fn write_config(dir: &Path, services: &str) -> PathBuf {
    write_config_with(dir, "", services)
}

/// As [`write_config`], with `gateway` (TOML keys) added to the `[gateway]` table.
pub fn write_config_with(dir: &Path, gateway: &str, services: &str) -> PathBuf {
    let config = format!(
        "[gateway]\nlisten = \"127.0.0.1:0\"\nshutdown_timeout = \"5s\"\n{gateway}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        services.replace("{echo}", ECHO)
    );
    let path = dir.join("surge.toml");
    std::fs::write(&path, config).expect("write the config");
    path
}

impl Surge {
    /// Starts `surge up` and waits until its listeners are bound and every pool has
    /// reached its initial size of ready instances.
    pub async fn start(services: &str) -> Surge {
        Surge::start_with("", services, |_| {}).await
    }

    /// As [`Surge::start`], with `gateway` keys added to `[gateway]`, after `prepare` has
    /// written what they need (certificates, say) into the configuration's directory.
    pub async fn start_with(gateway: &str, services: &str, prepare: impl FnOnce(&Path)) -> Surge {
        let surge = Surge::launch(gateway, services, prepare);
        surge
            .wait_for("every pool at its initial size", |services| {
                services
                    .iter()
                    .all(|s| ready_count(s) == s.desired as usize && s.instances.len() == s.desired as usize)
            })
            .await;
        surge
    }

    /// As [`Surge::start_with`], without waiting for any instance to be ready.
    pub fn launch(gateway: &str, services: &str, prepare: impl FnOnce(&Path)) -> Surge {
        let dir = tempfile::tempdir().expect("temp dir");
        prepare(dir.path());
        let config = write_config_with(dir.path(), gateway, services);
        let log = Arc::new(Mutex::new(Vec::new()));
        let (child, up) = spawn_up(&config, &log, &[]);
        Surge {
            child: Some(child),
            gateway: address_after(&up, "gateway on http://"),
            https: up.contains("HTTPS on https://").then(|| address_after(&up, "HTTPS on https://")),
            admin: address_after(&up, "admin API on http://"),
            config,
            dir: dir.path().to_owned(),
            log,
            client: http_client(),
            _dir: dir,
        }
    }

    /// Kills surge with SIGKILL (its instances die with it) and starts it again on the same
    /// configuration and folder; returns once it is up. `wrap` runs surge under another command
    /// (`prlimit`, say).
    pub fn kill_and_restart(&mut self, wrap: &[&str]) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let (child, up) = spawn_up(&self.config, &self.log, wrap);
        self.child = Some(child);
        self.gateway = address_after(&up, "gateway on http://");
        self.admin = address_after(&up, "admin API on http://");
    }

    /// The token `surge up` made for the admin API.
    pub fn admin_token(&self) -> String {
        let path = self.dir.join(".surge").join("admin.token");
        std::fs::read_to_string(path).expect("the run's admin token").trim().to_owned()
    }

    /// A request to the admin API, with the run's token.
    pub async fn admin(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Answer {
        let bearer = format!("Bearer {}", self.admin_token());
        let mut headers = headers.to_vec();
        headers.push(("authorization", &bearer));
        let url = format!("http://{}{path}", self.admin);
        send(&self.client, method, &url, &headers, body).await.unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Starts `surge up` on `config` and waits for its "surge is up" line; its log goes to `log`.
fn spawn_up(config: &Path, log: &Arc<Mutex<Vec<String>>>, wrap: &[&str]) -> (Child, String) {
    let mut command = match wrap.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(SURGE);
            command
        }
        None => Command::new(SURGE),
    };
    let mut child = command
        .args(["up", "-c"])
        .arg(config)
        .env("SURGE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start surge");
    let stderr = child.stderr.take().expect("stderr");
    let (ready_tx, ready_rx) = mpsc::channel();
    let lines = Arc::clone(log);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("surge is up") {
                let _ = ready_tx.send(line.clone());
            }
            lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
        }
    });
    let up = ready_rx.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
        panic!("surge did not come up:\n{}", log.lock().unwrap_or_else(|p| p.into_inner()).join("\n"))
    });
    (child, up)
}

impl Surge {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway)
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.request(Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn request(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Answer {
        send(&self.client, method, &self.url(path), headers, body).await.unwrap_or_else(|e| panic!("{e}"))
    }

    pub async fn status(&self) -> Vec<PoolStatus> {
        self.sample().await.services.into_iter().map(|service| service.status).collect()
    }

    /// `/status` whole: the pools with their traffic, queues, caches and alerts.
    pub async fn sample(&self) -> StatusResponse {
        let url = format!("http://{}/status", self.admin);
        let answer = send(&self.client, Method::GET, &url, &[], Bytes::new()).await.expect("admin API");
        assert_eq!(answer.status, StatusCode::OK);
        serde_json::from_slice::<StatusResponse>(&answer.body).expect("status JSON")
    }

    pub async fn service(&self, name: &str) -> PoolStatus {
        self.status().await.into_iter().find(|s| s.service == name).expect("service in status")
    }

    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.admin);
        let answer = send(&self.client, Method::GET, &url, &[], Bytes::new()).await.expect("admin API");
        String::from_utf8_lossy(&answer.body).into_owned()
    }

    /// Polls the status until `done` holds; fails the test after 20 s.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[PoolStatus]) -> bool) -> Vec<PoolStatus> {
        until(
            what,
            async || self.status().await,
            |status| done(status),
            |status| format!("{status:#?}\n{}", self.log()),
        )
        .await
    }

    /// Waits until the log says what `done` looks for; the log.
    pub async fn wait_for_log(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        until(what, async || self.log(), |log| done(log), |log| log.clone()).await
    }

    /// Runs the `surge` command line against this instance's admin API.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(SURGE)
            .args(args)
            .arg("--admin")
            .arg(self.admin.to_string())
            .arg("-c")
            .arg(&self.config)
            .output()
            .expect("run the surge command line")
    }

    pub fn signal(&self, signal: i32) {
        kill(self.pid(), signal);
    }

    /// Waits for surge to exit (after a signal) and returns how it ended.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "surge did not exit:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Surge {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Answer, String> {
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| format!("{url}: {e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| format!("{url}: body: {e}"))?.to_bytes();
    Ok(Answer { status: parts.status, headers: parts.headers, body })
}

/// Looks again every 50 ms until `done` holds, for at most 20 s (a guard against hanging, not a
/// bound the test asserts); what was seen last.
async fn until<T>(
    what: &str,
    mut look: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
    show: impl Fn(&T) -> String,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = look().await;
        if done(&seen) {
            return seen;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {}", show(&seen));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn ready_count(service: &PoolStatus) -> usize {
    service.instances.iter().filter(|i| i.state == InstanceState::Ready).count()
}

pub fn pids(services: &[PoolStatus]) -> Vec<u32> {
    services.iter().flat_map(|s| s.instances.iter().filter_map(|i| i.pid)).collect()
}

fn address_after(line: &str, marker: &str) -> SocketAddr {
    let start = line.find(marker).unwrap_or_else(|| panic!("no `{marker}` in {line:?}")) + marker.len();
    let rest = &line[start..];
    let end = rest.find([',', ' ']).unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"))
}

pub fn kill(pid: u32, signal: i32) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().expect("kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Whether a process is still running (a zombie waiting to be reaped counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state follows the parenthesised command name: "123 (surge-echo) S ...".
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
    }
}

/// Waits until none of `pids` runs; returns those still running after `timeout`.
pub fn survivors(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a bounded load saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: usize,
    pub failures: Vec<String>,
    pub by_instance: std::collections::BTreeMap<String, usize>,
}

/// `workers` clients each sending GET `path` back to back, until `stop` is set or
/// `per_worker` requests each have been sent.
pub async fn load(
    surge: &Surge,
    path: &str,
    workers: usize,
    per_worker: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> LoadReport {
    let url = surge.url(path);
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, stop) = (http_client(), url.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            for _ in 0..per_worker {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                match send(&client, Method::GET, &url, &[], Bytes::new()).await {
                    Ok(answer) if answer.status == StatusCode::OK => {
                        report.ok += 1;
                        *report.by_instance.entry(answer.instance()).or_default() += 1;
                    }
                    Ok(answer) => report.failures.push(format!(
                        "{}: {}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    )),
                    Err(err) => report.failures.push(err),
                }
            }
            report
        }));
    }
    let mut total = LoadReport::default();
    for task in tasks {
        let report = task.await.expect("load worker");
        total.ok += report.ok;
        total.failures.extend(report.failures);
        for (instance, count) in report.by_instance {
            *total.by_instance.entry(instance).or_default() += count;
        }
    }
    total
}

/// A `surge-echo` process started by the test (not by surge), stopped when dropped.
pub struct Echo {
    child: Child,
    pub port: u16,
}

impl Echo {
    /// On a free port, named `echo-1`.
    pub fn start() -> Echo {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        Echo::start_on(port, "echo-1")
    }

    /// On `port`, answering with `x-surge-instance: name`; returns once it accepts connections.
    pub fn start_on(port: u16, name: &str) -> Echo {
        let child = Command::new(ECHO)
            .env("PORT", port.to_string())
            .env("SURGE_INSTANCE", name)
            .stderr(Stdio::null())
            .spawn()
            .expect("start surge-echo");
        let echo = Echo { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return echo;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("surge-echo did not start on port {port}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
