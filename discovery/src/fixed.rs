//! The `static` discovery source: a fixed list of `HOST:PORT`.
//!
//! IP literals are ready at once. Names are resolved through the system resolver, and retried
//! every few seconds until they all resolve, so a sidecar that starts before its neighbours'
//! DNS records exist becomes ready when they appear instead of failing for good.

use std::sync::Arc;
use std::time::Duration;

use outrigger_config as config;
use tokio::sync::watch;

use crate::{Endpoint, Snapshot, Status};

const RETRY_EVERY: Duration = Duration::from_secs(5);

pub(crate) fn start(upstream: &str, list: Vec<config::Endpoint>, tx: watch::Sender<Snapshot>) {
    let literal: Option<Vec<Endpoint>> = list
        .iter()
        .map(|e| {
            e.host().parse().ok().map(|ip| Endpoint::new(std::net::SocketAddr::new(ip, e.port())))
        })
        .collect();
    if let Some(endpoints) = literal {
        tx.send_replace(Snapshot::ready(endpoints));
        return;
    }
    let upstream: Arc<str> = upstream.into();
    tokio::spawn(async move {
        loop {
            match resolve(&list).await {
                Ok(endpoints) => {
                    tracing::info!(%upstream, endpoints = endpoints.len(), "static endpoints resolved");
                    tx.send_replace(Snapshot::ready(endpoints));
                    return;
                }
                Err(detail) => {
                    tracing::warn!(%upstream, %detail, "static endpoints did not resolve; retrying");
                    tx.send_modify(|s| s.status = Status::Failing(detail));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_EVERY) => {}
                _ = tx.closed() => return,
            }
        }
    });
}

pub(crate) async fn resolve(list: &[config::Endpoint]) -> Result<Vec<Endpoint>, String> {
    let mut endpoints = Vec::new();
    for e in list {
        let addrs = tokio::net::lookup_host((e.host(), e.port()))
            .await
            .map_err(|err| format!("{e}: {err}"))?;
        endpoints.extend(addrs.map(Endpoint::new));
    }
    Ok(endpoints)
}
