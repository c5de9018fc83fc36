//! The `dns` discovery source: A/AAAA records with the configured port, or SRV records with
//! their own ports, re-resolved at `refresh`.

use outrigger_config as config;
use tokio::sync::watch;

use crate::Snapshot;

pub(crate) fn start(
    upstream: &str,
    _dns: config::Dns,
    _resolver: &config::Resolver,
    tx: watch::Sender<Snapshot>,
) {
    crate::unavailable(upstream, "dns", &tx);
}
