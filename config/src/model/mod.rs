//! The configuration model: serde structs mirroring DESIGN.md's YAML, field for field.
//! Every optional field's default is written once, in a `Default` impl or a named constant;
//! required fields have none and are reported missing. Cross-field rules live in `validate`.

mod export;
mod messaging;
mod retry;
mod route;
mod upstream;

pub use export::{Export, ExportError};
pub use messaging::{
    AppOutbox, Concurrency, ConcurrencyRange, Delivery, Messaging, Retention, Subscription,
    SubscriptionBreaker, Throttle,
};
pub use retry::{Backoff, BackoffStrategy, Budget, Jitter, Retry, RetryOn};
pub(crate) use route::SECTION_OR_OFF;
pub use route::{DEFAULT_ROUTE, OnUpstream, Route, RouteMatch, RouteRetry, RouteTimeouts};
pub use upstream::{
    CircuitBreaker, ConcurrencyLimit, Discovery, Dns, DnsRecord, Fault, FaultAbort, FaultDelay,
    HealthCheck, Hedge, LoadBalancer, Mode, OutlierDetection, Protocol, RateLimit,
    RegistryDiscovery, Timeouts, Tls, Upstream, Upstreams,
};

use crate::types::{AppUrl, ByteSize, Duration, ListenAddr, NameServer, Ratio};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The whole file. An empty file is a valid config: every section at its defaults.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    pub service: Service,
    pub admin: Admin,
    pub outbound: Outbound,
    pub upstreams: Upstreams,
    /// Needed by `discovery: { registry: ... }` and `service.register: true`.
    pub registry: Option<Registry>,
    pub resolver: Resolver,
    pub messaging: Messaging,
    pub telemetry: Telemetry,
    pub lifecycle: Lifecycle,
    pub runtime: Runtime,
}

/// This service: its name (metrics label, consumer group, registry entry) and its local app.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Service {
    pub name: String,
    /// The application beside the sidecar: message deliveries and readiness go to it.
    pub app: Option<App>,
    /// Keep this instance registered in the registry while it is ready.
    pub register: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct App {
    pub url: AppUrl,
    /// Probed for readiness when set; must start with `/`.
    pub health_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Admin {
    pub listen: ListenAddr,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Outbound {
    pub listen: ListenAddr,
    pub limits: Limits,
}

/// Limits on what clients of the outbound listener may send, per connection and request.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Limits {
    /// Larger request heads get 431.
    pub max_header_bytes: ByteSize,
    /// More headers than this get 431.
    pub max_headers: usize,
    /// A client that has not sent its headers by then is disconnected.
    pub header_read_timeout: Duration,
    /// An idle client connection is closed after this.
    pub idle_timeout: Duration,
    /// Client connections open at once on the app-facing listeners (outbound and the dedicated
    /// ports together; the admin port has a budget of its own); one more is answered 503
    /// `overloaded` and closed.
    pub max_connections: usize,
    /// Requests in flight at once across every app-facing listener; one more is answered 503
    /// `overloaded` at once.
    pub max_requests: usize,
    /// Bytes of publish bodies held at once across the sidecar, from the first byte read until
    /// the message is stored; a publish that would go past it is answered 503 `overloaded`.
    pub max_publish_buffer: ByteSize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Registry {
    pub etcd: Etcd,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Etcd {
    /// `http://HOST:PORT` each (`https://` is refused: TLS to etcd is not supported); at least one.
    pub endpoints: Vec<String>,
    #[serde(default = "Etcd::default_prefix")]
    pub prefix: String,
    #[serde(default = "Etcd::default_lease_ttl")]
    pub lease_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Resolver {
    /// `None`: the system's resolv.conf.
    pub nameservers: Option<Vec<NameServer>>,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Telemetry {
    pub log: Log,
    /// `None`: no spans are exported (trace context is still propagated).
    pub tracing: Option<Tracing>,
    /// One log line per proxied call (target `outrigger::access`); off by default.
    pub access_log: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Log {
    pub format: LogFormat,
    /// A level (`info`) or directives in tracing's EnvFilter syntax (`info,outrigger=debug`).
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, PartialEq, Deserialize, Serialize)]
pub struct Tracing {
    /// OTLP over HTTP, e.g. `http://127.0.0.1:4318` (spans go to `/v1/traces` under it).
    /// `None`: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    #[serde(default = "Tracing::default_sample_ratio")]
    pub sample_ratio: Ratio,
    /// `None`: `OTEL_SERVICE_NAME`, `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else
    /// `service.name`.
    pub service_name: Option<String>,
    /// The CAs an `https://` collector's certificate is verified against; `None`: the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Sent with every export (authentication); over `OTEL_EXPORTER_OTLP_HEADERS` name by name.
    /// Shown (`/v1/config`) with each value as `***`: they carry tokens.
    #[serde(default, serialize_with = "redacted_values")]
    pub headers: BTreeMap<String, String>,
}

/// As serialized: the headers' values are `***`.
impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: BTreeMap<&str, &str> = self.headers.keys().map(|k| (&**k, "***")).collect();
        f.debug_struct("Tracing")
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("sample_ratio", &self.sample_ratio)
            .field("service_name", &self.service_name)
            .field("ca_file", &self.ca_file)
            .field("headers", &headers)
            .finish()
    }
}

/// A map with its keys as they are and every value written `***`.
fn redacted_values<S: serde::Serializer>(
    map: &BTreeMap<String, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(map.keys().map(|key| (key, "***")))
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Lifecycle {
    /// On SIGTERM, how long in-flight work may finish.
    pub drain_timeout: Duration,
}

/// The process's threads.
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct Runtime {
    /// Threads serving traffic. `None`: as many as the CPUs this process may use (its
    /// affinity and cgroup quota); one means a single-threaded runtime, the cheapest per request.
    pub workers: Option<usize>,
}

impl Runtime {
    /// The worker threads to start: the configured number, else the CPUs available.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

// === defaults ===

impl Default for Service {
    fn default() -> Self {
        Service { name: "outrigger".to_owned(), app: None, register: false }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin { listen: ListenAddr::new(Ipv4Addr::UNSPECIFIED, 9901) }
    }
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound { listen: ListenAddr::new(Ipv4Addr::LOCALHOST, 4140), limits: Limits::default() }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: ByteSize::kib(64),
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            max_requests: 10_000,
            max_publish_buffer: ByteSize::kib(64 * 1024),
        }
    }
}

impl Etcd {
    fn default_prefix() -> String {
        "/outrigger/services".to_owned()
    }

    fn default_lease_ttl() -> Duration {
        Duration::from_secs(10)
    }
}

impl Default for Log {
    fn default() -> Self {
        Log { format: LogFormat::Text, level: "info".to_owned() }
    }
}

impl Tracing {
    fn default_sample_ratio() -> Ratio {
        Ratio::new_const(1.0)
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle { drain_timeout: Duration::from_secs(30) }
    }
}
