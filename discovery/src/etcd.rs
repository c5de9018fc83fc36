//! The `registry` discovery source: the instances of a service under
//! `{prefix}/{service}/` in etcd, watched.

use outrigger_config as config;
use tokio::sync::watch;

use crate::Snapshot;

pub(crate) fn start(
    upstream: &str,
    _service: String,
    _etcd: Option<config::Etcd>,
    tx: watch::Sender<Snapshot>,
) {
    crate::unavailable(upstream, "registry", &tx);
}
