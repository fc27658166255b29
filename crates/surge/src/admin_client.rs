//! A small client for the admin API, used by `surge status` and `surge scale`.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use surge_config::{AdminConfig, ConfigErrors};

const DEFAULT_ADMIN: &str = "127.0.0.1:9900";
/// Overrides `admin.token_file`, for the server and the command line alike.
const TOKEN_VARIABLE: &str = "SURGE_ADMIN_TOKEN";

/// The admin API's bearer token: `SURGE_ADMIN_TOKEN`, else the contents of `admin.token_file`.
pub fn admin_token(admin: &AdminConfig) -> Result<Option<String>, ConfigErrors> {
    if let Some(token) = std::env::var(TOKEN_VARIABLE).ok().filter(|t| !t.trim().is_empty()) {
        return Ok(Some(token.trim().to_owned()));
    }
    let Some((file, site)) = &admin.token_file else { return Ok(None) };
    let refuse = |message: String| ConfigErrors::single(site.error(format!("{}: {message}", file.display())));
    let token =
        std::fs::read_to_string(file).map_err(|err| refuse(format!("cannot read the token: {err}")))?;
    match token.trim() {
        "" => Err(refuse("the token file is empty".into())),
        token => Ok(Some(token.to_owned())),
    }
}

/// Where `surge up` leaves the token it made for a run without one configured: beside the
/// configuration file, readable by its owner only, for `surge scale` and `surge reload`.
pub fn run_token_path(config_file: &Path) -> std::path::PathBuf {
    config_file.parent().unwrap_or(Path::new(".")).join(".surge").join("admin.token")
}

/// Makes a token for this run and writes it to [`run_token_path`]. The token is made even
/// when it cannot be written (the second part says why): changes then still need it.
pub fn make_run_token(config_file: &Path) -> Result<(String, Result<(), String>), String> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut random = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut random))
        .map_err(|err| format!("cannot read /dev/urandom: {err}"))?;
    let token: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    let path = run_token_path(config_file);
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
        file.write_all(token.as_bytes())
    };
    let saved = write().map_err(|err| format!("cannot write {}: {err}", path.display()));
    Ok((token, saved))
}

pub struct AdminClient {
    base: String,
    token: Option<String>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// The address from `--admin` or SURGE_ADMIN, else from the configuration file, else the default.
    /// The token likewise: SURGE_ADMIN_TOKEN, else the configuration's `admin.token_file`.
    pub fn new(admin: Option<&str>, config_path: &Path) -> Result<Self, ConfigErrors> {
        let config = surge_config::load(config_path).ok();
        let address = match (admin, &config) {
            (Some(address), _) => address.trim_end_matches('/').to_owned(),
            (None, Some(config)) => config.admin.listen.to_string(),
            (None, None) => DEFAULT_ADMIN.to_owned(),
        };
        let token = match &config {
            Some(loaded) => admin_token(&loaded.admin)?,
            None => std::env::var(TOKEN_VARIABLE).ok().filter(|t| !t.trim().is_empty()),
        };
        // Else the token the running surge made for itself, if it could.
        let token = token.or_else(|| {
            let made = std::fs::read_to_string(run_token_path(config_path)).ok()?;
            Some(made.trim().to_owned()).filter(|t| !t.is_empty())
        });
        let base = if address.contains("://") { address } else { format!("http://{address}") };
        Ok(AdminClient { base, token, client: Client::builder(TokioExecutor::new()).build_http() })
    }

    /// The dashboard's address, with the token in its fragment (which a browser never sends
    /// anywhere: the page moves it into its session storage).
    pub fn dashboard_url(&self) -> String {
        match &self.token {
            Some(token) => format!("{}/#token={token}", self.base),
            None => format!("{}/", self.base),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        self.send(Method::GET, path, Bytes::new()).await
    }

    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T, String> {
        let body = serde_json::to_vec(body).map_err(|err| err.to_string())?;
        self.send(Method::POST, path, Bytes::from(body)).await
    }

    async fn send<T: DeserializeOwned>(&self, method: Method, path: &str, body: Bytes) -> Result<T, String> {
        let url = format!("{}{path}", self.base);
        let mut request =
            Request::builder().method(method).uri(&url).header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request =
            request.body(Full::new(body)).map_err(|err| format!("bad admin address {}: {err}", self.base))?;
        let response = self.client.request(request).await.map_err(|err| {
            format!(
                "cannot reach the admin API at {}: {}. Is `surge up` running? Point --admin (or SURGE_ADMIN) \
                 at its [admin] listen address.",
                self.base,
                deepest_cause(&err)
            )
        })?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|err| err.to_string())?.to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<surge_admin::api::ErrorResponse>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(message);
        }
        serde_json::from_slice(&body).map_err(|err| format!("unexpected answer from {url}: {err}"))
    }
}

fn deepest_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
