//! How instances are launched and stopped. The local process driver is the default; container
//! and Kubernetes drivers implement the same trait.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

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
    /// What it writes, when the driver captures it.
    pub output: Option<OutputTail>,
}

/// The last lines an instance wrote, for the dashboard's instance view. Bounded in lines and
/// in bytes per line, so a chatty instance costs a fixed amount of memory.
#[derive(Debug, Clone, Default)]
pub struct OutputTail(Arc<Mutex<std::collections::VecDeque<String>>>);

impl OutputTail {
    pub const LINES: usize = 200;
    const LINE_BYTES: usize = 2048;

    pub fn push(&self, line: &str) {
        let mut end = line.len().min(Self::LINE_BYTES);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        let mut lines = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if lines.len() == Self::LINES {
            lines.pop_front();
        }
        lines.push_back(line[..end].to_owned());
    }

    /// Oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter().cloned().collect()
    }
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
