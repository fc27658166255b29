//! One running instance as the data path sees it: an address, a state, and lock-free counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::load::PoolLoad;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Launched; its health check has not answered 2xx yet.
    Starting,
    /// Takes traffic.
    Ready,
    /// Failed consecutive health checks; out of rotation until a check passes.
    Unhealthy,
    /// Out of rotation, finishing its in-flight requests.
    Draining,
    /// Asked to exit (SIGTERM, then SIGKILL).
    Stopping,
    /// The process has exited.
    Exited,
}

impl InstanceState {
    pub const ALL: [InstanceState; 6] = [
        InstanceState::Starting,
        InstanceState::Ready,
        InstanceState::Unhealthy,
        InstanceState::Draining,
        InstanceState::Stopping,
        InstanceState::Exited,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Draining => "draining",
            InstanceState::Stopping => "stopping",
            InstanceState::Exited => "exited",
        }
    }

    /// Counts toward the pool's size: it serves, or is on its way to serving.
    pub fn is_live(&self) -> bool {
        matches!(self, InstanceState::Starting | InstanceState::Ready | InstanceState::Unhealthy)
    }

    fn from_u8(value: u8) -> Self {
        Self::ALL.get(usize::from(value)).copied().unwrap_or(InstanceState::Exited)
    }
}

#[derive(Debug)]
pub struct Instance {
    pub id: String,
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub launched: Instant,
    state: AtomicU8,
    in_flight: AtomicUsize,
    served: AtomicU64,
    exited: watch::Sender<bool>,
    load: Arc<PoolLoad>,
}

impl Instance {
    pub(crate) fn new(id: String, addr: SocketAddr, pid: Option<u32>, load: Arc<PoolLoad>) -> Self {
        Instance {
            id,
            addr,
            pid,
            launched: Instant::now(),
            state: AtomicU8::new(InstanceState::Starting as u8),
            in_flight: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            exited: watch::Sender::new(false),
            load,
        }
    }

    pub fn state(&self) -> InstanceState {
        InstanceState::from_u8(self.state.load(Ordering::SeqCst))
    }

    pub(crate) fn set_state(&self, state: InstanceState) {
        self.state.store(state as u8, Ordering::SeqCst);
    }

    /// Moves from `from` to `to` unless another transition (an exit) came first.
    pub(crate) fn transition(&self, from: InstanceState, to: InstanceState) -> bool {
        self.state.compare_exchange(from as u8, to as u8, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Claims a slot for one request, or `None` if the instance no longer takes traffic.
    ///
    /// The count goes up before the state is read, and a drain sets the state before it reads
    /// the count (both SeqCst), so a request either sees the drain and goes elsewhere, or the
    /// drain sees the request and waits for it. No request reaches a stopped instance.
    pub fn begin(self: &Arc<Self>) -> Option<InFlight> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.state() == InstanceState::Ready {
            Some(InFlight { instance: Arc::clone(self), started: Instant::now() })
        } else {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            None
        }
    }

    pub(crate) fn in_flight_strict(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn mark_exited(&self) {
        self.set_state(InstanceState::Exited);
        self.exited.send_replace(true);
    }

    /// Resolves once the process has exited.
    pub(crate) async fn wait_exited(&self) {
        let mut exited = self.exited.subscribe();
        // An error means the sender is gone, which only happens with the instance itself.
        let _ = exited.wait_for(|exited| *exited).await;
    }
}

/// One request in flight on an instance; dropping it (when the response body is done) ends it.
#[derive(Debug)]
pub struct InFlight {
    instance: Arc<Instance>,
    started: Instant,
}

impl InFlight {
    pub fn instance(&self) -> &Instance {
        &self.instance
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let instance = &self.instance;
        instance.served.fetch_add(1, Ordering::Relaxed);
        instance.in_flight.fetch_sub(1, Ordering::SeqCst);
        instance.load.finished(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Arc<Instance> {
        Arc::new(Instance::new("api-1".into(), SocketAddr::from(([127, 0, 0, 1], 1)), None, Arc::default()))
    }

    #[test]
    fn only_ready_instances_take_requests() {
        let instance = instance();
        assert!(instance.begin().is_none(), "a starting instance takes no traffic");
        assert_eq!(instance.in_flight(), 0);
        instance.set_state(InstanceState::Ready);
        let request = instance.begin().expect("ready");
        assert_eq!((instance.in_flight(), instance.served()), (1, 0));
        drop(request);
        assert_eq!((instance.in_flight(), instance.served()), (0, 1));
        instance.set_state(InstanceState::Draining);
        assert!(instance.begin().is_none(), "a draining instance takes no new traffic");
    }

    #[test]
    fn state_round_trips_through_the_atomic() {
        let instance = instance();
        for state in InstanceState::ALL {
            instance.set_state(state);
            assert_eq!(instance.state(), state);
        }
    }
}
