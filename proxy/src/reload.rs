//! Hot reload (DESIGN.md "Lifecycle"): the config file is read again on SIGHUP and whenever its
//! content changes (polled every [`POLL`], by content, so a Kubernetes ConfigMap update, which
//! swaps a symlink, is seen like an edit). A valid new file replaces the upstreams: an upstream
//! whose config is unchanged keeps its stack (breaker state, endpoint health, pooled
//! connections), a changed or new one is built afresh, a removed one is dropped once its
//! requests in flight are done. An invalid file is refused with each error logged as
//! FILE:LINE:COL, and the running config stays. Sections that are bound at startup (listen
//! addresses, service, messaging, registry, resolver, telemetry, lifecycle, runtime) are reported as
//! needing a restart; the rest of the file still applies.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use outrigger_config::{self as config, Config};
use outrigger_discovery::SourceConfig;
use prometheus::IntCounter;
use tokio::sync::watch;

use crate::admin::{Circuits, Health};
use crate::http::route::RouteTable;
use crate::messaging::Messaging;
use crate::stack::{self, BuiltUpstream};
use crate::telemetry::metrics::Metrics;

/// How often the file is read for a change.
pub const POLL: Duration = Duration::from_secs(2);

/// What a reload replaces, and what it builds with.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    running: Config,
    built: HashMap<String, (config::Upstream, BuiltUpstream)>,
    sources: SourceConfig,
    metrics: Metrics,
    messaging: Arc<Messaging>,
    table: Arc<RouteTable>,
    health: Arc<Health>,
    config_json: Arc<RwLock<Bytes>>,
    circuits: Arc<Circuits>,
    last_hash: u64,
    applied: IntCounter,
    refused: IntCounter,
    /// Installed in `new`, before the caller's listeners serve: SIGHUP's default action ends
    /// the process.
    hangup: tokio::signal::unix::Signal,
}

/// The pieces the running sidecar shares with the reloader.
#[derive(Debug)]
pub struct Live {
    pub table: Arc<RouteTable>,
    pub health: Arc<Health>,
    pub config_json: Arc<RwLock<Bytes>>,
    pub circuits: Arc<Circuits>,
    pub messaging: Arc<Messaging>,
    pub metrics: Metrics,
}

impl Reloader {
    /// A reloader for `path`, whose content `running` was loaded from, built as `built`; from
    /// now on SIGHUP is ours (a reload once [`Reloader::run`] runs). Within a tokio runtime.
    pub fn new(path: PathBuf, running: Config, built: Vec<BuiltUpstream>, live: Live) -> Self {
        let sources =
            SourceConfig { resolver: running.resolver.clone(), registry: running.registry.clone() };
        let built = running
            .upstreams
            .iter()
            .cloned()
            .zip(built)
            .map(|(cfg, built)| (cfg.name.as_str().to_owned(), (cfg, built)))
            .collect();
        let last_hash = std::fs::read(&path).map(|b| hash(&b)).unwrap_or(0);
        let metrics = live.metrics;
        metrics.config_hash().set(hash_gauge(last_hash));
        Reloader {
            path,
            running,
            built,
            sources,
            applied: metrics.config_reloads("applied"),
            refused: metrics.config_reloads("invalid"),
            metrics,
            messaging: live.messaging,
            table: live.table,
            health: live.health,
            config_json: live.config_json,
            circuits: live.circuits,
            last_hash,
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .expect("a SIGHUP handler installs"),
        }
    }

    /// Reloads on SIGHUP and on every change of the file's content, until `stop`.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let forced = tokio::select! {
                _ = tokio::time::sleep(POLL) => false,
                _ = self.hangup.recv() => true,
                _ = stop.wait_for(|stop| *stop) => return,
            };
            let Ok(bytes) = std::fs::read(&self.path) else { continue };
            let content = hash(&bytes);
            if forced || content != self.last_hash {
                self.last_hash = content;
                let why = if forced { "SIGHUP" } else { "the file changed" };
                self.reload(&bytes, why);
            }
        }
    }

    /// Loads `bytes` as the config and applies it, or refuses it and keeps the running one.
    fn reload(&mut self, bytes: &[u8], why: &str) {
        let file = self.path.display().to_string();
        let text = String::from_utf8_lossy(bytes);
        let next = match config::load_str(&file, &text) {
            Ok(next) => next,
            Err(errors) => {
                self.refused.inc();
                for line in errors.to_string().lines() {
                    tracing::error!(
                        problem = line,
                        "config reload refused; the running config stays"
                    );
                }
                return;
            }
        };
        for section in restart_needed(&self.running, &next) {
            tracing::warn!(
                section,
                "config reload: this section changed and takes effect at the next restart"
            );
        }
        let mut built = HashMap::new();
        let (mut kept, mut rebuilt) = (0, 0);
        for cfg in next.upstreams.iter() {
            let name = cfg.name.as_str().to_owned();
            let upstream = match self.built.remove(&name) {
                Some((old, upstream)) if &old == cfg => {
                    kept += 1;
                    upstream
                }
                // a breaker whose policy is unchanged but for its mode goes on in the new stack
                was => {
                    rebuilt += 1;
                    let breaker = was.as_ref().and_then(|(_, old)| old.circuit.as_ref());
                    stack::upstream(cfg, &self.sources, &self.metrics, breaker)
                }
            };
            built.insert(name, (cfg.clone(), upstream));
        }
        let removed = self.built.len();
        self.built = built;
        let upstreams: Vec<BuiltUpstream> =
            next.upstreams.iter().map(|cfg| self.built[cfg.name.as_str()].1.clone()).collect();
        let access_log = next.telemetry.access_log;
        let routes = stack::routes(&upstreams, &self.metrics, &self.messaging, access_log);
        self.table.replace(routes);
        self.health.set_upstreams(upstreams.iter().map(|u| u.pool.clone()).collect());
        self.circuits.set(stack::circuits(&upstreams));
        // what needs a restart keeps its running value (and a later reload reports it again)
        self.running = Config { upstreams: next.upstreams, ..self.running.clone() };
        let json = serde_json::to_vec_pretty(&self.running).expect("the config serializes");
        *self.config_json.write().unwrap_or_else(|e| e.into_inner()) = Bytes::from(json);
        self.metrics.config_hash().set(hash_gauge(self.last_hash));
        self.applied.inc();
        tracing::info!(why, kept, rebuilt, removed, "config reloaded");
    }
}

/// The sections that differ and are bound at startup.
fn restart_needed(running: &Config, next: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            changed.push(name);
        }
    };
    check("service", running.service == next.service);
    check("admin", running.admin == next.admin);
    check("outbound", running.outbound == next.outbound);
    check("registry", running.registry == next.registry);
    check("resolver", running.resolver == next.resolver);
    check("messaging", running.messaging == next.messaging);
    check("telemetry", running.telemetry == next.telemetry);
    check("lifecycle", running.lifecycle == next.lifecycle);
    check("runtime", running.runtime == next.runtime);
    let listens = |c: &Config| {
        c.upstreams.iter().map(|u| (u.name.as_str().to_owned(), u.listen)).collect::<Vec<_>>()
    };
    check("upstreams.*.listen", listens(running) == listens(next));
    changed
}

fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// A content hash as a gauge value: 52 bits, so the float holds it exactly.
fn hash_gauge(hash: u64) -> f64 {
    (hash & ((1 << 52) - 1)) as f64
}
