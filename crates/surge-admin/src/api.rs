//! The admin API's JSON bodies, shared by the server and the `surge` command line.

use serde::{Deserialize, Serialize};
pub use surge_observe::sample::{Sample, ServiceSample, TrafficRates};
pub use surge_pool::{InstanceState, InstanceStatus, PoolStatus};

/// `GET /status`: the latest sample (rates, queues, caches, alerts), with every pool's
/// instances as they are at the moment of asking.
pub type StatusResponse = Sample;

#[derive(Debug, Serialize, Deserialize)]
pub struct ScaleRequest {
    pub instances: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ScaleResponse {
    pub service: String,
    pub desired: u32,
}

/// `POST /services/{name}/instances/{id}/drain`.
#[derive(Debug, Serialize, Deserialize)]
pub struct DrainResponse {
    pub service: String,
    pub instance: String,
    pub draining: bool,
}

/// `GET /services/{name}/instances/{id}/log`: its last lines, oldest first.
#[derive(Debug, Serialize, Deserialize)]
pub struct LogResponse {
    pub service: String,
    pub instance: String,
    pub lines: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}

/// The answer to `POST /reload`: what changed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadResponse {
    pub reloaded: String,
}

/// `POST /cache/purge`: exactly one of `url`, `prefix`, `tag`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    pub url: Option<String>,
    pub prefix: Option<String>,
    pub tag: Option<String>,
    /// Mark stale (served while refreshed, or on error) rather than drop.
    #[serde(default)]
    pub soft: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PurgeResponse {
    /// Responses found on this node and in Redis.
    pub purged: usize,
    pub soft: bool,
}
