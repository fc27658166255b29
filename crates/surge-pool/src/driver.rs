//! How instances are launched and stopped. The local process driver is the default; container
//! and Kubernetes drivers implement the same trait.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

/// Everything a driver needs to start one instance.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub service: String,
    pub instance_id: String,
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub run_as: Option<surge_config::RunAs>,
    pub limits: surge_config::ProcessLimits,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub success: bool,
    /// "exited with status 1", "killed by signal 9 (SIGKILL)".
    pub description: String,
}

/// Signals for a running instance. Both are idempotent and harmless once it has exited.
pub trait InstanceControl: Send + Sync {
    /// Ask it to stop (SIGTERM for a process).
    fn terminate(&self);
    /// Stop it now (SIGKILL for a process).
    fn kill(&self);
}

/// A launched instance. `exited` resolves when it ends, however that happens.
pub struct Launched {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub control: Box<dyn InstanceControl>,
    pub exited: Pin<Box<dyn Future<Output = Exit> + Send>>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot reserve a port for the instance: {0}")]
    Port(#[source] std::io::Error),
    #[error("cannot start {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
}

pub trait Driver: Send + Sync + 'static {
    /// Starts one instance. Must be called from a runtime worker thread (see `process.rs`).
    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, LaunchError>;
}
