//! Instances that run elsewhere: a service's `upstreams`. Surge does not start or stop them; it
//! resolves their names, health-checks every address and balances over the healthy ones, like
//! an nginx `upstream` block. Names are resolved again every `dns_refresh`, so an address that
//! appears joins the pool and one that disappears is drained out of it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use surge_config::Upstream;
use tokio::sync::watch;

use crate::driver::{Exit, InstanceControl, Launched};

/// One address to balance over, with the weight and host of the upstream entry it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub addr: SocketAddr,
    pub weight: u32,
    /// What a TLS certificate is checked for.
    pub host: Arc<str>,
}

/// Resolves `upstreams` now and again every `refresh`, sending the full list of endpoints each
/// time it changes. A name that fails to resolve keeps its last addresses (a DNS hiccup must
/// not empty a pool), as Envoy's strict DNS clusters do. Ends when `send` fails.
pub(crate) async fn resolve_forever(
    service: String,
    upstreams: Vec<Upstream>,
    refresh: Duration,
    send: impl Fn(Vec<Endpoint>) -> bool,
) {
    let mut known: Vec<Vec<SocketAddr>> = vec![Vec::new(); upstreams.len()];
    let mut failing: Vec<Option<String>> = vec![None; upstreams.len()];
    let mut sent: Option<Vec<Endpoint>> = None;
    loop {
        for (index, upstream) in upstreams.iter().enumerate() {
            let authority = upstream.authority();
            match tokio::net::lookup_host(authority.clone()).await {
                Ok(addrs) => {
                    let mut addrs: Vec<SocketAddr> = addrs.collect();
                    addrs.sort();
                    addrs.dedup();
                    if failing[index].take().is_some() {
                        tracing::info!("{service}: {authority} resolves again");
                    }
                    known[index] = addrs;
                }
                Err(err) => {
                    let error = err.to_string();
                    if failing[index].as_ref() != Some(&error) {
                        tracing::warn!(
                            "{service}: cannot resolve {authority} ({error}); keeping its last {} address(es)",
                            known[index].len()
                        );
                    }
                    failing[index] = Some(error);
                }
            }
        }
        let endpoints = merge(&upstreams, &known);
        if sent.as_ref() != Some(&endpoints) {
            if !send(endpoints.clone()) {
                return;
            }
            sent = Some(endpoints);
        }
        tokio::time::sleep(refresh).await;
    }
}

/// Every address once, with the weight of the first entry that yields it.
fn merge(upstreams: &[Upstream], known: &[Vec<SocketAddr>]) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for (upstream, addrs) in upstreams.iter().zip(known) {
        for &addr in addrs {
            if !endpoints.iter().any(|e| e.addr == addr) {
                endpoints.push(Endpoint {
                    addr,
                    weight: upstream.weight,
                    host: Arc::from(upstream.host.as_str()),
                });
            }
        }
    }
    endpoints
}

/// The pool's handle on an address it does not run: "stopping" it only takes it out of the
/// pool, once drained.
pub(crate) fn attach(addr: SocketAddr) -> Launched {
    let (removed, mut watch_removed) = watch::channel(false);
    let exited = async move {
        // The sender lives in the control, which the pool holds until the member is gone.
        let _ = watch_removed.wait_for(|removed| *removed).await;
        Exit { success: true, description: "left the pool".to_owned() }
    };
    Launched {
        addr,
        pid: None,
        control: Box::new(Detached { removed }),
        exited: Box::pin(exited),
        output: None,
    }
}

struct Detached {
    removed: watch::Sender<bool>,
}

impl InstanceControl for Detached {
    fn terminate(&self) {
        self.removed.send_replace(true);
    }

    fn kill(&self) {
        self.removed.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(host: &str, weight: u32) -> Upstream {
        Upstream { host: host.to_owned(), port: 80, weight }
    }

    #[test]
    fn merge_keeps_each_address_once_with_its_first_weight() {
        let a: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:80".parse().expect("addr");
        let upstreams = [upstream("one.internal", 2), upstream("both.internal", 5)];
        let known = [vec![a], vec![a, b]];
        assert_eq!(
            merge(&upstreams, &known),
            [
                Endpoint { addr: a, weight: 2, host: "one.internal".into() },
                Endpoint { addr: b, weight: 5, host: "both.internal".into() }
            ]
        );
        assert_eq!(merge(&upstreams, &[vec![], vec![]]), []);
    }

    #[tokio::test]
    async fn names_and_addresses_resolve() {
        let upstreams = vec![
            Upstream { host: "127.0.0.1".to_owned(), port: 7001, weight: 1 },
            Upstream { host: "localhost".to_owned(), port: 7002, weight: 3 },
        ];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let send = move |endpoints| tx.send(endpoints).is_ok();
        let resolving =
            tokio::spawn(resolve_forever("web".to_owned(), upstreams, Duration::from_secs(60), send));
        let endpoints = rx.recv().await.expect("a first resolution");
        resolving.abort();
        let first =
            Endpoint { addr: "127.0.0.1:7001".parse().expect("addr"), weight: 1, host: "127.0.0.1".into() };
        assert_eq!(endpoints[0], first);
        assert!(
            endpoints[1..]
                .iter()
                .all(|e| e.addr.ip().is_loopback() && e.addr.port() == 7002 && e.weight == 3),
            "{endpoints:?}"
        );
        assert!(endpoints.len() >= 2, "localhost resolves: {endpoints:?}");
    }
}
