//! Which endpoints may a request for this upstream use right now?
//!
//! Each upstream's discovery source publishes its current endpoint set on a `watch` channel:
//! the balancer reads the latest set per request without a lock held across an `.await`, and
//! readiness asks whether the first set has arrived. Sources: `static` (fixed.rs), `file`,
//! `dns` and `registry` (etcd.rs); each keeps its last good set when it fails, and says so in
//! its `Status`. etcd.rs also holds self-registration (`Registration`).

#![forbid(unsafe_code)]

mod balance;
mod dns;
mod etcd;
mod file;
mod fixed;
mod health;
mod load;
mod outlier;
mod pool;
pub mod time;

use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use outrigger_config as config;
use tokio::sync::watch;

pub use etcd::{Instance, Registration};
pub use health::{Health, Probe, tcp_probe};
pub use pool::{EndpointReport, Event, Events, Picked, Pool, PoolConfig, State};

/// One address a request can be sent to, with its `HOST:PORT` rendered once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub authority: Authority,
    /// Relative share of traffic (an SRV record's weight); 1 unless the source says otherwise.
    pub weight: u32,
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self::weighted(addr, 1)
    }

    pub fn weighted(addr: SocketAddr, weight: u32) -> Self {
        let authority =
            Authority::try_from(addr.to_string()).expect("a socket address is an authority");
        Self { addr, authority, weight }
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
    /// When the source last confirmed `endpoints` (`None`: never); their age while it fails.
    pub confirmed: Option<tokio::time::Instant>,
}

impl Snapshot {
    /// A set the source has just confirmed.
    pub fn ready(endpoints: impl Into<Arc<[Endpoint]>>) -> Self {
        let confirmed = Some(tokio::time::Instant::now());
        Self { endpoints: endpoints.into(), status: Status::Ready, confirmed }
    }
}

/// What the sources need beyond their upstream's own `discovery` section.
#[derive(Debug, Clone, Default)]
pub struct SourceConfig {
    /// For `dns`: the nameservers to ask.
    pub resolver: config::Resolver,
    /// For `registry`: the top-level `registry` section (validation guarantees it is set).
    pub registry: Option<config::Registry>,
}

/// Which kind of source an upstream's endpoints come from, for the admin view.
fn source_kind(discovery: &config::Discovery) -> &'static str {
    match discovery {
        config::Discovery::Static(_) => "static",
        config::Discovery::Dns(_) => "dns",
        config::Discovery::File(_) => "file",
        config::Discovery::Registry(_) => "registry",
    }
}

/// The current endpoint set of one upstream, as its discovery source keeps it.
#[derive(Debug, Clone)]
pub struct Endpoints {
    rx: watch::Receiver<Snapshot>,
    source: &'static str,
}

impl Endpoints {
    /// Starts the configured source; it runs until every `Endpoints` clone is dropped.
    pub fn start(upstream: &str, discovery: &config::Discovery, sources: &SourceConfig) -> Self {
        let (tx, rx) = watch::channel(Snapshot {
            endpoints: Arc::from([]),
            status: Status::Pending,
            confirmed: None,
        });
        match discovery {
            config::Discovery::Static(list) => fixed::start(upstream, list.clone(), tx),
            config::Discovery::File(path) => file::start(upstream, path.clone(), tx),
            config::Discovery::Dns(dns) => dns::start(upstream, dns.clone(), &sources.resolver, tx),
            config::Discovery::Registry(registry) => {
                let etcd = sources.registry.as_ref().map(|r| r.etcd.clone());
                etcd::start(upstream, registry.service.clone(), etcd, tx)
            }
        }
        Self { rx, source: source_kind(discovery) }
    }

    /// `static`, `dns`, `file` or `registry`.
    pub fn source(&self) -> &'static str {
        self.source
    }

    /// A fixed set, for tests and callers that already know their endpoints.
    pub fn fixed(addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        let endpoints: Arc<[Endpoint]> = addrs.into_iter().map(Endpoint::new).collect();
        let (_tx, rx) = watch::channel(Snapshot::ready(endpoints));
        Self { rx, source: "static" }
    }

    /// A source the caller drives, for tests.
    #[cfg(test)]
    pub(crate) fn driven() -> (watch::Sender<Snapshot>, Self) {
        let (tx, rx) = watch::channel(Snapshot {
            endpoints: Arc::from([]),
            status: Status::Pending,
            confirmed: None,
        });
        (tx, Self { rx, source: "static" })
    }

    /// The endpoints discovered right now: a cheap `Arc` clone.
    pub fn current(&self) -> Arc<[Endpoint]> {
        self.rx.borrow().endpoints.clone()
    }

    /// A receiver of every change, for the pool that follows this source.
    pub(crate) fn receiver(&self) -> watch::Receiver<Snapshot> {
        self.rx.clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.rx.borrow().clone()
    }
}
