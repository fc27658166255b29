//! A real browser for tests of pages: Debian's headless Chromium, driven through chromedriver's
//! W3C WebDriver API (JSON over HTTP), so a test can open a page, read what it shows, type,
//! click and take a screenshot.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use super::{http_client, send, HttpClient};

/// The key W3C WebDriver names an element by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    client: HttpClient,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session; fails the test, saying what to
    /// install, when either is missing.
    pub async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver runs (Debian's chromium-driver package; .ci/run installs it)");
        let profile = tempfile::tempdir().expect("a profile folder");
        let mut browser =
            Browser { driver, base: format!("http://127.0.0.1:{port}"), client: http_client(), profile };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !browser.call(Method::GET, "/status", None).await.is_ok_and(|status| status["ready"] == true) {
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = browser.profile.path().display().to_string();
        // As root in a sandbox, and on a machine whose network is closed: no background calls.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            &format!("--user-data-dir={profile}"),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let session =
            browser.call(Method::POST, "/session", Some(capabilities)).await.expect("a browser session");
        let id = session["sessionId"].as_str().expect("a session id").to_owned();
        browser.base = format!("{}/session/{id}", browser.base);
        browser
    }

    /// One WebDriver call; its `value`, or the driver's error.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let body = Bytes::from(body.map_or_else(String::new, |body| body.to_string()));
        let headers = [("content-type", "application/json")];
        let answer = send(&self.client, method, &url, &headers, body).await?;
        let json: Value = serde_json::from_slice(&answer.body).map_err(|err| err.to_string())?;
        if answer.status != StatusCode::OK {
            return Err(format!("{}: {}", json["value"]["error"], json["value"]["message"]));
        }
        Ok(json["value"].clone())
    }

    pub async fn goto(&self, url: &str) {
        self.call(Method::POST, "/url", Some(json!({ "url": url }))).await.expect("navigate");
    }

    async fn element(&self, css: &str) -> Option<String> {
        let found =
            self.call(Method::POST, "/element", Some(json!({ "using": "css selector", "value": css })));
        found.await.ok().and_then(|element| element[ELEMENT].as_str().map(str::to_owned))
    }

    /// The text of the first element `css` matches, if there is one.
    pub async fn text(&self, css: &str) -> Option<String> {
        let element = self.element(css).await?;
        let text = self.call(Method::GET, &format!("/element/{element}/text"), None).await.ok()?;
        text.as_str().map(str::to_owned)
    }

    /// Waits (up to 20 s) until the element `css` matches shows text that `done` accepts.
    pub async fn wait_text(&self, css: &str, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.text(css).await;
            if let Some(text) = text.as_deref().filter(|text| done(text)) {
                return text.to_owned();
            }
            assert!(Instant::now() < deadline, "the page never showed {what} in {css}: it shows {text:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, css: &str) {
        let element = self.element(css).await.unwrap_or_else(|| panic!("nothing on the page matches {css}"));
        self.call(Method::POST, &format!("/element/{element}/click"), Some(json!({}))).await.expect("click");
    }

    /// Types `text` into the field `css` matches, after clearing it.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.element(css).await.unwrap_or_else(|| panic!("nothing on the page matches {css}"));
        self.call(Method::POST, &format!("/element/{element}/clear"), Some(json!({}))).await.expect("clear");
        let keys = json!({ "text": text });
        self.call(Method::POST, &format!("/element/{element}/value"), Some(keys)).await.expect("type");
    }

    /// Errors the page's scripts reported to the console.
    pub async fn console_errors(&self) -> Vec<String> {
        let script = json!({ "script": "return window.__surgeErrors || [];", "args": [] });
        let errors = self.call(Method::POST, "/execute/sync", Some(script)).await.unwrap_or(Value::Null);
        errors.as_array().map(|errors| errors.iter().map(|e| e.to_string()).collect()).unwrap_or_default()
    }

    /// Ends the session: chromedriver closes the browser.
    pub async fn quit(self) {
        let _ = self.call(Method::DELETE, "", None).await;
    }

    /// The page as a PNG.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let shot = self.call(Method::GET, "/screenshot", None).await.expect("screenshot");
        base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().unwrap_or_default())
            .expect("base64 PNG")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Killed, chromedriver leaves its browser behind: end what runs on this profile too.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let profile = self.profile.path().display().to_string();
        let _ = Command::new("pkill").args(["-KILL", "-f", &profile]).status();
    }
}
