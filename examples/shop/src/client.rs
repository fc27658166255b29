//! Calls to other services, always through Surge's gateway (never to an instance directly, and
//! never into another service's database): the gateway balances them, retries what may be
//! retried and sheds what it must.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

use crate::app::ApiError;

#[derive(Clone)]
pub struct Gateway {
    base: String,
    /// Sent as `Host`: the shop's internal routes answer only `shop.internal`.
    host: Option<&'static str>,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// The host the gateway's internal routes (stock, payments, the processor, notifications)
/// answer to; a request from outside for them finds no route.
pub const INTERNAL_HOST: &str = "shop.internal";

/// An answer: its status and body.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_slice(&self.body)
            .map_err(|err| ApiError::Upstream(format!("an answer that is not the JSON expected: {err}")))
    }
}

impl Gateway {
    pub fn new(base: &str, timeout: Duration) -> Self {
        let client = Client::builder(TokioExecutor::new()).build_http();
        Gateway { base: base.to_owned(), host: None, timeout, client }
    }

    /// The same gateway, for the shop's internal routes.
    pub fn internal(base: &str, timeout: Duration) -> Self {
        Gateway { host: Some(INTERNAL_HOST), ..Gateway::new(base, timeout) }
    }

    /// One request to `path` (which starts with `/`); a transport failure or no answer in
    /// time is a 503 for our own client, naming what was called.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Result<Answer, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder().method(method).uri(&url);
        if let Some(host) = self.host {
            request = request.header("host", host);
        }
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
        let request = request.body(Full::new(body)).map_err(|err| ApiError::Internal(err.to_string()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|err| err.to_string())?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|err| err.to_string())?.to_bytes();
            Ok::<_, String>(Answer { status, body })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(why)) => Err(ApiError::Unavailable(format!("{url} cannot be reached: {why}"))),
            Err(_) => Err(ApiError::Unavailable(format!("{url} did not answer within {:?}", self.timeout))),
        }
    }
}
