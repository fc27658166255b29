//! What the layers' unit tests share: pools of fixed instances, and polling by hand.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use surge_pool::{InFlight, Pool};
use tower::Service;

use super::prepare::Outbound;
use crate::body::Payload;
use crate::error::GatewayError;

/// A pool of `instances` ready instances of service `web`, configured by `settings` (lines of
/// `[services.web]`).
pub fn pool(instances: usize, settings: &str) -> Arc<Pool> {
    let addrs: Vec<SocketAddr> =
        (0..instances).map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i as u16))).collect();
    let upstreams: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let source = format!(
        "[services.web]\nupstreams = [{}]\nroutes = [\"/\"]\n{settings}\n",
        if upstreams.is_empty() { "\"127.0.0.1:1\"".to_owned() } else { upstreams.join(", ") }
    );
    let config = match surge_config::parse(&source, std::path::Path::new("test.toml")) {
        Ok(config) => config,
        Err(errors) => panic!("{errors}"),
    };
    let service = config.services.into_iter().next().expect("one service");
    Pool::of_ready(service, &addrs)
}

/// A waker that counts its wake-ups.
#[derive(Default)]
pub struct Counting(AtomicUsize);

impl Wake for Counting {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct Woken {
    counter: Arc<Counting>,
    pub waker: Waker,
}

impl Woken {
    pub fn new() -> Self {
        let counter = Arc::new(Counting::default());
        Woken { waker: Waker::from(Arc::clone(&counter)), counter }
    }

    pub fn count(&self) -> usize {
        self.counter.0.load(Ordering::SeqCst)
    }
}

pub fn poll_ready<S: Service<R>, R>(service: &mut S, woken: &Woken) -> Poll<Result<(), S::Error>> {
    service.poll_ready(&mut Context::from_waker(&woken.waker))
}

/// The innermost service of a balancer under test: answers with the slot it was given, so a
/// test holds it as long as it likes.
#[derive(Clone)]
pub struct Holder;

impl Service<(InFlight, Outbound)> for Holder {
    type Response = InFlight;
    type Error = GatewayError;
    type Future = std::future::Ready<Result<InFlight, GatewayError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (in_flight, _): (InFlight, Outbound)) -> Self::Future {
        std::future::ready(Ok(in_flight))
    }
}

/// A GET with no body, not tried yet.
pub fn outbound() -> Outbound {
    let (parts, ()) = http::Request::get("/").body(()).unwrap_or_default().into_parts();
    Outbound::new(parts, Payload::Kept { bytes: None })
}
