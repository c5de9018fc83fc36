//! The `file` discovery source: a YAML list of `HOST:PORT`, watched.

use std::path::PathBuf;

use tokio::sync::watch;

use crate::Snapshot;

pub(crate) fn start(upstream: &str, _path: PathBuf, tx: watch::Sender<Snapshot>) {
    crate::unavailable(upstream, "file", &tx);
}
