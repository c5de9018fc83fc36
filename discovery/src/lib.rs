//! Which endpoints may a request for this upstream use right now?
//!
//! Each upstream's discovery source publishes its current endpoint set on a `watch` channel:
//! the balancer reads the latest set per request without a lock held across an `.await`, and
//! readiness asks whether the first set has arrived. This release has the static list; DNS, file
//! and registry sources publish through the same channel in a later one.

#![forbid(unsafe_code)]

mod balance;
mod fixed;

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use outrigger_config as config;
use tokio::sync::watch;

pub use balance::Balancer;

/// One address a request can be sent to, with its `HOST:PORT` rendered once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub authority: Authority,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        let authority =
            Authority::try_from(addr.to_string()).expect("a socket address is an authority");
        Self { addr, authority }
    }
}

/// Where a discovery source stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// No endpoint set yet.
    Pending,
    /// The set is current.
    Ready,
    /// The source failed; `endpoints` is the last good set (maybe empty).
    Failing(String),
}

/// What a discovery source last published.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub endpoints: Arc<[Endpoint]>,
    pub status: Status,
}

/// The current endpoint set of one upstream, as its discovery source keeps it.
#[derive(Debug, Clone)]
pub struct Endpoints {
    rx: watch::Receiver<Snapshot>,
}

impl Endpoints {
    /// Starts the configured source; it runs until every `Endpoints` clone is dropped.
    pub fn start(upstream: &str, discovery: &config::Discovery) -> Self {
        let (tx, rx) =
            watch::channel(Snapshot { endpoints: Arc::from([]), status: Status::Pending });
        match discovery {
            config::Discovery::Static(list) => fixed::start(upstream, list.clone(), tx),
            other => {
                let what = match other {
                    config::Discovery::Dns(_) => "dns",
                    config::Discovery::File(_) => "file",
                    _ => "registry",
                };
                let detail = format!("{what} discovery is not available in this release");
                tracing::error!(upstream, "{detail}");
                tx.send_replace(Snapshot {
                    endpoints: Arc::from([]),
                    status: Status::Failing(detail),
                });
            }
        }
        Self { rx }
    }

    /// A fixed set, for tests and callers that already know their endpoints.
    pub fn fixed(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        let endpoints: Arc<[Endpoint]> = addrs.into_iter().map(Endpoint::new).collect();
        let (_tx, rx) = watch::channel(Snapshot { endpoints, status: Status::Ready });
        Self { rx }
    }

    /// The endpoints to balance over right now: a cheap `Arc` clone.
    pub fn current(&self) -> Arc<[Endpoint]> {
        self.rx.borrow().endpoints.clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.rx.borrow().clone()
    }
}
