//! The read-only view of a pool served by the admin API and printed by `surge status`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::instance::InstanceState;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolStatus {
    pub service: String,
    pub desired: u32,
    pub min: u32,
    pub max: u32,
    pub balance: String,
    /// Consecutive failures; at `CRASH_LOOP_THRESHOLD` the pool is crash-looping.
    pub failures: u32,
    pub crash_looping: bool,
    pub restarts: u64,
    /// The autoscaler's last decision, for autoscaled pools.
    pub autoscale: Option<AutoscaleStatus>,
    pub instances: Vec<InstanceStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoscaleStatus {
    pub metric: String,
    pub target: f64,
    pub panic: bool,
    pub reason: String,
    pub concurrency: f64,
    pub rps: f64,
    pub latency_p95_ms: Option<f64>,
    /// Cores used by all instances.
    pub cpu: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub id: String,
    pub pid: Option<u32>,
    pub port: u16,
    pub address: SocketAddr,
    /// Its share of the traffic relative to the others (1 unless an upstream sets it).
    pub weight: u32,
    pub state: InstanceState,
    pub in_flight: usize,
    pub served: u64,
    /// Out of rotation by its circuit breaker (or waiting for its probe).
    pub ejected: bool,
    pub ejections: u32,
    pub uptime_ms: u64,
}
