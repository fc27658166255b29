//! A small client for the admin API, used by `surge status` and `surge scale`.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;

const DEFAULT_ADMIN: &str = "127.0.0.1:9900";

pub struct AdminClient {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// The address from `--admin` or SURGE_ADMIN, else from the configuration file, else the default.
    pub fn new(admin: Option<&str>, config: &Path) -> Self {
        let address = match admin {
            Some(address) => address.trim_end_matches('/').to_owned(),
            None => surge_config::load(config)
                .map(|config| config.admin.listen.to_string())
                .unwrap_or_else(|_| DEFAULT_ADMIN.to_owned()),
        };
        let base = if address.contains("://") { address } else { format!("http://{address}") };
        AdminClient { base, client: Client::builder(TokioExecutor::new()).build_http() }
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
        let request = Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|err| format!("bad admin address {}: {err}", self.base))?;
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
        if status != StatusCode::OK {
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
