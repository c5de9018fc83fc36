//! Config -> a running sidecar: bind every listener first (so a taken port fails the start,
//! not a request later), spawn the servers, and drain them on SIGTERM.
//!
//! Shutdown (DESIGN.md "Lifecycle"): readiness fails at once and deliveries stop taking new
//! messages; the listeners keep serving while the app still makes calls (it may be shutting
//! down too), until none has been in flight for [`QUIET`]; then they stop accepting and what
//! is left gets the rest of `lifecycle.drain_timeout`; then the process exits 0.
//! With `service.register: true` the registry entry is deleted right after readiness fails,
//! before the drain, so callers stop choosing this instance before it goes away.
//! SIGTERM, SIGINT and SIGHUP are handled from before the first listener serves: nothing can
//! report ready while one of them would still end the process by its default action.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper_util::server::graceful::GracefulShutdown;
use outrigger_config::{self as config, Config};
use outrigger_discovery::time::saturating_add;
use outrigger_discovery::{Instance, Registration, SourceConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{Admin, Health};
use crate::http::in_flight::{Counted, InFlight};
use crate::http::listener::{self, Serving};
use crate::http::route::{Route, RouteTable};
use crate::messaging::Messaging;
use crate::messaging::publish::PublishLimits;
use crate::stack;
use crate::telemetry::metrics::{Metrics, NO_UPSTREAM};
use crate::telemetry::trace::Tracer;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        what: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("service.register: {0}")]
    Register(String),
    #[error("{0}")]
    Tls(#[from] crate::http::tls::TlsError),
    #[error(transparent)]
    Messaging(#[from] crate::messaging::StartError),
    #[error(transparent)]
    Export(#[from] outrigger_config::ExportError),
    #[error(transparent)]
    Otlp(#[from] crate::telemetry::otlp::OtlpError),
}

/// How long the app-facing listeners must see no request in flight before a drain closes them.
const QUIET: Duration = Duration::from_millis(500);
/// How long the spans still queued at exit may take to export, after the drain.
const FLUSH_SPANS: Duration = Duration::from_secs(5);

/// A started sidecar: where it listens, and the handle to stop it.
#[derive(Debug)]
pub struct Running {
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    /// Each dedicated `upstreams.NAME.listen`, as bound.
    pub dedicated: Vec<(Arc<str>, SocketAddr)>,
    /// Stops deliveries, the relay and the other background work.
    stop: watch::Sender<bool>,
    /// Stops the listeners accepting (later than `stop`: the app's calls keep working).
    stop_listeners: watch::Sender<bool>,
    in_flight: Arc<InFlight>,
    graceful: Arc<GracefulShutdown>,
    /// The app's listeners: their connections are waited for on shutdown.
    serving: Serving,
    health: Arc<Health>,
    servers: JoinSet<()>,
    drain_timeout: Duration,
    registration: Option<Registration>,
    /// One dispatcher per subscription; each ends after its deliveries in flight.
    dispatchers: JoinSet<()>,
    messaging: Arc<Messaging>,
}

async fn bind(what: impl Into<String>, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Bind {
        what: what.into(),
        addr,
        source,
    })
}

/// Binds and starts everything `config` describes.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_reloading(config, None).await
}

/// The same, and with `path` (the file `config` came from), reloads it on SIGHUP and when its
/// content changes (see [`crate::reload`]).
pub async fn start_reloading(
    config: Config,
    path: Option<std::path::PathBuf>,
) -> Result<Running, StartError> {
    crate::http::tls::check(&config.upstreams)?;
    let metrics = Metrics::new();
    let outbound = bind("outbound.listen", config.outbound.listen.get()).await?;
    let admin = bind("admin.listen", config.admin.listen.get()).await?;
    let mut dedicated = Vec::new();
    for upstream in config.upstreams.iter() {
        if let Some(addr) = upstream.listen {
            let what = format!("upstreams.{}.listen", upstream.name.as_str());
            dedicated.push((upstream.name.as_str(), bind(what, addr.get()).await?));
        }
    }

    let sources =
        SourceConfig { resolver: config.resolver.clone(), registry: config.registry.clone() };
    let upstreams: Vec<stack::BuiltUpstream> =
        config.upstreams.iter().map(|u| stack::upstream(u, &sources, &metrics, None)).collect();
    let env = |name: &str| std::env::var(name).ok();
    let export = config.telemetry.export(&env)?;
    if let Some(why) = config.telemetry.unused_endpoint(&env) {
        tracing::warn!("{why}");
    }
    let tracer = Tracer::from_config(export.as_ref(), &config.service.name, metrics.span_counts())?;
    let publish_limits = PublishLimits::new(&config.outbound.limits, &metrics);
    let messaging = Messaging::start(
        &config.messaging,
        &config.service.name,
        &metrics,
        tracer.clone(),
        publish_limits,
    )
    .await?;
    let access_log = config.telemetry.access_log;
    let routes = RouteTable::new(stack::routes(&upstreams, &metrics, &messaging, access_log));
    let health = Arc::new(
        Health::new(
            upstreams.iter().map(|u| u.pool.clone()).collect(),
            config.service.app.as_ref().and_then(app_health_uri),
        )
        .with_messaging(messaging.clone()),
    );
    let config_json =
        Bytes::from(serde_json::to_vec_pretty(&config).expect("the config serializes"));
    let admin_routes =
        Admin::new(health.clone(), metrics.clone(), config_json).with_messaging(messaging.clone());
    let config_slot = admin_routes.config_slot();
    let circuits = admin_routes.circuits();
    circuits.set(stack::circuits(&upstreams));

    let (stop, stopped) = watch::channel(false);
    let (stop_listeners, listeners_stopped) = watch::channel(false);
    let limits = &config.outbound.limits;
    let answered = metrics.local_response(NO_UPSTREAM, config::DEFAULT_ROUTE, "overloaded");
    let in_flight =
        Arc::new(InFlight::new(limits.max_requests, metrics.shed("max_requests"), answered));
    let count = in_flight.clone();
    metrics.watch_in_flight(move || count.count());
    let graceful = Arc::new(GracefulShutdown::new());
    let serving = Serving::new(limits, metrics.shed("max_connections"));
    let mut servers = JoinSet::new();
    let mut running = Running {
        outbound: outbound.local_addr().expect("a bound socket has an address"),
        admin: admin.local_addr().expect("a bound socket has an address"),
        dedicated: Vec::new(),
        stop,
        stop_listeners,
        in_flight: in_flight.clone(),
        graceful,
        serving: serving.clone(),
        health,
        servers: JoinSet::new(),
        drain_timeout: config.lifecycle.drain_timeout.get(),
        registration: None,
        dispatchers: JoinSet::new(),
        messaging: messaging.clone(),
    };
    if let Some(app) = &config.service.app
        && !config.messaging.subscriptions.is_empty()
    {
        let app_up = app_up(&running.health, stopped.clone());
        running.dispatchers =
            messaging.deliver(&config.service.name, app_base(app), app_up, stopped.clone());
    }
    let retention = messaging.retain(stopped.clone());
    running.dispatchers.spawn(async move {
        let _ = retention.await;
    });
    if let Some(relay) = messaging.relay(stopped.clone()) {
        running.dispatchers.spawn(async move {
            let _ = relay.await;
        });
    }
    if let Some(relay) = messaging.relay_app_outbox(stopped.clone()) {
        running.dispatchers.spawn(async move {
            let _ = relay.await;
        });
    }

    if let Some(path) = path {
        let live = crate::reload::Live {
            table: routes.clone(),
            health: running.health.clone(),
            config_json: config_slot,
            circuits,
            messaging: messaging.clone(),
            metrics: metrics.clone(),
        };
        // made (and its SIGHUP handler installed) before any listener serves: once `/readyz`
        // can answer 200, a SIGHUP reloads instead of ending the process by its default action
        let reloader = crate::reload::Reloader::new(path, config.clone(), upstreams.clone(), live);
        running.dispatchers.spawn(reloader.run(stopped.clone()));
    }

    let route = Counted::new(Route::ByAuthority(routes.clone()), in_flight.clone());
    servers.spawn(listener::serve_outbound(
        outbound,
        serving.clone(),
        move |_| route.clone(),
        running.graceful.clone(),
        listeners_stopped.clone(),
    ));
    // the probes have connections of their own: a flood of the app's calls never starves them
    servers.spawn(listener::serve(
        admin,
        Serving::new(limits, metrics.shed("max_connections")),
        move |peer| admin_routes.service(peer),
        running.graceful.clone(),
        listeners_stopped.clone(),
    ));
    for (name, listener) in dedicated {
        let addr = listener.local_addr().expect("a bound socket has an address");
        let built = upstreams
            .iter()
            .find(|u| &*u.name == name)
            .expect("every dedicated listener has its upstream");
        running.dedicated.push((built.name.clone(), addr));
        let route = Route::Dedicated { name: built.name.clone(), table: routes.clone() };
        let route = Counted::new(route, in_flight.clone());
        servers.spawn(listener::serve_outbound(
            listener,
            serving.clone(),
            move |_| route.clone(),
            running.graceful.clone(),
            listeners_stopped.clone(),
        ));
    }
    running.servers = servers;
    running.registration = register(&config, &running.health)?;
    tracing::info!(
        outbound = %running.outbound,
        admin = %running.admin,
        upstreams = upstreams.len(),
        "outrigger started"
    );
    Ok(running)
}

/// With `service.register: true`: keeps this instance in the registry while `/readyz` is
/// green, as a task evaluates it every second.
fn register(config: &Config, health: &Arc<Health>) -> Result<Option<Registration>, StartError> {
    let (true, Some(registry), Some(app)) =
        (config.service.register, &config.registry, &config.service.app)
    else {
        return Ok(None);
    };
    let instance = Instance::from_env(&app.url).map_err(StartError::Register)?;
    let (ready_tx, ready) = watch::channel(false);
    let health = health.clone();
    tokio::spawn(async move {
        loop {
            let ready = health.readiness().await.status == "ready";
            ready_tx.send_if_modified(|was| std::mem::replace(was, ready) != ready);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = ready_tx.closed() => return, // the registration has stopped
            }
        }
    });
    let etcd = registry.etcd.clone();
    Ok(Some(Registration::start(etcd, &config.service.name, instance, ready)))
}

/// `service.app.url` with its base path and no trailing `/`: paths are appended to it.
fn app_base(app: &config::App) -> String {
    let url = &app.url;
    // an IPv6 host needs its brackets back
    let host = match url.host() {
        host if host.contains(':') => format!("[{host}]"),
        host => host.to_owned(),
    };
    let base = url.base_path().trim_end_matches('/');
    format!("http://{host}:{}{base}", url.port())
}

/// `service.app.url` + `health_path`, when a health path is configured.
fn app_health_uri(app: &config::App) -> Option<http::Uri> {
    let path = app.health_path.as_deref()?;
    // config validated both parts
    format!("{}{path}", app_base(app)).parse().ok()
}

/// Whether message deliveries may go to the app: with a health path, what it answered at its
/// last check (every second; false until the first passes); without one, always.
fn app_up(health: &Arc<Health>, mut stop: watch::Receiver<bool>) -> watch::Receiver<bool> {
    if !health.checks_app() {
        return watch::channel(true).1;
    }
    let (up_tx, up) = watch::channel(false);
    let health = health.clone();
    tokio::spawn(async move {
        loop {
            let answered = health.app_answers().await;
            if up_tx.send_if_modified(|was| std::mem::replace(was, answered.is_ok()) != *was) {
                match &answered {
                    Ok(detail) => tracing::info!(%detail, "the app is healthy: deliveries go on"),
                    Err(detail) => {
                        tracing::warn!(%detail, "the app's health check fails: deliveries wait")
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        }
    });
    up
}

impl Running {
    /// Fails readiness, stops taking messages, serves the app until it is quiet, stops
    /// accepting, and waits for what is left: all within the drain timeout.
    pub async fn shutdown(mut self) {
        let deadline = saturating_add(tokio::time::Instant::now(), self.drain_timeout);
        self.health.drain();
        if let Some(registration) = self.registration.take() {
            registration.stop().await;
        }
        let _ = self.stop.send(true);
        tracing::info!(timeout = ?self.drain_timeout, "draining: serving the app until it is quiet");
        let quiet = self.in_flight.quiet_for(QUIET);
        if tokio::time::timeout_at(deadline, quiet).await.is_err() {
            tracing::warn!(
                in_flight = self.in_flight.count(),
                "the app was still busy at the drain timeout"
            );
        }
        let _ = self.stop_listeners.send(true);
        while self.servers.join_next().await.is_some() {}
        // every listener task has ended, so this is the last reference (connections hold
        // watchers); were it not, exiting still beats a panic on the way out
        let graceful = Arc::into_inner(self.graceful);
        if graceful.is_none() {
            tracing::error!(
                "the shutdown handle is still shared; hyper's connections are not waited for"
            );
        }
        let mut dispatchers = self.dispatchers;
        let serving = self.serving;
        let drained = async move {
            let hyper_connections = async {
                if let Some(graceful) = graceful {
                    graceful.shutdown().await;
                }
            };
            tokio::join!(hyper_connections, serving.drained());
            while dispatchers.join_next().await.is_some() {}
        };
        if tokio::time::timeout_at(deadline, drained).await.is_err() {
            tracing::warn!(timeout = ?self.drain_timeout, "drain timeout reached; closing what is left");
        }
        // the spans of the last calls and deliveries, still queued, would end with the process
        let tracer = self.messaging.tracer();
        if tokio::time::timeout(FLUSH_SPANS, tracer.flush()).await.is_err() {
            tracing::warn!(timeout = ?FLUSH_SPANS, "spans still queued at exit were not all exported");
        }
        // the outbox stays durable; closing the file spares the next start a repair
        self.messaging.close().await;
        tracing::info!("outrigger stopped");
    }
}

/// Runs until SIGTERM or SIGINT (or, with `exit_with_app`, until the app is gone), then
/// drains; reloads `path` (where `config` came from).
pub async fn run(
    config: Config,
    path: std::path::PathBuf,
    exit_with_app: bool,
) -> Result<(), StartError> {
    // before any listener serves: from the moment `/readyz` can answer 200, a SIGTERM must
    // drain, never end the process by its default action (issue 17). One that arrives while
    // the sidecar starts is kept, and drains it as soon as it has started.
    let mut signals = ShutdownSignals::install();
    let running = start_reloading(config, Some(path)).await?;
    let health = running.health.clone();
    tokio::select! {
        _ = signals.recv() => {}
        _ = app_gone(&health), if exit_with_app => {}
    }
    running.shutdown().await;
    Ok(())
}

/// Job mode: resolves once the app's health check has passed and then failed
/// [`GONE_AFTER`] times in a row (the app exited).
async fn app_gone(health: &Health) {
    let mut seen_up = false;
    let mut failures = 0;
    loop {
        match health.app_answers().await {
            Ok(_) => (seen_up, failures) = (true, 0),
            Err(detail) if seen_up => {
                failures += 1;
                if failures >= GONE_AFTER {
                    tracing::info!(%detail, "the app is gone (--exit-with-app): shutting down");
                    return;
                }
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Failed app health checks in a row, after it was up, that mean the app is gone.
const GONE_AFTER: u32 = 3;

/// SIGTERM and SIGINT, handled by us from [`ShutdownSignals::install`] on.
#[derive(Debug)]
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            term: signal(SignalKind::terminate()).expect("a SIGTERM handler installs"),
            int: signal(SignalKind::interrupt()).expect("a SIGINT handler installs"),
        }
    }

    /// Resolves at the first of them, also one that arrived before this was called.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
