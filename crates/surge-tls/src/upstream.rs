//! The client side: instances spoken to over TLS (`protocol = "https"`). Their certificates
//! are verified against a configured CA file or the system's roots, under the configured
//! `server_name` or else the name the instance was found by; a client certificate is shown to
//! instances that ask for one. Sessions are resumed on reconnection (rustls keeps them).

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use surge_config::{ConfigError, ConfigErrors, UpstreamTlsConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::{pem_problem, read_one};

/// An instance gets this long to finish its side of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What connecting to one service's instances over TLS needs, read and checked once.
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
    /// The configured name, used for every instance.
    server_name: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// Reads the CA file (or the system's roots) and the client certificate. Every error names
    /// its config key and file.
    pub fn load(tls: &UpstreamTlsConfig) -> Result<Arc<Self>, ConfigErrors> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut errors = Vec::new();
        let roots = match roots(tls) {
            Ok(roots) => Some(roots),
            Err(error) => {
                errors.push(error);
                None
            }
        };
        let server_name = match &tls.server_name {
            Some((name, site)) => match ServerName::try_from(name.clone()) {
                Ok(name) => Some(name),
                Err(_) => {
                    errors.push(site.error(format!("\"{name}\" is neither a DNS name nor an IP address")));
                    None
                }
            },
            None => None,
        };
        let client_key = match &tls.client_certificate {
            Some(files) => match read_one(files, &provider, SystemTime::now()) {
                Ok(entry) => Some(entry.key),
                Err(error) => {
                    errors.push(error);
                    None
                }
            },
            None => None,
        };
        let Some(roots) = roots.filter(|_| errors.is_empty()) else {
            return Err(ConfigErrors(errors));
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|err| ConfigErrors::single(tls.site.error(err.to_string())))?
            .with_root_certificates(roots);
        let mut config = match client_key {
            Some(key) => {
                builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)))
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(UpstreamTls { config: Arc::new(config), server_name }))
    }

    /// The TLS settings of a service spoken to over TLS, read now. They were checked before the
    /// configuration was taken; a file gone since then gives the reason, for each connection
    /// to fail with.
    pub fn for_service(service: &surge_config::ServiceConfig) -> Result<Arc<Self>, String> {
        match &service.tls {
            Some(tls) => UpstreamTls::load(tls).map_err(|errors| errors.to_string()),
            None => Err(format!("services.{}.tls is missing", service.name)),
        }
    }

    /// Runs the client side of a handshake on `tcp`, checking the instance's certificate for
    /// the configured name or else `host`, the name (or address) the instance was found by.
    pub async fn connect(&self, tcp: TcpStream, host: &str) -> io::Result<TlsStream<TcpStream>> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_owned())
                .map_err(|_| invalid(format!("\"{host}\" cannot be checked in a certificate")))?,
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.config));
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(err)) => Err(io::Error::new(err.kind(), format!("TLS handshake failed: {err}"))),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")),
        }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// The certificate authorities instances are checked against.
fn roots(tls: &UpstreamTlsConfig) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    let Some((path, site)) = &tls.ca else {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found.errors.first().map(|err| format!(" ({err})")).unwrap_or_default();
            return Err(tls.site.error(format!(
                "this system has no trusted root certificates{why}: install ca-certificates, \
                 or name a PEM file of them with `ca`"
            )));
        }
        return Ok(roots);
    };
    let error = |message: String| site.error(format!("{}: {message}", path.display()));
    let pem = std::fs::read(path).map_err(|err| error(format!("cannot read it: {err}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| error(format!("not a PEM certificate list: {}", pem_problem(&err))))?;
    if certs.is_empty() {
        return Err(error("holds no certificate (a \"-----BEGIN CERTIFICATE-----\" block)".into()));
    }
    for cert in certs {
        roots.add(cert).map_err(|err| error(format!("a certificate cannot be trusted: {err}")))?;
    }
    Ok(roots)
}

/// Every problem with the TLS settings of services spoken to over TLS, as `surge check`,
/// `surge up` and `surge reload` report them.
pub fn check_upstreams(services: &[surge_config::ServiceConfig]) -> Vec<ConfigError> {
    services
        .iter()
        .filter_map(|service| service.tls.as_ref())
        .filter_map(|tls| UpstreamTls::load(tls).err())
        .flat_map(|errors| errors.0)
        .collect()
}
