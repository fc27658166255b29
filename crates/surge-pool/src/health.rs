//! Active health checks: `GET <path>` must answer 2xx within the timeout.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

#[derive(Clone)]
pub(crate) struct Prober {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Prober {
    /// Checks over HTTP/2 (h2c) for instances that speak only that.
    pub fn new(http2: bool) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .http2_only(http2)
            .build(connector);
        Prober { client }
    }

    /// Ok when the instance answered 2xx in time; otherwise why not.
    pub async fn probe(&self, addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
        let uri = format!("http://{addr}{path}");
        let uri: hyper::Uri = uri.parse().map_err(|err| format!("bad health check URI {uri}: {err}"))?;
        match tokio::time::timeout(timeout, self.client.get(uri)).await {
            Err(_) => Err(format!("GET {path} did not answer within {timeout:?}")),
            Ok(Err(err)) => Err(format!("GET {path} failed: {}", error_chain(&err))),
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("GET {path} answered {}", response.status())),
        }
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
