//! What one look at the running surge finds: every pool with its instances and its traffic,
//! every queue, every cached route, the gateway's refusals and the alerts. The dashboard
//! receives one each second; `/status` and `/overview` answer with them.

use serde::{Deserialize, Serialize};
use surge_pool::PoolStatus;
use surge_queue::http::QueueStatus;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    /// Counts the looks since start; the dashboard shows it, so a test can tell two apart.
    pub seq: u64,
    pub time_ms: u64,
    pub uptime_s: u64,
    pub services: Vec<ServiceSample>,
    pub queues: Vec<QueueSample>,
    pub caches: Vec<CacheSample>,
    pub gateway: GatewaySample,
    /// Firing and pending alerts.
    pub alerts: Vec<AlertStatus>,
}

/// What a pool is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    /// Serves routes; surge runs its instances.
    Service,
    /// Consumes a queue.
    Worker,
    /// Serves routes from addresses surge does not run.
    Upstreams,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceSample {
    pub kind: PoolKind,
    #[serde(flatten)]
    pub status: PoolStatus,
    pub traffic: TrafficRates,
}

/// A pool's requests over the last second, and its totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrafficRates {
    pub rps: f64,
    pub errors_per_s: f64,
    /// 5xx answers over all answers in the last second; `None` without answers.
    pub error_ratio: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub retries_per_s: f64,
    pub rate_limited_per_s: f64,
    /// Requests being answered now, and those waiting in the gateway for a free instance.
    pub in_flight: u64,
    pub waiting: u64,
    pub requests_total: u64,
    pub errors_total: u64,
    pub rate_limited_total: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueSample {
    #[serde(flatten)]
    pub status: QueueStatus,
    pub publish_per_s: f64,
    pub ack_per_s: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheSample {
    pub route: String,
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub hits_per_s: f64,
    pub misses_per_s: f64,
    /// Hits over hits and misses since start; `None` before the first of either.
    pub hit_ratio: Option<f64>,
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewaySample {
    pub rate_limited_per_s: f64,
    pub rate_limited_total: u64,
    pub unrouted_total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition holds, for less than the rule's `for` so far.
    Pending,
    Firing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertStatus {
    pub name: String,
    pub severity: String,
    pub state: AlertState,
    /// When it became pending or began firing.
    pub since_ms: u64,
    pub summary: String,
    pub value: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
}
