//! `surge.toml`: the typed configuration of a Surge deployment.
//!
//! Parsing happens in two steps. Serde reads the file into the `raw` types, which keep the
//! source span of every value a later check may need to point at; then `validate` turns them
//! into the [`Config`] model, collecting every semantic error (with its key and line) instead
//! of stopping at the first, the way Vector's config compiler does.

mod error;
mod model;
mod raw;
mod validate;

/// Parsed durations ("250ms", "2s") for other TOML documents.
pub use raw::{parse_duration, parse_size, Duration as HumanDuration};

pub use error::{ConfigError, ConfigErrors, Site};
pub use model::{
    AccessLogConfig, AccessLogFormat, AccessLogTarget, AdminConfig, AlertConfig, AlertRule, AlertingConfig,
    Backend, Balance, BufferConfig, CertificateFiles, ClientTimeouts, Config, GatewayConfig, HealthConfig,
    InstanceBounds, LifecycleConfig, OutlierConfig, ProcessLimits, Publish, QueueBackend, QueueConfig,
    RateKey, RateLimit, RetryConfig, Route, RouteCache, RunAs, ScheduleConfig, ServiceConfig, Severity,
    StaticConfig, TimeoutConfig, TlsConfig, Upstream, UpstreamProtocol, UpstreamTlsConfig, WebhookConfig,
    WebhookFormat, WorkerConfig,
};
pub use validate::check_listeners;

use std::path::Path;

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let source = std::fs::read_to_string(path)
        .map_err(|err| ConfigErrors::single(ConfigError::unreadable(path, &err)))?;
    parse(&source, path)
}

/// Parses and validates `source`; `path` names the file in error messages and anchors
/// relative command paths.
pub fn parse(source: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let raw = parse_document(source, path)?;
    validate::validate(raw, source, path)
}

/// Reads any TOML document into `T` (such as a `surge load` scenario), with the same errors
/// as `surge.toml`: file, line, column and dotted key. Use `toml::Spanned` fields and
/// [`Site::new`] to report later checks the same way.
pub fn parse_document<T: serde::de::DeserializeOwned>(source: &str, path: &Path) -> Result<T, ConfigErrors> {
    raw::parse(source).map_err(|err| ConfigErrors::single(err.locate(source, path)))
}

/// Reads a file for [`parse_document`], turning a read failure into the same kind of error.
pub fn read_document(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|err| ConfigErrors::single(ConfigError::unreadable(path, &err)))
}
