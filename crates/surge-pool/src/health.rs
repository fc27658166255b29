//! Active health checks: `GET <path>` must answer 2xx within the timeout. In the clear over
//! a kept-alive connection; over TLS on a new connection each time, with the instance's
//! certificate checked as requests check it (HAProxy's `check-ssl` connects anew too).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use surge_config::{ServiceConfig, UpstreamProtocol};
use surge_tls::UpstreamTls;

use crate::Instance;

#[derive(Clone)]
pub(crate) enum Prober {
    Plain(Box<Client<HttpConnector, Empty<Bytes>>>),
    Tls(Arc<UpstreamTls>),
    /// TLS whose settings could not be read: every check fails, saying why.
    BrokenTls(Arc<str>),
}

impl Prober {
    /// Checks in the protocol the service's instances speak.
    pub fn new(config: &ServiceConfig) -> Self {
        if config.protocol == UpstreamProtocol::Https {
            return match UpstreamTls::for_service(config) {
                Ok(tls) => Prober::Tls(tls),
                Err(why) => Prober::BrokenTls(why.into()),
            };
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .http2_only(config.protocol == UpstreamProtocol::H2c)
            .build(connector);
        Prober::Plain(Box::new(client))
    }

    /// Ok when the instance answered 2xx in time; otherwise why not.
    pub async fn probe(&self, instance: &Instance, path: &str, timeout: Duration) -> Result<(), String> {
        let addr = instance.addr;
        let uri = format!("http://{addr}{path}");
        let uri: hyper::Uri = uri.parse().map_err(|err| format!("bad health check URI {uri}: {err}"))?;
        let answer = match self {
            Prober::Plain(client) => {
                tokio::time::timeout(timeout, async { client.get(uri).await.map_err(BoxError::from) }).await
            }
            Prober::Tls(tls) => tokio::time::timeout(timeout, probe_tls(tls, instance, uri)).await,
            Prober::BrokenTls(why) => return Err(why.to_string()),
        };
        match answer {
            Err(_) => Err(format!("GET {path} did not answer within {timeout:?}")),
            Ok(Err(err)) => Err(format!("GET {path} failed: {}", error_chain(&*err))),
            Ok(Ok(response)) if response.status().is_success() => Ok(()),
            Ok(Ok(response)) => Err(format!("GET {path} answered {}", response.status())),
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One check on a new TLS connection.
async fn probe_tls(
    tls: &UpstreamTls,
    instance: &Instance,
    uri: hyper::Uri,
) -> Result<hyper::Response<hyper::body::Incoming>, BoxError> {
    let tcp = tokio::net::TcpStream::connect(instance.addr).await?;
    let _ = tcp.set_nodelay(true);
    let stream = tls.connect(tcp, instance.name()).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let target = uri.path_and_query().map_or("/", |target| target.as_str());
    let request = hyper::Request::get(target)
        .header(hyper::header::HOST, instance.authority.as_str())
        .body(Empty::<Bytes>::new())?;
    Ok(sender.send_request(request).await?)
}

/// An error and every cause under it, `: `-separated.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
