//! TLS for the gateway's HTTPS listener: certificate chains and keys read from PEM files,
//! checked the way a user needs them checked (each error names the file and the config key),
//! chosen per handshake by the client's SNI, and reloaded when the files change without
//! touching open connections. And for instances spoken to over TLS (`upstream`).

mod upstream;

pub use upstream::{check_upstreams, UpstreamTls};

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use surge_config::{CertificateFiles, ConfigError, ConfigErrors};

/// How often the watcher looks at the files' modification times.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// Sessions the server remembers for TLS 1.2 resumption by ID (tickets cover TLS 1.3).
const SESSION_CACHE: usize = 16 * 1024;

/// The certificates the listener serves, swapped whole when the files change.
pub struct Certificates {
    files: ArcSwap<Vec<CertificateFiles>>,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
}

/// Certificates read and checked, not yet in use.
pub struct Prepared {
    files: Vec<CertificateFiles>,
    loaded: Loaded,
}

/// One reading of every file.
struct Loaded {
    entries: Vec<Entry>,
    stamps: Vec<Stamp>,
}

struct Entry {
    /// DNS names from the certificate, lowercase; `*.example.com` matches one label.
    names: Vec<String>,
    key: Arc<CertifiedKey>,
    file: std::path::PathBuf,
    not_after: SystemTime,
}

/// What says a file changed: its modification time and length.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp(Option<SystemTime>, u64);

impl Stamp {
    fn of(path: &Path) -> Stamp {
        match std::fs::metadata(path) {
            Ok(meta) => Stamp(meta.modified().ok(), meta.len()),
            Err(_) => Stamp(None, 0),
        }
    }
}

impl Certificates {
    /// Reads and checks every certificate and key; all problems are reported, each at its key.
    pub fn load(files: &[CertificateFiles]) -> Result<Arc<Self>, ConfigErrors> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let loaded = read_all(files, &provider, SystemTime::now())?;
        Ok(Arc::new(Certificates {
            files: ArcSwap::from_pointee(files.to_vec()),
            provider,
            current: ArcSwap::from_pointee(loaded),
        }))
    }

    /// Reads and checks `files` for [`Certificates::install`], changing nothing yet.
    pub fn prepare(&self, files: &[CertificateFiles]) -> Result<Prepared, ConfigErrors> {
        let loaded = read_all(files, &self.provider, SystemTime::now())?;
        Ok(Prepared { files: files.to_vec(), loaded })
    }

    /// Serves the prepared certificates from now on; open connections keep what they were given.
    pub fn install(&self, prepared: Prepared) {
        self.files.store(Arc::new(prepared.files));
        self.current.store(Arc::new(prepared.loaded));
    }

    /// The rustls configuration for the listener: TLS 1.3 and 1.2 with rustls' default
    /// ciphers, ALPN `h2` then `http/1.1`, resumption by tickets and by session ID.
    /// Each certificate in use (its file) and when it expires, for alerts.
    pub fn expiries(&self) -> Vec<(std::path::PathBuf, SystemTime)> {
        self.current.load().entries.iter().map(|entry| (entry.file.clone(), entry.not_after)).collect()
    }

    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| format!("cannot set up TLS: {err}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|err| format!("cannot set up TLS session tickets: {err}"))?;
        Ok(Arc::new(config))
    }

    /// Reads the files again if any changed since the last reading. `Ok(true)`: new
    /// certificates are in use; on an error the ones in use stay.
    pub fn reload_if_changed(&self) -> Result<bool, ConfigErrors> {
        let files = self.files.load();
        let stamps = stamps(&files);
        if stamps == self.current.load().stamps {
            return Ok(false);
        }
        let loaded = read_all(&files, &self.provider, SystemTime::now())?;
        self.current.store(Arc::new(loaded));
        Ok(true)
    }

    /// Reloads the certificates whenever their files change, until the task is dropped. A
    /// file caught half-written fails its checks and is tried again at the next change.
    pub async fn watch(self: Arc<Self>) {
        let mut failed: Option<Vec<Stamp>> = None;
        loop {
            tokio::time::sleep(RELOAD_INTERVAL).await;
            let stamps = stamps(&self.files.load());
            if failed.as_ref() == Some(&stamps) {
                continue;
            }
            match self.reload_if_changed() {
                Ok(true) => {
                    failed = None;
                    tracing::info!("TLS certificates reloaded");
                }
                Ok(false) => {}
                Err(errors) => {
                    failed = Some(stamps);
                    tracing::warn!("TLS certificates not reloaded; the ones in use stay:\n{errors}");
                }
            }
        }
    }

    /// The certificate for `server_name`: one that names it, else the first.
    fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let loaded = self.current.load();
        let chosen = server_name
            .and_then(|name| {
                loaded.entries.iter().find(|entry| entry.names.iter().any(|n| names_match(n, name)))
            })
            .or(loaded.entries.first());
        chosen.map(|entry| Arc::clone(&entry.key))
    }
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates").field("files", &self.files.load().len()).finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.choose(hello.server_name())
    }
}

/// Whether a certificate's DNS name `pattern` covers `name` (both compared without case).
fn names_match(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(name),
    }
}

fn stamps(files: &[CertificateFiles]) -> Vec<Stamp> {
    files.iter().flat_map(|f| [Stamp::of(&f.cert), Stamp::of(&f.key)]).collect()
}

fn read_all(
    files: &[CertificateFiles],
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<Loaded, ConfigErrors> {
    // Stamps first: a file that changes while it is read is read again at the next look.
    let stamps = stamps(files);
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for files in files {
        match read_one(files, provider, now) {
            Ok(entry) => entries.push(entry),
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() {
        Ok(Loaded { entries, stamps })
    } else {
        Err(ConfigErrors(errors))
    }
}

fn read_one(
    files: &CertificateFiles,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<Entry, ConfigError> {
    let cert_error = |message: String| files.cert_site.error(format!("{}: {message}", files.cert.display()));
    let key_error = |message: String| files.key_site.error(format!("{}: {message}", files.key.display()));

    let cert_pem = std::fs::read(&files.cert).map_err(|err| cert_error(format!("cannot read it: {err}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| cert_error(format!("not a PEM certificate chain: {}", pem_problem(&err))))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_error("holds no certificate (a \"-----BEGIN CERTIFICATE-----\" block)".into()));
    };
    let (names, not_after) = inspect(leaf).map_err(cert_error)?;
    if not_after < now {
        return Err(cert_error(format!("the certificate expired on {}", httpdate::fmt_http_date(not_after))));
    }

    let key_pem = std::fs::read(&files.key).map_err(|err| key_error(format!("cannot read it: {err}")))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| match err {
        pem::Error::NoItemsFound => {
            key_error("holds no private key (a \"-----BEGIN PRIVATE KEY-----\" block)".into())
        }
        err => key_error(format!("not a PEM private key: {}", pem_problem(&err))),
    })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|err| match err {
        rustls::Error::InconsistentKeys(_) => {
            key_error(format!("this key does not belong to the certificate in {}", files.cert.display()))
        }
        err => key_error(format!("cannot use this key: {err}")),
    })?;
    Ok(Entry { names, key: Arc::new(key), file: files.cert.clone(), not_after })
}

/// The leaf's DNS names (its subject alternative names, else its common name) and its expiry.
fn inspect(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|err| format!("the first certificate cannot be read: {err}"))?;
    let mut names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_ascii_lowercase),
        );
    }
    let seconds = cert.validity().not_after.timestamp();
    let not_after = match u64::try_from(seconds) {
        Ok(seconds) => SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
        Err(_) => SystemTime::UNIX_EPOCH,
    };
    Ok((names, not_after))
}

fn pem_problem(err: &pem::Error) -> String {
    match err {
        pem::Error::NoItemsFound => "no PEM block found".into(),
        pem::Error::MissingSectionEnd { .. } => "a block has no \"-----END\" line".into(),
        pem::Error::IllegalSectionStart { .. } => "a \"-----BEGIN\" line is malformed".into(),
        pem::Error::Base64Decode(_) => "a block is not valid base64".into(),
        err => err.to_string(),
    }
}

#[cfg(test)]
mod tests;
