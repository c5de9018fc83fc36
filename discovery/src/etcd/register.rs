//! Self-registration (`service.register: true`): this instance's app address under
//! `{prefix}/{service}/{instance_id}`, attached to a lease of `lease_ttl` that is kept alive only
//! while the sidecar is ready, so callers stop choosing an instance that cannot serve.
//!
//! While `ready` is true: grant a lease, put the key with it, renew the lease every third of its
//! TTL. When `ready` turns false: delete the key and revoke the lease at once; when it turns
//! true again, register anew. etcd outages are retried with backoff; a lease that expired
//! meanwhile (etcd no longer knows it) is granted again and the key rewritten. If the sidecar
//! dies without `stop`, the key goes away by itself when the lease expires: that is the lease's
//! job. `stop` deletes the key and revokes the lease before it returns, within a few seconds.
//!
//! The instance id and the advertised address come from the environment (`Instance::from_env`),
//! because only the deployment knows which address reaches this Pod.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use outrigger_config as config;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::backoff::Backoff;
use super::gateway::{self, Gateway};
use super::record;

/// How long `stop` may take to delete the key and revoke the lease.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What this instance registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The last part of the key.
    pub id: String,
    /// `HOST:PORT` callers use to reach the app.
    pub address: String,
}

impl Instance {
    /// The id and the address from the environment, for the app at `app`:
    /// - id: `OUTRIGGER_INSTANCE_ID`, else `{hostname}-{app port}` (the hostname from
    ///   `HOSTNAME`, else the kernel's);
    /// - address: `OUTRIGGER_ADVERTISE_ADDRESS` (`HOST:PORT`), else `POD_IP` with the app's
    ///   port, else the app URL's host and port when the host is not loopback, else the local
    ///   address of the default route (found without sending anything) with the app's port.
    pub fn from_env(app: &config::AppUrl) -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let id = match var("OUTRIGGER_INSTANCE_ID") {
            Some(id) => id,
            None => format!("{}-{}", hostname(var("HOSTNAME")), app.port()),
        };
        if id.contains('/') {
            return Err(format!("instance id {id:?} contains '/' (set OUTRIGGER_INSTANCE_ID)"));
        }
        let address = advertised_address(
            var("OUTRIGGER_ADVERTISE_ADDRESS"),
            var("POD_IP"),
            app.host(),
            app.port(),
            default_route_ip,
        )?;
        Ok(Self { id, address })
    }
}

/// The advertised address, by the rules of `Instance::from_env`.
fn advertised_address(
    advertise: Option<String>,
    pod_ip: Option<String>,
    app_host: &str,
    app_port: u16,
    local_ip: impl FnOnce() -> Option<IpAddr>,
) -> Result<String, String> {
    if let Some(address) = advertise {
        let address = address.trim().to_owned();
        return match record::parse_address(&address) {
            Ok(_) => Ok(address),
            Err(why) => Err(format!("OUTRIGGER_ADVERTISE_ADDRESS: {why}")),
        };
    }
    if let Some(ip) = pod_ip {
        let ip: IpAddr =
            ip.trim().parse().map_err(|_| format!("POD_IP {ip:?} is not an IP address"))?;
        return Ok(SocketAddr::new(ip, app_port).to_string());
    }
    match app_host.parse::<IpAddr>() {
        Ok(ip) if !ip.is_loopback() && !ip.is_unspecified() => {
            return Ok(SocketAddr::new(ip, app_port).to_string());
        }
        Ok(_) => {}
        Err(_) if app_host != "localhost" && !app_host.ends_with(".localhost") => {
            return Ok(format!("{app_host}:{app_port}"));
        }
        Err(_) => {}
    }
    match local_ip() {
        Some(ip) => Ok(SocketAddr::new(ip, app_port).to_string()),
        None => Err("cannot tell which address reaches this instance: set \
                     OUTRIGGER_ADVERTISE_ADDRESS (HOST:PORT) or POD_IP"
            .to_owned()),
    }
}

fn hostname(env: Option<String>) -> String {
    env.or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "outrigger".to_owned())
}

/// The source address the kernel would use for the default route, IPv4 first: connecting a
/// UDP socket sends nothing. The targets are documentation addresses (RFC 5737, RFC 3849).
fn default_route_ip() -> Option<IpAddr> {
    let probe = |bind: &str, target: &str| {
        let socket = UdpSocket::bind(bind).ok()?;
        socket.connect(target).ok()?;
        Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    };
    probe("0.0.0.0:0", "198.51.100.1:9").or_else(|| probe("[::]:0", "[2001:db8::1]:9"))
}

/// A running registration; `stop` it to take the key away before the process exits.
#[derive(Debug)]
pub struct Registration {
    key: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Keeps `instance` of `service` registered while `ready` is true.
    pub fn start(
        etcd: config::Etcd,
        service: &str,
        instance: Instance,
        ready: watch::Receiver<bool>,
    ) -> Self {
        let key = record::instance_key(&etcd.prefix, service, &instance.id);
        let mut metadata = serde_json::Map::new();
        metadata.insert("outrigger_version".into(), env!("CARGO_PKG_VERSION").into());
        let registrar = Registrar {
            gateway: Gateway::new(&etcd.endpoints),
            key: key.clone(),
            value: record::encode_value(&instance.address, &metadata),
            address: instance.address,
            ttl: etcd.lease_ttl.get().max(Duration::from_secs(1)),
            lease: None,
            written: false,
        };
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(registrar.run(ready, stopped));
        Self { key, stop, task }
    }

    /// The key this instance is registered under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Deletes the key and revokes the lease (giving up after a few seconds if etcd does not
    /// answer: the lease then expires by itself).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(STOP_TIMEOUT + Duration::from_secs(1), self.task).await;
    }
}

struct Registrar {
    gateway: Gateway,
    key: String,
    value: Vec<u8>,
    address: String,
    ttl: Duration,
    /// The lease granted and not yet known to be gone.
    lease: Option<i64>,
    /// The key is written with `lease`.
    written: bool,
}

impl Registrar {
    async fn run(mut self, mut ready: watch::Receiver<bool>, mut stop: oneshot::Receiver<()>) {
        let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX.min(self.ttl / 3));
        let mut outage = false;
        loop {
            let want = *ready.borrow_and_update();
            let step = tokio::select! {
                step = async {
                    if want { self.keep_registered().await } else { self.deregister(false).await }
                } => step,
                _ = &mut stop => break,
            };
            let wait = match step {
                Ok(next) => {
                    if std::mem::take(&mut outage) {
                        tracing::info!(key = %self.key, "etcd reachable again");
                    }
                    backoff.reset();
                    next
                }
                Err(error) => {
                    if !std::mem::replace(&mut outage, true) {
                        tracing::warn!(key = %self.key, %error, "registry registration failed; retrying");
                    } else {
                        tracing::debug!(key = %self.key, %error, "registry registration still failing");
                    }
                    Some(backoff.next_delay())
                }
            };
            tokio::select! {
                _ = &mut stop => break,
                changed = ready.changed() => {
                    if changed.is_err() {
                        break; // the readiness feed is gone: the sidecar is stopping
                    }
                }
                _ = sleep_or_forever(wait) => {}
            }
        }
        // a step cut short may have written the key without noting it: delete it regardless
        match tokio::time::timeout(STOP_TIMEOUT, self.deregister(true)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(key = %self.key, %error, "could not deregister; the lease expires by itself");
            }
            Err(_) => {
                tracing::warn!(key = %self.key, "etcd did not answer in time to deregister; the lease expires by itself");
            }
        }
    }

    /// Registers if needed, else renews the lease. Returns when to come back: a third of the
    /// TTL, or at once when the lease turned out to be gone.
    async fn keep_registered(&mut self) -> Result<Option<Duration>, gateway::Error> {
        let lease = match self.lease {
            Some(lease) => lease,
            None => {
                let lease = self.gateway.grant(self.ttl.as_secs().max(1) as i64).await?;
                self.lease = Some(lease);
                self.written = false;
                lease
            }
        };
        if !self.written {
            match self.gateway.put(&self.key, &self.value, lease).await {
                Err(error) if error.is_not_found() => {
                    self.lease = None; // expired between grant and put
                    return Ok(Some(Duration::ZERO));
                }
                other => other?,
            }
            self.written = true;
            tracing::info!(key = %self.key, address = %self.address, lease, ttl = ?self.ttl, "registered in the registry");
            return Ok(Some(self.ttl / 3));
        }
        match self.gateway.keep_alive(lease).await? {
            Some(_ttl) => Ok(Some(self.ttl / 3)),
            None => {
                tracing::warn!(key = %self.key, lease, "the registry lease expired; registering again");
                self.lease = None;
                self.written = false;
                Ok(Some(Duration::ZERO))
            }
        }
    }

    /// Deletes the key (when written, or `always`) and revokes the lease, if there is one.
    /// Nothing to do after: `None`.
    async fn deregister(&mut self, always: bool) -> Result<Option<Duration>, gateway::Error> {
        if self.written || always {
            self.gateway.delete(&self.key).await?;
            self.written = false;
            tracing::info!(key = %self.key, "deregistered from the registry");
        }
        if let Some(lease) = self.lease {
            self.gateway.revoke(lease).await?;
            self.lease = None;
        }
        Ok(None)
    }
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(
        advertise: Option<&str>,
        pod_ip: Option<&str>,
        app_host: &str,
        local: Option<&str>,
    ) -> Result<String, String> {
        advertised_address(
            advertise.map(Into::into),
            pod_ip.map(Into::into),
            app_host,
            8080,
            || local.map(|ip| ip.parse().unwrap()),
        )
    }

    #[test]
    fn the_advertised_address_follows_the_documented_order() {
        let local = Some("192.0.2.2");
        assert_eq!(
            address(Some("app.example:9000"), Some("10.1.2.3"), "10.0.0.9", local),
            Ok("app.example:9000".into())
        );
        assert_eq!(address(None, Some("10.1.2.3"), "10.0.0.9", local), Ok("10.1.2.3:8080".into()));
        assert_eq!(address(None, Some("fd00::3"), "127.0.0.1", local), Ok("[fd00::3]:8080".into()));
        assert_eq!(address(None, None, "10.0.0.9", local), Ok("10.0.0.9:8080".into()));
        assert_eq!(address(None, None, "app.internal", local), Ok("app.internal:8080".into()));
        for loopback in ["127.0.0.1", "::1", "localhost", "0.0.0.0"] {
            assert_eq!(
                address(None, None, loopback, local),
                Ok("192.0.2.2:8080".into()),
                "{loopback}"
            );
        }
    }

    #[test]
    fn no_usable_address_is_an_error_that_names_the_setting() {
        let error = address(None, None, "127.0.0.1", None).unwrap_err();
        assert!(error.contains("OUTRIGGER_ADVERTISE_ADDRESS"), "{error}");
        let error = address(Some("no-port"), None, "127.0.0.1", None).unwrap_err();
        assert!(error.contains("OUTRIGGER_ADVERTISE_ADDRESS"), "{error}");
        let error = address(None, Some("pod"), "127.0.0.1", None).unwrap_err();
        assert!(error.contains("POD_IP"), "{error}");
    }

    #[test]
    fn the_hostname_comes_from_the_environment_first() {
        assert_eq!(hostname(Some("web-7f9c".into())), "web-7f9c");
        assert!(!hostname(None).is_empty());
    }
}
