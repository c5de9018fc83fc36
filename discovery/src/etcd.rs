//! The `registry` discovery source: the instances of a service under `{prefix}/{service}/` in
//! etcd, read once and then watched.
//!
//! Range the prefix and publish the set; watch from the range's revision + 1 and apply each
//! put and delete. A broken watch resumes from the last revision seen, so no change is lost
//! across a reconnect; when etcd has compacted that revision away, or the watch lands on a
//! different cluster or one whose revision went backwards (etcd restored from a backup, or
//! replaced), the source ranges again.
//! Reconnects back off exponentially with jitter, up to a few seconds apart. While etcd is
//! unreachable the last known set keeps serving and the status says for how long (readiness
//! shows `degraded`, and `Snapshot.confirmed` dates the last good read). A quiet watch is
//! probed every few seconds on its own endpoint, so a silently dead connection is noticed.
//!
//! A value that is not JSON or has no valid `address` is skipped with a warning; one bad entry
//! never takes a service's other endpoints away. An address may be `IP:PORT` or `NAME:PORT`;
//! a name is resolved when its entry is read, and an entry whose name does not resolve is
//! skipped (with a warning) until its key is written again or the set is re-read.
//!
//! etcd is reached through its JSON gateway (gateway.rs). Self-registration is register.rs.

mod backoff;
mod gateway;
mod record;
mod register;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use outrigger_config as config;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{Endpoint, Snapshot, Status};
use backoff::Backoff;
use gateway::{Event, Gateway, WatchMessage, WatchStream};

pub use register::{Instance, Registration};

const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A watch with no message for this long is probed.
const PROBE_AFTER: Duration = Duration::from_secs(5);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) fn start(
    upstream: &str,
    service: String,
    etcd: Option<config::Etcd>,
    tx: watch::Sender<Snapshot>,
) {
    let Some(etcd) = etcd else {
        // validation requires the registry section for registry discovery
        let detail = "registry discovery needs the top-level registry section".to_owned();
        tracing::error!(upstream, "{detail}");
        tx.send_modify(|s| s.status = Status::Failing(detail));
        return;
    };
    let source = Source {
        upstream: upstream.into(),
        prefix: record::service_prefix(&etcd.prefix, &service).into_bytes(),
        gateway: Gateway::new(&etcd.endpoints),
        tx,
        instances: BTreeMap::new(),
        revision: None,
        cluster: 0,
        failing_since: None,
    };
    tokio::spawn(source.run());
}

/// How a watch session ended without failing.
enum Ended {
    /// The revision to resume from is gone (compacted, or another cluster): read the set again.
    Reread,
    /// Every `Endpoints` is gone: stop.
    Closed,
}

struct Source {
    upstream: Arc<str>,
    /// `{prefix}/{service}/`.
    prefix: Vec<u8>,
    gateway: Gateway,
    tx: watch::Sender<Snapshot>,
    /// Each readable instance key and its endpoints, in key order.
    instances: BTreeMap<Vec<u8>, Vec<Endpoint>>,
    /// The revision the set is current at; `None`: range first.
    revision: Option<i64>,
    /// The cluster `revision` belongs to.
    cluster: u64,
    /// When the current outage began.
    failing_since: Option<Instant>,
}

impl Source {
    async fn run(mut self) {
        let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        loop {
            match self.session(&mut backoff).await {
                Ok(Ended::Closed) => return,
                Ok(Ended::Reread) => continue,
                Err(error) => self.failing(&error),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = self.tx.closed() => return,
            }
        }
    }

    /// Ranges when needed, then follows the watch until it breaks.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<Ended, gateway::Error> {
        let revision = match self.revision {
            Some(revision) => revision,
            None => {
                let range = tokio::select! {
                    range = self.gateway.range(&self.prefix) => range?,
                    _ = self.tx.closed() => return Ok(Ended::Closed),
                };
                self.instances.clear();
                for kv in range.kvs {
                    self.apply(Event::Put(kv)).await;
                }
                self.revision = Some(range.revision);
                self.cluster = range.cluster;
                self.recovered();
                range.revision
            }
        };
        let mut stream = tokio::select! {
            stream = self.gateway.watch(&self.prefix, revision + 1) => stream?,
            _ = self.tx.closed() => return Ok(Ended::Closed),
        };
        loop {
            let message = tokio::select! {
                message = tokio::time::timeout(PROBE_AFTER, stream.next()) => message,
                _ = self.tx.closed() => return Ok(Ended::Closed),
            };
            match message {
                Err(_quiet) => self.probe(&stream).await?,
                Ok(Ok(WatchMessage::Created { cluster, revision: now })) => {
                    if cluster != self.cluster || now < revision {
                        tracing::warn!(
                            upstream = %self.upstream,
                            cluster,
                            revision = now,
                            was_cluster = self.cluster,
                            was_revision = revision,
                            "etcd is another cluster, or its history went backwards; reading the set again"
                        );
                        self.revision = None;
                        return Ok(Ended::Reread);
                    }
                    backoff.reset();
                    self.recovered();
                }
                Ok(Ok(WatchMessage::Changes { revision, events })) => {
                    let last = events.last().map_or(revision, |e| e.kv().mod_revision);
                    let changed = !events.is_empty();
                    for event in events {
                        self.apply(event).await;
                    }
                    self.revision = self.revision.max(Some(last));
                    if changed {
                        tracing::info!(
                            upstream = %self.upstream,
                            endpoints = self.endpoints().len(),
                            revision = last,
                            "registry endpoints changed"
                        );
                    }
                    self.recovered();
                }
                Ok(Ok(WatchMessage::Canceled { compact_revision, .. })) if compact_revision > 0 => {
                    tracing::info!(
                        upstream = %self.upstream,
                        from = revision + 1,
                        compact_revision,
                        "registry watch start revision was compacted; reading the set again"
                    );
                    self.revision = None;
                    return Ok(Ended::Reread);
                }
                Ok(Ok(WatchMessage::Canceled { reason, .. })) => {
                    return Err(gateway::Error::Unavailable(format!(
                        "etcd canceled the watch: {reason}"
                    )));
                }
                Ok(Err(error)) => return Err(error),
            }
        }
    }

    /// A quiet watch: does its member still answer? Then the set is still current.
    async fn probe(&mut self, stream: &WatchStream) -> Result<(), gateway::Error> {
        self.gateway.probe(stream.endpoint(), &self.prefix).await?;
        self.recovered();
        Ok(())
    }

    /// Applies one put or delete to the set.
    async fn apply(&mut self, event: Event) {
        let (key, value) = match event {
            Event::Delete(kv) => {
                self.instances.remove(&kv.key);
                return;
            }
            Event::Put(kv) => (kv.key, kv.value),
        };
        let name = String::from_utf8_lossy(&key).into_owned();
        match self.read(&value).await {
            Ok(endpoints) => {
                self.instances.insert(key, endpoints);
            }
            Err(why) => {
                tracing::warn!(upstream = %self.upstream, key = %name, "registry entry skipped: {why}");
                self.instances.remove(&key);
            }
        }
    }

    /// An instance's endpoints, from its value.
    async fn read(&self, value: &[u8]) -> Result<Vec<Endpoint>, String> {
        match record::decode_value(value)? {
            record::Address::Ip(addr) => Ok(vec![Endpoint::new(addr)]),
            record::Address::Name { host, port } => {
                let lookup = tokio::net::lookup_host((host.as_str(), port));
                match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                    Ok(Ok(addrs)) => {
                        let endpoints: Vec<Endpoint> = addrs.map(Endpoint::new).collect();
                        if endpoints.is_empty() {
                            Err(format!("{host}:{port} resolves to no address"))
                        } else {
                            Ok(endpoints)
                        }
                    }
                    Ok(Err(error)) => Err(format!("{host}:{port} does not resolve: {error}")),
                    Err(_) => {
                        Err(format!("{host}:{port} did not resolve within {RESOLVE_TIMEOUT:?}"))
                    }
                }
            }
        }
    }

    /// The set: every instance's endpoints in key order, each address once.
    fn endpoints(&self) -> Vec<Endpoint> {
        let mut endpoints: Vec<Endpoint> = Vec::new();
        for endpoint in self.instances.values().flatten() {
            if !endpoints.iter().any(|e| e.addr == endpoint.addr) {
                endpoints.push(endpoint.clone());
            }
        }
        endpoints
    }

    /// The set is current: publish it (receivers hear of it only when it or the status
    /// changed; `confirmed` is refreshed either way).
    fn recovered(&mut self) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                upstream = %self.upstream,
                after = ?since.elapsed(),
                "etcd reachable again; following the registry"
            );
        }
        let endpoints: Arc<[Endpoint]> = self.endpoints().into();
        let now = Instant::now();
        self.tx.send_if_modified(|snapshot| {
            snapshot.confirmed = Some(now);
            let changed = snapshot.status != Status::Ready || snapshot.endpoints != endpoints;
            if changed {
                snapshot.endpoints = endpoints;
                snapshot.status = Status::Ready;
            }
            changed
        });
    }

    /// etcd could not be read: keep the last set, say since when. Receivers hear of the first
    /// failure of an outage; later retries only refresh the detail.
    fn failing(&mut self, error: &gateway::Error) {
        let now = Instant::now();
        let first = self.failing_since.is_none();
        let since = *self.failing_since.get_or_insert(now);
        if first {
            tracing::warn!(upstream = %self.upstream, %error, "etcd unreachable; keeping the last known endpoints");
        } else {
            tracing::debug!(upstream = %self.upstream, %error, "etcd still unreachable");
        }
        self.tx.send_if_modified(|snapshot| {
            let detail = failing_detail(now - since, snapshot.confirmed.map(|at| now - at), error);
            let notify = !matches!(snapshot.status, Status::Failing(_));
            snapshot.status = Status::Failing(detail);
            notify
        });
    }
}

/// What `/readyz` says while etcd cannot be read.
fn failing_detail(for_: Duration, last_good: Option<Duration>, error: &gateway::Error) -> String {
    let last_good = match last_good {
        Some(age) => format!("endpoints last confirmed {}s ago", age.as_secs()),
        None => "no endpoint set read yet".to_owned(),
    };
    format!("etcd unreachable for {}s ({last_good}): {error}", for_.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::Kv;

    fn source() -> (Source, watch::Receiver<Snapshot>) {
        let pending =
            Snapshot { endpoints: Arc::from([]), status: Status::Pending, confirmed: None };
        let (tx, rx) = watch::channel(pending);
        let source = Source {
            upstream: "payments".into(),
            prefix: b"/reg/payments/".to_vec(),
            gateway: Gateway::new(&["http://127.0.0.1:1".to_owned()]),
            tx,
            instances: BTreeMap::new(),
            revision: None,
            cluster: 0,
            failing_since: None,
        };
        (source, rx)
    }

    fn kv(id: &str, value: &str) -> Kv {
        let key = format!("/reg/payments/{id}").into_bytes();
        Kv { key, value: value.as_bytes().to_vec(), mod_revision: 1, lease: 0 }
    }

    fn at(address: &str) -> String {
        format!(r#"{{"address": "{address}", "metadata": {{}}}}"#)
    }

    fn addrs(rx: &watch::Receiver<Snapshot>) -> Vec<String> {
        rx.borrow().endpoints.iter().map(|e| e.addr.to_string()).collect()
    }

    #[tokio::test]
    async fn puts_and_deletes_change_the_published_set_and_bad_entries_are_skipped() {
        let (mut source, rx) = source();
        source.apply(Event::Put(kv("a", &at("10.0.0.1:80")))).await;
        source.apply(Event::Put(kv("b", "not json"))).await;
        source.apply(Event::Put(kv("c", &at("10.0.0.1:80")))).await; // same address as a
        source.apply(Event::Put(kv("d", &at("10.0.0.2:80")))).await;
        source.recovered();
        assert_eq!(addrs(&rx), ["10.0.0.1:80", "10.0.0.2:80"]);
        assert_eq!(rx.borrow().status, Status::Ready);

        source.apply(Event::Delete(kv("a", ""))).await;
        source.recovered();
        assert_eq!(addrs(&rx), ["10.0.0.1:80", "10.0.0.2:80"], "c still has 10.0.0.1");

        source.apply(Event::Delete(kv("c", ""))).await;
        source.apply(Event::Put(kv("d", r#"{"address": "no port"}"#))).await;
        source.apply(Event::Put(kv("e", &at("[fd00::5]:8080")))).await;
        source.recovered();
        assert_eq!(addrs(&rx), ["[fd00::5]:8080"], "d's new value is unreadable, so d is out");
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_keeps_the_set_and_says_how_long_it_has_lasted() {
        let (mut source, mut rx) = source();
        source.apply(Event::Put(kv("a", &at("10.0.0.1:80")))).await;
        source.recovered();
        rx.borrow_and_update();
        let error = gateway::Error::Unavailable("http://127.0.0.1:1: connection refused".into());

        tokio::time::advance(Duration::from_secs(2)).await;
        source.failing(&error);
        assert!(rx.has_changed().unwrap(), "the first failure is announced");
        let Status::Failing(detail) = rx.borrow_and_update().status.clone() else {
            panic!("failing expected");
        };
        assert!(
            detail.starts_with("etcd unreachable for 0s (endpoints last confirmed 2s ago)"),
            "{detail}"
        );
        assert_eq!(addrs(&rx), ["10.0.0.1:80"], "the last set keeps serving");

        tokio::time::advance(Duration::from_secs(30)).await;
        source.failing(&error);
        assert!(!rx.has_changed().unwrap(), "a retry only refreshes the detail");
        let Status::Failing(detail) = rx.borrow().status.clone() else {
            panic!("failing expected");
        };
        assert!(
            detail.starts_with("etcd unreachable for 30s (endpoints last confirmed 32s ago)"),
            "{detail}"
        );

        source.recovered();
        assert!(rx.has_changed().unwrap(), "the recovery is announced");
        let snapshot = rx.borrow_and_update().clone();
        assert_eq!(snapshot.status, Status::Ready);
        assert_eq!(snapshot.confirmed, Some(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_confirmation_without_change_refreshes_the_age_silently() {
        let (mut source, mut rx) = source();
        source.apply(Event::Put(kv("a", &at("10.0.0.1:80")))).await;
        source.recovered();
        rx.borrow_and_update();

        tokio::time::advance(Duration::from_secs(5)).await;
        source.recovered(); // e.g. a probe of a quiet watch answered

        assert!(!rx.has_changed().unwrap());
        assert_eq!(rx.borrow().confirmed, Some(Instant::now()));
    }

    #[test]
    fn the_failing_detail_says_how_long_and_how_old_the_set_is() {
        let error = gateway::Error::Unavailable("http://127.0.0.1:2379: connection refused".into());
        assert_eq!(
            failing_detail(Duration::from_secs(12), Some(Duration::from_millis(12_400)), &error),
            "etcd unreachable for 12s (endpoints last confirmed 12s ago): http://127.0.0.1:2379: connection refused"
        );
        assert_eq!(
            failing_detail(Duration::ZERO, None, &error),
            "etcd unreachable for 0s (no endpoint set read yet): http://127.0.0.1:2379: connection refused"
        );
    }
}
